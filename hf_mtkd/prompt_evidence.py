r"""
Prompt evidence: what the teachers' predictions of a document's prompt say about which of them to follow.

A prompt (a chat's user turn, the first tokens an on-policy student continues) carries no label, so no weighting
reads it; yet it is human text of the document's domain, and the teacher that predicts it best is likely the one to
follow on the completion. With prompt evidence, each teacher's tempered log-likelihood of its document's prompt
tokens is added to its weighting score at every position of the document:

$$s_k(b, t) \leftarrow s_k(b, t) + \frac{1}{\gamma_p} \sum_{s \in P(D(t))} \max(\log p_k(x_{s+1}), -20)$$

where $P(D)$ are the prompt positions of document D (`prompt_positions`: positions whose next token is a real token
of the same document without a label), $\gamma_p$ is `prompt_temperature` and -20 is the floor of every label-aware
score (`hf_mtkd.weighting.MIN_TARGET_LOG_PROB`). So $w_k \propto \pi_k\, p_k(\mathrm{prompt})^{1/\gamma_p} e^{s_k}$:
with $\gamma_p = 1$, the Bayesian posterior of "teacher k wrote this prompt" is the document's prior.

The teachers' heads then also run at the prompt positions (the cost); the student's do not.

A teacher on its own tokenizer (cross-tokenizer) reads the prompt in its own tokens: its evidence is the same sum
over its own prompt tokens, a number per row (`PromptEvidence.row_log_prob`; such rows are single documents). Its
chat template's own tokens differ from model to model, so with such teachers every teacher is scored on the prompt
tokens inside the messages' contents only (`hf_mtkd.cross_tokenizer.prompt_content`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunked import auto_chunk_size, shift_labels
from .logit_free import HeadLogits
from .storage import TopKLogProbs, dense_rows
from .weighting import MIN_TARGET_LOG_PROB, document_grid


def prompt_positions(
    input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
) -> Tensor:
    """
    `[B, T]` bool, the positions t whose next token `input_ids[:, t+1]` is a prompt token: a real token (of
    `attention_mask`) without a label, of the same document as t (`position_ids` restart at 0 where one begins).
    """
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    next_real = F.pad(real[:, 1:], (0, 1), value=False) & real
    same_document = True if position_ids is None else F.pad(position_ids[:, 1:] != 0, (0, 1), value=False)
    return next_real & same_document & (shift_labels(labels) == -100)


def prompt_targets(input_ids: Tensor, prompt: Tensor) -> Tensor:
    """`[n]` the prompt tokens `input_ids[:, t+1]` predicted at the n positions of `prompt` (row-major)."""
    return F.pad(input_ids[:, 1:], (0, 1), value=0)[prompt]


def token_log_probs(
    logits: Tensor | HeadLogits | TopKLogProbs, targets: Tensor, rows: Tensor | None = None, temperature: float = 1.0
) -> Tensor:
    r"""
    $\log \mathrm{softmax}(z/\tau)_{x}$ `[n]` (float32 or wider) of the n `targets`: at the flat positions `rows`
    of `[B, T, V]` logits or of a cached `TopKLogProbs` (its distribution: a token outside the top k has the tail's
    share), or at the n positions of `HeadLogits` (`rows` None), a chunk at a time.
    """
    if isinstance(logits, TopKLogProbs):  # sparse: no [n, V] row is made
        return logits.rows(rows).at(targets[:, None], temperature)[:, 0]
    count = targets.shape[0]
    size = auto_chunk_size(logits.shape[-1])
    out = []
    with torch.no_grad():
        for start in range(0, count, size):
            where = slice(start, start + size)
            raw = dense_rows(logits, where if rows is None else rows[where])
            out.append((raw / temperature).log_softmax(dim=-1).gather(-1, targets[where, None])[:, 0])
    return torch.cat(out) if out else torch.zeros(0, device=targets.device)


@dataclass(frozen=True)
class PromptEvidence:
    """The K teachers' log-probabilities of the prompt tokens of a `[B, T]` batch."""

    positions: Tensor
    """`[B, T]` bool, the prompt positions (`prompt_positions`)."""
    log_prob: Tensor
    """`[K, n]` $\\log p_k(x_{t+1})$ at the n prompt positions, row-major."""
    row_log_prob: Tensor | None = None
    """
    `[K, B]` what a teacher on its own tokens adds to the first document of each row: `row_sums` of its own prompt
    tokens (0 for the others, whose `log_prob` rows are then 0). None: none does.
    """

    def document_scores(self, segment_starts: Tensor | None, temperature: float) -> Tensor:
        r"""
        `[K, B (T + 1)]` $\frac{1}{\gamma_p} \sum_{s \in P(D)} \max(\log p_k(x_{s+1}), -20)$ of every document id of
        `hf_mtkd.weighting.document_grid` (0 where a document has no prompt), `row_log_prob` on each row's first.
        """
        batch_size, seq_len = self.positions.shape
        _, document = document_grid(self.positions, segment_starts)
        evidence = self.log_prob.clamp(min=MIN_TARGET_LOG_PROB)
        sums = evidence.new_zeros(evidence.shape[0], batch_size * (seq_len + 1))
        sums.index_add_(1, document[self.positions], evidence)
        if self.row_log_prob is not None:
            sums.index_add_(1, document[:, 0], self.row_log_prob.to(sums.dtype))
        return sums / temperature


def row_sums(log_prob: Tensor, positions: Tensor) -> Tensor:
    r"""`[B]` $\sum_t \max(\log p(x_{t+1}), -20)$ per row, over the n positions `positions` `[B, T]` of `log_prob`."""
    sums = log_prob.new_zeros(positions.shape[0])
    return sums.index_add_(0, positions.nonzero()[:, 0], log_prob.clamp(min=MIN_TARGET_LOG_PROB))
