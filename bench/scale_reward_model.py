"""A copy of a reward-model folder whose raw scores are `factor` times larger: the ICE-GRT "Reward Size Scaling"
ablation of reward normalisation (bench/ablate_ppo.sh's raw_large_* runs).

    python bench/scale_reward_model.py out/reward_model/final out/ablate_ppo/rm_scaled --factor 20

The raw score is the bias-free head `score` applied to the last token's hidden state (reward_model.py details 1
and 3), so multiplying `score.weight` (and a `score.bias`, if a transformers-saved head has one) by the factor
multiplies every raw score by it, and every per-token value of a critic initialised from this folder too. The
stored training-response statistics (reward_model.py detail 9) are scaled with it: reward_mean * factor,
reward_std * factor, so `ppo_rlhf.py --reward_norm fixed` sees exactly the normalised rewards of the source
model (up to float rounding), while `--reward_norm none` sees the large raw scores.

Details:
1. factor > 0 only: a negative factor would reverse which response the model prefers, which is not a change of
   scale.
2. The head is scaled in float64 and cast back to its stored dtype; an fp32 head keeps the product exact to fp32
   rounding (a bf16 head would round it, and the script says so).
3. DST must not exist (the script never overwrites a folder). Everything is written into a temporary folder next
   to DST and renamed into place, so DST is either absent or complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # model.py and common.py live at the repository root

import torch  # noqa: E402

from common import InputError, cli  # noqa: E402
from model import load_safetensors_dir, save_safetensors_dir  # noqa: E402

HEAD_KEYS = ("score.weight", "score.bias")  # the scalar head of reward_model.RewardModel (HF layout)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")  # rewritten, not copied


def scale_reward_model(src: str | os.PathLike, dst: str | os.PathLike, factor: float) -> Path:
    """Write DST: SRC with the score head and the stored reward mean/std multiplied by `factor`."""
    src, dst = Path(src), Path(dst)
    if not factor > 0:  # detail 1 (also refuses nan)
        raise InputError(f"--factor {factor}: must be > 0 (a negative factor flips the preference order)")
    if dst.exists() or dst.is_symlink():  # detail 3
        raise InputError(f"{dst}: exists already; choose a new DST or remove it first (this script never overwrites)")
    if not (src / "config.json").is_file():
        raise InputError(f"{src}: no config.json; SRC must be a reward-model folder (reward_model.py's final/)")
    cfg = json.loads((src / "config.json").read_text())
    sd = load_safetensors_dir(src)
    if "score.weight" not in sd:
        raise InputError(f"{src}: no 'score.weight' tensor: a causal LM, not a reward model")
    for k in HEAD_KEYS:
        if k in sd:
            w = sd[k]
            sd[k] = (w.double() * factor).to(w.dtype)  # detail 2
            if w.dtype != torch.float32:
                print(f"scale_reward_model: {k} is stored in {w.dtype}; the scaled head is rounded to it")
    # reward_model.RewardModel reads mean 0 / std 1 when the fields are absent; write the scaled values explicitly
    mean, std = float(cfg.get("reward_mean", 0.0)), float(cfg.get("reward_std", 1.0))
    cfg.update(reward_mean=mean * factor, reward_std=std * factor, score_scale_factor=factor, scaled_from=str(src))

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); DST gets the usual folder permissions
    try:
        save_safetensors_dir(tmp, sd, cfg)
        for f in src.iterdir():  # tokenizer files and anything else but the weights and config
            if f.is_file() and f.name != "config.json" and f.name not in WEIGHT_FILES and \
                    not (f.name.startswith("model-") and f.name.endswith(".safetensors")):
                shutil.copy2(f, tmp / f.name)
        os.rename(tmp, dst)  # fails rather than replaces if DST appeared meanwhile with content
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"scale_reward_model: {src} -> {dst}: raw scores x{factor:g}, reward_mean {mean:+.4f} -> "
          f"{mean * factor:+.4f}, reward_std {std:.4f} -> {std * factor:.4f} (fixed normalisation unchanged)")
    return dst


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", help="reward-model folder (config.json + safetensors), e.g. out/reward_model/final")
    p.add_argument("dst", help="new folder to write; must not exist")
    p.add_argument("--factor", type=float, default=20.0, help="multiplier on every raw score")
    args = p.parse_args(argv)
    return scale_reward_model(args.src, args.dst, args.factor)


if __name__ == "__main__":
    cli(main)
