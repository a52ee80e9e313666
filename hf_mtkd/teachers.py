r"""
Teachers: loading, freezing, checks at construction, and the no-grad forward pass.

**Padded vocabularies.** Model families pad their embedding matrices to different sizes with one tokenizer (e.g.
Qwen2.5-0.5B has 151936 rows, Qwen2.5-7B 152064, both for the same 151665 tokens). A teacher on the student's
tokenizer stays on the shared vocabulary whatever its number of rows: the ids both models score are the first
$m = \min(n, V_t, V_s)$ ($n$ the tokenizer's length, $V_t$ and $V_s$ the teacher's and the student's logit widths,
`shared_vocabulary_size`). The teacher's rows from m on are dropped (its distribution is renormalised over the m
tokens: $p_k = \mathrm{softmax}(z_{k,<m}/\tau)$) and the student's rows from m on get target probability 0
(`on_student_vocabulary`); the student's own softmax (its CE and KL) stays over all its $V_s$ rows, so training
pushes its padding rows down as plain fine-tuning does. The loss, the entropies and the weights therefore do not
depend on the values in anyone's padding rows beyond the student's own normaliser. The teacher-logits cache
applies the same rule when it is written (`hf_mtkd.teacher_cache`).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from .dtypes import DTYPES, torch_dtype
from .model_config import text_config
from .parameters import count_parameters

TEACHER_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


def require_teachers(teachers: Any) -> None:
    """Refuse an empty `teachers` argument (a list of models or names/paths, or a teacher-logits cache)."""
    if not teachers:
        raise ValueError("`teachers` is empty: pass at least one teacher model, name or path.")


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
    require_teachers(teachers)
    loaded = []
    for teacher in teachers:
        if isinstance(teacher, (str, os.PathLike)):
            kwargs = {"dtype": torch_dtype(dtype), **(init_kwargs or {})}
            try:
                teacher = AutoModelForCausalLM.from_pretrained(teacher, **kwargs)
            except (OSError, ValueError) as err:
                raise ValueError(unloadable_teacher_message(teacher, err)) from err
        elif not isinstance(teacher, nn.Module):
            raise TypeError(f"A teacher must be a model or a name/path, got {type(teacher).__name__}.")
        elif dtype != "auto":
            teacher = teacher.to(DTYPES[dtype])
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
    return getattr(text_config(model), "vocab_size", None)


def shared_vocabulary_size(
    name: str, teacher_vocab: int | None, student_vocab: int | None, tokenizer_length: int | None
) -> int | None:
    """
    The number m of leading token ids a teacher on the student's tokenizer is distilled on (see the module
    docstring): `min(tokenizer_length, teacher_vocab, student_vocab)`, None when no size is known. Sizes that differ
    need the tokenizer's length to tell the padding rows, and a teacher with fewer rows than there are ids the
    student reads is refused.
    """
    if teacher_vocab == student_vocab:
        return teacher_vocab if None in (teacher_vocab, tokenizer_length) else min(teacher_vocab, tokenizer_length)
    if tokenizer_length is None or teacher_vocab is None or student_vocab is None:
        raise ValueError(
            f"Teacher {name!r} has a vocabulary of {teacher_vocab} tokens but the student has {student_vocab}, and "
            "without the tokenizer the padding rows cannot be told from the tokens: pass the student's tokenizer as "
            "`processing_class`."
        )
    readable = min(tokenizer_length, student_vocab)
    if teacher_vocab < readable:
        raise ValueError(
            f"Teacher {name!r} has a vocabulary of {teacher_vocab} tokens but the student has {student_vocab} and "
            f"the tokenizer {tokenizer_length}: the teacher cannot read ids {teacher_vocab}..{readable - 1}, which "
            "the student can. Use a teacher whose embedding covers the tokenizer (`resize_token_embeddings`)."
        )
    return readable


def on_student_vocabulary(logits: Tensor, shared: int | None, student_vocab: int) -> Tensor:
    """
    A teacher's `[..., V_t]` logits as `[..., V_s]` logits on the student's vocabulary: its first `shared` columns
    (the tokenizer's tokens, `shared_vocabulary_size`), -inf (probability 0) on the student's other rows; the
    teacher's own rows from `shared` on are dropped. Unchanged (not copied) when nothing is padded or `shared` is
    None.
    """
    if shared is None or logits.shape[-1] == shared == student_vocab:
        return logits
    padded = logits.new_full((*logits.shape[:-1], student_vocab), -math.inf)
    padded[..., :shared] = logits[..., :shared]
    return padded


def check_teachers(
    teachers: Sequence[nn.Module],
    names: Sequence[str],
    student: nn.Module,
    *,
    need_hidden_states: bool,
    cross_tokenizer: Sequence[bool] = (),
    tokenizer_length: int | None = None,
) -> list[int | None]:
    """
    Raise a clear error for a teacher on the meta device, with a vocabulary that does not fit the student's
    (`shared_vocabulary_size`, unless it runs in cross-tokenizer mode, `cross_tokenizer[k]`), or without hidden
    states. Returns each teacher's shared vocabulary size, None in cross-tokenizer mode.
    """
    student_vocab = vocab_size(student)
    shared: list[int | None] = []
    for teacher, name, cross in zip(teachers, names, list(cross_tokenizer) or [False] * len(teachers), strict=True):
        if any(p.device.type == "meta" for p in teacher.parameters()):
            raise ValueError(
                f"Teacher {name!r} has parameters on the meta device, so it has no weights to run. Load it with "
                "real weights (e.g. `from_pretrained` without `device_map='meta'` or `init_empty_weights`)."
            )
        teacher_vocab = vocab_size(teacher)
        shared.append(None if cross else shared_vocabulary_size(name, teacher_vocab, student_vocab, tokenizer_length))
        if need_hidden_states and not _accepts_kwarg(teacher, "output_hidden_states"):
            raise ValueError(
                f"Teacher {name!r} ({type(teacher).__name__}) cannot return hidden states: its forward accepts "
                "neither `output_hidden_states` nor `**kwargs`. Feature alignment (`alpha_feat > 0`) needs them: "
                "use a transformers model or set `alpha_feat=0`."
            )
    return shared


def _accepts_kwarg(model: nn.Module, name: str) -> bool:
    model = getattr(model, "module", model)  # a DeepSpeed engine forwards everything to its module
    parameters = inspect.signature(model.forward).parameters
    return name in parameters or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def teacher_forward(
    teacher: nn.Module, name: str, inputs: Mapping[str, Tensor], output_hidden_states: bool, **extra: Any
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """
    Logits `[B, T, V]` (and hidden states when asked) of a frozen teacher on the student's batch; `extra` are more
    arguments of its forward (e.g. `logits_to_keep`).

    Without hidden states the teacher runs under `torch.inference_mode`, the cheapest mode: its logits only feed
    no-grad statistics and the fused KD loss, which saves none of them for the backward pass. Hidden states meet
    the student's graph in the feature loss, so that forward runs under `torch.no_grad`.
    """
    kwargs = {**{key: inputs[key] for key in TEACHER_INPUT_KEYS if key in inputs}, **extra}
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
