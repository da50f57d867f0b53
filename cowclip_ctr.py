"""CowClip: large-batch CTR training of DeepFM, faithful to the authors' code.

Paper: Zheng et al., "CowClip: Reducing CTR Prediction Model Training Time from 12 hours to 10
minutes on 1 GPU", AAAI 2023, arXiv 2204.06240. Reference code: bytedance/LargeBatchCTR @12101b4 (TF
2.4, DeepCTR). The published numbers come from that code, which differs from the paper's Algorithm 1
box; we follow the code (`--clip code`) and offer the box read literally (`--clip paper`) and no
clipping (`--clip none`).

Launch:
    python cowclip_ctr.py                          # toy: synthetic Criteo-like data, AUC vs Bayes
    python cowclip_ctr.py --batch_size 8192        # CowClip rule derives lr / L2 / warmup
    python cowclip_ctr.py --batch_size 8192 --scale_rule sqrt --clip none   # a plain rule
    python cowclip_ctr.py --sweep                  # 1K..128K, CowClip vs plain rules
    torchrun --standalone --nproc_per_node=2 cowclip_ctr.py   # DDP (gloo CPU, nccl CUDA)
    python cowclip_ctr.py --preprocess criteo --raw train.txt --data data/criteo  # 2 passes
    python cowclip_ctr.py --preprocess avazu --raw train --data data/avazu --test_frac 0.2
    python cowclip_ctr.py --data data/criteo --device cuda --batch_size 131072 --epochs 10
    python cowclip_ctr.py --resume out/cowclip_ctr   # continue an interrupted run where it stopped

Implementation details (the numbers appear again at the lines that implement them):
 1. DeepFM as LargeBatchCTR runs it (DeepCTR `DeepFM`): ONE concatenated d=10 table E with per-field
    offsets (one gather instead of 26), a concatenated 1-dim first-order table L (zero init), a
    bias-free linear kernel on the dense features, the FM term 0.5 * sum_d[(sum_f e)^2 - sum_f e^2]
    over the categorical fields only, an MLP 400-400-400 ReLU (glorot-normal, zero bias, no BN, no
    dropout) on [flatten(E[ids]), dense] with a bias-free 1-unit head, and one global bias. E init
    N(0, 1e-2) (README commands).
 2. Loss: mean BCE over the (global) batch. L2 is Keras' lambda * sum(w^2) on E, L and the linear
    kernel over the WHOLE table, so its gradient 2*lambda*w is added to every row after backward
    ("faithful", dense gradients).
 3. CowClip as `clip.py` computes it: for each id present in the batch, with count c from
    unique-with-counts, threshold t = r * c * max(||w||, r * sqrt(d) * zeta), and the row of g
    (data + L2) is scaled by min(1, t / ||g||). Only E is clipped; L and all dense weights are not.
    Absent rows keep count 1 in the code, and as 2*lambda < r they are never clipped, so touching
    only present rows is exact. `--clip paper`: Algorithm 1 literally, t = c * max(r * ||w||,
    zeta), and absent ids (c = 0) get zero gradient.
 4. Two Adam optimisers (Keras defaults, eps 1e-7): embeddings {E, L} at lr_embed with no warmup;
    everything else at lr_dense with a linear warmup from 1e-8 over `warmup_epochs` (Keras
    PolynomialDecay, power 1), then flat.
 5. Scaling rule from the 1K base (README table): s = B / 1024; CowClip keeps lr_embed, multiplies
    lambda by s and lr_dense by sqrt(s). Plain rules (sqrt, linear) scale both lrs and keep lambda;
    none keeps everything.
 6. DDP: the global batch is what the user sets; every rank slices its share of the same global
    permutation. DDP all-reduces (means) the data gradients, THEN the L2 term is added (it is
    identical on every rank), and CowClip counts ids over the all-gathered global batch, so 2 ranks
    take the same step as 1 rank.
 7. AMP: bf16 autocast for the MLP only (FM, tables, loss in fp32). fp16 uses a GradScaler whose
    gradients are unscaled BEFORE the L2 term and the clipping, because the threshold compares
    ||g|| with ||w||.
 8. Data lives on the device; each epoch slices batches from a seeded permutation (no DataLoader).
    The last incomplete batch is dropped so every step has exactly the global batch the scaling
    rule assumes.
 9. Evaluation each epoch: AUC (own rank statistic, ties get average ranks) and LogLoss in float64.
10. Synthetic Criteo-like data: 26 categorical fields (Criteo cardinalities scaled down, Zipf id
    frequencies, per-field missing rates), 13 heavy-tailed integer fields, labels from a hidden
    logistic model with per-id effects and low-rank pairwise field interactions, calibrated to
    25.6% positives. The true probabilities are known, so the Bayes-optimal AUC of the test split
    is reported next to ours.
11. Preprocessing of Criteo `train.txt` / Avazu `train`: two streaming passes (count, then encode);
    `lbctr` encoding = the reference's LabelEncoder (missing -> "-1", sorted vocabulary) + MinMax
    dense (missing -> 0); `bars` = BARS/FuxiCTR style: ints -> floor(ln(v)^2) if v > 2 as
    categoricals, ids seen < min_count -> OOV. Fixed-seed split; memory-mapped .npy + meta.json +
    vocab files; written to a temp folder and renamed. Raw files may be gzip or xz, have CRLF line
    ends, a UTF-8 BOM and blank lines. meta.json lists every file written, so a rerun replaces
    its own earlier output and refuses any other non-empty --data folder.
12. Exact resume: <out>/ckpt/ holds the model (safetensors), both Adams, the GradScaler, the RNG
    states and the generator state from before the current epoch's permutation (torch.save, read
    with weights_only=True), plus the epoch, the batch within it, the step, the config and the
    logging state (JSON). Rank 0 writes it at every epoch end, every --save_every steps and at
    --stop_after_steps, as ckpt.tmp/ renamed into place (the previous one is kept until then), so
    a kill at any moment leaves one loadable. --resume (every rank reads it) replays the epoch's
    permutation, skips the batches already taken, cuts metrics.jsonl back to the checkpoint, and
    ends bit-identical to the uninterrupted run (CPU, fp32, same threads). Flags left out are the
    interrupted run's; a given flag that defines the run must equal the saved one (MAY_DIFFER
    lists those that may change, such as --log_every or --out, which then starts a copy of the
    run there). A fresh run refuses an --out that holds an unfinished run's checkpoint.
13. `--embed_update sparse` (a deviation from the reference, which is `dense`): only the rows of E and L
    present in the global batch are touched. Their unique rows are gathered into leaf tensors before the
    forward, so the backward yields a (U, d) gradient instead of a dense (V, d) one (DDP all-reduces
    only those rows); L2 is lazy (2*lambda*w on present rows only) and CowClip clips the same rows with
    the same counts; the embedding Adam is lazy (TF Addons LazyAdam / torch.optim.SparseAdam): absent
    rows keep weights and moments, while the bias correction counts every step. When every row is
    present at every step this equals the dense path; otherwise absent rows no longer decay under L2
    and Adam momentum, which is what makes the dense path cost O(V) per step.
14. Both paths compute the data gradient of E and L the same way: the global batch's unique rows u are
    gathered into leaf tensors (U, d) and (U, 1) before the forward, and the backward of that gather is
    one index_add_ (`GatherRows`), instead of nn.Embedding's CPU backward, which sorts the B*F ids and
    fills a (V, d) gradient. DDP leaves E and L alone and train_step all-reduces the (U, d + 1) rows,
    not V x (d + 1). The dense path then writes them into its whole-table gradient before the L2 term,
    so its arithmetic is the reference's; only the buffer the gradient lives in is kept across steps.

Input errors (a flag, a raw row, a data folder) end the run before anything is written, with one
line on stderr, `cowclip_ctr.py: error: <path>:<line>: field '<name>': <what is wrong; what to do>`,
and exit code 2 (argparse's).
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import datetime
import gzip
import json
import lzma
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    # --- data
    data: str = "synthetic"  # "synthetic", or a folder written by --preprocess (meta.json + .npy)
    out: str = "out/cowclip_ctr"  # output folder: config.json, metrics.jsonl, summary.json, model
    n_train: int = 200_000  # synthetic: training rows
    n_test: int = 50_000  # synthetic: test rows (the Bayes AUC is measured on these)
    synth_vocab: int = 20_000  # synthetic: approximate total rows of the concatenated embedding table
    synth_seed: int = 0  # synthetic: seed of the hidden model and the samples
    # --- preprocessing (runs instead of training when set)
    preprocess: str = ""  # "criteo" or "avazu": convert --raw into the folder --data, then exit
    raw: str = ""  # raw Criteo Kaggle train.txt (TSV, no header) or Avazu train (CSV with header)
    encoding: str = "lbctr"  # lbctr: reference LabelEncoder + MinMax; bars: ln^2 buckets + min_count OOV
    min_count: int = 10  # bars encoding: values seen fewer times map to the field's OOV id 0
    test_frac: float = 0.1  # held-out fraction (reference: 0.1 Criteo, 0.2 Avazu)
    valid_frac: float = 0.0  # validation fraction (reference: none; BARS: 0.1)
    split_seed: int = 2023  # the split is a seeded permutation (the reference's was unseeded)
    skip_bad_rows: bool = False  # skip and count malformed rows instead of failing with file:line
    # --- model (detail 1)
    embed_dim: int = 10  # d, the CowClip-clipped embedding width
    mlp: str = "400,400,400"  # DNN hidden widths
    init_std: float = 1e-2  # std of the E init (README commands; DeepCTR default 1e-4)
    # --- large-batch recipe (details 3-5); base values = the README's Criteo 1K row
    batch_size: int = 1024  # GLOBAL batch
    scale_rule: str = "cowclip"  # cowclip | sqrt | linear | none: derive lrs and L2 from the 1K base
    base_batch: int = 1024  # the batch the base values are tuned for
    base_lr_dense: float = 8e-4  # dense lr at the base batch
    base_lr_embed: float = 1e-4  # embedding lr at the base batch
    base_l2: float = 1e-5  # lambda at the base batch
    warmup_epochs: float = 1.0  # dense-lr linear warmup length in epochs
    clip: str = "code"  # code: LargeBatchCTR clip.py; paper: Algorithm 1 literally; none
    cowclip_r: float = 1.0  # CowClip ratio r
    cowclip_zeta: float = 1e-5  # CowClip lower bound zeta ("code zeta": floor r*sqrt(d)*zeta)
    # dense: the reference (L2 and the embedding Adam over every row, every step); sparse: lazy, only the
    # rows present in the batch get L2 and an Adam update (TF LazyAdam / torch SparseAdam), detail 13
    embed_update: str = "dense"
    epochs: int = 2  # passes over the training set
    seed: int = 1235  # init and batch-order seed (reference default)
    # --- runtime
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast for the MLP)
    compile: bool = False  # torch.compile the model
    threads: int = 1  # CPU threads; 1 is fastest on a busy machine (OpenMP spin-waits), 0 = torch's
    log_every: int = 50  # steps between progress lines / metrics.jsonl rows
    save_model: bool = True  # write model.safetensors at the end
    # --- checkpoints and resume (detail 12)
    resume: str = ""  # a previous --out to continue from its ckpt/; --out defaults to the same folder
    # steps between extra checkpoints; 0 = only at epoch ends, which is the default because a checkpoint
    # holds the tables three times (weights + two Adam moments): ~4 GB for full Criteo
    save_every: int = 0
    stop_after_steps: int = 0  # stop after this step as if interrupted, leaving a checkpoint; 0 = run to the end
    # --- sweep
    sweep: bool = False  # run sweep_batches x sweep_rules and write sweep.md / sweep.json
    sweep_batches: str = "1024,2048,4096,8192,16384,32768,65536,131072"  # global batches of the sweep
    sweep_rules: str = "cowclip,sqrt,linear,none"  # cowclip runs with --clip code, the others with none


# --------------------------------------------------------------------------------------------------
# input errors: every setting is checked before the first byte is read or written


class InputError(ValueError):
    """A problem with what the user gave us (a flag, a raw row, a data folder); `main` prints it as
    one line and exits 2. Anything else is a bug of ours and keeps its traceback."""


PROG = "cowclip_ctr.py"  # the name on error lines, however we were launched (python, torchrun, pytest)
CHOICES = {
    "preprocess": ("", "criteo", "avazu"),
    "encoding": ("lbctr", "bars"),
    "scale_rule": ("cowclip", "sqrt", "linear", "none"),
    "clip": ("code", "paper", "none"),
    "embed_update": ("dense", "sparse"),
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("auto", "fp32", "bf16", "fp16"),
}
INT_LIST = re.compile(r"[0-9]+(,[0-9]+)*")


def positive_ints(text: str) -> bool:
    return bool(INT_LIST.fullmatch(text)) and all(int(x) > 0 for x in text.split(","))


def check_output_path(flag: str, path: str) -> None:
    """An output folder may exist already; a file at its name, or at a folder above it, may not."""
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == Path(path) else f"{p} "
                raise InputError(f"--{flag} {path}: {where}is an existing file; name a folder instead")
            return


def check_config(cfg: Config, world: int) -> None:
    """Raise InputError for the first setting that cannot work, naming the flag and the fix."""

    def need(ok, name: str, what: str) -> None:
        if not ok:
            v = getattr(cfg, name)
            raise InputError(f"--{name} {v if v != '' else repr(v)}: {what}")

    positive = ("n_train", "n_test", "synth_vocab", "embed_dim", "batch_size", "base_batch", "epochs", "log_every")
    for name in (*positive, "min_count"):
        need(getattr(cfg, name) > 0, name, "must be a positive integer")
    for name in ("seed", "synth_seed", "split_seed", "threads", "save_every", "stop_after_steps"):
        need(getattr(cfg, name) >= 0, name, "must be a non-negative integer")
    # a zero or negative lr trains "fine" to a useless model, so it is refused, not run
    for name in ("base_lr_dense", "base_lr_embed", "init_std", "cowclip_r"):
        need(math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0, name, "must be a positive number")
    for name in ("base_l2", "cowclip_zeta", "warmup_epochs"):
        v = getattr(cfg, name)
        need(math.isfinite(v) and v >= 0, name, "must be a non-negative number")
    for name, allowed in CHOICES.items():
        need(getattr(cfg, name) in allowed, name, f"must be one of {'|'.join(a for a in allowed if a)}")
    need(cfg.device != "cuda" or torch.cuda.is_available(), "device", "no CUDA device is visible; use --device cpu")
    need(0 < cfg.test_frac < 1, "test_frac", "must be in (0, 1): evaluation needs a test split")
    need(0 <= cfg.valid_frac < 1 - cfg.test_frac, "valid_frac", "must be in [0, 1 - test_frac)")
    need(cfg.mlp == "" or positive_ints(cfg.mlp), "mlp", "must be comma-separated positive widths, e.g. 400,400")
    # detail 6: every rank takes the same share of the global batch
    need(cfg.batch_size % world == 0, "batch_size", f"must be divisible by WORLD_SIZE {world}")
    if cfg.resume and (cfg.preprocess or cfg.sweep):
        raise InputError(f"--resume {cfg.resume}: continues one training run; drop --preprocess / --sweep")
    need(not (cfg.sweep and cfg.stop_after_steps), "stop_after_steps", "a sweep writes no checkpoints; drop --sweep")
    if cfg.preprocess:  # the paths --raw and --data are checked by preprocess() itself
        need(cfg.raw, "raw", "--preprocess needs the raw file, e.g. --raw train.txt")
        need(cfg.data != "synthetic", "data", "name the folder --preprocess writes, e.g. --data data/criteo")
        return
    if cfg.sweep:
        if world > 1:
            raise InputError("--sweep: runs in one process; launch it without torchrun")
        need(positive_ints(cfg.sweep_batches), "sweep_batches", "must be comma-separated positive batches, e.g. 1024")
        rules = CHOICES["scale_rule"]
        need(
            all(r in rules for r in cfg.sweep_rules.split(",")),
            "sweep_rules",
            f"must be a comma-separated list of {'|'.join(rules)}",
        )
    check_output_path("out", cfg.out)


# --------------------------------------------------------------------------------------------------
# small pure functions


def fm_term(e: torch.Tensor) -> torch.Tensor:
    """FM 2nd order (Rendle 2010): sum_{f<g} <e_f, e_g> = 0.5 * sum_d[(sum_f e)^2 - sum_f e^2]."""
    # e: (B, F, d) -> (B,)
    return 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(1)


def cowclip_threshold(
    w_norm: torch.Tensor, counts: torch.Tensor, r: float, zeta: float, dim: int, mode: str
) -> torch.Tensor:
    """Per-row clip threshold. `code`: LargeBatchCTR clip.py; `paper`: Algorithm 1 as printed."""
    if mode == "code":
        # CowClip detail 3 (clip.py): floor, then r and count: t = r*c*max(||w||, r*sqrt(d)*zeta)
        return r * counts * torch.clamp(w_norm, min=r * math.sqrt(dim) * zeta)
    if mode == "paper":
        # CowClip Alg. 1: clip_k = cnt * max(r * ||w_k||, zeta)
        return counts * torch.clamp(r * w_norm, min=zeta)
    raise ValueError(f"unknown clip mode {mode!r}")


@torch.no_grad()
def cowclip_rows_(
    w_rows: torch.Tensor, g_rows: torch.Tensor, counts: torch.Tensor, r: float, zeta: float, mode: str
) -> int:
    """Clip the gradient rows (U, d) of the ids present in the batch in place, given their weights (U, d)
    and in-batch counts (U,); returns how many rows were clipped."""
    g_norm = g_rows.norm(dim=1)
    t = cowclip_threshold(w_rows.norm(dim=1), counts.to(g_rows.dtype), r, zeta, w_rows.shape[1], mode)
    clipped = g_norm > t
    # g * min(1, t / ||g||); rows with ||g|| <= t (zero rows included) are left bit-identical
    g_rows.mul_(torch.where(clipped, t / torch.where(clipped, g_norm, 1.0), 1.0)[:, None])
    return int(clipped.sum())


@torch.no_grad()
def cowclip_(
    weight: torch.Tensor, grad: torch.Tensor, ids: torch.Tensor, r: float, zeta: float, mode: str, unique=None
) -> tuple[int, int]:
    """Clip the dense `grad` (V, d) in place for the ids of the batch; returns (rows clipped, present).
    `unique`: (rows, counts) of `ids` when the caller has them already."""
    rows, counts = unique if unique is not None else torch.unique(ids.reshape(-1), return_counts=True)
    rows = rows.long()
    g = grad.index_select(0, rows)  # (U, d); index_select: a plain row gather, cheaper than advanced indexing
    n_clipped = cowclip_rows_(weight.index_select(0, rows), g, counts, r, zeta, mode)
    if mode == "paper":
        grad.zero_()  # Alg. 1 literally: cnt = 0 for absent ids, so clip value and gradient are 0
    grad.index_copy_(0, rows, g)
    return n_clipped, int(rows.numel())


def scaled_hparams(cfg: Config, batch_size: int | None = None) -> dict:
    """Detail 5: dense lr, embedding lr, L2 and warmup at `batch_size` from the base settings."""
    b = cfg.batch_size if batch_size is None else batch_size
    s = b / cfg.base_batch
    lr_d, lr_e, l2 = cfg.base_lr_dense, cfg.base_lr_embed, cfg.base_l2
    if cfg.scale_rule == "cowclip":  # LargeBatchCTR README: lr_e fixed, lambda * s, lr_d * sqrt(s)
        lr_d, l2 = lr_d * math.sqrt(s), l2 * s
    elif cfg.scale_rule == "sqrt":  # Krizhevsky 2014: every lr * sqrt(s)
        lr_d, lr_e = lr_d * math.sqrt(s), lr_e * math.sqrt(s)
    elif cfg.scale_rule == "linear":  # Goyal et al. 2017: every lr * s
        lr_d, lr_e = lr_d * s, lr_e * s
    elif cfg.scale_rule != "none":
        raise ValueError(f"--scale_rule must be cowclip|sqrt|linear|none, got {cfg.scale_rule!r}")
    return {
        "batch_size": b,
        "scale": s,
        "lr_dense": lr_d,
        "lr_embed": lr_e,
        "l2": l2,
        "warmup_epochs": cfg.warmup_epochs,
    }


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AUC as the Mann-Whitney statistic; tied scores get their average rank (half credit)."""
    s = scores.double().flatten()
    y = labels.flatten() > 0.5
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).double()  # 1-based rank of the last element of each tie group
    avg_rank = last - (counts.double() - 1) / 2
    rank_sum = avg_rank[inverse][y].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def log_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return F.binary_cross_entropy_with_logits(logits.double(), labels.double()).item()


