r"""Teacher weighting: how much each teacher counts at each position.

A weighting strategy is a pure function that maps teacher statistics at the valid positions (`TeacherSignals`:
entropies, the log-probability of the true next token, the layout of the batch) to a log-score $s_k$ per teacher and
position. The scores are pooled at the requested granularity and combined with the static prior $\pi$:

$$w_k = \frac{\pi_k \exp(s_k)}{\sum_j \pi_j \exp(s_j)}$$

A per-row prior $r_{b,k}$ (routing, from a dataset column, see `hf_mtkd.routing`) multiplies it:
$w_k(b, t) \propto \pi_k r_{b,k} \exp(s_k(b, t))$; a one-hot row is routing by hand, a uniform row changes nothing.

Weights are always constants for the gradient (they are computed from detached teacher statistics).
Strategies are registered by name in `WEIGHTINGS`; adding one touches this module and the config's choices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

GRANULARITIES = ("token", "sequence", "batch")


@dataclass(frozen=True)
class TeacherSignals:
    """What a weighting may look at: statistics of K teachers at the N valid positions of a `[B, T]` batch."""

    entropy: Tensor
    """`[K, N]` entropy $H_k$ of each teacher's tempered distribution $\\mathrm{softmax}(z_k/\\tau)$."""
    target_log_prob: Tensor
    """`[K, N]` $\\log p_k(y_{t+1})$: the log-probability (at temperature 1) each teacher gave the true next token."""
    mask: Tensor
    """`[B, T]` bool, the valid positions (N of them, in row-major order)."""
    segment_starts: Tensor | None = None
    """`[B, T]` bool, True where a packed document begins (from `position_ids == 0`); None: one per row."""
    track: DocumentTrack | None = None
    """Where the N positions lie in their documents, and the running sums carried from the positions read before
    them (a chunk of a pass, see `DocumentTrack`); None: `DocumentTrack.of(mask, segment_starts)`, the signals
    holding whole documents."""
    document_score: Tensor | None = None
    """`[K, B (T + 1)]` a score added at every position of each document id of `document_grid` (the prompt's
    evidence, `hf_mtkd.prompt_evidence.PromptEvidence.document_scores`); None: none."""

    def document_track(self) -> DocumentTrack:
        """`track`, or the positions of `mask` as whole documents."""
        return DocumentTrack.of(self.mask, self.segment_starts) if self.track is None else self.track


def document_grid(mask: Tensor, segment_starts: Tensor | None) -> tuple[Tensor, Tensor]:
    """
    `[B, T]` time t of each position in its row and id of its document (a row, or a packed segment of one, from
    `segment_starts`): the ids of row b lie in `[b (T + 1), (b + 1)(T + 1))`.
    """
    batch_size, seq_len = mask.shape
    time = torch.arange(seq_len, device=mask.device).expand(batch_size, seq_len)
    starts = torch.zeros_like(mask) if segment_starts is None else segment_starts
    row = torch.arange(batch_size, device=mask.device)[:, None] * (seq_len + 1)
    return time, starts.long().cumsum(dim=1) + row


SCAN_BLOCK = 256
"""Positions whose running sums `DocumentTrack.decayed_sums` makes with one `[block, block]` matrix."""


