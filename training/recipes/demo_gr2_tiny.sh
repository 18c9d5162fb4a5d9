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

# 2. tokenizer, 3. video-only pre-training, 4. robot fine-tuning
[ -f "$WORK/tok/checkpoint/config.json" ] || "$BIN/gr2-train" tokenizer --data "$WORK/data" \
    --preset gr2-tiny --out "$WORK/tok" --steps 1500 --batch-size 16 --seed 0 --no-progress
[ -f "$WORK/pre/checkpoint/config.json" ] || "$BIN/gr2-train" pretrain --data "$WORK/data" \
    --init "$WORK/tok" --out "$WORK/pre" --steps 1000 --precision bf16 --seed 0 --no-progress
[ -f "$WORK/ft/checkpoint/config.json" ] || "$BIN/gr2-train" finetune --data "$WORK/data" \
    --init "$WORK/pre" --out "$WORK/ft" --steps 1500 --precision bf16 --seed 0 \
    --save-dtype float16 --no-progress
echo "done: $WORK/ft/checkpoint"
