r"""
The logit-free loss: logits kept as final hidden states at the valid positions and an output head, made a chunk at
a time, so that no `[B, T, V]` or `[N, V]` tensor exists for the student or any teacher.

A model's next-token logits are $z = h W^\top + b$, h its final hidden states (after the final norm), W its output
embedding `[V, d]` and b its bias (usually none). `HeadLogits` holds h at the N valid positions (those with a
next-token label, in row-major order) with W and b, and stands wherever the loss takes a teacher's logits: each chunk
of positions reads `h[chunk] @ W.T + b` (`HeadLogits.dense`). For the student, `HiddenStudent` is the chunked
driver's strategy (`hf_mtkd.chunked.StudentLogits`): the same per-chunk math as on `[B, T, V]` logits gives
$G = \partial L / \partial z$ `[n, V]` of the chunk, which is turned at once into the gradients of the student's
hidden states and head,

$$\frac{\partial L}{\partial h_{chunk}} = G W, \qquad \frac{\partial L}{\partial W} = \sum_{chunks} G^\top h_{chunk},
\qquad \frac{\partial L}{\partial b} = \sum_{chunks} \sum_n G_n,$$

so the pass holds O(chunk x V) beside the O(V x d) gradient of the head. The loss equals the one on the logits
$hW^\top + b$ exactly (same chunks, same reductions).

Weightings that read no later position (every one at `token` granularity but `likelihood`; `posterior` carries its
running sums from chunk to chunk) are made in the same pass as the KL, so each teacher's head runs once. Those that
pool over a document, a sequence or the batch need every position's statistics before the first weight: a first
chunked pass computes the teachers' entropies and true-token log-probabilities `[K, N]` and keeps those (O(K x N)
numbers, what the weights read), and the main pass computes each teacher's chunk logits again: keeping them would be
the `[N, V]` tensors this path avoids. That doubles the teachers' head compute for those weightings only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunked import Chunk, StudentLogits, next_token_mask
from .dtypes import upcast
from .storage import RowsOnDemand, TeacherLogits, TopKLogProbs


@dataclass(frozen=True)
class HeadLogits:
    r"""
    The logits $z = h W^\top + b$ of N positions, kept as `hidden` `[N, d]` and the output head (`weight` `[V', d]`,
    `bias` `[V']`), `vocab_size` wide: columns from V' on are -inf (probability 0), for a teacher whose head is
    cut to the vocabulary it shares with the student (`hf_mtkd.teachers.on_student_vocabulary`).

    It stands for the `[1, N, V]` logits of the valid positions of a batch (`shape`), read chunk by chunk.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    vocab_size: int | None = None
    """V, the width of the logits (None: V', the head's rows)."""

    def __post_init__(self) -> None:
        if self.hidden.dim() != 2 or self.weight.dim() != 2 or self.hidden.shape[-1] != self.weight.shape[-1]:
            raise ValueError(
                f"Hidden states {tuple(self.hidden.shape)} and output head {tuple(self.weight.shape)} do not fit: "
                "expected [N, d] hidden states at the valid positions and a [V, d] head weight."
            )
        if self.bias is not None and self.bias.shape != self.weight.shape[:1]:
            raise ValueError(f"The head's bias {tuple(self.bias.shape)} must be [V] = [{self.weight.shape[0]}].")
        if self.vocab_size is not None and self.vocab_size < self.weight.shape[0]:
            raise ValueError(f"`vocab_size` {self.vocab_size} is below the head's {self.weight.shape[0]} rows.")

    @classmethod
    def at_valid(
        cls,
        hidden_states: Tensor,
        labels: Tensor,
        weight: Tensor,
        bias: Tensor | None = None,
        vocab_size: int | None = None,
    ) -> HeadLogits:
        """The head logits of `[B, T, d]` final hidden states at the valid positions of `labels` `[B, T]`."""
        return cls(hidden_states[next_token_mask(labels)], weight, bias, vocab_size)

    @property
    def width(self) -> int:
        return self.weight.shape[0] if self.vocab_size is None else self.vocab_size

    @property
    def shape(self) -> tuple[int, int, int]:
        """`(1, N, V)`, the shape of the logits this stands for."""
        return (1, self.hidden.shape[0], self.width)

    def logits(self, rows: slice) -> Tensor:
        """$h W^\\top + b$ `[n, V']` at the positions `rows`, in the model's dtype (as its head would compute it)."""
        return F.linear(self.hidden[rows], self.weight, self.bias)

    def dense(self, rows: slice) -> Tensor:
        """The logits `[n, V]` at the positions `rows`, float32 (or wider), -inf from V' on."""
        logits = upcast(self.logits(rows))
        if self.width == logits.shape[-1]:
            return logits
        return F.pad(logits, (0, self.width - logits.shape[-1]), value=-math.inf)

    def take(self, positions: Tensor) -> HeadLogits:
        """The same head at some of the N positions (`positions`: `[N]` bool, or indices)."""
        return HeadLogits(self.hidden[positions], self.weight, self.bias, self.vocab_size)

    def detach(self) -> HeadLogits:
        return HeadLogits(
            self.hidden.detach(),
            self.weight.detach(),
            None if self.bias is None else self.bias.detach(),
            self.vocab_size,
        )


