"""Exact resume of cowclip_ctr.py: a run stopped (by --stop_after_steps or kill -9) and continued with --resume
ends with the same weights, bit for bit, the same AUC and the same metrics.jsonl rows as a run that was never
interrupted (CPU, fp32, one thread); a damaged, mismatched or missing checkpoint is refused with one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cowclip_ctr as cc  # noqa: E402

torch.set_num_threads(1)  # the suite shares 2 cores with other scripts' tests

# 64 steps of 64 rows over 2 epochs; warmup (48 steps) reaches into epoch 2, so a resume must restore its
# position; a small r keeps CowClip clipping a few % of the rows, and a larger lr_embed makes every step count
RUN = ("--n_train 2048 --n_test 512 --synth_vocab 300 --mlp 16 --batch_size 64 --epochs 2 --threads 1 "
       "--log_every 4 --cowclip_r 0.05 --base_lr_embed 1e-3 --warmup_epochs 1.5").split()


def cli(argv: list, capsys, stdout: list | None = None) -> tuple[int, str]:
    """main(argv) in-process -> (exit code, stderr); its stdout lines are appended to `stdout`."""
    try:
        cc.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    (stdout if stdout is not None else []).extend(out.splitlines())
    return code, err


def weights(out: Path) -> dict:
    return load_file(str(out / "model.safetensors"))


def rows(out: Path) -> list[dict]:
    """metrics.jsonl without the timing fields, which differ between any two runs."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in ("wall_s", "samples_per_s")} for x in lines]


def same(a, b) -> bool:
    """Exact equality of nested dicts / lists of tensors and numbers (torch.save'd training state)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def assert_same_run(out: Path, ref: Path) -> None:
    a, b = weights(out), weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ"
    # the last checkpoint (end of epoch 2): both Adams (moments, step counts, lrs) and the GradScaler as well
    sa, sb = (torch.load(p / "ckpt/train_state.pt", weights_only=True) for p in (out, ref))
    for k in ("opt_embed", "opt_dense", "scaler", "perm_gen"):
        assert same(sa[k], sb[k]), k
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (out, ref))
    assert (sa["auc"], sa["logloss"], sa["history"], sa["clip_frac"]) == (
        sb["auc"], sb["logloss"], sb["history"], sb["clip_frac"])
    assert rows(out) == rows(ref)  # every row once: none lost, none repeated after the checkpoint


def tree(t: Path) -> dict:
    return {p.relative_to(t).as_posix(): p.read_bytes() if p.is_file() else None for p in t.rglob("*")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    cc.main([*RUN, "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 64 and summary["clip_frac"] > 0.01  # the test bites: clipping is active
    return out


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A run stopped after step 5 (epoch 1), to be copied and damaged by the refusal tests."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    cc.main([*RUN, "--out", str(out), "--stop_after_steps", "5"])
    return out


# 45: inside epoch 2, during the warmup; 32: the last batch of epoch 1, whose checkpoint follows its evaluation
@pytest.mark.parametrize("stop", [45, 32])
def test_resume_equals_uninterrupted_run(tmp_path, capsys, reference, stop):
    out, printed = tmp_path / "run", []
    assert cli([*RUN, "--out", out, "--stop_after_steps", stop], capsys, printed) == (0, "")
    assert printed[-1] == f"stopped after step {stop}/64 (--stop_after_steps); continue with --resume {out}"
    state = json.loads((out / "ckpt/state.json").read_text())
    assert state["step"] == stop and not (out / "summary.json").exists()
    assert rows(out) == [r for r in rows(reference) if r["step"] <= stop]  # the log so far, nothing more
    assert cli(["--resume", out], capsys) == (0, "")  # the other flags come from the checkpoint
    assert_same_run(out, reference)


def test_fp16_resume_continues_the_grad_scaler(tmp_path, capsys):
    """fp16 (CPU autocast works too): the GradScaler's scale and growth count carry over the interruption."""
    fp16 = [*RUN, "--dtype", "fp16", "--epochs", "1"]
    assert cli([*fp16, "--out", tmp_path / "ref"], capsys) == (0, "")
    assert cli([*fp16, "--out", tmp_path / "run", "--stop_after_steps", "20"], capsys) == (0, "")
    assert cli(["--resume", tmp_path / "run"], capsys) == (0, "")
    assert_same_run(tmp_path / "run", tmp_path / "ref")
    scaler = torch.load(tmp_path / "run/ckpt/train_state.pt", weights_only=True)["scaler"]
    assert scaler["_growth_tracker"] == 32  # steps since the last change of scale: all 32, not 32 - 20


