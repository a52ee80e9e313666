"""The trainer end to end on tiny heterogeneous models: logging, accumulation, checkpoints, PEFT and errors."""

import copy
import math
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from torch import nn
from trainer_helpers import TEACHER_NAMES, make_trainer
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutput

from hf_mtkd import MultiTeacherDistillationTrainer
from hf_mtkd.testing import synthetic_corpus, tiny_causal_lm, train_tiny_tokenizer
from hf_mtkd.trainer import PROJECTOR_NAME, PROJECTOR_WEIGHTS_NAME


def test_three_heterogeneous_teachers_end_to_end(tmp_path, make_student, teacher_dirs, dataset, tokenizer):
    trainer = make_trainer(
        tmp_path,
        make_student(),
        teacher_dirs,
        dataset,
        tokenizer,
        max_steps=40,
        alpha_feat=0.1,
        logging_steps=10,
        per_device_eval_batch_size=16,  # one eval batch: the Trainer's eval_loss is then the token mean too
    )
    assert [type(t).__name__ for t in trainer.teachers] == [
        "GPT2LMHeadModel",
        "LlamaForCausalLM",
        "GPTNeoXForCausalLM",
    ]
    assert all(not p.requires_grad for t in trainer.teachers for p in t.parameters())
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()

    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_loss_kd"] < before["eval_loss_kd"]
    assert after["eval_loss_feat"] < before["eval_loss_feat"]
    assert after["eval_perplexity"] == pytest.approx(math.exp(after["eval_loss_ce"]))
    expected_total = 0.5 * after["eval_loss_ce"] + 0.5 * after["eval_loss_kd"] + 0.1 * after["eval_loss_feat"]
    assert after["eval_loss"] == pytest.approx(expected_total, rel=1e-4)

    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(train_logs) == 4
    for log in train_logs:
        for key in ["loss_ce", "loss_kd", "loss_feat"] + [
            f"teacher_{kind}/{name}" for kind in ("weight", "entropy", "nll") for name in TEACHER_NAMES
        ]:
            assert math.isfinite(log[key]), key
        assert sum(log[f"teacher_weight/{n}"] for n in TEACHER_NAMES) == pytest.approx(1.0, abs=1e-5)
    assert sum(after[f"eval_teacher_weight/{n}"] for n in TEACHER_NAMES) == pytest.approx(1.0, abs=1e-5)
    # fitted teachers disagree in confidence, so entropy weighting is not uniform
    weights = [after[f"eval_teacher_weight/{n}"] for n in TEACHER_NAMES]
    assert max(weights) - min(weights) > 0.01


def _trained_parameters(tmp_path, student, teacher_dirs, dataset, tokenizer, batch_size, accumulation):
    trainer = make_trainer(
        tmp_path / f"{batch_size}x{accumulation}",
        student,
        teacher_dirs,
        dataset,
        tokenizer,
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=0.5,
        max_grad_norm=0,
        alpha_feat=0.3,
    )
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return {n: p.detach() - initial[n] for n, p in trainer.model.named_parameters()}


def test_gradient_accumulation_matches_full_batch(tmp_path, make_student, teacher_dirs, dataset, tokenizer):
    full = _trained_parameters(tmp_path, make_student(), teacher_dirs, dataset, tokenizer, 4, 1)
    accumulated = _trained_parameters(tmp_path, make_student(), teacher_dirs, dataset, tokenizer, 1, 4)
    assert any(n.startswith(PROJECTOR_NAME) for n in full)
    for name, update in full.items():
        assert update.abs().max() > 0, name
        torch.testing.assert_close(accumulated[name], update, rtol=1e-4, atol=1e-6, msg=name)