def any_head_logits(logits: Sequence[TeacherLogits | HeadLogits]) -> bool:
    """Whether some of `logits` are given at the valid positions only (`HeadLogits`, packed `RowsOnDemand`)."""
    return any(isinstance(x, HeadLogits) or (isinstance(x, RowsOnDemand) and x.packed) for x in logits)


def at_valid_positions(teacher: TeacherLogits | HeadLogits, mask: Tensor) -> TeacherLogits | HeadLogits:
    """
    A teacher beside logit-free inputs, at the valid positions `mask` `[B, T]` only: `HeadLogits` as they are, a
    `TopKLogProbs` as `[1, N, k]`, `RowsOnDemand` by their own `at_valid`, `[B, T, V]` logits as `[1, N, V]` (a
    copy).
    """
    if isinstance(teacher, HeadLogits):
        if teacher.hidden.shape[0] != int(mask.sum()):
            raise ValueError(
                f"Logit-free teacher outputs hold {teacher.hidden.shape[0]} positions but the labels have "
                f"{int(mask.sum())} valid ones: take the hidden states at the valid positions (`HeadLogits.at_valid`)."
            )
        return teacher
    if isinstance(teacher, RowsOnDemand):
        return teacher.at_valid(mask)
    if isinstance(teacher, TopKLogProbs):
        return TopKLogProbs(
            teacher.indices[mask][None],
            teacher.log_probs[mask][None],
            teacher.log_tail_mass[mask][None],
            teacher.vocab_size,
            teacher.support,
        )
    return teacher[mask][None]


class HiddenStudent(StudentLogits):
    r"""
    The student as `HeadLogits` (its full head, `vocab_size` None): each chunk's logits by a matmul, and the chunk's
    $G = \partial L / \partial z$ turned into $\partial L / \partial h = G W$ (rows of the chunk), $\partial L /
    \partial W \mathrel{+}= G^\top h$ and $\partial L / \partial b \mathrel{+}= \sum_n G_n$ at once. The head's
    gradients are summed in float32 (or wider) and cast to the head's dtype at the end.
    """

    def __init__(self, head: HeadLogits) -> None:
        if head.width != head.weight.shape[0]:
            raise ValueError("The student's `HeadLogits` must be its whole head (no `vocab_size` beyond its rows).")
        self.head = head
        self.inputs = (head.hidden, head.weight, head.bias)
        self.vocab_size = head.width
        self.grad_hidden: Tensor | None = None
        self.grad_weight: Tensor | None = None
        self.grad_bias: Tensor | None = None

    def logits(self, rows: slice) -> Tensor:
        return upcast(self.head.logits(rows))

    def start(self, needs_grad: Sequence[bool], runs: Sequence[Chunk], num_positions: int) -> None:
        hidden, weight, bias = self.inputs
        wide = upcast(weight.new_empty(())).dtype
        if needs_grad[0]:
            self.grad_hidden = torch.zeros_like(hidden)
        if needs_grad[1]:
            self.grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device)
        if needs_grad[2]:
            self.grad_bias = torch.zeros(bias.shape, dtype=wide, device=bias.device)

    def write(self, rows: slice, grad: Tensor) -> None:
        hidden, weight, _ = self.inputs
        if self.grad_hidden is not None:
            self.grad_hidden[rows] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
        if self.grad_weight is not None:
            self.grad_weight.addmm_(grad.T.to(self.grad_weight.dtype), hidden[rows].to(self.grad_weight.dtype))
        if self.grad_bias is not None:
            self.grad_bias.add_(grad.sum(dim=0).to(self.grad_bias.dtype))

    def grads(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        _, weight, bias = self.inputs
        return (
            self.grad_hidden,
            None if self.grad_weight is None else self.grad_weight.to(weight.dtype),
            None if self.grad_bias is None else self.grad_bias.to(bias.dtype),
        )
