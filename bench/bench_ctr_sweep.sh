#!/usr/bin/env bash
# CowClip sweep in miniature with ~1,000 optimizer steps at the largest batch (docs/cowclip_ctr.md, Results,
# "Sweep with ~1,000 steps at the largest batch").
#
# Base batch 128 (all scaling rules coincide there, s = 1), largest batch 128x = 16,384. Synthetic Criteo-like
# data, 2,097,152 train rows (= 128 x 16,384), 8 epochs: 1,024 steps at 16,384 and 131,072 at 128, 16.8M
# samples per run. Small model (MLP 64-64-64, d = 10, VOCAB embedding rows, 10K by default). Base lrs / L2 are
# cowclip_ctr.py's defaults (8e-4 dense, 1e-4 embed, 1e-5 L2), here declared as the batch-128 base
# (--base_batch 128).
#
#   bash bench/bench_ctr_sweep.sh                 # everything below (~75 min on 1 CPU thread)
#   SEEDS="1235" MID_SEEDS="" PAPER_SEEDS="" bash bench/bench_ctr_sweep.sh   # one seed, base and 128x only
#   VOCAB=200000 bash bench/bench_ctr_sweep.sh    # the harder data set (20x the embedding rows), own OUT
#   TABLE_ONLY=1 bash bench/bench_ctr_sweep.sh    # only print the table (and draw the picture) from finished runs
#   TUNE=1 bash bench/bench_ctr_sweep.sh          # the base-lr search at batch 128 (below), then stop
#   BASE="--base_lr_embed 2e-4" OUT=out/ctr_sweep1k_e2e-4 bash bench/bench_ctr_sweep.sh   # sweep from other base lrs
#
# The base-lr search (TUNE=1): batch 128, seed 1235, 8 epochs, on a second draw of the same synthetic generator
# (--synth_seed 1: its own hidden model and rows), so the test AUC of the sweep's data (--synth_seed 0) is never
# used to choose; six (lr_dense, lr_embed) pairs around the defaults, two runs at a time; the table ranks them.
#
# Three groups of runs, each group's seeds from its own variable:
#   SEEDS        base run (128) and all four rules at 128x (16,384)          (default 1235 1236 1237)
#   MID_SEEDS    all four rules at 16x, 32x, 64x (2,048 / 4,096 / 8,192)     (default 1235)
#   PAPER_SEEDS  CowClip with --clip paper (the paper's Algorithm 1) at 128x (default 1235 1236 1237)
#
# Throughput probes run first to size the plan (not rerun here; --out was deleted afterwards):
#   P="python cowclip_ctr.py --threads 1 --n_train 200000 --n_test 50000 --synth_vocab 10000 --mlp 64,64,64
#      --base_batch 128 --no-save_model --log_every 100000"
#   $P --epochs 1 --batch_size 128    # 45,940 samples/s
#   $P --epochs 3 --batch_size 16384  # 136,943 samples/s
#   $P --epochs 1 --batch_size 2048   # 131,013 samples/s
#
# Each run's summary.json (AUC, clip, clip_frac = rows clipped / present rows) is in
# $OUT/seed<S>/[plain/|paper/]<rule>_<batch>/.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
VOCAB=${VOCAB:-10000}
if [ "$VOCAB" = 10000 ]; then OUT=${OUT:-out/ctr_sweep1k}; else OUT=${OUT:-out/ctr_sweep1k_v$VOCAB}; fi
SEEDS=${SEEDS-"1235 1236 1237"}
MID_SEEDS=${MID_SEEDS-"1235"}
PAPER_SEEDS=${PAPER_SEEDS-"1235 1236 1237"}
C="python cowclip_ctr.py --sweep --threads 1 --n_train 2097152 --n_test 100000 --synth_vocab $VOCAB
   --mlp 64,64,64 --epochs 8 --base_batch 128 --log_every 100000 ${BASE:-}"

if [ -n "${TUNE:-}" ]; then
    T=${TUNE_OUT:-out/ctr_tune}
    mkdir -p "$T"
    tune() {  # $1 lr_dense, $2 lr_embed
        [ -f "$T/d$1_e$2/summary.json" ] || python cowclip_ctr.py --threads 1 --n_train 2097152 --n_test 100000 \
            --synth_vocab "$VOCAB" --mlp 64,64,64 --epochs 8 --base_batch 128 --batch_size 128 --log_every 100000 \
            --synth_seed 1 --seed 1235 --no-save_model --base_lr_dense "$1" --base_lr_embed "$2" --out "$T/d$1_e$2" \
            > "$T/d$1_e$2.log" 2>&1
    }
    (tune 8e-4 1e-4; tune 8e-4 2e-4; tune 1.6e-3 1e-4) &
    (tune 8e-4 5e-5; tune 4e-4 1e-4; tune 8e-4 4e-4) &
    wait
    python - "$T" <<'EOF'
import glob, json, os, sys
rows = []
for p in glob.glob(os.path.join(sys.argv[1], "*", "summary.json")):
    s = json.load(open(p))
    c = json.load(open(os.path.join(os.path.dirname(p), "config.json")))
    rows.append((s["auc"], c["base_lr_dense"], c["base_lr_embed"], max(h["auc"] for h in s["history"]), s["clip_frac"]))
