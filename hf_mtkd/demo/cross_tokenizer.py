"""
The cross-tokenizer demo: the default scenario's three domain specialists (Python code, English prose, Shakespeare),
each on a tokenizer of its own (another algorithm and vocabulary, as models of different families have), distilled
into a student on a fourth tokenizer, on prompt/completion rows of the three domains mixed, with no domain label.

    hf-mtkd demo-cross-tokenizer --full --output_dir /tmp/demo_cross   # or python -m hf_mtkd.demo.cross_tokenizer

Each row is a block of the student's tokens of one domain: its first `PROMPT_TOKENS` are the prompt (no loss), the
rest the completion. Every model reads the row's text in its own tokens (`MultiTokenizerCollator`); the teachers'
distributions are mapped onto the student's vocabulary where their tokens' strings match. The methods: the student
alone (cross-entropy on the completions), the package's default weighting (`posterior`), that weighting with the
teachers' likelihood of each row's prompt (`prompt_evidence`), routing by hand (each row to its domain's specialist,
read from a column the other methods do not see), and the prompt's weighting with ULD (`cross_tokenizer_loss="uld"`,
which compares sorted probabilities and needs no vocabulary map) instead of the KL on mapped distributions. Each
KL method runs on every target of `TARGETS`: the default (the teachers' chained probability of the student's whole
token, `hf_mtkd.token_chains`, and of the map only exact twins), and three others to compare. The
temperature and KD share are the default demo's choice on validation (`hparams_domains.json`); `--alpha_kd` sets the
share, to choose it on this demo's validation rows. Reported: the student's perplexity on the completions of the
validation and test rows, per domain and overall, and on each domain's validation rows the teachers' weights, where
they are aligned, how much of their mass only a prefix carried over, how much the chains moved onto the student's
token, and their NLL of the student's next token.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset, concatenate_datasets
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging

from .. import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer, __version__
from ..chat_data import CompletionCollator, ExampleRenderer
from ..testing import tiny_causal_lm, train_tiny_tokenizer
from .corpus import default_cache_dir, load_domains, split_works
from .report import summarize
from .zoo import SCALES, STUDENT, TEACHERS, Scale, build_model, to_blocks, training_settings

logger = logging.get_logger(__name__)

TOKENIZERS = {"python": ("bpe", 768), "prose": ("wordpiece", 768), "shakespeare": ("unigram", 768)}
"""Each specialist's own tokenizer: its algorithm and vocabulary size, trained on its own domain's training text."""
PROMPT_TOKENS = 16
"""The student's tokens at the start of each row that are its prompt (no loss, the rest is the completion)."""
TEACHER_CONTEXT = 2
"""A specialist is trained on, and reads, blocks this many times the student's length (its tokens are shorter)."""
TEMPERATURE, ALPHA_KD = 1.0, 0.9
"""The default demo's choice on validation for every method below (`hparams_domains.json`); `--alpha_kd` sets it."""
BASE_METHODS: dict[str, dict[str, Any]] = {
    "posterior": {"teacher_weighting": "posterior", "posterior_decay": 0.5},
    "posterior + prompt evidence": {"teacher_weighting": "posterior", "posterior_decay": 0.5, "prompt_evidence": True},
    "routing by hand": {"teacher_weighting": "static"},
}
"""The KL methods, each run on every target of `TARGETS`."""
TARGETS: dict[str, dict[str, Any]] = {
    "": {},
    ", no chains": {"cross_tokenizer_chains": False},
    ", chains + prefix map": {"cross_tokenizer_prefix_mass": True},
    ", prefix map": {"cross_tokenizer_chains": False, "cross_tokenizer_prefix_mass": True},
}
"""
The targets across tokenizers, by the suffix of a method's name: the package's default (the chained probability of
the student's token, and of the map only exact twins), the map's exact twins alone, the chains with the teachers'
mass on tokens mapped by prefix kept, and the map with that mass alone (the package before the chains).
"""
METHODS: dict[str, dict[str, Any] | None] = {
    "no teacher (CE only)": None,
    **{f"{name}{suffix}": {**settings, **target} for suffix, target in TARGETS.items()
       for name, settings in BASE_METHODS.items()},
    "posterior + prompt evidence, ULD": {**BASE_METHODS["posterior + prompt evidence"], "cross_tokenizer_loss": "uld"},
}  # fmt: skip
"""Each method's distillation settings beside the temperature and the KD share (None: the student alone)."""
ROUTED = tuple(f"routing by hand{suffix}" for suffix in TARGETS)
"""The methods that read the rows' `teacher_ids` column (`routing_column`); the others train without it."""

