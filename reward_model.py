"""The harmless reward model of Mistral-Plus: a Mistral backbone + a scalar head trained with Bradley-Terry.

Mistral-Plus (arXiv 2403.02513) applies "harmless RLHF" directly to a base model; its reward model scores how
harmless a response is. This file trains one on preference pairs (chosen is safer than rejected) and provides
the `RewardModel` class that `ppo_rlhf.py` and `evaluate.py` import.

    python data/toyworld.py && python pretrain.py        # the toy preference data and base model
    python reward_model.py                               # toy run: about a minute on a laptop CPU
    torchrun --nproc_per_node=2 reward_model.py          # the same run on 2 processes (same global batch)
    python reward_model.py --init path/to/Mistral-7B-v0.1 \\
        --train_files hh/harmless-base/train.jsonl.gz --test_files hh/harmless-base/test.jsonl.gz \\
        --lr 9e-6 --batch_size 64 --micro_batch_size 4 --max_len 512 --device cuda

    from reward_model import RewardModel
    rm = RewardModel.from_pretrained("out/reward_model/final")
    r = rm.score_texts(prompts, responses, tokenizer)     # raw rewards; rm.normalize(r) -> mean 0, std 1

Implementation details (sources: Mistral-Plus arXiv:2403.02513; Huang et al., "The N+ Implementation Details of
RLHF with PPO", arXiv:2403.17031, and its code vwxyzjn/summarize_from_feedback_details; TRL, OpenRLHF):
 1. Head: bias-free `Linear(hidden, 1)` named `score`, next to the backbone `model.*`: the state-dict layout of
    HF `MistralForSequenceClassification`, so transformers loads the saved folder as is.
 2. Head init N(0, 1/sqrt(hidden + 1)) (N+ / OAI code; the Stiennon paper's text drops the sqrt, a typo).
 3. EOS is appended to every response and the score is read at the LAST REAL token, found from the attention
    mask, never from token ids (PAD != EOS; github.com/allenai/reward-bench/issues/137 and
    github.com/vwxyzjn/lm-human-preference-details/issues/6 are bugs of reading the wrong position). The head
    runs in fp32 so bf16 rounding cannot create ties.
 4. Training sequences are right padded (N+); `forward` works with either side.
 5. Bradley-Terry loss -log sigmoid(r_c - r_r - m), optional margin m (TRL / OpenRLHF), optional reward
    centring c * mean((r_c + r_r)^2) (TRL `center_rewards_coefficient`, c = 0.01 there), because BT is
    shift-invariant and rewards otherwise drift (github.com/deepspeedai/DeepSpeedExamples/issues/527).
 6. Chosen and rejected of a pair go through ONE forward pass (concatenated along the batch), so both see the
    same weights and the pair costs one call.
 7. HH-RLHF: prompt = chosen up to and including its last "\\n\\nAssistant:"; rejected must start with the same
    prompt. PKU-SafeRLHF: chosen = response_{safer_response_id}, wrapped in the same HH template. Pairs with
    chosen == rejected or an empty response are dropped and counted.
 8. One epoch by default (more overfits: Ziegler et al., N+), AdamW eps 1e-5 (N+), linear warmup + cosine.
 9. After training, reward mean/std over training responses are stored in the checkpoint's config.json as
    `reward_mean`/`reward_std` (OpenRLHF's `normalize_reward` silently does nothing without them:
    github.com/OpenRLHF/OpenRLHF/issues/693).
10. Reward size scaling (ICE-GRT): the RM's size is whatever checkpoint `--init` points at, independent of the
    policy; a larger RM is one flag away.
11. `--fsdp` (under torchrun): FSDP2 per decoder layer and the root, fp32 master weights and AdamW state sharded,
    bf16 compute / fp32 reduce under `--dtype bf16` (common.parallelize); scoring keeps every rank's forwards in
    step (each one is a collective); resume state is sharded (torch.distributed.checkpoint); rank 0 writes the
    final HF folder from the gathered weights. `--grad_ckpt`: activation checkpointing per layer.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import re
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    count_params,
    eta,
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
    resolve_device_dtype,
    save_sharded_state,
    text_lines,
    write_bytes_atomic,
    write_json_atomic,
)
from model import (
    MistralForCausalLM,
    MistralModel,
    ModelConfig,
    Tokenizer,
    check_architecture,
    check_checkpoint_dir,
    check_tokenizer_fits,
    is_checkpoint_dir,
    load_config,
    load_safetensors_dir,
    load_state_dict_strict,
    pad_batch,
    save_safetensors_dir,
)

# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    init: str = "out/pretrain/final"  # causal-LM checkpoint the backbone starts from (any size: detail 10)
    tokenizer: str = ""  # folder with tokenizer.json; "" = the init folder
    # PATH[:WEIGHT] files mixed; WEIGHT = passes over a file (the toy default takes a random quarter: 1000 pairs
    # reach the label-noise ceiling and keep the run within the pipeline's 2-minute CPU budget)
    train_files: list[str] = field(default_factory=lambda: ["data/toy/preference/train.jsonl:0.25"])
    test_files: list[str] = field(default_factory=lambda: ["data/toy/preference/test.jsonl"])  # PATH[:WEIGHT]
    pku_filter: str = "all"  # PKU-SafeRLHF rows kept: all | one_safe (exactly one response safe) | agree
    skip_bad_rows: bool = False  # skip malformed rows (counted in summary.json) instead of failing on the first
    max_train_pairs: int = 0  # use at most this many training pairs (0 = all)
    max_len: int = 256  # tokens per sequence; longer ones keep BOS + their last max_len - 1 tokens (counted)
    epochs: float = 1.0  # passes over the training pairs (detail 8: one, more overfits)
    batch_size: int = 32  # GLOBAL pairs per optimizer step (all ranks, all accumulation steps)
    micro_batch_size: int = 0  # pairs per rank per forward (0 = batch / world); accumulation = batch / (micro * world)
    lr: float = 3e-4  # peak learning rate (toy model; 9e-6 OpenRLHF / 3e-6 N+ for 7B models)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_frac: float = 0.03  # fraction of steps of linear warmup (OpenRLHF: 3%)
    weight_decay: float = 0.0  # AdamW decoupled decay on matrices (DS-Chat uses 0.1)
    adam_eps: float = 1e-5  # N+ detail: 1e-5 (PyTorch's 1e-8 makes early steps more aggressive)
    grad_clip: float = 1.0  # global grad-norm clip (0 = off)
    margin: float = 0.0  # BT margin m in -log sigmoid(r_c - r_r - m); a row's own "margin" field wins
    center_rewards_coef: float = 0.0  # c in c * mean((r_c + r_r)^2) (TRL: 0.01); keeps rewards near 0
    norm_pairs: int = 512  # training pairs whose 2 responses give reward_mean/std (0 = all) (detail 9)
    eval_every: int = 100  # optimizer steps between test evaluations (0 = only at the end)
    eval_batch_size: int = 64  # pairs per forward when evaluating / scoring
    log_every: int = 10  # optimizer steps between log lines (0 = only at the end)
    save_every: int = 0  # optimizer steps between resume checkpoints (0 = only when stopping early)
    max_steps: int = -1  # stop after this many steps, resumable (the LR schedule still spans the full run)
    resume: str = ""  # run folder (or its ckpt/) to continue; must use the same data and hyperparameters
    seed: int = 1234  # data order and head init
    out: str = "out/reward_model"  # output folder: config.json, metrics.jsonl, summary.json, final/, ckpt/
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16 (auto = bf16 on capable GPUs, fp32 on CPU)
    compile: bool = False  # torch.compile the model
    fsdp: bool = False  # shard weights, gradients and AdamW state over the ranks (FSDP2; for an RM too big for DDP)
    grad_ckpt: bool = False  # activation checkpointing per decoder layer: recompute in backward, store far less


# fields that may change between an interrupted run and its resumption without changing the result
RESUME_FREE_FIELDS = {"resume", "max_steps", "out", "log_every", "eval_every", "save_every", "device",
                      "compile", "eval_batch_size"}

# ----------------------------------------------------------------------------------------------------------------
# Small pure functions: the loss and its metrics


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Detail 5: mean over pairs of -log sigmoid(r_c - r_r - m) + c * (r_c + r_r)^2, in fp32."""
    rc, rr = r_chosen.float(), r_rejected.float()
    loss = -F.logsigmoid(rc - rr - margin)  # logsigmoid is the stable form of log(1 / (1 + exp(-x)))
    if center_coef:
        loss = loss + center_coef * (rc + rr) ** 2  # TRL: coef * mean((r_c + r_r)^2)
    return loss.mean()


