"""Depth pruning: a student cut from a teacher's own layers, the usual starting point of compressing an LLM.

The student keeps the teacher's architecture, embeddings, final norm and output head, and a subset of its decoder
layers (evenly spaced, or the ones you name), so it starts close to the teacher and distillation recovers what the
dropped layers did. It is a normal model of the teacher's class: `save_pretrained` writes it and
`AutoModelForCausalLM.from_pretrained` loads it back.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging

from .parameters import count_parameters

logger = logging.get_logger(__name__)


def evenly_spaced_layers(num_layers: int, total: int) -> list[int]:
    """
    `num_layers` indices out of `range(total)`, evenly spaced with the first and the last kept:
    `round(i (total - 1) / (num_layers - 1))` for `i = 0 .. num_layers - 1` (layer 0 alone when `num_layers` is 1).
    """
    if not 1 <= num_layers <= total:
        raise ValueError(
            f"A student cut from a teacher of {total} layers keeps 1 to {total} layers, not {num_layers}."
        )
    if num_layers == 1:
        return [0]
    return [round(i * (total - 1) / (num_layers - 1)) for i in range(num_layers)]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """
    The qualified name and the module of `model`'s stack of decoder layers: the `nn.ModuleList` of
    `config.num_hidden_layers` blocks (`model.layers` in Llama-style models, `transformer.h` in GPT-2); where several
    lists have that length, the one holding the most parameters.
    """
    total = model.config.get_text_config().num_hidden_layers
    stacks = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == total]
    if not stacks:
        raise ValueError(
            f"Cannot find the decoder layers of {type(model).__name__}: no list of {total} "
            "(config.num_hidden_layers) blocks; pass a causal LM of transformers."
        )
    return max(stacks, key=lambda stack: sum(p.numel() for p in stack[1].parameters()))


def _kept_layers(num_layers: int | None, layers: Sequence[int] | None, total: int) -> list[int]:
    """The teacher's layer indices the student keeps, from exactly one of `num_layers` and `layers`."""
    if (num_layers is None) == (layers is None):
        raise ValueError("Give exactly one of num_layers (evenly spaced layers) and layers (the indices to keep).")
    if layers is None:
        return evenly_spaced_layers(num_layers, total)
    kept = [index % total if -total <= index < total else index for index in layers]
    if not kept or any(not 0 <= index < total for index in kept) or kept != sorted(set(kept)):
        raise ValueError(
            f"layers must be distinct, increasing indices of the teacher's {total} layers (negative ones count from "
            f"the end); got {list(layers)}."
        )
    return kept


def student_from_teacher(
    teacher: PreTrainedModel | str | os.PathLike,
    num_layers: int | None = None,
    *,
    layers: Sequence[int] | None = None,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """
    A student of the teacher's architecture with `num_layers` of its decoder layers, evenly spaced (the first and the
    last kept, see `evenly_spaced_layers`), or exactly the `layers` you list; embeddings, final norm, output head
    (tied or not) and every other weight outside the layers are copied. The student owns its weights (training it
    leaves the teacher unchanged), in the teacher's dtype, with its layers renumbered (each attention's `layer_idx`,
    and `config.layer_types` where the config has them, follow the kept layers).

    `teacher` is a model or a name/path, loaded with `AutoModelForCausalLM.from_pretrained(teacher,
    **from_pretrained_kwargs)`. Pass an unwrapped model with its weights in memory: not a PEFT model (merge it
    first), not one on the meta device or partitioned by DeepSpeed ZeRO-3.
    """
    if isinstance(teacher, (str, os.PathLike)):
        teacher = AutoModelForCausalLM.from_pretrained(teacher, **from_pretrained_kwargs)
    if not isinstance(teacher, PreTrainedModel) or hasattr(teacher, "peft_config"):
        raise ValueError(
            f"student_from_teacher needs a transformers causal LM, got {type(teacher).__name__}; merge a PEFT "
            "model first (merge_and_unload)."
        )
    if any(p.is_meta or hasattr(p, "ds_numel") for p in teacher.parameters()):
        raise ValueError(
            "The teacher's weights are not in memory (meta device or DeepSpeed ZeRO-3 partitions): load it fully "
            "before cutting a student from it."
        )
    prefix, stack = decoder_layers(teacher)
    kept = _kept_layers(num_layers, layers, len(stack))
    config = copy.deepcopy(teacher.config)
    text_config = config.get_text_config()
    layer_types = getattr(text_config, "layer_types", None)
    text_config.num_hidden_layers = len(kept)
    if layer_types is not None:
        text_config.layer_types = [layer_types[index] for index in kept]
    student = type(teacher)._from_config(config, dtype=teacher.dtype)
    new_index = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, value in teacher.state_dict().items():
        if not key.startswith(prefix + "."):
            state[key] = value
            continue
        index, rest = key[len(prefix) + 1 :].split(".", 1)
        if int(index) in new_index:
            state[f"{prefix}.{new_index[int(index)]}.{rest}"] = value
    student.load_state_dict(state, strict=True)
    if teacher.generation_config is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    logger.info(
        "Cut a student from the teacher: layers %s of %d, %.2fM parameters (the teacher has %.2fM).",
        kept,
        len(stack),
        count_parameters(student) / 1e6,
        count_parameters(teacher) / 1e6,
    )
    return student
