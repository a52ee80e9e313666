"""Teachers and students on one tokenizer whose embeddings have different (padded) numbers of rows."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_run_clm_distill import QUICK, run_main
from transformers import DataCollatorForLanguageModeling

from hf_mtkd import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer, cache_teacher_logits
from hf_mtkd.cross_tokenizer import uses_cross_tokenizer
from hf_mtkd.losses import multi_teacher_kd
from hf_mtkd.testing import tiny_causal_lm, train_tiny_tokenizer
from hf_mtkd.topk import TopKLogits

TEMPERATURE, ALPHA_KD, ALPHA_CE = 2.0, 1.0, 0.5


def padded(model, rows, seed=0):
    """A copy of `model` with `rows` more embedding and output rows, filled with large arbitrary values."""
    model = copy.deepcopy(model)
    n = model.config.vocab_size
    model.resize_token_embeddings(n + rows, mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            matrix[n:] = 50 * torch.randn(matrix[n:].shape, generator=generator, dtype=matrix.dtype)
    assert model.config.vocab_size == n + rows
    return model


def make_trainer(tmp_path, student, teachers, tokenizer, teacher_tokenizers=None, **config):
    args = MultiTeacherDistillationConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        temperature=TEMPERATURE,
        alpha_kd=ALPHA_KD,
        alpha_ce=ALPHA_CE,
        teacher_weighting="entropy",
        **config,
    )
    return MultiTeacherDistillationTrainer(
        model=student,
        teachers=teachers,
        args=args,
        processing_class=tokenizer,
        teacher_tokenizers=teacher_tokenizers,
    )


@pytest.fixture(scope="module")
def batch(tokenizer, corpus):
    """Eight texts of different lengths, right-padded, labels -100 on the padding."""
    texts = [corpus[i] for i in (0, 3, 7, 12, 20, 33, 41, 50)]
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)(
        [{"input_ids": tokenizer(text, truncation=True, max_length=24)["input_ids"]} for text in texts]
    )


def step(trainer, batch):
    """The loss of one step, the student's gradients and the logged metrics."""
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, trainer._pop_metrics("train" if model.training else "eval")


@pytest.mark.parametrize("given", ["path", "model"])
@pytest.mark.parametrize("fusion", ["probability", "logit"])
def test_a_padded_teacher_gives_exactly_the_loss_of_the_unpadded_one(tmp_path, tokenizer, batch, given, fusion):
    n = len(tokenizer)
    teachers = [tiny_causal_lm(kind, tokenizer, seed=3 + k).double() for k, kind in enumerate(["llama", "gpt2"])]
    student = tiny_causal_lm("qwen2", tokenizer, seed=1).double()
    wide = padded(teachers[0], 13)
    if given == "path":  # from a directory with its tokenizer, as a user loads it
        wide.save_pretrained(tmp_path / "wide")
        tokenizer.save_pretrained(tmp_path / "wide")
        wide, teacher_tokenizers = str(tmp_path / "wide"), None
    else:  # a model: its tokenizer is given
        teacher_tokenizers = [tokenizer, None]
    results = {}
    for name, pair, tokenizers in (("unpadded", teachers, None), ("padded", [wide, teachers[1]], teacher_tokenizers)):
        torch.manual_seed(0)  # the same feature projections
        trainer = make_trainer(
            tmp_path, copy.deepcopy(student), pair, tokenizer, tokenizers, fusion=fusion, alpha_feat=0.1,
            teacher_names=["a", "b"],
        )  # fmt: skip
        trainer.projector.double()
        assert not trainer.cross_tokenizer and trainer.shared_vocabulary_sizes == [n, n]
        results[name] = step(trainer, batch)
    (loss, grads, metrics), (padded_loss, padded_grads, padded_metrics) = results["unpadded"], results["padded"]
    torch.testing.assert_close(padded_loss, loss, rtol=1e-12, atol=1e-12)
    assert padded_grads.keys() == grads.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(padded_grads[key], grad, rtol=1e-10, atol=1e-12, msg=key)
    assert {"loss_kd", "loss_ce", "loss_feat", "teacher_weight/a", "teacher_entropy/a"} <= set(metrics)
    for key, value in metrics.items():
        assert padded_metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def reference_loss(student_logits, teacher_logits, labels, shared):
    r"""
    Plain float64 $\alpha_{kd} \tau^2 \frac{1}{N}\sum \mathrm{KL}(\bar p \| q) + \alpha_{ce} \mathrm{CE}$: teachers'
    $p_k = \mathrm{softmax}(z_{k,<m}/\tau)$ over the first m ids, 0 on the student's other rows; entropy weights
    $w_k \propto e^{-H_k}$; $q$ and the CE over all the student's rows.
    """
    targets = labels[:, 1:]
    valid = targets != -100
    z_s, y = student_logits[:, :-1][valid], targets[valid]
    probs = [F.softmax(z[:, :-1][valid][:, :shared] / TEMPERATURE, dim=-1) for z in teacher_logits]
    entropy = torch.stack([-(p * p.log()).sum(-1) for p in probs])
    weights = torch.softmax(-entropy, dim=0)
    fused = F.pad(sum(w[:, None] * p for w, p in zip(weights, probs, strict=True)), (0, z_s.shape[-1] - shared))
    log_q = F.log_softmax(z_s / TEMPERATURE, dim=-1)
    kl = (torch.xlogy(fused, fused) - fused * log_q).sum(-1)
    return ALPHA_KD * TEMPERATURE**2 * kl.mean() + ALPHA_CE * F.cross_entropy(z_s, y)


