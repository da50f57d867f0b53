"""pretrain.py: learning, DDP equivalence, resume, SFT loss masking, bf16 on CPU, clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))
import toyworld  # noqa: E402

import pretrain  # noqa: E402
from model import MistralForCausalLM, ModelConfig, load_safetensors_dir, train_tokenizer  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads cost more than they give, and the suite shares 2 cores
TINY = [
    "--hidden_size",
    "32",
    "--num_hidden_layers",
    "2",
    "--num_attention_heads",
    "4",
    "--num_key_value_heads",
    "2",
    "--intermediate_size",
    "64",
    "--seq_len",
    "32",
    "--log_interval",
    "1",
    "--eval_interval",
    "1000",
    "--eval_batches",
    "1",
    "--probe",
    "",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pt")
    toyworld.main(["--size", "tiny", "--out", str(root / "toy")])
    docs = [json.loads(line)["text"] for line in (root / "toy/corpus/train.jsonl").read_text().splitlines()]
    train_tokenizer(docs, 400).save(root / "tok")  # shared, so runs differ only in what is being tested
    return {
        "root": root,
        "data": str(root / "toy/corpus/train.jsonl"),
        "tok": str(root / "tok"),
        "sft": str(root / "toy/sft/train.jsonl"),
    }


def run(world, out: Path, *extra: str) -> Path:
    pretrain.main(["--data", world["data"], "--tokenizer", world["tok"], "--out", str(out), *TINY, *extra])
    return out


def weights(path: Path) -> dict:
    return load_safetensors_dir(path)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_a_tiny_run(world, tmp_path):
    out = run(world, tmp_path / "r", "--max_steps", "40", "--batch_size", "8", "--lr", "1e-2", "--warmup_steps", "5")
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert losses[0] > 5.5  # ~ln(400) at initialisation
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss"] < losses[0] - 1.0
    assert (out / "final/model.safetensors").is_file() and (out / "final/tokenizer.json").is_file()


def test_resume_equals_uninterrupted_run(world, tmp_path):
    common = ["--max_steps", "6", "--batch_size", "4", "--warmup_steps", "2", "--save_interval", "100"]
    full = run(world, tmp_path / "full", *common)
    part = run(world, tmp_path / "part", *common, "--stop_after", "3")
    assert not (part / "final").exists() and (part / "last/train_state.pt").is_file()
    pretrain.main(["--resume", str(part)])
    a, b = weights(full / "final"), weights(part / "final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def torchrun(script: str, *args: str, nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_ddp_two_ranks_equal_one_rank_at_the_same_global_batch(world, tmp_path):
    common = "--max_steps 1 --batch_size 4 --warmup_steps 0 --lr 1e-2".split()
    one = run(world, tmp_path / "one", *common)
    torchrun("pretrain.py", "--data", world["data"], "--tokenizer", world["tok"], "--out", str(tmp_path / "two"),
             *TINY, *common, "--micro_batch_size", "1")  # 2 ranks x 2 accum
    a, b = weights(one / "final"), weights(tmp_path / "two/final")
    # Adam's first update is lr * g / (|g| + eps): ~lr for every weight, whatever the gradient's size, so a wrong batch
    # split or loss scale moves thousands of weights by ~1e-2. Reduction-order noise moves a weight whose gradient is
    # ~eps by ~1e-6 at most; atol 1e-4 separates the two.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)


def test_fsdp_two_ranks_equal_one_process_and_resume_equals_the_uninterrupted_run(world, tmp_path):
    """FSDP2 on 2 gloo ranks with 2 accumulation steps == one process at the same global batch (losses per step,
    final weights); a sharded resume reaches the uninterrupted FSDP run's weights; the gathered HF folder loads
    in transformers with equal logits."""
    import transformers
    common = "--max_steps 3 --batch_size 4 --warmup_steps 0 --lr 1e-2 --eval_interval 0 --save_interval 1".split()
    run(world, tmp_path / "one", *common)
    base = ["--data", world["data"], "--tokenizer", world["tok"], *TINY, *common, "--micro_batch_size", "1",
            "--fsdp", "--grad_ckpt"]
    torchrun("pretrain.py", *base, "--out", str(tmp_path / "fsdp"))
    torchrun("pretrain.py", *base, "--out", str(tmp_path / "cut"), "--stop_after", "2")
    assert (tmp_path / "cut" / "last" / "extra.json").is_file()  # sharded state, one file set per rank
    torchrun("pretrain.py", "--resume", str(tmp_path / "cut"))
    losses = [[m["loss"] for m in metrics(tmp_path / run) if "loss" in m] for run in ("one", "fsdp")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and len(losses[0]) == 3
    a, b, c = (weights(tmp_path / run / "final") for run in ("one", "fsdp", "cut"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)  # see the DDP test for the tolerance
        torch.testing.assert_close(c[k], b[k], rtol=0, atol=1e-6, msg=k)
    ours = MistralForCausalLM.from_pretrained(tmp_path / "fsdp" / "final").eval()
    hf = transformers.MistralForCausalLM.from_pretrained(tmp_path / "fsdp" / "final").eval()
    x = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits.float(), atol=1e-5, rtol=1e-5)


def test_sft_batch_gives_zero_loss_weight_to_prompt_tokens():
    examples = [([1, 10, 11, 12, 20, 21, 2], 4), ([1, 13, 22, 2], 2)]  # (BOS + prompt + response + EOS, n_prompt)
    x, y, w = pretrain.sft_batch(examples, torch.tensor([0, 1]), pad_id=0)
    # hand-computed: targets are the next tokens; weight 1 exactly where the target is a response token or EOS
    assert y.tolist() == [[10, 11, 12, 20, 21, 2], [13, 22, 2, 0, 0, 0]]
    assert w.tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0]]
    # and the weighted loss equals a naive sum of -log p(response token | everything before it)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_theta=1e4,
    )
    model = MistralForCausalLM(cfg)
    got = model(x, targets=y, weights=w)
    want = 0.0
    for ids, n_prompt in examples:
        for t in range(n_prompt, len(ids)):
            logits = model(torch.tensor([ids[:t]]))[0, -1]
            want += -F.log_softmax(logits, -1)[ids[t]]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sft_reads_hh_and_prompt_response_rows(tmp_path):
    f = tmp_path / "sft.jsonl"
    f.write_text(
        json.dumps({"prompt": "\n\nHuman: hi\n\nAssistant:", "response": " hello"})
        + "\n"
        + json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"})
        + "\n"
    )
    assert pretrain.read_sft(str(f)) == [
        ("\n\nHuman: hi\n\nAssistant:", " hello"),
        ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:", " d"),
    ]


def test_sft_from_init_and_bf16_autocast_run_on_cpu(world, tmp_path):
    base = run(world, tmp_path / "base", "--max_steps", "2", "--batch_size", "4", "--dtype", "bf16")
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics(base) if "loss" in m)
    sft = tmp_path / "sft"
    pretrain.main(
        [
            "--sft",
            "--init",
            str(base / "final"),
            "--data",
            world["sft"],
            "--out",
            str(sft),
            "--max_steps",
            "2",
            "--batch_size",
            "4",
            "--log_interval",
            "1",
            "--eval_batches",
            "1",
            "--probe",
            "",
            "--device",
            "cpu",
            "--dtype",
            "bf16",
        ]
    )
    s = json.loads((sft / "summary.json").read_text())
    assert s["steps"] == 2 and s["val_loss"] == s["val_loss"]  # finite, not NaN
    assert (sft / "final/tokenizer.json").is_file()
