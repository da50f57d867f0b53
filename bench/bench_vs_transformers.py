"""model.py against transformers' MistralForCausalLM, same weights, same inputs, one process, 1 thread.

    OMP_NUM_THREADS=1 python bench/bench_vs_transformers.py            # ~6 min on one CPU core
    OMP_NUM_THREADS=1 python bench/bench_vs_transformers.py --no-compile   # skip the compiled variants

Rows (the 6.5M toy shape: hidden 256, 6 layers, 8 query / 4 KV heads, vocab 4096):
  train step   batch 16 x 256, forward + cross-entropy + backward + fused AdamW (the same optimizer on both sides);
               ours through its training loss (the LM head fused with the loss, model.py detail 12) and, as the
               variant, through full logits + F.cross_entropy, which is transformers' loss
  forward      the same batch, no grad
  decode b1    greedy, prompt 16, 128 new tokens; ours in three modes (model.py detail 11): eager (the general
  decode b16   cached forward, the reference), static (one static-shape step) and compile (that step compiled)
Variants alternate A B A B over `--rounds` rounds and the median is reported, so a load change hits every
variant alike. Decoding checks that every variant's greedy ids equal transformers'; the forward checks the
logits. transformers is a test-only dependency: without it only our variants are timed (ratios among them).
The train step is also given as a fraction of the fp32 matmul peak measured in the same run (6N + attention
FLOPs per token, common.flops_per_token). Writes out/bench/bench_vs_transformers.json.
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import model as M  # noqa: E402

TOY = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8,
           num_key_value_heads=4, rope_theta=1e4, max_position_embeddings=2048)


def hf_twin(ours: M.MistralForCausalLM):
    """transformers' model with our weights (the state-dict keys are the same), or None when not installed."""
    try:
        from transformers import MistralConfig, MistralForCausalLM
    except ImportError:
        return None
    c = ours.config
    hc = MistralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                       num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                       num_key_value_heads=c.num_key_value_heads, rope_theta=c.rope_theta, sliding_window=None,
                       rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
                       tie_word_embeddings=False, attn_implementation="sdpa")
    hf = MistralForCausalLM(hc)
    hf.load_state_dict(ours.state_dict(), strict=True)
    return hf


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(variants: dict, rounds: int) -> dict:
    """{name: fn} -> {name: [seconds per round]}, the variants interleaved within every round."""
    out = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            out[k].append(timed(fn))
    return out


