"""
Teacher sources: where a batch's teacher outputs come from, behind one interface (`TeacherSource`).

* `LiveTeachers`: teacher models run on every batch, each one either on the student's tokenizer
  (`SharedVocabularyTeacher`: it reads the student's token ids) or on its own (`CrossTokenizerTeacher`: it reads its
  own tokens of the same text, and its predictions are aligned to the student's positions and mapped onto the
  student's vocabulary, see `hf_mtkd.cross_tokenizer`);
* `CachedTeacherLogits`: the teachers' top-k outputs read from a teacher-logits cache (`hf_mtkd.teacher_cache`); no
  teacher runs.

A source is made by `teacher_source` (the one place that looks at what `teachers` is), checks itself against the
config, the student and the data, names the dataset columns and the default collator it needs, and gives for each
batch a `TeacherBatch` (logits or top-k rows, hidden states, where each teacher is available) and its own metrics.
The trainer calls these and nothing else, so another source (a teacher served by another process, a logit-free
teacher) is another class here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase, default_data_collator

from .chat_data import ExampleRenderer, trainer_renderer
from .chunked import next_token_mask
from .config import MultiTeacherDistillationConfig
from .cross_tokenizer import (
    PROMPT_CONTENT_KEY,
    TEACHER_INPUTS_KEY,
    AlignedTeacher,
    MultiTokenizerCollator,
    VocabularyMap,
    build_vocabulary_maps,
    check_text_column,
    check_token_ids_column,
    max_positions,
    resolve_teacher_tokenizers,
    teacher_on_student_positions,
)
from .distributed import prepare_teachers, zero3_init_dtype
from .heads import LogitFreePlan
from .prompt_evidence import PromptEvidence, prompt_targets, token_log_probs
from .storage import TeacherLogits
from .teacher_cache import CACHE_COLUMNS, TeacherCacheCollator, TeacherLogitsCache, batch_teacher_logits, check_cache
from .teachers import (
    check_teachers,
    load_teachers,
    on_student_vocabulary,
    teacher_forward,
    teacher_names,
    teacher_record,
)

PER_ALIGNED_POSITION = (
    "teacher_entropy",
    "teacher_nll",
    "teacher_unmapped_mass",
    "teacher_prefix_mapped_mass",
    "teacher_chained_mass",
)
"""The metrics of a teacher that reports `teacher_aligned/<name>` (cross-tokenizer), averaged over those positions."""


@dataclass
class TeacherOutput:
    """One teacher's outputs for a batch, at the student's positions."""

    logits: TeacherLogits
    """On the student's vocabulary: `[B, T, V]` logits, or their top-k form."""
    hidden_states: tuple[Tensor, ...] | None = None
    """Each `[B, T, D_k]`, when asked for."""
    available: Tensor | None = None
    """`[B, T]` bool, where the teacher is available (None: everywhere)."""
    own_logits: Tensor | None = None
    """On the teacher's own vocabulary, for the ULD divergence (None: `logits`)."""
    alignment: AlignedTeacher | None = None
    """A cross-tokenizer teacher's alignment, with what its vocabulary map lost (for the metrics)."""
    prompt_log_prob: Tensor | None = None
    """`[n]` its log-probabilities of the prompt tokens, at the n prompt positions it was asked for."""
    prompt_row_log_prob: Tensor | None = None
    """`[B]` instead, a teacher on its own tokens: the floored sum per row over its own prompt tokens (`row_sums`)."""


