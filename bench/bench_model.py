"""Benchmark model.py: train-step throughput as a fraction of this machine's matmul peak, and KV-cache decoding.

    python bench/bench_model.py                      # CPU: ~6.5M-param config, fp32, ratios
    python bench/bench_model.py --compile            # also the torch.compile'd train step
    python bench/bench_model.py --device cuda        # ~124M config in bf16, tokens/s and MFU, +/- compile

Train FLOPs per token are counted as 6N + 12*L*H*hd*T (model.flops_per_token). On CPU the ceiling is a large
fp32 matmul measured in this same run, so the figure is "fraction of what this machine's BLAS can do", not of a
datasheet number. Decoding compares the KV cache against recomputing the whole prefix for every new token.
Writes out/bench/bench_model.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import model as M  # noqa: E402

TOY = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8,
           num_key_value_heads=4, rope_theta=1e4, max_position_embeddings=2048)
GPT2_SMALL = dict(vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, rope_theta=1e4, max_position_embeddings=2048)


def time_train_steps(model, opt, batch, seq, vocab, steps, device, dtype, warmup=2):
    x = torch.randint(0, vocab, (batch, seq + 1), device=device)
    ctx = C.autocast_ctx(device, dtype)

    def step():
        with ctx:  # the training loss pretrain.py uses: LM head fused with the CE (model.py detail 12), as a mean
            loss = model(x[:, :-1], targets=x[:, 1:]) / x[:, 1:].numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def profile_train_step(model, opt, batch, seq, vocab):
    """Share of a CPU train step spent per op family (where the non-matmul time goes)."""
    from torch.profiler import ProfilerActivity, profile
    x = torch.randint(0, vocab, (batch, seq + 1))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss = model(x[:, :-1], targets=x[:, 1:]) / x[:, 1:].numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    groups = {"matmul (mm/addmm/bmm/linear)": ("mm", "addmm", "bmm", "matmul", "linear"),
              "attention (sdpa)": ("flash", "attention", "sdpa"),
              "optimizer (adamw)": ("adam", "_foreach", "lerp", "addcdiv"),
              "softmax/cross-entropy": ("softmax", "nll", "cross_entropy", "crossentropy", "exp_", "amax"),
              "elementwise (norm, rope, silu, mul, add)": ("mul", "add", "silu", "rsqrt", "pow", "mean", "neg",
                                                           "cat", "cos", "sin", "sub")}
    shares = {k: 0.0 for k in groups}
    shares["other (copies, views, embedding)"] = 0.0
    for e in prof.key_averages():
        name = e.key.lower()
        for g, keys in groups.items():
            if any(k in name for k in keys):
                shares[g] += e.self_cpu_time_total
                break
        else:
            shares["other (copies, views, embedding)"] += e.self_cpu_time_total
    return {k: v / total for k, v in shares.items()}


@torch.no_grad()
def time_decode(model, batch, prompt_len, new_tokens, use_cache, device):
    vocab = model.config.vocab_size
    x = torch.randint(3, vocab, (batch, prompt_len), device=device)
    sync(device)
    t0 = time.perf_counter()
    if use_cache:
        model.generate(x, max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    else:  # recompute the whole prefix for every token
        seq = x
        for _ in range(new_tokens):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    sync(device)
    return batch * new_tokens / (time.perf_counter() - t0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd train step")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = M.ModelConfig(**(GPT2_SMALL if cuda else TOY))
    dtype = torch.bfloat16 if cuda else torch.float32
    batch, seq = (16, 1024) if cuda else (16, 256)
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "threads": torch.get_num_threads(),
               "config": cfg.to_dict(), "batch": batch, "seq": seq, "dtype": str(dtype)}

    torch.manual_seed(0)
    model = M.MistralForCausalLM(cfg).to(device)
    n = model.num_params()
    fpt = C.flops_per_token(cfg, seq)
    results["params"] = n
    results["flops_per_token"] = fpt
    peak = C.peak_flops(device) if cuda else None
    if not cuda:
        peak = C.measure_matmul_peak(torch.float32, n=1024)
        results["matmul_peak_gflops"] = peak / 1e9
    rows = []
    variants = [("eager", False)] + ([("compile", True)] if args.compile else [])
    for name, comp in variants:
        m = torch.compile(model) if comp else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        sec = time_train_steps(m, opt, batch, seq, cfg.vocab_size, args.steps, device, dtype)
        tps = batch * seq / sec
        frac = tps * fpt / peak if peak else None
        rows.append({"variant": f"train {name}", "tokens_per_s": tps, "fraction_of_peak": frac})
    if not cuda:  # re-measure the peak after the train steps; report against the higher (conservative)
        peak2 = C.measure_matmul_peak(torch.float32, n=1024)
        results["matmul_peak_gflops_after"] = peak2 / 1e9
        if peak2 > peak:
            for r in rows:
                r["fraction_of_peak"] *= peak / peak2
            peak = peak2
        results["matmul_peak_gflops_used"] = peak / 1e9
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        results["train_step_time_shares"] = profile_train_step(model, opt, batch, seq, cfg.vocab_size)
    model.eval()
    decode = []
    for b in (1, 16):
        with C.autocast_ctx(device, dtype):
            with_cache = time_decode(model, b, 16, args.new_tokens, True, device)
            without = time_decode(model, b, 16, args.new_tokens, False, device)
        decode.append({"batch": b, "cache_tokens_per_s": with_cache, "recompute_tokens_per_s": without,
                       "speedup": with_cache / without})
    results["train"] = rows
    results["decode"] = decode

    print(f"model {n / 1e6:.2f}M params, {fpt / 1e6:.1f} MFLOP/token, batch {batch} x seq {seq}, "
          f"device {results['device']} ({results['threads']} threads)")
    if not cuda:
        print(f"measured fp32 matmul peak: {results['matmul_peak_gflops']:.1f} GFLOP/s before, "
              f"{peak2 / 1e9:.1f} after; fractions use the higher, {peak / 1e9:.1f}")
    print(f"{'variant':<16}{'tokens/s':>12}{'of peak' if not cuda else 'MFU':>10}")
    for r in rows:
        frac = f"{100 * r['fraction_of_peak']:.1f}%" if r["fraction_of_peak"] else "n/a"
        print(f"{r['variant']:<16}{r['tokens_per_s']:>12.0f}{frac:>10}")
    if "train_step_time_shares" in results:
        print("eager train step, share of CPU time:")
        for k, v in sorted(results["train_step_time_shares"].items(), key=lambda kv: -kv[1]):
            print(f"  {k:<42}{100 * v:>6.1f}%")
    print(f"decode {args.new_tokens} new tokens (prompt 16):")
    print(f"{'batch':<8}{'cache tok/s':>14}{'recompute tok/s':>18}{'speedup':>10}")
    for d in decode:
        print(f"{d['batch']:<8}{d['cache_tokens_per_s']:>14.0f}{d['recompute_tokens_per_s']:>18.0f}"
              f"{d['speedup']:>9.1f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_model.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'bench_model.json'}")


if __name__ == "__main__":
    main()
