r"""
`DistillationSettings`: how the loss weights, fuses and compares the teachers, in one frozen object.

The trainer builds it once from its config (`DistillationSettings.from_config`), the functional API
(`hf_mtkd.losses.multi_teacher_kd_loss`, `compute_teacher_weights`, ...) from its keywords; it is validated when it
is built, and the loss reads it as it is (nothing is checked again per step or per chunk). What varies per batch
(labels, `num_items_in_batch`, `position_ids`, the teacher mask and the routing prior) is passed beside it.

The total loss is $\alpha_{ce} L_{ce} + \alpha_{kd} L_{kd} + \alpha_{feat} L_{feat}$ (see `hf_mtkd.losses`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .alignment import FEATURE_LOSSES
from .divergences import DEFAULT_BETA, DEFAULT_SKEW_ALPHA, DIVERGENCES, Divergence, divergence
from .fusion import FUSIONS
from .weighting import (
    CAUSAL_WEIGHTINGS,
    DEFAULT_WEIGHTING,
    GRANULARITIES,
    WEIGHTINGS,
    WeightingParameters,
    normalize_prior,
)

CONFIG_FIELDS = {
    "temperature": "temperature",
    "teacher_weighting": "weighting",
    "entropy_temperature": "entropy_temperature",
    "label_temperature": "label_temperature",
    "posterior_decay": "posterior_decay",
    "prompt_temperature": "prompt_temperature",
    "teacher_weights": "teacher_weights",
    "weighting_granularity": "granularity",
    "min_weight": "min_weight",
    "fusion": "fusion",
    "loss_chunk_size": "chunk_size",
    "alpha_kd": "alpha_kd",
    "alpha_ce": "alpha_ce",
    "alpha_feat": "alpha_feat",
    "feature_loss": "feature_loss",
    "normalize_feature_targets": "normalize_feature_targets",
    "divergence": "divergence",
    "beta": "beta",
    "skew_alpha": "skew_alpha",
}
"""`MultiTeacherDistillationConfig` field -> `DistillationSettings` field, for `from_config` (where
`cross_tokenizer_loss="uld"` replaces the divergence when some teacher runs in cross-tokenizer mode)."""


@dataclass(frozen=True)
class DistillationSettings:
    """
    The loss settings (the defaults are the functional API's; `from_config` takes a config's values).

    Weighting: `weighting` (a key of `hf_mtkd.weighting.WEIGHTINGS`), `entropy_temperature`, `label_temperature`,
    `posterior_decay`, `prompt_temperature` (of the prompt's evidence, when given), `teacher_weights` (the static
    prior, None: uniform), `granularity`, `min_weight`.
    Fusion and divergence: `temperature`, `fusion`, `divergence` (a key of `hf_mtkd.divergences.DIVERGENCES`) with
    `beta` (`jsd`) and `skew_alpha` (`skew_kl`, `skew_reverse_kl`).
    Memory: `chunk_size`. The total: `alpha_kd`, `alpha_ce` (None: no cross-entropy term is computed), `alpha_feat`
    with `feature_loss` and `normalize_feature_targets`.
    """

    temperature: float = 1.0
    """τ of the tempered distributions in the KD term."""
    weighting: str = DEFAULT_WEIGHTING
    entropy_temperature: float = 1.0
    """$\\gamma_H$ of `entropy`."""
    label_temperature: float = 1.0
    """$\\gamma$ of the label-aware weightings."""
    posterior_decay: float = 0.9
    """$\\lambda$ of `posterior`."""
    prompt_temperature: float = 1.0
    """$\\gamma_p$ of the prompt's evidence (`hf_mtkd.prompt_evidence`), when the loss is given it."""
    teacher_weights: tuple[float, ...] | Tensor | None = None
    """The static prior $\\pi$ (normalised when used; None: uniform); a list is kept as a tuple."""
    granularity: str = "token"
    min_weight: float = 0.0
    """The floor $m$ of every teacher's weight, below 1/K."""
    fusion: str = "probability"
    divergence: str = "forward_kl"
    """How the student is compared with the fused target (`hf_mtkd.divergences`); `uld`, the weighted ULD distance
    on each teacher's vocabulary."""
    beta: float = DEFAULT_BETA
    """β of the generalized JSD (`jsd`): 0 is the forward KL, 1 the reverse KL."""
    skew_alpha: float = DEFAULT_SKEW_ALPHA
    """α of the skew divergences, in [0, 1)."""
    chunk_size: int | None = None
    """Positions the loss reads at once (None: `hf_mtkd.losses.auto_chunk_size`)."""
    alpha_kd: float = 1.0
    alpha_ce: float | None = None
    alpha_feat: float = 0.0
    feature_loss: str = "mse"
    normalize_feature_targets: bool = False

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"Unknown teacher weighting {self.weighting!r}; choose one of {list(WEIGHTINGS)}.")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"Unknown weighting granularity {self.granularity!r}; choose one of {list(GRANULARITIES)}."
            )
        if self.fusion not in FUSIONS:
            raise ValueError(f"Unknown fusion {self.fusion!r}; choose one of {list(FUSIONS)}.")
        if self.divergence not in DIVERGENCES:
            renamed = " (`kl` is now `forward_kl`)" if self.divergence == "kl" else ""
            raise ValueError(f"Unknown divergence {self.divergence!r}{renamed}; choose one of {list(DIVERGENCES)}.")
        if not 0 <= self.beta <= 1:
            raise ValueError(f"`beta` (of the generalized JSD) must be in [0, 1], got {self.beta}.")
        if not 0 <= self.skew_alpha < 1:
            raise ValueError(f"`skew_alpha` (of the skew divergences) must be in [0, 1), got {self.skew_alpha}.")
        if self.feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"Unknown feature loss {self.feature_loss!r}; choose one of {list(FEATURE_LOSSES)}.")
        if not 0 <= self.min_weight < 1:
            raise ValueError(f"`min_weight` must be in [0, 1/K), got {self.min_weight}.")
        if not self.prompt_temperature > 0:
            raise ValueError(f"`prompt_temperature` must be positive, got {self.prompt_temperature}.")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"`chunk_size` must be a positive number of positions, got {self.chunk_size}.")
        if self.teacher_weights is not None and not isinstance(self.teacher_weights, Tensor):
            object.__setattr__(self, "teacher_weights", tuple(self.teacher_weights))

    @classmethod
    def from_config(cls, config: Any, *, cross_tokenizer: bool = False) -> DistillationSettings:
        """
        The settings of a `MultiTeacherDistillationConfig` (its fields named in `CONFIG_FIELDS`); its
        `cross_tokenizer_loss` applies when some teacher runs in cross-tokenizer mode (`cross_tokenizer`); ULD then
        replaces the fused divergence, so another `divergence` than the default is refused.
        """
        fields = {name: getattr(config, name) for name in CONFIG_FIELDS}
        if cross_tokenizer and config.cross_tokenizer_loss == "uld":
            if fields["divergence"] not in (None, "forward_kl"):
                raise ValueError(
                    f"`divergence={fields['divergence']!r}` has no effect with `cross_tokenizer_loss='uld'`: ULD "
                    "replaces the fused divergence when a teacher is on another tokenizer. Drop one of them "
                    "(`cross_tokenizer_loss='kl'` keeps the divergence, teachers mapped to the student's vocabulary)."
                )
            fields["divergence"] = "uld"
        return cls.from_fields(fields)

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> DistillationSettings:
        """
        The settings of a mapping of config field names (e.g. a method's fields), the others (and those given as
        None, e.g. a `beta` left unset) at their defaults.
        """
        return cls(
            **{setting: fields[name] for name, setting in CONFIG_FIELDS.items() if fields.get(name) is not None}
        )

    @property
    def kd_divergence(self) -> Divergence:
        """The `Divergence` of the fused target (`hf_mtkd.divergences.divergence`; not for `uld`)."""
        return divergence(self.divergence, beta=self.beta, skew_alpha=self.skew_alpha)

    @property
    def weighting_parameters(self) -> WeightingParameters:
        return WeightingParameters(self.entropy_temperature, self.label_temperature, self.posterior_decay)

    @property
    def causal(self) -> bool:
        """Whether a position's weights read only its own signals and earlier ones (so they can be made per chunk)."""
        return self.granularity == "token" and self.weighting in CAUSAL_WEIGHTINGS

    def check_num_teachers(self, num_teachers: int) -> None:
        """Refuse a `min_weight` that K teachers' weights cannot all reach (a prior of the wrong length: `prior`)."""
        if not 0 <= self.min_weight * num_teachers < 1:
            raise ValueError(f"`min_weight` must be in [0, 1/K) = [0, {1 / num_teachers:.4g}), got {self.min_weight}.")

    def prior(self, num_teachers: int, device: Any = None) -> Tensor:
        """The static prior $\\pi$ `[K]` (float64, summing to 1), see `hf_mtkd.weighting.normalize_prior`."""
        return normalize_prior(self.teacher_weights, num_teachers, device=device)
