"""The package's modules form layers: each imports only from its own layer or those below, and nothing in a loop."""

import ast
from pathlib import Path

import hf_mtkd

PACKAGE = Path(hf_mtkd.__file__).parent

LAYERS = [
    # helpers and the loss math: pure functions of tensors and settings
    {
        "version",
        "dtypes",
        "model_config",
        "parameters",
        "redaction",
        "weighting",
        "routing",
        "alignment",
        "token_chains",
    },
    {"chat_data"},  # data formats, chat templates, masks and packing (what the collators and the script read)
    {"storage", "topk"},  # storage formats (`topk` keeps the old import path)
    {"fusion", "divergences", "settings"},
    {"chunked"},  # the chunked driver
    {"logit_free"},  # its logit-free inputs (hidden states and output heads)
    {"prompt_evidence"},  # the teachers' log-probabilities of the prompt, per document
    {"losses"},  # the total and the functional API
    # teachers and where their outputs come from
    {"teachers", "distributed", "generation_eval", "pruning", "heads"},
    {"cross_tokenizer", "teacher_cache"},
    {"config"},
    {"sources"},  # teacher sources: live models or a teacher-logits cache, one interface
    {"on_policy"},  # generated batches (lmbda, seq_kd): the draw, the prompts, generation, the new labels
    # presentation helpers the trainer renders with: they read a trainer's attributes, never import it
    {"model_card", "hub"},
    {"trainer"},
    # entry points: the package root, the example script and CLI, the demo, test helpers
    {"__init__", "run_clm_distill", "cache_teachers", "cli", "testing", "demo"},
]
"""Lowest first. A new module goes into the lowest layer that holds everything it imports."""
PRESENTATION = {"model_card", "hub", "run_clm_distill", "cache_teachers", "cli", "demo"}
CORE = set().union(*LAYERS[: LAYERS.index({"trainer"})]) - PRESENTATION


def module_name(path: Path) -> str:
    """`hf_mtkd/losses.py` -> `losses`; every module of a subpackage (`demo/run.py`) counts as the subpackage."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imported_modules(source: str, package: tuple[str, ...]) -> set[str]:
    """
    The package's modules that `source`, a module of the (sub)package `package` (e.g. `("hf_mtkd", "demo")`), imports
    anywhere: at the top, inside functions and under `TYPE_CHECKING` alike.
    """
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            targets = [[*module, alias.name] for alias in node.names]
        else:
            continue
        for target in targets:
            if target[0] == "hf_mtkd":
                found.add(target[1] if len(target) > 1 and is_module(target[1]) else "__init__")
    return found


def is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").exists() or (PACKAGE / name).is_dir()


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        package = path.relative_to(PACKAGE.parent).parent.parts
        graph.setdefault(name, set()).update(imported_modules(path.read_text(encoding="utf-8"), package) - {name})
    return graph


def layer_of(name: str) -> int:
    for level, layer in enumerate(LAYERS):
        if name in layer:
            return level
    raise AssertionError(f"hf_mtkd.{name} is in no layer of tests/test_layers.py: add it to the lowest that fits.")


def test_every_module_imports_only_its_own_layer_or_lower():
    upward = [
        f"hf_mtkd.{name} (layer {layer_of(name)}) imports hf_mtkd.{target} (layer {layer_of(target)})"
        for name, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(name)
    ]
    assert upward == []


def test_the_core_imports_no_presentation_module():
    graph = import_graph()
    assert {name: graph[name] & PRESENTATION for name in CORE if graph[name] & PRESENTATION} == {}


def test_the_imports_form_no_loop():
    graph, done, stack = import_graph(), set(), []

    def visit(name: str) -> None:
        if name in stack:
            raise AssertionError("import loop: " + " -> ".join([*stack[stack.index(name) :], name]))
        if name in done:
            return
        stack.append(name)
        for target in sorted(graph.get(name, ())):
            visit(target)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_the_parser_sees_every_kind_of_import():
    """Relative, absolute, in-function and typing-only imports all count (a hidden back-reference cannot slip by)."""
    source = """
from typing import TYPE_CHECKING
import hf_mtkd.losses
from . import __version__
from .weighting import WEIGHTINGS
if TYPE_CHECKING:
    from .trainer import MultiTeacherDistillationTrainer
def f():
    from hf_mtkd import teachers
    from ..config import MultiTeacherDistillationConfig
"""
    assert imported_modules(source, ("hf_mtkd",)) == {"losses", "__init__", "weighting", "trainer", "teachers"}
    in_demo = "from .corpus import load_domains\nfrom .. import __version__\nfrom ..trainer import Trainer\n"
    assert imported_modules(in_demo, ("hf_mtkd", "demo")) == {"demo", "__init__", "trainer"}
    assert {"losses", "config", "model_card"} <= import_graph()["trainer"]
