r"""Loss functions of multi-teacher distillation, as pure functions of tensors.

Notation (causal LM, batch of B sequences of length T, vocabulary V, K teachers). Logits at position t predict the
token at t+1, so a position is *valid* when `labels[:, t+1] != -100`; N is the number of valid positions, or
`num_items_in_batch` when the Trainer passes it (gradient accumulation, several devices). All three losses average
over the same valid positions, which makes a sum over micro-batches equal the loss of the whole batch.

* tempered distributions $p_k = \mathrm{softmax}(z_k/\tau)$ for teacher k, $q = \mathrm{softmax}(z_s/\tau)$;
* entropy $H_k = -\sum_v p_k(v) \log p_k(v)$; weights $w_k$ from `hf_mtkd.weighting`;
* fusion `probability`: $\bar p = \sum_k w_k p_k$; `logit`: $\bar p = \mathrm{softmax}(\sum_k w_k z_k/\tau)$.

Everything is computed in float32 (or the input's wider dtype) and in log-space where it matters.

`DistillationLoss` (one `hf_mtkd.settings.DistillationSettings`) assembles the total
$\alpha_{ce} L_{ce} + \alpha_{kd} L_{kd} + \alpha_{feat} L_{feat}$; the pieces live in a module each: the storage
formats of teacher outputs (`hf_mtkd.storage`), fusion (`hf_mtkd.fusion`), divergences (`hf_mtkd.divergences`),
weightings (`hf_mtkd.weighting`) and the chunked pass with its gradient (`hf_mtkd.chunked`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .alignment import FEATURE_LOSSES
from .chunked import CHUNK_ELEMENTS as CHUNK_ELEMENTS
from .chunked import (
    ChunkedDistillation,
    ChunkWeights,
    DenseStudent,
    Layout,
    Weighting,
    chunks,
    next_token_mask,
    normalizer,
    shift_labels,
    teacher_statistics,
)
from .chunked import auto_chunk_size as auto_chunk_size
from .divergences import DEFAULT_BETA, DEFAULT_SKEW_ALPHA, sorted_l1_distance
from .dtypes import upcast
from .fusion import FUSIONS as FUSIONS
from .logit_free import HeadLogits, HiddenStudent, any_head_logits, at_valid_positions
from .prompt_evidence import PromptEvidence
from .settings import DistillationSettings
from .storage import TeacherLogits, dense_rows, take_rows
from .weighting import DEFAULT_WEIGHTING, TeacherSignals, check_teacher_prior


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


@dataclass
class DistillationOutput:
    """The training loss of a batch, its terms, and what the KD pass computed (for metrics)."""

    loss: Tensor
    """Scalar $\\alpha_{ce} L_{ce} + \\alpha_{kd} L_{kd} + \\alpha_{feat} L_{feat}$, differentiable."""
    terms: dict[str, Tensor | None]
    """`loss_ce`, `loss_kd` and, with feature alignment, `loss_feat`, each detached (`loss_ce` None without CE)."""
    kd: MultiTeacherKDOutput
    """The weights, the teachers' signals and the valid positions."""


FeatureBatch = tuple[Sequence[Tensor], Sequence[Tensor], Sequence[int]]
"""Projected student and teacher hidden states `[N, D_p]` per layer pair, and each pair's teacher index."""


