"""A PPO iteration of ppo_rlhf.py against TRL's PPO trainer: same checkpoints, same sizes, one process, 1 thread.

    OMP_NUM_THREADS=1 python bench/bench_ppo_vs_trl.py               # ~4 min on one CPU core
    OMP_NUM_THREADS=1 python bench/bench_ppo_vs_trl.py --iters 4 --rounds 2

Both sides start from the toy pipeline's base model (actor and reference) and reward model (reward and critic
initialisation), the HF folders `pipeline.sh` writes (`--actor`, `--reward_model`). Sizes are ppo_rlhf.py's
defaults on both: 32 prompts per iteration (BOS + at most 47 prompt tokens, the same token ids), 32 new tokens at
temperature 0.7 stopping at EOS, 2 PPO epochs x 2 minibatches of 16 (4 optimizer steps), KL coefficient 0.05,
ptx off (TRL has none). TRL: `trl.experimental.ppo.PPOTrainer` (TRL 1.12; the trainer is gone from 1.16), fp32 on
CPU, per-device batch 32 with 2 minibatches (one 16-row micro-batch each, an optimizer step after each), its
rollout forwards in one 32-row chunk. The timed quantity is the wall time between consecutive iterations (TRL:
`on_step_end`; ours: `time/iteration` in metrics.jsonl), the first iteration of every run left out (warm-up);
runs alternate TRL, ours, TRL, ours over `--rounds`, and the median over all timed iterations is reported. TRL is
a bench-only dependency (`pip install trl==1.12.0`); without it only ours is timed.
Writes out/bench/bench_ppo_vs_trl.json.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
import model as M  # noqa: E402
import ppo_rlhf as P  # noqa: E402


def prompt_ids(cfg: P.PPOConfig, n: int) -> list[list[int]]:
    """n training prompts, taken in turn from each source of ppo_rlhf.py's default mixture (equal weights),
    encoded as its rollouts encode them."""
    tok = M.Tokenizer.from_file(cfg.actor)
    sources = [[t for t, _ in P.load_prompts(spec)] for spec in cfg.prompts]
    texts = [sources[i % len(sources)][i // len(sources) % len(sources[i % len(sources)])] for i in range(n)]
    ids, mask = P.encode_prompts(tok, texts, cfg.max_prompt_len)
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def run_trl(cfg: P.PPOConfig, iters: int, out: Path) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    B = cfg.rollout_batch_size
    tok = AutoTokenizer.from_pretrained(cfg.actor, padding_side="left")
    data = Dataset.from_dict({"input_ids": prompt_ids(cfg, B * iters)})
    args = PPOConfig(output_dir=str(out), per_device_train_batch_size=B, gradient_accumulation_steps=1,
                     num_mini_batches=cfg.num_minibatches, num_ppo_epochs=cfg.ppo_epochs, total_episodes=B * iters,
                     local_rollout_forward_batch_size=B, response_length=cfg.max_new_tokens,
                     temperature=cfg.temperature, stop_token="eos", kl_coef=cfg.kl_coef,
                     learning_rate=cfg.actor_lr, report_to=[], save_strategy="no", num_sample_generations=0,
                     use_cpu=True, logging_steps=10**6, seed=cfg.seed, bf16=False, fp16=False,
                     dataloader_num_workers=0)

    def lm():
        return AutoModelForCausalLM.from_pretrained(cfg.actor, dtype=torch.float32)

    def rm():
        return AutoModelForSequenceClassification.from_pretrained(cfg.reward_model, num_labels=1, dtype=torch.float32)

    trainer = PPOTrainer(args=args, processing_class=tok, model=lm(), ref_model=lm(), reward_model=rm(),
                         value_model=rm(), train_dataset=data, callbacks=[Stamp()])
    t0 = time.perf_counter()
    trainer.train()
    return [b - a for a, b in zip([t0] + stamps, stamps)][1:]


def run_ours(cfg: P.PPOConfig, iters: int, out: Path) -> list[float]:
    import dataclasses
    P.train(dataclasses.replace(cfg, out=str(out), total_iters=iters))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["time/iteration"] for r in rows if "time/iteration" in r][1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--actor", default="out/pretrain/final")
    ap.add_argument("--reward_model", default="out/reward_model/final")
    ap.add_argument("--iters", type=int, default=4, help="iterations per run (the first is not timed)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = P.PPOConfig()
    cfg = P.PPOConfig(actor=args.actor, reward_model=args.reward_model, ptx_coef=0.0, eval_prompts="",
                      eval_corpus="", save_every=0, prompts=[str(ROOT / p) for p in d.prompts],
                      toxic_lexicon=str(ROOT / d.toxic_lexicon), device="cpu", dtype="fp32")
    try:
        import trl
        have_trl = hasattr(__import__("trl.experimental", fromlist=["x"]), "__path__")
        from trl.experimental.ppo import PPOTrainer  # noqa: F401
        version = trl.__version__
    except ImportError:
        have_trl, version = False, None
    times: dict[str, list[float]] = {"ours": []} | ({"TRL": []} if have_trl else {})
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            if have_trl:
                times["TRL"] += run_trl(cfg, args.iters, Path(tmp) / f"trl{r}")
            times["ours"] += run_ours(cfg, args.iters, Path(tmp) / f"ours{r}")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nPPO iteration, {cfg.rollout_batch_size} prompts x {cfg.max_new_tokens} new tokens, "
          f"{cfg.ppo_epochs} epochs x {cfg.num_minibatches} minibatches, ptx off, 1 thread, "
          f"{args.rounds} rounds x {args.iters - 1} timed iterations, median")
    for k, v in med.items():
        extra = f"   ours is {med['TRL'] / med['ours']:.2f}x faster" if k == "TRL" else ""
        print(f"{k:<6}{v:>8.3f} s/iteration  (all: {', '.join(f'{x:.2f}' for x in times[k])}){extra}")
    res = {"trl": version, "threads": torch.get_num_threads(), "seconds_per_iteration": times, "median": med,
           "ratio_trl_over_ours": med["TRL"] / med["ours"] if "TRL" in med else None}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    C.write_json_atomic(Path(args.out) / "bench_ppo_vs_trl.json", res)
    print(f"wrote {Path(args.out) / 'bench_ppo_vs_trl.json'}")


if __name__ == "__main__":
    main()
