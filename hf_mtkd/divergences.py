r"""
Divergences between the fused teacher target $\bar p$ (`hf_mtkd.fusion`) and the student's tempered distribution
$q = \mathrm{softmax}(u)$, $u = z_s / \tau$, per position of a chunk: the value $D$ and its gradient $\partial D /
\partial u$ (the chunked driver, `hf_mtkd.chunked`, scales it by $\alpha_{kd} \tau / N$: $\partial u / \partial z_s =
1/\tau$ and the KD term is $\tau^2$ times the mean divergence).

* `forward_kl` (the default): $\mathrm{KL}(\bar p \| q) = \sum_v \bar p_v \log \bar p_v - \sum_v \bar p_v \log q_v$,
  gradient $q - \bar p$; it also reads a sparse target (top-k teachers) as it is;
* `reverse_kl`: $\mathrm{KL}(q \| \bar p) = \sum_v q_v (\log q_v - \log \bar p_v)$, mode-seeking;
* `jsd`, the generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024) with $m = \beta \bar p + (1 - \beta)
  q$: $\beta\, \mathrm{KL}(\bar p \| m) + (1 - \beta)\, \mathrm{KL}(q \| m)$; $\beta = 0.5$ is the JSD, and as in GKD
  and TRL, $\beta = 0$ is the forward and $\beta = 1$ the reverse KL themselves (the formula tends to 0 at both ends);
* `skew_kl`, the skew KL of DistiLLM (Ko et al., 2024): $\mathrm{KL}(\bar p \| \alpha \bar p + (1 - \alpha) q)$;
* `skew_reverse_kl`: $\mathrm{KL}(q \| (1 - \alpha) \bar p + \alpha q)$; $\alpha = 0$ gives the two KLs;
* `uld` (Universal Logit Distillation, for teachers on other vocabularies): $\sum_i |p^{\downarrow}_{k,i} -
  q^{\downarrow}_i|$ between the sorted distributions of each teacher and the student, weighted per teacher
  (`hf_mtkd.losses.universal_logit_distillation_loss`); it needs no shared vocabulary and no fused target.

**Gradients.** With $a = \partial D / \partial q$ (q taken as free), the softmax gives $\partial D / \partial u = q
\odot (a - \langle q, a \rangle)$. Writing $r = \log q - \log m$:
reverse KL, $a = \log q - \log \bar p$ (so $\langle q, a \rangle = D$);
generalized JSD, $a = (1 - \beta) r$ (the $\bar p$ terms cancel);
skew KL, $a = -(1 - \alpha) \bar p / m$;
skew reverse KL, $a = r - \alpha q / m$ (constants dropped: they cancel).

**Zeros of the target.** A token to which the target gives probability 0 (a teacher's padding rows, the ids beyond
a cached support) makes the reverse KL infinite wherever $q > 0$; its $\log \bar p$ is floored at `LOG_PROB_FLOOR`
instead, a large finite penalty that drives the student's mass there to 0. The mixtures $m$ of the other
divergences contain q and stay positive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .fusion import DenseTarget, SparseTarget
from .storage import rowdot

FUSED_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")
"""The divergences of the fused target (`divergence`)."""
DIVERGENCES = (*FUSED_DIVERGENCES, "uld")
"""Every KD divergence (`uld` is computed apart from the fused target, `hf_mtkd.losses`)."""
SKEWED = ("skew_kl", "skew_reverse_kl")
"""The divergences that read `skew_alpha`."""
DEFAULT_BETA = 0.5
"""GKD's default β of `jsd`."""
DEFAULT_SKEW_ALPHA = 0.1
"""DistiLLM's default α of the skew divergences."""
LOG_PROB_FLOOR = -1e4
r"""Lowest $\log \bar p$ the reverse-type divergences read (see module doc; $e^{-10^4}$ is 0 in any float)."""


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


class Divergence:
    """A divergence $D(\\bar p, q)$ per position and its gradient in the student's tempered logits u."""

    exact_log_target: ClassVar[bool] = True
    """Whether it reads $\\log \\bar p$ where $\\bar p$ may underflow (then fused in log space, `fuse_dense`)."""

    def __call__(
        self, log_q: Tensor, target: DenseTarget | SparseTarget, scale: Tensor | None, q_scale: Tensor | float = 0.0
    ) -> tuple[Tensor, Tensor | None]:
        """
        $D$ `[n]` from the student's tempered log-probabilities `log_q` `[n, V]`, and `scale` `[n, 1]` times
        $\\partial D / \\partial u$ `[n, V]` plus `q_scale` times q (the cross-entropy's q term at τ = 1, so that one
        exp serves both; None when `scale` is None). `log_q` is left as it is.
        """
        if isinstance(target, SparseTarget):
            target = target.dense(log_q.shape[-1])
        q, log_p = log_q.exp(), target.log_probs.clamp(min=LOG_PROB_FLOOR)
        value, score = self.dense(log_q, q, target, log_p, scale is not None)
        if scale is None:
            return value, None
        score.sub_(rowdot(q, score)[:, None]).mul_(scale).add_(q_scale).mul_(q)
        return value, score

    def dense(
        self, log_q: Tensor, q: Tensor, target: DenseTarget, log_p: Tensor, with_score: bool
    ) -> tuple[Tensor, Tensor | None]:
        """
        $D$ `[n]` and (`with_score`) $a = \\partial D / \\partial q$ `[n, V]` up to a constant per row, from $\\log q$,
        q, the target and its floored log `log_p`.
        """
        raise NotImplementedError


