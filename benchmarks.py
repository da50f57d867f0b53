"""Readers of the public benchmark file layouts, for evaluate.py.

Each loader reads one benchmark as it is distributed (the original release, or the Hugging Face dataset exported
to JSONL with its field names unchanged) and returns a list of docs: dicts with an `id`, a `subset` (subject,
task or language; "" for a single-set benchmark) and the fields of its prompt format:

    multiple choice  question, choices, gold (index)     MMLU, C-Eval, ARC, HellaSwag, WinoGrande, RACE, AGIEval,
                                                          TruthfulQA MC1
    open answer      question, golds (strings)           LAMBADA, TriviaQA, NQ, WebQuestions, DROP, GSM8K, MATH,
                                                          MGSM, TyDi QA, BBH
    code             prompt or question, test, solution  HumanEval, MBPP
    prompt only      prompt                              RealToxicityPrompts, HH-RLHF-style prompt files

and, where the benchmark has them, passage (reading comprehension), cot (a worked solution, for exemplars) and
prefix (BBH's official prompt files). A malformed row raises common.InputError naming file:line and the field
("validation.jsonl:3: field 'label' must be ..."). Which file a task reads, and how docs become prompts and
scores, is evaluate.py's registry (TASKS). LOADERS at the bottom maps the registry's loader names to readers.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import InputError, read_jsonl, read_text

LETTERS = string.ascii_uppercase

# ----------------------------------------------------------------------------------------------------------
# Gold answers in their normal form. evaluate.py imports these two, so that a gold answer and a model's answer
# are read by one rule (a GSM8K "#### 1,234" and an output "... 1234." both become "1234").


def clean_number(s: str) -> str:
    """A number's normal form: no thousands separators, "$" or final period; "18.0" -> "18"."""
    s = s.replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return s
    return str(int(v)) if v == int(v) else str(v)


def extract_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (braces balanced), as in Hendrycks' MATH."""
    i = text.rfind("\\boxed")
    if i < 0:
        m = re.search(r"The answer is\s*\$?([^$\n]+?)\$?\.?\s*$", text.strip())
        return m.group(1).strip() if m else None
    j = text.find("{", i)
    if j < 0:
        return None
    depth = 0
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k]
    return None


# ----------------------------------------------------------------------------------------------------------
# Files, rows and fields: every error names file:line and the field


def read_json_rows(path: Path) -> list[tuple[int, dict]]:
    """A .jsonl file, or a .json file holding a list of objects (MBPP sanitized, BBH); 'line' = item number."""
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, dict) and "examples" in data:  # BBH: {"canary": ..., "examples": [...]}
        data = data["examples"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputError(f"{path}:1: expected a list of JSON objects")
    return [(i, r) for i, r in enumerate(data, 1)]


_TYPE_NAMES = {str: "a string", list: "a list", dict: "an object", int: "an integer"}


def get(row: dict, name: str, where: str, typ: type | tuple | None = None, parent: str = "") -> Any:
    """row[name] or an InputError naming file:line and the field (parent.name for nested fields)."""
    name_shown = f"{parent}.{name}" if parent else name
    if name not in row:
        raise InputError(f"{where}: field {name_shown!r} missing")
    v = row[name]
    if typ is not None and not isinstance(v, typ):
        want = _TYPE_NAMES.get(typ, str(typ)) if isinstance(typ, type) else " or ".join(
            _TYPE_NAMES.get(t, str(t)) for t in typ)
        raise InputError(f"{where}: field {name_shown!r} must be {want}, got {type(v).__name__}")
    return v


def sha256_path(p: Path) -> str:
    """sha256 of a benchmark file, or of a folder's files and their relative paths (results.json records it)."""
    h = hashlib.sha256()
    for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
        h.update(f.relative_to(p).as_posix().encode() if p.is_dir() else b"")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def files_in(path: Path, pattern: str) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.glob(pattern))
    if not files:
        raise InputError(f"{path}: no files matching {pattern!r}")
    return files


def _subset_name(p: Path) -> str:
    return re.sub(r"_(test|dev|val|validation|train)$", "", p.stem)


def _letter_gold(ans: Any, n: int, where: str, name: str = "answer") -> int:
    if not isinstance(ans, str) or len(ans.strip()) != 1 or LETTERS.find(ans.strip()) not in range(n):
        raise InputError(f"{where}: field {name!r} must be one of {LETTERS[:n]}, got {ans!r}")
    return LETTERS.index(ans.strip())


