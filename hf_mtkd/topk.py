r"""
A teacher's next-token distribution kept sparse: its top-k log-probabilities and the log of the remaining mass.

For a position with teacher logits $z$ over V tokens, let $S$ be the k most likely tokens and
$m = \sum_{v \notin S} \mathrm{softmax}(z)_v$ the mass of the others (the *tail*). `TopKLogits` stores
$\log \mathrm{softmax}(z)_v$ for $v \in S$ and $\log m$, and stands for the distribution

$$\hat p(v) = \mathrm{softmax}(z)_v \ (v \in S), \qquad \hat p(v) = \frac{m}{V - k} \ (v \notin S),$$

i.e. the exact top-k with the tail mass spread uniformly over the other tokens. It sums to 1, keeps the tail mass
exactly, and equals the teacher's distribution when k = V. At a temperature τ the loss tempers $\log \hat p$ like
logits, $\hat p_\tau \propto \hat p^{1/\tau}$, so the tail behaves as V - k tokens of equal logit.

A `support` $V_0 < V$ (a student whose embedding has more, padding, rows than the cached vocabulary) gives the ids
from $V_0$ on probability 0 and spreads the tail over the $V_0 - k$ others instead: everything above holds with
$V_0$ in place of V, and the distribution is V wide.

The losses read teacher logits chunk by chunk of positions, so a `TopKLogits` can stand wherever a `[B, T, V]`
teacher logits tensor is accepted: when every teacher is in this form the loss works on the sparse rows
(`SparseRows`, `sparse_fused_kl`); beside dense teachers, each chunk is densified to `[n, V]` (`TopKLogits.dense`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .dtypes import compute_dtype

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
    """V, the width of the logits this stands for (the student's)."""
    support: int | None = None
    """$V_0$: ids from $V_0$ on have probability 0 (None: V); the tail is spread over $V_0 - k$ tokens."""

    def __post_init__(self) -> None:
        k = self.indices.shape[-1]
        if self.log_probs.shape != self.indices.shape or self.log_tail_mass.shape != self.indices.shape[:-1]:
            raise ValueError(
                f"Top-k shapes disagree: indices {tuple(self.indices.shape)}, log_probs "
                f"{tuple(self.log_probs.shape)}, log_tail_mass {tuple(self.log_tail_mass.shape)}; expected "
                "[B, T, k], [B, T, k] and [B, T]."
            )
        if not 0 < k <= self.support_size <= self.vocab_size:
            raise ValueError(
                f"k = {k} must be between 1 and the vocabulary size {self.support_size}, itself at most the width "
                f"{self.vocab_size}."
            )

    @property
    def support_size(self) -> int:
        """$V_0$, the number of leading ids that can have probability > 0."""
        return self.vocab_size if self.support is None else self.support

    @classmethod
    def from_logits(cls, logits: Tensor, k: int) -> TopKLogits:
        """The top-k form of `[..., V]` logits; the tail mass is computed from the tail's own logits (no 1 - sum)."""
        vocab_size = logits.shape[-1]
        if not 0 < k <= vocab_size:
            raise ValueError(f"k = {k} must be between 1 and the vocabulary size {vocab_size}.")
        log_probs = torch.log_softmax(logits.to(compute_dtype(logits)), dim=-1)
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

    def dense(self, index: slice | Tensor) -> Tensor:
        """Dense log-probabilities $\\log \\hat p$ `[n, V]` at flat positions `index` (into B x T), float32/64."""
        rows = self.rows(index)
        dense = rows.tail[:, None].expand(-1, self.vocab_size).clone()
        dense[:, self.support_size :] = -math.inf
        return dense.scatter_(-1, rows.indices, rows.log_probs)

    def detach(self) -> TopKLogits:
        """Itself: cached log-probabilities carry no graph."""
        return self

    def rows(self, index: slice | Tensor) -> SparseRows:
        """The flat positions `index` (into B x T) in sparse form, without any `[n, V]` tensor."""
        dtype = compute_dtype(self.log_probs)
        indices, order = take_rows(self.indices, index).long().sort(dim=-1)
        log_probs = take_rows(self.log_probs, index).to(dtype).gather(-1, order)
        tail = take_rows(self.log_tail_mass, index).to(dtype) - math.log(max(self.support_size - self.k, 1))
        return SparseRows(indices, log_probs, tail.clamp(min=TAIL_LOG_PROB_FLOOR), self.support_size)


@dataclass(frozen=True)
class SparseRows:
    r"""
    n positions of a `TopKLogits`: sorted token ids `[n, k]`, their log-probabilities $\log \hat p$ `[n, k]`, and
    the log-probability `tail` `[n]` of each of the other $V_0 - k$ tokens of the support: the rows
    `TopKLogits.dense` builds, kept sparse (ids from $V_0$ on have probability 0).
    """

    indices: Tensor
    log_probs: Tensor
    tail: Tensor
    support: int
    """$V_0$ (`TopKLogits.support_size`)."""

    @property
    def tail_size(self) -> int:
        return self.support - self.indices.shape[-1]

    def tempered(self, temperature: float) -> tuple[Tensor, Tensor]:
        r"""$\log \mathrm{softmax}(\log \hat p / \tau)$ at the top-k tokens `[n, k]` and at each tail token `[n]`."""
        top, tail = self.log_probs / temperature, self.tail / temperature
        tail_total = tail + (math.log(self.tail_size) if self.tail_size else -math.inf)
        log_z = torch.cat([top, tail_total[:, None]], dim=-1).logsumexp(dim=-1)
        return top - log_z[:, None], tail - log_z

    def entropy(self, temperature: float) -> Tensor:
        r"""$H = -\sum_{v \in S} p_v \log p_v - (V - k)\, p_{tail} \log p_{tail}$ of the tempered distribution."""
        top, tail = self.tempered(temperature)
        return -(top.exp() * top).sum(dim=-1) - self.tail_size * tail.exp() * tail

    def at(self, tokens: Tensor, temperature: float) -> Tensor:
        """Tempered log-probabilities `[n, m]` of the tokens `[n, m]`."""
        return self.lookup(tokens, *self.tempered(temperature))

    def lookup(self, tokens: Tensor, top: Tensor, tail: Tensor) -> Tensor:
        """`top[i, j]` where `tokens[i, m]` is the j-th top-k token, else `tail[i]`: values `[n, m]` at `tokens`."""
        position = torch.searchsorted(self.indices, tokens).clamp(max=self.indices.shape[-1] - 1)
        found = self.indices.gather(-1, position) == tokens
        return torch.where(found, top.gather(-1, position), tail[:, None])


@dataclass(frozen=True)
class SparseTarget:
    r"""
    A fused target $\bar p$ `[n, V]` kept sparse: `probs` `[n, m]` at the sorted tokens `union` `[n, m]` (counted
    where `first`) and `c` `[n]` at every other token.
    """

    union: Tensor
    first: Tensor
    probs: Tensor
    c: Tensor
    support: int
    """$V_0$: `c` is at the ids below $V_0$ only, the others have probability 0."""

    def subtract_from(self, grad: Tensor, scale: Tensor) -> None:
        """`grad -= scale * p̄` in place, for a dense `grad` `[n, V]` and `scale` `[n, 1]`."""
        grad[:, : self.support].sub_(scale * self.c[:, None])
        grad.scatter_add_(-1, self.union, (-scale * (self.probs - self.c[:, None])).masked_fill(~self.first, 0))


def sparse_fused_kl(
    student_log_probs: Tensor,
    teachers: Sequence[SparseRows],
    weights: Tensor,
    temperature: float,
    fusion: str,
) -> tuple[Tensor, SparseTarget]:
    r"""
    Per position, $\mathrm{KL}(\bar p \| q)$ `[n]` and the fused target $\bar p$ (sparse), for teachers in sparse
    form, without any `[n, V]` teacher tensor.

    Every teacher is flat outside its top-k, so the fused target $\bar p$ takes one value c on every token of the
    support $V_0$ (shared by the teachers) outside the union U of their top-k sets (M = $V_0$ - |U| tokens), 0 from
    $V_0$ on, and the KL splits into the sum over U and

    $$\sum_{v < V_0, v \notin U} c (\log c - \log q_v) = M c \log c - c \Big(\sum_{v < V_0} \log q_v
    - \sum_{v \in U} \log q_v\Big).$$

    The cost is O(n K k log k) for the teachers plus O(n V) for the student's side, instead of O(n K V).

    Args:
        student_log_probs: `[n, V]` tempered student log-probabilities $\log q$.
        teachers: K chunks of the same n positions.
        weights: `[K, n]` teacher weights.
    """
    union, first = _union(torch.cat([t.indices for t in teachers], dim=-1))
    tempered = [t.tempered(temperature) for t in teachers]
    at_union = torch.stack([t.lookup(union, *lp) for t, lp in zip(teachers, tempered, strict=True)])  # [K, n, m]
    at_tail = torch.stack([tail for _, tail in tempered])  # [K, n]
    weights = weights.to(at_union.dtype)
    support = teachers[0].support
    outside = (support - first.sum(dim=-1)).to(at_union.dtype)  # M
    if fusion == "probability":
        log_union = torch.logsumexp(weights.log()[..., None] + at_union, dim=0)
        log_c = torch.logsumexp(weights.log() + at_tail, dim=0)
    else:
        mixed_union, mixed_tail = (weights[..., None] * at_union).sum(dim=0), (weights * at_tail).sum(dim=0)
        log_outside = torch.where(outside > 0, mixed_tail + outside.clamp(min=1).log(), -math.inf)
        candidates = torch.cat([mixed_union.masked_fill(~first, -math.inf), log_outside[:, None]], dim=-1)
        log_z = candidates.logsumexp(dim=-1)
        log_union, log_c = mixed_union - log_z[:, None], mixed_tail - log_z
    student_union = student_log_probs.gather(-1, union)
    target_union = log_union.exp().masked_fill(~first, 0)
    c = log_c.exp()
    kl = (target_union * (log_union - student_union)).sum(dim=-1)
    student_outside = student_log_probs[:, :support].sum(dim=-1) - student_union.masked_fill(~first, 0).sum(dim=-1)
    kl = kl + outside * c * log_c - c * student_outside
    return kl, SparseTarget(union, first, target_union, c, support)


def _union(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise sorted tokens `[n, m]` and a mask `[n, m]` of each token's first occurrence (the union, once each)."""
    tokens = tokens.sort(dim=-1).values
    first = torch.ones_like(tokens, dtype=torch.bool)
    first[:, 1:] = tokens[:, 1:] != tokens[:, :-1]
    return tokens, first


def take_rows(tensor: Tensor, rows: slice | Tensor) -> Tensor:
    """`tensor.flatten(0, 1)[rows]` for a `[B, T, ...]` tensor: a view for a `slice` of flat positions."""
    return tensor.reshape(-1, *tensor.shape[2:])[rows]


TeacherLogits = Tensor | TopKLogits
"""What the losses accept for one teacher: `[B, T, V]` logits, or their top-k form."""
