"""Causal attention on CPU: model.causal_attention (query blocks, model.py detail 13) against one SDPA call.

    OMP_NUM_THREADS=1 python bench/bench_attention.py        # ~2 min on one CPU core

Forward + backward of one layer's attention at the toy model's heads (8 query / 4 KV heads, head_dim 32), 4096
tokens per batch (B = 4096 / T), T from 128 to 2048. Three variants alternate within each round: one
`scaled_dot_product_attention(is_causal=True)` call, model.causal_attention, and one call *without* the causal
mask (every query reads every key). When the causal call takes as long as the full one, the kernel computes the
masked upper triangle too; the blocked version skips it. Writes out/bench/bench_attention.json.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import model as M  # noqa: E402

VARIANTS = {
    "sdpa causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    "blocked (ours)": lambda q, k, v: M.causal_attention(q, k, v, enable_gqa=True),
    "sdpa full": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
}


def fwd_bwd_seconds(fn, q0, k0, v0, g) -> float:
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    t0 = time.perf_counter()
    fn(q, k, v).backward(g)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seqs", default="128,256,384,512,768,1024,2048")
    ap.add_argument("--tokens", type=int, default=4096, help="B * T per batch")
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    nh, nkv, hd = 8, 4, 32
    res = {"torch": torch.__version__, "threads": 1, "heads": [nh, nkv, hd], "rounds": args.rounds, "rows": []}
    print(f"torch {torch.__version__}, 1 thread, forward + backward, {args.tokens} tokens, heads {nh}/{nkv}, "
          f"head_dim {hd}; median of {args.rounds} alternating rounds")
    print(f"{'T':>6}{'sdpa causal':>14}{'blocked (ours)':>16}{'sdpa full':>12}{'causal / blocked':>18}"
          f"{'max |diff|':>12}")
    for T in (int(s) for s in args.seqs.split(",")):
        B = max(1, args.tokens // T)
        q0, k0, v0 = torch.randn(B, nh, T, hd), torch.randn(B, nkv, T, hd), torch.randn(B, nkv, T, hd)
        g = torch.randn(B, nh, T, hd)
        with torch.no_grad():
            diff = float((VARIANTS["blocked (ours)"](q0, k0, v0) - VARIANTS["sdpa causal"](q0, k0, v0)).abs().max())
        for fn in VARIANTS.values():  # warm-up
            fwd_bwd_seconds(fn, q0, k0, v0, g)
        times = {k: [] for k in VARIANTS}
        for _ in range(args.rounds):
            for k, fn in VARIANTS.items():
                times[k].append(fwd_bwd_seconds(fn, q0, k0, v0, g))
        med = {k: statistics.median(v) for k, v in times.items()}
        paired = statistics.median(c / b for c, b in zip(times["sdpa causal"], times["blocked (ours)"]))
        res["rows"].append({"T": T, "B": B, "s": times, "median_s": med, "causal_over_blocked": paired,
                            "max_abs_diff": diff})
        print(f"{T:>6}" + "".join(f"{med[k] * 1e3:>{w}.1f}" for k, w in zip(VARIANTS, (12, 16, 12)))
              + f"  ms{paired:>15.2f}x{diff:>12.1e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    C.write_json_atomic(out / "bench_attention.json", res)
    print("causal / blocked: the median of the per-round ratios (paired within a round)")
    print(f"wrote {out / 'bench_attention.json'}")


if __name__ == "__main__":
    main()
