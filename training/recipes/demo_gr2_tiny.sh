#!/usr/bin/env bash
# The bundled demo checkpoint (gr2_policy/checkpoints/demo): scripted-expert demonstrations, then
# the GR-2 training stages on gr2-tiny, on CPU (about 4 h 20 min on 2 cores).
#
#   bash training/recipes/demo_gr2_tiny.sh [WORK]       # WORK defaults to runs/demo
#   ABLATION=1 bash training/recipes/demo_gr2_tiny.sh   # also fine-tunes without pre-training
#
# Every step resumes or is skipped when its output exists, so the script can be re-run after an
# interruption. The order matters: the tokenizer and the video pre-training saw the first 900
# demonstrations (300 per task); the extra touch demonstrations are added for fine-tuning. They
# show every block of a scene as the target (--targets all): with one drawn target per scene, a
# model could learn "this layout -> that block" from the images and ignore the instruction.
#
# Fine-tuning is a curriculum (README, "The demo model"): first touch scenes with only the target
# block left (gr2-curriculum one-block), where the block's position is the target; then a 50/50
# mix of those and the real three-block scenes, with the instruction on every token
# (--override lang_to_tokens=true) and the words text encoder (--override text_encoder=words);
# last, mostly real scenes (350 one-block + 1500 real) together with 900 recovery demonstrations
# (gr2-datagen --detour: a wrong way first, labelled only on the way back), so the closed-loop
# policy has seen its way back when it strays. That last data is trained on in four cosine
# cycles (900 steps, 2400, 1500 at a lower peak, 900 at a lower one still; the last two with
# other data seeds), then a fifth (1,800 steps) with 900 confusion demonstrations added (a
# part of the way to another block first). The model is the mean of the last four cycles'
# weights (gr2-average). The schedule grew over working sessions of 3 hours on 2 CPU cores,
# each continuing the model the one before had bundled, and the recipe replays it exactly.
set -euo pipefail
WORK=${1:-runs/demo}
BIN=${BIN:-.venv/bin}
export MUJOCO_GL=${MUJOCO_GL:-egl}
mkdir -p "$WORK"

datagen() {  # datagen TASKS N [ARGS]: the dataset holds N demonstrations of each task
    "$BIN/gr2-datagen" --tasks "$1" --episodes-per-task "$2" --out "$WORK/data" --workers 2 \
        "${@:3}"
}

# A stage whose run directory exists without a final checkpoint was interrupted: it resumes from
# its last periodic checkpoint (bit-exact). A --seed in ARGS overrides the default 0.
stage() {  # stage NAME RUN_DIR ARGS...
    local name=$1 run=$2
    shift 2
    if [ -f "$run/checkpoint/config.json" ]; then
        echo "$name: done ($run)"
        return
    fi
    local resume=()
    [ -f "$run/run.json" ] && resume=(--resume)
    "$BIN/gr2-train" "$name" --out "$run" --seed 0 --no-progress --save-every 300 \
        "${resume[@]}" "$@"
}

curriculum() {  # curriculum OUT ARGS...: skipped when OUT holds a dataset
    [ -f "$1/index.jsonl" ] && { echo "gr2-curriculum: done ($1)"; return; }
    rm -rf "$1"
    "$BIN/gr2-curriculum" "${@:2}"
}

# Touch fine-tuning clips: 4 steps, half of them from an episode's first step, actions only.
TOUCH=(--tasks touch --clip-length 4 --batch-size 16 --start-fraction 0.5 --image-weight 0)

# 1. 300 demonstrations per task on training seeds 0..299
datagen touch,pick,push 300
# 2. tokenizer (VQGAN) and 3. video-only pre-training, on those 900 episodes
stage tokenizer "$WORK/tok" --data "$WORK/data" --preset gr2-tiny --steps 1500 --batch-size 16
stage pretrain "$WORK/pre" --data "$WORK/data" --init "$WORK/tok" --steps 1000 --precision bf16
# 4. touch: every block of seeds 0..499 as the target (1500; 1200 new): 2100 episodes in all
datagen touch 1500 --targets all
# 5. the curriculum data: the 1500 touch episodes with one block; 700 of those + 700 real ones;
#    350 of those + all 1500 real ones
curriculum "$WORK/one_block" one-block --data "$WORK/data" --out "$WORK/one_block"
curriculum "$WORK/mixed" mix --out "$WORK/mixed" --take 700 "$WORK/one_block" "$WORK/data"
curriculum "$WORK/mostly_real" mix --out "$WORK/mostly_real" --take 350 --take 1500 \
    "$WORK/one_block" "$WORK/data"
