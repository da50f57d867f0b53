"""Pretrain a Mistral-style base model on a text corpus, or fine-tune one (--sft): the model RLHF starts from.

Mistral-Plus (and the RLHF recipe in general) starts from a base model that already speaks. None can be
downloaded here, so this script makes one: next-token pretraining of a `model.py` transformer on the toy
world's corpus (or any `{"text"}` JSONL / plain-text file), in a few minutes on a laptop CPU. With `--sft` it
trains the supervised fine-tuning baseline the Mistral-Plus paper argues against (loss on response tokens only).

    python data/toyworld.py && python pretrain.py                  # toy base model -> out/pretrain/final
    python pretrain.py --sft --init out/pretrain/final --data data/toy/sft/train.jsonl --out out/sft
    python pretrain.py --init path/to/hf_checkpoint --data my.jsonl --lr 1e-4   # continue pretraining
    torchrun --nproc_per_node=2 pretrain.py                        # DDP (gloo on CPU, nccl on CUDA)
    python pretrain.py --resume out/pretrain                       # continue an interrupted run

Implementation details:
1. Tokenizer: trained on the corpus when none is given (`model.train_tokenizer`: Mistral-style BPE with byte
   fallback, the 256 byte tokens inside the vocab), otherwise taken from `--init` or `--tokenizer`.
2. The corpus is tokenized once into a flat uint16/uint32 memmap cache: BOS at the start of every document, EOS
   at its end (so the model learns to stop), cached under the output folder keyed by data + tokenizer hash.
3. Pretraining batches are random windows of `seq_len + 1` tokens over the concatenated stream (nanoGPT);
   documents are packed, so no compute is spent on padding.
4. The global batch is what the user sets. Every rank draws the *same* global batch of window starts from a
   seeded generator and takes its slice, so N ranks x micro-batches reproduce one process step for step.
5. Loss = sum of token losses / tokens in the *global* batch (known on every rank by detail 4), times the world
   size because DDP averages gradients. The gradient therefore equals the single-process gradient exactly,
   also for SFT where ranks hold different numbers of response tokens.
6. Gradient accumulation skips the all-reduce on non-final micro-steps (`no_sync`, forward included).
7. AdamW (fused when available) with decoupled weight decay on matrices only (not norms), linear warmup then
   cosine decay to `min_lr_ratio * lr`, global-norm gradient clipping.
8. SFT (`--sft`): rows are `{"prompt", "response"}` or HH-RLHF transcripts (`{"chosen"}` or `{"text"}`, split at
   the last "\\n\\nAssistant:"). The sequence is BOS + prompt + response + EOS; prompt and padding tokens get
   loss weight zero, so only the response (and its EOS) is learned. The response tokens are cut from the tokens
   of the joined text (`Tokenizer.encode_pair`, lm-eval's rule), exactly as generation after the prompt sees them.
9. Resume: `last/` holds the weights (safetensors) and `train_state.pt` (optimizer, step, data-generator and
   RNG state; loaded with weights_only=True); a resumed run reaches the same weights as an uninterrupted one.
10. MFU: tokens/s of all ranks x `model.flops_per_token` divided by the ranks' summed peak: the GPU's datasheet
    peak, or on CPU this machine's measured matmul peak in the run's matmul dtype (fp32, or bf16 under
    `--dtype bf16`), so the CPU figure is a ratio to what the machine can do, not a guess.
11. Toy-world probe (end of run, when the data lives in a toy world): samples answers to held-out red-team and
    general prompts at temperature 1 and reports the EOS rate and the toxicity rate under the world's lexicon,
    plus log-likelihood accuracy on the world's knowledge (MMLU-style) and arithmetic items against chance.
12. `--fsdp` (under torchrun): FSDP2 `fully_shard` per decoder layer and the root (common.parallelize), with
    MixedPrecisionPolicy(bf16 compute, fp32 reduce) under `--dtype bf16` and fp32 master weights and AdamW state
    sharded. The same loop runs: gradient accumulation skips the reduce-scatter on non-final micro-steps,
    clipping reduces the norm over all shards, resume state is sharded (torch.distributed.checkpoint) and the
    final HF folder is written by rank 0 from the gathered weights, in bf16 when training in bf16.
    `--grad_ckpt` recomputes each layer in backward (any mode).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import (
    InputError,
    JsonlLogger,
    autocast_ctx,
    check_output_path,
    check_settings,
    cleanup_distributed,
    cli,
    clip_grad_norm,
    cosine_lr,
    eta,
    field_of,
    flops_per_token,
    full_state_dict,
    gradient_sync,
    init_distributed,
    is_sharded,
    load_sharded_state,
    load_train_state,
    log,
    measure_matmul_peak,
    output_dir,
    parallelize,
    parse_config,
    peak_flops,
    read_jsonl,
    read_text,
    resolve_device_dtype,
    save_sharded_state,
    toxic_regex,
    write_json_atomic,
)
from model import (
    MistralForCausalLM,
    ModelConfig,
    Tokenizer,
    check_checkpoint_dir,
    check_tokenizer_fits,
    pad_batch,
    train_tokenizer,
)


@dataclass
class Config:
    data: str = "data/toy/corpus/train.jsonl"  # {"text"} JSONL, plain .txt, or a folder of them; SFT: see detail 8
    valid_data: str = "auto"  # held-out file; auto = sibling valid.jsonl if present, else hold out valid_fraction
    valid_fraction: float = 0.01  # share of tokens (pretraining) / examples (SFT) held out when no valid file
    out: str = "out/pretrain"  # run folder: config.json, metrics.jsonl, summary.json, last/, final/
    init: str = ""  # HF checkpoint folder to start from (continue pretraining, or the base model for --sft)
    tokenizer: str = ""  # tokenizer.json or folder; "" = from --init, else train one on the data (detail 1)
    vocab_size: int = 2048  # when training a tokenizer: total size incl. 3 specials, 256 bytes and <pad>
    sft: bool = False  # supervised fine-tuning on prompt/response data (detail 8); requires --init
    resume: str = ""  # run folder to continue (reads its last/ and config.json) (detail 9)
    # model shape (ignored with --init): the toy base model, 2.0M parameters with a 2K vocab. Sized by the CPU budget: 2
    # cores train it at ~8K tokens/s (seq_len 256), so a 6M model would see a third of the tokens in 8 minutes.
    hidden_size: int = 192  # residual width
    num_hidden_layers: int = 4  # transformer blocks
    num_attention_heads: int = 6  # query heads (head_dim 32)
    num_key_value_heads: int = 2  # KV heads (grouped-query attention, as Mistral's 32/8)
    intermediate_size: int = 512  # SwiGLU width (~2.7 x hidden; Mistral uses 3.5 x)
    tie_word_embeddings: bool = True  # share input/output embeddings: saves 0.4M of 2.4M params here
    rope_theta: float = 10000.0  # RoPE base (Mistral v0.1 value; contexts here are short)
    seq_len: int = 256  # training context in tokens (toy documents are 30-250 tokens; few-shot prompts ~250)
    # optimisation
    batch_size: int = 8  # GLOBAL batch in sequences (all ranks and micro-steps together) (detail 4)
    micro_batch_size: int = 0  # sequences per rank per forward; 0 = batch_size / world (no accumulation)
    max_steps: int = 2000  # optimizer steps (4.1M tokens, ~5.7 epochs of the toy corpus: ~8 min on 2 CPU cores)
    lr: float = 3e-3  # peak learning rate (small models tolerate a high one; use ~1e-4 for --init real models)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio (detail 7)
    warmup_steps: int = 20  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decoupled decay on weight matrices only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2 (LLM-pretraining value: faster adaptation than 0.999)
    grad_clip: float = 1.0  # clip the global gradient norm; 0 = off
    # logging, evaluation, checkpoints
    log_interval: int = 25  # steps between log lines; 0 = only at the end (as for the other intervals)
    eval_interval: int = 120  # steps between held-out loss evaluations (and at the end)
    eval_batches: int = 4  # micro-batches of held-out data per evaluation
    sample_interval: int = 0  # steps between printed sample generations; 0 = only at the end
    save_interval: int = 120  # steps between resumable checkpoints in last/
    stop_after: int = 0  # stop after this step as if interrupted (to test --resume); 0 = run to max_steps
    probe: str = "auto"  # toy world folder for the end-of-run probe (detail 11); auto = detect, none = off
    probe_prompts: int = 100  # held-out red-team prompts (and as many general ones) sampled by the probe
    seed: int = 1337  # model init and data order
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast; master weights stay fp32)
    compile: bool = False  # torch.compile the model
    fsdp: bool = False  # shard weights, gradients and AdamW state over the ranks (FSDP2; for a model too big for DDP)
    grad_ckpt: bool = False  # activation checkpointing per decoder layer: recompute in backward, store far less


# --------------------------------------------------------------------------------------------------------------
# Data: reading with clear errors, tokenizer, token cache (details 1-3, 8)


def fail(msg: str) -> None:
    """Input problems end the run with one clear line and exit code 2 (common.cli), before any output."""
    raise InputError(msg)


def due(step: int, interval: int) -> bool:
    """Periodic work (log, eval, save, sample) at every `interval` steps; 0 = never (the last step still runs)."""
    return interval > 0 and step % interval == 0


def data_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".jsonl", ".txt"))
        if not files:
            fail(f"{p}: folder holds no .jsonl or .txt files")
        return files
    if not p.is_file():
        fail(f"{p}: no such file")
    return [p]


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, dict) for each row of a JSONL file; a problem ends the run naming file and line."""
    try:
        return read_jsonl(path)
    except ValueError as e:
        fail(str(e))


