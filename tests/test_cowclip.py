"""Tests for cowclip_ctr.py: each checks a property against an independent reference
(hand-computed values, naive loops, brute-force definitions, the reference README table) or a
consistency identity."""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cowclip_ctr as cc  # noqa: E402

SCRIPT = os.path.join(ROOT, "cowclip_ctr.py")
torch.set_num_threads(1)  # the suite shares 2 cores with other scripts' tests


def _row_table(norms_w: list[float], dim: int = 10) -> torch.Tensor:
    """A (V, dim) table whose row k has norm norms_w[k] (direction e_0 + e_1)."""
    w = torch.zeros(len(norms_w), dim, dtype=torch.float64)
    for k, n in enumerate(norms_w):
        w[k, :2] = n / math.sqrt(2)
    return w


# ------------------------------------------------------------------------------------- CowClip


def test_cowclip_scales_row_exactly_to_threshold():
    w = _row_table([5.0, 1.0])
    g = torch.zeros_like(w)
    g[0, 3] = 100.0  # ||g|| = 100 > t = 1 * 1 * max(5, sqrt(10)*1e-5) = 5
    n_clip, n_rows = cc.cowclip_(w, g, torch.tensor([0]), r=1.0, zeta=1e-5, mode="code")
    assert (n_clip, n_rows) == (1, 1)
    assert g[0].norm().item() == pytest.approx(5.0, rel=1e-12)
    assert g[0, 3].item() == pytest.approx(5.0, rel=1e-12)  # direction kept: only coordinate 3


def test_cowclip_leaves_rows_below_threshold_unchanged():
    w = _row_table([5.0])
    g = torch.zeros_like(w)
    g[0, :] = 4.9 / math.sqrt(10)  # ||g|| = 4.9 < 5
    before = g.clone()
    n_clip, _ = cc.cowclip_(w, g, torch.tensor([0]), r=1.0, zeta=1e-5, mode="code")
    assert n_clip == 0 and torch.equal(g, before)


def test_cowclip_count_multiplies_threshold():
    for c in (1, 2, 3, 7):
        w = _row_table([0.5])
        g = torch.zeros_like(w)
        g[0, 0] = 50.0
        cc.cowclip_(w, g, torch.tensor([0] * c), r=1.0, zeta=1e-5, mode="code")
        assert g[0].norm().item() == pytest.approx(0.5 * c, rel=1e-12)


def test_cowclip_code_and_paper_floors_differ_as_documented():
    # zero-norm row, r = 2: code t = r*c*max(0, r*sqrt(d)*zeta) = 4*sqrt(10)*zeta; paper t = zeta
    r, zeta = 2.0, 1e-3
    for mode, expected in (("code", r * r * math.sqrt(10) * zeta), ("paper", zeta)):
        w = _row_table([0.0])
        g = torch.zeros_like(w)
        g[0, 0] = 1.0
        cc.cowclip_(w, g, torch.tensor([0]), r=r, zeta=zeta, mode=mode)
        assert g[0].norm().item() == pytest.approx(expected, rel=1e-12), mode
    # a non-zero row with r = 2: code t = r*||w|| (r outside the max gives the same here)
    w, g = _row_table([3.0]), torch.zeros(1, 10, dtype=torch.float64)
    g[0, 0] = 100.0
    cc.cowclip_(w, g, torch.tensor([0]), r=r, zeta=zeta, mode="code")
    assert g[0].norm().item() == pytest.approx(6.0, rel=1e-12)


def test_cowclip_absent_rows_untouched_in_code_mode_zeroed_in_paper_mode():
    torch.manual_seed(0)
    w = torch.randn(6, 10, dtype=torch.float64) * 1e-3
    g0 = torch.randn(6, 10, dtype=torch.float64)  # every present row is far above its threshold
    ids = torch.tensor([1, 4, 4])
    g = g0.clone()
    cc.cowclip_(w, g, ids, 1.0, 1e-5, "code")
    absent = [0, 2, 3, 5]
    assert torch.equal(g[absent], g0[absent])
    assert not torch.equal(g[[1, 4]], g0[[1, 4]])
    g = g0.clone()
    cc.cowclip_(w, g, ids, 1.0, 1e-5, "paper")
    assert torch.equal(g[absent], torch.zeros(4, 10, dtype=torch.float64))


