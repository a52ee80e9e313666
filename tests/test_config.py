"""Config validation and command-line parsing."""

import dataclasses

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_mtkd import MultiTeacherDistillationConfig
from hf_mtkd.alignment import FeatureProjector, default_layer_pairs, resolve_layer_pairs


def make(**kwargs):
    return MultiTeacherDistillationConfig(output_dir="unused", report_to="none", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha_kd": -0.1}, "`alpha_kd` must be >= 0"),
        ({"alpha_ce": 0, "alpha_kd": 0, "alpha_feat": 0}, "all 0"),
        ({"temperature": 0}, "`temperature` must be > 0"),
        ({"entropy_temperature": -1}, "`entropy_temperature` must be > 0"),
        ({"label_temperature": 0}, "`label_temperature` must be > 0"),
        ({"posterior_decay": 0}, r"`posterior_decay` must be in \(0, 1\]"),
        ({"posterior_decay": 1.5}, r"`posterior_decay` must be in \(0, 1\]"),
        ({"min_weight": 1.0}, r"`min_weight` must be in \[0, 1/K\)"),
        ({"teacher_weighting": "oracle"}, "Unknown `teacher_weighting` 'oracle'; choose one of"),
        ({"weighting_granularity": "epoch"}, "Unknown `weighting_granularity`"),
        ({"fusion": "max"}, "Unknown `fusion`"),
        ({"feature_loss": "l1"}, "Unknown `feature_loss`"),
        ({"teacher_dtype": "int8"}, "Unknown `teacher_dtype`"),
        ({"teacher_weights": [1, -1]}, "`teacher_weights` must be non-negative"),
        ({"teacher_weights": [0, 0]}, "positive sum"),
        ({"feature_layers": "[[[1, 2]"}, "not valid JSON"),
        ({"feature_layers": [[[1, 2, 3]]]}, r"\[1, 2, 3\] is not a \[student_layer, teacher_layer\] pair"),
        ({"projector_learning_rate": -1.0}, "`projector_learning_rate` must be >= 0"),
        ({"label_smoothing_factor": 0.1}, "`label_smoothing_factor` is not supported"),
        ({"loss_chunk_size": 0}, "`loss_chunk_size` must be a positive number"),
    ],
)
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_number_of_teachers_is_checked():
    config = make(teacher_weights=[1, 2, 3], teacher_names=["a", "b", "c"])
    config.check_num_teachers(3)
    with pytest.raises(ValueError, match="`teacher_weights` has 3 entries but there are 2 teachers"):
        config.check_num_teachers(2)
    with pytest.raises(ValueError, match=r"`min_weight` 0\.25 is too large for 4 teachers"):
        make(min_weight=0.25).check_num_teachers(4)


def test_command_line_flags():
    (config,) = HfArgumentParser(MultiTeacherDistillationConfig).parse_args_into_dataclasses(
        [
            "--output_dir", "out",
            "--temperature", "3",
            "--alpha_feat", "0.2",
            "--teacher_weighting", "static",
            "--teacher_weights", "1", "2", "1",
            "--weighting_granularity", "sequence",
            "--fusion", "logit",
            "--feature_layers", "[[[1, 2]], [], [[-1, -1]]]",
            "--teacher_model_init_kwargs", '{"revision": "main"}',
            "--report_to", "none",
        ]
    )  # fmt: skip
    assert config.temperature == 3.0 and config.alpha_feat == 0.2
    assert config.teacher_weights == [1.0, 2.0, 1.0]
    assert (config.teacher_weighting, config.weighting_granularity, config.fusion) == ("static", "sequence", "logit")
    assert config.feature_layers == [[(1, 2)], [], [(-1, -1)]]
    assert config.teacher_model_init_kwargs == {"revision": "main"}
    with pytest.raises(SystemExit):
        HfArgumentParser(MultiTeacherDistillationConfig).parse_args_into_dataclasses(["--fusion", "max"])


def test_config_round_trips_through_to_dict():
    config = make(teacher_weights=[1, 1], feature_layers=[[[1, 2]], [[2, 4]]])
    assert config.to_dict()["feature_layers"] == [[(1, 2)], [(2, 4)]]
    assert "temperature" in config.to_json_string()


def test_default_layer_pairs_follow_relative_depth():
    assert default_layer_pairs(4, [8, 2, 4]) == [[(2, 4), (4, 8)], [(2, 1), (4, 2)], [(2, 2), (4, 4)]]
    assert default_layer_pairs(1, [6]) == [[(1, 6)]]


def test_layer_pairs_resolve_negative_indices():
    assert resolve_layer_pairs([[(-1, -2)], []], 4, [6, 3], ["a", "b"]) == [[(4, 5)], []]
    with pytest.raises(ValueError, match="no pair for any teacher"):
        resolve_layer_pairs([[], []], 4, [6, 3], ["a", "b"])


def test_projector_maps_student_width_to_each_teacher_width():
    import torch

    projector = FeatureProjector([[(1, 2), (2, 4)], [(2, 3)]], student_width=8, teacher_widths=[16, 12])
    assert projector.pairs == [(0, 1, 2), (0, 2, 4), (1, 2, 3)]
    out = projector([torch.randn(5, 8, dtype=torch.bfloat16) for _ in range(3)])
    assert [tuple(o.shape) for o in out] == [(5, 16), (5, 16), (5, 12)]
    assert all(o.dtype == torch.float32 for o in out)


def test_the_class_docstring_lists_every_distillation_field():
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    added = [f.name for f in dataclasses.fields(MultiTeacherDistillationConfig) if f.name not in inherited]
    missing = [name for name in added if f"`{name}`" not in MultiTeacherDistillationConfig.__doc__]
    assert added and missing == []