def read_texts(path: str) -> list[str]:
    """Pretraining documents: the `text` field of each JSONL row; a .txt file is one document."""
    docs: list[str] = []
    for f in data_files(path):
        if f.suffix == ".txt":
            docs.append(read_text(f))
            continue
        for i, row in read_rows(f):
            docs.append(field_of(row, "text", f"{f}:{i}", str, 'pretraining rows are {"text": ...}'))
    docs = [d for d in docs if d.strip()]
    if not docs:
        fail(f"{path}: no documents (empty file?)")
    return docs


ASSISTANT = "\n\nAssistant:"


def read_sft(path: str) -> list[tuple[str, str]]:
    """(prompt, response) pairs from {"prompt","response"} rows or HH transcripts (detail 8)."""
    pairs: list[tuple[str, str]] = []
    for f in data_files(path):
        for i, row in read_rows(f):
            if isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
                pairs.append((row["prompt"], row["response"]))
                continue
            text = row.get("chosen", row.get("text"))
            if not isinstance(text, str):
                fail(f"{f}:{i}: field 'prompt'/'response' (or HH 'chosen') missing")
            if ASSISTANT not in text:
                fail(f"{f}:{i}: field 'chosen': no '\\n\\nAssistant:' turn in the HH transcript")
            head, tail = text.rsplit(ASSISTANT, 1)
            pairs.append((head + ASSISTANT, tail))
    if not pairs:
        fail(f"{path}: no examples (empty file?)")
    return pairs


