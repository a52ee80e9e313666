"""The cross-tokenizer demo (`python -m hf_mtkd.demo.cross_tokenizer`): its rows, and a real smoke run."""

import json
import math

import pytest

from hf_mtkd import cli
from hf_mtkd.demo.cross_tokenizer import METHODS, ROUTED, TOKENIZERS, prompt_rows
from hf_mtkd.testing import train_tiny_tokenizer

LINES = {
    "python": lambda i: f"def f{i % 7}(x):\n    return x + {i % 5}\n",
    "prose": lambda i: f"The river ran past the mill {i % 9} times that day, and the miller slept.\n",
    "shakespeare": lambda i: f"KING. What say you, lord {i % 6}? Speak, and be brief.\n",
}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for domain, line in LINES.items():
        (root / domain).mkdir()
        (root / domain / "work.txt").write_text("".join(line(i) for i in range(600)))
    return root


def test_prompt_rows_split_each_block_into_its_prompt_and_completion():
    text = "".join(LINES["prose"](i) for i in range(60))
    tokenizer = train_tiny_tokenizer([text], 300)
    rows = prompt_rows(text, tokenizer, "prose", 32, limit=5)
    assert len(rows) == 5 and set(rows["domain"]) == set(rows["teacher_ids"]) == {"prose"}
    for row in rows:
        ids = tokenizer(row["prompt"] + row["completion"])["input_ids"]
        assert len(tokenizer(row["prompt"])["input_ids"]) == 16 and abs(len(ids) - 32) <= 2
        assert row["prompt"] + row["completion"] in text


def test_a_smoke_run_reports_every_method(tmp_path, corpus_dir):
    output = tmp_path / "out"
    cli.main(["demo-cross-tokenizer", "--quick", "--steps", "4", "--corpus_dir", str(corpus_dir),
              "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(output)])  # fmt: skip
    results = json.loads((output / "results.json").read_text())
    assert results["command"].startswith("hf-mtkd demo-cross-tokenizer --quick")
    assert list(results["methods"]) == list(METHODS)
    assert results["tokenizers"]["prose"][0] == "wordpiece"
    for method, runs in results["methods"].items():
        (run,) = runs
        for split in ("validation", "test"):
            assert set(run[f"{split}_perplexity"]) == {*TOKENIZERS, "overall"}
            assert all(math.isfinite(p) and p > 1 for p in run[f"{split}_perplexity"].values()), method
        if METHODS[method] is None:
            continue
        for rows, weights in run["teacher_weight"].items():
            assert 0 < sum(weights.values()) <= 1 + 1e-9  # what is missing: positions no teacher is aligned at
            if method in ROUTED:  # each domain's rows go to its own specialist only
                assert all(w == 0 for teacher, w in weights.items() if teacher != rows) and weights[rows] > 0
            assert all(0 < share <= 1 for share in run["teacher_aligned"][rows].values())
        chains = METHODS[method].get("cross_tokenizer_chains", True)
        assert ("teacher_chained_mass" in run) == chains, method
        if chains:  # the specialists' tokens are shorter than the student's: chains on every domain
            assert all(sum(mass.values()) > 0 for mass in run["teacher_chained_mass"].values()), method
    report = (output / "results.md").read_text()
    assert "| posterior + prompt evidence | python |" in report and "| routing by hand |" in report
    assert "vs prefix map (paired)" in report
