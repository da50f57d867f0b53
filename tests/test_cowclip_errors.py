"""Faults in what a user hands cowclip_ctr.py. Each bad flag, raw file or data folder ends the run with exit
code 2, exactly one stderr line naming the flag or the file, line and field, no traceback, and the folder
tree exactly as it was (nothing written, nothing lost). What real downloads contain (blank lines, a BOM,
CRLF, gzip, xz) gives the same preprocessed folder as the clean file."""

import gzip
import json
import lzma
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

torch.set_num_threads(1)  # the suite shares 2 cores with other scripts' tests

HEX = ["68fd1e64", "80e26c9b", "0a519c5c"]
ROWS = [  # 40 Criteo rows: label, I1..I13, C1..C26, with missing values; both labels in every split
    [str(i % 2)]
    + [str((7 * i + j) % 50) if (i + j) % 5 else "" for j in range(13)]
    + [HEX[(i + j) % 3] if (i * j) % 7 else "" for j in range(26)]
    for i in range(40)
]
LINES = ["\t".join(r).encode() for r in ROWS]


def with_field(lineno: int, k: int, value: bytes) -> list[bytes]:
    """LINES with field k of line `lineno` (1-based) replaced by `value`."""
    fields = LINES[lineno - 1].split(b"\t")
    fields[k] = value
    return LINES[: lineno - 1] + [b"\t".join(fields)] + LINES[lineno:]


def raw(t: Path, lines: list[bytes], name: str = "train.txt", opener=open, end: bytes = b"\n") -> str:
    t.joinpath(name).parent.mkdir(parents=True, exist_ok=True)
    with opener(t / name, "wb") as f:
        f.write(b"".join(line + end for line in lines))
    return str(t / name)


def pre(t: Path, raw_path: str, *extra: str, data: str = "out") -> list[str]:
    return ["--preprocess", "criteo", "--raw", raw_path, "--data", str(t / data), "--test_frac", "0.25", *extra]


def prepared(t: Path, lines: list[bytes] = LINES) -> str:
    """A --preprocess folder t/data built from `lines` (the raw file is removed again)."""
    path = raw(t, lines, "raw.txt")
    cc.preprocess(cc.Config(preprocess="criteo", raw=path, data=str(t / "data"), test_frac=0.25))
    os.remove(path)
    return str(t / "data")


def run(t: Path, *extra: str) -> list[str]:
    return ["--out", str(t / "out"), *extra]