@dataclass
class DocumentTrack:
    r"""
    The times and documents of n positions read in row-major order, and the running sums
    $S_k(j) = \sum_{i \le j,\ d_i = d_j} \lambda^{t_j - t_i} e_k(i)$ carried from the runs of positions read before
    them (`state`, `last_time`, `last_document`: the sums at the last position read; None before the first). A
    pass over chunks gives every chunk's `DocumentTrack` the same carry, so that the chunks' sums are those of one
    call over all positions.
    """

    time: Tensor
    """`[n]` position of each in its row."""
    document: Tensor
    """`[n]` id of each one's document; a document's positions are consecutive."""
    state: Tensor | None = None
    last_time: Tensor | None = None
    last_document: Tensor | None = None

    @classmethod
    def of(cls, mask: Tensor, segment_starts: Tensor | None) -> DocumentTrack:
        """The valid positions of `mask`, whole documents (nothing carried)."""
        time, document = document_grid(mask, segment_starts)
        return cls(time[mask], document[mask])

    def at(self, time: Tensor, document: Tensor) -> DocumentTrack:
        """The next run of positions, with this one's carry."""
        return DocumentTrack(time, document, self.state, self.last_time, self.last_document)

    def decayed_sums(self, evidence: Tensor, decay: float) -> Tensor:
        r"""
        $S_k(j)$ `[K, n]` of `evidence` $e$ `[K, n]`, a `[block, block]` matrix of $\lambda^{t_j - t_i}$ at a time
        (no power of $\lambda^{-1}$, so nothing overflows); the sums at the last position are carried to `at`.
        """
        sums = torch.empty_like(evidence)
        for start in range(0, evidence.shape[1], SCAN_BLOCK):
            block = slice(start, start + SCAN_BLOCK)
            time, document = self.time[block], self.document[block]
            gap = (time[:, None] - time[None, :]).to(evidence.dtype)
            kernel = torch.where(document[:, None] == document[None, :], decay ** gap.clamp(min=0), 0.0).tril()
            block_sums = evidence[:, block] @ kernel.T
            if self.state is not None:
                carried = (decay ** (time - self.last_time).to(evidence.dtype)).where(
                    document == self.last_document, 0.0
                )
                block_sums = block_sums + self.state[:, None] * carried
            sums[:, block] = block_sums
            self.state, self.last_time, self.last_document = block_sums[:, -1], time[-1], document[-1]
        return sums


@dataclass(frozen=True)
class WeightingParameters:
    """Hyperparameters of the weightings."""

    entropy_temperature: float = 1.0
    """$\\gamma_H$ in $-H_k / \\gamma_H$."""
    label_temperature: float = 1.0
    """$\\gamma$ in $\\log p_k(y) / \\gamma$, for the label-aware weightings."""
    posterior_decay: float = 0.9
    """$\\lambda$, the forgetting factor of `posterior`."""


WeightingFn = Callable[[TeacherSignals, WeightingParameters], Tensor]

MIN_TARGET_LOG_PROB = -20.0
r"""The floor of $\log p_k(y_{t+1})$ in the label-aware scores (p = 2e-9): one token's evidence against a teacher is
bounded, so a token a teacher cannot produce (probability 0: a padding row, a token its vocabulary does not map to)
neither makes the weights NaN where every teacher gives it 0 nor silences that teacher for the rest of a document."""


def static_scores(signals: TeacherSignals, params: WeightingParameters) -> Tensor:
    r"""`static`: $s_k = 0$, so $w_k = \pi_k$ everywhere."""
    return torch.zeros_like(signals.entropy)


def entropy_scores(signals: TeacherSignals, params: WeightingParameters) -> Tensor:
    r"""`entropy`: $s_k = -H_k / \gamma_H$, so a more certain teacher (lower entropy) gets more weight."""
    return -signals.entropy / params.entropy_temperature


def correctness_scores(signals: TeacherSignals, params: WeightingParameters) -> Tensor:
    r"""
    `correctness`: $s_k = \log p_k(y_{t+1}) / \gamma$, i.e. $w_k \propto \pi_k\, p_k(y_{t+1})^{1/\gamma}$: a teacher
    counts as much as it gave the true next token probability (confidence-aware multi-teacher KD, per token).
    """
    return signals.target_log_prob / params.label_temperature


