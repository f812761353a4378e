#!/usr/bin/env bash
# The main job on the built-in tiny setting: installs what it needs, then runs it on this CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
vlsi distill --out "${1:-runs/distill}"
