"""
Offline teacher logits: run the teachers once over a tokenized dataset and store their top-k next-token
distributions on disk, so that training (and every later epoch or student) costs what plain fine-tuning costs.

A cache is a directory:

* `shards/00000`, `shards/00001`, ...: `datasets` Arrow shards (memory-mapped when read), each holding a slice of
  the dataset's own columns plus, per example of L tokens, `mtkd_topk_indices` and `mtkd_topk_log_probs`
  `[L - 1, K, k]` and `mtkd_log_tail_mass` `[L - 1, K]`: teacher k's distribution for the token after each position
  that has one, in the form of `hf_mtkd.topk.TopKLogits`;
* `manifest.json`: the teachers (name, path, revision, parameter count and a hash of their weights), the tokenizer
  (a hash of its vocabulary), k, the value dtype, a hash of the tokenized data, and the shards already written.

Writing resumes where an interrupted run stopped (finished shards are kept); a cache whose manifest disagrees with
the teachers, tokenizer, data or k asked for is refused instead of being reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import datasets
import numpy as np
import torch
from datasets import Array2D, Array3D, Dataset, Features, concatenate_datasets, load_from_disk
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from .teachers import (
    TEACHER_INPUT_KEYS,
    check_finite,
    load_teachers,
    pad_rows,
    teacher_forward,
    teacher_names,
    teacher_record,
    vocab_size,
)
from .topk import TopKLogits

logger = logging.get_logger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
INDICES, LOG_PROBS, LOG_TAIL_MASS = "mtkd_topk_indices", "mtkd_topk_log_probs", "mtkd_log_tail_mass"
CACHE_COLUMNS = (INDICES, LOG_PROBS, LOG_TAIL_MASS)
"""The columns a cache adds to the dataset, and the keys under which the collator batches them."""
VALUE_DTYPES = ("float32", "float16")


class StaleCacheError(ValueError):
    """A teacher-logits cache that was written for other teachers, tokenizer, data or k."""


@dataclass
class CacheManifest:
    """What a teacher-logits cache was computed from (compared field by field before it is reused)."""

    teachers: list[dict[str, Any]]
    """Per teacher: name, name_or_path, class, revision, num_parameters, weights_sha256."""
    tokenizer: dict[str, Any] | None
    """name_or_path and vocab_sha256 of the tokenizer the data was tokenized with (None: not given)."""
    vocab_size: int
    """The width of the cached distributions: the teachers' logits, cut to the tokenizer's length when given."""
    k: int
    dtype: str
    data_fingerprint: str
    num_rows: int
    shard_size: int
    completed_shards: list[int] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_rows / self.shard_size)

    @property
    def complete(self) -> bool:
        return len(self.completed_shards) == self.num_shards

    @property
    def teacher_names(self) -> list[str]:
        return [teacher["name"] for teacher in self.teachers]

    @property
    def teacher_weights(self) -> list[str | None]:
        """The sha256 of each teacher's weights, in order: what identifies the teachers (not their paths or names)."""
        return [teacher.get("weights_sha256") for teacher in self.teachers]

    def identity(self) -> dict[str, Any]:
        """
        What the cached values are computed from, by content: the teachers' weights, the tokenizer's vocabulary, the
        token ids, k and the storage layout. A teacher's path and the tokenizer's directory are not part of it.
        """
        return {
            "format version": self.format_version,
            "teacher weights (sha256)": self.teacher_weights,
            "tokenizer vocabulary (sha256)": None if self.tokenizer is None else self.tokenizer["vocab_sha256"],
            "vocabulary size": self.vocab_size,
            "k": self.k,
            "dtype": self.dtype,
            "token ids (sha256)": self.data_fingerprint,
            "shard size": self.shard_size,
        }

    def differences(self, given: CacheManifest) -> list[tuple[str, Any, Any]]:
        """
        `(field, this cache's value, the given one's)` for each identity field on which the manifests disagree (a
        tokenizer recorded by only one of them is no difference: the token ids pin the data either way).
        """
        mine, theirs = self.identity(), given.identity()
        return [
            (key, mine[key], theirs[key])
            for key in mine
            if mine[key] != theirs[key] and not (key.startswith("tokenizer") and None in (mine[key], theirs[key]))
        ]

    def save(self, directory: str) -> None:
        path = os.path.join(directory, MANIFEST_NAME)
        with open(path + ".tmp", "w") as file:
            json.dump(asdict(self), file, indent=2)
        os.replace(path + ".tmp", path)  # a crash never leaves half a manifest

    @classmethod
    def load(cls, directory: str) -> CacheManifest:
        path = os.path.join(directory, MANIFEST_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{directory} is not a teacher-logits cache (it has no {MANIFEST_NAME}). Write one with "
                "`hf_mtkd.cache_teacher_logits(...)` or `hf-mtkd cache-teachers`."
            )
        with open(path) as file:
            return cls(**json.load(file))


