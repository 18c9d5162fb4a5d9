#!/usr/bin/env bash
# The bundled demo checkpoint (gr2_policy/checkpoints/demo): scripted-expert demonstrations, then
# the GR-2 training stages on gr2-tiny, on CPU (about 2 h on 2 cores).
#
#   bash training/recipes/demo_gr2_tiny.sh [WORK]       # WORK defaults to runs/demo
#   ABLATION=1 bash training/recipes/demo_gr2_tiny.sh   # + fine-tuning without pre-training (~1 h)
#
# Every step resumes or is skipped when its output exists, so the script can be re-run after an
# interruption. The order matters: the tokenizer and the video pre-training saw the first 900
# demonstrations (300 per task); the extra touch demonstrations are added for fine-tuning. They
# show every block of a scene as the target (--targets all): with one drawn target per scene, a
# model could learn "this layout -> that block" from the images and ignore the instruction.
#
# The tokenizer is trained with --local-weight 1: each code must also say, through a linear
# map, what its own 8x8 patch holds, so that the GPT (one code per token) can read a block's
# colour from the block's own tokens (README, "Why green").
#
# Fine-tuning is a curriculum (README, "The demo model"): first touch scenes with only the target
# block left (gr2-curriculum one-block), where the block's position is the target; then a 50/50
# mix of those and the real three-block scenes, with the instruction on every token
# (--override lang_to_tokens=true) and the words text encoder (--override text_encoder=words);
# last, mostly real scenes (350 one-block + 1500 real) together with 900 recovery demonstrations
# (gr2-datagen --detour: a wrong way first, labelled only on the way back), so the closed-loop
# policy has seen its way back when it strays: 900 steps on that last data, saved in float16.
# Fine-tuning runs under bf16 autocast (--precision bf16), as pre-training does.
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
TOUCH=(--tasks touch --clip-length 4 --batch-size 16 --start-fraction 0.5 --image-weight 0 \
    --precision bf16)

# 1. 300 demonstrations per task on training seeds 0..299
datagen touch,pick,push 300
# 2. tokenizer (VQGAN) and 3. video-only pre-training, on those 900 episodes
stage tokenizer "$WORK/tok" --data "$WORK/data" --preset gr2-tiny --steps 1500 --batch-size 16 \
    --local-weight 1.0
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

finetune() {  # finetune INIT OUT: the fine-tuning steps (the same for the ablation)
    stage finetune "${2}_one" --data "$WORK/one_block" --init "$1" "${TOUCH[@]}" --steps 900 \
        --lr 1e-3 --warmup 50
    stage finetune "${2}_mixed" --data "$WORK/mixed" --init "${2}_one" "${TOUCH[@]}" \
        --steps 1200 --lr 5e-4 --warmup 50 --override text_encoder=words \
        --override lang_to_tokens=true
    # (saved in float16, as the bundle is)
    stage finetune "$2" --data "$WORK/with_recovery" --init "${2}_mixed" \
        "${TOUCH[@]}" --steps 900 --lr 5e-4 --warmup 50 --save-dtype float16
}
# 8. robot fine-tuning from the pre-trained model
finetune "$WORK/pre" "$WORK/ft"
# 9. the ablation: the same fine-tuning budget from the tokenizer run (no video pre-training)
if [ "${ABLATION:-0}" = 1 ]; then
    finetune "$WORK/tok" "$WORK/ft_no_pretrain"
fi
echo "done: $WORK/ft/checkpoint (bundle it: cp $WORK/ft/checkpoint/* \\"
echo "      services/policy_server/src/gr2_policy/checkpoints/demo/)"
