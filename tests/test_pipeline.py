"""pipeline.sh --smoke: every step of the recipe runs end to end on the tiny world (the CI check of pipeline.sh)."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_smoke_runs_every_step_and_prints_the_measurements(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        ["bash", str(ROOT / "pipeline.sh"), "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for step in ("pretrain", "sft"):
        assert (tmp_path / step / "final/model.safetensors").is_file()
        assert (tmp_path / step / "final/tokenizer.json").is_file()
        summary = json.loads((tmp_path / step / "summary.json").read_text())
        assert summary["steps"] == 3
        assert set(summary["probe"]) >= {
            "red_team_toxicity",
            "eos_rate",
            "knowledge_acc",
            "arithmetic_acc",
        }
    assert json.loads((tmp_path / "sft/config.json").read_text())["sft"] is True
    assert (
        tmp_path / "toy/card.json"
    ).is_file()  # --smoke never touches data/toy (others' default world)
    assert "red-team toxicity (T=1)" in r.stdout and "wall time: toyworld" in r.stdout
