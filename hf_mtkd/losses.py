r"""Loss functions of multi-teacher distillation, as pure functions of tensors.

Notation (causal LM, batch of B sequences of length T, vocabulary V, K teachers). Logits at position t predict the
token at t+1, so a position is *valid* when `labels[:, t+1] != -100`; N is the number of valid positions, or
`num_items_in_batch` when the Trainer passes it (gradient accumulation, several devices). All three losses average
over the same valid positions, which makes a sum over micro-batches equal the loss of the whole batch.

* tempered distributions $p_k = \mathrm{softmax}(z_k/\tau)$ for teacher k, $q = \mathrm{softmax}(z_s/\tau)$;
* entropy $H_k = -\sum_v p_k(v) \log p_k(v)$; weights $w_k$ from `hf_mtkd.weighting`;
* fusion `probability`: $\bar p = \sum_k w_k p_k$; `logit`: $\bar p = \mathrm{softmax}(\sum_k w_k z_k/\tau)$.

Everything is computed in float32 (or the input's wider dtype) and in log-space where it matters.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .dtypes import upcast
from .topk import SparseRows, TeacherLogits, TopKLogits, sparse_fused_kl, take_rows
from .weighting import (
    POSITION_LOCAL_WEIGHTINGS,
    TeacherSignals,
    WeightingParameters,
    check_teacher_prior,
    normalize_prior,
    weights_from_signals,
)

FUSIONS = ("probability", "logit")
CHUNK_ELEMENTS = 2**22
"""With `chunk_size=None`, positions are read `CHUNK_ELEMENTS // V` at a time: each `[chunk, V]` float32 tensor is
16 MiB, small enough to be reused from the allocator's cache instead of faulted in afresh, large enough that the
per-chunk overhead is negligible."""
FEATURE_LOSSES = ("mse", "cosine")


def shift_labels(labels: Tensor) -> Tensor:
    """`[B, T]` next-token targets: `labels[:, t+1]` at position t, -100 at the last position."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def next_token_mask(labels: Tensor) -> Tensor:
    """`[B, T]` bool, True at the valid positions t, those where `labels[:, t+1] != -100`."""
    return shift_labels(labels) != -100


def _normalizer(mask: Tensor, num_items_in_batch: Tensor | int | None) -> Tensor:
    """N: `num_items_in_batch`, else the number of valid positions in `mask`; at least 1, so empty batches give 0."""
    count = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=mask.device)
    return count.clamp(min=1)


@dataclass
class MultiTeacherKDOutput:
    """The distillation loss with what it was computed from, for logging and the feature loss."""

    loss: Tensor
    """Scalar $\\alpha_{kd} L_{kd} + \\alpha_{ce} L_{ce}$, the one differentiable output ($L_{kd}$ by default)."""
    loss_kd: Tensor
    """Scalar $L_{kd} = \\tau^2 \\cdot \\frac{1}{N} \\sum_{valid} \\mathrm{KL}(\\bar p \\| q)$, detached."""
    loss_ce: Tensor | None
    """Scalar $L_{ce}$, detached (None unless `alpha_ce` was given)."""
    weights: Tensor
    """`[K, B, T]` teacher weights (constants for the gradient)."""
    signals: TeacherSignals
    """The teachers' entropies and true-token log-probabilities `[K, N]` at the valid positions, and the mask."""
    teacher_mask: Tensor | None = None
    """`[K, B, T]` bool, where each teacher was available (None: everywhere); signals elsewhere are meaningless."""

    @property
    def mask(self) -> Tensor:
        """`[B, T]` bool, the valid positions."""
        return self.signals.mask


def _check_logits(student_logits: Tensor | None, teacher_logits: Sequence[TeacherLogits]) -> None:
    if len(teacher_logits) == 0:
        raise ValueError("No teacher logits were given: multi-teacher distillation needs at least one teacher.")
    reference = student_logits if student_logits is not None else teacher_logits[0]
    for k, logits in enumerate(teacher_logits):
        if logits.shape != reference.shape:
            raise ValueError(
                f"Teacher {k} logits have shape {tuple(logits.shape)} but the student's are "
                f"{tuple(reference.shape)}: every teacher must score the same [batch, length, vocab] positions "
                "with the student's vocabulary."
            )