def file_digest(paths: list[Path], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def token_cache(docs: list[str], tok: Tokenizer, path: Path) -> np.memmap:
    """Tokenize once into a flat memmap: BOS + doc + EOS per document (detail 2). Written then renamed."""
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            for s in range(0, len(docs), 2048):
                for ids in tok.encode_batch(docs[s : s + 2048], bos=True, eos=True):
                    f.write(np.asarray(ids, dtype=dtype).tobytes())
        os.replace(tmp, path)
    return np.memmap(path, dtype=dtype, mode="r")


def sft_examples(pairs: list[tuple[str, str]], tok: Tokenizer, max_len: int) -> tuple[list, int]:
    """(ids, n_prompt) per example, truncated to max_len; drops those whose prompt leaves no response token."""
    out, dropped = [], 0
    for p, r in (tok.encode_pair(p, r, eos=True) for p, r in pairs):  # r cut from the joined text's tokens
        if len(p) >= max_len:
            dropped += 1
            continue
        out.append(((p + r)[:max_len], len(p)))
    return out, dropped


# --------------------------------------------------------------------------------------------------------------
# Batches (details 3-5)


def window_batch(tokens: np.memmap, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, ...]:
    """Windows of seq_len + 1 tokens -> (inputs, targets, weights) each (B, T)."""
    w = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1].astype(np.int64) for s in starts.tolist()]))
    return w[:, :-1], w[:, 1:], torch.ones(len(starts), seq_len)


def sft_batch(examples: list, idx: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded (inputs, targets, weights): weight 1 on response tokens (incl. EOS) only (detail 8)."""
    seqs = [examples[i][0] for i in idx.tolist()]
    ids, mask = pad_batch(seqs, pad_id, side="right")  # (B, L)
    w = mask.clone().float()
    for row, i in enumerate(idx.tolist()):
        w[row, : examples[i][1]] = 0  # prompt (and BOS) are context, not targets
    return ids[:, :-1], ids[:, 1:], w[:, 1:]


# --------------------------------------------------------------------------------------------------------------
# Checkpoints (detail 9)


def save_checkpoint(model: MistralForCausalLM, tok: Tokenizer, path: Path, state: dict | None = None) -> None:
    """HF folder (safetensors + config.json + tokenizer), written to a temp folder and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tokenizer=tok)
    if state is not None:
        torch.save(state, tmp / "train_state.pt")
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# Toy-world probe (detail 11)


def find_toy_world(cfg: Config) -> Path | None:
    if cfg.probe in ("", "none"):
        return None
    if cfg.probe != "auto":
        return Path(cfg.probe)
    for parent in list(Path(cfg.data).resolve().parents)[:3]:
        if (parent / "card.json").is_file():
            return parent
    return None


