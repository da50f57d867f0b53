"""model.py's decode modes (detail 11): the static and the compiled step against the eager reference path."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402

torch.set_num_threads(1)


def tiny_model(seed=0, **kw) -> M.MistralForCausalLM:
    """test_model.py's tiny shape (GQA 4/2, 2 layers), norm weights away from 1 so their order matters."""
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=1e4, max_position_embeddings=512)
    torch.manual_seed(seed)
    m = M.MistralForCausalLM(M.ModelConfig(**{**base, **kw})).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return m


def greedy(m, ids, mask, mode, n=12, **kw):
    m.decode_mode = mode
    try:
        return m.generate(ids, mask, max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0,
                          return_logprobs=True, **kw)
    finally:
        m.decode_mode = "static"


def left_padded():
    return M.pad_batch([[1, 5, 6, 7, 8, 9, 10], [1, 20, 21], [1, 40, 41, 42, 43]], pad_id=0, side="left")


def step_logits(m, ids, mask, toks, mode):
    """Prefill `ids` into a fresh cache, then feed `toks` (B, n) one step at a time in `mode`: -> (cache, the
    n logits (B, V))."""
    m.decode_mode = mode
    try:
        with torch.no_grad():
            cache = m.new_cache(ids.shape[0], ids.shape[1] + toks.shape[1])
            m(ids, mask, cache=cache)
            return cache, [m.decode_step(toks[:, t], cache) for t in range(toks.shape[1])]
    finally:
        m.decode_mode = "static"


@pytest.mark.parametrize("kw", [{}, {"num_key_value_heads": 4}, {"num_key_value_heads": 1},
                                {"tie_word_embeddings": True}, {"sliding_window": 64}])
def test_static_step_logits_equal_eager_step(kw):
    """Step by step, the static step's logits equal the general cached forward's (which the cache tests in
    test_model.py compare with the uncached forward), on a left-padded batch."""
    m = tiny_model(**kw)
    ids, mask = left_padded()
    toks = torch.randint(3, 97, (ids.shape[0], 8))
    caches = {mode: step_logits(m, ids, mask, toks, mode) for mode in ("eager", "static")}
    assert caches["static"][0].fast and not caches["eager"][0].fast
    for a, b in zip(caches["eager"][1], caches["static"][1]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    with torch.no_grad():  # and both equal the uncached forward over prompt + the 8 tokens
        full = m(torch.cat([ids, toks], 1), torch.cat([mask, torch.ones_like(toks)], 1))[:, ids.shape[1]:]
    torch.testing.assert_close(torch.stack(caches["static"][1][:-1], 1), full[:, :-1], atol=1e-5, rtol=0)


def test_static_generation_equals_eager_greedy_and_sampled():
    m = tiny_model()
    ids, mask = left_padded()
    a, b = greedy(m, ids, mask, "eager", 20), greedy(m, ids, mask, "static", 20)
    assert torch.equal(a.response_ids, b.response_ids)
    torch.testing.assert_close(b.logprobs, a.logprobs, atol=1e-5, rtol=0)
    u = torch.rand(ids.shape[0], 20, generator=torch.Generator().manual_seed(3))
    out = {}
    for mode in ("eager", "static"):
        m.decode_mode = mode
        out[mode] = m.generate(ids, mask, max_new_tokens=20, temperature=0.9, eos_token_id=2, pad_token_id=0,
                               uniforms=u, return_logprobs=True)
    m.decode_mode = "static"
    assert torch.equal(out["eager"].sequences, out["static"].sequences)
    torch.testing.assert_close(out["static"].logprobs, out["eager"].logprobs, atol=1e-5, rtol=0)


def test_rolling_window_cache_takes_the_eager_path():
    m = tiny_model(sliding_window=4)
    ids, mask = left_padded()
    a, b = greedy(m, ids, mask, "eager"), greedy(m, ids, mask, "static")
    assert torch.equal(a.response_ids, b.response_ids)
    cache = m.new_cache(3, ids.shape[1] + 12)
    with torch.no_grad():
        m(ids, mask, cache=cache)
        m.decode_step(torch.tensor([5, 6, 7]), cache)
    assert cache.rolling and cache.fast is False


def test_static_step_refuses_a_full_cache():
    m = tiny_model()
    cache = m.new_cache(1, 3)
    with torch.no_grad():
        m(torch.tensor([[1, 5, 6]]), cache=cache)
        with pytest.raises(ValueError, match="KV cache full"):
            m.decode_step(torch.tensor([7]), cache)


def test_compiled_step_equals_eager_and_rounds_the_cache():
    """torch.compile of the static step: the same greedy ids and log-probs as the eager path, for two batches
    and prompt lengths (the dynamic-shape graph of the first generation serves the second)."""
    m = tiny_model()
    m.decode_mode = "compile"
    assert m.new_cache(2, 65).size == 128 and m.new_cache(2, 64).size == 64
    for ids, mask in (left_padded(), M.pad_batch([[1, 5, 6], [1, 7, 8]], pad_id=0, side="left")):
        a, b = greedy(m, ids, mask, "eager"), greedy(m, ids, mask, "compile")
        assert torch.equal(a.response_ids, b.response_ids)
        torch.testing.assert_close(b.logprobs, a.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_compiled_step_logits_equal_eager_step_without_and_with_full_sharing(kv_heads):
    """The compiled step's products-and-sums attention (CPU) for 4 query heads on 4 KV heads (no sharing) and
    on 1 (all share it): step-by-step logits equal the general cached forward's on a left-padded batch."""
    m = tiny_model(num_key_value_heads=kv_heads)
    ids, mask = left_padded()
    toks = torch.randint(3, 97, (ids.shape[0], 6))
    logits = {mode: torch.stack(step_logits(m, ids, mask, toks, mode)[1], 1) for mode in ("eager", "compile")}
    torch.testing.assert_close(logits["compile"], logits["eager"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_chunked_prefill_generation_equals_one_prefill(chunk):
    """The prefill runs the LM head on each chunk's last position only; chunks of 1, 3 (7 = 3 + 3 + 1) and 4
    give the same greedy ids and log-probs as one prefill, whose first log-prob the full forward checks."""
    m = tiny_model()
    ids, mask = left_padded()
    one = greedy(m, ids, mask, "static")
    got = greedy(m, ids, mask, "static", prefill_chunk=chunk)
    assert torch.equal(got.response_ids, one.response_ids)
    torch.testing.assert_close(got.logprobs, one.logprobs, atol=1e-5, rtol=0)
    with torch.no_grad():
        first = torch.log_softmax(m(ids, mask)[:, -1], -1).gather(1, one.response_ids[:, :1])[:, 0]
    torch.testing.assert_close(one.logprobs[:, 0], first, atol=1e-5, rtol=0)
