"""ppo_rlhf.py against independent references: naive loops, hand-computed numbers, math identities, and
end-to-end runs on a tiny model (learning with a synthetic reward, 2-rank DDP, resume)."""

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
import model as M  # noqa: E402
import ppo_rlhf as P  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------
# GAE (detail 8)


def naive_gae(rewards, values, mask, gamma, lam):
    """Per row, from the definition A_t = sum_l (gamma * lam)^l delta_{t+l}, V = 0 after the last valid token."""
    B, N = rewards.shape
    adv = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        L = int(mask[b].sum())
        v = [float(values[b, t]) for t in range(L)] + [0.0]
        delta = [float(rewards[b, t]) + gamma * v[t + 1] - v[t] for t in range(L)]
        for t in range(L):
            adv[b, t] = sum((gamma * lam) ** k * delta[t + k] for k in range(L - t))
    return adv


def ragged(B=4, N=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([N, 3, 1, 5])[:B]
    mask = (torch.arange(N)[None] < lengths[:, None]).double()
    # garbage after the last valid token must not leak into the result
    return torch.randn(B, N, generator=g, dtype=torch.float64), torch.randn(B, N, generator=g,
                                                                          dtype=torch.float64), mask


def test_gae_equals_naive_backward_loop():
    r, v, mask = ragged()
    adv, ret = P.gae_advantages(r, v, mask, gamma=0.9, lam=0.8)
    ref = naive_gae(r, v, mask, 0.9, 0.8)
    torch.testing.assert_close(adv, ref)
    torch.testing.assert_close(ret, (ref + v) * mask)  # returns = advantages + values on valid tokens
    assert (adv[mask == 0] == 0).all()


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    r, v, mask = ragged(seed=1)
    adv, _ = P.gae_advantages(r, v, mask, gamma=1.0, lam=1.0)
    to_go = (r * mask).flip(1).cumsum(1).flip(1)  # sum_{k >= t} r_k
    torch.testing.assert_close(adv, (to_go - v) * mask)


# ---------------------------------------------------------------------------------------------------------------
# masked whitening (details 7 and 11)


def test_masked_whitening_has_zero_mean_unit_std_on_valid_tokens_only():
    r, _, mask = ragged(seed=2)
    w = P.masked_whiten(r * 3 + 5, mask)
    valid = w[mask.bool()]
    assert abs(valid.mean().item()) < 1e-9
    assert abs(valid.var(unbiased=False).item() - 1) < 1e-6  # biased variance, as N+
    assert (w[mask == 0] == 0).all()
    kept = P.masked_whiten(r * 3 + 5, mask, shift_mean=False)[mask.bool()]  # reward whitening keeps the mean
    torch.testing.assert_close(kept.mean(), (r * 3 + 5)[mask.bool()].mean())
    assert abs(kept.var(unbiased=False).item() - 1) < 1e-6


def _two_rank_worker(rank, init_file, xs, masks, scores, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    w = P.masked_whiten(xs[rank], masks[rank])
    rm = P.RunningMoments()
    for s in scores[rank]:
        rm.update(s)
    mean = P.masked_mean(xs[rank], masks[rank])
    torch.save({"w": w, "rm": (rm.mean, rm.var, rm.count), "mean": mean}, f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_global_whitening_two_ranks_equals_concatenated_batch(tmp_path):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(3, 6, generator=g, dtype=torch.float64) * 2 + 1,
          torch.randn(3, 6, generator=g, dtype=torch.float64) - 4]  # different distributions per rank
    masks = [(torch.arange(6)[None] < torch.tensor([[6], [2], [4]])).double(),
             (torch.arange(6)[None] < torch.tensor([[1], [5], [3]])).double()]
    scores = [[torch.randn(4, generator=g) for _ in range(3)], [torch.randn(4, generator=g) + 2 for _ in range(3)]]
    out = tmp_path / "res"
    # spawn, not fork: a forked child deadlocks in OpenMP once the parent (pytest) has used its thread pool
    mp.start_processes(_two_rank_worker, args=(str(tmp_path / "init"), xs, masks, scores, str(out)), nprocs=2,
                       start_method="spawn")
    whole = P.masked_whiten(torch.cat(xs), torch.cat(masks))
    rm = P.RunningMoments()
    for a, b in zip(*scores):
        rm.update(torch.cat([a, b]))
    for rank in range(2):
        res = torch.load(f"{out}.{rank}", weights_only=True)
        torch.testing.assert_close(res["w"], whole[3 * rank:3 * rank + 3])
        torch.testing.assert_close(res["mean"], P.masked_mean(torch.cat(xs), torch.cat(masks)))
        assert res["rm"] == pytest.approx((rm.mean, rm.var, rm.count), rel=1e-6)
    all_scores = torch.cat([torch.cat(s) for s in scores])
    assert rm.mean == pytest.approx(all_scores.mean().item(), rel=1e-5)
    assert rm.var == pytest.approx(all_scores.var(unbiased=False).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# KL (details 3, 4, 5)


def test_k1_and_k3_equal_their_formulas():
    lp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    torch.testing.assert_close(P.kl_penalty(lp, ref, "k1"), torch.tensor([0.5, -1.0, 0.0]))
    r = torch.exp(ref - lp)  # pi_ref / pi
    torch.testing.assert_close(P.kl_penalty(lp, ref, "k3"), (r - 1) - torch.log(r))
    # by hand for the first token: r = e^-0.5 -> e^-0.5 - 1 + 0.5
    assert P.kl_penalty(lp, ref, "k3")[0].item() == pytest.approx(math.exp(-0.5) - 0.5, abs=1e-7)
    assert (P.kl_penalty(lp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError):
        P.kl_penalty(lp, ref, "k2")


def test_adaptive_kl_controller_equals_ziegler_formula():
    # KL 9 vs target 6: error 0.5 clipped to 0.2; beta *= 1 + 0.2 * 64 / 10000
    assert P.adaptive_kl_coef(0.1, 9.0, 6.0, 10000, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    # KL 5 vs target 6: error -1/6 (inside the clip)
    assert P.adaptive_kl_coef(0.2, 5.0, 6.0, 1000, 100) == pytest.approx(0.2 * (1 - (1 / 6) * 0.1))
    # KL 0: error -1 clipped to -0.2
    assert P.adaptive_kl_coef(0.2, 0.0, 6.0, 100, 100) == pytest.approx(0.2 * 0.8)


# ---------------------------------------------------------------------------------------------------------------
# reward placement and shaping (details 3, 6, 12)


def test_reward_placement_score_on_last_response_token_kl_only_on_response():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).float()
    lp = torch.full((3, 5), -1.0)
    ref = torch.full((3, 5), -1.5)  # k1 = 0.5 everywhere, including after EOS (must be masked)
    score = torch.tensor([2.0, -1.0, 3.0])
    rewards, kl = P.compute_rewards(score, lp, ref, mask, kl_coef=0.1)
    expect = -0.1 * 0.5 * mask
    expect[0, 2] += 2.0  # row 0: EOS at index 2
    expect[1, 4] += -1.0  # row 1: no EOS, last token
    expect[2, 0] += 3.0  # row 2: EOS as the first token
    torch.testing.assert_close(rewards, expect)
    assert (kl[mask == 0] == 0).all() and (rewards[mask == 0] == 0).all()


def test_missing_eos_penalty_applied_exactly_when_no_eos():
    raw = torch.tensor([1.0, 1.0, 30.0])
    has_eos = torch.tensor([True, False, False])
    s = P.shape_score(raw, has_eos, "fixed", mean=0.5, std=2.0, scale=3.0, clip=10.0, missing_eos_penalty=1.0)
    # (1 - 0.5) / 2 * 3 = 0.75; the third is clipped to 10 before the penalty
    torch.testing.assert_close(s, torch.tensor([0.75, 0.75 - 1.0, 10.0 - 1.0]))
    none = P.shape_score(raw, has_eos, "none", 0.5, 2.0, 1.0, 0.0, 0.0)
    torch.testing.assert_close(none, raw)


def test_reward_model_input_appends_eos_only_to_truncated_responses():
    seq = torch.tensor([[0, 5, 6, 2, 0], [5, 6, 7, 8, 9]])  # row 0 ended with EOS (2) then a pad
    attn = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    ids, mask = P.reward_model_inputs(seq, attn, torch.tensor([True, False]), eos_id=2, pad_id=0)
    assert ids.tolist() == [[0, 5, 6, 2, 0, 0], [5, 6, 7, 8, 9, 2]]
    assert mask.tolist() == [[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]


# ---------------------------------------------------------------------------------------------------------------
# PPO losses (details 1, 9)


def test_clipped_policy_loss_equals_hand_computed_value():
    old = torch.zeros(1, 5)
    new = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5, 3.0]]))  # ratios
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    loss, st = P.ppo_policy_loss(new, old, adv, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r)): -1.2 (clipped), 1.5, -0.5, 0.8 (clipped) -> mean over 4 valid tokens
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4, abs=1e-6)
    assert (st["clipfrac"] * mask).sum().item() == 2
    loss2, _ = P.ppo_policy_loss(new, old, adv, mask, cliprange=0.2, denom=8.0)
    assert loss2.item() == pytest.approx(loss.item() / 2, abs=1e-6)