def test_concatenated_table_clipping_equals_per_field_clipping():
    # reference: clip.py clips each field's own table with that field's unique ids/counts (loops)
    torch.manual_seed(1)
    dims, d, B = [5, 3, 8, 2], 10, 32
    tables = [torch.randn(n, d, dtype=torch.float64) * 0.05 for n in dims]
    grads = [torch.randn(n, d, dtype=torch.float64) * 0.3 for n in dims]
    ids = torch.stack([torch.randint(0, n, (B,)) for n in dims], 1)  # (B, F) per-field ids
    r, zeta = 1.0, 1e-2
    ref = []
    for f, (w, g) in enumerate(zip(tables, grads)):
        g = g.clone()
        col = ids[:, f].tolist()
        for k in set(col):
            t = r * col.count(k) * max(w[k].norm().item(), r * math.sqrt(d) * zeta)
            n = g[k].norm().item()
            g[k] *= min(1.0, t / n)
        ref.append(g)
    offsets = torch.tensor(np.cumsum([0] + dims[:-1]))
    g_cat = torch.cat(grads).clone()
    n_clip, n_rows = cc.cowclip_(torch.cat(tables), g_cat, ids + offsets, r, zeta, "code")
    assert 0 < n_clip < n_rows  # the crafted case exercises both branches
    torch.testing.assert_close(g_cat, torch.cat(ref), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------- mod


def test_fm_term_equals_explicit_pairwise_sum():
    torch.manual_seed(2)
    e = torch.randn(4, 6, 10, dtype=torch.float64)
    ref = torch.stack(
        [sum((e[b, i] * e[b, j]).sum() for i, j in itertools.combinations(range(6), 2)) for b in range(4)]
    )
    torch.testing.assert_close(cc.fm_term(e), ref)


def test_roc_auc_equals_brute_force_pairwise_definition_with_ties():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, 300).astype(np.float64)  # heavy ties
    labels = (rng.random(300) < 0.3).astype(np.float64)
    pos, neg = scores[labels == 1], scores[labels == 0]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert cc.roc_auc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(brute, abs=1e-12)
    assert cc.roc_auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == 0.5


def test_log_loss_matches_definition():
    z, y = torch.tensor([0.3, -2.0, 4.0]), torch.tensor([1.0, 0.0, 0.0])
    p = torch.sigmoid(z.double())
    ref = -(y * p.log() + (1 - y) * (1 - p).log()).mean().item()
    assert cc.log_loss(z, y) == pytest.approx(ref, rel=1e-12)


# ---------------------------------------------------------------------------------------------- sca


@pytest.mark.parametrize(
    "batch,lr,l2",
    [  # bytedance/LargeBatchCTR README, Criteo rows
        (2048, 11.31e-4, 2e-5),
        (4096, 16e-4, 4e-5),
        (8192, 22.62e-4, 8e-5),
        (16384, 32e-4, 16e-5),
        (32768, 45.25e-4, 32e-5),
        (65536, 64e-4, 64e-5),
        (131072, 90.50e-4, 128e-5),
    ],
)
def test_cowclip_scaling_rule_reproduces_reference_criteo_table(batch, lr, l2):
    hp = cc.scaled_hparams(cc.Config(), batch)
    assert hp["lr_dense"] == pytest.approx(lr, rel=5e-4)  # the table rounds to 4 digits
    assert hp["l2"] == pytest.approx(l2, rel=1e-12)
    assert hp["lr_embed"] == 1e-4 and hp["warmup_epochs"] == 1.0


def test_plain_scaling_rules():
    hp = cc.scaled_hparams(cc.Config(scale_rule="linear"), 8192)
    assert (hp["lr_dense"], hp["lr_embed"], hp["l2"]) == pytest.approx((64e-4, 8e-4, 1e-5))
    hp = cc.scaled_hparams(cc.Config(scale_rule="none"), 8192)
    assert (hp["lr_dense"], hp["lr_embed"], hp["l2"]) == (8e-4, 1e-4, 1e-5)


# ---------------------------------------------------------------------------------------------- pre

CRITEO_ROWS = [  # label, I1..I13, C1..C26; missing values in both kinds of fields
    ["1", "5", "-1", "", "3", "2000", "", "7", "1", "40", "", "1", "", "8"] + ["68fd1e64"] * 26,
    ["0", "", "0", "12", "", "30", "4", "", "0", "2", "1", "", "3", ""] + ["80e26c9b"] * 25 + [""],
    ["0", "1", "100", "1", "9", "", "1", "2", "3", "4", "1", "2", "", "5"] + ["68fd1e64"] * 20 + [""] * 6,
    ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14"] + ["0a519c5c"] * 26,
] * 5  # 20 rows


