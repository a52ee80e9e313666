"""The model card of a distilled student, rendered from real runs, and what `push_to_hub` uploads."""

import contextlib
import dataclasses
import json
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from unittest import mock

import huggingface_hub._upload_pipeline
import huggingface_hub.constants
import pytest
import torch
import transformers.trainer
import yaml
from huggingface_hub import HfApi, ModelCard, RepoUrl
from peft import LoraConfig, get_peft_model
from test_run_clm_distill import QUICK, run_main, run_subprocess
from trainer_helpers import tiny_config
from transformers import AutoModelForCausalLM, TrainingArguments
from transformers.utils.hub import hf_api

from hf_mtkd import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer
from hf_mtkd.hub import ignored_on_upload
from hf_mtkd.model_card import human_count, is_hub_model_id, load_template
from hf_mtkd.parameters import count_parameters
from hf_mtkd.trainer import PROJECTOR_WEIGHTS_NAME
from hf_mtkd.weighting import (
    WEIGHTING_SUMMARIES,
    WEIGHTINGS,
    TeacherSignals,
    WeightingParameters,
    describe_weighting,
)

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "me/tiny-distilled"


@contextlib.contextmanager
def recorded_hub():
    """The real `huggingface_hub` upload code, online, with only its network calls (the token check, repo creation,
    YAML validation on the server, the commit) replaced by recorders."""
    calls = {"repos": [], "readmes": [], "uploads": []}

    def whoami(self, *args, **kwargs):
        return {"name": REPO_ID.split("/")[0], "orgs": [], "auth": {"accessToken": {"role": "write"}}}

    def create_repo(self, repo_id, **kwargs):
        calls["repos"].append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def validate_yaml(self, content, **kwargs):
        calls["readmes"].append(content)

    def create_commit(self, *, operations, **kwargs):
        calls["uploads"].append(sorted(op.path_in_repo for op in operations))

    def pipelined_upload(api, *, add_operations, delete_operations, **kwargs):  # the path taken with hf_xet
        calls["uploads"].append(sorted(op.path_in_repo for op in [*add_operations, *delete_operations]))

    with (
        mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", False),
        mock.patch.object(HfApi, "whoami", whoami),
        mock.patch.object(HfApi, "create_repo", create_repo),
        mock.patch.object(HfApi, "_validate_yaml", validate_yaml),
        mock.patch.object(HfApi, "create_commit", create_commit),
        mock.patch.object(huggingface_hub._upload_pipeline, "pipelined_upload", pipelined_upload),
    ):
        yield calls


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def table_row(card: str, first_cell: str) -> list[str]:
    """The cells of the Markdown table row whose first cell is `first_cell`."""
    for line in card.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in the card")


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory, teacher_dirs, student_dir, text_files):
    """The example script, run for real with `--push_to_hub` (network calls recorded), and what it left behind."""
    output_dir = tmp_path_factory.mktemp("pushed") / "tiny-distilled"
    train, validation = text_files["txt"]
    args = [
        "--teacher_model_name_or_path", *teacher_dirs, "--teacher_names", "gpt2", "llama", "neox",
        "--model_name_or_path", student_dir, "--train_file", train, "--validation_file", validation,
        "--do_train", "--do_eval", "--do_generate_eval", "--generate_eval_samples", "8", "--generate_prompt_length",
        "4", "--generate_max_new_tokens", "6", "--alpha_feat", "0.1", "--output_dir", str(output_dir),
        "--push_to_hub", "--hub_model_id", REPO_ID, *QUICK,
    ]  # fmt: skip
    with recorded_hub() as calls:
        run_main(args)
    card = (output_dir / "README.md").read_text()
    results = json.loads((output_dir / "all_results.json").read_text())
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {"dir": output_dir, "card": card, "results": results, "state": state, "calls": calls, "args": args}


def test_card_front_matter(pushed_run):
    card, results = pushed_run["card"], pushed_run["results"]
    meta = front_matter(card)
    assert ModelCard(card).data.to_dict() == meta  # valid metadata for huggingface_hub too
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"knowledge-distillation", "hf-mtkd"} <= set(meta["tags"])
    assert "base_model" not in meta  # the teachers are local directories, not Hub repos
    (model_index,) = meta["model-index"]
    assert model_index["name"] == "tiny-distilled"
    (result,) = model_index["results"]
    assert result["task"]["type"] == "text-generation"
    assert result["dataset"] == {"name": "validation.txt", "type": "custom", "split": "validation"}
    metrics = {metric["type"]: metric["value"] for metric in result["metrics"]}
    assert metrics == {
        "perplexity": round(results["eval_perplexity"], 4),
        "bleu": round(results["generate_bleu"], 4),
        "rouge": round(results["generate_rougeL"], 4),
    }


