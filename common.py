"""Script plumbing shared by pretrain.py, reward_model.py, ppo_rlhf.py and evaluate.py (model.py is the model).

Input errors, in one mechanism: anything wrong with what the user gave (a flag, a file, a checkpoint) raises
`InputError` with a message that names the file, line and field (`path:12: field 'chosen': ...; what to do`).
Each script's entry point is `cli(main)`, the one place that turns it into

    script.py: error: <path>:<line>: field '<name>': <what is wrong; what to do>

on stderr and exit code 2, with no traceback. Any other exception is a bug of ours and keeps its traceback.
Output folders are made through `output_dir`; when a run that made one ends in an input error, `cli` removes it
again, so a refused run leaves nothing half-written (a folder that existed before the run is never removed).

Readers accept what real files contain: .gz / .xz, a UTF-8 BOM, CRLF line ends, blank lines.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """A problem with the user's input (flag, file, checkpoint), reported as one line; never a bug of ours."""


_made_dirs: list[Path] = []  # output folders this process created (removed again if the run is refused)


def output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create an output folder (and its parents). A path naming an existing file is an input error."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{flag} {p}: is an existing file, not a folder; choose another {flag}")
    if not p.exists():
        top = p
        while not top.parent.exists():  # the outermost folder this call creates
            top = top.parent
        p.mkdir(parents=True, exist_ok=True)
        _made_dirs.append(top)
    return p


def check_output_path(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse an output folder that names an existing file, before any work is done."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{flag} {p}: is an existing file, not a folder; choose another {flag}")


def cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> Any:
    """Run `main(argv)`; an InputError becomes one line on stderr and exit code 2 (see the module docstring)."""
    _made_dirs.clear()
    try:
        return main(argv)
    except InputError as e:
        for d in reversed(_made_dirs):  # made by this run, so ours to remove
            shutil.rmtree(d, ignore_errors=True)
        prog = Path(getattr(sys.modules.get(main.__module__), "__file__", None) or sys.argv[0]).name
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        _made_dirs.clear()


# ----------------------------------------------------------------------------------------------------------------
# Reading real files


def _open_binary(p: Path):
    if p.suffix == ".gz":
        return gzip.open(p, "rb")
    if p.suffix == ".xz":
        return lzma.open(p, "rb")
    return open(p, "rb")


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, line without its line end) of a text file, plain, .gz or .xz; a UTF-8 BOM is dropped.
    A missing file, a folder, a truncated archive or bytes that are not UTF-8 raise InputError naming the file
    (and the line)."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p}: is a folder; expected a file")
    if not p.is_file():
        raise InputError(f"{p}: file not found")
    i = 0
    try:
        with _open_binary(p) as f:
            for i, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(f"{p}:{i}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                     f"{e.start + 1}); convert the file to UTF-8") from None
                if i == 1:
                    line = line.removeprefix("\ufeff")
                yield i, line.rstrip("\r\n")
    except (EOFError, OSError, lzma.LZMAError, zlib.error) as e:
        raise InputError(f"{p}:{i + 1}: cannot read: the archive is truncated or corrupt ({e})") from None


def read_text(path: str | os.PathLike) -> str:
    """A whole text file (plain, .gz or .xz) with the checks of `text_lines`; line ends become \\n."""
    return "".join(line + "\n" for _, line in text_lines(path))


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, row) for every non-blank line of a JSONL(.gz/.xz) file; problems raise InputError naming
    the file and line."""
    rows = []
    for i, line in text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append((i, row))
    return rows


def field_of(row: dict, name: str, where: str, kind: type | tuple[type, ...] = str, hint: str = "") -> Any:
    """row[name], checked: a missing field and a field of the wrong type are told apart."""
    if name not in row:
        raise InputError(f"{where}: field '{name}' missing" + (f" ({hint})" if hint else ""))
    v = row[name]
    if not isinstance(v, kind) or (kind in (int, float) and isinstance(v, bool)):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise InputError(f"{where}: field '{name}' must be {names}, got {type(v).__name__} {v!r:.40}")
    return v


def load_train_state(path: str | os.PathLike, hint: str = "start the run again") -> dict:
    """Resume state written with torch.save (optimizer, scaler, RNG, step), read with weights_only=True: tensors
    and plain containers only, never arbitrary pickles. A truncated or corrupt file is an input error."""
    import torch
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: training state missing; {hint}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # the zip reader's own message, without its traceback
        raise InputError(f"{p}: cannot read the training state ({str(e).splitlines()[0]}); the file is truncated "
                         f"or corrupt: {hint}") from None


def check_settings(cfg: Any, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                   fraction: tuple[str, ...] = ()) -> None:
    """Settings checked before anything is written: `positive` > 0, `non_negative` >= 0, `fraction` in [0, 1]."""
    for name in positive:
        v = getattr(cfg, name)
        if v is not None and not v > 0:
            raise InputError(f"--{name} {v}: must be > 0")
    for name in non_negative:
        v = getattr(cfg, name)
        if v is not None and not v >= 0:
            raise InputError(f"--{name} {v}: must be >= 0")
    for name in fraction:
        v = getattr(cfg, name)
        if not 0 <= v <= 1:
            raise InputError(f"--{name} {v}: must be between 0 and 1")
