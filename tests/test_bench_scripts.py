"""bench/aggregate.py against hand-computed statistics on synthetic run folders, bench/scale_reward_model.py on a
tiny reward model, and (slow) bench/seeds.sh and bench/ablate_ppo.sh end to end at smoke sizes."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402
from common import InputError  # noqa: E402
from reward_model import RewardModel  # noqa: E402


def load_bench(name: str):
    """A bench/ script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


A = load_bench("aggregate")
S = load_bench("scale_reward_model")


# ----------------------------------------------------------------------------------------------------------------
# Statistics


def test_t_quantile_matches_the_t_table_also_for_fractional_df():
    # reference values: scipy.stats.t.ppf(0.975, df), scipy 1.17 (the table's 12.706, 4.303, 2.776, 2.228)
    for df, t in [(1, 12.706204736174694), (2, 4.302652729749462), (4, 2.7764451051977934),
                  (10, 2.228138851986274), (2.5, 3.5746548420036817), (50 / 17, 3.218758614532882),
                  (1e6, 1.959966356814107)]:
        assert A.t_quantile(0.975, df) == pytest.approx(t, rel=1e-9)
    assert A.t_quantile(0.025, 4) == pytest.approx(-2.7764451051977934, rel=1e-9)
    assert A.t_cdf(0.0, 3.3) == pytest.approx(0.5)


def test_welch_interval_equals_the_hand_computation_for_two_samples_of_three():
    a, b = [1.0, 2.0, 3.0], [4.0, 6.0, 8.0]  # means 2 and 6, sample variances 1 and 4
    se = math.sqrt(1 / 3 + 4 / 3)
    df = (5 / 3) ** 2 / ((1 / 3) ** 2 / 2 + (4 / 3) ** 2 / 2)  # Welch-Satterthwaite: 50/17
    assert df == pytest.approx(50 / 17)
    half = 3.218758614532882 * se  # t_0.975 at df 50/17 (scipy.stats.t.ppf)
    ci = A.welch_ci(a, b)
    assert ci["diff"] == pytest.approx(-4.0)
    assert ci["se"] == pytest.approx(se) and ci["df"] == pytest.approx(df)
    assert (ci["lo"], ci["hi"]) == pytest.approx((-4 - half, -4 + half), rel=1e-9)
    assert (ci["lo"], ci["hi"]) == pytest.approx((-8.155399503182505, 0.1553995031825055), rel=1e-9)  # ttest_ind
    assert A.verdict(ci) == "no measurable difference"
    ci = A.welch_ci([11.0, 12.0, 13.0], b)
    assert ci["lo"] > 0 and A.verdict(ci) == "differs"