@dataclass
class TeacherBatch:
    """Every teacher's outputs for a batch, in the trainer's teacher order."""

    outputs: list[TeacherOutput]

    @property
    def logits(self) -> list[TeacherLogits]:
        return [output.logits for output in self.outputs]

    @property
    def hidden_states(self) -> list[tuple[Tensor, ...] | None]:
        return [output.hidden_states for output in self.outputs]

    @property
    def own_logits(self) -> list[TeacherLogits]:
        return [output.logits if output.own_logits is None else output.own_logits for output in self.outputs]

    def prompt_evidence(self, positions: Tensor) -> PromptEvidence:
        """The teachers' `PromptEvidence` at the prompt positions `positions` `[B, T]` they were run with."""
        rows = [output.prompt_row_log_prob for output in self.outputs]
        at_positions = positions.new_zeros(int(positions.sum()), dtype=torch.float32)
        at_rows = positions.new_zeros(positions.shape[0], dtype=torch.float32)
        return PromptEvidence(
            positions,
            torch.stack([at_positions if o.prompt_log_prob is None else o.prompt_log_prob for o in self.outputs]),
            None if all(row is None for row in rows) else torch.stack([at_rows if r is None else r for r in rows]),
        )

    def teacher_mask(self, labels: Tensor) -> Tensor | None:
        """`[K, B, T]` bool, where each teacher is available; None when every teacher is available everywhere."""
        if all(output.available is None for output in self.outputs):
            return None
        everywhere = torch.ones_like(labels, dtype=torch.bool)
        return torch.stack([everywhere if output.available is None else output.available for output in self.outputs])


class TeacherSource:
    """
    Where the teachers' outputs come from. Built by `teacher_source`, then, in this order: `load` (after the
    routing column was checked against `names`), `renderer`, `collator` (when the user gave none), `wrap_collator`,
    `check_data`; once the Trainer exists, `prepare`; per batch `check_batch`, `__call__` and `add_metrics`.
    """

    names: list[str]
    """The teachers' display names, in order."""
    records: list[dict[str, Any]]
    """What identifies each teacher (name, origin, class, revision, parameter count), for the model card."""
    batch_keys: tuple[str, ...] = ()
    """Keys the source's collator adds to a batch, which the student does not read."""

    @property
    def cross_tokenizer(self) -> bool:
        """Whether some teacher reads its own tokens (then `cross_tokenizer_loss` is the KD divergence)."""
        return False

    @property
    def models(self) -> list[nn.Module]:
        """The teacher models this process runs (none for a cache)."""
        return []

    @property
    def tokenizers(self) -> list[PreTrainedTokenizerBase | None]:
        """Each teacher's own tokenizer when it reads its own tokens, else None."""
        return [None] * len(self.names)

    @property
    def shared_vocabulary_sizes(self) -> list[int | None]:
        """Per live teacher on the student's tokenizer, the leading token ids it is distilled on, else None."""
        return [None] * len(self.names)

    @property
    def generation_teachers(self) -> dict[str, nn.Module]:
        """The teachers that can continue the student's prompts (they read the student's token ids), by name."""
        return {}

    def load(
        self,
        args: MultiTeacherDistillationConfig,
        student: nn.Module,
        processing_class: Any,
        teacher_tokenizers: Sequence[PreTrainedTokenizerBase | str | None] | None,
    ) -> None:
        """Load the teachers and check them against the student (nothing to do for outputs read from disk)."""

    def renderer(
        self, args: MultiTeacherDistillationConfig, train_dataset: Any, eval_dataset: Any
    ) -> ExampleRenderer | None:
        """How prompt/completion and chat data are rendered for this source (None: the data is read as it is)."""
        return None

    def collator(
        self, processing_class: Any, args: MultiTeacherDistillationConfig, renderer: ExampleRenderer | None
    ) -> Any:
        """The source's own default collator, when it needs one (None: the trainer's default for tokenized data)."""
        return None

    def wrap_collator(self, collator: Any) -> Any:
        """The collator to train with, around the chosen one (itself, unless the source adds columns to batches)."""
        return collator

    def check_data(self, collator: Any, reads_token_ids: bool, train_dataset: Any, eval_dataset: Any) -> None:
        """Refuse up front datasets that lack the columns the source reads."""

    def columns(self, collator: Any) -> list[str]:
        """Dataset columns the source reads through `collator` besides the student's inputs (kept by the Trainer)."""
        return []

    def prepare(self, accelerator: Any, args: MultiTeacherDistillationConfig) -> None:
        """Place the teachers for this process (devices, DeepSpeed), once the Trainer's accelerator exists."""

    def describe(self, args: MultiTeacherDistillationConfig) -> str:
        """What is distilled from, for the log ("Distilling <this>.")."""
        raise NotImplementedError

    def check_batch(self, inputs: Mapping[str, Any]) -> None:
        """Refuse a batch that was not collated for this source."""

    @property
    def logit_free_models(self) -> list[nn.Module | None]:
        """Each teacher run from a model of its own (on the student's tokens or its own), so may run logit-free."""
        return [None] * len(self.names)

    @property
    def no_prompt_evidence(self) -> str | None:
        """Why the source cannot give the teachers' log-probabilities of the prompt tokens (`prompt`), or None."""
        return "this teacher source gives no log-probabilities of the prompt tokens"

    def __call__(
        self,
        inputs: dict[str, Any],
        *,
        student_vocab: int,
        temperature: float,
        output_hidden_states: bool,
        logit_free: LogitFreePlan | None = None,
        mask: Tensor | None = None,
        prompt: Tensor | None = None,
    ) -> TeacherBatch:
        """
        The teachers' outputs for the batch `inputs` (the source's own keys are taken out of it); with `logit_free`
        (the student runs logit-free), the teachers it plans for give `HeadLogits` at the valid positions `mask`;
        with `prompt` (`hf_mtkd.prompt_evidence.prompt_positions`, where `no_prompt_evidence` is None), each
        teacher's `prompt_log_prob` there.
        """
        raise NotImplementedError

    def add_metrics(self, sums: dict[str, Tensor], batch: TeacherBatch, mask: Tensor) -> None:
        """Add the source's own token sums at the valid positions `mask` to `sums` (cross-tokenizer alignment)."""


