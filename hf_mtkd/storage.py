r"""
Storage formats of a teacher's next-token distribution, and how the loss reads them chunk by chunk of positions.

* **dense**: `[B, T, V]` logits on the student's vocabulary, as a causal LM returns them (a live teacher on the
  student's tokenizer);
* **top-k** (`TopKLogProbs`, the teacher-logits cache): the k largest log-probabilities and the tail mass, below;
* **made on demand** (`RowsOnDemand`): logits that exist only a chunk of rows at a time, when the loss reads them:
  a cross-tokenizer teacher's distribution mapped onto the student's vocabulary, as the logits
  $\tau \log \tilde p$ at temperature τ, made from its own logits (or its hidden states and head) chunk by chunk
  (`hf_mtkd.cross_tokenizer.MappedLogits`).

**The top-k form.** For a position with teacher logits $z$ over V tokens, let $S$ be the k most likely tokens and
$m = \sum_{v \notin S} \mathrm{softmax}(z)_v$ the mass of the others (the *tail*). `TopKLogProbs` stores
$\log \mathrm{softmax}(z)_v$ for $v \in S$ and $\log m$, and stands for the distribution

$$\hat p(v) = \mathrm{softmax}(z)_v \ (v \in S), \qquad \hat p(v) = \frac{m}{V - k} \ (v \notin S),$$

i.e. the exact top-k with the tail mass spread uniformly over the other tokens. It sums to 1, keeps the tail mass
exactly, and equals the teacher's distribution when k = V. At a temperature τ the loss tempers $\log \hat p$ like
logits, $\hat p_\tau \propto \hat p^{1/\tau}$, so the tail behaves as V - k tokens of equal logit.

A `support` $V_0 < V$ (a student whose embedding has more, padding, rows than the cached vocabulary) gives the ids
from $V_0$ on probability 0 and spreads the tail over the $V_0 - k$ others instead: everything above holds with
$V_0$ in place of V, and the distribution is V wide.

The losses read teacher logits chunk by chunk of positions, so a `TopKLogProbs` can stand wherever a `[B, T, V]`
teacher logits tensor is accepted: when every teacher is in this form the loss works on the sparse rows
(`SparseRows`, fused in `hf_mtkd.fusion`); beside dense teachers, each chunk is densified to `[n, V]`
(`TopKLogProbs.dense`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .dtypes import compute_dtype, upcast

TAIL_LOG_PROB_FLOOR = -1e4
"""Lower bound of a tail token's log-probability, so an empty tail (m = 0) stays finite (e^-10000 is 0 anyway)."""


