#!/usr/bin/env bash
# The recipe end to end, in the order of the Mistral-Plus paper: toy world -> base model -> SFT baseline (the
# comparison the paper argues against) -> harmless reward model -> PPO directly on the base model -> the
# evaluation table of base / SFT / PPO side by side.
#
#   bash pipeline.sh            # the README's main command (2 CPU cores; see README for measured times)
#   bash pipeline.sh --smoke    # every step for a few iterations (< 1 minute); run by tests/test_pipeline.py
#
# Outputs: data/toy/ (the world; --smoke: $OUT/toy), $OUT/pretrain/final (base model), $OUT/sft/final (SFT
# baseline), each run folder with config.json, metrics.jsonl and summary.json. OUT defaults to out (--smoke:
# out/smoke). Then $OUT/reward_model/final, $OUT/ppo/final and $OUT/evaluate/results.md. Extra flags after the
# mode are ignored; set PRETRAIN_ARGS / SFT_ARGS / RM_ARGS / PPO_ARGS / EVAL_ARGS to override step flags.
set -euo pipefail
cd "$(dirname "$0")"

MODE=${1:-default}
# SEED: one training seed for every step (pretrain, SFT, RM, PPO, evaluate); the world is the same for all seeds.
# WORLD: an existing toy world to use instead of building one (bench/seeds.sh builds it once for all seeds).
SEED=${SEED:-}
SEEDS_ARGS=()
if [ -n "$SEED" ]; then SEEDS_ARGS=(--seed "$SEED"); fi
BUILD_WORLD=1
if [ -n "${WORLD:-}" ]; then BUILD_WORLD=0; fi
if [ "$MODE" = "--smoke" ]; then
    OUT=${OUT:-out/smoke}
    WORLD=${WORLD:-$OUT/toy}
    SIZE=tiny
    # a 30K-parameter model, a handful of steps: checks the plumbing, not the learning
    PRE=(--vocab_size 400 --hidden_size 32 --num_hidden_layers 2 --num_attention_heads 4 --num_key_value_heads 2
         --intermediate_size 64 --seq_len 64 --batch_size 4 --max_steps 3 --log_interval 1 --eval_batches 1
         --probe_prompts 4)
    SFT=(--max_steps 3 --batch_size 4 --log_interval 1 --eval_batches 1 --probe_prompts 4)
    RM_TRAIN="$WORLD/preference/train.jsonl"
    RM=(--batch_size 16 --log_every 1 --eval_every 0 --norm_pairs 16)
    PPO=(--total_iters 2 --rollout_batch_size 4 --num_minibatches 1 --ppo_epochs 1 --max_new_tokens 8
         --eval_n 8 --eval_corpus_docs 8 --save_every 0)
    EVAL=(--limit 4)
else
    OUT=${OUT:-out}
    WORLD=${WORLD:-data/toy}
    SIZE=default
    PRE=()
    # SFT baseline, ordinary settings: 2 epochs of the 2,000 SFT examples (250 steps of 16), peak LR 3e-4 = a
    # tenth of the pretraining peak, cosine with 10 warmup steps, loss on response tokens only (pretrain.py
    # detail 8). Not tuned on the evaluation.
    SFT=(--lr 3e-4 --max_steps 250 --warmup_steps 10 --batch_size 16 --eval_interval 250 --log_interval 50)
    RM_TRAIN="$WORLD/preference/train.jsonl:0.25"  # a quarter of the pairs already reaches the noise ceiling
    RM=()
    PPO=()
    EVAL=()
fi
read -r -a PRE_EXTRA <<< "${PRETRAIN_ARGS:-}"
read -r -a SFT_EXTRA <<< "${SFT_ARGS:-}"
read -r -a RM_EXTRA <<< "${RM_ARGS:-}"
read -r -a PPO_EXTRA <<< "${PPO_ARGS:-}"
read -r -a EVAL_EXTRA <<< "${EVAL_ARGS:-}"

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

if [ "$BUILD_WORLD" = 1 ]; then timed toyworld python data/toyworld.py --size "$SIZE" --out "$WORLD"; fi
timed pretrain python pretrain.py --data "$WORLD/corpus/train.jsonl" --out "$OUT/pretrain" \
    ${SEEDS_ARGS[@]+"${SEEDS_ARGS[@]}"} ${PRE[@]+"${PRE[@]}"} ${PRE_EXTRA[@]+"${PRE_EXTRA[@]}"}
timed sft python pretrain.py --sft --init "$OUT/pretrain/final" --data "$WORLD/sft/train.jsonl" \
    --out "$OUT/sft" ${SEEDS_ARGS[@]+"${SEEDS_ARGS[@]}"} ${SFT[@]+"${SFT[@]}"} ${SFT_EXTRA[@]+"${SFT_EXTRA[@]}"}

timed reward_model python reward_model.py --init "$OUT/pretrain/final" \
    --train_files "$RM_TRAIN" --test_files "$WORLD/preference/test.jsonl" \
    --out "$OUT/reward_model" ${SEEDS_ARGS[@]+"${SEEDS_ARGS[@]}"} ${RM[@]+"${RM[@]}"} ${RM_EXTRA[@]+"${RM_EXTRA[@]}"}
# Mistral-Plus: PPO starts from the *base* model, not from the SFT one
timed ppo python ppo_rlhf.py --actor "$OUT/pretrain/final" --reward_model "$OUT/reward_model/final" \
    --prompts "$WORLD/prompts/train.jsonl#red_team" "$WORLD/prompts/train.jsonl#general" \
    --eval_prompts "$WORLD/prompts/test.jsonl" --eval_corpus "$WORLD/corpus/valid.jsonl" \
    --ptx_data "$WORLD/corpus/train.jsonl" --toxic_lexicon "$WORLD/card.json" --out "$OUT/ppo" \
    ${SEEDS_ARGS[@]+"${SEEDS_ARGS[@]}"} ${PPO[@]+"${PPO[@]}"} ${PPO_EXTRA[@]+"${PPO_EXTRA[@]}"}
timed evaluate python evaluate.py --model base="$OUT/pretrain/final" --model sft="$OUT/sft/final" \
    --model ppo="$OUT/ppo/final" --judge "$OUT/reward_model/final" --toy_dir "$WORLD" \
    --out "$OUT/evaluate" ${SEEDS_ARGS[@]+"${SEEDS_ARGS[@]}"} ${EVAL[@]+"${EVAL[@]}"} \
    ${EVAL_EXTRA[@]+"${EVAL_EXTRA[@]}"}

# the base vs SFT measurements of the pretraining step, read back from the runs' summary.json
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
print(f"pipeline: base {out}/pretrain/final, SFT {out}/sft/final, RM {out}/reward_model/final, "
      f"PPO {out}/ppo/final; evaluation table {out}/evaluate/results.md")
EOF
cat "$OUT/evaluate/results.md"
