#!/usr/bin/env bash
# The whole recipe over several training seeds: `bash pipeline.sh` once per seed on one toy world, then the base /
# SFT / PPO table as mean ± std over the seeds (bench/aggregate.py seeds).
#
#   bash bench/seeds.sh                  # seeds 1 2 3 -> out/seeds/seed{1,2,3}; table out/bench/seeds.{md,json,png}
#   SEEDS="1 2 3 4 5" bash bench/seeds.sh
#   SKIP_DONE=1 bash bench/seeds.sh      # reuse the seeds whose run finished (seed.json + evaluate/results.json)
#   SMOKE=1 bash bench/seeds.sh          # the same at `pipeline.sh --smoke` sizes (~40 s a seed): out/seeds_smoke
#   TABLE_ONLY=1 bash bench/seeds.sh     # only (re)write the table from finished seeds
#
# The toy world is built once, `python data/toyworld.py --out $OUT/toy` (--smoke: --size tiny), and seed N runs
# `SEED=N WORLD=$OUT/toy OUT=$OUT/seedN bash pipeline.sh`: every step gets `--seed N` (the base model's init and
# data order, the SFT data order, the reward model's head init and data order, the PPO rollouts, the evaluation's
# sampling), nothing else changes, and no step rebuilds the world. PRETRAIN_ARGS, SFT_ARGS, RM_ARGS, PPO_ARGS and
# EVAL_ARGS pass through to every seed. After each seed the script reads the steps' config.json back and stops
# unless every step ran with --seed N on $OUT/toy. Wall time per seed: $OUT/seedN/seed.json.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
    OUT=${OUT:-out/seeds_smoke}
    MODE=--smoke
    SIZE=tiny
    BENCH_OUT=${BENCH_OUT:-$OUT/seeds}  # smoke tables stay next to the smoke runs
else
    OUT=${OUT:-out/seeds}
    MODE=default
    SIZE=default
    BENCH_OUT=${BENCH_OUT:-out/bench/seeds}
fi
read -r -a SEED_LIST <<< "${SEEDS:-1 2 3}"
mkdir -p "$OUT"

check_seed_run() {  # check_seed_run RUN_DIR SEED WORLD: every step ran with --seed SEED on WORLD
    python - "$@" <<'PY'
import json, sys
from pathlib import Path
run, seed, world = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]).resolve()
for step in ("pretrain", "sft", "reward_model", "ppo", "evaluate"):
    cfg = json.loads((run / step / "config.json").read_text())
    if cfg.get("seed") != seed:
        sys.exit(f"seeds.sh: {run / step} ran with seed {cfg.get('seed')}, not {seed}: does pipeline.sh pass SEED on?")
toy = json.loads((run / "evaluate/config.json").read_text())["toy_dir"]
if Path(toy).resolve() != world:
    sys.exit(f"seeds.sh: {run} used the world {toy}, not {world}: does pipeline.sh honour WORLD?")
PY
}

if [ "${TABLE_ONLY:-0}" != 1 ]; then
    # a fresh run builds the world anew; SKIP_DONE keeps the one the finished seeds used
    if [ "${SKIP_DONE:-0}" != 1 ] || [ ! -f "$OUT/toy/card.json" ]; then
        echo "=== the world of every seed: python data/toyworld.py --size $SIZE --out $OUT/toy"
        python data/toyworld.py --size "$SIZE" --out "$OUT/toy"
    fi
    for N in "${SEED_LIST[@]}"; do
        dir=$OUT/seed$N
        if [ "${SKIP_DONE:-0}" = 1 ] && [ -f "$dir/seed.json" ] && [ -f "$dir/evaluate/results.json" ]; then
            echo "=== seed $N: done already ($dir)"
            continue
        fi
        echo "=== seed $N: SEED=$N WORLD=$OUT/toy OUT=$dir bash pipeline.sh $MODE (log $dir.log)"
        t=$SECONDS
        SEED=$N WORLD=$OUT/toy OUT=$dir bash pipeline.sh "$MODE" > "$dir.log" 2>&1 \
            || { tail -20 "$dir.log"; echo "seeds.sh: seed $N failed (log: $dir.log)" >&2; exit 1; }
        wall=$((SECONDS - t))
        check_seed_run "$dir" "$N" "$OUT/toy"
        printf '{"seed": %s, "wall_s": %s, "smoke": %s, "world": "%s"}\n' "$N" "$wall" \
            "$([ "$SMOKE" = 1 ] && echo true || echo false)" "$OUT/toy" > "$dir/seed.json"
        echo "seed $N: ${wall}s ($(tr '\n' ' ' < "$dir/pipeline_times.txt"))"
    done
fi

runs=()
for N in "${SEED_LIST[@]}"; do
    if [ -f "$OUT/seed$N/evaluate/results.json" ]; then runs+=("$OUT/seed$N"); else echo "seed $N: not finished"; fi
done
[ ${#runs[@]} -gt 0 ] || { echo "seeds.sh: no finished seed under $OUT; run without TABLE_ONLY=1" >&2; exit 1; }
python bench/aggregate.py seeds "${runs[@]}" --out "$BENCH_OUT"