def posterior_scores(signals: TeacherSignals, params: WeightingParameters) -> Tensor:
    r"""
    `posterior`: $s_k(t) = \frac{1}{\gamma} \sum_{s \le t} \lambda^{t-s} \log p_k(y_{s+1})$, the log-posterior of a
    Bayesian mixture of teachers with exponential forgetting: a teacher that has been predicting this document well
    leads on it, which routes each document to its specialist without domain labels.

    The sum runs over the valid positions of the same row and document: ignored positions add nothing (the state
    still decays by $\lambda$ per position) and the state restarts at each row and at each `segment_starts`. It
    reads no later position, so a pass over chunks makes it chunk by chunk (`TeacherSignals.track`).
    """
    track = signals.document_track()
    return track.decayed_sums(signals.target_log_prob, params.posterior_decay) / params.label_temperature


def likelihood_scores(signals: TeacherSignals, params: WeightingParameters) -> Tensor:
    r"""
    `likelihood`: $s_k(t) = \frac{1}{\gamma} \sum_{s \in D(t)} \log p_k(y_{s+1})$, the tempered log-likelihood each
    teacher gives the whole document $D(t)$ holding position t (all its valid positions, before and after t), so
    $w_k \propto \pi_k\, p_k(D)^{1/\gamma}$ is the tempered posterior of "teacher k wrote this document", the same
    at every position of it. Per-token evidence is noisy and small against $\gamma$; summed over a document it grows
    with its length, which routes each document to the teacher that knows its domain without domain labels.

    A document is a row, or a packed segment of one (`segment_starts`); ignored positions add nothing.
    """
    batch_size, seq_len = signals.mask.shape
    document = signals.document_track().document
    sums = signals.target_log_prob.new_zeros(signals.entropy.shape[0], batch_size * (seq_len + 1))
    sums.index_add_(1, document, signals.target_log_prob)
    return sums[:, document] / params.label_temperature


def entropy_posterior_scores(signals: TeacherSignals, params: WeightingParameters) -> Tensor:
    r"""`entropy+posterior`: $s_k = -H_k/\gamma_H + s_k^{posterior}$, the product of the two weight factors."""
    return entropy_scores(signals, params) + posterior_scores(signals, params)


WEIGHTINGS: dict[str, WeightingFn] = {
    "static": static_scores,
    "entropy": entropy_scores,
    "correctness": correctness_scores,
    "posterior": posterior_scores,
    "entropy+posterior": entropy_posterior_scores,
    "likelihood": likelihood_scores,
}

DEFAULT_WEIGHTING = "posterior"
"""The weighting used where none is named: each teacher's track record on the document so far (see `posterior_scores`).
Each tuned on validation, it beat `entropy` in every measured setting: it routes teachers of different domains as well
as domain labels do, and keeps a confidently wrong teacher at weight 0 where `entropy` trusts it (docs/demo.md)."""

WEIGHTING_SUMMARIES: dict[str, str] = {
    "static": "static teacher weights",
    "entropy": "dynamic entropy-driven teacher weights",
    "correctness": "dynamic teacher weights from each teacher's probability of the true next token",
    "posterior": "dynamic teacher weights from each teacher's track record on the document",
    "entropy+posterior": "dynamic teacher weights from each teacher's entropy and track record on the document",
    "likelihood": "dynamic teacher weights from each teacher's likelihood of the whole document",
}
"""Each weighting of `WEIGHTINGS` in words, static or dynamic (the model card's summary); a new one adds its line."""


def describe_weighting(weighting: str, granularity: str, prompt: bool = False) -> str:
    """
    How `weighting` at `granularity` weights the teachers, in words (a static weighting has no granularity), and
    with `prompt` (`hf_mtkd.prompt_evidence`) by each one's likelihood of the prompt too.
    """
    summary = WEIGHTING_SUMMARIES.get(weighting, f"{weighting!r} teacher weights")
    summary = summary if weighting == "static" else f"{summary}, per {granularity}"
    return f"{summary}, times each teacher's likelihood of the document's prompt" if prompt else summary


CAUSAL_WEIGHTINGS = ("static", "entropy", "correctness", "posterior", "entropy+posterior")
"""The weightings whose score at a position reads only that position and the earlier ones of its document (through
`DocumentTrack`): at `token` granularity the loss makes their weights chunk by chunk, in the same pass as the KL."""


