"""Pictures of the runs: PPO training curves from ppo_rlhf.py's metrics.jsonl, evaluation bars from evaluate.py.

matplotlib is optional: no script requires it. Without it every function prints one info line and returns None,
so a training run never fails for want of a picture. ppo_rlhf.py writes <out>/curves.png and evaluate.py writes
<out>/results.png by themselves; compare runs (the default run and its ablations, several seeds each) with

    python plots.py out/bench/ablate_ppo.png default=out/ablate_ppo/default/metrics.jsonl \\
        kl_control_off=out/ablate_ppo/kl_control_off/metrics.jsonl      # LABEL=RUN1.jsonl,RUN2.jsonl for seeds

Details:
 1. One Figure object per picture, no pyplot: no global figure state and no GUI backend, so it works headless
    and in a process that plots many times (matplotlib's "Embedding in a web application server" example).
 2. Several seeds of one run: the mean per iteration as a line and the min-max band over the seeds (with two or
    three seeds a min-max band is what was measured; a std band would pretend to more).
 3. Held-out evaluations (ppo_rlhf.py's rows with "eval": the base model at iteration 0, the final policy) are
    markers on the panel of the matching rollout statistic; the rollouts and the held-out prompts differ, so a
    marker need not sit on the line.
 4. PNGs are written atomically (a temporary file in the same folder, then os.replace): a reader never sees half
    a picture.
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

from common import write_bytes_atomic

# (panel title, per-iteration key of the rollouts, held-out eval key) -- the figures ppo_rlhf.py logs every
# iteration (its "it N | score ... | kl ... | eos ... | len ... | tox ..." line) and their held-out counterparts
PPO_PANELS = [
    ("RM reward", "objective/scores", "eval/reward"),
    ("KL to the reference (nats/seq)", "objective/kl", "eval/kl"),
    ("toxicity rate (held-out: red-team)", "val/toxicity_rate", "eval/toxicity_rate/red_team"),
    ("EOS rate", "val/num_eos_tokens", "eval/eos_rate"),
    ("response length (tokens)", "val/response_length", "eval/length"),
    ("LM loss on the corpus (PPO-ptx)", "loss/ptx_avg", "eval/corpus_loss"),
]
_WARNED = False


def _figure_class():
    """matplotlib's Figure (detail 1), or None with one info line when matplotlib is not installed."""
    global _WARNED
    try:
        from matplotlib.figure import Figure
    except ImportError:
        if not _WARNED:
            print("plots: matplotlib not installed, pictures skipped (pip install matplotlib)", flush=True)
            _WARNED = True
        return None
    return Figure


def _save(fig, out_png: Path) -> Path:
    """Detail 4: render into memory, then one atomic write next to the target."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_bytes_atomic(out_png, buf.getvalue())
    return out_png


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


# ----------------------------------------------------------------------------------------------------------
# PPO curves


def read_ppo_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(per-iteration rows, held-out eval rows) of one metrics.jsonl; a missing file or a torn line is skipped."""
    train, evals = [], []
    if not Path(path).is_file():
        return train, evals
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a run killed mid-write leaves a torn last line
            continue
        if isinstance(row, dict) and "iter" in row:
            (evals if "eval" in row else train).append(row)
    return train, evals


