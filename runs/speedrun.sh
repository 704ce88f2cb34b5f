#!/usr/bin/env bash
# nanochat's "$100" class run on one 8xH100 (or 8xH200) node, about 4 hours: a depth-20 model on
# 240 FineWeb-Edu shards, then midtraining, SFT and the full evaluations; the report card ends up
# in $CHATFORGE_HOME/report/report.md. Same as the `d20` preset of chatforge/speedrun.py
# (PRESET=gpt2 runs that preset instead; runs/gpt2.sh does).
#
#   bash runs/speedrun.sh                   # downloads what it needs
#   bash runs/speedrun.sh --data-dir /data  # your data folder, laid out like the real sources
#   bash runs/speedrun.sh --rl              # also RL on GSM8K
#
# Every training and eval stage runs under torchrun on all local GPUs. Re-running after a crash
# resumes: finished stages are skipped and training continues from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
fi
python -c "import torch" 2>/dev/null || python -m pip install --quiet torch   # the CUDA build from PyPI
python -m pip install --quiet -e .
chatforge env
chatforge speedrun --preset "${PRESET:-d20}" "$@"
chatforge report --html
