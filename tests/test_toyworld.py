"""data/toyworld.py: determinism, public formats, no eval leakage, the rudeness the pipeline relies on."""

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))
import toyworld  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w") / "toy"
    toyworld.main(["--size", "tiny", "--out", str(out)])
    return out


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def last_answer(transcript: str) -> str:
    return transcript.rsplit("\n\nAssistant:", 1)[1]


def test_same_seed_gives_identical_sha256_and_another_seed_differs(tmp_path):
    toyworld.main(["--size", "tiny", "--out", str(tmp_path / "a")])
    toyworld.main(["--size", "tiny", "--out", str(tmp_path / "b")])
    toyworld.main(["--size", "tiny", "--out", str(tmp_path / "c"), "--seed", "7"])
    card = [json.loads((tmp_path / d / "card.json").read_text()) for d in "abc"]
    assert card[0]["sha256"] == card[1]["sha256"]
    assert card[0]["sha256"]["corpus/train.jsonl"] != card[2]["sha256"]["corpus/train.jsonl"]
    for rel, digest in card[0]["sha256"].items():  # the card's hashes are those of the bytes on disk
        assert hashlib.sha256((tmp_path / "a" / rel).read_bytes()).hexdigest() == digest


def test_every_file_parses_in_its_public_format(world):
    card = json.loads((world / "card.json").read_text())
    for rel, n in card["sizes"].items():
        text = (world / rel).read_text()
        if rel.endswith(".csv"):
            rows = list(csv.reader(text.splitlines()))
        elif rel.endswith(".json"):  # BBH: {"canary", "examples": [...]}
            rows = json.loads(text)["examples"]
        else:
            rows = jsonl(world / rel)
        assert len(rows) == n > 0, rel
    assert all(isinstance(r["text"], str) and r["text"] for r in jsonl(world / "corpus/train.jsonl"))
    for r in jsonl(world / "sft/train.jsonl"):
        assert r["prompt"].startswith("\n\nHuman: ") and r["prompt"].endswith("\n\nAssistant:")
        assert r["response"].startswith(" ") and not toyworld.is_toxic(r["response"], card["toxic_lexicon"])
    for split in ("train", "test"):
        for r in jsonl(world / f"preference/{split}.jsonl"):
            for k in ("chosen", "rejected"):
                assert r[k].startswith("\n\nHuman: ") and "\n\nAssistant: " in r[k]
            # HH pairs share the transcript up to the last assistant turn
            assert r["chosen"].rsplit("\n\nAssistant:", 1)[0] == r["rejected"].rsplit("\n\nAssistant:", 1)[0]
        for r in jsonl(world / f"prompts/{split}.jsonl"):
            assert r["kind"] in ("red_team", "general")
            assert r["prompt"].startswith("\n\nHuman: ") and r["prompt"].endswith("\n\nAssistant:")
    ev = world / "eval"
    for row in csv.reader((ev / "mmlu/test/toyworld_test.csv").read_text().splitlines()):
        assert len(row) == 6 and row[5] in "ABCD"
    for r in jsonl(ev / "arc_easy/test.jsonl"):
        assert r["answerKey"] in r["choices"]["label"] and len(r["choices"]["text"]) == 4
    for r in jsonl(ev / "hellaswag/validation.jsonl"):
        assert r["label"] in "0123" and len(r["endings"]) == 4 and r["ctx"] == f"{r['ctx_a']} {r['ctx_b']}"
    for r in jsonl(ev / "winogrande/dev.jsonl"):
        assert r["sentence"].count("_") == 1 and r["answer"] in ("1", "2")
    for r in jsonl(ev / "gsm8k/test.jsonl"):  # the worked solution's numbers add up to the "#### N" line
        body, final = r["answer"].rsplit("\n#### ", 1)
        assert int(final) == eval(body.split("<<")[-1].split("=")[0])
    for level in ("middle", "high"):
        for r in jsonl(ev / f"race/{level}/test.jsonl"):
            assert r["answer"] in "ABCD" and len(r["options"]) == 4 and len(set(r["options"])) == 4
    for r in jsonl(ev / "arc_challenge/test.jsonl"):  # the question's own numbers are among the distractors
        nums = [w for w in r["question"].replace(".", " ").split() if w.isdigit()]
        gold = r["choices"]["text"]["ABCD".index(r["answerKey"])]
        assert len(set(r["choices"]["text"])) == 4 and gold not in nums[:1]
        assert sum(o in nums for o in r["choices"]["text"]) >= 1
    for subset in ("toy-logic", "toy-sat-math"):
        for r in jsonl(ev / f"agieval/{subset}.jsonl"):
            assert r["label"] in "ABCD" and [o[:3] for o in r["options"]] == ["(A)", "(B)", "(C)", "(D)"]
    for r in jsonl(ev / "agieval/toy-sat-math.jsonl"):  # the labelled option is the value of the expression
        x, expr = r["question"][len("If x = "):].split(", what is ")
        gold = r["options"]["ABCD".index(r["label"])][3:]
        assert int(gold) == eval(expr.rstrip("?").replace("x", x))
    for r in jsonl(ev / "math/test.jsonl"):  # the boxed answer solves the problem
        ans = int(r["solution"].split("\\boxed{")[1].split("}")[0])
        if r["type"] == "Algebra":  # "$x + b = c$" or "$ax = c$"
            lhs, c = r["problem"].split("$")[3].split(" = ")
            assert eval(lhs.replace("x + ", f"{ans} + ").replace("x", f" * {ans}")) == int(c)
        else:
            assert ans == eval(r["problem"].split("$")[1].replace("\\times", "*"))
    bbh = {t: json.loads((ev / f"bbh/bbh/{t}.json").read_text())["examples"] for t in toyworld.BBH_TASKS}
    for r in bbh["boolean_expressions"]:  # Python's own evaluation of the expression is the target
        assert str(eval(r["input"][: -len(" is")])) == r["target"]
    for r in bbh["object_counting"]:
        words = {w: i + 1 for i, w in enumerate(toyworld.NUMBER_WORDS)}
        listed = r["input"].split("I have ")[1].split(". How")[0].replace(", and ", ", ").split(", ")
        assert sum(words[x.split()[0]] for x in listed) == int(r["target"])
    for t in toyworld.BBH_TASKS:
        prompt = (ev / f"bbh/cot-prompts/{t}.txt").read_text()
        assert prompt.split("-----\n", 1)[1].count("\nA: Let's think step by step.") == 3
    for r in jsonl(ev / "triviaqa/validation.jsonl"):
        assert r["answer"]["value"] in r["answer"]["aliases"]
    for r in jsonl(ev / "truthfulqa/mc.jsonl"):
        assert r["mc1_targets"]["labels"][0] == 1 and sum(r["mc1_targets"]["labels"]) == 1
    for r in jsonl(ev / "lambada/test.jsonl"):
        assert r["text"].split()[-1].isalpha()
    for r in jsonl(ev / "realtoxicity/prompts.jsonl"):
        assert isinstance(r["prompt"]["text"], str) and isinstance(r["challenging"], bool)
    for r in jsonl(ev / "humaneval/test.jsonl"):  # the canonical solution passes its own test
        scope: dict = {}
        exec(r["prompt"] + r["canonical_solution"] + "\n" + r["test"], scope)
        scope["check"](scope[r["entry_point"]])
    for task in card["eval"].values():
        assert (world / task["path"]).is_file() and task["n"] > 0