def paired_ratios(times: dict, label: str) -> dict:
    """transformers' time / ours, round by round (robust to a drifting machine); printed with their median."""
    ref = times["transformers"]
    out = {k: [h / o for h, o in zip(ref, v)] for k, v in times.items() if k != "transformers"}
    print(f"{label}, transformers / ours per round: " + "; ".join(
        f"{k} " + " ".join(f"{r:.2f}" for r in v) + f" (median {statistics.median(v):.2f})" for k, v in out.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ours = M.MistralForCausalLM(M.ModelConfig(**TOY))
    hf = hf_twin(ours)
    cfg = ours.config
    B, T = 16, 256
    x = torch.randint(0, cfg.vocab_size, (B, T + 1))
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "config": TOY, "rounds": args.rounds}
    try:
        import transformers
        res["transformers"] = transformers.__version__
    except ImportError:
        res["transformers"] = None

    # -- train step and forward
    def train_step(model, get_loss):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            get_loss(x[:, :-1], x[:, 1:]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def logits_then_ce(get_logits):  # what transformers' own `labels=` loss does: fp32 logits, F.cross_entropy
        return lambda ids, tgt: F.cross_entropy(get_logits(ids).reshape(-1, cfg.vocab_size), tgt.reshape(-1))

    n_tok = B * T  # ours: the fused head + loss pretrain.py trains with (model.py detail 12), as a mean
    train = {"ours": train_step(ours, lambda ids, tgt: ours(ids, targets=tgt) / n_tok)}
    twin = copy.deepcopy(ours)  # the variants train their own copies, so ours and transformers stay equal
    train["ours logits+CE"] = train_step(twin, logits_then_ce(twin))
    if args.compile:  # pretrain.py --compile: torch.compile of the whole model, the fused loss included
        twin_c = copy.deepcopy(ours)
        compiled = torch.compile(twin_c)
        train["ours compile"] = train_step(twin_c, lambda ids, tgt: compiled(ids, targets=tgt) / n_tok)
    fwd = {"ours": lambda: ours(x[:, :-1])}
    if hf is not None:
        train["transformers"] = train_step(hf, logits_then_ce(lambda ids: hf(ids).logits))
        fwd["transformers"] = lambda: hf(x[:, :-1]).logits
        with torch.no_grad():
            res["forward_max_abs_logit_diff"] = float((ours(x[:, :-1]) - hf(x[:, :-1]).logits).abs().max())
    for fn in train.values():  # warm-up
        fn()
    peak0 = C.measure_matmul_peak(torch.float32, n=1024)
    res["train_step_s"] = alternate(train, args.rounds)
    peak1 = C.measure_matmul_peak(torch.float32, n=1024)
    res["matmul_peak_gflops"] = [peak0 / 1e9, peak1 / 1e9]
    with torch.no_grad():
        for fn in fwd.values():
            fn()
        res["forward_s"] = alternate(fwd, args.rounds)

    # -- decoding
    ours.eval()
    if hf is not None:
        hf.eval()
    modes = ["eager", "static"] + (["compile"] if args.compile else [])
    res["decode"] = {}
    for b in (1, 16):
        prompt = torch.randint(3, cfg.vocab_size, (b, 16))
        ids = {}

        def run_ours(mode):
            def fn():
                ours.decode_mode = mode
                ids[mode] = ours.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=-1,
                                          pad_token_id=0).response_ids
            return fn
        variants = {f"ours {m}": run_ours(m) for m in modes}
        if hf is not None:
            def run_hf():
                with torch.inference_mode():
                    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
                ids["transformers"] = out[:, prompt.shape[1]:]
            variants["transformers"] = run_hf
        t_first = {k: timed(fn) for k, fn in variants.items()}  # warm-up (and the compile) excluded
        times = alternate(variants, args.rounds)
        ref = ids.get("transformers", ids["eager"])
        res["decode"][b] = {"s": times, "first_call_s": t_first,
                            "ids_equal": {k: bool(torch.equal(v, ref)) for k, v in ids.items()}}
    ours.decode_mode = "static"

    # -- report
    med = {k: statistics.median(v) for k, v in res["train_step_s"].items()}
    peak = max(res["matmul_peak_gflops"]) * 1e9
    fpt = C.flops_per_token(cfg, T)
    print(f"torch {res['torch']}, transformers {res['transformers']}, 1 thread, {args.rounds} rounds alternating, "
          f"median; matmul peak {res['matmul_peak_gflops'][0]:.1f} / {res['matmul_peak_gflops'][1]:.1f} GFLOP/s "
          "(before / after the train steps)")
    print(f"{'row':<22}{'variant':<16}{'time':>10}{'tokens/s':>11}{'vs transformers':>17}{'ids equal':>11}")
    rows = []

    def row(name, variant, sec, tokens, ref_sec, equal=""):
        ratio = f"{ref_sec / sec:.2f}x" if ref_sec else "-"
        rows.append({"row": name, "variant": variant, "s": sec, "tokens_per_s": tokens / sec,
                     "vs_transformers": ref_sec / sec if ref_sec else None, "ids_equal": equal})
        print(f"{name:<22}{variant:<16}{sec * 1e3:>8.1f}ms{tokens / sec:>11.0f}{ratio:>17}{str(equal):>11}")
    for k, v in med.items():
        row("train step 16x256", k, v, B * T, med.get("transformers"))
    if "transformers" in res["train_step_s"]:
        res["train_round_ratios"] = paired_ratios(res["train_step_s"], "train step")
    res["train_fraction_of_peak"] = {k: B * T / v * fpt / peak for k, v in med.items()}
    fmed = {k: statistics.median(v) for k, v in res["forward_s"].items()}
    for k, v in fmed.items():
        row("forward 16x256", k, v, B * T, fmed.get("transformers"))
    for b, d in res["decode"].items():
        dmed = {k: statistics.median(v) for k, v in d["s"].items()}
        for k, v in dmed.items():
            row(f"decode b{b} x{args.new_tokens}", k, v, b * args.new_tokens, dmed.get("transformers"),
                d["ids_equal"][k.replace("ours ", "")])
    for b, d in res["decode"].items():
        if "transformers" in d["s"]:
            d["round_ratios"] = paired_ratios(d["s"], f"decode b{b}")
    print("train step, fraction of the measured matmul peak: "
          + ", ".join(f"{k} {100 * v:.0f}%" for k, v in res["train_fraction_of_peak"].items()))
    if "forward_max_abs_logit_diff" in res:
        print(f"forward: max |logit ours - transformers| = {res['forward_max_abs_logit_diff']:.1e}")
    print("first decode call (includes the compile): "
          + "; ".join(f"b{b} " + ", ".join(f"{k} {v:.1f}s" for k, v in d["first_call_s"].items())
                      for b, d in res["decode"].items()))
    res["rows"] = rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    C.write_json_atomic(out / "bench_vs_transformers.json", res)
    print(f"wrote {out / 'bench_vs_transformers.json'}")


if __name__ == "__main__":
    main()