class DistillationLoss:
    r"""
    The distillation loss of one `DistillationSettings` (built and checked once, e.g. by the trainer from its
    config): the one place where the total
    $L = \alpha_{ce} L_{ce} + \alpha_{kd} L_{kd} + \alpha_{feat} L_{feat}$ is assembled (`__call__`).

    $L_{kd}$ is a divergence of the fused target (`hf_mtkd.divergences`, the forward KL by default) or the weighted
    ULD distance on each teacher's own vocabulary (`"uld"`); $\alpha_{ce} L_{ce}$ comes out of the same chunked pass
    as the divergence, whose gradients share the student's softmax. The functions below (`multi_teacher_kd_loss`,
    `compute_teacher_weights`, ...) are thin wrappers that build the settings from their keywords.
    """

    def __init__(self, settings: DistillationSettings) -> None:
        self.settings = settings

    def __call__(
        self,
        student_logits: Tensor,
        teacher_logits: Sequence[TeacherLogits],
        labels: Tensor,
        *,
        own_logits: Sequence[Tensor] | None = None,
        features: Callable[[Tensor], FeatureBatch] | None = None,
        num_items_in_batch: Tensor | int | None = None,
        position_ids: Tensor | None = None,
        teacher_mask: Tensor | None = None,
        teacher_prior: Tensor | None = None,
        prompt: PromptEvidence | None = None,
    ) -> DistillationOutput:
        """
        The total loss of a batch.

        Args:
            student_logits, teacher_logits, labels: as for `multi_teacher_kd` (teachers on the student's vocabulary);
                logit-free, the student and teachers as `hf_mtkd.logit_free.HeadLogits` (hidden states at the valid
                positions and output heads; teachers may also be in top-k form).
            own_logits: for the `uld` divergence, each teacher's logits on its own vocabulary `[B, T, V_k]`.
            features: with `alpha_feat > 0`, called with the valid positions `[B, T]` after the KD pass; returns the
                hidden-state pairs of `feature_alignment_loss` at those positions.
            num_items_in_batch, position_ids, teacher_mask, teacher_prior, prompt: see `multi_teacher_kd`.
        """
        settings = self.settings
        uld = settings.divergence == "uld"
        if uld and isinstance(student_logits, HeadLogits):
            raise ValueError(
                "The `uld` divergence reads the student's [B, T, V] logits: it has no logit-free form (pass logits)."
            )
        kd = self._pass(
            student_logits,
            teacher_logits,
            labels,
            with_kd=not uld,
            num_items_in_batch=num_items_in_batch,
            position_ids=position_ids,
            teacher_mask=teacher_mask,
            teacher_prior=teacher_prior,
            prompt=prompt,
        )
        loss, loss_kd = kd.loss, kd.loss_kd  # alpha_ce L_ce (+ alpha_kd L_kd for the KL), from one pass
        if uld:
            if own_logits is None:
                raise ValueError(
                    "The `uld` divergence needs each teacher's logits on its own vocabulary (`own_logits`)."
                )
            loss_kd = universal_logit_distillation_loss(
                student_logits,
                own_logits,
                labels,
                kd.weights,
                temperature=settings.temperature,
                num_items_in_batch=num_items_in_batch,
                chunk_size=settings.chunk_size,
            )
            loss = loss + settings.alpha_kd * loss_kd
        terms = {"loss_ce": kd.loss_ce, "loss_kd": loss_kd}
        if settings.alpha_feat > 0:
            if features is None:
                raise ValueError("`alpha_feat > 0` needs the hidden states: pass `features`.")
            student_features, teacher_features, pair_teachers = features(kd.mask)
            loss_feat = feature_alignment_loss(
                student_features,
                teacher_features,
                pair_teachers,
                kd.weights[:, kd.mask],
                kind=settings.feature_loss,
                normalize_targets=settings.normalize_feature_targets,
                num_items_in_batch=num_items_in_batch,
            )
            loss = loss + settings.alpha_feat * loss_feat
            terms["loss_feat"] = loss_feat
        return DistillationOutput(loss, terms, kd)

    def weights(
        self,
        teacher_logits: Sequence[TeacherLogits],
        labels: Tensor,
        *,
        position_ids: Tensor | None = None,
        teacher_mask: Tensor | None = None,
        teacher_prior: Tensor | None = None,
        prompt: PromptEvidence | None = None,
    ) -> Tensor:
        """Teacher weights `[K, B, T]` (see `compute_teacher_weights`)."""
        packed = any_head_logits(teacher_logits)
        if packed:
            teacher_logits = [at_valid_positions(logits, next_token_mask(labels)) for logits in teacher_logits]
        _check_logits(None, teacher_logits)
        if teacher_prior is not None:
            check_teacher_prior(teacher_prior, labels.shape[0], len(teacher_logits))
        weigh = Weighting.of(self.settings, len(teacher_logits), labels.device)
        signals = teacher_statistics(
            teacher_logits,
            labels,
            temperature=self.settings.temperature,
            position_ids=position_ids,
            chunk_size=self.settings.chunk_size,
            packed=packed,
        )
        signals = replace(signals, document_score=self._document_score(prompt, signals.segment_starts))
        return weigh(signals, teacher_mask, teacher_prior)

    def _document_score(self, prompt: PromptEvidence | None, segment_starts: Tensor | None) -> Tensor | None:
        """The prompt's evidence per document (`TeacherSignals.document_score`), None without it."""
        if prompt is None:
            return None
        return prompt.document_scores(segment_starts, self.settings.prompt_temperature)

    def kd(
        self,
        student_logits: Tensor,
        teacher_logits: Sequence[TeacherLogits],
        labels: Tensor,
        *,
        num_items_in_batch: Tensor | int | None = None,
        position_ids: Tensor | None = None,
        teacher_mask: Tensor | None = None,
        teacher_prior: Tensor | None = None,
        prompt: PromptEvidence | None = None,
    ) -> MultiTeacherKDOutput:
        """$\\alpha_{kd} L_{kd} + \\alpha_{ce} L_{ce}$ with its terms, weights and signals (see `multi_teacher_kd`)."""
        return self._pass(
            student_logits,
            teacher_logits,
            labels,
            with_kd=True,
            num_items_in_batch=num_items_in_batch,
            position_ids=position_ids,
            teacher_mask=teacher_mask,
            teacher_prior=teacher_prior,
            prompt=prompt,
        )

    def _pass(
        self,
        student_logits: Tensor,
        teacher_logits: Sequence[TeacherLogits],
        labels: Tensor,
        *,
        with_kd: bool,
        num_items_in_batch: Tensor | int | None,
        position_ids: Tensor | None,
        teacher_mask: Tensor | None,
        teacher_prior: Tensor | None,
        prompt: PromptEvidence | None,
    ) -> MultiTeacherKDOutput:
        """
        The chunked pass (`ChunkedDistillation`), with the fused KL (`with_kd`) or only the statistics and CE; on the
        `[B, T, V]` logits, or logit-free when the student is `HeadLogits` (its teachers then taken at the valid
        positions, `hf_mtkd.logit_free.at_valid_positions`).
        """
        settings = self.settings
        mask = next_token_mask(labels)
        packed = isinstance(student_logits, HeadLogits)
        if packed:
            teacher_logits = [at_valid_positions(logits, mask) for logits in teacher_logits]
        elif any_head_logits(teacher_logits):
            raise ValueError(
                "Teachers given as `HeadLogits` (hidden states and head) need the student in the same form: pass "
                "the student's `HeadLogits` too, or every teacher's [B, T, V] logits."
            )
        _check_logits(student_logits, teacher_logits)
        if teacher_prior is not None:
            check_teacher_prior(teacher_prior, labels.shape[0], len(teacher_logits))
        weigh = Weighting.of(settings, len(teacher_logits), labels.device)
        layout = Layout(mask, packed)
        segment_starts = None if position_ids is None else position_ids == 0
        document_score = self._document_score(prompt, segment_starts)
        weights = chunk_weights = None
        if with_kd and weigh.causal:
            chunk_weights = ChunkWeights(weigh, layout, segment_starts, document_score)
        elif with_kd:
            signals = teacher_statistics(
                teacher_logits,
                labels,
                temperature=settings.temperature,
                position_ids=position_ids,
                chunk_size=settings.chunk_size,
                packed=packed,
            )
            signals = replace(signals, document_score=document_score)
            weights = weigh(signals, teacher_mask, teacher_prior)
        teachers = [logits.detach() for logits in teacher_logits]
        student = HiddenStudent(student_logits) if packed else DenseStudent(student_logits)
        loss, loss_kd, loss_ce, entropy, target_log_prob = ChunkedDistillation.apply(
            student,
            layout,
            labels,
            normalizer(mask, num_items_in_batch),
            weights,
            chunk_weights,
            teacher_mask,
            teacher_prior,
            settings,
            with_kd,
            teachers,
            *student.inputs,
        )
        if weights is None:
            signals = TeacherSignals(entropy, target_log_prob, mask, segment_starts, document_score=document_score)
            weights = weigh(signals, teacher_mask, teacher_prior)
        return MultiTeacherKDOutput(
            loss=loss,
            loss_kd=loss_kd,
            loss_ce=None if settings.alpha_ce is None else loss_ce,
            weights=weights,
            signals=signals,
            teacher_mask=teacher_mask,
        )