def glorot_normal_(w: torch.Tensor) -> torch.Tensor:
    """Keras glorot_normal: truncated normal (2 std), std = sqrt(2 / (fan_in + fan_out)) / .8796."""
    fan_out, fan_in = w.shape
    std = math.sqrt(2.0 / max(1, fan_in + fan_out)) / 0.87962566103423978
    return nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


# --------------------------------------------------------------------------------------------------
# synthetic Criteo-like data (detail 10)

# Criteo Kaggle C1..C26 cardinalities (facebookresearch/dlrm Kaggle defaults), rough missing rates (from
# bytedance/LargeBatchCTR's 200-row criteo_sample.txt)
CRITEO_CARDS = [
    1460,
    583,
    10131227,
    2202608,
    305,
    24,
    12517,
    633,
    3,
    93145,
    5683,
    8351593,
    3194,
    27,
    14992,
    5461306,
    10,
    5652,
    2173,
    4,
    7046547,
    18,
    15,
    286181,
    105,
    142572,
]
CAT_MISSING = {
    2: 0.04,
    3: 0.04,
    5: 0.16,
    11: 0.04,
    15: 0.04,
    18: 0.41,
    19: 0.41,
    20: 0.04,
    21: 0.8,
    23: 0.04,
    24: 0.41,
    25: 0.41,
}
INT_MISSING = [0.45, 0.03, 0.17, 0.17, 0.03, 0.26, 0.03, 0.03, 0.03, 0.45, 0.03, 0.79, 0.17]
INT_MEDIAN = [3, 5, 12, 7, 2000, 60, 8, 18, 50, 1, 2, 1, 8]


