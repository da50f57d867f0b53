"""model.py against independent references: the uncached forward, naive RoPE/GQA/window math, round trips."""

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402

torch.set_num_threads(1)


def tiny_config(**kw) -> M.ModelConfig:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=1e4, max_position_embeddings=512)
    base.update(kw)
    return M.ModelConfig(**base)


def tiny_model(seed=0, **kw) -> M.MistralForCausalLM:
    torch.manual_seed(seed)
    m = M.MistralForCausalLM(tiny_config(**kw)).eval()
    with torch.no_grad():  # non-trivial norm weights so the norm order matters
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return m


def permute_hf_to_native(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    dim = w.shape[1]
    return w.view(n_heads, 2, -1, dim).transpose(1, 2).reshape(-1, dim)


def hf_to_native_state_dict(sd: dict[str, torch.Tensor], cfg: M.ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of model.native_to_hf_state_dict, written here from transformers' converter (its key table read
    backwards and its q/k permutation undone), to build Mistral-native folders the loader must read."""
    inverse = [(r"^" + rep.replace(".", r"\.").replace(r"\1", r"(\d+)") + "$",
                pat.strip("^$").replace(r"\.", ".").replace(r"(\d+)", r"\1")) for pat, rep in M._NATIVE_TO_HF]
    out = {}
    for k, v in sd.items():
        match = next(((p, r) for p, r in inverse if re.match(p, k)), None)
        if match is None:
            raise ValueError(f"HF checkpoint: key {k!r} has no Mistral-native name")
        if k.endswith("q_proj.weight"):
            v = permute_hf_to_native(v, cfg.num_attention_heads)
        elif k.endswith("k_proj.weight"):
            v = permute_hf_to_native(v, cfg.num_key_value_heads)
        out[re.sub(match[0], match[1], k)] = v
    return out


# ---------------------------------------------------------------------------------------------------------------
# cache / padding consistency


@pytest.mark.parametrize("window", [None, 4])
def test_kv_cache_matches_full_forward(window):
    m = tiny_model(sliding_window=window)
    x = torch.randint(3, 97, (3, 19))  # 19 tokens: well past a window of 4
    with torch.no_grad():
        full = torch.log_softmax(m(x), -1)
        cache = m.new_cache(3, 19)
        steps = [m(x[:, t:t + 1], cache=cache) for t in range(19)]
    inc = torch.log_softmax(torch.cat(steps, 1), -1)
    if window:
        assert cache.rolling and cache.size == window  # rolling buffer of W slots, not 19
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window,chunk", [(None, 5), (4, 5), (4, 3), (6, 6)])
def test_chunked_prefill_matches_one_shot(window, chunk):
    m = tiny_model(sliding_window=window)
    x = torch.randint(3, 97, (2, 17))
    with torch.no_grad():
        one = m(x)
        cache = m.new_cache(2, 17)
        parts = [m(x[:, s:s + chunk], cache=cache) for s in range(0, 17, chunk)]
    torch.testing.assert_close(torch.cat(parts, 1), one, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_row_alone(side):
    m = tiny_model(sliding_window=5)
    seqs = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34, 35]]
    ids, mask = M.pad_batch(seqs, pad_id=0, side=side)
    with torch.no_grad():
        batch = m(ids, mask)
        for i, s in enumerate(seqs):
            alone = m(torch.tensor([s]))[0]
            rows = slice(ids.shape[1] - len(s), None) if side == "left" else slice(0, len(s))
            torch.testing.assert_close(batch[i, rows], alone, atol=1e-5, rtol=0)


def test_positions_start_at_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert M.positions_from_mask(mask)[:, :].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_left_padded_generation_matches_unpadded_greedy():
    m = tiny_model(sliding_window=4)
    seqs = [[1, 5, 6, 7, 8, 9, 10], [1, 20, 21]]
    ids, mask = M.pad_batch(seqs, pad_id=0, side="left")
    out = m.generate(ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=96, pad_token_id=0)
    for i, s in enumerate(seqs):
        alone = m.generate(torch.tensor([s]), max_new_tokens=12, do_sample=False, eos_token_id=96,
                           pad_token_id=0)
        n = alone.response_ids.shape[1]
        assert out.response_ids[i, :n].tolist() == alone.response_ids[0].tolist()


def test_generate_logprobs_equal_full_forward_with_temperature():
    m = tiny_model()
    seqs = [[1, 5, 6, 7], [1, 9]]
    ids, mask = M.pad_batch(seqs, pad_id=0, side="left")
    g = torch.Generator().manual_seed(0)
    temp = 0.7
    out = m.generate(ids, mask, max_new_tokens=10, temperature=temp, top_k=20, top_p=0.9,
                     eos_token_id=2, pad_token_id=0, generator=g, return_logprobs=True)
    full_mask = torch.cat([mask, out.response_mask], 1)
    with torch.no_grad():
        logits = m(out.sequences, full_mask)[:, ids.shape[1] - 1:-1] / temp
    ref = M.logprobs_from_logits(logits, out.response_ids) * out.response_mask
    torch.testing.assert_close(out.logprobs, ref, atol=1e-5, rtol=0)


def test_generate_stops_each_row_at_eos_and_pads_after():
    m = tiny_model()
    eos = 7
    with torch.no_grad():  # make token eos very likely after token 5 only: row 0 stops, row 1 does not
        m.lm_head.weight.zero_()
        m.lm_head.weight[eos] = 0.0
    ids = torch.tensor([[1, 5], [1, 9]])
    # force: row 0's first sampled token is eos through a bias on the logits via a hook
    def hook(mod, inp, out):
        out = out.clone()
        out[0, -1, eos] = 50.0
        out[1, -1, eos] = -50.0
        return out
    h = m.lm_head.register_forward_hook(hook)
    out = m.generate(ids, max_new_tokens=5, eos_token_id=eos, pad_token_id=0,
                     generator=torch.Generator().manual_seed(1))
    h.remove()
    assert out.response_ids[0].tolist() == [eos, 0, 0, 0, 0]
    assert out.response_mask[0].tolist() == [1, 0, 0, 0, 0]
    assert out.response_mask[1].tolist() == [1, 1, 1, 1, 1] and eos not in out.response_ids[1].tolist()


def test_generate_is_reproducible_with_a_seed():
    m = tiny_model()
    ids = torch.tensor([[1, 5, 6]])
    a = m.generate(ids, max_new_tokens=8, generator=torch.Generator().manual_seed(3)).response_ids
    b = m.generate(ids, max_new_tokens=8, generator=torch.Generator().manual_seed(3)).response_ids
    assert torch.equal(a, b)


def test_top_k_top_p_filter_matches_hand_computation():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    k2 = M.filter_top_k_top_p(logits, top_k=2)
    assert torch.isfinite(k2).tolist() == [[True, True, False, False, False]]
    # nucleus 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the token crossing 0.8 (0.15) is kept too
    p = M.filter_top_k_top_p(logits, top_p=0.8)
    assert torch.isfinite(p).tolist() == [[True, True, True, False, False]]


# ---------------------------------------------------------------------------------------------------------------
# attention math against naive references


@pytest.mark.parametrize("W", [1, 3, 8])
def test_sliding_window_mask_admits_exactly_min_i_plus_1_W_keys(W):
    T = 12
    pos = torch.arange(T)[None]
    allowed = M.attention_allowed(pos, pos, torch.ones(1, T, dtype=torch.bool), W)[0, 0]
    counts = allowed.sum(-1).tolist()
    assert counts == [min(i + 1, W) for i in range(T)]
    for i in range(T):  # and they are the most recent ones, including the token itself
        assert allowed[i].nonzero().flatten().tolist() == list(range(max(0, i - W + 1), i + 1))


def test_sliding_window_forward_equals_naive_banded_attention():
    W = 3
    m = tiny_model(sliding_window=W, num_hidden_layers=1)
    x = torch.randint(3, 97, (1, 10))
    attn, layer = m.model.layers[0].self_attn, m.model.layers[0]
    with torch.no_grad():
        h = m.model.embed_tokens(x)
        a_in = layer.input_layernorm(h)
        cos, sin = M.rope_cos_sin(torch.arange(10)[None], attn.hd, 1e4)
        got = attn(a_in, cos, sin, M.attention_allowed(torch.arange(10)[None], torch.arange(10)[None],
                                                        torch.ones(1, 10, dtype=torch.bool), W))
        q = M.apply_rope(attn.q_proj(a_in).view(1, 10, 4, 16), cos, sin)
        k = M.apply_rope(attn.k_proj(a_in).view(1, 10, 2, 16), cos, sin)
        v = attn.v_proj(a_in).view(1, 10, 2, 16)
        out = torch.zeros(1, 10, 4, 16)
        for i in range(10):  # explicit loops: keys i-W+1..i, head h reads kv head h // 2
            for hh in range(4):
                js = list(range(max(0, i - W + 1), i + 1))
                s = torch.stack([q[0, i, hh] @ k[0, j, hh // 2] for j in js]) / math.sqrt(16)
                p = torch.softmax(s, 0)
                out[0, i, hh] = sum(p[n] * v[0, j, hh // 2] for n, j in enumerate(js))
        ref = attn.o_proj(out.reshape(1, 10, 64))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_gqa_equals_explicit_repeat_kv():
    torch.manual_seed(0)
    B, T, nh, nkv, hd = 2, 7, 8, 2, 16
    q, k, v = torch.randn(B, nh, T, hd), torch.randn(B, nkv, T, hd), torch.randn(B, nkv, T, hd)
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    kr, vr = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    scores = (q @ kr.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.softmax(scores, -1) @ vr
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # and the model's attention block uses exactly that grouping
    m = tiny_model(num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
    assert m.model.layers[0].self_attn.n_heads // m.model.layers[0].self_attn.n_kv == 4


@pytest.mark.parametrize("T", [128, 256, 320, 384, 768])
def test_blocked_causal_attention_equals_naive_softmax_with_gradients(T):
    # 256, 384, 768 take the query-block path (4 blocks of 64; 3 and 6 of 128); 128 and 320 (not a multiple of
    # 128) one call
    torch.manual_seed(T)
    B, nh, nkv, hd = 2, 4, 2, 8
    q, k, v = (torch.randn(B, n, T, hd, dtype=torch.float64, requires_grad=True) for n in (nh, nkv, nkv))
    g = torch.randn(B, nh, T, hd, dtype=torch.float64)
    got = M.causal_attention(q, k, v, enable_gqa=True)
    kr, vr = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    scores = (q @ kr.transpose(-1, -2)) / math.sqrt(hd)
    ref = torch.softmax(scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")), -1) @ vr
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    grads = torch.autograd.grad(got, (q, k, v), g)
    for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_rope_matches_naive_per_position_rotation():
    torch.manual_seed(0)
    hd, theta = 8, 10000.0
    x = torch.randn(1, 5, 1, hd)
    pos = torch.arange(5)[None]
    cos, sin = M.rope_cos_sin(pos, hd, theta)
    got = M.apply_rope(x, cos, sin)
    ref = torch.empty_like(x)
    for p in range(5):  # rotate each pair (j, j + hd/2) by angle p * theta^(-2j/hd)
        for j in range(hd // 2):
            a = p * theta ** (-2 * j / hd)
            x1, x2 = x[0, p, 0, j].item(), x[0, p, 0, j + hd // 2].item()
            ref[0, p, 0, j] = x1 * math.cos(a) - x2 * math.sin(a)
            ref[0, p, 0, j + hd // 2] = x1 * math.sin(a) + x2 * math.cos(a)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert cos.dtype == torch.float32


def test_rmsnorm_applies_weight_after_casting_back():
    norm = M.RMSNorm(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.3, 0.7, 1.1, 0.9, 1.7, 0.3]))
    x = torch.randn(2, 6).to(torch.bfloat16)
    xf = x.float()
    ref = norm.weight * (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(norm(x), ref)


# ---------------------------------------------------------------------------------------------------------------
# the fused LM head + loss (detail 12)


def naive_weighted_ce(m: M.MistralForCausalLM, x, y, w) -> torch.Tensor:
    """The reference: full (B, T, V) logits, then F.cross_entropy per token, weighted, summed."""
    ce = torch.nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten(), reduction="none")
    return (ce * w.flatten()).sum()


@pytest.mark.parametrize("tied", [False, True])
def test_fused_head_loss_equals_full_logits_cross_entropy_with_gradients(tied):
    # vocab 20,000 -> 256 rows per chunk; 3 x 200 = 600 tokens -> 3 chunks, the last one partial
    m = tiny_model(vocab_size=20_000, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                   tie_word_embeddings=tied).train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 20_000, (3, 200), generator=g), torch.randint(0, 20_000, (3, 200), generator=g)
    w = torch.rand(3, 200, generator=g)
    w[0, :50] = 0  # prompt-like positions carry no loss
    params = dict(m.named_parameters())
    want = naive_weighted_ce(m, x, y, w)
    want_g = torch.autograd.grad(want, list(params.values()))
    got = m(x, targets=y, weights=w)
    got_g = torch.autograd.grad(3.0 * got, list(params.values()))  # a scaled loss (GradScaler) scales the grads
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for name, a, b in zip(params, got_g, want_g):
        torch.testing.assert_close(a, 3.0 * b, rtol=1e-4, atol=3e-4 * float(b.abs().max()),
                                   msg=lambda e, name=name: f"{name}: {e}")
    with torch.no_grad():  # the no-grad path (evaluation): the same loss, and no gradient matmuls run
        with torch.profiler.profile() as prof:
            no_grad_loss = m(x, targets=y, weights=w)
        torch.testing.assert_close(no_grad_loss, want.detach(), rtol=1e-5, atol=1e-4)
    ops = {e.key: e.count for e in prof.key_averages()}
    assert "aten::addmm_" not in ops and ops["aten::mm"] == 7 + 3  # q k v o, gate up down; the head's 3 chunks
    torch.testing.assert_close(m(x, targets=y).detach(), naive_weighted_ce(m, x, y, torch.ones_like(w)).detach(),
                               rtol=1e-5, atol=1e-4)  # weights default to 1


def test_fused_head_loss_under_bf16_autocast_tracks_fp32():
    m = tiny_model(vocab_size=3000, num_hidden_layers=1).train()
    x, y = torch.randint(0, 3000, (2, 300)), torch.randint(0, 3000, (2, 300))
    w = torch.ones(2, 300)
    want = naive_weighted_ce(m, x, y, w)
    want_g = torch.autograd.grad(want, [m.lm_head.weight])[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x, targets=y, weights=w)
    got_g = torch.autograd.grad(got, [m.lm_head.weight])[0]
    assert got.dtype == torch.float32 and got_g.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0.0)
    assert float((got_g - want_g).norm() / want_g.norm()) < 0.05


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("shard", [None, 20_000])
def test_save_load_round_trip_is_bit_exact(tmp_path, shard):
    m = tiny_model()
    m.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    files = sorted(p.name for p in tmp_path.iterdir())
    if shard:
        assert "model.safetensors.index.json" in files and "model-00001-of-" in " ".join(files)
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(m.state_dict())
    else:
        assert files == ["config.json", "model.safetensors"]
    assert not any(f.endswith(".tmp") for f in files)
    r = M.MistralForCausalLM.from_pretrained(tmp_path)
    for k, v in m.state_dict().items():
        assert torch.equal(v, r.state_dict()[k]), k
    x = torch.randint(3, 97, (1, 9))
    assert torch.equal(m(x), r.eval()(x))


def test_save_load_keeps_dtype_and_tied_embeddings(tmp_path):
    m = tiny_model(tie_word_embeddings=True).to(torch.bfloat16)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
    r = M.MistralForCausalLM.from_pretrained(tmp_path)
    assert r.lm_head.weight.dtype == torch.bfloat16
    assert r.lm_head.weight.data_ptr() == r.model.embed_tokens.weight.data_ptr()


def test_loader_ignores_rotary_inv_freq_and_keeps_unknown_config_fields(tmp_path):
    from safetensors.torch import save_file
    m = tiny_model()
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(sd, tmp_path / "model.safetensors")
    cfg = m.config.to_dict()
    cfg["some_future_field"] = 7
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = M.MistralForCausalLM.from_pretrained(tmp_path)
    assert r.config.extra["some_future_field"] == 7
    assert r.config.to_dict()["some_future_field"] == 7


def test_mistral_native_permutation_round_trip_and_scores():
    cfg = tiny_config()
    m = tiny_model()
    sd = m.state_dict()
    native = hf_to_native_state_dict(sd, cfg)
    assert "layers.0.attention.wq.weight" in native and "output.weight" in native
    back = M.native_to_hf_state_dict(native, cfg)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # scores: interleaved (complex) RoPE on the native weights == rotate_half RoPE on the HF weights
    x = torch.randn(5, cfg.hidden_size)
    hd, n = cfg.head_dim, cfg.num_attention_heads
    q_native = (x @ native["layers.0.attention.wq.weight"].T).view(5, n, hd)
    k_native = (x @ native["layers.0.attention.wk.weight"].T).view(5, cfg.num_key_value_heads, hd)
    freqs = 1e4 ** (-torch.arange(0, hd, 2).float() / hd)
    cis = torch.polar(torch.ones(5, hd // 2), torch.arange(5).float()[:, None] * freqs)
    def rot_interleaved(t):
        c = torch.view_as_complex(t.reshape(*t.shape[:-1], hd // 2, 2))
        return torch.view_as_real(c * cis[:, None]).flatten(-2)
    qn, kn = rot_interleaved(q_native), rot_interleaved(k_native)
    cos, sin = M.rope_cos_sin(torch.arange(5)[None], hd, 1e4)
    q_hf = M.apply_rope((x @ sd["model.layers.0.self_attn.q_proj.weight"].T).view(1, 5, n, hd), cos, sin)[0]
    k_hf = M.apply_rope((x @ sd["model.layers.0.self_attn.k_proj.weight"].T).view(1, 5, -1, hd), cos, sin)[0]
    s_native = torch.einsum("ihd,jhd->hij", qn, kn.repeat_interleave(2, 1))
    s_hf = torch.einsum("ihd,jhd->hij", q_hf, k_hf.repeat_interleave(2, 1))
    torch.testing.assert_close(s_native, s_hf, atol=1e-4, rtol=1e-4)


def test_mistral_native_folder_loads(tmp_path):
    from safetensors.torch import save_file
    m = tiny_model()
    cfg = m.config
    native = {k: v.contiguous() for k, v in hf_to_native_state_dict(m.state_dict(), cfg).items()}
    save_file(native, tmp_path / "consolidated.safetensors")
    (tmp_path / "params.json").write_text(json.dumps({
        "dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "head_dim": cfg.head_dim,
        "hidden_dim": cfg.intermediate_size, "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads, "norm_eps": cfg.rms_norm_eps, "vocab_size": cfg.vocab_size,
        "rope_theta": 1e4}))
    r = M.MistralForCausalLM.from_pretrained(tmp_path)
    x = torch.randint(3, 97, (1, 8))
    torch.testing.assert_close(r.eval()(x), m(x), atol=1e-6, rtol=0)


def test_missing_rope_theta_follows_mistral_rule_and_rope_parameters_are_read():
    with pytest.warns(UserWarning, match="rope_theta"):
        assert M.ModelConfig.from_dict({"sliding_window": 4096}).rope_theta == 1e4
    with pytest.warns(UserWarning):
        assert M.ModelConfig.from_dict({"sliding_window": None}).rope_theta == 1e6
    cfg = M.ModelConfig.from_dict({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})
    assert cfg.rope_theta == 5e5


def test_truncated_safetensors_fails_naming_the_file(tmp_path):
    m = tiny_model()
    m.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        M.MistralForCausalLM.from_pretrained(tmp_path)


def test_inconsistent_head_count_config_fails(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json.*num_key_value_heads 3"):
        M.MistralForCausalLM.from_pretrained(tmp_path)


def test_missing_key_and_wrong_shape_fail_naming_key_and_shapes(tmp_path):
    from safetensors.torch import save_file
    m = tiny_model()
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    (tmp_path / "config.json").write_text(json.dumps(m.config.to_dict()))
    partial = dict(sd)
    del partial["model.layers.1.mlp.up_proj.weight"]
    save_file(partial, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(96, 64\)"):
        M.MistralForCausalLM.from_pretrained(tmp_path)
    bad = dict(sd)
    bad["model.norm.weight"] = torch.ones(65)
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(65,\).*\(64,\)"):
        M.MistralForCausalLM.from_pretrained(tmp_path)


def test_matches_transformers_mistral_both_ways(tmp_path):
    import transformers
    m = tiny_model(sliding_window=6)
    m.save_pretrained(tmp_path / "ours")
    hf = transformers.MistralForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    x = torch.randint(3, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits.float(), m(x), atol=1e-4, rtol=1e-4)
    hf.save_pretrained(tmp_path / "theirs", safe_serialization=True)
    r = M.MistralForCausalLM.from_pretrained(tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(r(x), m(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


CORPUS = ["The river Alder flows north past the town of Brill.", "Human: what is 3 + 4?\nAssistant: 7.",
          "def add(a, b):\n    return a + b", "Alice met Bob near the old mill; they talked about rain."] * 30


def test_tokenizer_round_trip_including_unseen_bytes_and_emoji(tmp_path):
    tok = M.train_tokenizer(CORPUS, vocab_size=420)
    for text in ["The river flows.", "Zebra Quixotic", "emoji 🦓 and ✓ and 漢字", "two  spaces\nnewline\t",
                 "\n\nHuman: hi", " Hello", "  two leading", ""]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
        assert tok.decode(ids) == text
    assert tok.tk.id_to_token(3) == "<0x00>" and tok.tk.id_to_token(258) == "<0xFF>"
    assert tok.tk.id_to_token(0) == "<unk>" and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.pad_id not in (tok.eos_id, tok.bos_id) and tok.vocab_size > 259
    assert tok.encode("Z", bos=False) != [tok.unk_id]  # unseen char falls back to bytes, not <unk>
    assert tok.encode("hi", eos=True)[-1] == tok.eos_id
    tok.save(tmp_path)
    tok2 = M.Tokenizer.from_file(tmp_path)
    assert tok2.encode("Zebra 🦓") == tok.encode("Zebra 🦓") and tok2.pad_id == tok.pad_id
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["pad_token"] == "<pad>" and cfg["add_bos_token"] is True


def test_tokenizer_loads_in_transformers_with_identical_ids(tmp_path):
    import transformers
    tok = M.train_tokenizer(CORPUS, vocab_size=420)
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ["The river", " Hello", "emoji 🦓", ""]:
        assert hf(text)["input_ids"] == tok.encode(text)
    assert hf.pad_token_id == tok.pad_id and len(hf) == tok.vocab_size


def test_tokenizer_without_pad_pads_with_unk_and_adds_no_token(tmp_path):
    from tokenizers import Tokenizer as TK
    tok = M.train_tokenizer(CORPUS, vocab_size=400)
    spec = json.loads(tok.tk.to_str())
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] != "<pad>"]
    raw = TK.from_str(json.dumps(spec))
    n = raw.get_vocab_size(with_added_tokens=True)
    wrapped = M.Tokenizer(raw)
    assert wrapped.pad_id == wrapped.unk_id == 0 and wrapped.vocab_size == n  # inside the vocab, nothing added
    wrapped.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["pad_token"] == "<unk>"
    with pytest.raises(ValueError, match="400 tokens but the model only 399"):
        M.check_tokenizer_fits(tok, 399, "ckpt")


# ---------------------------------------------------------------------------------------------------------------
# counting and plumbing


def test_checkpoint_write_is_atomic_on_failure(tmp_path, monkeypatch):
    m = tiny_model()
    m.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    real_replace = os.replace

    def boom(src, dst):
        if str(dst).endswith("model.safetensors"):
            raise OSError("disk full")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", boom)
    with torch.no_grad():
        m.lm_head.weight.add_(1.0)
    with pytest.raises(OSError):
        m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before  # old file intact, no temp left
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_compiled_training_loss_and_gradients_equal_eager_through_blocked_attention():
    # pretrain.py --compile: torch.compile of the whole model, the fused loss and, at T = 256, the query-block
    # attention (detail 13) inside one graph; the eager model is the reference
    m = tiny_model(num_hidden_layers=1).train()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 97, (2, 256), generator=g), torch.randint(0, 97, (2, 256), generator=g)
    params = list(m.parameters())
    want = m(x, targets=y)
    want_g = torch.autograd.grad(want, params)
    got = torch.compile(m)(x, targets=y)
    got_g = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
