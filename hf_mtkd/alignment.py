"""Feature alignment: which hidden layers are paired, and the learned projections from student to teacher width."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from .model_config import text_config

LayerPairs = list[list[tuple[int, int]]]
FEATURE_LOSSES = ("mse", "cosine")
"""Distances between projected student and teacher hidden states (`hf_mtkd.losses.feature_alignment_loss`)."""


def depth_and_width(model: nn.Module, name: str) -> tuple[int, int]:
    """(number of hidden layers, hidden size) of a transformers model, read from its (text) config."""
    config = text_config(model)
    depth = getattr(config, "num_hidden_layers", None)
    width = getattr(config, "hidden_size", None)
    if depth is None or width is None:
        raise ValueError(
            f"Cannot align hidden states of {name}: its config has no `num_hidden_layers`/`hidden_size`. Pass "
            "`feature_layers` for a transformers model, or set `alpha_feat=0`."
        )
    return depth, width


def default_layer_pairs(student_depth: int, teacher_depths: Sequence[int]) -> LayerPairs:
    """
    For every teacher, the student's middle and last layers, each paired with the teacher layer at the same relative
    depth: student layer `l` goes with teacher layer `round(l * L_k / L_s)`.
    """
    student_layers = sorted({math.ceil(student_depth / 2), student_depth})
    return [[(layer, round(layer * depth / student_depth)) for layer in student_layers] for depth in teacher_depths]


def resolve_layer_pairs(
    feature_layers: LayerPairs | None,
    student_depth: int,
    teacher_depths: Sequence[int],
    teacher_names: Sequence[str],
) -> LayerPairs:
    """
    The layer pairs to align, with negative indices resolved, checked against each model's depth.

    Layer `i` means `hidden_states[i]`: 0 is the embedding output and `depth` the last layer.
    """
    if feature_layers is None:
        return default_layer_pairs(student_depth, teacher_depths)
    resolved = []
    for teacher_pairs, depth, name in zip(feature_layers, teacher_depths, teacher_names, strict=True):
        pairs = []
        for student_layer, teacher_layer in teacher_pairs:
            pairs.append(
                (
                    _resolve_index(student_layer, student_depth, "the student"),
                    _resolve_index(teacher_layer, depth, f"teacher {name!r}"),
                )
            )
        resolved.append(pairs)
    if not any(resolved):
        raise ValueError("`feature_layers` has no pair for any teacher, but `alpha_feat > 0` asks to align features.")
    return resolved


def _resolve_index(index: int, depth: int, owner: str) -> int:
    if not -(depth + 1) <= index <= depth:
        raise ValueError(
            f"Layer index {index} is out of range for {owner}, which has {depth} layers: valid hidden-state "
            f"indices are 0..{depth} (0 = embeddings) or -{depth + 1}..-1 from the end."
        )
    return index % (depth + 1)


class FeatureProjector(nn.Module):
    """
    One learned `Linear(d_student, d_teacher)` per aligned (student layer, teacher layer) pair.

    Attributes:
        pairs: `(teacher index, student layer, teacher layer)` for each projection, in order.
    """

    def __init__(self, layer_pairs: LayerPairs, student_width: int, teacher_widths: Sequence[int]) -> None:
        super().__init__()
        self.pairs = [
            (k, student_layer, teacher_layer)
            for k, teacher_pairs in enumerate(layer_pairs)
            for student_layer, teacher_layer in teacher_pairs
        ]
        self.projections = nn.ModuleList(nn.Linear(student_width, teacher_widths[k]) for k, _, _ in self.pairs)

    def forward(self, student_features: Sequence[Tensor]) -> list[Tensor]:
        """Project one student hidden-state tensor `[..., d_student]` per pair to that pair's teacher width."""
        return [
            projection(features.to(projection.weight.dtype))
            for projection, features in zip(self.projections, student_features, strict=True)
        ]