def synthetic_cardinalities(total: int) -> list[int]:
    """Criteo's cardinalities compressed as c**alpha (alpha by bisection) so they sum to ~total."""

    def cards(alpha: float) -> list[int]:
        return [max(2, min(c, round(c**alpha))) for c in CRITEO_CARDS]

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(cards(mid)) < total else (lo, mid)
    return [c + 1 for c in cards(lo)]  # + id 0 = "missing" (one missing id per field)


def make_synthetic(cfg: Config) -> dict:
    """Train/test arrays in the preprocessed format, plus the true logit of every test row."""
    rng = np.random.default_rng(cfg.synth_seed)
    cards = synthetic_cardinalities(cfg.synth_vocab)
    n = cfg.n_train + cfg.n_test
    ids = np.zeros((n, len(cards)), dtype=np.int32)
    logit = np.zeros(n)
    factors = []
    for f, (card, orig) in enumerate(zip(cards, CRITEO_CARDS)):
        # Zipf id frequencies (a power-law fit of ours, not published): heavier tails for the huge fields
        a = 1.1 if orig > 1_000_000 else 1.3 if orig > 50_000 else 1.2
        p = 1.0 / np.arange(1, card) ** a
        col = rng.permutation(np.arange(1, card))[rng.choice(card - 1, size=n, p=p / p.sum())]
        col[rng.random(n) < CAT_MISSING.get(f, 0.0)] = 0
        ids[:, f] = col
        # per-id effects: learnable fields carry more signal than the long-tailed ones
        sigma = 0.15 if orig > 1_000_000 else 0.3 if orig > 5_000 else 0.4
        logit += rng.normal(0, sigma, card)[col]
        factors.append(rng.normal(0, 0.35, (card, 4)))  # rank-4 interaction factors
    pairs = [(0, 1), (4, 7), (6, 10), (8, 16), (13, 22), (5, 19), (12, 14), (2, 9)]  # disjoint
    for f, g in pairs:  # hidden pairwise interactions, an FM-shaped signal DeepFM can represent
        logit += (factors[f][ids[:, f]] * factors[g][ids[:, g]]).sum(1) / 2
    raw = np.zeros((n, 13))
    for j in range(13):  # heavy-tailed counts (log-normal), I2 may be -1 (as in the Criteo data)
        x = np.floor(np.exp(rng.normal(math.log(INT_MEDIAN[j] + 1), 1.3, n))) - (2 if j == 1 else 1)
        x[rng.random(n) < INT_MISSING[j]] = 0  # the reference fills missing with 0 (the model sees the same)
        z = np.log1p(np.maximum(x, 0))
        logit += rng.normal(0, 0.05) * (z - z.mean()) / (z.std() + 1e-9)
        raw[:, j] = x
    dense = ((raw - raw.min(0)) / np.maximum(raw.max(0) - raw.min(0), 1e-12)).astype(np.float32)  # MinMax
    lo, hi = -10.0, 10.0  # calibrate the intercept to Criteo Kaggle's 25.6% positives
    for _ in range(50):
        b0 = (lo + hi) / 2
        lo, hi = (b0, hi) if (1 / (1 + np.exp(-(logit + b0)))).mean() < 0.256 else (lo, b0)
    prob = 1 / (1 + np.exp(-(logit + b0)))
    labels = (rng.random(n) < prob).astype(np.float32)
    tr, te = slice(0, cfg.n_train), slice(cfg.n_train, n)
    return {
        "field_dims": cards,
        "n_dense": 13,
        "train": (ids[tr], dense[tr], labels[tr]),
        "test": (ids[te], dense[te], labels[te]),
        "test_true_logit": (logit + b0)[te],
    }


def load_preprocessed(folder: str) -> dict:
    """Read a --preprocess folder: meta.json + memory-mapped .npy per split, each checked against meta."""
    path = os.path.join(folder, "meta.json")
    redo = f"run `--preprocess criteo|avazu --raw FILE --data {folder}` again"
    if not os.path.isfile(path):
        raise InputError(f"{path}: not found; {redo}")
    try:
        meta = json.loads(Path(path).read_bytes())
    except ValueError as e:  # JSONDecodeError knows its line; a UnicodeDecodeError does not
        raise InputError(f"{path}:{getattr(e, 'lineno', 1)}: not valid JSON ({e}); {redo}") from None
    for key in ("field_dims", "n_dense", "rows"):
        if key not in meta:
            raise InputError(f"{path}: field '{key}': missing; {redo}")
    for split in ("train", "test"):  # training and the final AUC need both
        if not meta["rows"].get(split):
            raise InputError(f"{path}: field 'rows': no {split} rows; {redo} with more rows")
    out = {"field_dims": meta["field_dims"], "n_dense": meta["n_dense"], "meta": meta}
    for split, m in meta["rows"].items():
        if m == 0:
            continue
        shapes = {"ids": (m, len(meta["field_dims"])), "dense": (m, meta["n_dense"]), "label": (m,)}
        arrays = []
        for k, shape in shapes.items():
            file = os.path.join(folder, f"{split}_{k}.npy")
            try:
                a = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as e:  # missing, truncated (mmap past the end), not .npy
                raise InputError(f"{file}: cannot read ({e}); {redo}") from None
            if a.shape != shape:
                raise InputError(f"{file}: shape {a.shape}, meta.json says {shape}; {redo}")
            arrays.append(a)
        out[split] = tuple(arrays)
    return out


# --------------------------------------------------------------------------------------------------
# model (detail 1)


class GatherRows(torch.autograd.Function):
    """table[index] for a (U, k) table and (B, F) index -> (B, F, k); the backward is one index_add_, where
    nn.Embedding's CPU backward first sorts the B*F ids (a fifth of the 8K step; bench/bench_ctr_vs_deepctr.py)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.n_rows = table.shape[0]
        return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        k = grad.shape[-1]
        out = grad.new_zeros(ctx.n_rows, k).index_add_(0, index.reshape(-1), grad.reshape(-1, k))
        return out, None


class DeepFM(nn.Module):
    def __init__(self, field_dims: list[int], n_dense: int, embed_dim: int, mlp: list[int], init_std: float):
        super().__init__()
        self.register_buffer("offsets", torch.tensor(np.cumsum([0] + field_dims[:-1]), dtype=torch.int32))
        vocab = sum(field_dims)
        self.embed = nn.Embedding(vocab, embed_dim)  # E: shared by FM and DNN, the only clipped table
        nn.init.normal_(self.embed.weight, std=init_std)
        self.linear_embed = nn.Embedding(vocab, 1)  # L: first-order weights, zero init (DeepCTR)
        nn.init.zeros_(self.linear_embed.weight)
        self.dense_kernel = nn.Linear(n_dense, 1, bias=False)  # linear part on the dense features
        glorot_normal_(self.dense_kernel.weight)
        layers, width = [], len(field_dims) * embed_dim + n_dense
        for h in mlp:
            lin = nn.Linear(width, h)
            glorot_normal_(lin.weight)
            nn.init.zeros_(lin.bias)
            layers += [lin, nn.ReLU(inplace=True)]  # in place: one (B, h) buffer less per layer
            width = h
        self.mlp = nn.Sequential(*layers)
        self.mlp_out = nn.Linear(width, 1, bias=False)
        glorot_normal_(self.mlp_out.weight)
        self.bias = nn.Parameter(torch.zeros(1))  # global bias of DeepCTR's PredictionLayer
        self.mlp_dtype: torch.dtype | None = None  # set to bf16/fp16 for autocast of the MLP (detail 7)

    def forward(self, ids: torch.Tensor, dense: torch.Tensor, rows: tuple | None = None) -> torch.Tensor:
        # ids: (B, F) offset ids into the concatenated tables; dense: (B, n_dense)
        if rows is None:
            e, lin = self.embed(ids), self.linear_embed(ids)  # (B, F, d), (B, F, 1): one gather per table
        else:  # training (detail 14): the batch's unique rows of E and L as leaves (U, d), (U, 1); ids -> rows (B, F)
            inverse, e_rows, l_rows = rows
            e, lin = GatherRows.apply(e_rows, inverse), GatherRows.apply(l_rows, inverse)
        first = lin.sum((1, 2)) + self.dense_kernel(dense).squeeze(-1)  # (B,)
        x = torch.cat([e.flatten(1), dense], 1)  # (B, F*d + n_dense)
        with torch.autocast(
            ids.device.type, dtype=self.mlp_dtype or torch.bfloat16, enabled=self.mlp_dtype is not None
        ):
            deep = self.mlp_out(self.mlp(x)).squeeze(-1)
        return first + fm_term(e) + deep.float() + self.bias  # logits (B,)


MLP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype -> DeepFM.mlp_dtype


def embedding_params(model: DeepFM) -> list[nn.Parameter]:
    return [model.embed.weight, model.linear_embed.weight]


def dense_params(model: DeepFM) -> list[nn.Parameter]:
    emb = {id(p) for p in embedding_params(model)}
    return [p for p in model.parameters() if id(p) not in emb]


class LazyAdam(torch.optim.Optimizer):
    """Detail 13: Adam on the rows of a sparse gradient only, as TF Addons' LazyAdam and torch.optim.SparseAdam
    do: rows absent from the batch keep their weights and both moments. A present row takes torch.optim.Adam's
    update (eps added after the bias-corrected sqrt; SparseAdam adds it before), and the bias correction counts
    every step, present or not, so a row present at every step follows the dense Adam exactly."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-7):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (b1, b2), lr, eps = group["betas"], group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                st["step"] += 1
                t = st["step"].item()
                rows, g = p.grad._indices()[0], p.grad._values()  # (U,) unique rows, (U, d)
                m = st["exp_avg"].index_select(0, rows).lerp_(g, 1 - b1)
                v = st["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"].index_copy_(0, rows, m)
                st["exp_avg_sq"].index_copy_(0, rows, v)
                denom = v.sqrt_().div_(math.sqrt(1 - b2**t)).add_(eps)
                p.index_add_(0, rows, m.div_(denom), alpha=-lr / (1 - b1**t))