def teacher_source(
    teachers: Sequence[nn.Module | str] | TeacherLogitsCache | TeacherSource | None,
    args: MultiTeacherDistillationConfig,
    student: nn.Module,
    processing_class: Any,
    teacher_tokenizers: Sequence[PreTrainedTokenizerBase | str | None] | None,
    train_dataset: Any,
    eval_dataset: Any,
) -> tuple[TeacherSource, Any, Any]:
    """
    The source of `teachers` (models or names/paths, a `TeacherLogitsCache`, or a `TeacherSource` of one's own),
    checked against `args` (one setting per teacher) and, for a cache, the student, tokenizer and datasets; with the
    datasets to train on (a cache's rows unwrapped). Nothing is loaded yet (`TeacherSource.load`).
    """
    if isinstance(teachers, TeacherSource):
        args.check_num_teachers(len(teachers.names))
        return teachers, train_dataset, eval_dataset
    if isinstance(teachers, TeacherLogitsCache):
        args.check_num_teachers(len(teachers.teacher_names))
        if teacher_tokenizers is not None:
            raise ValueError(
                "`teacher_tokenizers` cannot be combined with a teacher-logits cache: a cache holds teachers on "
                "the student's vocabulary. Pass the teachers themselves for cross-tokenizer distillation."
            )
        train_dataset, eval_dataset = check_cache(
            teachers, args, student, processing_class, train_dataset, eval_dataset
        )
        return CachedTeacherLogits(teachers, args), train_dataset, eval_dataset
    args.check_num_teachers(len(teachers))
    return LiveTeachers(teachers, args), train_dataset, eval_dataset


# ---- live teachers ----


class SharedVocabularyTeacher:
    """A teacher on the student's tokenizer: it reads the student's token ids and scores the student's vocabulary."""

    def __init__(self, model: nn.Module, name: str, shared_vocabulary_size: int | None) -> None:
        self.model, self.name = model, name
        self.shared_vocabulary_size = shared_vocabulary_size
        """The leading token ids it is distilled on (`hf_mtkd.teachers.shared_vocabulary_size`)."""

    def __call__(
        self,
        inputs: Mapping[str, Any],
        own_inputs: Any,
        *,
        student_vocab: int,
        temperature: float,
        hidden: bool,
        run_head: Callable[..., Any] | None = None,
        prompt: Tensor | None = None,
    ) -> TeacherOutput:
        """
        Its outputs; with `run_head` (`LogitFreePlan.run_teacher` for it, at the valid and the `prompt` positions),
        its `HeadLogits` where it can; with `prompt`, its log-probabilities of the prompt tokens.
        """
        forward = functools.partial(teacher_forward, self.model, self.name, inputs, output_hidden_states=hidden)
        (logits, hidden_states), head = (
            (forward(), None)
            if run_head is None
            else run_head(forward, vocab_size=student_vocab, shared=self.shared_vocabulary_size)
        )
        if head is None:
            logits = on_student_vocabulary(logits, self.shared_vocabulary_size, student_vocab)
        if prompt is None:
            return TeacherOutput(logits if head is None else head, hidden_states)
        targets = prompt_targets(inputs["input_ids"], prompt)
        if head is None:
            prompt_log_prob = token_log_probs(logits, targets, prompt.flatten().nonzero()[:, 0])
        else:  # its head at the valid positions, then the prompt's (`LiveTeachers`)
            valid = next_token_mask(inputs["labels"])
            at_valid = valid[valid | prompt]
            head, prompt_log_prob = head.take(at_valid), token_log_probs(head.take(~at_valid), targets)
        return TeacherOutput(logits if head is None else head, hidden_states, prompt_log_prob=prompt_log_prob)


