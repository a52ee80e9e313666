#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the bundled demo offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python examples/quickstart.py "$@"