def compute_teacher_weights(
    teacher_logits: Sequence[TeacherLogits],
    labels: Tensor,
    *,
    temperature: float = 1.0,
    weighting: str = DEFAULT_WEIGHTING,
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
    prompt: PromptEvidence | None = None,
    prompt_temperature: float = 1.0,
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
        teacher_logits: K tensors `[B, T, V]` (unshifted, as returned by a causal LM), or `TopKLogProbs` (cached).
        labels: `[B, T]`, -100 where ignored.
        entropy_temperature: $\gamma_H$. label_temperature: $\gamma$. posterior_decay: $\lambda$.
        position_ids: `[B, T]` for packed sequences: `posterior` and `likelihood` restart where they are 0.
        chunk_size: positions processed at once, which bounds the extra memory (None: `auto_chunk_size(V)`).
        teacher_mask: `[K, B, T]` bool, where each teacher is available (None: everywhere). An unavailable
            teacher's weight is 0 and the others' are renormalised; where none is available all weights are 0.
        teacher_prior: `[B, K]` per-row prior $r$ over teachers (routing; each row is normalised; None: uniform). A
            one-hot row routes its sequence to one teacher, a uniform row changes nothing, and a teacher with
            $r_{b,k} = 0$ is unavailable in row b as with `teacher_mask`.
        prompt: the teachers' log-probabilities of the prompt tokens (`hf_mtkd.prompt_evidence.PromptEvidence`):
            each teacher's $\frac{1}{\gamma_p} \sum \log p_k(x)$ over its document's prompt is added to $s_k$ at
            every position of the document ($\gamma_p$: `prompt_temperature`). None: the prompt counts for nothing.
    """
    return DistillationLoss(
        DistillationSettings(
            temperature=temperature,
            weighting=weighting,
            entropy_temperature=entropy_temperature,
            teacher_weights=teacher_weights,
            granularity=granularity,
            label_temperature=label_temperature,
            posterior_decay=posterior_decay,
            prompt_temperature=prompt_temperature,
            min_weight=min_weight,
            chunk_size=chunk_size,
        )
    ).weights(
        teacher_logits,
        labels,
        position_ids=position_ids,
        teacher_mask=teacher_mask,
        teacher_prior=teacher_prior,
        prompt=prompt,
    )


def multi_teacher_kd(
    student_logits: Tensor,
    teacher_logits: Sequence[TeacherLogits],
    labels: Tensor,
    *,
    temperature: float = 1.0,
    weighting: str = DEFAULT_WEIGHTING,
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
    prompt: PromptEvidence | None = None,
    prompt_temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = DEFAULT_BETA,
    skew_alpha: float = DEFAULT_SKEW_ALPHA,
    alpha_kd: float = 1.0,
    alpha_ce: float | None = None,
) -> MultiTeacherKDOutput:
    r"""
    The distillation loss $\alpha_{kd} L_{kd} + \alpha_{ce} L_{ce}$ with its terms, weights and teacher signals;
    see `multi_teacher_kd_loss` for $L_{kd}$, `causal_lm_loss` for $L_{ce}$ and `compute_teacher_weights` for the
    weighting arguments.

    Both terms and the gradient come from one pass over chunks of positions, which reads each teacher once when
    the weights of a position read no later position (`granularity="token"` with any weighting but `likelihood`);
    otherwise a first pass computes the teachers' statistics. Without `alpha_ce`, $L_{ce}$ is
    neither computed nor part of the loss.
    """
    settings = DistillationSettings(
        temperature=temperature,
        weighting=weighting,
        entropy_temperature=entropy_temperature,
        teacher_weights=teacher_weights,
        fusion=fusion,
        granularity=granularity,
        label_temperature=label_temperature,
        posterior_decay=posterior_decay,
        prompt_temperature=prompt_temperature,
        min_weight=min_weight,
        chunk_size=chunk_size,
        divergence=divergence,
        beta=beta,
        skew_alpha=skew_alpha,
        alpha_kd=alpha_kd,
        alpha_ce=alpha_ce,
    )
    return DistillationLoss(settings).kd(
        student_logits,
        teacher_logits,
        labels,
        num_items_in_batch=num_items_in_batch,
        position_ids=position_ids,
        teacher_mask=teacher_mask,
        teacher_prior=teacher_prior,
        prompt=prompt,
    )


def multi_teacher_kd_loss(
    student_logits: Tensor,
    teacher_logits: Sequence[TeacherLogits],
    labels: Tensor,
    *,
    temperature: float = 1.0,
    weighting: str = DEFAULT_WEIGHTING,
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
    prompt: PromptEvidence | None = None,
    prompt_temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = DEFAULT_BETA,
    skew_alpha: float = DEFAULT_SKEW_ALPHA,
) -> Tensor:
    r"""
    $L_{kd} = \tau^2 \cdot \frac{1}{N} \sum_{(b,t)\ \mathrm{valid}} D(\bar p_{b,t}, q_{b,t})$, D the forward KL
    $\mathrm{KL}(\bar p \| q)$ by default.

    $\bar p$ fuses the teachers' tempered distributions with weights `compute_teacher_weights(...)`
    (`fusion="probability"`: $\sum_k w_k p_k$; `"logit"`: $\mathrm{softmax}(\sum_k w_k z_k/\tau)$) and
    $q = \mathrm{softmax}(z_s/\tau)$. Gradients flow to the student only; an all-masked batch gives 0 (with a graph).

    Args:
        student_logits: `[B, T, V]`, unshifted; or, logit-free, `hf_mtkd.logit_free.HeadLogits` (the final hidden
            states at the valid positions and the output head: no `[B, T, V]` tensor is made, the gradient goes to
            the hidden states and the head).
        teacher_logits: K tensors `[B, T, V]` on the same vocabulary, or their cached `hf_mtkd.storage.TopKLogProbs`
            form (read as the top-k distribution with its tail mass spread uniformly), or `HeadLogits` beside a
            `HeadLogits` student.
        labels: `[B, T]`, -100 where ignored.
        num_items_in_batch: N, when the loss must be normalised over more than this batch.
        weighting, entropy_temperature, teacher_weights, granularity, label_temperature, posterior_decay,
            min_weight, position_ids, prompt, prompt_temperature: how teachers are weighted, see
            `compute_teacher_weights`.
        chunk_size: positions processed at once (None: `auto_chunk_size(V)`, about 16 MiB per `[chunk, V]` float32
            tensor). The result does not depend on it; the extra memory is O(chunk_size x V x K) instead of
            O(N x V x K), and the gradient is computed during the forward.
        teacher_mask: `[K, B, T]` bool, where each teacher is available (None: everywhere). At each position the
            fusion runs over the available teachers with renormalised weights; a position where none is available
            adds no KD term but still counts in N (so the loss stays a mean over the same positions as `L_ce`).
        teacher_prior: `[B, K]` per-row prior over teachers (routing, see `compute_teacher_weights`): with a one-hot
            row, that row's loss is the single-teacher loss of its teacher.
        divergence, beta, skew_alpha: D (`forward_kl`, `reverse_kl`, `jsd` with `beta`, `skew_kl` or
            `skew_reverse_kl` with `skew_alpha`; see `hf_mtkd.divergences`).
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
        prompt=prompt,
        prompt_temperature=prompt_temperature,
        divergence=divergence,
        beta=beta,
        skew_alpha=skew_alpha,
    ).loss


def causal_lm_loss(student_logits: Tensor, labels: Tensor, num_items_in_batch: Tensor | int | None = None) -> Tensor:
    r"""$L_{ce} = -\frac{1}{N} \sum_{(b,t)\ \mathrm{valid}} \log \mathrm{softmax}(z_s)_{b,t}[y_{b,t+1}]$."""
    targets = shift_labels(labels)
    mask = targets != -100
    total = F.cross_entropy(upcast(student_logits.flatten(0, 1)), targets.flatten(), reduction="sum")
    return total / normalizer(mask, num_items_in_batch)


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
    return per_position.sum() / normalizer(valid, num_items_in_batch)


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
    for chunk in chunks(mask, chunk_size, vocab_size):
        student = torch.softmax(upcast(take_rows(student_logits, chunk.rows)) / temperature, dim=-1).sort(
            dim=-1, descending=True
        )
        for k, logits in enumerate(teacher_logits):
            teacher = torch.softmax(dense_rows(logits, chunk.rows) / temperature, dim=-1)
            distance = sorted_l1_distance(teacher, student.values)
            total = total + chunk.select(flat_weights[k, chunk.rows].to(distance.dtype) * distance).sum()
    return total / normalizer(mask, num_items_in_batch)
