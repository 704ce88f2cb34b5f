#!/usr/bin/env bash
# The demo: install chatforge, then run every stage (tokenizer, pretraining, base eval, midtraining,
# SFT, chat eval, report) on a tiny model on this machine, well under 30 minutes on a laptop CPU.
# The model is silly; the point is that every stage really runs. The stage list is the `demo`
# preset in chatforge/speedrun.py.
#
#   bash runs/demo.sh                       # $CHATFORGE_DATA_DIR or ../shared/data if present, else downloads,
#                                           # else the offline fallback (stdlib docstrings, generated chats)
#   bash runs/demo.sh --offline             # extra flags go to `chatforge speedrun`
#
# Outputs go under $CHATFORGE_HOME (default ~/.cache/chatforge), tag "demo"; the report card is
# report/report.md there. Killed midway? Run it again: finished stages are skipped, training resumes.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
fi
# CPU torch from the pinned build unless a torch is already installed (a GPU user's own build)
python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e .

data_flag=()  # your local data folder, else one beside the checkout, else downloads / the offline fallback
if [ -n "${CHATFORGE_DATA_DIR:-}" ]; then
  data_flag=(--data-dir "$CHATFORGE_DATA_DIR")
elif [ -d ../shared/data/pretrain/docs ]; then
  data_flag=(--data-dir ../shared/data)
fi

chatforge env
chatforge speedrun --preset demo "${data_flag[@]}" "$@"
chatforge chat --source sft --tag demo -p "Hello! Who are you?" --temperature 0.8 --max-new-tokens 48