def make_optimizers(model: DeepFM, hp: dict, embed_update: str = "dense") -> tuple[torch.optim.Optimizer, ...]:
    # detail 4: two Adams with Keras' eps 1e-7 (PyTorch default 1e-8); fused kernels where available
    kw = {"betas": (0.9, 0.999), "eps": 1e-7}
    if embed_update == "sparse":  # detail 13
        opt_e = LazyAdam(embedding_params(model), lr=hp["lr_embed"], **kw)
    else:
        opt_e = torch.optim.Adam(embedding_params(model), lr=hp["lr_embed"], fused=True, **kw)
    lr_d = 1e-8 if hp["warmup_steps"] else hp["lr_dense"]
    return opt_e, torch.optim.Adam(dense_params(model), lr=lr_d, fused=True, **kw)


# --------------------------------------------------------------------------------------------------
# one training step (details 2, 3, 6, 7)


def train_step(
    model: nn.Module, raw: DeepFM, batch: tuple, opt_e, opt_d, scaler, hp: dict, cfg: Config, ddp: bool
) -> tuple[torch.Tensor, int, int]:
    """Fwd/bwd on this rank's share, L2 + CowClip on the global gradient, both Adam steps."""
    ids, dense, y = batch
    sparse = cfg.embed_update == "sparse"
    E, L = raw.embed.weight, raw.linear_embed.weight
    gids = ids
    if ddp:  # detail 6: ids of the global batch, the same on every rank
        gids = torch.empty((dist.get_world_size() * ids.shape[0], ids.shape[1]), dtype=ids.dtype, device=ids.device)
        dist.all_gather_into_tensor(gids, ids.contiguous())
    # detail 14: the data gradient of E and L lives on the batch's unique rows u only, so those rows are
    # gathered into leaves (U, d), (U, 1) that the backward fills, instead of a (V, d) embedding backward
    u, inverse, counts = torch.unique(gids.reshape(-1), return_inverse=True, return_counts=True)
    r0 = dist.get_rank() * ids.shape[0] if ddp else 0
    inverse = inverse.view(gids.shape)[r0 : r0 + ids.shape[0]]  # (B, F): this rank's ids -> rows of u
    e_rows = E.detach().index_select(0, u).requires_grad_()  # (U, d)
    l_rows = L.detach().index_select(0, u).requires_grad_()  # (U, 1)
    loss = F.binary_cross_entropy_with_logits(model(ids, dense, (inverse, e_rows, l_rows)), y)  # mean, this rank
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # DDP: dense grads are now the mean over the GLOBAL batch (detail 6)
    g = torch.cat([e_rows.grad, l_rows.grad], 1)  # (U, d + 1)
    if ddp:  # DDP ignores E and L: their (U, d + 1) rows are all-reduced here, then the L2 term follows
        dist.all_reduce(g)
        g /= dist.get_world_size()
    idx = u.long()
    # without loss scaling, the dense gradient is written as 2 lambda w + data in two passes (the L2 term of
    # detail 2 first, then the present rows), instead of zero, copy, add over the whole table
    l2_in_buffer = not sparse and not scaler.is_enabled()
    for p, gp in ((E, g[:, :-1]), (L, g[:, -1:])):  # the data gradient, handed to the optimizer's params
        if sparse:  # detail 13: as a sparse (V, k) gradient of the present rows
            p.grad = torch.sparse_coo_tensor(
                idx[None], gp.contiguous(), p.shape, is_coalesced=True, check_invariants=False
            )
        elif l2_in_buffer:
            p.grad = p.grad if p.grad is not None else torch.empty_like(p)
            torch.mul(p.detach(), 2 * hp["l2"], out=p.grad).index_add_(0, idx, gp)
        else:  # the reference's dense (V, k) gradient, in a buffer kept from step to step
            p.grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad.zero_().index_copy_(0, idx, gp)
    scaler.unscale_(opt_e)  # detail 7: unscale before L2 and clipping, the threshold compares g with w
    scaler.unscale_(opt_d)
    with torch.no_grad():
        n_clipped = n_rows = 0
        raw.dense_kernel.weight.grad.add_(raw.dense_kernel.weight, alpha=2 * hp["l2"])  # detail 2
        if sparse:  # detail 13: lazy L2, on the present rows only; CowClip on those same rows
            g_e, g_l = E.grad._values(), L.grad._values()
            g_e.add_(e_rows.detach(), alpha=2 * hp["l2"])
            g_l.add_(l_rows.detach(), alpha=2 * hp["l2"])
            if cfg.clip != "none":
                n_clipped = cowclip_rows_(e_rows.detach(), g_e, counts, cfg.cowclip_r, cfg.cowclip_zeta, cfg.clip)
                n_rows = int(u.numel())
        else:
            for p in (E, L):
                if not l2_in_buffer:  # after unscaling (fp16): the L2 term is not scaled
                    p.grad.add_(p, alpha=2 * hp["l2"])  # detail 2: d/dw of lambda * sum(w^2), whole table
            if cfg.clip != "none":
                n_clipped, n_rows = cowclip_(
                    E, E.grad, gids, cfg.cowclip_r, cfg.cowclip_zeta, cfg.clip, unique=(idx, counts)
                )
    scaler.step(opt_e)
    scaler.step(opt_d)
    scaler.update()
    return loss.detach(), n_clipped, n_rows


@torch.no_grad()
def predict(model: nn.Module, ids, dense, chunk: int = 65536) -> torch.Tensor:
    model.eval()
    out = [model(ids[i : i + chunk], dense[i : i + chunk]) for i in range(0, len(ids), chunk)]
    out = torch.cat(out) if out else torch.empty(0, device=ids.device)  # a rank may get 0 rows
    model.train()
    return out.float()


