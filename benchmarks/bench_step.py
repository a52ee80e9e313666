"""
Step time and memory of multi-teacher distillation, side by side on the same models and batch:

  (a) floor     student forward + backward (its own cross-entropy) plus K teacher forwards, no KD;
  (b) mtkd      `MultiTeacherDistillationTrainer.training_step` (entropy weighting, chunked fused KD + CE) on the
                [B, T, V] logits of the student and every teacher (`logit_free="never"`, the path before issue 16);
  (b') free     the same step logit-free (`logit_free="always"`): final hidden states at the valid positions and
                output heads, each chunk's logits made by a matmul, no [B, T, V] tensor for any model;
                `posterior`: the same with the default weighting (scale grid); `prompt`: that with `prompt_evidence`
                (prompt grid);
  (c) cached    the same trainer on the teachers' cached top-k logits (`cache_teacher_logits`), no teacher runs;
  (d) plain     `transformers.Trainer.training_step` of the student alone (plain fine-tuning);
  (e) trl       TRL's `GKDTrainer` with the first teacher (lmbda=0: off-policy, beta=0: forward KL), K = 1 only;
  (f) naive     the KD loss written with whole-batch tensors (log-softmax of every teacher over [B, T, V]), for the
                loss's own memory and time beside ours.

Times are medians over `--repeats` steps (after a warm-up), the methods interleaved so that drift hits all alike,
with the allocator as users run it. Memory is measured in a second process: the peak resident-set growth during
one step above the resident set before it (Linux: VmHWM after a reset through /proc/self/clear_refs), with glibc's
mmap threshold pinned there so that freed tensors leave the resident set at once (which would slow the timed steps
down: every large tensor would be faulted in afresh). The loss-only columns run the loss and its backward on ready
random logits of 4 x 256 positions (the smoke run: its own batch).

    python benchmarks/bench_step.py                 # the full grid, about 10 minutes on 2 CPU cores
    python benchmarks/bench_step.py --quick         # a smoke run in seconds
    python benchmarks/bench_step.py --grid scale --output docs/bench_step_scale
        # LLM-like vocabularies and lengths (V 65k/152k, T 1024/2048, K 1/3, half of each row a masked prompt):
        # plain fine-tuning, TRL (K = 1), today's path and the logit-free one (entropy weighting, and the default
        # `posterior`), one step each (the first, no warm-up), timed and measured at once in the memory process:
        # about 12 minutes on 2 CPU cores
    python benchmarks/bench_step.py --grid prompt --output docs/bench_step_prompt
        # the scale grid's shapes, the logit-free `posterior` step without and with `prompt_evidence` (the
        # teachers' heads at the prompt positions too), one step each in the memory process: about 5 minutes
    python benchmarks/bench_step.py --output docs/bench_step   # writes docs/bench_step.json and .md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from hf_mtkd import (
    MultiTeacherDistillationConfig,
    MultiTeacherDistillationTrainer,
    cache_teacher_logits,
    multi_teacher_kd_loss,
)
from hf_mtkd.prompt_evidence import prompt_positions
from hf_mtkd.testing import synthetic_corpus, tiny_causal_lm, train_tiny_tokenizer

MMAP_THRESHOLD = "65536"
"""glibc's mmap threshold in the memory process: freed tensors go back to the system, so VmHWM sees each peak."""

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
try:  # a benchmark-only dependency: pip install "hf-mtkd[benchmark]"
    from trl.experimental.gkd import GKDConfig, GKDTrainer
except ImportError:
    GKDConfig = GKDTrainer = None

TEACHER_SHAPES = {  # (architecture, hidden size, layers, heads), heterogeneous like the demo's teachers
    "tiny": [("gpt2", 128, 2, 4), ("llama", 128, 3, 4), ("gpt_neox", 96, 2, 4)],
    "small": [("gpt2", 384, 4, 6), ("llama", 384, 4, 6), ("gpt_neox", 320, 4, 4)],
}
STUDENT_SHAPES = {"tiny": ("qwen2", 64, 2, 4), "small": ("qwen2", 256, 4, 4)}


