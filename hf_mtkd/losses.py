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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .topk import TeacherLogits, TopKLogits, sparse_fused_kl, take_rows
from .weighting import TeacherSignals, WeightingParameters, normalize_prior, weights_from_signals

FUSIONS = ("probability", "logit")
DEFAULT_CHUNK_SIZE = 256
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


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def tempered_log_probs(logits: Tensor, temperature: float) -> Tensor:
    r"""$\log \mathrm{softmax}(z/\tau)$ over the last dimension, in float32 (float64 stays float64)."""
    return torch.log_softmax(_upcast(logits) / temperature, dim=-1)


def _finite(log_probs: Tensor) -> Tensor:
    r"""-inf raised to the dtype's lowest finite value, so that $0 \cdot \log 0$ multiplies out to 0, not NaN."""
    return log_probs.clamp(min=torch.finfo(log_probs.dtype).min)


def entropy_from_log_probs(log_probs: Tensor) -> Tensor:
    r"""$H = -\sum_v p(v) \log p(v)$ over the last dimension, with $0 \log 0 = 0$."""
    return -(log_probs.exp() * _finite(log_probs)).sum(dim=-1)


def fuse_log_probs(
    teacher_log_probs: Sequence[Tensor], weights: Tensor, fusion: str = "probability"
) -> tuple[Tensor, Tensor]:
    r"""
    The fused target as $(\log \bar p, \bar p)$, each `[N, V]`, from teacher log-probabilities `K x [N, V]` and
    weights `[K, N]`.

    * `probability`: $\bar p = \sum_k w_k p_k$ (summed as probabilities: a term below float range contributes
      nothing to the KL either);
    * `logit`: $\log \bar p = \log\mathrm{softmax}(\sum_k w_k \log p_k)$, which equals
      $\log\mathrm{softmax}(\sum_k w_k z_k / \tau)$ because $\log p_k$ and $z_k/\tau$ differ by a constant per position
      and the weights sum to 1.
    """
    weights = weights.to(teacher_log_probs[0].dtype)[:, :, None]
    if fusion == "probability":
        target = sum(w * log_probs.exp() for w, log_probs in zip(weights, teacher_log_probs, strict=True))
        return target.log(), target
    if fusion == "logit":
        log_target = torch.log_softmax(sum(w * lp for w, lp in zip(weights, teacher_log_probs, strict=True)), dim=-1)
        return log_target, log_target.exp()
    raise ValueError(f"Unknown fusion {fusion!r}; choose one of {list(FUSIONS)}.")


def kl_divergence(target_log_probs: Tensor, student_log_probs: Tensor, target: Tensor | None = None) -> Tensor:
    r"""
    $\mathrm{KL}(\bar p \,\|\, q) = \sum_v \bar p(v) (\log \bar p(v) - \log q(v))$ per row, with $0 \log 0 = 0$
    (`target`: $\bar p$ when the caller already has it).
    """
    target = target_log_probs.exp() if target is None else target
    return (target * (_finite(target_log_probs) - student_log_probs)).sum(dim=-1)


@dataclass
class MultiTeacherKDOutput:
    """The KD loss with what it was computed from, for logging and the feature loss."""

    loss: Tensor
    """Scalar $\\tau^2 \\cdot \\frac{1}{N} \\sum_{valid} \\mathrm{KL}(\\bar p \\| q)$."""
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


def _row_chunks(mask: Tensor, chunk_size: int | None) -> list[Tensor]:
    """Flat indices (into B x T) of the valid positions, in row-major order, in chunks of at most `chunk_size`."""
    index = mask.flatten().nonzero().squeeze(1)
    return list(index.split(max(index.numel() if chunk_size is None else chunk_size, 1)))


def _dense_rows(logits: TeacherLogits, index: Tensor) -> Tensor:
    """A teacher's `[n, V]` logits (or log-probabilities, for the top-k form) at flat positions `index`."""
    return logits.dense(index) if isinstance(logits, TopKLogits) else _upcast(take_rows(logits.detach(), index))


def _all_sparse(teacher_logits: Sequence[TeacherLogits]) -> bool:
    """Whether every teacher is in top-k form, so the sparse path applies (mixed inputs are read densely)."""
    return all(isinstance(logits, TopKLogits) for logits in teacher_logits)


