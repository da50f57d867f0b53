"""Benchmark ppo_rlhf.py: seconds per PPO iteration split into generation / scoring / update, at the toy config.

    python bench/bench_ppo.py                      # CPU, toy config, 4 timed iterations after 1 warm-up
    python bench/bench_ppo.py --device cuda        # the same on a GPU (absolute figures and MFU)

Uses the toy base model and reward model when they exist (out/pretrain/final, out/reward_model/final), else
random models of the same shape (same cost per token; a random policy never emits EOS, so every response runs
to max_new_tokens, the worst case). The phases are timed inside ppo_rlhf.train (metrics.jsonl):
generate = KV-cache sampling; score = full forwards of actor (old log-probs), reference, critic and reward
model; update = rewards, GAE and the PPO epochs. Each phase's FLOPs are counted from the parameter counts
(forward 2N per token, training 6N, plus attention via model.flops_per_token) and divided by the machine's
fp32 matmul peak measured in this run (CPU) or the datasheet peak (GPU): a ratio, not a bare time.
Writes out/bench/bench_ppo.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
import model as M  # noqa: E402
import ppo_rlhf as P  # noqa: E402


def random_toy_models(tmp: Path) -> tuple[Path, Path]:
    """A random base model + RM of the toy shape (pretrain.py's defaults) with a tokenizer on the toy corpus."""
    from reward_model import RewardModel
    texts = P.load_texts(str(ROOT / "data/toy/corpus/train.jsonl"), 2000)
    tok = M.train_tokenizer(texts, vocab_size=2048)
    cfg = M.ModelConfig(vocab_size=tok.vocab_size, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=6, num_key_value_heads=2, rope_theta=1e4,
                        max_position_embeddings=512, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                        pad_token_id=tok.pad_id)
    M.MistralForCausalLM(cfg).save_pretrained(tmp / "actor", tokenizer=tok)
    RewardModel.from_causal_lm(tmp / "actor").save_pretrained(tmp / "rm", tokenizer=tok)
    return tmp / "actor", tmp / "rm"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--iters", type=int, default=4, help="timed iterations (one more is a warm-up)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    ap.add_argument("--out", default=str(ROOT / "out/bench"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if args.device == "cuda" else "cpu")
    actor_dir, rm_dir = ROOT / "out/pretrain/final", ROOT / "out/reward_model/final"
    tmp = Path(tempfile.mkdtemp(prefix="bench_ppo_"))
    source = "toy checkpoints"
    if not (M.is_checkpoint_dir(actor_dir) and M.is_checkpoint_dir(rm_dir)):
        actor_dir, rm_dir = random_toy_models(tmp)
        source = "random models of the toy shape"
    d = P.PPOConfig()  # the toy defaults, evaluation and saving off
    cfg = P.PPOConfig(actor=str(actor_dir), reward_model=str(rm_dir), out=str(tmp / "run"), device=args.device,
                      dtype=args.dtype, total_iters=args.iters + 1, eval_prompts="", eval_corpus="",
                      save_every=0, prompts=[str(ROOT / p) for p in d.prompts],
                      toxic_lexicon=str(ROOT / d.toxic_lexicon))
    P.train(cfg)
    rows = [json.loads(x) for x in (tmp / "run/metrics.jsonl").read_text().splitlines()][1:]  # drop warm-up

    def avg(k: str) -> float:
        return sum(r[k] for r in rows) / len(rows)

    actor = M.load_config(actor_dir)
    rm = M.load_config(rm_dir)
    B = cfg.rollout_batch_size
    T = avg("shape/prompt_width") + avg("shape/response_width")  # padded tokens per sequence
    n_gen = avg("val/response_length") * B
    fwd = {name: C.flops_per_token(c, int(T)) / 3 for name, c in (("actor", actor), ("rm", rm))}  # 2N + attn
    # generate: prefill + one token at a time over the padded width (every row runs every step)
    flops = {"generate": fwd["actor"] * B * T,
             "score": B * (T * 2 * fwd["actor"] + T * fwd["rm"] * 2),  # actor + ref, critic + RM
             "update": B * T * 3 * (fwd["actor"] + fwd["rm"]) * cfg.ppo_epochs}  # fwd + bwd = 3x fwd
    if dev.type == "cuda":
        peak, peak_name = C.peak_flops(dev), "datasheet bf16 peak"
    else:
        peak, peak_name = C.measure_matmul_peak(torch.float32), "measured fp32 matmul peak"
    times = {k: avg(f"time/{k}") for k in ("generate", "score", "update")}
    total = avg("time/iteration")
    res = {"device": str(dev), "models": source, "iters_timed": len(rows), "rollout_batch_size": B,
           "max_new_tokens": cfg.max_new_tokens, "mean_response_tokens": n_gen / B, "padded_seq_len": T,
           "threads": torch.get_num_threads(), "peak_flops": peak, "peak": peak_name,
           "seconds_per_iter": total, "generated_tokens_per_s": n_gen / total, "phases": {}}
    print(f"\nppo_rlhf iteration at the toy config ({source}, {dev}, batch {B}, "
          f"{n_gen / B:.1f} response tokens of {cfg.max_new_tokens}, {torch.get_num_threads()} threads)")
    print(f"{'phase':<10}{'s/iter':>9}{'share':>8}{'GFLOP':>9}{'of peak':>10}")
    for k, t in times.items():
        frac = flops[k] / t / peak if peak else None
        res["phases"][k] = {"seconds": t, "share": t / total, "gflop": flops[k] / 1e9, "fraction_of_peak": frac}
        print(f"{k:<10}{t:>9.3f}{t / total:>8.0%}{flops[k] / 1e9:>9.2f}"
              + (f"{frac:>10.1%}" if frac is not None else f"{'n/a':>10}"))
    other = total - sum(times.values())
    print(f"{'other':<10}{other:>9.3f}{other / total:>8.0%}")
    print(f"{'total':<10}{total:>9.3f}{1:>8.0%}   generated tokens/s {n_gen / total:.0f} "
          f"(peak = {peak_name} {peak / 1e9 if peak else 0:.0f} GFLOP/s)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    C.write_json_atomic(Path(args.out) / "bench_ppo.json", res)
    share = res["phases"]["generate"]["share"]
    print(f"generation is {share:.0%} of an iteration"
          + (": optimise the sampler first" if share > 0.4 else ": the update dominates"))


if __name__ == "__main__":
    main()
