r"""
Fusion: how the weighted teachers form one target distribution $\bar p$ at each position of a chunk.

* `probability`: $\bar p = \sum_k w_k p_k$, the mixture of the teachers' tempered distributions;
* `logit`: $\bar p = \mathrm{softmax}(\sum_k w_k \log p_k)$, i.e. $\mathrm{softmax}(\sum_k w_k z_k / \tau)$ (the
  weights sum to 1), the weighted geometric mean, renormalised.

Dense teachers (`hf_mtkd.storage.DenseRows`) give a dense target `[n, V]` (`fuse_dense`); teachers all in top-k form
(`hf_mtkd.storage.SparseRows`) a sparse one (`fuse_sparse`), without any `[n, V]` teacher tensor. Both targets
offer what the forward KL (`hf_mtkd.divergences`) and its gradient need: the probabilities, their $\sum \bar p \log
\bar p$, and `subtract_from(grad, scale)`; the other divergences read a dense target (`SparseTarget.dense`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .storage import DenseRows, SparseRows, rowdot

FUSIONS = ("probability", "logit")


@dataclass
class DenseTarget:
    """
    The fused target $\\bar p$ of a chunk `[n, V]`, its log `[n, V]` (finite: at least the dtype's lowest value) and
    $\\sum_v \\bar p_v \\log \\bar p_v$ `[n]` (its -entropy).
    """

    probs: Tensor
    log_probs: Tensor
    neg_entropy: Tensor

    def subtract_from(self, grad: Tensor, scale: Tensor) -> None:
        """`grad -= scale * p̄` in place, with `scale` `[n, 1]`."""
        grad.addcmul_(self.probs, scale, value=-1)


def fuse_dense(
    teachers: Sequence[DenseRows],
    entropy: Tensor,
    weights: Tensor,
    fusion: str,
    dtype: torch.dtype,
    *,
    exact_log: bool = False,
) -> DenseTarget:
    r"""
    The fused target of K dense teachers with weights `[K, n]` (in `dtype`, the student's): one teacher's own
    distribution, with $-H$ from its `entropy` `[K, n]`.

    The probability mixture's log is $\log \sum_k w_k p_k$; with `exact_log` it is taken in log space,
    $\mathrm{logsumexp}_k(\log w_k + \log p_k)$, which stays exact where every $p_k$ underflows (what the
    divergences that read $\log \bar p$ where $\bar p$ is tiny need, `hf_mtkd.divergences`).
    """
    if len(teachers) == 1:
        return DenseTarget(teachers[0].probs, teachers[0].log_probs, -entropy[0])
    w = weights.to(dtype)[:, :, None]
    if fusion == "probability" and exact_log:
        log_w = w.log()
        log_target = teachers[0].log_probs + log_w[0]
        for k in range(1, len(teachers)):
            log_target = torch.logaddexp(log_target, teachers[k].log_probs + log_w[k])
        log_target.clamp_(min=torch.finfo(log_target.dtype).min)
        target = log_target.exp()
    elif fusion == "probability":
        target = teachers[0].probs * w[0]
        for k in range(1, len(teachers)):
            target.addcmul_(teachers[k].probs, w[k])
        log_target = target.log().clamp_(min=torch.finfo(target.dtype).min)
    else:
        mixed = teachers[0].log_probs * w[0]
        for k in range(1, len(teachers)):
            mixed.addcmul_(teachers[k].log_probs, w[k])
        log_target = torch.log_softmax(mixed, dim=-1).clamp_(min=torch.finfo(mixed.dtype).min)
        target = log_target.exp()
    return DenseTarget(target, log_target, rowdot(target, log_target))


@dataclass(frozen=True)
class SparseTarget:
    r"""
    A fused target $\bar p$ `[n, V]` kept sparse: `probs` `[n, m]` (log: `log_probs`) at the sorted tokens `union`
    `[n, m]` (counted where `first`) and `c` `[n]` (log: `log_c`) at each of the `outside` `[n]` other tokens of the
    support.
    """

    union: Tensor
    first: Tensor
    log_probs: Tensor
    probs: Tensor
    log_c: Tensor
    c: Tensor
    outside: Tensor
    """M, the number of support tokens outside the union."""
    support: int
    """$V_0$: `c` is at the ids below $V_0$ only, the others have probability 0."""

    def subtract_from(self, grad: Tensor, scale: Tensor) -> None:
        """`grad -= scale * p̄` in place, for a dense `grad` `[n, V]` and `scale` `[n, 1]`."""
        grad[:, : self.support].sub_(scale * self.c[:, None])
        grad.scatter_add_(-1, self.union, (-scale * (self.probs - self.c[:, None])).masked_fill(~self.first, 0))

    def dense(self, width: int) -> DenseTarget:
        """The same target as a `DenseTarget` `[n, width]` (ids from `support` on: probability 0)."""
        lowest = torch.finfo(self.c.dtype).min
        log_probs = self.log_c[:, None].expand(-1, width).clone()
        log_probs[:, self.support :] = lowest
        log_probs.scatter_(-1, self.union, self.log_probs)  # repeated tokens carry the same value
        log_probs.clamp_(min=lowest)
        probs = log_probs.exp()
        return DenseTarget(probs, log_probs, rowdot(probs, log_probs))


def fuse_sparse(teachers: Sequence[SparseRows], weights: Tensor, temperature: float, fusion: str) -> SparseTarget:
    r"""
    The fused target of K teachers in sparse form with weights `[K, n]`, at `temperature`.

    Every teacher is flat outside its top-k, so $\bar p$ takes one value c on every token of the support $V_0$ (shared
    by the teachers) outside the union U of their top-k sets (M = $V_0$ - |U| tokens), and 0 from $V_0$ on. The cost
    is O(n K k log k), instead of O(n K V).
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
    probs = log_union.exp().masked_fill(~first, 0)
    return SparseTarget(union, first, log_union, probs, log_c, log_c.exp(), outside, support)


def _union(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise sorted tokens `[n, m]` and a mask `[n, m]` of each token's first occurrence (the union, once each)."""
    tokens = tokens.sort(dim=-1).values
    first = torch.ones_like(tokens, dtype=torch.bool)
    first[:, 1:] = tokens[:, 1:] != tokens[:, :-1]
    return tokens, first
