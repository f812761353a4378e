#!/usr/bin/env bash
# Creates (or reuses) .venv with the CPU build of torch pinned, then vlsi and its test tools.
# GPU users: install your own torch first and use `pip install -e .` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The pin takes the CPU wheel that lies on these machines' disk; an unpinned torch pulls a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
