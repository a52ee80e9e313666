"""The model card of a distilled student: what it was distilled from, how, and how well it does.

The template is `hf_mtkd/templates/distilled_student.md` (also at `model_cards/distilled_student.md` in the
repository): Markdown with YAML front matter, rendered with Jinja2 through `huggingface_hub.ModelCard`.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Sequence
from importlib import metadata, resources
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import Trainer, TrainingArguments

from .parameters import count_parameters
from .redaction import redact
from .version import __version__
from .weighting import describe_weighting

TEMPLATE_NAME = "distilled_student.md"
CARD_TAGS = ("knowledge-distillation", "hf-mtkd")
"""Tags every distilled student's card carries."""
OPTIMIZATION_SETTINGS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
)
"""`TrainingArguments` fields listed under "Distillation settings" after the distillation fields themselves."""
EVAL_METRICS = ("perplexity", "loss", "loss_ce", "loss_kd", "loss_feat")
"""Evaluation metrics shown in the card, in this order, when they were logged."""


def load_template() -> str:
    """The model card template shipped with the package."""
    return resources.files("hf_mtkd").joinpath("templates", TEMPLATE_NAME).read_text(encoding="utf-8")


def is_hub_model_id(name: str) -> bool:
    """Whether `name` reads as a Hub repository id (and is not a local directory)."""
    if not name or os.path.isdir(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def distillation_fields(args: TrainingArguments) -> list[str]:
    """The fields `args`' class adds to `TrainingArguments` (for `MultiTeacherDistillationConfig`: every distillation
    setting), in their declaration order."""
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    return [f.name for f in dataclasses.fields(args) if f.name not in inherited]


def human_count(num: int) -> str:
    """1234567 -> '1.23M'."""
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if num >= threshold:
            return f"{num / threshold:.3g}{suffix}"
    return str(num)


def _format(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:  # the field's default behaviour (uniform prior, default layer pairs, ...)
        return "default"
    return str(value)


def _on_policy_note(trainer: Any) -> str | None:
    """Who wrote the training completions, when the student or a teacher did (`lmbda`, `seq_kd`)."""
    generator, args = getattr(trainer, "on_policy", None), trainer.args
    if generator is None:
        return None
    writers = []
    if args.lmbda > 0:
        writers.append(f"the student wrote the completions of a share lmbda = {args.lmbda:g} of the training batches")
    if generator.teacher is not None and args.lmbda < 1:
        batches = "those of the others" if writers else "the completions of every training batch"
        writers.append(f"the teacher `{generator.names[generator.teacher]}` wrote {batches} (seq_kd)")
    return f"On-policy distillation: {', '.join(writers)}; every teacher scored them."


def _last_log(log_history: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """The last logged entry holding `key` (empty when none does)."""
    return next((log for log in reversed(log_history) if key in log), {})


def create_model_card(
    trainer: Trainer,
    *,
    model_name: str | None = None,
    language: str | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    finetuned_from: str | None = None,
    tasks: str | list[str] | None = None,
    dataset_tags: str | list[str] | None = None,
    dataset: str | list[str] | None = None,
    dataset_args: str | list[str] | None = None,
) -> ModelCard:
    """
    Render the card of `trainer`'s student from its teachers, configuration, logs and generation results.

    Args:
        trainer: a `MultiTeacherDistillationTrainer` after (or during) distillation (this module reads its
            `teacher_records`, `teacher_names`, `projector`, `generation_metrics` and `training_command`, and is
            imported by the trainer, not the other way round).
        model_name: the card's title and model-index name; defaults to the output directory's name.
        language, license: front matter fields.
        tags: extra tags (the card always has `knowledge-distillation` and `hf-mtkd`).
        finetuned_from: what the student was initialised from (a name or path), if anything.
        tasks: the Hub pipeline tag (the first one when several); default `text-generation`.
        dataset_tags: Hub dataset id(s) trained on, for the `datasets` front matter.
        dataset: how to name the evaluation data in the card; dataset_args: its configuration name.
    """
    args = trainer.args
    student = trainer.accelerator.unwrap_model(trainer.model)
    log_history = trainer.state.log_history
    model_name = model_name or os.path.basename(os.path.normpath(args.output_dir))
    repo_id = trainer.hub_model_id or args.hub_model_id or args.output_dir

    student_parameters = count_parameters(student)
    if trainer.projector is not None:  # attached to the student for training, but not part of it
        student_parameters -= count_parameters(trainer.projector)
    train_log, eval_log = _last_log(log_history, "loss"), _last_log(log_history, "eval_loss")
    teachers = []
    for record in trainer.teacher_records:
        name, name_or_path, parameters = record["name"], record["name_or_path"], record["num_parameters"]
        teachers.append(
            {
                "name": name,
                "name_or_path": name_or_path,
                "source": f"`{name_or_path}`" if name_or_path else f"a {record['class']} in memory",
                "parameters": human_count(parameters),
                "num_parameters": parameters,
                "ratio": f"{parameters / student_parameters:.3g}x",
                "train_weight": _format(train_log.get(f"teacher_weight/{name}", "-")),
                "eval_weight": _format(eval_log.get(f"eval_teacher_weight/{name}", "-")),
            }
        )
    largest_teacher = max(t["num_parameters"] for t in teachers)

    is_peft = hasattr(student, "peft_config")
    base_models = [t["name_or_path"] for t in teachers if is_hub_model_id(t["name_or_path"])]
    if is_peft:  # an adapter repo must name the model it adapts
        base_path = getattr(student.get_base_model().config, "name_or_path", "")
        base_models = [base_path] if is_hub_model_id(base_path) else []
    dataset_tags = [dataset_tags] if isinstance(dataset_tags, str) else list(dataset_tags or [])
    dataset_tags = [d for d in dataset_tags if is_hub_model_id(d)]
    eval_dataset = _join(dataset) or "the evaluation set"

    eval_metrics = [(name, _format(eval_log[f"eval_{name}"])) for name in EVAL_METRICS if f"eval_{name}" in eval_log]
    generation = _generation_section(trainer)
    eval_results = _eval_results(model_name, eval_log, generation, dataset_tags, eval_dataset, _join(dataset_args))

    card_data = ModelCardData(
        model_name=model_name,
        language=language,
        license=license,
        library_name="peft" if is_peft else "transformers",
        base_model=base_models or None,
        tags=list(dict.fromkeys([*CARD_TAGS, *([tags] if isinstance(tags, str) else tags or [])])),
        datasets=dataset_tags or None,
        pipeline_tag=(tasks if isinstance(tasks, str) else (tasks or [None])[0]) or "text-generation",
        eval_results=eval_results or None,
    )
    weighting_summary = describe_weighting(args.teacher_weighting, args.weighting_granularity, args.prompt_evidence)
    projector_note = None
    if trainer.projector is not None:
        projector_note = (
            "The feature-alignment projections used in training (`mtkd_projector.safetensors`) are only needed to "
            "continue distillation; "
            + ("they are uploaded with the student." if args.push_projector else "they are not uploaded to the Hub.")
        )
    return ModelCard.from_template(
        card_data,
        template_str=load_template(),
        model_name=model_name,
        repo_id=repo_id,
        is_peft=is_peft,
        teachers=teachers,
        student={
            "architecture": type(student.get_base_model() if is_peft else student).__name__,
            "source": f"`{finetuned_from}`" if finetuned_from else "initialised from a config",
            "parameters": human_count(student_parameters),
        },
        compression_ratio=f"{largest_teacher / student_parameters:.3g}x",
        alpha_feat=args.alpha_feat,
        teacher_weighting=args.teacher_weighting,
        weighting_summary=weighting_summary,
        eval_dataset=eval_dataset,
        eval_metrics=eval_metrics,
        generation=generation,
        settings=[
            (name, _format(redact(getattr(args, name))))
            for name in [*distillation_fields(args), *OPTIMIZATION_SETTINGS]
        ],
        global_step=trainer.state.global_step,
        epoch=_format(trainer.state.epoch),
        projector_note=projector_note,
        on_policy=_on_policy_note(trainer),
        command=redact(trainer.training_command),  # also one a user set by hand
        versions=_versions(),
    )


def _join(value: str | list[str] | None) -> str | None:
    return ", ".join(value) if isinstance(value, list) else value


def _generation_section(trainer: Trainer) -> dict[str, Any] | None:
    """Rows (model, BLEU, ROUGE-L) of the last `evaluate_generation`, student first, or None when it was not run."""
    metrics = trainer.generation_metrics
    if not metrics:
        return None
    rows = [("student", _format(metrics["bleu"]), _format(metrics["rougeL"]))]
    for name in trainer.teacher_names:
        if f"teacher_bleu/{name}" in metrics:
            bleu, rouge = metrics[f"teacher_bleu/{name}"], metrics[f"teacher_rougeL/{name}"]
            rows.append((f"teacher `{name}`", _format(bleu), _format(rouge)))
    keys = ("bleu", "rougeL", "metrics_backend", "samples", "prompt_length", "max_new_tokens")
    return {"rows": rows, **{key: metrics[key] for key in keys}}


def _eval_results(
    model_name: str,
    eval_log: dict[str, Any],
    generation: dict[str, Any] | None,
    dataset_tags: list[str],
    dataset_name: str,
    dataset_config: str | None,
) -> list[EvalResult]:
    """model-index entries: the student's perplexity and, when measured, its BLEU and ROUGE-L."""
    metrics = []
    if "eval_perplexity" in eval_log:
        metrics.append(("perplexity", "Perplexity", eval_log["eval_perplexity"]))
    if generation is not None:
        metrics += [("bleu", "BLEU", generation["bleu"]), ("rouge", "ROUGE-L", generation["rougeL"])]
    return [
        EvalResult(
            task_type="text-generation",
            task_name="Causal language modeling",
            dataset_type=dataset_tags[0] if dataset_tags else "custom",
            dataset_name=dataset_name,
            dataset_config=dataset_config,
            dataset_split="validation",
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=round(float(value), 4),
        )
        for metric_type, metric_name, value in metrics
    ]


def _versions() -> list[tuple[str, str]]:
    versions = [("hf-mtkd", __version__)]
    for package in ("transformers", "torch", "datasets", "tokenizers"):
        try:
            versions.append((package, metadata.version(package)))
        except metadata.PackageNotFoundError:
            continue
    return versions
