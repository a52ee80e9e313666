#!/usr/bin/env bash
# Issue 16, item 7: benchmarks/gpu_check.py on a GPU machine, in at most 8 minutes. The machine needs torch (CUDA)
# and python3; what else it lacks is installed from the wheels in .whl/ ($WHEELS; made beforehand, where pip
# works, by `bash benchmarks/gpu_wheels.sh`). Writes <folder>/gpu_check.{json,md}: the first argument, else $OUT, else docs.
# Further arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-docs}}
shift || true
wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hf_mtkd_site \
    "$wheels"/*.whl
  export PYTHONPATH=/tmp/hf_mtkd_site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 450 python3 benchmarks/gpu_check.py --output "$out/gpu_check" "$@"
