"""What hf_mtkd reads of a model's configuration: the text part of it (vocabulary, depth, width, length)."""

from __future__ import annotations

from typing import Any

from torch import nn


def text_config(model_or_config: Any) -> Any:
    """
    The configuration of the language model in `model_or_config` (a model or its config): `get_text_config()` for
    multimodal configs, the config itself otherwise; None for a module without a config.
    """
    config = getattr(model_or_config, "config", None) if isinstance(model_or_config, nn.Module) else model_or_config
    return config.get_text_config() if hasattr(config, "get_text_config") else config