def test_a_student_with_more_rows_than_its_teachers_matches_a_float64_reference(tmp_path, tokenizer, batch):
    n = len(tokenizer)
    student = tiny_causal_lm("qwen2", tokenizer, seed=1, vocab_size=n + 11).double()
    teachers = [
        padded(tiny_causal_lm("llama", tokenizer, seed=3).double(), 5),  # padded too, by another amount
        tiny_causal_lm("gpt2", tokenizer, seed=4).double(),
    ]
    trainer = make_trainer(tmp_path, student, teachers, tokenizer, [tokenizer, tokenizer])
    assert not trainer.cross_tokenizer and trainer.shared_vocabulary_sizes == [n, n]
    loss, grads, _ = step(trainer, batch)

    student.zero_grad()
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        teacher_logits = [teacher(**inputs).logits for teacher in teachers]
    expected = reference_loss(student(**inputs).logits, teacher_logits, batch["labels"], n)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    for name, p in student.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)
    head = grads["lm_head.weight"]
    assert head[n:].abs().sum() > 0  # the student's padding rows are pushed down, as in plain fine-tuning


@pytest.mark.parametrize("k", [9, 4])
def test_top_k_support_equals_dense_padding_and_has_the_right_gradient(k):
    """
    A `TopKLogits` `support` wide inside V = `width` stands for its distribution over the support (exact for k = 9,
    with a tail spread over the support for k = 4), padded with probability 0: the sparse and the dense paths agree.
    """
    g = torch.Generator().manual_seed(0)
    support, width = 9, 13
    student = torch.randn(2, 5, width, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, support, (2, 5), generator=g)
    sparse, dense = [], []
    for scale in (1.0, 3.0):
        top = TopKLogits.from_logits(torch.randn(2, 5, support, generator=g, dtype=torch.float64) * scale, k)
        sparse.append(TopKLogits(top.indices, top.log_probs, top.log_tail_mass, vocab_size=width, support=support))
        own = top.dense(slice(None)).reshape(2, 5, support)  # over the support alone
        dense.append(F.pad(own, (0, width - support), value=-math.inf))
        rows = sparse[-1].dense(slice(None))
        assert torch.isneginf(rows[:, support:]).all()
        torch.testing.assert_close(rows[:, :support], own.reshape(10, support), rtol=0, atol=0)
    for fusion in ("probability", "logit"):
        kwargs = dict(temperature=1.5, weighting="entropy", fusion=fusion, alpha_ce=0.5)
        expected = multi_teacher_kd(student, dense, labels, **kwargs)
        (expected_grad,) = torch.autograd.grad(expected.loss, student)
        for teachers in (sparse, [sparse[0], dense[1]]):  # all sparse, and mixed (densified)
            out = multi_teacher_kd(student, teachers, labels, **kwargs)
            torch.testing.assert_close(out.loss, expected.loss, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(out.weights, expected.weights, rtol=1e-12, atol=1e-12)
            (grad,) = torch.autograd.grad(out.loss, student)
            torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
        assert torch.autograd.gradcheck(
            lambda s, kwargs=kwargs: multi_teacher_kd(s, sparse, labels, **kwargs).loss, (student,)
        )


def test_cache_of_a_padded_teacher_trains_a_wider_student_like_the_live_teacher(tmp_path, tokenizer, dataset):
    n = len(tokenizer)
    teacher = padded(tiny_causal_lm("llama", tokenizer, seed=3), 5)
    rows = dataset.select(range(12))
    cache = cache_teacher_logits([teacher], rows, str(tmp_path / "cache"), k=n, tokenizer=tokenizer, shard_size=12)
    assert cache.manifest.vocab_size == n  # the teacher's padding rows are not cached
    assert max(int(indices.max()) for indices in cache.dataset["mtkd_topk_indices"]) < n
    students = [tiny_causal_lm("qwen2", tokenizer, seed=1, vocab_size=n + 11) for _ in range(2)]
    live = make_trainer(tmp_path, students[0], [teacher], tokenizer, [tokenizer])
    cached = make_trainer(tmp_path, students[1], cache, tokenizer)
    picked = [3, 0, 7, 11]
    cached_batch = cached.data_collator([cache.dataset[i] for i in picked])
    live_batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)(
        [{"input_ids": rows[i]["input_ids"]} for i in picked]
    )
    (loss, grads, metrics), (cached_loss, cached_grads, cached_metrics) = (
        step(live, live_batch),
        step(cached, cached_batch),
    )
    torch.testing.assert_close(cached_loss, loss, rtol=1e-5, atol=1e-6)
    for key, grad in grads.items():
        torch.testing.assert_close(cached_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)
    for key, value in metrics.items():
        assert cached_metrics[key] == pytest.approx(value, rel=1e-4), key


