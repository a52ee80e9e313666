"""examples/run_clm_distill.py and `hf-mtkd distill`: end to end on local files, argument files, argument errors."""

import contextlib
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import transformers
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import hf_mtkd
from hf_mtkd.cli import main as cli_main
from hf_mtkd.run_clm_distill import build_parser, group_texts, main, parse_args

ROOT = Path(__file__).resolve().parents[1]
QUICK = [  # a few CPU steps, quiet logs
    "--max_steps", "6", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
    "--learning_rate", "3e-3", "--block_size", "32", "--logging_steps", "3", "--save_strategy", "no",
    "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--log_level", "warning", "--seed", "0",
]  # fmt: skip


def run_subprocess(*command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@contextlib.contextmanager
def isolated_logging():
    """main() configures logging like run_clm.py; undo it so later tests keep their own handlers and verbosity."""
    root = logging.getLogger()
    handlers, verbosity = list(root.handlers), transformers.utils.logging.get_verbosity()
    datasets_verbosity = datasets.utils.logging.get_verbosity()
    package_level = logging.getLogger("hf_mtkd").level
    try:
        yield
    finally:
        for handler in root.handlers[len(handlers) :]:
            root.removeHandler(handler)
        transformers.utils.logging.set_verbosity(verbosity)
        datasets.utils.logging.set_verbosity(datasets_verbosity)
        transformers.utils.logging.reset_format()
        logging.getLogger("hf_mtkd").setLevel(package_level)


def run_main(args: list[str]) -> None:
    with isolated_logging():
        main(args)


def check_results(output_dir: Path, teacher_names: list[str], *, trained: bool = True) -> dict:
    """all_results.json holds a finite perplexity, the distillation loss and teacher weights that sum to 1."""
    results = json.loads((output_dir / "all_results.json").read_text())
    assert math.isfinite(results["perplexity"]) and results["perplexity"] > 1
    assert results["perplexity"] == results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss_ce"]))
    assert math.isfinite(results["eval_loss_kd"]) and results["eval_loss_kd"] > 0
    weights = [results[f"eval_teacher_weight/{name}"] for name in teacher_names]
    assert sum(weights) == pytest.approx(1, abs=1e-5)
    if trained:
        assert math.isfinite(results["train_loss"]) and results["train_samples"] > 0
    return results


def test_script_end_to_end_on_a_txt_file(tmp_path, teacher_dirs, student_dir, text_files):
    train, validation = text_files["txt"]
    output_dir = tmp_path / "out"
    result = run_subprocess(
        sys.executable, "examples/run_clm_distill.py",
        "--teacher_model_name_or_path", *teacher_dirs, "--model_name_or_path", student_dir,
        "--train_file", train, "--validation_file", validation, "--do_train", "--do_eval",
        "--output_dir", str(output_dir), "--alpha_feat", "0.1", *QUICK,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = [Path(d).name for d in teacher_dirs]
    results = check_results(output_dir, names)
    assert results["train_samples"] > 50 and results["eval_samples"] > 10  # blocks of 32 tokens of the files
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert {f"teacher_weight/{name}" for name in names} <= set(state["log_history"][0])
    student = AutoModelForCausalLM.from_pretrained(output_dir)  # a plain student ...
    assert student.num_parameters() == AutoModelForCausalLM.from_pretrained(student_dir).num_parameters()
    assert set(load_file(output_dir / "mtkd_projector.safetensors"))  # ... with the projections beside it
    assert (output_dir / "README.md").read_text().startswith("---\n")


def test_cli_end_to_end_on_jsonl_with_generation_eval(tmp_path, teacher_dirs, student_dir, text_files):
    train, validation = text_files["jsonl"]
    output_dir = tmp_path / "out"
    result = run_subprocess(
        sys.executable, "-m", "hf_mtkd.cli", "distill",
        "--teacher_model_name_or_path", *teacher_dirs[:2], "--teacher_names", "a", "b",
        "--model_name_or_path", student_dir, "--train_file", train, "--validation_file", validation,
        "--do_train", "--do_eval", "--do_generate_eval", "--generate_eval_samples", "8",
        "--generate_prompt_length", "4", "--generate_max_new_tokens", "6", "--output_dir", str(output_dir), *QUICK,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = check_results(output_dir, ["a", "b"])
    assert results["generate_metrics_backend"] == "sacrebleu+rouge_score"
    assert results["generate_samples"] == 8
    for key in ("generate_bleu", "generate_teacher_bleu/a", "generate_teacher_bleu/b"):
        assert 0 <= results[key] <= 100
    for key in ("generate_rougeL", "generate_teacher_rougeL/a", "generate_teacher_rougeL/b"):
        assert 0 <= results[key] <= 1
    card = (output_dir / "README.md").read_text()
    assert "hf-mtkd distill --teacher_model_name_or_path" in card  # the command, as the user typed it


def test_script_with_three_teachers_on_three_other_tokenizers(tmp_path, cross_teacher_dirs, student_dir, text_files):
    train, validation = text_files["txt"]
    output_dir = tmp_path / "out"
    names = ["bpe300", "unigram", "wordpiece"]
    run_main([
        "--teacher_model_name_or_path", *cross_teacher_dirs, "--teacher_names", *names,
        "--model_name_or_path", student_dir, "--train_file", train, "--validation_file", validation,
        "--do_train", "--do_eval", "--output_dir", str(output_dir), *QUICK, "--max_steps", "12",
        "--logging_steps", "4", "--learning_rate", "5e-3",
    ])  # fmt: skip
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["train_samples"] == 200  # one example per text line, not token blocks
    for name in names:
        assert 0 < results[f"eval_teacher_aligned/{name}"] <= 1
        assert 0 <= results[f"eval_teacher_unmapped_mass/{name}"] < 1
        assert 0 < results[f"eval_teacher_weight/{name}"] <= results[f"eval_teacher_aligned/{name}"]
    logs = [log for log in json.loads((output_dir / "trainer_state.json").read_text())["log_history"] if "loss" in log]
    assert len(logs) == 3 and logs[-1]["loss_kd"] < logs[0]["loss_kd"] and logs[-1]["loss"] < logs[0]["loss"]
    assert {f"teacher_aligned/{name}" for name in names} <= set(logs[0])


def test_script_refuses_a_wrong_number_of_teacher_tokenizers(teacher_dirs, student_dir, text_files, capsys):
    with pytest.raises(SystemExit):
        run_main([
            "--teacher_model_name_or_path", *teacher_dirs[:2], "--teacher_tokenizer_name", teacher_dirs[0],
            "--model_name_or_path", student_dir, "--train_file", text_files["txt"][0], "--output_dir", "unused",
        ])  # fmt: skip
    assert "--teacher_tokenizer_name has 1 entries but there are 2 teachers" in capsys.readouterr().err


@pytest.mark.parametrize("file_format", ["json", "yaml"])
def test_arguments_file_and_a_new_student_from_a_config(file_format, tmp_path, teacher_dirs, text_files):
    train, _ = text_files["txt"]
    output_dir = tmp_path / "out"
    arguments = {
        "teacher_model_name_or_path": teacher_dirs[:2],
        "config_name": teacher_dirs[1],  # the llama teacher's config, made smaller
        "config_overrides": "num_hidden_layers=1,hidden_size=16,intermediate_size=32,vocab_size=100",
        "train_file": train,  # no validation file: 10 % of the training texts are held out
        "validation_split_percentage": 10,
        "do_train": True,
        "do_eval": True,
        "output_dir": str(output_dir),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "block_size": 16,
        "max_eval_samples": 5,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "log_level": "warning",
        "teacher_weighting": "static",
        "teacher_weights": [3, 1],
    }
    path = tmp_path / f"args.{file_format}"
    path.write_text(json.dumps(arguments) if file_format == "json" else yaml.safe_dump(arguments))
    run_main([str(path)])

    results = check_results(output_dir, [Path(d).name for d in teacher_dirs[:2]])
    assert results["eval_samples"] == 5
    assert results[f"eval_teacher_weight/{Path(teacher_dirs[0]).name}"] == pytest.approx(0.75)  # static prior
    config = AutoConfig.from_pretrained(output_dir)
    teacher_config = AutoConfig.from_pretrained(teacher_dirs[1])
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 1, 16)
    assert config.vocab_size == teacher_config.vocab_size  # aligned with the teachers despite the override
    card = (output_dir / "README.md").read_text()
    assert f"# {path}:" in card  # the arguments file is shown with the command
    assert all(f"# {line}" in card for line in path.read_text().splitlines())


def test_dataset_name_can_be_a_local_directory_of_data_files(tmp_path, teacher_dirs, student_dir, text_files):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for path in text_files["jsonl"]:
        (data_dir / Path(path).name).write_text(Path(path).read_text())
    output_dir = tmp_path / "out"
    run_main(
        ["--teacher_model_name_or_path", teacher_dirs[0], "--model_name_or_path", student_dir,
         "--dataset_name", str(data_dir), "--do_eval", "--output_dir", str(output_dir), *QUICK]
    )  # fmt: skip
    results = check_results(output_dir, [Path(teacher_dirs[0]).name], trained=False)
    assert "train_loss" not in results
    assert "dataset:\n      name: " + str(data_dir) in (output_dir / "README.md").read_text()


def test_streaming_holds_out_texts_for_evaluation(tmp_path, teacher_dirs, student_dir, text_files):
    output_dir = tmp_path / "out"
    run_main(
        ["--teacher_model_name_or_path", teacher_dirs[0], "--model_name_or_path", student_dir, "--train_file",
         text_files["jsonl"][0], "--streaming", "--max_eval_samples", "12", "--do_train", "--do_eval",
         "--output_dir", str(output_dir), *QUICK]
    )  # fmt: skip
    results = check_results(output_dir, [Path(teacher_dirs[0]).name], trained=False)
    assert math.isfinite(results["train_loss"]) and "train_samples" not in results  # a stream has no length
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 6


def test_group_texts_cuts_blocks_and_copies_labels():
    blocks = group_texts(
        {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]], "attention_mask": [[1] * 3, [1] * 2, [1] * 4]}, 4
    )
    assert blocks["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]  # the remainder (9) is dropped
    assert blocks["labels"] == blocks["input_ids"] and blocks["labels"][0] is not blocks["input_ids"][0]
    assert blocks["attention_mask"] == [[1] * 4] * 2


ARGUMENT_ERRORS = {  # arguments ({teacher}, {student}, {txt} and {csv} filled in) -> what the message says
    "no-teachers": ("--model_name_or_path {student} --train_file {txt}", "No teacher given"),
    "missing-teacher": (
        "--teacher_model_name_or_path /no/such/teacher --train_file {txt}",
        "error: Teacher '/no/such/teacher' cannot be loaded: it is neither a local directory nor a valid Hub model "
        "id. Give a local directory holding a model (config.json and weights) or a Hub model id",
    ),
    "missing-train-file": (
        "--teacher_model_name_or_path {teacher} --train_file /no/such/train.txt",
        "error: --train_file '/no/such/train.txt' does not exist: give the path of an existing .txt, .json, .jsonl, "
        ".csv or .parquet file.",
    ),
    "mixed-formats": (
        "--teacher_model_name_or_path {teacher} --train_file {txt} --validation_file {csv}",
        "have different formats; give both as .txt",
    ),
    "unknown-format": (
        "--teacher_model_name_or_path {teacher} --train_file corpus.xlsx",
        "should be a .txt, .json, .jsonl, .csv, .parquet file, got .xlsx",
    ),
    "no-data": ("--teacher_model_name_or_path {teacher}", "No data given"),
    "no-student": ("--teacher_model_name_or_path {teacher} --train_file {txt} --do_train", "No student given"),
    "unknown-column": (
        "--teacher_model_name_or_path {teacher} --model_name_or_path {student} --train_file {txt} "
        "--text_column_name body",
        "--text_column_name 'body' is not a column of the data",
    ),
    "teacher-names": (
        "--teacher_model_name_or_path {teacher} --model_name_or_path {student} --train_file {txt} --teacher_names a b",
        "`teacher_names` has 2 entries but there are 1 teachers",
    ),
    "invalid-setting": (
        "--teacher_model_name_or_path {teacher} --train_file {txt} --temperature 0",
        "`temperature` must be > 0",
    ),
    "pruned-and-given-student": (
        "--teacher_model_name_or_path {teacher} --model_name_or_path {student} --train_file {txt} "
        "--student_from_teacher_layers 2",
        "--student_from_teacher_layers cuts the student from the first teacher; leave out --model_name_or_path",
    ),
    "pruned-too-deep": (
        "--teacher_model_name_or_path {teacher} --train_file {txt} --do_train --student_from_teacher_layers 9",
        "A student cut from a teacher of 4 layers keeps 1 to 4 layers, not 9.",
    ),
    "typo": (
        "--teacher_model_name_or_path {teacher} --train_file {txt} --tempreature 2",
        "not used by the HfArgumentParser: ['--tempreature', '2']",
    ),
}


@pytest.mark.parametrize(("template", "message"), ARGUMENT_ERRORS.values(), ids=ARGUMENT_ERRORS.keys())
def test_argument_errors_exit_with_a_message(
    template, message, tmp_path, teacher_dirs, student_dir, text_files, capsys
):
    paths = {
        "teacher": teacher_dirs[0],
        "student": student_dir,
        "txt": text_files["txt"][0],
        "csv": text_files["csv"][1],
    }
    args = [*template.format(**paths).split(), "--output_dir", str(tmp_path / "out"), *QUICK]
    with pytest.raises(SystemExit) as exit_info, isolated_logging():
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_student_cut_from_the_first_teacher(tmp_path, teacher_dirs, text_files):
    train, validation = text_files["txt"]
    output_dir = tmp_path / "out"
    run_main([
        "--teacher_model_name_or_path", *teacher_dirs[:2], "--student_from_teacher_layers", "0", "3",
        "--train_file", train, "--validation_file", validation, "--do_train", "--do_eval",
        "--output_dir", str(output_dir), *QUICK,
    ])  # fmt: skip
    check_results(output_dir, [Path(d).name for d in teacher_dirs[:2]])
    student = AutoModelForCausalLM.from_pretrained(output_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dirs[0])
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 2
    assert student.config.n_embd == teacher.config.n_embd
    assert f"`{teacher_dirs[0]}, cut to its layers [0, 3]`" in (output_dir / "README.md").read_text()


def test_an_argument_error_prints_no_traceback(tmp_path, text_files):
    result = run_subprocess(
        sys.executable, "examples/run_clm_distill.py", "--teacher_model_name_or_path", str(tmp_path / "missing"),
        "--train_file", text_files["txt"][0], "--output_dir", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"error: Teacher '{tmp_path / 'missing'}' cannot be loaded" in result.stderr


def test_cli_version_help_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"hf-mtkd {hf_mtkd.__version__}"
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert "distill" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["distill", "--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0 and help_text.startswith("usage: hf-mtkd distill")
    for flag in ("--teacher_model_name_or_path", "--do_generate_eval", "--alpha_kd", "--train_file", "--block_size"):
        assert flag in help_text
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["distil"])
    assert exit_info.value.code == 2 and "invalid choice: 'distil'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_main([])
    assert exit_info.value.code == 2 and "distill" in capsys.readouterr().out


def readme_section_commands() -> list[str]:
    """The bash blocks of the example-script guide (docs/example_script.md, linked from the README)."""
    guide = (ROOT / "docs" / "example_script.md").read_text()
    return re.findall(r"```bash\n(.*?)```", guide, flags=re.S)


def test_readme_front_page_command_is_valid_arguments():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Distill from the command line\n")[1].split("\n## ")[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    args = shlex.split(block.split("hf-mtkd distill", 1)[1].replace("\\\n", " "))
    model_args, data_args, _, training_args = parse_args(build_parser(), args)
    assert len(model_args.teacher_model_name_or_path) == 2 and training_args.teacher_weighting == "entropy"
    assert data_args.dataset_config_name == "wikitext-2-raw-v1" and training_args.do_train


def test_readme_commands_are_valid_arguments(tmp_path, monkeypatch):
    offline, hub = readme_section_commands()
    monkeypatch.chdir(tmp_path)  # the offline command's data files must exist: parsing checks them
    (tmp_path / "tiny").mkdir()
    for name in ("train.txt", "validation.txt"):
        (tmp_path / "tiny" / name).write_text("some text\n")
    for block, program in ((offline, "python examples/run_clm_distill.py"), (hub, "hf-mtkd distill")):
        args = shlex.split(block.rsplit(program, 1)[1].replace("\\\n", " "))
        model_args, data_args, _, training_args = parse_args(build_parser(), args)
        assert len(model_args.teacher_model_name_or_path) == 2
        assert training_args.do_train and training_args.do_eval
    assert data_args.dataset_config_name == "wikitext-2-raw-v1" and training_args.push_to_hub


@pytest.mark.slow
def test_readme_offline_example_runs(tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    offline, _ = readme_section_commands()
    result = subprocess.run(["bash", "-c", offline], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "tiny" / "distilled" / "all_results.json").read_text())
    assert results["perplexity"] < 50  # an untrained student is at ~400 (the vocabulary size)
    # after 100 steps the greedy student may still repeat "." (ROUGE-L 0); the fitted teachers continue in words
    assert 0 <= results["generate_rougeL"] <= 1 and results["generate_samples"] == 64
    assert results["generate_teacher_rougeL/teacher-gpt2"] > 0 and results["generate_teacher_rougeL/teacher-llama"] > 0


def test_cache_teachers_then_distill_from_the_cache(
    tmp_path, teacher_dirs, student_dir, text_files, monkeypatch, capsys
):
    train, validation = text_files["txt"]
    cache = tmp_path / "cache"
    data = ["--train_file", train, "--validation_file", validation, "--teacher_logits_cache", str(cache)]
    with isolated_logging():  # no student: the data is tokenized with the first teacher's tokenizer
        cli_main([
            "cache-teachers", "--teacher_model_name_or_path", *teacher_dirs[:2], "--teacher_names", "a", "b",
            "--teacher_logits_top_k", "8", *data, "--output_dir", str(tmp_path / "unused"), *QUICK,
        ])  # fmt: skip
    manifests = {split: json.loads((cache / split / "manifest.json").read_text()) for split in ("train", "validation")}
    assert {m["k"] for m in manifests.values()} == {8}
    assert [t["name"] for t in manifests["train"]["teachers"]] == ["a", "b"]
    assert not (tmp_path / "unused").exists()  # nothing trained

    def no_teacher_runs(*args, **kwargs):
        raise AssertionError("a teacher ran although the cache is complete")

    monkeypatch.setattr(hf_mtkd.teacher_cache, "teacher_forward", no_teacher_runs)
    monkeypatch.setattr(hf_mtkd.sources, "teacher_forward", no_teacher_runs)
    output_dir = tmp_path / "out"
    # The same content from other paths: the teachers relative to another directory, the student's tokenizer (with
    # the same vocabulary). The cache is reused, not refused as stale.
    monkeypatch.chdir(Path(teacher_dirs[0]).parent)
    relative = [os.path.relpath(path) for path in teacher_dirs[:2]]
    run_main([
        "--teacher_model_name_or_path", *relative, "--teacher_names", "a", "b", "--model_name_or_path",
        student_dir, "--teacher_logits_top_k", "8", *data, "--do_train", "--do_eval", "--output_dir",
        str(output_dir), *QUICK,
    ])  # fmt: skip
    check_results(output_dir, ["a", "b"])
    assert "teacher `a`" in (output_dir / "README.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info, isolated_logging():  # a real change: refused in one line, early
        cli_main([
            "distill", "--teacher_model_name_or_path", *relative, "--teacher_logits_top_k", "4", *data,
            "--model_name_or_path", student_dir, "--do_train", "--output_dir", str(tmp_path / "stale"), *QUICK,
        ])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    stale = f"error: The teacher-logits cache in {cache / 'train'} was computed from other inputs than those given now"
    assert f"{stale}: k: cache 8, now 4. Give the same teachers" in err
    with pytest.raises(SystemExit), isolated_logging():
        cli_main(["cache-teachers", "--teacher_model_name_or_path", teacher_dirs[0], "--train_file", train])


@pytest.mark.parametrize("outcome", ["returns", "raises"])
@pytest.mark.parametrize("started_by", ["main", "caller"])
def test_main_destroys_the_process_group_it_started(tmp_path, monkeypatch, started_by, outcome):
    """
    Under a launcher, parsing the arguments (`TrainingArguments`) starts the process group; main destroys it on the
    way out, after a barrier when it returns, without one when it raises (torch's shutdown; docs/scaling.md, "The
    gloo abort in the CPU tests"). A group the caller started before main stays the caller's.
    """
    import torch.distributed as dist

    def start_group():  # a one-process gloo group, as a launcher's environment would start
        store = dist.FileStore(str(tmp_path / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)

    def run(args, prog, cache_only):
        if started_by == "main":
            start_group()
        if outcome == "raises":
            raise SystemExit(2)  # as an argument error does

    barriers = []
    monkeypatch.setattr(hf_mtkd.run_clm_distill, "_main", run)
    monkeypatch.setattr(dist, "barrier", lambda *args, **kwargs: barriers.append(dist.is_initialized()))
    if started_by == "caller":
        start_group()
    try:
        with pytest.raises(SystemExit) if outcome == "raises" else contextlib.nullcontext():
            main(["--output_dir", str(tmp_path / "out")])
        assert dist.is_initialized() is (started_by == "caller")
        assert barriers == ([True] if started_by == "main" and outcome == "returns" else [])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
