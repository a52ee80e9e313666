r"""
The teacher's probability of the student's whole next token, chained over the teacher's own tokens.

A teacher with shorter tokens than the student's spells the student's next token y as m >= 2 tokens of its own,
$a_1 \dots a_m$ (the same text from the aligned start on). The vocabulary map puts the teacher's mass on $a_1$ on the
student token that begins $a_1$'s text (`hf_mtkd.cross_tokenizer.VocabularyMap`), so y itself gets little or none.
Yet the teacher's forward pass on the text already holds its probability of y's text along its own tokens, at its
positions j (aligned with the student's) to j+m-1:

$$c = p_\tau(a_1 \mid x_{\le j}) \prod_{i=2}^{m} p_\tau(a_i \mid x_{\le j}, a_{<i}),$$

each factor at the temperature $\tau$ ($p_\tau = \mathrm{softmax}(z/\tau)$). The chained target moves c from the
student token that $a_1$ maps to onto y: $\tilde p(y) \mathrel{+}= c$, $\tilde p(\mathrm{map}(a_1)) \mathrel{-}= c$
(c <= p(a_1), so the total and every entry stay non-negative); where the map carried no mass of $a_1$ (unmapped, or
mapped by prefix with `prefix_mass` off) c is only added, and renormalised with the rest. At $\tau = 1$ the
teacher's probability of the student's true token is then its own probability of that text (along its own
tokenization of it); the rest of $a_1$'s mass, its other continuations, stays where the map put it.

The collator finds the chains (`chain_stops`, from character offsets); the teacher's tempered log-probabilities of
$a_2 \dots a_m$ are read at its interior positions (`interior_positions`, `rest_log_probs`); the loss moves the mass
a chunk of rows at a time (`TokenChains.move`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

CHAIN_STOP_KEY = "chain_stop"
"""
Key of a cross-tokenizer teacher's `[B, T_student]` chain ends in its inputs (`MultiTokenizerCollator`): the teacher
position whose next token ends the student's next token, when the teacher spells it as several tokens, else -1.
"""


def text_start(text: str, span: Sequence[int]) -> int:
    """Where a token's text starts, its leading whitespace skipped (a whitespace-only token: where it starts)."""
    start, stop = span
    first = start
    while first < stop and text[first].isspace():
        first += 1
    return start if first == stop else first


def chain_stops(
    student_text: str,
    student_offsets: Sequence[Sequence[int]],
    position_map: Sequence[int],
    teacher_text: str,
    teacher_offsets: Sequence[Sequence[int]],
    teacher_special: Sequence[int],
) -> list[int]:
    """
    For each student position t aligned with teacher position j (`position_map[t]`), the teacher position i-1 whose
    next token i ends the text of the student's next token t+1, when the teacher spells that text (from its first
    non-space character) as the m = i - j >= 2 ordinary tokens j+1..i, and neither model's token ends inside a
    character split into bytes; -1 elsewhere.
    """
    stops = [-1] * len(position_map)
    size = len(teacher_offsets)
    for t, j in enumerate(position_map):
        if j < 0 or t + 1 >= len(student_offsets) or j + 2 >= size:
            continue
        end = student_offsets[t + 1][1]
        if t + 2 < len(student_offsets) and 0 < student_offsets[t + 2][1] and student_offsets[t + 2][0] < end:
            continue  # the student's token is part of a character
        want = student_text[text_start(student_text, student_offsets[t + 1]) : end]
        first = text_start(teacher_text, teacher_offsets[j + 1])
        i = j + 1
        while i < size and not teacher_special[i] and teacher_offsets[i][1] - first < len(want):
            i += 1
        if i >= size or i < j + 2 or teacher_special[i]:
            continue
        stop = teacher_offsets[i][1]
        if i + 1 < size and not teacher_special[i + 1] and teacher_offsets[i + 1][0] < stop:
            continue  # the teacher's token is part of a character
        if teacher_text[first:stop] == want:
            stops[t] = i - 1
    return stops


def interior_positions(position_map: Tensor, chain_stop: Tensor, length: int) -> Tensor:
    """`[B, T_k]` bool: the teacher positions j+1..stop inside each chain (where $a_2 \\dots a_m$ are predicted)."""
    rows = position_map.shape[0]
    chained = chain_stop >= 0
    marks = torch.zeros(rows, length + 1, dtype=torch.long, device=position_map.device)
    row = torch.arange(rows, device=position_map.device)[:, None].expand_as(position_map)[chained]
    marks.index_put_((row, position_map[chained] + 1), torch.ones_like(row), accumulate=True)
    marks.index_put_((row, chain_stop[chained] + 1), -torch.ones_like(row), accumulate=True)
    return marks.cumsum(dim=1)[:, :length] > 0


def rest_log_probs(log_prob: Tensor, interior: Tensor, position_map: Tensor, chain_stop: Tensor) -> Tensor:
    r"""
    `[B, T]` $\sum_{i=2}^{m} \log p_\tau(a_i \mid \dots)$ of each student position's chain (0 where none), from the
    teacher's tempered log-probabilities `log_prob` `[n]` of its next tokens at its n `interior` positions.
    """
    per_position = log_prob.new_zeros(interior.shape)
    per_position[interior] = log_prob
    totals = per_position.cumsum(dim=1)
    chained = chain_stop >= 0
    before = totals.gather(1, position_map.clamp(min=0))
    through = totals.gather(1, chain_stop.clamp(min=0))
    return (through - before).where(chained, 0.0)


@dataclass(frozen=True)
class TokenChains:
    """The chains of a batch's student positions (or of some rows of them, `at`), for `move`."""

    first: Tensor
    """The teacher's first token $a_1$ of each chain (0 where none)."""
    target: Tensor
    """The student's next token y (0 where none)."""
    rest_log_prob: Tensor
    r"""$\sum_{i \ge 2} \log p_\tau(a_i \mid \dots)$ (`rest_log_probs`)."""
    chained: Tensor
    """bool, where a chain is known."""

    def at(self, positions: Tensor) -> TokenChains:
        """The chains at flat positions `positions` `[n]` (into the `[B, T]` tensors)."""
        return TokenChains(*(tensor.flatten()[positions] for tensor in self.fields()))

    def fields(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.first, self.target, self.rest_log_prob, self.chained

    def amounts(self, probs: Tensor, index: Tensor, carried: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """
        Of n rows' tempered teacher distributions `probs` `[n, V_k]`, given the map's `index` and the teacher tokens
        whose mass it `carried` (`VocabularyMap`): the mass c `[n]` that goes onto the student's token (0 where no
        chain is known), the student token that $a_1$'s mass went to `[n]`, and whether it went anywhere `[n]` (c
        then leaves it).
        """
        amount = probs.gather(-1, self.first[:, None])[:, 0] * self.rest_log_prob.to(probs.dtype).exp()
        leaves = self.chained & carried[self.first]
        return amount.where(self.chained, 0.0), index[self.first].clamp(min=0), leaves

    def move(self, mapped: Tensor, probs: Tensor, index: Tensor, carried: Tensor) -> Tensor:
        """
        Put each row's chained mass c on the student's next token, in the mapped masses `mapped` `[n, V_s]`, taken
        from the student token that $a_1$'s mass went to, if it went anywhere (else c is added, and renormalised).
        """
        amount, source, leaves = self.amounts(probs, index, carried)
        mapped.scatter_add_(-1, self.target[:, None], amount[:, None])
        mapped.scatter_add_(-1, source[:, None], -amount.where(leaves, 0.0)[:, None])
        return mapped.clamp_(min=0)
