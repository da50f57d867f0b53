"""Benchmark reward_model.py: training and scoring throughput in pairs/s, as a fraction of the matmul peak.

    python bench/bench_reward.py                     # CPU, the toy base model's shape, fp32: ratios to the peak
    python bench/bench_reward.py --device cuda       # a ~124M config in bf16: pairs/s and MFU vs datasheet peak

A "pair" is a chosen and a rejected sequence (BOS + prompt + response + EOS). Lengths are drawn around the toy
preference data's mean (40 tokens, range 16-94) and right padded, so padding waste is included the way training
sees it; FLOPs count real tokens only: train 6N + 12*L*H*hd*T per token (model.flops_per_token, N without the
embedding lookup), scoring a third of that (forward only). On CPU the ceiling is an fp32 matmul measured in the
same run. Also compares detail 6 of reward_model.py (chosen and rejected in ONE forward) with two forwards.
Writes out/bench/bench_reward.json.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import model as M  # noqa: E402
import reward_model as R  # noqa: E402

TOY = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8,
           num_key_value_heads=4, rope_theta=1e4, max_position_embeddings=2048)  # pretrain.py's default shape
GPT2_SMALL = dict(vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, rope_theta=1e4, max_position_embeddings=2048)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_pairs(n: int, mean_len: int, vocab: int, gen: torch.Generator) -> list[list[int]]:
    """2n sequences (chosen block, then rejected block) with lengths uniform in [mean/2, 3*mean/2]."""
    lens = torch.randint(mean_len // 2, mean_len * 3 // 2 + 1, (2 * n,), generator=gen).tolist()
    return [[1] + torch.randint(3, vocab, (t - 2,), generator=gen).tolist() + [2] for t in lens]


def timed(fn, steps: int, device, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="auto = fp32 on CPU, bf16 on GPU")
    ap.add_argument("--pairs", type=int, default=32, help="pairs per optimizer step / per scoring call")
    ap.add_argument("--mean_len", type=int, default=40, help="mean tokens per sequence (toy data: 40)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--init", default="out/pretrain/final",
                    help="take the model shape from this checkpoint's config.json if it exists (CPU only), "
                         "else pretrain.py's default toy shape; weights are random either way")
    ap.add_argument("--out", default="out/bench/bench_reward.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = C.resolve_device_dtype(args.device, args.dtype)
    shape = TOY if device.type == "cpu" else GPT2_SMALL
    if device.type == "cpu" and (Path(args.init) / "config.json").is_file():
        c = M.load_config(args.init)
        shape = {k: getattr(c, k) for k in TOY}
    cfg = M.ModelConfig(**shape)
    torch.manual_seed(0)
    rm = R.RewardModel(cfg).to(device)
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-5, eps=1e-5, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    seqs = make_pairs(args.pairs, args.mean_len, cfg.vocab_size, gen)
    n = args.pairs
    ids, mask = (t.to(device) for t in M.pad_batch(seqs, 0, side="right"))
    ids_c, mask_c = (t.to(device) for t in M.pad_batch(seqs[:n], 0, side="right"))
    ids_r, mask_r = (t.to(device) for t in M.pad_batch(seqs[n:], 0, side="right"))
    real_tokens = int(mask.sum())
    ctx = C.autocast_ctx(device, dtype)

    def train_one_forward():  # reward_model.py's training step (detail 6)
        with ctx:
            r = rm(ids, mask)
        R.bradley_terry_loss(r[:n], r[n:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def train_two_forwards():  # the alternative: chosen and rejected in separate calls
        with ctx:
            rc, rr = rm(ids_c, mask_c), rm(ids_r, mask_r)
        R.bradley_terry_loss(rc, rr).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def score():
        with ctx:
            rm(ids, mask)

    peak = C.peak_flops(device) if device.type == "cuda" else C.measure_matmul_peak(seconds=1.0)
    n_mm = C.count_params(rm) - rm.model.embed_tokens.weight.numel()  # matmul params (no embedding lookup)
    mean_t = real_tokens / (2 * n)
    train_flops = real_tokens * C.flops_per_token(cfg, int(mean_t), n_mm)
    score_flops = train_flops / 3  # forward = 1/3 of forward + backward
    rows = []
    for name, fn, flops in [("train step (1 forward/pair)", train_one_forward, train_flops),
                            ("train step (2 forwards/pair)", train_two_forwards, train_flops),
                            ("scoring (no grad)", score, score_flops)]:
        dt = timed(fn, args.steps, device)
        rows.append({"name": name, "s_per_call": dt, "pairs_per_s": n / dt, "tokens_per_s": real_tokens / dt,
                     "gflops_per_s": flops / dt / 1e9, "frac_of_peak": flops / dt / peak if peak else None})
    ratio = rows[1]["s_per_call"] / rows[0]["s_per_call"]

    ceiling = "GPU datasheet peak" if device.type == "cuda" else "measured fp32 matmul peak"
    print(f"reward model {C.count_params(rm) / 1e6:.2f}M params ({n_mm / 1e6:.2f}M in matmuls), {n} pairs x 2 "
          f"sequences, mean {mean_t:.1f} real tokens (padded to {ids.shape[1]}), {device} "
          f"{str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads")
    print(f"{ceiling}: {peak / 1e9:.1f} GFLOP/s" if peak else "peak unknown for this GPU")
    print(f"{'':30}{'pairs/s':>10}{'tokens/s':>11}{'GFLOP/s':>10}{'of peak':>9}")
    for r in rows:
        frac = f"{100 * r['frac_of_peak']:.1f}%" if r["frac_of_peak"] is not None else "n/a"
        print(f"{r['name']:30}{r['pairs_per_s']:>10.1f}{r['tokens_per_s']:>11.0f}{r['gflops_per_s']:>10.2f}"
              f"{frac:>9}")
    print(f"two forwards per pair take {ratio:.2f}x the time of one forward with both sequences")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    C.write_json_atomic(out, {"device": str(device), "dtype": str(dtype), "threads": torch.get_num_threads(),
                              "config": shape, "pairs": n, "mean_real_tokens": mean_t, "padded_len": ids.shape[1],
                              "peak_flops": peak, "peak_kind": ceiling, "rows": rows,
                              "two_forwards_over_one": ratio,
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
