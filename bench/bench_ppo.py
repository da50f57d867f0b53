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

    python bench/bench_ppo.py --threads 1 --compare 3   # A/B: this code vs the two changes undone, 3 rounds

`--compare R` runs R rounds of four variants in turn (the same seed, so the same episodes) and reports the median
seconds per phase: "before" = the eager decode path (model.py `decode_mode = "eager"`) and log-probs from the
full logits sliced afterwards (the LM head and log-softmax over the prompt positions too); "static decode" and
"sliced head" = one change each; "after" = both (this code). Whole iterations drift by tens of percent from run
to run on a shared machine, so the two changed pieces are also timed alone, alternated in one process at an
iteration's shapes (generation of 32 prompts, eager vs static decode; one 16-row minibatch's actor log-probs
forward + backward, full logits vs the sliced head). Writes out/bench/bench_ppo_compare.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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


def full_logits_logprobs(model, seq, attn, P_, temperature, with_entropy=False):
    """The reference for `ppo_rlhf.response_logprobs`: logits at every position, sliced afterwards."""
    logits = model(seq, attn)[:, P_ - 1:-1].float() / temperature
    lp = M.logprobs_from_logits(logits, seq[:, P_:])
    if not with_entropy:
        return lp
    logp = torch.log_softmax(logits, -1)
    return lp, -(logp.exp() * logp).sum(-1)


def eager_decode_step(self, tok, cache):
    """The reference for `MistralForCausalLM.decode_step`: the general cached forward for every token."""
    return self(tok[:, None], torch.ones_like(tok[:, None]), cache=cache)[:, -1]


def component_ab(cfg: P.PPOConfig, rounds: int) -> dict:
    """The two changed pieces alone, at an iteration's shapes, alternated `rounds` times in this process:
    a rollout's generation (32 prompts, 32 new tokens) eager vs static decode, and one minibatch's actor
    log-probs forward + backward (16 rows) from the full logits vs the sliced head. -> median seconds."""
    import statistics
    actor = M.MistralForCausalLM.from_pretrained(cfg.actor)
    tok = M.Tokenizer.from_file(cfg.actor)
    prompts = [t for t, _ in P.load_prompts(cfg.prompts[0])][:cfg.rollout_batch_size]
    ids, mask = P.encode_prompts(tok, prompts, cfg.max_prompt_len)
    u = torch.rand((len(prompts), cfg.max_new_tokens), generator=torch.Generator().manual_seed(0))
    seqs = {}

    def gen(mode):
        def fn():
            actor.decode_mode = mode
            seqs[mode] = actor.generate(ids, mask, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                        eos_token_id=-1, pad_token_id=tok.pad_id, uniforms=u).sequences
        return fn
    seq = (gen("static")(), seqs["static"])[1]
    attn = torch.ones_like(seq)
    attn[:, :ids.shape[1]] = mask
    mb = cfg.rollout_batch_size // cfg.num_minibatches

    def lp(fn):
        def run():
            out = fn(actor, seq[:mb], attn[:mb], ids.shape[1], cfg.temperature)
            out.sum().backward()
            actor.zero_grad(set_to_none=True)
        return run
    variants = {"generate eager": gen("eager"), "generate static": gen("static"),
                "actor lp fwd+bwd full logits": lp(full_logits_logprobs),
                "actor lp fwd+bwd sliced head": lp(P.response_logprobs)}
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    actor.decode_mode = "static"
    assert torch.equal(seqs["eager"], seqs["static"]), "static decode sampled other tokens than eager"
    return {k: statistics.median(v) for k, v in times.items()}


def compare(cfg: P.PPOConfig, rounds: int, out: str) -> None:
    import statistics
    parts = component_ab(cfg, max(20, 5 * rounds))
    print("\ncomponents, alternated in one process, median s:")
    for (a, ta), (b, tb) in zip(list(parts.items())[::2], list(parts.items())[1::2]):
        print(f"  {a:<30}{ta:>8.3f}   {b:<30}{tb:>8.3f}   {ta / tb:>5.2f}x")
    fast_lp, fast_step = P.response_logprobs, M.MistralForCausalLM.decode_step
    variants = {"before": (full_logits_logprobs, eager_decode_step), "static decode": (full_logits_logprobs, fast_step),
                "sliced head": (fast_lp, eager_decode_step), "after": (fast_lp, fast_step)}
    times = {k: {ph: [] for ph in ("generate", "score", "update", "iteration")} for k in variants}
    finals = {}
    for r in range(rounds):
        for name, (lp_fn, step_fn) in variants.items():
            P.response_logprobs, M.MistralForCausalLM.decode_step = lp_fn, step_fn
            run = Path(cfg.out).parent / f"cmp_{r}_{name.replace(' ', '_')}"
            try:
                P.train(dataclasses.replace(cfg, out=str(run)))
            finally:
                P.response_logprobs, M.MistralForCausalLM.decode_step = fast_lp, fast_step
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]
            for ph in times[name]:
                times[name][ph] += [row[f"time/{ph}"] for row in rows]
            finals[name] = rows[-1]["objective/scores"] if "objective/scores" in rows[-1] else None
    med = {k: {ph: statistics.median(v) for ph, v in d.items()} for k, d in times.items()}
    print(f"\nPPO iteration A/B, {rounds} rounds x {cfg.total_iters - 1} timed iterations per variant, median s")
    print(f"{'variant':<15}" + "".join(f"{ph:>11}" for ph in ("generate", "score", "update", "iteration"))
          + f"{'vs before':>11}")
    for k, d in med.items():
        print(f"{k:<15}" + "".join(f"{d[ph]:>11.3f}" for ph in ("generate", "score", "update", "iteration"))
              + f"{med['before']['iteration'] / d['iteration']:>10.2f}x")
    Path(out).mkdir(parents=True, exist_ok=True)
    C.write_json_atomic(Path(out) / "bench_ppo_compare.json", {"rounds": rounds, "seconds": times, "median": med,
                                                               "components": parts,
                                                               "threads": torch.get_num_threads()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--iters", type=int, default=4, help="timed iterations (one more is a warm-up)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    ap.add_argument("--out", default=str(ROOT / "out/bench"))
    ap.add_argument("--compare", type=int, default=0, metavar="R", help="A/B rounds of the four variants")
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
    if args.compare:
        compare(cfg, args.compare, args.out)
        return
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
