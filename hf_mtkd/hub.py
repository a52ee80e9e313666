"""What goes to the Hub: leaving files of the output directory out of `Trainer.push_to_hub`'s upload."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import transformers.trainer


@contextlib.contextmanager
def ignored_on_upload(patterns: Sequence[str]) -> Iterator[None]:
    """
    Add `patterns` to the `ignore_patterns` of every `upload_folder` call the `Trainer` makes inside the block.

    `Trainer.push_to_hub` uploads its output directory with fixed `ignore_patterns`; this extends them without
    re-implementing it. The patterns travel with each call started inside the block, non-blocking ones included.
    Recent transformers upload through the shared `hf_api()` instance, older 5.x releases through the
    `upload_folder` function imported into `transformers.trainer`; both are covered.
    """

    def ignoring(upload_folder: Callable[..., Any]) -> Callable[..., Any]:
        def upload_folder_ignoring(*args: Any, ignore_patterns: list[str] | str | None = None, **kwargs: Any) -> Any:
            if isinstance(ignore_patterns, str):
                ignore_patterns = [ignore_patterns]
            return upload_folder(*args, ignore_patterns=[*(ignore_patterns or []), *patterns], **kwargs)

        return upload_folder_ignoring

    if hasattr(transformers.trainer, "hf_api"):
        owner = transformers.trainer.hf_api()
        shadowed = vars(owner).get("upload_folder")  # an instance attribute, e.g. from an enclosing block
    else:
        owner, shadowed = transformers.trainer, transformers.trainer.upload_folder
    owner.upload_folder = ignoring(owner.upload_folder)
    try:
        yield
    finally:
        if shadowed is None:
            del owner.upload_folder  # back to HfApi's method
        else:
            owner.upload_folder = shadowed