@dataclass
class TeacherLogitsCache:
    """
    A loaded cache: its manifest and the dataset (the original columns plus the cached teacher columns), or a view
    of some of its teachers (`select_teachers`).
    """

    path: str
    manifest: CacheManifest
    """The teachers this cache (or view) stands for; a view's manifest lists only the selected ones."""
    dataset: Dataset
    teacher_indices: tuple[int, ...] | None = None
    """Where the teachers of a view lie on the stored teacher axis, in the view's order; None: all, as stored."""

    @property
    def teacher_names(self) -> list[str]:
        return self.manifest.teacher_names

    def select_teachers(self, teachers: Sequence[str | int]) -> TeacherLogitsCache:
        """
        A view of some of the teachers (by name or position, in the order given): the same files and dataset, the
        selection applied when rows are batched (`TeacherCacheCollator(teachers=view.teacher_indices)`, which the
        trainer sets up), so nothing is recomputed or copied.
        """
        names = self.teacher_names
        positions = []
        for teacher in teachers:
            if isinstance(teacher, str) and teacher not in names:
                raise ValueError(
                    f"The teacher-logits cache in {self.path} has no teacher {teacher!r}: it has {names}."
                )
            if not isinstance(teacher, str) and not 0 <= teacher < len(names):
                raise ValueError(f"Teacher position {teacher} is out of range: the cache has {len(names)} teachers.")
            positions.append(names.index(teacher) if isinstance(teacher, str) else int(teacher))
        if not positions or len(set(positions)) != len(positions):
            raise ValueError(f"Select at least one teacher, each once (got {list(teachers)}) out of {names}.")
        stored = self.teacher_indices or tuple(range(len(names)))
        return replace(
            self,
            manifest=replace(self.manifest, teachers=[self.manifest.teachers[p] for p in positions]),
            teacher_indices=tuple(stored[p] for p in positions),
        )


def data_fingerprint(dataset: Dataset) -> str:
    """sha256 of the token ids (and labels, attention mask and position ids, when present), example by example."""
    columns = [c for c in ("input_ids", *TEACHER_INPUT_KEYS[1:], "labels") if c in dataset.column_names]
    digest = hashlib.sha256(repr(columns).encode())
    for batch in dataset.select_columns(columns).with_format("numpy").iter(batch_size=1024):
        for column in columns:
            for row in batch[column]:
                values = np.asarray(row, dtype=np.int64)
                digest.update(values.size.to_bytes(8, "little") + values.tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The tokenizer's name and a sha256 of its token-to-id map (what decides which ids the data holds)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {
        "name_or_path": tokenizer.name_or_path,
        "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
    }


