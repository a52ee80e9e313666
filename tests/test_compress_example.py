"""examples/compress_smollm2.py runs end to end on a tiny local teacher (the real run uses SmolLM2-135M)."""

import json
import runpy
import sys
from pathlib import Path

import pytest

from hf_mtkd.testing import synthetic_corpus, tiny_causal_lm, train_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_compression_example_on_a_tiny_teacher(tmp_path, monkeypatch):
    tokenizer = train_tiny_tokenizer(synthetic_corpus(200), vocab_size=256)
    teacher = tiny_causal_lm("llama", tokenizer, hidden_size=32, num_layers=4, vocab_size=len(tokenizer))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    output = tmp_path / "out"
    argv = [
        "--teacher", str(tmp_path / "teacher"), "--layers", "2", "--steps", "3", "--batch_size", "2",
        "--block_size", "16", "--eval_blocks", "4", "--learning_rate", "1e-3", "3e-3", "--seeds", "0", "1",
        "--top_k", "8", "--output_dir", str(output), "--quiet",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["compress_smollm2.py", *argv])
    runpy.run_path(str(ROOT / "examples" / "compress_smollm2.py"), run_name="__main__")
    results = json.loads((output / "results.json").read_text())
    assert results["parameters"]["student"] < results["parameters"]["teacher"]
    assert set(results["seeds"]) == {"fine-tuning", "distillation"}
    for method, runs in results["seeds"].items():
        assert [run["seed"] for run in runs] == [0, 1]
        assert float(results["learning_rate"][method]["chosen"]) in (1e-3, 3e-3)
    kl_teacher = results["rows"]["teacher"]["test"]["kd_loss"]
    assert kl_teacher == pytest.approx(0, abs=1e-5)  # the teacher against itself
    table = (output / "results.md").read_text()
    assert "| pruned, before training |" in table and "paired by seed" in table