@dataclass(frozen=True)
class Setting:
    size: str
    vocab_size: int
    num_teachers: int
    batch_size: int = 4
    seq_len: int = 128
    top_k: int = 64
    loss_shape: tuple[int, int] = (4, 256)
    """Batch and length of the loss-only columns: 1020 valid positions, so chunking (256 at once) has work to do."""
    prompt: float = 0.0
    """The fraction of each row that is a prompt (labels -100), as in chat data."""


FULL = [
    Setting("tiny", 8192, 1),
    Setting("tiny", 8192, 2),
    Setting("tiny", 8192, 3),
    Setting("tiny", 32768, 3),
    Setting("tiny", 131072, 1),
    Setting("tiny", 131072, 3),
    Setting("small", 32768, 1),
    Setting("small", 32768, 3),
]
QUICK = [
    Setting("tiny", 1024, 1, seq_len=32, top_k=16, loss_shape=(4, 32)),
    Setting("tiny", 1024, 2, seq_len=32, top_k=16, loss_shape=(4, 32), prompt=0.5),
]
SCALE = [
    Setting("tiny", vocab, k, batch_size=1, seq_len=length, prompt=0.5)
    for vocab in (65536, 152064)
    for length in (1024, 2048)
    for k in (1, 3)
]
"""Issue 16's grid: the vocabularies of Llama-3-like (65k: 64k-128k) and Qwen2.5 (152k) models, long rows."""
FULL_METHODS = ("floor", "mtkd", "free", "cached", "plain", "trl")
SCALE_METHODS = ("plain", "trl", "mtkd", "free", "posterior")
PROMPT_METHODS = ("posterior", "prompt")
SCALE_QUICK = [Setting("tiny", 2048, k, batch_size=1, seq_len=64, prompt=0.5) for k in (1, 3)]
"""A smoke run of the scale grid's methods and report."""
GRIDS = {
    "full": FULL, "quick": QUICK, "scale": SCALE, "scale_quick": SCALE_QUICK, "prompt": SCALE,
    "prompt_quick": SCALE_QUICK,
}  # fmt: skip
GRID_METHODS = {
    "scale": SCALE_METHODS, "scale_quick": SCALE_METHODS, "prompt": PROMPT_METHODS, "prompt_quick": PROMPT_METHODS
}  # fmt: skip
"""The grids that run one step of each of these methods, timed and measured at once (the others: `FULL_METHODS`)."""
RATIOS = {
    "free_over_mtkd": ("free", "mtkd"),
    "free_over_trl": ("free", "trl"),
    "posterior_over_free": ("posterior", "free"),
    "prompt_over_posterior": ("prompt", "posterior"),
    "mtkd_over_floor": ("mtkd", "floor"),
    "cached_over_plain": ("cached", "plain"),
    "mtkd_over_trl": ("mtkd", "trl"),
}
"""Step-time ratios of a row, `name: (method, over method)`, where both ran."""