def auto_chunk_size(vocab_size: int) -> int:
    """Positions per chunk when `chunk_size` is None: `CHUNK_ELEMENTS // vocab_size`, at least 1."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


@dataclass(frozen=True)
class _Chunk:
    """A run of flat positions (into B x T) that the loss reads at once, as views of the `[B, T, V]` tensors."""

    rows: slice
    """Positions `[start, stop)`: the first and last are valid, those between may not be (padding, row ends)."""
    valid: Tensor
    """`[stop - start]` bool, the valid positions of the run."""
    all_valid: bool

    @property
    def size(self) -> int:
        return self.rows.stop - self.rows.start

    def select(self, values: Tensor) -> Tensor:
        """`values[..., n]` at the valid positions only."""
        return values if self.all_valid else values[..., self.valid]


def _chunks(mask: Tensor, chunk_size: int | None, vocab_size: int) -> list[_Chunk]:
    """
    The valid positions of `mask` in runs of at most `chunk_size` consecutive flat positions (None:
    `auto_chunk_size(vocab_size)`), each starting and ending at a valid one, so that a chunk is a view, not a copy.
    """
    size = auto_chunk_size(vocab_size) if chunk_size is None else chunk_size
    flat = mask.flatten()
    positions = flat.nonzero().squeeze(1).tolist()
    chunks, i = [], 0
    while i < len(positions):
        start = positions[i]
        j = bisect.bisect_left(positions, start + size, lo=i)
        stop = positions[j - 1] + 1
        chunks.append(_Chunk(slice(start, stop), flat[start:stop], all_valid=j - i == stop - start))
        i = j
    return chunks


def _dense_rows(logits: TeacherLogits, rows: slice) -> Tensor:
    """A teacher's `[n, V]` logits (or log-probabilities, for the top-k form) at flat positions `rows` (a view)."""
    return logits.dense(rows) if isinstance(logits, TopKLogits) else upcast(take_rows(logits.detach(), rows))


def _all_sparse(teacher_logits: Sequence[TeacherLogits]) -> bool:
    """Whether every teacher is in top-k form, so the sparse path applies (mixed inputs are read densely)."""
    return all(isinstance(logits, TopKLogits) for logits in teacher_logits)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    r"""$\sum_v a_v b_v$ per row of two `[n, V]` tensors."""
    return (a * b).sum(dim=-1)


@dataclass
class _DenseTeacher:
    """One teacher at the n positions of a chunk: tempered log-probabilities (finite) and probabilities `[n, V]`."""

    log_probs: Tensor
    probs: Tensor


def _chunk_teachers(
    teacher_logits: Sequence[TeacherLogits], rows: slice, targets: Tensor, temperature: float
) -> tuple[list[_DenseTeacher] | list[SparseRows], Tensor, Tensor]:
    """
    The K teachers at the flat positions `rows`, read once: their rows (`_DenseTeacher`, or `SparseRows` when
    every teacher is cached), entropies `[K, n]` at `temperature` and log-probabilities `[K, n]` of `targets` `[n]`
    (valid token ids) at temperature 1 (`TeacherSignals`).
    """
    y = targets[:, None]
    if _all_sparse(teacher_logits):
        sparse = [logits.rows(rows) for logits in teacher_logits]
        entropy = torch.stack([r.entropy(temperature) for r in sparse])
        return sparse, entropy, torch.stack([r.at(y, 1.0)[:, 0] for r in sparse])
    dense, entropy, target_log_prob = [], [], []
    for logits in teacher_logits:
        raw = _dense_rows(logits, rows)
        if temperature != 1:
            target_log_prob.append(raw.gather(-1, y)[:, 0] - raw.logsumexp(dim=-1))
        log_probs = torch.log_softmax(raw if temperature == 1 else raw / temperature, dim=-1)
        del raw
        if temperature == 1:
            target_log_prob.append(log_probs.gather(-1, y)[:, 0])
        probs = log_probs.exp()
        log_probs.clamp_(min=torch.finfo(log_probs.dtype).min)  # 0 log 0 = 0 below
        entropy.append(-_rowdot(probs, log_probs))
        dense.append(_DenseTeacher(log_probs, probs))
    return dense, torch.stack(entropy), torch.stack(target_log_prob)


@dataclass
class _DenseTarget:
    """The fused target $\\bar p$ of a chunk, `[n, V]`."""

    probs: Tensor

    def subtract_from(self, grad: Tensor, scale: Tensor) -> None:
        """`grad -= scale * p̄` in place, with `scale` `[n, 1]`."""
        grad.addcmul_(self.probs, scale, value=-1)


