"""The demo's models and data: scales, a tokenizer, specialist teachers (trained once and cached) and the student."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging

from .. import __version__
from ..testing import tiny_causal_lm, train_tiny_tokenizer
from .corpus import split_works

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class Scale:
    """How big a demo run is."""

    name: str
    vocab_size: int
    block_size: int
    batch_size: int
    teacher_steps: int
    distill_steps: int
    eval_blocks: int
    """Held-out blocks per domain and split."""
    seeds: tuple[int, ...]
    width: int
    """Teachers are 1.75-2.5x this wide, the student this wide."""


SCALES = {
    "quick": Scale("quick", 512, 64, 8, 60, 40, 16, (0,), 32),
    "default": Scale("default", 1024, 64, 16, 250, 120, 48, (0,), 48),
    "full": Scale("full", 1024, 64, 16, 250, 120, 96, (0, 1, 2), 48),
    # With a pretrained teacher (`--pretrained_teacher`): its tokenizer (vocab_size is unused), longer blocks that
    # give it context, and narrow models so that the student's and specialists' ~49k-row embeddings stay cheap. The
    # teachers are read from a cache of their top-k logits (computed once: ~0.8 s per block for SmolLM2 and the
    # three specialists on one CPU core), so a student step costs ~2.2 s instead of 10-18 s with live teachers.
    # Both scales draw the same 200 x 8 training blocks and 24 held-out blocks per domain, so they share the cache.
    "pretrained": Scale("pretrained", 0, 128, 8, 250, 200, 24, (0,), 32),
    "pretrained-full": Scale("pretrained-full", 0, 128, 8, 250, 200, 24, (0, 1, 2), 32),
}
PRETRAINED_SCALES = {"quick": "quick", "default": "pretrained", "full": "pretrained-full"}
"""The scale a `--quick`/default/`--full` run uses when it has a pretrained teacher."""

TEACHER_SCALE_FIELDS = ("vocab_size", "block_size", "batch_size", "teacher_steps", "width")
"""What a teacher depends on: two scales that agree on these share cached teachers."""

# Each teacher is a specialist of one domain of its scenario, of its own architecture, width and depth.
TEACHERS: dict[str, dict[str, tuple[str, float, int]]] = {
    "domains": {"python": ("gpt2", 2.0, 4), "prose": ("llama", 2.5, 3), "shakespeare": ("gpt_neox", 1.75, 5)},
    "genres": {"comedies": ("gpt2", 2.0, 4), "tragedies": ("llama", 2.5, 3), "histories": ("gpt_neox", 1.75, 5)},
}
STUDENT: tuple[str, float, int] = ("qwen2", 1.0, 2)


LEARNING_RATE = 3e-3


def training_settings(output_dir: Path, steps: int, batch_size: int, seed: int) -> dict:
    """The `TrainingArguments` every demo model trains with (teachers and students alike): AdamW, cosine schedule."""
    return dict(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        warmup_steps=steps // 10,
        weight_decay=0.01,
        save_strategy="no",
        report_to="none",
        logging_steps=max(1, steps // 5),
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
    )


def build_model(
    spec: tuple[str, float, int], tokenizer: PreTrainedTokenizerBase, scale: Scale, seed: int
) -> PreTrainedModel:
    """A randomly initialised model of `spec` (architecture, width factor, depth) at `scale`."""
    model_type, width_factor, layers = spec
    return tiny_causal_lm(
        model_type,
        tokenizer,
        hidden_size=int(scale.width * width_factor),
        num_layers=layers,
        num_heads=4,
        max_positions=scale.block_size,
        seed=seed,
    )


def to_blocks(text: str, tokenizer: PreTrainedTokenizerBase, block_size: int, limit: int | None = None) -> Dataset:
    """Consecutive `block_size`-token blocks of `text` (at most `limit`, evenly spread), labels = input_ids."""
    ids = tokenizer(text)["input_ids"]
    blocks = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    if limit is not None and len(blocks) > limit:
        step = len(blocks) / limit
        blocks = [blocks[int(i * step)] for i in range(limit)]
    return Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * block_size] * len(blocks)})


@dataclass
class DemoData:
    tokenizer: PreTrainedTokenizerBase
    train: dict[str, Dataset]
    validation: dict[str, Dataset]
    test: dict[str, Dataset]


def prepare_data(
    domains: dict[str, list[str]],
    scale: Scale,
    cache_dir: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    split: Callable[[list[str]], dict[str, str]] = split_works,
) -> DemoData:
    """
    Split every domain's documents with `split`, train (or load) the tokenizer on the training text unless one is
    given (a pretrained teacher's), and cut everything into blocks.
    """
    splits = {domain: split(documents) for domain, documents in domains.items()}
    if tokenizer is None:
        corpus_hash = hashlib.sha256("".join(s["train"] for s in splits.values()).encode()).hexdigest()[:12]
        tokenizer_dir = cache_dir / f"tokenizer-{scale.vocab_size}-{corpus_hash}"
        if (tokenizer_dir / "tokenizer.json").is_file():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
        else:
            tokenizer = train_tiny_tokenizer([s["train"] for s in splits.values()], vocab_size=scale.vocab_size)
            tokenizer.save_pretrained(tokenizer_dir)
    by_split = {
        split: {
            domain: to_blocks(s[split], tokenizer, scale.block_size, None if split == "train" else scale.eval_blocks)
            for domain, s in splits.items()
        }
        for split in ("train", "validation", "test")
    }
    return DemoData(tokenizer, by_split["train"], by_split["validation"], by_split["test"])


def load_teachers(
    data: DemoData, scale: Scale, cache_dir: Path, specs: dict[str, tuple[str, float, int]]
) -> dict[str, PreTrainedModel]:
    """One specialist per domain of `specs`, trained on that domain's training blocks; cached by fingerprint."""
    teachers = {}
    for domain, spec in specs.items():
        if domain not in data.train:
            raise ValueError(f"The corpus has no {domain!r} domain for its specialist teacher: {list(data.train)}.")
        fingerprint = {
            "version": __version__,
            "scale": [getattr(scale, key) for key in TEACHER_SCALE_FIELDS],
            "spec": spec,
            "vocab": hashlib.sha256(data.tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:12],
            "blocks": len(data.train[domain]),
        }
        key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
        path = cache_dir / f"teacher-{domain}-{key}"
        if (path / "config.json").is_file():
            teachers[domain] = AutoModelForCausalLM.from_pretrained(path)
            continue
        logger.warning("Training the %s teacher (%s) on its domain; cached in %s.", domain, spec[0], path)
        model = build_model(spec, data.tokenizer, scale, seed=0)
        args = TrainingArguments(**training_settings(path / "trainer", scale.teacher_steps, scale.batch_size, seed=0))
        collator = DataCollatorForLanguageModeling(data.tokenizer, mlm=False)
        trainer = Trainer(model=model, args=args, train_dataset=data.train[domain], data_collator=collator)
        trainer.train()
        model.save_pretrained(path)
        model.config.name_or_path = str(path)  # as if loaded from the cache, so its records do not change
        teachers[domain] = model
    for model in teachers.values():
        model.eval()
    return teachers