def pair_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, float]:
    """Pairwise accuracy (strictly r_c > r_r: a tie counts as wrong), mean margin, mean rewards."""
    rc, rr = r_chosen.double(), r_rejected.double()
    return {"accuracy": (rc > rr).double().mean().item(), "margin": (rc - rr).mean().item(),
            "chosen": rc.mean().item(), "rejected": rr.mean().item()}


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B,) index of each row's last real token, whatever the padding side (detail 3)."""
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device)
    return (attention_mask.long() * pos).argmax(-1)  # the largest position whose mask is 1


def count_turns(prompt: str) -> int:
    return max(1, prompt.count("\n\nHuman:"))


# ----------------------------------------------------------------------------------------------------------------
# Data: HH-RLHF, PKU-SafeRLHF, generic {"prompt","chosen","rejected"} (detail 7)

HH_ASSISTANT = "\n\nAssistant:"


DataError = InputError  # the name tests and callers use for a bad preference file


@dataclass
class Pair:
    prompt: str  # everything before the response, e.g. "\n\nHuman: ...\n\nAssistant:"
    chosen: str  # the preferred (safer) response, without EOS
    rejected: str
    source: str  # for accuracy by data source
    margin: float | None = None  # per-pair BT margin from the data, if the row has one


def _str_field(row: dict, name: str) -> str:
    if name not in row:
        raise ValueError(f"field {name!r} missing")
    v = row[name]
    if not isinstance(v, str):
        raise ValueError(f"field {name!r} must be a string, got {type(v).__name__}")
    return v


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH transcripts -> (prompt, chosen response, rejected response); the prompt ends with "\\n\\nAssistant:"."""
    i = chosen.rfind(HH_ASSISTANT)
    if i < 0:
        raise ValueError("field 'chosen' has no '\\n\\nAssistant:' turn")
    prompt = chosen[: i + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt):
        raise ValueError("field 'rejected' does not share chosen's prompt (the text up to chosen's last "
                         "'\\n\\nAssistant:')")
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def _bool_field(row: dict, name: str) -> bool:
    if not isinstance(row.get(name), bool):
        raise ValueError(f"field {name!r} missing or not true/false")
    return row[name]


def parse_row(row: dict, pku_filter: str = "all") -> tuple[str, str, str, float | None] | None:
    """One JSON row of any supported format -> (prompt, chosen, rejected, margin), or None if filtered out."""
    if not isinstance(row, dict):
        raise ValueError(f"row is a JSON {type(row).__name__}, expected an object")
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise ValueError(f"field 'margin' must be a number, got {margin!r}")
    if "response_0" in row or "safer_response_id" in row:  # PKU-SafeRLHF
        q, r0, r1 = _str_field(row, "prompt"), _str_field(row, "response_0"), _str_field(row, "response_1")
        sid = row.get("safer_response_id")
        if sid not in (0, 1) or isinstance(sid, bool):
            raise ValueError(f"field 'safer_response_id' must be 0 or 1, got {sid!r}")
        if pku_filter == "one_safe" and (_bool_field(row, "is_response_0_safe")
                                         == _bool_field(row, "is_response_1_safe")):
            return None
        if pku_filter == "agree":
            bid = row.get("better_response_id")
            if bid not in (0, 1) or isinstance(bid, bool):
                raise ValueError(f"field 'better_response_id' must be 0 or 1, got {bid!r}")
            if bid != sid:
                return None
        # the HH template, so PKU pairs look like the prompts PPO will see; HH responses start with a space
        prompt = f"\n\nHuman: {q.strip()}{HH_ASSISTANT}"
        chosen, rejected = (r0, r1) if sid == 0 else (r1, r0)
        return prompt, " " + chosen.strip(), " " + rejected.strip(), margin
    if "prompt" in row:  # generic: responses without the prompt
        prompt, chosen, rejected = (_str_field(row, k) for k in ("prompt", "chosen", "rejected"))
        if prompt and chosen.startswith(prompt) and rejected.startswith(prompt):
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]  # TRL's older "full text" layout
        return prompt, chosen, rejected, margin
    prompt, chosen, rejected = split_hh(_str_field(row, "chosen"), _str_field(row, "rejected"))  # HH-RLHF
    return prompt, chosen, rejected, margin


@dataclass
class DataStats:
    rows: int = 0  # non-empty lines read
    pairs: int = 0  # pairs kept
    skipped_bad: int = 0  # malformed rows skipped (only with --skip_bad_rows)
    dropped_identical: int = 0  # chosen == rejected: no preference to learn
    dropped_empty: int = 0  # an empty response
    filtered: int = 0  # removed by --pku_filter
    truncated: int = 0  # sequences longer than max_len (filled in at tokenization)

    def add(self, other: DataStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def source_label(path: Path) -> str:
    """harmless-base/test.jsonl.gz -> "harmless-base/test" (the default data-source name of its pairs)."""
    stem = re.sub(r"\.(jsonl|json)(\.gz|\.xz)?$", "", path.name)
    return f"{path.parent.name}/{stem}" if path.parent.name else stem


def read_preference_file(path: str | os.PathLike, pku_filter: str = "all",
                         skip_bad_rows: bool = False) -> tuple[list[Pair], DataStats]:
    """Read one JSONL(.gz/.xz) file of any supported format; a row's "source" field overrides the file label."""
    path = Path(path)
    stats, pairs, label = DataStats(), [], source_label(path)
    for lineno, line in text_lines(path):  # .gz/.xz, BOM, CRLF; truncated or non-UTF-8 files name the line
        if not line.strip():
            continue
        stats.rows += 1
        try:
            row = json.loads(line)
            parsed = parse_row(row, pku_filter)
        except (json.JSONDecodeError, ValueError) as e:
            if skip_bad_rows:
                stats.skipped_bad += 1
                continue
            what = f"invalid JSON ({e.msg} at column {e.colno})" if isinstance(e, json.JSONDecodeError) else e
            raise InputError(f"{path}:{lineno}: {what}") from None
        if parsed is None:
            stats.filtered += 1
            continue
        prompt, chosen, rejected, margin = parsed
        if not chosen.strip() or not rejected.strip():
            stats.dropped_empty += 1
            continue
        if chosen == rejected:
            stats.dropped_identical += 1
            continue
        src = row.get("source") if isinstance(row.get("source"), str) else label
        pairs.append(Pair(prompt, chosen, rejected, src, None if margin is None else float(margin)))
    stats.pairs = len(pairs)
    return pairs, stats


