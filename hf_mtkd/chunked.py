r"""
The chunked driver: the loss reads the `[B, T, V]` tensors a run of positions at a time, so that its extra memory is
O(chunk x V x K) instead of O(B x T x V x K).

`chunks` cuts the valid positions (those with a next-token label) into runs that are views of the flat tensors;
`teacher_statistics` reads the teachers' entropies and true-token log-probabilities (no gradient); and
`ChunkedDistillation`, the one autograd function, makes the fused KD term, the cross-entropy and their gradient in
one pass, writing the gradient during the forward.

The positions a pass reads are a `Layout`: every flat position of the `[B, T]` batch (the `[B, T, V]` logits), or
the valid ones only, packed (the logit-free inputs of `hf_mtkd.logit_free`). How the student's logits of a chunk are
obtained and where their gradient goes is a `StudentLogits` strategy: a view of the `[B, T, V]` logits and a
`[B, T, V]` gradient buffer (`DenseStudent`), or `h[chunk] @ W.T + b` and the gradients of h, W and b
(`hf_mtkd.logit_free.HiddenStudent`); the per-chunk math is the same code for both.
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
from .fusion import fuse_dense, fuse_sparse
from .settings import DistillationSettings
from .storage import SparseRows, TeacherLogits, read_rows
from .weighting import DocumentTrack, TeacherSignals, document_grid, weights_from_signals

CHUNK_ELEMENTS = 2**22
"""With `chunk_size=None`, positions are read `CHUNK_ELEMENTS // V` at a time: each `[chunk, V]` float32 tensor is
16 MiB, small enough to be reused from the allocator's cache instead of faulted in afresh, large enough that the
per-chunk overhead is negligible."""


def shift_labels(labels: Tensor) -> Tensor:
    """`[B, T]` next-token targets: `labels[:, t+1]` at position t, -100 at the last position."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def next_token_mask(labels: Tensor) -> Tensor:
    """`[B, T]` bool, True at the valid positions t, those where `labels[:, t+1] != -100`."""
    return shift_labels(labels) != -100


def normalizer(mask: Tensor, num_items_in_batch: Tensor | int | None) -> Tensor:
    """N: `num_items_in_batch`, else the number of valid positions in `mask`; at least 1, so empty batches give 0."""
    count = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=mask.device)
    return count.clamp(min=1)