# ---- memory ----


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mb(fn: Callable[[], Any]) -> float | None:
    """Peak growth of the resident set (MiB) while `fn` runs, or None where it cannot be measured."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")  # resets VmHWM to the current resident set
    except OSError:
        fn()
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0) / 1024


# ---- models, data and the steps ----


def naive_kd_loss(
    student_logits: torch.Tensor, teacher_logits: list[torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    """Entropy-weighted fused KD (τ = 2) as usually written: every distribution materialised over [K, B, T, V]."""
    tau = 2.0
    mask = F.pad(labels[:, 1:], (0, 1), value=-100) != -100
    student = torch.log_softmax(student_logits.float() / tau, dim=-1)
    teachers = torch.stack([torch.log_softmax(z.float() / tau, dim=-1) for z in teacher_logits])
    probs = teachers.exp()
    entropy = -(probs * teachers).sum(-1)
    weights = torch.softmax(-entropy, dim=0)
    fused = (weights[..., None] * probs).sum(0)
    kl = (fused * (fused.clamp_min(1e-30).log() - student)).sum(-1)
    return tau**2 * kl[mask].sum() / mask.sum()


def build(setting: Setting, tokenizer: Any) -> tuple[torch.nn.Module, list[torch.nn.Module], dict[str, torch.Tensor]]:
    arch, hidden, layers, heads = STUDENT_SHAPES[setting.size]
    kwargs = {"vocab_size": setting.vocab_size, "max_positions": setting.seq_len}
    student = tiny_causal_lm(arch, tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads, **kwargs)
    teachers = [
        tiny_causal_lm(a, tokenizer, hidden_size=h, num_layers=n, num_heads=m, seed=k + 1, **kwargs).eval()
        for k, (a, h, n, m) in enumerate(TEACHER_SHAPES[setting.size][: setting.num_teachers])
    ]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, setting.vocab_size, (setting.batch_size, setting.seq_len), generator=generator)
    labels = ids.clone()
    labels[:, : int(setting.prompt * setting.seq_len)] = -100
    return student, teachers, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def make_steps(
    setting: Setting,
    student: torch.nn.Module,
    teachers: list[torch.nn.Module],
    batch: dict,
    tokenizer: Any,
    tmp: str,
    methods: tuple[str, ...] | None = None,
) -> dict[str, Callable[[], Any]]:
    """
    One no-optimizer training step (forward and backward) per method (None: `FULL_METHODS`), on the same student and
    batch.
    """
    common = {"output_dir": tmp, "report_to": "none", "use_cpu": True, "disable_tqdm": True}
    num_items = int((batch["labels"][:, 1:] != -100).sum())

    def trainer_step(trainer: Trainer, inputs: dict) -> Callable[[], Any]:
        def step() -> None:
            trainer.training_step(trainer.model, dict(inputs), num_items)
            trainer.model.zero_grad(set_to_none=True)

        return step

    def floor() -> None:
        loss = student(**batch).loss
        with torch.inference_mode():
            for teacher in teachers:
                teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss.backward()
        student.zero_grad(set_to_none=True)

    def kd_args(logit_free: str, weighting: str = "entropy", **extra: Any) -> MultiTeacherDistillationConfig:
        return MultiTeacherDistillationConfig(
            **common, temperature=2.0, teacher_weighting=weighting, logit_free=logit_free, **extra
        )

    def cached() -> Callable[[], Any]:
        rows = Dataset.from_dict({"input_ids": batch["input_ids"].tolist(), "labels": batch["labels"].tolist()})
        cache = cache_teacher_logits(
            teachers,
            rows,
            os.path.join(tmp, "cache"),
            k=setting.top_k,
            batch_size=setting.batch_size,
            disable_tqdm=True,
        )
        trainer = MultiTeacherDistillationTrainer(model=student, teachers=cache, args=kd_args("never"))
        return trainer_step(trainer, trainer.data_collator([cache.dataset[i] for i in range(len(cache.dataset))]))

    makers = {
        "floor": lambda: floor,
        "mtkd": lambda: trainer_step(
            MultiTeacherDistillationTrainer(model=student, teachers=teachers, args=kd_args("never")), batch
        ),
        "free": lambda: trainer_step(
            MultiTeacherDistillationTrainer(model=student, teachers=teachers, args=kd_args("always")), batch
        ),
        "posterior": lambda: trainer_step(
            MultiTeacherDistillationTrainer(
                model=student, teachers=teachers, args=kd_args("always", weighting="posterior")
            ),
            batch,
        ),
        "prompt": lambda: trainer_step(
            MultiTeacherDistillationTrainer(
                model=student,
                teachers=teachers,
                args=kd_args("always", weighting="posterior", prompt_evidence=True),
            ),
            batch,
        ),
        "cached": cached,
        "plain": lambda: trainer_step(Trainer(model=student, args=TrainingArguments(**common)), batch),
    }
    steps = {name: make() for name, make in makers.items() if name in (methods or FULL_METHODS)}
    if setting.num_teachers == 1 and GKDTrainer is not None and (methods is None or "trl" in methods):
        rows = Dataset.from_dict({"input_ids": batch["input_ids"].tolist()})
        # float32 like the other methods (TRL's configs default to bf16 where supported, and its trainer would wrap
        # the shared teacher's forward in bf16 autocast for every method measured after it)
        gkd_args = GKDConfig(
            **common, lmbda=0.0, beta=0.0, temperature=1.0, max_length=setting.seq_len, bf16=False, fp16=False
        )
        gkd = GKDTrainer(
            model=student,
            teacher_model=teachers[0],
            args=gkd_args,
            train_dataset=rows,
            processing_class=tokenizer,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        )
        steps["trl"] = trainer_step(gkd, batch)
    return steps


def loss_only(setting: Setting, repeats: int, memory: bool) -> dict[str, float | None]:
    """Time (or peak memory) of the KD loss and its backward alone, ours (chunked) against the naive version."""
    generator = torch.Generator().manual_seed(1)
    shape = (*setting.loss_shape, setting.vocab_size)
    student_logits = torch.randn(shape, generator=generator).requires_grad_(True)
    teacher_logits = [torch.randn(shape, generator=generator) for _ in range(setting.num_teachers)]
    labels = torch.randint(0, setting.vocab_size, shape[:2], generator=generator)

    def run(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            fn(student_logits, teacher_logits, labels).backward()
            student_logits.grad = None

        return step

    ours = run(lambda s, t, y: multi_teacher_kd_loss(s, t, y, temperature=2.0, weighting="entropy"))
    steps = {"loss_ours": ours, "loss_naive": run(naive_kd_loss)}
    return _measure_steps(steps, repeats, memory)


def _timed(step: Callable[[], Any]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _measure_once(steps: dict[str, Callable[[], Any]]) -> dict[str, float | None]:
    """`<name>_ms` and `<name>_peak_mb` of one step of each method, its first (no warm-up), one after the other."""
    row: dict[str, float | None] = {}
    for name, step in steps.items():
        start = time.perf_counter()
        row[f"{name}_peak_mb"] = peak_memory_mb(step)
        row[f"{name}_ms"] = 1e3 * (time.perf_counter() - start)
    return row


def _measure_steps(steps: dict[str, Callable[[], Any]], repeats: int, memory: bool) -> dict[str, float | None]:
    """`<name>_peak_mb` of each step (`memory`), or `<name>_ms`, the median of interleaved timed runs."""
    for step in steps.values():  # warm-up
        step()
    if memory:
        return {f"{name}_peak_mb": peak_memory_mb(step) for name, step in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(_timed(step))
    return {f"{name}_ms": 1e3 * statistics.median(values) for name, values in times.items()}


def measure(
    setting: Setting, tokenizer: Any, repeats: int, memory: bool = False, grid: str = "full"
) -> dict[str, Any]:
    """One table row: every method's step time (or, with `memory`, its peak memory)."""
    methods = GRID_METHODS.get(grid)
    student, teachers, batch = build(setting, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        steps = make_steps(setting, student, teachers, batch, tokenizer, tmp, methods)
        measured = _measure_once(steps) if methods is not None else _measure_steps(steps, repeats, memory)
        row: dict[str, Any] = {**asdict(setting), **measured}
    if methods is None:
        row.update(loss_only(setting, repeats, memory))
    if memory and methods is None:
        return row
    row["student_params_m"] = sum(p.numel() for p in student.parameters()) / 1e6
    row["teacher_params_m"] = [round(sum(p.numel() for p in t.parameters()) / 1e6, 2) for t in teachers]
    row["valid_positions"] = int((batch["labels"][:, 1:] != -100).sum())
    row["prompt_positions"] = int(prompt_positions(batch["input_ids"], batch["labels"], batch["attention_mask"]).sum())
    ran = methods or FULL_METHODS
    for name, (method, over) in RATIOS.items():
        if method in ran and over in ran:
            row[name] = row[f"{method}_ms"] / row[f"{over}_ms"] if f"{over}_ms" in row else None
    return row


def memory_ratios(row: dict[str, Any]) -> None:
    """Peak memory of today's path and of the logit-free one over plain fine-tuning's, and bytes per position."""
    plain = row.get("plain_peak_mb")
    for method in ("mtkd", "free"):
        peak = row.get(f"{method}_peak_mb")
        row[f"{method}_memory_over_plain"] = peak / plain if peak is not None and plain else None
        positions = row["batch_size"] * row["seq_len"]
        row[f"{method}_kib_per_position"] = None if peak is None else peak * 1024 / positions


def memory_rows(argv: list[str]) -> list[dict[str, Any]]:
    """The memory columns, measured by this script in a child process with glibc's mmap threshold pinned."""
    if not sys.platform.startswith("linux"):
        return []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "memory.json")
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
        subprocess.run([sys.executable, __file__, *argv, "--memory_json", path], env=env, check=True)
        with open(path) as file:
            return json.load(file)


