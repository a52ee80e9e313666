"""The `hf-mtkd` command: `hf-mtkd <command> [arguments]`, `hf-mtkd --version`, `hf-mtkd --help`."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from typing import NamedTuple

from . import __version__


class Command(NamedTuple):
    """A subcommand: the module whose `main(args, prog)` runs it, and a one-line description."""

    module: str
    help: str


COMMANDS = {
    "distill": Command(
        "hf_mtkd.run_clm_distill",
        "Distill teachers into a student on a text dataset (the arguments of examples/run_clm_distill.py).",
    ),
    "cache-teachers": Command(
        "hf_mtkd.cache_teachers",
        "Run the teachers once over a text dataset and store their top-k logits for `distill "
        "--teacher_logits_cache` (the arguments of `distill`).",
    ),
    "demo": Command(
        "hf_mtkd.demo.run",
        "The bundled demo: distil a small student from three specialists (Python source, technical prose, "
        "Shakespeare; or Shakespeare by genre) with every method.",
    ),
    "demo-cross-tokenizer": Command(
        "hf_mtkd.demo.cross_tokenizer",
        "The cross-tokenizer demo: the three specialists each on a tokenizer of its own, a student on a fourth, "
        "on prompt/completion rows; weighting by the prompt against routing by hand.",
    ),
}
"""Subcommands by name; a new one is one entry here (its module is imported only when it runs)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-mtkd",
        description="Multi-teacher knowledge distillation of language models. "
        "Run `hf-mtkd <command> --help` for a command's arguments.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for name, command in COMMANDS.items():
        subparsers.add_parser(name, help=command.help, add_help=False)
    return parser


def main(args: Sequence[str] | None = None) -> None:
    """Parse the command name and hand the rest of the arguments to that command."""
    parser = build_parser()
    namespace, rest = parser.parse_known_args(args)
    if namespace.command is None:
        parser.print_help()
        parser.exit(2)
    importlib.import_module(COMMANDS[namespace.command].module).main(rest, prog=f"hf-mtkd {namespace.command}")


if __name__ == "__main__":
    main()
