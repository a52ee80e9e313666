"""`DistillationSettings`: one frozen object built from the config once, validated when built."""

import dataclasses

import pytest
import torch
from test_losses import random_logits

from hf_mtkd import MultiTeacherDistillationConfig
from hf_mtkd.losses import DistillationLoss, compute_teacher_weights, multi_teacher_kd
from hf_mtkd.settings import CONFIG_FIELDS, DistillationSettings


def test_every_setting_comes_from_a_config_field():
    config_fields = {f.name for f in dataclasses.fields(MultiTeacherDistillationConfig)}
    assert set(CONFIG_FIELDS) <= config_fields
    assert sorted(CONFIG_FIELDS.values()) == sorted(f.name for f in dataclasses.fields(DistillationSettings))
    config = MultiTeacherDistillationConfig(
        output_dir="unused",
        report_to="none",
        temperature=3.0,
        teacher_weighting="posterior",
        teacher_weights=[1, 3],
        weighting_granularity="sequence",
        min_weight=0.1,
        fusion="logit",
        loss_chunk_size=7,
        alpha_feat=0.2,
        feature_loss="cosine",
    )
    settings = DistillationSettings.from_config(config)
    assert settings == DistillationSettings(
        temperature=3.0,
        weighting="posterior",
        teacher_weights=(1, 3),
        granularity="sequence",
        min_weight=0.1,
        fusion="logit",
        chunk_size=7,
        alpha_kd=0.5,
        alpha_ce=0.5,
        alpha_feat=0.2,
        feature_loss="cosine",
        normalize_feature_targets=True,
    )
    assert DistillationSettings.from_fields({"teacher_weighting": "static", "temperature": 2.0}) == (
        DistillationSettings(weighting="static", temperature=2.0)
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.temperature = 1.0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"weighting": "oracle"}, "Unknown teacher weighting 'oracle'"),
        ({"granularity": "epoch"}, "Unknown weighting granularity 'epoch'"),
        ({"fusion": "max"}, "Unknown fusion 'max'"),
        ({"feature_loss": "l1"}, "Unknown feature loss 'l1'"),
        ({"min_weight": -0.1}, r"`min_weight` must be in \[0, 1/K\)"),
        ({"chunk_size": 0}, "`chunk_size` must be a positive number of positions"),
    ],
)
def test_bad_settings_are_refused_when_built(settings, message):
    with pytest.raises(ValueError, match=message):
        DistillationSettings(**settings)


def test_the_settings_are_built_and_checked_once_per_call(monkeypatch):
    """The functional API builds one settings object per call, however many chunks the loss reads."""
    built = []
    check = DistillationSettings.__post_init__
    monkeypatch.setattr(DistillationSettings, "__post_init__", lambda self: (built.append(self), check(self)))
    student, teachers, labels, _ = random_logits(2, 3, 9, 11)
    multi_teacher_kd(student, teachers, labels, chunk_size=2, min_weight=0.1, teacher_weights=[1, 2, 3])
    assert len(built) == 1
    with pytest.raises(ValueError, match=r"`min_weight` must be in \[0, 1/K\) = \[0, 0\.3333\)"):
        multi_teacher_kd(student, teachers, labels, min_weight=0.5)


def test_the_functions_are_the_settings_loss():
    student, teachers, labels, _ = random_logits(4, 3, 8, 13)
    settings = DistillationSettings(
        temperature=2.0, weighting="entropy+posterior", teacher_weights=(0.2, 0.3, 0.5), min_weight=0.05,
        granularity="sequence", fusion="logit", chunk_size=3, alpha_kd=0.7, alpha_ce=0.3,
    )  # fmt: skip
    keywords = dict(
        temperature=2.0, weighting="entropy+posterior", teacher_weights=[0.2, 0.3, 0.5], min_weight=0.05,
        granularity="sequence", chunk_size=3,
    )  # fmt: skip
    loss = DistillationLoss(settings)
    ours, theirs = (
        loss.kd(student, teachers, labels),
        multi_teacher_kd(student, teachers, labels, fusion="logit", alpha_kd=0.7, alpha_ce=0.3, **keywords),
    )
    assert torch.equal(ours.loss, theirs.loss) and torch.equal(ours.weights, theirs.weights)
    assert torch.equal(loss.weights(teachers, labels), compute_teacher_weights(teachers, labels, **keywords))
