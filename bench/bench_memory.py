"""Per-rank memory of training under DDP vs FSDP2, measured from the local shards, and what fits for Mistral-7B.

    python bench/bench_memory.py                    # ~58M-parameter Mistral, 1/2/4 CPU ranks (gloo), DDP vs FSDP
    python bench/bench_memory.py --device cuda      # the same on GPUs, plus tokens/s and MFU of FSDP vs DDP (bf16)

For each world size and mode, every rank builds the model, wraps it (common.parallelize), builds AdamW and takes
one training step; then it counts the bytes it holds of parameters, gradients and optimizer state (the local
shard of each DTensor under FSDP2) and its peak resident memory. Under FSDP2 the model is built on the meta
device and only the local shards are allocated (the trainers instead shard a model they loaded whole, so their
peak includes one full copy). Under FSDP2 the first three fall as 1/N.
Generation under FSDP2 is timed twice on 2 ranks: the actor unsharded once for the whole generation
(common.unsharded, what ppo_rlhf.py does) vs an all-gather of every layer at every decode step.
The 7B table applies the same per-parameter bytes to Mistral-7B (7.24e9 parameters, 32 layers, hidden 4096) on
8 x 80 GB, with activation memory from Korthikanti et al. 2022 (arXiv:2205.05198, section 4: 34*s*b*h bytes per
layer in 16-bit once fused attention (SDPA) stores no s x s scores, 2*s*b*h per layer with full per-layer
recomputation plus one layer's 34*s*b*h while it is recomputed). An estimate, not a measurement: Mistral's
SwiGLU MLP (3.5 h) and GQA shift the constant a little.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import model as M  # noqa: E402

SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, rope_theta=1e4, max_position_embeddings=512, tie_word_embeddings=False)


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM of its own address space (getrusage's ru_maxrss survives
    exec, so a spawned rank would report its parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def worker(rank: int, world: int, port: int, mode: str, device: str, out: str, gen_tokens: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist_info = C.init_distributed(device) if world > 1 else C.DistInfo(False, 0, 0, 1)
    dev, dtype = C.resolve_device_dtype(device, "bf16" if device == "cuda" else "fp32", rank)
    torch.manual_seed(0)
    if mode == "fsdp":  # FSDP2's own recipe: shard on the meta device, then allocate only the local shards
        with torch.device("meta"):
            model = M.MistralForCausalLM(M.ModelConfig(**SHAPE))
        train = C.parallelize(model, dist_info, dev, dtype, fsdp=True)
        model.to_empty(device=dev)
        with torch.no_grad():
            for p in model.parameters():
                (p.to_local() if hasattr(p, "to_local") else p).normal_(0, 0.02)  # memory, not values, is measured
    else:
        model = M.MistralForCausalLM(M.ModelConfig(**SHAPE)).to(dev)
        train = C.parallelize(model, dist_info, dev, dtype, fsdp=False)
    opt = torch.optim.AdamW(train.parameters(), lr=1e-4)
    B, T = (8, 512) if device == "cuda" else (2, 64)
    x = torch.randint(3, SHAPE["vocab_size"], (B, T), device=dev)
    steps = 6 if device == "cuda" else 1
    t0 = time.perf_counter()
    for i in range(steps):
        if i == 1:  # the first step includes one-time set-up
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with C.autocast_ctx(dev, dtype):
            loss = train(x[:, :-1], targets=x[:, 1:]) / x[:, 1:].numel()  # pretrain.py's loss (model.py detail 12)
        loss.backward()
        opt.step()
        if i < steps - 1:
            opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / max(1, steps - 1)
    params = list(train.parameters())
    row = {"mode": mode, "world": world, "rank": rank, "params_bytes": local_bytes(params),
           "grads_bytes": local_bytes(p.grad for p in params),
           "optim_bytes": local_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
           "peak_rss_bytes": peak_rss_bytes(),
           "step_s": dt, "tokens_per_s": B * T * world / dt if steps > 1 else None}
    if dev.type == "cuda":
        row["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(dev)
        peak = C.peak_flops(dev)
        row["mfu"] = row["tokens_per_s"] * C.flops_per_token(model.config, T) / (peak * world) if peak else None
    if mode == "fsdp" and world == 2 and gen_tokens:  # generation: unsharded once vs all-gather per decode step
        prompt = torch.randint(3, SHAPE["vocab_size"], (4, 16), device=dev)
        for name in ("per_step_allgather", "unsharded_once", "per_step_allgather", "unsharded_once"):
            t1 = time.perf_counter()
            with torch.no_grad(), (C.unsharded(train) if name == "unsharded_once" else contextlib.nullcontext()):
                model.generate(prompt, max_new_tokens=gen_tokens, temperature=1.0, eos_token_id=-1,
                               uniforms=torch.rand((4, gen_tokens), device=dev))
            row[f"generate_{name}_s"] = time.perf_counter() - t1  # the second (warm) run of each is kept
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"{mode}_{world}_{rank}.json").write_text(json.dumps(row))
    C.cleanup_distributed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seven_b_table() -> list[dict]:
    """Bytes per rank for Mistral-7B on 8 x 80 GB: fp32 master weights (4) + fp32 grads (4) + AdamW (8) per
    trained parameter, 2 per frozen bf16 parameter; activations for a micro-batch of 1 x 4096 tokens, bf16; for
    PPO under FSDP2 also the actor unsharded in bf16 for generation (2 per parameter)."""
    N, L, h, s, b, world, gb = 7.24e9, 32, 4096, 4096, 1, 8, 1e9
    act = L * 34 * s * b * h  # no recomputation (fused attention: no s x s term)
    act_ckpt = L * 2 * s * b * h + 34 * s * b * h  # the layer inputs + one layer being recomputed
    rows = []
    for name, trained, frozen, extra in (("policy (pretrain --sft)", 1, 0, 0), ("reward model", 1, 0, 0),
                                         ("PPO: actor + critic trained, ref + RM frozen", 2, 2, 2 * N)):
        for mode in ("DDP", "FSDP2"):
            shard = world if mode == "FSDP2" else 1
            states = (16 * N * trained + 2 * N * frozen) / shard
            gather = 0 if mode == "DDP" else 2 * N / L * 2  # two bf16 layers in flight while sharded
            for ckpt, a_bytes in (("off", act), ("on", act_ckpt)):
                total = states + gather + a_bytes * trained + (extra if mode == "FSDP2" else 0)
                rows.append({"trainer": name, "mode": mode, "grad_ckpt": ckpt, "states_gb": states / gb,
                             "activations_gb": a_bytes * trained / gb, "total_gb": total / gb,
                             "fits_80gb": total < 80 * gb})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--gen_tokens", type=int, default=32)
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    tmp = Path(args.out) / "memory_ranks"
    n_params = sum(p.numel() for p in M.MistralForCausalLM(M.ModelConfig(**SHAPE)).parameters())
    rows = []
    for world in [int(w) for w in args.worlds.split(",")]:
        for mode in ("ddp", "fsdp") if world > 1 else ("one process",):
            margs = (world, free_port(), mode, args.device, str(tmp), args.gen_tokens)
            if world == 1:
                worker(0, *margs)
            else:
                mp.start_processes(worker, args=margs, nprocs=world, start_method="spawn")
            ranks = [json.loads((tmp / f"{mode}_{world}_{r}.json").read_text()) for r in range(world)]
            rows.append({k: max((r[k] for r in ranks if r.get(k) is not None), default=None)
                         if k.endswith(("bytes", "_s")) else ranks[0][k] for k in ranks[0]})
    mb = 2**20
    print(f"Mistral config {n_params / 1e6:.1f}M parameters; bytes per rank (max over ranks), {args.device}")
    print("| mode | ranks | params MB | grads MB | AdamW MB | sum MB | sum x ranks / one process | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    base = rows[0]["params_bytes"] + rows[0]["grads_bytes"] + rows[0]["optim_bytes"]
    for r in rows:
        tot = r["params_bytes"] + r["grads_bytes"] + r["optim_bytes"]
        r["sum_bytes"], r["fraction_of_one_process"] = tot, tot / base
        print(f"| {r['mode']} | {r['world']} | {r['params_bytes'] / mb:.1f} | {r['grads_bytes'] / mb:.1f} | "
              f"{r['optim_bytes'] / mb:.1f} | {tot / mb:.1f} | {tot * r['world'] / base:.2f} | "
              f"{r['peak_rss_bytes'] / mb:.0f} |")
    gen = next((r for r in rows if "generate_unsharded_once_s" in r), None)
    if gen:
        print(f"\nFSDP2 generation, 2 ranks, 4 x {args.gen_tokens} new tokens: all-gather per decode step "
              f"{gen['generate_per_step_allgather_s']:.2f} s, actor unsharded once "
              f"{gen['generate_unsharded_once_s']:.2f} s "
              f"({gen['generate_per_step_allgather_s'] / gen['generate_unsharded_once_s']:.2f}x)")
    table = seven_b_table()
    print("\nMistral-7B on 8 x 80 GB, per GPU (formula above; bf16 compute, micro-batch 1 x 4096 tokens)")
    print("| trainer | mode | grad_ckpt | weights+grads+AdamW GB | activations GB | total GB | fits |")
    print("|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['trainer']} | {t['mode']} | {t['grad_ckpt']} | {t['states_gb']:.1f} | "
              f"{t['activations_gb']:.1f} | {t['total_gb']:.1f} | {'yes' if t['fits_80gb'] else 'no'} |")
    C.write_json_atomic(Path(args.out) / f"bench_memory_{args.device}.json",
                        {"n_params": n_params, "rows": rows, "mistral_7b_8x80gb": table})


if __name__ == "__main__":
    main()