def test_card_body(pushed_run, teacher_dirs, student_dir):
    card, results, state = pushed_run["card"], pushed_run["results"], pushed_run["state"]
    student_size = AutoModelForCausalLM.from_pretrained(pushed_run["dir"]).num_parameters()
    assert student_size == AutoModelForCausalLM.from_pretrained(student_dir).num_parameters()
    last_train_log = [log for log in state["log_history"] if "loss" in log][-1]
    teacher_sizes = []
    for name, path in zip(["gpt2", "llama", "neox"], teacher_dirs, strict=True):
        size = AutoModelForCausalLM.from_pretrained(path).num_parameters()
        teacher_sizes.append(size)
        assert table_row(card, f"teacher `{name}`") == [
            f"teacher `{name}`",
            f"`{path}`",
            human_count(size),
            f"{size / student_size:.3g}x",
            f"{last_train_log[f'teacher_weight/{name}']:.4g}",
            f"{results[f'eval_teacher_weight/{name}']:.4g}",
        ]
        bleu, rouge = results[f"generate_teacher_bleu/{name}"], results[f"generate_teacher_rougeL/{name}"]
        assert table_row(card, f"teacher `{name}`")[0] in card.split("### Generation quality")[1]
        assert f"| teacher `{name}` | {bleu:.4g} | {rouge:.4g} |" in card
    assert table_row(card, "**student** (Qwen2ForCausalLM)")[1:4] == [
        f"`{student_dir}`",
        human_count(student_size),
        "1x",
    ]
    assert f"**{max(teacher_sizes) / student_size:.3g}x** fewer parameters" in card
    assert f"| student | {results['generate_bleu']:.4g} | {results['generate_rougeL']:.4g} |" in card
    assert "computed with\nsacrebleu+rouge_score" in card and "continued 8 held-out prompts" in card
    for metric in ("perplexity", "loss_ce", "loss_kd", "loss_feat"):
        assert table_row(card, metric) == [metric, f"{results[f'eval_{metric}']:.4g}"]
    assert table_row(card, "`alpha_feat`") == ["`alpha_feat`", "0.1"]
    assert table_row(card, "`teacher_weighting`") == ["`teacher_weighting`", "posterior"]
    assert f"Trained for 6 optimizer steps ({state['epoch']:.4g} epochs)." in card
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}")' in card
    assert "they are not uploaded to the Hub" in card
    command = card.split("## Training command\n\n```bash\n")[1].split("\n```")[0]
    assert command == shlex.join(["python", "-m", "hf_mtkd.run_clm_distill", *pushed_run["args"]])


def test_push_uploads_the_student_and_card_without_projections(pushed_run):
    calls, output_dir = pushed_run["calls"], pushed_run["dir"]
    assert calls["repos"] == [REPO_ID]
    assert (output_dir / PROJECTOR_WEIGHTS_NAME).is_file()  # written beside the student, but ...
    assert len(calls["uploads"]) == 2  # save_model() pushes, then the final push with the full card
    for upload in calls["uploads"]:
        assert PROJECTOR_WEIGHTS_NAME not in upload  # ... never uploaded
        assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(
            upload
        )
    assert {"all_results.json", "generate_results.json"} <= set(calls["uploads"][-1])
    assert calls["readmes"][-1] == pushed_run["card"]
    assert "upload_folder" not in vars(hf_api())  # the upload filter is gone after the push


@pytest.fixture
def make_trainer(tmp_path, make_student, teacher_dirs, dataset, tokenizer):
    def make(student=None, teachers=None, **config):
        return MultiTeacherDistillationTrainer(
            model=student or make_student(),
            teachers=teachers or teacher_dirs[:2],
            args=tiny_config(tmp_path, max_steps=1, **config),
            train_dataset=dataset,
            processing_class=tokenizer,
        )

    return make


