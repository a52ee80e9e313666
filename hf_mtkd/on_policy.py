r"""
On-policy distillation (GKD's `lmbda` and `seq_kd`) with one or several teachers.

With probability `lmbda` per training micro-batch, the student writes the completions itself: each row's prompt
(its tokens before the first label, `prompt_tokens`) is continued by sampling (`generation_temperature`, top-k,
top-p, `max_new_tokens`, stopping at the tokenizer's EOS), and the batch becomes prompt + completion with labels on
the generated tokens only, through the first EOS (`completion_batch`). Every teacher then scores the student's own
tokens in `compute_loss` as it scores data. With `seq_kd`, the other micro-batches are completed the same way by
one teacher (`seq_kd_teacher`).

The draw is a function of `(seed, global step, micro-batch index)` (`draw_on_policy`), the same on every process
and after a resume, and generation samples from a generator seeded the same way (plus the process index), so a run
resumed from a checkpoint generates what the uninterrupted run did. The trainer completes the micro-batches of an
optimizer step where it fetches them (`Trainer.get_batch_samples`), before `num_items_in_batch` is counted, so the
loss is normalised over the generated tokens of the whole step and gradient accumulation stays exact.

Generation fits what reads it: a batch gets fewer new tokens than `max_new_tokens` where its longest prompt would
otherwise outgrow the positions of the student or of a teacher on its tokenizer (`position_limits`; a setting that
can never fit is refused when the trainer is built); no padding row of a head wider than the tokenizer is sampled;
the student generates under its training forward's autocast; under DeepSpeed ZeRO-3 the writer's weights are
gathered once per generation (`ds3_gather_for_generation`, `hf_mtkd.distributed.zero3_gathered`).

Teachers on their own tokenizers read the student's text: the generated tokens are decoded and the example is
rendered anew, prompt and completion, for every model by the trainer's `MultiTokenizerCollator` (`GeneratedRenderer`),
as the prompt/completion data are.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import datasets
import numpy as np
import torch
from torch import Tensor, nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase
from transformers.utils import logging

from .chat_data import ExampleRenderer, RenderedExample, dataset_format, encode_rendered
from .config import MultiTeacherDistillationConfig
from .cross_tokenizer import MultiTokenizerCollator, max_positions
from .distributed import zero3_gathered, zero3_parameter_offload
from .routing import ROUTING_KEY
from .sources import CachedTeacherLogits, TeacherSource
from .teachers import vocab_size

logger = logging.get_logger(__name__)

GENERATED_BY_KEY = "mtkd_generated_by"
"""Batch key naming who wrote a generated batch's completions: `STUDENT` or a teacher's name (absent: the data)."""
PROMPTS_KEY = "mtkd_prompts"
"""Batch key holding each row's raw prompt (cross-tokenizer teachers render the generated text anew from it)."""
STUDENT = "student"

ON_POLICY_PREFIX = "on_policy/"
"""The prefix of the on-policy metrics: `generated_tokens`, `generation_seconds`, `share`, `teacher_weight/<name>`."""
_TOKENS, _BATCHES, _GENERATED = "on_policy/num_tokens", "on_policy/num_batches", "on_policy/generated_tokens"
_SECONDS = "on_policy/generation_seconds"


def draw_on_policy(lmbda: float, seed: int, step: int, micro_batch: int) -> bool:
    """
    Whether micro-batch `micro_batch` of optimizer step `step` is on-policy: `u < lmbda` for `u` uniform in [0, 1)
    from a generator seeded by `(seed, step, micro_batch)`, so the same on every process and after a resume.
    """
    if lmbda <= 0:
        return False
    if lmbda >= 1:
        return True
    generator = torch.Generator().manual_seed(mixed_seed(seed, step, micro_batch, 0))
    return bool(torch.rand((), generator=generator) < lmbda)


