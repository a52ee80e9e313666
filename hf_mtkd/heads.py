r"""
Output heads of causal LMs, for the logit-free loss (`hf_mtkd.logit_free`): whether a model's logits are a plain
linear map $z = h W^\top + b$ of its final hidden states (`logit_free_reason`), and a forward that gives those
hidden states at the valid positions with the head instead of the `[B, T, V]` logits (`HeadRunner`).

The forward is the model's own, called as usual (through DDP, PEFT or any wrapper) with `logits_to_keep` an empty
tensor of positions, so that its head projects no position; a forward hook on its decoder (`get_decoder()`) takes
the final hidden states (after the final norm) on the way. The first call keeps one position instead and checks
that the model's logits there are its head applied to those hidden states, which catches a head that scales,
caps or otherwise transforms its output without a configuration attribute that says so.

Under DeepSpeed ZeRO-3 a head's parameters are partitioned across the processes (each holds a shard, and the
parameter itself is empty outside its module's forward): `whole_head` takes them whole out of a call of the head
itself, so that DeepSpeed gathers them for the loss's forward and again, in the backward, before their gradient
accumulates (which it then reduce-scatters as for any parameter).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.utils import logging

from .logit_free import HeadLogits
from .model_config import text_config

logger = logging.get_logger(__name__)

LOGIT_FREE_MODES = ("auto", "always", "never")
"""`logit_free`: where it applies (`auto`), everywhere or refuse (`always`), or never."""

TRANSFORMED_HEADS = {
    "final_logit_softcapping": "final-logit soft-capping",
    "logit_scale": "logit scaling",
    "logits_scaling": "logit scaling",
    "lm_head_multiplier": "a head multiplier",
    "output_logits_scaling": "logit scaling",
}
"""Configuration attributes of heads that transform $h W^\\top + b$, and what they do (None or 1: they do not)."""

CHECK_ATOL = {torch.float64: 1e-10, torch.float32: 1e-4}
"""How close the model's logits must be to its head on its hidden states at the first call (others: 2e-2)."""


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside `model` (a PEFT model's base model; DDP and DeepSpeed wrappers' module)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    return model


def logit_free_reason(model: nn.Module) -> str | None:
    """Why `model`'s logits cannot be made from its final hidden states and head here; None when they can."""
    if getattr(model, "peft_config", None) is not None and getattr(
        getattr(model, "active_peft_config", None), "is_prompt_learning", False
    ):
        return "a PEFT prompt-learning model adds virtual tokens to the sequence"
    inner = causal_lm(model)
    config = text_config(inner)
    for attribute, what in TRANSFORMED_HEADS.items():
        value = getattr(config, attribute, None)
        if value is not None and value != 1:
            return f"its head applies {what} (`{attribute}={value}`)"
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        kind = "none" if head is None else f"{type(head).__module__}.{type(head).__name__}"
        return f"its output head is not a plain torch.nn.Linear ({kind})"
    if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        return "its forward takes no `logits_to_keep`"
    if not hasattr(inner, "get_decoder") or inner.get_decoder() is inner:
        return "it has no decoder module apart from its head"
    return None


