"""The tables of the seed benchmarks: mean ± std over training seeds, and 95% intervals for ablation differences.

    python bench/aggregate.py seeds out/seeds/seed1 out/seeds/seed2 out/seeds/seed3 --out out/bench/seeds
    python bench/aggregate.py ablations out/ablate_ppo --out out/bench/ablate_ppo

bench/seeds.sh and bench/ablate_ppo.sh call it after their runs; it reads only the files the runs wrote and writes
PREFIX.md, PREFIX.json and PREFIX.png (plots.py; skipped with one line when plots.py or matplotlib is missing).

`seeds`: one folder per seed as `bash pipeline.sh` writes it (evaluate/results.json, pretrain/ and sft/summary.json,
pipeline_times.txt, and seed.json from bench/seeds.sh). Per task: evaluate.py's primary metric in its first mode
(the metric of its category averages); per category: results.json's own `category_macro`, not recomputed.

`ablations`: ROOT/<variant>/seed<N>/summary.json of ppo_rlhf.py (and evaluate/results.json where the variant was
evaluated on general tasks); each variant is compared with the run named in VARIANTS.

Statistics (the numbers appear at the lines that implement them):
1. Spread over seeds is the sample standard deviation (n - 1): with 3 seeds it is itself a rough estimate.
2. A difference of means gets Welch's t interval: se = sqrt(s_a^2 / n_a + s_b^2 / n_b), Welch-Satterthwaite
   degrees of freedom (fractional), and the Student-t quantile from a small pure function (the regularised
   incomplete beta by its continued fraction, Numerical Recipes 3rd ed. section 6.4, inverted by bisection).
   No equal-variance assumption: an ablation may change the spread as well as the mean.
3. Verdict: "differs" when the 95% interval excludes 0, else "no measurable difference" -- at 3 seeds a real but
   small effect often reads as the latter; the interval says how small an effect the runs could have missed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # plots.py and common.py live at the repository root

from common import write_bytes_atomic, write_json_atomic  # noqa: E402

LEVEL = 0.95  # two-sided confidence level of every interval
NON_FRACTION = ("ppl", "bits_per_byte", "judge_reward")  # evaluate.py's metrics that are not rates

# variant: (the run it is compared with, what it tests) -- the runs of bench/ablate_ppo.sh, in table order
VARIANTS = {
    "default": (None, "every ICE-GRT trick on, red-team + general prompts (ppo_rlhf.py defaults)"),
    "adv_norm_off": ("default", "Advantage Normalization off (ppo_rlhf.py detail 7)"),
    "eos_penalty_off": ("default", "EOS trick off: no missing-EOS penalty (detail 12)"),
    "prompts_all_red_team": ("default", "Appropriate Data off: red-team prompts only (detail 10)"),
    "ptx_off": ("default", "PPO-ptx off (detail 15)"),
    "long_default": (None, "the default run, long enough to over-optimise the reward model"),
    "long_kl_off": ("long_default", "KL-Control off at the same length (detail 3)"),
    "rm_same": (None, "Reward Size Scaling, model size: the policy-sized RM (the default runs)"),
    "rm_large": ("rm_same", "Reward Size Scaling, model size: an RM 2-4x the policy's parameters (detail 6)"),
    "raw_large_norm_fixed": (None, "Reward Size Scaling, normalisation: RM scores x factor, stored mean/std"),
    "raw_large_norm_off": ("raw_large_norm_fixed", "the same large raw scores, not normalised nor clipped"),
}
# the measures of a PPO run: key -> (label, kind, how to read it from summary.json); kind "rate" is a fraction
MEASURES = {
    "red_team_toxicity": ("red-team toxicity", "rate", lambda s: s["final"].get("toxicity_rate/red_team")),
    "general_toxicity": ("general toxicity", "rate", lambda s: s["final"].get("toxicity_rate/general")),
    "reward": ("RM reward (raw score)", "f2", lambda s: s["final"].get("reward")),
    "reward_gain": ("RM reward gain over base", "f2",
                    lambda s: _sub(s["final"].get("reward"), s["base"].get("reward"))),
    "reward_general": ("RM reward, general prompts", "f2", lambda s: s["final"].get("reward/general")),
    "kl": ("KL to the reference (nats/seq)", "f2", lambda s: s["final"].get("kl")),
    "eos_rate": ("EOS rate", "rate", lambda s: s["final"].get("eos_rate")),
    "length": ("response length (tokens)", "f1", lambda s: s["final"].get("length")),
    "corpus_loss": ("held-out corpus loss", "f4", lambda s: s["final"].get("corpus_loss")),
    "corpus_loss_change": ("corpus loss change vs base", "rate", lambda s: s.get("corpus_loss_relative_change")),
}
RM_DEPENDENT = ("reward", "reward_gain", "reward_general")  # in the units of the run's own reward model
# the columns of the per-variant table
MAIN_COLUMNS = ("red_team_toxicity", "general_toxicity", "reward", "reward_gain", "kl", "eos_rate", "length",
                "corpus_loss_change")


def _sub(a: float | None, b: float | None) -> float | None:
    return a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        sys.exit(f"aggregate: {path} not found; did the run finish? (rerun its script, or drop the folder)")
    except json.JSONDecodeError as e:
        sys.exit(f"aggregate: {path}:{e.lineno}: invalid JSON ({e.msg}); rerun that step")


# ----------------------------------------------------------------------------------------------------------------
# Statistics (pure functions)


def mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (n - 1; detail 1) of the numbers given; None where undefined."""
    xs = [float(x) for x in xs if isinstance(x, (int, float)) and not math.isnan(x)]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side; use the symmetry on the other
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student-t CDF with (possibly fractional) df: 1 - I_{df / (df + t^2)}(df / 2, 1 / 2) / 2 for t >= 0."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with t_cdf(t, df) = p, by bisection (detail 2)."""
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def welch_ci(a: list[float], b: list[float], level: float = LEVEL) -> dict | None:
    """mean(a) - mean(b) with Welch's t interval (detail 2); None with fewer than 2 values on a side."""
    a = [float(x) for x in a if isinstance(x, (int, float)) and not math.isnan(x)]
    b = [float(x) for x in b if isinstance(x, (int, float)) and not math.isnan(x)]
    if len(a) < 2 or len(b) < 2:
        return None
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    se = math.sqrt(va + vb)
    diff = ma - mb
    if se == 0.0:  # every seed gave the same value on both sides: the difference is exact
        return {"diff": diff, "lo": diff, "hi": diff, "se": 0.0, "df": float(len(a) + len(b) - 2), "t": 0.0}
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))  # Welch-Satterthwaite
    t = t_quantile(0.5 + level / 2.0, df)
    return {"diff": diff, "lo": diff - t * se, "hi": diff + t * se, "se": se, "df": df, "t": t}


