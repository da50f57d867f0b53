"""evaluate.py's log-likelihood scoring against lm-evaluation-harness's HF backend: same checkpoint, same requests.

    OMP_NUM_THREADS=1 python bench/bench_eval_vs_lmeval.py             # toy ARC-e, HellaSwag, WinoGrande, 100 each
    OMP_NUM_THREADS=1 python bench/bench_eval_vs_lmeval.py --n 40 --rounds 2

The (context, continuation) pairs are the ones evaluate.py builds for these multiple-choice tasks in ll mode
(bench_eval.ll_requests). Both sides score them as one call, timed alone (model loading and request building
excluded): ours `evaluate.LM.loglikelihood` (length-sorted batches, one forward per shared context, the
continuations of a question in one cached pass); lm-eval `HFLM.loglikelihood` (its own sorting and batching, the
checkpoint loaded by transformers), fp32, batch size `--batch_size` for both, `add_bos_token=True` (our contexts
start with BOS). The rounds alternate A B A B; the median is reported, with the largest per-request difference in
log-likelihood and whether every item's argmax choice agrees. lm-eval is a bench-only dependency; without it only
our side is timed. "ours, no 5c" is our scorer with the shared few-shot prefix (evaluate.py detail 5c) turned
off. Writes out/bench/bench_eval_vs_lmeval.json.
"""

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
import evaluate as E  # noqa: E402
import model as M  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_eval", ROOT / "bench" / "bench_eval.py")
BE = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(BE)

TASKS = ["toy_arc_easy", "toy_hellaswag", "toy_winogrande"]


def choices_per_item(cfg: E.EvalConfig, n: int) -> list[int]:
    sizes = []
    for name in TASKS:
        td = E.load_task(E.TASKS[name], cfg)
        sizes += [len(d["choices"]) for d in td.docs[:n]]
    return sizes


def accuracy_argmax(lls: list[float], sizes: list[int]) -> list[int]:
    out, i = [], 0
    for k in sizes:
        out.append(max(range(k), key=lambda c: lls[i + c]))
        i += k
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="out/pretrain/final", help="an HF checkpoint folder with tokenizer.json")
    ap.add_argument("--n", type=int, default=100, help="items per task")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not M.is_checkpoint_dir(args.model):
        sys.exit(f"bench_eval_vs_lmeval: {args.model} is not a checkpoint folder (run pipeline.sh or pretrain.py)")
    cfg = E.EvalConfig(toy_dir=str(ROOT / "data/toy"))
    reqs = BE.ll_requests(cfg, TASKS, args.n)
    sizes = choices_per_item(cfg, args.n)
    assert sum(sizes) == len(reqs)
    model = M.MistralForCausalLM.from_pretrained(args.model)
    ours = E.LM(model, M.Tokenizer.from_file(args.model), torch.device("cpu"), torch.float32, args.batch_size)
    plain = E.LM(model, ours.tok, torch.device("cpu"), torch.float32, args.batch_size)
    plain.MIN_SHARED_PREFIX = 10**9  # the same scorer without detail 5c (the shared few-shot prefix)
    variants = {"ours": lambda: [r[0] for r in ours.loglikelihood(reqs)],
                "ours, no 5c": lambda: [r[0] for r in plain.loglikelihood(reqs)]}
    res = {"model": args.model, "items": len(sizes), "requests": len(reqs), "batch_size": args.batch_size,
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    try:
        import lm_eval
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
        hf = HFLM(pretrained=args.model, device="cpu", dtype="float32", batch_size=args.batch_size,
                  add_bos_token=True)
        inst = [Instance("loglikelihood", {}, (c, t), i) for i, (c, t) in enumerate(reqs)]
        variants["lm-eval"] = lambda: [r[0] for r in hf.loglikelihood(inst, disable_tqdm=True)]
        res["lm_eval"] = lm_eval.__version__ if hasattr(lm_eval, "__version__") else "installed"
    except ImportError:
        res["lm_eval"] = None
    secs = {k: [] for k in variants}
    lls = {}
    for _ in range(args.rounds):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            lls[k] = fn()
            secs[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in secs.items()}
    res["seconds"], res["median_s"] = secs, med
    print(f"{len(sizes)} items ({', '.join(TASKS)}), {len(reqs)} requests, batch {args.batch_size}, 1 thread, "
          f"{args.rounds} rounds alternating, median")
    print(f"{'scorer':<14}{'seconds':>9}{'requests/s':>12}{'ours faster':>13}")
    for k, v in med.items():
        ratio = f"{v / med['ours']:.2f}x" if k != "ours" else ""
        print(f"{k:<14}{v:>9.2f}{len(reqs) / v:>12.1f}{ratio:>13}")
    if "lm-eval" in lls:
        d = max(abs(a - b) for a, b in zip(lls["ours"], lls["lm-eval"]))
        same = accuracy_argmax(lls["ours"], sizes) == accuracy_argmax(lls["lm-eval"], sizes)
        res["max_abs_ll_diff"], res["same_argmax_every_item"] = d, same
        res["ratio_lm_eval_over_ours"] = med["lm-eval"] / med["ours"]
        print(f"max |ll ours - ll lm-eval| over requests = {d:.1e}; argmax choice identical on every item: {same}")
    res["ours_counts"] = dict(ours.counts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    C.write_json_atomic(out / "bench_eval_vs_lmeval.json", res)
    print(f"wrote {out / 'bench_eval_vs_lmeval.json'}")


if __name__ == "__main__":
    main()
