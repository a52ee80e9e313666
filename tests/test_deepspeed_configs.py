"""The shipped DeepSpeed configs: package data, short names, DeepSpeed's own validation, and the teachers' configs."""

import json
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.config import DeepSpeedConfig
from pydantic import ValidationError
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

import hf_mtkd
from hf_mtkd import MultiTeacherDistillationConfig
from hf_mtkd.distributed import DEEPSPEED_CONFIGS, resolve_deepspeed_config, teacher_deepspeed_config
from hf_mtkd.testing import tiny_causal_lm

PACKAGE_DIR = Path(hf_mtkd.__file__).parent


@pytest.fixture
def filled_config(tmp_path):
    """
    A config with its "auto" values filled by transformers: from the arguments, as when the trainer is built (and the
    teachers are prepared), then with `model` given, from the student's hidden size as when training starts.
    """
    args = MultiTeacherDistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    configs = []

    def fill(config: dict, model: torch.nn.Module | None = None) -> dict:
        hf_config = HfTrainerDeepSpeedConfig(config)
        configs.append(hf_config)  # kept alive: transformers reads it through a weak reference
        hf_config.trainer_config_process(args)
        if model is not None:
            hf_config.trainer_config_finalize(args, model, num_training_steps=10)
        return hf_config.config

    yield fill
    unset_hf_deepspeed_config()  # so that no later test sees ZeRO-3 as enabled


def load(name: str) -> dict:
    return json.loads(Path(resolve_deepspeed_config(name)).read_text())


@pytest.mark.parametrize("name", list(DEEPSPEED_CONFIGS))
def test_shipped_config_is_package_data_reachable_by_name(name):
    path = Path(resolve_deepspeed_config(name))
    assert path.is_file() and path.parent == PACKAGE_DIR / "deepspeed_configs"
    config = load(name)
    assert "train_batch_size" not in config  # derived by DeepSpeed from the three "auto" values below
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto"
    assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"
    zero = config["zero_optimization"]
    assert zero["stage"] == (2 if name == "zero2" else 3)
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert ("offload_param" in zero) == ("offload_optimizer" in zero) == (name == "zero3_offload")


@pytest.mark.parametrize("name", list(DEEPSPEED_CONFIGS))
def test_shipped_config_passes_deepspeeds_parser(name, filled_config, tokenizer):
    student = tiny_causal_lm("qwen2", tokenizer, hidden_size=24)
    config = filled_config(load(name), student)
    parsed = DeepSpeedConfig(config)
    assert parsed.zero_optimization_stage == (2 if name == "zero2" else 3)
    assert parsed.train_micro_batch_size_per_gpu == 8 and parsed.gradient_accumulation_steps == 1
    assert parsed.zero_config.reduce_bucket_size == 24 * 24
    if name == "zero3_offload":
        assert parsed.zero_config.offload_param.device == "cpu"
        assert parsed.zero_config.offload_optimizer.device == "cpu"
        assert parsed.optimizer_name == "adamw"


def test_deepspeeds_parser_rejects_a_misspelt_key(filled_config, tokenizer):
    config = load("zero3")
    zero = config["zero_optimization"]
    zero["stage3_gather_16bit_weights_on_modelsave"] = zero.pop("stage3_gather_16bit_weights_on_model_save")
    config = filled_config(config, tiny_causal_lm("qwen2", tokenizer, hidden_size=24))
    with pytest.raises(ValidationError, match="stage3_gather_16bit_weights_on_modelsave"):
        DeepSpeedConfig(config)


def test_unknown_short_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"neither a file.*\['zero2', 'zero3', 'zero3_offload'\]"):
        MultiTeacherDistillationConfig(output_dir=str(tmp_path), deepspeed="zero4")


def test_dict_and_path_pass_through():
    config = {"zero_optimization": {"stage": 3}}
    assert resolve_deepspeed_config(config) is config
    path = resolve_deepspeed_config("zero2")
    assert resolve_deepspeed_config(path) == path
    assert resolve_deepspeed_config(None) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_config_is_inference_only_and_keeps_the_teacher_dtype(dtype, filled_config, tokenizer):
    teacher = tiny_causal_lm("llama", tokenizer, hidden_size=64, num_heads=4).to(dtype)
    training_config = filled_config(load("zero3_offload"))  # from here on, models would be made by zero.Init

    config = teacher_deepspeed_config(training_config, teacher)

    assert "optimizer" not in config and "offload_optimizer" not in config["zero_optimization"]
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 10 * 64  # the teacher's width
    assert config["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert config["bf16"]["enabled"] is (dtype == torch.bfloat16) and config["fp16"]["enabled"] is False
    assert training_config["optimizer"]["type"] == "AdamW"  # the training config is left untouched
    assert DeepSpeedConfig(config).zero_optimization_stage == 3


def test_teacher_config_refuses_unfilled_auto_values(tokenizer):
    teacher = tiny_causal_lm("llama", tokenizer, hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match=r"'train_micro_batch_size_per_gpu'\] are still 'auto'"):
        teacher_deepspeed_config(load("zero3"), teacher)