TEACHER_METRICS = {
    "teacher_weight": "the teachers' weights",
    "teacher_aligned": "the share of positions at which each teacher is aligned with the student",
    "teacher_prefix_mapped_mass": "each teacher's probability mass moved to a student token that only begins its own",
    "teacher_chained_mass": "each teacher's probability of the student's whole next token, chained over its own "
    "tokens, moved onto that token",
    "teacher_nll": "each teacher's NLL of the student's next token, through its distribution mapped onto the "
    "student's vocabulary, where it is aligned",
}
"""What each run reports per validation domain and teacher (the trainer's evaluation metrics)."""


# ---- models and data ----


def cached_tokenizer(texts: list[str], algorithm: str, vocab_size: int, cache_dir: Path) -> PreTrainedTokenizerFast:
    """A tokenizer trained on `texts` (or loaded from `cache_dir`, keyed by the texts and settings)."""
    key = hashlib.sha256(f"{algorithm}-{vocab_size}-".encode() + "".join(texts).encode()).hexdigest()[:12]
    path = cache_dir / f"tokenizer-{algorithm}-{vocab_size}-{key}"
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer = train_tiny_tokenizer(texts, vocab_size=vocab_size, algorithm=algorithm)
    tokenizer.save_pretrained(path)
    return tokenizer


def specialist(
    domain: str, text: str, tokenizer: PreTrainedTokenizerBase, scale: Scale, cache_dir: Path
) -> PreTrainedModel:
    """The `domain` specialist on its own `tokenizer`, trained on `text` (or loaded from `cache_dir`)."""
    spec = TEACHERS["domains"][domain]
    block, batch = TEACHER_CONTEXT * scale.block_size, max(1, scale.batch_size // TEACHER_CONTEXT)
    fingerprint = {
        "version": __version__,
        "spec": spec,
        "scale": [scale.width, block, batch, scale.teacher_steps],
        "vocab": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:12],
        "text": hashlib.sha256(text.encode()).hexdigest()[:12],
    }
    path = cache_dir / f"cross-teacher-{domain}-{hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()[:12]}"
    if (path / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(path).eval()
    logger.warning("Training the %s teacher (%s) on its own tokenizer; cached in %s.", domain, spec[0], path)
    model_type, width_factor, layers = spec
    model = tiny_causal_lm(
        model_type, tokenizer, hidden_size=int(scale.width * width_factor), num_layers=layers, num_heads=4,
        max_positions=block, seed=0,
    )  # fmt: skip
    args = TrainingArguments(**training_settings(path / "trainer", scale.teacher_steps, batch, seed=0))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    Trainer(model=model, args=args, train_dataset=to_blocks(text, tokenizer, block), data_collator=collator).train()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.eval()


def prompt_rows(
    text: str, tokenizer: PreTrainedTokenizerBase, domain: str, block_size: int, limit: int | None = None
) -> Dataset:
    """Rows `{prompt, completion, domain, teacher_ids}` from `block_size`-token blocks of `text` (the student's)."""
    blocks = to_blocks(text, tokenizer, block_size, limit)["input_ids"]

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    return Dataset.from_dict(
        {
            "prompt": [decode(ids[:PROMPT_TOKENS]) for ids in blocks],
            "completion": [decode(ids[PROMPT_TOKENS:]) for ids in blocks],
            "domain": [domain] * len(blocks),
            "teacher_ids": [domain] * len(blocks),
        }
    )


# ---- training and evaluation ----


def student_examples(rows: Dataset, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, list[int]]]:
    """The rows as the student reads them (the trainer's rendering): `input_ids`, and `labels` on the completion."""
    renderer = ExampleRenderer("prompt_completion")
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in (renderer.encode(r, tokenizer) for r in rows)]


def completion_perplexity(model: nn.Module, rows: Dataset, tokenizer: PreTrainedTokenizerBase) -> float:
    """exp of the mean NLL of the completions' tokens of `rows`, as the student tokenizes and masks them."""
    examples, collate = student_examples(rows, tokenizer), CompletionCollator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), 16):
            batch = collate(examples[start : start + 16])
            labels = batch.pop("labels")[:, 1:]
            logits = model(**batch).logits[:, :-1].double()
            nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")
            total, count = total + float(nll), count + int((labels != -100).sum())
    return math.exp(total / count)


