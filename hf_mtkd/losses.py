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

import torch
import torch.nn.functional as F
from torch import Tensor

from .weighting import normalize_prior, weights_from_entropy

FUSIONS = ("probability", "logit")
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


def entropy_from_log_probs(log_probs: Tensor) -> Tensor:
    r"""$H = -\sum_v p(v) \log p(v)$ over the last dimension, with $0 \log 0 = 0$."""
    probs = log_probs.exp()
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def fuse_log_probs(teacher_log_probs: Sequence[Tensor], weights: Tensor, fusion: str = "probability") -> Tensor:
    r"""
    Log of the fused target $\log \bar p$, `[N, V]`, from teacher log-probabilities `K x [N, V]` and weights `[K, N]`.

    * `probability`: $\log \bar p = \mathrm{logsumexp}_k(\log w_k + \log p_k)$;
    * `logit`: $\log \bar p = \log\mathrm{softmax}(\sum_k w_k \log p_k)$, which equals
      $\log\mathrm{softmax}(\sum_k w_k z_k / \tau)$ because $\log p_k$ and $z_k/\tau$ differ by a constant per position
      and the weights sum to 1.
    """
    stacked = torch.stack(list(teacher_log_probs))
    weights = weights.to(stacked.dtype)[:, :, None]
    if fusion == "probability":
        return torch.logsumexp(stacked + weights.log(), dim=0)
    if fusion == "logit":
        return torch.log_softmax((weights * stacked).sum(dim=0), dim=-1)
    raise ValueError(f"Unknown fusion {fusion!r}; choose one of {list(FUSIONS)}.")


