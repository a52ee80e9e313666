r"""
Routing by a dataset column: each row may name the teacher(s) that should teach it.

A row's value in the routing column (`MultiTeacherDistillationConfig.routing_column`, `teacher_ids` by default) is
one of

* a teacher index (an integer) or name (a string, one of the trainer's teacher names): that teacher alone;
* a list of indices and/or names: uniform over the listed teachers;
* a list of K non-negative numbers with a positive sum (floats): a per-row prior over the K teachers, normalised;
* None (a row without routing): uniform, which changes nothing.

`RoutingCollator` turns the values of a batch into `teacher_prior`, a float tensor `[B, K]` whose rows sum to 1, and
the loss multiplies the teacher weights by it: $w_k(b, t) \propto \pi_k r_{b,k} \exp(s_k(b, t))$ (see
`hf_mtkd.weighting`). A one-hot row is routing by hand; with `teacher_weighting="static"` every row is taught by
exactly the teachers it names.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

ROUTING_KEY = "teacher_prior"
"""The batch key under which the collator carries the per-row prior `[B, K]`."""


def _usage(num_teachers: int) -> str:
    return (
        f"give a teacher index in [0, {num_teachers}), a teacher name, a list of them, or {num_teachers} "
        "non-negative weights"
    )


def _teacher_index(value: Any, teacher_names: Sequence[str], column: str) -> int:
    """The index of one teacher given by index or name."""
    num_teachers = len(teacher_names)
    if isinstance(value, str):
        if value not in teacher_names:
            raise ValueError(
                f"`{column}` names an unknown teacher {value!r}; the teachers are {list(teacher_names)} "
                f"({_usage(num_teachers)})."
            )
        return teacher_names.index(value)
    if not 0 <= value < num_teachers:
        raise ValueError(
            f"`{column}` teacher index {int(value)} is out of range for {num_teachers} teachers "
            f"({_usage(num_teachers)})."
        )
    return int(value)


def _is_teacher(value: Any) -> bool:
    return isinstance(value, (str, numbers.Integral)) and not isinstance(value, (bool, np.bool_))


def routing_prior(value: Any, teacher_names: Sequence[str], column: str = "teacher_ids") -> list[float]:
    """One row's routing value (see the module docstring) as K non-negative floats summing to 1."""
    num_teachers = len(teacher_names)
    if value is None:
        return [1.0 / num_teachers] * num_teachers
    if _is_teacher(value):
        value = [value]
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) == 0:
        raise ValueError(f"`{column}` value {value!r} is not a teacher or a non-empty list ({_usage(num_teachers)}).")
    if all(_is_teacher(v) for v in value):
        chosen = {_teacher_index(v, teacher_names, column) for v in value}
        return [1.0 / len(chosen) if k in chosen else 0.0 for k in range(num_teachers)]
    if not all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in value):
        raise ValueError(
            f"`{column}` value {value!r} mixes weights with teachers or other types ({_usage(num_teachers)})."
        )
    if len(value) != num_teachers:
        raise ValueError(
            f"`{column}` weights {value!r} have {len(value)} entries but there are {num_teachers} teachers: give one "
            "weight per teacher, in the trainer's teacher order."
        )
    if not all(math.isfinite(v) and v >= 0 for v in value):
        raise ValueError(f"`{column}` weights {value!r} must be finite and non-negative.")
    total = float(sum(value))
    if total <= 0:
        raise ValueError(f"`{column}` weights {value!r} are all zero: a row must keep at least one teacher.")
    return [float(v) / total for v in value]


def _splits(dataset: Any) -> list[tuple[str, Any]]:
    if isinstance(dataset, Mapping):
        return [(f"[{key!r}]", split) for key, split in dataset.items()]
    return [("", dataset)]


def check_routing_column(column: str, teacher_names: Sequence[str], **datasets: Any) -> bool:
    """
    Check every row's routing value of the datasets (given by role, e.g. `train_dataset=...`) that have `column`,
    naming the first bad row; whether any of them has it. Datasets without `column_names` (iterable ones) are
    checked batch by batch by the collator instead.
    """
    found = False
    for role, dataset in datasets.items():
        for key, split in _splits(dataset) if dataset is not None else []:
            if column not in (getattr(split, "column_names", None) or []):
                continue
            found = True
            seen: set[Any] = set()
            for row, value in enumerate(split[column]):
                key_value = repr(value)
                if key_value in seen:
                    continue
                try:
                    routing_prior(value, teacher_names, column)
                except ValueError as err:
                    raise ValueError(f"Row {row} of the {role}{key}: {err}") from None
                seen.add(key_value)
    return found


class RoutingCollator:
    """
    Wraps any collator: takes the routing column out of the examples, lets `collator` batch the rest, and adds
    `teacher_prior` `[B, K]` (rows summing to 1; uniform for an example without a value). A batch in which no
    example has the column passes through unchanged, without `teacher_prior`.
    """

    def __init__(
        self, collator: Callable[[list[dict[str, Any]]], Any], column: str, teacher_names: Sequence[str]
    ) -> None:
        self.collator, self.column, self.teacher_names = collator, column, list(teacher_names)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> Any:
        if not any(self.column in f for f in features):
            return self.collator(features)
        prior = torch.tensor(
            [routing_prior(f.get(self.column), self.teacher_names, self.column) for f in features],
            dtype=torch.float32,
        )
        batch = self.collator([{k: v for k, v in f.items() if k != self.column} for f in features])
        batch[ROUTING_KEY] = prior
        return batch
