#!/usr/bin/env bash
# The demo checkpoint (checkpoints/demo): scripted-expert demonstrations, then the three
# GR-2 training stages on gr2-tiny, on CPU. Usage: bash training/recipes/demo_gr2_tiny.sh [WORK]
# (WORK defaults to runs/demo; data goes to WORK/data). Every step resumes or is skipped
# when its output exists, so the script can be re-run after an interruption.
set -euo pipefail
WORK=${1:-runs/demo}
BIN=${BIN:-.venv/bin}
export MUJOCO_GL=${MUJOCO_GL:-egl}
mkdir -p "$WORK"

# 1. 300 demonstrations per task on training seeds 0.. (resumable)
"$BIN/gr2-datagen" --tasks touch,pick,push --episodes-per-task 300 --out "$WORK/data" --workers 2

# 2. tokenizer, 3. video-only pre-training, 4. robot fine-tuning. A stage whose run directory
# exists without a final checkpoint was interrupted: it resumes from its last periodic one.
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
stage tokenizer "$WORK/tok" --data "$WORK/data" --preset gr2-tiny --steps 1500 --batch-size 16
stage pretrain "$WORK/pre" --data "$WORK/data" --init "$WORK/tok" --steps 1000 --precision bf16
stage finetune "$WORK/ft" --data "$WORK/data" --init "$WORK/pre" --steps 1500 --precision bf16 \
    --save-dtype float16
echo "done: $WORK/ft/checkpoint"