def kl_divergence(target_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    r"""$\mathrm{KL}(\bar p \,\|\, q) = \sum_v \bar p(v) (\log \bar p(v) - \log q(v))$ per row, with $0 \log 0 = 0$."""
    target = target_log_probs.exp()
    return (torch.special.xlogy(target, target) - target * student_log_probs).sum(dim=-1)


@dataclass
class MultiTeacherKDOutput:
    """The KD loss with what it was computed from, for logging and the feature loss."""

    loss: Tensor
    """Scalar $\\tau^2 \\cdot \\frac{1}{N} \\sum_{valid} \\mathrm{KL}(\\bar p \\| q)$."""
    weights: Tensor
    """`[K, B, T]` teacher weights (constants for the gradient)."""
    entropy: Tensor
    """`[K, N]` tempered teacher entropies at the valid positions."""
    mask: Tensor
    """`[B, T]` bool, the valid positions."""


def _check_logits(student_logits: Tensor | None, teacher_logits: Sequence[Tensor]) -> None:
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


def _teacher_statistics(
    teacher_logits: Sequence[Tensor],
    mask: Tensor,
    *,
    temperature: float,
    weighting: str,
    entropy_temperature: float,
    teacher_weights: Sequence[float] | Tensor | None,
    granularity: str,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Teacher log-probs `K x [N, V]` at the valid positions, their entropies `[K, N]` and weights `[K, B, T]`."""
    with torch.no_grad():
        log_probs = [tempered_log_probs(logits[mask].detach(), temperature) for logits in teacher_logits]
        entropy = torch.stack([entropy_from_log_probs(lp) for lp in log_probs])
        prior = normalize_prior(teacher_weights, len(teacher_logits), device=entropy.device)
        weights = weights_from_entropy(
            entropy,
            mask,
            weighting=weighting,
            prior=prior,
            entropy_temperature=entropy_temperature,
            granularity=granularity,
        )
    return log_probs, entropy, weights


def compute_teacher_weights(
    teacher_logits: Sequence[Tensor],
    labels: Tensor,
    *,
    temperature: float = 1.0,
    weighting: str = "entropy",
    entropy_temperature: float = 1.0,
    teacher_weights: Sequence[float] | Tensor | None = None,
    granularity: str = "token",
) -> Tensor:
    r"""
    Teacher weights `[K, B, T]`, $w_k = \pi_k e^{s_k} / \sum_j \pi_j e^{s_j}$ with $s_k = -H_k/\gamma$ (`entropy`)
    or $s_k = 0$ (`static`), $H_k$ the entropy of $\mathrm{softmax}(z_k/\tau)$ pooled at `granularity`.

    Args:
        teacher_logits: K tensors `[B, T, V]` (unshifted, as returned by a causal LM).
        labels: `[B, T]`, -100 where ignored.
    """
    _check_logits(None, teacher_logits)
    return _teacher_statistics(
        teacher_logits,
        next_token_mask(labels),
        temperature=temperature,
        weighting=weighting,
        entropy_temperature=entropy_temperature,
        teacher_weights=teacher_weights,
        granularity=granularity,
    )[2]


def multi_teacher_kd(
    student_logits: Tensor,
    teacher_logits: Sequence[Tensor],
    labels: Tensor,
    *,
    temperature: float = 1.0,
    weighting: str = "entropy",
    entropy_temperature: float = 1.0,
    teacher_weights: Sequence[float] | Tensor | None = None,
    fusion: str = "probability",
    granularity: str = "token",
    num_items_in_batch: Tensor | int | None = None,
) -> MultiTeacherKDOutput:
    r"""
    Multi-teacher KD loss with its weights and entropies; see `multi_teacher_kd_loss` for the formula.
    """
    _check_logits(student_logits, teacher_logits)
    mask = next_token_mask(labels)
    teacher_log_probs, entropy, weights = _teacher_statistics(
        teacher_logits,
        mask,
        temperature=temperature,
        weighting=weighting,
        entropy_temperature=entropy_temperature,
        teacher_weights=teacher_weights,
        granularity=granularity,
    )
    fused = fuse_log_probs(teacher_log_probs, weights[:, mask], fusion)
    student_log_probs = tempered_log_probs(student_logits[mask], temperature)
    kl = kl_divergence(fused, student_log_probs).sum()
    loss = temperature**2 * kl / _normalizer(mask, num_items_in_batch)
    return MultiTeacherKDOutput(loss=loss, weights=weights, entropy=entropy, mask=mask)


def multi_teacher_kd_loss(
    student_logits: Tensor,
    teacher_logits: Sequence[Tensor],
    labels: Tensor,
    *,
    temperature: float = 1.0,
    weighting: str = "entropy",
    entropy_temperature: float = 1.0,
    teacher_weights: Sequence[float] | Tensor | None = None,
    fusion: str = "probability",
    granularity: str = "token",
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    r"""
    $L_{kd} = \tau^2 \cdot \frac{1}{N} \sum_{(b,t)\ \mathrm{valid}} \mathrm{KL}(\bar p_{b,t} \,\|\, q_{b,t})$.

    $\bar p$ fuses the teachers' tempered distributions with weights `compute_teacher_weights(...)`
    (`fusion="probability"`: $\sum_k w_k p_k$; `"logit"`: $\mathrm{softmax}(\sum_k w_k z_k/\tau)$) and
    $q = \mathrm{softmax}(z_s/\tau)$. Gradients flow to the student only; an all-masked batch gives 0 (with a graph).

    Args:
        student_logits: `[B, T, V]`, unshifted.
        teacher_logits: K tensors `[B, T, V]` on the same vocabulary.
        labels: `[B, T]`, -100 where ignored.
        num_items_in_batch: N, when the loss must be normalised over more than this batch.
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
    ).loss


def causal_lm_loss(student_logits: Tensor, labels: Tensor, num_items_in_batch: Tensor | int | None = None) -> Tensor:
    r"""$L_{ce} = -\frac{1}{N} \sum_{(b,t)\ \mathrm{valid}} \log \mathrm{softmax}(z_s)_{b,t}[y_{b,t+1}]$."""
    targets = shift_labels(labels)
    mask = targets != -100
    total = F.cross_entropy(_upcast(student_logits[mask]), targets[mask], reduction="sum")
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