@pytest.mark.parametrize("cached", [False, True])
def test_script_distills_a_padded_teacher_on_the_shared_vocabulary(
    tmp_path, tokenizer, student_dir, text_files, cached
):
    teacher_dir = tmp_path / "padded_teacher"
    padded(tiny_causal_lm("llama", tokenizer, seed=3), 13).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    train, validation = text_files["txt"]
    output_dir = tmp_path / "out"
    cache_args = ["--teacher_logits_cache", str(tmp_path / "cache"), "--teacher_logits_top_k", "8"] if cached else []
    run_main([
        "--teacher_model_name_or_path", str(teacher_dir), "--model_name_or_path", student_dir,
        "--train_file", train, "--validation_file", validation, "--do_train", "--do_eval",
        "--output_dir", str(output_dir), *cache_args, *QUICK,
    ])  # fmt: skip
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["train_samples"] > 50  # token blocks: the shared-vocabulary path, not raw texts
    assert math.isfinite(results["train_loss"]) and math.isfinite(results["eval_loss_kd"])
    assert results["eval_teacher_weight/padded_teacher"] == pytest.approx(1)
    assert "eval_teacher_aligned/padded_teacher" not in results  # no cross-tokenizer metric


def test_the_mode_is_decided_by_the_tokenizer_not_the_number_of_rows(tmp_path, tokenizer, corpus, dataset):
    other = train_tiny_tokenizer(corpus, vocab_size=300)
    assert uses_cross_tokenizer(["same", "other", "unknown"], [tokenizer, other, None], tokenizer) == [
        False,
        True,
        False,
    ]
    assert uses_cross_tokenizer(["same"], [tokenizer], tokenizer, "always") == [True]
    with pytest.raises(ValueError, match=r"'other' uses a different tokenizer from the student \(.*'never'"):
        uses_cross_tokenizer(["other"], [other], tokenizer, "never")
    student = tiny_causal_lm("qwen2", tokenizer, seed=1)
    # another tokenizer, even padded to the student's size, is still distilled in cross-tokenizer mode
    stranger = padded(tiny_causal_lm("llama", other, seed=3), len(tokenizer) - len(other))
    trainer = make_trainer(tmp_path, student, [stranger], tokenizer, [other])
    assert trainer.cross_tokenizer and trainer.shared_vocabulary_sizes == [None]


def test_padded_vocabularies_that_cannot_be_resolved_are_refused(tmp_path, tokenizer):
    n = len(tokenizer)
    student = tiny_causal_lm("qwen2", tokenizer, seed=1)
    wide = padded(tiny_causal_lm("llama", tokenizer, seed=3), 7)
    with pytest.raises(
        ValueError,
        match=rf"'llama' has a vocabulary of {n + 7} tokens but the student has {n}\. Its tokenizer is missing .*"
        r"the student's own if the teacher only pads its embedding",
    ):
        make_trainer(tmp_path, student, [wide], tokenizer)
    with pytest.raises(ValueError, match=r"padding rows cannot be told from the tokens: pass the student's tokenizer"):
        MultiTeacherDistillationTrainer(
            model=student,
            teachers=[wide],
            args=MultiTeacherDistillationConfig(output_dir=str(tmp_path), report_to="none"),
            teacher_tokenizers=[tokenizer],
        )
    narrow = tiny_causal_lm("llama", tokenizer, seed=3, vocab_size=n - 2)
    wide_student = tiny_causal_lm("qwen2", tokenizer, seed=1, vocab_size=n + 3)
    with pytest.raises(ValueError, match=rf"cannot read ids {n - 2}\.\.{n - 1}, which the student can"):
        make_trainer(tmp_path, wide_student, [narrow], tokenizer, [tokenizer])
