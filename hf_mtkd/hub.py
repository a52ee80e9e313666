"""What goes to the Hub: leaving files of the output directory out of `Trainer.push_to_hub`'s upload."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from transformers.utils.hub import hf_api


@contextlib.contextmanager
def ignored_on_upload(patterns: Sequence[str]) -> Iterator[None]:
    """
    Add `patterns` to the `ignore_patterns` of every `upload_folder` call that `transformers` makes inside the block.

    `Trainer.push_to_hub` uploads its output directory with fixed `ignore_patterns`; this extends them without
    re-implementing it. The patterns travel with each call started inside the block, non-blocking ones included.
    """
    api = hf_api()
    shadowed = vars(api).get("upload_folder")  # set by an enclosing block
    upload_folder = api.upload_folder

    def upload_folder_ignoring(*args: Any, ignore_patterns: list[str] | str | None = None, **kwargs: Any) -> Any:
        if isinstance(ignore_patterns, str):
            ignore_patterns = [ignore_patterns]
        return upload_folder(*args, ignore_patterns=[*(ignore_patterns or []), *patterns], **kwargs)

    api.upload_folder = upload_folder_ignoring
    try:
        yield
    finally:
        if shadowed is None:
            del api.upload_folder  # back to the class's method
        else:
            api.upload_folder = shadowed
