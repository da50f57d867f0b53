"""Script plumbing shared by pretrain.py, reward_model.py, ppo_rlhf.py and evaluate.py; model.py is the model.

Flags from a config dataclass, input errors, reading and writing real files, torchrun / device / dtype set-up,
data parallelism (DDP, or FSDP2 for models that do not fit one device), the learning-rate schedule, FLOP counting
for honest MFU lines, rank-0 logging and progress lines, and the toy lexicon match.

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

import argparse
import contextlib
import dataclasses
import gzip
import json
import lzma
import math
import os
import re
import shutil
import sys
import tempfile
import time
import typing
import zlib
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# ----------------------------------------------------------------------------------------------------------------
# Flags: one per config field


def add_config_args(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One flag per dataclass field, same name (underscores kept): `--kl_coef 0.1`, `--compile/--no-compile`.

    List fields accumulate: `--model a=X --model b=Y` and `--model a=X b=Y` both give [a=X, b=Y]; given at all,
    they replace the default. "none" means None only for optional numbers (`--max_steps none`); a text field
    keeps the text "none"."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        typ = hints[f.name]
        args = typing.get_args(typ)
        optional = type(None) in args
        if optional:
            typ = next(a for a in args if a is not type(None))
        if typ is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default)
        elif typ is list or typing.get_origin(typ) is list:
            elem = (typing.get_args(typ) or (str,))[0]
            # default None, filled in parse_config: argparse's "extend" would otherwise add to the default list
            parser.add_argument(f"--{f.name}", action="extend", nargs="+", type=elem, default=None,
                                help=f"(repeatable; default {default})")
        elif typ in (int, float):
            parser.add_argument(f"--{f.name}", type=_none_or(typ) if optional else typ, default=default)
        else:
            parser.add_argument(f"--{f.name}", type=str, default=default)


def _none_or(conv):
    def parse(s: str):
        return None if s.lower() in ("none", "null") else conv(s)
    parse.__name__ = conv.__name__  # argparse names the type in its error message
    return parse


def parse_config(config_cls: type, argv: list[str] | None = None, description: str | None = None):
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_args(parser, config_cls)
    values = vars(parser.parse_args(argv))
    for f in dataclasses.fields(config_cls):
        if values[f.name] is None and f.default_factory is not dataclasses.MISSING:  # a list not given
            values[f.name] = f.default_factory()
    return config_cls(**values)


# ----------------------------------------------------------------------------------------------------------------
# Input errors and output folders


class InputError(ValueError):
    """A problem with the user's input (flag, file, checkpoint), reported as one line; never a bug of ours."""


_made_dirs: list[Path] = []  # output folders this process created (removed again if the run is refused)