# ---- report ----

COLUMNS = [
    ("student", lambda r: f"{r['size']} {r['student_params_m']:.1f}M"),
    ("V", lambda r: f"{r['vocab_size'] // 1024}k"),
    ("K", lambda r: str(r["num_teachers"])),
    ("floor ms", lambda r: f"{r['floor_ms']:.0f}"),
    ("mtkd ms", lambda r: f"{r['mtkd_ms']:.0f}"),
    ("free ms", lambda r: f"{r['free_ms']:.0f}"),
    ("cached ms", lambda r: f"{r['cached_ms']:.0f}"),
    ("plain ms", lambda r: f"{r['plain_ms']:.0f}"),
    ("trl ms", lambda r: f"{r['trl_ms']:.0f}" if "trl_ms" in r else "-"),
    ("mtkd/floor", lambda r: f"{r['mtkd_over_floor']:.2f}"),
    ("cached/plain", lambda r: f"{r['cached_over_plain']:.2f}"),
    ("mtkd/trl", lambda r: f"{r['mtkd_over_trl']:.2f}" if r["mtkd_over_trl"] else "-"),
    (
        "step MiB mtkd / free / trl",
        lambda r: f"{_mb(r['mtkd_peak_mb'])} / {_mb(r['free_peak_mb'])} / {_mb(r.get('trl_peak_mb'))}",
    ),
    ("loss MiB ours / naive", lambda r: f"{_mb(r['loss_ours_peak_mb'])} / {_mb(r['loss_naive_peak_mb'])}"),
    ("loss ms ours / naive", lambda r: f"{r['loss_ours_ms']:.0f} / {r['loss_naive_ms']:.0f}"),
]


