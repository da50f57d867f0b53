#!/usr/bin/env bash
# ICE-GRT ablations of ppo_rlhf.py on the toy world: the default run, then one run per named trick switched
# off, and a table of the held-out figures (markdown + JSON in out/bench/).
#
#   bash bench/ablate_ppo.sh                  # 6 toy runs (~4 min each on 2 CPU cores)
#   SKIP_DONE=1 bash bench/ablate_ppo.sh      # reuse runs that already finished (their summary.json)
#   PPO_ARGS="--total_iters 20" bash bench/ablate_ppo.sh   # extra flags for every run
#   DEFAULT_FROM=out/ppo bash bench/ablate_ppo.sh           # take the default row from an existing run
#   TABLE_ONLY=1 bash bench/ablate_ppo.sh                   # only (re)write the table from finished runs
#
# Needs the toy base model and reward model (bash pipeline.sh, or pretrain.py + reward_model.py).
# Each run evaluates the base model first (same seed, same held-out prompts), so every row has its own baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/ablate_ppo}
read -r -a EXTRA <<< "${PPO_ARGS:-}"
mkdir -p "$OUT" out/bench

run() {  # run NAME FLAGS...
    local name=$1
    shift
    if [ "${SKIP_DONE:-0}" = 1 ] && [ -f "$OUT/$name/summary.json" ] && grep -q '"final"' "$OUT/$name/summary.json"; then
        echo "=== $name: done already"
        return
    fi
    echo "=== $name: python ppo_rlhf.py --out $OUT/$name $* ${EXTRA[*]+${EXTRA[*]}}"
    python ppo_rlhf.py --out "$OUT/$name" "$@" ${EXTRA[@]+"${EXTRA[@]}"} > "$OUT/$name.log" 2>&1 \
        || { tail -20 "$OUT/$name.log"; echo "run $name failed (log: $OUT/$name.log)" >&2; exit 1; }
    tail -1 "$OUT/$name.log"
}

if [ "${TABLE_ONLY:-0}" != 1 ]; then
if [ -n "${DEFAULT_FROM:-}" ]; then  # the plain `python ppo_rlhf.py` run already made (or being made)
    ln -sfn "$(realpath "$DEFAULT_FROM")" "$OUT/default"
    echo "=== default: from $DEFAULT_FROM"
else
    run default                                                    # every ICE-GRT trick on
fi
run kl_control_off        --kl_coef 0                               # detail 3: KL-Control
run adv_norm_off          --adv_norm none                           # detail 7: Advantage Normalization
run reward_scaling_off    --reward_norm none --reward_clip 0        # detail 6: Reward Size Scaling (raw RM score)
run prompts_all_red_team  --prompts data/toy/prompts/train.jsonl#red_team --prompt_weights 1  # detail 10
run eos_penalty_off       --missing_eos_penalty 0                   # detail 12: EOS trick
run ptx_off               --ptx_coef 0                              # detail 15: PPO-ptx (on in the toy default)
fi

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
names = ["default", "kl_control_off", "adv_norm_off", "reward_scaling_off", "prompts_all_red_team",
         "eos_penalty_off", "ptx_off"]
rows, table = {}, []
head = ("| run | red-team toxicity base -> PPO | relative reduction | general toxicity | RM reward base -> PPO "
        "| KL to ref (nats/seq) | EOS rate base -> PPO | length | corpus loss change | time |")
table += [head, "|---" * 10 + "|"]
for n in names:
    p = out / n / "summary.json"
    s = json.loads(p.read_text()) if p.is_file() else {}
    if "final" not in s:  # not run (or not finished): say so rather than drop the row
        table.append(f"| {n} | not measured |" + " |" * 8)
        continue
    b, f = s["base"], s["final"]
    rows[n] = s
    rt, gt = "toxicity_rate/red_team", "toxicity_rate/general"
    red = 1 - f[rt] / b[rt] if b[rt] > 0 else float("nan")
    table.append(f"| {n} | {b[rt]:.1%} -> {f[rt]:.1%} | {red:.0%} | {b.get(gt, float('nan')):.1%} -> "
                 f"{f.get(gt, float('nan')):.1%} | {b['reward']:+.2f} -> {f['reward']:+.2f} | {f['kl']:.2f} | "
                 f"{b['eos_rate']:.0%} -> {f['eos_rate']:.0%} | {b['length']:.1f} -> {f['length']:.1f} | "
                 f"{s['corpus_loss_relative_change']:+.1%} | {s['time_s']:.0f}s |")
md = "\n".join(table)
print("\n" + md)
(Path("out/bench") / "ablate_ppo.md").write_text(md + "\n")
(Path("out/bench") / "ablate_ppo.json").write_text(json.dumps(rows, indent=2) + "\n")
print("\nwrote out/bench/ablate_ppo.md and out/bench/ablate_ppo.json")
PY