class CrossTokenizerTeacher:
    """A teacher on its own tokenizer: it reads its own tokens (`teacher_inputs`), mapped by `vocabulary_map`."""

    def __init__(self, model: nn.Module, name: str, vocabulary_map: VocabularyMap, *, chains: bool = True) -> None:
        self.model, self.name, self.vocabulary_map = model, name, vocabulary_map
        self.chains = chains
        """Whether a student token it spells as several of its own gets its chained probability (`token_chains`)."""

    def __call__(
        self,
        inputs: Mapping[str, Any],
        own_inputs: Any,
        *,
        student_vocab: int,
        temperature: float,
        hidden: bool,
        run_head: Callable[..., Any] | None = None,
        prompt: Tensor | None = None,
    ) -> TeacherOutput:
        """
        Its outputs on the student's positions; with `run_head`, its `HeadLogits` inside the mapped logits; with
        `prompt` (the student's prompt positions: the evidence is asked for), its log-likelihood per row of its own
        prompt tokens instead (the collator's `prompt_mask`; none in plain text, which has no prompt).
        """
        if own_inputs is None:
            raise ValueError(
                f"Teacher {self.name!r} runs in cross-tokenizer mode but the batch has no inputs of its own: use "
                "`MultiTokenizerCollator` (the default collator in that mode) on a dataset with raw text."
            )
        view = teacher_on_student_positions(
            self.model,
            self.name,
            own_inputs,
            self.vocabulary_map,
            temperature=temperature,
            output_hidden_states=hidden,
            run_head=run_head,
            mask=None if run_head is None else next_token_mask(inputs["labels"]),
            prompt_mask=None if prompt is None else own_inputs.get("prompt_mask"),
            student_labels=inputs["labels"] if self.chains else None,
        )
        return TeacherOutput(
            view.mapped,
            view.hidden_states,
            view.available,
            view.own_logits,
            view,
            prompt_row_log_prob=view.prompt_row_log_prob,
        )

    def add_metrics(self, sums: dict[str, Tensor], output: TeacherOutput, mask: Tensor) -> None:
        """Aligned positions and, over them, the unmapped, prefix-mapped and chained probability mass."""
        here = output.available[mask]
        sums[f"teacher_aligned/{self.name}"] = here.sum()
        sums[f"teacher_unmapped_mass/{self.name}"] = output.alignment.unmapped_mass[mask][here].sum()
        sums[f"teacher_prefix_mapped_mass/{self.name}"] = output.alignment.inexact_mass[mask][here].sum()
        if self.chains:
            sums[f"teacher_chained_mass/{self.name}"] = output.alignment.chained_mass[mask][here].sum()


