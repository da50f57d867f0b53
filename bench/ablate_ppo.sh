#!/usr/bin/env bash
# ICE-GRT ablations of ppo_rlhf.py on the toy world, several seeds per variant, each variant in a setting where
# the failure of its trick can show; then the table of bench/aggregate.py ablations (mean ± std over seeds, and
# each variant against its comparison run with a Welch 95% interval) in out/bench/ablate_ppo.{md,json,png}.
#
#   bash bench/ablate_ppo.sh                 # 11 variants x 3 seeds on the toy base model and RM (1-2 h, 2 cores)
#   SKIP_DONE=1 bash bench/ablate_ppo.sh     # reuse the runs (and the large / scaled RMs) that finished
#   SMOKE=1 bash bench/ablate_ppo.sh         # every variant at smoke sizes on the `bash pipeline.sh --smoke` models
#   TABLE_ONLY=1 bash bench/ablate_ppo.sh    # only (re)write the table from finished runs
#
# Settings (environment): SEEDS ("1 2 3"; smoke "1 2"), OUT (out/ablate_ppo), BASE (out/pretrain/final), RM
# (out/reward_model/final), WORLD (data/toy), LONG_ITERS (64), RAW_FACTOR (20), BENCH_OUT (out/bench/ablate_ppo),
# PPO_ARGS (extra ppo_rlhf.py flags for every run; not --prompts, a list flag that would add to the variants'
# sources), EVAL_TASKS ("toy_mmlu_cloze,toy_hellaswag,toy_winogrande,toy_arc_easy"), EVAL_ARGS, BIG_PRETRAIN_ARGS
# (shape and budget of rm_large's base LM), RM_ARGS (extra reward_model.py flags for rm_large's RM).
# SMOKE=1 defaults: the out/smoke models and world, OUT=out/ablate_ppo_smoke, tables in $OUT/ablate_ppo.*.
#
# Variants, each run in $OUT/<variant>/seed<N> with `ppo_rlhf.py --seed N` against the same base model and RM
# (the table compares a variant with the run in brackets):
#   default                         every ICE-GRT trick on, red-team + general prompts (ppo_rlhf.py defaults)
#   adv_norm_off [default]          detail 7 Advantage Normalization: --adv_norm none
#   eos_penalty_off [default]       detail 12 EOS trick: --missing_eos_penalty 0 (see EOS rate and length)
#   prompts_all_red_team [default]  detail 10 Appropriate Data: red-team prompts only; this one and default are
#                                   also scored by evaluate.py on EVAL_TASKS, the general skills PPO must keep
#   ptx_off [default]               detail 15 PPO-ptx: --ptx_coef 0; only with PTX_OFF=1 (not an ICE-GRT trick)
#   long_default                    the default for LONG_ITERS iterations: room to over-optimise the RM
#   long_kl_off [long_default]      detail 3 KL-Control: --kl_coef 0 at the same length (RM reward, KL, corpus loss)
#   rm_same                         = default (the policy-sized RM); a link to the default runs, not rerun
#   rm_large [rm_same]              detail 6 Reward Size Scaling, model size: a base LM 2-4x the policy's parameter
#                                   count is pretrained once (the base's corpus, tokenizer, seq_len, batch and steps,
#                                   read from its run's config.json), an RM is trained from it with the pipeline's
#                                   RM data and flags, and PPO scores with it (ppo_rlhf.py detail 6: only the
#                                   tokenizer must match; the critic starts from this RM too)
#   raw_large_norm_fixed            detail 6 Reward Size Scaling, normalisation: the RM with raw scores x RAW_FACTOR
#                                   (bench/scale_reward_model.py), --reward_norm fixed: the same normalised rewards
#   raw_large_norm_off [raw_large_norm_fixed]  the same RM, --reward_norm none --reward_clip 0: raw large scores
# Both raw_large_* runs start the critic from the policy (--critic_init policy): a critic initialised from the
# scaled RM would start at RAW_FACTOR x the raw scores in both, far from the normalised returns of the _fixed run,
# and the comparison would measure that mismatch instead of the normalisation.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
    OUT=${OUT:-out/ablate_ppo_smoke}
    BASE=${BASE:-out/smoke/pretrain/final}
    RM=${RM:-out/smoke/reward_model/final}
    WORLD=${WORLD:-out/smoke/toy}
    SEEDS=${SEEDS:-1 2}  # 2 seeds keep the ~20 smoke runs within a few minutes; Welch still has df >= 1
    LONG_ITERS=${LONG_ITERS:-3}
    BENCH_OUT=${BENCH_OUT:-$OUT/ablate_ppo}
    # pipeline.sh --smoke's PPO sizes: checks the plumbing, not the learning
    SIZE_PPO=(--total_iters 2 --rollout_batch_size 4 --num_minibatches 1 --ppo_epochs 1 --max_new_tokens 8
              --eval_n 8 --eval_corpus_docs 8 --save_every 0)
    SIZE_EVAL=(--limit 4)
    # pipeline.sh --smoke's RM step; a 2.6x-parameter LM of its base model's kind
    RM_TRAIN="$WORLD/preference/train.jsonl"
    SIZE_RM=(--batch_size 16 --log_every 1 --eval_every 0 --norm_pairs 16)
    BIG_PRETRAIN_ARGS=${BIG_PRETRAIN_ARGS:---hidden_size 48 --num_hidden_layers 3 --intermediate_size 96
        --num_attention_heads 4 --num_key_value_heads 2 --log_interval 1 --eval_batches 1 --probe_prompts 4}