def cut(path) -> str:
    """Truncate a file to half its size, as an interrupted download or copy leaves it."""
    Path(path).write_bytes(Path(path).read_bytes()[: Path(path).stat().st_size // 2])
    return str(path)


def cli(argv: list, capsys) -> tuple[int, str]:
    """main(argv) in-process -> (exit code, stderr); the subprocess test below shows it is the same."""
    try:
        cc.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def tree(t: Path) -> dict:
    return {p.relative_to(t).as_posix(): p.read_bytes() if p.is_file() else None for p in t.rglob("*")}


def data_not_ours(t: Path) -> list[str]:
    raw(t, [b"my notes"], "out/notes.txt")
    return pre(t, raw(t, LINES))


def data_ours_plus_a_user_file(t: Path) -> list[str]:
    prepared(t)
    raw(t, [b"my notes"], "data/notes.txt")
    return pre(t, raw(t, LINES), data="data")


def data_is_a_file(t: Path) -> list[str]:
    raw(t, LINES, "out")
    return pre(t, raw(t, LINES))


def meta_corrupt(t: Path) -> list[str]:
    cut(Path(prepared(t), "meta.json"))
    return run(t, "--data", t / "data")


def npy_truncated(t: Path) -> list[str]:
    cut(Path(prepared(t), "train_ids.npy"))
    return run(t, "--data", t / "data")


# (id, setup: tmp folder -> argv, the texts the error line must contain)
FAULTS = [
    # ---- flags
    ("batch_size_0", lambda t: run(t, "--batch_size", "0"), ["--batch_size 0: must be a positive integer"]),
    ("lr_dense_negative", lambda t: run(t, "--base_lr_dense=-8e-4"), ["--base_lr_dense -0.0008: must be a positive"]),
    ("lr_embed_zero", lambda t: run(t, "--base_lr_embed", "0"), ["--base_lr_embed 0.0: must be a positive"]),
    ("lr_nan", lambda t: run(t, "--base_lr_dense", "nan"), ["--base_lr_dense nan"]),
    ("l2_negative", lambda t: run(t, "--base_l2=-1e-5"), ["--base_l2 -1e-05: must be a non-negative"]),
    ("epochs_0", lambda t: run(t, "--epochs", "0"), ["--epochs 0: must be a positive integer"]),
    ("scale_rule_unknown", lambda t: run(t, "--scale_rule", "cubic"), ["--scale_rule cubic", "cowclip|sqrt"]),
    ("clip_unknown", lambda t: run(t, "--clip", "foo"), ["--clip foo", "code|paper|none"]),
    ("dtype_unknown", lambda t: run(t, "--dtype", "fp8"), ["--dtype fp8"]),
    ("mlp_not_ints", lambda t: run(t, "--mlp", "16,x"), ["--mlp 16,x"]),
    ("sweep_rule_unknown", lambda t: run(t, "--sweep", "--sweep_rules", "cowclip,bogus"), ["--sweep_rules"]),
    ("batch_not_an_int", lambda t: run(t, "--batch_size", "x"), ["--batch_size", "invalid int value"]),
    ("unknown_flag", lambda t: run(t, "--bach_size", "8"), ["unrecognized arguments: --bach_size"]),
    ("batch_vs_world", lambda t: run(t, "--batch_size", "1023"), ["--batch_size 1023", "WORLD_SIZE 2"]),
    ("out_is_a_file", lambda t: ["--out", raw(t, LINES, "out")], ["--out", "is an existing file"]),
    ("out_below_a_file", lambda t: ["--out", raw(t, LINES, "f") + "/run"], ["--out", "is an existing file"]),
    # ---- raw files
    ("columns", lambda t: pre(t, raw(t, LINES[:2] + [b"1\t5"] + LINES[3:])), ["train.txt:3: field 'I2': missing"]),
    ("label", lambda t: pre(t, raw(t, with_field(4, 0, b"yes"))), ["train.txt:4: field 'label'", "0 or 1"]),
    ("dense", lambda t: pre(t, raw(t, with_field(5, 5, b"2.5"))), ["train.txt:5: field 'I5'", "not an integer"]),
    ("not_utf8", lambda t: pre(t, raw(t, with_field(6, 15, b"68fd\xff1e6"))), ["train.txt:6: field 'C2'", "UTF-8"]),
    ("gz_truncated", lambda t: pre(t, cut(raw(t, LINES, "train.txt.gz", gzip.open))),
     ["train.txt.gz:", "truncated or corrupt"]),
    ("xz_truncated", lambda t: pre(t, cut(raw(t, LINES, "train.txt.xz", lzma.open))),
     ["train.txt.xz:", "truncated or corrupt"]),
    ("raw_is_a_folder", lambda t: pre(t, str(t)), ["--raw", "is a folder"]),
    ("raw_missing", lambda t: pre(t, str(t / "nope.txt")), ["--raw", "nope.txt: not found"]),
    ("raw_not_given", lambda t: pre(t, ""), ["--raw '': --preprocess needs the raw file"]),
    ("raw_empty", lambda t: pre(t, raw(t, [])), ["train.txt: no data rows"]),
    ("raw_only_blank_lines", lambda t: pre(t, raw(t, [b"", b"\r"])), ["train.txt: no data rows"]),
    ("no_test_rows", lambda t: pre(t, raw(t, LINES[:2])), ["train.txt: 2 rows split into", "--test_frac"]),
    ("avazu_header", lambda t: ["--preprocess", "avazu", "--raw", raw(t, [b"id,click"]), "--data", t / "out"],
     ["train.txt:1: not the Avazu train header"]),
    # ---- the --data folder of --preprocess: never delete what we did not write
    ("data_holds_raw", lambda t: pre(t, raw(t, LINES, "out/train.txt")), ["--data", "holds --raw", "empty or new"]),
    ("raw_below_data", lambda t: pre(t, raw(t, LINES, "out/criteo/train.txt")), ["--data", "holds --raw"]),
    ("data_not_ours", data_not_ours, ["--data", "is not empty", "choose an empty or new --data folder"]),
    ("data_ours_plus_a_user_file", data_ours_plus_a_user_file, ["--data", "holds notes.txt, which --preprocess"]),
    ("data_is_a_file", data_is_a_file, ["--data", "is an existing file"]),
    # ---- preprocessed folders given to training
    ("no_meta", lambda t: run(t, "--data", t), ["meta.json: not found", "--preprocess"]),
    ("meta_corrupt", meta_corrupt, ["meta.json:", "not valid JSON"]),
    ("npy_truncated", npy_truncated, ["train_ids.npy: cannot read"]),
    ("one_class_test", lambda t: run(t, "--data", prepared(t, [b"1" + line[1:] for line in LINES])),
     ["test_label.npy: all 10 test rows have label 1"]),
    ("batch_exceeds_rows", lambda t: run(t, "--data", prepared(t)), ["--batch_size 1024: exceeds the 30"]),
]


@pytest.mark.parametrize("case,setup,must_name", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_exits_2_with_one_line_and_changes_nothing(tmp_path, capsys, monkeypatch, case, setup, must_name):
    if case == "batch_vs_world":
        monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the check runs before any process group
    argv = setup(tmp_path)
    before = tree(tmp_path)
    code, err = cli(argv, capsys)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("cowclip_ctr.py: error: "), err
    assert all(m in lines[0] for m in must_name), lines[0]
    assert "Traceback" not in err
    assert tree(tmp_path) == before  # nothing half-written (no temp folder either), nothing removed


def test_preprocess_never_deletes_the_folder_holding_raw(tmp_path):
    """The reported data loss, through the real CLI: --data is the folder that holds --raw."""
    path = raw(tmp_path, LINES, "criteo/train.txt")
    argv = ["--preprocess", "criteo", "--raw", path, "--data", str(tmp_path / "criteo")]
    r = subprocess.run([sys.executable, "cowclip_ctr.py", *argv], check=False, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "choose an empty or new --data folder" in r.stderr
    assert Path(path).read_bytes() == b"".join(line + b"\n" for line in LINES)
    assert os.listdir(tmp_path / "criteo") == ["train.txt"]


@pytest.mark.parametrize("argv", ["--batch_size 0", "--bach_size 8", "--data {t}"])
def test_subprocess_gives_the_same_line_as_main(tmp_path, capsys, argv):
    argv = argv.format(t=tmp_path).split() + ["--out", str(tmp_path / "out")]
    r = subprocess.run([sys.executable, "cowclip_ctr.py", *argv], check=False, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert (r.returncode, r.stderr) == cli(argv, capsys) and "Traceback" not in r.stderr


def test_a_bug_of_ours_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(cfg):
        raise KeyError("field_dims")  # as a real bug would: not an InputError, so not turned into a line

    monkeypatch.setattr(cc, "preprocess", broken)
    with pytest.raises(KeyError):
        cc.main(pre(tmp_path, raw(tmp_path, LINES)))


def same_folder(a: Path, b: Path) -> None:
    """Every array and vocabulary file equal; meta.json equal but for the source path."""
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*"))
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*"))
    for name in names:
        if name.endswith(".npy"):
            assert np.array_equal(np.load(a / name), np.load(b / name)), name
        elif name.endswith(".txt"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    assert {**ma, "source": ""} == {**mb, "source": ""}


ACCEPTED = {  # what real downloads contain -> the clean file's result
    "blank_lines": lambda t: raw(t, LINES[:5] + [b""] + LINES[5:] + [b"", b""]),
    "bom": lambda t: raw(t, [b"\xef\xbb\xbf" + LINES[0]] + LINES[1:]),
    "crlf": lambda t: raw(t, LINES, end=b"\r\n"),
    "gz": lambda t: raw(t, LINES, "train.txt.gz", gzip.open),
    "xz": lambda t: raw(t, LINES, "train.txt.xz", lzma.open),
    "gz_bom_crlf_blank": lambda t: raw(t, [b"\xef\xbb\xbf" + LINES[0]] + LINES[1:] + [b""], "t.gz", gzip.open,
                                       b"\r\n"),
}


@pytest.mark.parametrize("make", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_real_file_variants_preprocess_like_the_clean_file(tmp_path, capsys, make):
    assert cli(pre(tmp_path, raw(tmp_path, LINES, "clean.txt"), data="ref"), capsys) == (0, "")
    assert cli(pre(tmp_path, make(tmp_path)), capsys) == (0, "")
    same_folder(tmp_path / "ref", tmp_path / "out")


def test_previous_output_of_ours_is_replaced(tmp_path, capsys):
    path = raw(tmp_path, LINES)
    assert cli(pre(tmp_path, path, "--valid_frac", "0.25"), capsys) == (0, "")
    assert (tmp_path / "out/valid_ids.npy").exists()
    assert cli(pre(tmp_path, path), capsys) == (0, "")  # over our own output: replaced, valid split gone
    assert cli(pre(tmp_path, path, data="ref"), capsys) == (0, "")
    same_folder(tmp_path / "ref", tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out", "ref", "train.txt"]  # no temp folder left beside it


def test_training_on_a_preprocessed_folder_runs(tmp_path, capsys):
    argv = run(tmp_path, "--data", prepared(tmp_path), "--batch_size", "10", "--mlp", "4", "--epochs", "1")
    assert cli(argv, capsys) == (0, "")
    assert (tmp_path / "out/summary.json").exists()