class LiveTeachers(TeacherSource):
    """Teacher models run on every batch, each on the student's tokenizer or on its own (see the module docstring)."""

    def __init__(self, specs: Sequence[nn.Module | str], args: MultiTeacherDistillationConfig) -> None:
        self.specs = list(specs)
        self.names = teacher_names(self.specs, args.teacher_names)
        self.teachers: list[SharedVocabularyTeacher | CrossTokenizerTeacher] = []
        self._tokenizers: list[PreTrainedTokenizerBase | None] = []
        self.batch_keys = (TEACHER_INPUTS_KEY, PROMPT_CONTENT_KEY)

    def load(
        self,
        args: MultiTeacherDistillationConfig,
        student: nn.Module,
        processing_class: Any,
        teacher_tokenizers: Sequence[PreTrainedTokenizerBase | str | None] | None,
    ) -> None:
        with zero3_init_dtype(args.teacher_dtype):
            models = load_teachers(self.specs, dtype=args.teacher_dtype, init_kwargs=args.teacher_model_init_kwargs)
        self.records = [teacher_record(t, n) for t, n in zip(models, self.names, strict=True)]
        self._tokenizers = resolve_teacher_tokenizers(
            self.specs, models, self.names, student, processing_class, teacher_tokenizers, args.cross_tokenizer
        )
        tokenizer_length = len(processing_class) if isinstance(processing_class, PreTrainedTokenizerBase) else None
        shared_sizes = check_teachers(
            models,
            self.names,
            student,
            need_hidden_states=args.alpha_feat > 0,
            cross_tokenizer=[t is not None for t in self._tokenizers],
            tokenizer_length=tokenizer_length,
        )
        maps = build_vocabulary_maps(
            models, self.names, self._tokenizers, student, processing_class,
            prefix_mass=args.cross_tokenizer_prefix_mass,
        )  # fmt: skip
        self.teachers = [
            SharedVocabularyTeacher(model, name, size) if vocabulary_map is None
            else CrossTokenizerTeacher(model, name, vocabulary_map, chains=args.cross_tokenizer_chains)
            for model, name, size, vocabulary_map in zip(models, self.names, shared_sizes, maps, strict=True)
        ]  # fmt: skip

    @property
    def tokenizers(self) -> list[PreTrainedTokenizerBase | None]:
        return self._tokenizers

    @property
    def shared_vocabulary_sizes(self) -> list[int | None]:
        return [getattr(teacher, "shared_vocabulary_size", None) for teacher in self.teachers]

    @property
    def cross_tokenizer(self) -> bool:
        return any(isinstance(teacher, CrossTokenizerTeacher) for teacher in self.teachers)

    @property
    def models(self) -> list[nn.Module]:
        return [teacher.model for teacher in self.teachers]

    @models.setter
    def models(self, models: Sequence[nn.Module]) -> None:
        """Run these models instead, one per teacher in order (e.g. their DeepSpeed engines, or wrapped ones)."""
        for teacher, model in zip(self.teachers, models, strict=True):
            teacher.model = model

    @property
    def generation_teachers(self) -> dict[str, nn.Module]:
        return {t.name: t.model for t in self.teachers if isinstance(t, SharedVocabularyTeacher)}

    def renderer(
        self, args: MultiTeacherDistillationConfig, train_dataset: Any, eval_dataset: Any
    ) -> ExampleRenderer | None:
        return trainer_renderer(args, train_dataset, eval_dataset, cross_tokenizer=self.cross_tokenizer)

    def collator(
        self, processing_class: Any, args: MultiTeacherDistillationConfig, renderer: ExampleRenderer | None
    ) -> Any:
        """With cross-tokenizer teachers, a `MultiTokenizerCollator`: every model tokenizes (renders) the raw data."""
        if not self.cross_tokenizer:
            return None
        return MultiTokenizerCollator(
            processing_class,
            self.tokenizers,
            max_length=args.cross_tokenizer_max_length,
            teacher_max_lengths=[max_positions(model) for model in self.models],
            renderer=renderer,
            teacher_names=self.names,
        )

    def check_data(self, collator: Any, reads_token_ids: bool, train_dataset: Any, eval_dataset: Any) -> None:
        if self.cross_tokenizer:
            check_text_column(collator, train_dataset, eval_dataset)
        elif reads_token_ids:
            check_token_ids_column(train_dataset, eval_dataset)

    def columns(self, collator: Any) -> list[str]:
        if self.cross_tokenizer and isinstance(collator, MultiTokenizerCollator):
            return list(collator.columns)
        return []

    def prepare(self, accelerator: Any, args: MultiTeacherDistillationConfig) -> None:
        self.models = prepare_teachers(self.models, self.names, accelerator, args)

    def describe(self, args: MultiTeacherDistillationConfig) -> str:
        names = ", ".join(self.names)
        return f"{len(self.teachers)} teacher(s) ({names}) on {args.device}, teacher_dtype={args.teacher_dtype}"

    def check_batch(self, inputs: Mapping[str, Any]) -> None:
        if CACHE_COLUMNS[0] in inputs:
            raise ValueError(
                "The batch holds cached teacher logits but the trainer runs live teachers: pass the cache as "
                "`teachers`."
            )

    @property
    def logit_free_models(self) -> list[nn.Module | None]:
        return [t.model for t in self.teachers]

    @property
    def no_prompt_evidence(self) -> str | None:
        return None

    def __call__(
        self,
        inputs: dict[str, Any],
        *,
        student_vocab: int,
        temperature: float,
        output_hidden_states: bool,
        logit_free: LogitFreePlan | None = None,
        mask: Tensor | None = None,
        prompt: Tensor | None = None,
    ) -> TeacherBatch:
        own_inputs = inputs.get(TEACHER_INPUTS_KEY) or [None] * len(self.teachers)
        extra = {} if prompt is None else {"prompt": prompt}
        outputs = []
        for k, (teacher, own) in enumerate(zip(self.teachers, own_inputs, strict=True)):
            head_mask = mask
            if prompt is not None and mask is not None and isinstance(teacher, SharedVocabularyTeacher):
                head_mask = mask | prompt  # its head runs at the prompt positions too (a cross-tokenizer one: its own)
            run_head = None if logit_free is None else functools.partial(logit_free.run_teacher, k, mask=head_mask)
            outputs.append(
                teacher(
                    inputs,
                    own,
                    student_vocab=student_vocab,
                    temperature=temperature,
                    hidden=output_hidden_states,
                    run_head=run_head,
                    **extra,
                )
            )
        return TeacherBatch(outputs)

    def add_metrics(self, sums: dict[str, Tensor], batch: TeacherBatch, mask: Tensor) -> None:
        for teacher, output in zip(self.teachers, batch.outputs, strict=True):
            if isinstance(teacher, CrossTokenizerTeacher):
                teacher.add_metrics(sums, output, mask)