def _teacher_statistics(
    teacher_logits: Sequence[TeacherLogits],
    labels: Tensor,
    *,
    temperature: float,
    position_ids: Tensor | None,
    weighting: str,
    teacher_weights: Sequence[float] | Tensor | None,
    params: WeightingParameters,
    granularity: str,
    min_weight: float,
    chunk_size: int | None,
    teacher_mask: Tensor | None = None,
) -> tuple[TeacherSignals, Tensor]:
    """The teachers' `TeacherSignals` at the valid positions and weights `[K, B, T]`, `chunk_size` rows at once."""
    targets = shift_labels(labels)
    mask = targets != -100
    num_teachers = len(teacher_logits)
    entropy, target_log_prob = [], []
    sparse = _all_sparse(teacher_logits)
    with torch.no_grad():
        for index in _row_chunks(mask, chunk_size):
            y = take_rows(targets, index)[:, None]
            if sparse:
                chunk = [logits.rows(index) for logits in teacher_logits]
                entropy.append(torch.stack([z.entropy(temperature) for z in chunk]))
                target_log_prob.append(torch.stack([z.at(y, 1.0)[:, 0] for z in chunk]))
                continue
            chunk = [_dense_rows(logits, index) for logits in teacher_logits]
            entropy.append(torch.stack([entropy_from_log_probs(tempered_log_probs(z, temperature)) for z in chunk]))
            target_log_prob.append(torch.stack([z.gather(-1, y)[:, 0] - z.logsumexp(dim=-1) for z in chunk]))
        empty = torch.zeros(num_teachers, 0, device=mask.device)
        signals = TeacherSignals(
            entropy=torch.cat(entropy, dim=1) if entropy else empty,
            target_log_prob=torch.cat(target_log_prob, dim=1) if target_log_prob else empty,
            mask=mask,
            segment_starts=None if position_ids is None else position_ids == 0,
        )
        weights = weights_from_signals(
            signals,
            weighting=weighting,
            prior=normalize_prior(teacher_weights, num_teachers, device=mask.device),
            params=params,
            granularity=granularity,
            min_weight=min_weight,
            teacher_mask=teacher_mask,
        )
    return signals, weights