SCALE_COLUMNS = [
    ("V", lambda r: f"{r['vocab_size'] / 1000:.0f}k"),
    ("T", lambda r: str(r["seq_len"])),
    ("K", lambda r: str(r["num_teachers"])),
    ("valid", lambda r: str(r["valid_positions"])),
    ("plain ms", lambda r: f"{r['plain_ms']:.0f}"),
    ("trl ms", lambda r: f"{r['trl_ms']:.0f}" if "trl_ms" in r else "-"),
    ("today ms", lambda r: f"{r['mtkd_ms']:.0f}"),
    ("logit-free ms", lambda r: f"{r['free_ms']:.0f}"),
    ("free/today", lambda r: f"{r['free_over_mtkd']:.2f}"),
    ("free/trl", lambda r: f"{r['free_over_trl']:.2f}" if r["free_over_trl"] else "-"),
    ("free, posterior ms", lambda r: f"{r['posterior_ms']:.0f}"),
    ("posterior/entropy", lambda r: f"{r['posterior_over_free']:.2f}"),
    (
        "MiB plain / trl / today / free",
        lambda r: " / ".join(_mb(r.get(f"{m}_peak_mb")) for m in ("plain", "trl", "mtkd", "free")),
    ),
    ("today/plain MiB", lambda r: _ratio(r.get("mtkd_memory_over_plain"))),
    ("free/plain MiB", lambda r: _ratio(r.get("free_memory_over_plain"))),
    (
        "KiB/position today / free",
        lambda r: f"{_mb(r.get('mtkd_kib_per_position'))} / {_mb(r.get('free_kib_per_position'))}",
    ),
]