def auto_chunk_size(vocab_size: int) -> int:
    """Positions per chunk when `chunk_size` is None: `CHUNK_ELEMENTS // vocab_size`, at least 1."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


@dataclass(frozen=True)
class Chunk:
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


def chunks(mask: Tensor, chunk_size: int | None, vocab_size: int) -> list[Chunk]:
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
        chunks.append(Chunk(slice(start, stop), flat[start:stop], all_valid=j - i == stop - start))
        i = j
    return chunks


@dataclass(frozen=True)
class Layout:
    """
    The P positions a pass reads, in row-major order: every flat position of the `[B, T]` batch (P = B x T, for
    `[B, T, ...]` inputs), or only its N valid ones (`packed`, P = N, for inputs taken at the valid positions).
    """

    mask: Tensor
    """`[B, T]` bool, the valid positions."""
    packed: bool = False

    @classmethod
    def of(cls, labels: Tensor, *, packed: bool = False) -> Layout:
        return cls(next_token_mask(labels), packed)

    @property
    def valid(self) -> Tensor:
        """`[P]` bool, the valid positions among the P."""
        if self.packed:
            return torch.ones(int(self.mask.sum()), dtype=torch.bool, device=self.mask.device)
        return self.mask.flatten()

    def flat(self, values: Tensor) -> Tensor:
        """`values` `[..., B, T]` at the P positions, `[..., P]` (a view when not packed)."""
        return values[..., self.mask] if self.packed else values.flatten(-2)

    def per_row(self, values: Tensor) -> Tensor:
        """`values` `[B, ...]` (one entry per sequence) repeated at the P positions, `[P, ...]`."""
        rows = torch.arange(self.mask.shape[0], device=self.mask.device)[:, None].expand(self.mask.shape)
        return values[self.flat(rows)]

    def targets(self, labels: Tensor) -> Tensor:
        """`[P]` next-token ids (clamped to 0 where there is none)."""
        return self.flat(shift_labels(labels)).clamp(min=0)


def teacher_statistics(
    teacher_logits: Sequence[TeacherLogits],
    labels: Tensor,
    *,
    temperature: float,
    position_ids: Tensor | None,
    chunk_size: int | None,
    packed: bool = False,
) -> TeacherSignals:
    """
    The teachers' `TeacherSignals` at the valid positions, read `chunk_size` positions at once (`packed`: the
    teachers are given at the valid positions only, see `Layout`).
    """
    layout = Layout.of(labels, packed=packed)
    mask = layout.mask
    flat_targets = layout.targets(labels)
    entropy, target_log_prob = [], []
    with torch.no_grad():
        for chunk in chunks(layout.valid, chunk_size, teacher_logits[0].shape[-1]):
            _, chunk_entropy, chunk_log_prob = read_rows(
                teacher_logits, chunk.rows, flat_targets[chunk.rows], temperature
            )
            entropy.append(chunk.select(chunk_entropy))
            target_log_prob.append(chunk.select(chunk_log_prob))
    return signals(entropy, target_log_prob, mask, position_ids, len(teacher_logits))


def signals(
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
class Weighting:
    """How K teachers are weighted: the settings' weighting with the static prior `[K]` on the batch's device."""

    settings: DistillationSettings
    prior: Tensor

    @classmethod
    def of(cls, settings: DistillationSettings, num_teachers: int, device: torch.device) -> Weighting:
        settings.check_num_teachers(num_teachers)
        return cls(settings, settings.prior(num_teachers, device=device))

    @property
    def causal(self) -> bool:
        return self.settings.causal

    def __call__(
        self, signals: TeacherSignals, teacher_mask: Tensor | None, teacher_prior: Tensor | None = None
    ) -> Tensor:
        return weights_from_signals(
            signals,
            weighting=self.settings.weighting,
            prior=self.prior,
            params=self.settings.weighting_parameters,
            granularity=self.settings.granularity,
            min_weight=self.settings.min_weight,
            teacher_mask=teacher_mask,
            teacher_prior=teacher_prior,
        )


class ChunkWeights:
    """
    The weights of a `causal` `Weighting`, made chunk by chunk in the order of a pass's `Layout`: each chunk is
    weighted from its own signals and, for the weightings that run along a document (`posterior`), the running sums
    carried from the chunks before it (`hf_mtkd.weighting.DocumentTrack`), so every teacher is read once.
    """

    def __init__(
        self, weigh: Weighting, layout: Layout, segment_starts: Tensor | None, document_score: Tensor | None = None
    ) -> None:
        """`document_score`: see `TeacherSignals.document_score`."""
        time, document = document_grid(layout.mask, segment_starts)
        self.weigh, self.document_score = weigh, document_score
        self.time, self.document = layout.flat(time), layout.flat(document)
        self.track = DocumentTrack(self.time[:0], self.document[:0])

    def __call__(
        self,
        chunk: Chunk,
        entropy: Tensor,
        target_log_prob: Tensor,
        teacher_mask: Tensor | None,
        teacher_prior: Tensor | None,
    ) -> Tensor:
        """
        Weights `[K, n]` of the chunk's n positions from their signals `[K, n]`, with `teacher_mask` `[K, n]` and
        `teacher_prior` `[n, K]` (each position's row prior) at those positions; chunks come in the pass's order.
        """
        self.track = self.track.at(self.time[chunk.rows], self.document[chunk.rows])
        evidence = target_log_prob if chunk.all_valid else target_log_prob.where(chunk.valid, 0.0)
        everywhere = torch.ones(entropy.shape[1], 1, dtype=torch.bool, device=entropy.device)
        signals = TeacherSignals(entropy, evidence, everywhere, track=self.track, document_score=self.document_score)
        mask = None if teacher_mask is None else teacher_mask[:, :, None]
        return self.weigh(signals, mask, teacher_prior)[:, :, 0]


class StudentLogits:
    """
    How `ChunkedDistillation` reads the student: its differentiable `inputs`, the logits `[n, V]` of a chunk's
    positions (float32 or wider) and where the gradient of the loss in those logits goes (`write`, then `grads`).
    """

    inputs: tuple[Tensor | None, ...]
    """The tensors the loss is differentiated in, passed to the autograd function (None: absent)."""
    vocab_size: int

    def logits(self, rows: slice) -> Tensor:
        """The student's logits `[n, V]` at the P-positions `rows` of the pass's `Layout`."""
        raise NotImplementedError

    def start(self, needs_grad: Sequence[bool], runs: Sequence[Chunk], num_positions: int) -> None:
        """Make the gradient buffers of the `inputs` that `needs_grad` (for the chunks `runs` of P positions)."""
        raise NotImplementedError

    def write(self, rows: slice, grad: Tensor) -> None:
        """Take $\\partial L / \\partial z$ `[n, V]` of the chunk at `rows` (invalid positions already 0)."""
        raise NotImplementedError

    def grads(self) -> tuple[Tensor | None, ...]:
        """The gradients of the `inputs`, for a loss gradient of 1 (None where not needed)."""
        raise NotImplementedError


class DenseStudent(StudentLogits):
    """The student's `[B, T, V]` logits, read by views and given a `[B, T, V]` gradient buffer."""

    def __init__(self, logits: Tensor) -> None:
        self.inputs = (logits,)
        self.vocab_size = logits.shape[-1]
        self.flat = logits.view(-1, logits.shape[-1])
        self.grad: Tensor | None = None

    def logits(self, rows: slice) -> Tensor:
        return upcast(self.flat[rows])

    def start(self, needs_grad: Sequence[bool], runs: Sequence[Chunk], num_positions: int) -> None:
        if not needs_grad[0]:
            return
        self.grad = self.flat.new_empty(self.flat.shape)
        # positions outside every chunk get no gradient
        edges = [0, *(edge for chunk in runs for edge in (chunk.rows.start, chunk.rows.stop)), num_positions]
        for start, stop in zip(edges[::2], edges[1::2], strict=True):
            self.grad[start:stop] = 0

    def write(self, rows: slice, grad: Tensor) -> None:
        self.grad[rows] = grad

    def grads(self) -> tuple[Tensor | None]:
        return (None if self.grad is None else self.grad.view(self.inputs[0].shape),)


class ChunkedDistillation(torch.autograd.Function):
    r"""
    $\alpha_{kd} \tau^2 \frac{1}{N} \sum D(\bar p, \mathrm{softmax}(z_s/\tau)) + \alpha_{ce}
    \frac{1}{N} \sum -\log \mathrm{softmax}(z_s)_y$ over the valid positions, in one pass over chunks of positions:
    the one loop over chunks that has a gradient.

    Each chunk reads every teacher once (`hf_mtkd.storage.read_rows`): its statistics, its weights (`weigh`, when
    they read no later position; else `weights` are given), the fused target (`hf_mtkd.fusion`), the divergence D
    and its gradient (`hf_mtkd.divergences`, the settings' `kd_divergence`), the cross-entropy, and the gradient in the
    student's logits, $\frac{1}{N}(\alpha_{kd} \tau\, \partial D / \partial u + \alpha_{ce} (q_1 - e_y))$ ($u = z_s /
    \tau$; $\partial D / \partial u = q_\tau - \bar p$ for the forward KL), handed to the `StudentLogits` strategy
    during the forward (written into one `[B, T, V]` buffer, or multiplied into the gradients of the hidden states
    and the output head). No `[N, V]` intermediate outlives its chunk, and the student's log-softmax serves both
    terms when τ = 1. When every teacher is in top-k form, the forward KL's target stays sparse.

    With `with_kd=False` (the ULD divergence, computed elsewhere) no target and no KL are formed: the pass gives the
    teachers' statistics and $\alpha_{ce} L_{ce}$ only.

    Returns the loss and, as constants, $L_{kd}$ (0 without the KD term), $L_{ce}$ (0 without `alpha_ce`), and the
    teachers' entropies and target log-probabilities `[K, N]`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        student: StudentLogits,
        layout: Layout,
        labels: Tensor,
        normalizer: Tensor,
        weights: Tensor | None,
        weigh: ChunkWeights | None,
        teacher_mask: Tensor | None,
        teacher_prior: Tensor | None,
        settings: DistillationSettings,
        with_kd: bool,
        teacher_logits: Sequence[TeacherLogits],
        *inputs: Tensor | None,
    ) -> tuple[Tensor, ...]:
        temperature, fusion, chunk_size = settings.temperature, settings.fusion, settings.chunk_size
        alpha_kd, alpha_ce = settings.alpha_kd, settings.alpha_ce
        mask = layout.mask
        flat_targets = layout.targets(labels)
        if not with_kd:
            alpha_kd = 0.0
        divergence = settings.kd_divergence if with_kd else None
        exact_log = with_kd and divergence.exact_log_target
        has_loss = alpha_kd != 0 or bool(alpha_ce)
        needs_grad = [has_loss and ctx.needs_input_grad[ARGUMENTS + i] for i in range(len(inputs))]
        need_grad = any(needs_grad)
        valid_positions = layout.valid
        runs = chunks(valid_positions, chunk_size, student.vocab_size)
        if need_grad:
            student.start(needs_grad, runs, len(valid_positions))
        flat_mask = None if teacher_mask is None else layout.flat(teacher_mask)
        flat_weights = None if weights is None else layout.flat(weights)
        flat_prior = None if teacher_prior is None else layout.per_row(teacher_prior)
        kl_total = ce_total = upcast(normalizer.new_zeros((), dtype=inputs[0].dtype))
        normalizer = normalizer.to(kl_total.dtype)
        kd_scale = alpha_kd * temperature / normalizer
        ce_scale = (alpha_ce or 0.0) / normalizer
        entropy, target_log_prob = [], []
        for chunk in runs:
            rows, valid = chunk.rows, chunk.valid
            y = flat_targets[rows]
            teachers, chunk_entropy, chunk_log_prob = read_rows(teacher_logits, rows, y, temperature)
            entropy.append(chunk.select(chunk_entropy))
            target_log_prob.append(chunk.select(chunk_log_prob))
            logits = student.logits(rows)
            log_q = None  # log q_τ, for the KD term
            if with_kd:
                log_q = torch.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)
            ce_log_probs = None  # log q_1, for the CE term
            shared = alpha_ce is not None and log_q is not None and temperature == 1  # τ = 1: log q_1 = log q_τ
            if alpha_ce is not None:
                ce_log_probs = log_q if shared else torch.log_softmax(logits, dim=-1)
                ce_total = ce_total - chunk.select(ce_log_probs.gather(-1, y[:, None])[:, 0]).sum()
            del logits
            chunk_grad = None  # ∂L/∂z of the chunk
            if with_kd:
                available = None if flat_mask is None else flat_mask[:, rows]
                if flat_weights is None:
                    prior = None if flat_prior is None else flat_prior[rows]
                    chunk_weights = weigh(chunk, chunk_entropy, chunk_log_prob, available, prior)
                else:
                    chunk_weights = flat_weights[:, rows]
                # the KD term counts at valid positions where some teacher has weight
                counted = valid if available is None else valid & (chunk_weights > 0).any(dim=0)
                if isinstance(teachers[0], SparseRows):
                    target = fuse_sparse(teachers, chunk_weights, temperature, fusion)
                else:
                    target = fuse_dense(
                        teachers, chunk_entropy, chunk_weights, fusion, log_q.dtype, exact_log=exact_log
                    )
                row_kd = (kd_scale * counted).to(log_q.dtype)[:, None] if need_grad else None
                q_scale = ce_scale.to(log_q.dtype) if shared else 0.0  # the CE's q term: one exp for both
                value, chunk_grad = divergence(log_q, target, row_kd, q_scale)
                kl_total = kl_total + value.where(counted, 0.0).sum()
                del target, value
            del teachers
            if need_grad:
                if ce_log_probs is not None and not shared:
                    # q_1, in place of log q_1 (the divergence has read log q_τ)
                    ce_grad = ce_log_probs.exp_().mul_(ce_scale)
                    chunk_grad = ce_grad if chunk_grad is None else chunk_grad.add_(ce_grad)
                if ce_log_probs is not None:  # - e_y
                    ce_step = (-ce_scale).to(chunk_grad.dtype).reshape(1, 1).expand(chunk.size, 1)
                    chunk_grad.scatter_add_(-1, y[:, None], ce_step)
                if not chunk.all_valid:  # padding and row ends inside the run get no gradient
                    chunk_grad.masked_fill_(~valid[:, None], 0)
                student.write(rows, chunk_grad)
                del chunk_grad
        grads = student.grads() if need_grad else (None,) * len(inputs)
        ctx.save_for_backward(*grads)
        loss_kd = temperature**2 * kl_total / normalizer
        loss_ce = ce_total / normalizer
        loss = alpha_kd * loss_kd + (alpha_ce or 0.0) * loss_ce
        stats = signals(entropy, target_log_prob, mask, None, len(teacher_logits))
        outputs = (loss_kd, loss_ce, stats.entropy, stats.target_log_prob)
        ctx.mark_non_differentiable(*outputs)
        return (loss, *outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        scale = not bool(grad_loss == 1)
        grads = [grad * grad_loss.to(grad.dtype) if grad is not None and scale else grad for grad in ctx.saved_tensors]
        return (*[None] * ARGUMENTS, *grads)


ARGUMENTS = 11
"""The arguments of `ChunkedDistillation.forward` before the student's `inputs`."""