def test_welch_interval_of_constant_samples_is_the_exact_difference_and_one_seed_is_too_few():
    ci = A.welch_ci([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert (ci["diff"], ci["lo"], ci["hi"]) == (0.25, 0.25, 0.25) and A.verdict(ci) == "differs"
    assert A.welch_ci([1.0], [1.0, 2.0]) is None and A.verdict(None) == "too few seeds"
    assert A.mean_std([0.5, 0.6, 0.7]) == pytest.approx((0.6, 0.1))
    assert A.mean_std([3.0]) == (3.0, None)


# ----------------------------------------------------------------------------------------------------------------
# aggregate.py seeds: synthetic pipeline.sh folders


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


TASK_SETTINGS = {
    "toy_mmlu": {"category": "Knowledge", "modes": ["ll"], "primary": "acc", "lower_is_better": False,
                 "data_sha256": {"w/eval/mmlu": "aaa"}},
    "toy_redteam": {"category": "Safety", "modes": ["gen"], "primary": "toxicity_rate", "lower_is_better": True,
                    "data_sha256": {"w/eval/redteam": "bbb"}},
    "toy_humaneval": {"category": "Coding", "modes": ["gen"], "primary": "pass@1", "lower_is_better": False,
                      "data_sha256": {"w/eval/humaneval": "ccc"}},
}


def fake_seed_run(d: Path, i: int, data_hash: str = "aaa") -> Path:
    """A pipeline.sh folder of seed i: base acc 0.5 + 0.1 i, sft 0.4, ppo toxicity 0.1 i, category 0.2 + 0.2 i."""
    results = {m: {"toy_mmlu": {"ll": {"acc": a, "acc_stderr": 0.05, "chance": 0.25}},
                   "toy_redteam": {"gen": {"toxicity_rate": tox}},
                   "toy_humaneval": {"gen": {"skipped": "code execution disabled"}}}
               for m, a, tox in [("base", 0.5 + 0.1 * i, 0.6), ("sft", 0.4, 0.5), ("ppo", 0.5, 0.1 * i)]}
    tasks = json.loads(json.dumps(TASK_SETTINGS))
    tasks["toy_mmlu"]["data_sha256"] = {f"{d}/toy/eval/mmlu": data_hash}  # paths differ per seed, hashes not
    write_json(d / "evaluate/results.json", {
        "settings_hash": f"h{i}", "models": {"base": {}, "sft": {}, "ppo": {}}, "results": results,
        "category_macro": {m: {"Knowledge": 0.2 + 0.2 * i} for m in ("base", "sft", "ppo")},
        "settings": {"tasks": tasks}})
    for step, tox in (("pretrain", 0.6), ("sft", 0.3 + 0.1 * i)):
        write_json(d / step / "summary.json", {"val_loss": 1.0 + i, "probe": {
            "red_team_toxicity": tox, "eos_rate": 0.9, "n_red_team": 100, "knowledge_acc": 0.5, "chance_acc": 0.25}})
    (d / "pipeline_times.txt").write_text(f"pretrain {10 * i}\nppo 5\n")
    write_json(d / "seed.json", {"seed": i, "wall_s": 100 + i})
    return d


def test_seeds_table_is_mean_and_sample_std_over_seeds_with_results_json_category_averages(tmp_path):
    runs = [fake_seed_run(tmp_path / f"seed{i}", i) for i in (0, 1, 2)]
    rec = A.aggregate_seeds(runs)
    base = rec["tasks"]["toy_mmlu"]["models"]["base"]
    assert base["values"] == pytest.approx([0.5, 0.6, 0.7])
    assert (base["mean"], base["std"]) == pytest.approx((0.6, 0.1))  # std with n - 1
    assert rec["tasks"]["toy_mmlu"]["models"]["sft"]["std"] == pytest.approx(0.0)
    assert rec["tasks"]["toy_mmlu"]["chance"] == 0.25
    ppo_tox = rec["tasks"]["toy_redteam"]["models"]["ppo"]
    assert (ppo_tox["mean"], ppo_tox["std"]) == pytest.approx((0.1, 0.1))
    cat = rec["categories"]["Knowledge"]["ppo"]  # category_macro of results.json: 0.2, 0.4, 0.6
    assert (cat["mean"], cat["std"]) == pytest.approx((0.4, 0.2))
    sft_probe = rec["probes"]["sft"]["red_team_toxicity"]
    assert (sft_probe["mean"], sft_probe["std"]) == pytest.approx((0.4, 0.1))
    assert rec["probes"]["pretrain"]["val_loss"]["mean"] == pytest.approx(2.0)
    assert [w["total"] for w in rec["wall_time_s"]] == [100, 101, 102]
    md = A.seeds_markdown(rec)
    assert "| toy_mmlu | ll | acc | 60.0 ± 10.0 | 40.0 ± 0.0 | 50.0 ± 0.0 | 25.0 |" in md
    assert "| toy_redteam | gen | toxicity_rate (lower is better) | 60.0 ± 0.0 | 50.0 ± 0.0 | 10.0 ± 10.0 | - |" in md
    assert "| toy_humaneval | gen | pass@1 | skipped | skipped | skipped | - |" in md
    assert "| **category average** | | primary | 40.0 ± 20.0 | 40.0 ± 20.0 | 40.0 ± 20.0 | |" in md
    assert "| red_team_toxicity | 60.0 ± 0.0% | 40.0 ± 10.0% |" in md


def test_seeds_table_refuses_seeds_evaluated_on_different_worlds(tmp_path):
    runs = [fake_seed_run(tmp_path / "seed1", 1), fake_seed_run(tmp_path / "seed2", 2, data_hash="other")]
    with pytest.raises(SystemExit, match="other data"):
        A.aggregate_seeds(runs)


def test_seeds_main_writes_markdown_and_json_under_the_prefix(tmp_path):
    runs = [fake_seed_run(tmp_path / f"seed{i}", i) for i in (1, 2)]
    A.main(["seeds", *map(str, runs), "--out", str(tmp_path / "bench/seeds.v1")])
    assert (tmp_path / "bench/seeds.v1.md").read_text().startswith("# Base / SFT / PPO over 2 training seeds")
    assert json.loads((tmp_path / "bench/seeds.v1.json").read_text())["models"] == ["base", "sft", "ppo"]


# ----------------------------------------------------------------------------------------------------------------
# aggregate.py ablations: synthetic ppo_rlhf.py folders


def fake_ppo_run(d: Path, tox: float, kl: float, reward: float = -2.0, **config) -> Path:
    block = {"reward": reward, "eos_rate": 0.9, "length": 20.0, "kl": kl, "toxicity_rate/red_team": tox,
             "toxicity_rate/general": 0.0, "reward/general": -2.0, "corpus_loss": 0.5}
    write_json(d / "summary.json", {"time_s": 30.0, "base": {**block, "reward": -3.5, "kl": 0.0,
                                                               "toxicity_rate/red_team": 0.56},
                                    "final": block, "corpus_loss_relative_change": 0.03})
    write_json(d / "config.json", {"out": str(d), "seed": 1, "adv_norm": "global", "kl_coef": 0.05,
                                   "reward_model": "rm", **config})
    return d


def test_ablation_differences_get_welch_intervals_against_their_comparison_run(tmp_path):
    for i, s in enumerate((1, 2, 3)):
        fake_ppo_run(tmp_path / f"default/seed{s}", tox=0.1 + 0.1 * i, kl=1.0 + 0.1 * i)
        fake_ppo_run(tmp_path / f"adv_norm_off/seed{s}", tox=0.4 + 0.1 * i, kl=1.2 - 0.1 * i, adv_norm="none")
        fake_ppo_run(tmp_path / f"rm_large/seed{s}", tox=0.2, kl=1.0, reward=5.0, reward_model="big_rm")
    (tmp_path / "rm_same").symlink_to("default")
    rec = A.aggregate_ablations(tmp_path)
    adv = rec["variants"]["adv_norm_off"]
    assert adv["flags"] == {"adv_norm": ("none", "global")}  # read from the runs' config.json
    assert adv["measures"]["red_team_toxicity"]["mean"] == pytest.approx(0.5)
    comp = {(c["variant"], c["measure"]): c for c in rec["comparisons"]}
    # toxicity: 0.4/0.5/0.6 vs 0.1/0.2/0.3, both variances 0.01: se = sqrt(0.02 / 3), df = 4, t = 2.7764451
    c = comp[("adv_norm_off", "red_team_toxicity")]
    half = 2.7764451051977934 * math.sqrt(0.02 / 3)
    assert c["ci"]["df"] == pytest.approx(4.0)
    assert (c["ci"]["diff"], c["ci"]["lo"], c["ci"]["hi"]) == pytest.approx((0.3, 0.3 - half, 0.3 + half))
    assert c["verdict"] == "differs"
    assert comp[("adv_norm_off", "kl")]["ci"]["diff"] == pytest.approx(0.0, abs=1e-12)
    assert comp[("adv_norm_off", "kl")]["verdict"] == "no measurable difference"
    assert comp[("rm_large", "reward")]["baseline"] == "rm_same"
    assert comp[("rm_large", "reward")]["verdict"].startswith("not comparable")  # its own RM's units
    assert comp[("rm_large", "red_team_toxicity")]["verdict"] == "no measurable difference"
    assert rec["base"]["red_team_toxicity"]["mean"] == pytest.approx(0.56)
    md = A.ablations_markdown(rec)
    assert f"| adv_norm_off | default | red-team toxicity | 50.0 ± 10.0% | 20.0 ± 10.0% | +30.0 pp " \
           f"[{100 * (0.3 - half):+.1f}, {100 * (0.3 + half):+.1f}] | differs |" in md
    assert "| eos_penalty_off | 0 | not measured |" in md


# ----------------------------------------------------------------------------------------------------------------
# scale_reward_model.py on a tiny reward model

TEXTS = [f"\n\nHuman: What does the {n} eat?\n\nAssistant: The {n} eats {f}." for n in ("Galrun", "Zorbel", "Fenqua")
         for f in ("berries", "moss", "seeds", "fish")]


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rm")
    tok = M.train_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    cfg = M.ModelConfig(vocab_size=304, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, max_position_embeddings=128,
                        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    M.MistralForCausalLM(cfg).save_pretrained(d / "policy", tokenizer=tok)
    torch.manual_seed(1)
    rm = RewardModel.from_causal_lm(d / "policy")
    rm.config.extra.update(reward_mean=-1.25, reward_std=0.75)  # as reward_model.py stores them (its detail 9)
    rm.save_pretrained(d / "rm", tokenizer=tok)
    return d / "rm"


def test_scaled_reward_model_scores_factor_times_and_normalises_identically(tiny_rm, tmp_path):
    S.scale_reward_model(tiny_rm, tmp_path / "scaled", 20.0)
    tok = M.Tokenizer.from_file(tiny_rm)
    src, dst = RewardModel.from_pretrained(tiny_rm), RewardModel.from_pretrained(tmp_path / "scaled")
    prompts = [t[: t.index("Assistant:") + 10] for t in TEXTS[:6]]
    responses = [t[t.index("Assistant:") + 10:] for t in TEXTS[:6]]
    raw, big = src.score_texts(prompts, responses, tok), dst.score_texts(prompts, responses, tok)
    assert raw.abs().min() > 1e-3  # non-trivial scores
    torch.testing.assert_close(big, 20.0 * raw, rtol=1e-5, atol=1e-6)
    assert (dst.reward_mean, dst.reward_std) == pytest.approx((-25.0, 15.0))
    torch.testing.assert_close(dst.normalize(big), src.normalize(raw), rtol=1e-5, atol=1e-5)
    assert (tmp_path / "scaled/tokenizer.json").read_bytes() == (tiny_rm / "tokenizer.json").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_scale_reward_model_refuses_an_existing_destination_and_a_non_positive_factor(tiny_rm, tmp_path):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="exists already"):
        S.scale_reward_model(tiny_rm, dst, 20.0)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    with pytest.raises(InputError, match="must be > 0"):
        S.scale_reward_model(tiny_rm, tmp_path / "new", -2.0)
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------------------------------------
# The scripts end to end at smoke sizes (minutes on 2 CPU cores)


def bash(script: str, env: dict, timeout: int) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", str(ROOT / script), *env.pop("_args", [])], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_seeds_smoke_runs_two_seeds_and_writes_the_table(tmp_path):
    r = bash("bench/seeds.sh", {"SMOKE": "1", "SEEDS": "1 2", "OUT": str(tmp_path)}, timeout=600)
    rec = json.loads((tmp_path / "seeds.json").read_text())
    assert [w["seed"] for w in rec["wall_time_s"]] == [1, 2]
    assert json.loads((tmp_path / "seed2/pretrain/config.json").read_text())["seed"] == 2
    assert json.loads((tmp_path / "seed2/ppo/config.json").read_text())["seed"] == 2
    assert not (tmp_path / "seed2/toy").exists()  # one world for all seeds: $OUT/toy
    assert "# Base / SFT / PPO over 2 training seeds" in r.stdout
    # SKIP_DONE reuses both seeds and only rewrites the table
    r = bash("bench/seeds.sh", {"SMOKE": "1", "SEEDS": "1 2", "OUT": str(tmp_path), "SKIP_DONE": "1"}, timeout=120)
    assert "seed 1: done already" in r.stdout and "seed 2: done already" in r.stdout


@pytest.mark.slow
def test_ablate_ppo_smoke_runs_every_variant_and_compares_them(tmp_path):
    bash("pipeline.sh", {"OUT": str(tmp_path / "models"), "_args": ["--smoke"]}, timeout=300)
    m = tmp_path / "models"
    env = {"SMOKE": "1", "SEEDS": "1 2", "OUT": str(tmp_path / "abl"), "BASE": str(m / "pretrain/final"),
           "RM": str(m / "reward_model/final"), "WORLD": str(m / "toy"), "LONG_ITERS": "3"}
    bash("bench/ablate_ppo.sh", env, timeout=900)
    rec = json.loads((tmp_path / "abl/ablate_ppo.json").read_text())
    # every variant runs on both seeds, except ptx_off, which the script runs only with PTX_OFF=1
    assert {k: len(v["seeds"]) for k, v in rec["variants"].items()} == {k: 0 if k == "ptx_off" else 2
                                                                        for k in A.VARIANTS}
    assert "| ptx_off | 0 | not measured |" in (tmp_path / "abl/ablate_ppo.md").read_text()
    assert rec["variants"]["long_kl_off"]["flags"] == {"kl_coef": [0.0, 0.05]}  # JSON: (this run, its comparison)
    assert 2 <= json.loads((tmp_path / "abl/rm_large_model/params.json").read_text())["ratio"] <= 4
    assert json.loads((tmp_path / "abl/rm_scaled/config.json").read_text())["score_scale_factor"] == 20.0
    assert "task:toy_hellaswag" in rec["variants"]["prompts_all_red_team"]["measures"]
