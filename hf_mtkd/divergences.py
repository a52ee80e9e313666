r"""
Divergences between the fused teacher target $\bar p$ (`hf_mtkd.fusion`) and the student's tempered distribution
$q = \mathrm{softmax}(z_s / \tau)$, per position of a chunk.

* `kl` (forward KL, the default): $\mathrm{KL}(\bar p \| q) = \sum_v \bar p_v \log \bar p_v - \sum_v \bar p_v \log
  q_v$, whose gradient in the student's logits is $(q - \bar p) / \tau$ (written by `hf_mtkd.chunked`);
* `uld` (Universal Logit Distillation, for teachers on other vocabularies): $\sum_i |p^{\downarrow}_{k,i} -
  q^{\downarrow}_i|$ between the sorted distributions of each teacher and the student, weighted per teacher
  (`hf_mtkd.losses.universal_logit_distillation_loss`); it needs no shared vocabulary and no fused target.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .fusion import DenseTarget, SparseTarget
from .storage import rowdot

DIVERGENCES = ("kl", "uld")


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
