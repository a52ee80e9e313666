"""Generation quality: models continue held-out prompts greedily; continuations are scored with BLEU and ROUGE-L.

Scores come from the `evaluate` metrics ("sacrebleu" and "rouge") when their code can be fetched from the Hub, and
otherwise from the packages those metrics wrap (`sacrebleu`, `rouge_score`), called the same way; the results say
which path ran (`metrics_backend`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from statistics import fmean
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase
from transformers.utils import logging

logger = logging.get_logger(__name__)

EVALUATE_BACKEND = "evaluate"
"""`metrics_backend` when the scores came from `evaluate.load("sacrebleu")` and `evaluate.load("rouge")`."""
PACKAGES_BACKEND = "sacrebleu+rouge_score"
"""`metrics_backend` when the scores came from the `sacrebleu` and `rouge_score` packages directly (offline)."""


def build_prompts(
    texts: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    prompt_length: int,
    max_new_tokens: int,
    max_samples: int | None = None,
) -> tuple[list[list[int]], list[str]]:
    """
    Split held-out texts into prompts and true continuations.

    Each text longer than `prompt_length` tokens gives a prompt (its first `prompt_length` token ids) and a reference
    (the next `max_new_tokens` tokens, decoded). Shorter texts are skipped; at most `max_samples` pairs are returned.
    """
    if prompt_length < 1 or max_new_tokens < 1:
        raise ValueError(
            f"`prompt_length` ({prompt_length}) and `max_new_tokens` ({max_new_tokens}) must both be >= 1."
        )
    prompts, references = [], []
    num_texts = 0
    for text in texts:
        if max_samples is not None and len(prompts) >= max_samples:
            break
        num_texts += 1
        ids = tokenizer(text)["input_ids"]
        reference = tokenizer.decode(ids[prompt_length : prompt_length + max_new_tokens], skip_special_tokens=True)
        if len(ids) > prompt_length and reference.strip():
            prompts.append(ids[:prompt_length])
            references.append(reference)
    if not prompts:
        raise ValueError(
            f"None of the {num_texts} held-out texts is longer than prompt_length={prompt_length} tokens, so there "
            "is nothing to continue. Lower the prompt length or evaluate on longer texts."
        )
    return prompts, references


@torch.no_grad()
def generate_continuations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    description: str = "Generating",
    disable_tqdm: bool = False,
) -> list[str]:
    """Greedy continuations (at most `max_new_tokens` new tokens, decoded) of equal-length prompts, in order."""
    if len({len(p) for p in prompts}) > 1:
        raise ValueError("All prompts must have the same number of tokens (so that no padding is needed).")
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    continuations = []
    try:
        starts = range(0, len(prompts), batch_size)
        for start in logging.tqdm(starts, desc=description, disable=disable_tqdm):
            input_ids = torch.tensor(prompts[start : start + batch_size], device=device)
            output = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=generation_config
            )
            continuations += tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return continuations


@functools.cache
def _hub_metrics() -> tuple[Any, Any] | None:
    """`evaluate`'s sacrebleu and rouge metrics, or None when offline or when they cannot be fetched."""
    import evaluate
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or evaluate.config.HF_EVALUATE_OFFLINE:
        logger.info("Offline: scoring generations with the sacrebleu and rouge_score packages directly.")
        return None
    try:
        return evaluate.load("sacrebleu"), evaluate.load("rouge")
    except Exception as err:  # no network, Hub unavailable, ...: the same packages give the same scores
        logger.warning(
            "Could not load the `evaluate` metrics sacrebleu and rouge (%s); scoring generations with the sacrebleu "
            "and rouge_score packages directly.",
            err,
        )
        return None


def score_continuations(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | str]:
    """
    Corpus BLEU (sacrebleu, 0-100, one reference per prediction) and mean ROUGE-L F1 (rouge_score, 0-1).

    Returns `{"bleu": ..., "rougeL": ..., "metrics_backend": "evaluate" | "sacrebleu+rouge_score"}`.
    """
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
    if not predictions:
        raise ValueError("There are no predictions to score.")
    predictions, references = list(predictions), list(references)
    metrics = _hub_metrics()
    if metrics is not None:
        bleu_metric, rouge_metric = metrics
        bleu = bleu_metric.compute(predictions=predictions, references=[[r] for r in references])["score"]
        rouge = rouge_metric.compute(
            predictions=predictions, references=references, rouge_types=["rougeL"], use_aggregator=False
        )["rougeL"]
        return {"bleu": float(bleu), "rougeL": fmean(rouge), "metrics_backend": EVALUATE_BACKEND}

    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(predictions, [references]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return {"bleu": float(bleu), "rougeL": fmean(rouge), "metrics_backend": PACKAGES_BACKEND}


def evaluate_generation(
    student: nn.Module,
    teachers: Mapping[str, nn.Module],
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    *,
    prompt_length: int = 32,
    max_new_tokens: int = 32,
    max_samples: int | None = 64,
    batch_size: int = 16,
    disable_tqdm: bool = False,
) -> dict[str, float | int | str]:
    """
    Student (and, for reference, each teacher) continue prompts cut from `texts`; continuations are scored against
    the true ones.

    Returns `bleu` and `rougeL` for the student, `teacher_bleu/<name>` and `teacher_rougeL/<name>` for each teacher,
    `samples` (the number of prompts), `prompt_length`, `max_new_tokens` and `metrics_backend`.
    """
    prompts, references = build_prompts(
        texts, tokenizer, prompt_length=prompt_length, max_new_tokens=max_new_tokens, max_samples=max_samples
    )
    results: dict[str, float | int | str] = {}
    for name, model in [(None, student), *teachers.items()]:
        predictions = generate_continuations(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            description=f"Generating ({name or 'student'})",
            disable_tqdm=disable_tqdm,
        )
        scores = score_continuations(predictions, references)
        results["metrics_backend"] = scores.pop("metrics_backend")
        results.update({metric if name is None else f"teacher_{metric}/{name}": v for metric, v in scores.items()})
    results.update(samples=len(prompts), prompt_length=prompt_length, max_new_tokens=max_new_tokens)
    return results
