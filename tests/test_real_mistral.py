"""The real path: Mistral's own tokenizer and a real-shaped checkpoint, against sentencepiece and transformers.

References: sentencepiece's encode/decode of Mistral's `.model` files (from mistral-common), and transformers'
`MistralForCausalLM`, `MistralForSequenceClassification`, `AutoTokenizer` and `generate`. Every LLM script's CLI
runs end to end on the checkpoint of `conftest.real_mistral`, and what it writes is loaded back by transformers.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import transformers
from conftest import ROOT, sentencepiece_file, tokenizer_json_from_sentencepiece
from tokenizers import Tokenizer as TK

import model as M

torch.set_num_threads(1)

WORDS = ("the of and to in is you that it was for on are as with they at be this have from or one had by word but "
         "not what all were we when your can said there use each which she do how their if will up other").split()
CHARS = list("abcXYZ éüß漢字😀🦓\n\t  .,;:!?()[]{}=+-*/\\\"'`~@#$%^&_|0123456789")
FIXED = ["", " ", "   ", "\n", "\n\n\nHuman: hi\n\nAssistant:", "Hello world", " Hello", "  two leading", "trailing  ",
         "\t\tTabs", "def f(x):\n    return x**2\n", "if (a && b) { return c; }", "héllo wörld ñ", "日本語のテキスト",
         "😀🎉 emoji 👍🏽", "a  b   c    d", "x\r\ny", "1234567890 3.14159", "Ελληνικά", "Привет мир", "مرحبا",
         "\u200b zero width", "ﬁ ligature"]


def varied_strings(n: int = 400, seed: int = 0) -> list[str]:
    """Unicode, emoji, code, whitespace runs (leading ones too) and the empty string. No literal "<s>": a
    tokenizer.json matches special-token text inside the input, sentencepiece does not."""
    rng = random.Random(seed)
    out = list(FIXED)
    while len(out) < n:
        if rng.random() < 0.5:
            s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        else:
            s = "".join(rng.choice(CHARS) for _ in range(rng.randint(1, 30)))
        out.append(" " * rng.randint(1, 3) + s if rng.random() < 0.3 else s)
    return out


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_tokenizer_json_equals_sentencepiece_encode_and_decode(version):
    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_file(version)))
    tok = M.Tokenizer(TK.from_str(tokenizer_json_from_sentencepiece(sentencepiece_file(version))))
    assert tok.vocab_size == sp.vocab_size() and (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id())
    for s in varied_strings():
        ids = tok.encode(s)
        assert ids == [sp.bos_id()] + sp.encode(s), repr(s)
        assert tok.decode(ids) == sp.decode(ids[1:]) == s, repr(s)


def test_real_tokenizer_pads_inside_the_vocab_and_saves_what_transformers_loads(real_mistral, tmp_path):
    tok = M.Tokenizer.from_file(real_mistral)
    assert tok.vocab_size == 32000 and tok.pad_id == tok.unk_id == 0  # no token added: no row past the model's
    tok.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == json.loads(
        (real_mistral / "tokenizer.json").read_text())
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == 32000 and hf.pad_token_id == 0
    for s in varied_strings(100, seed=1):
        assert hf(s)["input_ids"] == tok.encode(s), repr(s)


def test_toy_tokenizer_keeps_a_leading_space_like_sentencepiece():
    tok = M.train_tokenizer(["Hello world. The cat sat on the mat.\n  indented"] * 20, vocab_size=300)
    for s in varied_strings(200, seed=2):
        assert tok.decode(tok.encode(s)) == s, repr(s)


def _inputs(n_rows: int = 3, length: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids of different lengths (the longest past the sliding window of 8)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [[1] + torch.randint(3, 32000, (length - 3 * r - 1,), generator=g).tolist() for r in range(n_rows)]
    return M.pad_batch(seqs, 0, side="left")


def test_logits_equal_transformers_both_ways_on_the_real_shape(real_mistral, tmp_path):
    ours = M.MistralForCausalLM.from_pretrained(real_mistral, dtype=torch.float32).eval()
    hf = transformers.MistralForCausalLM.from_pretrained(real_mistral, dtype=torch.float32).eval()
    ids, mask = _inputs()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits.float()
        real = mask.bool()
        torch.testing.assert_close(ours(ids, mask)[real], ref[real], atol=2e-5, rtol=1e-4)
        ours.save_pretrained(tmp_path / "ours")
        back = transformers.MistralForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert back.dtype == torch.float32
        torch.testing.assert_close(back(ids, attention_mask=mask).logits.float()[real], ref[real], atol=2e-5,
                                   rtol=1e-4)


def test_greedy_generate_equals_transformers_left_padded_past_the_window(real_mistral):
    ours = M.MistralForCausalLM.from_pretrained(real_mistral, dtype=torch.float32).eval()
    hf = transformers.MistralForCausalLM.from_pretrained(real_mistral, dtype=torch.float32).eval()
    ids, mask = _inputs(length=12, seed=3)
    new = 16  # prompt + new tokens run well past the window of 8
    with torch.no_grad():
        got = ours.generate(ids, mask, max_new_tokens=new, temperature=0.0, eos_token_id=None, pad_token_id=0)
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          pad_token_id=0)
    assert got.sequences[:, ids.shape[1]:].tolist() == ref[:, ids.shape[1]:].tolist()


def test_reward_model_scores_equal_transformers_sequence_classification(real_mistral, tmp_path):
    from reward_model import RewardModel
    tok = M.Tokenizer.from_file(real_mistral)
    torch.manual_seed(0)
    rm = RewardModel.from_causal_lm(real_mistral, dtype=torch.float32).eval()
    rm.save_pretrained(tmp_path / "rm", tokenizer=tok)
    hf = transformers.MistralForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert hf.config.pad_token_id == tok.pad_id
    texts = ["\n\nHuman: hi\n\nAssistant: hello there", "\n\nHuman: a longer question, please?\n\nAssistant: no"]
    seqs = tok.encode_batch(texts, bos=True, eos=True)
    ids, mask = M.pad_batch(seqs, tok.pad_id, side="right")
    with torch.no_grad():
        torch.testing.assert_close(rm.score_ids(seqs, tok.pad_id), hf(ids, attention_mask=mask).logits[:, 0],
                                   atol=2e-5, rtol=1e-4)


def test_dtype_keys_follow_the_weights_saved(real_mistral, tmp_path):
    src = json.loads((real_mistral / "config.json").read_text())
    assert src.get("dtype") == "bfloat16"  # what transformers 5 writes
    m = M.MistralForCausalLM.from_pretrained(real_mistral, dtype=torch.float32)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "float32"
    hf = transformers.MistralForCausalLM.from_pretrained(tmp_path)
    assert hf.dtype == torch.float32
    assert torch.equal(hf.lm_head.weight, m.lm_head.weight)  # fp32 kept, not rounded through bf16


# ---------------------------------------------------------------------------------------------------------------
# every LLM script's CLI on the real-shaped checkpoint


def _hh_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        prompt = f"\n\nHuman: Tell me about {topic}.\n\nAssistant:"
        rows.append({"chosen": f"{prompt} Gladly: {topic} is a fine thing.",
                     "rejected": f"{prompt} No, you fool. {topic.capitalize()}!"})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cli(script: str, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, str(ROOT / script), *args, "--device", "cpu"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


def _assert_hf_logits_equal(folder: Path, ids: torch.Tensor, mask: torch.Tensor) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    ours = M.MistralForCausalLM.from_pretrained(folder).eval()
    hf = transformers.MistralForCausalLM.from_pretrained(folder).eval()
    assert str(hf.dtype).removeprefix("torch.") == cfg["dtype"] == cfg["torch_dtype"] == \
        str(ours.lm_head.weight.dtype).removeprefix("torch.")
    with torch.no_grad():
        real = mask.bool()
        torch.testing.assert_close(ours(ids, mask)[real], hf(ids, attention_mask=mask).logits.float()[real],
                                   atol=2e-5, rtol=1e-4)


def test_every_llm_script_runs_on_the_real_shaped_checkpoint(real_mistral, tmp_path):
    train = _write_jsonl(tmp_path / "hh" / "train.jsonl", _hh_rows(48, 0))
    test = _write_jsonl(tmp_path / "hh" / "test.jsonl", _hh_rows(16, 1))
    ids, mask = _inputs()

    _cli("pretrain.py", "--sft", "--init", str(real_mistral), "--data", train, "--valid_data", test,
         "--out", str(tmp_path / "sft"), "--max_steps", "3", "--batch_size", "4", "--lr", "1e-4",
         "--eval_interval", "0", "--probe", "none", "--seq_len", "64")
    sft = tmp_path / "sft" / "final"
    _assert_hf_logits_equal(sft, ids, mask)
    assert json.loads((sft / "tokenizer.json").read_text()) == json.loads((real_mistral / "tokenizer.json").read_text())

    _cli("reward_model.py", "--init", str(real_mistral), "--train_files", train, "--test_files", test,
         "--out", str(tmp_path / "rm"), "--batch_size", "8", "--eval_batch_size", "8", "--max_len", "64")
    rm_dir = tmp_path / "rm" / "final"
    from reward_model import RewardModel
    tok = M.Tokenizer.from_file(rm_dir)
    seqs = tok.encode_batch([r["chosen"] for r in _hh_rows(3, 2)], bos=True, eos=True)
    r_ids, r_mask = M.pad_batch(seqs, tok.pad_id, side="right")
    hf_rm = transformers.MistralForSequenceClassification.from_pretrained(rm_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(RewardModel.from_pretrained(rm_dir).eval().score_ids(seqs, tok.pad_id),
                                   hf_rm(r_ids, attention_mask=r_mask).logits[:, 0].float(), atol=2e-5, rtol=1e-4)

    _cli("ppo_rlhf.py", "--actor", str(sft), "--reward_model", str(rm_dir), "--prompts", train,
         "--prompt_weights", "1", "--eval_prompts", test, "--eval_corpus", "", "--toxic_lexicon", "",
         "--ptx_coef", "0", "--total_iters", "1", "--rollout_batch_size", "4", "--max_new_tokens", "8",
         "--eval_n", "4", "--out", str(tmp_path / "ppo"))
    _assert_hf_logits_equal(tmp_path / "ppo" / "final", ids, mask)

    bench = tmp_path / "benchmarks" / "hellaswag"
    rows = [{"ind": i, "activity_label": "Cooking", "ctx_a": f"A cook adds {w}.", "ctx_b": "then she",
             "endings": [f"stirs the {w}.", "sings loudly.", "flies away.", "reads a map."], "label": str(i % 4)}
            for i, w in enumerate(WORDS[:12])]
    _write_jsonl(bench / "validation.jsonl", rows[4:])
    _write_jsonl(bench / "train.jsonl", rows[:4])
    _cli("evaluate.py", "--model", f"base={real_mistral}", "--model", f"ppo={tmp_path / 'ppo' / 'final'}",
         "--tasks", "hellaswag", "--data_dir", str(tmp_path / "benchmarks"), "--batch_size", "4",
         "--out", str(tmp_path / "eval"))
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    for name in ("base", "ppo"):  # 8 items, batches of 4 choices of different lengths: padding was exercised
        assert 0.0 <= results[name]["hellaswag"]["ll"]["acc"] <= 1.0