@dataclass(frozen=True)
class TopKLogProbs:
    """A teacher's `[B, T, V]` distribution stored as its top-k log-probabilities and tail mass (see module doc)."""

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
    def from_logits(cls, logits: Tensor, k: int) -> TopKLogProbs:
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

    def detach(self) -> TopKLogProbs:
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
    n positions of a `TopKLogProbs`: sorted token ids `[n, k]`, their log-probabilities $\log \hat p$ `[n, k]`, and
    the log-probability `tail` `[n]` of each of the other $V_0 - k$ tokens of the support: the rows
    `TopKLogProbs.dense` builds, kept sparse (ids from $V_0$ on have probability 0).
    """

    indices: Tensor
    log_probs: Tensor
    tail: Tensor
    support: int
    """$V_0$ (`TopKLogProbs.support_size`)."""

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


TopKLogits = TopKLogProbs
"""The former name of `TopKLogProbs` (it holds log-probabilities, not logits), kept for existing imports."""


class RowsOnDemand:
    """
    A teacher's logits on the student's vocabulary that are made a chunk of rows at a time when the loss reads them
    (`dense`), never held whole: `[B, T, V]`, or `[1, N, V]` at the N valid positions (`packed`, beside a logit-free
    student).
    """

    @property
    def shape(self) -> tuple[int, int, int]:
        """`(B, T, V)`, or `(1, N, V)` when `packed`."""
        raise NotImplementedError

    @property
    def packed(self) -> bool:
        """Whether its rows are the valid positions only."""
        raise NotImplementedError

    def dense(self, rows: slice) -> Tensor:
        """The logits `[n, V]` of the rows `rows` (flat positions, or valid positions when `packed`), float32/64."""
        raise NotImplementedError

    def detach(self) -> RowsOnDemand:
        """The same rows without a graph."""
        raise NotImplementedError

    def at_valid(self, mask: Tensor) -> RowsOnDemand:
        """The same logits at the valid positions `mask` `[B, T]` only (`packed`)."""
        raise NotImplementedError


TeacherLogits = Tensor | TopKLogProbs | RowsOnDemand
"""What the losses accept for one teacher: `[B, T, V]` logits, their top-k form, or logits made on demand."""


def take_rows(tensor: Tensor, rows: slice | Tensor) -> Tensor:
    """`tensor.flatten(0, 1)[rows]` for a `[B, T, ...]` tensor: a view for a `slice` of flat positions."""
    return tensor.reshape(-1, *tensor.shape[2:])[rows]


def dense_rows(logits: TeacherLogits, rows: slice) -> Tensor:
    """
    A teacher's `[n, V]` logits (or log-probabilities, for the top-k form) at flat positions `rows` (a view for a
    tensor); any other form gives them by its `dense(rows)` (`TopKLogProbs`, `hf_mtkd.logit_free.HeadLogits`).
    """
    return upcast(take_rows(logits.detach(), rows)) if isinstance(logits, Tensor) else logits.dense(rows)


def all_sparse(teacher_logits: Sequence[TeacherLogits]) -> bool:
    """Whether every teacher is in top-k form, so the sparse path applies (mixed inputs are read densely)."""
    return all(isinstance(logits, TopKLogProbs) for logits in teacher_logits)


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    r"""$\sum_v a_v b_v$ per row of two `[n, V]` tensors."""
    return (a * b).sum(dim=-1)


@dataclass
class DenseRows:
    """One teacher at the n positions of a chunk: tempered log-probabilities (finite) and probabilities `[n, V]`."""

    log_probs: Tensor
    probs: Tensor


def read_rows(
    teacher_logits: Sequence[TeacherLogits], rows: slice, targets: Tensor, temperature: float
) -> tuple[list[DenseRows] | list[SparseRows], Tensor, Tensor]:
    """
    The K teachers at the flat positions `rows`, read once: their rows (`DenseRows`, or `SparseRows` when
    every teacher is cached), entropies `[K, n]` at `temperature` and log-probabilities `[K, n]` of `targets` `[n]`
    (valid token ids) at temperature 1 (`TeacherSignals`).
    """
    y = targets[:, None]
    if all_sparse(teacher_logits):
        sparse = [logits.rows(rows) for logits in teacher_logits]
        entropy = torch.stack([r.entropy(temperature) for r in sparse])
        return sparse, entropy, torch.stack([r.at(y, 1.0)[:, 0] for r in sparse])
    dense, entropy, target_log_prob = [], [], []
    for logits in teacher_logits:
        raw = dense_rows(logits, rows)
        if temperature != 1:
            target_log_prob.append(raw.gather(-1, y)[:, 0] - raw.logsumexp(dim=-1))
        log_probs = torch.log_softmax(raw if temperature == 1 else raw / temperature, dim=-1)
        del raw
        if temperature == 1:
            target_log_prob.append(log_probs.gather(-1, y)[:, 0])
        probs = log_probs.exp()
        log_probs.clamp_(min=torch.finfo(log_probs.dtype).min)  # 0 log 0 = 0 below
        entropy.append(-rowdot(probs, log_probs))
        dense.append(DenseRows(log_probs, probs))
    return dense, torch.stack(entropy), torch.stack(target_log_prob)