def _read_json_object(f: Path) -> dict:
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{f}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise InputError(f"{f}:1: expected a JSON object")
    return d


# ----------------------------------------------------------------------------------------------------------
# The loaders, one per public layout


def load_mmlu_csv(path: Path) -> list[dict]:
    """MMLU original release: data/{test,dev}/<subject>_{test,dev}.csv, no header, question,A,B,C,D,answer."""
    docs = []
    for f in files_in(path, "*.csv"):
        reader = csv.reader(io.StringIO(read_text(f)))  # BOM, CRLF, .gz handled; quoted newlines kept
        for row in reader:
            where = f"{f}:{reader.line_num}"
            if not any(c.strip() for c in row):  # a blank line (many files end with one)
                continue
            if len(row) != 6:
                raise InputError(f"{where}: expected 6 columns (question,A,B,C,D,answer), got {len(row)}")
            docs.append({"id": f"{_subset_name(f)}-{len(docs)}", "subset": _subset_name(f),
                         "question": row[0], "choices": row[1:5],
                         "gold": _letter_gold(row[5], 4, where, "answer (column 6)")})
    return docs


def load_ceval_csv(path: Path) -> list[dict]:
    """C-Eval: <subject>_{val,dev}.csv with a header id,question,A,B,C,D,answer[,explanation]."""
    docs = []
    for f in files_in(path, "*.csv"):
        reader = csv.DictReader(io.StringIO(read_text(f)))  # DictReader skips blank lines itself
        for row in reader:
            where = f"{f}:{reader.line_num}"
            q = get(row, "question", where, str)
            choices = [get(row, k, where, str) for k in "ABCD"]
            docs.append({"id": f"{_subset_name(f)}-{row.get('id', len(docs))}", "subset": _subset_name(f),
                         "question": q, "choices": choices, "gold": _letter_gold(row.get("answer"), 4, where)})
    return docs


def load_arc(path: Path) -> list[dict]:
    """HF allenai/ai2_arc: id, question, choices{text[], label[]}, answerKey."""
    docs = []
    for i, row in read_jsonl(path):
        where = f"{path}:{i}"
        ch = get(row, "choices", where, dict)
        texts = get(ch, "text", where, list, parent="choices")
        labels = get(ch, "label", where, list, parent="choices")
        key = get(row, "answerKey", where, str)
        if key not in labels:
            raise InputError(f"{where}: field 'answerKey' {key!r} is not among choices.label {labels}")
        docs.append({"id": str(row.get("id", i)), "subset": "", "question": get(row, "question", where, str),
                     "choices": texts, "gold": labels.index(key)})
    return docs


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's cleanup of WikiHow artefacts (EleutherAI/lm-evaluation-harness, lm_eval/tasks/hellaswag/utils.py)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(path: Path) -> list[dict]:
    """HF Rowan/hellaswag: activity_label, ctx_a, ctx_b, endings (4), label (a string "0".."3").

    Query, choices and gold are lm-eval's process_docs (lm_eval/tasks/hellaswag/utils.py), character for
    character: ctx_b goes through str.capitalize(), which also lower-cases the rest of ctx_b ("Pours WATER"
    -> "pours water"); keeping ctx_b's case would score different text from every published lm-eval number."""
    docs = []
    for i, row in read_jsonl(path):
        where = f"{path}:{i}"
        ctx = get(row, "ctx_a", where, str) + " " + get(row, "ctx_b", where, str).capitalize()
        endings = get(row, "endings", where, list)
        if len(endings) != 4 or not all(isinstance(e, str) for e in endings):  # chance is 1/4 on every item
            raise InputError(f"{where}: field 'endings' must be a list of 4 strings, got {len(endings)} items")
        label = get(row, "label", where)
        if isinstance(label, bool) or str(label) not in ("0", "1", "2", "3"):  # HF's test split has label ""
            raise InputError(f"{where}: field 'label' must be '0', '1', '2' or '3', got {label!r} "
                             "(the test split is unlabelled: score the validation split)")
        docs.append({"id": str(row.get("ind", i)), "subset": "",
                     "question": _hellaswag_preprocess(get(row, "activity_label", where, str) + ": " + ctx),
                     "choices": [_hellaswag_preprocess(e) for e in endings], "gold": int(label)})
    return docs


