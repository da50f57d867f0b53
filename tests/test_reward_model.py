"""Tests for reward_model.py: score position, Bradley-Terry math, data formats, DDP, resume, checkpoints, learning.

Hermetic: a tiny tokenizer and a tiny random Mistral are built in-process (nothing downloaded, no toy world
needed). The 2-process DDP test runs the script under torchrun with gloo.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import reward_model as R  # noqa: E402
from model import MistralForCausalLM, ModelConfig, pad_batch, train_tokenizer  # noqa: E402

NICE = ["glad to help", "here is a kind answer", "happy to explain", "sure, gladly", "a calm reply"]
RUDE = ["you idiot", "shut up, fool", "what a stupid question", "go away, moron", "idiot, no"]
TOPICS = ["the sea", "bread", "a red fox", "the moon", "old maps", "tea", "birds", "rain"]


def toy_rows(n: int, seed: int = 0) -> list[dict]:
    """HH-format pairs, separable by a word list: chosen answers politely, rejected insults (1-3 turns)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = ""
        for _t in range(rng.randint(1, 3) - 1):
            prompt += f"\n\nHuman: tell me about {rng.choice(TOPICS)}\n\nAssistant: {rng.choice(NICE)}."
        prompt += f"\n\nHuman: what about {rng.choice(TOPICS)}?\n\nAssistant:"
        rows.append({"chosen": f"{prompt} {rng.choice(NICE)}, {rng.choice(TOPICS)}.",
                     "rejected": f"{prompt} {rng.choice(RUDE)}, {rng.choice(TOPICS)}."})
    return rows