def whole_head(head: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """
    The weight and bias of `head`, whole. A head partitioned by DeepSpeed ZeRO-3 (`ds_id`) is called on no positions,
    so that DeepSpeed's hooks on it gather its parameters; a forward hook, run before DeepSpeed's own hooks that
    release the parameters and mark the call's outputs, hands views of them out of the call as its outputs. They keep
    the gathered tensors alive while the loss reads them, and their gradient passes through DeepSpeed's pre-backward
    hook on the head, which gathers the parameters again before it accumulates (as for the head's own forward).
    """
    if not hasattr(head.weight, "ds_id"):
        return head.weight, head.bias

    def whole(module: nn.Module, args: Any, output: Any) -> tuple[Tensor, ...]:
        return tuple(p.view_as(p) for p in (module.weight, module.bias) if p is not None)

    handle = head.register_forward_hook(whole, prepend=True)
    try:
        parameters = head(head.weight.new_empty(0, head.in_features))
    finally:
        handle.remove()
    return parameters[0], parameters[1] if len(parameters) > 1 else None


class HeadRunner:
    """
    Runs a model without its `[B, T, V]` logits: its forward with `logits_to_keep` empty, and its final hidden states
    (from a hook on its decoder) at the valid positions with its head, as `HeadLogits`.
    """

    def __init__(self, model: nn.Module) -> None:
        inner = causal_lm(model)
        self.decoder = inner.get_decoder()
        self.head: nn.Linear = inner.get_output_embeddings()
        self.checked = False
        """Whether the first call checked the model's logits against its head."""

    def __call__(
        self,
        forward: Callable[..., Any],
        mask: Tensor,
        *,
        vocab_size: int | None = None,
        shared: int | None = None,
        position_map: Tensor | None = None,
        own_positions: Tensor | None = None,
    ) -> tuple[Any, HeadLogits] | tuple[Any, str]:
        """
        `forward(logits_to_keep=...)`'s outputs and the `HeadLogits` of the valid positions `mask` `[B, T]`: the
        head cut to its first `shared` rows and `vocab_size` wide (a teacher on the student's vocabulary,
        `hf_mtkd.teachers.on_student_vocabulary`). A model on its own tokens (a cross-tokenizer teacher) gives its
        hidden states at the student's positions, its positions `position_map` `[B, T]` (-1: none, read as 0), and
        after them those of its own positions `own_positions` `[B, T_k]` (its prompt). At the first call, when the
        logits are not the head's, the outputs and the reason instead.
        """
        captured: list[Tensor] = []

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

        positions = torch.zeros(0 if self.checked else 1, dtype=torch.long, device=mask.device)
        handle = self.decoder.register_forward_hook(keep)
        try:
            outputs = forward(logits_to_keep=positions)
        finally:
            handle.remove()
        length = mask.shape[1] if position_map is None else None  # its own length is its own
        if (
            len(captured) != 1
            or captured[0].dim() != 3
            or captured[0].shape[0] != mask.shape[0]
            or (length is not None and captured[0].shape[1] != length)
        ):
            found = [tuple(h.shape) for h in captured]
            return outputs, f"its decoder's output {found} is not one [batch, length, hidden] tensor per forward"
        hidden = captured[0]
        weight, bias = whole_head(self.head)
        if not self.checked:
            logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
            with torch.no_grad():
                expected = F.linear(hidden[:, :1], weight, bias)
            tolerance = CHECK_ATOL.get(expected.dtype, 2e-2) * max(1.0, float(expected.abs().max()))
            if logits.shape != expected.shape or not torch.allclose(logits, expected, rtol=0, atol=tolerance):
                return outputs, "its logits are not its output head applied to its decoder's final hidden states"
            self.checked = True
        if shared is not None:
            weight, bias = weight[:shared], None if bias is None else bias[:shared]
        if position_map is None:
            return outputs, HeadLogits(hidden[mask], weight, bias, vocab_size)
        rows = torch.arange(mask.shape[0], device=mask.device)[:, None]
        kept = hidden[rows, position_map.clamp(min=0)][mask]
        if own_positions is not None:
            kept = torch.cat([kept, hidden[own_positions]])
        return outputs, HeadLogits(kept, weight, bias, vocab_size)


class LogitFreePlan:
    """
    Which models of a trainer run logit-free (`logit_free` = `auto`, `always` or `never`): the student, and each
    live teacher beside a logit-free student (a cross-tokenizer teacher's head on its own vocabulary, mapped onto
    the student's chunk by chunk, `hf_mtkd.cross_tokenizer.MappedLogits`). Where it does not apply, the reason is
    logged once (`auto`) or refused in one line (`always`), and that model gives its `[B, T, V]` logits as today; a
    student that cannot gives logits for every teacher too.
    """

    def __init__(
        self,
        mode: str,
        student: nn.Module,
        teachers: list[nn.Module | None],
        names: list[str],
        *,
        student_reason: str | None = None,
    ) -> None:
        """`teachers`: each live teacher (on the student's tokenizer or its own), None for the others (cached)."""
        self.mode = mode
        self.student: HeadRunner | None = None
        self.teachers: list[HeadRunner | None] = [None] * len(teachers)
        self.names = names
        if mode == "never":
            return
        reason = student_reason or logit_free_reason(student)
        if reason is not None:
            self._fall_back("the student", reason)
            return
        self.student = HeadRunner(student)
        self.plan_teachers(teachers)

    def plan_teachers(self, teachers: list[nn.Module | None]) -> None:
        """Which of `teachers` (None: not a live model) run logit-free, e.g. after they are replaced."""
        self.teachers = [None] * len(teachers)
        if self.student is None:
            return
        for k, (teacher, name) in enumerate(zip(teachers, self.names, strict=True)):
            reason = None if teacher is None else logit_free_reason(teacher)
            if reason is not None:
                self._fall_back(f"teacher {name!r}", reason)
            elif teacher is not None:
                self.teachers[k] = HeadRunner(teacher)

    def _fall_back(self, who: str, reason: str) -> None:
        if self.mode == "always":
            raise ValueError(
                f"`logit_free='always'` but {who} cannot run logit-free: {reason}. Set `logit_free='auto'` to "
                "fall back to its [batch, length, vocab] logits."
            )
        logger.warning(
            "The loss reads the [batch, length, vocab] logits of %s (not logit-free): %s.%s",
            who,
            reason,
            " Every teacher then gives its logits too." if who == "the student" else "",
        )

    def run_student(
        self, forward: Callable[..., Any], mask: Tensor, *, logits: bool
    ) -> tuple[Any, Tensor | HeadLogits]:
        """
        The student's outputs and what the loss reads of it: `HeadLogits` when it runs logit-free (unless `logits`,
        e.g. an evaluation that keeps them for metrics), else its `[B, T, V]` logits.
        """
        if self.student is not None and not logits:
            outputs, result = self.student(forward, mask)
            if not isinstance(result, str):
                return outputs, result
            self._fall_back("the student", result)
            self.student = None
        outputs = forward()
        return outputs, outputs.logits

    def run_teacher(
        self,
        k: int,
        forward: Callable[..., Any],
        mask: Tensor,
        *,
        vocab_size: int | None = None,
        shared: int | None = None,
        position_map: Tensor | None = None,
        own_positions: Tensor | None = None,
    ) -> tuple[Any, HeadLogits | None]:
        """
        Teacher k's outputs and, when it runs logit-free, its `HeadLogits` at the valid positions: on the student's
        vocabulary, or (`position_map`, a cross-tokenizer teacher) on its own, at its positions aligned to them and
        then at its `own_positions`.
        """
        runner = self.teachers[k]
        if runner is not None:
            outputs, result = runner(
                forward, mask, vocab_size=vocab_size, shared=shared, position_map=position_map,
                own_positions=own_positions,
            )  # fmt: skip
            if not isinstance(result, str):
                return outputs, result
            self._fall_back(f"teacher {self.names[k]!r}", result)
            self.teachers[k] = None
        return forward(), None