def normalize_prior(teacher_weights: Sequence[float] | Tensor | None, num_teachers: int, device=None) -> Tensor:
    """The static prior $\\pi$ as a float64 tensor `[K]` summing to 1 (uniform when `teacher_weights` is None)."""
    if teacher_weights is None:
        return torch.full((num_teachers,), 1.0 / num_teachers, dtype=torch.float64, device=device)
    prior = torch.as_tensor(teacher_weights, dtype=torch.float64, device=device)
    if prior.shape != (num_teachers,):
        raise ValueError(f"`teacher_weights` has {prior.numel()} entries but there are {num_teachers} teachers.")
    if (prior < 0).any() or prior.sum() <= 0:
        raise ValueError(f"`teacher_weights` must be non-negative with a positive sum, got {prior.tolist()}.")
    return prior / prior.sum()


def check_teacher_prior(teacher_prior: Tensor, batch_size: int, num_teachers: int) -> None:
    """Refuse a per-row prior that is not `[B, K]`, non-negative and finite, with a positive sum in every row."""
    if teacher_prior.shape != (batch_size, num_teachers):
        raise ValueError(
            f"`teacher_prior` has shape {tuple(teacher_prior.shape)} but must be [batch, teachers] = "
            f"[{batch_size}, {num_teachers}]: one row of teacher weights per sequence."
        )
    if not bool(torch.isfinite(teacher_prior).all() and (teacher_prior >= 0).all()):
        raise ValueError("`teacher_prior` must be finite and non-negative (one row of teacher weights per sequence).")
    if not bool((teacher_prior.sum(dim=1) > 0).all()):
        raise ValueError("A row of `teacher_prior` is all zeros: every sequence must keep at least one teacher.")


def routed_teacher_mask(teacher_prior: Tensor, teacher_mask: Tensor | None, seq_len: int) -> Tensor | None:
    """
    `teacher_mask` `[K, B, T]` with each teacher a row routes away from ($r_{b,k} = 0$) unavailable in that row;
    `teacher_mask` itself when no row routes a teacher away.
    """
    routed = teacher_prior > 0
    if bool(routed.all()):
        return teacher_mask
    routed = routed.T[:, :, None].expand(-1, -1, seq_len)
    return routed if teacher_mask is None else teacher_mask & routed


def _log_relative_prior(teacher_prior: Tensor, dtype: torch.dtype) -> Tensor:
    r"""
    `[K, B, 1]` $\log(r_{b,k} / \max_j r_{b,j})$, 0 where $r_{b,k} = 0$ (those teachers are masked). It is exactly 0
    in a uniform row, so a uniform prior leaves the weights as they are, bit for bit.
    """
    prior = teacher_prior.to(dtype)
    relative = prior / prior.amax(dim=1, keepdim=True)
    return relative.log().where(relative > 0, 0.0).T[:, :, None]