def output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create an output folder (and its parents). A path naming an existing file is an input error."""
    check_output_path(path, flag)
    p = Path(path)
    if not p.exists():
        top = p
        while not top.parent.exists():  # the outermost folder this call creates
            top = top.parent
        p.mkdir(parents=True, exist_ok=True)
        _made_dirs.append(top)
    return p


def check_output_path(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse, before any work is done, an output folder that names an existing file or lies below one."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                where = "is" if q == p else f"lies below {q}, which is"
                raise InputError(f"{flag} {p}: {where} an existing file, not a folder; choose another {flag}")
            return


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


# ----------------------------------------------------------------------------------------------------------------
# Writing files: atomic, so a kill at any moment leaves the previous version intact


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


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


class JsonlLogger:
    """Appends one JSON object per line (metrics.jsonl); only the main rank should create one."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a")

    def log(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()


# ----------------------------------------------------------------------------------------------------------------
# torchrun, device and dtype


@dataclass
class DistInfo:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; nccl on CUDA, gloo on CPU (so 2-rank DDP runs on a laptop)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 1:
        return DistInfo(False, 0, 0, 1)
    import torch.distributed as dist
    rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(True, rank, local, world)


def cleanup_distributed() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device_dtype(device: str = "auto", dtype: str = "auto",
                         local_rank: int = 0) -> tuple[torch.device, torch.dtype]:
    """auto = bf16 on GPUs that support it, fp16 (+ GradScaler) on older GPUs, fp32 on CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda: CUDA is not available on this machine (use --device auto or cpu)")
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype == "auto":
        if dev.type == "cuda":
            return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return dev, torch.float32
    if dtype not in names:
        raise InputError(f"--dtype {dtype}: must be auto|fp32|bf16|fp16")
    return dev, names[dtype]


def autocast_ctx(device: torch.device, dtype: torch.dtype):
    """Autocast for matmuls in bf16/fp16; norms, RoPE, softmax of losses stay fp32 inside the model."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Data parallelism: DDP (a full copy per rank) or FSDP2 (parameters, gradients and optimizer state sharded)
#
# DDP is faster while a model fits one device; FSDP2 (`torch.distributed.fsdp.fully_shard`, as torchtitan uses it)
# shards each decoder layer and the root, so a rank holds 1/N of the fp32 master weights, gradients and AdamW
# state and all-gathers one layer's parameters at a time. Both run one code path below; a single process is plain.


def parallelize(model: torch.nn.Module, dist_info: DistInfo, device: torch.device, dtype: torch.dtype,
                fsdp: bool, grad_ckpt: bool = False, trainable: bool = True) -> torch.nn.Module:
    """The module to call in training: DDP-wrapped, FSDP2-sharded in place, or `model` itself (one process, or a
    frozen model under DDP). Under FSDP2 with bf16/fp16 the MixedPrecisionPolicy computes in that dtype and
    reduces gradients in fp32; the sharded parameters stay fp32 (the master weights the optimizer updates)."""
    for m in model.modules():
        if grad_ckpt and hasattr(m, "gradient_checkpointing"):  # model.MistralModel
            m.gradient_checkpointing = True
    if not dist_info.ddp:
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        low = dtype in (torch.bfloat16, torch.float16)
        mp = MixedPrecisionPolicy(param_dtype=dtype if low else None, reduce_dtype=torch.float32 if low else None)
        for name, m in model.named_modules():  # each decoder layer (model.layers.N, rm.model.layers.N, ...)
            if re.fullmatch(r"(.*\.)?layers\.\d+", name):
                fully_shard(m, mp_policy=mp)
        fully_shard(model, mp_policy=mp)  # the root: embeddings, final norm, LM or score head
        return model
    if not trainable:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def unsharded(model: torch.nn.Module):
    """Gather an FSDP2 model's full parameters once and keep them for the block (generation: hundreds of small
    forwards, each of which would otherwise all-gather every layer again), then shard it back. Outside FSDP2 a
    no-op. Inside the block forwards are local, so ranks may run different numbers of them."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield model
        return
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def gradient_sync(model: torch.nn.Module, sync: bool):
    """Context for one micro-step: on non-final steps of gradient accumulation skip the gradient reduction (DDP's
    no_sync, FSDP2's set_requires_gradient_sync(False)); the final step reduces the accumulated sum once."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    if isinstance(model, DDP) and not sync:
        return model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
    return nullcontext()


def clip_grad_norm(params, max_norm: float) -> float:
    """Global gradient-norm clipping; under FSDP2 the norm is reduced over the shards of every rank."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, gathered from the shards under FSDP2 (a collective: every rank calls
    it; rank 0 gets the tensors, the others an empty dict), the plain one otherwise."""
    model = getattr(model, "module", model)  # DDP's wrapper
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded_state(path: str | os.PathLike, models: dict, optimizers: dict, extra: dict) -> None:
    """Resume state under FSDP2 with torch.distributed.checkpoint: every rank writes its own shards of the models
    and optimizers (no rank ever holds the whole optimizer state); `extra` (step, RNG, ...) as JSON by rank 0.
    Written to `path`.tmp and renamed, so a kill leaves the previous state intact."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    state = {}
    for name, model in models.items():
        msd, osd = get_state_dict(model, optimizers[name])
        state[name], state[f"{name}.optim"] = msd, osd
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        write_json_atomic(tmp / "extra.json", extra)
        old = p.with_name(p.name + ".old")
        if p.exists():
            os.replace(p, old)
        os.replace(tmp, p)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_sharded_state(path: str | os.PathLike, models: dict, optimizers: dict) -> dict:
    """Inverse of `save_sharded_state`: each rank reads its shards; returns `extra`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    p = Path(path)
    if not (p / "extra.json").is_file():
        raise InputError(f"{p}: no sharded resume state (extra.json); was the run trained with --fsdp?")
    state = {}
    for name, model in models.items():
        msd, osd = get_state_dict(model, optimizers[name])
        state[name], state[f"{name}.optim"] = msd, osd
    try:
        dcp.load(state, checkpoint_id=str(p))
    except Exception as e:  # a truncated or foreign checkpoint: name it, without the reader's traceback
        raise InputError(f"{p}: cannot read the sharded resume state ({str(e).splitlines()[0]})") from None
    for name, model in models.items():
        set_state_dict(model, optimizers[name], model_state_dict=state[name], optim_state_dict=state[f"{name}.optim"])
    return json.loads(read_text(p / "extra.json"))


# ----------------------------------------------------------------------------------------------------------------
# Schedule, FLOPs, logging


def cosine_lr(step: int, warmup: int, total: int, lr: float, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup to lr, then cosine decay to min_lr_ratio * lr at `total`."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if total <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# dense bf16 peak FLOP/s per GPU (vendor datasheets, without sparsity) -- for honest MFU figures
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                  "L4": 121e12, "V100": 125e12, "T4": 65e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in GPU_PEAK_FLOPS.items():
        if key in name:
            return val
    return None


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.5,
                        device: str = "cpu") -> float:
    """This machine's achievable matmul FLOP/s (the ceiling CPU MFU figures are a fraction of)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def count_params(module: torch.nn.Module) -> int:
    """Parameters counted once even when tied."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def flops_per_token(cfg: Any, seq_len: int, n_params: int | None = None) -> float:
    """Training FLOPs per token: 6N for the matmuls with parameters (forward 2N, backward 4N) plus
    12 * L * H * hd * T for attention scores and values (PaLM appendix B / nanoGPT's estimate_mfu).
    N excludes the input embedding (a lookup, not a matmul) but includes the LM head."""
    if n_params is None:
        h, i, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
        hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        per_layer = h * hd * (2 * nh + 2 * nkv) + 3 * h * i + 2 * h
        n_params = L * per_layer + h + V * h
    return 6 * n_params + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


def log(msg: str) -> None:
    """Print on the main rank only (torchrun's RANK; a plain run is rank 0)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stdout, flush=True)


def eta(done: int, total: int, elapsed: float) -> str:
    """The progress line's tail: `ETA 1m23s` from the average rate so far (`done` units in `elapsed` seconds)."""
    if done <= 0:
        return "ETA ?"
    left = elapsed / done * max(0, total - done)
    return f"ETA {int(left // 60)}m{int(left % 60):02d}s" if left >= 60 else f"ETA {left:.0f}s"


class Progress:
    """A progress line with rate and ETA every few seconds (main rank only), for long loops without steps."""

    def __init__(self, what: str, total: int, enabled: bool, every: float = 5.0):
        self.what, self.total, self.enabled, self.every = what, total, enabled, every
        self.t0 = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last > self.every) and self.done < self.total:
            rate = self.done / (now - self.t0)
            left = eta(self.done, self.total, now - self.t0)
            print(f"  {self.what}: {self.done}/{self.total} ({rate:.1f}/s, {left})", flush=True)
            self.last = now


def toxic_regex(lexicon: list[str]) -> re.Pattern | None:
    """The toy world's toxicity rule (data/toyworld.py `is_toxic`): whole words or phrases of its lexicon,
    case-insensitive, longest first; match against `text.lower()`. None for an empty lexicon."""
    words = sorted({w.strip().lower() for w in lexicon if w.strip()}, key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b") if words else None