# ---- outputs read from a teacher-logits cache ----


class CachedTeacherLogits(TeacherSource):
    """The teachers' top-k outputs from a `TeacherLogitsCache`, batched by a `TeacherCacheCollator`."""

    def __init__(self, cache: TeacherLogitsCache, args: MultiTeacherDistillationConfig) -> None:
        self.cache = cache
        self.names = teacher_names(cache.teacher_names, args.teacher_names)
        self.records = [
            {**record, "name": name} for record, name in zip(cache.manifest.teachers, self.names, strict=True)
        ]
        self.batch_keys = CACHE_COLUMNS

    def wrap_collator(self, collator: Any) -> Any:
        return TeacherCacheCollator(collator or default_data_collator, self.cache.teacher_indices)

    def columns(self, collator: Any) -> list[str]:
        return list(CACHE_COLUMNS)

    @property
    def no_prompt_evidence(self) -> str | None:
        return None  # the cache holds every position that has a next token, the prompt's too

    def describe(self, args: MultiTeacherDistillationConfig) -> str:
        return (
            f"{len(self.names)} teacher(s) ({', '.join(self.names)}) from their cached top-{self.cache.manifest.k} "
            f"logits in {self.cache.path}; no teacher runs"
        )

    def check_batch(self, inputs: Mapping[str, Any]) -> None:
        if CACHE_COLUMNS[0] not in inputs:
            raise ValueError(
                "The batch has no cached teacher logits: collate it with the trainer's TeacherCacheCollator."
            )

    def __call__(
        self,
        inputs: dict[str, Any],
        *,
        student_vocab: int,
        temperature: float,
        output_hidden_states: bool,
        logit_free: LogitFreePlan | None = None,
        mask: Tensor | None = None,
        prompt: Tensor | None = None,
    ) -> TeacherBatch:
        rows = batch_teacher_logits(inputs, student_vocab, support=self.cache.manifest.vocab_size)
        if prompt is None:
            return TeacherBatch([TeacherOutput(logits) for logits in rows])
        # each teacher's cached distribution at the prompt positions (a token outside its top k: the tail's share)
        targets, where = prompt_targets(inputs["input_ids"], prompt), prompt.flatten().nonzero()[:, 0]
        return TeacherBatch(
            [TeacherOutput(logits, prompt_log_prob=token_log_probs(logits, targets, where)) for logits in rows]
        )
