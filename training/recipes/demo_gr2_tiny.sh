#!/usr/bin/env bash
# The bundled demo checkpoint (gr2_policy/checkpoints/demo): scripted-expert demonstrations, then
# the three GR-2 training stages on gr2-tiny, on CPU (about 2.5 h on 2 cores).
#
#   bash training/recipes/demo_gr2_tiny.sh [WORK]       # WORK defaults to runs/demo
#   ABLATION=1 bash training/recipes/demo_gr2_tiny.sh   # also fine-tunes without pre-training
#
# Every step resumes or is skipped when its output exists, so the script can be re-run after an
# interruption. The order matters: the tokenizer and the video pre-training saw the first 900
# demonstrations (300 per task); the extra touch demonstrations are added for fine-tuning. They
# show every block of a scene as the target (--targets all): with one drawn target per scene, a
# model could learn "this layout -> that block" from the images and ignore the instruction
# (gr2_training.probe measured exactly that: chance-level grounding on unseen scenes).
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
# its last periodic checkpoint (bit-exact).
stage() {  # stage NAME RUN_DIR ARGS...
    local name=$1 run=$2
    shift 2
    if [ -f "$run/checkpoint/config.json" ]; then
        echo "$name: done ($run)"
        return
    fi
    local resume=()
    [ -f "$run/run.json" ] && resume=(--resume)
    "$BIN/gr2-train" "$name" --out "$run" --seed 0 --no-progress --save-every 250 \
        "${resume[@]}" "$@"
}

# 1. 300 demonstrations per task on training seeds 0..299
datagen touch,pick,push 300
# 2. tokenizer (VQGAN) and 3. video-only pre-training, on those 900 episodes
stage tokenizer "$WORK/tok" --data "$WORK/data" --preset gr2-tiny --steps 1500 --batch-size 16
stage pretrain "$WORK/pre" --data "$WORK/data" --init "$WORK/tok" --steps 1000 --precision bf16
# 4. touch: every block of seeds 0..499 as the target (1500; 1200 new): 2100 episodes in all
datagen touch 1500 --targets all
# 5. robot fine-tuning (video + CVAE actions) from the pre-trained model
stage finetune "$WORK/ft" --data "$WORK/data" --init "$WORK/pre" --steps 5000 --precision bf16 \
    --save-dtype float16
# 6. the ablation: the same fine-tuning budget from the tokenizer run (no video pre-training)
if [ "${ABLATION:-0}" = 1 ]; then
    stage finetune "$WORK/ft_no_pretrain" --data "$WORK/data" --init "$WORK/tok" --steps 5000 \
        --precision bf16 --save-dtype float16
fi
echo "done: $WORK/ft/checkpoint (bundle it: cp $WORK/ft/checkpoint/* \\"
echo "      services/policy_server/src/gr2_policy/checkpoints/demo/)"
