#!/usr/bin/env bash
# The recipe end to end, in the order of the Mistral-Plus paper: toy world -> base model -> SFT baseline.
# (The reward model, PPO and evaluation steps are appended by their issues.)
#
#   bash pipeline.sh            # default budget: about 7 minutes on 2 CPU cores (the README's main command)
#   bash pipeline.sh --smoke    # every step for a few iterations (< 1 minute); run by tests/test_pipeline.py
#
# Outputs: data/toy/ (the world; --smoke: $OUT/toy), $OUT/pretrain/final (base model), $OUT/sft/final (SFT
# baseline), each run folder with config.json, metrics.jsonl and summary.json. OUT defaults to out (--smoke:
# out/smoke). Extra flags after the mode are ignored; set PRETRAIN_ARGS / SFT_ARGS to override step flags.
set -euo pipefail
cd "$(dirname "$0")"

MODE=${1:-default}
if [ "$MODE" = "--smoke" ]; then
    OUT=${OUT:-out/smoke}
    WORLD=$OUT/toy
    SIZE=tiny
    # a 30K-parameter model, a handful of steps: checks the plumbing, not the learning
    PRE=(--vocab_size 400 --hidden_size 32 --num_hidden_layers 2 --num_attention_heads 4 --num_key_value_heads 2
         --intermediate_size 64 --seq_len 64 --batch_size 4 --max_steps 3 --log_interval 1 --eval_batches 1
         --probe_prompts 4)
    SFT=(--max_steps 3 --batch_size 4 --log_interval 1 --eval_batches 1 --probe_prompts 4)
else
    OUT=${OUT:-out}
    WORLD=data/toy
    SIZE=default
    PRE=()
    # SFT baseline: a short, gentler run from the base model (response tokens only; pretrain.py detail 8)
    SFT=(--lr 1e-3 --max_steps 60 --warmup_steps 5 --batch_size 16 --eval_interval 60 --log_interval 10)
fi
read -r -a PRE_EXTRA <<< "${PRETRAIN_ARGS:-}"
read -r -a SFT_EXTRA <<< "${SFT_ARGS:-}"

T0=$SECONDS
timed() {  # timed NAME CMD...: run a step and record its wall time
    local name=$1 t=$SECONDS
    shift
    echo "=== $name: $*"
    "$@"
    echo "$name $((SECONDS - t))" >> "$OUT/pipeline_times.txt"
}
mkdir -p "$OUT"
: > "$OUT/pipeline_times.txt"

timed toyworld python data/toyworld.py --size "$SIZE" --out "$WORLD"
timed pretrain python pretrain.py --data "$WORLD/corpus/train.jsonl" --out "$OUT/pretrain" \
    ${PRE[@]+"${PRE[@]}"} ${PRE_EXTRA[@]+"${PRE_EXTRA[@]}"}
timed sft python pretrain.py --sft --init "$OUT/pretrain/final" --data "$WORLD/sft/train.jsonl" \
    --out "$OUT/sft" ${SFT[@]+"${SFT[@]}"} ${SFT_EXTRA[@]+"${SFT_EXTRA[@]}"}

# the measurements the issue asks for, base vs SFT, read back from the runs' summary.json
python - "$OUT" "$((SECONDS - T0))" <<'EOF'
import json, sys
out, total = sys.argv[1], sys.argv[2]
times = dict(line.split() for line in open(f"{out}/pipeline_times.txt"))
print(f"\n{'':28}{'base':>8}{'SFT':>8}")
rows = [("red-team toxicity (T=1)", "red_team_toxicity", "{:.0%}"), ("general toxicity (T=1)", "general_toxicity", "{:.0%}"),
        ("ends with EOS", "eos_rate", "{:.0%}"), ("knowledge acc (chance 25%)", "knowledge_acc", "{:.0%}"),
        ("arithmetic acc (chance 25%)", "arithmetic_acc", "{:.0%}")]
s = {k: json.load(open(f"{out}/{k}/summary.json")) for k in ("pretrain", "sft")}
for label, key, fmt in rows:
    print(f"{label:28}" + "".join(f"{fmt.format(s[k]['probe'][key]):>8}" for k in ("pretrain", "sft")))
print(f"{'held-out loss':28}" + "".join(f"{s[k]['val_loss']:>8.3f}" for k in ("pretrain", "sft")))
print("wall time: " + ", ".join(f"{k} {v}s" for k, v in times.items()) + f"; total {total}s")
print(f"pipeline: base model {out}/pretrain/final, SFT baseline {out}/sft/final")
EOF
