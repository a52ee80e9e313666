r"""Teacher weighting: how much each teacher counts at each position.

A weighting strategy is a pure function that maps teacher statistics at the valid positions to a log-score
per teacher and position. The scores are pooled at the requested granularity and combined with the static
prior $\pi$:

$$w_k = \frac{\pi_k \exp(s_k)}{\sum_j \pi_j \exp(s_j)}$$

Weights are always constants for the gradient (they are computed from detached teacher statistics).
Strategies are registered by name in `WEIGHTINGS`; adding one touches this module and the config's choices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

GRANULARITIES = ("token", "sequence", "batch")

WeightingFn = Callable[[Tensor, float], Tensor]


def static_scores(entropy: Tensor, entropy_temperature: float) -> Tensor:
    r"""Static weighting, $s_k = 0$, so $w_k = \pi_k$ everywhere."""
    return torch.zeros_like(entropy)


def entropy_scores(entropy: Tensor, entropy_temperature: float) -> Tensor:
    r"""Entropy weighting, $s_k = -H_k / \gamma$: a more certain teacher (lower entropy) gets more weight."""
    return -entropy / entropy_temperature


WEIGHTINGS: dict[str, WeightingFn] = {"static": static_scores, "entropy": entropy_scores}


def normalize_prior(teacher_weights: Sequence[float] | Tensor | None, num_teachers: int, device=None) -> Tensor:
    """The static prior $\\pi$ as a float64 tensor `[K]` summing to 1 (uniform when `teacher_weights` is None)."""
    if teacher_weights is None:
        return torch.full((num_teachers,), 1.0 / num_teachers, dtype=torch.float64, device=device)
    prior = torch.as_tensor(teacher_weights, dtype=torch.float64, device=device)
    if prior.shape != (num_teachers,):
        raise ValueError(f"`teacher_weights` has {prior.numel()} entries but there are {num_teachers} teachers.")
    if (prior < 0).any() or prior.sum() <= 0:
        raise ValueError(f"`teacher_weights` must be non-negative with a positive sum, got {prior.tolist()}.")
    return prior / prior.sum()


def weights_from_entropy(
    entropy: Tensor,
    mask: Tensor,
    *,
    weighting: str = "entropy",
    prior: Tensor,
    entropy_temperature: float = 1.0,
    granularity: str = "token",
) -> Tensor:
    r"""
    Teacher weights `[K, B, T]` from the teachers' tempered entropies at the valid positions.

    Args:
        entropy: `[K, N]`, entropy of each teacher at the N positions where `mask` is True (row-major order).
        mask: `[B, T]` bool, the valid positions.
        weighting: a key of `WEIGHTINGS`.
        prior: `[K]` static prior summing to 1 (see `normalize_prior`).
        entropy_temperature: $\gamma$.
        granularity: `token` uses each position's score; `sequence` the mean score over a sequence's valid
            positions; `batch` the mean over all valid positions.

    Positions outside `mask` get the prior (`token`) or their sequence's/batch's pooled weight; a sequence with no
    valid position gets the prior.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"Unknown teacher weighting {weighting!r}; choose one of {list(WEIGHTINGS)}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"Unknown weighting granularity {granularity!r}; choose one of {list(GRANULARITIES)}.")
    num_teachers = entropy.shape[0]
    batch_size, seq_len = mask.shape
    scores = WEIGHTINGS[weighting](entropy, entropy_temperature)
    if granularity == "token":
        pooled = scores.new_zeros(num_teachers, batch_size, seq_len)
        pooled[:, mask] = scores
    elif granularity == "sequence":
        rows = mask.nonzero()[:, 0]
        sums = scores.new_zeros(num_teachers, batch_size).index_add_(1, rows, scores)
        means = sums / mask.sum(dim=1).clamp(min=1)
        pooled = means[:, :, None].expand(num_teachers, batch_size, seq_len)
    else:
        means = scores.mean(dim=1) if scores.shape[1] > 0 else scores.new_zeros(num_teachers)
        pooled = means[:, None, None].expand(num_teachers, batch_size, seq_len)
    return torch.softmax(prior.to(scores.dtype).log()[:, None, None] + pooled, dim=0)
