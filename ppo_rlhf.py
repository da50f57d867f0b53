"""PPO-based RLHF applied directly to a base model, with every ICE-GRT trick as a named switch.

Papers: ICE-GRT (Zheng et al., arXiv 2401.02072) trains with PPO and four models (actor, reference, reward,
critic) and names its success factors "Appropriate Data, Reward Size Scaling, KL-Control, Advantage
Normalization"; Mistral-Plus (arXiv 2403.02513) applies that harmless RLHF to the *base* model, skipping SFT.
The remaining details follow "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024,
arXiv:2403.17031, and its code vwxyzjn/summarize_from_feedback_details; N+ below),
Ziegler et al. 2019 (adaptive KL), Schulman et al. 2016 (GAE), Ouyang et al. 2022 (PPO-ptx).
ICE-GRT's own hyperparameters are in a paper body we could not read: every default below is a public anchor's
(N+, TRL, OpenRLHF), or tuned for the toy world where a 7B value would not move a 2M-parameter model in four
minutes; the field comment says which.

    python ppo_rlhf.py                                   # toy world: out/pretrain/final + out/reward_model/final
    python ppo_rlhf.py --kl_coef 0 --out out/ppo_nokl    # one ablation (bench/ablate_ppo.sh runs them all)
    torchrun --nproc_per_node=2 ppo_rlhf.py              # DDP: gloo on CPU, nccl on GPUs
    python ppo_rlhf.py --resume out/ppo                  # continue an interrupted run (same flags)
    python ppo_rlhf.py --actor Mistral-7B-v0.1 --reward_model rm7b \\
        --prompts harmless-base/train.jsonl.gz helpful-base/train.jsonl.gz --prompt_weights 0.7 0.3

Each iteration: sample prompts -> generate with the KV cache -> score -> per-token rewards -> GAE -> several
PPO epochs over minibatches -> log; every `eval_every` iterations a held-out evaluation; periodic saves.

Implementation details (the numbers appear at the lines that implement them):
 1. Clipped surrogate policy loss, ratio clip `cliprange` 0.2 (common default: TRL, OpenRLHF, N+).
 2. Four models: actor (from the base checkpoint), reference (frozen copy of it), reward model (frozen), critic
    initialised from the reward model (`critic_init reward`; per-token values = the RM head at every position,
    `RewardModel.token_scores`), or from the policy backbone with a fresh head (`critic_init policy`).
 3. KL-CONTROL: a per-token penalty -kl_coef * KL_t inside the reward, fixed coefficient 0.05 (N+, new TRL) ...
 4. ... or the adaptive controller of Ziegler et al. 2019 (`adaptive_kl`): e = clip(KL/target - 1, +-0.2),
    beta *= 1 + e * n / horizon, with KL the mean sequence KL over *all ranks* and n the global batch.
 5. KL estimator k1 = log pi - log pi_ref (default) or k3 = (r - 1) - log r with r = pi_ref / pi (Schulman's
    "Approximating KL divergence" note). The logged KL is always the k1 sum per sequence; a warning fires when
    the batch KL is below -1 nat (sampling that does not follow pi: github.com/huggingface/trl/issues/351 and /1857).
 6. REWARD SIZE SCALING: the reward model is loaded on its own and may be larger than the policy (only the
    tokenizer must match); the score is normalised (`reward_norm fixed`: the RM's stored mean/std;
    `running`: running mean/std over all ranks; `none`), multiplied by `reward_scale`, clipped to
    +-`reward_clip` (OpenRLHF's 10).
 7. ADVANTAGE NORMALIZATION: masked whitening over the valid tokens of the whole rollout batch, all ranks
    together (`adv_norm global`, as OpenRLHF); `minibatch` (PPO2/CleanRL) or `none` (DeepSpeed-Chat).
 8. GAE with gamma 1.0 and lambda 0.95 (N+, TRL), values after the last valid token are 0,
    returns = advantages + values.
 9. Clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2), `cliprange_value` 0.2; separate AdamW optimisers
    and learning rates for actor and critic (OpenRLHF, DeepSpeed-Chat).
10. APPROPRIATE DATA: several prompt sources (`path` or `path#kind`, HH-RLHF / {"prompt"} / PKU-SafeRLHF,
    .gz accepted) sampled with `prompt_weights`: red-team prompts mixed with general ones.
11. Reward whitening (`whiten_rewards`, off as in N+'s released code): per-token rewards scaled to unit std over
    the batch, keeping their mean.
12. EOS trick: everything after the first EOS is masked (generate's response_mask); a response with no EOS
    loses `missing_eos_penalty` (TRL's name; N+ sets the score to -1); EOS rate and length are logged,
    because a base model rambles (Mistral-C2F's "continuous maximization").
13. Log-probs of actor and reference are computed from logits / temperature, the distribution actually
    sampled (N+; without it KL grows faster and quality drops).
14. Dropout off in all four models (`disable_dropout`; Mistral has no dropout layers, so this only zeroes any
    nn.Dropout a custom config adds and keeps every model in eval mode).
15. PPO-ptx (Ouyang et al. 2022): `ptx_coef` * language-modelling loss on pretraining text added to the actor
    loss. On (0.5) in the toy default because without it the held-out corpus loss rose 4.9% (measured on the
    toy world, docs/ppo_rlhf.md; with it +1.7%); the anchors keep it off or small (OpenRLHF v0.4: 0.05;
    DeepSpeed-Chat reports InstructGPT's 27.8 destabilised training).
16. Global grad-norm clipping (`max_grad_norm` 1.0); a minibatch whose mean ratio exceeds `ratio_threshold`
    (old TRL: 10) is skipped; optional early stop of the PPO epochs when approx-KL > 1.5 * `target_kl`.
17. Linear warmup + cosine decay for both optimisers (`warmup_frac`, `min_lr_ratio`; OpenRLHF: 3% warmup).
18. World-size invariance: the global batch of prompts, its sampling noise (one uniform per row and token,
    inverted through the CDF in `generate`), the minibatch permutation and the PPO-ptx documents are drawn from
    a generator seeded by (seed, iteration) alone; the rollout rows are gathered before the update, and every
    loss is divided by global token counts. So N ranks train exactly what one process trains (a test checks
    2 ranks == 1 rank), as pretrain.py and reward_model.py do.
19. `--fsdp` (under torchrun): all four models are FSDP2-sharded (common.parallelize: per decoder layer + root);
    actor and critic keep fp32 master weights and AdamW state in shards, reference and reward model are frozen
    shards in the compute dtype. Rollouts unshard the actor once (common.unsharded) for the whole generation, so
    the hundreds of decode steps run locally instead of all-gathering every layer per token (measured in
    docs/ppo_rlhf.md); scoring and update forwards all-gather layer by layer. Resume state is sharded
    (torch.distributed.checkpoint); rank 0 writes the final HF folders from the gathered weights.
20. The LM head runs only on the positions that predict response tokens (`first_logit`), for the old and the
    reference log-probs of a rollout and for every update minibatch.
21. Packed forwards: the log-prob, value and reward forwards move each row's real tokens to its right end and drop
    the all-padding columns (`packed`), so a forward is max(prompt + response) wide instead of P + N; the
    per-row outputs are those of the padded layout (tested), gathered back to the (B, N) response layout.

Fixed in code (not switches, with the reason at the line): old log-probs are recomputed with the training
forward rather than taken from the cached sampler, so the first PPO ratio is exactly 1 under any dtype; top-k 0
and top-p 1 during rollouts (anything else makes the samples not follow pi and the KL negative); no entropy
bonus (LM-PPO practice); PAD is never EOS (model.Tokenizer).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
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
    eta,
    field_of,
    full_state_dict,
    gradient_sync,
    init_distributed,
    is_sharded,
    load_sharded_state,
    load_train_state,
    log,
    output_dir,
    parallelize,
    parse_config,
    read_jsonl,
    read_text,
    resolve_device_dtype,
    save_sharded_state,
    toxic_regex,
    unsharded,
    write_json_atomic,
)
from model import MistralForCausalLM, Tokenizer, check_tokenizer_fits, pad_batch
from plots import plot_ppo_runs  # optional picture: without matplotlib it writes nothing

# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class PPOConfig:
    # -- models and data
    actor: str = "out/pretrain/final"  # base causal LM (HF folder): actor init and frozen reference (detail 2)
    reward_model: str = "out/reward_model/final"  # RewardModel folder, frozen; may be larger (detail 6)
    prompts: list[str] = field(default_factory=lambda: [
        "data/toy/prompts/train.jsonl#red_team", "data/toy/prompts/train.jsonl#general"])  # sources (10)
    prompt_weights: list[float] = field(default_factory=lambda: [0.5, 0.5])  # sampling weight per source (10)
    eval_prompts: str = "data/toy/prompts/test.jsonl"  # held-out prompts ("kind" red_team/general if present)
    eval_corpus: str = "data/toy/corpus/valid.jsonl"  # held-out {"text"} docs: LM loss = general skills kept
    toxic_lexicon: str = "data/toy/card.json"  # JSON with "toxic_lexicon" (toy toxicity rate); "" = skip
    out: str = "out/ppo"  # output folder: final/ (policy), critic/, state/ (resume), metrics
    resume: str = ""  # a previous --out folder (or its state/) to continue from
    device: str = "auto"  # auto|cpu|cuda
    dtype: str = "auto"  # auto|fp32|bf16|fp16 (autocast; frozen models stored in it, trained ones in fp32)
    compile: bool = False  # torch.compile the training forwards of actor and critic, and the decode step
    fsdp: bool = False  # 19: shard all four models over the ranks (FSDP2); actor and critic trained, the others frozen
    grad_ckpt: bool = False  # 19: activation checkpointing per decoder layer of actor and critic
    seed: int = 1234  # rollouts of rank r at iteration i use a generator seeded from (seed, i, r)
    # -- rollout
    total_iters: int = 16  # PPO iterations (rollout + update); toy: 512 episodes fit the 4-minute CPU budget
    rollout_batch_size: int = 32  # prompts per iteration over all ranks (the global batch; N+: 512)
    max_prompt_len: int = 48  # prompt tokens kept (BOS + the end of the dialogue, where the request is)
    max_new_tokens: int = 32  # response cap (toy answers: <= 25 tokens); no EOS by then -> penalty (12)
    temperature: float = 0.7  # 13: sampling temperature, also divides the logits of the log-probs (N+)
    # -- PPO (numbers = details in the docstring)
    ppo_epochs: int = 2  # 1: passes over the rollout batch per iteration (N+, TRL: 4; toy: 2 for budget)
    num_minibatches: int = 2  # 1: minibatches per epoch; per-rank rows must divide evenly
    cliprange: float = 0.2  # 1: policy ratio clip epsilon
    critic_init: str = "reward"  # 2: reward|policy
    kl_coef: float = 0.05  # 3: KL-control coefficient beta (initial value if adaptive); 0 = KL-control off
    adaptive_kl: bool = False  # 4: Ziegler et al. adaptive controller instead of a fixed beta
    kl_target: float = 6.0  # 4: target sequence KL in nats (OAI stylistic tasks)
    kl_horizon: int = 10000  # 4: controller horizon in episodes
    kl_estimator: str = "k1"  # 5: k1|k3 per-token estimator inside the reward
    reward_norm: str = "fixed"  # 6: fixed (RM's stored mean/std)|running|none
    reward_scale: float = 1.0  # 6: multiplier on the normalised score
    reward_clip: float = 10.0  # 6: clip the score to +-this after scaling; 0 = no clip
    adv_norm: str = "global"  # 7: global (rollout batch, all ranks)|minibatch|none
    gamma: float = 1.0  # 8: discount
    lam: float = 0.95  # 8: GAE lambda
    cliprange_value: float = 0.2  # 9: value clip around the rollout's values
    actor_lr: float = 2e-4  # 9/17: peak actor LR (toy, 2M params, 16 iterations; 7B anchor: 1e-6 OpenRLHF)
    critic_lr: float = 3e-4  # 9/17: peak critic LR (toy; 7B anchor: 9e-6 OpenRLHF)
    whiten_rewards: bool = False  # 11: whiten per-token rewards keeping the mean
    missing_eos_penalty: float = 1.0  # 12: subtracted from the score of a response with no EOS
    disable_dropout: bool = True  # 14: dropout off in all four models
    ptx_coef: float = 0.5  # 15: PPO-ptx coefficient on the pretraining LM loss; 0 = off (toy: on, see docs/ppo_rlhf.md)
    ptx_data: str = "data/toy/corpus/train.jsonl"  # 15: {"text"} JSONL for PPO-ptx
    ptx_batch_size: int = 8  # 15: documents per minibatch for PPO-ptx (all ranks together)
    max_grad_norm: float = 1.0  # 16: global grad-norm clip for each optimiser
    ratio_threshold: float = 10.0  # 16: skip a minibatch whose mean ratio exceeds this
    target_kl: float = 0.0  # 16: stop this iteration's PPO epochs when approx-KL > 1.5 * target; 0 = off
    warmup_frac: float = 0.1  # 17: fraction of iterations with linear LR warmup (OpenRLHF: 0.03)
    min_lr_ratio: float = 0.1  # 17: cosine decays to this fraction of the peak LR
    # -- evaluation, logging, saving
    eval_every: int = 0  # extra held-out evaluations every K iterations (always: before the first, at the end)
    eval_n: int = 200  # held-out prompts used, in file order (0 = all; toy test file: 400, half red-team)
    eval_corpus_docs: int = 200  # held-out corpus documents for the LM loss
    eval_batch_size: int = 100  # prompts per generate call in evaluation (per rank)
    save_every: int = 8  # resumable state every K iterations (and at the end)
    stop_after_iters: int = 0  # stop (with state saved) after this many iterations in this run; 0 = no


PROMPT_KINDS_TOXIC = "red_team"  # the prompt kind on which the toxicity rate is the headline figure
HH_ASSISTANT = "\n\nAssistant:"


# ----------------------------------------------------------------------------------------------------------------
# Small pure functions: the math of each trick, testable alone. "Global" means reduced over all DDP ranks
# (a no-op in a single process).


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Global mean of x over the positions where mask == 1."""
    s = all_reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]).double())
    return (s[0] / s[1].clamp(min=1)).to(x.dtype)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over valid tokens of all ranks; shift_mean=False adds the mean back
    (reward whitening, detail 11). Biased variance, as N+ (to match the original TensorFlow code)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    w = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        w = w + mean
    return w * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate on the sampled tokens (detail 5)."""
    log_ratio = logprobs - ref_logprobs  # log pi/pi_ref
    if estimator == "k1":
        return log_ratio  # unbiased, can be negative per token
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # (r - 1) - log r, r = pi_ref/pi: unbiased and >= 0
    raise ValueError(f"kl_estimator must be k1 or k3, got {estimator!r}")


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. 2019, eq. 2 (detail 4): proportional control of beta towards a target sequence KL."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


def shape_score(raw: torch.Tensor, has_eos: torch.Tensor, norm: str, mean: float, std: float, scale: float,
                clip: float, missing_eos_penalty: float) -> torch.Tensor:
    """Reward Size Scaling (detail 6) then the missing-EOS penalty (detail 12), per sequence (B,)."""
    s = (raw - mean) / std if norm != "none" else raw
    s = s * scale
    if clip > 0:
        s = s.clamp(-clip, clip)
    return s - missing_eos_penalty * (~has_eos).to(s.dtype)


def compute_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                    mask: torch.Tensor, kl_coef: float, estimator: str = "k1"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, N): -kl_coef * KL_t on every valid response token (KL-Control, detail 3) and the
    sequence score added at the last valid token, i.e. the EOS when there is one (N+, not TRL's EOS+1)."""
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    last = mask.long().sum(1) - 1  # (B,) index of the last valid token
    rewards[torch.arange(len(score)), last] += score
    return rewards * mask, kl


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                   lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, detail 8) over response tokens (B, N).
    V after the last valid token is 0 (the episode ends at EOS); returns = advantages + values."""
    values, rewards = values * mask, rewards * mask
    B, N = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(N)):
        next_v = values[:, t + 1] if t + 1 < N else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]  # TD error
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * mask
    return adv, adv + values


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, cliprange: float, denom: torch.Tensor | float | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (Schulman et al. 2017, detail 1): sum over valid tokens of
    max(-A * rho, -A * clip(rho, 1-eps, 1+eps)) / denom (default: the number of valid tokens)."""
    denom = mask.sum() if denom is None else denom
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = (torch.maximum(pg1, pg2) * mask).sum() / denom
    stats = {"ratio": ratio.detach(), "clipfrac": (pg2 > pg1).float(),
             "approxkl": 0.5 * log_ratio.detach() ** 2}  # N+'s approx-KL
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   cliprange_value: float, denom: torch.Tensor | float | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (detail 9): 0.5 * sum over valid tokens of max((V - R)^2, (V_clip - R)^2) / denom."""
    denom = mask.sum() if denom is None else denom
    v_clip = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    l1, l2 = (values - returns) ** 2, (v_clip - returns) ** 2
    loss = 0.5 * (torch.maximum(l1, l2) * mask).sum() / denom
    return loss, {"vf_clipfrac": (l2 > l1).float()}


class RunningMoments:
    """Running mean/std of scalar scores over all ranks (Chan et al. parallel update); reward_norm running."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        s = all_reduce_sum(torch.stack([x.sum(), (x ** 2).sum(), torch.tensor(float(x.numel()))]).double())
        n = s[2].item()
        b_mean = s[0].item() / n
        b_var = max(s[1].item() / n - b_mean ** 2, 0.0)
        tot = self.count + n
        delta = b_mean - self.mean
        self.var = (self.var * self.count + b_var * n + delta ** 2 * self.count * n / tot) / tot
        self.mean += delta * n / tot
        self.count = tot

    @property
    def std(self) -> float:
        return max(math.sqrt(self.var), 1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Data: prompt sources (detail 10)


def prompt_from_row(row: dict, where: str) -> str:
    """HH-RLHF: the transcript up to and including the last '\\n\\nAssistant:'; {"prompt"}: as is when it already
    ends with an Assistant turn, else (PKU-SafeRLHF's bare questions) wrapped in the same HH template."""
    if "chosen" in row:
        chosen = row["chosen"]
        if not isinstance(chosen, str) or HH_ASSISTANT not in chosen:
            raise InputError(f"{where}: field 'chosen' has no '\\n\\nAssistant:' turn")
        return chosen[: chosen.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)]
    if "prompt" in row:
        p = row["prompt"]
        if not isinstance(p, str) or not p.strip():
            raise InputError(f"{where}: field 'prompt' is empty or not a string")
        return p if p.rstrip().endswith("Assistant:") else f"\n\nHuman: {p.strip()}{HH_ASSISTANT}"
    raise InputError(f"{where}: field 'prompt' missing (expected {{\"prompt\"}} rows, HH-RLHF "
                     f"{{\"chosen\", \"rejected\"}} or PKU-SafeRLHF rows)")