def seed_stats(series: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Detail 2: iterations, and per iteration the mean, min and max over the seeds that logged it."""
    iters = sorted(set().union(*series)) if series else []
    mean, lo, hi = [], [], []
    for it in iters:
        xs = [s[it] for s in series if it in s]
        mean.append(sum(xs) / len(xs))
        lo.append(min(xs))
        hi.append(max(xs))
    return iters, mean, lo, hi


def _series(rows: list[dict], key: str) -> dict[int, float]:
    out = {}
    for r in rows:
        v = _number(r.get(key))
        if v is not None:
            out[int(r["iter"])] = v  # a repeated iteration (a resumed run) keeps its last row
    return out


def plot_ppo_runs(runs: dict[str, list[Path]], out_png: Path, title: str = "") -> Path | None:
    """One figure of PPO curves, every run on every panel: label -> metrics.jsonl paths (one per seed)."""
    Figure = _figure_class()
    if Figure is None:
        return None
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    data = {label: [read_ppo_metrics(p) for p in paths] for label, paths in runs.items()}
    # only panels some run has data for: an ablation that switches a loss off drops its curve, not the figure
    panels = [p for p in PPO_PANELS if any(_series(tr, p[1]) or _series(ev, p[2])
                                           for seeds in data.values() for tr, ev in seeds)]
    if not panels:
        print(f"plots: no per-iteration rows in {sorted(str(p) for ps in runs.values() for p in ps)}; "
              f"{out_png} not written", flush=True)
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.3 * nrows + 0.8))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(data))]
    # every run evaluates the same base model at iteration 0: dodge the runs' markers sideways so none hides
    span = max([int(r["iter"]) for seeds in data.values() for tr, ev in seeds for r in tr + ev] + [1])
    dodge = [(k - (len(data) - 1) / 2) * 0.012 * span for k in range(len(data))]
    handles = []
    for (label, seeds), color, dx in zip(data.items(), colors, dodge):
        n = len([s for s in seeds if s[0] or s[1]])
        handles.append(Line2D([], [], color=color, label=label + (f" ({n} seeds, min-max band)" if n > 1 else "")))
        for ax, (_, key, eval_key) in zip(axes, panels):
            iters, mean, lo, hi = seed_stats([s for s in (_series(tr, key) for tr, _ in seeds) if s])
            if iters:
                ax.plot(iters, mean, color=color, lw=1.5)
                if n > 1:
                    ax.fill_between(iters, lo, hi, color=color, alpha=0.2, lw=0)
            iters, mean, lo, hi = seed_stats([s for s in (_series(ev, eval_key) for _, ev in seeds) if s])
            if iters:  # detail 3
                # max(0, .): the mean of equal values can round a hair past them
                err = [[max(0.0, m - a) for m, a in zip(mean, lo)], [max(0.0, b - m) for m, b in zip(mean, hi)]]
                ax.errorbar([it + dx for it in iters], mean, yerr=err if n > 1 else None, color=color, marker="D",
                            ms=5, ls="none", mec="black", mew=0.6, capsize=2)
    for ax, (name, key, eval_key) in zip(axes, panels):
        ax.set_title(f"{name}\n{key}; ◆ {eval_key}", fontsize=9)
        ax.set_xlabel("PPO iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles.append(Line2D([], [], color="grey", marker="D", mec="black", ls="none",
                          label="held-out eval (base at iteration 0, final policy)"))
    # the legend under the panels, never over the curves
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3), fontsize=8, frameon=False)
    fig_h = fig.get_figheight()  # inches: the legend's rows take about 0.17 inch each at fontsize 8
    fig.tight_layout(rect=(0, (0.1 + 0.17 * math.ceil(len(handles) / 3)) / fig_h, 1, 1 - 0.45 / fig_h if title else 1))
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


# ----------------------------------------------------------------------------------------------------------
# Evaluation bars


def bar_rows(tasks: list[str], per_row: int) -> list[list[str]]:
    """Tasks in balanced rows of at most `per_row` (one strip of 20 task groups shrinks every label to nothing once
    the picture is scaled to a page); a category cut by a row break is named on both rows."""
    n_rows = math.ceil(len(tasks) / per_row)
    size = math.ceil(len(tasks) / n_rows)
    return [tasks[i:i + size] for i in range(0, len(tasks), size)]


def plot_eval_bars(table: dict, out_png: Path, title: str = "", per_row: int = 10) -> Path | None:
    """Grouped bars, one group per task and one bar per model, in percent, with error bars and a dashed chance line.

    table = {"models": [...], "tasks": [...], "values": {model: {task: (mean, err or None)}},
             "chance": {task: float or None}, optional "categories": {task: category}}; values in [0, 1]."""
    Figure = _figure_class()
    if Figure is None:
        return None
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory

    models, cats = list(table["models"]), table.get("categories") or {}
    tasks = list(table["tasks"])
    if cats:  # grouped by category in the order categories first appear; stable within a category
        order = list(dict.fromkeys(cats.get(t, "") for t in tasks))
        tasks.sort(key=lambda t: order.index(cats.get(t, "")))
    if not tasks or not models:
        print(f"plots: no tasks or models to plot; {out_png} not written", flush=True)
        return None
    rows = bar_rows(tasks, per_row)
    chance = table.get("chance") or {}
    width = 0.8 / len(models)
    # 0.3 inch per bar and a gap: room for a category name such as "Comprehension" over a single task
    fig = Figure(figsize=(max(6.0, (0.3 * len(models) + 0.3) * max(map(len, rows)) + 2), 4.2 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, row in zip(axes, rows):
        for j, m in enumerate(models):
            xs, ys, exs, eys, errs = [], [], [], [], []
            for i, t in enumerate(row):
                mean, err = table["values"].get(m, {}).get(t) or (None, None)
                if _number(mean) is None:
                    continue
                x = i - 0.4 + width * (j + 0.5)
                xs.append(x)
                ys.append(100 * mean)
                if _number(err) is not None:
                    exs.append(x)
                    eys.append(100 * mean)
                    errs.append(100 * err)
            ax.bar(xs, ys, width, color=f"C{j % 10}", label=m)
            for x, y in zip(xs, ys):  # a measured 0 is a bar too low to see: print it, so it is not read as missing
                if y < 1.5:
                    ax.text(x, y + 0.5, f"{y:.0f}", ha="center", va="bottom", fontsize=7, color=f"C{j % 10}")
            if exs:
                ax.errorbar(exs, eys, yerr=errs, fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        for i, t in enumerate(row):
            if _number(chance.get(t)) is not None:
                ax.hlines(100 * chance[t], i - 0.45, i + 0.45, colors="black", linestyles="dashed", lw=1)
        if cats:  # a thin line between categories and the category's name above its tasks
            trans = blended_transform_factory(ax.transData, ax.transAxes)
            start = 0
            for i in range(1, len(row) + 1):
                if i == len(row) or cats.get(row[i], "") != cats.get(row[start], ""):
                    if i < len(row):
                        ax.axvline(i - 0.5, color="grey", lw=0.6)
                    ax.text((start + i - 1) / 2, 1.01, cats.get(row[start], ""), transform=trans, ha="center",
                            va="bottom", fontsize=8)
                    start = i
        ax.set_xticks(range(len(row)))
        ax.set_xticklabels(row, rotation=35, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_xlim(-0.6, max(map(len, rows)) - 0.4)  # every row on the scale of the longest: equal bar widths
        ax.set_ylim(0, 105)
        ax.set_ylabel("score (%)")
        ax.grid(axis="y", alpha=0.3)
    handles, _ = axes[0].get_legend_handles_labels()
    if any(_number(chance.get(t)) is not None for t in tasks):
        handles.append(Line2D([], [], color="black", ls="dashed", lw=1, label="chance"))
    # outside the axes, right of the bars: a legend never hides a bar
    axes[0].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)


# ----------------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> Path | None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or not all("=" in a for a in args[1:]):
        sys.exit("usage: python plots.py OUT.png LABEL=metrics.jsonl[,seed2/metrics.jsonl...] [LABEL=...]")
    runs = {a.partition("=")[0]: [Path(p) for p in a.partition("=")[2].split(",")] for a in args[1:]}
    missing = [str(p) for ps in runs.values() for p in ps if not p.is_file()]
    if missing:
        sys.exit(f"plots: metrics file(s) not found: {', '.join(missing)} (ppo_rlhf.py writes <out>/metrics.jsonl)")
    out = plot_ppo_runs(runs, Path(args[0]), title="PPO runs: " + ", ".join(runs))
    if out is not None:
        print(f"plots: {out}")
    return out


if __name__ == "__main__":
    main()
