#!/usr/bin/env bash
# CowClip sweep in miniature with ~1,000 optimizer steps at the largest batch (docs/cowclip_ctr.md, Results,
# "Sweep with ~1,000 steps at the largest batch").
#
# Base batch 128 (all scaling rules coincide there, s = 1), largest batch 128x = 16,384. Synthetic Criteo-like
# data, 2,097,152 train rows (= 128 x 16,384), 8 epochs: 1,024 steps at 16,384 and 131,072 at 128, 16.8M
# samples per run. Small model (MLP 64-64-64, d = 10, 10K embedding rows). Base lrs / L2 are cowclip_ctr.py's
# defaults (8e-4 dense, 1e-4 embed, 1e-5 L2), here declared as the batch-128 base (--base_batch 128).
#
#   bash bench/bench_ctr_sweep.sh                 # seeds 1235 1236 1237 (~45 min on 1 CPU thread)
#   SEEDS="1235" bash bench/bench_ctr_sweep.sh    # one seed
#   TABLE_ONLY=1 bash bench/bench_ctr_sweep.sh    # only print the table from finished runs
#
# Throughput probes run first to size the plan (not rerun here; --out was deleted afterwards):
#   P="python cowclip_ctr.py --threads 1 --n_train 200000 --n_test 50000 --synth_vocab 10000 --mlp 64,64,64
#      --base_batch 128 --no-save_model --log_every 100000"
#   $P --epochs 1 --batch_size 128    # 45,940 samples/s
#   $P --epochs 3 --batch_size 16384  # 136,943 samples/s
#   $P --epochs 1 --batch_size 2048   # 131,013 samples/s
#
# Per seed, the most important runs come first: the base run and CowClip at 128x, then sqrt, linear, none
# at 128x. Each run's summary.json (AUC, clip_frac = rows clipped / present rows) is in $OUT/seed<S>/<rule>_<batch>/
# (the plain rules under $OUT/seed<S>/plain/).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
OUT=${OUT:-out/ctr_sweep1k}
SEEDS=${SEEDS:-"1235 1236 1237"}
C="python cowclip_ctr.py --sweep --threads 1 --n_train 2097152 --n_test 100000 --synth_vocab 10000
   --mlp 64,64,64 --epochs 8 --base_batch 128 --log_every 100000"

if [ -z "${TABLE_ONLY:-}" ]; then
    for S in $SEEDS; do
        $C --seed "$S" --out "$OUT/seed$S" --sweep_rules cowclip --sweep_batches 128,16384
        $C --seed "$S" --out "$OUT/seed$S/plain" --sweep_rules sqrt,linear,none --sweep_batches 16384
    done
fi

# table: rule, batch, steps, AUC mean +- std over the seeds found, rows clipped (mean clip_frac)
python - "$OUT" <<'EOF'
import glob, json, os, statistics as st, sys
out = sys.argv[1]
runs = {}
for p in sorted(glob.glob(os.path.join(out, "seed*", "**", "summary.json"), recursive=True)):
    s = json.load(open(p))
    if "sweep" in s:
        continue
    name = os.path.basename(os.path.dirname(p))  # <rule>_<batch>
    runs.setdefault(name, []).append(s)
print("| rule | batch | steps | seeds | AUC mean ± std (per seed) | best-epoch AUC mean | rows clipped |")
print("|---|---|---|---|---|---|---|")
for name, ss in sorted(runs.items(), key=lambda kv: (int(kv[0].rsplit("_", 1)[1]), kv[0])):
    rule, b = name.rsplit("_", 1)
    a = [x["auc"] for x in ss]
    sd = st.stdev(a) if len(a) > 1 else float("nan")
    cf = st.mean(x.get("clip_frac", 0.0) for x in ss)
    clipped = f"{100 * cf:.3f}%" if ss[0]["clip"] != "none" else "— (no clip)"
    best = st.mean(max(h["auc"] for h in x["history"]) for x in ss)
    label = "base (s = 1, all rules)" if int(b) == 128 else rule
    print(f"| {label} | {int(b):,} | {ss[0]['steps']:,} | {len(a)} | {st.mean(a):.4f} ± {sd:.4f} "
          f"({', '.join(f'{v:.4f}' for v in a)}) | {best:.4f} | {clipped} |")
print("Bayes-optimal AUC:", ss[0].get("bayes_auc"))

# the picture (optional): AUC vs batch, one line per rule from the shared base run, seed std as error bars
try:
    from matplotlib.figure import Figure
except ImportError:
    sys.exit(0)
base = [x["auc"] for x in runs.get("cowclip_128", [])]
fig = Figure(figsize=(6.5, 4.2))
ax = fig.add_subplot()
for name, ss in sorted(runs.items()):
    rule, b = name.rsplit("_", 1)
    if int(b) == 128 or not base:
        continue
    a = [x["auc"] for x in ss]
    ax.errorbar([128, int(b)], [st.mean(base), st.mean(a)],
                yerr=[st.stdev(base) if len(base) > 1 else 0, st.stdev(a) if len(a) > 1 else 0],
                marker="o", capsize=3, label=f"{rule} ({len(a)} seeds)")
ax.axhline(ss[0].get("bayes_auc") or float("nan"), color="k", ls="--", lw=0.8, label="Bayes-optimal AUC")
ax.set_xscale("log", base=2)
ax.set_xlabel("batch size (base 128; 128x = 16,384 with 1,024 steps)")
ax.set_ylabel("test AUC after 8 epochs")
ax.set_title("CowClip miniature: AUC vs batch, mean ± std over seeds", fontsize=10)
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
os.makedirs("out/bench", exist_ok=True)
fig.savefig("out/bench/ctr_sweep.png.tmp", format="png", dpi=120)
os.replace("out/bench/ctr_sweep.png.tmp", "out/bench/ctr_sweep.png")
print("wrote out/bench/ctr_sweep.png")
EOF