def train_student(
    method: str,
    seed: int,
    train: Dataset,
    validation: dict[str, Dataset],
    teachers: dict[str, PreTrainedModel],
    tokenizers: dict[str, PreTrainedTokenizerBase],
    tokenizer: PreTrainedTokenizerBase,
    scale: Scale,
    output_dir: Path,
    alpha_kd: float = ALPHA_KD,
) -> tuple[nn.Module, dict[str, Any]]:
    """
    A fresh student trained with `method`; it and what its run reports: its time and, per validation domain, the
    teachers' weights and how much of each teacher's distribution reached the student's vocabulary.
    """
    student = build_model(STUDENT, tokenizer, scale, seed=seed)
    common = training_settings(output_dir, scale.distill_steps, scale.batch_size, seed)
    settings = METHODS[method]
    start = time.perf_counter()
    if settings is None:
        rows = Dataset.from_list(student_examples(train, tokenizer))
        collator = CompletionCollator(tokenizer.pad_token_id)
        Trainer(model=student, args=TrainingArguments(**common), train_dataset=rows, data_collator=collator).train()
        return student, {"seconds": time.perf_counter() - start}
    names = list(teachers)
    args = MultiTeacherDistillationConfig(
        **common, **settings, temperature=TEMPERATURE, alpha_kd=alpha_kd, alpha_ce=round(1 - alpha_kd, 6),
        teacher_names=names,
        cross_tokenizer_max_length=scale.block_size + 8,
    )  # fmt: skip
    routed = method in ROUTED

    def unrouted(rows: Dataset) -> Dataset:
        return rows if routed else rows.remove_columns("teacher_ids")

    trainer = MultiTeacherDistillationTrainer(
        model=student,
        teachers=[copy.deepcopy(teachers[name]) for name in names],
        args=args,
        train_dataset=unrouted(train),
        processing_class=tokenizer,
        teacher_tokenizers=[tokenizers[name] for name in names],
    )
    trainer.train()
    seconds = time.perf_counter() - start
    report: dict[str, Any] = {"seconds": seconds}
    for domain, rows in validation.items():
        metrics = trainer.evaluate(unrouted(rows))
        for key in TEACHER_METRICS:
            if f"eval_{key}/{names[0]}" in metrics:  # the chained mass only with chains
                report.setdefault(key, {})[domain] = {name: metrics[f"eval_{key}/{name}"] for name in names}
    return student, report


# ---- the run ----


