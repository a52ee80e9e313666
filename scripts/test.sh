#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh), checks style with ruff, and runs the default test suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest "$@"