else
    OUT=${OUT:-out/ablate_ppo}
    BASE=${BASE:-out/pretrain/final}
    RM=${RM:-out/reward_model/final}
    WORLD=${WORLD:-data/toy}
    SEEDS=${SEEDS:-1 2 3}
    LONG_ITERS=${LONG_ITERS:-64}
    BENCH_OUT=${BENCH_OUT:-out/bench/ablate_ppo}
    SIZE_PPO=()
    SIZE_EVAL=()
    RM_TRAIN="$WORLD/preference/train.jsonl:0.25"  # pipeline.sh's RM step
    SIZE_RM=()
    # 5.9M parameters against the base's 2.0M (3.0x)
    BIG_PRETRAIN_ARGS=${BIG_PRETRAIN_ARGS:---hidden_size 288 --num_hidden_layers 6 --intermediate_size 768}
fi
EVAL_TASKS=${EVAL_TASKS:-toy_mmlu_cloze,toy_hellaswag,toy_winogrande,toy_arc_easy}
RAW_FACTOR=${RAW_FACTOR:-20}
read -r -a SEED_LIST <<< "$SEEDS"
read -r -a EXTRA <<< "${PPO_ARGS:-}"
read -r -a EVAL_EXTRA <<< "${EVAL_ARGS:-}"
read -r -a BIG_ARGS <<< "$(echo "$BIG_PRETRAIN_ARGS" | tr '\n' ' ')"
read -r -a RM_EXTRA <<< "${RM_ARGS:-}"
BIG=$OUT/rm_large_model  # pretrain/ and reward_model/ of rm_large, params.json
SCALED=$OUT/rm_scaled  # the RM with raw scores x RAW_FACTOR
skip_done() { [ "${SKIP_DONE:-0}" = 1 ]; }

if [ "${TABLE_ONLY:-0}" != 1 ]; then
for f in "$BASE/config.json" "$RM/config.json" "$WORLD/prompts/train.jsonl"; do
    if [ ! -f "$f" ]; then
        hint="bash pipeline.sh (or set BASE, RM, WORLD)"
        [ "$SMOKE" = 1 ] && hint="bash pipeline.sh --smoke (or set BASE, RM, WORLD)"
        echo "ablate_ppo.sh: $f not found; make the base model, RM and world first: $hint" >&2
        exit 2
    fi
done
mkdir -p "$OUT"