def run(args: argparse.Namespace) -> dict[str, Any]:
    scale = SCALES["full" if args.full else "quick" if args.quick else "default"]
    if args.steps is not None:
        scale = replace(
            scale, teacher_steps=args.steps, distill_steps=args.steps, eval_blocks=min(scale.eval_blocks, 8)
        )
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    domains = load_domains(Path(args.corpus_dir) if args.corpus_dir else None, cache_dir)
    if sorted(domains) != sorted(TOKENIZERS):
        raise ValueError(f"The corpus has the domains {sorted(domains)}; this demo needs {sorted(TOKENIZERS)}.")
    splits = {domain: split_works(documents) for domain, documents in domains.items()}
    tokenizer = cached_tokenizer([s["train"] for s in splits.values()], "bpe", scale.vocab_size, cache_dir)
    tokenizers = {
        domain: cached_tokenizer([splits[domain]["train"]], *TOKENIZERS[domain], cache_dir) for domain in TOKENIZERS
    }
    teachers = {
        domain: specialist(domain, splits[domain]["train"], tokenizers[domain], scale, cache_dir)
        for domain in TOKENIZERS
    }
    train = concatenate_datasets(
        [prompt_rows(s["train"], tokenizer, d, scale.block_size) for d, s in splits.items()]
    ).shuffle(seed=0)
    held = {
        split: {d: prompt_rows(s[split], tokenizer, d, scale.block_size, scale.eval_blocks) for d, s in splits.items()}
        for split in ("validation", "test")
    }
    results: dict[str, Any] = {
        "command": args.command,
        "scale": scale.name,
        "tokenizers": {
            "student": ["bpe", len(tokenizer)],
            **{d: [a, len(tokenizers[d])] for d, (a, _) in TOKENIZERS.items()},
        },
        "hparams": {"temperature": TEMPERATURE, "alpha_kd": args.alpha_kd},
        "methods": {},
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for method in args.methods or METHODS:
        runs = []
        for seed in scale.seeds:
            logger.warning("Training the student with %s (seed %d).", method, seed)
            student, report = train_student(
                method,
                seed,
                train,
                held["validation"],
                teachers,
                tokenizers,
                tokenizer,
                scale,
                output_dir / "runs",
                args.alpha_kd,
            )
            perplexity = {
                split: {d: completion_perplexity(student, rows, tokenizer) for d, rows in held[split].items()}
                for split in ("validation", "test")
            }
            for values in perplexity.values():
                values["overall"] = math.exp(statistics.fmean(math.log(p) for p in values.values()))
            runs.append({"seed": seed, **{f"{s}_perplexity": p for s, p in perplexity.items()}, **report})
        results["methods"][method] = runs
        write_report(results, output_dir)
    return results


def mean_over_seeds(runs: list[dict[str, Any]], *path: str) -> float:
    values = []
    for run_report in runs:
        value: Any = run_report
        for key in path:
            value = value[key]
        values.append(value)
    return statistics.fmean(values)


def paired_change(runs: list[dict[str, Any]], baseline: list[dict[str, Any]] | None) -> str:
    """The change in overall test perplexity over `baseline`'s runs of the same seeds: mean ± sd over seeds."""
    if baseline is None:
        return "-"
    theirs = {run["seed"]: run["test_perplexity"]["overall"] for run in baseline}
    changes = [100 * (r["test_perplexity"]["overall"] / theirs[r["seed"]] - 1) for r in runs if r["seed"] in theirs]
    summary = summarize(changes) if changes else None
    return "-" if summary is None else f"{summary['mean']:+.1f} % ± {summary['std']:.1f}"


def markdown(results: dict[str, Any]) -> str:
    """
    The report: validation and test perplexity (means over seeds, and the test change over CE alone and over the
    method's prefix-map row, the package before the chains, paired by seed), then per method and validation domain
    the teachers' weights,
    alignment, prefix-mapped and chained mass and NLL.
    """
    methods = results["methods"]
    domains = list(TOKENIZERS)
    baseline = methods.get("no teacher (CE only)")

    def overall(runs: list[dict[str, Any]], split: str) -> float:
        return mean_over_seeds(runs, f"{split}_perplexity", "overall")

    seeds = [r["seed"] for r in next(iter(methods.values()))]
    lines = [
        f"`{results['command']}` (scale {results['scale']}, seeds {seeds}, {results['hparams']}; tokenizers "
        f"{results['tokenizers']})",
        "",
        "The student's perplexity on the completions (mean over seeds; lower is better):",
        "",
        "| method | validation | test: " + " | ".join(domains)
        + " | test overall | vs CE only (paired) | vs prefix map (paired) | minutes per run |",
        "|---|---|" + "---|" * (len(domains) + 4),
    ]  # fmt: skip
    for method, runs in methods.items():
        cells = [f"{mean_over_seeds(runs, 'test_perplexity', d):.1f}" for d in domains]
        minutes = mean_over_seeds(runs, "seconds") / 60
        versus_ce = "-" if method == "no teacher (CE only)" else paired_change(runs, baseline)
        versus_prefix = paired_change(runs, methods.get(f"{method}, prefix map"))
        lines.append(
            f"| {method} | {overall(runs, 'validation'):.1f} | " + " | ".join(cells)
            + f" | {overall(runs, 'test'):.1f} | {versus_ce} | {versus_prefix} | {minutes:.1f} |"
        )  # fmt: skip
    for key, what in TEACHER_METRICS.items():
        lines += ["", f"On each domain's validation rows, {what} (mean over seeds):", ""]
        lines += ["| method | rows | " + " | ".join(domains) + " |", "|---|---|" + "---|" * len(domains)]
        for method, runs in methods.items():
            if key not in runs[0]:
                continue
            for rows in domains:
                cells = [f"{mean_over_seeds(runs, key, rows, teacher):.3f}" for teacher in domains]
                lines.append(f"| {method} | {rows} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], output_dir: Path) -> None:
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "results.md").write_text(markdown(results))


def build_parser(prog: str = "python -m hf_mtkd.demo.cross_tokenizer") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="Tiny models and few steps (a smoke run, one seed).")
    size.add_argument("--full", action="store_true", help="The full scale, three seeds.")
    parser.add_argument("--output_dir", required=True, help="Where results.json and results.md are written.")
    parser.add_argument("--cache_dir", default=None, help="Where the corpus, tokenizers and teachers are cached.")
    parser.add_argument("--corpus_dir", default=None, help="python/, prose/ and shakespeare/ with .txt files instead.")
    parser.add_argument("--steps", type=int, default=None, help="Training steps of every model (a smoke run's).")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=None, help="Run only these methods (default: all)."
    )
    parser.add_argument(
        "--alpha_kd", type=float, default=ALPHA_KD, help="The KD share of every distillation method's loss."
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m hf_mtkd.demo.cross_tokenizer") -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    args.command = " ".join([prog, *argv])
    results = run(args)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