def load_winogrande(path: Path) -> list[dict]:
    """WinoGrande: qID, sentence (one "_"), option1, option2, answer ("1"/"2")."""
    docs = []
    for i, row in read_jsonl(path):
        where = f"{path}:{i}"
        sent = get(row, "sentence", where, str)
        if sent.count("_") != 1:
            raise InputError(f"{where}: field 'sentence' must contain exactly one '_'")
        ans = str(get(row, "answer", where))
        if ans not in ("1", "2"):
            raise InputError(f"{where}: field 'answer' must be '1' or '2', got {ans!r}")
        docs.append({"id": str(row.get("qID", i)), "subset": "", "question": sent,
                     "choices": [get(row, "option1", where, str), get(row, "option2", where, str)],
                     "gold": int(ans) - 1})
    return docs


def load_lambada(path: Path) -> list[dict]:
    """LAMBADA (OpenAI jsonl): text; the target is the last whitespace-separated word."""
    docs = []
    for i, row in read_jsonl(path):
        text = get(row, "text", f"{path}:{i}", str).strip()
        if " " not in text:
            raise InputError(f"{path}:{i}: field 'text' has no last word to predict")
        ctx, word = text.rsplit(" ", 1)
        docs.append({"id": str(i), "subset": "", "question": ctx, "golds": [word], "text": text})
    return docs


def load_triviaqa(path: Path) -> list[dict]:
    """HF trivia_qa rc.nocontext: question, question_id, answer{value, aliases[], normalized_aliases[]}."""
    docs = []
    for i, row in read_jsonl(path):
        where = f"{path}:{i}"
        ans = get(row, "answer", where, dict)
        golds = list(dict.fromkeys([get(ans, "value", where, str, parent="answer")] + list(ans.get("aliases", []))
                                   + list(ans.get("normalized_aliases", []))))
        docs.append({"id": str(row.get("question_id", i)), "subset": "",
                     "question": get(row, "question", where, str), "golds": golds})
    return docs


def load_qa_list(path: Path) -> list[dict]:
    """NQ-open (question, answer[]) , WebQuestions (question, answers[]) and NQ short-QA (answers[])."""
    docs = []
    for i, row in read_jsonl(path):
        where = f"{path}:{i}"
        key = "answer" if "answer" in row else "answers"
        golds = get(row, key, where, (list, str))
        golds = [golds] if isinstance(golds, str) else [str(g) for g in golds]
        if not golds:
            raise InputError(f"{where}: field {key!r} is empty")
        docs.append({"id": str(i), "subset": "", "question": get(row, "question", where, str), "golds": golds})
    return docs


def load_race(path: Path) -> list[dict]:
    """HF ehovy/race: example_id, article, question, options (4), answer (letter)."""
    docs = []
    for i, row in read_jsonl(path):
        where = f"{path}:{i}"
        opts = get(row, "options", where, list)
        docs.append({"id": str(row.get("example_id", i)), "subset": "", "passage": get(row, "article", where, str),
                     "question": get(row, "question", where, str), "choices": opts,
                     "gold": _letter_gold(get(row, "answer", where), len(opts), where)})
    return docs


def load_drop(path: Path) -> list[dict]:
    """HF ucinlp/drop: passage, question, answers_spans{spans[]}."""
    docs = []
    for i, row in read_jsonl(path):
        where = f"{path}:{i}"
        spans = get(get(row, "answers_spans", where, dict), "spans", where, list, parent="answers_spans")
        docs.append({"id": str(row.get("query_id", i)), "subset": "", "passage": get(row, "passage", where, str),
                     "question": get(row, "question", where, str), "golds": [str(s) for s in spans]})
    return docs


def load_gsm8k(path: Path) -> list[dict]:
    """GSM8K: question, answer (worked solution with <<calc>> notes, last line "#### N")."""
    docs = []
    for i, row in read_jsonl(path):
        where = f"{path}:{i}"
        ans = get(row, "answer", where, str)
        if "####" not in ans:
            raise InputError(f"{where}: field 'answer' has no '#### N' final line")
        cot, final = ans.rsplit("####", 1)
        cot = re.sub(r"<<.*?>>", "", cot).strip().replace("\n", " ")  # calculator notes are not prose
        docs.append({"id": str(i), "subset": "", "question": get(row, "question", where, str),
                     "cot": cot, "golds": [clean_number(final.strip())]})
    return docs


