#!/usr/bin/env bash
# The demo: install chatforge, then run every stage that exists on a tiny model, on this machine,
# in a few minutes on a laptop CPU. The model is silly; the point is that every stage really runs.
#
#   bash runs/demo.sh                 # uses ../shared/data if present, else downloads 2 shards,
#                                     # else the offline corpus (the stdlib's docstrings)
#   DEMO_DATA=notes.txt bash runs/demo.sh   # train on your own text instead
#
# Outputs go under $CHATFORGE_HOME (default ~/.cache/chatforge), tag "demo". Re-running resumes.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
fi
# CPU torch from the pinned build unless a torch is already installed (a GPU user's own build)
python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e .

shared=../shared/data
data="${DEMO_DATA:-}"
if [ -z "$data" ] && [ -d "$shared/pretrain/docs" ]; then
  data="$shared/pretrain/docs"
fi
if [ -z "$data" ]; then
  if chatforge data download -n 2; then
    data=""   # the downloaded shards are the default corpus
  else
    echo "demo: no network and no local copy; falling back to the offline corpus (stdlib docstrings)"
    chatforge data offline
    data="$(chatforge data offline | sed -n 's/^use it with: --data //p')"
  fi
fi
data_flag=()
[ -n "$data" ] && data_flag=(--data "$data")

chatforge env
chatforge tokenizer train "${data_flag[@]}" --vocab-size 4096 --max-chars 2e7
chatforge tokenizer eval
chatforge pretrain "${data_flag[@]}" --tag demo --resume --depth 4 --head-dim 64 --max-seq-len 256 \
  --device-batch-size 8 --total-batch-size 2048 --num-iterations 500 --eval-every 100 --sample-every 250

eval_flags=(--source base --tag demo --max-per-task 16 "${data_flag[@]}")
if [ -d "$shared/eval/core" ]; then
  eval_flags+=(--eval-bundle "$shared/eval/core")
else
  eval_flags+=(--skip core)   # the CORE bundle needs a download or a local copy
fi
chatforge eval base "${eval_flags[@]}"
chatforge chat --source base --tag demo -p "The capital of France is" --temperature 0.8 --max-tokens 48
