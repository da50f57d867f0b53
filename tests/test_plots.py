"""plots.py: real PNGs from synthetic ppo_rlhf.py / evaluate.py data, and nothing at all without matplotlib."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_ppo_metrics(path: Path, iters: int, shift: float) -> Path:
    """A metrics.jsonl as ppo_rlhf.py writes it: the base eval at iteration 0, one row per iteration, the final eval."""
    rows = [{"iter": 0, "eval": "base", "eval/reward": -3.6, "eval/kl": 0.0, "eval/toxicity_rate/red_team": 0.56,
             "eval/eos_rate": 0.8, "eval/length": 19.7, "eval/corpus_loss": 0.49}]
    for it in range(1, iters + 1):
        rows.append({"iter": it, "time": 0.1 * it, "objective/scores": -4 + 0.1 * it + shift,
                     "objective/kl": 0.1 * it, "val/toxicity_rate": 0.5 / it, "val/num_eos_tokens": 0.8 + 0.01 * it,
                     "val/response_length": 19 + it, "ppo/early_stopped": False})  # no loss/ptx_avg: ptx off
    rows.append({"iter": iters, "eval": "final", "eval/reward": -2 + shift, "eval/kl": 1.5,
                 "eval/toxicity_rate/red_team": 0.02, "eval/eos_rate": 0.98, "eval/length": 21.5,
                 "eval/corpus_loss": 0.5})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iter": 9, "objec')  # torn last line
    return path


def assert_png(path: Path) -> None:
    image = pytest.importorskip("matplotlib.image")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    h, w = image.imread(path).shape[:2]
    assert 300 < w < 4000 and 200 < h < 3000, (w, h)
    assert not list(path.parent.glob("*.tmp")), "the atomic write left its temporary file behind"


def bars_table() -> dict:
    return {"models": ["base", "ppo"], "tasks": ["toy_mmlu\nacc", "toy_redteam\n1 - toxicity_rate", "toy_gsm8k"],
            "values": {"base": {"toy_mmlu\nacc": (0.27, 0.06), "toy_redteam\n1 - toxicity_rate": (0.38, 0.06),
                                "toy_gsm8k": (0.0, None)},
                       "ppo": {"toy_mmlu\nacc": (0.27, 0.06), "toy_redteam\n1 - toxicity_rate": (0.97, 0.02)}},
            "chance": {"toy_mmlu\nacc": 0.25, "toy_redteam\n1 - toxicity_rate": None},
            "categories": {"toy_mmlu\nacc": "Knowledge", "toy_redteam\n1 - toxicity_rate": "Safety",
                           "toy_gsm8k": "Math"}}


def test_ppo_runs_with_seeds_and_missing_keys_make_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    runs = {"default": [write_ppo_metrics(tmp_path / f"s{i}/metrics.jsonl", 6, 0.1 * i) for i in range(2)],
            "kl_control_off": [write_ppo_metrics(tmp_path / "nokl/metrics.jsonl", 4, 0.3)]}
    out = plots.plot_ppo_runs(runs, tmp_path / "pics/curves.png", title="two runs")
    assert out == tmp_path / "pics/curves.png"
    assert_png(out)


def test_seed_stats_mean_min_max_over_the_seeds_that_logged_an_iteration():
    iters, mean, lo, hi = plots.seed_stats([{1: 1.0, 2: 2.0}, {1: 3.0}])
    assert (iters, mean, lo, hi) == ([1, 2], [2.0, 2.0], [1.0, 2.0], [3.0, 2.0])


def test_eval_bars_make_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = plots.plot_eval_bars(bars_table(), tmp_path / "results.png", title="primary metric, % +- stderr")
    assert out == tmp_path / "results.png"
    assert_png(out)
    assert_png(plots.plot_eval_bars(bars_table(), tmp_path / "rows/results.png", per_row=2))  # two rows of bars


def test_bar_rows_are_balanced_and_keep_the_order():
    tasks = [f"t{i}" for i in range(12)]
    assert plots.bar_rows(tasks, 10) == [tasks[:6], tasks[6:]]
    assert plots.bar_rows(tasks[:3], 10) == [tasks[:3]]


def test_without_matplotlib_nothing_is_written_and_none_returned(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    runs = {"default": [write_ppo_metrics(tmp_path / "metrics.jsonl", 3, 0.0)]}
    assert plots.plot_ppo_runs(runs, tmp_path / "curves.png") is None
    assert plots.plot_eval_bars(bars_table(), tmp_path / "results.png") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
