r"""
A teacher's next-token distribution kept sparse: its top-k log-probabilities and the log of the remaining mass.

For a position with teacher logits $z$ over V tokens, let $S$ be the k most likely tokens and
$m = \sum_{v \notin S} \mathrm{softmax}(z)_v$ the mass of the others (the *tail*). `TopKLogits` stores
$\log \mathrm{softmax}(z)_v$ for $v \in S$ and $\log m$, and stands for the distribution

$$\hat p(v) = \mathrm{softmax}(z)_v \ (v \in S), \qquad \hat p(v) = \frac{m}{V - k} \ (v \notin S),$$

i.e. the exact top-k with the tail mass spread uniformly over the other tokens. It sums to 1, keeps the tail mass
exactly, and equals the teacher's distribution when k = V. At a temperature τ the loss tempers $\log \hat p$ like
logits, $\hat p_\tau \propto \hat p^{1/\tau}$, so the tail behaves as V - k tokens of equal logit.

The losses read teacher logits only row by row (`logits[rows, cols]`), so a `TopKLogits` can stand wherever a
`[B, T, V]` teacher logits tensor is accepted: each chunk of rows is densified to `[n, V]` when the loss reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

TAIL_LOG_PROB_FLOOR = -1e4
"""Lower bound of a tail token's log-probability, so an empty tail (m = 0) stays finite (e^-10000 is 0 anyway)."""


@dataclass(frozen=True)
class TopKLogits:
    """A `[B, T, V]` teacher logits tensor stored as its top-k log-probabilities and tail mass (see module doc)."""

    indices: Tensor
    """`[B, T, k]` token ids of the k most likely tokens."""
    log_probs: Tensor
    """`[B, T, k]` their log-probabilities $\\log \\mathrm{softmax}(z)_v$ (at temperature 1)."""
    log_tail_mass: Tensor
    """`[B, T]` $\\log m$, the log of the probability of every other token together (-inf when k = V)."""
    vocab_size: int
    """V."""

    def __post_init__(self) -> None:
        k = self.indices.shape[-1]
        if self.log_probs.shape != self.indices.shape or self.log_tail_mass.shape != self.indices.shape[:-1]:
            raise ValueError(
                f"Top-k shapes disagree: indices {tuple(self.indices.shape)}, log_probs "
                f"{tuple(self.log_probs.shape)}, log_tail_mass {tuple(self.log_tail_mass.shape)}; expected "
                "[B, T, k], [B, T, k] and [B, T]."
            )
        if not 0 < k <= self.vocab_size:
            raise ValueError(f"k = {k} must be between 1 and the vocabulary size {self.vocab_size}.")

    @classmethod
    def from_logits(cls, logits: Tensor, k: int) -> TopKLogits:
        """The top-k form of `[..., V]` logits; the tail mass is computed from the tail's own logits (no 1 - sum)."""
        vocab_size = logits.shape[-1]
        if not 0 < k <= vocab_size:
            raise ValueError(f"k = {k} must be between 1 and the vocabulary size {vocab_size}.")
        log_probs = torch.log_softmax(logits.to(_compute_dtype(logits)), dim=-1)
        top, indices = log_probs.topk(k, dim=-1)
        tail = log_probs.scatter(-1, indices, -math.inf).logsumexp(dim=-1)
        return cls(indices=indices, log_probs=top, log_tail_mass=tail, vocab_size=vocab_size)

    @property
    def shape(self) -> tuple[int, int, int]:
        """`(B, T, V)`, the shape of the logits this stands for."""
        return (*self.indices.shape[:-1], self.vocab_size)

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def __getitem__(self, index: tuple[Tensor, Tensor]) -> Tensor:
        """Dense log-probabilities $\\log \\hat p$ `[n, V]` at positions `(rows, cols)`, float32 (or float64)."""
        rows, cols = index
        dtype = _compute_dtype(self.log_probs)
        tail = self.vocab_size - self.k
        fill = (self.log_tail_mass[rows, cols].to(dtype) - math.log(max(tail, 1))).clamp(min=TAIL_LOG_PROB_FLOOR)
        dense = fill[:, None].expand(-1, self.vocab_size).clone()
        return dense.scatter_(-1, self.indices[rows, cols].long(), self.log_probs[rows, cols].to(dtype))

    def detach(self) -> TopKLogits:
        """Itself: cached log-probabilities carry no graph."""
        return self


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    """float64 stays float64; anything else is read in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


TeacherLogits = Tensor | TopKLogits
"""What the losses accept for one teacher: `[B, T, V]` logits, or their top-k form."""
