"""Benchmark evaluate.py: log-likelihood requests/s against the one-request-at-a-time path, and generation
tokens/s batched against one prompt at a time, on the toy tasks, all in the same process.

    python bench/bench_eval.py                           # out/pretrain/final if present, else a random toy model
    python bench/bench_eval.py --model out/sft/final --n 80 --threads 1
    python bench/bench_eval.py --device cuda             # absolute figures on a GPU

Log-likelihood variants (same requests, same model):
  one-at-a-time   batch 1, no grouping: one forward per (context, continuation) pair (the naive loop)
  batched         length-sorted, right-padded batches, no grouping (lm-eval's default path)
  batched+grouped batched, plus one forward per context for single-token choices and a shared KV-cache pass
                  for multi-token choices of one question (evaluate.py's default)
The scores of all three must agree (max |delta log-likelihood| is printed). On CPU the forward throughput is
also reported as a fraction of this machine's fp32 matmul peak measured in the same run (2 FLOPs per backbone
parameter per forward token: a lower bound that ignores attention scores and the LM head).
Writes out/bench/bench_eval.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
import evaluate as E  # noqa: E402
import model as M  # noqa: E402


def load_model(path: str, device: torch.device, dtype: torch.dtype, toy_dir: str):
    if Path(path).is_dir():
        model = M.MistralForCausalLM.from_pretrained(path, device=device, dtype=dtype)
        return model, M.Tokenizer.from_file(path), path
    # no trained model yet: the toy shape (pretrain.py defaults) with random weights; speed does not care
    with open(Path(toy_dir) / "corpus/train.jsonl") as f:
        texts = [json.loads(line)["text"] for line in f][:2000]
    tok = M.train_tokenizer(texts, 4096)
    torch.manual_seed(0)
    cfg = M.ModelConfig(vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256, rope_theta=1e4)
    return M.MistralForCausalLM(cfg).to(device, dtype), tok, "random-init toy shape"


def ll_requests(cfg: E.EvalConfig, names: list[str], n: int) -> list[tuple[str, str]]:
    """The exact (context, continuation) pairs evaluate.py builds for these MC tasks in ll mode."""
    reqs = []
    for name in names:
        td = E.load_task(E.TASKS[name], cfg)
        for doc in td.docs[:n]:
            for c in range(len(doc["choices"])):
                prompt, _ = E.build_prompt(td, doc, "ll", td.spec.shots, None, "default", choice=c)
                reqs.append((prompt, " " + E.ll_target(td.spec, doc, c)))
    return reqs


def gen_prompts(cfg: E.EvalConfig, names: list[str], n: int) -> list[str]:
    out = []
    for name in names:
        td = E.load_task(E.TASKS[name], cfg)
        out += [E.build_prompt(td, d, "gen", td.spec.shots, None, "default")[0] for d in td.docs[:n]]
    return out


def timed(fn):
    t0 = time.perf_counter()
    r = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return r, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="out/pretrain/final")
    ap.add_argument("--toy_dir", default="data/toy")
    ap.add_argument("--n", type=int, default=40, help="items per task")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_new_tokens", type=int, default=24)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = C.resolve_device_dtype(args.device, args.dtype)
    model, tok, source = load_model(args.model, device, dtype, args.toy_dir)
    model.eval()
    cfg = E.EvalConfig(toy_dir=args.toy_dir)
    n_params = model.num_params(exclude_embeddings=True)
    n_backbone = n_params - model.lm_head.weight.numel()  # ll runs the LM head on continuation positions only
    peak = C.measure_matmul_peak(device="cpu") if device.type == "cpu" else C.peak_flops(device)

    def lm(bs: int) -> E.LM:
        return E.LM(model, tok, device, dtype, batch_size=bs)

    rows = []
    reqs = ll_requests(cfg, ["toy_mmlu", "toy_arc_easy", "toy_hellaswag"], args.n)
    variants = [("one-at-a-time", 1, False), ("batched", args.batch_size, False),
                ("batched+grouped", args.batch_size, True)]
    ref = None
    for name, bs, group in variants:
        w = lm(bs)
        w.loglikelihood(reqs[:8], group=group)  # warm-up
        w.counts.clear()
        res, secs = timed(lambda w=w, group=group: w.loglikelihood(reqs, group=group))
        lls = torch.tensor([r[0] for r in res])
        delta = 0.0 if ref is None else float((lls - ref).abs().max())
        ref = lls if ref is None else ref
        fwd_tok = w.counts["forward_tokens"]
        flops = 2 * n_backbone * fwd_tok / secs
        rows.append({"path": f"loglikelihood {name}", "requests": len(reqs), "seconds": round(secs, 3),
                     "requests_per_s": round(len(reqs) / secs, 1), "forward_tokens": fwd_tok,
                     "forward_tokens_per_s": round(fwd_tok / secs), "max_abs_delta_ll": delta,
                     "fraction_of_peak": round(flops / peak, 4) if peak else None})
    prompts = gen_prompts(cfg, ["toy_triviaqa", "toy_gsm8k", "toy_realtoxicity"], args.n)
    ref_out = None
    for name, bs in [("one-at-a-time", 1), ("batched", args.batch_size)]:
        w = lm(bs)
        w.generate(prompts[:2], 4)  # warm-up
        w.counts.clear()
        outs, secs = timed(lambda w=w: w.generate(prompts, args.max_new_tokens, ("\n\n",)))
        same = ref_out is None or outs == ref_out
        ref_out = ref_out or outs
        ntok = w.counts["generated_tokens"]
        rows.append({"path": f"generate {name}", "requests": len(prompts), "seconds": round(secs, 3),
                     "requests_per_s": round(len(prompts) / secs, 1), "generated_tokens": ntok,
                     "generated_tokens_per_s": round(ntok / secs, 1), "same_outputs_as_one_at_a_time": same})

    base_ll = rows[0]["requests_per_s"]
    base_gen = rows[3]["generated_tokens_per_s"]
    print(f"bench_eval: model {source} ({n_params / 1e6:.2f}M non-embedding params), device {device}, "
          f"{torch.get_num_threads()} threads, matmul peak {peak / 1e9:.1f} GFLOP/s" if peak else "")
    print(f"{'path':34s} {'items':>6s} {'sec':>7s} {'items/s':>8s} {'speed-up':>9s}  notes")
    for r in rows:
        if r["path"].startswith("loglikelihood"):
            note = (f"{r['forward_tokens_per_s']} fwd tok/s, {100 * (r['fraction_of_peak'] or 0):.1f}% of peak, "
                    f"max|dll| {r['max_abs_delta_ll']:.1e}")
            speed = r["requests_per_s"] / base_ll
        else:
            note = f"{r['generated_tokens_per_s']} new tok/s, same text {r['same_outputs_as_one_at_a_time']}"
            speed = r["generated_tokens_per_s"] / base_gen
        r["speedup_vs_one_at_a_time"] = round(speed, 2)
        print(f"{r['path']:34s} {r['requests']:6d} {r['seconds']:7.2f} {r['requests_per_s']:8.1f} "
              f"{speed:8.2f}x  {note}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    C.write_json_atomic(out / "bench_eval.json", {
        "model": source, "device": str(device), "dtype": str(dtype), "threads": torch.get_num_threads(),
        "matmul_peak_flops": peak, "n_items_per_task": args.n, "batch_size": args.batch_size, "rows": rows})
    print(f"-> {out / 'bench_eval.json'}")


if __name__ == "__main__":
    main()
