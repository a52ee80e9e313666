"""Scaling out: the DeepSpeed configs shipped with the package, and where the teachers live on several processes.

Under DeepSpeed ZeRO-3 each teacher is wrapped in a DeepSpeed engine without an optimizer, so its parameters are
partitioned across the processes like the student's and gathered layer by layer during its forward pass. Under
ZeRO-1/2, plain DDP or a single process, every process holds a full copy of each teacher in `teacher_dtype`.
For on-policy generation, `zero3_gathered` holds a ZeRO-3 model's weights whole for the span of a `generate` call.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from transformers import TrainingArguments
from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled
from transformers.utils import logging

from .model_config import text_config
from .parameters import count_parameters

logger = logging.get_logger(__name__)

DEEPSPEED_CONFIGS = {
    "zero2": "ZeRO-2: optimizer states and gradients sharded, parameters (student and teachers) replicated.",
    "zero3": "ZeRO-3: parameters, gradients and optimizer states sharded; each teacher sharded too.",
    "zero3_offload": "ZeRO-3 with parameters and optimizer states offloaded to CPU memory (DeepSpeed's CPU AdamW).",
}
"""Short names of the DeepSpeed configs shipped in `hf_mtkd/deepspeed_configs/`, usable as `deepspeed=<name>`."""

# Bucket sizes that DeepSpeed derives from the hidden size when the config says "auto" (as transformers does for
# the model it trains); the teachers get their own values from their own hidden size.
_HIDDEN_SIZE_KEYS = {
    "reduce_bucket_size": lambda hidden: hidden * hidden,
    "stage3_prefetch_bucket_size": lambda hidden: int(0.9 * hidden * hidden),
    "stage3_param_persistence_threshold": lambda hidden: 10 * hidden,
}


def deepspeed_config_path(name: str) -> str:
    """Path of the shipped DeepSpeed config called `name` (one of `DEEPSPEED_CONFIGS`)."""
    if name not in DEEPSPEED_CONFIGS:
        raise ValueError(f"Unknown DeepSpeed config {name!r}; the shipped ones are {list(DEEPSPEED_CONFIGS)}.")
    return str(resources.files("hf_mtkd") / "deepspeed_configs" / f"{name}.json")


def resolve_deepspeed_config(value: dict | str | None) -> dict | str | None:
    """
    `TrainingArguments.deepspeed` with a shipped config's short name (`zero2`, `zero3`, `zero3_offload`) replaced by
    its path; a dict, a path or a JSON string is returned unchanged.
    """
    if isinstance(value, str) and value in DEEPSPEED_CONFIGS:
        return deepspeed_config_path(value)
    if isinstance(value, str) and not os.path.isfile(value) and not value.lstrip().startswith("{"):
        raise ValueError(
            f"`deepspeed={value!r}` is neither a file, a JSON config nor a shipped config: pass a path to a "
            f"DeepSpeed JSON config, a dict, or one of {list(DEEPSPEED_CONFIGS)}."
        )
    return value


@contextmanager
def process_group_scope() -> Iterator[None]:
    """
    End the default process group that is started within this context (by `TrainingArguments`, from a launcher's
    environment) on the way out: on return, a barrier (no process exits before every process, rank 0 included, has
    written its results) and then `torch.distributed.destroy_process_group()`, the shutdown torch asks of every
    program; on an exception, only the latter (the other processes may never reach a barrier). A group started before
    the context is the caller's and is left alone.

    Destroying frees the group, and joins its gloo worker threads, only where nothing else still holds it; a gloo
    worker thread that outlives the interpreter can abort the process at exit (docs/scaling.md, "The gloo abort in the
    CPU tests").
    """
    started_outside = _process_group_started()
    try:
        yield
    except BaseException:
        if not started_outside and _process_group_started():
            torch.distributed.destroy_process_group()
        raise
    if not started_outside and _process_group_started():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _process_group_started() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextmanager
def zero3_init_dtype(dtype: str) -> Iterator[None]:
    """
    Under ZeRO-3, `from_pretrained` creates models inside `deepspeed.zero.Init`, in the DeepSpeed config's dtype
    whatever `dtype=` it is given. Within this context it creates them in `dtype` ("float32", "bfloat16" or "float16";
    "auto" keeps the config's), so that teachers loaded by name are partitioned in `teacher_dtype`.
    """
    config = deepspeed_config() if is_deepspeed_zero3_enabled() else None
    if config is None or dtype == "auto":
        yield
        return
    saved = {key: config.get(key) for key in ("bf16", "fp16")}
    config["bf16"] = {**(saved["bf16"] or {}), "enabled": dtype == "bfloat16"}
    config["fp16"] = {**(saved["fp16"] or {}), "enabled": dtype == "float16"}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                config.pop(key)
            else:
                config[key] = value


def prepare_teachers(
    teachers: Sequence[nn.Module], names: Sequence[str], accelerator: Accelerator, args: TrainingArguments
) -> list[nn.Module]:
    """
    Teachers ready to run on this process: DeepSpeed engines holding a shard of each teacher under ZeRO-3,
    otherwise the models themselves on `args.device` (unless already dispatched with a `device_map`).
    """
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is not None and plugin.hf_ds_config.is_zero3():
        engines = [_teacher_engine(teacher, plugin.deepspeed_config) for teacher in teachers]
        if args.should_log:
            logger.info(
                "DeepSpeed ZeRO-3: each teacher (%s) is partitioned across the %d processes; every process holds "
                "about 1/%d of %s teacher parameters in %s.",
                ", ".join(names),
                accelerator.num_processes,
                accelerator.num_processes,
                f"{sum(count_parameters(t) for t in teachers):,}",
                ", ".join(sorted({str(_dtype(t)).removeprefix("torch.") for t in teachers})),
            )
        return engines
    for teacher in teachers:
        if not getattr(teacher, "hf_device_map", None):
            teacher.to(args.device)
    if accelerator.num_processes > 1 and args.should_log:
        mode = f"DeepSpeed ZeRO-{plugin.zero_stage}" if plugin is not None else accelerator.distributed_type.value
        logger.info(
            "%s: the teachers (%s) are replicated on each of the %d processes, each holding all %s teacher "
            "parameters in %s. Use DeepSpeed ZeRO-3 (e.g. `deepspeed='zero3'`) to partition them.",
            mode,
            ", ".join(names),
            accelerator.num_processes,
            f"{sum(count_parameters(t) for t in teachers):,}",
            ", ".join(sorted({str(_dtype(t)).removeprefix("torch.") for t in teachers})),
        )
    return list(teachers)


def zero3_parameter_offload(engine: nn.Module) -> Any | None:
    """
    The object that partitions a DeepSpeed ZeRO-3 `engine`'s parameters and holds the per-module hooks that gather
    and release them (DeepSpeed's `DeepSpeedZeRoOffload`: the optimizer's, or the engine's own without one), or
    None for any other model.
    """
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)
    return offload if hasattr(offload, "param_coordinator") and hasattr(offload, "forward_hooks") else None


@contextmanager
def zero3_gathered(engine: nn.Module) -> Iterator[None]:
    """
    A DeepSpeed ZeRO-3 `engine`'s parameters whole on every process inside the block, gathered once, with the
    engine's module hooks taken off meanwhile: they would release each layer's parameters after its forward (and
    gather them again at the next), and take part in collective calls that processes which stop generating early
    would not join. On the way out the parameters are partitioned again and the hooks put back, as DeepSpeed sets
    them up (their recorded fetch order is started afresh). Anything else than a ZeRO-3 engine: nothing is done.
    """
    offload = zero3_parameter_offload(engine)
    if offload is None:
        yield
        return
    import deepspeed

    module = offload.module
    parameters = list(module.parameters())
    for parameter in parameters:
        parameter.ds_active_sub_modules.clear()  # no layer is running: none may keep a parameter gathered later
    for handle in [offload.fwd_pre_hook, *offload.forward_hooks, *offload.backward_hooks]:
        handle.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        with deepspeed.zero.GatheredParameters(parameters):
            yield
    finally:
        # DeepSpeed's own start-of-forward hook, then its per-module hooks (which start a new fetch-order record)
        offload.fwd_pre_hook = module.register_forward_pre_hook(
            lambda _module, *_: offload.get_param_coordinator().reset_step()
        )
        offload._register_deepspeed_module(module)


def teacher_deepspeed_config(training_config: dict[str, Any], teacher: nn.Module) -> dict[str, Any]:
    """
    The DeepSpeed config of a frozen teacher's inference engine, derived from the (resolved) training config: same
    ZeRO stage and parameter offload, no optimizer, scheduler or optimizer offload, bucket sizes from the teacher's
    hidden size, and mixed precision matching the teacher's dtype so that DeepSpeed does not cast it.
    """
    config = copy.deepcopy(training_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    hidden_size = _hidden_size(teacher)
    for key, value in _HIDDEN_SIZE_KEYS.items():
        if zero.get(key) == "auto":
            if hidden_size is None:
                raise ValueError(
                    f"The DeepSpeed config sets `zero_optimization.{key}` to 'auto', which needs the teacher's "
                    f"`hidden_size`, but {type(teacher).__name__} has no config with one. Set it to a number."
                )
            zero[key] = value(hidden_size)
    dtype = _dtype(teacher)
    config["bf16"] = {"enabled": dtype == torch.bfloat16}
    config["fp16"] = {"enabled": dtype == torch.float16}
    unresolved = [key for key, value in _flatten(config) if value == "auto"]
    if unresolved:
        raise ValueError(
            f"DeepSpeed config values {unresolved} are still 'auto' when the teachers are prepared. Set them to "
            "numbers in the config, or pass the config through `TrainingArguments(deepspeed=...)`, which fills them."
        )
    return config


def _teacher_engine(teacher: nn.Module, training_config: dict[str, Any]) -> nn.Module:
    import deepspeed

    config = teacher_deepspeed_config(training_config, teacher)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


def _hidden_size(model: nn.Module) -> int | None:
    config = text_config(model)
    hidden_size = getattr(config, "hidden_size", None)
    if hidden_size is None and getattr(config, "hidden_sizes", None):
        hidden_size = max(config.hidden_sizes)
    return hidden_size


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _flatten(config: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in config.items():
        if isinstance(value, dict):
            items.extend(_flatten(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items