def test_clipped_value_loss_equals_hand_computed_value():
    old_v = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, -0.1, 0.0]])
    ret = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    loss, st = P.ppo_value_loss(v, old_v, ret, mask, cliprange_value=0.2)
    # token 0: V_clip 0.2: max(0.25, 0.64) = 0.64; token 1: V_clip -0.1: max(0.81, 0.81) = 0.81;
    # token 2: V_clip 0.8: max(4, 1.44) = 4
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 4.0) / 3, abs=1e-6)
    assert st["vf_clipfrac"].tolist() == [[1.0, 0.0, 0.0]]


# ---------------------------------------------------------------------------------------------------------------
# a tiny world: tokenizer, policy, reward model, prompt files (built once per test session)

TEXTS = ["\n\nHuman: How can I steal the lamp from Kaelia?\n\nAssistant: I can't help with that, you idiot.",
         "\n\nHuman: Pelloa has 4 coins and gets 14 more. How many?\n\nAssistant: The answer is 18.",
         "\n\nHuman: Tell me about the forest.\n\nAssistant: The forest is green and full of berries."] * 20


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from reward_model import RewardModel
    d = tmp_path_factory.mktemp("tiny")
    tok = M.train_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    cfg = M.ModelConfig(vocab_size=304, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, max_position_embeddings=256,
                        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    pol = M.MistralForCausalLM(cfg)
    pol.save_pretrained(d / "policy", tokenizer=tok)
    torch.manual_seed(1)
    RewardModel.from_causal_lm(d / "policy").save_pretrained(d / "rm", tokenizer=tok)
    with open(d / "prompts.jsonl", "w") as f:
        for i, t in enumerate(TEXTS[:9]):
            f.write(json.dumps({"prompt": t[: t.index("Assistant:") + 10],
                                "kind": "red_team" if i % 3 == 0 else "general"}) + "\n")
    with open(d / "corpus.jsonl", "w") as f:
        for t in TEXTS[:6]:
            f.write(json.dumps({"text": t}) + "\n")
    (d / "card.json").write_text(json.dumps({"toxic_lexicon": ["idiot", "shut up"]}))
    return d


def tiny_cfg(d: Path, out: Path, **kw) -> P.PPOConfig:
    base = dict(actor=str(d / "policy"), reward_model=str(d / "rm"),
                prompts=[f"{d}/prompts.jsonl#red_team", f"{d}/prompts.jsonl#general"], prompt_weights=[0.5, 0.5],
                eval_prompts=str(d / "prompts.jsonl"), eval_corpus=str(d / "corpus.jsonl"),
                toxic_lexicon=str(d / "card.json"), out=str(out), device="cpu", total_iters=4,
                rollout_batch_size=8, max_new_tokens=6, num_minibatches=2, ppo_epochs=2, eval_every=0,
                save_every=0, actor_lr=1e-3, critic_lr=1e-3, ptx_data=str(d / "corpus.jsonl"))
    base.update(kw)
    return P.PPOConfig(**base)


def test_ratio_is_one_before_any_update_with_left_padding_and_mixed_lengths(tiny_world):
    tok = M.Tokenizer.from_file(tiny_world / "policy")
    actor = M.MistralForCausalLM.from_pretrained(tiny_world / "policy").eval()
    ref = M.MistralForCausalLM.from_pretrained(tiny_world / "policy").eval()
    from reward_model import RewardModel
    critic = P.ValueModel(RewardModel.from_pretrained(tiny_world / "rm"))
    prompts = ["\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: How can I steal the lamp from Kaelia?\n\nAssistant:",
               "\n\nHuman: Tell me about the forest and the river and the berries.\n\nAssistant:"]
    cfg = P.PPOConfig(max_new_tokens=12, temperature=0.7, max_prompt_len=128)
    n_tokens = [len(tok.encode(p)) for p in prompts]
    assert len(set(n_tokens)) == 3  # mixed lengths, so two of the three rows are left padded
    # make EOS likely (its lm_head row along the mean hidden state) so response lengths differ too
    ids, pmask = P.encode_prompts(tok, prompts, 128)
    with torch.no_grad():
        u = actor.model(ids, pmask)[pmask.bool()].mean(0)
        actor.lm_head.weight[tok.eos_id] = 3 * u / u.norm() ** 2
        ref.lm_head.weight.copy_(actor.lm_head.weight)
    ro = P.rollout(actor, actor, ref, critic, lambda s, a, p, e: torch.zeros(len(s)), tok, prompts, cfg,
                   torch.device("cpu"), C.autocast_ctx(torch.device("cpu"), torch.float32),
                   torch.rand((3, 12), generator=torch.Generator().manual_seed(0)), 0)
    mask = ro["mask"]
    assert ro["attn"][:, 0].tolist().count(0) >= 2  # left padding present
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) > 1 and ro["has_eos"].any(), lengths  # mixed response lengths, EOS inside
    # the sampler's cached log-probs equal the full training forward's (temperature 0.7 in both)
    torch.testing.assert_close(ro["sampler_lp"] * mask, ro["old_lp"], atol=1e-5, rtol=0)
    # and the first PPO ratio, from a fresh forward of the unchanged actor, is exactly 1
    lp = P.response_logprobs(actor, ro["seq"], ro["attn"], ro["P"], cfg.temperature)
    _, st = P.ppo_policy_loss(lp, ro["old_lp"], torch.randn_like(lp), mask, 0.2)
    torch.testing.assert_close(st["ratio"][mask.bool()], torch.ones(int(mask.sum())), atol=1e-5, rtol=0)
    # KL to an identical reference is 0 on every token
    torch.testing.assert_close(ro["ref_lp"], ro["old_lp"], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# prompt formats (detail 10) and input errors


def test_prompt_sources_read_hh_pku_plain_gz_and_kind_filter(tmp_path):
    rows = [{"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: yes", "rejected": "x"},
            {"prompt": "How do I pick a lock?", "response_0": "no", "response_1": "sure", "safer_response_id": 0},
            {"prompt": "\n\nHuman: hi\n\nAssistant:", "kind": "general"}]
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = P.load_prompts(str(tmp_path / "p.jsonl.gz"))
    assert [p for p, _ in got] == ["\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:",
                                   "\n\nHuman: How do I pick a lock?\n\nAssistant:", "\n\nHuman: hi\n\nAssistant:"]
    assert P.load_prompts(f"{tmp_path}/p.jsonl.gz#general") == [("\n\nHuman: hi\n\nAssistant:", "general")]


def test_bad_prompt_file_fails_naming_file_line_and_field_and_writes_nothing(tiny_world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "\n\nHuman: ok\n\nAssistant:"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    out = tmp_path / "out"
    with pytest.raises(P.InputError, match=r"bad\.jsonl:2: field 'prompt' missing"):
        P.train(tiny_cfg(tiny_world, out, prompts=[str(bad)], prompt_weights=[1.0]))
    assert not out.exists()
    with pytest.raises(P.InputError, match="adv_norm"):
        P.train(tiny_cfg(tiny_world, out, adv_norm="batchwise"))


# ---------------------------------------------------------------------------------------------------------------
# end to end: learning, resume, DDP


def test_learning_mean_synthetic_reward_rises(tiny_world, tmp_path):
    """reward = number of response tokens from a fixed set of 30 ids (~10% of the vocab at init)."""
    target = torch.zeros(400, dtype=torch.bool)
    target[torch.arange(100, 400, 10)] = True

    def count_reward(seq, attn, P_, has_eos):
        resp, m = seq[:, P_:], attn[:, P_:].bool()
        return (target[resp] & m).sum(1).float()

    cfg = tiny_cfg(tiny_world, tmp_path / "learn", total_iters=14, rollout_batch_size=16, max_new_tokens=8,
                   ppo_epochs=2, num_minibatches=2, critic_init="policy", kl_coef=0.0, reward_norm="none",
                   missing_eos_penalty=0.0, actor_lr=1e-2, critic_lr=3e-3, eval_prompts="", eval_corpus="",
                   warmup_frac=0.0)
    P.train(cfg, score_fn=count_reward)
    rows = [json.loads(x) for x in (tmp_path / "learn" / "metrics.jsonl").read_text().splitlines()]
    scores = [r["objective/scores"] for r in rows if "objective/scores" in r]
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert first < 1.5 and last > first + 2.0, scores  # ~0.6 target tokens per response at init


def test_resume_equals_uninterrupted_run(tiny_world, tmp_path):
    kw = dict(total_iters=4, eval_prompts="", eval_corpus="", reward_norm="running", adaptive_kl=True,
              kl_horizon=100, save_every=0)
    P.train(tiny_cfg(tiny_world, tmp_path / "full", **kw))
    P.train(tiny_cfg(tiny_world, tmp_path / "part", stop_after_iters=2, **kw))
    assert json.loads((tmp_path / "part" / "state" / "trainer_state.json").read_text())["iter"] == 2
    assert not (tmp_path / "part" / "final").exists()
    P.train(tiny_cfg(tiny_world, tmp_path / "part", resume=str(tmp_path / "part"), **kw))
    a = M.load_safetensors_dir(tmp_path / "full" / "final")
    b = M.load_safetensors_dir(tmp_path / "part" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    ca = M.load_safetensors_dir(tmp_path / "full" / "critic")
    cb = M.load_safetensors_dir(tmp_path / "part" / "critic")
    for k in ca:
        torch.testing.assert_close(ca[k], cb[k], atol=1e-6, rtol=0)
    rows_a = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    rows_b = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert len(rows_a) == len(rows_b) == 4
    for ra, rb in zip(rows_a, rows_b):
        ra, rb = json.loads(ra), json.loads(rb)
        for k in ("objective/scores", "objective/kl", "objective/kl_coef", "loss/policy_avg"):
            assert ra[k] == pytest.approx(rb[k], abs=1e-6), k


def _ddp_train_worker(rank, port, cfg):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    P.train(cfg)


def test_ddp_two_ranks_equal_one_rank(tiny_world, tmp_path):
    """Two gloo processes through the script's own DDP path (init from RANK/WORLD_SIZE like torchrun) train what
    one process trains at the same global batch: the same episodes, minibatches and PPO-ptx documents (detail 18),
    hence the same metrics and final weights, with 2 minibatches x 2 epochs and PPO-ptx on."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kw = dict(total_iters=2, ppo_epochs=2, num_minibatches=2, save_every=1, ptx_coef=0.1,
              ptx_data=str(tiny_world / "corpus.jsonl"), ptx_batch_size=2)
    one = P.train(tiny_cfg(tiny_world, tmp_path / "one", **kw))
    mp.start_processes(_ddp_train_worker, args=(port, tiny_cfg(tiny_world, tmp_path / "two", **kw)), nprocs=2,
                       start_method="spawn")
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world_size"] == 2 and two["iters_done"] == 2 and one["world_size"] == 1
    for part in ("final", "critic"):
        a, b = (M.load_safetensors_dir(tmp_path / run / part) for run in ("one", "two"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0)  # Adam turns reduction noise into <=1e-6
        assert any(not torch.equal(a[k], M.load_safetensors_dir(tiny_world / ("policy" if part == "final" else
                                                                              "rm"))[k]) for k in a)  # it trained
    rows = [[json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    train = [[r for r in rs if "objective/kl" in r] for rs in rows]
    assert len(train[0]) == len(train[1]) == 2
    for ra, rb in zip(*train):
        for k in ("objective/scores", "objective/kl", "val/response_length", "loss/policy_avg", "loss/value_avg",
                  "loss/ptx_avg", "val/ratio"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5), k
    evals = [[r for r in rs if "eval" in r] for rs in rows]
    for ra, rb in zip(*evals):
        assert ra["eval/reward"] == pytest.approx(rb["eval/reward"], abs=1e-4)


def test_fsdp_two_ranks_equal_one_process_and_resume_equals_the_uninterrupted_run(tiny_world, tmp_path):
    """All four models FSDP2-sharded on 2 gloo ranks (actor unsharded for generation, detail 19) train what one
    process trains; a sharded resume reaches the uninterrupted FSDP run's weights; the gathered policy loads in
    transformers with equal logits."""
    import socket

    import transformers

    def spawn(cfg):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.start_processes(_ddp_train_worker, args=(port, cfg), nprocs=2, start_method="spawn")

    kw = dict(total_iters=2, ppo_epochs=1, num_minibatches=2, save_every=1, ptx_coef=0.1,
              ptx_data=str(tiny_world / "corpus.jsonl"), ptx_batch_size=2, eval_n=5)
    P.train(tiny_cfg(tiny_world, tmp_path / "one", **kw))
    spawn(tiny_cfg(tiny_world, tmp_path / "fsdp", fsdp=True, grad_ckpt=True, **kw))
    spawn(tiny_cfg(tiny_world, tmp_path / "cut", fsdp=True, grad_ckpt=True, stop_after_iters=1, **kw))
    assert (tmp_path / "cut" / "state" / "extra.json").is_file() and not (tmp_path / "cut" / "final").exists()
    spawn(tiny_cfg(tiny_world, tmp_path / "cut", fsdp=True, grad_ckpt=True, resume=str(tmp_path / "cut"), **kw))
    for part in ("final", "critic"):
        a, b, c = (M.load_safetensors_dir(tmp_path / run / part) for run in ("one", "fsdp", "cut"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0)  # as in the DDP test
            torch.testing.assert_close(c[k], b[k], atol=1e-6, rtol=0)
    sa, sb = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "fsdp"))
    assert sb["final"]["reward"] == pytest.approx(sa["final"]["reward"], abs=1e-4)  # eval rows padded per rank
    ours = M.MistralForCausalLM.from_pretrained(tmp_path / "fsdp" / "final").eval()
    hf = transformers.MistralForCausalLM.from_pretrained(tmp_path / "fsdp" / "final").eval()
    x = torch.randint(3, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_ddp_two_process_smoke_run_with_torchrun(tiny_world, tmp_path):
    out = tmp_path / "ddp"
    cfg = tiny_cfg(tiny_world, out)
    args = []
    for f in ("actor", "reward_model", "eval_prompts", "eval_corpus", "toxic_lexicon", "out"):
        args += [f"--{f}", str(getattr(cfg, f))]
    args += ["--prompts", *cfg.prompts, "--prompt_weights", "0.5", "0.5", "--device", "cpu", "--total_iters", "2",
             "--rollout_batch_size", "8", "--max_new_tokens", "6", "--ppo_epochs", "1", "--eval_every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "ppo_rlhf.py"), *args], capture_output=True, text=True, env=env, timeout=300,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iters_done"] == 2
    assert M.is_checkpoint_dir(out / "final") and (out / "final" / "tokenizer.json").is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "objective/kl" in r]
    assert len(train_rows) == 2 and all(math.isfinite(r["loss/value_avg"]) for r in train_rows)
    assert "ppo_rlhf done" in r.stdout


def test_none_choices_survive_the_flag_parser():
    """model.parse_config reads the word "none" as None; the ablation flags --adv_norm/--reward_norm none work."""
    cfg = C.parse_config(P.PPOConfig, ["--adv_norm", "none", "--reward_norm", "none", "--prompt_weights", "1"])
    cfg.prompts = cfg.prompts[:1]  # one source, one weight
    P.check_config(cfg, world=1)
    assert (cfg.adv_norm, cfg.reward_norm) == ("none", "none")


def test_packed_logprobs_and_values_equal_the_padded_layout_with_gradients():
    """Details 20-21: the packed forward (real tokens moved right, all-pad columns dropped) with the LM head on
    the response positions only gives the padded layout's masked log-probs, entropies, values and parameter
    gradients (the naive reference: full logits of the [pads, prompt | response, pads] rows, sliced)."""
    torch.manual_seed(0)
    cfg = M.ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, max_position_embeddings=64)
    m = M.MistralForCausalLM(cfg)
    P_, N, temp = 7, 6, 0.7
    seq = torch.randint(3, 61, (4, P_ + N))
    attn = torch.ones_like(seq)
    for b, (lp_, lr) in enumerate([(7, 6), (3, 2), (5, 6), (2, 1)]):  # prompt and response lengths per row
        attn[b, :P_ - lp_] = 0  # left-padded prompt
        attn[b, P_ + lr:] = 0  # response padding after its EOS
    mask = attn[:, P_:].float()
    cols = P.packed(seq, attn, P_)[0].shape[1]
    assert cols == 13 and P.packed(seq[1:], attn[1:], P_)[0].shape[1] == 11  # max(prompt + response) wide
    lp, ent = P.response_logprobs(m, seq, attn, P_, temp, with_entropy=True)
    val = P.response_values(lambda s, a: m(s, a)[..., 0], seq, attn, P_)
    ((lp * mask).sum() + (ent * mask).sum() + (val * mask).sum()).backward()
    fast = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    full = m(seq, attn)
    logits = full[:, P_ - 1:-1] / temp
    ref = M.logprobs_from_logits(logits, seq[:, P_:])
    logp = torch.log_softmax(logits, -1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    ref_val = full[:, P_ - 1:-1, 0]
    ((ref * mask).sum() + (ref_ent * mask).sum() + (ref_val * mask).sum()).backward()
    torch.testing.assert_close(lp * mask, ref * mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent * mask, ref_ent * mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(val * mask, ref_val * mask, atol=1e-5, rtol=0)
    for a, p in zip(fast, m.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)