def _write(path, rows, sep="\t", header=None):
    with open(path, "w") as f:
        if header:
            f.write(header + "\n")
        f.writelines(sep.join(r) + "\n" for r in rows)
    return str(path)


def _pre(tmp_path, raw, kind="criteo", **kw):
    out = str(tmp_path / f"enc_{kind}_{kw.get('encoding', 'lbctr')}")
    cfg = cc.Config(preprocess=kind, raw=raw, data=out, test_frac=0.25, **kw)
    return cc.preprocess(cfg), out


@pytest.mark.parametrize(
    "bad,msg",
    [
        (["1", "5"], "field 'I2': missing; expected 40 tab-separated fields"),
        (CRITEO_ROWS[0][:3] + ["x7"] + CRITEO_ROWS[0][4:], "field 'I3': not an integer: 'x7'"),
        (CRITEO_ROWS[0][:20] + ["68FD1G64"] + CRITEO_ROWS[0][21:], "field 'C7': not an 8-digit lowercase hex"),
        (["2"] + CRITEO_ROWS[0][1:], "field 'label': expected 0 or 1"),
    ],
)
def test_preprocess_bad_row_fails_with_file_line_field_and_writes_nothing(tmp_path, bad, msg):
    raw = _write(tmp_path / "train.txt", CRITEO_ROWS[:7] + [bad] + CRITEO_ROWS[7:])
    with pytest.raises(cc.InputError, match=rf"train\.txt:8: {msg}"):
        _pre(tmp_path, raw)
    assert os.listdir(tmp_path) == ["train.txt"]  # nothing half-written


def test_preprocess_bad_row_cli_exits_2_with_one_line(tmp_path, capsys):
    bad = CRITEO_ROWS[0][:3] + ["x7"] + CRITEO_ROWS[0][4:]
    raw = _write(tmp_path / "train.txt", CRITEO_ROWS[:7] + [bad] + CRITEO_ROWS[7:])
    with pytest.raises(SystemExit) as e:
        cc.main(["--preprocess", "criteo", "--raw", raw, "--data", str(tmp_path / "x")])
    msg = capsys.readouterr().err
    assert e.value.code == 2 and msg.count("\n") == 1
    assert "train.txt:8: field 'I3'" in msg and "--skip_bad_rows" in msg
    assert not (tmp_path / "x").exists()


def test_preprocess_criteo_lbctr_fixture_and_round_trip(tmp_path):
    bad = CRITEO_ROWS[0][:3] + ["x7"] + CRITEO_ROWS[0][4:]
    raw = _write(tmp_path / "train.txt", CRITEO_ROWS[:7] + [bad] + CRITEO_ROWS[7:])
    meta, out = _pre(tmp_path, raw, skip_bad_rows=True)
    assert meta["bad_rows_skipped"] == 1 and meta["rows"] == {"train": 15, "valid": 0, "test": 5}
    # reference encoding: LabelEncoder over all rows, missing -> "-1" (sorted: "-1" < hex digits)
    assert meta["n_dense"] == 13 and len(meta["field_dims"]) == 26
    assert meta["field_dims"][25] == 3  # C26 sees "-1" (missing), 0a519c5c, 68fd1e64
    ids = np.concatenate([np.load(f"{out}/train_ids.npy"), np.load(f"{out}/test_ids.npy")])
    dense = np.concatenate([np.load(f"{out}/train_dense.npy"), np.load(f"{out}/test_dense.npy")])
    labels = np.concatenate([np.load(f"{out}/train_label.npy"), np.load(f"{out}/test_label.npy")])
    assert dense.min() >= 0 and dense.max() <= 1  # MinMax to [0, 1]
    # round trip: decoded rows are exactly the raw rows (missing -> "-1" / 0), as a multiset
    toks = cc.decode_ids(out, ids)
    raw_dense = cc.decode_dense(meta, dense.astype(np.float64))
    got = sorted((int(lab), tuple(np.rint(rd).astype(int)), tuple(t)) for lab, rd, t in zip(labels, raw_dense, toks))
    want = sorted(
        (int(r[0]), tuple(int(v) if v else 0 for v in r[1:14]), tuple(c if c else "-1" for c in r[14:]))
        for r in CRITEO_ROWS
    )
    assert got == want
    assert np.abs(raw_dense - np.rint(raw_dense)).max() < 1e-3
    # the split is a fixed-seed permutation: same seed, same files
    cfg = cc.Config(preprocess="criteo", raw=raw, data=str(tmp_path / "again"), test_frac=0.25, skip_bad_rows=True)
    cc.preprocess(cfg)
    assert np.array_equal(np.load(f"{out}/test_ids.npy"), np.load(str(tmp_path / "again/test_ids.npy")))