def test_resume_from_checkpoint_is_exact(tmp_path, make_student, teacher_dirs, dataset, tokenizer):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, alpha_feat=0.2)
    straight = make_trainer(tmp_path / "a", make_student(), teacher_dirs, dataset, tokenizer, **common)
    straight.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-2"
    assert (checkpoint / PROJECTOR_WEIGHTS_NAME).is_file()

    resumed = make_trainer(tmp_path / "b", make_student(), teacher_dirs, dataset, tokenizer, **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected = dict(straight.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        assert torch.equal(param, expected[name]), name
    assert resumed.state.log_history[-2]["loss"] == straight.state.log_history[-2]["loss"]


def test_save_model_writes_a_plain_student(tmp_path, make_student, teacher_dirs, dataset, tokenizer):
    trainer = make_trainer(tmp_path, make_student(), teacher_dirs, dataset, tokenizer, max_steps=2, alpha_feat=0.1)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not any(PROJECTOR_NAME in k for k in keys)
    with safe_open(out / PROJECTOR_WEIGHTS_NAME, "pt") as f:
        assert set(f.keys()) == set(trainer.projector.state_dict())

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = tokenizer(["ada sees the cat at the mill ."], return_tensors="pt")
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trainer.model(**batch).logits)


def test_lora_student_trains_only_adapters(tmp_path, make_student, teacher_dirs, dataset, tokenizer):
    student = get_peft_model(
        make_student(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    initial = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = make_trainer(tmp_path, student, teacher_dirs, dataset, tokenizer, max_steps=3, alpha_feat=0.1)
    projector_initial = [p.detach().clone() for p in trainer.projector.parameters()]
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if n in initial and not torch.equal(p, initial[n])}
    assert changed
    assert all("lora_" in n for n in changed), sorted(changed)
    assert any("lora_B" in n for n in changed)
    assert all(not torch.equal(p, q) for p, q in zip(trainer.projector.parameters(), projector_initial, strict=True))
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_compute_loss_return_outputs(tmp_path, make_student, teacher_dirs, dataset, tokenizer):
    trainer = make_trainer(tmp_path, make_student(), teacher_dirs, dataset, tokenizer, alpha_feat=0.1)
    batch = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(3)]))
    loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    assert loss.ndim == 0 and loss.requires_grad
    assert outputs.logits.shape[:2] == batch["input_ids"].shape
    assert outputs.hidden_states is None  # asked for internally, not handed back
    # the student on its logits (returned) or logit-free: the same loss up to float32 rounding of the head's matmuls
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), loss, rtol=1e-6, atol=0)


def test_projector_has_its_own_param_group(tmp_path, make_student, teacher_dirs, dataset, tokenizer):
    trainer = make_trainer(
        tmp_path, make_student(), teacher_dirs, dataset, tokenizer, alpha_feat=0.1, projector_learning_rate=1e-2
    )
    optimizer = trainer.create_optimizer()
    projector_ids = {id(p) for p in trainer.projector.parameters()}
    groups = [g for g in optimizer.param_groups if any(id(p) in projector_ids for p in g["params"])]
    assert len(groups) == 1 and groups[0]["lr"] == 1e-2
    assert {id(p) for p in groups[0]["params"]} == projector_ids
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(trainer.model.parameters()))


def test_teachers_load_from_paths_in_teacher_dtype(tmp_path, make_student, teacher_dirs, dataset, tokenizer):
    trainer = make_trainer(tmp_path, make_student(), teacher_dirs, dataset, tokenizer, teacher_dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in trainer.teachers)
    assert all(not t.training for t in trainer.teachers)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-2]["loss_kd"])


# ---- errors ----


class LogitsOnly(nn.Module):
    """A teacher without hidden states, optionally producing NaN logits."""

    def __init__(self, inner, nan=False):
        super().__init__()
        self.inner, self.config, self.nan = inner, inner.config, nan

    def forward(self, input_ids, attention_mask=None):
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
        return CausalLMOutput(logits=logits * float("nan") if self.nan else logits)


@pytest.fixture
def teacher(tokenizer):
    return tiny_causal_lm("llama", tokenizer, hidden_size=32, num_layers=2)


def test_error_mismatched_vocabulary(tmp_path, make_student, teacher, dataset, tokenizer):
    other = train_tiny_tokenizer(synthetic_corpus(64, seed=5, domains=["counting"]), vocab_size=300)
    wrong = tiny_causal_lm("gpt2", other)
    with pytest.raises(
        ValueError, match=rf"'llama' has a vocabulary of {len(other)} tokens but the student has {len(tokenizer)}\."
    ):
        make_trainer(tmp_path, make_student(), [teacher, wrong], dataset, tokenizer)


def test_error_teacher_path_with_another_tokenizer(tmp_path, make_student, dataset, tokenizer):
    other = train_tiny_tokenizer(synthetic_corpus(256, seed=3, domains=["stories"]))
    path = tmp_path / "other"
    tiny_causal_lm("gpt2", other).save_pretrained(path)
    other.save_pretrained(path)
    with pytest.raises(ValueError, match=r"different tokenizer from the student.*cross_tokenizer='auto'"):
        make_trainer(tmp_path, make_student(), [str(path)], dataset, tokenizer, cross_tokenizer="never")
    # by default the teacher runs in cross-tokenizer mode, which needs the raw text this tokenized dataset dropped
    with pytest.raises(ValueError, match="needs the raw text"):
        make_trainer(tmp_path, make_student(), [str(path)], dataset, tokenizer)


def test_error_teacher_without_hidden_states(tmp_path, make_student, teacher, dataset, tokenizer):
    make_trainer(tmp_path, make_student(), [LogitsOnly(teacher)], dataset, tokenizer)  # fine without features
    with pytest.raises(ValueError, match=r"'gpt2' .*cannot return hidden states.*alpha_feat=0"):
        make_trainer(tmp_path, make_student(), [LogitsOnly(teacher)], dataset, tokenizer, alpha_feat=0.1)