def load_math(path: Path) -> list[dict]:
    """Hendrycks MATH: one JSON per problem under <split>/<type>/N.json (problem, level, type, solution),
    or a JSONL with the same fields."""
    docs = []
    files = [path] if path.is_file() else sorted(path.rglob("*.json"))
    if not files:
        raise InputError(f"{path}: no *.json problem files")
    for f in files:
        rows = read_jsonl(f) if f.suffix == ".jsonl" else [(1, _read_json_object(f))]
        for i, row in rows:
            where = f"{f}:{i}"
            sol = get(row, "solution", where, str)
            gold = extract_boxed(sol)
            if gold is None:
                raise InputError(f"{where}: field 'solution' has no \\boxed{{...}} answer")
            docs.append({"id": f"{f.parent.name}/{f.stem}" + (f"-{i}" if f.suffix == ".jsonl" else ""),
                         "subset": str(row.get("type", "")), "question": get(row, "problem", where, str),
                         "cot": sol, "golds": [gold]})
    return docs


def load_humaneval(path: Path) -> list[dict]:
    """openai/human-eval data/HumanEval.jsonl.gz, the file as distributed (read_jsonl opens .gz; the registry
    expects that name): task_id, prompt, canonical_solution, test, entry_point. The program run is human-eval's
    check_program: prompt + completion + test + check(entry_point) (evaluate.py's code_program)."""
    docs = []
    for i, row in read_jsonl(path):
        where = f"{path}:{i}"
        docs.append({"id": get(row, "task_id", where, str), "subset": "", "prompt": get(row, "prompt", where, str),
                     "test": get(row, "test", where, str) + f"\ncheck({get(row, 'entry_point', where, str)})\n",
                     "solution": row.get("canonical_solution", "")})
    return docs


def load_mbpp(path: Path) -> list[dict]:
    """MBPP: mbpp.jsonl (text, code, test_list, test_setup_code) or sanitized-mbpp.json (prompt, code,
    test_list, test_imports). Every assert is run; GPT-Fathom runs only the first, which looks like a bug: its
    evals/elsuite/basic/code.py (github.com/GPT-Fathom/GPT-Fathom) zips the asserts with one list of completions."""
    docs = []
    for i, row in read_json_rows(path):
        where = f"{path}:{i}"
        text = row["text"] if "text" in row else get(row, "prompt", where, str)
        tests = get(row, "test_list", where, list)
        setup = row.get("test_setup_code") or "\n".join(row.get("test_imports", []))
        docs.append({"id": str(get(row, "task_id", where, int)), "subset": "", "question": text,
                     "tests": [str(t) for t in tests], "solution": get(row, "code", where, str),
                     "test": setup + "\n" + "\n".join(tests) + "\n", "task_id": row["task_id"]})
    return docs


def load_mgsm_tsv(path: Path) -> list[dict]:
    """MGSM (google-research/url-nlp): mgsm_<lang>.tsv, no header, question <TAB> answer_number."""
    docs = []
    for f in files_in(path, "mgsm_*.tsv"):
        lang = f.stem.removeprefix("mgsm_")
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise InputError(f"{f}:{i}: expected 2 tab-separated columns (question, answer_number), "
                                 f"got {len(parts)}")
            docs.append({"id": f"{lang}-{i}", "subset": lang, "question": parts[0],
                         "golds": [clean_number(parts[1].strip())]})
    return docs


def load_mgsm_exemplars(path: Path) -> list[dict]:
    """MGSM exemplars (HF juletxara/mgsm train split, one <lang>.jsonl each): question, answer (CoT),
    answer_number."""
    docs = []
    for f in files_in(path, "*.jsonl"):
        for i, row in read_jsonl(f):
            where = f"{f}:{i}"
            q = re.sub(r"^\S+:\s*", "", get(row, "question", where, str), count=1)  # drop "Question:"
            cot = re.sub(r"^[^:\n]*:\s*", "", get(row, "answer", where, str), count=1)  # "Step-by-Step Answer:"
            docs.append({"id": f"{f.stem}-{i}", "subset": f.stem, "question": q, "cot": cot,
                         "golds": [clean_number(str(get(row, "answer_number", where)))]})
    return docs


def load_tydiqa(path: Path) -> list[dict]:
    """HF tydiqa secondary_task (GoldP): id (language prefix), context, question, answers{text[]}."""
    docs = []
    for i, row in read_jsonl(path):
        where = f"{path}:{i}"
        rid = get(row, "id", where, str)
        texts = get(get(row, "answers", where, dict), "text", where, list, parent="answers")
        docs.append({"id": rid, "subset": rid.split("-")[0], "question": get(row, "question", where, str),
                     "passage": get(row, "context", where, str), "golds": [str(t) for t in texts]})
    return docs


