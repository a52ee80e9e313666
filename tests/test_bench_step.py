"""benchmarks/bench_step.py runs end to end (smoke size) and reports every method with finite numbers."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench_step(*args: str) -> None:
    """Run benchmarks/bench_step.py with `args`, offline, on one thread; fail with its error output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_step.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def test_bench_step_quick_writes_a_complete_table(tmp_path):
    output = tmp_path / "bench"
    bench_step("--quick", "--repeats", "1", "--output", str(output))
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


def test_bench_step_prompt_grid_reports_the_cost_of_the_prompt(tmp_path):
    output = tmp_path / "prompt"
    bench_step("--grid", "prompt_quick", "--output", str(output))
    if not sys.platform.startswith("linux"):  # the one-step grids run in the memory process
        return
    rows = json.loads((output.with_suffix(".json")).read_text())["rows"]
    assert [r["num_teachers"] for r in rows] == [1, 3]
    for row in rows:
        assert row["prompt_over_posterior"] == row["prompt_ms"] / row["posterior_ms"]
        assert row["valid_positions"] == 32 and row["prompt_positions"] == 31  # the second half, the first half
        assert row["prompt_peak_mb"] is not None and "free_ms" not in row
    assert "| posterior ms | + prompt ms |" in output.with_suffix(".md").read_text()