class _FusedKLDivergence(torch.autograd.Function):
    r"""
    $\tau^2 \sum_{valid} \mathrm{KL}(\bar p \| \mathrm{softmax}(z_s/\tau))$, computed `chunk_size` positions at a time.

    The gradient, $\tau (q - \bar p)$ per valid position, is written chunk by chunk during the forward pass, so no
    `[N, V]` intermediate outlives its chunk: the extra memory is O(chunk_size x V x K), not O(N x V x K). When every
    teacher is in top-k form, `hf_mtkd.topk.sparse_fused_kl` computes the same without any `[chunk, V]` teacher
    tensor.
    """

    @staticmethod
    def forward(
        ctx: Any,
        student_logits: Tensor,
        weights: Tensor,
        temperature: float,
        fusion: str,
        mask: Tensor,
        chunk_size: int | None,
        *teacher_logits: TeacherLogits,
    ) -> Tensor:
        need_grad = ctx.needs_input_grad[0]
        sparse = _all_sparse(teacher_logits)
        grad = student_logits.new_zeros(student_logits.shape) if need_grad else None
        total = _upcast(student_logits.new_zeros(()))
        start = 0
        flat_grad = None if grad is None else grad.view(-1, grad.shape[-1])
        for index in _row_chunks(mask, chunk_size):
            chunk_weights = weights[:, start : start + index.numel()]
            start += index.numel()
            student = tempered_log_probs(take_rows(student_logits, index), temperature)
            if sparse:
                teachers = [logits.rows(index) for logits in teacher_logits]
                kl, chunk_grad = sparse_fused_kl(student, teachers, chunk_weights, temperature, fusion, need_grad)
                total = total + kl.sum()
                if need_grad:
                    flat_grad.index_copy_(0, index, chunk_grad.to(grad.dtype))
                continue
            teachers = [tempered_log_probs(_dense_rows(logits, index), temperature) for logits in teacher_logits]
            if len(teachers) == 1:
                fused, target = teachers[0], teachers[0].exp()
            else:
                fused, target = fuse_log_probs(teachers, chunk_weights, fusion)
            total = total + kl_divergence(fused, student, target).sum()
            if need_grad:
                flat_grad.index_copy_(0, index, (temperature * (student.exp() - target)).to(grad.dtype))
        ctx.num_teachers = len(teacher_logits)
        ctx.save_for_backward(grad)
        return temperature**2 * total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype), *[None] * (5 + ctx.num_teachers))


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
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    teacher_mask: Tensor | None = None,
) -> Tensor:
    r"""
    Teacher weights `[K, B, T]`, $w_k = \pi_k e^{s_k} / \sum_j \pi_j e^{s_j}$ (floored at `min_weight`).

    The score $s_k$ depends on `weighting` (see `hf_mtkd.weighting`): `static` 0; `entropy` $-H_k/\gamma_H$ with
    $H_k$ the entropy of $\mathrm{softmax}(z_k/\tau)$; `correctness` $\log p_k(y_{t+1})/\gamma$; `posterior`
    $\frac{1}{\gamma}\sum_{s \le t} \lambda^{t-s} \log p_k(y_{s+1})$; `entropy+posterior` the sum of the two. Scores
    are pooled at `granularity`.

    Args:
        teacher_logits: K tensors `[B, T, V]` (unshifted, as returned by a causal LM), or `TopKLogits` (cached).
        labels: `[B, T]`, -100 where ignored.
        entropy_temperature: $\gamma_H$. label_temperature: $\gamma$. posterior_decay: $\lambda$.
        position_ids: `[B, T]` for packed sequences: `posterior` restarts where they are 0.
        chunk_size: positions processed at once (None: all), which bounds the extra memory.
        teacher_mask: `[K, B, T]` bool, where each teacher is available (None: everywhere). An unavailable
            teacher's weight is 0 and the others' are renormalised; where none is available all weights are 0.
    """
    _check_logits(None, teacher_logits)
    return _teacher_statistics(
        teacher_logits,
        labels,
        temperature=temperature,
        position_ids=position_ids,
        weighting=weighting,
        teacher_weights=teacher_weights,
        params=WeightingParameters(entropy_temperature, label_temperature, posterior_decay),
        granularity=granularity,
        min_weight=min_weight,
        chunk_size=chunk_size,
        teacher_mask=teacher_mask,
    )[1]


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
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    teacher_mask: Tensor | None = None,
) -> MultiTeacherKDOutput:
    r"""
    Multi-teacher KD loss with its weights and teacher signals; see `multi_teacher_kd_loss` for the formula and
    `compute_teacher_weights` for the weighting arguments.
    """
    _check_logits(student_logits, teacher_logits)
    if fusion not in FUSIONS:
        raise ValueError(f"Unknown fusion {fusion!r}; choose one of {list(FUSIONS)}.")
    signals, weights = _teacher_statistics(
        teacher_logits,
        labels,
        temperature=temperature,
        position_ids=position_ids,
        weighting=weighting,
        teacher_weights=teacher_weights,
        params=WeightingParameters(entropy_temperature, label_temperature, posterior_decay),
        granularity=granularity,
        min_weight=min_weight,
        chunk_size=chunk_size,
        teacher_mask=teacher_mask,
    )
    mask = signals.mask
    # Positions where no teacher has weight (none available) get no KD term but still count in N.
    kd_mask = mask if teacher_mask is None else mask & (weights > 0).any(dim=0)
    teachers = [logits.detach() for logits in teacher_logits]
    kl = _FusedKLDivergence.apply(
        student_logits, weights[:, kd_mask], temperature, fusion, kd_mask, chunk_size, *teachers
    )
    return MultiTeacherKDOutput(
        loss=kl / _normalizer(mask, num_items_in_batch), weights=weights, signals=signals, teacher_mask=teacher_mask
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
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    teacher_mask: Tensor | None = None,
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
        chunk_size: positions processed at once (None: all). The result does not depend on it; the extra memory
            is O(chunk_size x V x K) instead of O(N x V x K), and the gradient is computed during the forward.
        teacher_mask: `[K, B, T]` bool, where each teacher is available (None: everywhere). At each position the
            fusion runs over the available teachers with renormalised weights; a position where none is available
            adds no KD term but still counts in N (so the loss stays a mean over the same positions as `L_ce`).
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
    ).loss


def causal_lm_loss(student_logits: Tensor, labels: Tensor, num_items_in_batch: Tensor | int | None = None) -> Tensor:
    r"""$L_{ce} = -\frac{1}{N} \sum_{(b,t)\ \mathrm{valid}} \log \mathrm{softmax}(z_s)_{b,t}[y_{b,t+1}]$."""
    targets = shift_labels(labels)
    mask = targets != -100
    index = mask.flatten().nonzero().squeeze(1)
    total = F.cross_entropy(_upcast(take_rows(student_logits, index)), take_rows(targets, index), reduction="sum")
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
        student, teacher = _upcast(student), _upcast(teacher.detach())
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
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
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
        chunk_size: positions sorted at once (None: all).
    """
    if len(teacher_logits) != weights.shape[0]:
        raise ValueError(f"{len(teacher_logits)} teacher logits but weights for {weights.shape[0]} teachers.")
    mask = next_token_mask(labels)
    total = _upcast(student_logits.new_zeros(()))
    flat_weights = weights.flatten(1)
    for index in _row_chunks(mask, chunk_size):
        student = torch.softmax(_upcast(take_rows(student_logits, index)) / temperature, dim=-1).sort(
            dim=-1, descending=True
        )
        for k, logits in enumerate(teacher_logits):
            teacher = torch.softmax(_dense_rows(logits, index) / temperature, dim=-1)
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
            total = total + (flat_weights[k, index].to(distance.dtype) * distance).sum()
    return total / _normalizer(mask, num_items_in_batch)