PROMPT_COLUMNS = [
    ("V", lambda r: f"{r['vocab_size'] / 1000:.0f}k"),
    ("T", lambda r: str(r["seq_len"])),
    ("K", lambda r: str(r["num_teachers"])),
    ("valid", lambda r: str(r["valid_positions"])),
    ("prompt", lambda r: str(r["prompt_positions"])),
    ("posterior ms", lambda r: f"{r['posterior_ms']:.0f}"),
    ("+ prompt ms", lambda r: f"{r['prompt_ms']:.0f}"),
    ("time ratio", lambda r: f"{r['prompt_over_posterior']:.2f}"),
    ("MiB posterior / + prompt", lambda r: f"{_mb(r.get('posterior_peak_mb'))} / {_mb(r.get('prompt_peak_mb'))}"),
]
GRID_COLUMNS = {
    "scale": SCALE_COLUMNS, "scale_quick": SCALE_COLUMNS, "prompt": PROMPT_COLUMNS, "prompt_quick": PROMPT_COLUMNS
}  # fmt: skip


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(rows: list[dict[str, Any]], columns: list = COLUMNS) -> str:
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row) for _, fmt in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Two tiny settings, for a smoke run (`--grid quick`).")
    parser.add_argument("--grid", choices=list(GRIDS), default="full", help="Which settings (and methods) to run.")
    parser.add_argument("--repeats", type=int, default=None, help="Timed steps per method (default 5; quick 2).")
    parser.add_argument("--output", default=None, help="Write <output>.json and <output>.md.")
    parser.add_argument("--memory_json", default=None, help=argparse.SUPPRESS)  # the memory process's output
    args = parser.parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    grid = "quick" if args.quick else args.grid
    settings = GRIDS[grid]
    repeats = args.repeats or (2 if args.quick else 5)
    if GKDTrainer is None:
        print("TRL is not installed (pip install 'hf-mtkd[benchmark]'): no TRL column.", file=sys.stderr)
    tokenizer = train_tiny_tokenizer(synthetic_corpus(64), vocab_size=300)
    if args.memory_json:
        rows = []
        for setting in settings:
            print(f"measuring {setting} ...", file=sys.stderr, flush=True)
            rows.append(measure(setting, tokenizer, repeats, memory=True, grid=grid))
        with open(args.memory_json, "w") as file:
            json.dump(rows, file)
        return
    if grid in GRID_METHODS:  # one step per method, timed and measured at once, in the memory process
        print("measuring one step of each method in a second process ...", file=sys.stderr, flush=True)
        rows = memory_rows(["--grid", grid])
        repeats = 1
    else:
        rows = []
        for setting in settings:
            print(f"timing {setting} ...", file=sys.stderr, flush=True)
            rows.append(measure(setting, tokenizer, repeats, grid=grid))
        print("measuring peak memory in a second process ...", file=sys.stderr, flush=True)
        for row, memory in zip(rows, memory_rows(["--grid", grid, "--repeats", str(repeats)]), strict=False):
            row.update({key: value for key, value in memory.items() if key.endswith("_peak_mb")})
    for row in rows:
        memory_ratios(row)
        if grid not in GRID_METHODS:
            naive = row.get("loss_naive_peak_mb")
            row["loss_memory_ours_over_naive"] = row["loss_ours_peak_mb"] / naive if naive else None
    environment = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "repeats": repeats,
        "command": "python benchmarks/bench_step.py " + " ".join(sys.argv[1:]),
    }
    table = markdown(rows, GRID_COLUMNS.get(grid, COLUMNS))
    print(table)
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output + ".json", "w") as file:
            json.dump({"environment": environment, "rows": rows}, file, indent=2)
        with open(args.output + ".md", "w") as file:
            file.write(
                f"`{environment['command']}` (torch {environment['torch']}, {environment['threads']} threads)\n\n"
            )
            file.write(table + "\n")


if __name__ == "__main__":
    main()