def cache_teacher_logits(
    teachers: Sequence[nn.Module | str],
    dataset: Dataset,
    output_dir: str,
    *,
    k: int = 64,
    tokenizer: PreTrainedTokenizerBase | None = None,
    names: Sequence[str] | None = None,
    batch_size: int = 8,
    shard_size: int = 1024,
    dtype: str = "float32",
    teacher_dtype: str = "auto",
    teacher_model_init_kwargs: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    disable_tqdm: bool = False,
) -> TeacherLogitsCache:
    """
    Run `teachers` once over the tokenized `dataset` and store their top-k next-token distributions in
    `output_dir` (see the module documentation); resume an interrupted run; return the loaded cache.

    Args:
        teachers: models or names/paths (loaded in `teacher_dtype`), all on one vocabulary.
        dataset: tokenized examples (`input_ids`, optionally `attention_mask`, `position_ids`, `labels`), as the
            trainer will see them. Its columns are kept in the cache.
        k: tokens kept per position and teacher; the rest of the mass is kept as one number (`TopKLogits`).
        tokenizer: recorded in the manifest, so a student trained with another tokenizer is refused; the cached
            distributions are over its tokens, the teachers' padding rows beyond them dropped (`hf_mtkd.teachers`).
        names: display names of the teachers (default: from their paths or configs).
        shard_size: examples per shard, the unit of resumption.
        dtype: `float32` or `float16` for the stored log-probabilities (float16 halves the size, with an error of
            about 1e-3 relative on each probability).
        device: where the teachers run (default: CUDA when available).
    """
    if dtype not in VALUE_DTYPES:
        raise ValueError(f"Unknown cache dtype {dtype!r}; choose one of {list(VALUE_DTYPES)}.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: there is nothing to cache.")
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"The dataset has no `input_ids` column (its columns: {dataset.column_names}); tokenize it.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = teacher_names(teachers, names)
    models = [
        m.to(device) for m in load_teachers(teachers, dtype=teacher_dtype, init_kwargs=teacher_model_init_kwargs)
    ]
    vocab_sizes = {name: vocab_size(model) for name, model in zip(names, models, strict=True)}
    # the tokenizer's tokens; the teachers' padding rows beyond them are dropped (`hf_mtkd.teachers`)
    widths = {min(size, len(tokenizer)) if tokenizer is not None else size for size in vocab_sizes.values()}
    if len(widths) != 1:
        raise ValueError(
            f"The teachers' vocabularies differ ({vocab_sizes}); a cache holds one vocabulary shared by all teachers. "
            "If they share one tokenizer and only their embeddings are padded, pass it (`tokenizer=`)."
        )
    vocab = widths.pop()
    if not 0 < k <= vocab:
        raise ValueError(f"k = {k} must be between 1 and the vocabulary size {vocab}.")

    manifest = CacheManifest(
        teachers=[teacher_record(model, name, hash_weights=True) for model, name in zip(models, names, strict=True)],
        tokenizer=None if tokenizer is None else tokenizer_fingerprint(tokenizer),
        vocab_size=vocab,
        k=k,
        dtype=dtype,
        data_fingerprint=data_fingerprint(dataset),
        num_rows=len(dataset),
        shard_size=shard_size,
    )
    os.makedirs(output_dir, exist_ok=True)
    if os.path.isfile(os.path.join(output_dir, MANIFEST_NAME)):
        existing = CacheManifest.load(output_dir)
        differences = existing.differences(manifest)
        if differences:
            raise stale_cache_error(output_dir, differences)
        manifest.completed_shards = existing.completed_shards
        if manifest.complete:
            logger.info("The teacher-logits cache in %s is complete; nothing to compute.", output_dir)
        else:
            logger.info(
                "Resuming the teacher-logits cache in %s after %d shard(s).",
                output_dir,
                len(existing.completed_shards),
            )
    manifest.save(output_dir)

    features = _features(dataset, len(models), k, dtype)
    todo = [shard for shard in range(manifest.num_shards) if shard not in manifest.completed_shards]
    rows_todo = sum(min(shard_size, len(dataset) - shard * shard_size) for shard in todo)
    with tqdm(total=rows_todo, desc="Caching teacher logits", unit="example", disable=disable_tqdm) as progress:
        for shard in todo:
            rows = dataset.select(range(shard * shard_size, min((shard + 1) * shard_size, len(dataset))))
            columns = _cache_columns(
                models, names, rows, k=k, vocab=vocab, batch_size=batch_size, device=device, update=progress.update
            )
            shard_dataset = Dataset.from_dict({**rows.to_dict(), **columns}, features=features)
            with _quiet_datasets():
                shard_dataset.save_to_disk(_shard_path(output_dir, shard))
            manifest.completed_shards = sorted({*manifest.completed_shards, shard})
            manifest.save(output_dir)
    return load_teacher_cache(output_dir)


