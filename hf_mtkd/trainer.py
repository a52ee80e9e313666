"""`MultiTeacherDistillationTrainer`: a `transformers.Trainer` whose loss distills several teachers into the model."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import datasets
import torch
from accelerate.utils import DummyOptim
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    PreTrainedTokenizerBase,
    Trainer,
    default_data_collator,
)
from transformers.trainer_utils import EvalLoopOutput
from transformers.utils import logging

from .alignment import FeatureProjector, depth_and_width, resolve_layer_pairs
from .chat_data import (
    CompletionCollator,
    default_collator,
    set_chat_template,
    tokenize_dataset,
)
from .config import MultiTeacherDistillationConfig
from .cross_tokenizer import PROMPT_CONTENT_KEY
from .generation_eval import evaluate_generation
from .heads import LogitFreePlan
from .hub import ignored_on_upload
from .logit_free import HeadLogits
from .losses import DistillationLoss, FeatureBatch, MultiTeacherKDOutput, next_token_mask
from .model_card import create_model_card
from .on_policy import (
    GENERATED_BY_KEY,
    PROMPTS_KEY,
    OnPolicyGenerator,
    PromptCollator,
    check_on_policy,
    disable_dropout,
)
from .parameters import count_parameters
from .prompt_evidence import prompt_positions
from .routing import ROUTING_KEY, RoutingCollator, check_routing_column
from .settings import DistillationSettings
from .sources import PER_ALIGNED_POSITION, TeacherBatch, TeacherSource, teacher_source
from .teacher_cache import TeacherLogitsCache
from .teachers import check_finite, require_teachers

logger = logging.get_logger(__name__)

PROJECTOR_NAME = "mtkd_projector"
"""Attribute under which the feature projections are attached to the student (excluded from its saved weights)."""
PROJECTOR_WEIGHTS_NAME = "mtkd_projector.safetensors"
"""File holding the projections' weights, written beside the student in every save and checkpoint."""


_NO_TOKEN = "no position with a next-token label"
"""How warnings and errors name a batch or dataset whose labels leave nothing to predict."""


def _student_needs_logits(args: MultiTeacherDistillationConfig, settings: DistillationSettings) -> str | None:
    """Why this training gives the loss the student's `[B, T, V]` logits whatever its head (None: it need not)."""
    if settings.divergence == "uld":
        return "the `uld` divergence reads its [batch, length, vocab] logits"
    if args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return (
            "under FSDP its head is sharded outside its forward, where the logit-free loss would read it (not "
            "supported yet; DeepSpeed ZeRO-3, `--deepspeed zero3`, runs logit-free)"
        )
    return None


