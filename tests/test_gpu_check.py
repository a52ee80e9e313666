"""
benchmarks/gpu_check.sh (issue 16's GPU check) runs end to end on the CPU at smoke size: its exactness part compares
the logit-free step with today's in float64, and its scale part reports every method with finite numbers.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_run_on_cpu(tmp_path):
    bin_dir = os.path.dirname(sys.executable)  # the script calls python3, as on the GPU machine
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "WHEELS": str(tmp_path / "no_wheels"),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(tmp_path), "--quick", "--device", "cpu", "--repeats", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    exact = report["exactness"]
    # entropy weights, posterior's running sums carried across chunks, and the prompt's evidence
    for prefix in ("", "posterior_", "prompt_"):
        assert set(exact[f"{prefix}free_vs_today_on_device"]) == {"loss", "grad", "weights"}
        assert set(exact[f"{prefix}free_device_vs_cpu"]) == {"loss", "grad", "weights"}
    assert exact["max"] <= 1e-12, exact
    rows = report["scale"]
    assert [(r["batch_size"], r["num_teachers"]) for r in rows] == [(1, 1), (2, 3)]
    for row in rows:
        methods = ("plain", "today", "free", "posterior") + (("trl",) if row["num_teachers"] == 1 else ())
        for method in methods:
            assert not row[f"{method}_oom"] and math.isfinite(row[f"{method}_ms"]) and row[f"{method}_ms"] > 0
        assert row["free_time_over_today"] == row["free_ms"] / row["today_ms"]
        assert math.isfinite(row["today_loss"]) and row["free_vs_today_loss"] < 1e-2  # bf16 autocast
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| free_vs_today_on_device |" in markdown and "| prompt_free_vs_today_on_device |" in markdown
    assert markdown.count("\n| 1 x 64 | 1 |") == 1
