#!/usr/bin/env bash
# The test command: installs what it needs, lints, runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
ruff check src tests benchmarks
ruff format --check src tests benchmarks
python -m pytest -q "$@"
