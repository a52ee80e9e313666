"""
The trainer's logit-free path (`logit_free`): training and evaluation equal to the logits path on tiny float64
models (tied and untied heads, a LoRA student, gradient accumulation, a teacher cache), no full-vocabulary logits
from any head, and each fallback taken with its reason.
"""

import logging

import pytest
import torch
from datasets import Dataset
from torch import nn
from trainer_helpers import tiny_config

from hf_mtkd import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer, cache_teacher_logits
from hf_mtkd.testing import tiny_causal_lm

TEACHERS = ("gpt2", "llama", "gpt_neox")


def student_model(tokenizer, *, tied=False):
    model = tiny_causal_lm("qwen2", tokenizer, seed=1, hidden_size=24).double()
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def teacher_models(tokenizer, num=3):
    return [tiny_causal_lm(kind, tokenizer, seed=10 + k).double() for k, kind in enumerate(TEACHERS[:num])]


def config(tmp_path, mode, **overrides):
    return tiny_config(
        tmp_path,
        output_dir=str(tmp_path / mode),
        max_steps=2,
        gradient_accumulation_steps=2,
        learning_rate=0.5,
        optim="sgd",  # no Adam normalisation: gradient differences show in the weights as they are
        logit_free=mode,
        teacher_weighting="entropy+posterior",
        weighting_granularity="token",
        loss_chunk_size=16,
        **overrides,
    )


def head_widths(models):
    """Records the number of positions each model's output head projects, per call."""
    seen = []
    for model in models:
        head = model.get_output_embeddings()
        head.register_forward_hook(lambda module, args, out: seen.append(out.shape[-2] if out.dim() == 3 else 0))
    return seen


def train(tmp_path, tokenizer, dataset, mode, *, student=None, teachers=None, teacher_tokenizers=None, **overrides):
    student = student_model(tokenizer) if student is None else student
    teachers = teacher_models(tokenizer) if teachers is None else teachers
    trainer = MultiTeacherDistillationTrainer(
        model=student,
        teachers=teachers,
        args=config(tmp_path, mode, **overrides),
        train_dataset=dataset,
        eval_dataset=dataset.select(range(8)),
        processing_class=tokenizer,
        teacher_tokenizers=teacher_tokenizers,
    )
    projected = head_widths([student, *teachers])
    trainer.train()
    metrics = trainer.evaluate()
    logs = [entry for entry in trainer.state.log_history if "loss_kd" in entry]
    weights = {name: p.detach().clone() for name, p in student.named_parameters() if p.requires_grad}
    return trainer, logs, metrics, weights, projected


def assert_same_training(free, dense, tol=1e-10):
    _, free_logs, free_metrics, free_weights, _ = free
    _, dense_logs, dense_metrics, dense_weights, _ = dense
    assert len(free_logs) == len(dense_logs) == 2
    for a, b in zip(free_logs, dense_logs, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=tol, abs=tol), key
    for key in ("eval_loss", "eval_loss_kd", "eval_loss_ce", "eval_perplexity"):
        assert free_metrics[key] == pytest.approx(dense_metrics[key], rel=tol), key
    for name, weight in free_weights.items():
        assert torch.allclose(weight, dense_weights[name], rtol=0, atol=tol), name


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_training_and_evaluation_logit_free_equal_the_logits_path(tmp_path, tokenizer, dataset, tied):
    free = train(tmp_path, tokenizer, dataset, "always", student=student_model(tokenizer, tied=tied))
    dense = train(tmp_path, tokenizer, dataset, "never", student=student_model(tokenizer, tied=tied))
    assert free[0].logit_free.student is not None and all(free[0].logit_free.teachers)
    assert max(free[4]) == 1 and free[4].count(1) == 4  # each model's first call checks one position; then none
    assert min(dense[4]) > 1
    assert_same_training(free, dense)
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"  # a tied head is listed once, as the embedding
    assert ("lm_head.weight" in free[3]) != tied
    initial = dict(student_model(tokenizer, tied=tied).named_parameters())
    assert not torch.allclose(free[3][head], initial[head])  # the head's gradient was applied


def test_a_lora_student_logit_free_equals_the_logits_path(tmp_path, tokenizer, dataset):
    peft = pytest.importorskip("peft")

    def lora():
        return peft.get_peft_model(
            student_model(tokenizer), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        )

    free = train(tmp_path, tokenizer, dataset, "always", student=lora())
    dense = train(tmp_path, tokenizer, dataset, "never", student=lora())
    assert free[0].logit_free.student is not None
    assert set(free[3]) and all("lora" in name for name in free[3])
    assert_same_training(free, dense)