def weights_from_signals(
    signals: TeacherSignals,
    *,
    weighting: str = DEFAULT_WEIGHTING,
    prior: Tensor,
    params: WeightingParameters = WeightingParameters(),
    granularity: str = "token",
    min_weight: float = 0.0,
    teacher_mask: Tensor | None = None,
    teacher_prior: Tensor | None = None,
) -> Tensor:
    r"""
    Teacher weights `[K, B, T]`:
    $w_k(b, t) = m + (1 - K m) \frac{\pi_k r_{b,k} e^{\bar s_k}}{\sum_j \pi_j r_{b,j} e^{\bar s_j}}$.

    Args:
        signals: the teachers' statistics at the valid positions.
        weighting: a key of `WEIGHTINGS`, which gives the scores $s_k$.
        prior: `[K]` static prior $\pi$ summing to 1 (see `normalize_prior`).
        params: the weightings' hyperparameters.
        granularity: $\bar s$ is each position's score (`token`), the mean score over a sequence's valid
            positions (`sequence`) or over all valid positions (`batch`).
        min_weight: the floor $m$ (< 1/K) below which no teacher's weight falls.
        teacher_mask: `[K, B, T]` bool, where each teacher is available (cross-tokenizer teachers are not where
            their tokens do not line up with the student's). Sums and pools above run over the available teachers
            A(b, t) only: an unavailable teacher's weight is 0, the others' are renormalised (with $|A|$ in place of
            K in the floor), its signals at unavailable positions count as no evidence (score 0 for `posterior`,
            left out of `sequence`/`batch` means), and where no teacher is available every weight is 0.
        teacher_prior: `[B, K]` per-row prior $r$ (routing; rows need not be normalised; None: uniform). A teacher
            with $r_{b,k} = 0$ is unavailable in row b, exactly as with `teacher_mask`.

    A `document_score` of the signals (the prompt's evidence) is added to $s_k$ at every position of its document,
    before pooling. Positions outside `mask` get the prior (`token`) or their sequence's/batch's pooled weight; a
    sequence with no valid position gets the prior. The options are taken as given:
    `hf_mtkd.settings.DistillationSettings` checks them once, when it is built.
    """
    mask = signals.mask
    num_teachers = signals.entropy.shape[0]
    batch_size, seq_len = mask.shape
    if teacher_prior is not None:
        teacher_mask = routed_teacher_mask(teacher_prior, teacher_mask, seq_len)
    available = None if teacher_mask is None else teacher_mask[:, mask]
    signals = replace(signals, target_log_prob=signals.target_log_prob.clamp(min=MIN_TARGET_LOG_PROB))
    if available is not None:  # unavailable signals carry no evidence
        signals = replace(
            signals,
            entropy=signals.entropy.where(available, 0.0),
            target_log_prob=signals.target_log_prob.where(available, 0.0),
        )
    scores = WEIGHTINGS[weighting](signals, params)
    if signals.document_score is not None:
        scores = scores + signals.document_score[:, signals.document_track().document].to(scores.dtype)
    if granularity == "token":
        pooled = scores.new_zeros(num_teachers, batch_size, seq_len)
        pooled[:, mask] = scores
    elif granularity == "sequence":
        rows = mask.nonzero()[:, 0]
        counted = scores if available is None else scores.where(available, 0.0)
        sums = scores.new_zeros(num_teachers, batch_size).index_add_(1, rows, counted)
        if available is None:
            counts = mask.sum(dim=1).expand(num_teachers, batch_size)
        else:
            counts = scores.new_zeros(num_teachers, batch_size).index_add_(1, rows, available.to(scores.dtype))
        means = sums / counts.clamp(min=1)
        pooled = means[:, :, None].expand(num_teachers, batch_size, seq_len)
    else:
        if available is None:
            means = scores.mean(dim=1) if scores.shape[1] > 0 else scores.new_zeros(num_teachers)
        else:
            means = scores.where(available, 0.0).sum(dim=1) / available.sum(dim=1).clamp(min=1)
        pooled = means[:, None, None].expand(num_teachers, batch_size, seq_len)
    logits = prior.to(scores.dtype).log()[:, None, None] + pooled
    if teacher_prior is not None:
        logits = logits + _log_relative_prior(teacher_prior, scores.dtype)
    if teacher_mask is None:
        weights = torch.softmax(logits, dim=0)
        return min_weight + (1 - num_teachers * min_weight) * weights if min_weight > 0 else weights
    any_available = teacher_mask.any(dim=0)
    weights = torch.softmax(logits.masked_fill(~teacher_mask, -torch.inf), dim=0).nan_to_num(0.0)
    weights = weights.where(teacher_mask & any_available, 0.0)
    if min_weight > 0:
        num_available = teacher_mask.sum(dim=0).to(weights.dtype)
        weights = (min_weight + (1 - num_available * min_weight) * weights).where(teacher_mask, 0.0)
    return weights