def _dense_fused_kl(
    student_log_probs: Tensor, teachers: Sequence[_DenseTeacher], entropy: Tensor, weights: Tensor, fusion: str
) -> tuple[Tensor, _DenseTarget]:
    r"""
    $\mathrm{KL}(\bar p \| q) = \sum_v \bar p_v \log \bar p_v - \sum_v \bar p_v \log q_v$ per position `[n]`, and
    the target $\bar p$; the first sum is $-H$ with one teacher.
    """
    if len(teachers) == 1:
        target, neg_entropy = teachers[0].probs, -entropy[0]
    else:
        w = weights.to(student_log_probs.dtype)[:, :, None]
        if fusion == "probability":
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
        neg_entropy = _rowdot(target, log_target)
    return neg_entropy - _rowdot(target, student_log_probs), _DenseTarget(target)


def _teacher_statistics(
    teacher_logits: Sequence[TeacherLogits],
    labels: Tensor,
    *,
    temperature: float,
    position_ids: Tensor | None,
    chunk_size: int | None,
) -> TeacherSignals:
    """The teachers' `TeacherSignals` at the valid positions, read `chunk_size` positions at once."""
    targets = shift_labels(labels)
    mask = targets != -100
    flat_targets = targets.flatten().clamp(min=0)
    entropy, target_log_prob = [], []
    with torch.no_grad():
        for chunk in _chunks(mask, chunk_size, teacher_logits[0].shape[-1]):
            _, chunk_entropy, chunk_log_prob = _chunk_teachers(
                teacher_logits, chunk.rows, flat_targets[chunk.rows], temperature
            )
            entropy.append(chunk.select(chunk_entropy))
            target_log_prob.append(chunk.select(chunk_log_prob))
    return _signals(entropy, target_log_prob, mask, position_ids, len(teacher_logits))


def teacher_signals(
    teacher_logits: Sequence[TeacherLogits],
    labels: Tensor,
    *,
    temperature: float = 1.0,
    position_ids: Tensor | None = None,
    chunk_size: int | None = None,
) -> TeacherSignals:
    """
    What the weightings read (`hf_mtkd.weighting.TeacherSignals`): each teacher's entropy at `temperature` and
    log-probability of the true next token at the valid positions of `labels`, e.g. to inspect score scales.
    """
    _check_logits(None, teacher_logits)
    return _teacher_statistics(
        teacher_logits, labels, temperature=temperature, position_ids=position_ids, chunk_size=chunk_size
    )


def _signals(
    entropy: list[Tensor], target_log_prob: list[Tensor], mask: Tensor, position_ids: Tensor | None, k: int
) -> TeacherSignals:
    empty = torch.zeros(k, 0, device=mask.device)
    return TeacherSignals(
        entropy=torch.cat(entropy, dim=1) if entropy else empty,
        target_log_prob=torch.cat(target_log_prob, dim=1) if target_log_prob else empty,
        mask=mask,
        segment_starts=None if position_ids is None else position_ids == 0,
    )


@dataclass(frozen=True)
class _Weighting:
    """How the teachers are weighted: the arguments of `weights_from_signals` besides the signals."""

    weighting: str
    prior: Tensor
    params: WeightingParameters
    granularity: str
    min_weight: float

    @property
    def local(self) -> bool:
        """Whether a position's weights depend only on that position's signals (so they can be made per chunk)."""
        return self.granularity == "token" and self.weighting in POSITION_LOCAL_WEIGHTINGS

    def __call__(
        self, signals: TeacherSignals, teacher_mask: Tensor | None, teacher_prior: Tensor | None = None
    ) -> Tensor:
        return weights_from_signals(
            signals,
            weighting=self.weighting,
            prior=self.prior,
            params=self.params,
            granularity=self.granularity,
            min_weight=self.min_weight,
            teacher_mask=teacher_mask,
            teacher_prior=teacher_prior,
        )

    def chunk(
        self, entropy: Tensor, target_log_prob: Tensor, teacher_mask: Tensor | None, teacher_prior: Tensor | None
    ) -> Tensor:
        """
        Weights `[K, n]` of n positions from their own signals (only when `local`), with `teacher_mask` `[K, n]`
        and `teacher_prior` `[n, K]` (each position's row prior) at those positions: each position is a row.
        """
        everywhere = torch.ones(entropy.shape[1], 1, dtype=torch.bool, device=entropy.device)
        signals = TeacherSignals(entropy, target_log_prob, everywhere)
        return self(signals, None if teacher_mask is None else teacher_mask[:, :, None], teacher_prior)[:, :, 0]


