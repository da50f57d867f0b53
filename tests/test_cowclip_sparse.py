"""`--embed_update sparse` of cowclip_ctr.py (detail 13): lazy L2 and a lazy embedding Adam on the rows present
in the batch. When every row is present at every step it must equal the reference's dense path (whole-table L2
and Adam), clipping included; otherwise rows absent from a step keep their weights and both Adam moments."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cowclip_ctr as cc  # noqa: E402

SCRIPT = os.path.join(ROOT, "cowclip_ctr.py")
torch.set_num_threads(1)  # the suite shares 2 cores with other scripts' tests

# a large L2 and a small CowClip r, so that both the lazy L2 and the clipping change the result if they are wrong
HP = {"lr_embed": 1e-2, "lr_dense": 1e-3, "l2": 1e-2, "warmup_steps": 0}


def _model(field_dims: list[int], embed_update: str) -> tuple:
    torch.manual_seed(0)
    m = cc.DeepFM(field_dims, 3, 4, [8], init_std=0.1)
    opt_e, opt_d = cc.make_optimizers(m, HP, embed_update)
    return m, opt_e, opt_d


def _batches(field_dims: list[int], n_steps: int, rows: int, cover_all: bool) -> list[tuple]:
    """Offset-id batches; with `cover_all` every id of every field appears in every batch."""
    g = torch.Generator().manual_seed(1)
    offsets = torch.tensor([sum(field_dims[:f]) for f in range(len(field_dims))], dtype=torch.int32)
    out = []
    for _ in range(n_steps):
        if cover_all:  # column f cycles through all its ids, shuffled per step
            cols = [torch.arange(rows)[torch.randperm(rows, generator=g)] % d for d in field_dims]
        else:  # only ids 0..d/2 of each field: the upper half is absent
            cols = [torch.randint(0, max(1, d // 2), (rows,), generator=g) for d in field_dims]
        ids = torch.stack(cols, 1).to(torch.int32) + offsets
        out.append((ids, torch.rand(rows, 3, generator=g), (torch.rand(rows, generator=g) < 0.3).float()))
    return out


def _run(embed_update: str, batches: list, field_dims: list[int], clip: str = "code") -> tuple:
    cfg = cc.Config(embed_update=embed_update, clip=clip, cowclip_r=0.05)
    m, opt_e, opt_d = _model(field_dims, embed_update)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    clipped = [cc.train_step(m, m, b, opt_e, opt_d, scaler, HP, cfg, ddp=False)[1:] for b in batches]
    return m, opt_e, clipped


@pytest.mark.parametrize("clip", ["code", "paper", "none"])
def test_sparse_equals_dense_when_every_row_is_present(clip):
    dims = [3, 2, 5]
    batches = _batches(dims, n_steps=6, rows=40, cover_all=True)
    (md, oe_d, cd), (ms, oe_s, cs) = _run("dense", batches, dims, clip), _run("sparse", batches, dims, clip)
    assert cd == cs  # the same (rows clipped, rows present) at every step
    if clip != "none":
        assert sum(c for c, _ in cd) > 0  # clipping active, so the test covers it
    for (k, a), b in zip(md.state_dict().items(), ms.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    for p_d, p_s in zip(cc.embedding_params(md), cc.embedding_params(ms)):  # both Adam moments, too
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(oe_d.state[p_d][key], oe_s.state[p_s][key], rtol=1e-5, atol=1e-9, msg=key)
        assert float(oe_d.state[p_d]["step"]) == float(oe_s.state[p_s]["step"]) == 6


def test_sparse_leaves_absent_rows_untouched_and_dense_moves_them():
    dims = [6, 4, 10]
    batches = _batches(dims, n_steps=3, rows=32, cover_all=False)
    present = torch.unique(torch.cat([b[0].flatten() for b in batches]))
    absent = torch.tensor(sorted(set(range(sum(dims))) - set(present.tolist())))
    assert len(absent) >= 8
    m0, _, _ = _model(dims, "sparse")  # the initial weights (same seed)
    for mode, moved in (("sparse", False), ("dense", True)):
        m, opt_e, _ = _run(mode, batches, dims)
        for p, p0 in zip(cc.embedding_params(m), cc.embedding_params(m0)):
            # L starts at 0, and in the dense path its absent rows stay 0 (L2 of 0, Adam of 0): compare E only
            if p.shape[1] > 1:
                assert torch.equal(p[absent], p0[absent]) != moved, mode
            if mode == "sparse":
                assert torch.equal(p[absent], p0[absent])
                assert not torch.equal(p[present], p0[present])
                for key in ("exp_avg", "exp_avg_sq"):
                    assert torch.count_nonzero(opt_e.state[p][key][absent]) == 0, key


def test_sparse_fp16_unscales_before_l2_and_clipping():
    """The GradScaler unscales the sparse row gradients (detail 7) before lazy L2 and CowClip see them."""
    dims = [3, 2, 5]
    (b,) = _batches(dims, n_steps=1, rows=40, cover_all=True)
    grads = {}
    for dtype in ("fp32", "fp16"):
        cfg = cc.Config(embed_update="sparse", cowclip_r=0.05)
        m, opt_e, opt_d = _model(dims, "sparse")
        m.mlp_dtype = torch.float16 if dtype == "fp16" else None
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=dtype == "fp16")
        cc.train_step(m, m, b, opt_e, opt_d, scaler, HP, cfg, ddp=False)
        grads[dtype] = m.embed.weight.grad.to_dense()
    rows = grads["fp32"].norm(dim=1) > 0
    ratio = grads["fp16"][rows].norm(dim=1) / grads["fp32"][rows].norm(dim=1)
    assert ratio.min() > 0.97 and ratio.max() < 1.03


def test_sparse_run_resumes_exactly(tmp_path):
    """A sparse run stopped mid-epoch and resumed ends bit-identical to the uninterrupted one (LazyAdam state)."""
    run = ("--n_train 1024 --n_test 256 --synth_vocab 300 --mlp 8 --batch_size 64 --epochs 1 --threads 1 "
           "--log_every 4 --cowclip_r 0.05 --embed_update sparse").split()
    cc.main([*run, "--out", str(tmp_path / "ref")])
    cc.main([*run, "--out", str(tmp_path / "run"), "--stop_after_steps", "7"])
    cc.main(["--resume", str(tmp_path / "run")])
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / p / "model.safetensors")) for p in ("ref", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    s = json.loads((tmp_path / "run/summary.json").read_text())
    assert s["clip_frac"] > 0 and s["auc"] == json.loads((tmp_path / "ref/summary.json").read_text())["auc"]


@pytest.mark.slow
def test_sparse_ddp_two_ranks_equal_one_rank(tmp_path):
    """torchrun, gloo: the row all-reduce and the global unique ids give 2 ranks the 1-rank weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = ("--n_train 2048 --n_test 512 --synth_vocab 600 --mlp 16,16 --batch_size 512 --epochs 2 --threads 1 "
           "--init_std 1e-4 --cowclip_r 0.05 --embed_update sparse").split()
    cc.main([*run, "--out", str(tmp_path / "one")])
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT]
    two = subprocess.run([*launch, *run, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / p / "model.safetensors")) for p in ("one", "two"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    s1, s2 = (json.loads(Path(tmp_path / p / "summary.json").read_text()) for p in ("one", "two"))
    assert s1["clip_frac"] > 0.01 and s1["clip_frac"] == pytest.approx(s2["clip_frac"], rel=1e-6)
