#!/usr/bin/env bash
# Install chatforge with its test tools (CPU torch, from the pinned build) and run the whole suite.
# Works from a fresh clone on its own: it makes (or reuses) .venv unless a virtual environment is
# already active, so nothing is installed into the system Python.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
fi
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[dev]"
python -m pytest -q "$@"