def test_preprocess_criteo_bars_buckets_and_oov(tmp_path):
    raw = _write(tmp_path / "train.txt", CRITEO_ROWS)
    meta, out = _pre(tmp_path, raw, encoding="bars", min_count=6, valid_frac=0.25)
    assert meta["n_dense"] == 0 and len(meta["field_dims"]) == 39  # ints became categoricals
    assert meta["rows"] == {"train": 10, "valid": 5, "test": 5}
    assert [cc.bars_bucket(v) for v in (-1, 0, 2, 3, 100, 2000)] == [-1, 0, 2, 1, 21, 57]

    # independent reference: bucket with the formula by hand, count over all rows, rare -> "<OOV>"
    def bucket(v):
        return "" if v == "" else str(int(math.log(int(v)) ** 2) if int(v) > 2 else int(v))

    want_rows = [[bucket(v) for v in r[1:14]] + r[14:] for r in CRITEO_ROWS]
    counts = [{} for _ in range(39)]
    for row in want_rows:
        for f, t in enumerate(row):
            counts[f][t] = counts[f].get(t, 0) + 1
    want = sorted(tuple(t if counts[f][t] >= 6 else "<OOV>" for f, t in enumerate(row)) for row in want_rows)
    ids = np.concatenate([np.load(f"{out}/{s}_ids.npy") for s in ("train", "valid", "test")])
    assert sorted(tuple(r) for r in cc.decode_ids(out, ids)) == want
    assert 0 < (ids == 0).mean() < 1  # both OOV and kept values occur
    assert Path(f"{out}/vocab/C26.txt").read_text().split("\n")[:-1] == ["<OOV>", ""]  # only missing is frequent


def test_preprocess_avazu_csv(tmp_path):
    header = ",".join(cc.AVAZU_COLUMNS)
    rows = [[str(i), str(i % 2), f"141021{i % 24:02d}"] + [f"v{i % 3}"] * 21 for i in range(12)]
    raw = _write(tmp_path / "train", rows, sep=",", header=header)
    meta, out = _pre(tmp_path, raw, kind="avazu")
    assert meta["fields"][0] == "hour" and len(meta["field_dims"]) == 22 and meta["n_dense"] == 0
    toks = cc.decode_ids(out, np.load(f"{out}/train_ids.npy"))
    assert all(t[0].startswith("141021") and t[1] in ("v0", "v1", "v2") for t in toks)
    meta, out = _pre(tmp_path, raw, kind="avazu", encoding="bars", min_count=1)
    assert meta["fields"][:3] == ["hour_of_day", "weekday", "weekend"]  # 2014-10-21 is a Tuesday
    assert Path(f"{out}/vocab/weekday.txt").read_text().split() == ["<OOV>", "1"]
    bad = _write(tmp_path / "bad", rows[:3] + [rows[3][:5]], sep=",", header=header)
    with pytest.raises(cc.InputError, match=r"bad:5: field 'site_id': missing; expected 24 comma-separated fields"):
        _pre(tmp_path, bad, kind="avazu")


# ---------------------------------------------------------------------------------------------- tra


def _tiny_args(out, *extra):
    return [
        "--n_train",
        "4096",
        "--n_test",
        "2048",
        "--synth_vocab",
        "600",
        "--mlp",
        "16,16",
        "--epochs",
        "2",
        "--batch_size",
        "512",
        "--init_std",
        "1e-4",
        "--threads",
        "1",
        "--log_every",
        "4",
        "--out",
        str(out),
        *extra,
    ]