def parse_file_spec(spec: str) -> tuple[str, float]:
    """"path" or "path:weight" (weight = passes over the file: 0.5 takes a random half, 2 repeats it)."""
    m = re.fullmatch(r"(.+):([0-9]*\.?[0-9]+)", spec)
    if m and not Path(spec).exists():
        return m.group(1), float(m.group(2))
    return spec, 1.0


def load_mixture(specs: list[str], pku_filter: str = "all", skip_bad_rows: bool = False,
                 seed: int = 0) -> tuple[list[Pair], DataStats]:
    """Several files mixed with weights; the subsampling is deterministic given the seed."""
    if not specs:
        raise InputError("no preference files given")
    rng = random.Random(seed)
    out, total = [], DataStats()
    for spec in specs:
        path, w = parse_file_spec(spec)
        pairs, stats = read_preference_file(path, pku_filter, skip_bad_rows)
        total.add(stats)
        k = round(w * len(pairs))
        reps, rest = divmod(k, max(1, len(pairs)))
        out += pairs * reps + rng.sample(pairs, rest)
    total.pairs = len(out)
    return out, total


def encode_pairs(pairs: list[Pair], tok: Tokenizer, max_len: int,
                 stats: DataStats | None = None) -> list[tuple[list[int], list[int]]]:
    """BOS + prompt + response + EOS for both responses (detail 3), jointly tokenized as score_texts does."""
    texts = [t for p in pairs for t in (p.prompt + p.chosen, p.prompt + p.rejected)]
    ids = [truncate(s, max_len, stats) for s in tok.encode_batch(texts, bos=True, eos=True)]
    return list(zip(ids[0::2], ids[1::2], strict=True))