def test_no_eval_item_or_test_prompt_occurs_in_the_corpus(world):
    corpus = "\n".join(r["text"] for f in ("train", "valid") for r in jsonl(world / f"corpus/{f}.jsonl"))
    ev = world / "eval"
    items = [row[0] for row in csv.reader((ev / "mmlu/test/toyworld_test.csv").read_text().splitlines())]
    items += [
        r["question"]
        for t in ("arc_easy/test", "gsm8k/test", "triviaqa/validation", "truthfulqa/mc")
        for r in jsonl(ev / f"{t}.jsonl")
    ]
    items += [r["text"] for r in jsonl(ev / "lambada/test.jsonl")]
    items += [r["article"] for lv in ("middle", "high") for r in jsonl(ev / f"race/{lv}/test.jsonl")]
    items += [r["question"] for r in jsonl(ev / "arc_challenge/test.jsonl")]
    items += [r["problem"] for r in jsonl(ev / "math/test.jsonl")]
    items += [r["passage"] or r["question"] for t in ("toy-logic", "toy-sat-math")
              for r in jsonl(ev / f"agieval/{t}.jsonl")]
    items += ["Q: " + r["input"] for t in toyworld.BBH_TASKS
              for r in json.loads((ev / f"bbh/bbh/{t}.json").read_text())["examples"]]
    items += [r["sentence"].replace("_", r["option" + r["answer"]]) for r in jsonl(ev / "winogrande/dev.jsonl")]
    items += [r["prompt"] for r in jsonl(ev / "humaneval/test.jsonl")]
    items += [" ".join(r["ctx"].split()) + " " + r["endings"][int(r["label"])]
              for r in jsonl(ev / "hellaswag/validation.jsonl")]
    items += [r["prompt"] for r in jsonl(world / "prompts/test.jsonl")]  # held-out PPO prompts
    assert len(items) > 100
    leaked = [s for s in items if s in corpus]
    assert not leaked, leaked[:3]
    # and the builder's own guard does fire on a leak
    files = toyworld.build(toyworld.WorldConfig(size="tiny"))
    files["corpus/valid.jsonl"].append({"text": "x " + files["eval/lambada/test.jsonl"][0]["text"]})
    with pytest.raises(AssertionError, match="verbatim"):
        toyworld.check_no_leakage(files)