run() {  # run VARIANT SEED FLAGS...: one ppo_rlhf.py run in $OUT/VARIANT/seedSEED
    local variant=$1 seed=$2 dir=$OUT/$1/seed$2
    shift 2
    if skip_done && [ -f "$dir/summary.json" ] && grep -q '"final"' "$dir/summary.json"; then
        echo "=== $variant seed $seed: done already"
        return
    fi
    # a variant's own --prompts (a list flag: given twice, the values would add up) and --reward_model replace
    # the defaults rather than follow them
    local prompts=(--prompts "$WORLD/prompts/train.jsonl#red_team" "$WORLD/prompts/train.jsonl#general") a
    local rm=(--reward_model "$RM")
    for a in "$@"; do
        [ "$a" = --prompts ] && prompts=()
        [ "$a" = --reward_model ] && rm=()
    done
    local cmd=(python ppo_rlhf.py --actor "$BASE" ${rm[@]+"${rm[@]}"} ${prompts[@]+"${prompts[@]}"}
               --eval_prompts "$WORLD/prompts/test.jsonl" --eval_corpus "$WORLD/corpus/valid.jsonl"
               --ptx_data "$WORLD/corpus/train.jsonl" --toxic_lexicon "$WORLD/card.json" --seed "$seed"
               --out "$dir" ${SIZE_PPO[@]+"${SIZE_PPO[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} "$@")
    rm -rf "$dir"  # a fresh run: nothing of an earlier or interrupted one is read back
    mkdir -p "$OUT/$variant"
    echo "=== $variant seed $seed: ${cmd[*]}"
    "${cmd[@]}" > "$dir.log" 2>&1 || { tail -20 "$dir.log"; echo "run $variant seed $seed failed (log: $dir.log)" >&2
                                       exit 1; }
    tail -1 "$dir.log"
}

evaluate() {  # evaluate NAME=MODEL OUT_DIR SEED: the general toy tasks of EVAL_TASKS
    if skip_done && [ -f "$2/results.json" ]; then
        return
    fi
    local cmd=(python evaluate.py --model "$1" --tasks "$EVAL_TASKS" --toy_dir "$WORLD" --out "$2" --seed "$3"
               ${SIZE_EVAL[@]+"${SIZE_EVAL[@]}"} ${EVAL_EXTRA[@]+"${EVAL_EXTRA[@]}"})
    echo "=== evaluate: ${cmd[*]}"
    "${cmd[@]}" > "$2.log" 2>&1 || { tail -20 "$2.log"; echo "evaluate failed (log: $2.log)" >&2; exit 1; }
    tail -1 "$2.log"
}

param_ratio() {  # param_ratio POLICY RM_OR_LM OUT_JSON: parameters of the second / the first; must lie in [2, 4]
    python - "$@" <<'PY'
import json, sys
sys.path.insert(0, ".")
from model import load_safetensors_dir
policy, big, out = sys.argv[1:]
count = lambda d: sum(v.numel() for k, v in load_safetensors_dir(d).items() if k != "lm_head.weight")
n_pol = sum(v.numel() for v in load_safetensors_dir(policy).values())
n_big = count(big)  # the scoring network: backbone (+ score head), never an LM head
ratio = n_big / n_pol
json.dump({"policy": policy, "rm": big, "policy_params": n_pol, "rm_params": n_big, "ratio": ratio},
          open(out, "w"), indent=2)
print(f"rm_large: {n_big:,} parameters in {big} = {ratio:.2f}x the policy's {n_pol:,} ({policy})")
if not 2 <= ratio <= 4:
    sys.exit(f"ablate_ppo.sh: rm_large's reward model is {ratio:.2f}x the policy, outside 2-4x; "
             f"change BIG_PRETRAIN_ARGS (--hidden_size, --num_hidden_layers, --intermediate_size)")
PY
}

for seed in "${SEED_LIST[@]}"; do
    run default "$seed"
    run adv_norm_off "$seed" --adv_norm none
    run eos_penalty_off "$seed" --missing_eos_penalty 0
    run prompts_all_red_team "$seed" --prompts "$WORLD/prompts/train.jsonl#red_team" --prompt_weights 1
    if [ "${PTX_OFF:-0}" = 1 ]; then run ptx_off "$seed" --ptx_coef 0; fi  # not an ICE-GRT trick: off by default
    run long_default "$seed" --total_iters "$LONG_ITERS"
    run long_kl_off "$seed" --total_iters "$LONG_ITERS" --kl_coef 0
    evaluate ppo="$OUT/default/seed$seed/final" "$OUT/default/seed$seed/evaluate" "$seed"
    evaluate ppo="$OUT/prompts_all_red_team/seed$seed/final" "$OUT/prompts_all_red_team/seed$seed/evaluate" "$seed"
done
evaluate base="$BASE" "$OUT/base_eval" "${SEED_LIST[0]}"
[ -L "$OUT/rm_same" ] || rm -rf "$OUT/rm_same"  # a folder left by an earlier layout
ln -sfn default "$OUT/rm_same"

base_budget() {  # --seq_len --batch_size --max_steps of the run that trained BASE (its run folder's config.json)
    python - "$BASE" <<'PY'
import json, sys
from pathlib import Path
base = Path(sys.argv[1])
run = json.loads((base.parent / "config.json").read_text()) if (base.parent / "config.json").is_file() else {}
flags = {"seq_len": run.get("seq_len", json.loads((base / "config.json").read_text()).get("max_position_embeddings")),
         "batch_size": run.get("batch_size"), "max_steps": run.get("max_steps")}
print(" ".join(f"--{k} {v}" for k, v in flags.items() if v is not None))
PY
}

# rm_large: a larger LM on the base model's corpus, tokenizer, context and token budget (BIG_PRETRAIN_ARGS come
# last and may change any of them), then the pipeline's RM step from it
if ! (skip_done && [ -f "$BIG/reward_model/final/config.json" ]); then
    read -r -a BUDGET <<< "$(base_budget)"
    cmd=(python pretrain.py --data "$WORLD/corpus/train.jsonl" --tokenizer "$BASE" --out "$BIG/pretrain"
         ${BUDGET[@]+"${BUDGET[@]}"} ${BIG_ARGS[@]+"${BIG_ARGS[@]}"})
    rm -rf "$BIG"
    mkdir -p "$BIG"
    echo "=== rm_large base LM: ${cmd[*]}"
    "${cmd[@]}" > "$BIG/pretrain.log" 2>&1 || { tail -20 "$BIG/pretrain.log"; exit 1; }
    param_ratio "$BASE" "$BIG/pretrain/final" "$BIG/params.json"  # fail before training the RM
    cmd=(python reward_model.py --init "$BIG/pretrain/final" --train_files "$RM_TRAIN"
         --test_files "$WORLD/preference/test.jsonl" --out "$BIG/reward_model" ${SIZE_RM[@]+"${SIZE_RM[@]}"}
         ${RM_EXTRA[@]+"${RM_EXTRA[@]}"})
    echo "=== rm_large reward model: ${cmd[*]}"
    "${cmd[@]}" > "$BIG/reward_model.log" 2>&1 || { tail -20 "$BIG/reward_model.log"; exit 1; }
    tail -1 "$BIG/reward_model.log"
fi
param_ratio "$BASE" "$BIG/reward_model/final" "$BIG/params.json"

# raw_large_*: the default RM with every raw score x RAW_FACTOR and the stored mean/std scaled alike
scaled_ok() {  # the scaled RM exists, made with RAW_FACTOR
    [ -f "$SCALED/config.json" ] && python - "$SCALED/config.json" "$RAW_FACTOR" <<'PY'
import json, sys
sys.exit(json.load(open(sys.argv[1])).get("score_scale_factor") != float(sys.argv[2]))
PY
}
if ! (skip_done && scaled_ok); then
    rm -rf "$SCALED"
    python bench/scale_reward_model.py "$RM" "$SCALED" --factor "$RAW_FACTOR"
fi

for seed in "${SEED_LIST[@]}"; do
    run rm_large "$seed" --reward_model "$BIG/reward_model/final"
    run raw_large_norm_fixed "$seed" --reward_model "$SCALED" --critic_init policy
    run raw_large_norm_off "$seed" --reward_model "$SCALED" --critic_init policy --reward_norm none --reward_clip 0
done
fi

python bench/aggregate.py ablations "$OUT" --out "$BENCH_OUT"
