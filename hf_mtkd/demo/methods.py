"""The methods the demo compares, and the hyperparameters each may tune on the validation split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GRID = {"temperature": (1.0, 2.0), "alpha_kd": (0.5, 0.9)}
"""Every distillation method tunes these jointly (alpha_ce = 1 - alpha_kd)."""


@dataclass(frozen=True)
class Method:
    """One row of the comparison."""

    name: str
    teachers: tuple[str, ...] = ()
    """Domains of the specialist teachers it distils from; empty: no teacher (cross-entropy only)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Fixed `MultiTeacherDistillationConfig` fields."""
    refine: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """Further stages of tuning, one hyperparameter at a time, each tried at the best point found so far."""


def demo_methods(domains: tuple[str, ...]) -> list[Method]:
    """No teacher, each single teacher, the static ensembles, and the dynamic weightings."""
    entropy = {"entropy_temperature": (0.5, 2.0)}
    label = {"label_temperature": (0.5, 2.0)}
    posterior = {**label, "posterior_decay": (0.5, 0.99)}
    features = {"teacher_weighting": "entropy", "alpha_feat": 0.1}
    return [
        Method("no teacher (CE only)"),
        *[Method(f"single: {d}", (d,), {"teacher_weighting": "static"}) for d in domains],
        Method("static ensemble", domains, {"teacher_weighting": "static", "fusion": "probability"}),
        Method("static ensemble, logit fusion", domains, {"teacher_weighting": "static", "fusion": "logit"}),
        Method("entropy", domains, {"teacher_weighting": "entropy"}, entropy),
        Method("entropy + features", domains, features, {"alpha_feat": (0.03, 0.3)}),
        Method("correctness", domains, {"teacher_weighting": "correctness"}, label),
        Method("posterior", domains, {"teacher_weighting": "posterior"}, posterior),
        Method("entropy+posterior", domains, {"teacher_weighting": "entropy+posterior"}, posterior),
    ]
