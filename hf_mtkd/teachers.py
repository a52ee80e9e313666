"""Teachers: loading, freezing, checks at construction, and the no-grad forward pass."""

from __future__ import annotations

import hashlib
import inspect
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from .parameters import count_parameters

TEACHER_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_teachers(
    teachers: Sequence[nn.Module | str],
    *,
    dtype: str = "auto",
    init_kwargs: Mapping[str, Any] | None = None,
) -> list[nn.Module]:
    """
    Teachers as frozen models in eval mode: names/paths are loaded with `AutoModelForCausalLM.from_pretrained`,
    models are cast to `dtype` unless it is "auto".
    """
    if len(teachers) == 0:
        raise ValueError("`teachers` is empty: pass at least one teacher model, name or path.")
    loaded = []
    for teacher in teachers:
        if isinstance(teacher, (str, os.PathLike)):
            kwargs = {"dtype": _DTYPES.get(dtype, "auto"), **(init_kwargs or {})}
            try:
                teacher = AutoModelForCausalLM.from_pretrained(teacher, **kwargs)
            except (OSError, ValueError) as err:
                raise ValueError(unloadable_teacher_message(teacher, err)) from err
        elif not isinstance(teacher, nn.Module):
            raise TypeError(f"A teacher must be a model or a name/path, got {type(teacher).__name__}.")
        elif dtype != "auto":
            teacher = teacher.to(_DTYPES[dtype])
        teacher.eval()
        teacher.requires_grad_(False)
        loaded.append(teacher)
    return loaded


def unloadable_teacher_message(teacher: str | os.PathLike, err: Exception) -> str:
    """One line on why the teacher `teacher` (a name or path) failed to load with `err`, and what to give instead."""
    path = os.fspath(teacher)
    if not os.path.exists(path) and not _is_repo_id(path):
        problem = "it is neither a local directory nor a valid Hub model id"
    else:
        problem = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
    return (
        f"Teacher {path!r} cannot be loaded: {problem}. Give a local directory holding a model "
        "(config.json and weights) or a Hub model id (reachable online, or cached when HF_HUB_OFFLINE=1)."
    )


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def teacher_names(teachers: Sequence[nn.Module | str], names: Sequence[str] | None = None) -> list[str]:
    """Unique display names: the given ones, else each path's last part or the model's `name_or_path`/type."""
    if names is None:
        names = [_default_name(teacher, k) for k, teacher in enumerate(teachers)]
    counts = Counter(names)
    return [f"{name}_{k}" if counts[name] > 1 else name for k, name in enumerate(names)]


def _default_name(teacher: nn.Module | str, index: int) -> str:
    if isinstance(teacher, (str, os.PathLike)):
        return os.path.basename(os.path.normpath(str(teacher)))
    config = getattr(teacher, "config", None)
    name_or_path = getattr(config, "name_or_path", "") or ""
    if name_or_path:
        return os.path.basename(os.path.normpath(name_or_path))
    return getattr(config, "model_type", None) or f"teacher_{index}"


def teacher_record(model: nn.Module, name: str, *, hash_weights: bool = False) -> dict[str, Any]:
    """What identifies a teacher: its name, origin, class, revision, parameter count (and a sha256 of its weights)."""
    config = getattr(model, "config", None)
    record = {
        "name": name,
        "name_or_path": getattr(config, "name_or_path", "") or "",
        "class": type(model).__name__,
        "revision": getattr(config, "_commit_hash", None),
        "num_parameters": count_parameters(model),
    }
    if hash_weights:
        digest = hashlib.sha256()
        for key, tensor in sorted(model.state_dict().items()):
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        record["weights_sha256"] = digest.hexdigest()
    return record


