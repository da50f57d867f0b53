"""A Mistral-style decoder-only transformer that reads and writes real Mistral checkpoints.

What the Mistral reference keeps with its model lives here: the config, the layers, the KV cache and `generate`,
checkpoint I/O in the Hugging Face layout (and the Mistral-native one), and the tokenizer. Script plumbing
(flags, torchrun, dtype, logging, input errors) is in common.py.

    from model import MistralForCausalLM, Tokenizer
    model = MistralForCausalLM.from_pretrained("path/to/Mistral-7B-v0.1", dtype=torch.bfloat16)
    tok = Tokenizer.from_file("path/to/Mistral-7B-v0.1")

Implementation details (sources: Mistral's one-file reference `one_file_ref.py` and `mistral/model.py` in
mistralai/mistral-src; transformers `models/mistral/modeling_mistral.py` and `convert_mistral_weights_to_hf.py`):
 1. Module names equal the HF `MistralForCausalLM` state-dict keys, so an HF checkpoint is a plain
    `load_state_dict`; RoPE uses HF's rotate_half layout (modeling_mistral.py `rotate_half`).
 2. RMSNorm computes in fp32, casts back to the input dtype, *then* multiplies by the weight (Mistral, Meta and
    HF all use this order: one_file_ref.py `RMSNorm`, modeling_mistral.py `MistralRMSNorm`).
 3. RoPE cos/sin tables are built in fp32 even under autocast (bf16 angles lose precision at long context).
 4. Grouped-query attention through `scaled_dot_product_attention(enable_gqa=True)`: query head h reads
    KV head h // (n_heads / n_kv_heads), the same layout as the reference's `repeat_interleave` of KV heads.
 5. Sliding window: token i sees keys j with i - W < j <= i, i.e. at most W keys *including itself* (mistral-src
    `model.py` through xformers' local attention mask, and HF's `kv_idx > q_idx - W` overlay; the one-file
    reference's tril/triu band admits W + 1, an off-by-one we do not copy).
 6. Padding never shifts positions: the first real token of every row is position 0 (left or right padding).
 7. KV cache: preallocated; with a sliding window it is a rolling buffer of W slots (position p lives in slot
    p mod W). RoPE is applied before caching, so slot order does not matter to attention (mistral-src's
    rolling-buffer cache).
 8. Missing `rope_theta`: 1e4 when a sliding window is set (v0.1), else 1e6 (v0.2+), with a warning; it is
    also read from `rope_parameters` (transformers v5 configs).
 9. Mistral-native `consolidated.safetensors` loads through one rename + the q/k RoPE permutation (the key map
    and `permute` of transformers' convert_mistral_weights_to_hf.py).
10. Checkpoints are safetensors + JSON, written file by file under a temporary name and renamed (atomic);
    shards above `max_shard_size` get a `model.safetensors.index.json`; `rotary_emb.inv_freq` keys are ignored.
11. Decoding one token (`decode_step`) has three modes (`model.decode_mode`). "eager" is the reference: the
    general forward with the cache (masks planned per call). "static" (the default) is one fixed step over the
    preallocated cache: the new token's keys go into slot `cache.seen` in place, attention reads the slots
    written so far under the valid-slot mask, weights are read as (in, out) matrices (`decode_weights`) and RoPE
    from per-cache tables, so each step is the same ~20 ops per layer with no per-call planning. "compile" is
    that step through `torch.compile` with automatic dynamic shapes (on CPU with the attention written as
    products and sums, which inductor turns into loops over the cache): the second call recompiles with the
    slot count symbolic, and that graph then serves every step and every later generation (the cache length is
    rounded up to a multiple of 64 so few cache shapes occur). The route is gpt-fast's static-cache decode
    (github.com/pytorch-labs/gpt-fast `generate.py`). A rolling sliding-window cache and FSDP-sharded weights
    take the eager path.
12. The training loss (`forward(ids, targets=, weights=)`) never holds the (B, T, V) logits: the LM head and the
    cross-entropy run together over chunks of ~4M logits, and the chunk's gradients (softmax - one-hot, times
    the token weight) go straight into dh and dW while the chunk is in cache; backward only scales them by the
    incoming gradient. Same matmuls as head + `F.cross_entropy`, fewer passes over the logits, and at a 32K
    vocabulary ~1 GB less memory per 4K tokens (logits and their gradient). The idea is the one of Liger
    Kernel's fused linear cross-entropy (github.com/linkedin/Liger-Kernel), written here in plain PyTorch.
13. Causal attention without padding (`causal_attention`): PyTorch's CPU flash-attention kernel (torch 2.13)
    multiplies every query with all keys up to T = 512 and masks afterwards (causal and full attention take
    the same time there), so on CPU at T = 256-1024 the queries are split into blocks of 64-128 and each block
    reads only the keys up to its last position: the same result to float rounding, 1.1-1.4x faster forward +
    backward (bench/bench_attention.py, docs/model.md). Below 256 and from 2048 on one call is as fast; on GPU
    the flash kernels skip those blocks themselves, and one call stays.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import InputError, write_bytes_atomic, write_json_atomic

# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    vocab_size: int = 32000  # model vocab (may be padded above the tokenizer's true size)
    hidden_size: int = 4096  # residual width ("dim" in params.json)
    intermediate_size: int = 14336  # SwiGLU hidden width ("hidden_dim")
    num_hidden_layers: int = 32  # transformer blocks
    num_attention_heads: int = 32  # query heads
    num_key_value_heads: int = 8  # KV heads (GQA); must divide num_attention_heads
    head_dim: int | None = None  # per-head width; None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 32768  # longest position the config promises (not the training length)
    rms_norm_eps: float = 1e-5  # Mistral's checkpoints say 1e-5 (the HF class default 1e-6 is wrong for them)
    rope_theta: float | None = None  # None -> rule of detail 8
    sliding_window: int | None = None  # W keys including self; None = full causal attention
    tie_word_embeddings: bool = False  # Mistral: separate lm_head
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None  # Mistral ships none; our tokenizers add one distinct from EOS
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    attention_dropout: float = 0.0  # kept for HF parity; RLHF needs dropout off, so it is never applied
    torch_dtype: str | None = None  # dtype the weights were saved in ("bfloat16", "float32", ...)
    extra: dict = field(default_factory=dict)  # unknown config.json fields, written back unchanged

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"config: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim {self.head_dim} must be even for RoPE")
        if isinstance(self.sliding_window, str):  # HF's converter: "may sometimes be a string"
            self.sliding_window = int(self.sliding_window)
        if self.sliding_window is not None and self.sliding_window <= 0:
            self.sliding_window = None
        if self.rope_theta is None:
            rope = self.extra.get("rope_parameters") or {}
            if "rope_theta" in rope:
                self.rope_theta = float(rope["rope_theta"])
            else:  # detail 8
                self.rope_theta = 1e4 if self.sliding_window else 1e6
                warnings.warn(f"config has no rope_theta; using {self.rope_theta:g} "
                              f"(sliding_window={self.sliding_window})", stacklevel=2)
        if self.hidden_act != "silu":
            raise ValueError(f"config: hidden_act {self.hidden_act!r} is not supported (Mistral uses silu)")

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if isinstance(known.get("eos_token_id"), list):  # some configs list several EOS ids
            extra["eos_token_ids"] = known["eos_token_id"]
            known["eos_token_id"] = known["eos_token_id"][0]
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d = {**self.extra, **d}
        d.setdefault("architectures", ["MistralForCausalLM"])
        d.setdefault("model_type", "mistral")
        return d


def check_architecture(cfg: ModelConfig, path: Any, causal_lm: bool) -> None:
    """A folder of the wrong kind says what it holds: a reward model where a causal LM is needed, or the reverse."""
    arch = (cfg.extra.get("architectures") or ["MistralForCausalLM"])[0]
    if causal_lm and arch.endswith("ForSequenceClassification"):
        raise InputError(f"{path}: this folder holds a reward model ({arch}); a causal LM (MistralForCausalLM) "
                         f"is needed here")
    if not causal_lm and arch.endswith("ForCausalLM"):
        raise InputError(f"{path}: this folder holds a causal LM ({arch}); a reward model "
                         f"(MistralForSequenceClassification, as reward_model.py writes) is needed here")


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read an HF `config.json` (a folder or the file itself)."""
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise InputError(f"{p}: no config.json (is this an HF checkpoint folder?)")
    try:
        d = json.loads(p.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"{p}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else str(p)
        raise InputError(f"{where}: invalid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(d, dict):
        raise InputError(f"{p}:1: expected a JSON object, got {type(d).__name__}")
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise InputError(f"{p}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Small pure functions


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin for integer positions (any shape) -> (*positions.shape, head_dim), HF layout."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (..., hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # dim j and j + hd/2 share a frequency (rotate_half)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, n, hd); cos/sin: (B, T, hd) fp32. Rotation in fp32, result in x's dtype."""
    xf = x.float()
    out = xf * cos[:, :, None] + rotate_half(xf) * sin[:, :, None]
    return out.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back to x's dtype, then times the weight (detail 2)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # the fused kernel of exactly that
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def positions_from_mask(attention_mask: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) 0/1 mask -> positions where each row's first real token is 0 (pads get a harmless 0)."""
    pos = attention_mask.long().cumsum(-1) - 1
    if offset is not None:
        pos = pos + offset[:, None]
    return pos.clamp(min=0)


def attention_allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor,
                      window: int | None) -> torch.Tensor:
    """Boolean (B, 1, Tq, Tk): query at position i may read key at position j iff the key is a real token,
    j <= i and (with a window W) j > i - W, i.e. at most W keys counting itself (detail 5)."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]  # (B, Tq, 1), (B, 1, Tk)
    allowed = k_valid[:, None, :] & (kp <= qp)
    if window is not None:
        allowed = allowed & (kp > qp - window)
    # a pad query may find no key at all; let it read everything so softmax stays finite (output unused)
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
    """Causal SDPA, q (B, nh, T, hd), k/v (B, nkv, T, hd) -> (B, nh, T, hd) (detail 13). On CPU for 256 <= T
    <= 1024 the queries go in blocks of c (64 at T = 256, else 128): block i reads keys [0, (i + 1) c), the
    last c of them under the causal mask, so the keys above the diagonal are never multiplied. Elsewhere one
    `is_causal` call."""
    T = q.shape[2]
    c = 64 if T <= 256 else 128
    if q.device.type != "cpu" or not 256 <= T <= 1024 or T % c or k.shape[2] != T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    out = []
    for i in range(T // c):
        n = (i + 1) * c  # keys this block reads; query r of the block (position i c + r) reads keys j <= i c + r
        allowed = None if i == 0 else torch.ones(c, n, dtype=torch.bool, device=q.device).tril(i * c)
        out.append(F.scaled_dot_product_attention(q[:, :, i * c:n], k[:, :, :n], v[:, :, :n], attn_mask=allowed,
                                                  is_causal=i == 0, enable_gqa=enable_gqa))
    return torch.cat(out, 2)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) under softmax(logits), in fp32. logits (..., V), labels (...) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to a (B, T) LongTensor and its 0/1 attention mask."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


class LMHeadCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(h_i @ W^T, t_i) in fp32, chunk by chunk, gradients computed in the forward (detail 12).
    h (N, H), W (V, H), t (N,) ids in [0, V), w (N,) fp32 -> scalar. Under autocast the chunk matmul runs in
    the autocast dtype; softmax, loss and the dW accumulator stay fp32."""

    @staticmethod
    def forward(ctx, h, weight, targets, w, grad_enabled: bool):
        N, V = h.shape[0], weight.shape[0]
        # needs_input_grad says True under no_grad too, so the caller's grad mode is passed in (evaluation
        # must not pay for the two gradient matmuls)
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        mm_dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        Wm = weight.to(mm_dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
        dW = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        rows = max(256, 2**22 // V)  # ~4M logits (16 MB fp32) per chunk
        for i in range(0, N, rows):
            hc, tc, wc = h[i : i + rows].to(mm_dtype), targets[i : i + rows], w[i : i + rows]
            z = (hc @ Wm.t()).float()  # (c, V) logits of this chunk
            z.sub_(z.amax(-1, keepdim=True))
            zt = z.gather(1, tc[:, None]).squeeze(1)  # the target's (shifted) logit, before exp
            z.exp_()
            s = z.sum(-1)
            loss += (wc * (s.log() - zt)).sum()  # log-sum-exp - target logit
            if need_h or need_w:
                z.mul_((wc / s)[:, None])  # w * softmax
                z[torch.arange(len(tc), device=z.device), tc] -= wc  # w * (softmax - one-hot) = dloss/dz
                if need_h:
                    dh[i : i + rows] = z.to(mm_dtype) @ Wm
                if need_w:
                    dW.addmm_(z.t(), hc.float())
        ctx.save_for_backward(dh, dW)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        dh, dW = ctx.saved_tensors
        return (None if dh is None else dh * g.to(dh.dtype),
                None if dW is None else (dW * g).to(ctx.weight_dtype), None, None, None)


# ----------------------------------------------------------------------------------------------------------------
# The model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class KVCache:
    """Preallocated keys/values for every layer. Without a sliding window it holds `max_len` slots; with one,
    a rolling buffer of W slots (detail 7). `pos`/`valid` describe each slot for the attention mask."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        W = cfg.sliding_window
        self.rolling = W is not None and W < max_len
        self.size = W if self.rolling else max_len
        shape = (batch, cfg.num_key_value_heads, self.size, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.pos = torch.zeros(batch, self.size, dtype=torch.long, device=device)  # RoPE position per slot
        self.valid = torch.zeros(batch, self.size, dtype=torch.bool, device=device)  # real token in slot?
        self.seen = 0  # tokens (incl. pads) written so far
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # real tokens seen per row
        self.window = W  # sliding window (keys including self), also applied when the buffer is not rolling
        self.plan: dict | None = None  # how the current forward reads/writes the cache (set by the model)
        self.fast: bool | None = None  # decode_step takes the static path (decided at its first call)
        self.weights: dict | None = None  # the static step's weight layout (model.decode_weights)
        self.rope: tuple | None = None  # the static step's (cos, sin) tables for positions 0..size-1


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.hd), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv, self.hd), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n, T, hd)
        if cache is not None:
            plan = cache.plan
            ck, cv = cache.k[layer], cache.v[layer]
            new_k, new_v = k[:, :, plan["src"]].to(ck.dtype), v[:, :, plan["src"]].to(cv.dtype)
            if plan["write_first"]:  # the slots overwritten are not needed by this forward's queries
                ck.index_copy_(2, plan["slots"], new_k)
                cv.index_copy_(2, plan["slots"], new_v)
                k, v = ck[:, :, : plan["n_keys"]], cv[:, :, : plan["n_keys"]]
            else:  # chunked prefill into a rolling buffer: read [old slots, chunk] before overwriting
                k_all, v_all = torch.cat([ck, k.to(ck.dtype)], 2), torch.cat([cv, v.to(cv.dtype)], 2)
                ck.index_copy_(2, plan["slots"], new_k)
                cv.index_copy_(2, plan["slots"], new_v)
                k, v = k_all, v_all
            k, v = k.to(q.dtype), v.to(q.dtype)
        if mask is None:
            y = causal_attention(q, k, v, enable_gqa=self.n_kv != self.n_heads)
        else:  # mask: (B, 1, T, S) bool
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # w1
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # w3
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)  # w2

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)  # pre-norm residual
        return x + self.mlp(self.post_attention_layernorm(x))


class MistralModel(nn.Module):
    """The backbone: embeddings, blocks, final norm. Returns hidden states (B, T, hidden)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False  # recompute each layer in backward instead of storing activations

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                output_hidden_states: bool = False):
        B, T = input_ids.shape
        cfg, dev = self.config, input_ids.device
        valid = (attention_mask.bool() if attention_mask is not None
                 else torch.ones(B, T, dtype=torch.bool, device=dev))
        if position_ids is None:
            position_ids = positions_from_mask(valid, cache.next_pos if cache is not None else None)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)  # fp32 (detail 3)

        if cache is None:
            fits_window = cfg.sliding_window is None or T <= cfg.sliding_window
            mask = None if (attention_mask is None and fits_window) else attention_allowed(
                position_ids, position_ids, valid, cfg.sliding_window)
        else:
            mask = self._plan_cache(cache, position_ids, valid)

        h = self.embed_tokens(input_ids)
        hidden = [h] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache, i)
            if output_hidden_states:
                hidden.append(h)
        if cache is not None:
            self._commit_cache(cache, position_ids, valid)
        h = self.norm(h)
        return (h, hidden) if output_hidden_states else h

    @staticmethod
    def _plan_cache(cache: KVCache, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Decide where this forward's T tokens go in the cache and build the matching (B,1,T,S) mask."""
        T = pos.shape[1]
        if not cache.rolling and cache.seen + T > cache.size:
            raise ValueError(f"KV cache full: {cache.seen} + {T} tokens > {cache.size} slots")
        n_write = min(T, cache.size)  # a chunk longer than the buffer only keeps its last W tokens
        src = torch.arange(T - n_write, T, device=pos.device)
        slots = (cache.seen + src) % cache.size
        write_first = not cache.rolling or T == 1
        if write_first:
            n_keys = cache.size if cache.rolling else cache.seen + T
            k_pos, k_valid = cache.pos.clone(), cache.valid.clone()
            k_pos[:, slots], k_valid[:, slots] = pos[:, src], valid[:, src]
            k_pos, k_valid = k_pos[:, :n_keys], k_valid[:, :n_keys]
        else:
            n_keys = cache.size + T
            k_pos, k_valid = torch.cat([cache.pos, pos], 1), torch.cat([cache.valid, valid], 1)
        mask = attention_allowed(pos, k_pos, k_valid, cache.window)
        cache.plan = {"src": src, "slots": slots, "write_first": write_first, "n_keys": n_keys}
        return mask

    @staticmethod
    def _commit_cache(cache: KVCache, pos: torch.Tensor, valid: torch.Tensor) -> None:
        src, slots = cache.plan["src"], cache.plan["slots"]
        cache.pos[:, slots], cache.valid[:, slots] = pos[:, src], valid[:, src]
        cache.seen += pos.shape[1]
        cache.next_pos += valid.long().sum(1)
        cache.plan = None


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (B, P + N): left-padded prompt, then the new tokens (pad after a row's EOS)
    response_ids: torch.Tensor  # (B, N)
    response_mask: torch.Tensor  # (B, N) 1 up to and including the first EOS
    logprobs: torch.Tensor | None  # (B, N) fp32 log-probs of the sampled tokens under logits / temperature


class MistralForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = MistralModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        self.decode_mode = "static"  # detail 11: "eager" (reference), "static" or "compile"

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.device.type != "meta":
            nn.init.normal_(m.weight, mean=0.0, std=self.config.initializer_range)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, first_logit: int = 0,
                targets: torch.Tensor | None = None, weights: torch.Tensor | None = None):
        """-> fp32 logits (B, T - first_logit, V): the LM head runs only from position `first_logit` on (PPO
        needs the response's logits only; the prompt's would be computed, differentiated and thrown away).
        With `targets` (B, T) (and optional `weights` (B, T), default 1): -> the fp32 scalar
        sum_t weights * cross-entropy(logits_t, targets_t), without materialising the logits (detail 12)."""
        h = self.model(input_ids, attention_mask, position_ids, cache)
        if targets is None:
            return self.lm_head(h[:, first_logit:] if first_logit else h).float()
        if first_logit:
            raise ValueError("first_logit and targets do not combine")
        w = torch.ones(targets.shape, device=h.device) if weights is None else weights.float()
        return LMHeadCrossEntropy.apply(h.flatten(0, -2), self.lm_head.weight, targets.flatten(), w.flatten(),
                                        torch.is_grad_enabled())

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())  # tied weights once
        return n - self.model.embed_tokens.weight.numel() if exclude_embeddings else n

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        dtype = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else p.dtype
        if self.decode_mode == "compile":  # detail 11: a few cache lengths, so a few compiled graphs
            max_len = -(-max_len // 64) * 64
        return KVCache(self.config, batch, max_len, p.device, dtype)

    def decode_step(self, tok: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one token per row (B,) after the tokens already in `cache`; -> fp32 logits (B, V) (detail 11)."""
        if cache.fast is None:  # decided once per cache
            cache.fast = self.decode_mode != "eager" and not cache.rolling and not _has_dtensor(self)
        if not cache.fast:
            return self(tok[:, None], torch.ones_like(tok[:, None]), cache=cache)[:, -1]
        if cache.seen >= cache.size:
            raise ValueError(f"KV cache full: {cache.seen} + 1 tokens > {cache.size} slots")
        slot, pos = cache.seen, cache.next_pos
        cache.pos[:, slot], cache.valid[:, slot] = pos, True
        if cache.weights is None:
            cache.weights = decode_weights(self)
        cfg = self.config
        if cache.rope is None:  # positions never exceed the slots written, so `size` rows cover every step
            cache.rope = rope_cos_sin(torch.arange(cache.size, device=tok.device), cfg.head_dim, cfg.rope_theta)
        dims = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps)
        compiled = self.decode_mode == "compile"
        step = _compiled_decode_step() if compiled else static_decode_step
        logits = step(cache.weights, dims, tok, pos, cache.rope, torch.tensor(slot, device=tok.device), cache.k,
                      cache.v, cache.valid, slot + 1, loops=compiled and tok.device.type == "cpu")
        cache.seen += 1
        cache.next_pos += 1
        return logits

    def generate(self, input_ids: torch.Tensor, *args, **kwargs) -> GenerateOutput:
        """Batched sampling with the KV cache; see `_generate` for the arguments. Runs under inference_mode
        (less per-op overhead than no_grad, which matters for batch-1 decoding) and returns ordinary tensors,
        so PPO can feed them to a training forward."""
        with torch.inference_mode():
            out = self._generate(input_ids, *args, **kwargs)
        return GenerateOutput(*(None if getattr(out, f.name) is None else getattr(out, f.name).clone()
                                for f in dataclasses.fields(out)))

    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 do_sample: bool = True, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None, return_logprobs: bool = False,
                 prefill_chunk: int | None = None, uniforms: torch.Tensor | None = None) -> GenerateOutput:
        """Batched sampling with the KV cache. Prompts must be LEFT padded (see `pad_batch`).

        `uniforms` (B, max_new_tokens) in [0, 1) replaces the generator: token t of row b is drawn by inverting
        the CDF at uniforms[b, t], so a row's sample depends on its own numbers only, not on which other rows
        share the batch (PPO draws them per global row, so any number of ranks samples the same episodes).

        Returned log-probs are those of the full distribution softmax(logits / temperature), before top-k/top-p
        filtering, because that is the policy PPO optimises (ICE-GRT/N+ detail: divide logits by temperature).
        """
        cfg = self.config
        eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
        pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None
                                                              else eos)
        greedy = (not do_sample) or temperature == 0
        B, P = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("generate: prompts must be left-padded (last column must be a real token)")
        cache = self.new_cache(B, P + max_new_tokens)
        chunk = prefill_chunk or P
        for s in range(0, P, chunk):  # the LM head runs on the prompt's last position only
            logits = self(input_ids[:, s:s + chunk], attention_mask[:, s:s + chunk], cache=cache,
                          first_logit=min(chunk, P - s) - 1)
        logits = logits[:, -1]
        out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=input_ids.device)
        lps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=input_ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        n = 0
        for t in range(max_new_tokens):
            scaled = logits.float() if greedy else logits.float() / temperature
            if greedy:
                tok = scaled.argmax(-1)
            else:
                probs = torch.softmax(filter_top_k_top_p(scaled, top_k, top_p), -1)
                if uniforms is None:
                    tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                else:  # inverse CDF: the first token whose cumulative probability reaches u
                    cdf = probs.cumsum(-1)
                    u = (uniforms[:, t:t + 1].to(cdf) * cdf[:, -1:]).contiguous()
                    tok = torch.searchsorted(cdf, u).squeeze(-1).clamp(max=probs.shape[-1] - 1)
            if return_logprobs:
                lps[:, t] = logprobs_from_logits(scaled, tok)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            out[:, t] = tok
            done |= tok == eos
            n = t + 1
            if done.all() or t == max_new_tokens - 1:
                break
            logits = self.decode_step(tok, cache)
        out, lps = out[:, :n], lps[:, :n]
        # 1 up to and including the first EOS; 0 after it
        is_eos = (out == eos).long()
        after_eos = (is_eos.cumsum(1) - is_eos) > 0
        resp_mask = (~after_eos).long()
        lps = lps * resp_mask
        return GenerateOutput(torch.cat([input_ids, out], 1), out, resp_mask, lps if return_logprobs else None)

    # -- checkpoints ----------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> MistralForCausalLM:
        """Load an HF folder (config.json + safetensors) or a Mistral-native one (params.json +
        consolidated.safetensors). dtype None keeps the checkpoint's dtype."""
        path = Path(path)
        if (path / "params.json").is_file() and not (path / "config.json").is_file():
            cfg, sd = load_mistral_native(path)
        else:
            cfg = load_config(path)
            check_architecture(cfg, path, causal_lm=True)
            sd = load_safetensors_dir(path)
        model = cls.from_state_dict(cfg, sd, path)
        if dtype is not None:
            model.to(dtype)
        return model.to(device)

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, sd: dict[str, torch.Tensor], source: Any = "") -> MistralForCausalLM:
        """A model holding exactly these tensors (no copy, no init): HF key names, tied embeddings stored once."""
        sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
        if cfg.tie_word_embeddings and "model.embed_tokens.weight" in sd:  # HF stores the tied matrix once
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        with torch.device("meta"):
            model = cls(cfg)
        load_state_dict_strict(model, sd, source)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int = 5 * 10**9,
                        tokenizer: Tokenizer | None = None) -> None:
        sd = self.state_dict()
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight")  # HF drops the tied copy (safetensors refuses shared memory)
        save_safetensors_dir(path, sd, self.config.to_dict(), max_shard_size)
        if tokenizer is not None:
            tokenizer.save(path)


def decode_weights(model: MistralForCausalLM) -> dict:
    """The weights the static step reads, as (in, out) matrices for `x @ w`. On CPU, for models up to 1 GiB,
    transposed contiguous copies: MKL's GEMM with a few rows is ~1.6x faster on that layout than on `F.linear`'s
    (a micro-benchmark of the toy shape's matrices at 16 rows, docs/model.md); rebuilt once per cache, so
    weights updated between generations (PPO) are read fresh. Elsewhere transposed views, no copy. Tensors
    only, no modules: the compiled step checks (guards) its inputs on every call, and modules cost more checks
    than their weights (183 against 138 us a call at the toy shape, docs/model.md)."""
    p = model.lm_head.weight
    copy = p.device.type == "cpu" and sum(t.numel() * t.element_size() for t in model.parameters()) <= 2**30

    def mat(lin: nn.Linear) -> torch.Tensor:
        return lin.weight.detach().t().contiguous() if copy else lin.weight.detach().t()

    layers = [(L.input_layernorm.weight.detach(), mat(L.self_attn.q_proj), mat(L.self_attn.k_proj),
               mat(L.self_attn.v_proj), mat(L.self_attn.o_proj), L.post_attention_layernorm.weight.detach(),
               mat(L.mlp.gate_proj), mat(L.mlp.up_proj), mat(L.mlp.down_proj)) for L in model.model.layers]
    return {"embed": model.model.embed_tokens.weight.detach(), "layers": layers,
            "norm": model.model.norm.weight.detach(), "lm_head": mat(model.lm_head)}


def static_decode_step(w: dict, dims: tuple, tok: torch.Tensor, pos: torch.Tensor, rope: tuple,
                       slot: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor,
                       n: int, loops: bool = False) -> torch.Tensor:
    """One decode step (detail 11): token `tok` (B,) at RoPE position `pos` (B,) is written into cache slot
    `slot` (a 0-dim tensor, so a compiled graph does not specialise on it) of every layer, then attends to the
    first `n` = slot + 1 slots where `valid` (B, S) is set (the caller marks the new slot). `rope` = the (cos,
    sin) tables (S, hd) of positions 0..S-1, computed once per cache: looked up, not recomputed every step (the
    two lookups take 8 us against 23 us for the RoPE math run eagerly at batch 16, and inside a compiled graph
    the math would be inlined into, and recomputed in, the loop over the keys that reads q). `w` from
    `decode_weights`, `dims` = (query heads, KV heads, head_dim, rms_norm_eps). -> fp32 logits (B, V). The
    arithmetic of the general forward, with attention written out (q K^T, mask, softmax, V).

    `loops` (set when the step runs under torch.compile on CPU) writes the two attention products as
    element-wise products and sums, which inductor turns into loops over the cached keys and values; run
    eagerly those would materialise (B, heads, n, hd) tensors, so the uncompiled step keeps the batched matmuls
    (at batch 16 their 64 tiny GEMMs a call cost more than the loops: docs/model.md). GPUs keep the matmuls too
    (not measured there)."""
    nh, nkv, hd, eps = dims
    B = tok.shape[0]
    cos, sin = rope[0][pos][:, None], rope[1][pos][:, None]  # (B, 1, hd) fp32
    blocked = ~valid[:, None, None, :n]  # (B, 1, 1, n), broadcast over KV heads and their query groups
    h = F.embedding(tok[:, None], w["embed"])  # (B, 1, H)
    for i, (norm1, wq, wk, wv, wo, norm2, wg, wu, wd) in enumerate(w["layers"]):
        x = rms_norm(h, norm1, eps)
        q = apply_rope((x @ wq).view(B, 1, nh, hd), cos, sin)
        k = apply_rope((x @ wk).view(B, 1, nkv, hd), cos, sin)
        v = (x @ wv).view(B, 1, nkv, hd)
        keys[i][:, :, slot.view(1)] = k.transpose(1, 2).to(keys[i].dtype)  # index_put_: written in place
        values[i][:, :, slot.view(1)] = v.transpose(1, 2).to(values[i].dtype)
        # GQA: query head h reads KV head h // (nh / nkv) (detail 4); scores (B, nkv, nh/nkv, n)
        q = q.view(B, nkv, nh // nkv, hd)
        ks, vs = keys[i][:, :, :n].to(q.dtype), values[i][:, :, :n].to(q.dtype)
        if loops:
            scores = (q[:, :, :, None, :] * ks[:, :, None]).sum(-1) * hd**-0.5
        else:
            scores = (q @ ks.transpose(-1, -2)) * hd**-0.5
        probs = torch.softmax(scores.masked_fill(blocked, float("-inf")), -1)
        y = (probs[..., None] * vs[:, :, None]).sum(-2) if loops else probs @ vs  # (B, nkv, nh/nkv, hd)
        h = h + y.reshape(B, 1, nh * hd) @ wo
        x = rms_norm(h, norm2, eps)
        h = h + (F.silu(x @ wg) * (x @ wu)) @ wd  # SwiGLU
    return (rms_norm(h, w["norm"], eps) @ w["lm_head"])[:, 0].float()


_COMPILED_STEP = None


def _compiled_decode_step():
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(static_decode_step, dynamic=None, fullgraph=True)
    return _COMPILED_STEP


def _has_dtensor(model: nn.Module) -> bool:
    """Sharded (FSDP2) weights: the static step reads weights directly, so it needs them gathered."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus top-p set to -inf. logits (B, V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = (cum - torch.softmax(sorted_logits, -1)) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint I/O


def check_checkpoint_dir(path: str | os.PathLike, flag: str) -> None:
    """Refuse early, saying why, a path that is not a checkpoint folder (missing, no config, only .bin...)."""
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{flag} {p}: no such checkpoint folder")
    if not is_checkpoint_dir(p):
        if (p / "params.json").is_file():
            load_mistral_native(p)  # raises, naming what is missing
        load_config(p)
        load_safetensors_dir(p)


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (((p / "config.json").is_file() and (
        (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()))
        or ((p / "params.json").is_file() and (p / "consolidated.safetensors").is_file()))


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or corrupt file: name it
        raise InputError(f"{file}: cannot read safetensors file ({e}); is it truncated or corrupt?") from None


def load_safetensors_dir(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: `model.safetensors`, or the shards listed in the index."""
    p = Path(path)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise InputError(f"{index}: invalid index ({e!r}); expected {{'weight_map': {{name: file}}}}") from None
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (p / shard).is_file():
                raise InputError(f"{index}: names shard {shard!r}, which is not in {p}; is the download complete?")
            sd.update(_read_safetensors(p / shard))
        missing = set(weight_map) - set(sd)
        if missing:
            raise InputError(f"{index}: tensors listed but absent from shards: {sorted(missing)[:5]}")
        return sd
    if (p / "model.safetensors").is_file():
        return _read_safetensors(p / "model.safetensors")
    if p.is_file() and p.suffix == ".safetensors":
        return _read_safetensors(p)
    bins = sorted(f.name for f in p.glob("*.bin")) if p.is_dir() else []
    raise InputError(f"{p}: no model.safetensors or model.safetensors.index.json"
                     + (f" (only {bins[0]}: pickled .bin files are never loaded; convert them to safetensors in a "
                        f"trusted environment)" if bins else " (only safetensors checkpoints are read)"))


def save_safetensors_dir(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict,
                         max_shard_size: int = 5 * 10**9) -> None:
    """Write config.json + weights in the HF layout, each file atomically; shards above max_shard_size.

    The dtype keys are written from the tensors saved, in both spellings: transformers 5 reads "dtype" before
    "torch_dtype", so a stale "dtype" carried over from the loaded config would load an fp32 save as bf16."""
    from safetensors.torch import save as st_save
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    by_dtype: dict[str, int] = {}
    for v in tensors.values():
        if v.is_floating_point():
            name = str(v.dtype).removeprefix("torch.")
            by_dtype[name] = by_dtype.get(name, 0) + v.numel()
    if by_dtype:
        saved = max(by_dtype, key=by_dtype.get)
        config = {**config, "torch_dtype": saved, "dtype": saved}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    stale = set(p.glob("model*.safetensors")) | {p / "model.safetensors.index.json"}
    if len(shards) == 1:
        write_bytes_atomic(p / "model.safetensors", st_save(shards[0], metadata={"format": "pt"}))
        written = {p / "model.safetensors"}
    else:
        n = len(shards)
        weight_map, written = {}, set()
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            write_bytes_atomic(p / name, st_save(shard, metadata={"format": "pt"}))
            weight_map.update({k: name for k in shard})
            written.add(p / name)
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        write_json_atomic(p / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.add(p / "model.safetensors.index.json")
    for f in stale - written:
        f.unlink(missing_ok=True)
    write_json_atomic(p / "config.json", config)


def load_state_dict_strict(module: nn.Module, sd: dict[str, torch.Tensor], source: Any = "") -> None:
    """load_state_dict(assign=True) with errors naming the key and both shapes."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing:
        raise InputError(f"{source}: missing key {missing[0]!r} (expected shape {tuple(own[missing[0]].shape)})"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        raise InputError(f"{source}: unexpected key {unexpected[0]!r} (shape {tuple(sd[unexpected[0]].shape)})"
                         + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise InputError(f"{source}: key {k!r} has shape {tuple(sd[k].shape)} in the checkpoint but "
                             f"{tuple(v.shape)} in the model built from its config")
    module.load_state_dict(sd, strict=True, assign=True)


# Mistral-native <-> HF (transformers convert_mistral_weights_to_hf.py: key names and the q/k permutation)
_NATIVE_TO_HF = [
    (r"^tok_embeddings\.weight$", "model.embed_tokens.weight"),
    (r"^norm\.weight$", "model.norm.weight"),
    (r"^output\.weight$", "lm_head.weight"),
    (r"^layers\.(\d+)\.attention\.wq\.weight$", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"^layers\.(\d+)\.attention\.wk\.weight$", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"^layers\.(\d+)\.attention\.wv\.weight$", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"^layers\.(\d+)\.attention\.wo\.weight$", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w1\.weight$", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w3\.weight$", r"model.layers.\1.mlp.up_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w2\.weight$", r"model.layers.\1.mlp.down_proj.weight"),
    (r"^layers\.(\d+)\.attention_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^layers\.(\d+)\.ffn_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
]


def permute_native_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved RoPE pairs (2i, 2i+1) -> rotate_half pairs (j, j + hd/2): [n, hd/2, 2, dim] -> swap 1,2."""
    dim = w.shape[1]
    return w.view(n_heads, -1, 2, dim).transpose(1, 2).reshape(-1, dim)


def native_to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for pat, rep in _NATIVE_TO_HF:
            if re.match(pat, k):
                new = re.sub(pat, rep, k)
                break
        else:
            raise ValueError(f"Mistral-native checkpoint: unknown key {k!r}")
        if new.endswith("q_proj.weight"):
            v = permute_native_to_hf(v, cfg.num_attention_heads)
        elif new.endswith("k_proj.weight"):
            v = permute_native_to_hf(v, cfg.num_key_value_heads)
        out[new] = v
    return out


def config_from_params(params: dict) -> ModelConfig:
    """Mistral `params.json` -> ModelConfig (the field mapping of transformers' convert_mistral_weights_to_hf.py)."""
    d = {"hidden_size": params["dim"], "num_hidden_layers": params["n_layers"],
         "intermediate_size": params["hidden_dim"], "num_attention_heads": params["n_heads"],
         "num_key_value_heads": params.get("n_kv_heads", params["n_heads"]), "head_dim": params.get("head_dim"),
         "rms_norm_eps": params["norm_eps"], "vocab_size": params["vocab_size"],
         "sliding_window": params.get("sliding_window"), "rope_theta": params.get("rope_theta")}
    return ModelConfig.from_dict(d)


def load_mistral_native(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    p = Path(path)
    try:
        params = json.loads((p / "params.json").read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise InputError(f"{p / 'params.json'}:{e.lineno}: invalid JSON ({e.msg})") from None
    missing = [k for k in ("dim", "n_layers", "hidden_dim", "n_heads", "norm_eps", "vocab_size") if k not in params]
    if missing:
        raise InputError(f"{p / 'params.json'}: field {missing[0]!r} missing")
    cfg = config_from_params(params)
    if not (p / "consolidated.safetensors").is_file():
        raise InputError(f"{p}: no consolidated.safetensors (pickled consolidated.00.pth is not loaded; "
                                f"convert it to safetensors in a trusted environment first)")
    return cfg, native_to_hf_state_dict(_read_safetensors(p / "consolidated.safetensors"), cfg)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer

SPECIALS = ["<unk>", "<s>", "</s>"]
PAD_TOKEN = "<pad>"


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer`: BOS once at the start, EOS on request, a PAD that is not EOS.

    The padding rule (one place for every script): a tokenizer with a `<pad>` token pads with it; one without
    (every real Mistral tokenizer) pads with `<unk>` (id 0), an id *inside* the vocabulary, so the model needs
    no extra embedding row. Padded positions are masked everywhere, so the id never reaches a loss or a score;
    pad == EOS is avoided because it would hide real EOS tokens. No token is ever added, so the saved
    tokenizer.json keeps the checkpoint's ids exactly.

    Spaces follow SentencePiece (and transformers' Mistral tokenizer): a "▁" dummy prefix is added to every
    text and stripped once on decode, so `decode(encode(" Hello")) == " Hello"`."""

    def __init__(self, tk):
        self.tk = tk
        self.bos_id = tk.token_to_id("<s>")
        self.eos_id = tk.token_to_id("</s>")
        if self.bos_id is None or self.eos_id is None:
            raise InputError("tokenizer has no <s> / </s> tokens")
        self.unk_id = tk.token_to_id("<unk>")
        pad = tk.token_to_id(PAD_TOKEN)
        self.pad_id = pad if pad is not None else (self.unk_id if self.unk_id is not None else 0)
        if self.pad_id == self.eos_id:
            raise InputError("tokenizer: the padding id would equal EOS; add a <pad> or <unk> token")
        self._context_ids: dict[str, list[int]] = {}  # encode_pair's memo of BOS + context ids

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        from tokenizers import Tokenizer as TK
        p = Path(path)
        p = p / "tokenizer.json" if p.is_dir() else p
        if not p.is_file():
            raise InputError(f"{p}: no tokenizer.json (copy the checkpoint's tokenizer.json next to it, "
                             f"or pass --tokenizer)")
        try:
            return cls(TK.from_file(str(p)))
        except InputError as e:
            raise InputError(f"{p}: {e}") from None
        except Exception as e:
            raise InputError(f"{p}: cannot load tokenizer ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def pad_token(self) -> str:
        return self.tk.id_to_token(self.pad_id)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        encs = self.tk.encode_batch(texts, add_special_tokens=False)
        return [([self.bos_id] if bos else []) + e.ids + ([self.eos_id] if eos else []) for e in encs]

    def encode_pair(self, context: str, continuation: str, eos: bool = False) -> tuple[list[int], list[int]]:
        """(BOS + context ids, continuation ids) cut from the tokens of the whole string, as lm-eval does: the
        continuation encoded alone would start with a dummy-prefix "▁" the joined text never has. Trailing
        spaces of the context belong to the continuation; a merge across the boundary goes to the context."""
        n_space = len(context) - len(context.rstrip(" "))
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        whole = self.encode(context + continuation, bos=True, eos=eos)
        ctx = self._context_ids.get(context)  # the choices of a question share their context: encode it once
        if ctx is None:
            if len(self._context_ids) > 4096:
                self._context_ids.clear()
            ctx = self._context_ids[context] = self.encode(context, bos=True)
        n = len(ctx)
        while n > 1 and whole[:n] != ctx[:n]:
            n -= 1
        return whole[:n], whole[n:]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path: str | os.PathLike) -> None:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(p / "tokenizer.json", self.tk.to_str().encode())
        # lets transformers' AutoTokenizer load the folder (PreTrainedTokenizerFast reads tokenizer.json); every
        # special token named here already exists, so AutoTokenizer adds none and its ids equal ours
        specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": self.pad_token}
        if self.unk_id is not None:
            specials["unk_token"] = "<unk>"
        write_json_atomic(p / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": True, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000})
        write_json_atomic(p / "special_tokens_map.json", specials)


def check_tokenizer_fits(tok: Tokenizer, vocab_size: int, source: Any) -> None:
    """Every id the tokenizer can emit, the pad id included, must have an embedding row of the model."""
    if tok.vocab_size > vocab_size:
        raise InputError(f"{source}: the tokenizer has {tok.vocab_size} tokens but the model only {vocab_size} "
                         f"embedding rows; use the tokenizer.json saved with this checkpoint")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Mistral-style BPE (the layout of Mistral-7B-v0.1's tokenizer.json): byte fallback, metaspace,
    ids 0-2 = <unk>,<s>,</s>,
    ids 3-258 = the 256 byte tokens <0x00>..<0xFF> *inside the model vocab*, then learned pieces, then <pad>."""
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as TK
    n_fixed = len(SPECIALS) + 256 + 1  # specials, bytes, pad
    if vocab_size <= n_fixed:
        raise ValueError(f"vocab_size {vocab_size} must exceed {n_fixed} (specials + 256 bytes + pad)")
    tk = TK(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # split=True while training so merges never cross a word boundary (as SentencePiece's split_by_whitespace)
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 257, special_tokens=SPECIALS, show_progress=False)
    tk.train_from_iterator(texts, trainer)
    # rebuild the vocab as [specials, 256 bytes, learned] (passing bytes as special tokens would make
    # decode(skip_special_tokens=True) drop byte-fallback pieces)
    spec = json.loads(tk.to_str())
    learned = sorted(((t, i) for t, i in spec["model"]["vocab"].items() if t not in SPECIALS), key=lambda x: x[1])
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in learned:
        if t not in vocab:
            vocab[t] = len(vocab)
    spec["model"]["vocab"] = vocab
    for a in spec["added_tokens"]:
        a["id"] = vocab[a["content"]]
    tk = TK.from_str(json.dumps(spec))
    tk.add_special_tokens([AddedToken(PAD_TOKEN, special=True)])  # the last id: see Tokenizer's padding rule
    # SentencePiece's dummy prefix: "▁" before every text, also one that starts with a space (Metaspace's
    # prepend skips those, which made decode(encode(" Hello")) lose its space); decode strips it once
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    return Tokenizer(tk)
