"""benchmarks/bench_step.py runs end to end (smoke size) and reports every method with finite numbers."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_step_quick_writes_a_complete_table(tmp_path):
    output = tmp_path / "bench"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_step.py", "--quick", "--repeats", "1", "--output", str(output)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((output.with_suffix(".json")).read_text())
    rows = report["rows"]
    assert [(r["num_teachers"], r["vocab_size"]) for r in rows] == [(1, 1024), (2, 1024)]
    for row in rows:
        for method in ("floor", "mtkd", "free", "cached", "plain", "loss_ours", "loss_naive"):
            assert math.isfinite(row[f"{method}_ms"]) and row[f"{method}_ms"] > 0, method
        assert row["mtkd_over_floor"] == row["mtkd_ms"] / row["floor_ms"]
        assert row["cached_over_plain"] == row["cached_ms"] / row["plain_ms"]
        if sys.platform.startswith("linux"):  # peak memory comes from a second process with a pinned allocator
            for method in ("floor", "mtkd", "free", "cached", "plain", "loss_ours", "loss_naive"):
                assert row[f"{method}_peak_mb"] is not None and row[f"{method}_peak_mb"] >= 0, method
    markdown = output.with_suffix(".md").read_text()
    assert "| student | V | K | floor ms |" in markdown and markdown.count("\n| tiny") == 2
