"""
Prompt evidence (`prompt_evidence`): the teachers' likelihood of each document's prompt weighs them on it. Checked
against plain float64 loops, on the logits path, chunked and logit-free, and through the trainer.
"""

import itertools
import logging
import math

import pytest
import torch
from datasets import Dataset
from trainer_helpers import tiny_config

from hf_mtkd import (
    HeadLogits,
    MultiTeacherDistillationConfig,
    MultiTeacherDistillationTrainer,
    cache_teacher_logits,
    compute_teacher_weights,
    multi_teacher_kd,
)
from hf_mtkd.chat_data import ExampleRenderer
from hf_mtkd.cross_tokenizer import prompt_content
from hf_mtkd.prompt_evidence import PromptEvidence, prompt_positions, prompt_targets, row_sums, token_log_probs
from hf_mtkd.testing import tiny_causal_lm


def test_prompt_positions_are_the_unlabelled_real_tokens_of_each_document():
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [1, 2, 3, 4, 5, 6]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, -100], [-100, -100, 3, -100, -100, 6]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2]])  # row 1: two packed documents
    found = prompt_positions(ids, labels, attention, positions)
    # row 0: predicting 6 and 7 (the prompt); 8 and 9 carry labels, the padding is no prompt
    # row 1: predicting 2 (prompt of the first document), 5 (of the second); 4 starts a document, so no evidence
    expected = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    expected[1, 3] = True
    assert torch.equal(found, expected)
    assert prompt_targets(ids, found).tolist() == [6, 7, 2, 5]
    no_mask = prompt_positions(ids, labels)  # no attention mask, no packing: every unlabelled next token
    assert no_mask[0].tolist() == [True, True, False, False, True, False]


def batch(seed=0, vocab=11, num_teachers=3):
    """Two rows of 9 positions, row 1 packing two documents, each document a prompt and a completion."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a 4-token prompt
    labels[1, :3] = -100  # document 1: a 3-token prompt, a 2-token completion
    labels[1, 5:7] = -100  # document 2: a 2-token prompt
    labels[0, 8] = -100  # the last token is padding
    attention = torch.ones_like(ids)
    attention[0, 8] = 0
    position_ids = torch.tensor([list(range(9)), [0, 1, 2, 3, 4, 0, 1, 2, 3]])
    teachers = [torch.randn(2, 9, vocab, generator=g, dtype=torch.float64) * 3 for _ in range(num_teachers)]
    student = torch.randn(2, 9, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    return ids, labels, attention, position_ids, teachers, student


def evidence_of(ids, labels, attention, position_ids, teachers):
    prompt = prompt_positions(ids, labels, attention, position_ids)
    targets = prompt_targets(ids, prompt)
    rows = prompt.flatten().nonzero()[:, 0]
    return PromptEvidence(prompt, torch.stack([token_log_probs(z, targets, rows) for z in teachers]))


def reference_document_scores(ids, labels, attention, position_ids, teachers, gamma):
    """`[K, B, T]`: at every position, (1/γ) Σ max(log p_k(x_{s+1}), -20) over its document's prompt, by loops."""
    num, (rows, length) = len(teachers), ids.shape
    out = torch.zeros(num, rows, length, dtype=torch.float64)
    for b in range(rows):
        starts = [t for t in range(length) if position_ids[b, t] == 0] + [length]
        for begin, end in itertools.pairwise(starts):
            for k, z in enumerate(teachers):
                total = 0.0
                for t in range(begin, end - 1):
                    if labels[b, t + 1] == -100 and attention[b, t] and attention[b, t + 1]:
                        log_p = z[b, t].log_softmax(-1)[ids[b, t + 1]].item()
                        total += max(log_p, -20.0)
                out[k, b, begin:end] = total / gamma
    return out


@pytest.mark.parametrize("weighting", ["static", "entropy", "posterior", "likelihood"])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_weights_with_the_prompt_are_the_weights_times_its_likelihood(weighting, granularity):
    ids, labels, attention, position_ids, teachers, _ = batch()
    gamma = 2.5
    options = dict(weighting=weighting, granularity=granularity, position_ids=position_ids, teacher_weights=[1, 2, 3])
    base = compute_teacher_weights(teachers, labels, **options)
    evidence = evidence_of(ids, labels, attention, position_ids, teachers)
    found = compute_teacher_weights(teachers, labels, prompt=evidence, prompt_temperature=gamma, **options)
    document = reference_document_scores(ids, labels, attention, position_ids, teachers, gamma)
    valid = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1), value=False)
    if granularity == "sequence":  # pooled: the mean over the row's valid positions
        document = (document * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True)
        document = document.expand(-1, -1, ids.shape[1])
    expected = base * document.exp()
    expected = expected / expected.sum(0, keepdim=True)
    assert torch.allclose(found[:, valid], expected[:, valid], rtol=0, atol=1e-12)
    assert not torch.allclose(found[:, valid], base[:, valid], atol=1e-3)  # the prompt moved the weights