def test_kill_9_leaves_a_loadable_checkpoint_and_resume_finishes(tmp_path, reference):
    out = tmp_path / "run"
    argv = [sys.executable, "cowclip_ctr.py", *RUN, "--out", str(out), "--save_every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not (out / "ckpt").exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        # a checkpoint is written after every step (~60 more to go), so the kill lands inside the run: most
        # likely while one is being written, else between the renames or between steps
        child.send_signal(signal.SIGKILL)  # os.kill(pid, SIGKILL), but never a reused pid once it exited
    finally:
        child.kill()
        _, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, err.decode()
    assert not (out / "summary.json").exists()
    ckpt = cc.find_checkpoint(str(out))  # ckpt/, or ckpt.old/ when the kill fell between the two renames
    assert 1 <= cc.read_checkpoint(ckpt)["state"]["step"] < 64
    r = subprocess.run([*argv, "--resume", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert sorted(os.listdir(out / "ckpt")) == ["model.safetensors", "state.json", "train_state.pt"]
    assert not any(p.name.startswith("ckpt.") for p in out.iterdir())  # no temp or old folder left behind
    assert_same_run(out, reference)


def test_checkpoint_left_between_the_two_renames_is_used(tmp_path, capsys, stopped, reference):
    """The instant a kill leaves no ckpt/: the previous checkpoint as ckpt.old/ and a half-written ckpt.tmp/,
    with metrics.jsonl rows logged after that checkpoint, the last one torn."""
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    os.rename(out / "ckpt", out / "ckpt.old")
    (out / "ckpt.tmp").mkdir()
    (out / "ckpt.tmp/model.safetensors").write_bytes(b"\0" * 10)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "loss": 0.5}\n{"step": 12, "lo')
    assert cli(["--resume", out], capsys) == (0, "")
    assert_same_run(out, reference)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt")) == ["ckpt"]


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:
    path.write_bytes(b"x" * path.stat().st_size)  # the right size, unreadable


# (id, damage done to a copy of the stopped run t/run, extra flags, texts the one error line must contain)
REFUSALS = [
    ("truncated_weights", lambda t: cut(t / "run/ckpt/model.safetensors"), [],
     ["run/ckpt/model.safetensors: ", "bytes, but", "truncated", "start the run again without --resume"]),
    ("truncated_train_state", lambda t: cut(t / "run/ckpt/train_state.pt"), [],
     ["run/ckpt/train_state.pt: ", "truncated"]),
    ("truncated_state_json", lambda t: cut(t / "run/ckpt/state.json"), [], ["run/ckpt/state.json: cannot read"]),
    ("garbled_weights", lambda t: garble(t / "run/ckpt/model.safetensors"), [],
     ["run/ckpt/model.safetensors: cannot read"]),
    ("garbled_train_state", lambda t: garble(t / "run/ckpt/train_state.pt"), [],
     ["run/ckpt/train_state.pt: cannot read"]),
    ("missing_train_state", lambda t: os.remove(t / "run/ckpt/train_state.pt"), [],
     ["run/ckpt/train_state.pt: missing"]),
    ("batch_size_differs", lambda t: None, ["--batch_size", "128"],
     ["--batch_size 128: the interrupted run in", "used 64", "leave the flag out"]),
    ("first_differing_flag", lambda t: None, [*RUN, "--seed", "7", "--clip", "none"], ["--clip none:", "used code"]),
    ("dtype_differs", lambda t: None, ["--dtype", "bf16"], ["--dtype bf16: the interrupted run", "used auto"]),
    ("no_checkpoint", lambda t: shutil.rmtree(t / "run/ckpt"), [], ["--resume", "run: holds no checkpoint"]),
    ("only_a_half_written_one", lambda t: os.rename(t / "run/ckpt", t / "run/ckpt.tmp"), [],
     ["holds no checkpoint", "stopped while writing its first checkpoint"]),
    ("not_a_folder", lambda t: shutil.rmtree(t / "run"), [], ["--resume", "run: not found"]),
]


@pytest.mark.parametrize("case,damage,extra,must_name", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_resume_refuses_with_one_line_and_changes_nothing(tmp_path, capsys, stopped, case, damage, extra,
                                                           must_name):
    shutil.copytree(stopped, tmp_path / "run")
    damage(tmp_path)
    before = tree(tmp_path)
    code, err = cli(["--resume", tmp_path / "run", *extra], capsys)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("cowclip_ctr.py: error: "), err
    assert all(m in lines[0] for m in must_name), lines[0]
    assert "Traceback" not in err and tree(tmp_path) == before
    if case == "first_differing_flag":  # --seed 7 differs too, but --clip comes first among the flags
        assert "--seed" not in lines[0]


def test_fresh_run_refuses_to_replace_an_unfinished_checkpoint(tmp_path, capsys, stopped):
    shutil.copytree(stopped, tmp_path / "run")
    before = tree(tmp_path)
    code, err = cli([*RUN, "--out", tmp_path / "run"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "holds the checkpoint of an unfinished run (step 5 of 64)" in err and "--resume" in err
    assert tree(tmp_path) == before


def test_sweep_refuses_stop_and_resume(tmp_path, capsys):
    code, err = cli(["--sweep", "--stop_after_steps", "3", "--out", tmp_path / "sw"], capsys)
    assert code == 2 and "--stop_after_steps 3: a sweep writes no checkpoints" in err
    code, err = cli(["--sweep", "--resume", tmp_path, "--out", tmp_path / "sw"], capsys)
    assert code == 2 and "drop --preprocess / --sweep" in err
    assert not (tmp_path / "sw").exists()
