#!/usr/bin/env bash
# Every stage at real settings on one GPU (H100/H200) in about 6.5 minutes (an H200): tokenizer, pretraining of a
# depth-12 model at sequence 2048 (compiled, bf16, one pass over ~20M tokens), CORE, midtraining,
# SFT, the six chat evals, a few RL steps and the report card. It is the `gpu1` preset of
# chatforge/speedrun.py (its comment holds the per-stage budget), run by runs/speedrun.sh.
#
#   bash runs/gpu1.sh                       # data from $CHATFORGE_DATA_DIR, else downloaded
#   bash runs/gpu1.sh --data-dir /data      # your data folder, laid out like the real sources (pretrain/ eval/ chat/)
#
# Device batches are found at start-up (--device-batch-size auto), so any card that holds depth 12
# runs it; a smaller card is slower, not out of memory.
data_flag=()
if [ -n "${CHATFORGE_DATA_DIR:-}" ]; then  # absolute: speedrun.sh changes directory
  data_flag=(--data-dir "$(cd "$CHATFORGE_DATA_DIR" && pwd)")
fi
PRESET=gpu1 exec bash "$(dirname "$0")/speedrun.sh" "${data_flag[@]}" "$@"