@pytest.mark.parametrize("push_projector", [False, True])
def test_push_projector_only_on_request(push_projector, make_trainer):
    trainer = make_trainer(alpha_feat=0.1, push_projector=push_projector, hub_model_id=REPO_ID)
    trainer.train()
    with recorded_hub() as calls:
        trainer.push_to_hub()
    (upload,) = calls["uploads"]
    assert "model.safetensors" in upload and "README.md" in upload
    assert (PROJECTOR_WEIGHTS_NAME in upload) == push_projector
    card = Path(trainer.args.output_dir, "README.md").read_text()
    assert ("they are uploaded with the student" in card) == push_projector


def test_hub_teachers_and_datasets_go_into_the_front_matter(make_trainer, teacher_dirs):
    teachers = [AutoModelForCausalLM.from_pretrained(path) for path in teacher_dirs[:2]]
    for teacher, repo in zip(teachers, ["org/teacher-a", "org/teacher-b"], strict=True):
        teacher.config._name_or_path = repo  # as `from_pretrained("org/teacher-a")` leaves it
    trainer = make_trainer(teachers=teachers)
    trainer.create_model_card(dataset_tags=["Salesforce/wikitext", trainer.args.output_dir], tags="mine")
    card = Path(trainer.args.output_dir, "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == ["org/teacher-a", "org/teacher-b"]
    assert meta["datasets"] == ["Salesforce/wikitext"]  # a local directory is no Hub dataset
    assert meta["tags"] == ["knowledge-distillation", "hf-mtkd", "mine"]
    assert "model-index" not in meta and "No evaluation was run." in card
    assert "### Generation quality" not in card and "## Training command" not in card
    assert f"| teacher `{trainer.teacher_names[0]}` | `org/teacher-a` |" in card


def test_peft_student_card_loads_the_adapter(make_trainer, make_student):
    student = get_peft_model(
        make_student(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    trainer = make_trainer(student=student)
    trainer.create_model_card()
    card = Path(trainer.args.output_dir, "README.md").read_text()
    assert front_matter(card)["library_name"] == "peft"
    assert "AutoPeftModelForCausalLM.from_pretrained(" in card
    assert table_row(card, "**student** (Qwen2ForCausalLM)")[2] == human_count(count_parameters(student))


@pytest.mark.parametrize(
    ("name", "expected"),
    [("gpt2", True), ("openai-community/gpt2", True), ("/tmp/teacher", False), ("a/b/c", False), ("", False)],
)
def test_is_hub_model_id(name, expected):
    assert is_hub_model_id(name) is expected


def test_is_hub_model_id_refuses_local_directories(tmp_path, monkeypatch):
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_model_id("org/model")


def test_template_ships_in_the_wheel_and_matches_model_cards(tmp_path):
    """`pip install .` (not editable) gets the template and the console script (offline: setuptools>=70.1 builds)."""
    assert (ROOT / "model_cards" / "distilled_student.md").read_text() == load_template()
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "hf_mtkd", source / "hf_mtkd", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("hf_mtkd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("hf_mtkd/templates/distilled_student.md").decode() == load_template()
        (entry_points,) = [name for name in archive.namelist() if name.endswith("entry_points.txt")]
        assert "hf-mtkd = hf_mtkd.cli:main" in archive.read(entry_points).decode()


def test_upload_filter_covers_both_transformers_upload_paths(monkeypatch):
    calls = []

    def upload_folder(**kwargs):
        calls.append(kwargs["ignore_patterns"])

    # transformers >= 5.1x uploads through the shared `hf_api()` instance; blocks may nest.
    monkeypatch.setattr(hf_api(), "upload_folder", upload_folder)
    with ignored_on_upload(["a"]), ignored_on_upload(["b"]):
        hf_api().upload_folder(folder_path=".", ignore_patterns="_*")
    assert calls.pop() == ["_*", "b", "a"] and hf_api().upload_folder is upload_folder
    # Older 5.x releases call `huggingface_hub.upload_folder`, imported into `transformers.trainer`.
    monkeypatch.delattr(transformers.trainer, "hf_api")
    monkeypatch.setattr(transformers.trainer, "upload_folder", upload_folder, raising=False)
    with ignored_on_upload(["a"]):
        transformers.trainer.upload_folder(folder_path=".", ignore_patterns=["_*", "checkpoint-*"])
    assert calls.pop() == ["_*", "checkpoint-*", "a"] and transformers.trainer.upload_folder is upload_folder


def test_card_settings_are_the_configs_distillation_fields(make_trainer):
    trainer = make_trainer(
        teacher_weighting="posterior",
        label_temperature=0.5,
        posterior_decay=0.8,
        min_weight=0.05,
        weighting_granularity="sequence",
        teacher_model_init_kwargs={"revision": "main", "token": "not-for-the-card"},
    )
    trainer.create_model_card()
    card = Path(trainer.args.output_dir, "README.md").read_text()
    settings = card.split("## Distillation settings")[1].split("Trained for")[0]
    listed = [line.split("|")[1].strip().strip("`") for line in settings.splitlines() if line.startswith("| `")]
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    added = [f.name for f in dataclasses.fields(MultiTeacherDistillationConfig) if f.name not in inherited]
    assert listed == [*added, "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
                      "per_device_train_batch_size", "gradient_accumulation_steps", "seed"]  # fmt: skip
    expected = {"label_temperature": "0.5", "posterior_decay": "0.8", "min_weight": "0.05", "cross_tokenizer": "auto",
                "cross_tokenizer_loss": "kl", "teacher_weighting": "posterior"}  # fmt: skip
    for name, value in expected.items():
        assert table_row(card, f"`{name}`") == [f"`{name}`", value]
    assert table_row(card, "`teacher_model_init_kwargs`")[1] == "{'revision': 'main', 'token': '<redacted>'}"
    assert "not-for-the-card" not in card
    summary = "dynamic teacher weights from each teacher's track record on the document, per sequence"
    assert "feature alignment" not in card.split("## Teachers")[0] and f"and {summary})" in card
    assert "static" not in card.split("## Teachers")[0]


def test_every_weighting_is_described_as_static_or_dynamic():
    assert set(WEIGHTING_SUMMARIES) == set(WEIGHTINGS)
    for name in WEIGHTINGS:
        described = describe_weighting(name, "token")
        # a weighting is static exactly when its scores ignore the teachers' signals
        signals = TeacherSignals(
            entropy=torch.rand(2, 5, dtype=torch.float64),
            target_log_prob=-torch.rand(2, 5, dtype=torch.float64),
            mask=torch.ones(1, 5, dtype=torch.bool),
        )
        static = not WEIGHTINGS[name](signals, WeightingParameters()).any()
        assert described.startswith("static" if static else "dynamic"), (name, described)
        assert described.endswith(", per token") != static
        prompted = describe_weighting(name, "token", prompt=True)
        assert prompted == f"{described}, times each teacher's likelihood of the document's prompt"


ZERO3_CARD = """
import os, socket, sys
with socket.socket() as free:
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
import deepspeed, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig
from hf_mtkd import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer
teacher_dir, student_dir, output_dir = sys.argv[1:]
deepspeed.init_distributed(dist_backend="gloo")
zero3 = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
teacher, student = (AutoModelForCausalLM.from_pretrained(path) for path in (teacher_dir, student_dir))  # partitioned
del zero3
assert sum(p.numel() for p in [*teacher.parameters(), *student.parameters()]) == 0
args = MultiTeacherDistillationConfig(output_dir=output_dir, report_to="none", use_cpu=True)
trainer = MultiTeacherDistillationTrainer(
    model=student, teachers=[teacher], args=args, processing_class=AutoTokenizer.from_pretrained(student_dir)
)
trainer.create_model_card()
torch.distributed.destroy_process_group()
"""


def test_card_counts_zero3_partitioned_parameters_in_full(tmp_path, teacher_dirs, student_dir):
    """Under ZeRO-3 (a real partitioning, one process) a parameter's numel() is 0; the card counts its full size."""
    result = run_subprocess(sys.executable, "-c", ZERO3_CARD, teacher_dirs[0], student_dir, str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    card = (tmp_path / "README.md").read_text()
    teacher_size = AutoModelForCausalLM.from_pretrained(teacher_dirs[0]).num_parameters()
    student_size = AutoModelForCausalLM.from_pretrained(student_dir).num_parameters()
    name = Path(teacher_dirs[0]).name
    ratio = f"{teacher_size / student_size:.3g}x"
    assert table_row(card, f"teacher `{name}`")[2:4] == [human_count(teacher_size), ratio]
    assert table_row(card, "**student** (Qwen2ForCausalLM)")[2] == human_count(student_size)
    assert f"**{ratio}** fewer parameters" in card
