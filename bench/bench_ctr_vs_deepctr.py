"""cowclip_ctr.py's DeepFM step against DeepCTR-Torch's DeepFM (shenweichen/DeepCTR-Torch), same shape, same rows.

    OMP_NUM_THREADS=1 python bench/bench_ctr_vs_deepctr.py            # batch 1K and 8K, one epoch AUC each
    OMP_NUM_THREADS=1 python bench/bench_ctr_vs_deepctr.py --no-auc   # step speed only

Shape: 26 sparse fields (~800K embedding rows in all, dim 10), 13 dense, DNN 400-400-400, on synthetic
Criteo-like rows (cowclip_ctr.make_synthetic). One process, one thread, the variants alternate (A B C A B C
...) so that a shared machine's load falls on all of them alike; the median over rounds is reported.

- samples/s of one training step: ours = `cowclip_ctr.train_step` (L2, CowClip, two Adams), dense (the
  reference's whole-table semantics) and sparse (`--embed_update sparse`), each also under `--dtype bf16`
  (the MLP in bf16 autocast; `--no-bf16` drops these); DeepCTR-Torch = the body of its
  `BaseModel.fit` loop (forward, sum-BCE + its L2 term, backward, Adam), on its own float input matrix.
- the floor: the DNN's GEMMs alone (forward, weight and input gradients) at that batch, timed in the same
  alternation; DeepCTR-Torch's step / this time is the most any step doing the same work can gain.
- test AUC after one epoch through each library's own entry point: `cowclip_ctr.train` (CowClip rule at
  that batch) and DeepCTR-Torch's `model.fit` / `model.predict` with its defaults.

Without deepctr-torch installed (`pip install --no-deps deepctr-torch scikit-learn tqdm`) the table shows
our dense vs sparse ratios only. Writes out/bench/bench_ctr_vs_deepctr.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cowclip_ctr as cc

try:
    import deepctr_torch
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models import DeepFM as DeepCTRDeepFM
except ImportError:
    deepctr_torch = None


def ours_step(data: dict, batch: int, mode: str, dtype: str = "fp32"):
    """A closure that runs one full training step of ours on the next batch of a fixed permutation; dtype bf16 is
    `--dtype bf16` (the MLP under bf16 autocast, cowclip_ctr.py detail 7)."""
    cfg = cc.Config(batch_size=batch, embed_update=mode, dtype=dtype)
    torch.manual_seed(0)
    model = cc.DeepFM(data["field_dims"], data["n_dense"], 10, [400, 400, 400], cfg.init_std)
    model.mlp_dtype = cc.MLP_DTYPES[dtype]
    train = cc.to_device(data["train"], model.offsets, "cpu")
    hp = {**cc.scaled_hparams(cfg), "warmup_steps": 0}
    opt_e, opt_d = cc.make_optimizers(model, hp, mode)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    perm, state = torch.randperm(len(train[2]), generator=torch.Generator().manual_seed(0)), {"i": 0}

    def step():
        i = state["i"] % (len(perm) // batch)
        state["i"] += 1
        idx = perm[i * batch : (i + 1) * batch]
        cc.train_step(model, model, tuple(t[idx] for t in train), opt_e, opt_d, scaler, hp, cfg, ddp=False)

    return step


def deepctr_model(data: dict):
    sparse = [SparseFeat(f"C{f}", vocabulary_size=d, embedding_dim=10) for f, d in enumerate(data["field_dims"])]
    dense = [DenseFeat(f"I{j}", 1) for j in range(data["n_dense"])]
    cols = sparse + dense
    model = DeepCTRDeepFM(cols, cols, dnn_hidden_units=(400, 400, 400), device="cpu")  # its defaults otherwise
    model.compile("adam", "binary_crossentropy")  # torch.optim.Adam(lr 1e-3) on every parameter
    return model, [c.name for c in cols]


def deepctr_inputs(split: tuple, names: list[str]) -> dict:
    ids, dense, _ = split
    return {n: (ids[:, int(n[1:])] if n[0] == "C" else dense[:, int(n[1:])]) for n in names}


def deepctr_step(data: dict, batch: int):
    """The body of DeepCTR-Torch's BaseModel.fit loop (deepctr_torch/models/basemodel.py), on its own input."""
    model, names = deepctr_model(data)
    x_dict = deepctr_inputs(data["train"], names)
    x = torch.from_numpy(np.stack([np.asarray(x_dict[n], dtype=np.float64) for n in names], 1)).float()
    y = torch.from_numpy(data["train"][2]).float()
    perm, state = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)), {"i": 0}
    model.train()

    def step():
        i = state["i"] % (len(perm) // batch)
        state["i"] += 1
        idx = perm[i * batch : (i + 1) * batch]
        xb, yb = x[idx], y[idx]
        y_pred = model(xb).squeeze()
        model.optim.zero_grad()
        loss = F.binary_cross_entropy(y_pred, yb.squeeze(), reduction="sum")  # its loss: a SUM over the batch
        total = loss + model.get_regularization_loss() + model.aux_loss
        total.backward()
        model.optim.step()

    return step


def dnn_matmuls(data: dict, batch: int, hidden=(400, 400, 400)):
    """Only the GEMMs both libraries must run for the DNN at this batch (forward, weight gradients, input
    gradients down to the embeddings), on preallocated operands: the floor of either step at equal work, so
    `deepctr_torch / this` bounds the speed-up a leaner step can reach."""
    dims = [len(data["field_dims"]) * 10 + data["n_dense"], *hidden, 1]
    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(batch, d, generator=g) for d in dims]  # layer inputs / outputs
    grads = [torch.randn(batch, d, generator=g) for d in dims]
    ws = [torch.randn(o, i, generator=g) for i, o in zip(dims, dims[1:])]
    dws = [torch.empty_like(w) for w in ws]

    def step():
        for j, w in enumerate(ws):  # forward: a_{j+1} = a_j W_j^T
            torch.mm(acts[j], w.t(), out=acts[j + 1])
        for j in reversed(range(len(ws))):  # backward: dW_j = g_{j+1}^T a_j, g_j = g_{j+1} W_j
            torch.mm(grads[j + 1].t(), acts[j], out=dws[j])
            torch.mm(grads[j + 1], ws[j], out=grads[j])

    return step