class MultiTeacherDistillationTrainer(Trainer):
    """
    A drop-in `Trainer` that distills one or more frozen teachers into `model` (the student).

    The loss is `alpha_ce * L_ce + alpha_kd * L_kd + alpha_feat * L_feat` (see `hf_mtkd.losses`), configured by a
    [`MultiTeacherDistillationConfig`]. Teachers run frozen, without gradients, in `teacher_dtype`. Everything else is
    `Trainer`: gradient accumulation, mixed precision, PEFT students, callbacks, checkpoints and `push_to_hub`.

    The feature-alignment projections (when `alpha_feat > 0`) are attached to the student as `mtkd_projector`, so the
    optimizer (in their own param group), gradient clipping, DDP and DeepSpeed treat them like the student's own
    weights; they are left out of the student's `save_pretrained` and written beside it as
    `mtkd_projector.safetensors`, which `resume_from_checkpoint` restores; `push_to_hub` leaves that file out unless
    `push_projector=True`.

    `create_model_card()` (called by `push_to_hub`) writes a card naming the teachers, the distillation settings, the
    final teacher weights, the evaluation and generation results (`evaluate_generation`) and `training_command`.

    On-policy distillation (`lmbda`, `seq_kd`; see `hf_mtkd.on_policy`): the student (or one teacher) writes the
    completions of some training batches, which every teacher then scores.

    Teachers can also be replaced by their outputs computed once: pass a `TeacherLogitsCache`
    (`hf_mtkd.cache_teacher_logits` / `load_teacher_cache`, or `hf-mtkd cache-teachers`) as `teachers`; the model
    then trains on `cache.dataset` (the default `train_dataset`; any `select`/`shuffle`/split of it works, and so does
    another cache with the same teachers as `eval_dataset`) without running a teacher.

    Args:
        model: the student, a causal LM model or a name/path to load.
        teachers: teacher models or names/paths (loaded with `AutoModelForCausalLM.from_pretrained`), on the
            student's vocabulary or, in cross-tokenizer mode (`cross_tokenizer`), on their own; or a
            `TeacherLogitsCache` of their top-k outputs (on the student's vocabulary); or any
            `hf_mtkd.sources.TeacherSource` (e.g. a teacher served by another process).
        args: the configuration.
        data_collator: defaults to `DataCollatorForLanguageModeling(processing_class, mlm=False)` when
            `processing_class` is a tokenizer, to `hf_mtkd.chat_data.CompletionCollator` (which keeps the labels) for
            data with `labels` or `position_ids` (both wrapped in a `TeacherCacheCollator` with a cache), or to a
            `MultiTokenizerCollator` (which reads a `text` column, or the prompt/completion or `messages` columns)
            when some teacher runs in cross-tokenizer mode.
        train_dataset, eval_dataset: tokenized data, plain `text` (cross-tokenizer mode, or with `packing`), or
            prompt/completion or conversational (`messages`) data as TRL's SFT trainer reads it, which the trainer
            renders and masks (see `hf_mtkd.chat_data` and the config's instruction and chat data fields).
        teacher_tokenizers: one entry per teacher for cross-tokenizer mode: a tokenizer, a name/path, or None to
            use the one in the teacher's directory (or, for a model, the student's when the vocabularies agree).
            A teacher given the student's tokenizer stays on the shared vocabulary even when its embedding has more
            or fewer (padding) rows (see `hf_mtkd.teachers`).
        **kwargs: any other `Trainer` argument.
    """

    _tag_names: ClassVar[list[str]] = ["hf-mtkd", "knowledge-distillation"]

    def __init__(
        self,
        model: nn.Module | str | None = None,
        teachers: Sequence[nn.Module | str] | TeacherLogitsCache | TeacherSource | None = None,
        args: MultiTeacherDistillationConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        teacher_tokenizers: Sequence[PreTrainedTokenizerBase | str | None] | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("`model` (the student) is required.")
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model)
        if args is None:
            args = MultiTeacherDistillationConfig(output_dir="mtkd-student")
        elif not isinstance(args, MultiTeacherDistillationConfig):
            raise TypeError(
                f"`args` must be a MultiTeacherDistillationConfig, got {type(args).__name__}; it holds the "
                "distillation settings on top of every TrainingArguments field."
            )
        require_teachers(teachers)
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("`compute_loss_func` is not supported: the distillation loss is the trainer's own.")
        if args.alpha_feat > 0:
            # The projections run outside the student's forward: DDP's search for unused parameters would mark them
            # unused in the forward and then see their gradients in the backward, which it refuses.
            if args.ddp_find_unused_parameters:
                raise ValueError(
                    "`ddp_find_unused_parameters=True` cannot be combined with `alpha_feat > 0`: the feature "
                    "projections are used outside the student's forward. Leave it unset (or False)."
                )
            args.ddp_find_unused_parameters = False
        reads_token_ids = data_collator is None or args.remove_unused_columns  # a column `text` is not kept
        self.teacher_source, train_dataset, eval_dataset = teacher_source(
            teachers, args, model, processing_class, teacher_tokenizers, train_dataset, eval_dataset
        )
        """Where the teachers' outputs come from (`hf_mtkd.sources`): live models or a teacher-logits cache."""
        self.teacher_names = self.teacher_source.names
        self._check_routing(args, train_dataset, eval_dataset)
        if args.lmbda > 0 or args.seq_kd:
            check_on_policy(args, self.teacher_source, processing_class, train_dataset, model)
        self.teacher_source.load(args, model, processing_class, teacher_tokenizers)
        if args.prompt_evidence and self.teacher_source.no_prompt_evidence is not None:
            raise ValueError(
                f"`prompt_evidence=True` needs the teachers' log-probabilities of the prompt tokens, but "
                f"{self.teacher_source.no_prompt_evidence}: run the teachers on the student's tokenizer, or "
                "leave `prompt_evidence` off."
            )
        self.teacher_records = self.teacher_source.records
        if args.disable_dropout:
            logger.info("disable_dropout: %d dropout layers of the student set to 0.", disable_dropout(model))
        self.on_policy = (
            OnPolicyGenerator(args, self.teacher_source, processing_class, model)
            if args.lmbda > 0 or args.seq_kd
            else None
        )
        """Completes training batches with generated text (`lmbda`, `seq_kd`; `hf_mtkd.on_policy`), or None."""
        # prompt/completion and chat data (`hf_mtkd.chat_data`): rendered per model by the source's collator, or
        # tokenized here
        renderer = self.teacher_source.renderer(args, train_dataset, eval_dataset)
        if renderer is not None:
            self._set_chat_templates(args, processing_class)
        own_collator = (
            None if data_collator is not None else self.teacher_source.collator(processing_class, args, renderer)
        )
        if own_collator is not None:
            data_collator = own_collator
        elif renderer is not None:
            train_dataset = self._tokenize(train_dataset, renderer, args, processing_class)
            eval_dataset = self._tokenize(eval_dataset, renderer, args, processing_class)
            data_collator = data_collator or CompletionCollator(processing_class.pad_token_id)
        if data_collator is None and isinstance(processing_class, PreTrainedTokenizerBase):
            data_collator = default_collator(processing_class, train_dataset, eval_dataset)
        data_collator = self.teacher_source.wrap_collator(data_collator)
        self.teacher_source.check_data(data_collator, reads_token_ids, train_dataset, eval_dataset)
        self.settings = DistillationSettings.from_config(args, cross_tokenizer=self.teacher_source.cross_tokenizer)
        """The loss settings, built from `args` once."""
        self.distillation_loss = DistillationLoss(self.settings)
        """The loss of `compute_loss`: `alpha_ce * L_ce + alpha_kd * L_kd + alpha_feat * L_feat`."""
        self.logit_free = LogitFreePlan(
            args.logit_free,
            model,
            self.teacher_source.logit_free_models,
            self.teacher_names,
            student_reason=_student_needs_logits(args, self.settings),
        )
        """Which models run logit-free (`logit_free`): from final hidden states and heads, without [B, T, V] logits."""
        self._prediction_loss_only: bool | None = None
        """In `prediction_step`, whether it returns the loss only (else its logits, for metrics); None outside."""
        self._prompt_checked = False
        """Whether the first training batch was checked for prompt tokens (`prompt_evidence`)."""
        if args.routing_column:
            data_collator = RoutingCollator(
                data_collator or default_data_collator, args.routing_column, self.teacher_names
            )
        if self.on_policy is not None:
            data_collator = self.on_policy.wrap_collator(data_collator)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )

        # compute_loss normalises every term by `num_items_in_batch`, counted over the shifted labels: ask the
        # Trainer to count it (and so not to divide the loss again by the accumulation steps).
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        if self.train_dataset is not None and not (self.on_policy is not None and self.on_policy.every_batch):
            self._check_train_labels()
        self.projector = self._attach_projector() if args.alpha_feat > 0 else None
        logger.info("Distilling %s.", self.teacher_source.describe(self.args))
        self.teacher_source.prepare(self.accelerator, self.args)
        self._metrics: dict[str, dict[str, Tensor]] = {"train": {}, "eval": {}}
        self._empty_batches = 0
        """Training batches so far without a position that has a next-token label (warned about)."""
        self.generation_metrics: dict[str, float | int | str] | None = None
        """The results of the last `evaluate_generation`, unprefixed (shown in the model card)."""
        self.training_command: str | None = None
        """The command that ran this training, shown in the model card (the example script sets it)."""
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    # ---- the teachers ----

    @property
    def teachers(self) -> list[nn.Module]:
        """The teacher models this process runs (DeepSpeed engines under ZeRO-3; none with a teacher-logits cache)."""
        return self.teacher_source.models

    @teachers.setter
    def teachers(self, models: Sequence[nn.Module]) -> None:
        self.teacher_source.models = models
        self.logit_free.plan_teachers(self.teacher_source.logit_free_models)  # the new models' own heads

    @property
    def cross_tokenizer(self) -> bool:
        """Whether some teacher runs in cross-tokenizer mode (on its own tokens of the raw text)."""
        return self.teacher_source.cross_tokenizer

    @property
    def teacher_tokenizers(self) -> list[PreTrainedTokenizerBase | None]:
        """Each teacher's own tokenizer when it runs in cross-tokenizer mode, else None."""
        return self.teacher_source.tokenizers

    @property
    def shared_vocabulary_sizes(self) -> list[int | None]:
        """Per teacher on the student's tokenizer, the leading token ids it is distilled on (None for the others)."""
        return self.teacher_source.shared_vocabulary_sizes

    # ---- prompt/completion and chat data ----

    def _set_chat_templates(self, args: MultiTeacherDistillationConfig, processing_class: Any) -> None:
        """Give the student's tokenizer `chat_template_path`, each teacher's `teacher_chat_template_path`."""
        if isinstance(processing_class, PreTrainedTokenizerBase):
            set_chat_template(processing_class, args.chat_template_path)
        paths = args.teacher_chat_template_path or [None] * len(self.teacher_tokenizers)
        for tokenizer, path in zip(self.teacher_tokenizers, paths, strict=True):
            if tokenizer is not None and path not in (None, "", "own"):
                set_chat_template(tokenizer, path)

    @staticmethod
    def _tokenize(dataset: Any, renderer: Any, args: MultiTeacherDistillationConfig, tokenizer: Any) -> Any:
        """A dataset (or dict of them) in a prompt/completion, chat or packed-text format, tokenized and masked."""
        if dataset is None:
            return None
        if isinstance(dataset, dict):
            tokenize = MultiTeacherDistillationTrainer._tokenize
            return {key: tokenize(split, renderer, args, tokenizer) for key, split in dataset.items()}
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise ValueError(
                "Prompt/completion and chat data are tokenized by the trainer: pass the student's tokenizer as "
                "`processing_class`."
            )
        return tokenize_dataset(
            dataset,
            tokenizer,
            renderer,
            max_length=args.max_length,
            packing=args.packing,
            keep_columns=[args.routing_column] if args.routing_column else [],
        )

    # ---- a training set with nothing to learn ----

    def _check_train_labels(self) -> None:
        """
        Refuse a training set in which no position has a next-token label, read batch by batch through the training
        collator (with the unused columns removed, as for training) until one has; a stream is not read ahead.
        """
        dataset, collate = self.train_dataset, self.data_collator
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            return
        if isinstance(dataset, datasets.Dataset):
            try:
                dataset = self._remove_unused_columns(dataset, description="training")
            except ValueError:  # no column the model reads: the Trainer says so when it trains
                return
        else:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        size = self.args.per_device_train_batch_size
        with torch.random.fork_rng(devices=[]):  # a random collator must not shift the training's own draws
            for start in range(0, len(dataset), size):
                labels = collate([dataset[i] for i in range(start, min(start + size, len(dataset)))]).get("labels")
                if labels is None or bool(next_token_mask(labels).any()):  # no labels: compute_loss says so
                    return
        raise ValueError(
            f"The training dataset has {_NO_TOKEN} (all labels -100 or sequences of one token), so there is nothing "
            "to learn: give examples of at least two tokens whose labels after the first are not all -100 (e.g. "
            "DataCollatorForLanguageModeling(tokenizer, mlm=False) makes them from the ids)."
        )

    # ---- extra dataset columns: the cached logits, the raw text cross-tokenizer teachers read, the routing ----

    def _check_routing(self, args: MultiTeacherDistillationConfig, train_dataset: Any, eval_dataset: Any) -> None:
        """Refuse a bad routing value in a dataset up front, before any teacher is loaded or run."""
        if args.routing_column and check_routing_column(
            args.routing_column, self.teacher_names, train_dataset=train_dataset, eval_dataset=eval_dataset
        ):
            logger.info("Routing rows to teachers by the dataset column %r.", args.routing_column)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is None:
            return
        extra = []
        collator = self.data_collator
        if isinstance(collator, PromptCollator):
            collator = collator.collator
        if isinstance(collator, RoutingCollator):
            extra.append(collator.column)
            collator = collator.collator
        extra.extend(self.teacher_source.columns(collator))
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *extra]))

    # ---- feature projections ----

    def _attach_projector(self) -> FeatureProjector:
        student_depth, student_width = depth_and_width(self.model, "the student")
        teacher_dims = [
            depth_and_width(t, f"teacher {n!r}") for t, n in zip(self.teachers, self.teacher_names, strict=True)
        ]
        pairs = resolve_layer_pairs(
            self.args.feature_layers, student_depth, [d for d, _ in teacher_dims], self.teacher_names
        )
        projector = FeatureProjector(pairs, student_width, [w for _, w in teacher_dims])
        projector.to(next(self.model.parameters()).device)
        self.model.add_module(PROJECTOR_NAME, projector)
        ignored = getattr(self.model, "_keys_to_ignore_on_save", None)
        if ignored is not None:
            self.model._keys_to_ignore_on_save = set(ignored) | {
                f"{PROJECTOR_NAME}.{key}" for key in projector.state_dict()
            }
        logger.info(
            "Feature alignment on (teacher, student layer, teacher layer) pairs %s with %d projection parameters.",
            [(self.teacher_names[k], s, t) for k, s, t in projector.pairs],
            count_parameters(projector),
        )
        return projector

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with the feature projections moved into a param group of their own."""
        optimizer = super().create_optimizer(model)
        if self.projector is None:
            return optimizer
        if isinstance(optimizer, DummyOptim):
            # The DeepSpeed config has an `optimizer` section: DeepSpeed builds one over all trainable parameters.
            if self.args.projector_learning_rate is not None:
                raise ValueError(
                    "`projector_learning_rate` needs the Trainer's optimizer, but the DeepSpeed config defines its "
                    "own `optimizer`, which trains the projections at the config's learning rate. Unset "
                    "`projector_learning_rate` or remove the `optimizer` section from the DeepSpeed config."
                )
            return optimizer
        projector_params = list(self.projector.parameters())
        projector_ids = {id(p) for p in projector_params}
        if any({id(p) for p in group["params"]} == projector_ids for group in optimizer.param_groups):
            return optimizer  # already done: with DeepSpeed the Trainer asks twice
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in projector_ids]
        learning_rate = self.args.projector_learning_rate
        optimizer.add_param_group(
            {
                "params": projector_params,
                "weight_decay": self.args.weight_decay,
                "lr": self.args.learning_rate if learning_rate is None else learning_rate,
            }
        )
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Tensor] | None = None) -> None:
        # Taken before `save_pretrained`, which deletes the keys in `_keys_to_ignore_on_save` from `state_dict`.
        prefix = f"{PROJECTOR_NAME}."
        tensors = {k[len(prefix) :]: v for k, v in (state_dict or {}).items() if k.startswith(prefix)}
        super()._save(output_dir, state_dict)
        if self.projector is None or not self.args.should_save:
            return
        if not tensors and any(hasattr(p, "ds_id") for p in self.projector.parameters()):
            logger.warning(
                "The feature projections are partitioned by DeepSpeed ZeRO-3 and were not gathered, so %s is not "
                "written; they are in the DeepSpeed checkpoint. Set `stage3_gather_16bit_weights_on_model_save` to "
                "true to save them.",
                PROJECTOR_WEIGHTS_NAME,
            )
            return
        tensors = tensors or self.projector.state_dict()
        path = os.path.join(output_dir or self.args.output_dir, PROJECTOR_WEIGHTS_NAME)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.projector is None:
            return
        path = os.path.join(resume_from_checkpoint, PROJECTOR_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{resume_from_checkpoint} has no {PROJECTOR_WEIGHTS_NAME}, so the feature projections cannot be "
                "restored. Resume from a checkpoint written with the same `alpha_feat > 0` setting."
            )
        self.projector.load_state_dict(load_file(path, device="cpu"))

    # ---- the loss ----

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """
        `alpha_ce * L_ce + alpha_kd * L_kd + alpha_feat * L_feat`, each averaged over `num_items_in_batch`. Logit-free
        (`logit_free`) where it applies, unless `return_outputs` asks for the student's logits (outside an evaluation
        step that returns the loss only).
        """
        if "labels" not in inputs:
            raise ValueError(
                "The batch has no `labels`: distillation needs next-token targets. Use a collator that adds them, "
                "e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False)."
            )
        labels = inputs["labels"]
        if labels.numel() == 0:
            raise ValueError(f"Received an empty batch (labels of shape {tuple(labels.shape)}).")
        args = self.args
        align = self.projector is not None
        inputs = dict(inputs)
        generated_by = inputs.pop(GENERATED_BY_KEY, None)
        inputs.pop(PROMPTS_KEY, None)
        self.teacher_source.check_batch(inputs)
        teacher_prior = inputs.pop(ROUTING_KEY, None)
        student_inputs = {k: v for k, v in inputs.items() if k != "labels" and k not in self.teacher_source.batch_keys}
        mask = next_token_mask(labels)
        prompt = None
        if args.prompt_evidence:
            prompt = prompt_positions(
                inputs["input_ids"], labels, inputs.get("attention_mask"), inputs.get("position_ids")
            )
            if PROMPT_CONTENT_KEY in inputs:  # teachers on their own tokens: the messages' prompt text only
                prompt = prompt & inputs[PROMPT_CONTENT_KEY]
            if model.training and not self._prompt_checked:
                self._prompt_checked = True
                if not prompt.any() and self.is_world_process_zero():
                    logger.warning(
                        "`prompt_evidence=True`, but the first training batch has no prompt token (every real token "
                        "has a label, as in plain text), so the prompt weighs nothing there. Train on "
                        "prompt/completion or chat data, whose prompts carry no label."
                    )
        outputs, student_logits = self.logit_free.run_student(
            functools.partial(model, **student_inputs, output_hidden_states=align, use_cache=False),
            mask,
            logits=return_outputs and not self._prediction_loss_only,  # the caller reads the logits
        )
        # with a logit-free student, the source's teachers that can run logit-free too (a source of one's own that
        # has none is called as before)
        free = isinstance(student_logits, HeadLogits) and any(self.teacher_source.logit_free_models)
        teachers = self.teacher_source(
            inputs,
            student_vocab=student_logits.shape[-1],
            temperature=args.temperature,
            output_hidden_states=align,
            **({"logit_free": self.logit_free, "mask": mask} if free else {}),
            **({} if prompt is None else {"prompt": prompt}),
        )
        teacher_logits, teacher_hidden = teachers.logits, teachers.hidden_states
        uld = self.settings.divergence == "uld"

        def features(mask: Tensor) -> FeatureBatch:
            pairs = self.projector.pairs
            return (
                self.projector([outputs.hidden_states[s][mask] for _, s, _ in pairs]),
                [teacher_hidden[k][t][mask] for k, _, t in pairs],
                [k for k, _, _ in pairs],
            )

        result = self.distillation_loss(
            student_logits,
            teacher_logits,
            labels,
            own_logits=teachers.own_logits if uld else None,
            features=features if align else None,
            num_items_in_batch=num_items_in_batch,
            position_ids=inputs.get("position_ids"),
            teacher_mask=teachers.teacher_mask(labels),
            teacher_prior=teacher_prior,
            prompt=None if prompt is None else teachers.prompt_evidence(prompt),
        )
        kd, loss = result.kd, result.loss
        check_finite(kd.signals.entropy, self.teacher_names)  # NaN/inf logits make their entropy NaN
        if align:
            outputs["hidden_states"] = None
        self._record_metrics(
            "train" if model.training else "eval", kd, result.terms, num_items_in_batch, teachers, generated_by
        )

        if args.average_tokens_across_devices and num_items_in_batch is not None:
            # The Trainer counts `num_items_in_batch` over all processes while DDP averages gradients over them.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """`Trainer.prediction_step`; the loss is logit-free unless the step returns the logits (for metrics)."""
        self._prediction_loss_only = prediction_loss_only
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        finally:
            self._prediction_loss_only = None

    # ---- on-policy batches ----

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """
        The micro-batches of the next optimizer step, those drawn on-policy (or seq_kd) completed with generated text
        (`hf_mtkd.on_policy`) before `num_items_in_batch` is counted, so it counts the generated tokens.
        """
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.on_policy is None or not batches:
            return batches, num_items_in_batch
        batches, generated, seconds = self.on_policy.complete(
            batches,
            step=self.state.global_step,
            student=self.accelerator.unwrap_model(self.model),
            process_index=self.args.process_index,
            wrapped_student=self.model_wrapped,
            autocast=self.accelerator.autocast,  # the training forward's mixed precision (bf16, fp16)
        )
        self.on_policy.add_generated(self._metrics["train"], generated, seconds, device)
        return batches, self._get_num_items_in_batch(batches, device)

    # ---- metrics ----

    def _record_metrics(
        self,
        mode: str,
        kd: MultiTeacherKDOutput,
        components: dict[str, Tensor],
        num_items_in_batch: Tensor | int | None,
        teachers: TeacherBatch,
        generated_by: str | None = None,
    ) -> None:
        """
        Accumulate token sums of the loss terms and of each teacher's weight, entropy and NLL until the next log, and
        the teacher source's own (`TeacherSource.add_metrics`: for cross-tokenizer teachers the aligned positions,
        `teacher_aligned/<name>`, and over those the unmapped, prefix-mapped and chained probability mass). Entropy,
        NLL and masses are summed over the positions where the teacher is available, and later averaged over them. In
        on-policy training, the teachers' weights on the batches the student wrote (`generated_by`) too.
        """
        count = kd.mask.sum()
        normalizer = count if num_items_in_batch is None else torch.as_tensor(num_items_in_batch).to(count.device)
        sums = {name: value.detach() * normalizer.clamp(min=1) for name, value in components.items()}
        weights = kd.weights[:, kd.mask].sum(dim=1)
        available = None if kd.teacher_mask is None else kd.teacher_mask[:, kd.mask]
        entropy, log_prob = kd.signals.entropy, kd.signals.target_log_prob
        if available is not None:
            entropy, log_prob = entropy.where(available, 0.0), log_prob.where(available, 0.0)
        entropy, nll = entropy.sum(dim=1), -log_prob.sum(dim=1)
        for k, name in enumerate(self.teacher_names):
            sums[f"teacher_weight/{name}"] = weights[k]
            sums[f"teacher_entropy/{name}"] = entropy[k]
            sums[f"teacher_nll/{name}"] = nll[k]
        self.teacher_source.add_metrics(sums, teachers, kd.mask)
        if self.on_policy is not None and mode == "train":
            self.on_policy.add_metrics(sums, generated_by, weights, count)
        store = self._metrics[mode]
        batch = {"num_tokens": count, "num_batches": torch.ones_like(count), "num_empty_batches": count == 0}
        for key, value in {**batch, **sums}.items():
            store[key] = store[key] + value.float() if key in store else value.float()

    def _pop_metrics(self, mode: str) -> dict[str, float]:
        """
        Token-weighted means of what `_record_metrics` accumulated, over all processes; then reset. Nothing is
        reported over zero tokens (a warning says why), and training batches without a token are warned about.
        """
        store = self._metrics[mode]
        if not store:
            return {}
        keys = list(store)
        totals = self.accelerator.reduce(torch.stack([store[key] for key in keys]), reduction="sum")
        store.clear()
        values = dict(zip(keys, totals.tolist(), strict=True))
        count, batches, empty = (int(values.pop(key)) for key in ("num_tokens", "num_batches", "num_empty_batches"))
        if mode == "train" and empty:
            self._warn_empty_batches(empty, batches)
        means = self.on_policy.means(values, batches) if self.on_policy is not None and mode == "train" else {}
        if count == 0:
            if mode == "eval" and self.is_world_process_zero():
                logger.warning(
                    "The evaluation data has %s (all labels -100 or sequences of one token): no perplexity is "
                    "reported, nor any other per-token metric.",
                    _NO_TOKEN,
                )
            return {}
        for key, value in values.items():
            kind, _, name = key.partition("/")
            aligned = f"teacher_aligned/{name}"
            per_aligned = kind in PER_ALIGNED_POSITION and aligned in values
            means[key] = value / max(values[aligned], 1.0) if per_aligned else value / count
        if mode == "eval":
            means["perplexity"] = math.exp(means["loss_ce"]) if means["loss_ce"] < 700 else math.inf
        return means

    def _warn_empty_batches(self, empty: int, batches: int) -> None:
        """Warn about training batches without a token to learn from, rate-limited: at the 1st, 2nd, 4th, ... one."""
        seen, self._empty_batches = self._empty_batches, self._empty_batches + empty
        if self._empty_batches.bit_length() > seen.bit_length() and self.is_world_process_zero():
            logger.warning(
                "%d of the last %d training batches had %s (%d so far; this warning repeats at the 1st, 2nd, 4th, "
                "8th, ... such batch): they add no loss and no gradient. Check how the labels are made: all -100, "
                "or sequences of one token, leave nothing to predict.",
                empty,
                batches,
                _NO_TOKEN,
                self._empty_batches,
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the distillation metrics (loss terms, teacher weights, entropies and NLLs) to each training log."""
        if "loss" in logs:
            logs = {**logs, **self._pop_metrics("train")}
        super().log(logs, start_time)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """Evaluation, plus `<prefix>_loss_ce/_loss_kd/_loss_feat`, `<prefix>_perplexity` and teacher weights."""
        self._metrics["eval"].clear()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._pop_metrics("eval").items()})
        return output

    # ---- generation quality, model card and the Hub ----

    def evaluate_generation(
        self,
        texts: Iterable[str],
        *,
        prompt_length: int = 32,
        max_new_tokens: int = 32,
        max_samples: int | None = 64,
        include_teachers: bool = True,
        metric_key_prefix: str = "generate",
    ) -> dict[str, float | int | str]:
        """
        The student (and each teacher, for reference) greedily continues prompts cut from held-out `texts`; BLEU and
        ROUGE-L against the true continuations (see `hf_mtkd.generation_eval.evaluate_generation`).

        Returns `<prefix>_bleu`, `<prefix>_rougeL`, `<prefix>_teacher_bleu/<name>`, ... and `<prefix>_metrics_backend`
        (which scoring path ran); the numbers are also logged.
        """
        if not isinstance(self.processing_class, PreTrainedTokenizerBase):
            raise ValueError("Generation evaluation needs the tokenizer as `processing_class`.")
        metrics = evaluate_generation(
            self.accelerator.unwrap_model(self.model),
            self.teacher_source.generation_teachers if include_teachers else {},
            self.processing_class,
            texts,
            prompt_length=prompt_length,
            max_new_tokens=max_new_tokens,
            max_samples=max_samples,
            batch_size=self.args.per_device_eval_batch_size,
            disable_tqdm=self.args.disable_tqdm,
        )
        self.generation_metrics = metrics
        prefixed = {f"{metric_key_prefix}_{key}": value for key, value in metrics.items()}
        self.log({key: value for key, value in prefixed.items() if not isinstance(value, str)})
        return prefixed

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write the distilled student's model card (`hf_mtkd/templates/distilled_student.md`) as README.md."""
        if not self.is_world_process_zero():
            return
        card = create_model_card(
            self,
            model_name=model_name,
            language=language,
            license=license,
            tags=tags,
            finetuned_from=finetuned_from,
            tasks=tasks,
            dataset_tags=dataset_tags,
            dataset=dataset,
            dataset_args=dataset_args,
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.push_to_hub`, without `mtkd_projector.safetensors` unless `push_projector=True`."""
        if self.args.push_projector:
            return super().push_to_hub(*args, **kwargs)
        with ignored_on_upload([PROJECTOR_WEIGHTS_NAME]):
            return super().push_to_hub(*args, **kwargs)