def test_cached_teachers_beside_a_logit_free_student(tmp_path, tokenizer, dataset):
    data = dataset.select(range(32))
    cache = cache_teacher_logits(teacher_models(tokenizer, 2), data, str(tmp_path / "cache"), k=8, disable_tqdm=True)
    runs = []
    for mode in ("auto", "never"):
        trainer = MultiTeacherDistillationTrainer(
            model=student_model(tokenizer),
            teachers=cache,
            args=config(tmp_path, mode),
            processing_class=tokenizer,
        )
        trainer.train()
        runs.append((trainer, [e for e in trainer.state.log_history if "loss_kd" in e]))
    assert runs[0][0].logit_free.student is not None and runs[1][0].logit_free.student is None
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-10)


def fallback_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "not logit-free" in r.getMessage()]


def construct(tmp_path, tokenizer, dataset, mode="auto", student=None, teachers=None, **kwargs):
    return MultiTeacherDistillationTrainer(
        model=student_model(tokenizer) if student is None else student,
        teachers=teacher_models(tokenizer, 2) if teachers is None else teachers,
        args=config(tmp_path, mode),
        train_dataset=dataset,
        processing_class=tokenizer,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("attribute", "value", "what"),
    [("final_logit_softcapping", 30.0, "soft-capping"), ("logit_scale", 0.5, "logit scaling"),
     ("logits_scaling", 4.0, "logit scaling")],
)  # fmt: skip
def test_a_transformed_student_head_falls_back_with_its_reason(
    tmp_path, tokenizer, dataset, caplog, attribute, value, what
):
    student = student_model(tokenizer)
    setattr(student.config, attribute, value)
    with caplog.at_level(logging.WARNING):
        trainer = construct(tmp_path, tokenizer, dataset, student=student)
    assert trainer.logit_free.student is None and not any(trainer.logit_free.teachers)
    (warning,) = fallback_warnings(caplog)
    assert "the student" in warning and what in warning and attribute in warning and "Every teacher" in warning
    with pytest.raises(ValueError, match=f"logit_free='always'.*the student cannot run logit-free.*{what}"):
        construct(tmp_path, tokenizer, dataset, mode="always", student=student)