def load_teacher_cache(
    path: str,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dataset: Dataset | None = None,
) -> TeacherLogitsCache:
    """
    The cache in `path`, memory-mapped. With `tokenizer` or `dataset`, refuse (`StaleCacheError`) a cache written
    for another tokenizer or other data; an unfinished cache is refused too.
    """
    manifest = CacheManifest.load(path)
    if manifest.format_version != FORMAT_VERSION:
        raise StaleCacheError(
            f"{path} was written in cache format {manifest.format_version}, this version of hf_mtkd reads "
            f"{FORMAT_VERSION}. Write the cache again."
        )
    if not manifest.complete:
        raise ValueError(
            f"The teacher-logits cache in {path} is unfinished ({len(manifest.completed_shards)} of "
            f"{manifest.num_shards} shards). Run `cache_teacher_logits` (or `hf-mtkd cache-teachers`) again with "
            "the same arguments to finish it."
        )
    if tokenizer is not None:
        check_cache_tokenizer(manifest, tokenizer, path)
    if dataset is not None:
        fingerprint = data_fingerprint(dataset)
        if fingerprint != manifest.data_fingerprint:
            raise stale_cache_error(path, [("token ids (sha256)", manifest.data_fingerprint, fingerprint)])
    shards = [load_from_disk(_shard_path(path, shard)) for shard in range(manifest.num_shards)]
    data = concatenate_datasets(shards) if len(shards) > 1 else shards[0]
    # The cached columns are read as numpy arrays (fast); the others stay as lists for the usual collators.
    data = data.with_format("numpy", columns=list(CACHE_COLUMNS), output_all_columns=True)
    return TeacherLogitsCache(path=path, manifest=manifest, dataset=data)


def check_cache_tokenizer(manifest: CacheManifest, tokenizer: PreTrainedTokenizerBase, path: str) -> None:
    """Refuse a cache whose data was tokenized with another tokenizer than `tokenizer`."""
    if manifest.tokenizer is None:
        return
    given = tokenizer_fingerprint(tokenizer)
    if given["vocab_sha256"] != manifest.tokenizer["vocab_sha256"]:
        raise stale_cache_error(
            path,
            [
                (
                    "tokenizer vocabulary (sha256)",
                    f"{_show(manifest.tokenizer['vocab_sha256'])} ({manifest.tokenizer['name_or_path']})",
                    f"{_show(given['vocab_sha256'])} ({given['name_or_path']})",
                )
            ],
        )


def check_same_teachers(cache: TeacherLogitsCache, other: TeacherLogitsCache, role: str) -> None:
    """Refuse `other` (the cache of another split) unless it holds the same teachers (by weights), k and selection."""
    fields = (
        ("teacher weights (sha256)", cache.manifest.teacher_weights, other.manifest.teacher_weights),
        ("k", cache.manifest.k, other.manifest.k),
        ("selected teachers", cache.teacher_indices, other.teacher_indices),
    )
    differences = [(key, mine, theirs) for key, mine, theirs in fields if mine != theirs]
    if differences:
        raise ValueError(
            f"The {role} cache ({other.path}) does not match the training cache ({cache.path}): "
            f"{_describe(differences, 'training cache', role)}. Cache both splits with the same teachers and k, and "
            "select the same teachers from both."
        )


