"""
Step time and memory of multi-teacher distillation, side by side on the same models and batch:

  (a) floor     student forward + backward (its own cross-entropy) plus K teacher forwards, no KD;
  (b) mtkd      `MultiTeacherDistillationTrainer.training_step` (entropy weighting, chunked fused KD + CE);
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
    Setting("tiny", 1024, 2, seq_len=32, top_k=16, loss_shape=(4, 32)),
]


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
    return student, teachers, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def make_steps(
    setting: Setting, student: torch.nn.Module, teachers: list[torch.nn.Module], batch: dict, tokenizer: Any, tmp: str
) -> dict[str, Callable[[], Any]]:
    """One no-optimizer training step (forward and backward) per method, on the same student and batch."""
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

    kd_args = MultiTeacherDistillationConfig(**common, temperature=2.0, teacher_weighting="entropy")
    mtkd = MultiTeacherDistillationTrainer(model=student, teachers=teachers, args=kd_args)
    rows = Dataset.from_dict({"input_ids": batch["input_ids"].tolist()})
    cache = cache_teacher_logits(
        teachers, rows, os.path.join(tmp, "cache"), k=setting.top_k, batch_size=setting.batch_size, disable_tqdm=True
    )
    cached = MultiTeacherDistillationTrainer(
        model=student,
        teachers=cache,
        args=kd_args,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    cached_batch = cached.data_collator([cache.dataset[i] for i in range(len(cache.dataset))])
    plain = Trainer(model=student, args=TrainingArguments(**common))
    steps = {
        "floor": floor,
        "mtkd": trainer_step(mtkd, batch),
        "cached": trainer_step(cached, cached_batch),
        "plain": trainer_step(plain, batch),
    }
    if setting.num_teachers == 1 and GKDTrainer is not None:
        gkd_args = GKDConfig(**common, lmbda=0.0, beta=0.0, temperature=1.0, max_length=setting.seq_len)
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


def measure(setting: Setting, tokenizer: Any, repeats: int, memory: bool = False) -> dict[str, Any]:
    """One table row: every method's step time (or, with `memory`, its peak memory)."""
    student, teachers, batch = build(setting, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        steps = make_steps(setting, student, teachers, batch, tokenizer, tmp)
        row: dict[str, Any] = {**asdict(setting), **_measure_steps(steps, repeats, memory)}
    row.update(loss_only(setting, repeats, memory))
    if memory:
        return row
    row["student_params_m"] = sum(p.numel() for p in student.parameters()) / 1e6
    row["teacher_params_m"] = [round(sum(p.numel() for p in t.parameters()) / 1e6, 2) for t in teachers]
    row["mtkd_over_floor"] = row["mtkd_ms"] / row["floor_ms"]
    row["cached_over_plain"] = row["cached_ms"] / row["plain_ms"]
    row["mtkd_over_trl"] = row["mtkd_ms"] / row["trl_ms"] if "trl_ms" in row else None
    return row


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
    ("cached ms", lambda r: f"{r['cached_ms']:.0f}"),
    ("plain ms", lambda r: f"{r['plain_ms']:.0f}"),
    ("trl ms", lambda r: f"{r['trl_ms']:.0f}" if "trl_ms" in r else "-"),
    ("mtkd/floor", lambda r: f"{r['mtkd_over_floor']:.2f}"),
    ("cached/plain", lambda r: f"{r['cached_over_plain']:.2f}"),
    ("mtkd/trl", lambda r: f"{r['mtkd_over_trl']:.2f}" if r["mtkd_over_trl"] else "-"),
    ("step MiB mtkd / trl", lambda r: f"{_mb(r['mtkd_peak_mb'])} / {_mb(r.get('trl_peak_mb'))}"),
    ("loss MiB ours / naive", lambda r: f"{_mb(r['loss_ours_peak_mb'])} / {_mb(r['loss_naive_peak_mb'])}"),
    ("loss ms ours / naive", lambda r: f"{r['loss_ours_ms']:.0f} / {r['loss_naive_ms']:.0f}"),
]


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(row) for _, fmt in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Two tiny settings, for a smoke run.")
    parser.add_argument("--repeats", type=int, default=None, help="Timed steps per method (default 5; quick 2).")
    parser.add_argument("--output", default=None, help="Write <output>.json and <output>.md.")
    parser.add_argument("--memory_json", default=None, help=argparse.SUPPRESS)  # the memory process's output
    args = parser.parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    settings = QUICK if args.quick else FULL
    repeats = args.repeats or (2 if args.quick else 5)
    if GKDTrainer is None:
        print("TRL is not installed (pip install 'hf-mtkd[benchmark]'): no TRL column.", file=sys.stderr)
    tokenizer = train_tiny_tokenizer(synthetic_corpus(64), vocab_size=300)
    if args.memory_json:
        rows = [measure(setting, tokenizer, repeats, memory=True) for setting in settings]
        with open(args.memory_json, "w") as file:
            json.dump(rows, file)
        return
    rows = []
    for setting in settings:
        print(f"timing {setting} ...", file=sys.stderr, flush=True)
        rows.append(measure(setting, tokenizer, repeats))
    print("measuring peak memory in a second process ...", file=sys.stderr, flush=True)
    for row, memory in zip(rows, memory_rows(["--quick"] if args.quick else []), strict=False):
        row.update({key: value for key, value in memory.items() if key.endswith("_peak_mb")})
    for row in rows:
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
    table = markdown(rows)
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