def test_a_head_that_is_not_a_plain_linear_falls_back(tmp_path, tokenizer, dataset, caplog):
    class ScaledHead(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    teachers = teacher_models(tokenizer, 2)
    old = teachers[1].get_output_embeddings()
    head = ScaledHead(old.in_features, old.out_features, bias=False, dtype=torch.float64)
    head.weight = old.weight
    teachers[1].set_output_embeddings(head)
    with caplog.at_level(logging.WARNING):
        trainer = construct(tmp_path, tokenizer, dataset, teachers=teachers)
    assert trainer.logit_free.student is not None and [t is not None for t in trainer.logit_free.teachers] == [
        True,
        False,
    ]
    (warning,) = fallback_warnings(caplog)
    assert (
        "teacher 'llama'" in warning and "not a plain torch.nn.Linear (test_logit_free_trainer.ScaledHead)" in warning
    )


def test_logits_transformed_without_a_config_attribute_are_caught_at_the_first_batch(
    tmp_path, tokenizer, dataset, caplog
):
    """A hook that scales a teacher's logits: its first call shows they are not its head's, so it falls back."""

    def scaled(tokenizer):
        teachers = teacher_models(tokenizer, 2)
        teachers[0].get_output_embeddings().register_forward_hook(lambda module, args, out: out * 1.5)
        return teachers

    with caplog.at_level(logging.WARNING):
        free = train(tmp_path, tokenizer, dataset, "auto", teachers=scaled(tokenizer))
    dense = train(tmp_path, tokenizer, dataset, "never", teachers=scaled(tokenizer))
    assert free[0].logit_free.student is not None and [t is not None for t in free[0].logit_free.teachers] == [
        False,
        True,
    ]
    (warning,) = fallback_warnings(caplog)
    assert "teacher 'gpt2'" in warning and "logits are not its output head applied" in warning
    assert_same_training(free, dense)


@pytest.mark.parametrize("num_teachers", [1, 2])
def test_cross_tokenizer_teachers_logit_free_equal_the_logits_path(tmp_path, cross_tokenizers, corpus, num_teachers):
    """
    A teacher on its own tokenizer (and, for K = 2, one on the student's) beside a logit-free student: the mapped
    teacher is read a chunk at a time from its hidden states and head, and training and evaluation equal the
    `[B, T, V]` path in float64.
    """
    student_tokenizer, own = cross_tokenizers["student"], cross_tokenizers["bpe300"]
    data = Dataset.from_dict({"text": corpus[:16]})

    def run(mode):
        teachers = [tiny_causal_lm("llama", own, seed=3).double(), *teacher_models(student_tokenizer, 1)]
        return train(
            tmp_path, student_tokenizer, data, mode, student=student_model(student_tokenizer),
            teachers=teachers[:num_teachers], teacher_tokenizers=[own, None][:num_teachers],
        )  # fmt: skip

    free, dense = run("always"), run("never")
    assert free[0].cross_tokenizer and free[0].logit_free.student is not None and all(free[0].logit_free.teachers)
    assert max(free[4]) == 1 and free[4].count(1) == 1 + num_teachers  # the first call checks one position
    assert min(dense[4]) > 1
    assert_same_training(free, dense)


def test_the_uld_divergence_keeps_the_student_on_logits(tmp_path, cross_tokenizers, corpus, caplog):
    own = cross_tokenizers["bpe300"]
    with caplog.at_level(logging.WARNING):
        trainer = MultiTeacherDistillationTrainer(
            model=student_model(cross_tokenizers["student"]),
            teachers=[tiny_causal_lm("llama", own, seed=3)],
            args=config(tmp_path, "auto", cross_tokenizer="always", cross_tokenizer_loss="uld"),
            train_dataset=Dataset.from_dict({"text": corpus[:16]}),
            processing_class=cross_tokenizers["student"],
            teacher_tokenizers=[own],
        )
    assert trainer.logit_free.student is None
    (warning,) = fallback_warnings(caplog)
    assert "the `uld` divergence" in warning


def test_fsdp_keeps_the_student_on_logits(tmp_path, tokenizer, dataset, caplog, monkeypatch):
    """Under FSDP (`accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP) the student gives its logits."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # on one CPU process accelerate then runs without FSDP
    with caplog.at_level(logging.WARNING):
        trainer = construct(tmp_path, tokenizer, dataset)
    assert trainer.logit_free.student is None and trainer.logit_free.teachers == [None] * 2
    (warning,) = fallback_warnings(caplog)
    assert "the student" in warning and "under FSDP its head is sharded" in warning
    with pytest.raises(ValueError, match=r"logit_free=.always.*the student cannot run logit-free.*under FSDP"):
        construct(tmp_path, tokenizer, dataset, mode="always")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(ValueError, match=r"the student cannot run logit-free.*under FSDP"):  # `--fsdp`, refused early
        MultiTeacherDistillationTrainer(
            model=student_model(tokenizer),
            teachers=teacher_models(tokenizer, 1),
            args=config(tmp_path, "always", fsdp=True),
            train_dataset=dataset,
        )


def test_never_leaves_every_model_on_logits(tmp_path, tokenizer, dataset):
    # (ZeRO-3 runs logit-free: its partitioned heads are gathered, tests/test_deepspeed_distributed.py)
    trainer = construct(tmp_path, tokenizer, dataset, mode="never")
    assert trainer.logit_free.student is None and trainer.logit_free.teachers == [None] * 2


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown `logit_free` 'sometimes'"):
        MultiTeacherDistillationConfig(output_dir=str(tmp_path), logit_free="sometimes", use_cpu=True)


def test_a_lora_wrapped_head_falls_back(tmp_path, tokenizer, dataset, caplog):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)
    with caplog.at_level(logging.WARNING):
        trainer = construct(
            tmp_path, tokenizer, dataset, student=peft.get_peft_model(student_model(tokenizer), config)
        )
    assert trainer.logit_free.student is None
    (warning,) = fallback_warnings(caplog)
    assert "the student" in warning and "not a plain torch.nn.Linear (peft.tuners.lora.layer.Linear)" in warning


def test_teachers_given_after_construction_are_planned_anew(tmp_path, tokenizer, dataset, caplog):
    trainer = construct(tmp_path, tokenizer, dataset)
    batch = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(4)]))
    trainer.compute_loss(trainer.model, batch)
    assert all(trainer.logit_free.teachers)
    replaced = teacher_models(tokenizer, 2)
    replaced[1].config.final_logit_softcapping = 30.0
    with caplog.at_level(logging.WARNING):
        trainer.teachers = replaced
    assert [t is not None for t in trainer.logit_free.teachers] == [True, False]
    (warning,) = fallback_warnings(caplog)
    assert "teacher 'llama'" in warning and "soft-capping" in warning
    assert torch.isfinite(trainer.compute_loss(trainer.model, batch))