def vocab_size(model: nn.Module) -> int | None:
    """Width of the model's next-token logits, from its (text) config."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "vocab_size", None)


def check_teachers(
    teachers: Sequence[nn.Module],
    names: Sequence[str],
    student: nn.Module,
    *,
    need_hidden_states: bool,
    cross_tokenizer: Sequence[bool] = (),
) -> None:
    """
    Raise a clear error for a teacher on the meta device, with another vocabulary size (unless it runs in
    cross-tokenizer mode, `cross_tokenizer[k]`), or without hidden states.
    """
    student_vocab = vocab_size(student)
    for teacher, name, cross in zip(teachers, names, list(cross_tokenizer) or [False] * len(teachers), strict=True):
        if any(p.device.type == "meta" for p in teacher.parameters()):
            raise ValueError(
                f"Teacher {name!r} has parameters on the meta device, so it has no weights to run. Load it with "
                "real weights (e.g. `from_pretrained` without `device_map='meta'` or `init_empty_weights`)."
            )
        teacher_vocab = vocab_size(teacher)
        if not cross and teacher_vocab != student_vocab:
            raise ValueError(
                f"Teacher {name!r} has a vocabulary of {teacher_vocab} tokens but the student has {student_vocab}. "
                "Fused distillation on a shared vocabulary compares next-token distributions id by id; for a teacher "
                "with another tokenizer use `cross_tokenizer='auto'` and give its tokenizer (`teacher_tokenizers`)."
            )
        if need_hidden_states and not _accepts_kwarg(teacher, "output_hidden_states"):
            raise ValueError(
                f"Teacher {name!r} ({type(teacher).__name__}) cannot return hidden states: its forward accepts "
                "neither `output_hidden_states` nor `**kwargs`. Feature alignment (`alpha_feat > 0`) needs them: "
                "use a transformers model or set `alpha_feat=0`."
            )


def _accepts_kwarg(model: nn.Module, name: str) -> bool:
    model = getattr(model, "module", model)  # a DeepSpeed engine forwards everything to its module
    parameters = inspect.signature(model.forward).parameters
    return name in parameters or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def teacher_forward(
    teacher: nn.Module, name: str, inputs: Mapping[str, Tensor], output_hidden_states: bool
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """
    Logits `[B, T, V]` (and hidden states when asked) of a frozen teacher on the student's batch.

    Without hidden states the teacher runs under `torch.inference_mode`, the cheapest mode: its logits only feed
    no-grad statistics and the fused KD loss, which saves none of them for the backward pass. Hidden states meet
    the student's graph in the feature loss, so that forward runs under `torch.no_grad`.
    """
    kwargs = {key: inputs[key] for key in TEACHER_INPUT_KEYS if key in inputs}
    if output_hidden_states:
        kwargs["output_hidden_states"] = True
    if _accepts_kwarg(teacher, "use_cache"):
        kwargs["use_cache"] = False
    with torch.no_grad() if output_hidden_states else torch.inference_mode():
        outputs = teacher(**kwargs)
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    hidden_states = getattr(outputs, "hidden_states", None) if output_hidden_states else None
    if output_hidden_states and hidden_states is None:
        raise ValueError(f"Teacher {name!r} returned no hidden states, but feature alignment needs them.")
    return logits, hidden_states


def pad_rows(rows: Sequence[Sequence[int]], value: int = 0) -> Tensor:
    """Lists of ints right-padded with `value` to the longest into a `[n, width]` long tensor."""
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long).reshape(
        len(rows), width
    )


def check_finite(per_position: Tensor, names: Sequence[str]) -> None:
    """
    Raise when teachers' logits held NaN or inf: `per_position` `[K, N]` is a statistic of each teacher's logits at
    the N positions the loss uses (e.g. their entropy), which is NaN or inf exactly where those logits are broken.
    """
    broken = ~torch.isfinite(per_position)
    for name, row in zip(names, broken, strict=True):
        if bool(row.any()):
            raise FloatingPointError(
                f"Teacher {name!r} produced NaN/inf logits at {int(row.sum())} of {row.numel()} positions used for "
                "distillation. Check the checkpoint and the inputs, and prefer teacher_dtype='bfloat16' or "
                "'float32' over 'float16', which overflows easily."
            )