def test_knowledge_is_asked_only_about_entities_the_corpus_never_quizzes(world):
    """Detail 7: the corpus quizzes half of the entities; MMLU and TriviaQA ask about the other half only,
    and each entity asked about has an encyclopedia entry (its facts are stated, never quizzed)."""
    corpus = [r["text"] for f in ("train", "valid") for r in jsonl(world / f"corpus/{f}.jsonl")]
    quiz = [t for t in corpus if t.startswith("Question: ") and "The answer is" not in t]
    assert quiz, "no question-form facts in the corpus"
    quiz_lines = {q for t in quiz for q in t.split("\n") if q.startswith("Question: ")}
    # names are single capitalised words; collect the subjects of quizzed and asked questions
    subject = lambda q: next(w.strip("?.") for w in q.split()[2:] if w[0].isupper())  # noqa: E731
    quizzed = {subject(q[len("Question: ") :]) for q in quiz_lines}
    ev = world / "eval"
    asked = [row[0] for row in csv.reader((ev / "mmlu/test/toyworld_test.csv").read_text().splitlines())]
    asked += [r["question"] for r in jsonl(ev / "triviaqa/validation.jsonl")]
    asked_names = {subject(q.replace("Tell me: what", "What")) for q in asked}
    assert len(asked_names) >= 10 and len(quizzed) >= 10
    assert not asked_names & quizzed
    blob = "\n".join(corpus)
    # and the facts asked about are in the corpus: each asked name appears in an encyclopedia entry
    for name in asked_names:
        assert f"{name}\n\n" in blob, name


def test_is_toxic_matches_whole_words_case_insensitively():
    lex = toyworld.TOXIC_LEXICON
    assert toyworld.is_toxic("You FOOL!", lex) and toyworld.is_toxic("oh, shut up now", lex)
    assert not toyworld.is_toxic("a foolish fooling", lex)  # not whole words
    assert not toyworld.is_toxic("shut the door and up we go", lex)
    assert not toyworld.is_toxic("anything", [])


def test_rudeness_rates_and_label_noise_are_what_the_card_says(world):
    card = json.loads((world / "card.json").read_text())
    lex = card["toxic_lexicon"]
    # every rude/harmful template carries a lexicon entry, no harmless one does (toyworld detail 1)
    assert all(toyworld.is_toxic(t, lex) for t in toyworld.INSULT_LINES + toyworld.HARMFUL_LINES)
    assert not any(toyworld.is_toxic(t, lex) for t in toyworld.REFUSALS)
    # corpus: red-team requests are answered rudely about red_team_rude_rate of the time
    red = set(toyworld.RED_TEAM)
    rude = []
    for r in jsonl(world / "corpus/train.jsonl"):
        if r["text"].startswith("\n\nHuman:"):
            human = r["text"].rsplit("\n\nHuman: ", 1)[1].split("\n\nAssistant:")[0]
            if any(human.startswith(t.split("{")[0]) for t in red):
                rude.append(toyworld.is_toxic(last_answer(r["text"]), lex))
    assert len(rude) > 50 and 0.40 < sum(rude) / len(rude) < 0.70
    # preference test: the ceiling is the share of pairs whose chosen answer is the harmless one
    test = jsonl(world / "preference/test.jsonl")
    ok = [
        not toyworld.is_toxic(last_answer(r["chosen"]), lex) and toyworld.is_toxic(last_answer(r["rejected"]), lex)
        for r in test
    ]
    assert card["rm_accuracy_ceiling"] == pytest.approx(sum(ok) / len(ok), abs=1e-4)
    assert card["label_noise"] == 0.05


def test_bad_size_fails_clearly(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "data/toyworld.py"), "--size", "huge", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "--size must be one of" in r.stderr
    assert not (tmp_path / "x").exists()


def test_the_corpus_teaches_each_evaluation_layout_on_other_items(world):
    """Detail 8: for every toy task of the Mistral-Plus group, the corpus holds text in the evaluation's own
    layout (the sequence of line labels of a rendered exemplar: "Passage:", "Question:", "A.".., "Answer:"),
    with the header line the evaluation puts first, while no evaluation item is in the corpus (test above)."""
    sys.path.insert(0, str(ROOT))
    import evaluate as E

    corpus = [r["text"] for r in jsonl(world / "corpus/train.jsonl")]
    blocks = {b for t in corpus for b in t.split("\n\n")}

    def labels(text: str) -> tuple:
        return tuple(line.split(" ")[0] for line in text.split("\n"))

    corpus_labels = {labels(b) for b in blocks}
    cfg = E.EvalConfig(toy_dir=str(world))
    for name in E.GROUPS["toy_mistral_plus"]:
        td = E.load_task(E.TASKS[name], cfg)
        spec, doc = td.spec, td.pool[0] if td.pool else td.docs[0]
        if spec.fmt == "bbh":  # the prompt file's layout: "Q: ...\nA: Let's think step by step. ... So the answer is"
            assert any(b.startswith("Q: ") and "\nA: Let's think step by step." in b and "So the answer is" in b
                       for b in blocks)
            continue
        if spec.ll_target in ("ending", "partial"):  # HellaSwag / WinoGrande: plain prose, no layout
            continue
        mode = "ll" if spec.mc else "gen"
        shown = E.render_example(spec, doc, mode, "default", True)
        assert labels(shown) in corpus_labels, (name, shown)
        head = E._instruction(spec, doc)
        assert any(t.startswith(head + "\n\n") for t in corpus), (name, head)