def test_ddp_two_ranks_equal_one_rank(tmp_path, capsys):
    """torchrun, gloo, 2 ranks x 256 rows == 1 rank x 512 rows: same weights, clipping active."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = ("--cowclip_r", "0.05", "--n_train", "2048")  # small r: many rows clipped, so the test bites
    cc.main(_tiny_args(tmp_path / "one", *extra))  # the 1-rank reference, in-process (saves a startup)
    one_stdout = capsys.readouterr().out
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            SCRIPT,
            *_tiny_args(tmp_path / "two", *extra),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert two.returncode == 0, two.stderr
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / "one/model.safetensors")), load_file(str(tmp_path / "two/model.safetensors")))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    s1 = json.loads(Path(tmp_path / "one/summary.json").read_text())
    s2 = json.loads(Path(tmp_path / "two/summary.json").read_text())
    assert s1["clip_frac"] > 0.01 and s1["clip_frac"] == pytest.approx(s2["clip_frac"], rel=1e-6)
    assert s2["world_size"] == 2 and s1["auc"] == pytest.approx(s2["auc"], abs=1e-4)
    # the run contract: config.json, metrics.jsonl, summary.json, a one-line summary printed last
    cfg = json.loads(Path(tmp_path / "one/config.json").read_text())
    assert cfg["derived"]["lr_dense"] == pytest.approx(8e-4 * math.sqrt(0.5))  # printed and saved
    rows = [json.loads(x) for x in Path(tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    assert any("test_auc" in r for r in rows) and any("clip_frac" in r for r in rows)
    assert one_stdout.strip().splitlines()[-1].startswith("done: test AUC")


def _one_step_grads(dtype: str, scaler_scale: float = 2.0**16):
    cfg = cc.Config(n_train=512, n_test=64, synth_vocab=300, mlp="16", init_std=1e-4)
    data = cc.make_synthetic(cfg)
    torch.manual_seed(0)
    m = cc.DeepFM(data["field_dims"], 13, 10, [16], 1e-4)
    m.mlp_dtype = cc.MLP_DTYPES[dtype]
    batch = cc.to_device(data["train"], m.offsets, "cpu")
    hp = {**cc.scaled_hparams(cfg), "warmup_steps": 0}
    oe, od = cc.make_optimizers(m, hp)
    scaler = torch.amp.GradScaler("cpu", init_scale=scaler_scale, enabled=dtype == "fp16")
    loss, n_clip, n_rows = cc.train_step(m, m, batch, oe, od, scaler, hp, cfg, ddp=False)
    return loss, n_clip, n_rows, m.embed.weight.grad.clone()


def test_bf16_and_fp16_run_on_cpu_and_fp16_unscales_before_clipping():
    loss32, c32, r32, g32 = _one_step_grads("fp32")
    assert 0 < c32 < r32  # clipping active (tiny init), not for all rows
    loss16, c16, _, g16 = _one_step_grads("fp16")
    lossbf, _, _, gbf = _one_step_grads("bf16")
    assert torch.isfinite(lossbf) and torch.isfinite(gbf).all()
    assert lossbf.item() == pytest.approx(loss32.item(), rel=1e-2)  # the MLP in bf16: ~3 significant digits
    assert ((gbf - g32).norm() / g32.norm()).item() < 2e-2  # and the table gradient it sends back, too
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-2)
    # had clipping seen the 65536x-scaled gradient, clipped rows would end ~65536x too small
    rows = g32.norm(dim=1) > 0
    ratio = g16[rows].norm(dim=1) / g32[rows].norm(dim=1)
    assert ratio.min() > 0.9 and ratio.max() < 1.1 and c16 == pytest.approx(c32, abs=2)


def test_sweep_writes_table(tmp_path):
    cfg = cc.parse_args(
        _tiny_args(
            tmp_path / "sw", "--sweep", "--sweep_batches", "512,1024", "--sweep_rules", "cowclip,sqrt", "--epochs", "1"
        )
    )
    rows = cc.sweep(cfg)
    assert [(r["rule"], r["clip"], r["batch_size"]) for r in rows] == [
        ("cowclip", "code", 512),
        ("cowclip", "code", 1024),
        ("sqrt", "none", 512),
        ("sqrt", "none", 1024),
    ]
    table = Path(tmp_path / "sw/sweep.md").read_text()
    assert table.count("\n| ") == 5 and "samples/s" in table


def test_learning_reaches_bayes_auc_within_001(tmp_path):
    """Short run on small synthetic data (1K ids): AUC within 0.01 of the hidden model's AUC."""
    cfg = cc.Config(
        synth_vocab=1000,
        n_train=100_000,
        n_test=50_000,
        mlp="64,64",
        epochs=2,
        base_lr_embed=1e-3,
        base_lr_dense=2e-3,
        threads=1,
        log_every=10_000,
        save_model=False,
        out=str(tmp_path),
    )
    s = cc.train(cfg, quiet=True)
    assert s["bayes_auc"] > 0.75
    assert s["auc"] > s["bayes_auc"] - 0.01, (s["auc"], s["bayes_auc"])
