"""Bad input in every LLM script: one line naming the file, line and field, exit code 2, no traceback, and
nothing left in --out. Valid real-world files (BOM, CRLF, blank lines, .gz) are accepted.

The faulty files and checkpoints are built here from a tiny model and toy rows. Each case runs the script's
entry point in-process through `common.cli`, exactly what `python script.py ...` runs (checked by subprocess
for one case per script).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import benchmarks
import common
import evaluate
import ppo_rlhf
import pretrain
import reward_model
from model import MistralForCausalLM, ModelConfig, train_tokenizer

torch.set_num_threads(1)

TEXTS = [f"\n\nHuman: Tell me about the {w} and the river.\n\nAssistant: The {w} is near the river, friend."
         for w in ("fox", "owl", "lamp", "mill", "tea", "moss", "bread", "rain", "boat", "bell", "pear", "crow")]


def hh_pair(i: int) -> dict:
    head = TEXTS[i % len(TEXTS)].rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant:"
    return {"chosen": head + " Gladly, here it is.", "rejected": head + " Go away, idiot."}


def write_jsonl(path: Path, rows: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict:
    """A tiny causal LM and reward model with their tokenizer, and a valid file of every kind the scripts read."""
    from reward_model import RewardModel
    d = tmp_path_factory.mktemp("kit")
    tok = train_tokenizer(TEXTS * 5, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, max_position_embeddings=256,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    MistralForCausalLM(cfg).save_pretrained(d / "base", tokenizer=tok)
    torch.manual_seed(1)
    RewardModel.from_causal_lm(d / "base").save_pretrained(d / "rm", tokenizer=tok)
    bench = d / "bench" / "hellaswag"
    rows = [{"ind": i, "activity_label": "Cooking", "ctx_a": "A cook adds salt.", "ctx_b": "then she",
             "endings": ["stirs.", "sings.", "flies.", "reads."], "label": str(i % 4)} for i in range(8)]
    write_jsonl(bench / "validation.jsonl", rows[2:])
    write_jsonl(bench / "train.jsonl", rows[:2])
    return {"dir": d, "tok": tok, "base": str(d / "base"), "rm": str(d / "rm"), "bench": str(d / "bench"),
            "corpus": write_jsonl(d / "corpus.jsonl", [{"text": t} for t in TEXTS * 4]),
            "sft": write_jsonl(d / "sft.jsonl", [{"chosen": t} for t in TEXTS]),
            "pairs": write_jsonl(d / "pairs.jsonl", [hh_pair(i) for i in range(16)]),
            "prompts": write_jsonl(d / "prompts.jsonl", [{"prompt": t.split("Assistant:")[0] + "Assistant:"}
                                                         for t in TEXTS])}


# ----------------------------------------------------------------------------------------------------------------
# Broken checkpoints and files, built from the valid ones


def broken_checkpoint(kind: str, kit: dict, tmp: Path) -> str:
    d = tmp / f"ckpt_{kind}"
    shutil.copytree(kit["rm"] if kind == "is_rm" else kit["base"], d)
    cfg_file = d / "config.json"
    if kind == "bad_json":
        cfg_file.write_text('{"hidden_size": 32,\n  "oops"\n}')
    elif kind == "heads":
        cfg = json.loads(cfg_file.read_text())
        cfg["num_attention_heads"] = 5
        cfg_file.write_text(json.dumps(cfg))
    elif kind == "truncated":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "missing_shard":
        MistralForCausalLM.from_pretrained(d).save_pretrained(d, max_shard_size=20_000)
        shards = sorted(d.glob("model-*.safetensors"))
        assert len(shards) > 1
        shards[-1].unlink()
    elif kind == "only_bin":
        (d / "model.safetensors").rename(d / "pytorch_model.bin")
    elif kind == "no_tokenizer":
        (d / "tokenizer.json").unlink()
    return str(d)


def bad_file(kind: str, kit: dict, tmp: Path, valid: str = "corpus") -> str:
    """A corrupted copy of a valid file of the kit (`valid`: corpus, pairs or prompts)."""
    good = Path(kit[valid]).read_bytes()
    if kind == "gz_truncated":
        data = gzip.compress(good * 20)
        (tmp / "bad.jsonl.gz").write_bytes(data[: len(data) // 2])
        return str(tmp / "bad.jsonl.gz")
    if kind == "not_utf8":  # the second line gets a Latin-1 byte
        first, second = good.splitlines()[:2]
        (tmp / "bad.jsonl").write_bytes(first + b"\n" + second.replace(b"e", b"\xe9", 1) + b"\n")
        return str(tmp / "bad.jsonl")
    if kind == "text_is_int":
        return write_jsonl(tmp / "bad.jsonl", [{"text": "fine"}, {"text": 3}])
    if kind == "chosen_is_int":
        return write_jsonl(tmp / "bad.jsonl", [hh_pair(0), {"chosen": 3, "rejected": "x"}])
    if kind == "empty":
        (tmp / "empty.jsonl").write_text("\n")
        return str(tmp / "empty.jsonl")
    raise ValueError(kind)


def refused(module, argv: list[str], capsys, out: Path, *must_name: str) -> str:
    """Run the script on a fault; assert exit 2, one stderr line naming `must_name`, no traceback, empty --out."""
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    with pytest.raises(SystemExit) as e:
        common.cli(module.main, argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{module.__name__}.py: error: "), lines[0]
    assert "Traceback" not in err
    for s in must_name:
        assert s in lines[0], (s, lines[0])
    if before is None:  # a fresh --out: nothing at all
        assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    else:  # an existing one (resume): nothing added or removed
        assert sorted(p.name for p in out.iterdir()) == before
    return lines[0]


def out_is_a_file(tmp: Path) -> Path:
    (tmp / "taken").write_text("a file of the user's\n")
    return tmp / "taken"


# ----------------------------------------------------------------------------------------------------------------
# pretrain.py

PRETRAIN_TINY = "--max_steps 2 --batch_size 4 --seq_len 16 --eval_batches 1 --probe none --device cpu".split()
CKPT_FAULTS = {"bad_json": ("config.json:3", "invalid JSON"), "heads": ("config.json", "num_attention_heads 5"),
               "truncated": ("model.safetensors", "truncated"), "missing_shard": ("names shard", "download"),
               "only_bin": ("pytorch_model.bin", "never loaded"), "no_tokenizer": ("no tokenizer.json",),
               "is_rm": ("holds a reward model", "MistralForSequenceClassification")}
FILE_FAULTS = {"gz_truncated": ("bad.jsonl.gz", "truncated or corrupt"), "not_utf8": ("bad.jsonl:2", "not UTF-8"),
               "text_is_int": ("bad.jsonl:2", "field 'text' must be str, got int")}


@pytest.mark.parametrize("fault", sorted(CKPT_FAULTS))
def test_pretrain_sft_refuses_a_broken_init_checkpoint(kit, tmp_path, capsys, fault):
    out = tmp_path / "out"
    argv = ["--sft", "--init", broken_checkpoint(fault, kit, tmp_path), "--data", kit["sft"], "--out", str(out)]
    refused(pretrain, argv + PRETRAIN_TINY, capsys, out, *CKPT_FAULTS[fault])


@pytest.mark.parametrize("fault", sorted(FILE_FAULTS))
def test_pretrain_refuses_a_bad_corpus(kit, tmp_path, capsys, fault):
    out = tmp_path / "out"
    argv = ["--data", bad_file(fault, kit, tmp_path), "--tokenizer", kit["base"], "--out", str(out)]
    refused(pretrain, argv + PRETRAIN_TINY, capsys, out, *FILE_FAULTS[fault])


@pytest.mark.parametrize("flags, names", [
    ("--batch_size 0", "--batch_size 0: must be > 0"), ("--lr=-1e-3", "--lr -0.001: must be > 0"),
    ("--eval_interval=-1", "--eval_interval -1"), ("--batch_size 4 --micro_batch_size 3", "--batch_size 4"),
    ("--valid_fraction 2", "--valid_fraction 2.0"), ("--max_steps 0", "--max_steps 0")])
def test_pretrain_refuses_bad_settings_before_writing(kit, tmp_path, capsys, flags, names):
    out = tmp_path / "out"
    argv = ["--data", kit["corpus"], "--tokenizer", kit["base"], "--out", str(out), *PRETRAIN_TINY, *flags.split()]
    refused(pretrain, argv, capsys, out, names)


def test_pretrain_refuses_an_out_that_is_a_file_and_a_truncated_resume_state(kit, tmp_path, capsys):
    taken = out_is_a_file(tmp_path)
    argv = ["--data", kit["corpus"], "--tokenizer", kit["base"], *PRETRAIN_TINY]
    refused(pretrain, argv + ["--out", str(taken)], capsys, tmp_path / "none", "--out", "existing file")
    assert taken.read_text() == "a file of the user's\n"
    run = tmp_path / "run"
    common.cli(pretrain.main, argv + ["--out", str(run), "--max_steps", "4", "--stop_after", "2",
                                      "--save_interval", "1"])
    state = run / "last" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    refused(pretrain, ["--resume", str(run)], capsys, run, "train_state.pt", "truncated or corrupt")


# ----------------------------------------------------------------------------------------------------------------
# reward_model.py

RM_TINY = "--batch_size 4 --eval_batch_size 8 --max_len 64 --device cpu".split()


@pytest.mark.parametrize("fault", ["truncated", "only_bin", "no_tokenizer", "heads"])
def test_reward_model_refuses_a_broken_init_checkpoint(kit, tmp_path, capsys, fault):
    out = tmp_path / "out"
    argv = ["--init", broken_checkpoint(fault, kit, tmp_path), "--train_files", kit["pairs"], "--test_files",
            kit["pairs"], "--out", str(out), *RM_TINY]
    refused(reward_model, argv, capsys, out, *CKPT_FAULTS[fault])


@pytest.mark.parametrize("fault, where, names", [
    ("gz_truncated", "train", ("bad.jsonl.gz", "truncated or corrupt")),
    ("not_utf8", "train", ("bad.jsonl:2", "not UTF-8")),
    ("chosen_is_int", "train", ("bad.jsonl:2", "field 'chosen' must be a string, got int")),
    ("empty", "test", ("empty.jsonl", "no usable test pairs"))])
def test_reward_model_refuses_bad_preference_files(kit, tmp_path, capsys, fault, where, names):
    out = tmp_path / "out"
    bad = bad_file(fault, kit, tmp_path, valid="pairs")
    files = {"train": kit["pairs"], "test": kit["pairs"], where: bad}
    argv = ["--init", kit["base"], "--train_files", files["train"], "--test_files", files["test"], "--out",
            str(out), *RM_TINY]
    refused(reward_model, argv, capsys, out, *names)


@pytest.mark.parametrize("flags, names", [
    ("--batch_size 0", "--batch_size 0: must be > 0"), ("--lr=-1", "--lr -1.0: must be > 0"),
    ("--epochs 0", "--epochs 0.0"), ("--batch_size 4 --micro_batch_size 3", "--batch_size 4"),
    ("--warmup_frac 1.5", "--warmup_frac 1.5")])
def test_reward_model_refuses_bad_settings_before_writing(kit, tmp_path, capsys, flags, names):
    out = tmp_path / "out"
    argv = ["--init", kit["base"], "--train_files", kit["pairs"], "--test_files", kit["pairs"], "--out", str(out),
            *RM_TINY, *flags.split()]
    refused(reward_model, argv, capsys, out, names)


def test_reward_model_refuses_an_out_that_is_a_file_and_a_truncated_resume_state(kit, tmp_path, capsys):
    argv = ["--init", kit["base"], "--train_files", kit["pairs"], "--test_files", kit["pairs"], *RM_TINY]
    taken = out_is_a_file(tmp_path)
    refused(reward_model, argv + ["--out", str(taken)], capsys, tmp_path / "none", "--out", "existing file")
    run = tmp_path / "run"
    common.cli(reward_model.main, argv + ["--out", str(run), "--max_steps", "1"])
    state = run / "ckpt" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    refused(reward_model, argv + ["--out", str(run), "--resume", str(run)], capsys, run, "state.pt",
            "truncated or corrupt")


# ----------------------------------------------------------------------------------------------------------------
# ppo_rlhf.py


def ppo_argv(kit: dict, out: Path, **kw) -> list[str]:
    flags = {"actor": kit["base"], "reward_model": kit["rm"], "prompts": kit["prompts"], "prompt_weights": "1",
             "eval_prompts": "", "eval_corpus": "", "toxic_lexicon": "", "ptx_coef": "0", "total_iters": "1",
             "rollout_batch_size": "4", "num_minibatches": "2", "max_new_tokens": "4", "out": str(out),
             "device": "cpu", **kw}
    return [a for k, v in flags.items() for a in (f"--{k}={v}",)]


@pytest.mark.parametrize("flag, fault, names", [
    ("actor", "is_rm", ("holds a reward model",)), ("actor", "truncated", ("model.safetensors", "truncated")),
    ("actor", "no_tokenizer", ("no tokenizer.json",)),
    ("reward_model", "is_lm", ("holds a causal LM", "MistralForSequenceClassification"))])
def test_ppo_refuses_checkpoints_of_the_wrong_kind_or_broken(kit, tmp_path, capsys, flag, fault, names):
    out = tmp_path / "out"
    path = kit["base"] if fault == "is_lm" else broken_checkpoint(fault, kit, tmp_path)
    refused(ppo_rlhf, ppo_argv(kit, out, **{flag: path}), capsys, out, *names)


@pytest.mark.parametrize("kw, names", [
    ({"num_minibatches": "0"}, ("--num_minibatches 0: must be > 0",)),
    ({"num_minibatches": "3"}, ("--num_minibatches 3", "per-rank batch 4")),
    ({"actor_lr": "-1"}, ("--actor_lr -1.0: must be > 0",)), ({"adv_norm": "batch"}, ("--adv_norm batch",)),
    ({"prompts": "GZ"}, ("bad.jsonl.gz", "truncated or corrupt")),
    ({"prompts": "UTF8"}, ("bad.jsonl:2", "not UTF-8"))])
def test_ppo_refuses_bad_settings_and_prompt_files(kit, tmp_path, capsys, kw, names):
    out = tmp_path / "out"
    if kw.get("prompts") == "GZ":
        kw = {"prompts": bad_file("gz_truncated", kit, tmp_path, valid="prompts")}
    elif kw.get("prompts") == "UTF8":
        kw = {"prompts": bad_file("not_utf8", kit, tmp_path, valid="prompts")}
    refused(ppo_rlhf, ppo_argv(kit, out, **kw), capsys, out, *names)


def test_ppo_refuses_an_out_that_is_a_file_and_a_truncated_resume_state(kit, tmp_path, capsys):
    taken = out_is_a_file(tmp_path)
    refused(ppo_rlhf, ppo_argv(kit, taken), capsys, tmp_path / "none", "--out", "existing file")
    run = tmp_path / "run"
    common.cli(ppo_rlhf.main, ppo_argv(kit, run, total_iters="2", stop_after_iters="1", save_every="1"))
    state = run / "state" / "optim.pt"
    state.write_bytes(state.read_bytes()[:100])
    refused(ppo_rlhf, ppo_argv(kit, run, total_iters="2", resume=str(run)), capsys, run, "optim.pt",
            "truncated or corrupt")


# ----------------------------------------------------------------------------------------------------------------
# evaluate.py


def eval_argv(kit: dict, out: Path, *extra: str) -> list[str]:
    return ["--model", f"base={kit['base']}", "--tasks", "hellaswag", "--data_dir", kit["bench"], "--out", str(out),
            "--device", "cpu", *extra]


@pytest.mark.parametrize("case, names", [
    ("model_is_rm", ("holds a reward model",)), ("model_truncated", ("model.safetensors", "truncated")),
    ("model_no_tokenizer", ("no tokenizer.json",)), ("judge_is_lm", ("holds a causal LM",)),
    ("three_endings", ("validation.jsonl:1", "field 'endings'")), ("not_utf8", ("validation.jsonl:2", "not UTF-8")),
    ("out_is_file", ("--out", "existing file"))])
def test_evaluate_refuses_bad_checkpoints_files_and_outputs(kit, tmp_path, capsys, case, names):
    out = tmp_path / "out"
    argv = eval_argv(kit, out)
    if case.startswith("model_"):
        argv[1] = "base=" + broken_checkpoint({"model_is_rm": "is_rm", "model_truncated": "truncated",
                                               "model_no_tokenizer": "no_tokenizer"}[case], kit, tmp_path)
    elif case == "judge_is_lm":
        argv += ["--judge", kit["base"]]
    elif case in ("three_endings", "not_utf8"):
        bench = tmp_path / "bench"
        shutil.copytree(kit["bench"], bench)
        f = bench / "hellaswag" / "validation.jsonl"
        rows = f.read_text().splitlines()
        if case == "three_endings":
            row = json.loads(rows[0])
            row["endings"] = row["endings"][:3]
            rows[0] = json.dumps(row)
            f.write_text("\n".join(rows) + "\n")
        else:
            f.write_bytes((rows[0] + "\n").encode() + rows[1].encode().replace(b"salt", b"s\xe9l") + b"\n")
        argv[argv.index("--data_dir") + 1] = str(bench)
    elif case == "out_is_file":
        out = out_is_a_file(tmp_path)
        argv[argv.index("--out") + 1] = str(out)
        out = tmp_path / "none"
    refused(evaluate, argv, capsys, out, *names)


# ----------------------------------------------------------------------------------------------------------------
# The same through a real process, and what real files contain


@pytest.mark.parametrize("script", ["pretrain.py", "evaluate.py"])
def test_a_real_process_prints_the_same_one_line_and_exits_2(kit, tmp_path, script):
    out = tmp_path / "out"
    if script == "pretrain.py":
        argv = ["--data", bad_file("text_is_int", kit, tmp_path), "--tokenizer", kit["base"], "--out", str(out),
                *PRETRAIN_TINY]
        want = "field 'text' must be str, got int"
    else:
        argv = eval_argv(kit, out, "--judge", kit["base"])
        want = "holds a causal LM"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(f"{script}: error: ") and want in r.stderr
    assert not out.exists()


def test_real_world_files_are_accepted_bom_crlf_blank_lines_gz(kit, tmp_path):
    clean = common.read_jsonl(kit["corpus"])
    raw = Path(kit["corpus"]).read_bytes()
    messy = b"\xef\xbb\xbf" + raw.replace(b"\n", b"\r\n\r\n") + b"\r\n\n"
    (tmp_path / "messy.jsonl").write_bytes(messy)
    (tmp_path / "messy.jsonl.gz").write_bytes(gzip.compress(messy))
    for name in ("messy.jsonl", "messy.jsonl.gz"):
        assert [r for _, r in common.read_jsonl(tmp_path / name)] == [r for _, r in clean]
    mmlu = tmp_path / "mmlu"
    mmlu.mkdir()
    (mmlu / "astronomy_test.csv").write_bytes(b'\xef\xbb\xbf"What, is it?",a,b,c,d,B\r\n"Line one\nline two",a,b,c,d,A'
                                              b"\r\n\r\n")
    docs = benchmarks.load_mmlu_csv(mmlu)
    assert [(d["question"], d["gold"]) for d in docs] == [("What, is it?", 1), ("Line one\nline two", 0)]
    out = tmp_path / "out"  # and the script runs on the messy file end to end
    common.cli(pretrain.main, ["--data", str(tmp_path / "messy.jsonl.gz"), "--tokenizer", kit["base"], "--out",
                               str(out), *PRETRAIN_TINY])
    assert (out / "final" / "model.safetensors").is_file()


def test_a_bug_of_ours_keeps_its_traceback(monkeypatch):
    def main(argv):
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        common.cli(main, [])