print("| lr_dense | lr_embed | AUC after 8 epochs | best-epoch AUC | rows clipped |")
print("|---|---|---|---|---|")
for auc, d, e, best, cf in sorted(rows, reverse=True):
    print(f"| {d:g} | {e:g} | {auc:.4f} | {best:.4f} | {100 * cf:.4f}% |")
EOF
    exit 0
fi

if [ -z "${TABLE_ONLY:-}" ]; then
    for S in $SEEDS; do  # 128x first: the base run at 128 is the slow one
        $C --seed "$S" --out "$OUT/seed$S" --sweep_rules cowclip --sweep_batches 16384,128
        $C --seed "$S" --out "$OUT/seed$S/plain" --sweep_rules sqrt,linear,none --sweep_batches 16384
    done
    for S in $MID_SEEDS; do
        $C --seed "$S" --out "$OUT/seed$S" --sweep_rules cowclip --sweep_batches 2048,4096,8192
        $C --seed "$S" --out "$OUT/seed$S/plain" --sweep_rules sqrt,linear,none --sweep_batches 2048,4096,8192
    done
    for S in $PAPER_SEEDS; do
        $C --seed "$S" --out "$OUT/seed$S/paper" --sweep_rules cowclip --clip paper --sweep_batches 16384
    done
fi

# table: rule, batch, steps, AUC mean +- std over the seeds found, rows clipped (mean clip_frac)
python - "$OUT" "$VOCAB" <<'EOF'
import glob, json, os, statistics as st, sys
out, vocab = sys.argv[1], int(sys.argv[2])
runs = {}  # (rule label, batch) -> summaries over seeds
for p in sorted(glob.glob(os.path.join(out, "seed*", "**", "summary.json"), recursive=True)):
    s = json.load(open(p))
    if "sweep" in s:
        continue
    rule = s["scale_rule"] + (" (--clip paper)" if s["clip"] == "paper" else "")
    runs.setdefault((rule, s["batch_size"]), []).append(s)
if not runs:
    sys.exit(f"no finished runs under {out}")
base = [x["auc"] for x in runs.get(("cowclip", 128), [])]
mean_base = st.mean(base) if base else float("nan")


def sd(a):
    return st.stdev(a) if len(a) > 1 else float("nan")


print("| rule | batch | steps | seeds | AUC (mean ± std, per seed) | vs base | best-epoch AUC mean | rows clipped |")
print("|---|---|---|---|---|---|---|---|")
for (rule, b), ss in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    a = [x["auc"] for x in ss]
    cf = st.mean(x.get("clip_frac", 0.0) for x in ss)
    clipped = f"{100 * cf:.4f}%" if ss[0]["clip"] != "none" else "— (no clip)"
    best = st.mean(max(h["auc"] for h in x["history"]) for x in ss)
    label = "base (s = 1, all rules)" if b == 128 else rule
    delta = "" if b == 128 else f"{st.mean(a) - mean_base:+.4f}"
    spread = f"{st.mean(a):.4f} ± {sd(a):.4f} ({', '.join(f'{v:.4f}' for v in a)})" if len(a) > 1 else f"{a[0]:.4f}"
    print(f"| {label} | {b:,} | {ss[0]['steps']:,} | {len(a)} | {spread} | {delta} | {best:.4f} | {clipped} |")
bayes = next(iter(runs.values()))[0].get("bayes_auc")
print("Bayes-optimal AUC:", bayes)

# the picture (optional): AUC vs batch, one line per rule from the shared base run, seed std as error bars
try:
    from matplotlib.figure import Figure
except ImportError:
    sys.exit(0)
fig = Figure(figsize=(6.8, 4.4))
ax = fig.add_subplot()
for rule in sorted({r for r, _ in runs}):
    pts = sorted((b, [x["auc"] for x in ss]) for (r, b), ss in runs.items() if r == rule and b != 128)
    if not pts or not base:
        continue
    if len(pts) == 1:  # one batch only (--clip paper at 128x): a marker, no line through unmeasured batches
        (b, a), = pts
        ax.errorbar([b], [st.mean(a)], yerr=[sd(a) if len(a) > 1 else 0], marker="s", ms=5, capsize=3,
                    linestyle="none", label=rule)
        continue
    xs = [128] + [b for b, _ in pts]
    ys = [mean_base] + [st.mean(a) for _, a in pts]
    es = [0 if len(a) < 2 else st.stdev(a) for a in [base] + [a for _, a in pts]]
    ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3, label=rule)
ax.axhline(bayes or float("nan"), color="k", ls="--", lw=0.8, label="Bayes-optimal AUC")
ax.axhspan(mean_base - 0.001, mean_base + 0.001, color="grey", alpha=0.15, label="base ± 0.001")
ax.set_xscale("log", base=2)
ax.set_xlabel("batch size (base 128 = 1x; 16,384 = 128x with 1,024 steps)")
ax.set_ylabel("test AUC after 8 epochs")
ax.set_title(f"CowClip miniature, {vocab:,} embedding rows: AUC vs batch\n"
             "mean ± std over seeds where more than one (base, 128x); one seed at 16x-64x", fontsize=9)
ax.grid(alpha=0.3)
ax.legend(fontsize=7)
fig.tight_layout()
os.makedirs("out/bench", exist_ok=True)
png = "out/bench/ctr_sweep.png" if vocab == 10000 else f"out/bench/ctr_sweep_v{vocab}.png"
fig.savefig(png + ".tmp", format="png", dpi=120)
os.replace(png + ".tmp", png)
print("wrote", png)
EOF