def truncate(ids: list[int], max_len: int | None, stats: DataStats | None = None) -> list[int]:
    """Keep BOS and the last max_len - 1 tokens: the response end and its EOS are where the score is read."""
    if max_len is None or len(ids) <= max_len:
        return ids
    if stats is not None:
        stats.truncated += 1
    return ids[:1] + ids[len(ids) - (max_len - 1):]


# ----------------------------------------------------------------------------------------------------------------
# The reward model


class RewardModel(nn.Module):
    """Backbone + bias-free scalar head, the HF `MistralForSequenceClassification` layout (detail 1)."""

    def __init__(self, config: ModelConfig, backbone: MistralModel | None = None):
        super().__init__()
        config.extra["architectures"] = ["MistralForSequenceClassification"]
        config.extra.setdefault("id2label", {"0": "LABEL_0"})  # num_labels = 1 for transformers
        config.extra.setdefault("label2id", {"LABEL_0": 0})
        self.config = config
        self.model = backbone if backbone is not None else MistralModel(config)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)
        if backbone is None and self.score.weight.device.type != "meta":
            for m in self.model.modules():  # same init as MistralForCausalLM (only used for random models)
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, mean=0.0, std=config.initializer_range)
        if self.score.weight.device.type != "meta":
            self.reset_score_head()
        if backbone is not None:
            self.score.to(next(backbone.parameters()).dtype)

    @torch.no_grad()
    def reset_score_head(self) -> None:
        nn.init.normal_(self.score.weight, std=1 / math.sqrt(self.config.hidden_size + 1))  # detail 2

    @property
    def reward_mean(self) -> float:
        return float(self.config.extra.get("reward_mean", 0.0))

    @property
    def reward_std(self) -> float:
        return float(self.config.extra.get("reward_std", 1.0))

    def normalize(self, r: torch.Tensor) -> torch.Tensor:
        """(r - mean) / std with the training-response statistics stored at save time (detail 9)."""
        return (r - self.reward_mean) / self.reward_std

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):  # detail 3: the scalar head in fp32
            return F.linear(h.float(), self.score.weight.float()).squeeze(-1)

    def token_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) fp32: the head at every position (a critic initialised from the RM reads these)."""
        return self._head(self.model(input_ids, attention_mask))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) fp32 reward read at each row's last real token (left or right padding)."""
        h = self.model(input_ids, attention_mask)  # (B, T, hidden)
        last = last_token_index(attention_mask)  # (B,)
        return self._head(h[torch.arange(h.shape[0], device=h.device), last])  # (B, hidden) -> (B,)

    @torch.no_grad()
    def score_texts(self, prompts: list[str], responses: list[str], tokenizer: Tokenizer, batch_size: int = 16,
                    max_len: int | None = None) -> torch.Tensor:
        """Raw rewards (N,) on the model's device: BOS + prompt + response + EOS, right padded, no grad."""
        if len(prompts) != len(responses):
            raise ValueError(f"score_texts: {len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return torch.zeros(0, device=self.score.weight.device)
        seqs = [truncate(s, max_len) for s in
                tokenizer.encode_batch([p + r for p, r in zip(prompts, responses, strict=True)], True, True)]
        return self.score_ids(seqs, tokenizer.pad_id, batch_size)

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]], pad_id: int, batch_size: int = 16, min_batches: int = 0
                  ) -> torch.Tensor:
        """Raw rewards of already tokenized sequences (BOS ... EOS), scored in length-sorted batches. Under FSDP2
        a forward is a collective, so a rank with fewer batches runs `min_batches` forwards all the same."""
        dev = self.score.weight.device
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # less padding per batch
        out = torch.empty(len(seqs), dtype=torch.float32, device=dev)
        n = 0
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            ids, mask = pad_batch([seqs[i] for i in idx], pad_id, side="right")
            out[torch.tensor(idx, device=dev)] = self(ids.to(dev), mask.to(dev))
            n += 1
        for _ in range(n, min_batches):  # keep step with the other ranks' all-gathers
            self(torch.full((1, 1), pad_id, device=dev), torch.ones((1, 1), dtype=torch.long, device=dev))
        return out

    # -- checkpoints ----------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> RewardModel:
        """Load a folder written by `save_pretrained` (or by transformers' MistralForSequenceClassification)."""
        path = Path(path)
        cfg = load_config(path)
        check_architecture(cfg, path, causal_lm=False)
        sd = load_safetensors_dir(path)
        if "score.weight" not in sd:
            raise ValueError(f"{path}: no 'score.weight' tensor: a causal LM, not a reward model "
                             f"(use RewardModel.from_causal_lm to start a reward model from it)")
        sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
        with torch.device("meta"):
            rm = cls(cfg)
        load_state_dict_strict(rm, sd, path)
        if dtype is not None:
            rm.to(dtype)
        return rm.to(device)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, sd: dict[str, torch.Tensor]) -> RewardModel:
        """A reward model holding exactly these tensors (e.g. gathered from FSDP2 shards)."""
        with torch.device("meta"):
            rm = cls(config)
        load_state_dict_strict(rm, sd, "gathered state")
        return rm

    @classmethod
    def from_causal_lm(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None) -> RewardModel:
        """Backbone from any causal-LM checkpoint (HF or Mistral-native), fresh score head (detail 2)."""
        lm = MistralForCausalLM.from_pretrained(path, dtype=dtype)
        cfg = dataclasses.replace(lm.config, extra=dict(lm.config.extra))
        cfg.tie_word_embeddings = False  # no LM head left to tie
        return cls(cfg, backbone=lm.model).to(device)

    def save_pretrained(self, path: str | os.PathLike, tokenizer: Tokenizer | None = None) -> None:
        cfg = self.config.to_dict()
        if tokenizer is not None and cfg.get("pad_token_id") is None:
            cfg["pad_token_id"] = tokenizer.pad_id  # transformers finds the last token from it
        save_safetensors_dir(path, self.state_dict(), cfg)
        if tokenizer is not None:
            tokenizer.save(path)


