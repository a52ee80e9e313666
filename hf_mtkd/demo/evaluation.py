"""Held-out evaluation of a model per domain: perplexity, distillation loss and the teachers' weights."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from datasets import Dataset
from torch import nn

from ..losses import causal_lm_loss, compute_teacher_weights, multi_teacher_kd_loss


@torch.no_grad()
def evaluate_domains(
    model: nn.Module,
    datasets: Mapping[str, Dataset],
    reference_teachers: Sequence[nn.Module],
    *,
    weighted_teachers: Sequence[nn.Module] = (),
    weighting: Mapping[str, Any] | None = None,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    """
    Per domain (and `overall`, token-weighted): the model's `perplexity`; `kd_loss`, KL(p̄ ‖ q) at temperature 1
    against the uniform probability mixture of `reference_teachers` (the same target for every method); and, when
    `weighting` is given, the mean weight each of `weighted_teachers` gets under it (`weight/<index>`).
    """
    model.eval()
    totals: dict[str, dict[str, float]] = {}
    for domain, dataset in datasets.items():
        sums: dict[str, float] = {}
        for start in range(0, len(dataset), batch_size):
            input_ids = torch.tensor(dataset[start : start + batch_size]["input_ids"])
            labels = input_ids
            logits = model(input_ids=input_ids).logits
            teacher_logits = {id(t): t(input_ids=input_ids).logits for t in [*reference_teachers, *weighted_teachers]}
            reference = [teacher_logits[id(t)] for t in reference_teachers]
            count = float(input_ids.shape[0] * (input_ids.shape[1] - 1))
            batch = {
                "tokens": count,
                "ce": causal_lm_loss(logits, labels).item() * count,
                "kd_loss": multi_teacher_kd_loss(logits, reference, labels, weighting="static").item() * count,
            }
            if weighting is not None:
                own = [teacher_logits[id(t)] for t in weighted_teachers]
                weights = compute_teacher_weights(own, labels, **weighting)[:, :, :-1]
                for k, w in enumerate(weights.sum(dim=(1, 2)).tolist()):
                    batch[f"weight/{k}"] = w
            for key, value in batch.items():
                sums[key] = sums.get(key, 0.0) + value
        totals[domain] = sums
    totals["overall"] = {key: sum(t.get(key, 0.0) for t in totals.values()) for key in next(iter(totals.values()))}
    return {domain: _means(sums) for domain, sums in totals.items()}


def _means(sums: dict[str, float]) -> dict[str, float]:
    tokens = sums["tokens"]
    means = {key: value / tokens for key, value in sums.items() if key not in ("tokens", "ce")}
    means["perplexity"] = math.exp(sums["ce"] / tokens)
    return means