# 6. recovery demonstrations (overshoot the target / go above another block / wander off first),
#    every block of seeds 500..799 as the target, and the last mix
"$BIN/gr2-datagen" --tasks touch --episodes-per-task 900 --targets all --seed-start 500 \
    --detour --time-limit 25 --out "$WORK/recovery" --workers 2
curriculum "$WORK/with_recovery" mix --out "$WORK/with_recovery" --take 1850 --take 900 \
    "$WORK/mostly_real" "$WORK/recovery"
# 7. confusion demonstrations (part of the way to another block first, or above it, or off),
#    every block of seeds 1000..1299 as the target, mixed with all of the last mix
"$BIN/gr2-datagen" --tasks touch --episodes-per-task 900 --targets all --seed-start 1000 \
    --detour toward_block,wrong_block,other_block --time-limit 25 --out "$WORK/confusion" \
    --workers 2
curriculum "$WORK/with_confusion" mix --out "$WORK/with_confusion" --take 2750 --take 900 \
    "$WORK/with_recovery" "$WORK/confusion"

finetune() {  # finetune INIT OUT: the fine-tuning steps (the same for the ablation)
    stage finetune "${2}_one" --data "$WORK/one_block" --init "$1" "${TOUCH[@]}" --steps 900 \
        --lr 1e-3 --warmup 50
    stage finetune "${2}_mixed" --data "$WORK/mixed" --init "${2}_one" "${TOUCH[@]}" \
        --steps 1200 --lr 5e-4 --warmup 50 --override text_encoder=words \
        --override lang_to_tokens=true
    # (each cycle saves float16 and the next starts from that, as the runs behind the bundle did)
    stage finetune "${2}_recovery1" --data "$WORK/with_recovery" --init "${2}_mixed" \
        "${TOUCH[@]}" --steps 900 --lr 5e-4 --warmup 50 --save-dtype float16
    stage finetune "${2}_recovery2" --data "$WORK/with_recovery" --init "${2}_recovery1" \
        "${TOUCH[@]}" --steps 2400 --lr 5e-4 --warmup 50 --save-dtype float16
    stage finetune "${2}_recovery3" --data "$WORK/with_recovery" --init "${2}_recovery2" \
        "${TOUCH[@]}" --steps 1500 --lr 3e-4 --warmup 50 --save-dtype float16 --seed 1
    stage finetune "$2" --data "$WORK/with_recovery" --init "${2}_recovery3" "${TOUCH[@]}" \
        --steps 900 --lr 1.5e-4 --warmup 50 --save-dtype float16 --seed 2
    stage finetune "${2}_conf" --data "$WORK/with_confusion" --init "$2" "${TOUCH[@]}" \
        --steps 1800 --lr 3e-4 --warmup 50 --save-dtype float16 --seed 3
    # the model: the mean of the last four cycles' weights (gr2-average)
    if [ -f "${2}_avg/checkpoint/config.json" ]; then
        echo "gr2-average: done (${2}_avg)"
    else
        "$BIN/gr2-average" --out "${2}_avg" --save-dtype float16 "${2}_recovery2" \
            "${2}_recovery3" "$2" "${2}_conf"
    fi
}
# 8. robot fine-tuning from the pre-trained model
finetune "$WORK/pre" "$WORK/ft"
# 9. the ablation: the same fine-tuning budget from the tokenizer run (no video pre-training)
if [ "${ABLATION:-0}" = 1 ]; then
    finetune "$WORK/tok" "$WORK/ft_no_pretrain"
fi
echo "done: $WORK/ft_avg/checkpoint (bundle it: cp $WORK/ft_avg/checkpoint/* \\"
echo "      services/policy_server/src/gr2_policy/checkpoints/demo/)"
