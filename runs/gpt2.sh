#!/usr/bin/env bash
# The run that targets GPT-2 (1.5B)'s CORE score of 0.2565: a depth-26 model with FP8 matmuls on
# Hopper GPUs (H100/H200), one 8-GPU node, on 400 FineWeb-Edu shards; then midtraining, SFT and the
# evaluations. It is the `gpt2` preset of chatforge/speedrun.py, run by runs/speedrun.sh.
#
#   bash runs/gpt2.sh [--data-dir DIR] [--rl]
#
# Re-running after a crash resumes: finished stages are skipped, training continues from its last
# checkpoint. The CORE of the base model is in $CHATFORGE_HOME/report/report.md.
PRESET=gpt2 exec bash "$(dirname "$0")/speedrun.sh" "$@"