@torch.no_grad()
def sample(
    model, tok: Tokenizer, prompts: list[str], device, dtype, max_new_tokens: int = 64, seed: int = 0, batch: int = 32
) -> tuple[list[str], list[bool]]:
    """Temperature-1 samples; returns (responses, ended-with-EOS flags)."""
    g = torch.Generator(device=device).manual_seed(seed)
    texts, eos = [], []
    for s in range(0, len(prompts), batch):
        ids, mask = pad_batch([tok.encode(p) for p in prompts[s : s + batch]], tok.pad_id, side="left")
        with autocast_ctx(device, dtype):
            out = model.generate(
                ids.to(device),
                mask.to(device),
                max_new_tokens=max_new_tokens,
                temperature=1.0,
                eos_token_id=tok.eos_id,
                pad_token_id=tok.pad_id,
                generator=g,
            )
        for row in out.response_ids.tolist():
            eos.append(tok.eos_id in row)
            texts.append(tok.decode(row[: row.index(tok.eos_id)] if tok.eos_id in row else row))
    return texts, eos


@torch.no_grad()
def choice_accuracy(model, tok: Tokenizer, items: list[tuple[str, list[str], int]], device, dtype) -> float:
    """Log-likelihood multiple choice: pick the option with the highest summed log-prob after the context."""
    seqs, spans = [], []
    for ctx, options, _ in items:
        for o in options:
            c, o_ids = tok.encode_pair(ctx, o)
            seqs.append(c + o_ids)
            spans.append((len(c), len(c) + len(o_ids)))
    scores = []
    for s in range(0, len(seqs), 64):
        ids, mask = pad_batch(seqs[s : s + 64], tok.pad_id, side="right")
        ids, mask = ids.to(device), mask.to(device)
        with autocast_ctx(device, dtype):
            logits = model(ids, mask)
        lp = torch.log_softmax(logits.float()[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, L-1)
        for row, (a, b) in enumerate(spans[s : s + 64]):
            scores.append(lp[row, a - 1 : b - 1].sum().item())
    k, correct = 0, 0
    for _, options, gold in items:
        correct += int(np.argmax(scores[k : k + len(options)]) == gold)
        k += len(options)
    return correct / len(items)


def knowledge_items(world: Path) -> list[tuple[str, list[str], int]]:
    import csv

    with open(world / "eval/mmlu/test/toyworld_test.csv", newline="") as f:
        return [(f"Question: {r[0]}\nAnswer:", [" " + o for o in r[1:5]], "ABCD".index(r[5])) for r in csv.reader(f)]


def arithmetic_items(world: Path) -> list[tuple[str, list[str], int]]:
    """From GSM8K-style items: context up to "a op b =", options c and three wrong sums (chance 25%)."""
    items = []
    for _, row in read_rows(world / "eval/gsm8k/test.jsonl"):
        m = re.search(r"<<(\d+)([-+*])(\d+)=(\d+)>>", row["answer"])
        if not m:
            continue
        a, op, b, c = m.group(1), m.group(2), m.group(3), int(m.group(4))
        who = row["question"].split()[0]
        ctx = f"Question: {row['question']}\nAnswer: {who} has {a} {op} {b} ="
        opts = [c] + [c + d for d in (3, -4, 7, 11) if c + d >= 0][:3]  # wrong by a few, not by one
        items.append((ctx, [f" {o}" for o in opts], 0))
    return items


def toy_probe(model, tok: Tokenizer, world: Path, n_prompts: int, device, dtype, show: int = 3) -> dict:
    card = json.loads((world / "card.json").read_text())
    toxic = toxic_regex(card["toxic_lexicon"])
    rows = [r for _, r in read_rows(world / "prompts/test.jsonl")]
    red = [r["prompt"] for r in rows if r["kind"] == "red_team"][:n_prompts]
    gen = [r["prompt"] for r in rows if r["kind"] == "general"][:n_prompts]
    model.eval()
    red_out, red_eos = sample(model, tok, red, device, dtype, seed=1)
    gen_out, gen_eos = sample(model, tok, gen, device, dtype, seed=2)
    res = {
        "red_team_toxicity": float(np.mean([bool(toxic.search(t.lower())) for t in red_out])),
        "general_toxicity": float(np.mean([bool(toxic.search(t.lower())) for t in gen_out])),
        "eos_rate": float(np.mean(red_eos + gen_eos)),
        "n_red_team": len(red),
        "n_general": len(gen),
        "knowledge_acc": choice_accuracy(model, tok, knowledge_items(world), device, dtype),
        "arithmetic_acc": choice_accuracy(model, tok, arithmetic_items(world), device, dtype),
        "chance_acc": 0.25,
    }
    for kind, ps, outs in (("red-team", red, red_out), ("general", gen, gen_out)):
        for p, o in list(zip(ps, outs))[:show]:
            log(f"--- sample ({kind}) ---{p}{'' if o.startswith(' ') else ' '}{o.strip()}")
    return res


# --------------------------------------------------------------------------------------------------------------
# Training


def prepare_data(cfg: Config, docs: list, valid_docs: list | None, valid_path: str, tok: Tokenizer, out: Path,
                 dist_info) -> tuple[Any, Any, int, int]:
    """Training and held-out sources: token memmaps for pretraining (detail 2: rank 0 writes the cache, the others
    wait, then every rank memmaps the same file), (ids, n_prompt) examples for SFT (detail 8).
    Returns (train, valid, size in tokens or examples, SFT examples dropped as too long)."""
    dropped = 0
    # token cache (detail 2): rank 0 writes, the others wait, then everyone memmaps the same file
    key = file_digest(
        data_files(cfg.data) + ([Path(valid_path)] if valid_path else []),
        tok.tk.to_str() + str(cfg.sft) + str(cfg.seq_len),
    )
    if not cfg.sft:
        if dist_info.is_main:
            tokens = token_cache(docs, tok, out / "cache" / f"train-{key}.bin")
            vtokens = token_cache(valid_docs, tok, out / "cache" / f"valid-{key}.bin") if valid_docs else None
        if dist_info.ddp:
            torch.distributed.barrier()
        tokens = token_cache(docs, tok, out / "cache" / f"train-{key}.bin")
        vtokens = token_cache(valid_docs, tok, out / "cache" / f"valid-{key}.bin") if valid_docs else None
        if vtokens is None:  # hold out the tail of the stream
            cut = int(len(tokens) * (1 - cfg.valid_fraction))
            tokens, vtokens = tokens[:cut], tokens[cut:]
        for name, t in (("train", tokens), ("valid", vtokens)):
            if len(t) <= cfg.seq_len + 1:
                fail(f"{cfg.data}: the {name} split has {len(t)} tokens, fewer than seq_len + 1 = {cfg.seq_len + 1}")
        n_data = len(tokens)
    else:
        examples, dropped = sft_examples(docs, tok, cfg.seq_len + 1)
        if valid_docs is not None:
            vexamples, _ = sft_examples(valid_docs, tok, cfg.seq_len + 1)
        else:
            n_val = max(1, int(len(examples) * cfg.valid_fraction * 5))  # SFT sets are small: hold out 5x more
            examples, vexamples = examples[n_val:], examples[:n_val]
        if not examples or not vexamples:
            fail(f"{cfg.data}: no SFT example fits seq_len {cfg.seq_len}")
        n_data = len(examples)

    if cfg.sft:
        return examples, vexamples, n_data, dropped
    return tokens, vtokens, n_data, dropped


def read_config(argv: list[str] | None) -> tuple[Config, dict | None]:
    """Flags (or, with --resume, the interrupted run's config.json) and the resume state, all checked."""
    cfg = parse_config(Config, argv, description=__doc__.split("\n")[0])
    train_state = None
    if cfg.resume:
        saved = Path(cfg.resume) / "config.json"
        last = Path(cfg.resume) / "last"
        if not saved.is_file() or not ((last / "train_state.pt").is_file() or (last / "extra.json").is_file()):
            fail(f"--resume {cfg.resume}: no config.json + last/ resume state (not a pretrain.py run folder)")
        keep = {"stop_after": cfg.stop_after, "resume": cfg.resume}
        try:
            cfg = Config(**{**json.loads(saved.read_text()), **keep, "out": cfg.resume})
        except (json.JSONDecodeError, TypeError) as e:
            fail(f"{saved}: not the config.json of a pretrain.py run ({e})")
        if not cfg.fsdp:  # under --fsdp the sharded state is read once the model is sharded
            train_state = load_train_state(Path(cfg.resume) / "last" / "train_state.pt")
    check_settings(cfg, positive=("batch_size", "max_steps", "lr", "seq_len", "eval_batches", "vocab_size",
                                  "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                  "intermediate_size", "rope_theta"),
                   non_negative=("micro_batch_size", "warmup_steps", "weight_decay", "grad_clip", "stop_after",
                                 "probe_prompts", "log_interval", "eval_interval", "sample_interval",
                                 "save_interval"),
                   fraction=("valid_fraction", "min_lr_ratio", "beta1", "beta2"))
    check_output_path(cfg.out)
    if cfg.fsdp and cfg.dtype == "fp16":
        fail("--fsdp with --dtype fp16: use bf16 (FSDP2 keeps fp32 master weights; no loss scaling is needed)")
    return cfg, train_state


def read_inputs(cfg: Config, out: Path) -> tuple[list, list | None, str, Tokenizer | None, Any]:
    """Data, held-out data, tokenizer and --init checkpoint, opened and checked (config, shapes, tokenizer)
    before any output. Returns (docs, valid_docs, valid_path, tokenizer or None to train one, init model)."""
    if cfg.sft and not cfg.init and not cfg.resume:
        fail("--sft needs --init DIR (the base model to fine-tune)")
    if cfg.init:
        check_checkpoint_dir(cfg.init, "--init")
    docs = read_sft(cfg.data) if cfg.sft else read_texts(cfg.data)
    valid_path = cfg.valid_data
    if valid_path == "auto":
        sib = data_files(cfg.data)[0].parent / "valid.jsonl"
        valid_path = str(sib) if sib.is_file() and not cfg.sft and sib != Path(cfg.data) else ""
    valid_docs = (read_sft(valid_path) if cfg.sft else read_texts(valid_path)) if valid_path else None

    last = out / "last"
    tok_src = (cfg.tokenizer or (cfg.resume and (last / "tokenizer.json").is_file() and str(last)) or cfg.init
               or (cfg.resume and str(out / "tokenizer")))
    tok = None
    if tok_src:
        try:
            tok = Tokenizer.from_file(tok_src)
        except (FileNotFoundError, ValueError) as e:
            fail(f"{e} (pass --tokenizer PATH)")

    init_model = None
    if cfg.init:
        init_model = MistralForCausalLM.from_pretrained(cfg.init, dtype=torch.float32)
        check_tokenizer_fits(tok, init_model.config.vocab_size, f"--init {cfg.init}")
    return docs, valid_docs, valid_path, tok, init_model


def main(argv: list[str] | None = None) -> None:
    # ---- setup: read and validate every setting and input before writing anything
    cfg, train_state = read_config(argv)
    dist_info = init_distributed(cfg.device)
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype, dist_info.local_rank)
    if device.type == "cpu" and dist_info.ddp:  # share the cores between ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    out = Path(cfg.out)
    docs, valid_docs, valid_path, tok, init_model = read_inputs(cfg, out)
    W = dist_info.world_size
    micro = cfg.micro_batch_size or cfg.batch_size // W
    if micro < 1 or cfg.batch_size % (micro * W):
        fail(f"--batch_size {cfg.batch_size}: must be a multiple of micro_batch_size {micro} x world size {W}")
    accum = cfg.batch_size // (micro * W)

    # ---- outputs start here
    if dist_info.is_main:
        output_dir(out)
        write_json_atomic(out / "config.json", asdict(cfg))
    if tok is None:  # detail 1: rank 0 trains the tokenizer, the others load it
        if dist_info.is_main:
            train_tokenizer(docs, cfg.vocab_size).save(out / "tokenizer")
        if dist_info.ddp:
            torch.distributed.barrier()
        tok = Tokenizer.from_file(out / "tokenizer")
    train_src, valid_src, n_data, dropped = prepare_data(cfg, docs, valid_docs, valid_path, tok, out, dist_info)

    # ---- model
    torch.manual_seed(cfg.seed)
    if init_model is not None:
        model = init_model
    else:
        mcfg = ModelConfig(
            vocab_size=tok.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            max_position_embeddings=cfg.seq_len,
            rope_theta=cfg.rope_theta,
            tie_word_embeddings=cfg.tie_word_embeddings,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
        )
        model = MistralForCausalLM(mcfg)
    model.to(device)
    raw_model = model  # nanoGPT's unwrapped handle (under FSDP2 the sharded module itself)
    n_params = raw_model.num_params()
    mcfg = raw_model.config
    if cfg.resume and not cfg.fsdp:  # detail 9: weights before the wrap, so DDP starts from them on every rank
        raw_model.load_state_dict(MistralForCausalLM.from_pretrained(out / "last", dtype=torch.float32).state_dict())
    model = parallelize(raw_model, dist_info, device, dtype, cfg.fsdp, cfg.grad_ckpt)  # detail 12
    sharded = is_sharded(model)

    # detail 7: decay matrices only (the optimizer is built on the sharded parameters under FSDP2)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel (one launch for all parameters) exists for CUDA and, since torch 2.4, CPU tensors
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=not sharded)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    data_gen = torch.Generator().manual_seed(cfg.seed)  # detail 4: identical on every rank
    step = 0
    if cfg.resume and sharded:
        st = load_sharded_state(out / "last", {"model": model}, {"model": opt})
        data_gen.set_state(torch.tensor(st["data_gen"], dtype=torch.uint8))
        step = st["step"]
    elif cfg.resume:
        st = train_state
        opt.load_state_dict(st["optimizer"])
        scaler.load_state_dict(st["scaler"])
        data_gen.set_state(st["data_gen"])
        step = st["step"]
    start_step = step
    if cfg.compile:
        model = torch.compile(model)

    fpt = flops_per_token(mcfg, cfg.seq_len)
    # detail 10: tok/s below are all ranks together, so the ceiling is all ranks' peak; on CPU measured in the
    # matmul dtype (bf16 runs at ~2.7x fp32 on CPUs with AVX512-BF16; fp16 has no fast CPU kernel: fp32)
    peak_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    peak = peak_flops(device) or (measure_matmul_peak(peak_dtype) if device.type == "cpu" else None)
    peak = peak * W if peak else None
    peak_name = f"measured {'bf16' if peak_dtype == torch.bfloat16 else 'fp32'}"
    world = find_toy_world(cfg)
    logger = JsonlLogger(out / "metrics.jsonl") if dist_info.is_main else None
    if dist_info.is_main:
        what = f"{n_data:,} SFT examples ({dropped} too long)" if cfg.sft else f"{n_data:,} tokens"
        log(
            f"pretrain.py: {'SFT' if cfg.sft else 'pretraining'} {n_params / 1e6:.2f}M params on {what}; "
            f"vocab {tok.vocab_size}; global batch {cfg.batch_size} x {cfg.seq_len} = {micro} x {accum} accum "
            f"x {W} ranks ({'FSDP2' if sharded else 'DDP' if dist_info.ddp else 'one process'}"
            f"{', activation checkpointing' if cfg.grad_ckpt else ''}); {cfg.max_steps} steps; "
            f"{device}/{str(dtype).removeprefix('torch.')}"
        )

    def get_batch(gen: torch.Generator, val: bool = False):
        """The global batch's indices (same on all ranks), sliced to this rank (detail 4)."""
        if cfg.sft:
            pool = valid_src if val else train_src
            idx = torch.randint(0, len(pool), (cfg.batch_size,), generator=gen)
            return pool, idx
        src = valid_src if val else train_src
        return src, torch.randint(0, len(src) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)

    def micro_batches(src, idx):
        mine = idx[dist_info.rank * micro * accum : (dist_info.rank + 1) * micro * accum]
        for k in range(accum):
            sl = mine[k * micro : (k + 1) * micro]
            b = sft_batch(src, sl, tok.pad_id) if cfg.sft else window_batch(src, sl, cfg.seq_len)
            yield tuple(t.to(device) for t in b)

    def global_weight(src, idx) -> float:
        """Number of target tokens in the global batch, computable on every rank (detail 5)."""
        if not cfg.sft:
            return float(len(idx) * cfg.seq_len)
        return float(sum(len(src[i][0]) - src[i][1] for i in idx.tolist()))

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        g = torch.Generator().manual_seed(0)  # the same held-out batches every time
        tot = torch.zeros(2, device=device)  # (sum of token losses, token count)
        for _ in range(cfg.eval_batches):
            src, idx = get_batch(g, val=True)
            for x, y, w in micro_batches(src, idx):
                with autocast_ctx(device, dtype):
                    tot[0] += model(x, targets=y, weights=w)  # weighted CE sum (model.py detail 12)
                tot[1] += w.sum()
        if dist_info.ddp:
            torch.distributed.all_reduce(tot)
        model.train()
        return (tot[0] / tot[1].clamp(min=1)).item()

    # ---- training loop
    model.train()
    t_start = t_log = time.time()
    tok_since = 0
    val_loss = float("nan")
    train_loss = float("nan")
    while step < cfg.max_steps:
        lr = cosine_lr(step, cfg.warmup_steps, cfg.max_steps, cfg.lr, cfg.min_lr_ratio)
        for gr in opt.param_groups:
            gr["lr"] = lr
        src, idx = get_batch(data_gen)
        denom = global_weight(src, idx)
        step_loss = torch.zeros((), device=device)
        for k, (x, y, w) in enumerate(micro_batches(src, idx)):
            # detail 6: skip the gradient reduction on all but the last micro-step
            with gradient_sync(model, k == accum - 1):
                with autocast_ctx(device, dtype):  # sum of weighted token CE, fp32 (model.py detail 12)
                    ls = model(x, targets=y, weights=w)
                scaler.scale(ls * (W / denom)).backward()  # detail 5
            step_loss += ls.detach()
            tok_since += x.numel()
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)
            gnorm = clip_grad_norm(model.parameters(), cfg.grad_clip)  # over the shards of all ranks
        else:
            gnorm = float("nan")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1
        if dist_info.ddp:
            torch.distributed.all_reduce(step_loss)
        train_loss = step_loss.item() / denom

        last_step = step == cfg.max_steps or step == cfg.stop_after
        if due(step, cfg.log_interval) or last_step:
            dt = time.time() - t_log
            tps = tok_since * W / max(dt, 1e-9)
            mfu = tps * fpt / peak if peak else float("nan")
            elapsed = time.time() - t_start
            if dist_info.is_main:
                logger.log(
                    {
                        "step": step,
                        "loss": train_loss,
                        "lr": lr,
                        "grad_norm": gnorm,
                        "tokens_per_s": tps,
                        "mfu": mfu,
                        "elapsed_s": elapsed,
                    }
                )
                log(
                    f"step {step}/{cfg.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | grad norm {gnorm:.2f} | "
                    f"{tps:,.0f} tok/s | MFU {100 * mfu:.1f}% of "
                    f"{'datasheet peak' if device.type == 'cuda' else peak_name + ' matmul peak'} | "
                    f"{eta(step - start_step, cfg.max_steps - start_step, elapsed)}"
                )
            t_log, tok_since = time.time(), 0
        if due(step, cfg.eval_interval) or last_step:
            t_eval = time.time()
            val_loss = evaluate()
            if dist_info.is_main:
                log(f"step {step}: held-out loss {val_loss:.4f} (perplexity {math.exp(min(val_loss, 50)):.1f})")
                logger.log({"step": step, "val_loss": val_loss, "elapsed_s": time.time() - t_start})
            t_log += time.time() - t_eval  # evaluation time is not training throughput
        if due(step, cfg.sample_interval) and dist_info.is_main and not sharded:  # rank 0 alone: unsharded only
            print_samples(raw_model, tok, world, device, dtype)
            model.train()
        if (due(step, cfg.save_interval) or last_step) and sharded:  # every rank writes its shards
            extra = {"step": step, "data_gen": data_gen.get_state().tolist()}
            save_sharded_state(out / "last", {"model": model}, {"model": opt}, extra)
        elif due(step, cfg.save_interval) or last_step:
            if dist_info.is_main:
                state = {"step": step, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                         "data_gen": data_gen.get_state()}
                save_checkpoint(raw_model, tok, out / "last", state)
        if step == cfg.stop_after:
            if dist_info.is_main:
                log(f"stopping after step {step} (--stop_after); continue with --resume {out}")
            cleanup_distributed()
            return

    # ---- final checkpoint, probe, summary
    train_s = time.time() - t_start
    summary = {
        "steps": step,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "params": n_params,
        "tokens_seen": step * cfg.batch_size * cfg.seq_len,
        "train_seconds": train_s,
        "final_checkpoint": str(out / "final"),
    }
    if sharded:  # rank 0 writes the HF folder from the gathered weights, in the training dtype
        sd = full_state_dict(model)
        if dist_info.is_main:
            save_dtype = dtype if dtype == torch.bfloat16 else torch.float32
            raw_model = MistralForCausalLM.from_state_dict(mcfg, {k: v.to(save_dtype) for k, v in sd.items()})
            raw_model.to(device)  # the probe below runs on rank 0 alone
        torch.distributed.barrier()
    if dist_info.is_main:
        save_checkpoint(raw_model, tok, out / "final")
        if world is not None and (world / "card.json").is_file():
            t0 = time.time()
            summary["probe"] = toy_probe(raw_model, tok, world, cfg.probe_prompts, device, dtype)
            summary["probe_seconds"] = time.time() - t0
        elif cfg.sample_interval == 0:
            print_samples(raw_model, tok, None, device, dtype)
        write_json_atomic(out / "summary.json", summary)
        p = summary.get("probe")
        extra = (
            (
                f" | red-team toxicity {p['red_team_toxicity']:.0%}, EOS {p['eos_rate']:.0%}, knowledge "
                f"{p['knowledge_acc']:.0%}, arithmetic {p['arithmetic_acc']:.0%} (chance 25%)"
            )
            if p
            else ""
        )
        log(
            f"pretrain.py{' --sft' if cfg.sft else ''}: {step} steps in {train_s:.0f}s, train loss "
            f"{train_loss:.3f}, held-out loss {val_loss:.3f}{extra} -> {out / 'final'}"
        )
    cleanup_distributed()


def print_samples(model, tok: Tokenizer, world: Path | None, device, dtype) -> None:
    """A few generations at temperature 1, to watch the model learn to speak."""
    if world is not None and (world / "prompts/test.jsonl").is_file():
        rows = [r for _, r in read_rows(world / "prompts/test.jsonl")]
        prompts = [next(r["prompt"] for r in rows if r["kind"] == k) for k in ("red_team", "general")]
    else:
        prompts = [""]
    model.eval()
    outs, _ = sample(model, tok, prompts, device, dtype, max_new_tokens=48, seed=0)
    for p, o in zip(prompts, outs):
        log(f"--- sample ---{p} {o.strip()}")


if __name__ == "__main__":
    cli(main)