def reference_loss(student, teachers, labels, weights, tau):
    """τ² Σ_valid KL(Σ_k w_k p_k || q) / N, position by position."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == -100:
                continue
            target = sum(weights[k, b, t] * (z[b, t] / tau).softmax(-1) for k, z in enumerate(teachers))
            log_q = (student[b, t] / tau).log_softmax(-1)
            total = total + (target * (target.log() - log_q)).sum()
            count += 1
    return tau**2 * total / count


@pytest.mark.parametrize("chunk_size", [1, 2, 5, None])
@pytest.mark.parametrize("weighting", ["posterior", "likelihood"], ids=["one pass", "first pass"])
def test_the_loss_with_the_prompt_matches_a_reference_on_logits_and_logit_free(chunk_size, weighting):
    ids, labels, attention, position_ids, teachers, student = batch(seed=1)
    evidence = evidence_of(ids, labels, attention, position_ids, teachers)
    options = dict(weighting=weighting, position_ids=position_ids, prompt=evidence, chunk_size=chunk_size)
    weights = compute_teacher_weights(teachers, labels, temperature=2.0, **options)
    expected = reference_loss(student, teachers, labels, weights, 2.0)
    (expected_grad,) = torch.autograd.grad(expected, student)
    found = multi_teacher_kd(student, teachers, labels, temperature=2.0, **options)
    assert found.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.allclose(found.weights, weights, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(found.loss, student)
    assert torch.allclose(grad, expected_grad, rtol=0, atol=1e-12)

    # logit-free: hidden states at the valid positions and heads; the same weights and loss
    g = torch.Generator().manual_seed(7)
    valid = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1), value=False)
    dims, vocab = 5, student.shape[-1]
    hidden = [torch.randn(2, 9, dims, generator=g, dtype=torch.float64) for _ in range(4)]
    heads = [torch.randn(vocab, dims, generator=g, dtype=torch.float64) for _ in range(4)]
    dense = [h @ w.T for h, w in zip(hidden, heads, strict=True)]
    free = [HeadLogits(h[valid], w) for h, w in zip(hidden, heads, strict=True)]
    free_evidence = evidence_of(ids, labels, attention, position_ids, dense[1:])
    prompt = free_evidence.positions
    head_evidence = torch.stack(
        [
            token_log_probs(HeadLogits(h[prompt], w), prompt_targets(ids, prompt))
            for h, w in zip(hidden[1:], heads[1:], strict=True)
        ]
    )
    assert torch.allclose(head_evidence, free_evidence.log_prob, rtol=0, atol=1e-12)
    options["prompt"] = PromptEvidence(prompt, head_evidence)
    on_logits = multi_teacher_kd(dense[0], dense[1:], labels, **options)
    logit_free = multi_teacher_kd(free[0], free[1:], labels, **options)
    assert logit_free.loss.item() == pytest.approx(on_logits.loss.item(), rel=1e-12)
    assert torch.allclose(logit_free.weights, on_logits.weights, rtol=0, atol=1e-12)


def test_a_prompt_the_teachers_predict_alike_changes_nothing():
    ids, labels, attention, position_ids, teachers, _ = batch(seed=2)
    evidence = evidence_of(ids, labels, attention, position_ids, teachers)
    same = PromptEvidence(evidence.positions, evidence.log_prob[:1].expand_as(evidence.log_prob))
    base = compute_teacher_weights(teachers, labels, position_ids=position_ids)
    found = compute_teacher_weights(teachers, labels, position_ids=position_ids, prompt=same)
    assert torch.allclose(found, base, rtol=0, atol=1e-12)


def test_a_prompt_token_no_teacher_can_produce_keeps_the_weights_finite():
    ids, labels, attention, position_ids, teachers, _ = batch(seed=3)
    evidence = evidence_of(ids, labels, attention, position_ids, teachers)
    impossible = PromptEvidence(evidence.positions, torch.full_like(evidence.log_prob, -math.inf))
    weights = compute_teacher_weights(teachers, labels, position_ids=position_ids, prompt=impossible)
    base = compute_teacher_weights(teachers, labels, position_ids=position_ids)
    assert torch.isfinite(weights).all()
    assert torch.allclose(weights, base, rtol=0, atol=1e-12)  # every teacher floored alike


# ---- through the trainer ----


def prompted_dataset(dataset, prompt=6, rows=32):
    def label(row):
        labels = list(row["input_ids"])
        labels[:prompt] = [-100] * prompt
        return {"labels": labels}

    return dataset.select(range(rows)).map(label)


def models(tokenizer):
    student = tiny_causal_lm("qwen2", tokenizer, seed=1, hidden_size=24).double()
    teachers = [tiny_causal_lm(kind, tokenizer, seed=10 + k).double() for k, kind in enumerate(("gpt2", "llama"))]
    return student, teachers


def prompted_trainer(tmp_path, tokenizer, data, mode, **overrides):
    student, teachers = models(tokenizer)
    args = tiny_config(
        tmp_path,
        output_dir=str(tmp_path / mode),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=0.5,
        optim="sgd",
        logit_free=mode,
        teacher_names=["gpt2", "llama"],
        loss_chunk_size=16,
        **overrides,
    )
    return MultiTeacherDistillationTrainer(
        model=student, teachers=teachers, args=args, train_dataset=data, processing_class=tokenizer
    )


@pytest.mark.parametrize("mode", ["always", "never"])
def test_the_trainer_weighs_the_teachers_by_the_prompt(tmp_path, tokenizer, dataset, mode):
    data = prompted_dataset(dataset)
    trainer = prompted_trainer(tmp_path, tokenizer, data, mode, prompt_evidence=True, prompt_temperature=0.5)
    inputs = trainer._prepare_inputs(trainer.data_collator([data[i] for i in range(4)]))
    seen = {}
    original = trainer.distillation_loss.__call__

    def spy(*args, **kwargs):
        seen["prompt"] = kwargs["prompt"]
        seen["result"] = result = original(*args, **kwargs)
        return result

    trainer.distillation_loss = spy
    trainer.model.eval()
    trainer.compute_loss(trainer.model, inputs)
    evidence = seen["prompt"]
    labels, ids = inputs["labels"], inputs["input_ids"]
    prompt = prompt_positions(ids, labels, inputs["attention_mask"])
    assert prompt.any() and torch.equal(evidence.positions, prompt)
    # the evidence is each teacher's log-probability of the prompt's next tokens, from its own logits
    with torch.no_grad():
        logits = [t(input_ids=ids, attention_mask=inputs["attention_mask"]).logits for t in trainer.teachers]
    expected = torch.stack(
        [z.log_softmax(-1)[prompt].gather(-1, prompt_targets(ids, prompt)[:, None])[:, 0] for z in logits]
    )
    assert torch.allclose(evidence.log_prob, expected, rtol=0, atol=1e-10)
    without = compute_teacher_weights(logits, labels)
    with_prompt = compute_teacher_weights(logits, labels, prompt=evidence, prompt_temperature=0.5)
    assert torch.allclose(seen["result"].kd.weights, with_prompt, rtol=0, atol=1e-10)
    assert not torch.allclose(with_prompt, without, atol=1e-3)


def test_training_with_the_prompt_logit_free_equals_the_logits_path(tmp_path, tokenizer, dataset):
    data = prompted_dataset(dataset)
    runs = []
    for mode in ("always", "never"):
        trainer = prompted_trainer(tmp_path, tokenizer, data, mode, prompt_evidence=True)
        trainer.train()
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        runs.append(([e["loss"] for e in trainer.state.log_history if "loss" in e], weights))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-10)
    for name, weight in runs[0][1].items():
        assert torch.allclose(weight, runs[1][1][name], rtol=0, atol=1e-10), name


def top_k_log_prob_reference(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """
    log p_hat(x) of each row's target under its top-k form, plainly in float64: p itself among the k most likely
    tokens, else an even share of the rest of the mass; then normalized.
    """
    out = []
    for row, target in zip(logits.double(), targets.tolist(), strict=True):
        p = row.softmax(-1)
        top = set(p.topk(k).indices.tolist())
        tail = (1 - sum(p[v] for v in top)) / (len(p) - k)
        p_hat = [p[v] if v in top else tail for v in range(len(p))]
        out.append(math.log(p_hat[target] / sum(p_hat)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("k", [4, None])  # None: the whole vocabulary
def test_a_cache_gives_the_prompt_evidence_of_its_top_k_distributions(tmp_path, tokenizer, dataset, k):
    data = prompted_dataset(dataset, rows=8)
    student, teachers = models(tokenizer)
    k = k or len(tokenizer)
    cache = cache_teacher_logits(teachers, data, str(tmp_path / "cache"), k=k, disable_tqdm=True)
    args = tiny_config(tmp_path, teacher_names=["gpt2", "llama"], prompt_evidence=True, per_device_train_batch_size=4)
    trainer = MultiTeacherDistillationTrainer(model=student, teachers=cache, args=args, processing_class=tokenizer)
    inputs = trainer._prepare_inputs(trainer.data_collator([cache.dataset[i] for i in range(4)]))
    ids, labels, attention = inputs["input_ids"], inputs["labels"], inputs.get("attention_mask")
    prompt = prompt_positions(ids, labels, attention)
    assert prompt.any()
    evidence = trainer.teacher_source(
        dict(inputs), student_vocab=len(tokenizer), temperature=1.0, output_hidden_states=False, prompt=prompt
    ).prompt_evidence(prompt)
    targets = prompt_targets(ids, prompt)
    with torch.no_grad():
        logits = [t(input_ids=ids, attention_mask=attention).logits[prompt] for t in teachers]
    expected = torch.stack([top_k_log_prob_reference(z, targets, k) for z in logits])
    assert torch.allclose(evidence.log_prob.double(), expected, rtol=0, atol=1e-5)  # stored in float32
    if k < len(tokenizer):  # some prompt tokens lie in the tail
        assert not torch.allclose(
            expected,
            torch.stack([z.log_softmax(-1).gather(-1, targets[:, None])[:, 0] for z in logits]).double(),
            atol=1e-3,
        )
    trainer.train_dataset = cache.dataset
    trainer.train()  # and it trains on it
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


# ---- teachers on their own tokenizers ----


def test_the_prompt_content_is_the_same_text_under_every_template(chatml, mistral, conversations):
    renderer = ExampleRenderer("prompt_completion")
    for conversation in conversations[:6]:
        example = {"prompt": conversation[:1], "completion": conversation[1:2]}
        for tokenizer in (chatml, mistral):
            encoded = renderer.encode(example, tokenizer)
            marks = prompt_content(encoded)
            assert marks[-1] == 0
            text = "".join(
                encoded.rendered.text[slice(*encoded.offsets[j + 1])] for j, mark in enumerate(marks) if mark
            )
            # the user's message, whatever the template puts around it, and nothing of the completion (the spaces
            # between words are not in every tokenizer's offsets)
            assert "".join(text.split()) == "".join(conversation[0]["content"].split())


def row_sum_reference(log_prob, positions):
    """Per row, the floored sum, plainly."""
    flat = iter(log_prob.tolist())
    return torch.tensor(
        [sum(max(next(flat), -20.0) for here in row if here) for row in positions.tolist()], dtype=torch.float64
    )


def test_a_row_sum_lands_on_the_first_document_of_its_row():
    positions = torch.tensor([[True, False, True, False], [False, True, False, False]])
    evidence = PromptEvidence(positions, torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-5.0, -30.0]]))
    starts = torch.tensor([[True, False, True, False], [True, False, False, False]])  # row 0: two documents
    scores = evidence.document_scores(starts, temperature=2.0)
    expected = torch.zeros(1, 2 * 5)
    expected[0, 1] = (-1.0 - 5.0) / 2  # row 0's first document: its prompt token and the row's sum
    expected[0, 2] = -2.0 / 2
    expected[0, 5 + 1] = (-3.0 - 30.0) / 2  # a row sum is floored token by token where it is made, not here
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)
    log_prob = torch.tensor([-1.0, -25.0, -3.0], dtype=torch.float64)
    torch.testing.assert_close(row_sums(log_prob, positions), row_sum_reference(log_prob, positions))


def mixed_trainer(tmp_path, chatml, mistral, conversations, mode):
    rows = Dataset.from_list([{"prompt": m[:1], "completion": m[1:2]} for m in conversations[:8]])
    teachers = [
        tiny_causal_lm("gpt2", chatml, seed=3).double(),  # on the student's tokenizer
        tiny_causal_lm("mistral", mistral, seed=4).double(),  # on its own
    ]
    args = tiny_config(
        tmp_path, output_dir=str(tmp_path / mode), max_steps=2, per_device_train_batch_size=4, logit_free=mode,
        teacher_names=["shared", "own"], prompt_evidence=True, cross_tokenizer_max_length=96, loss_chunk_size=16,
    )  # fmt: skip
    return MultiTeacherDistillationTrainer(
        model=tiny_causal_lm("qwen2", chatml, seed=1).double(),
        teachers=teachers,
        args=args,
        train_dataset=rows,
        processing_class=chatml,
        teacher_tokenizers=[None, mistral],
    )


def test_a_teacher_on_its_own_tokens_is_weighed_by_its_own_prompt(tmp_path, chatml, mistral, conversations):
    runs = {}
    for mode in ("never", "always"):
        trainer = mixed_trainer(tmp_path, chatml, mistral, conversations, mode)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        inputs = trainer._prepare_inputs(batch)
        seen = {}
        original = trainer.distillation_loss.__call__

        def spy(*args, original=original, seen=seen, **kwargs):
            seen["prompt"] = kwargs["prompt"]
            return original(*args, **kwargs)

        trainer.distillation_loss = spy
        trainer.model.eval()
        trainer.compute_loss(trainer.model, inputs)
        runs[mode] = evidence = seen["prompt"]
        ids, labels, own = inputs["input_ids"], inputs["labels"], inputs["teacher_inputs"][1]
        # the student's prompt positions inside the user's message only (not the template's markup)
        content = inputs["mtkd_prompt_content"]
        expected_positions = prompt_positions(ids, labels, inputs["attention_mask"]) & content
        assert content.any() and torch.equal(evidence.positions, expected_positions)
        assert not torch.equal(expected_positions, prompt_positions(ids, labels, inputs["attention_mask"]))
        with torch.no_grad():
            shared = trainer.teachers[0](input_ids=ids, attention_mask=inputs["attention_mask"]).logits
            mine = trainer.teachers[1](input_ids=own["input_ids"], attention_mask=own["attention_mask"]).logits
        shared_expected = shared.log_softmax(-1)[expected_positions].gather(
            -1, prompt_targets(ids, expected_positions)[:, None]
        )[:, 0]
        mask = own["prompt_mask"]
        own_log_prob = mine.log_softmax(-1)[mask].gather(-1, prompt_targets(own["input_ids"], mask)[:, None])[:, 0]
        torch.testing.assert_close(evidence.log_prob[0], shared_expected, rtol=0, atol=1e-10)
        assert not evidence.log_prob[1].any()  # the teacher on its own tokens counts per row
        assert not evidence.row_log_prob[0].any()
        torch.testing.assert_close(evidence.row_log_prob[1], row_sum_reference(own_log_prob, mask), rtol=0, atol=1e-10)
        assert (evidence.row_log_prob[1] < 0).all()  # every row has a prompt
    for name in ("log_prob", "row_log_prob"):  # logit-free reads the same evidence
        torch.testing.assert_close(getattr(runs["always"], name), getattr(runs["never"], name), rtol=0, atol=1e-10)


def test_training_with_a_teacher_on_its_own_tokens_and_the_prompt(tmp_path, chatml, mistral, conversations):
    losses = {}
    for mode in ("never", "always"):
        trainer = mixed_trainer(tmp_path, chatml, mistral, conversations, mode)
        trainer.train()
        losses[mode] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses["always"] == pytest.approx(losses["never"], rel=1e-8)


@pytest.mark.parametrize("prompted", [False, True])
def test_a_first_batch_without_a_prompt_is_warned_about(tmp_path, tokenizer, dataset, caplog, prompted):
    data = prompted_dataset(dataset) if prompted else dataset.select(range(32))  # plain text: every token labelled
    trainer = prompted_trainer(tmp_path, tokenizer, data, "always", prompt_evidence=True)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    warned = [r for r in caplog.records if "the first training batch has no prompt token" in r.getMessage()]
    assert len(warned) == (0 if prompted else 1)


def test_a_prompt_temperature_that_is_not_positive_is_refused(tmp_path):
    with pytest.raises(ValueError, match="`prompt_temperature` must be > 0"):
        MultiTeacherDistillationConfig(output_dir=str(tmp_path), prompt_temperature=0.0)