def load_prompts(spec: str) -> list[tuple[str, str]]:
    """`path` or `path#kind` (rows whose "kind" equals kind) -> [(prompt, kind)]."""
    path, _, kind = spec.partition("#")
    out = []
    for i, row in read_jsonl(path):
        if kind and row.get("kind") != kind:
            continue
        out.append((prompt_from_row(row, f"{path}:{i}"), str(row.get("kind", ""))))
    if not out:
        raise InputError(f"{spec}: no prompts" + (f" of kind {kind!r}" if kind else ""))
    return out


def load_texts(path: str, limit: int = 0) -> list[str]:
    texts = []
    for i, row in read_jsonl(path):
        texts.append(field_of(row, "text", f"{path}:{i}", str))
        if limit and len(texts) >= limit:
            break
    return texts


def encode_prompts(tok: Tokenizer, prompts: list[str], max_len: int, pad_to: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS + prompt, keeping the end of a long dialogue (where the request is), LEFT padded for generate, to at
    least `pad_to` columns (the global batch's longest prompt, so every rank's rows share one layout)."""
    seqs = [[tok.bos_id] + s[1:][-(max_len - 1):] for s in tok.encode_batch(prompts, bos=True)]
    ids, mask = pad_batch(seqs, tok.pad_id, side="left")
    if pad_to > ids.shape[1]:
        extra = pad_to - ids.shape[1]
        ids = torch.cat([torch.full((len(seqs), extra), tok.pad_id, dtype=ids.dtype), ids], 1)
        mask = torch.cat([torch.zeros((len(seqs), extra), dtype=mask.dtype), mask], 1)
    return ids, mask


# ----------------------------------------------------------------------------------------------------------------
# Model pieces


class ValueModel(nn.Module):
    """The critic (detail 2): a RewardModel whose scalar head is read at every position -> (B, T) values.
    A module of its own so DDP and torch.compile wrap the per-token forward."""

    def __init__(self, rm: nn.Module):
        super().__init__()
        self.rm = rm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.rm.token_scores(input_ids, attention_mask)


def packed(seq: torch.Tensor, attn: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detail 21: the rows as the forwards see them. Rollout rows are laid out [pads, prompt | response, pads]
    (prompts left padded to P, responses right padded to N after EOS), about half padding at the toy sizes.
    Every row's real tokens are moved to its right end, in order (a stable sort of the mask), and the columns
    that are padding in every row dropped: width max(prompt + response) instead of P + N. A row's forward does
    not depend on how many pads precede it (model.py detail 6). -> (seq, attn) of width W and `cols` (B, N),
    the column whose output predicts response token t (clamped for the masked positions after EOS)."""
    order = torch.sort(attn, dim=1, stable=True).indices  # pads first, real tokens in order after them
    W = int(attn.sum(1).max())
    seq2, attn2 = seq.gather(1, order)[:, -W:], attn.gather(1, order)[:, -W:]
    n = attn[:, P:].sum(1, keepdim=True)  # response tokens per row, up to and including EOS
    t = torch.arange(seq.shape[1] - P, device=seq.device)[None]
    cols = (W - n + t - 1).clamp(max=W - 1)  # column W - n + t holds response token t; its logit is one left
    return seq2, attn2, cols


def response_logprobs(model: nn.Module, seq: torch.Tensor, attn: torch.Tensor, P: int, temperature: float,
                      with_entropy: bool = False):
    """Log-probs (B, N) of the response tokens seq[:, P:] under softmax(logits / temperature) (detail 13).
    The forward runs on the packed rows (detail 21), and its LM head only from the first column any row needs
    (each position's head is its own matmul row: the same numbers as slicing the full logits)."""
    seq2, attn2, cols = packed(seq, attn, P)
    first = int(cols.min())
    h = model(seq2, attn2, first_logit=first)  # (B, W - first, V)
    logits = h.gather(1, (cols - first)[..., None].expand(-1, -1, h.shape[-1])).float() / temperature
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(-1, seq[:, P:, None]).squeeze(-1)  # model.logprobs_from_logits, sharing the log-softmax
    if not with_entropy:
        return lp
    return lp, -(logp.exp() * logp).sum(-1)  # per-token entropy of the sampling distribution


def response_values(critic: nn.Module, seq: torch.Tensor, attn: torch.Tensor, P: int) -> torch.Tensor:
    """V(prefix before response token t), (B, N) fp32, from the packed rows (detail 21)."""
    seq2, attn2, cols = packed(seq, attn, P)
    return critic(seq2, attn2).gather(1, cols).float()


def disable_dropout(model: nn.Module) -> None:
    """Detail 14: zero every dropout probability (Mistral has none; a custom config might)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def reward_model_inputs(seq: torch.Tensor, attn: torch.Tensor, has_eos: torch.Tensor, eos_id: int,
                        pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The RM was trained on BOS + prompt + response + EOS and reads the last real token. A response cut at
    max_new_tokens gets an EOS appended *for scoring only* (the actor's tokens are untouched, unlike
    github.com/OpenRLHF/OpenRLHF/issues/238), so the RM judges its content and the missing-EOS penalty
    (detail 12) judges the termination."""
    extra = torch.where(has_eos, pad_id, eos_id).to(seq.dtype)[:, None]
    return torch.cat([seq, extra], 1), torch.cat([attn, (~has_eos).to(attn.dtype)[:, None]], 1)


def lm_loss_sums(model: nn.Module, tok: Tokenizer, texts: list[str], max_len: int = 256
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token NLL, token count) of BOS + text + EOS, right padded; used for PPO-ptx and eval."""
    dev = next(model.parameters()).device
    ids, mask = pad_batch([s[:max_len] for s in tok.encode_batch(texts, bos=True, eos=True)], tok.pad_id,
                          side="right")
    ids, mask = ids.to(dev), mask.to(dev)
    m = mask[:, 1:].float()  # the fused head + loss of model.py (detail 12): no (B, T, V) logits held
    return model(ids[:, :-1], mask[:, :-1], targets=ids[:, 1:], weights=m), m.sum()


class MaskedStats:
    """Sums of per-token (or per-sequence) statistics, reduced over all ranks once, then divided."""

    def __init__(self):
        self.sums: dict[str, list[torch.Tensor]] = {}

    def register(self, names: list[str], device: torch.device) -> None:
        """Fix names and order up front: every rank must all-reduce the same vector, even one with no data."""
        for n in names:
            self.sums.setdefault(n, [torch.zeros(2, device=device)])

    def add(self, name: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x = x.detach().float()
        m = torch.ones_like(x) if mask is None else mask.float()
        s = torch.stack([(x * m).sum(), m.sum()])
        self.sums[name] = [self.sums[name][0] + s] if name in self.sums else [s]

    def means(self) -> dict[str, float]:
        if not self.sums:
            return {}
        names = list(self.sums)
        v = all_reduce_sum(torch.stack([self.sums[n][0] for n in names]).double())
        return {n: (v[i, 0] / v[i, 1].clamp(min=1)).item() for i, n in enumerate(names)}


# ----------------------------------------------------------------------------------------------------------------
# Rollout, evaluation, update


CPU = torch.device("cpu")


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (the global batch); the tensor itself on one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 0)


def seeded_generator(seed: int, it: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator per (iteration, rank): resuming at iteration i draws exactly what the uninterrupted run drew."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + it) * 1009 + rank)


@torch.no_grad()
def rollout(actor: MistralForCausalLM, actor_fwd: nn.Module, ref: nn.Module, critic_fwd: nn.Module, score_fn,
            tok: Tokenizer, prompts: list[str], cfg: PPOConfig, dev: torch.device, amp, uniforms: torch.Tensor,
            pad_to: int) -> dict:
    """Generate with the KV cache, then recompute everything PPO needs with full forwards. Every rank's rows have
    the same layout (prompts padded to `pad_to`, responses to max_new_tokens), so they can be gathered."""
    p_ids, p_mask = encode_prompts(tok, prompts, cfg.max_prompt_len, pad_to)
    p_ids, p_mask = p_ids.to(dev), p_mask.to(dev)
    P, N = p_ids.shape[1], cfg.max_new_tokens
    t0 = time.perf_counter()
    with amp, unsharded(actor):  # detail 19: one all-gather for the whole generation under FSDP2
        # top_k 0 / top_p 1: the samples must follow pi or the KL estimate goes negative
        # (github.com/huggingface/trl/issues/1857)
        g = actor.generate(p_ids, p_mask, max_new_tokens=N, temperature=cfg.temperature, top_k=0, top_p=1.0,
                           eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, uniforms=uniforms, return_logprobs=True)
    t1 = time.perf_counter()
    n = g.response_ids.shape[1]  # < N when every row of this rank stopped early: pad to N
    resp = F.pad(g.response_ids, (0, N - n), value=tok.pad_id)
    resp_mask = F.pad(g.response_mask, (0, N - n))
    seq, rmask = torch.cat([p_ids, resp], 1), resp_mask.float()  # (B, P + N), (B, N)
    attn = torch.cat([p_mask, resp_mask], 1)
    has_eos = ((resp == tok.eos_id) & resp_mask.bool()).any(1)
    with amp:
        # old log-probs from the *training* forward, not the sampler's cache: ratio == 1 exactly at the first
        # minibatch under any dtype (DeepSpeed-Chat's unstable ratios)
        old_lp, ent = response_logprobs(actor_fwd, seq, attn, P, cfg.temperature, with_entropy=True)
        ref_lp = response_logprobs(ref, seq, attn, P, cfg.temperature)  # detail 13: same temperature
        values = response_values(critic_fwd, seq, attn, P)  # V(prefix before token t)
        raw = score_fn(seq, attn, P, has_eos).float()
    t2 = time.perf_counter()
    return {"seq": seq, "attn": attn, "P": P, "mask": rmask, "has_eos": has_eos, "old_lp": old_lp * rmask,
            "sampler_lp": F.pad(g.logprobs, (0, N - n)),
            "ref_lp": ref_lp * rmask, "values": values * rmask, "raw_score": raw,
            "entropy": ent, "t_generate": t1 - t0, "t_score": t2 - t1}


@torch.no_grad()
def evaluate(actor: MistralForCausalLM, ref: nn.Module, score_fn, tok: Tokenizer, prompts: list[tuple[str, str]],
             corpus: list[str], lexicon_re: re.Pattern | None, cfg: PPOConfig, dev: torch.device, amp,
             rank: int, world: int, n_samples: int = 3) -> tuple[dict, list[dict]]:
    """Held-out prompts (sharded over ranks): RM reward, toy toxicity rate per prompt kind, EOS rate, length,
    KL to the reference; held-out corpus LM loss. The same seed every time, so evaluations are comparable."""
    # the same draws every time, and per prompt (not per rank): evaluations compare across runs and world sizes
    uniforms = torch.rand((len(prompts), cfg.max_new_tokens), generator=seeded_generator(cfg.seed + 7, 0, 0, CPU))
    lo, hi = len(prompts) * rank // world, len(prompts) * (rank + 1) // world
    mine, uniforms, n_real = prompts[lo:hi], uniforms[lo:hi].to(dev), hi - lo
    if is_sharded(ref):  # each forward of a sharded model is a collective: every rank runs as many rows (detail 19)
        n_pad = -(-len(prompts) // world) - n_real
        mine = mine + [prompts[0]] * n_pad
        uniforms = torch.cat([uniforms, torch.zeros((n_pad, cfg.max_new_tokens), device=dev)])
    st = MaskedStats()
    kinds = sorted({k or "all" for _, k in prompts})
    st.register(["reward", "eos_rate", "length", "kl", "toxicity_rate"] + [f"toxicity_rate/{k}" for k in kinds]
                + [f"reward/{k}" for k in kinds] + ["corpus_loss"], dev)
    samples = []
    for b in range(0, len(mine), cfg.eval_batch_size):
        batch = mine[b:b + cfg.eval_batch_size]
        p_ids, p_mask = encode_prompts(tok, [p for p, _ in batch], cfg.max_prompt_len)
        p_ids, p_mask = p_ids.to(dev), p_mask.to(dev)
        P = p_ids.shape[1]
        with amp:
            g = actor.generate(p_ids, p_mask, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                               uniforms=uniforms[b:b + cfg.eval_batch_size], return_logprobs=True)
            attn = torch.cat([p_mask, g.response_mask], 1)
            has_eos = ((g.response_ids == tok.eos_id) & g.response_mask.bool()).any(1)
            ref_lp = response_logprobs(ref, g.sequences, attn, P, cfg.temperature)
            raw = score_fn(g.sequences, attn, P, has_eos).float()
        m = g.response_mask.float()
        real = (torch.arange(b, b + len(batch), device=dev) < n_real).float()  # padding rows do not count
        st.add("reward", raw, real)
        st.add("eos_rate", has_eos.float(), real)
        st.add("length", m.sum(1), real)
        st.add("kl", ((g.logprobs - ref_lp) * m).sum(1), real)  # k1 summed over the response, as in training
        texts = [tok.decode(r[mm.bool()].tolist()) for r, mm in zip(g.response_ids.cpu(), m.cpu())]
        for (prompt, kind), text, r in list(zip(batch, texts, raw.tolist()))[:max(0, n_real - b)]:
            tox = float(bool(lexicon_re and lexicon_re.search(text.lower())))
            for name, val in (("toxicity_rate", tox), (f"toxicity_rate/{kind or 'all'}", tox),
                              (f"reward/{kind or 'all'}", r)):
                st.add(name, torch.tensor(val, device=dev))
            if len(samples) < n_samples and (kind == PROMPT_KINDS_TOXIC or not kind):
                samples.append({"prompt": prompt, "response": text, "reward": round(r, 4), "toxic": bool(tox)})
    mine_docs = corpus[rank::world]
    nll, n = torch.zeros((), device=dev), torch.zeros((), device=dev)
    for b in range(0, len(mine_docs), 32):
        with amp:
            s, c = lm_loss_sums(actor, tok, mine_docs[b:b + 32])
        nll, n = nll + s, n + c
    st.sums["corpus_loss"] = [torch.stack([nll, n]).float()]
    res = st.means()
    if lexicon_re is None:
        res = {k: v for k, v in res.items() if not k.startswith("toxicity")}
    if not corpus:
        res.pop("corpus_loss")
    return res, samples


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_state(run_dir: Path, it: int, actor, critic, tok, opt_a, opt_c, scaler, kl_coef, moments,
               extra: dict) -> None:
    """Resumable state: weights as safetensors folders, optimiser/scaler tensors via torch.save (loaded with
    weights_only=True), the rest JSON. Written into a temporary folder that replaces state/ in one rename."""
    tmp = run_dir / f".state.{it}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    actor.save_pretrained(tmp / "actor", tokenizer=tok)
    critic.save_pretrained(tmp / "critic", tokenizer=tok)
    torch.save({"opt_actor": opt_a.state_dict(), "opt_critic": opt_c.state_dict(),
                "scaler": scaler.state_dict()}, tmp / "optim.pt")
    write_json_atomic(tmp / "trainer_state.json", {
        "iter": it, "kl_coef": kl_coef, "moments": [moments.mean, moments.var, moments.count], **extra})
    final = run_dir / "state"
    old = run_dir / f".state.{it}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def resolve_resume(path: str) -> Path:
    p = Path(path)
    marker = ("trainer_state.json", "extra.json")  # a DDP / one-process state, or a sharded one (detail 19)
    p = p / "state" if any((p / "state" / m).is_file() for m in marker) else p
    if not any((p / m).is_file() for m in marker):
        raise InputError(f"--resume {path}: no trainer_state.json (pass the --out folder of a previous run)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Training


def check_config(cfg: PPOConfig, world: int) -> None:
    choices = {"critic_init": ("reward", "policy"), "kl_estimator": ("k1", "k3"),
               "reward_norm": ("fixed", "running", "none"), "adv_norm": ("global", "minibatch", "none")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise InputError(f"--{name} {getattr(cfg, name)}: must be one of {'|'.join(allowed)}")
    if cfg.temperature <= 0:
        raise InputError(f"--temperature {cfg.temperature}: must be > 0 (PPO needs a sampling policy with "
                         f"log-probs)")
    check_settings(cfg, positive=("total_iters", "rollout_batch_size", "max_prompt_len", "max_new_tokens",
                                  "ppo_epochs", "num_minibatches", "actor_lr", "critic_lr", "kl_target",
                                  "kl_horizon", "eval_batch_size", "ptx_batch_size", "reward_scale"),
                   non_negative=("cliprange", "kl_coef", "cliprange_value", "reward_clip", "missing_eos_penalty",
                                 "ptx_coef", "max_grad_norm", "ratio_threshold", "target_kl", "eval_every",
                                 "eval_n", "eval_corpus_docs", "save_every", "stop_after_iters"),
                   fraction=("gamma", "lam", "warmup_frac", "min_lr_ratio"))
    if len(cfg.prompts) != len(cfg.prompt_weights):
        raise InputError(f"--prompts has {len(cfg.prompts)} sources but --prompt_weights has "
                         f"{len(cfg.prompt_weights)} weights")
    if any(w < 0 for w in cfg.prompt_weights) or sum(cfg.prompt_weights) <= 0:
        raise InputError(f"--prompt_weights {cfg.prompt_weights}: must be >= 0 with a positive sum")
    if cfg.fsdp and cfg.dtype == "fp16":
        raise InputError("--fsdp with --dtype fp16: use bf16 (FSDP2 keeps fp32 master weights; no loss scaling)")
    if cfg.ptx_coef > 0 and cfg.ptx_batch_size % world:
        raise InputError(f"--ptx_batch_size {cfg.ptx_batch_size}: not divisible by {world} ranks (it is the "
                         f"global number of documents per minibatch)")
    if cfg.rollout_batch_size % world:
        raise InputError(f"--rollout_batch_size {cfg.rollout_batch_size}: not divisible by {world} ranks")
    if (cfg.rollout_batch_size // world) % cfg.num_minibatches:
        raise InputError(f"--num_minibatches {cfg.num_minibatches}: does not divide the per-rank batch "
                         f"{cfg.rollout_batch_size // world} (--rollout_batch_size / ranks)")
    check_output_path(cfg.out)


def load_data(cfg: PPOConfig) -> tuple[list, list, list[str], list[str], re.Pattern | None]:
    """Prompt sources (detail 10), held-out prompts and corpus, PPO-ptx documents, the toy lexicon."""
    sources = [load_prompts(s) for s in cfg.prompts]
    eval_prompts = load_prompts(cfg.eval_prompts) if cfg.eval_prompts else []
    eval_prompts = eval_prompts[:cfg.eval_n] if cfg.eval_n else eval_prompts
    corpus = load_texts(cfg.eval_corpus, cfg.eval_corpus_docs) if cfg.eval_corpus else []
    ptx_docs = load_texts(cfg.ptx_data) if cfg.ptx_coef > 0 else []
    lexicon_re = None
    if cfg.toxic_lexicon:
        try:
            lexicon_re = toxic_regex(json.loads(read_text(cfg.toxic_lexicon))["toxic_lexicon"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{cfg.toxic_lexicon}: field 'toxic_lexicon': cannot read a word list "
                             f"({e!r})") from None
    return sources, eval_prompts, corpus, ptx_docs, lexicon_re


def load_models(cfg: PPOConfig, dev: torch.device, frozen_dtype: torch.dtype | None, score_fn):
    """The four models of detail 2 (and a resumed run's training state), each checkpoint checked on load.
    Returns (tok, actor, ref, rm, critic, score_fn, resume_state); rm is None when `score_fn` is given."""
    from reward_model import RewardModel  # the only import beyond model.py and common.py
    state_dir = resolve_resume(cfg.resume) if cfg.resume else None
    if state_dir and (state_dir / "extra.json").is_file():  # sharded: the weights come with the shards later
        return (*load_models(dataclasses.replace(cfg, resume=""), dev, frozen_dtype, score_fn)[:6],
                (state_dir, None, None))
    tok = Tokenizer.from_file(cfg.actor)
    actor = MistralForCausalLM.from_pretrained(state_dir / "actor" if state_dir else cfg.actor, dev)
    ref = MistralForCausalLM.from_pretrained(cfg.actor, dev, dtype=frozen_dtype)
    check_tokenizer_fits(tok, actor.config.vocab_size, cfg.actor)
    rm = None
    if score_fn is None:
        rm_tok = Path(cfg.reward_model) / "tokenizer.json"
        if rm_tok.is_file() and Tokenizer.from_file(rm_tok).tk.get_vocab() != tok.tk.get_vocab():
            raise InputError(f"{rm_tok}: the reward model's tokenizer differs from the policy's "
                             f"({cfg.actor}); PPO scores token ids, so they must match")
        rm = RewardModel.from_pretrained(cfg.reward_model, device=dev, dtype=frozen_dtype)

        def score_fn(seq, attn, P, has_eos):
            seq, attn, _ = packed(seq, attn, P)  # detail 21: the RM reads each row's last real token
            ids, mask = reward_model_inputs(seq, attn, has_eos, tok.eos_id, tok.pad_id)
            return rm(ids, mask)
    if state_dir:
        critic = RewardModel.from_pretrained(state_dir / "critic", device=dev)
    elif cfg.critic_init == "reward":
        critic = RewardModel.from_pretrained(cfg.reward_model, device=dev)  # detail 2 (N+, OpenRLHF)
    else:
        critic = RewardModel.from_causal_lm(cfg.actor, device=dev)
    if state_dir:
        opt_state = load_train_state(state_dir / "optim.pt", "resume from an earlier state or start again")
        try:
            ts = json.loads(read_text(state_dir / "trainer_state.json"))
        except json.JSONDecodeError as e:
            raise InputError(f"{state_dir / 'trainer_state.json'}:{e.lineno}: invalid JSON ({e.msg})") from None
    resume_state = (state_dir, opt_state, ts) if state_dir else None
    return tok, actor, ref, rm, critic.float(), score_fn, resume_state


def rewards_and_advantages(ro: dict, cfg: PPOConfig, kl_coef: float, moments: RunningMoments, rm_stats: tuple
                           ) -> tuple[torch.Tensor, ...]:
    """Shaped score (6, 12), per-token rewards with the KL penalty (3, 5), GAE (8) and their normalisation (7, 11).
    `rm_stats` is the reward model's stored (mean, std) for `reward_norm fixed`."""
    mask = ro["mask"]
    if cfg.reward_norm == "running":
        moments.update(ro["raw_score"])
        mean, std = moments.mean, moments.std
    elif cfg.reward_norm == "fixed":
        mean, std = rm_stats
    else:
        mean, std = 0.0, 1.0
    score = shape_score(ro["raw_score"], ro["has_eos"], cfg.reward_norm, mean, std, cfg.reward_scale,
                        cfg.reward_clip, cfg.missing_eos_penalty)  # 6 + 12
    rewards, kl = compute_rewards(score, ro["old_lp"], ro["ref_lp"], mask, kl_coef, cfg.kl_estimator)  # 3 + 5
    if cfg.whiten_rewards:  # 11
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    adv, returns = gae_advantages(rewards, ro["values"], mask, cfg.gamma, cfg.lam)  # 8
    if cfg.adv_norm == "global":  # 7: ADVANTAGE NORMALIZATION over the rollout batch of all ranks
        adv = masked_whiten(adv, mask)
    return score, rewards, kl, adv, returns


def rollout_statistics(st: MaskedStats, ro: dict, score: torch.Tensor, rewards: torch.Tensor, kl: torch.Tensor,
                       returns: torch.Tensor, kl_coef: float, tok: Tokenizer, lexicon_re: re.Pattern | None) -> None:
    """This rank's rollout rows into the iteration's statistics (reduced over ranks by `st.means`)."""
    mask, P = ro["mask"], ro["P"]
    st.add("objective/kl", ((ro["old_lp"] - ro["ref_lp"]) * mask).sum(1))  # reported KL: always k1, summed
    st.add("objective/kl_k3", (kl_penalty(ro["old_lp"], ro["ref_lp"], "k3") * mask).sum(1))
    st.add("objective/kl_per_token", ro["old_lp"] - ro["ref_lp"], mask)
    st.add("objective/scores", ro["raw_score"])
    st.add("objective/shaped_scores", score)
    st.add("objective/non_score_reward", (-kl_coef * kl).sum(1))
    st.add("objective/rlhf_reward", rewards.sum(1))
    st.add("objective/entropy", -(ro["old_lp"] * mask).sum(1))
    st.add("policy/entropy_avg", ro["entropy"], mask)
    st.add("val/num_eos_tokens", ro["has_eos"].float())  # EOS rate (detail 12)
    if lexicon_re is not None:  # the toy toxicity rate of this batch's responses (all prompt kinds)
        texts = tok.tk.decode_batch([r[m.bool()].tolist() for r, m in zip(ro["seq"][:, P:].cpu(), mask.cpu())])
        st.add("val/toxicity_rate", torch.tensor([float(bool(lexicon_re.search(t.lower()))) for t in texts],
                                                 device=mask.device))
    st.add("val/response_length", mask.sum(1))
    st.add("val/values", ro["values"], mask)
    st.add("val/returns", returns, mask)
    st.add("val/returns_sq", returns ** 2, mask)
    st.add("val/res_sq", (returns - ro["values"]) ** 2, mask)
    st.add("val/res", returns - ro["values"], mask)
    st.add("tokens", mask.sum())


def train(cfg: PPOConfig, score_fn=None) -> dict:
    """The whole run. `score_fn(seq, attn, P, has_eos) -> (B,)` replaces the reward model (tests use a
    synthetic reward); by default the RM at cfg.reward_model scores."""
    dist_info = init_distributed(cfg.device)
    rank, world = dist_info.rank, dist_info.world_size
    dev, ptdtype = resolve_device_dtype(cfg.device, cfg.dtype, dist_info.local_rank)
    if dev.type == "cpu" and dist_info.ddp:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))  # ranks share the cores
    amp = autocast_ctx(dev, ptdtype)
    frozen_dtype = None if ptdtype == torch.float32 else ptdtype  # frozen models stored in the compute dtype

    # ---- setup: inputs are all read (and validated) before anything is written (input problems raise
    # InputError: one line and exit code 2 through common.cli)
    check_config(cfg, world)
    sources, eval_prompts, corpus, ptx_docs, lexicon_re = load_data(cfg)

    tok, actor, ref, rm, critic, score_fn, resume_state = load_models(cfg, dev, frozen_dtype, score_fn)
    state_dir = resume_state[0] if resume_state else None
    for m in (ref, rm):
        if m is not None:
            m.eval().requires_grad_(False)
    for m in (actor, ref, rm, critic):  # detail 14: dropout off in all four models
        if m is not None and cfg.disable_dropout:
            disable_dropout(m)
            m.eval()
    value_model = ValueModel(critic)
    ref = parallelize(ref, dist_info, dev, ptdtype, cfg.fsdp, trainable=False)  # sharded under FSDP2, else as is
    rm = parallelize(rm, dist_info, dev, ptdtype, cfg.fsdp, trainable=False) if rm is not None else None
    actor_train = parallelize(actor, dist_info, dev, ptdtype, cfg.fsdp, cfg.grad_ckpt)  # DDP / FSDP2 / as is
    critic_train = parallelize(value_model, dist_info, dev, ptdtype, cfg.fsdp, cfg.grad_ckpt)
    sharded = is_sharded(actor_train)
    actor_fwd = torch.compile(actor_train, dynamic=True) if cfg.compile else actor_train
    actor.decode_mode = "compile" if cfg.compile else "static"  # rollouts: model.py's static decode step
    critic_fwd = torch.compile(critic_train, dynamic=True) if cfg.compile else critic_train
    # detail 9/17: separate optimisers; Adam eps 1e-5 (N+: PyTorch's 1e-8 is more aggressive early on)
    # one fused kernel per step (as pretrain.py), not a Python loop over the tensors; FSDP2 shards: the loop
    fused = not cfg.fsdp
    opt_a = torch.optim.AdamW(actor.parameters(), lr=cfg.actor_lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=0,
                              fused=fused)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, betas=(0.9, 0.95), eps=1e-5,
                              weight_decay=0, fused=fused)
    scaler = torch.amp.GradScaler(dev.type, enabled=ptdtype == torch.float16)  # fp16 only, one code path
    kl_coef, moments, start_it, extra = cfg.kl_coef, RunningMoments(), 0, {}
    if resume_state and sharded:
        ts = load_sharded_state(resume_state[0], {"actor": actor, "critic": value_model},
                                {"actor": opt_a, "critic": opt_c})
    elif resume_state:
        _, opt_state, ts = resume_state
        opt_a.load_state_dict(opt_state["opt_actor"])
        opt_c.load_state_dict(opt_state["opt_critic"])
        scaler.load_state_dict(opt_state["scaler"])
    if resume_state:
        start_it, kl_coef = ts["iter"], ts["kl_coef"]
        moments.mean, moments.var, moments.count = ts["moments"]
        extra = {k: v for k, v in ts.items() if k not in ("iter", "kl_coef", "moments")}

    run_dir = Path(cfg.out)
    logger = None
    if dist_info.is_main:
        output_dir(run_dir)
        write_json_atomic(run_dir / "config.json", dataclasses.asdict(cfg))
        metrics = run_dir / "metrics.jsonl"
        if state_dir and metrics.is_file():  # drop rows logged after the state we resume from
            keep = [ln for ln in metrics.read_text().splitlines() if json.loads(ln).get("iter", 0) <= start_it]
            metrics.write_text("".join(ln + "\n" for ln in keep))
        elif not state_dir:  # a fresh run starts fresh logs
            metrics.unlink(missing_ok=True)
            (run_dir / "eval_samples.jsonl").unlink(missing_ok=True)
        logger = JsonlLogger(metrics)
        n_act, n_crit = (sum(p.numel() for p in m.parameters()) for m in (actor, critic))
        n_rm = sum(p.numel() for p in rm.parameters()) if rm is not None else 0
        log("config: " + json.dumps(dataclasses.asdict(cfg)))
        log(f"ppo_rlhf: actor/ref {n_act / 1e6:.2f}M, critic {n_crit / 1e6:.2f}M, RM {n_rm / 1e6:.2f}M params | "
            f"{world} rank(s) on {dev} {ptdtype} | {cfg.total_iters} iters x {cfg.rollout_batch_size} prompts | "
            "sources " + ", ".join(f"{s} ({len(x)}, w={w:g})"
                                   for s, x, w in zip(cfg.prompts, sources, cfg.prompt_weights)))

    def run_eval(it: int, tag: str) -> dict:
        with unsharded(actor):  # detail 19: generation and the corpus loss run on the gathered actor
            res, samples = evaluate(actor, ref, score_fn, tok, eval_prompts, corpus, lexicon_re, cfg, dev, amp,
                                    rank, world)
        if dist_info.is_main:
            logger.log({"iter": it, "eval": tag, **{f"eval/{k}": v for k, v in res.items()}})
            with open(run_dir / "eval_samples.jsonl", "a") as f:
                for s in samples:
                    f.write(json.dumps({"iter": it, **s}) + "\n")
            tox = res.get(f"toxicity_rate/{PROMPT_KINDS_TOXIC}", res.get("toxicity_rate", float("nan")))
            log(f"eval [{tag} @ it {it}] reward {res['reward']:.3f} | toxicity (red-team) {tox:.3f} | "
                f"eos {res['eos_rate']:.2f} | len {res['length']:.1f} | KL {res['kl']:.2f} | "
                f"corpus loss {res.get('corpus_loss', float('nan')):.4f}")
            if samples:
                log(f"  sample: {samples[0]['prompt'][-60:]!r} -> {samples[0]['response'][:100]!r}")
        return res

    t_start = time.perf_counter()
    if not state_dir and eval_prompts:
        extra["base_eval"] = run_eval(0, "base")  # the base model = the actor before any update

    B = cfg.rollout_batch_size  # the global batch: every draw below is a function of (seed, iteration) only
    per_rank = B // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)  # this rank's global rows
    weights = torch.tensor(cfg.prompt_weights, dtype=torch.float)
    total_updates = 0
    it = start_it
    for it in range(start_it + 1, cfg.total_iters + 1):
        t_it = time.perf_counter()
        # 17: warmup + cosine for both optimisers
        warm = round(cfg.warmup_frac * cfg.total_iters)
        lr_a = cosine_lr(it - 1, warm, cfg.total_iters, cfg.actor_lr, cfg.min_lr_ratio)
        lr_c = cosine_lr(it - 1, warm, cfg.total_iters, cfg.critic_lr, cfg.min_lr_ratio)
        for opt, lr in ((opt_a, lr_a), (opt_c, lr_c)):
            for gr in opt.param_groups:
                gr["lr"] = lr

        # ---- rollout (10: weighted mixture of sources). Detail 18: the global batch of prompts and its sampling
        # noise are drawn alike on every rank, and rank r generates global rows r * per_rank ... (r + 1) * per_rank
        # - so 2 ranks sample exactly the episodes 1 process samples
        gcpu = seeded_generator(cfg.seed, it, 0, CPU)
        src = torch.multinomial(weights, B, replacement=True, generator=gcpu).tolist()
        prompts = [sources[s][torch.randint(len(sources[s]), (1,), generator=gcpu).item()][0] for s in src]
        uniforms = torch.rand((B, cfg.max_new_tokens), generator=gcpu)
        pad_to = encode_prompts(tok, prompts, cfg.max_prompt_len)[0].shape[1]  # the global batch's width
        ro = rollout(actor, actor_fwd, ref, critic_fwd, score_fn, tok, prompts[rows], cfg, dev, amp,
                     uniforms[rows].to(dev), pad_to)
        mask = ro["mask"]

        # ---- rewards and advantages
        t_adv = time.perf_counter()
        with torch.no_grad():
            rm_stats = (rm.reward_mean, rm.reward_std) if rm is not None else (0.0, 1.0)
            score, rewards, kl, adv, returns = rewards_and_advantages(ro, cfg, kl_coef, moments, rm_stats)

        # ---- PPO update: several epochs over shuffled minibatches. Detail 18: the rollout batch is gathered, so
        # a minibatch is the same set of global rows for any world size; rank r trains on its share of each
        full = {k: all_gather_rows(v) for k, v in (("seq", ro["seq"]), ("attn", ro["attn"]), ("mask", mask),
                                                   ("old_lp", ro["old_lp"]), ("values", ro["values"]),
                                                   ("adv", adv), ("returns", returns))}
        st = MaskedStats()
        seq, attn, P = full["seq"], full["attn"], ro["P"]
        G = B // cfg.num_minibatches  # rows in a global minibatch
        mb = G // world  # this rank's share
        n_skipped, stopped_early = 0, False
        for epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=gcpu).to(dev)
            for k in range(cfg.num_minibatches):
                idx = perm[k * G + rank * mb:k * G + (rank + 1) * mb]
                m = full["mask"][idx]
                # DDP averages gradients over ranks: dividing each rank's token sum by (global tokens / world)
                # makes the result the mean over every valid token of the global minibatch
                denom = all_reduce_sum(m.sum().clone()) / world
                if not cfg.disable_dropout:
                    actor.train(), critic.train()
                with amp:
                    lp = response_logprobs(actor_fwd, seq[idx], attn[idx], P, cfg.temperature)
                a = full["adv"][idx]
                if cfg.adv_norm == "minibatch":  # 7: PPO2/CleanRL-style per-minibatch normalisation
                    a = masked_whiten(a, m)
                pg_loss, pst = ppo_policy_loss(lp, full["old_lp"][idx], a, m, cfg.cliprange, denom)  # 1
                # 16: ratio guard and approx-KL early stop, decided on global numbers so all ranks agree
                g = all_reduce_sum(torch.stack([(pst["ratio"] * m).sum(), (pst["approxkl"] * m).sum(),
                                                m.sum()]).double())
                ratio_mean, approxkl = (g[0] / g[2]).item(), (g[1] / g[2]).item()
                skip = ratio_mean > cfg.ratio_threshold
                keep = 0.0 if skip else 1.0  # backward still runs, so every DDP rank joins the same all-reduce
                # with PPO-ptx the actor runs a second forward: the first backward skips DDP's all-reduce and
                # the second reduces the sum of both gradients (the gradient-accumulation pattern)
                two_passes = dist_info.ddp and cfg.ptx_coef > 0
                with gradient_sync(actor_train, not two_passes):
                    scaler.scale(pg_loss * keep).backward()
                if cfg.ptx_coef > 0:  # 15: PPO-ptx, a language-modelling loss on pretraining text
                    pick = torch.randint(len(ptx_docs), (cfg.ptx_batch_size,), generator=gcpu).tolist()
                    n_ptx = cfg.ptx_batch_size // world  # the global ptx batch, split like the rollout rows
                    with amp:
                        nll, ntok = lm_loss_sums(actor_fwd, tok, [ptx_docs[j] for j in
                                                                  pick[rank * n_ptx:(rank + 1) * n_ptx]])
                    ptx_loss = nll / (all_reduce_sum(ntok.detach().clone()) / world)  # mean over global tokens
                    with gradient_sync(actor_train, True):
                        scaler.scale(cfg.ptx_coef * ptx_loss * keep).backward()
                    st.add("loss/ptx_avg", ptx_loss)
                with amp:
                    v = response_values(critic_fwd, seq[idx], attn[idx], P)
                vf_loss, vst = ppo_value_loss(v, full["values"][idx], full["returns"][idx], m, cfg.cliprange_value,
                                              denom)  # 9
                scaler.scale(vf_loss * keep).backward()
                if skip:
                    n_skipped += 1
                    warnings.warn(f"it {it}: mean ratio {ratio_mean:.2f} > ratio_threshold "
                                  f"{cfg.ratio_threshold}; minibatch skipped", stacklevel=1)
                else:
                    for opt, model in ((opt_a, actor), (opt_c, critic)):
                        scaler.unscale_(opt)
                        gn = clip_grad_norm(model.parameters(), cfg.max_grad_norm)  # 16, over all shards
                        st.add("grad_norm/" + ("actor" if model is actor else "critic"), torch.tensor(gn))
                        scaler.step(opt)
                    scaler.update()
                    total_updates += 1
                opt_a.zero_grad(set_to_none=True)
                opt_c.zero_grad(set_to_none=True)
                st.add("policy/approxkl_avg", pst["approxkl"], m)
                st.add("policy/clipfrac_avg", pst["clipfrac"], m)
                st.add("val/ratio", pst["ratio"], m)
                st.add("val/ratio_sq", pst["ratio"] ** 2, m)
                st.add("val/clipfrac_avg", vst["vf_clipfrac"], m)
                st.add("loss/policy_avg", pg_loss * denom / m.sum().clamp(min=1))
                st.add("loss/value_avg", vf_loss * denom / m.sum().clamp(min=1))
                if cfg.target_kl > 0 and approxkl > 1.5 * cfg.target_kl:  # 16: early stop (old TRL rule)
                    stopped_early = True
                    break
            if stopped_early:
                break
        actor.eval(), critic.eval()
        t_done = time.perf_counter()

        # ---- logging: global statistics of this iteration's rollouts (N+ names)
        with torch.no_grad():
            rollout_statistics(st, ro, score, rewards, kl, returns, kl_coef, tok, lexicon_re)
        s = st.means()
        n_tok = s.pop("tokens") * world  # a sum over the batch, not a mean: multiply back
        var_ret = s["val/returns_sq"] - s["val/returns"] ** 2
        var_res = s.pop("val/res_sq") - s.pop("val/res") ** 2
        s["val/explained_variance"] = 1.0 - var_res / max(var_ret, 1e-12)
        s["val/ratio_var"] = s.pop("val/ratio_sq") - s["val/ratio"] ** 2
        s.pop("val/returns_sq")
        t_tot = t_done - t_it
        row = {"iter": it, "time": round(time.perf_counter() - t_start, 3), **s, "objective/kl_coef": kl_coef,
               "lr/actor": lr_a, "lr/critic": lr_c, "ppo/minibatches_skipped": n_skipped,
               "ppo/early_stopped": stopped_early, "time/generate": ro["t_generate"],
               "time/score": ro["t_score"], "time/update": t_done - t_adv,
               "time/iteration": t_tot, "tokens_per_s": n_tok / t_tot,
               "shape/prompt_width": P, "shape/response_width": mask.shape[1]}  # padded widths (rank 0)
        if s["objective/kl"] < -1.0:  # detail 5: old TRL's threshold; tiny negatives are sampling noise
            warnings.warn(f"it {it}: batch KL {s['objective/kl']:.4f} < 0: check that sampling uses top_k 0, "
                          f"top_p 1 and the same temperature as the log-probs (see github.com/huggingface/trl/"
                          f"issues/351 and /1857)", stacklevel=1)
        if cfg.adaptive_kl:  # 4: global mean sequence KL, episodes summed over ranks
            kl_coef = adaptive_kl_coef(kl_coef, s["objective/kl"], cfg.kl_target, cfg.kl_horizon,
                                       cfg.rollout_batch_size)
        if dist_info.is_main:
            logger.log(row)
            log(f"it {it}/{cfg.total_iters} | score {s['objective/scores']:+.3f} | kl {s['objective/kl']:.3f} "
                f"(beta {kl_coef:.3g}) | eos {s['val/num_eos_tokens']:.2f} | len {s['val/response_length']:.1f}"
                f" | tox {s.get('val/toxicity_rate', float('nan')):.2f} | ratio {s['val/ratio']:.3f} clip "
                f"{s['policy/clipfrac_avg']:.3f} | ev "
                f"{s['val/explained_variance']:.2f} | {t_tot:.2f}s/it ({100 * ro['t_generate'] / t_tot:.0f}% "
                f"generate) {row['tokens_per_s']:.0f} tok/s | "
                f"{eta(it - start_it, cfg.total_iters - start_it, time.perf_counter() - t_start)}")

        if eval_prompts and cfg.eval_every and it % cfg.eval_every == 0 and it != cfg.total_iters:
            run_eval(it, "periodic")
        stop_now = cfg.stop_after_iters and it - start_it >= cfg.stop_after_iters and it != cfg.total_iters
        if (cfg.save_every and it % cfg.save_every == 0) or it == cfg.total_iters or stop_now:
            if sharded:  # every rank writes its shards (detail 19)
                save_sharded_state(run_dir / "state", {"actor": actor, "critic": value_model},
                                   {"actor": opt_a, "critic": opt_c},
                                   {"iter": it, "kl_coef": kl_coef, "moments": [moments.mean, moments.var,
                                                                                moments.count], **extra})
            elif dist_info.is_main:
                save_state(run_dir, it, actor, critic, tok, opt_a, opt_c, scaler, kl_coef, moments, extra)
        if stop_now:
            break

    # ---- final evaluation and save
    summary: dict = {"iters_done": it, "total_iters": cfg.total_iters, "world_size": world,
                     "time_s": round(time.perf_counter() - t_start, 2), "kl_coef_final": kl_coef}
    if it == cfg.total_iters:
        if eval_prompts:
            final = run_eval(it, "final")
            base = extra.get("base_eval", {})
            summary.update({"base": base, "final": final})
            key = f"toxicity_rate/{PROMPT_KINDS_TOXIC}"
            if key in base and key in final:
                summary["toxicity_red_team_relative_reduction"] = (
                    1 - final[key] / base[key] if base[key] > 0 else None)
            if "corpus_loss" in base:
                summary["corpus_loss_relative_change"] = final["corpus_loss"] / base["corpus_loss"] - 1
        if sharded:  # rank 0 writes the HF folders from the gathered weights, in bf16 when training in bf16
            save_dtype = ptdtype if ptdtype == torch.bfloat16 else torch.float32
            sd_a, sd_c = full_state_dict(actor), full_state_dict(value_model)
            if dist_info.is_main:
                actor = MistralForCausalLM.from_state_dict(actor.config,
                                                           {k: v.to(save_dtype) for k, v in sd_a.items()})
                critic = type(critic).from_state_dict(critic.config, {k.removeprefix("rm."): v.to(save_dtype)
                                                                      for k, v in sd_c.items()})
        if dist_info.is_main:
            actor.save_pretrained(run_dir / "final", tokenizer=tok)  # HF causal-LM folder + tokenizer
            critic.save_pretrained(run_dir / "critic", tokenizer=tok)
    if dist_info.is_main:
        write_json_atomic(run_dir / "summary.json", summary)
        # the curves of this run (reward, KL, toxicity, EOS, length); plots.py compares several runs and seeds
        plot_ppo_runs({"this run": [run_dir / "metrics.jsonl"]}, run_dir / "curves.png", title=f"ppo_rlhf.py {run_dir}")
        if "final" in summary:  # with held-out evaluation
            b, f = summary["base"], summary["final"]
            tk = f"toxicity_rate/{PROMPT_KINDS_TOXIC}"
            log(f"ppo_rlhf done in {summary['time_s']:.0f}s: red-team toxicity {b.get(tk, float('nan')):.3f} -> "
                f"{f.get(tk, float('nan')):.3f}, reward {b['reward']:.3f} -> {f['reward']:.3f}, "
                f"EOS {b['eos_rate']:.2f} -> {f['eos_rate']:.2f}, KL {f['kl']:.2f}, corpus loss "
                f"{b.get('corpus_loss', float('nan')):.4f} -> {f.get('corpus_loss', float('nan')):.4f}; "
                f"policy in {run_dir / 'final'}")
        elif it == cfg.total_iters:
            log(f"ppo_rlhf done in {summary['time_s']:.0f}s; policy in {run_dir / 'final'}")
        else:
            log(f"ppo_rlhf stopped after iteration {it}/{cfg.total_iters}; resume with --resume {run_dir}")
    cleanup_distributed()
    return summary


def main(argv: list[str] | None = None) -> dict:
    return train(parse_config(PPOConfig, argv, description=__doc__.split("\n\n")[0]))


if __name__ == "__main__":
    cli(main)
