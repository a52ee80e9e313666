"""
The logit-free path beside today's on a GPU, at LLM-like shapes with bf16 teachers, and both checked against the CPU
(issue 16, item 7). Two parts, each written to the report as soon as it is measured (a run cut short keeps them):

  exactness  tiny float64 models (a qwen2 student, gpt2 / llama / gpt_neox teachers, V = 32k, half of each row a
             prompt): one `training_step` of each path on the device and on the CPU; the largest relative
             difference of the loss, the student's gradients and the teachers' weights, device against CPU for
             each path and logit-free against today's on the device (float64: ~1e-12 expected), with entropy
             weights, with `posterior` (keys `posterior_...`) and with `posterior` and `prompt_evidence`
             (`prompt_...`).
  scale      a student shaped as Qwen2.5-0.5B (float32 weights, bf16 autocast, gradient checkpointing) and three
             bfloat16 teachers shaped as Qwen2.5-1.5B, Llama-3.2-1B and Qwen3-1.7B, all on a 152k vocabulary with
             random weights; per row (B, T, K, half of each row a masked prompt), one step's peak device memory
             above what the models hold and its median time, for plain fine-tuning of the student (HF Trainer),
             TRL's GKD (K = 1, where trl is installed), today's path (`logit_free="never"`), the logit-free one
             (`"always"`), both with entropy weights, and the logit-free one with `posterior` (the default weighting,
             made in the same pass, each teacher's head read once); a step that runs out of memory is reported as
             such. The two paths' losses on the same batch are compared too (bf16: rounding-level differences).

Every method's step is `Trainer.training_step` without an optimizer, inside the same autocast, as in
`benchmarks/bench_step.py`, whose CPU table this one extends to real sizes.

    bash benchmarks/gpu_check.sh                          # on a GPU machine (wheels from .whl/, if there)
    python benchmarks/gpu_check.py --output docs/gpu_check  # the same, where every dependency is installed
    python benchmarks/gpu_check.py --quick --device cpu     # a smoke run of both parts on the CPU, in seconds
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import transformers
from datasets import Dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)

from hf_mtkd import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer
from hf_mtkd.testing import synthetic_corpus, tiny_causal_lm, train_tiny_tokenizer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
try:  # optional: pip install "hf-mtkd[benchmark]" (gpu_check.sh installs it from .whl/ where it was carried)
    from trl.experimental.gkd import GKDConfig, GKDTrainer
except ImportError:
    GKDConfig = GKDTrainer = None

VOCAB = 152064
"""Qwen2.5's padded vocabulary."""

STUDENT = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
           "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True}  # fmt: skip