# Two recipes for our one-epoch AUC: the CowClip rule as the sweep runs it, and DeepCTR-Torch's learning rates
# (its one Adam at 1e-3 on the tables too, no warmup), so that equal speed is compared at equal AUC as well.
RECIPES = {"cowclip": {}, "deepctr_lrs": {"base_lr_embed": 1e-3, "warmup_epochs": 0.0}}


def auc_ours(data: dict, batch: int, mode: str, dtype: str, recipe: str, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = cc.Config(
            batch_size=batch, embed_update=mode, dtype=dtype, epochs=epochs, out=out, save_model=False,
            log_every=10**9, **RECIPES[recipe],
        )  # fmt: skip
        t = time.perf_counter()
        s = cc.train(cfg, data, quiet=True, checkpoints=False)
    return {"auc": s["auc"], "logloss": s["logloss"], "bayes_auc": s["bayes_auc"], "wall_s": time.perf_counter() - t}


def auc_deepctr(data: dict, batch: int, epochs: int) -> dict:
    model, names = deepctr_model(data)
    t = time.perf_counter()
    model.fit(deepctr_inputs(data["train"], names), data["train"][2], batch_size=batch, epochs=epochs, verbose=0)
    p = model.predict(deepctr_inputs(data["test"], names), batch_size=65536).reshape(-1).astype(np.float64)
    wall = time.perf_counter() - t
    y = torch.from_numpy(data["test"][2])
    logit = torch.from_numpy(np.log(np.clip(p, 1e-7, 1 - 1e-7)) - np.log(np.clip(1 - p, 1e-7, 1 - 1e-7)))
    return {"auc": cc.roc_auc(torch.from_numpy(p), y), "logloss": cc.log_loss(logit, y), "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1024,8192")
    p.add_argument("--vocab", type=int, default=800_000)  # embedding rows in all
    p.add_argument("--n_train", type=int, default=400_000)  # rows of the one-epoch AUC run (and the step pool)
    p.add_argument("--n_test", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=5)  # alternating rounds of the step timing
    p.add_argument("--samples", type=int, default=32768)  # samples per variant per round
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--auc", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)  # also ours under --dtype bf16
    p.add_argument("--out", default="out/bench")
    args = p.parse_args()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread each, as the library would get
    t = time.time()
    data = cc.make_synthetic(cc.Config(synth_vocab=args.vocab, n_train=args.n_train, n_test=args.n_test))
    vocab = sum(data["field_dims"])
    print(f"synthetic data: {args.n_train:,} train rows, {vocab:,} embedding rows ({time.time() - t:.0f}s)", flush=True)
    have_lib = deepctr_torch is not None
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        variants = {f"ours_{m}": ours_step(data, b, m) for m in ("dense", "sparse")}
        if args.bf16:
            variants.update({f"ours_{m}_bf16": ours_step(data, b, m, "bf16") for m in ("dense", "sparse")})
        if have_lib:
            variants["deepctr_torch"] = deepctr_step(data, b)
        variants["dnn_matmuls_only"] = dnn_matmuls(data, b)
        k = max(1, args.samples // b)
        for f in variants.values():  # warm up: first-touch allocations, Adam state
            f()
            f()
        sps = {n: [] for n in variants}
        for _ in range(args.rounds):  # A B C A B C ...
            for n, f in variants.items():
                t = time.perf_counter()
                for _ in range(k):
                    f()
                sps[n].append(k * b / (time.perf_counter() - t))
        row = {"batch": b, "steps_per_round": k, "samples_per_s": {n: statistics.median(v) for n, v in sps.items()}}
        row["samples_per_s_rounds"] = sps
        if args.auc:
            ours = [n for n in variants if n.startswith("ours_")]  # ours_<mode>[_bf16]
            row["auc"] = {
                f"{n} {r}": auc_ours(data, b, n.split("_")[1], "bf16" if n.endswith("bf16") else "fp32", r, args.epochs)
                for n in ours
                for r in RECIPES
            }
            if have_lib:
                row["auc"]["deepctr_torch"] = auc_deepctr(data, b, args.epochs)
        rows.append(row)
        print(
            f"batch {b}: " + ", ".join(f"{n} {v:,.0f} samples/s" for n, v in row["samples_per_s"].items()), flush=True
        )
    base = "deepctr_torch" if have_lib else "ours_dense"
    print(
        f"\n1 thread, fp32 (ours_*_bf16: the MLP under bf16 autocast), {vocab:,} embedding rows, {args.rounds} "
        "alternating rounds (median)"
    )
    names = [n for n in rows[0]["samples_per_s"] if n != "dnn_matmuls_only"]
    others = [n for n in names if n != base]
    head = [*(f"{n} samples/s" for n in names), *(f"{n} / {base}" for n in others), f"DNN GEMMs only / {base}"]
    print("| batch | " + " | ".join(head) + " |\n" + "|---" * (1 + len(head)) + "|")
    for r in rows:
        s = r["samples_per_s"]
        cells = [*(f"{s[n]:,.0f}" for n in names), *(f"{s[n] / s[base]:.2f}x" for n in others)]
        cells.append(f"{s['dnn_matmuls_only'] / s[base]:.2f}x")  # the equal-work ceiling of a ratio to the base
        print(f"| {r['batch']:,} | " + " | ".join(cells) + " |")
    if args.auc:
        print(f"\ntest AUC after {args.epochs} epoch(s) of {args.n_train:,} rows, test {args.n_test:,}")
        print("| batch | variant | " + " | ".join(f"AUC, {r} recipe" for r in RECIPES) + " | Bayes AUC |")
        print("|---" * (3 + len(RECIPES)) + "|")
        for r in rows:
            a, bayes = r["auc"], r["auc"]["ours_dense cowclip"]["bayes_auc"]
            for n in names:
                if n == "deepctr_torch":
                    cells = [f"{a[n]['auc']:.4f} (its defaults)"] + [""] * (len(RECIPES) - 1)
                else:
                    cells = [f"{a[f'{n} {k}']['auc']:.4f}" for k in RECIPES]
                print(f"| {r['batch']:,} | {n} | " + " | ".join(cells) + f" | {bayes:.4f} |")
    os.makedirs(args.out, exist_ok=True)
    name = os.path.join(args.out, "bench_ctr_vs_deepctr.json")
    meta = {"deepctr_torch": getattr(deepctr_torch, "__version__", None), "torch": torch.__version__, "threads": 1}
    with open(name + ".tmp", "w") as f:
        json.dump({**meta, **vars(args), "vocab_rows": vocab, "rows": rows}, f, indent=2)
    os.replace(name + ".tmp", name)
    print(f"bench done: {len(rows)} batch sizes -> {name}")


if __name__ == "__main__":
    main()