def is_reward_model_dir(path: str | os.PathLike) -> bool:
    """Does the folder hold a reward model (its config.json names MistralForSequenceClassification)?"""
    if not (Path(path) / "config.json").is_file():
        return False
    return "MistralForSequenceClassification" in (load_config(path).extra.get("architectures") or [])


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and reward statistics (sharded over ranks, gathered on every rank)


def _gather(obj, ddp: bool) -> list:
    if not ddp:
        return [obj]
    import torch.distributed as dist
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def score_pairs(rm: RewardModel, enc: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
                rank: int = 0, world: int = 1, ddp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of every pair's chosen and rejected sequence, each rank scoring a slice, then gathered."""
    mine = list(range(rank, len(enc), world))
    seqs = [s for i in mine for s in enc[i]]
    n_batches = -(-(2 * len(range(0, len(enc), world))) // (2 * batch_size))  # rank 0 holds the most pairs
    r = rm.score_ids(seqs, pad_id, 2 * batch_size, n_batches if is_sharded(rm) else 0).cpu()
    parts = _gather((mine, r[0::2].tolist(), r[1::2].tolist()), ddp)
    rc, rr = torch.zeros(len(enc), dtype=torch.float64), torch.zeros(len(enc), dtype=torch.float64)
    for idx, c, j in parts:
        rc[idx], rr[idx] = torch.tensor(c, dtype=torch.float64), torch.tensor(j, dtype=torch.float64)
    return rc, rr


def evaluate(rm: RewardModel, pairs: list[Pair], enc, pad_id: int, batch_size: int, rank: int = 0,
             world: int = 1, ddp: bool = False) -> dict:
    """Pairwise accuracy, margin, mean rewards; accuracy by data source and by number of turns."""
    rc, rr = score_pairs(rm, enc, pad_id, batch_size, rank, world, ddp)
    out = pair_metrics(rc, rr)
    for key, fn in (("accuracy_by_source", lambda p: p.source),
                    ("accuracy_by_turns", lambda p: str(count_turns(p.prompt)))):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(pairs):
            groups[fn(p)].append(i)
        out[key] = {g: {"accuracy": (rc[ix] > rr[ix]).double().mean().item(), "pairs": len(ix)}
                    for g, ix in sorted(groups.items())}
    out["pairs"] = len(pairs)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Resume checkpoints: weights as safetensors, optimizer/step as torch.save loaded with weights_only=True


def save_resume(out: Path, rm: RewardModel, tok: Tokenizer, opt, scaler, step: int, is_main: bool = True) -> None:
    """Write out/ckpt.tmp, then swap it in, so a crash mid-write leaves the previous checkpoint intact. Under
    FSDP2 every rank writes its shards of weights and AdamW state to out/ckpt/sharded (torch.distributed
    .checkpoint) and rank 0 the config and tokenizer beside them."""
    if is_sharded(rm):
        save_sharded_state(out / "ckpt" / "sharded", {"rm": rm}, {"rm": opt},
                           {"step": step, "torch_rng": torch.get_rng_state().tolist()})
        if is_main:
            write_json_atomic(out / "ckpt" / "config.json", rm.config.to_dict())
            tok.save(out / "ckpt")
        return
    if not is_main:
        return
    tmp, final, old = out / "ckpt.tmp", out / "ckpt", out / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    rm.save_pretrained(tmp, tokenizer=tok)
    buf = io.BytesIO()
    torch.save({"step": step, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state()}, buf)
    write_bytes_atomic(tmp / "state.pt", buf.getvalue())
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find_resume_dir(path: str) -> Path:
    p = Path(path)
    for c in (p, p / "ckpt", p / "ckpt.old"):
        if ((c / "state.pt").is_file() and is_checkpoint_dir(c)) or (c / "sharded" / "extra.json").is_file():
            return c
    raise InputError(f"--resume {path}: no resume checkpoint (state.pt + model) there or in its ckpt/")


# ----------------------------------------------------------------------------------------------------------------
# Training


def check_inputs(cfg: Config) -> None:
    """Fail early, before anything is written, with what the user should run."""
    for spec in cfg.train_files + cfg.test_files:
        path, _ = parse_file_spec(spec)
        if not Path(path).is_file():
            hint = " (run `python data/toyworld.py` to build the toy world)" if "data/toy" in path else ""
            raise InputError(f"{path}: preference file not found{hint}")
    if not cfg.resume and not Path(cfg.init).is_dir() and "out/pretrain" in cfg.init:
        raise InputError(f"--init {cfg.init}: no such checkpoint folder (run `python pretrain.py` to build the "
                         f"toy base model)")
    if not cfg.resume:
        check_checkpoint_dir(cfg.init, "--init")
    if cfg.pku_filter not in ("all", "one_safe", "agree"):
        raise InputError(f"--pku_filter {cfg.pku_filter}: must be all|one_safe|agree")
    if cfg.max_len < 2:
        raise InputError(f"--max_len {cfg.max_len}: must be at least 2 (BOS + EOS)")
    check_settings(cfg, positive=("batch_size", "lr", "epochs", "eval_batch_size", "adam_eps"),
                   non_negative=("micro_batch_size", "max_train_pairs", "weight_decay", "grad_clip",
                                 "center_rewards_coef", "norm_pairs", "eval_every", "log_every", "save_every"),
                   fraction=("min_lr_ratio", "warmup_frac"))
    check_output_path(cfg.out)
    if cfg.fsdp and cfg.dtype == "fp16":
        raise InputError("--fsdp with --dtype fp16: use bf16 (FSDP2 keeps fp32 master weights; no loss scaling)")


def find_ceiling(test_files: list[str]) -> float | None:
    """The toy world's card.json states the best accuracy its label noise allows; look next to the data."""
    for spec in test_files:
        for d in Path(parse_file_spec(spec)[0]).resolve().parents[:2]:
            card = d / "card.json"
            if card.is_file():
                try:
                    c = json.loads(card.read_text())
                except json.JSONDecodeError:
                    return None
                v = c.get("rm_accuracy_ceiling", c.get("preference", {}).get("rm_accuracy_ceiling")
                          if isinstance(c.get("preference"), dict) else None)
                return float(v) if isinstance(v, (int, float)) else None
    return None


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(Config, argv, description=__doc__.split("\n")[0])
    t_start = time.time()
    dist_info = init_distributed(cfg.device)
    ddp, rank, world, is_main = dist_info.ddp, dist_info.rank, dist_info.world_size, dist_info.is_main
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype, dist_info.local_rank)
    if ddp and device.type == "cpu":  # ranks share the cores; oversubscription slows everyone down
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))

    # -- setup: data and model, all checked before any output is written ----------------------------------------
    check_inputs(cfg)
    out = Path(cfg.out)
    resume_dir = find_resume_dir(cfg.resume) if cfg.resume else None
    if resume_dir is not None:
        saved = json.loads((resume_dir.parent / "config.json").read_text()) if (
            resume_dir.parent / "config.json").is_file() else {}
        diff = [k for k, v in dataclasses.asdict(cfg).items()
                if k not in RESUME_FREE_FIELDS and k in saved and saved[k] != v]
        if diff:
            raise InputError(f"--resume: {diff[0]} is {getattr(cfg, diff[0])!r} but the interrupted run "
                             f"used {saved[diff[0]]!r}; resume with the same settings")
    train_pairs, train_stats = load_mixture(cfg.train_files, cfg.pku_filter, cfg.skip_bad_rows, cfg.seed)
    test_pairs, test_stats = load_mixture(cfg.test_files, cfg.pku_filter, cfg.skip_bad_rows, cfg.seed + 1)
    if not test_pairs:
        raise InputError(f"{', '.join(cfg.test_files)}: no usable test pairs (empty file?); the test accuracy "
                         f"would be undefined")
    if cfg.max_train_pairs:
        train_pairs = random.Random(cfg.seed).sample(train_pairs, min(cfg.max_train_pairs, len(train_pairs)))
    tok = Tokenizer.from_file(resume_dir or cfg.tokenizer or cfg.init)
    train_enc = encode_pairs(train_pairs, tok, cfg.max_len, train_stats)
    test_enc = encode_pairs(test_pairs, tok, cfg.max_len, test_stats)

    B = cfg.batch_size
    micro_bs = cfg.micro_batch_size or B // world
    if micro_bs < 1 or B % (micro_bs * world):
        raise InputError(f"--batch_size {B}: must be a multiple of micro_batch_size {micro_bs} x "
                         f"{world} ranks (the global batch is what you set; per-rank sizes are derived)")
    accum = B // (micro_bs * world)
    steps_per_epoch = len(train_pairs) // B  # the last incomplete batch is dropped so every step has B pairs
    if steps_per_epoch == 0:
        raise InputError(f"{', '.join(cfg.train_files)}: {len(train_pairs)} training pairs are fewer than "
                         f"--batch_size {B}")
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    warmup = round(cfg.warmup_frac * total_steps)

    torch.manual_seed(cfg.seed)  # the same head init on every rank
    sharded_resume = resume_dir is not None and (resume_dir / "sharded").is_dir()  # weights come with the shards
    rm = (RewardModel.from_pretrained(resume_dir) if resume_dir and not sharded_resume else
          RewardModel.from_pretrained(cfg.init) if is_reward_model_dir(cfg.init) else
          RewardModel.from_causal_lm(cfg.init))
    rm.config.pad_token_id = tok.pad_id
    check_tokenizer_fits(tok, rm.config.vocab_size, cfg.init)
    rm.to(device=device, dtype=torch.float32)  # fp32 master weights; autocast does bf16/fp16 matmuls
    model = parallelize(rm, dist_info, device, dtype, cfg.fsdp, cfg.grad_ckpt)  # DDP / FSDP2 / as is (detail 11)
    sharded = is_sharded(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), eps=cfg.adam_eps, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # one code path for all dtypes
    start_step = 0
    if resume_dir is not None and sharded:
        state = load_sharded_state(resume_dir / "sharded", {"rm": model}, {"rm": opt})
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        start_step = int(state["step"])
    elif resume_dir is not None:
        state = load_train_state(resume_dir / "state.pt", "resume from the ckpt.old beside it, or start again")
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        start_step = int(state["step"])
    model = torch.compile(model) if cfg.compile else model
    raw = rm  # unwrapped (nanoGPT's raw_model; under FSDP2 the sharded module): eval, saving

    n_params = count_params(rm)
    fpt_params = n_params - rm.model.embed_tokens.weight.numel()  # the embedding is a lookup, not a matmul
    mean_len = sum(len(c) + len(r) for c, r in train_enc) / (2 * len(train_enc))
    flops_per_pair = 2 * mean_len * flops_per_token(rm.config, int(mean_len), fpt_params)
    peak = peak_flops(device) if device.type == "cuda" else measure_matmul_peak(seconds=0.3)
    peak = peak * world if peak else None  # pairs/s below are global, so the ceiling is all ranks together

    # outputs start here: nothing above wrote anything
    logger = None
    if is_main:
        output_dir(out)
        write_json_atomic(out / "config.json", dataclasses.asdict(cfg))
        if resume_dir is not None and (out / "metrics.jsonl").is_file():  # drop rows after the checkpoint
            rows = [r for r in (out / "metrics.jsonl").read_text().splitlines() if r.strip()]
            keep = [r for r in rows if json.loads(r).get("step", 0) <= start_step]
            write_bytes_atomic(out / "metrics.jsonl", "".join(r + "\n" for r in keep).encode())
        logger = JsonlLogger(out / "metrics.jsonl")
    log(f"reward model: {n_params / 1e6:.2f}M params from {resume_dir or cfg.init} | {len(train_pairs)} train "
        f"pairs, {len(test_pairs)} test pairs | {total_steps} steps x {B} pairs (world {world}, micro "
        f"{micro_bs}, accum {accum}) | {device} {str(dtype).removeprefix('torch.')}"
        + (f" | resuming at step {start_step}" if start_step else ""))
    longest = max(len(s) for pair in train_enc + test_enc for s in pair)
    if longest > rm.config.max_position_embeddings:  # RoPE still runs, but the base never saw such positions
        log(f"warning: sequences of up to {longest} tokens exceed the model's max_position_embeddings "
            f"{rm.config.max_position_embeddings}; consider --max_len {rm.config.max_position_embeddings}")
    if train_stats.skipped_bad or train_stats.dropped_identical or train_stats.dropped_empty:
        log(f"train data: {train_stats.skipped_bad} bad rows skipped, {train_stats.dropped_identical} identical "
            f"and {train_stats.dropped_empty} empty pairs dropped")

    def global_batch(step: int) -> list[int]:
        """The B pair indices of an optimizer step: a function of (seed, step) only, so resume and any
        world size see the same data."""
        epoch, j = divmod(step, steps_per_epoch)
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        return torch.randperm(len(train_pairs), generator=g)[j * B:(j + 1) * B].tolist()

    pad = tok.pad_id
    sums = torch.zeros(7, dtype=torch.float64)  # loss, correct, margin, chosen, rejected, pairs, tokens
    t_log = t_loop = time.time()
    step = start_step
    stop_at = total_steps if cfg.max_steps < 0 else min(total_steps, cfg.max_steps)
    model.train()
    while step < stop_at:
        # -- one optimizer step over the global batch -------------------------------------------------------------
        lr = cosine_lr(step, warmup, total_steps, cfg.lr, cfg.min_lr_ratio)
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        per_rank = global_batch(step)[rank * (B // world):(rank + 1) * (B // world)]
        for micro in range(accum):
            idx = per_rank[micro * micro_bs:(micro + 1) * micro_bs]
            seqs = [train_enc[i][0] for i in idx] + [train_enc[i][1] for i in idx]  # detail 6: one forward
            ids, mask = pad_batch(seqs, pad, side="right")  # detail 4
            ids, mask = ids.to(device), mask.to(device)
            margin = torch.tensor([cfg.margin if train_pairs[i].margin is None else train_pairs[i].margin
                                   for i in idx], device=device)
            with gradient_sync(model, micro == accum - 1):  # reduce once, at the last micro-step
                with autocast_ctx(device, dtype):
                    r = model(ids, mask)  # (2b,)
                rc, rr = r[:len(idx)], r[len(idx):]
                loss = bradley_terry_loss(rc, rr, margin, cfg.center_rewards_coef)
                scaler.scale(loss / accum).backward()
            with torch.no_grad():
                d = (rc - rr).double().cpu()
                sums += torch.tensor([loss.item() * len(idx), (d > 0).sum().item(), d.sum().item(),
                                      rc.double().sum().item(), rr.double().sum().item(), len(idx),
                                      mask.sum().item()], dtype=torch.float64)
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)
            clip_grad_norm(model.parameters(), cfg.grad_clip)  # over the shards of all ranks under FSDP2
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1

        # -- logging: statistics reduced over ranks -------------------------------------------------------------
        if (cfg.log_every and step % cfg.log_every == 0) or step == stop_at:
            if ddp:
                import torch.distributed as dist
                reduced = sums.to(device)  # nccl reduces CUDA tensors only; gloo takes CPU ones
                dist.all_reduce(reduced)
                sums = reduced.cpu()
            n = max(1.0, sums[5].item())
            dt = time.time() - t_log
            pairs_s = sums[5].item() / dt
            row = {"step": step, "time": round(time.time() - t_start, 3), "lr": lr,
                   "loss": sums[0].item() / n, "accuracy": sums[1].item() / n, "margin": sums[2].item() / n,
                   "chosen": sums[3].item() / n, "rejected": sums[4].item() / n, "pairs_per_s": pairs_s,
                   "tokens_per_s": sums[6].item() / dt,
                   "mfu": pairs_s * flops_per_pair / peak if peak else None}
            log(f"step {step}/{total_steps} | loss {row['loss']:.4f} | train acc {row['accuracy']:.3f} | margin "
                f"{row['margin']:+.3f} | lr {lr:.2e} | {pairs_s:.1f} pairs/s"
                + (f" | {100 * row['mfu']:.1f}% of {'GPU' if device.type == 'cuda' else 'CPU matmul'} peak"
                   if row["mfu"] is not None else "")
                + f" | {eta(step - start_step, stop_at - start_step, time.time() - t_loop)}")
            if logger:
                logger.log(row)
            sums.zero_()
            t_log = time.time()
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            with autocast_ctx(device, dtype):
                ev = evaluate(raw, test_pairs, test_enc, pad, cfg.eval_batch_size, rank, world, ddp)
            log(f"eval step {step}: test accuracy {ev['accuracy']:.4f} | margin {ev['margin']:+.3f}")
            if logger:
                logger.log({"step": step, "time": round(time.time() - t_start, 3),
                            **{f"eval/{k}": v for k, v in ev.items() if not isinstance(v, dict)}})
            model.train()
        if cfg.save_every and step % cfg.save_every == 0 and step < stop_at:
            save_resume(out, raw, tok, opt, scaler, step, is_main)

    if step < total_steps:  # stopped early by --max_steps: leave a resumable checkpoint, no final model
        save_resume(out, raw, tok, opt, scaler, step, is_main)
        if is_main:
            summary = {"status": "stopped", "step": step, "total_steps": total_steps,
                       "resume_with": f"--resume {out}", "wall_time_s": round(time.time() - t_start, 2)}
            write_json_atomic(out / "summary.json", summary)
            log(f"stopped at step {step}/{total_steps}; continue with: python reward_model.py --resume {out} "
                f"(and the same flags)")
        cleanup_distributed()
        return {"status": "stopped", "step": step}

    # -- final evaluation, reward statistics (detail 9), HF-format save ----------------------------------------
    with autocast_ctx(device, dtype):
        test = evaluate(raw, test_pairs, test_enc, pad, cfg.eval_batch_size, rank, world, ddp)
    norm_idx = sorted(random.Random(cfg.seed + 2).sample(range(len(train_enc)),
                                                         min(len(train_enc), cfg.norm_pairs or len(train_enc))))
    with autocast_ctx(device, dtype):
        rc, rr = score_pairs(raw, [train_enc[i] for i in norm_idx], pad, cfg.eval_batch_size, rank, world, ddp)
    r_all = torch.cat([rc, rr])
    raw.config.extra["reward_mean"] = r_all.mean().item()
    raw.config.extra["reward_std"] = r_all.std().item() if len(r_all) > 1 else 1.0
    ceiling = find_ceiling(cfg.test_files)
    wall = time.time() - t_start
    summary = {
        "status": "done", "steps": total_steps, "test": test,
        "test_accuracy": test["accuracy"], "test_margin": test["margin"],
        "test_chosen_mean": test["chosen"], "test_rejected_mean": test["rejected"],
        "accuracy_by_source": test["accuracy_by_source"], "accuracy_by_turns": test["accuracy_by_turns"],
        "accuracy_ceiling": ceiling, "reward_mean": raw.reward_mean, "reward_std": raw.reward_std,
        "reward_stats_responses": len(r_all),
        "train_data": dataclasses.asdict(train_stats), "test_data": dataclasses.asdict(test_stats),
        "params": n_params, "wall_time_s": round(wall, 2), "world_size": world,
        "final_dir": str(out / "final"),
    }
    if sharded:  # rank 0 writes the HF folder from the gathered weights, in bf16 when training in bf16
        sd = full_state_dict(raw)
        if is_main:
            save_dtype = dtype if dtype == torch.bfloat16 else torch.float32
            raw = RewardModel.from_state_dict(raw.config, {k: v.to(save_dtype) for k, v in sd.items()})
    if is_main:
        raw.save_pretrained(out / "final", tokenizer=tok)
        write_json_atomic(out / "summary.json", summary)
        logger.log({"step": total_steps, "time": round(wall, 3),
                    **{f"test/{k}": v for k, v in test.items() if not isinstance(v, dict)}})
    cleanup_distributed()
    log(f"reward model done in {wall:.0f}s: test accuracy {test['accuracy']:.4f}"
        + (f" (label-noise ceiling {ceiling:.4f})" if ceiling is not None else "")
        + f", margin {test['margin']:+.3f}, reward mean {raw.reward_mean:+.3f} std {raw.reward_std:.3f}"
        f" -> {out / 'final'}")
    return summary


if __name__ == "__main__":
    cli(main)
