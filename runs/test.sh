#!/usr/bin/env bash
# Install chatforge with its test tools (CPU torch, from the pinned build) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[dev]"
python -m pytest -q "$@"
