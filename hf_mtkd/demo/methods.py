"""The methods the demo compares, and the hyperparameters each may tune on the validation split."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
    routed: bool = False
    """Each training row names its domain's teacher (a `teacher_ids` column, `hf_mtkd.routing`): routing by hand."""
    prompt_tokens: int = 0
    """Each training block's first tokens are a prompt without loss (what on-policy batches continue); 0: none."""
    tuned_as: str | None = None
    """The row whose tuned hyperparameters it runs with (None: its own)."""


ROUTING = "domain routing"
"""The row that routes each training row to its domain's specialist by hand: the labelled upper-bound baseline."""

DEFAULT_METHOD = {"domains": "posterior", "genres": "entropy"}
"""Each scenario's shipped default weighting, the row the report compares with the baselines (chosen on the
validation split: see docs/demo.md)."""


def demo_methods(domains: tuple[str, ...], scenario: str = "domains") -> list[Method]:
    """
    No teacher, each single teacher, the static ensemble, routing by domain, and the dynamic weightings; the genres
    scenario adds logit fusion, feature alignment and `entropy+posterior`.
    """
    entropy = {"entropy_temperature": (0.5, 2.0)}
    label = {"label_temperature": (0.5, 2.0)}
    posterior = {**label, "posterior_decay": (0.5, 0.99)}
    static = {"teacher_weighting": "static"}
    features = {"teacher_weighting": "entropy", "alpha_feat": 0.1}
    baselines = [
        Method("no teacher (CE only)"),
        *[Method(f"single: {d}", (d,), static) for d in domains],
        Method("static ensemble", domains, {**static, "fusion": "probability"}),
    ]
    extra = [Method("static ensemble, logit fusion", domains, {**static, "fusion": "logit"})]
    dynamic = [
        Method("entropy", domains, {"teacher_weighting": "entropy"}, entropy),
        Method("entropy + features", domains, features, {"alpha_feat": (0.03, 0.3)}),
        Method("correctness", domains, {"teacher_weighting": "correctness"}, label),
        Method("posterior", domains, {"teacher_weighting": "posterior"}, posterior),
        Method("entropy+posterior", domains, {"teacher_weighting": "entropy+posterior"}, posterior),
        Method("likelihood", domains, {"teacher_weighting": "likelihood"}, {"label_temperature": (4.0, 16.0, 64.0)}),
    ]
    routing = Method(ROUTING, domains, static, routed=True)
    if scenario == "genres":
        return [*baselines, *extra, routing, *dynamic]
    return [*baselines, routing, *[m for m in dynamic if m.name not in ("entropy + features", "entropy+posterior")]]


PROMPT_TOKENS = 16
"""The on-policy comparison's prompt: the first tokens of every training block, which carry no loss."""
LMBDA = 0.5
"""The on-policy share of that comparison, GKD's default (not tuned)."""


def on_policy_methods(domains: tuple[str, ...], block_size: int, scenario: str = "domains") -> list[Method]:
    """
    The on-policy comparison (`--on_policy`): every training block keeps its first `PROMPT_TOKENS` as a prompt
    without loss; no teacher; routing by hand and the scenario's default weighting, each off-policy (the blocks'
    own continuations) and with `LMBDA` of the batches continued by the student itself (sampled at temperature 1
    up to the block's length; a routed row's own text keeps its row's teacher), and the default weighting with the
    prompt's evidence (`prompt_evidence`, γ_p = 1, untuned), each pair with its off-policy row's tuned
    hyperparameters (the default weighting's). The default weighting's on-policy row comes last.
    """
    default = DEFAULT_METHOD[scenario]
    weighting = {"teacher_weighting": default}
    with_prompt = {**weighting, "prompt_evidence": True}
    static = {"teacher_weighting": "static"}
    sampling = {"lmbda": LMBDA, "max_new_tokens": block_size - PROMPT_TOKENS, "generation_temperature": 1.0}
    prompted = {"prompt_tokens": PROMPT_TOKENS, "tuned_as": default}
    routed = {"prompt_tokens": PROMPT_TOKENS, "tuned_as": ROUTING, "routed": True}
    return [
        Method("no teacher (CE only), prompted", prompt_tokens=PROMPT_TOKENS),
        Method(off_policy_name(ROUTING), domains, static, **routed),
        Method(on_policy_name(ROUTING), domains, {**static, **sampling}, **routed),
        Method(off_policy_name(with_prompt_name(default)), domains, with_prompt, **prompted),
        Method(on_policy_name(with_prompt_name(default)), domains, {**with_prompt, **sampling}, **prompted),
        Method(off_policy_name(default), domains, weighting, **prompted),
        Method(on_policy_name(default), domains, {**weighting, **sampling}, **prompted),
    ]


def with_prompt_name(row: str) -> str:
    """The row of weighting `row` with the prompt's evidence (`prompt_evidence`)."""
    return f"{row} + prompt evidence"


def with_settings(method: Method, **settings: Any) -> Method:
    """`method` with these config fields fixed as well (its name and tuning unchanged)."""
    return replace(method, settings={**method.settings, **settings})


def off_policy_name(row: str) -> str:
    """The off-policy row of `row` (a weighting, or `ROUTING`) in the on-policy comparison."""
    return f"{row}, off-policy"


def on_policy_name(row: str) -> str:
    """The on-policy row of `row` in the on-policy comparison."""
    return f"{row}, on-policy (λ = {LMBDA})"


def on_policy_pairs(scenario: str = "domains") -> list[tuple[str, str]]:
    """
    The on-policy comparison's pairs (a row, its baseline): each on-policy row against its off-policy one, and the
    default weighting with the prompt's evidence against it without, off- and on-policy.
    """
    default = DEFAULT_METHOD[scenario]
    prompt = with_prompt_name(default)
    return [
        *[(on_policy_name(row), off_policy_name(row)) for row in (default, prompt, ROUTING)],
        *[(name(prompt), name(default)) for name in (off_policy_name, on_policy_name)],
    ]


def pretrained_methods(methods: list[Method]) -> list[Method]:
    """
    The pretrained-teacher scenario's default rows out of `methods` (its teacher is slow on CPU): no teacher, each
    single teacher, the static ensemble, `entropy` and `entropy+posterior`.
    """
    kept = ("no teacher (CE only)", "static ensemble", "entropy", "entropy+posterior")
    return [m for m in methods if m.name in kept or len(m.teachers) == 1]


def tuned_hparams(tuned: dict[str, Any], method: Method) -> tuple[dict[str, Any], str]:
    """
    The hyperparameters `method` runs with and where they come from: its own entry of `tuned` (chosen on the
    validation split); else, for a single teacher, the entry every tuned single teacher agreed on; else τ = 2,
    `alpha_kd` = 0.5.
    """
    name = method.tuned_as or method.name
    if name in tuned:
        return tuned[name]["hparams"], "tuned" if name == method.name else f"tuned for {name}"
    singles = [entry["hparams"] for name, entry in tuned.items() if name.startswith("single: ")]
    if len(method.teachers) == 1 and singles and all(h == singles[0] for h in singles):
        return singles[0], "shared by the tuned single teachers"
    return {"temperature": 2.0, "alpha_kd": 0.5}, "untuned default"