def write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model folder (tokenizer included) and a toy preference train/test split."""
    d = tmp_path_factory.mktemp("rm")
    rows = toy_rows(600, seed=1)
    tok = train_tokenizer([r["chosen"] + r["rejected"] for r in rows[:200]], vocab_size=360)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, max_position_embeddings=512)
    MistralForCausalLM(cfg).save_pretrained(d / "base", tokenizer=tok)
    return {"dir": d, "base": d / "base", "tok": tok,
            "train": write_jsonl(d / "pref" / "train.jsonl", rows[:512]),
            "test": write_jsonl(d / "pref" / "test.jsonl", rows[512:])}


def run_args(world, out: Path, *extra: str) -> list[str]:
    return ["--init", str(world["base"]), "--train_files", str(world["train"]), "--test_files",
            str(world["test"]), "--out", str(out), "--device", "cpu", "--log_every", "1000", "--eval_every", "0",
            *extra]


# ----------------------------------------------------------------------------------------------------------------
# Score position


def test_score_is_read_at_last_real_token_whatever_padding_and_batch(world):
    torch.manual_seed(0)
    rm = R.RewardModel.from_causal_lm(world["base"]).eval()
    seqs = [[1, 40, 41, 42, 2], [1, 50, 2], [1, 60, 61, 62, 63, 64, 65, 2], [1, 2]]
    with torch.no_grad():
        alone = torch.stack([rm(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs])
        # the reference: the head applied to the hidden state of the unpadded sequence's final token
        ref = torch.stack([rm.token_scores(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0, -1]
                           for s in seqs])
        for side in ("right", "left"):
            ids, mask = pad_batch(seqs, pad_id=world["tok"].pad_id, side=side)
            torch.testing.assert_close(rm(ids, mask), alone, rtol=1e-5, atol=1e-5)
        # different batch composition: a long sequence forces extra padding on the others
        ids, mask = pad_batch(seqs[:2] + [[1] + [70] * 30 + [2]], pad_id=world["tok"].pad_id, side="right")
        torch.testing.assert_close(rm(ids, mask)[:2], alone[:2], rtol=1e-5, atol=1e-5)
        # the head on one row vs on every row of the sequence: the same math, a GEMM of another shape, so equal
        # up to fp32 rounding (MKL sums in a shape-dependent order); the next-to-last token scores far apart
        before_last = torch.stack([rm.token_scores(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0, -2]
                                   for s in seqs])
    torch.testing.assert_close(alone, ref, rtol=1e-6, atol=1e-6)
    assert (alone - before_last).abs().min() > 1e-2, (alone - before_last).abs().min()
    assert R.last_token_index(torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])).tolist() == [1, 3, 3]


def test_score_ignores_pad_token_ids(world):
    """The position comes from the mask: pads that happen to be EOS ids do not move it."""
    rm = R.RewardModel.from_causal_lm(world["base"]).eval()
    ids = torch.tensor([[1, 40, 41, 2, 2, 2]])  # EOS used as padding (the PAD == EOS bug of trl #734)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(rm(ids, mask), rm(ids[:, :4], mask[:, :4]), rtol=1e-5, atol=1e-5)


def test_score_texts_appends_eos_and_batches_like_alone(world):
    tok = world["tok"]
    rm = R.RewardModel.from_causal_lm(world["base"]).eval()
    prompts = ["\n\nHuman: hi\n\nAssistant:", "\n\nHuman: tell me about tea\n\nAssistant:"]
    resps = [" glad to help.", " you idiot, go away moron."]
    batch = rm.score_texts(prompts, resps, tok, batch_size=2)
    for p, r, b in zip(prompts, resps, batch, strict=True):
        ids = tok.encode(p + r, bos=True, eos=True)
        assert ids[-1] == tok.eos_id
        with torch.no_grad():
            alone = rm(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
        torch.testing.assert_close(b, alone, rtol=1e-5, atol=1e-5)
    rm.config.extra.update(reward_mean=2.0, reward_std=4.0)
    torch.testing.assert_close(rm.normalize(torch.tensor([6.0, -2.0])), torch.tensor([1.0, -1.0]))


# ----------------------------------------------------------------------------------------------------------------
# Bradley-Terry loss and metrics


def test_bradley_terry_loss_matches_hand_computed_values():
    rc, rr = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 1.5, -1.0])
    d = [1.0, -1.0, 0.0]
    plain = sum(math.log(1 + math.exp(-x)) for x in d) / 3  # -log sigmoid(x) = log(1 + e^-x)
    assert R.bradley_terry_loss(rc, rr).item() == pytest.approx(plain, rel=1e-6)
    with_margin = sum(math.log(1 + math.exp(-(x - 0.5))) for x in d) / 3
    assert R.bradley_terry_loss(rc, rr, margin=0.5).item() == pytest.approx(with_margin, rel=1e-6)
    per_pair_margin = torch.tensor([0.0, 1.0, 2.0])
    want = sum(math.log(1 + math.exp(-(x - m))) for x, m in zip(d, [0.0, 1.0, 2.0], strict=True)) / 3
    assert R.bradley_terry_loss(rc, rr, margin=per_pair_margin).item() == pytest.approx(want, rel=1e-6)
    center = 0.01 * ((2 + 1) ** 2 + (0.5 + 1.5) ** 2 + (-2) ** 2) / 3  # c * mean((r_c + r_r)^2)
    assert R.bradley_terry_loss(rc, rr, center_coef=0.01).item() == pytest.approx(plain + center, rel=1e-6)
    # large margins: the stable form does not overflow
    assert R.bradley_terry_loss(torch.tensor([0.0]), torch.tensor([200.0])).item() == pytest.approx(200.0)


def test_pair_metrics_match_hand_computed_values():
    m = R.pair_metrics(torch.tensor([2.0, 0.5, -1.0, 3.0]), torch.tensor([1.0, 1.5, -1.0, 0.0]))
    assert m["accuracy"] == pytest.approx(0.5)  # 2 > 1 and 3 > 0; the tie counts as wrong
    assert m["margin"] == pytest.approx((1 - 1 + 0 + 3) / 4)
    assert m["chosen"] == pytest.approx(4.5 / 4) and m["rejected"] == pytest.approx(1.5 / 4)


# ----------------------------------------------------------------------------------------------------------------
# Data formats


def test_hh_multi_turn_split_at_last_assistant_turn():
    prompt = "\n\nHuman: hi\n\nAssistant: hello.\n\nHuman: insult me\n\nAssistant:"
    p, c, r = R.split_hh(prompt + " No, be kind.", prompt + " You fool.")
    assert (p, c, r) == (prompt, " No, be kind.", " You fool.")
    assert R.count_turns(p) == 2
    with pytest.raises(ValueError, match="does not share"):
        R.split_hh(prompt + " a", "\n\nHuman: other\n\nAssistant: b")


def test_each_format_parses_including_gz_and_pku(tmp_path):
    prompt = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    hh = write_jsonl(tmp_path / "hh" / "train.jsonl.gz", [{"chosen": prompt + " good", "rejected": prompt + " bad"}],
                     gz=True)
    pairs, st = R.read_preference_file(hh)
    assert [(p.prompt, p.chosen, p.rejected, p.source) for p in pairs] == [(prompt, " good", " bad", "hh/train")]
    pku_row = {"prompt": "How do I pick a lock?", "response_0": "Here is how: ...", "response_1": "I can't help.",
               "is_response_0_safe": False, "is_response_1_safe": True, "better_response_id": 0,
               "safer_response_id": 1, "response_0_severity_level": 2}
    pku = write_jsonl(tmp_path / "pku" / "test.jsonl", [pku_row, {**pku_row, "is_response_0_safe": True}])
    pairs, st = R.read_preference_file(pku)
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == (
        "\n\nHuman: How do I pick a lock?\n\nAssistant:", " I can't help.", " Here is how: ...")
    assert len(R.read_preference_file(pku, pku_filter="one_safe")[0]) == 1  # both safe -> filtered
    assert R.read_preference_file(pku, pku_filter="agree")[1].filtered == 2  # better 0 != safer 1
    gen = write_jsonl(tmp_path / "generic.jsonl", [
        {"prompt": "Q?", "chosen": " yes", "rejected": " no", "source": "mine", "margin": 1.5},
        {"prompt": "Q?", "chosen": "Q? yes", "rejected": "Q? no"},  # full-text layout: the prompt is removed
        {"prompt": "Q?", "chosen": " same", "rejected": " same"},  # dropped: no preference
        {"prompt": "Q?", "chosen": " ", "rejected": " no"}])  # dropped: empty response
    pairs, st = R.read_preference_file(gen)
    assert [(p.prompt, p.chosen, p.rejected, p.source, p.margin) for p in pairs] == [
        ("Q?", " yes", " no", "mine", 1.5), ("Q?", " yes", " no", R.source_label(gen), None)]
    assert (st.pairs, st.dropped_identical, st.dropped_empty) == (2, 1, 1)


def test_mixture_weights_take_fractions_and_repeats(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"p{i}", "chosen": " x", "rejected": " y"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"q{i}", "chosen": " x", "rejected": " y"} for i in range(4)])
    pairs, st = R.load_mixture([f"{a}:0.5", f"{b}:2"], seed=0)
    prompts = [p.prompt for p in pairs]
    assert len(prompts) == 5 + 8 and len(set(prompts[:5])) == 5
    assert sorted(prompts[5:]) == sorted([f"q{i}" for i in range(4)] * 2)


@pytest.mark.parametrize("line, message", [
    ('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b"}', "field 'rejected' missing"),
    ('{"chosen": 3, "rejected": "x"}', "field 'chosen' must be a string"),
    ('{"chosen": "no turns here", "rejected": "x"}', "has no"),
    ('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: z\\n\\nAssistant: c"}',
     "does not share"),
    ('{"prompt": "p", "response_0": "a", "response_1": "b", "safer_response_id": 2}', "safer_response_id"),
    ('{"chosen": "x"', "invalid JSON"),
    ("[1, 2]", "expected an object"),
])
def test_bad_rows_fail_with_file_and_line(tmp_path, line, message):
    good = json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(R.DataError) as e:
        R.read_preference_file(path)
    assert str(e.value).startswith(f"{path}:4: ") and message in str(e.value)
    pairs, st = R.read_preference_file(path, skip_bad_rows=True)
    assert (len(pairs), st.skipped_bad) == (3, 1)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_saved_reward_model_reloads_bit_exactly(world, tmp_path):
    torch.manual_seed(3)
    rm = R.RewardModel.from_causal_lm(world["base"]).eval()
    rm.config.extra.update(reward_mean=0.25, reward_std=1.5)
    rm.save_pretrained(tmp_path / "rm", tokenizer=world["tok"])
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForSequenceClassification"] and cfg["pad_token_id"] == world["tok"].pad_id
    assert (tmp_path / "rm" / "tokenizer.json").is_file()
    back = R.RewardModel.from_pretrained(tmp_path / "rm").eval()
    assert set(back.state_dict()) == set(rm.state_dict())
    assert "score.weight" in back.state_dict() and "lm_head.weight" not in back.state_dict()
    for k, v in rm.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert (back.reward_mean, back.reward_std) == (0.25, 1.5)
    x = torch.randint(3, 200, (3, 9))
    m = torch.ones_like(x)
    assert torch.equal(rm(x, m), back(x, m))
    with pytest.raises(ValueError, match="holds a causal LM"):
        R.RewardModel.from_pretrained(world["base"])


def test_from_causal_lm_takes_the_backbone_of_a_tied_embedding_model(tmp_path):
    cfg = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, tie_word_embeddings=True)
    lm = MistralForCausalLM(cfg)
    lm.save_pretrained(tmp_path / "lm")
    rm = R.RewardModel.from_causal_lm(tmp_path / "lm")
    for k, v in lm.model.state_dict().items():
        assert torch.equal(rm.model.state_dict()[k], v), k
    rm.save_pretrained(tmp_path / "rm")
    assert set(R.load_safetensors_dir(tmp_path / "rm")) == {f"model.{k}" for k in lm.model.state_dict()} | {
        "score.weight"}


def test_score_head_init_std_is_one_over_sqrt_hidden_plus_one():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=4096, intermediate_size=8, num_hidden_layers=0,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=1e4)
    w = R.RewardModel(cfg).score.weight
    assert w.shape == (1, 4096)
    assert w.std().item() == pytest.approx(1 / math.sqrt(4097), rel=0.05)  # 4096 samples: ~1.1% std error


def test_transformers_sequence_classification_gives_same_scores(world, tmp_path):
    import transformers
    rm = R.RewardModel.from_causal_lm(world["base"]).eval()
    rm.save_pretrained(tmp_path / "rm", tokenizer=world["tok"])
    hf = transformers.MistralForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    seqs = [[1, 40, 41, 42, 2], [1, 50, 2], [1, 60, 61, 62, 63, 64, 65, 2]]
    ids, mask = pad_batch(seqs, pad_id=world["tok"].pad_id, side="right")
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        torch.testing.assert_close(rm(ids, mask), theirs, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Training: learning, resume, DDP


def test_tiny_run_learns_trivially_separable_preferences(world, tmp_path):
    out = tmp_path / "run"
    s = R.main(run_args(world, out, "--lr", "3e-3", "--batch_size", "16", "--micro_batch_size", "8",
                        "--epochs", "2", "--eval_every", "16", "--norm_pairs", "64"))
    assert s["test_accuracy"] > 0.95, s
    assert s["test"]["pairs"] == 88 and s["accuracy_by_turns"].keys() == {"1", "2", "3"}
    assert s["accuracy_by_source"] == {"pref/test": {"accuracy": s["test_accuracy"], "pairs": 88}}
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert cfg["reward_mean"] == s["reward_mean"] and cfg["reward_std"] == s["reward_std"] > 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in r for r in rows) and any("loss" in r for r in rows)
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] == s["test_accuracy"]
    # the stored statistics are those of the saved model on training responses
    rm = R.RewardModel.from_pretrained(out / "final")
    tok = world["tok"]
    pairs, _ = R.load_mixture([str(world["train"])], seed=1234)
    sample = random.Random(1234 + 2).sample(range(len(pairs)), 64)
    r = rm.score_texts([pairs[i].prompt for i in sample] * 2,
                       [pairs[i].chosen for i in sample] + [pairs[i].rejected for i in sample], tok)
    assert r.mean().item() == pytest.approx(cfg["reward_mean"], abs=1e-4)
    assert r.std().item() == pytest.approx(cfg["reward_std"], rel=1e-4)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return R.load_safetensors_dir(out / "final")


def test_resume_equals_uninterrupted(world, tmp_path):
    common = ["--batch_size", "16", "--micro_batch_size", "8", "--max_train_pairs", "96", "--lr", "1e-3"]
    R.main(run_args(world, tmp_path / "full", *common))
    s = R.main(run_args(world, tmp_path / "cut", *common, "--max_steps", "2"))
    assert s["status"] == "stopped" and not (tmp_path / "cut" / "final").exists()
    R.main(run_args(world, tmp_path / "cut", *common, "--resume", str(tmp_path / "cut")))
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = json.loads((tmp_path / "full" / "summary.json").read_text())
    sb = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert sa["test"] == sb["test"] and sa["reward_mean"] == sb["reward_mean"]
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)
    with pytest.raises(R.InputError, match="lr"):  # resuming with different hyperparameters is refused
        R.main(run_args(world, tmp_path / "cut", *common[:-1], "2e-3", "--resume", str(tmp_path / "cut")))


def test_ddp_two_ranks_equal_one_rank(world, tmp_path):
    common = ["--batch_size", "16", "--micro_batch_size", "4", "--max_train_pairs", "64", "--lr", "1e-3",
              "--norm_pairs", "32"]
    R.main(run_args(world, tmp_path / "one", *common))  # 1 rank: 4 accumulation steps of 4 pairs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "reward_model.py"), *run_args(world, tmp_path / "two", *common)]  # 2 ranks x 2 steps of 4
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    sa = json.loads((tmp_path / "one" / "summary.json").read_text())
    sb = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert sb["world_size"] == 2 and sb["test"]["pairs"] == sa["test"]["pairs"]
    assert sb["test_accuracy"] == pytest.approx(sa["test_accuracy"], abs=1 / sa["test"]["pairs"])
    assert sb["reward_mean"] == pytest.approx(sa["reward_mean"], abs=1e-4)


def test_fsdp_two_ranks_equal_one_process_and_resume_equals_the_uninterrupted_run(world, tmp_path):
    """FSDP2 on 2 gloo ranks (2 accumulation steps each) == one process (4 steps) at the same global batch; a
    sharded resume reaches the uninterrupted FSDP run's weights; the gathered folder scores in transformers'
    MistralForSequenceClassification as in ours."""
    import transformers
    common = ["--batch_size", "16", "--micro_batch_size", "4", "--max_train_pairs", "64", "--lr", "1e-3",
              "--norm_pairs", "32"]
    R.main(run_args(world, tmp_path / "one", *common))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def torchrun(*args: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "reward_model.py"), *args]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]

    torchrun(*run_args(world, tmp_path / "fsdp", *common, "--micro_batch_size", "4", "--fsdp", "--grad_ckpt"))
    torchrun(*run_args(world, tmp_path / "cut", *common, "--fsdp", "--grad_ckpt", "--max_steps", "2"))
    assert (tmp_path / "cut" / "ckpt" / "sharded" / "extra.json").is_file()
    torchrun(*run_args(world, tmp_path / "cut", *common, "--fsdp", "--grad_ckpt", "--resume", str(tmp_path / "cut")))
    a, b, c = (final_weights(tmp_path / run) for run in ("one", "fsdp", "cut"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
        torch.testing.assert_close(c[k], b[k], rtol=0, atol=1e-6, msg=k)
    sa, sb = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "fsdp"))
    assert sb["test_accuracy"] == pytest.approx(sa["test_accuracy"], abs=1 / sa["test"]["pairs"])
    assert sb["reward_mean"] == pytest.approx(sa["reward_mean"], abs=1e-4)
    folder = tmp_path / "fsdp" / "final"
    hf = transformers.MistralForSequenceClassification.from_pretrained(folder).eval()
    ours = R.RewardModel.from_pretrained(folder).eval()
    x = torch.randint(3, 200, (2, 9))
    m = torch.ones_like(x)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, m), hf(x, attention_mask=m).logits[:, 0].float(), atol=1e-5, rtol=1e-5)


def test_bradley_terry_loss_and_gradient_equal_the_hand_derived_formula():
    """Value against a naive -log(1 / (1 + exp(-(r_c - r_r - m)))) + c (r_c + r_r)^2, averaged; gradient against
    its derivative -sigmoid(-(r_c - r_r - m)) / n + 2 c (r_c + r_r) / n, worked out by hand."""
    rc = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    rr = torch.tensor([0.1, 0.4, -0.5])
    m, c, n = torch.tensor([0.0, 0.5, 1.0]), 0.01, 3
    loss = R.bradley_terry_loss(rc, rr, m, center_coef=c)
    d = [float(x) for x in (rc.detach() - rr - m)]
    s = [float(x) for x in (rc.detach() + rr)]
    naive = sum(-math.log(1 / (1 + math.exp(-di))) + c * si * si for di, si in zip(d, s)) / n
    assert loss.item() == pytest.approx(naive, rel=1e-6)
    loss.backward()
    want = [-1 / (1 + math.exp(di)) / n + 2 * c * si / n for di, si in zip(d, s)]
    assert rc.grad.tolist() == pytest.approx(want, rel=1e-5)