def verdict(ci: dict | None) -> str:
    """Detail 3."""
    if ci is None:
        return "too few seeds"
    return "differs" if ci["lo"] > 0 or ci["hi"] < 0 else "no measurable difference"


# ----------------------------------------------------------------------------------------------------------------
# Formatting


def fmt_value(v: float | None, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "rate":
        return f"{100 * v:.1f}%"
    return f"{v:.{int(kind[1:])}f}"


def fmt_mean_std(m: float | None, s: float | None, kind: str) -> str:
    if m is None:
        return "-"
    if s is None:
        return fmt_value(m, kind)
    if kind == "rate":
        return f"{100 * m:.1f} ± {100 * s:.1f}%"
    d = int(kind[1:])
    return f"{m:.{d}f} ± {s:.{d}f}"


def fmt_diff(ci: dict, kind: str) -> str:
    if kind == "rate":  # a difference of two rates is in percentage points
        return f"{100 * ci['diff']:+.1f} pp [{100 * ci['lo']:+.1f}, {100 * ci['hi']:+.1f}]"
    d = int(kind[1:])
    return f"{ci['diff']:+.{d}f} [{ci['lo']:+.{d}f}, {ci['hi']:+.{d}f}]"


def _pct(v: float | None, metric: str) -> float | None:
    return v if v is None or metric in NON_FRACTION else 100 * v


def fmt_task_cell(vals: list[float], metric: str, n_runs: int) -> str:
    """mean ± std over seeds of one evaluate.py metric, in % as evaluate.py's tables (ppl etc. as is)."""
    m, s = mean_std(vals)
    if m is None:
        return "-"
    cell = f"{_pct(m, metric):.1f}" if s is None else f"{_pct(m, metric):.1f} ± {_pct(s, metric):.1f}"
    return cell + (f" (n={len(vals)})" if len(vals) != n_runs else "")


def _plot(kind: str, *args) -> None:
    """A picture from plots.py; a missing module (another engineer's file) or matplotlib skips it with one line."""
    try:
        import plots
    except ImportError as e:
        print(f"aggregate: plots.py not importable ({e}); {args[1]} not drawn")
        return
    out = getattr(plots, kind)(*args)
    if out is not None:
        print(f"wrote {out}")


def write_outputs(prefix: Path, md: str, rec: dict) -> None:
    """PREFIX.md and PREFIX.json, each written atomically (PREFIX may contain dots: no with_suffix)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(Path(f"{prefix}.md"), md.encode())
    write_json_atomic(Path(f"{prefix}.json"), rec)
    print("\n" + md)
    print(f"wrote {prefix}.md and {prefix}.json")


# ----------------------------------------------------------------------------------------------------------------
# seeds: base / SFT / PPO over training seeds


def primary_metrics(results: dict) -> dict[str, dict]:
    """task -> its category, first mode, primary metric and direction, from results.json's settings record."""
    return {t: {"category": s["category"], "mode": s["modes"][0], "metric": s["primary"],
                "lower_is_better": bool(s.get("lower_is_better"))} for t, s in results["settings"]["tasks"].items()}


def aggregate_seeds(run_dirs: list[Path]) -> dict:
    """The record of `seeds`: per task, category, probe and step, the per-seed values with mean and std."""
    runs = [(d, _read_json(d / "evaluate/results.json")) for d in run_dirs]
    first = runs[0][1]
    models, tasks = list(first["models"]), primary_metrics(first)
    data_hashes = [sorted(v for s in r["settings"]["tasks"].values() for v in s.get("data_sha256", {}).values())
                   for _, r in runs]
    for (d, r), h in zip(runs, data_hashes):
        if list(r["models"]) != models or set(primary_metrics(r)) != set(tasks):
            sys.exit(f"aggregate: {d}: models {list(r['models'])} / tasks differ from {runs[0][0]}'s; "
                     f"compare runs of one pipeline")
        if h != data_hashes[0]:
            sys.exit(f"aggregate: {d} was evaluated on other data than {runs[0][0]} (the eval files' sha256 "
                     f"differ): the seeds must share one toy world")
    rec: dict = {"runs": [str(d) for d in run_dirs], "models": models, "tasks": {}, "categories": {},
                 "probes": {}, "wall_time_s": [], "settings_hashes": [r["settings_hash"] for _, r in runs]}
    for t, spec in tasks.items():
        per_model = {}
        for m in models:
            raw = [r["results"][m][t].get(spec["mode"], {}) for _, r in runs]
            vals = [x.get(spec["metric"]) for x in raw]
            vals = [v for v in vals if isinstance(v, (int, float))]
            mean, std = mean_std(vals)
            per_model[m] = {"values": vals, "mean": mean, "std": std, "n": len(vals),
                            "skipped": next((x["skipped"] for x in raw if "skipped" in x), None)}
        chance = first["results"][models[0]][t].get(spec["mode"], {}).get("chance")
        rec["tasks"][t] = {**spec, "chance": chance, "models": per_model}
    cats = list(dict.fromkeys(c for _, r in runs for m in models for c in r["category_macro"].get(m, {})))
    for c in cats:
        rec["categories"][c] = {}
        for m in models:
            vals = [r["category_macro"][m][c] for _, r in runs if c in r["category_macro"].get(m, {})]
            mean, std = mean_std(vals)
            rec["categories"][c][m] = {"values": vals, "mean": mean, "std": std, "n": len(vals)}
    for step in ("pretrain", "sft"):  # pretrain.py's end-of-run probe (its detail 11) and held-out loss
        sums = [_read_json(d / step / "summary.json") for d in run_dirs]
        keys = [k for k, v in sums[0].get("probe", {}).items() if isinstance(v, float) and k != "chance_acc"]
        rows = {k: [s["probe"][k] for s in sums if isinstance(s.get("probe", {}).get(k), (int, float))]
                for k in keys}
        rows["val_loss"] = [s["val_loss"] for s in sums if isinstance(s.get("val_loss"), (int, float))]
        rec["probes"][step] = {k: dict(zip(("mean", "std"), mean_std(v)), values=v) for k, v in rows.items()}
        rec["probes"]["chance_acc"] = sums[0].get("probe", {}).get("chance_acc")
    for d in run_dirs:
        times = {}
        if (d / "pipeline_times.txt").is_file():
            times = {k: float(v) for k, v in (ln.split() for ln in (d / "pipeline_times.txt").read_text().splitlines()
                                              if len(ln.split()) == 2)}
        seed = _read_json(d / "seed.json") if (d / "seed.json").is_file() else {}  # written by bench/seeds.sh
        rec["wall_time_s"].append({"run": str(d), "seed": seed.get("seed"), "steps": times,
                                   "total": seed.get("wall_s", sum(times.values()) or None)})
    return rec


def seeds_markdown(rec: dict) -> str:
    models, n = rec["models"], len(rec["runs"])
    seeds = [w["seed"] if w["seed"] is not None else Path(w["run"]).name for w in rec["wall_time_s"]]
    lines = [f"# Base / SFT / PPO over {n} training seeds", "",
             f"Seeds {', '.join(map(str, seeds))} ({', '.join(rec['runs'])}), one toy world (the evaluation files' "
             f"sha256 agree across seeds); every step of `pipeline.sh` ran with `--seed N`. Cells: mean ± std over "
             f"seeds (sample std, n - 1) of evaluate.py's primary metric in its first mode, in %. Category rows: "
             f"each seed's own category averages (results.json's `category_macro`), mean ± std.", ""]
    by_cat: dict[str, list[str]] = {}
    for t, spec in rec["tasks"].items():
        by_cat.setdefault(spec["category"], []).append(t)
    for cat, tasks in by_cat.items():
        lines += [f"### {cat}", "", "| task | mode | metric | " + " | ".join(models) + " | chance |",
                  "|---|---|---|" + "---|" * (len(models) + 1)]
        for t in tasks:
            spec = rec["tasks"][t]
            cells = []
            for m in models:
                v = spec["models"][m]
                cells.append("skipped" if v["skipped"] and not v["values"] else
                             fmt_task_cell(v["values"], spec["metric"], n))
            arrow = " (lower is better)" if spec["lower_is_better"] else ""
            chance = f"{100 * spec['chance']:.1f}" if isinstance(spec["chance"], (int, float)) else "-"
            lines.append(f"| {t} | {spec['mode']} | {spec['metric']}{arrow} | " + " | ".join(cells) + f" | {chance} |")
        if cat in rec["categories"]:
            cells = [fmt_task_cell(rec["categories"][cat][m]["values"], "acc", n) for m in models]
            lines.append("| **category average** | | primary | " + " | ".join(cells) + " | |")
        lines.append("")
    pr = rec["probes"]
    lines += ["### Probes of the pretraining step (pretrain.py's summary.json, detail 11)", "",
              "| probe | base | SFT |", "|---|---|---|"]
    for k in pr["pretrain"]:
        kind = "f3" if k == "val_loss" else "rate"
        cells = [fmt_mean_std(pr[s][k]["mean"], pr[s][k]["std"], kind) if k in pr[s] else "-"
                 for s in ("pretrain", "sft")]
        note = f" (chance {100 * pr['chance_acc']:.0f}%)" if k.endswith("_acc") and pr.get("chance_acc") else ""
        lines.append(f"| {k}{note} | " + " | ".join(cells) + " |")
    steps = list(dict.fromkeys(s for w in rec["wall_time_s"] for s in w["steps"]))
    lines += ["", "### Wall time per seed (s)", "", "| run | " + " | ".join(steps) + " | total |",
              "|---|" + "---|" * (len(steps) + 1)]
    for w in rec["wall_time_s"]:
        total = f"{w['total']:.0f}" if w["total"] else "-"
        lines.append(f"| {w['run']} | " + " | ".join(f"{w['steps'].get(s, 0):.0f}" for s in steps) + f" | {total} |")
    return "\n".join(lines) + "\n"


def seeds_main(run_dirs: list[Path], prefix: Path) -> dict:
    rec = aggregate_seeds(run_dirs)
    write_outputs(prefix, seeds_markdown(rec), rec)
    tasks = [t for t, s in rec["tasks"].items() if any(v["mean"] is not None for v in s["models"].values())
             and s["metric"] not in NON_FRACTION]
    # bar labels name the metric, and say when lower is better (toxicity rates are drawn as measured)
    label = {t: f"{t}\n{s['metric']}" + (" (lower is better)" if s["lower_is_better"] else "")
             for t, s in rec["tasks"].items()}
    table = {"models": rec["models"], "tasks": [label[t] for t in tasks],
             "values": {m: {label[t]: (rec["tasks"][t]["models"][m]["mean"], rec["tasks"][t]["models"][m]["std"])
                            for t in tasks} for m in rec["models"]},
             "chance": {label[t]: rec["tasks"][t]["chance"] for t in tasks},
             "categories": {label[t]: rec["tasks"][t]["category"] for t in tasks}}
    _plot("plot_eval_bars", table, Path(f"{prefix}.png"),
          f"base / SFT / PPO, mean ± std over {len(run_dirs)} training seeds (primary metric of each task, %)")
    return rec


# ----------------------------------------------------------------------------------------------------------------
# ablations: PPO variants over seeds, each against its comparison run


def seed_dirs(variant_dir: Path) -> list[Path]:
    """The finished seed runs of a variant (summary.json with a final block), by seed number."""
    dirs = [d for d in variant_dir.glob("seed*") if d.name[4:].isdigit()]
    done = []
    for d in sorted(dirs, key=lambda d: int(d.name[4:])):
        s = d / "summary.json"
        if s.is_file() and "final" in _read_json(s):
            done.append(d)
    return done


def run_measures(d: Path) -> dict[str, float | None]:
    """The MEASURES of one run, plus `task:NAME` (evaluate.py's primary metric) where it was evaluated."""
    s = _read_json(d / "summary.json")
    out = {k: get(s) for k, (_, _, get) in MEASURES.items()}
    out["time_s"] = s.get("time_s")
    if (d / "evaluate/results.json").is_file():
        r = _read_json(d / "evaluate/results.json")
        name = next(iter(r["models"]))
        for t, spec in primary_metrics(r).items():
            out[f"task:{t}"] = r["results"][name][t].get(spec["mode"], {}).get(spec["metric"])
    return out


def config_diff(a: Path, b: Path) -> dict[str, tuple]:
    """The ppo_rlhf.py flags in which run a differs from run b (its config.json), minus per-run paths and seeds."""
    ca, cb = _read_json(a / "config.json"), _read_json(b / "config.json")
    skip = ("out", "seed", "resume")
    return {k: (ca.get(k), cb.get(k)) for k in ca if k not in skip and ca.get(k) != cb.get(k)}


def aggregate_ablations(root: Path) -> dict:
    rec: dict = {"root": str(root), "level": LEVEL, "variants": {}, "comparisons": [], "base": {}, "notes": []}
    runs: dict[str, list[dict]] = {}
    for v, (baseline, what) in VARIANTS.items():
        dirs = seed_dirs(root / v)
        runs[v] = [run_measures(d) for d in dirs]
        keys = list(dict.fromkeys(k for r in runs[v] for k in r))
        stats = {k: dict(zip(("mean", "std"), mean_std([r.get(k) for r in runs[v]])),
                         values=[r.get(k) for r in runs[v]]) for k in keys}
        diff = {}
        ref = baseline or ("default" if v != "default" else None)
        if dirs and ref and seed_dirs(root / ref):
            diff = config_diff(dirs[0], seed_dirs(root / ref)[0])
        alias = (root / v).resolve().name if (root / v).is_symlink() else None  # rm_same -> default
        rec["variants"][v] = {"baseline": baseline, "what": what, "alias_of": alias, "seeds": [d.name for d in dirs],
                              "runs": [str(d) for d in dirs], "flags_vs": ref, "flags": diff, "measures": stats}
    default_dirs = seed_dirs(root / "default")
    if default_dirs:  # the base model as every default run measured it before training (same seed, same prompts)
        base_runs = [_read_json(d / "summary.json")["base"] for d in default_dirs]
        base_get = {"red_team_toxicity": "toxicity_rate/red_team", "general_toxicity": "toxicity_rate/general",
                    "reward": "reward", "kl": "kl", "eos_rate": "eos_rate", "length": "length",
                    "corpus_loss": "corpus_loss", "reward_general": "reward/general"}
        rec["base"] = {k: dict(zip(("mean", "std"), mean_std([b.get(key) for b in base_runs])))
                       for k, key in base_get.items()}
    if (root / "base_eval/results.json").is_file():
        r = _read_json(root / "base_eval/results.json")
        name = next(iter(r["models"]))
        for t, spec in primary_metrics(r).items():
            rec["base"][f"task:{t}"] = {"mean": r["results"][name][t].get(spec["mode"], {}).get(spec["metric"]),
                                        "std": None}
    for v, (baseline, _) in VARIANTS.items():
        if baseline is None:
            continue
        mine, theirs = rec["variants"][v]["measures"], rec["variants"][baseline]["measures"]
        keys = [k for k in mine if k != "time_s" and k in theirs]
        for k in keys:
            a = [x for x in rec["variants"][v]["measures"][k]["values"] if x is not None]
            b = [x for x in rec["variants"][baseline]["measures"][k]["values"] if x is not None]
            comparable = not (k in RM_DEPENDENT and rec["variants"][v]["flags"].get("reward_model"))
            ci = welch_ci(a, b) if comparable else None
            rec["comparisons"].append({
                "variant": v, "baseline": baseline, "measure": k, "variant_mean": mean_std(a)[0],
                "variant_std": mean_std(a)[1], "baseline_mean": mean_std(b)[0], "baseline_std": mean_std(b)[1],
                "n": [len(a), len(b)], "ci": ci,
                "verdict": verdict(ci) if comparable else "not comparable (each run scored by its own RM)"})
    if (root / "rm_large_model/params.json").is_file():  # written by bench/ablate_ppo.sh
        rec["notes"].append({"rm_large_model/params.json": _read_json(root / "rm_large_model/params.json")})
    if (root / "rm_scaled/config.json").is_file():  # written by bench/scale_reward_model.py
        c = _read_json(root / "rm_scaled/config.json")
        rec["notes"].append({"rm_scaled/config.json": {k: c.get(k) for k in ("score_scale_factor", "scaled_from",
                                                                               "reward_mean", "reward_std")}})
    return rec


def _measure_kind(k: str) -> tuple[str, str]:
    if k.startswith("task:"):
        return k[5:], "rate"
    label, kind, _ = MEASURES[k]
    return label, kind


def ablations_markdown(rec: dict) -> str:
    V = rec["variants"]
    lines = ["# ICE-GRT ablations of ppo_rlhf.py over seeds", "",
             f"Runs under `{rec['root']}`, one folder per variant and seed (`ppo_rlhf.py --seed N`); every run "
             f"measures the base model first with its seed, so each variant has its own baseline. Cells: mean ± std "
             f"over seeds (sample std) of the held-out figures of summary.json; the RM reward is the run's own "
             f"reward model's raw score. Differences: Welch's {100 * rec['level']:.0f}% interval.", "",
             "| variant | seeds | " + " | ".join(MEASURES[k][0] for k in MAIN_COLUMNS) + " | time (s) |",
             "|---|---|" + "---|" * (len(MAIN_COLUMNS) + 1)]
    if rec["base"]:
        b = rec["base"]
        cells = [fmt_mean_std(b[k]["mean"], b[k]["std"], MEASURES[k][1]) if k in b else "-" for k in MAIN_COLUMNS]
        lines.append(f"| base model (default runs, before PPO) | {len(V['default']['seeds'])} | " + " | ".join(cells)
                     + " | |")
    for v, info in V.items():
        m = info["measures"]
        if not info["seeds"]:
            lines.append(f"| {v} | 0 | not measured |" + " |" * len(MAIN_COLUMNS))
            continue
        cells = [fmt_mean_std(m[k]["mean"], m[k]["std"], MEASURES[k][1]) if k in m else "-" for k in MAIN_COLUMNS]
        t = m.get("time_s", {}).get("mean")
        name = f"{v} (= {info['alias_of']})" if info["alias_of"] else v
        lines.append(f"| {name} | {len(info['seeds'])} | " + " | ".join(cells) + f" | {fmt_value(t, 'f0')} |")
    lines += ["", "What each variant changes (ppo_rlhf.py flags that differ from the run in brackets, from the runs' "
              "config.json):", ""]
    for v, info in V.items():
        flags = ", ".join(f"`{k}` {a!r} (vs {b!r})" for k, (a, b) in info["flags"].items()) or "-"
        lines.append(f"- **{v}**: {info['what']}" + (f" [{info['flags_vs']}]: {flags}" if info["flags_vs"] else ""))
    for note in rec["notes"]:
        for name, d in note.items():
            if name.endswith("params.json"):
                lines.append(f"- rm_large's reward model: {d['rm_params']:,} parameters = {d['ratio']:.2f}x the "
                             f"policy's {d['policy_params']:,} ({d['rm']})")
            else:
                lines.append(f"- raw_large_*: scores x{d.get('score_scale_factor')} (`{name}`: reward_mean "
                             f"{d.get('reward_mean'):+.2f}, reward_std {d.get('reward_std'):.2f})")
    task_keys = list(dict.fromkeys(k for info in V.values() for k in info["measures"] if k.startswith("task:")))
    if task_keys:
        lines += ["", "### General skills after PPO (evaluate.py, primary metric, %)", "",
                  "| model | seeds | " + " | ".join(k[5:] for k in task_keys) + " |",
                  "|---|---|" + "---|" * len(task_keys)]
        if any(k in rec["base"] for k in task_keys):
            lines.append("| base model | 1 | " + " | ".join(fmt_mean_std(rec["base"].get(k, {}).get("mean"), None,
                                                                         "rate") for k in task_keys) + " |")
        for v, info in V.items():
            m = info["measures"]
            if any(k in m for k in task_keys) and not info["alias_of"]:
                lines.append(f"| {v} | {len(info['seeds'])} | " + " | ".join(
                    fmt_mean_std(m[k]["mean"], m[k]["std"], "rate") if k in m else "-" for k in task_keys) + " |")
    lines += ["", f"### Each variant against its comparison run (difference of means, {100 * rec['level']:.0f}% "
              f"Welch interval)", "", "| variant | vs | figure | variant | comparison | difference [95% CI] | "
              "verdict |", "|---|---|---|---|---|---|---|"]
    for c in rec["comparisons"]:
        label, kind = _measure_kind(c["measure"])
        diff = fmt_diff(c["ci"], kind) if c["ci"] else "-"
        lines.append(f"| {c['variant']} | {c['baseline']} | {label} | "
                     f"{fmt_mean_std(c['variant_mean'], c['variant_std'], kind)} | "
                     f"{fmt_mean_std(c['baseline_mean'], c['baseline_std'], kind)} | {diff} | {c['verdict']} |")
    return "\n".join(lines) + "\n"


def ablations_main(root: Path, prefix: Path) -> dict:
    rec = aggregate_ablations(root)
    write_outputs(prefix, ablations_markdown(rec), rec)

    def metrics(names: list[str]) -> dict[str, list[Path]]:
        runs = {v: [Path(d) / "metrics.jsonl" for d in rec["variants"].get(v, {}).get("runs", [])] for v in names}
        return {v: [p for p in ps if p.is_file()] for v, ps in runs.items() if any(p.is_file() for p in ps)}
    # three pictures, because the iteration counts (long_*) and the reward units (raw_large_*, x factor) differ
    short = [v for v in VARIANTS if not v.startswith(("long_", "raw_large_")) and v != "rm_same"]
    for names, suffix, title in ((short, "", "PPO ablations (default length, policy-scale RMs)"),
                                 (["long_default", "long_kl_off"], "_long", "KL-Control, long runs"),
                                 (["raw_large_norm_fixed", "raw_large_norm_off"], "_raw", "RM scores x factor")):
        runs = metrics(names)
        if runs:
            _plot("plot_ppo_runs", runs, Path(f"{prefix}{suffix}.png"), title)
    return rec


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("seeds", help="base / SFT / PPO table over seed folders of pipeline.sh")
    s.add_argument("runs", nargs="+", type=Path, help="one pipeline.sh output folder per seed")
    s.add_argument("--out", type=Path, default=Path("out/bench/seeds"), help="PREFIX for .md, .json, .png")
    a = sub.add_parser("ablations", help="PPO variants over seeds, with Welch intervals against comparison runs")
    a.add_argument("root", type=Path, help="folder with <variant>/seed<N>/ runs of ppo_rlhf.py")
    a.add_argument("--out", type=Path, default=Path("out/bench/ablate_ppo"), help="PREFIX for .md, .json, .png")
    args = p.parse_args(argv)
    if args.cmd == "seeds":
        return seeds_main(args.runs, args.out)
    return ablations_main(args.root, args.out)


if __name__ == "__main__":
    main()