TEACHERS = [  # heterogeneous, as a user's three teachers would be
    {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
     "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True},
    {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True},
    {"model_type": "qwen3", "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
     "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True},
]  # fmt: skip
QUICK_STUDENT = {**STUDENT, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
QUICK_TEACHERS = [
    {**t, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
     "num_key_value_heads": 2, "head_dim": 16}
    for t in TEACHERS
]  # fmt: skip
METHODS = ("plain", "trl", "today", "free", "posterior")
"""`posterior`: the logit-free step with the package's default weighting (one pass, like `entropy`)."""


@dataclass(frozen=True)
class Row:
    batch_size: int
    seq_len: int
    num_teachers: int
    vocab_size: int = VOCAB
    prompt: float = 0.5
    """The fraction of each row that is a prompt (labels -100), as in chat data."""


SCALE = [Row(4, 2048, 1), Row(4, 2048, 3), Row(8, 4096, 3)]
"""Issue 16's shapes; the last is its headline (B = 8, T = 4096, V = 152k, K = 3), measured instead of derived."""
QUICK = [Row(1, 64, 1, vocab_size=2048), Row(2, 64, 3, vocab_size=2048)]


# ---- the device ----


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, Any]:
    """
    `ms`: the median time of `repeats` steps after a warm-up one; `peak_mib`: the step's peak allocated device memory
    above what was allocated before it (CUDA only); `oom`: the step ran out of device memory.
    """
    try:
        step()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            synchronize(device)
            times.append(1e3 * (time.perf_counter() - start))
    except torch.OutOfMemoryError:
        return {"ms": None, "peak_mib": None, "oom": True}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if device.type == "cuda" else None
    return {"ms": statistics.median(times), "peak_mib": peak, "oom": False}


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast, what `TrainingArguments(bf16=True)` gives a prepared model (called here without `train()`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


# ---- models, batches, steps ----


def causal_lm(
    shape: dict[str, Any], vocab_size: int, positions: int, dtype: torch.dtype, seed: int
) -> PreTrainedModel:
    """A randomly initialised model of `shape` (its config fields) on `vocab_size` tokens."""
    fields = {key: value for key, value in shape.items() if key != "model_type"}
    config = AutoConfig.for_model(
        shape["model_type"], vocab_size=vocab_size, max_position_embeddings=positions, use_cache=False, **fields
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def batch_of(row: Row, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, row.vocab_size, (row.batch_size, row.seq_len), generator=generator)
    labels = ids.clone()
    labels[:, : int(row.prompt * row.seq_len)] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def num_items(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def common_args(tmp: str, device: torch.device) -> dict[str, Any]:
    return {"output_dir": tmp, "report_to": "none", "use_cpu": device.type == "cpu", "disable_tqdm": True}


def distiller(
    student: torch.nn.Module,
    teachers: list[torch.nn.Module],
    tmp: str,
    device: torch.device,
    logit_free: str,
    weighting: str = "entropy",
    **settings: Any,
) -> MultiTeacherDistillationTrainer:
    args = MultiTeacherDistillationConfig(
        **common_args(tmp, device), temperature=2.0, teacher_weighting=weighting, logit_free=logit_free, **settings
    )
    return MultiTeacherDistillationTrainer(model=student, teachers=teachers, args=args)


def step_of(trainer: Trainer, batch: dict[str, torch.Tensor], bf16: bool) -> Callable[[], torch.Tensor]:
    """One forward and backward of `trainer` on `batch` (no optimizer), the gradients cleared after; its loss."""
    model, device = trainer.model, trainer.args.device
    inputs = {key: value.to(device) for key, value in batch.items()}
    items = num_items(batch)

    def step() -> torch.Tensor:
        try:
            with autocast(device, bf16):
                return trainer.training_step(model, dict(inputs), items)
        finally:
            model.zero_grad(set_to_none=True)

    return step


# ---- exactness: device against CPU, float64 ----


def exact_step(
    student: torch.nn.Module,
    teachers: list[torch.nn.Module],
    batch: dict,
    device: torch.device,
    logit_free: str,
    settings: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """The loss, the student's gradient (flattened) and the teachers' mean weights of one step on `device`."""
    student, teachers = copy.deepcopy(student), copy.deepcopy(teachers)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = distiller(student, teachers, tmp, device, logit_free, **settings)
        inputs = {key: value.to(trainer.args.device) for key, value in batch.items()}
        loss = trainer.training_step(trainer.model, inputs, num_items(batch))
        metrics = trainer._pop_metrics("train")
    weights = [value for key, value in sorted(metrics.items()) if key.startswith("teacher_weight/")]
    return {
        "loss": loss.detach().cpu().reshape(1),
        "grad": torch.cat([p.grad.detach().cpu().flatten() for p in student.parameters() if p.grad is not None]),
        "weights": torch.tensor(weights, dtype=torch.float64),
    }


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    return {
        key: float((a[key] - b[key]).abs().max() / b[key].abs().max().clamp_min(torch.finfo(b[key].dtype).tiny))
        for key in a
    }


EXACT_SETTINGS = {
    "": {"weighting": "entropy"},
    "posterior_": {"weighting": "posterior"},
    "prompt_": {"weighting": "posterior", "prompt_evidence": True},
}
"""
The settings the exactness part runs, by their keys' prefix: `posterior` runs along each document, its running sums
carried from chunk to chunk, on the device as on the CPU; `prompt_evidence` adds the teachers' heads at the prompt
positions (half of each row) and their sums per document.
"""


def exactness(device: torch.device, quick: bool, tokenizer: Any) -> dict[str, Any]:
    """Both paths on `device` and on the CPU, in float64, on the same models and batch; their relative differences."""
    vocab, length = (1024, 32) if quick else (32768, 256)
    kwargs = {"vocab_size": vocab, "max_positions": length}
    student = tiny_causal_lm("qwen2", tokenizer, hidden_size=64, num_layers=2, num_heads=4, **kwargs).double()
    teachers = [
        tiny_causal_lm(kind, tokenizer, hidden_size=96, num_layers=2, num_heads=4, seed=k + 1, **kwargs).double()
        for k, kind in enumerate(("gpt2", "llama", "gpt_neox"))
    ]
    batch = batch_of(Row(2, length, 3, vocab_size=vocab))
    runs = {
        (where, path, prefix): exact_step(student, teachers, batch, torch.device(where), path, settings)
        for where in dict.fromkeys(("cpu", device.type))
        for path in ("never", "always")
        for prefix, settings in EXACT_SETTINGS.items()
    }
    report: dict[str, Any] = {"vocab_size": vocab, "seq_len": length, "batch_size": 2, "num_teachers": 3}
    for prefix in EXACT_SETTINGS:
        for path, name in (("never", "today"), ("always", "free")):
            report[f"{prefix}{name}_device_vs_cpu"] = relative_difference(
                runs[device.type, path, prefix], runs["cpu", path, prefix]
            )
        report[f"{prefix}free_vs_today_on_device"] = relative_difference(
            runs[device.type, "always", prefix], runs[device.type, "never", prefix]
        )
    report["max"] = max(value for part in report.values() if isinstance(part, dict) for value in part.values())
    return report


# ---- scale: bf16 teachers at LLM-like shapes ----


@contextlib.contextmanager
def models_for(row: Row, device: torch.device, quick: bool) -> Iterator[tuple[PreTrainedModel, list]]:
    """The student (float32, gradient checkpointing) and `row.num_teachers` bf16 teachers, built on `device`."""
    student_shape, teacher_shapes = (QUICK_STUDENT, QUICK_TEACHERS) if quick else (STUDENT, TEACHERS)
    with device:
        student = causal_lm(student_shape, row.vocab_size, row.seq_len, torch.float32, seed=0)
        teachers = [
            causal_lm(shape, row.vocab_size, row.seq_len, torch.bfloat16, seed=k + 1).eval()
            for k, shape in enumerate(teacher_shapes[: row.num_teachers])
        ]
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # any 5.x
    try:
        yield student, teachers
    finally:
        del student, teachers
        if device.type == "cuda":
            torch.cuda.empty_cache()


def scale_row(row: Row, device: torch.device, repeats: int, quick: bool, tokenizer: Any) -> dict[str, Any]:
    """Every method's step time and peak memory on one row, and the two paths' losses compared."""
    batch = batch_of(row)
    result: dict[str, Any] = {**asdict(row), "valid_positions": num_items(batch)}
    with models_for(row, device, quick) as (student, teachers), tempfile.TemporaryDirectory() as tmp:
        result["student_params_m"] = sum(p.numel() for p in student.parameters()) / 1e6
        result["teacher_params_m"] = [round(sum(p.numel() for p in t.parameters()) / 1e6) for t in teachers]
        steps: dict[str, Callable[[], torch.Tensor]] = {
            "plain": step_of(Trainer(model=student, args=TrainingArguments(**common_args(tmp, device))), batch, True),
            "today": step_of(distiller(student, teachers, tmp, device, "never"), batch, True),
            "free": step_of(distiller(student, teachers, tmp, device, "always"), batch, True),
            "posterior": step_of(distiller(student, teachers, tmp, device, "always", "posterior"), batch, True),
        }
        if row.num_teachers == 1 and GKDTrainer is not None:
            # off-policy forward KL; bf16 left to the autocast every method runs in (TRL's default would wrap the
            # shared teacher's forward in its own)
            gkd_args = GKDConfig(
                **common_args(tmp, device), lmbda=0.0, beta=0.0, temperature=1.0, max_length=row.seq_len, bf16=False
            )
            gkd = GKDTrainer(
                model=student,
                teacher_model=teachers[0],
                args=gkd_args,
                train_dataset=Dataset.from_dict({"input_ids": batch["input_ids"].tolist()}),
                processing_class=tokenizer,
                data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            )
            steps["trl"] = step_of(gkd, batch, True)
        for name in METHODS:
            if name in steps:
                print(f"  {name} ...", file=sys.stderr, flush=True)
                result.update({f"{name}_{key}": value for key, value in measure(steps[name], device, repeats).items()})
        losses = {}
        for name in ("today", "free"):
            try:
                losses[name] = float(steps[name]())
            except torch.OutOfMemoryError:
                losses[name] = None
        result["today_loss"], result["free_loss"] = losses["today"], losses["free"]
    if None not in losses.values():
        result["free_vs_today_loss"] = abs(losses["free"] - losses["today"]) / abs(losses["today"])
    ms, free = result.get("posterior_ms"), result.get("free_ms")
    result["posterior_time_over_free"] = ms / free if ms is not None and free else None
    for name in ("today", "free", "trl", "posterior"):
        peak, plain = result.get(f"{name}_peak_mib"), result.get("plain_peak_mib")
        result[f"{name}_memory_over_plain"] = peak / plain if peak is not None and plain else None
        ms, today = result.get(f"{name}_ms"), result.get("today_ms")
        result[f"{name}_time_over_today"] = ms / today if ms is not None and today else None
    return result


# ---- report ----


def _cell(row: dict[str, Any], method: str, key: str) -> str:
    """A method's figure: '-' where it did not run (or, for memory, off CUDA), 'OOM' where it ran out of memory."""
    if row.get(f"{method}_oom"):
        return "OOM"
    value = row.get(f"{method}_{key}")
    return "-" if value is None else f"{value:.0f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


SCALE_COLUMNS = [
    ("B x T", lambda r: f"{r['batch_size']} x {r['seq_len']}"),
    ("K", lambda r: str(r["num_teachers"])),
    ("valid", lambda r: str(r["valid_positions"])),
    ("ms plain / trl / today / free / posterior",
     lambda r: " / ".join(_cell(r, m, "ms") for m in METHODS)),
    ("free/today time", lambda r: _ratio(r.get("free_time_over_today"))),
    ("posterior/free time", lambda r: _ratio(r.get("posterior_time_over_free"))),
    ("MiB plain / trl / today / free / posterior",
     lambda r: " / ".join(_cell(r, m, "peak_mib") for m in METHODS)),
    ("today/plain MiB", lambda r: _ratio(r.get("today_memory_over_plain"))),
    ("free/plain MiB", lambda r: _ratio(r.get("free_memory_over_plain"))),
    ("loss rel. diff", lambda r: f"{r['free_vs_today_loss']:.1e}" if "free_vs_today_loss" in r else "-"),
]  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"`{env['command']}` on {env['device_name']} (torch {env['torch']}, transformers {env['transformers']})",
        "",
    ]
    if "exactness" in report:
        exact = report["exactness"]
        lines += [
            f"Exactness, float64, V = {exact['vocab_size']}, T = {exact['seq_len']}, K = {exact['num_teachers']}: "
            "largest relative difference of the loss / the student's gradient / the teachers' weights",
            "",
            "| compared | loss | gradient | weights |",
            "|---|---|---|---|",
        ]
        compared = ("today_device_vs_cpu", "free_device_vs_cpu", "free_vs_today_on_device")
        for key in [prefix + name for prefix in EXACT_SETTINGS for name in compared]:
            lines.append(
                f"| {key} | " + " | ".join(f"{exact[key][k]:.1e}" for k in ("loss", "grad", "weights")) + " |"
            )
        lines.append("")
    if report.get("scale"):
        lines += ["| " + " | ".join(name for name, _ in SCALE_COLUMNS) + " |", "|" + "---|" * len(SCALE_COLUMNS)]
        lines += ["| " + " | ".join(fmt(row) for _, fmt in SCALE_COLUMNS) + " |" for row in report["scale"]]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], output: str | None) -> None:
    if output:
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        with open(output + ".json", "w") as file:
            json.dump(report, file, indent=2)
        with open(output + ".md", "w") as file:
            file.write(markdown(report))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="The device to check (default cuda; cpu for a smoke run).")
    parser.add_argument("--quick", action="store_true", help="Tiny models and rows: a smoke run in seconds.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed steps per method after a warm-up one.")
    parser.add_argument("--budget_s", type=float, default=420.0, help="Skip the rows left once this has passed.")
    parser.add_argument("--output", default=None, help="Write <output>.json and <output>.md (after each part).")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible: run this on a GPU machine, or pass --device cpu for a smoke run")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the float64 exactness part is unaffected; bf16 rows too
    start = time.perf_counter()
    transformers.utils.logging.set_verbosity_error()
    report: dict[str, Any] = {
        "environment": {
            "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": None if GKDTrainer is None else __import__("trl").__version__,
        },
        "scale": [],
    }
    print("exactness (float64, device against CPU) ...", file=sys.stderr, flush=True)
    tokenizer = train_tiny_tokenizer(synthetic_corpus(64), vocab_size=300)  # special tokens, for the tiny models
    report["exactness"] = exactness(device, args.quick, tokenizer)
    write(report, args.output)
    for row in QUICK if args.quick else SCALE:
        if time.perf_counter() - start > args.budget_s:
            report.setdefault("skipped", []).append(asdict(row))
            continue
        print(f"scale {row} ...", file=sys.stderr, flush=True)
        report["scale"].append(scale_row(row, device, args.repeats, args.quick, tokenizer))
        report["environment"]["seconds"] = round(time.perf_counter() - start, 1)
        write(report, args.output)
    print(markdown(report))


if __name__ == "__main__":
    main()