def evaluate(model: nn.Module, split: tuple, ddp: bool, rank: int, world: int) -> dict:
    """Detail 9: each rank scores a slice; logits are all-gathered for an exact global AUC."""
    ids, dense, y = split
    n = len(y)
    per = -(-n // world)
    lo, hi = min(rank * per, n), min((rank + 1) * per, n)
    logits = predict(model, ids[lo:hi], dense[lo:hi])
    if ddp:
        pad = torch.full((per,), float("nan"), device=logits.device)
        pad[: hi - lo] = logits
        full = torch.empty(world * per, device=logits.device)
        dist.all_gather_into_tensor(full, pad)
        logits = full[:n]
    return {"auc": roc_auc(logits, y), "logloss": log_loss(logits, y)}


# --------------------------------------------------------------------------------------------------
# training run


def setup_runtime(cfg: Config) -> dict:
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, local_rank, world = 0, 0, 1  # --device, --dtype were checked by check_config
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world = int(os.environ["WORLD_SIZE"])
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if use_cuda else "fp32"
    return {"ddp": ddp, "rank": rank, "world": world, "device": device, "dtype": dtype}


def to_device(split: tuple, offsets: torch.Tensor, device) -> tuple:
    # a preprocessed split is a read-only memmap: copy it (torch warns on, and must not write to, read-only memory)
    ids, dense, y = (torch.from_numpy(np.require(a, requirements=["C", "W"])) for a in split)
    return (
        ids.to(device) + offsets.to(device),  # global row ids
        dense.to(device),
        y.float().to(device),
    )


def save_json(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# checkpoints and resume (detail 12)

# what may change between an interrupted run and its --resume: where it writes, how often it logs and
# saves, when it stops, and the machinery it runs on; every other flag defines the run and must stay equal
MAY_DIFFER = (
    "out",
    "resume",
    "log_every",
    "save_every",
    "stop_after_steps",
    "threads",
    "device",
    "compile",
    "save_model",
)
STATE_KEYS = (
    "step",
    "epoch",
    "batch",
    "steps_total",
    "config",
    "dtype",
    "n_train",
    "field_dims",
    "metrics_bytes",
    "train_time_s",
    "wall_s",
    "history",
    "clip_stats",
    "clip_total",
    "files",
)
TRAIN_STATE_KEYS = ("opt_embed", "opt_dense", "scaler", "rng_cpu", "rng_cuda", "perm_gen")
DAMAGED = "the checkpoint is damaged; start the run again without --resume"


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def fsync(path: str) -> None:
    """Force a file or folder to disk: a rename is only as durable as what it names."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out: str, model_state: dict, train_state: dict, state: dict) -> None:
    """Write <out>/ckpt/ as ckpt.tmp/ and rename it into place. At every moment ckpt/, or in the instant
    between the two renames ckpt.old/, is a complete checkpoint (find_checkpoint reads them in that order)."""
    from safetensors.torch import save_file

    final, tmp, old = (os.path.join(out, n) for n in ("ckpt", "ckpt.tmp", "ckpt.old"))
    shutil.rmtree(tmp, ignore_errors=True)  # the half-written one of a killed run
    os.makedirs(tmp)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
    save_file(tensors, os.path.join(tmp, "model.safetensors"))
    torch.save(train_state, os.path.join(tmp, "train_state.pt"))
    # the sizes let --resume name a truncated file before any parser reads it
    files = {n: os.path.getsize(os.path.join(tmp, n)) for n in ("model.safetensors", "train_state.pt")}
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({**state, "files": files}, f, indent=1)
    for name in (*files, "state.json", ""):  # "" = the folder itself
        fsync(os.path.join(tmp, name))
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)  # older than ckpt/, which is complete
        os.replace(final, old)
    os.replace(tmp, final)
    fsync(out)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run: str) -> str:
    """The complete checkpoint of a run folder: ckpt/, or ckpt.old/ if a kill fell between the renames."""
    if not os.path.isdir(run):
        why = "is a file" if os.path.exists(run) else "not found"
        raise InputError(f"--resume {run}: {why}; name the --out folder of the run to continue")
    for name in ("ckpt", "ckpt.old"):
        if os.path.isdir(os.path.join(run, name)):
            return os.path.join(run, name)
    if os.path.isdir(os.path.join(run, "ckpt.tmp")):
        why = "the run was stopped while writing its first checkpoint"
    else:
        why = "a run writes one at every epoch end, every --save_every steps and at --stop_after_steps"
    raise InputError(
        f"--resume {run}: holds no checkpoint ({os.path.join(run, 'ckpt')} not found; {why}); "
        "start the run again without --resume"
    )


def read_checkpoint(ckpt: str, tensors: bool = True) -> dict:
    """state.json, and with `tensors` the model and training state; a damaged file is named in an InputError."""
    path = os.path.join(ckpt, "state.json")
    try:
        state = json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read ({first_line(e)}); {DAMAGED}") from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else ["step"]
    if missing or not isinstance(state["config"], dict) or not isinstance(state["files"], dict):
        raise InputError(f"{path}: field '{(missing or ['config'])[0]}': missing or malformed; {DAMAGED}")
    for name in ("model.safetensors", "train_state.pt"):
        file, size = os.path.join(ckpt, name), state["files"].get(name)
        have = os.path.getsize(file) if os.path.isfile(file) else None
        if have != size:
            what = "missing" if have is None else f"{have} bytes, but {size} were written (truncated or replaced)"
            raise InputError(f"{file}: {what}; {DAMAGED}")
    if not tensors:
        return {"state": state}
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = os.path.join(ckpt, "model.safetensors")
    try:
        model = load_file(file)
    except (OSError, SafetensorError) as e:
        raise InputError(f"{file}: cannot read ({first_line(e)}); {DAMAGED}") from None
    file = os.path.join(ckpt, "train_state.pt")
    try:  # the design's rule for training state: torch.save, loaded with weights_only=True
        train_state = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        # a torch.load of bytes that are no archive blames weights_only; the file is what is wrong
        why = "not a complete torch.save archive" if isinstance(e, pickle.UnpicklingError) else first_line(e)
        raise InputError(f"{file}: cannot read ({why}); {DAMAGED}") from None
    missing = [k for k in TRAIN_STATE_KEYS if k not in train_state] if isinstance(train_state, dict) else ["scaler"]
    if missing:
        raise InputError(f"{file}: entry '{missing[0]}': missing; {DAMAGED}")
    return {"state": state, "model": model, "train": train_state}


def check_same_run(cfg: Config, saved: dict, ckpt: str) -> None:
    """Refuse a --resume whose run-defining settings differ from the interrupted run's; name the first."""
    for f in dataclasses.fields(Config):
        if f.name in MAY_DIFFER or f.name not in saved or getattr(cfg, f.name) == saved[f.name]:
            continue
        mine, theirs = (v if v != "" else repr(v) for v in (getattr(cfg, f.name), saved[f.name]))
        raise InputError(
            f"--{f.name} {mine}: the interrupted run in {os.path.dirname(ckpt)} used {theirs}; "
            "leave the flag out to resume it, or start a new run with another --out"
        )


def resume_config(cfg: Config, given: set[str]) -> Config:
    """--resume: the flags left out take the interrupted run's values; those given must agree with them."""
    ckpt = find_checkpoint(cfg.resume)
    saved = read_checkpoint(ckpt, tensors=False)["state"]["config"]
    names = {f.name for f in dataclasses.fields(Config)}
    keep = {k: v for k, v in saved.items() if k in names and k not in given}
    keep.update(resume=cfg.resume, out=cfg.out if "out" in given else cfg.resume)
    cfg = dataclasses.replace(cfg, **keep)
    check_same_run(cfg, saved, ckpt)
    return cfg


def check_no_unfinished_run(out: str) -> None:
    """A fresh run replaces the checkpoint in --out: refuse while it belongs to a run that can continue."""
    for name in ("ckpt", "ckpt.old"):
        try:
            state = json.loads(Path(out, name, "state.json").read_bytes())
            step, total = int(state["step"]), int(state["steps_total"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if step < total:
            raise InputError(
                f"--out {out}: holds the checkpoint of an unfinished run (step {step} of {total}); "
                f"continue it with --resume {out}, or choose another --out"
            )


def train(
    cfg: Config, data: dict | None = None, rt: dict | None = None, quiet: bool = False, checkpoints: bool = True
) -> dict:
    """One training run; returns the summary dict (also written to <out>/summary.json on rank 0), or
    {"stopped_at_step": ...} after --stop_after_steps. The sweep passes checkpoints=False."""
    rt = rt or setup_runtime(cfg)
    ddp, rank, world, device = rt["ddp"], rt["rank"], rt["world"], rt["device"]
    master = rank == 0
    say = (lambda *a: print(*a, flush=True)) if master and not quiet else (lambda *a: None)
    t_start = time.time()
    ckpt = None
    if cfg.resume:  # detail 12: every rank reads the checkpoint, all of it checked before anything is written
        ckpt_dir = find_checkpoint(cfg.resume)
        ckpt = read_checkpoint(ckpt_dir)
        check_same_run(cfg, ckpt["state"]["config"], ckpt_dir)
        if ckpt["state"]["dtype"] != rt["dtype"]:
            was = ckpt["state"]["dtype"]
            raise InputError(
                f"--dtype {cfg.dtype}: is {rt['dtype']} here, the interrupted run trained in {was}; pass --dtype {was}"
            )
    same_folder = bool(cfg.resume) and os.path.realpath(cfg.out) == os.path.realpath(cfg.resume)
    if checkpoints and not same_folder:
        check_no_unfinished_run(cfg.out)
    if data is None:
        data = make_synthetic(cfg) if cfg.data == "synthetic" else load_preprocessed(cfg.data)
    eval_name = "valid" if "valid" in data else "test"
    for name in [s for s in ("valid", "test") if s in data]:  # one class: AUC is nan, so refuse up front
        y = data[name][2]
        if y.min() == y.max():
            where = f"--n_test {cfg.n_test}" if cfg.data == "synthetic" else os.path.join(cfg.data, f"{name}_label.npy")
            raise InputError(f"{where}: all {len(y)} {name} rows have label {y[0]:g}; AUC needs both classes")
    n_train = len(data["train"][2])
    steps_per_epoch = n_train // cfg.batch_size  # detail 8: drop the last incomplete batch
    if steps_per_epoch == 0:  # checked before anything is written to --out
        raise InputError(f"--batch_size {cfg.batch_size}: exceeds the {n_train} training rows; use a smaller batch")
    if ckpt and (ckpt["state"]["n_train"], ckpt["state"]["field_dims"]) != (n_train, list(data["field_dims"])):
        was = f"{ckpt['state']['n_train']} rows x {len(ckpt['state']['field_dims'])} fields"
        raise InputError(
            f"--data {cfg.data}: {n_train} training rows x {len(data['field_dims'])} fields, the "
            f"interrupted run had {was} (or other vocabularies); resume on the same data"
        )
    torch.manual_seed(cfg.seed)
    mlp = [int(h) for h in cfg.mlp.split(",") if h]
    raw = DeepFM(data["field_dims"], data["n_dense"], cfg.embed_dim, mlp, cfg.init_std).to(device)
    if ckpt:  # before DDP wraps the model (it broadcasts rank 0's weights; every rank loads the same ones)
        own = {k: tuple(v.shape) for k, v in raw.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
        if own != theirs:
            k = next(k for k in sorted(own.keys() | theirs.keys()) if own.get(k) != theirs.get(k))
            raise InputError(
                f"{ckpt_dir}/model.safetensors: tensor '{k}' has shape {theirs.get(k)}, this run "
                f"builds {own.get(k)}; {DAMAGED}"
            )
        raw.load_state_dict(ckpt["model"])
    raw.mlp_dtype = MLP_DTYPES[rt["dtype"]]
    train_split = to_device(data["train"], raw.offsets, device)
    eval_split = to_device(data[eval_name], raw.offsets, device)
    test_split = eval_split if eval_name == "test" else to_device(data["test"], raw.offsets, device)
    hp = scaled_hparams(cfg)
    hp["warmup_steps"] = round(cfg.warmup_epochs * steps_per_epoch)
    hp["steps_per_epoch"] = steps_per_epoch
    if 2 * hp["l2"] >= cfg.cowclip_r and cfg.clip == "code" and cfg.embed_update == "dense":
        say("warning: 2*l2 >= r: the reference would clip absent rows too; we clip present ones only")
    model = raw
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        # detail 14: train_step all-reduces the batch's rows of E and L itself
        names = [n for n, p in model.named_parameters() if any(p is q for q in embedding_params(raw))]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device] if device.type == "cuda" else None,
            broadcast_buffers=False,  # the only buffer (field offsets) is a constant
        )
    opt_e, opt_d = make_optimizers(raw, hp, cfg.embed_update)
    scaler = torch.amp.GradScaler(device.type, enabled=rt["dtype"] == "fp16")
    bayes = None
    if "test_true_logit" in data:  # detail 10: the hidden model's own predictions on the test rows
        tl, ty = torch.from_numpy(data["test_true_logit"]), torch.from_numpy(data["test"][2])
        bayes = {"auc": roc_auc(tl, ty), "logloss": log_loss(tl, ty)}
    total_steps, step, start_epoch, start_batch = cfg.epochs * steps_per_epoch, 0, 0, 0
    train_time, wall_before, history = 0.0, 0.0, []
    gen = torch.Generator().manual_seed(cfg.seed)
    clip_stats, clip_total = [0, 0], [0, 0]
    if ckpt:  # detail 12: continue exactly where the checkpoint was taken
        st, ts = ckpt["state"], ckpt["train"]
        step, start_epoch, start_batch = st["step"], st["epoch"], st["batch"]
        if not (0 <= start_batch < steps_per_epoch and step == start_epoch * steps_per_epoch + start_batch):
            raise InputError(
                f"{ckpt_dir}/state.json: step {step} is not epoch {start_epoch} batch {start_batch} "
                f"of {steps_per_epoch}; {DAMAGED}"
            )
        train_time, wall_before, history = st["train_time_s"], st["wall_s"], st["history"]
        clip_stats, clip_total = st["clip_stats"], st["clip_total"]
        opt_e.load_state_dict(ts["opt_embed"])  # Adam moments and step counts; lrs follow from `step`
        opt_d.load_state_dict(ts["opt_dense"])
        scaler.load_state_dict(ts["scaler"])
        gen.set_state(ts["perm_gen"])  # the state before this epoch's permutation, which is drawn again
        # nothing after the init draws from the global RNGs (no dropout; numpy and random are not used
        # in training), so restoring them only keeps any future use exact
        torch.set_rng_state(ts["rng_cpu"])
        if device.type == "cuda" and ts["rng_cuda"] is not None:
            torch.cuda.set_rng_state(ts["rng_cuda"], device)
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if master:
        os.makedirs(cfg.out, exist_ok=True)
        save_json(
            os.path.join(cfg.out, "config.json"),
            {**dataclasses.asdict(cfg), "derived": hp, "world_size": world, "dtype_resolved": rt["dtype"]},
        )
        if ckpt:  # the rows logged after the checkpoint are logged again below: cut them
            src = os.path.join(cfg.resume, "metrics.jsonl")
            head = Path(src).read_bytes()[: ckpt["state"]["metrics_bytes"]] if os.path.isfile(src) else b""
            Path(metrics_path + ".tmp").write_bytes(head)
            os.replace(metrics_path + ".tmp", metrics_path)
        else:
            open(metrics_path, "w").close()
            if checkpoints:  # a finished run's checkpoint (an unfinished one was refused above)
                for name in ("ckpt", "ckpt.old", "ckpt.tmp"):
                    shutil.rmtree(os.path.join(cfg.out, name), ignore_errors=True)
    say(
        f"data: {n_train:,} train rows, {len(eval_split[2]):,} {eval_name} rows, "
        f"{sum(data['field_dims']):,} embedding rows, {len(data['field_dims'])} fields, "
        f"{data['n_dense']} dense | {world} rank(s) on {device.type}, {rt['dtype']}"
    )
    say(
        f"rule {cfg.scale_rule} @ batch {cfg.batch_size} (s={hp['scale']:g}): "
        f"lr_dense {hp['lr_dense']:.4g} "
        f"lr_embed {hp['lr_embed']:.4g} l2 {hp['l2']:.4g} warmup {hp['warmup_steps']} steps "
        f"({cfg.warmup_epochs:g} epoch) | clip {cfg.clip} r {cfg.cowclip_r:g} "
        f"zeta {cfg.cowclip_zeta:g}"
    )

    if ckpt:
        say(f"resuming {ckpt_dir} at step {step}/{total_steps} (epoch {start_epoch + 1}, batch {start_batch})")

    def log(row: dict) -> None:
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def wall() -> float:  # seconds since the run began, the interrupted part included
        return wall_before + time.time() - t_start

    def checkpoint(epoch: int, batch: int, gen_state: torch.Tensor, trained_s: float) -> float:
        """Detail 12: rank 0 writes <out>/ckpt/; returns the seconds it took (not training time)."""
        if not (master and checkpoints):
            return 0.0
        t = time.time()
        train_state = {
            "opt_embed": opt_e.state_dict(),
            "opt_dense": opt_d.state_dict(),
            "scaler": scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "perm_gen": gen_state,
        }
        state = {
            "step": step,
            "epoch": epoch,  # the epoch to continue, and the next batch within it
            "batch": batch,
            "steps_total": total_steps,
            "config": dataclasses.asdict(cfg),
            "dtype": rt["dtype"],
            "world_size": world,
            "n_train": n_train,
            "field_dims": [int(d) for d in data["field_dims"]],
            "metrics_bytes": os.path.getsize(metrics_path),  # metrics.jsonl up to here belongs to this state
            "train_time_s": trained_s,
            "wall_s": wall(),
            "history": history,
            "clip_stats": clip_stats,  # since the last logged row
            "clip_total": clip_total,
        }
        save_checkpoint(cfg.out, raw.state_dict(), train_state, state)
        return time.time() - t

    per_rank = cfg.batch_size // world
    stop = False
    for epoch in range(start_epoch, cfg.epochs):
        # detail 12: the generator as it was before this epoch's permutation; a resume draws it again
        gen_state = gen.get_state()
        perm = torch.randperm(n_train, generator=gen).to(device)  # same permutation on every rank
        t0 = time.time()
        for i in range(start_batch if epoch == start_epoch else 0, steps_per_epoch):
            # ---- warmup (detail 4)
            if hp["warmup_steps"]:
                frac = min(1.0, step / hp["warmup_steps"])
                for g in opt_d.param_groups:
                    g["lr"] = 1e-8 + (hp["lr_dense"] - 1e-8) * frac
            # ---- this rank's share of the global batch (detail 8)
            idx = perm[i * cfg.batch_size + rank * per_rank : i * cfg.batch_size + (rank + 1) * per_rank]
            batch = tuple(t[idx] for t in train_split)
            # ---- update
            loss, nc, nr = train_step(model, raw, batch, opt_e, opt_d, scaler, hp, cfg, ddp)
            clip_stats[0] += nc
            clip_stats[1] += nr
            clip_total[0] += nc
            clip_total[1] += nr
            step += 1
            # ---- logging
            if step % cfg.log_every == 0 or i == steps_per_epoch - 1:
                if ddp:
                    dist.all_reduce(loss)
                    loss /= world
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = train_time + time.time() - t0
                sps = step * cfg.batch_size / elapsed
                eta = (total_steps - step) * elapsed / step
                frac_clip = clip_stats[0] / max(1, clip_stats[1])
                row = {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "loss": loss.item(),
                    "lr_dense": opt_d.param_groups[0]["lr"],
                    "clip_frac": frac_clip,
                    "samples_per_s": sps,
                    "wall_s": wall(),
                }
                log(row)
                say(
                    f"step {step}/{total_steps} ep {epoch + 1} | loss {row['loss']:.4f} | "
                    f"rows clipped {100 * frac_clip:.2f}% of present | "
                    f"lr_d {row['lr_dense']:.3g} | "
                    f"{sps:,.0f} samples/s "
                    f"| ETA {eta:.0f}s"
                )
                clip_stats = [0, 0]
            # ---- checkpoint (detail 12); one at the last batch of an epoch waits for its evaluation
            stop = step == cfg.stop_after_steps
            if i < steps_per_epoch - 1 and (stop or (cfg.save_every and step % cfg.save_every == 0)):
                t0 += checkpoint(epoch, i + 1, gen_state, train_time + time.time() - t0)
                if stop:
                    break
        train_time += time.time() - t0
        if stop and step % steps_per_epoch:  # stopped inside the epoch, its checkpoint written
            break
        # the unwrapped model: forward passes outside DDP issue no collectives of their own
        metrics = evaluate(raw, eval_split, ddp, rank, world)
        history.append({"epoch": epoch + 1, **metrics})
        log(
            {
                "step": step,
                "epoch": epoch + 1,
                f"{eval_name}_auc": metrics["auc"],
                f"{eval_name}_logloss": metrics["logloss"],
                "wall_s": wall(),
            }
        )
        extra = f" (Bayes-optimal {bayes['auc']:.4f} / {bayes['logloss']:.4f})" if bayes else ""
        say(
            f"epoch {epoch + 1}/{cfg.epochs}: {eval_name} AUC {metrics['auc']:.4f} "
            f"LogLoss {metrics['logloss']:.4f}{extra}"
        )
        checkpoint(epoch + 1, 0, gen.get_state(), train_time)
        if stop:
            break
    if stop:
        say(f"stopped after step {step}/{total_steps} (--stop_after_steps); continue with --resume {cfg.out}")
        return {"stopped_at_step": step, "steps": total_steps}
    final = evaluate(raw, test_split, ddp, rank, world)
    summary = {
        "auc": final["auc"],
        "logloss": final["logloss"],
        "bayes_auc": bayes["auc"] if bayes else None,
        "bayes_logloss": bayes["logloss"] if bayes else None,
        "samples_per_s": total_steps * cfg.batch_size / train_time,
        "train_time_s": train_time,
        "total_time_s": wall(),
        "steps": total_steps,
        "history": history,
        "batch_size": cfg.batch_size,
        "scale_rule": cfg.scale_rule,
        "clip": cfg.clip,
        "hparams": hp,
        "clip_frac": clip_total[0] / max(1, clip_total[1]),  # rows clipped / present rows, whole run
        "world_size": world,
        "device": device.type,
        "dtype": rt["dtype"],
    }
    if master:
        save_json(os.path.join(cfg.out, "summary.json"), summary)
        if cfg.save_model:
            from safetensors.torch import save_file

            tmp = os.path.join(cfg.out, "model.safetensors.tmp")
            save_file({k: v.detach().cpu().contiguous() for k, v in raw.state_dict().items()}, tmp)
            os.replace(tmp, os.path.join(cfg.out, "model.safetensors"))
        vs = f" vs Bayes-optimal {bayes['auc']:.4f}" if bayes else ""
        say(
            f"done: test AUC {final['auc']:.4f}{vs}, LogLoss {final['logloss']:.4f} | "
            f"batch {cfg.batch_size} "
            f"{cfg.scale_rule}/{cfg.clip} | {summary['samples_per_s']:,.0f} samples/s | "
            f"{train_time:.1f}s training, {summary['total_time_s']:.1f}s total -> {cfg.out}"
        )
    return summary


def sweep(cfg: Config) -> list[dict]:
    """CowClip's claim in miniature: the same epochs at 1K..128K, CowClip vs plain scaling rules."""
    rt = setup_runtime(cfg)
    data = make_synthetic(cfg) if cfg.data == "synthetic" else load_preprocessed(cfg.data)
    rows = []
    n_train = len(data["train"][2])
    for rule in cfg.sweep_rules.split(","):
        for b in [int(x) for x in cfg.sweep_batches.split(",")]:
            if b > n_train:
                print(f"skip batch {b}: larger than the {n_train} training rows")
                continue
            run = dataclasses.replace(
                cfg,
                batch_size=b,
                scale_rule=rule,
                sweep=False,
                save_model=False,
                clip=cfg.clip if rule == "cowclip" else "none",
                out=os.path.join(cfg.out, f"{rule}_{b}"),
            )
            s = train(run, data, rt, quiet=True, checkpoints=False)
            rows.append(
                {
                    "rule": rule,
                    "clip": run.clip,
                    "batch_size": b,
                    "steps": s["steps"],
                    "auc": s["auc"],
                    "logloss": s["logloss"],
                    "samples_per_s": s["samples_per_s"],
                    "train_time_s": s["train_time_s"],
                    "bayes_auc": s["bayes_auc"],
                    **{k: s["hparams"][k] for k in ("lr_dense", "lr_embed", "l2")},
                }
            )
            r = rows[-1]
            print(
                f"{rule:8s} {b:7d}: AUC {r['auc']:.4f} LogLoss {r['logloss']:.4f} "
                f"{r['samples_per_s']:,.0f} samples/s {r['train_time_s']:.1f}s",
                flush=True,
            )
    bayes = rows[0]["bayes_auc"] if rows else None
    lines = [
        f"Synthetic data: {n_train:,} train rows, {cfg.epochs} epochs, Bayes-optimal test AUC {bayes:.4f}"
        if bayes
        else f"data {cfg.data}, {cfg.epochs} epochs",
        "",
        ("| rule | clip | batch | steps | lr_dense | lr_embed | L2 | AUC | LogLoss | samples/s | time (s) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rule']} | {r['clip']} | {r['batch_size']} | {r['steps']} | "
            f"{r['lr_dense']:.3g} | "
            f"{r['lr_embed']:.3g} | {r['l2']:.3g} | {r['auc']:.4f} | {r['logloss']:.4f} | "
            f"{r['samples_per_s']:,.0f} | {r['train_time_s']:.1f} |"
        )
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "sweep.md.tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(cfg.out, "sweep.md.tmp"), os.path.join(cfg.out, "sweep.md"))
    save_json(os.path.join(cfg.out, "sweep.json"), rows)
    save_json(os.path.join(cfg.out, "summary.json"), {"sweep": rows})
    print("\n".join(lines))
    best = max(rows, key=lambda r: r["auc"]) if rows else None
    if best:
        print(
            f"sweep done: {len(rows)} runs, best AUC {best['auc']:.4f} "
            f"({best['rule']} @ {best['batch_size']})"
            f" -> {cfg.out}/sweep.md"
        )
    return rows


# --------------------------------------------------------------------------------------------------
# preprocessing of the real data sets (detail 11)

CRITEO_INTS = [f"I{i}" for i in range(1, 14)]
CRITEO_CATS = [f"C{i}" for i in range(1, 27)]
AVAZU_COLUMNS = [
    "id",
    "click",
    "hour",
    "C1",
    "banner_pos",
    "site_id",
    "site_domain",
    "site_category",
    "app_id",
    "app_domain",
    "app_category",
    "device_id",
    "device_ip",
    "device_model",
    "device_type",
    "device_conn_type",
    "C14",
    "C15",
    "C16",
    "C17",
    "C18",
    "C19",
    "C20",
    "C21",
]
CRITEO_COLUMNS = ["label", *CRITEO_INTS, *CRITEO_CATS]
HEX8 = re.compile(r"[0-9a-f]{8}")
INT = re.compile(r"-?[0-9]+")
SKIP_HINT = "pass --skip_bad_rows to skip and count such rows"


def bars_bucket(v: int) -> int:
    """BARS/FuxiCTR Criteo_x4 integer bucketing: floor(ln(v)^2) if v > 2 else v."""
    return math.floor(math.log(v) ** 2) if v > 2 else v


def parse_row(kind: str, fields: list[str], path: str, lineno: int) -> tuple[int, list, list[str]]:
    """Validate one raw row -> (label, dense ints or None for missing, categorical strings)."""

    def bad(msg: str) -> InputError:
        return InputError(f"{path}:{lineno}: {msg}; fix the line, or {SKIP_HINT}")

    columns = CRITEO_COLUMNS if kind == "criteo" else AVAZU_COLUMNS
    if len(fields) != len(columns):
        missing = f"field '{columns[len(fields)]}': missing; " if len(fields) < len(columns) else ""
        sep = "tab" if kind == "criteo" else "comma"
        layout = "label, I1-I13, C1-C26" if kind == "criteo" else f"{','.join(AVAZU_COLUMNS[:3])},..."
        raise bad(f"{missing}expected {len(columns)} {sep}-separated fields ({layout}), got {len(fields)}")
    label = fields[0 if kind == "criteo" else 1]
    if label not in ("0", "1"):  # checked first: the leftmost bad field is the one reported
        raise bad(f"field '{columns[0 if kind == 'criteo' else 1]}': expected 0 or 1, got {label!r}")
    if kind == "criteo":
        ints, cats = fields[1:14], fields[14:]
        dense = []
        for name, v in zip(CRITEO_INTS, ints):
            if v and not INT.fullmatch(v):
                raise bad(f"field '{name}': not an integer: {v!r}")
            dense.append(int(v) if v else None)
        for name, v in zip(CRITEO_CATS, cats):
            if v and not HEX8.fullmatch(v):
                raise bad(f"field '{name}': not an 8-digit lowercase hex id: {v!r}")
        names_cats = cats
    else:
        dense = []
        if not re.fullmatch(r"[0-9]{8}", fields[2]):
            raise bad(f"field 'hour': expected YYMMDDHH, got {fields[2]!r}")
        names_cats = fields[2:]
    return int(label), dense, names_cats


def row_features(kind: str, encoding: str, dense: list, cats: list[str]) -> tuple[list[float], list[str]]:
    """Map a parsed row to (dense floats before scaling, categorical tokens) for one encoding."""
    if encoding == "lbctr":  # reference data_utils.py: missing cats -> "-1", missing ints -> 0
        return [0.0 if v is None else float(v) for v in dense], [c if c else "-1" for c in cats]
    toks = [("" if v is None else str(bars_bucket(v))) for v in dense]  # ints become categoricals
    if kind == "avazu":  # BARS Avazu_x4: hour -> hour of day, weekday, weekend
        h = cats[0]
        day = datetime.date(2000 + int(h[:2]), int(h[2:4]), int(h[4:6])).weekday()
        return [], [h[6:], str(day), str(int(day >= 5))] + cats[1:]
    return [], toks + cats


def open_raw(path: str):
    """The raw file as bytes; gzip and xz are recognised by their magic bytes, whatever the name."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rb")
    if magic == b"\xfd7zXZ\x00":
        return lzma.open(path, "rb")
    return open(path, "rb")


def decode_line(line: bytes, sep: str, columns: list[str], path: str, lineno: int) -> str:
    """UTF-8 text of one line; a bad byte is reported with the field it falls in."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        k = line[: e.start].count(sep.encode())
        field = f"field '{columns[k]}': " if k < len(columns) else ""
        raise InputError(
            f"{path}:{lineno}: {field}byte {line[e.start : e.start + 1]!r} is not UTF-8; "
            f"re-save the file as UTF-8, or {SKIP_HINT}"
        ) from None


def iter_rows(kind: str, path: str, skip_bad: bool, bad_counter: list):
    """Stream (lineno, label, dense, cats) from the raw file; never holds more than one line.
    Accepted as real downloads have them: gzip/xz, CRLF line ends, a UTF-8 BOM, blank lines."""
    # Avazu has no quoted fields, so a plain split is its CSV and keeps line numbers exact
    sep, columns = ("\t", CRITEO_COLUMNS) if kind == "criteo" else (",", AVAZU_COLUMNS)
    header, lineno = kind == "avazu", 0
    try:
        with open_raw(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip(b"\r\n")
                if lineno == 1:
                    line = line.removeprefix(codecs.BOM_UTF8)  # what encoding="utf-8-sig" drops
                if not line:
                    continue
                if header:  # the first line of Avazu's train: checked, never skipped
                    header = False
                    if line.decode("utf-8", "replace").split(sep) != AVAZU_COLUMNS:
                        raise InputError(
                            f"{path}:{lineno}: not the Avazu train header ({','.join(AVAZU_COLUMNS[:4])},...); "
                            "pass the unmodified train file"
                        )
                    continue
                try:
                    row = parse_row(kind, decode_line(line, sep, columns, path, lineno).split(sep), path, lineno)
                except InputError:
                    if not skip_bad:
                        raise
                    bad_counter[0] += 1
                    continue
                yield (lineno, *row)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:  # truncated or corrupt gzip / xz
        # lineno + 1: the line that could not be read (a truncated download ends inside it)
        why = "the file is truncated or corrupt; fetch it again"
        raise InputError(f"{path}:{lineno + 1}: cannot read ({e}); {why}") from None


def check_preprocess_paths(raw: str, data: str) -> None:
    """--raw must be a file. --data is replaced as a whole, so it must be new, empty, or our own
    earlier output (every entry listed in its meta.json): never delete what we did not write."""
    if not os.path.exists(raw):
        raise InputError(f"--raw {raw}: not found; name the raw train file")
    if os.path.isdir(raw):
        raise InputError(f"--raw {raw}: is a folder; name the raw train file inside it")
    folder = Path(data)
    if Path(raw).resolve().is_relative_to(folder.resolve()):
        raise InputError(f"--data {data}: holds --raw {raw}; choose an empty or new --data folder")
    check_output_path("data", data)
    if not folder.is_dir():
        return
    try:
        ours = set(json.loads((folder / "meta.json").read_bytes())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        ours = None
    for p in folder.rglob("*"):
        name = p.relative_to(folder).as_posix()
        if ours is None or name not in ours:
            why = "is not empty" if ours is None else f"holds {name}, which --preprocess did not write"
            raise InputError(f"--data {data}: {why}; choose an empty or new --data folder")


def preprocess(cfg: Config) -> dict:
    """Two streaming passes: raw -> data/{split}_{ids,dense,label}.npy + meta.json + vocab/."""
    kind, enc = cfg.preprocess, cfg.encoding
    check_preprocess_paths(cfg.raw, cfg.data)
    t0 = time.time()
    # ---- pass 1: count every token of every field (and dense min/max); validation happens here
    counts: list[dict] | None = None
    dmin = dmax = None
    bad, n, pos = [0], 0, 0
    for lineno, label, dense, cats in iter_rows(kind, cfg.raw, cfg.skip_bad_rows, bad):
        dvals, toks = row_features(kind, enc, dense, cats)
        if counts is None:
            counts = [{} for _ in toks]
            dmin, dmax = list(dvals), list(dvals)
        for c, t in zip(counts, toks):
            c[t] = c.get(t, 0) + 1
        for j, v in enumerate(dvals):
            dmin[j], dmax[j] = min(dmin[j], v), max(dmax[j], v)
        n, pos = n + 1, pos + label
        if n % 1_000_000 == 0:
            print(f"pass 1: {n:,} rows, {time.time() - t0:.0f}s", flush=True)
    if n == 0:
        skipped = f" ({bad[0]} bad rows skipped)" if bad[0] else ""
        raise InputError(f"{cfg.raw}: no data rows{skipped}; pass the raw train file")
    # ---- vocabularies: lbctr = sklearn LabelEncoder (sorted, all values); bars = OOV 0 + frequent
    if enc == "lbctr":
        vocabs = [sorted(c) for c in counts]
    else:
        vocabs = [["<OOV>"] + sorted(t for t, k in c.items() if k >= cfg.min_count) for c in counts]
    lookup = [{t: i for i, t in enumerate(v)} for v in vocabs]
    del counts
    n_fields, n_dense = len(vocabs), len(dmin)
    if kind == "criteo":
        names = CRITEO_INTS + CRITEO_CATS if enc == "bars" else CRITEO_CATS
    else:
        names = (["hour_of_day", "weekday", "weekend"] if enc == "bars" else ["hour"]) + AVAZU_COLUMNS[3:]
    # ---- fixed-seed split: a permutation assigns rows to test / valid / train
    rng = np.random.default_rng(cfg.split_seed)
    n_test, n_valid = round(cfg.test_frac * n), round(cfg.valid_frac * n)
    which = np.zeros(n, dtype=np.int8)  # 0 train, 1 valid, 2 test
    perm = rng.permutation(n)
    which[perm[:n_test]] = 2
    which[perm[n_test : n_test + n_valid]] = 1
    sizes = {"train": n - n_test - n_valid, "valid": n_valid, "test": n_test}
    if not sizes["train"] or not sizes["test"]:  # training and its final AUC need both
        raise InputError(f"{cfg.raw}: {n} rows split into {sizes}; use more rows or other --test_frac / --valid_frac")
    # ---- pass 2: encode into memory-mapped arrays in a fresh temp folder beside --data, renamed at the end
    data = os.path.abspath(cfg.data)
    os.makedirs(os.path.dirname(data), exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(data)}.tmp", dir=os.path.dirname(data))
    tmp = os.path.join(stage, "new")
    os.makedirs(os.path.join(tmp, "vocab"))
    try:
        arrays = {}
        for split, m in sizes.items():
            if m == 0:
                continue
            arrays[split] = (
                np.lib.format.open_memmap(os.path.join(tmp, f"{split}_ids.npy"), "w+", np.int32, (m, n_fields)),
                np.lib.format.open_memmap(os.path.join(tmp, f"{split}_dense.npy"), "w+", np.float32, (m, n_dense)),
                np.lib.format.open_memmap(os.path.join(tmp, f"{split}_label.npy"), "w+", np.float32, (m,)),
            )
        cursor = {"train": 0, "valid": 0, "test": 0}
        split_names = ["train", "valid", "test"]
        span = [max(hi - lo, 1e-12) for lo, hi in zip(dmin, dmax)]
        bad2, r = [0], 0
        for lineno, label, dense, cats in iter_rows(kind, cfg.raw, cfg.skip_bad_rows, bad2):
            dvals, toks = row_features(kind, enc, dense, cats)
            split = split_names[which[r]]
            ids_a, dense_a, lab_a = arrays[split]
            k = cursor[split]
            ids_a[k] = [lk.get(t, 0) for lk, t in zip(lookup, toks)]  # bars: unseen/rare -> OOV 0
            if n_dense:
                dense_a[k] = [(v - lo) / s for v, lo, s in zip(dvals, dmin, span)]  # MinMaxScaler
            lab_a[k] = label
            cursor[split], r = k + 1, r + 1
            if r % 1_000_000 == 0:
                print(f"pass 2: {r:,}/{n:,} rows, {time.time() - t0:.0f}s", flush=True)
        if r != n:
            raise InputError(f"{cfg.raw}: changed between the two passes ({n} then {r} rows); rerun on a fixed copy")
        for a in arrays.values():
            for x in a:
                x.flush()
        del arrays
        for name, v in zip(names, vocabs):
            with open(os.path.join(tmp, "vocab", f"{name}.txt"), "w") as f:
                f.writelines(t + "\n" for t in v)
        meta = {
            "source": os.path.abspath(cfg.raw),
            "kind": kind,
            "encoding": enc,
            "fields": names,
            "field_dims": [len(v) for v in vocabs],
            "offsets": np.cumsum([0] + [len(v) for v in vocabs[:-1]]).tolist(),
            "n_dense": n_dense,
            "dense_fields": CRITEO_INTS if (kind == "criteo" and enc == "lbctr") else [],
            "dense_min": dmin,
            "dense_max": dmax,
            "min_count": cfg.min_count if enc == "bars" else 1,
            "rows": sizes,
            "positive_rate": pos / n,
            "split_seed": cfg.split_seed,
            "test_frac": cfg.test_frac,
            "valid_frac": cfg.valid_frac,
            "bad_rows_skipped": bad[0],
            # the manifest: a rerun may replace this folder only while it holds nothing else
            "files": sorted(p.relative_to(tmp).as_posix() for p in Path(tmp).rglob("*")) + ["meta.json"],
        }
        save_json(os.path.join(tmp, "meta.json"), meta)
        check_preprocess_paths(cfg.raw, cfg.data)  # again: --data may have changed during the passes
        if os.path.exists(data):
            os.replace(data, os.path.join(stage, "old"))  # our earlier output, deleted with the stage
        os.replace(tmp, data)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(
        f"preprocessed {n:,} rows ({bad[0]} bad rows skipped) -> {cfg.data}: {sizes}, "
        f"{sum(meta['field_dims']):,} embedding rows, {time.time() - t0:.0f}s"
    )
    return meta


def decode_ids(folder: str, ids: np.ndarray) -> list[list[str]]:
    """Inverse of the categorical encoding: per-field ids (N, F) -> tokens, via the vocab files."""
    meta = json.loads(Path(folder, "meta.json").read_text())
    vocabs = [Path(folder, "vocab", f"{n}.txt").read_text().split("\n")[:-1] for n in meta["fields"]]
    return [[vocabs[f][int(i)] for f, i in enumerate(row)] for row in ids]


def decode_dense(meta: dict, dense: np.ndarray) -> np.ndarray:
    """Inverse MinMax: scaled dense (N, n_dense) -> raw values (missing were filled with 0)."""
    lo, hi = np.array(meta["dense_min"]), np.array(meta["dense_max"])
    return dense * np.maximum(hi - lo, 1e-12) + lo


# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None, given_only: bool = False) -> Config | dict:
    """The Config of a command line; with `given_only`, just {flag: value} of the flags it names."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])

    def fail(message: str):  # argparse's own errors (a bad int, an unknown flag) take the same one-line path
        raise InputError(f"{message}; see --help")

    p.error = fail
    for f in dataclasses.fields(Config):
        default = argparse.SUPPRESS if given_only else f.default
        if f.type in ("bool", bool):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(f"--{f.name}", type=typ, default=default)
    args = vars(p.parse_args(argv))
    return args if given_only else Config(**args)


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse_args(argv)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        check_config(cfg, world)
        if cfg.resume:  # detail 12: flags left out come from the checkpoint; check the merged settings again
            cfg = resume_config(cfg, set(parse_args(argv, given_only=True)))
            check_config(cfg, world)
        if cfg.preprocess:
            preprocess(cfg)
        elif cfg.sweep:
            sweep(cfg)
        else:
            train(cfg)
    except InputError as e:  # the one place an input error becomes a message; bugs keep their traceback
        if int(os.environ.get("RANK", "0")) == 0:  # every rank sees the same input: one line, not WORLD_SIZE
            print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