def stale_cache_error(path: str, differences: Sequence[tuple[str, Any, Any]]) -> StaleCacheError:
    """The error for a cache computed from other inputs than those given: each differing field with both values."""
    return StaleCacheError(
        f"The teacher-logits cache in {path} was computed from other inputs than those given now: "
        f"{_describe(differences, 'cache', 'now')}. Give the same teachers, tokenizer vocabulary, data and k, or "
        "write this cache to another directory (or delete it to recompute it)."
    )


def _describe(differences: Sequence[tuple[str, Any, Any]], first: str, second: str) -> str:
    return "; ".join(f"{key}: {first} {_show(a)}, {second} {_show(b)}" for key, a, b in differences)


def _show(value: Any) -> str:
    """A value for an error message, sha256 hex digests cut to 12 characters."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(item) for item in value) + "]"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    return str(value)


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Without `datasets`' own progress bars (one per shard would drown the caching bar)."""
    enabled = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.utils.enable_progress_bars()


def _shard_path(output_dir: str, shard: int) -> str:
    return os.path.join(output_dir, SHARDS_DIR, f"{shard:05d}")


def _features(dataset: Dataset, num_teachers: int, k: int, dtype: str) -> Features:
    return Features(
        {
            **dataset.features,
            INDICES: Array3D(shape=(None, num_teachers, k), dtype="int32"),
            LOG_PROBS: Array3D(shape=(None, num_teachers, k), dtype=dtype),
            LOG_TAIL_MASS: Array2D(shape=(None, num_teachers), dtype="float32"),
        }
    )


def _cache_columns(
    models: Sequence[nn.Module],
    names: Sequence[str],
    rows: Dataset,
    *,
    k: int,
    vocab: int,
    batch_size: int,
    device: torch.device,
    update: Callable[[int], Any],
) -> dict[str, list[np.ndarray]]:
    """
    The cached columns for `rows`: per example, every teacher's top-k over its first `vocab` logits (its padding
    rows dropped) at each position that has a next token.
    """
    columns: dict[str, list[np.ndarray]] = {name: [] for name in CACHE_COLUMNS}
    present = [key for key in TEACHER_INPUT_KEYS if key in rows.column_names]
    for start in range(0, len(rows), batch_size):
        examples = rows[start : start + batch_size]
        lengths = [len(ids) for ids in examples["input_ids"]]
        inputs = {key: pad_rows(examples[key]).to(device) for key in present}
        positions = torch.arange(max(lengths), device=device)[None, :]
        counts = torch.tensor(lengths, device=device)[:, None]
        if "position_ids" not in inputs:  # packed rows get their block-diagonal mask from the position ids
            inputs.setdefault("attention_mask", (positions < counts).long())
        valid = positions < counts - 1  # the positions that have a next token
        per_teacher = []
        for model, name in zip(models, names, strict=True):
            logits, _ = teacher_forward(model, name, inputs, output_hidden_states=False)
            per_teacher.append(TopKLogits.from_logits(logits[..., :vocab], k))
        # NaN/inf logits make the most likely token's log-probability NaN
        check_finite(torch.stack([t.log_probs[valid][:, 0] for t in per_teacher]), names)
        for i, n in enumerate(lengths):
            stop = max(n - 1, 0)
            columns[INDICES].append(torch.stack([t.indices[i, :stop] for t in per_teacher], 1).int().cpu().numpy())
            columns[LOG_PROBS].append(torch.stack([t.log_probs[i, :stop] for t in per_teacher], 1).cpu().numpy())
            columns[LOG_TAIL_MASS].append(
                torch.stack([t.log_tail_mass[i, :stop] for t in per_teacher], 1).cpu().numpy()
            )
        update(len(lengths))
    return columns


