#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on a GPU machine that has torch and transformers but no network:
# the versions this checkout is tested with of what that machine lacks (datasets and its two pure-Python needs,
# transformers itself, TRL for the GKD column), saved in the git-ignored .whl/ for the device tool to carry.
# Pure-Python wheels only (a few MiB beside transformers' 13); pass extra requirements as arguments, e.g.
# `bash benchmarks/gpu_wheels.sh pyarrow==26.0.1` where the machine's pyarrow is older than datasets needs.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
version() { "$python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir .whl
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  "datasets==$(version datasets)" "dill==$(version dill)" "multiprocess==$(version multiprocess)" \
  "transformers==$(version transformers)" "trl==$(version trl)" "$@"
ls -l .whl
