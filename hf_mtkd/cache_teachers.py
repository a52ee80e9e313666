"""
`hf-mtkd cache-teachers`: run the teachers once over the train and validation splits of a text dataset and write
their top-k logits to `--teacher_logits_cache`, for `hf-mtkd distill --teacher_logits_cache` (which would otherwise
write it itself). It takes the arguments of `hf-mtkd distill`; those about the student and training are unused.
"""

from __future__ import annotations

from collections.abc import Sequence

from .run_clm_distill import main as run_clm_distill


def main(args: Sequence[str] | None = None, prog: str | None = None) -> None:
    run_clm_distill(args, prog or "hf-mtkd cache-teachers", cache_only=True)


if __name__ == "__main__":
    main()
