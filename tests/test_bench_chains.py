"""benchmarks/bench_chains.py runs end to end (smoke size) and reports both settings with finite numbers."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_chains_quick_writes_its_table(tmp_path):
    output = tmp_path / "bench"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_chains.py", "--quick", "--output", str(output)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(output.with_suffix(".json").read_text())["rows"]
    assert 0 < row["unigram_chained_share"] < 1  # the Unigram teacher spells some of the student's tokens in pieces
    for setting in ("map alone", "chains"):
        assert all(math.isfinite(ms) and ms > 0 for ms in row[setting].values()), setting
    assert "| 32 x 4 |" in output.with_suffix(".md").read_text()