class TeacherCacheCollator:
    """
    Collate examples of a teacher-logits cache: `collator` batches the dataset's own columns (padding them), and
    the cached columns are padded to the same positions as `[K, B, T, k]` / `[K, B, T]` tensors under their column
    names (rows past an example's end are zeros; the loss never reads them, since they have no next-token label).
    With `teachers`, only those teachers' columns are batched (a view of some of a cache's teachers).
    """

    def __init__(
        self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]], teachers: Sequence[int] | None = None
    ) -> None:
        self.collator = collator
        self.teachers = None if teachers is None else list(teachers)
        """Positions on the stored teacher axis to batch, in this order (`TeacherLogitsCache.teacher_indices`)."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        missing = [name for name in CACHE_COLUMNS if name not in features[0]]
        if missing:
            raise ValueError(
                f"The examples have no cached teacher logits ({', '.join(missing)}); with a teacher-logits cache, "
                "train and evaluate on `cache.dataset` (or a `select`/`shuffle`/`train_test_split` of it)."
            )
        cached = [{name: self._select(np.asarray(f[name])) for name in CACHE_COLUMNS} for f in features]
        batch = self.collator([{key: v for key, v in f.items() if key not in CACHE_COLUMNS} for f in features])
        input_ids = batch["input_ids"]
        num_teachers, k = cached[0][INDICES].shape[1:]
        out = {
            INDICES: torch.zeros(num_teachers, *input_ids.shape, k, dtype=torch.int32),
            LOG_PROBS: torch.zeros(num_teachers, *input_ids.shape, k),
            LOG_TAIL_MASS: torch.zeros(num_teachers, *input_ids.shape),
        }
        for i, (feature, columns) in enumerate(zip(features, cached, strict=True)):
            start = _offset(input_ids[i], feature["input_ids"])
            n = columns[INDICES].shape[0]
            for name, values in columns.items():
                out[name][:, i, start : start + n] = torch.from_numpy(values).to(out[name].dtype).transpose(0, 1)
        return {**batch, **out}

    def _select(self, values: np.ndarray) -> np.ndarray:
        """An example's cached column `[L - 1, K, ...]` restricted to the selected teachers."""
        if self.teachers is None:
            return values
        if values.ndim < 2 or max(self.teachers) >= values.shape[1]:
            raise ValueError(
                f"The examples hold {values.shape[1] if values.ndim >= 2 else 0} cached teachers but the collator "
                f"selects positions {self.teachers}: collate a view's rows with the cache the view was made from."
            )
        return values[:, self.teachers]


def _offset(padded: Tensor, ids: Sequence[int]) -> int:
    """Where an example's tokens start in its padded row (0 with right padding, the pad length with left)."""
    ids = torch.as_tensor(np.asarray(ids), dtype=padded.dtype)
    for start in {0, padded.numel() - ids.numel()}:
        if torch.equal(padded[start : start + ids.numel()], ids):
            return start
    raise ValueError(
        "The collator changed an example's token ids (it is neither right- nor left-padded unchanged), so its "
        "cached teacher logits cannot be placed. Use a collator that only pads, e.g. "
        "DataCollatorForLanguageModeling(tokenizer, mlm=False)."
    )


def batch_teacher_logits(inputs: dict[str, Any], vocab_size: int, support: int | None = None) -> list[TopKLogits]:
    """
    Pop the cached columns from a collated batch as one `TopKLogits` per teacher, `vocab_size` wide (the student's
    logits); with `support` (the cache's `manifest.vocab_size`, when the student has more rows) the rows from
    `support` on have probability 0.
    """
    indices, log_probs, log_tail = (inputs.pop(name) for name in CACHE_COLUMNS)
    return [
        TopKLogits(indices=i, log_probs=p, log_tail_mass=m, vocab_size=vocab_size, support=support)
        for i, p, m in zip(indices, log_probs, log_tail, strict=True)
    ]
