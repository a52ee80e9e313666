"""
The demo's teachers computed once per scenario: their top-k next-token distributions on the rows training reads
and on the held-out blocks, in one teacher-logits cache (`hf_mtkd.teacher_cache`) that every method and seed reuses.

Training from a cache reads a fixed set of rows: `training_rows` draws the `steps x batch_size` blocks the budget
consumes once, with a fixed seed, so every method and seed trains on the same blocks (each seed in its own order).
Each method reads the teachers it distils from through `TeacherLogitsCache.select_teachers`; nothing is copied.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, concatenate_datasets
from torch import nn
from transformers.utils import logging

from ..teacher_cache import TeacherLogitsCache, cache_teacher_logits, data_fingerprint
from ..teachers import teacher_record
from .zoo import DemoData, Scale

logger = logging.get_logger(__name__)

ROWS_SEED = 0
"""The seed that draws the training rows (the same for every method and seed)."""
SHARD_SIZE = 256
"""Rows per cache shard: the unit a stopped caching run resumes from."""


@dataclass
class CachedTeachers:
    """A scenario's teacher-logits cache and its parts (each a slice of `cache.dataset`)."""

    cache: TeacherLogitsCache
    """Every teacher of the scenario, in the order of the demo's teacher table."""
    train: Dataset
    """The training rows with the teachers' cached columns."""
    train_rows: Dataset
    """The same rows without them (for the student trained without a teacher)."""
    train_domains: list[str]
    """The domain of each training row."""
    validation: dict[str, Dataset]
    test: dict[str, Dataset]

    def teachers(self, names: tuple[str, ...]) -> TeacherLogitsCache:
        """The view of the cache a method distils from."""
        return self.cache.select_teachers(list(names))


def training_rows(train: dict[str, Dataset], count: int, seed: int = ROWS_SEED) -> tuple[Dataset, list[str]]:
    """
    `count` training blocks drawn from every domain's blocks together, in a fixed shuffled order (whole passes over
    the blocks, each in its own order, when `count` exceeds them), and the domain of each.
    """
    blocks = concatenate_datasets(list(train.values()))
    domains = [domain for domain, d in train.items() for _ in range(len(d))]
    generator, order = random.Random(seed), []
    while len(order) < count:
        shuffled = list(range(len(blocks)))
        generator.shuffle(shuffled)
        order += shuffled
    return blocks.select(order[:count]).flatten_indices(), [domains[i] for i in order[:count]]


def cache_scenario(
    teachers: dict[str, nn.Module], data: DemoData, scale: Scale, k: int, cache_dir: Path
) -> CachedTeachers:
    """
    The teachers' top-`k` logits on the training rows of `scale` and on the held-out blocks, computed once into
    `cache_dir/logits-top<k>-<key>` (resumed if a run stopped) or loaded; the key hashes what the cache depends
    on: the teachers (names and weights), the rows and k.
    """
    rows, row_domains = training_rows(data.train, scale.distill_steps * scale.batch_size)
    held_out = [(split, domain, d) for split in ("validation", "test") for domain, d in getattr(data, split).items()]
    dataset = concatenate_datasets([rows, *[blocks for *_, blocks in held_out]])
    names = list(teachers)
    records = [teacher_record(model, name, hash_weights=True) for name, model in teachers.items()]
    identity = {"teachers": records, "data": data_fingerprint(dataset), "k": k}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir / f"logits-top{k}-{key}"
    logger.warning(
        "Teacher logits (top-%d of %s) on %d training rows and %d held-out blocks: cached in %s.",
        k,
        ", ".join(names),
        len(rows),
        len(dataset) - len(rows),
        path,
    )
    cache = cache_teacher_logits(
        list(teachers.values()),
        dataset,
        str(path),
        k=k,
        tokenizer=data.tokenizer,
        names=names,
        batch_size=scale.batch_size,
        shard_size=SHARD_SIZE,
    )
    parts, start = {}, len(rows)
    for split, domain, blocks in held_out:
        parts.setdefault(split, {})[domain] = cache.dataset.select(range(start, start + len(blocks)))
        start += len(blocks)
    return CachedTeachers(
        cache=cache,
        train=cache.dataset.select(range(len(rows))),
        train_rows=rows,
        train_domains=row_domains,
        validation=parts["validation"],
        test=parts["test"],
    )