class _Distillation(torch.autograd.Function):
    r"""
    $\alpha_{kd} \tau^2 \frac{1}{N} \sum \mathrm{KL}(\bar p \| \mathrm{softmax}(z_s/\tau)) + \alpha_{ce}
    \frac{1}{N} \sum -\log \mathrm{softmax}(z_s)_y$ over the valid positions, in one pass over chunks of positions.

    Each chunk reads every teacher once: its statistics, its weights (when they depend on the position alone; else
    `weights` are given), the fused target, the KL, the cross-entropy and the gradient,
    $\frac{1}{N}(\alpha_{kd} \tau (q_\tau - \bar p) + \alpha_{ce} (q_1 - e_y))$, written into one `[B, T, V]`
    buffer during the forward. No `[N, V]` intermediate outlives its chunk, and the student's log-softmax serves
    both terms when τ = 1. When every teacher is in top-k form, `hf_mtkd.topk.sparse_fused_kl` replaces the dense
    fusion.

    Returns the loss and, as constants, $L_{kd}$, $L_{ce}$ (0 without `alpha_ce`), and the teachers' entropies and
    target log-probabilities `[K, N]`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        student_logits: Tensor,
        labels: Tensor,
        normalizer: Tensor,
        weights: Tensor | None,
        weigh: _Weighting,
        teacher_mask: Tensor | None,
        teacher_prior: Tensor | None,
        options: tuple[float, str, float, float | None, int | None],
        *teacher_logits: TeacherLogits,
    ) -> tuple[Tensor, ...]:
        temperature, fusion, alpha_kd, alpha_ce, chunk_size = options
        targets = shift_labels(labels)
        mask = targets != -100
        flat_targets = targets.flatten().clamp(min=0)
        need_grad = ctx.needs_input_grad[0] and (alpha_kd != 0 or bool(alpha_ce))
        chunks = _chunks(mask, chunk_size, student_logits.shape[-1])
        grad = student_logits.new_empty(student_logits.shape) if need_grad else None
        flat_student = student_logits.view(-1, student_logits.shape[-1])
        flat_grad = None if grad is None else grad.view(-1, grad.shape[-1])
        if need_grad:  # positions outside every chunk get no gradient
            edges = [0, *(edge for chunk in chunks for edge in (chunk.rows.start, chunk.rows.stop)), len(flat_grad)]
            for start, stop in zip(edges[::2], edges[1::2], strict=True):
                flat_grad[start:stop] = 0
        flat_mask = None if teacher_mask is None else teacher_mask.flatten(1)
        flat_weights = None if weights is None else weights.flatten(1)
        flat_prior = None if teacher_prior is None else teacher_prior.repeat_interleave(labels.shape[1], dim=0)
        kl_total = ce_total = upcast(student_logits.new_zeros(()))
        normalizer = normalizer.to(kl_total.dtype)
        kd_scale = alpha_kd * temperature / normalizer
        ce_scale = (alpha_ce or 0.0) / normalizer
        entropy, target_log_prob = [], []
        for chunk in chunks:
            rows, valid = chunk.rows, chunk.valid
            y = flat_targets[rows]
            teachers, chunk_entropy, chunk_log_prob = _chunk_teachers(teacher_logits, rows, y, temperature)
            entropy.append(chunk.select(chunk_entropy))
            target_log_prob.append(chunk.select(chunk_log_prob))
            available = None if flat_mask is None else flat_mask[:, rows]
            if flat_weights is None:
                prior = None if flat_prior is None else flat_prior[rows]
                chunk_weights = weigh.chunk(chunk_entropy, chunk_log_prob, available, prior)
            else:
                chunk_weights = flat_weights[:, rows]
            # the KD term counts at valid positions where some teacher has weight
            counted = valid if available is None else valid & (chunk_weights > 0).any(dim=0)

            logits = upcast(flat_student[rows])
            ce_log_probs = torch.log_softmax(logits, dim=-1) if alpha_ce is not None and temperature != 1 else None
            student = torch.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)
            del logits
            if alpha_ce is not None:
                ce_log_probs = student if ce_log_probs is None else ce_log_probs
                ce_total = ce_total - chunk.select(ce_log_probs.gather(-1, y[:, None])[:, 0]).sum()
            if isinstance(teachers[0], SparseRows):
                kl, target = sparse_fused_kl(student, teachers, chunk_weights, temperature, fusion)
            else:
                kl, target = _dense_fused_kl(student, teachers, chunk_entropy, chunk_weights, fusion)
            del teachers
            kl_total = kl_total + kl.where(counted, 0.0).sum()
            if need_grad:
                row_kd = (kd_scale * counted).to(student.dtype)[:, None]
                if alpha_ce is not None and temperature == 1:  # q_1 = q_τ: one exp for both terms
                    chunk_grad = student.exp_().mul_(row_kd + ce_scale)
                else:
                    chunk_grad = student.exp_().mul_(row_kd)
                    if ce_log_probs is not None:
                        chunk_grad.add_(ce_log_probs.exp_().mul_(ce_scale))
                target.subtract_from(chunk_grad, row_kd)
                if alpha_ce is not None:
                    ce_step = (-ce_scale).to(student.dtype).reshape(1, 1).expand(chunk.size, 1)
                    chunk_grad.scatter_add_(-1, y[:, None], ce_step)
                if not chunk.all_valid:  # padding and row ends inside the run get no gradient
                    chunk_grad.masked_fill_(~valid[:, None], 0)
                flat_grad[rows] = chunk_grad
        ctx.num_inputs = 8 + len(teacher_logits)
        ctx.save_for_backward(grad)
        loss_kd = temperature**2 * kl_total / normalizer
        loss_ce = ce_total / normalizer
        loss = alpha_kd * loss_kd + (alpha_ce or 0.0) * loss_ce
        signals = _signals(entropy, target_log_prob, mask, None, len(teacher_logits))
        outputs = (loss_kd, loss_ce, signals.entropy, signals.target_log_prob)
        ctx.mark_non_differentiable(*outputs)
        return (loss, *outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        if grad is not None and not bool(grad_loss == 1):
            grad = grad * grad_loss.to(grad.dtype)
        return (grad, *[None] * (ctx.num_inputs - 1))


def compute_teacher_weights(
    teacher_logits: Sequence[TeacherLogits],
    labels: Tensor,
    *,
    temperature: float = 1.0,
    weighting: str = "entropy",
    entropy_temperature: float = 1.0,
    teacher_weights: Sequence[float] | Tensor | None = None,
    granularity: str = "token",
    label_temperature: float = 1.0,
    posterior_decay: float = 0.9,
    min_weight: float = 0.0,
    position_ids: Tensor | None = None,
    chunk_size: int | None = None,
    teacher_mask: Tensor | None = None,
    teacher_prior: Tensor | None = None,
) -> Tensor:
    r"""
    Teacher weights `[K, B, T]`, $w_k(b, t) = \pi_k r_{b,k} e^{s_k} / \sum_j \pi_j r_{b,j} e^{s_j}$ (floored at
    `min_weight`).

    The score $s_k$ depends on `weighting` (see `hf_mtkd.weighting`): `static` 0; `entropy` $-H_k/\gamma_H$ with
    $H_k$ the entropy of $\mathrm{softmax}(z_k/\tau)$; `correctness` $\log p_k(y_{t+1})/\gamma$; `posterior`
    $\frac{1}{\gamma}\sum_{s \le t} \lambda^{t-s} \log p_k(y_{s+1})$; `entropy+posterior` the sum of the two;
    `likelihood` $\frac{1}{\gamma}\sum_{s \in D(t)} \log p_k(y_{s+1})$ over the whole document $D(t)$. Scores are
    pooled at `granularity`.

    Args:
        teacher_logits: K tensors `[B, T, V]` (unshifted, as returned by a causal LM), or `TopKLogits` (cached).
        labels: `[B, T]`, -100 where ignored.
        entropy_temperature: $\gamma_H$. label_temperature: $\gamma$. posterior_decay: $\lambda$.
        position_ids: `[B, T]` for packed sequences: `posterior` and `likelihood` restart where they are 0.
        chunk_size: positions processed at once, which bounds the extra memory (None: `auto_chunk_size(V)`).
        teacher_mask: `[K, B, T]` bool, where each teacher is available (None: everywhere). An unavailable
            teacher's weight is 0 and the others' are renormalised; where none is available all weights are 0.
        teacher_prior: `[B, K]` per-row prior $r$ over teachers (routing; each row is normalised; None: uniform). A
            one-hot row routes its sequence to one teacher, a uniform row changes nothing, and a teacher with
            $r_{b,k} = 0$ is unavailable in row b as with `teacher_mask`.
    """
    _check_logits(None, teacher_logits)
    if teacher_prior is not None:
        check_teacher_prior(teacher_prior, labels.shape[0], len(teacher_logits))
    weigh = _Weighting(
        weighting,
        normalize_prior(teacher_weights, len(teacher_logits), device=labels.device),
        WeightingParameters(entropy_temperature, label_temperature, posterior_decay),
        granularity,
        min_weight,
    )
    signals = _teacher_statistics(
        teacher_logits, labels, temperature=temperature, position_ids=position_ids, chunk_size=chunk_size
    )
    return weigh(signals, teacher_mask, teacher_prior)


def multi_teacher_kd(
    student_logits: Tensor,
    teacher_logits: Sequence[TeacherLogits],
    labels: Tensor,
    *,
    temperature: float = 1.0,
    weighting: str = "entropy",
    entropy_temperature: float = 1.0,
    teacher_weights: Sequence[float] | Tensor | None = None,
    fusion: str = "probability",
    granularity: str = "token",
    num_items_in_batch: Tensor | int | None = None,
    label_temperature: float = 1.0,
    posterior_decay: float = 0.9,
    min_weight: float = 0.0,
    position_ids: Tensor | None = None,
    chunk_size: int | None = None,
    teacher_mask: Tensor | None = None,
    teacher_prior: Tensor | None = None,
    alpha_kd: float = 1.0,
    alpha_ce: float | None = None,
) -> MultiTeacherKDOutput:
    r"""
    The distillation loss $\alpha_{kd} L_{kd} + \alpha_{ce} L_{ce}$ with its terms, weights and teacher signals;
    see `multi_teacher_kd_loss` for $L_{kd}$, `causal_lm_loss` for $L_{ce}$ and `compute_teacher_weights` for the
    weighting arguments.

    Both terms and the gradient come from one pass over chunks of positions, which reads each teacher once when
    the weights of a position depend on it alone (`granularity="token"` with `static`, `entropy` or
    `correctness`); otherwise a first pass computes the teachers' statistics. Without `alpha_ce`, $L_{ce}$ is
    neither computed nor part of the loss.
    """
    _check_logits(student_logits, teacher_logits)
    if fusion not in FUSIONS:
        raise ValueError(f"Unknown fusion {fusion!r}; choose one of {list(FUSIONS)}.")
    if teacher_prior is not None:
        check_teacher_prior(teacher_prior, labels.shape[0], len(teacher_logits))
    weigh = _Weighting(
        weighting,
        normalize_prior(teacher_weights, len(teacher_logits), device=labels.device),
        WeightingParameters(entropy_temperature, label_temperature, posterior_decay),
        granularity,
        min_weight,
    )
    mask = next_token_mask(labels)
    weights = None
    if not weigh.local:
        signals = _teacher_statistics(
            teacher_logits, labels, temperature=temperature, position_ids=position_ids, chunk_size=chunk_size
        )
        weights = weigh(signals, teacher_mask, teacher_prior)
    teachers = [logits.detach() for logits in teacher_logits]
    loss, loss_kd, loss_ce, entropy, target_log_prob = _Distillation.apply(
        student_logits,
        labels,
        _normalizer(mask, num_items_in_batch),
        weights,
        weigh,
        teacher_mask,
        teacher_prior,
        (temperature, fusion, alpha_kd, alpha_ce, chunk_size),
        *teachers,
    )
    if weights is None:
        signals = TeacherSignals(entropy, target_log_prob, mask, None if position_ids is None else position_ids == 0)
        weights = weigh(signals, teacher_mask, teacher_prior)
    return MultiTeacherKDOutput(
        loss=loss,
        loss_kd=loss_kd,
        loss_ce=None if alpha_ce is None else loss_ce,
        weights=weights,
        signals=signals,
        teacher_mask=teacher_mask,
    )


def multi_teacher_kd_loss(
    student_logits: Tensor,
    teacher_logits: Sequence[TeacherLogits],
    labels: Tensor,
    *,
    temperature: float = 1.0,
    weighting: str = "entropy",
    entropy_temperature: float = 1.0,
    teacher_weights: Sequence[float] | Tensor | None = None,
    fusion: str = "probability",
    granularity: str = "token",
    num_items_in_batch: Tensor | int | None = None,
    label_temperature: float = 1.0,
    posterior_decay: float = 0.9,
    min_weight: float = 0.0,
    position_ids: Tensor | None = None,
    chunk_size: int | None = None,
    teacher_mask: Tensor | None = None,
    teacher_prior: Tensor | None = None,
) -> Tensor:
    r"""
    $L_{kd} = \tau^2 \cdot \frac{1}{N} \sum_{(b,t)\ \mathrm{valid}} \mathrm{KL}(\bar p_{b,t} \,\|\, q_{b,t})$.

    $\bar p$ fuses the teachers' tempered distributions with weights `compute_teacher_weights(...)`
    (`fusion="probability"`: $\sum_k w_k p_k$; `"logit"`: $\mathrm{softmax}(\sum_k w_k z_k/\tau)$) and
    $q = \mathrm{softmax}(z_s/\tau)$. Gradients flow to the student only; an all-masked batch gives 0 (with a graph).

    Args:
        student_logits: `[B, T, V]`, unshifted.
        teacher_logits: K tensors `[B, T, V]` on the same vocabulary, or their cached `hf_mtkd.topk.TopKLogits`
            form (read as the top-k distribution with its tail mass spread uniformly).
        labels: `[B, T]`, -100 where ignored.
        num_items_in_batch: N, when the loss must be normalised over more than this batch.
        weighting, entropy_temperature, teacher_weights, granularity, label_temperature, posterior_decay,
            min_weight, position_ids: how teachers are weighted, see `compute_teacher_weights`.
        chunk_size: positions processed at once (None: `auto_chunk_size(V)`, about 16 MiB per `[chunk, V]` float32
            tensor). The result does not depend on it; the extra memory is O(chunk_size x V x K) instead of
            O(N x V x K), and the gradient is computed during the forward.
        teacher_mask: `[K, B, T]` bool, where each teacher is available (None: everywhere). At each position the
            fusion runs over the available teachers with renormalised weights; a position where none is available
            adds no KD term but still counts in N (so the loss stays a mean over the same positions as `L_ce`).
        teacher_prior: `[B, K]` per-row prior over teachers (routing, see `compute_teacher_weights`): with a one-hot
            row, that row's loss is the single-teacher loss of its teacher.
    """
    return multi_teacher_kd(
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        weighting=weighting,
        entropy_temperature=entropy_temperature,
        teacher_weights=teacher_weights,
        fusion=fusion,
        granularity=granularity,
        num_items_in_batch=num_items_in_batch,
        label_temperature=label_temperature,
        posterior_decay=posterior_decay,
        min_weight=min_weight,
        position_ids=position_ids,
        chunk_size=chunk_size,
        teacher_mask=teacher_mask,
        teacher_prior=teacher_prior,
    ).loss


def causal_lm_loss(student_logits: Tensor, labels: Tensor, num_items_in_batch: Tensor | int | None = None) -> Tensor:
    r"""$L_{ce} = -\frac{1}{N} \sum_{(b,t)\ \mathrm{valid}} \log \mathrm{softmax}(z_s)_{b,t}[y_{b,t+1}]$."""
    targets = shift_labels(labels)
    mask = targets != -100
    total = F.cross_entropy(upcast(student_logits.flatten(0, 1)), targets.flatten(), reduction="sum")
    return total / _normalizer(mask, num_items_in_batch)


def feature_alignment_loss(
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    pair_teachers: Sequence[int],
    weights: Tensor,
    *,
    kind: str = "mse",
    normalize_targets: bool = False,
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    r"""
    $L_{feat} = \frac{1}{N} \sum_{n\ \mathrm{valid}} \frac{\sum_{k \in A} w_k(n) \bar d_k(n)}{\sum_{k \in A} w_k(n)}$,
    $\bar d_k(n) = \frac{1}{|P_k|} \sum_{p \in P_k} d(\hat h_p(n), h_p(n))$.

    $P_k$ are teacher k's layer pairs, A the teachers with at least one pair, $\hat h_p$ the projected student
    hidden state and $h_p$ the teacher's; $d$ is `mse`, $\frac{1}{D}\|\hat h - h\|^2$, or `cosine`,
    $1 - \cos(\hat h, h)$. With `normalize_targets`, each teacher hidden state is first standardised over its
    hidden dimension, $h \leftarrow (h - \mathrm{mean}(h)) / \sqrt{\mathrm{var}(h) + 10^{-5}}$ (a LayerNorm without
    affine parameters), so teachers whose activations differ in scale by orders of magnitude count alike.

    Args:
        student_features: one `[N, D_p]` tensor per pair: projected student hidden states at the valid positions.
        teacher_features: one `[N, D_p]` tensor per pair: the teacher's hidden states at the same positions.
        pair_teachers: the teacher index of each pair.
        weights: `[K, N]` teacher weights at the valid positions.
    """
    if kind not in FEATURE_LOSSES:
        raise ValueError(f"Unknown feature loss {kind!r}; choose one of {list(FEATURE_LOSSES)}.")
    distances: list[list[Tensor]] = [[] for _ in range(weights.shape[0])]
    for student, teacher, k in zip(student_features, teacher_features, pair_teachers, strict=True):
        student, teacher = upcast(student), upcast(teacher.detach())
        if normalize_targets:
            teacher = F.layer_norm(teacher, teacher.shape[-1:])
        if kind == "mse":
            distances[k].append((student - teacher).pow(2).mean(dim=-1))
        else:
            distances[k].append(1 - F.cosine_similarity(student, teacher, dim=-1))
    aligned = [k for k, pairs in enumerate(distances) if pairs]
    if not aligned:
        raise ValueError("`feature_alignment_loss` got no layer pairs: give at least one (student, teacher) pair.")
    mean_distance = torch.stack([torch.stack(distances[k]).mean(dim=0) for k in aligned])
    w = weights[aligned].to(mean_distance.dtype)
    per_position = (w * mean_distance).sum(dim=0) / w.sum(dim=0).clamp(min=torch.finfo(w.dtype).tiny)
    valid = torch.ones(weights.shape[1], dtype=torch.bool, device=weights.device)
    return per_position.sum() / _normalizer(valid, num_items_in_batch)


def universal_logit_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Sequence[Tensor],
    labels: Tensor,
    weights: Tensor,
    *,
    temperature: float = 1.0,
    num_items_in_batch: Tensor | int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    r"""
    Weighted ULD loss (Universal Logit Distillation), which needs no shared vocabulary:
    $L_{uld} = \frac{1}{N} \sum_{(b,t)\ \mathrm{valid}} \sum_k w_k \sum_i |p^{\downarrow}_{k,i} - q^{\downarrow}_i|$.

    $p^{\downarrow}_k$ is teacher k's tempered distribution $\mathrm{softmax}(z_k/\tau)$ over its own vocabulary,
    sorted in decreasing order, $q^{\downarrow}$ the student's, and the shorter of the two is padded with zeros: the
    distance compares the shapes of the two distributions, rank by rank, not which tokens carry the mass. It is a
    weaker signal than a KL on a shared vocabulary and meant for teachers whose vocabularies barely overlap.

    Args:
        student_logits: `[B, T, V]`, unshifted.
        teacher_logits: K tensors `[B, T, V_k]` on each teacher's own vocabulary, already at the student's
            positions (see `hf_mtkd.cross_tokenizer`).
        labels: `[B, T]`, -100 where ignored.
        weights: `[K, B, T]` teacher weights; 0 where a teacher is unavailable.
        num_items_in_batch: N, when the loss must be normalised over more than this batch.
        chunk_size: positions sorted at once (None: `auto_chunk_size` of the largest vocabulary).
    """
    if len(teacher_logits) != weights.shape[0]:
        raise ValueError(f"{len(teacher_logits)} teacher logits but weights for {weights.shape[0]} teachers.")
    mask = next_token_mask(labels)
    total = upcast(student_logits.new_zeros(()))
    flat_weights = weights.flatten(1)
    vocab_size = max(student_logits.shape[-1], *(logits.shape[-1] for logits in teacher_logits))
    for chunk in _chunks(mask, chunk_size, vocab_size):
        student = torch.softmax(upcast(take_rows(student_logits, chunk.rows)) / temperature, dim=-1).sort(
            dim=-1, descending=True
        )
        for k, logits in enumerate(teacher_logits):
            teacher = torch.softmax(_dense_rows(logits, chunk.rows) / temperature, dim=-1)
            teacher = teacher.sort(dim=-1, descending=True).values
            width = max(teacher.shape[-1], student.values.shape[-1])
            distance = (
                (
                    F.pad(teacher, (0, width - teacher.shape[-1]))
                    - F.pad(student.values, (0, width - student.values.shape[-1]))
                )
                .abs()
                .sum(dim=-1)
            )
            total = total + chunk.select(flat_weights[k, chunk.rows].to(distance.dtype) * distance).sum()
    return total / _normalizer(mask, num_items_in_batch)