def load_agieval(path: Path, subsets: tuple[str, ...] = ()) -> list[dict]:
    """AGIEval v1: <subset>.jsonl with passage, question, options ["(A)...", ...], label (letter)."""
    docs = []
    files = [path / f"{s}.jsonl" for s in subsets] if subsets else files_in(path, "*.jsonl")
    for f in files:
        if not f.is_file():
            raise InputError(f"{f}: file missing (AGIEval subset {f.stem})")
        for i, row in read_jsonl(f):
            where = f"{f}:{i}"
            opts = [re.sub(r"^\s*\(?[A-J]\)\s*", "", o) for o in get(row, "options", where, list)]
            docs.append({"id": f"{f.stem}-{i}", "subset": f.stem, "passage": row.get("passage") or "",
                         "question": get(row, "question", where, str), "choices": opts,
                         "gold": _letter_gold(get(row, "label", where), len(opts), where, "label")})
    return docs


def load_bbh(path: Path) -> list[dict]:
    """BIG-Bench Hard: <task>.json {"canary", "examples": [{input, target}]}."""
    docs = []
    for f in files_in(path, "*.json"):
        for i, row in read_json_rows(f):
            where = f"{f}:{i}"
            docs.append({"id": f"{f.stem}-{i}", "subset": f.stem, "question": get(row, "input", where, str),
                         "golds": [str(get(row, "target", where))]})
    return docs


def load_bbh_prompts(path: Path) -> list[dict]:
    """BBH cot-prompts/<task>.txt: canary line(s), "-----", then the description and 3 Q/A exemplars."""
    docs = []
    for f in files_in(path, "*.txt"):
        text = f.read_text(encoding="utf-8")
        if "-----" not in text:
            raise InputError(f"{f}:1: no '-----' line separating the canary from the prompt")
        docs.append({"id": f.stem, "subset": f.stem, "prefix": text.split("-----", 1)[1].strip()})
    return docs


def load_truthfulqa_mc(path: Path) -> list[dict]:
    """HF truthful_qa multiple_choice: question, mc1_targets{choices[], labels[]} (exactly one 1)."""
    docs = []
    for i, row in read_jsonl(path):
        where = f"{path}:{i}"
        mc1 = get(row, "mc1_targets", where, dict)
        choices, labels = get(mc1, "choices", where, list, parent="mc1_targets"), get(mc1, "labels", where, list)
        if len(choices) != len(labels) or sum(labels) != 1:
            raise InputError(f"{where}: field 'mc1_targets' needs one label 1 per choices list")
        docs.append({"id": str(i), "subset": "", "question": get(row, "question", where, str),
                     "choices": choices, "gold": labels.index(1)})
    return docs


def load_rtp(path: Path) -> list[dict]:
    """RealToxicityPrompts: prompt{text, ...}, continuation{...}; we continue prompt.text."""
    docs = []
    for i, row in read_jsonl(path):
        where = f"{path}:{i}"
        docs.append({"id": str(i), "subset": "", "prompt": get(get(row, "prompt", where, dict), "text",
                                                             where, str, parent="prompt")})
    return docs


def load_hh_prompts(path: Path, kind: str = "red_team") -> list[dict]:
    """HH-RLHF-style prompt files ({"prompt": "\\n\\nHuman: ...\\n\\nAssistant:", "kind"}); one kind."""
    docs = []
    for i, row in read_jsonl(path):
        where = f"{path}:{i}"
        p = get(row, "prompt", where, str)
        if row.get("kind", kind) == kind:
            docs.append({"id": str(i), "subset": "", "prompt": p})
    return docs


LOADERS: dict[str, Callable[..., list[dict]]] = {
    "mmlu_csv": load_mmlu_csv, "ceval_csv": load_ceval_csv, "arc": load_arc, "hellaswag": load_hellaswag,
    "winogrande": load_winogrande, "lambada": load_lambada, "triviaqa": load_triviaqa, "qa_list": load_qa_list,
    "race": load_race, "drop": load_drop, "gsm8k": load_gsm8k, "math": load_math, "humaneval": load_humaneval,
    "mbpp": load_mbpp, "mgsm_tsv": load_mgsm_tsv, "mgsm_exemplars": load_mgsm_exemplars, "tydiqa": load_tydiqa,
    "agieval": load_agieval, "bbh": load_bbh, "bbh_prompts": load_bbh_prompts,
    "truthfulqa_mc": load_truthfulqa_mc, "rtp": load_rtp, "hh_prompts": load_hh_prompts,
}