class ForwardKL(Divergence):
    exact_log_target = False

    def __call__(
        self, log_q: Tensor, target: DenseTarget | SparseTarget, scale: Tensor | None, q_scale: Tensor | float = 0.0
    ) -> tuple[Tensor, Tensor | None]:
        value = forward_kl(log_q, target)
        if scale is None:
            return value, None
        grad = log_q.exp().mul_(scale + q_scale)  # q (scale + q_scale) - scale p̄
        target.subtract_from(grad, scale)
        return value, grad


class ReverseKL(Divergence):
    def dense(
        self, log_q: Tensor, q: Tensor, target: DenseTarget, log_p: Tensor, with_score: bool
    ) -> tuple[Tensor, Tensor | None]:
        score = log_q - log_p
        return rowdot(q, score), score


@dataclass(frozen=True)
class GeneralizedJSD(Divergence):
    beta: float

    def dense(
        self, log_q: Tensor, q: Tensor, target: DenseTarget, log_p: Tensor, with_score: bool
    ) -> tuple[Tensor, Tensor | None]:
        log_m = torch.logaddexp(log_p + _log(self.beta), log_q + _log(1 - self.beta))
        r = log_q - log_m
        value = self.beta * (target.neg_entropy - rowdot(target.probs, log_m)) + (1 - self.beta) * rowdot(q, r)
        return value, r.mul_(1 - self.beta) if with_score else None


@dataclass(frozen=True)
class SkewKL(Divergence):
    alpha: float

    def dense(
        self, log_q: Tensor, q: Tensor, target: DenseTarget, log_p: Tensor, with_score: bool
    ) -> tuple[Tensor, Tensor | None]:
        log_m = torch.logaddexp(log_p + _log(self.alpha), log_q + _log(1 - self.alpha))
        value = target.neg_entropy - rowdot(target.probs, log_m)
        return value, (log_p - log_m).exp_().mul_(self.alpha - 1) if with_score else None


@dataclass(frozen=True)
class SkewReverseKL(Divergence):
    alpha: float

    def dense(
        self, log_q: Tensor, q: Tensor, target: DenseTarget, log_p: Tensor, with_score: bool
    ) -> tuple[Tensor, Tensor | None]:
        log_m = torch.logaddexp(log_p + _log(1 - self.alpha), log_q + _log(self.alpha))
        r = log_q - log_m
        value = rowdot(q, r)
        if not with_score:
            return value, None
        return value, r.sub_(r.exp().mul_(self.alpha))


def divergence(name: str, *, beta: float = DEFAULT_BETA, skew_alpha: float = DEFAULT_SKEW_ALPHA) -> Divergence:
    """The `Divergence` named `name` (a key of `DIVERGENCES` but `uld`), with its β or α."""
    if name == "forward_kl" or (name == "jsd" and beta == 0) or (name == "skew_kl" and skew_alpha == 0):
        return ForwardKL()
    if name == "reverse_kl" or (name == "jsd" and beta == 1) or (name == "skew_reverse_kl" and skew_alpha == 0):
        return ReverseKL()
    if name == "jsd":
        return GeneralizedJSD(beta)
    if name == "skew_kl":
        return SkewKL(skew_alpha)
    if name == "skew_reverse_kl":
        return SkewReverseKL(skew_alpha)
    raise ValueError(f"{name!r} is not a divergence of the fused target; choose one of {list(FUSED_DIVERGENCES)}.")


def forward_kl(student_log_probs: Tensor, target: DenseTarget | SparseTarget) -> Tensor:
    r"""
    $\mathrm{KL}(\bar p \| q)$ `[n]` from the student's tempered log-probabilities $\log q$ `[n, V]`.

    For a sparse target (value c on the M support tokens outside the union U), the sum over those tokens is
    $M c \log c - c (\sum_{v < V_0} \log q_v - \sum_{v \in U} \log q_v)$, so no `[n, V]` target is formed.
    """
    if isinstance(target, DenseTarget):
        return target.neg_entropy - rowdot(target.probs, student_log_probs)
    student_union = student_log_probs.gather(-1, target.union)
    kl = (target.probs * (target.log_probs - student_union)).sum(dim=-1)
    student_outside = student_log_probs[:, : target.support].sum(dim=-1) - student_union.masked_fill(
        ~target.first, 0
    ).sum(dim=-1)
    return kl + target.outside * target.c * target.log_c - target.c * student_outside


def sorted_l1_distance(teacher_probs: Tensor, student_sorted: Tensor) -> Tensor:
    r"""
    $\sum_i |p^{\downarrow}_i - q^{\downarrow}_i|$ `[n]` between a teacher's probabilities `[n, V_k]` (sorted here)
    and the student's, already sorted in decreasing order `[n, V]`; the shorter one is padded with zeros.
    """
    teacher = teacher_probs.sort(dim=-1, descending=True).values
    width = max(teacher.shape[-1], student_sorted.shape[-1])
    return (
        (F.pad(teacher, (0, width - teacher.shape[-1])) - F.pad(student_sorted, (0, width - student_sorted.shape[-1])))
        .abs()
        .sum(dim=-1)
    )