def test_error_layer_index_out_of_range(tmp_path, make_student, teacher, dataset, tokenizer):
    with pytest.raises(ValueError, match="Layer index 7 is out of range for teacher 'gpt2', which has 2 layers"):
        make_trainer(
            tmp_path, make_student(), [teacher], dataset, tokenizer, alpha_feat=0.1, feature_layers="[[[1, 7]]]"
        )
    with pytest.raises(ValueError, match="Layer index -4 is out of range for the student"):
        make_trainer(
            tmp_path, make_student(), [teacher], dataset, tokenizer, alpha_feat=0.1, feature_layers=[[[-4, 1]]]
        )


def test_error_no_teachers(tmp_path, make_student, dataset, tokenizer):
    with pytest.raises(ValueError, match="`teachers` is empty"):
        make_trainer(tmp_path, make_student(), [], dataset, tokenizer)


def test_error_teacher_on_meta_device(tmp_path, make_student, dataset, tokenizer):
    with torch.device("meta"):
        ghost = tiny_causal_lm("llama", tokenizer)
    with pytest.raises(ValueError, match="'gpt2' has parameters on the meta device"):
        make_trainer(tmp_path, make_student(), [ghost], dataset, tokenizer)


def test_error_nan_teacher_logits(tmp_path, make_student, teacher, dataset, tokenizer):
    trainer = make_trainer(tmp_path, make_student(), [teacher, LogitsOnly(teacher, nan=True)], dataset, tokenizer)
    with pytest.raises(FloatingPointError, match="Teacher 'llama' produced NaN/inf logits"):
        trainer.train()


def test_error_per_teacher_fields_of_wrong_length(tmp_path, make_student, teacher, dataset, tokenizer):
    with pytest.raises(ValueError, match="`teacher_weights` has 2 entries but there are 1 teachers"):
        make_trainer(tmp_path, make_student(), [teacher], dataset, tokenizer, teacher_weights=[1.0, 2.0])


def test_error_bad_batches(tmp_path, make_student, teacher, dataset, tokenizer):
    trainer = make_trainer(tmp_path, make_student(), [teacher], dataset, tokenizer)
    batch = trainer.data_collator([dataset[0]])
    with pytest.raises(ValueError, match="no `labels`"):
        trainer.compute_loss(trainer.model, {k: v for k, v in batch.items() if k != "labels"})
    empty = {k: v[:0] for k, v in batch.items()}
    with pytest.raises(ValueError, match="empty batch"):
        trainer.compute_loss(trainer.model, empty)
    masked = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    loss = trainer.compute_loss(trainer.model, masked)
    assert loss.item() == 0.0 and loss.requires_grad


def test_error_args_of_the_wrong_type(tmp_path, make_student, teacher, dataset, tokenizer):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="must be a MultiTeacherDistillationConfig"):
        MultiTeacherDistillationTrainer(
            model=make_student(), teachers=[teacher], args=TrainingArguments(output_dir=str(tmp_path))
        )
    with pytest.raises(ValueError, match="`compute_loss_func` is not supported"):
        MultiTeacherDistillationTrainer(model=make_student(), teachers=[teacher], compute_loss_func=lambda *a: 0)


def test_teachers_run_in_inference_mode_without_features(teacher, dataset, tokenizer):
    from hf_mtkd.teachers import teacher_forward

    batch = tokenizer(["ada sees the cat ."], return_tensors="pt")
    logits, hidden = teacher_forward(teacher, "t", batch, output_hidden_states=False)
    assert logits.is_inference() and hidden is None
    logits, hidden = teacher_forward(teacher, "t", batch, output_hidden_states=True)
    assert not logits.is_inference() and not hidden[-1].requires_grad


def test_teachers_are_not_modified_by_training(tmp_path, make_student, teacher, dataset, tokenizer):
    before = copy.deepcopy(teacher.state_dict())
    trainer = make_trainer(tmp_path, make_student(), [teacher], dataset, tokenizer, max_steps=2, alpha_feat=0.1)
    trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not os.path.exists(tmp_path / "out" / "checkpoint-2")  # save_strategy="no"


@pytest.mark.parametrize("student_type", ["gpt2", "qwen2"])
def test_trainer_counts_items_over_shifted_labels(tmp_path, student_type, teacher, dataset, tokenizer):
    # gpt2 has no causal-LM `loss_type` and this student's loss kwargs are turned off: the Trainer must still count
    # the valid next-token positions, which every loss term is normalised by.
    student = tiny_causal_lm(student_type, tokenizer)
    student.accepts_loss_kwargs = False
    trainer = make_trainer(tmp_path, student, [teacher], dataset, tokenizer)
    batch = trainer.data_collator([dataset[i] for i in range(4)])
    _, num_items = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    assert num_items == (batch["labels"][:, 1:] != -100).sum()