def mixed_seed(*values: int) -> int:
    """One 63-bit seed from several integers (numpy's `SeedSequence`: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0] >> 1)


def prompt_tokens(input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None) -> list[Tensor]:
    """
    Each row's prompt: its tokens before the first label that is not -100 (every token of a row without one, a
    prompt alone), padding left out. A row whose first token already carries loss has no prompt and is refused.
    """
    learned = labels != -100
    first = torch.where(learned.any(dim=1), learned.int().argmax(dim=1), labels.shape[1])
    keep = torch.ones_like(learned) if attention_mask is None else attention_mask.bool()
    prompts = [ids[:end][keep_row[:end]] for ids, keep_row, end in zip(input_ids, keep, first.tolist(), strict=True)]
    if any(prompt.numel() == 0 for prompt in prompts):
        raise ValueError(
            "A training row has no prompt (its first token already carries loss), so there is nothing to generate a "
            "completion for: on-policy batches continue each row's prompt, the tokens before its first label. Use "
            "prompt/completion or conversational data with completion_only_loss / assistant_only_loss (the "
            "defaults), or tokenized rows whose prompt labels are -100."
        )
    return prompts


class _VocabularyCut(LogitsProcessor):
    """Generation never picks a token id at or beyond `size` (a teacher's padding rows the student does not have)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.size :] = -float("inf")
        return scores


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled (the `generation_*` settings and `max_new_tokens`)."""

    max_new_tokens: int
    temperature: float
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def from_config(cls, args: MultiTeacherDistillationConfig) -> Sampling:
        temperature = args.temperature if args.generation_temperature is None else args.generation_temperature
        return cls(args.max_new_tokens, temperature, args.generation_top_k, args.generation_top_p)


def position_limits(student: nn.Module, source: TeacherSource | None = None) -> list[tuple[str, int]]:
    """
    The models that read the generated token ids as they are, each with the positions it holds (its text config's
    `max_position_embeddings`, gpt2's `n_positions`, where it states one): the student and, given the loaded
    `source`, every teacher on the student's tokenizer (the seq_kd writer among them). A teacher on its own tokenizer
    reads its own rendering, which the collator cuts to its positions, as on data.
    """
    models = [("the student", student)]
    if source is not None:
        shared = [tokenizer is None for tokenizer in source.tokenizers]
        models += [
            (f"teacher {name!r}", model)
            for name, model, same in zip(source.names, source.models, shared, strict=True)
            if same
        ]
    return [(who, limit) for who, model in models if (limit := max_positions(model)) is not None]


def check_max_new_tokens(max_new_tokens: int, limits: Sequence[tuple[str, int]]) -> None:
    """Refuse a `max_new_tokens` that leaves no position for even a one-token prompt in one of the `limits`."""
    for who, limit in limits:
        if max_new_tokens >= limit:
            raise ValueError(
                f"`max_new_tokens={max_new_tokens}` can never fit in the {limit} positions of {who} "
                f"(`max_position_embeddings`): a prompt of one token and {max_new_tokens} new ones take "
                f"{max_new_tokens + 1}. Set max_new_tokens below {limit}."
            )


@torch.no_grad()
def generate_completions(
    model: nn.Module,
    prompts: Sequence[Tensor],
    sampling: Sampling,
    *,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    seed: int,
    vocabulary_size: int | None = None,
    synced_gpus: bool = False,
) -> list[Tensor]:
    """
    `model`'s sampled continuation of each prompt (left-padded into one batch), in eval mode (no dropout), under
    `no_grad`, from a generator seeded by `seed` (the global random state is left as it was); each cut after its
    first EOS (any of `eos_token_id`). `vocabulary_size`: token ids the completions may use (the leading ones).
    Only `sampling` shapes the distribution: what `model.generation_config` sets besides (a repetition penalty,
    suppressed tokens) does not apply.
    """
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    device = prompts[0].device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = prompt
        attention_mask[row, width - len(prompt) :] = 1
    config = GenerationConfig(
        do_sample=True,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        eos_token_id=eos,
        pad_token_id=pad_token_id,
        use_cache=True,
    )
    processors = LogitsProcessorList([_VocabularyCut(vocabulary_size)] if vocabulary_size is not None else [])
    was_training = model.training
    # generate fills what `config` leaves unset from the model's own generation config: a blank one meanwhile
    owner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's transformers model
    own_config = getattr(owner, "generation_config", None)
    model.eval()
    try:
        if own_config is not None:
            owner.generation_config = GenerationConfig()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=processors,
                synced_gpus=synced_gpus,
            )
    finally:
        model.train(was_training)
        if own_config is not None:
            owner.generation_config = own_config
    completions = []
    for row in output[:, width:]:
        ends = torch.isin(row, row.new_tensor(eos)).nonzero()
        completions.append(row if len(ends) == 0 else row[: int(ends[0]) + 1])
    return completions


def completion_batch(prompts: Sequence[Tensor], completions: Sequence[Tensor], pad_token_id: int) -> dict[str, Tensor]:
    """
    Prompt + completion per row, padded on the right: `input_ids`, `attention_mask`, and `labels` that are the
    completion's tokens (through its EOS) and -100 on the prompt and the padding.
    """
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    device = prompts[0].device
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    labels = torch.full_like(input_ids, -100)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        end = len(prompt) + len(completion)
        input_ids[row, : len(prompt)], input_ids[row, len(prompt) : end] = prompt, completion
        labels[row, len(prompt) : end] = completion
        attention_mask[row, :end] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---- teachers on their own tokenizers: the generated text, rendered anew for every model ----


def raw_prompt(example: Mapping[str, Any]) -> Any:
    """An example's prompt as the dataset holds it: `prompt`, or a conversation's messages before its first answer."""
    if "prompt" in example:
        return example["prompt"]
    messages = list(example["messages"])
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return messages[: answers[0]] if answers else messages


class PromptCollator:
    """Wraps a collator: the batch also holds each example's raw prompt under `PROMPTS_KEY` (`raw_prompt`)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        batch[PROMPTS_KEY] = [raw_prompt(f) for f in features]
        return batch


class GeneratedRenderer:
    """
    Renders a generated example `{"prompt", "completion", "closed"}` for each model, the completion (the decoded
    text, or one assistant message of it) carrying the loss; a completion cut before its EOS gets none appended (a
    message's text ends with its content, before the template's end of turn).
    """

    columns = ("prompt", "completion")

    def __init__(self) -> None:
        self.conversational = ExampleRenderer("prompt_completion")

    def encode(
        self,
        example: Mapping[str, Any],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int | None = None,
        **render_kwargs: Any,
    ) -> Any:
        prompt, completion, closed = example["prompt"], example["completion"], example["closed"]
        if isinstance(prompt, str):
            text = prompt + completion
            rendered = RenderedExample(text, ((len(prompt), len(text)),), ((0, len(text)),), standard=True)
        else:
            example = {"prompt": prompt, "completion": [{"role": "assistant", "content": completion}]}
            rendered = self.conversational.render(example, tokenizer, **render_kwargs)
            if not closed and rendered.segments[-1] is not None:  # no end of turn the student did not write
                end = rendered.segments[-1][1]
                spans = tuple((a, min(b, end)) for a, b in rendered.loss_spans if a < end)
                rendered = replace(rendered, text=rendered.text[:end], loss_spans=spans)
        return encode_rendered(replace(rendered, closed=closed), tokenizer, max_length)


def _find_collator(collator: Any, kind: type) -> Any:
    """The collator of type `kind` inside `collator`'s wrappers (each holds the next as `.collator`), or None."""
    while collator is not None and not isinstance(collator, kind):
        collator = getattr(collator, "collator", None)
    return collator


# ---- the checks and the trainer's generator ----


def check_on_policy(
    args: MultiTeacherDistillationConfig,
    source: TeacherSource,
    processing_class: Any,
    train_dataset: Any,
    student: nn.Module,
) -> None:
    """
    Refuse up front, before any teacher is loaded, what on-policy and seq_kd batches cannot work with (the teachers'
    positions are checked once they are loaded, by `OnPolicyGenerator`).
    """
    check_max_new_tokens(args.max_new_tokens, position_limits(student))
    if isinstance(source, CachedTeacherLogits):
        raise ValueError(
            "On-policy distillation (lmbda > 0 or seq_kd) cannot use a teacher-logits cache: cached teachers cannot "
            "score the tokens generated during training. Pass the teachers themselves, or set lmbda=0 and "
            "seq_kd=False."
        )
    if args.seq_kd_teacher is not None:
        seq_kd_index(args, source.names)
    if not isinstance(processing_class, PreTrainedTokenizerBase):
        raise ValueError(
            "On-policy distillation generates text: pass the student's tokenizer as `processing_class` (its EOS "
            "ends a completion, its pad token pads the batch)."
        )
    if processing_class.eos_token_id is None:
        raise ValueError(
            "The student's tokenizer has no EOS token, which ends every generated completion: set "
            "`tokenizer.eos_token` before on-policy distillation."
        )
    every_batch = args.lmbda == 1 or args.seq_kd
    data_format = dataset_format(train_dataset, prompts_alone=every_batch)
    columns = set(getattr(train_dataset, "column_names", None) or [])
    if data_format == "text" or (data_format is None and columns and "labels" not in columns):
        raise ValueError(
            f"On-policy distillation needs prompts to complete, but the training data is plain text (columns "
            f"{sorted(columns)}): give prompt/completion or conversational ('messages') data, a 'prompt' column "
            "alone (with lmbda=1 or seq_kd), or tokenized rows whose prompt labels are -100."
        )
    if "labels" in columns and isinstance(train_dataset, datasets.Dataset) and len(train_dataset) > 0:
        first = train_dataset[0]["labels"]
        if len(first) > 0 and first[0] != -100:
            raise ValueError(
                "On-policy distillation needs prompts to complete, but the first training row's first token already "
                "carries loss (labels copied from the ids, as for plain text): give prompt/completion or "
                "conversational data, or tokenized rows whose prompt labels are -100."
            )
    masked = {"prompt_completion": "completion_only_loss", "messages": "assistant_only_loss"}.get(data_format)
    if masked is not None and not getattr(args, masked):
        raise ValueError(
            f"On-policy batches find each row's prompt as its tokens before the first label, but `{masked}=False` "
            f"puts labels on the prompt too: set {masked}=True with lmbda > 0 or seq_kd."
        )


def seq_kd_index(args: MultiTeacherDistillationConfig, names: Sequence[str]) -> int:
    """
    The teacher that generates for seq_kd: `seq_kd_teacher` (a name or an index), else the one with the largest
    static prior `teacher_weights` (the first on ties; uniform: the first).
    """
    choice = args.seq_kd_teacher
    if choice is None:
        prior = args.teacher_weights or [1.0] * len(names)
        return max(range(len(names)), key=lambda k: (prior[k], -k))
    if str(choice) in names:
        return list(names).index(str(choice))
    if str(choice).lstrip("-").isdigit() and -len(names) <= int(choice) < len(names):
        return int(choice) % len(names)
    raise ValueError(f"`seq_kd_teacher` {choice!r} is no teacher: give one of the names {list(names)} or an index.")


def disable_dropout(model: nn.Module) -> int:
    """Set the probability of every dropout layer of `model` to 0; returns how many there were."""
    layers = [module for module in model.modules() if isinstance(module, nn.Dropout)]
    for layer in layers:
        layer.p = 0.0
    return len(layers)


def end_of_text_ids(tokenizer: PreTrainedTokenizerBase, student: nn.Module) -> list[int]:
    """
    The tokens that end a completion: the tokenizer's EOS and those of the student's `generation_config` (chat
    models often end a turn with another token, e.g. `<|eot_id|>`).
    """
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(student, "generation_config", None), "eos_token_id", None)
    ids += [configured] if isinstance(configured, int) else list(configured or [])
    return list(dict.fromkeys(ids))


class OnPolicyGenerator:
    """
    Completes the training micro-batches that the draw makes on-policy (the student writes) or, with seq_kd, the
    others (the `seq_kd_teacher` writes); see the module docstring. Built by the trainer once the teachers are loaded.
    """

    def __init__(
        self, args: MultiTeacherDistillationConfig, source: TeacherSource, tokenizer: Any, student: nn.Module
    ) -> None:
        self.lmbda, self.seed = args.lmbda, args.seed
        self.sampling = Sampling.from_config(args)
        self.tokenizer = tokenizer
        self.eos_token_ids = end_of_text_ids(tokenizer, student)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.names = list(source.names)
        self.teacher: int | None = None
        """The index of the teacher that generates for seq_kd (None: no seq_kd)."""
        if args.seq_kd:
            self.teacher = seq_kd_index(args, self.names)
            name = self.names[self.teacher]
            if source.tokenizers[self.teacher] is not None or name not in source.generation_teachers:
                raise ValueError(
                    f"seq_kd: teacher {self.names[self.teacher]!r} does not share the student's tokenizer, so it "
                    "cannot continue the student's prompts: choose one that does with `seq_kd_teacher`."
                )
        self.vocabulary_size = source.shared_vocabulary_sizes[self.teacher] if self.teacher is not None else None
        """The token ids the seq_kd teacher's completions may use (the leading ones), or None."""
        width = vocab_size(student)
        self.student_vocabulary_size = len(tokenizer) if width is not None and width > len(tokenizer) else None
        """The token ids the student's completions may use: its tokenizer's, when its head has padding rows beyond."""
        limits = position_limits(student, source)
        check_max_new_tokens(args.max_new_tokens, limits)
        self.position_limit = min(limits, key=lambda limit: limit[1], default=None)
        """The fewest positions a model reading the generated ids holds, and which model (None: no stated limit)."""
        self.capped = False
        """Whether a batch's completions were already cut short to fit `position_limit` (logged once)."""
        self.gather_for_generation = args.ds3_gather_for_generation
        self.source = source
        self.renderer: MultiTokenizerCollator | None = None
        """With cross-tokenizer teachers, the collator that renders the generated examples for every model."""
        self.steps = 0
        """Optimizer steps completed since the metrics were last read (for `generated_tokens` per step)."""
        self.world_size = args.world_size

    @property
    def every_batch(self) -> bool:
        """Whether every training batch is generated (then the dataset's own labels are never read)."""
        return self.lmbda == 1 or self.teacher is not None

    def wrap_collator(self, collator: Any) -> Any:
        """
        The training collator; with cross-tokenizer teachers it keeps the raw prompts, and a copy of its
        `MultiTokenizerCollator` renders the generated examples for every model.
        """
        if not self.source.cross_tokenizer:
            return collator
        found = _find_collator(collator, MultiTokenizerCollator)
        if found is None or found.renderer is None:
            raise ValueError(
                "Cross-tokenizer teachers score on-policy batches on their own rendering of the generated text: use "
                "the trainer's default collator on prompt/completion or conversational data."
            )
        self.renderer = copy.copy(found)
        self.renderer.renderer = GeneratedRenderer()
        if self.position_limit is not None:  # the student's rendering of its text may outgrow the ids it generated
            limit = self.position_limit[1]
            self.renderer.max_length = limit if found.max_length is None else min(found.max_length, limit)
        return PromptCollator(collator)

    def new_tokens(self, prompts: Sequence[Tensor]) -> int:
        """
        The tokens a batch of `prompts` may generate: `max_new_tokens`, or fewer where the longest prompt and
        `max_new_tokens` exceed `position_limit` (logged once); a prompt that fills it is refused.
        """
        wanted = self.sampling.max_new_tokens
        if self.position_limit is None:
            return wanted
        who, limit = self.position_limit
        longest = max(len(prompt) for prompt in prompts)
        if longest >= limit:
            raise ValueError(
                f"A training prompt of {longest} tokens fills the {limit} positions of {who} "
                "(`max_position_embeddings`), leaving none to generate a completion in: keep the prompts shorter "
                f"than {limit} tokens (e.g. with `max_length`, which cuts the rendered rows)."
            )
        if limit - longest < wanted and not self.capped:
            self.capped = True
            logger.warning(
                "On-policy generation: a batch's longest prompt (%d tokens) and max_new_tokens=%d exceed the %d "
                "positions of %s, so its completions get at most %d new tokens; so does every batch that does not "
                "fit (logged once).",
                longest,
                wanted,
                limit,
                who,
                limit - longest,
            )
        return min(wanted, limit - longest)

    def complete(
        self,
        batches: list[dict[str, Any]],
        *,
        step: int,
        student: nn.Module,
        process_index: int = 0,
        wrapped_student: nn.Module | None = None,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
    ) -> tuple[list[dict[str, Any]], int, float]:
        """
        The micro-batches of optimizer step `step`, those drawn generated; the number of tokens generated, and the
        seconds generation took. `student` generates inside `autocast()` (the precision of its training forward);
        `wrapped_student` is what the Trainer runs (a DeepSpeed engine, whose ZeRO-3 parameters are gathered for
        generation with `ds3_gather_for_generation`). The seq_kd teacher generates in its own dtype, as it scores.
        """
        self.steps += 1
        several = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        completed, generated, seconds = [], 0, 0.0
        for index, batch in enumerate(batches):
            if draw_on_policy(self.lmbda, self.seed, step, index):
                writer, model, vocabulary_size = STUDENT, student, self.student_vocabulary_size
                engine, precision = wrapped_student or student, autocast
            elif self.teacher is not None:
                name = self.names[self.teacher]
                writer, engine = name, self.source.generation_teachers[name]
                model, vocabulary_size = getattr(engine, "module", engine), self.vocabulary_size  # a DeepSpeed engine
                precision = nullcontext
            else:
                completed.append(batch)
                continue
            prompts = prompt_tokens(batch["input_ids"], batch["labels"], batch.get("attention_mask"))
            sampling = replace(self.sampling, max_new_tokens=self.new_tokens(prompts))
            partitioned = any(hasattr(parameter, "ds_id") for parameter in model.parameters())  # by ZeRO-3
            gathered = self.gather_for_generation and zero3_parameter_offload(engine) is not None
            start = time.perf_counter()
            with zero3_gathered(engine) if gathered else nullcontext(), precision():
                completions = generate_completions(
                    model,
                    prompts,
                    sampling,
                    eos_token_id=self.eos_token_ids,
                    pad_token_id=self.pad_token_id,
                    seed=mixed_seed(self.seed, step, index, process_index, 1),
                    vocabulary_size=vocabulary_size,
                    synced_gpus=partitioned and several and not gathered,  # per-token gathers: the ranks in step
                )
            seconds += time.perf_counter() - start
            generated += sum(len(c) for c in completions)
            new = (
                completion_batch(prompts, completions, self.pad_token_id)
                if self.renderer is None
                else self._rendered(batch, completions)
            )
            new.update({key: batch[key] for key in (ROUTING_KEY, PROMPTS_KEY) if key in batch})
            new[GENERATED_BY_KEY] = writer
            completed.append(new)
        return completed, generated, seconds

    def _rendered(self, batch: Mapping[str, Any], completions: Sequence[Tensor]) -> dict[str, Any]:
        """A generated batch collated from text for every model (cross-tokenizer teachers)."""
        examples = [
            {
                "prompt": prompt,
                "completion": self.tokenizer.decode(completion, skip_special_tokens=True),
                "closed": int(completion[-1]) in self.eos_token_ids,
            }
            for prompt, completion in zip(batch[PROMPTS_KEY], completions, strict=True)
        ]
        device = batch["input_ids"].device
        return {
            key: value.to(device)
            if isinstance(value, Tensor)
            else [None if v is None else {k: t.to(device) for k, t in v.items()} for v in value]
            for key, value in self.renderer(examples).items()
        }

    # ---- metrics ----

    def add_metrics(self, sums: dict[str, Tensor], generated_by: str | None, weights: Tensor, count: Tensor) -> None:
        """
        Token sums of a training batch: on student-written ones the teachers' weights `[K]` (summed over the
        `count` valid positions); every batch adds to the counts, so every process holds the same keys.
        """
        mine = generated_by == STUDENT
        sums[_TOKENS] = count * mine
        sums[_BATCHES] = torch.ones_like(count) * mine
        for k, name in enumerate(self.names):
            sums[f"{ON_POLICY_PREFIX}teacher_weight/{name}"] = weights[k] * mine

    def add_generated(self, sums: dict[str, Tensor], generated: int, seconds: float, device: torch.device) -> None:
        """Count `generated` tokens written for the micro-batches of one optimizer step, in `seconds`."""
        for key, amount in ((_GENERATED, generated), (_SECONDS, seconds)):
            value = torch.tensor(float(amount), device=device)
            sums[key] = sums[key] + value if key in sums else value

    def means(self, values: dict[str, float], batches: int) -> dict[str, float]:
        """The on-policy metrics out of the summed `values` (taken out of them); `batches` micro-batches in all."""
        steps, self.steps = max(self.steps, 1), 0  # a new window starts, whatever this one held
        if _TOKENS not in values:
            for key in [key for key in values if key.startswith(ON_POLICY_PREFIX)]:
                del values[key]
            return {}
        tokens, mine = values.pop(_TOKENS), values.pop(_BATCHES)
        means = {
            f"{ON_POLICY_PREFIX}share": mine / max(batches, 1),
            _GENERATED: values.pop(_GENERATED, 0.0) / steps,  # summed over the processes
            _SECONDS: values.pop(_SECONDS, 0.0) / steps / self.world_size,  # each process's own time
        }
        for key in [key for key in values if key.startswith(ON_POLICY_PREFIX)]:
            value = values.pop(key)
            if tokens > 0:
                means[key] = value / tokens
        return means
