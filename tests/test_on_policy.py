"""On-policy distillation (lmbda, seq_kd): the seeded draw, prompts and labels, exact accumulation, resume, teachers"""

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from test_deepspeed_distributed import launcher, run
from test_run_clm_distill import QUICK, run_main
from trainer_helpers import tiny_config

from hf_mtkd import MultiTeacherDistillationTrainer, on_policy
from hf_mtkd.cross_tokenizer import PROMPT_CONTENT_KEY
from hf_mtkd.on_policy import (
    GENERATED_BY_KEY,
    PROMPTS_KEY,
    Sampling,
    completion_batch,
    draw_on_policy,
    generate_completions,
    prompt_tokens,
    seq_kd_index,
)
from hf_mtkd.testing import chat_tokenizer, fit_causal_lm, synthetic_conversations, tiny_causal_lm


@pytest.fixture(scope="module")
def conversations():
    return synthetic_conversations(48, seed=0)


@pytest.fixture(scope="module")
def tok(conversations):
    return chat_tokenizer(conversations, "chatml", 512, "bpe")


@pytest.fixture(scope="module")
def rows(conversations):
    """Standard prompt/completion rows (strings)."""
    return Dataset.from_list([{"prompt": m[0]["content"], "completion": " " + m[1]["content"]} for m in conversations])


def make_trainer(tmp_path, tok, dataset, teachers=None, student=None, **config):
    teacher_tokenizers = config.pop("teacher_tokenizers", None)
    return MultiTeacherDistillationTrainer(
        model=student or tiny_causal_lm("qwen2", tok, seed=1),
        teachers=teachers or [tiny_causal_lm("gpt2", tok, seed=3), tiny_causal_lm("llama", tok, seed=4)],
        args=tiny_config(
            tmp_path,
            **{"max_steps": 2, "per_device_train_batch_size": 4, "max_new_tokens": 5, "lmbda": 1.0, **config},
        ),
        train_dataset=dataset,
        processing_class=tok,
        teacher_tokenizers=teacher_tokenizers,
    )


class Recorder:
    """Wraps a trainer's `compute_loss`: keeps each training batch (a copy) with the `num_items_in_batch` it got."""

    def __init__(self, trainer):
        self.batches, self.compute_loss = [], trainer.compute_loss
        trainer.compute_loss = self

    def __call__(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.batches.append(({k: v for k, v in inputs.items()}, num_items_in_batch))
        return self.compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


# ---- the draw ----


def test_the_draw_is_seeded_and_takes_about_lmbda_of_the_batches():
    draws = [[draw_on_policy(0.3, 7, step, i) for step in range(2000) for i in range(2)] for _ in range(2)]
    assert draws[0] == draws[1]  # a function of (seed, step, micro-batch) alone
    assert sum(draws[0]) / len(draws[0]) == pytest.approx(0.3, abs=0.035)
    assert draws[0] != [draw_on_policy(0.3, 8, step, i) for step in range(2000) for i in range(2)]
    assert not any(draw_on_policy(0.0, 0, step, 0) for step in range(100))
    assert all(draw_on_policy(1.0, 0, step, 0) for step in range(100))


def test_the_logged_share_is_the_draw(tmp_path, tok, rows):
    trainer = make_trainer(tmp_path, tok, rows, lmbda=0.5, max_steps=6, gradient_accumulation_steps=2, seed=3)
    recorder = Recorder(trainer)
    trainer.train()
    assert math.isfinite(trainer.evaluate(trainer.train_dataset.select(range(8)))["eval_loss_kd"])
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "On-policy distillation: the student wrote the completions of a share lmbda = 0.5 of the training" in card
    expected = [[draw_on_policy(0.5, 3, step, i) for i in range(2)] for step in range(6)]
    seen = [batch.get(GENERATED_BY_KEY) == "student" for batch, _ in recorder.batches]
    assert seen == [drawn for step in expected for drawn in step]
    assert 0 < sum(seen) < len(seen)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["on_policy/share"] for h in logged] == [sum(step) / 2 for step in expected]
    for h, step in zip(logged, expected, strict=True):
        assert ("on_policy/teacher_weight/gpt2" in h) == any(step)
        assert h["on_policy/generated_tokens"] <= 4 * 5 * sum(step)
        assert (h["on_policy/generation_seconds"] > 0) == any(step)  # the wall-clock time of generation


# ---- prompts, generation and labels ----


def test_prompt_completion_labels_by_hand():
    input_ids = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 10, 11, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    prompts = prompt_tokens(input_ids, labels, mask)
    assert [p.tolist() for p in prompts] == [[5, 6], [9]]
    alone = prompt_tokens(input_ids, torch.full_like(labels, -100), mask)  # prompts alone: every real token
    assert [p.tolist() for p in alone] == [[5, 6, 7, 8], [9, 10, 11]]
    batch = completion_batch(prompts, [torch.tensor([3, 1]), torch.tensor([4, 4, 4])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 3, 1], [9, 4, 4, 4]]
    assert batch["labels"].tolist() == [[-100, -100, 3, 1], [-100, 4, 4, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    batch = completion_batch([torch.tensor([5, 6, 7])], [torch.tensor([1])], pad_token_id=0)
    assert batch["labels"].tolist() == [[-100, -100, -100, 1]]
    with pytest.raises(ValueError, match="has no prompt"):
        prompt_tokens(input_ids, input_ids, mask)


class FixedGenerator(torch.nn.Module):
    """A 'model' whose generate appends fixed tokens; records what it was given and its mode."""

    def __init__(self, new_tokens):
        super().__init__()
        self.new_tokens, self.calls = torch.tensor(new_tokens), []

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):
        self.calls.append((input_ids.clone(), attention_mask.clone(), generation_config, self.training))
        return torch.cat([input_ids, self.new_tokens[: len(input_ids)]], dim=1)


def test_completions_are_sampled_at_temperature_1_unless_told(tmp_path):
    """The student's own distribution by default, whatever the KD τ; None: the KD τ, GKD's single temperature."""
    from hf_mtkd import MultiTeacherDistillationConfig

    def sampling(**fields):
        args = MultiTeacherDistillationConfig(output_dir=str(tmp_path), temperature=2.0, lmbda=0.5, **fields)
        return Sampling.from_config(args).temperature

    assert sampling() == 1.0
    assert sampling(generation_temperature=None) == 2.0
    assert sampling(generation_temperature=0.7) == 0.7


def test_generation_left_pads_samples_in_eval_mode_and_cuts_after_the_first_eos():
    model = FixedGenerator([[4, 1, 2, 2], [4, 4, 4, 4], [1, 2, 2, 2]]).train()
    prompts = [torch.tensor([7, 8, 9]), torch.tensor([5]), torch.tensor([6, 6])]
    sampling = Sampling(max_new_tokens=4, temperature=0.7, top_k=3, top_p=0.9)
    completions = generate_completions(model, prompts, sampling, eos_token_id=1, pad_token_id=2, seed=0)
    assert [c.tolist() for c in completions] == [[4, 1], [4, 4, 4, 4], [1]]
    input_ids, attention_mask, config, training = model.calls[0]
    assert input_ids.tolist() == [[7, 8, 9], [2, 2, 5], [2, 6, 6]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == (True, 0.7, 3, 0.9)
    assert (config.max_new_tokens, config.eos_token_id, config.pad_token_id) == (4, [1], 2)
    assert not training and model.training  # eval mode for generation, restored after


def test_generation_is_seeded_and_leaves_the_global_random_state_alone(tok):
    model = tiny_causal_lm("qwen2", tok, seed=1)
    prompts = [torch.tensor(tok("what is one plus two ?")["input_ids"])] * 4
    sampling = Sampling(max_new_tokens=8, temperature=1.0)
    state = torch.get_rng_state()

    def sample(seed):
        return [
            c.tolist()
            for c in generate_completions(model, prompts, sampling, eos_token_id=1, pad_token_id=2, seed=seed)
        ]

    plain = sample(0)
    assert plain == sample(0) != sample(1)
    assert torch.equal(torch.get_rng_state(), state)
    model.generation_config.suppress_tokens = list(range(10, len(tok)))  # would leave ids 0-9 only
    assert sample(0) == plain  # only the sampling settings shape the distribution, not the model's own
    assert model.generation_config.suppress_tokens[0] == 10


def two_batches(trainer, size=4):
    """Two collated training micro-batches of `size` rows, and the length of each one's longest prompt."""
    batches = [trainer.data_collator([trainer.train_dataset[i] for i in range(j, j + size)]) for j in (0, size)]
    prompts = [prompt_tokens(b["input_ids"], b["labels"], b["attention_mask"]) for b in batches]
    return batches, [max(len(p) for p in batch) for batch in prompts]


def test_completions_are_capped_to_the_positions_left(tmp_path, tok, rows, caplog):
    batches, longest = two_batches(make_trainer(tmp_path, tok, rows))
    limit = max(longest) + 3
    student = tiny_causal_lm("gpt2", tok, seed=1, max_positions=limit)  # learned positions: nothing beyond them
    trainer = make_trainer(tmp_path, tok, rows, student=student, max_new_tokens=limit - 1)
    with caplog.at_level(logging.WARNING):
        generated, _ = trainer.get_batch_samples(iter(batches * 2), 4, torch.device("cpu"))
    widths = [batch["input_ids"].shape[1] for batch in generated]
    assert widths == [limit] * 4  # each batch's completions as long as its longest prompt leaves room for
    (message,) = [r.getMessage() for r in caplog.records if "On-policy generation" in r.getMessage()]  # once
    first = f"longest prompt ({longest[0]} tokens) and max_new_tokens={limit - 1} exceed the {limit} positions"
    assert f"{first} of the student" in message and f"at most {limit - longest[0]} new tokens" in message


def test_a_prompt_that_fills_the_positions_is_refused(tmp_path, tok, rows):
    batches, longest = two_batches(make_trainer(tmp_path, tok, rows))
    student = tiny_causal_lm("gpt2", tok, seed=1, max_positions=longest[0])
    trainer = make_trainer(tmp_path, tok, rows, student=student, max_new_tokens=2)
    with pytest.raises(ValueError, match=f"A training prompt of {longest[0]} tokens fills the {longest[0]} positions"):
        trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))


def test_generated_text_fits_every_models_positions_across_tokenizers(tmp_path, tok, conversations):
    """The student's rendering of its text is cut at its positions; a cross-tokenizer teacher's at its own."""
    other = chat_tokenizer(conversations, "mistral", 300, "wordpiece")
    data = Dataset.from_list([{"prompt": m[:1], "completion": m[1:2]} for m in conversations])
    teachers = [tiny_causal_lm("gpt2", tok, seed=3), tiny_causal_lm("mistral", other, seed=4, max_positions=20)]
    config = dict(teachers=teachers, teacher_tokenizers=[None, other], teacher_names=["same", "other"])
    batches, longest = two_batches(make_trainer(tmp_path, tok, data, **config))
    limit = max(longest) + 2
    student = tiny_causal_lm("gpt2", tok, seed=1, max_positions=limit)
    with torch.no_grad():
        student.lm_head.weight[tok.eos_token_id] *= 30  # often closed: the rendering adds the end of turn
    trainer = make_trainer(tmp_path, tok, data, student=student, max_new_tokens=8, **config)
    generated, _ = trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))
    for batch in generated:
        assert batch["input_ids"].shape[1] <= limit
        assert batch["teacher_inputs"][1]["input_ids"].shape[1] <= 20
        model = trainer.model.train()
        assert math.isfinite(float(trainer.compute_loss(model, batch).detach()))


def test_the_student_never_writes_a_padding_id(tmp_path, tok, rows):
    """A head wider than the tokenizer (a padded vocabulary) whose padding rows would win: none is ever generated."""
    student = tiny_causal_lm("qwen2", tok, seed=1, vocab_size=len(tok) + 64)
    head = torch.nn.Linear(student.lm_head.in_features, student.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(student.lm_head.weight)
        head.bias.zero_()
        head.bias[len(tok) :] = 1e4
    student.lm_head = head
    trainer = make_trainer(tmp_path, tok, rows, student=student, teacher_tokenizers=[tok, tok])
    batches, _ = two_batches(trainer)
    generated, _ = trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))
    for batch in generated:
        written = batch["input_ids"][batch["labels"] != -100]
        assert len(written) > 0 and int(written.max()) < len(tok)


@pytest.mark.parametrize("writer", ["student", "peft student", "seq_kd teacher"])
def test_generation_runs_in_the_precision_of_the_training_forward(tmp_path, tok, rows, writer):
    """With bf16=True the student generates under the trainer's autocast; the seq_kd teacher in its own dtype."""
    student = base = tiny_causal_lm("qwen2", tok, seed=1)
    if writer == "peft student":
        peft = pytest.importorskip("peft")  # PEFT's generate bypasses the autocast accelerate puts on the forward
        student = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    teachers = [tiny_causal_lm("gpt2", tok, seed=3), tiny_causal_lm("llama", tok, seed=4)]
    model = teachers[1] if writer == "seq_kd teacher" else base
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, args, out: seen.append((m.training, out.dtype))
    )
    writes = dict(lmbda=0.0, seq_kd=True, seq_kd_teacher="llama") if writer == "seq_kd teacher" else {}
    trainer = make_trainer(tmp_path, tok, rows, student=student, teachers=teachers, bf16=True, max_steps=1, **writes)
    trainer.train()
    generation = {dtype for training, dtype in seen if not training}  # the teacher also scores in eval mode
    assert generation == ({torch.float32} if writer == "seq_kd teacher" else {torch.bfloat16})


def test_the_generated_tokens_per_step_start_afresh_after_a_window_without_metrics(tmp_path, tok, rows):
    trainer = make_trainer(tmp_path, tok, rows)
    generator, store = trainer.on_policy, trainer._metrics["train"]

    def window(steps, generated, tokens):
        generator.steps += steps  # as `complete` counts the optimizer steps
        generator.add_generated(store, generated, 0.5, torch.device("cpu"))
        if tokens is not None:  # a window whose batches recorded metrics
            count = torch.tensor(float(tokens))
            generator.add_metrics(store, "student", torch.full((2,), tokens / 2), count)
            store.update(num_tokens=count, num_batches=torch.tensor(1.0), num_empty_batches=count == 0)
        return trainer._pop_metrics("train")

    assert window(3, 30, tokens=0) == {}  # no token: nothing reported
    assert window(1, 10, tokens=4)["on_policy/generated_tokens"] == 10
    assert generator.means({"on_policy/generated_tokens": 60.0}, 0) == {}  # no metrics: the window's keys dropped
    generator.steps = 3
    assert generator.means({}, 0) == {} and generator.steps == 0


def test_generated_batches_carry_loss_on_the_generated_tokens_only(tmp_path, tok, rows):
    trainer = make_trainer(tmp_path, tok, rows, per_device_train_batch_size=3)
    batches = [trainer.data_collator([trainer.train_dataset[i] for i in range(j, j + 3)]) for j in (0, 3)]
    prompts = [prompt_tokens(b["input_ids"], b["labels"], b["attention_mask"]) for b in batches]
    generated, count = trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))
    total = 0
    for batch, original in zip(generated, prompts, strict=True):
        assert batch[GENERATED_BY_KEY] == "student"
        for row, prompt in enumerate(original):
            real = batch["attention_mask"][row].bool()
            ids, labels = batch["input_ids"][row][real], batch["labels"][row][real]
            assert ids[: len(prompt)].tolist() == prompt.tolist()
            assert (labels[: len(prompt)] == -100).all()  # prompt positions carry no loss
            completion = ids[len(prompt) :]
            assert labels[len(prompt) :].tolist() == completion.tolist()
            assert 1 <= len(completion) <= 5 and (completion[:-1] != tok.eos_token_id).all()
            assert (batch["labels"][row][~real] == -100).all()
            total += len(completion)
    assert int(count) == total  # num_items_in_batch counts the generated tokens of both micro-batches


def test_gradient_accumulation_is_exact_over_generated_batches(tmp_path, tok, rows, monkeypatch):
    """Two micro-batches accumulated give the step of one batch of both: the loss is normalised over every token."""

    def completions(model, prompts, sampling, **kwargs):  # deterministic, of uneven lengths
        return [torch.tensor([int(p[-1])] * (1 + len(p) % 4) + [tok.eos_token_id]) for p in prompts]

    monkeypatch.setattr(on_policy, "generate_completions", completions)
    config = dict(
        max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2, optim="sgd", learning_rate=1.0,
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, alpha_ce=0.5, alpha_kd=0.5,
    )  # fmt: skip
    data = rows.select(range(4))
    trainer = make_trainer(tmp_path, tok, data, **config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    reference = make_trainer(tmp_path, tok, data, **config)
    loader = trainer.get_train_dataloader()
    both = [row for batch in loader for row in batch["input_ids"]]
    assert len(both) == 4
    trainer.train()
    # the reference: one batch of the four rows with the same completions, the loss averaged over all its tokens
    features = [reference.train_dataset[i] for i in range(4)]
    batch = reference.data_collator(features)
    prompts = prompt_tokens(batch["input_ids"], batch["labels"], batch["attention_mask"])
    generated = completion_batch(prompts, completions(None, prompts, None), tok.pad_token_id)
    model = reference.model.train()
    reference.compute_loss(model, generated).backward()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(
                trainer.model.state_dict()[name], before[name] - parameter.grad, rtol=1e-4, atol=1e-6
            )


def test_resuming_repeats_the_draws_and_the_generations(tmp_path, tok, rows):
    config = dict(lmbda=0.5, max_steps=4, save_strategy="steps", save_steps=2, seed=5)
    whole = make_trainer(tmp_path / "whole", tok, rows, **config)
    recorded = Recorder(whole)
    whole.train()
    resumed = make_trainer(tmp_path / "resumed", tok, rows, **config)
    again = Recorder(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "out" / "checkpoint-2"))
    assert len(again.batches) == 2
    for (first, _), (second, _) in zip(recorded.batches[2:], again.batches, strict=True):
        assert first.get(GENERATED_BY_KEY) == second.get(GENERATED_BY_KEY)
        torch.testing.assert_close(first["input_ids"], second["input_ids"], rtol=0, atol=0)
    assert any(GENERATED_BY_KEY in batch for batch, _ in again.batches)


# ---- seq_kd ----


def test_seq_kd_teacher_by_name_index_or_prior():
    class Args:
        seq_kd_teacher, teacher_weights = None, None

    args, names = Args(), ["a", "b", "c"]
    assert seq_kd_index(args, names) == 0  # a uniform prior: the first
    args.teacher_weights = [0.2, 0.5, 0.5]
    assert seq_kd_index(args, names) == 1  # the largest prior, the first on ties
    for choice, index in (("c", 2), ("2", 2), (1, 1), ("-1", 2)):
        args.seq_kd_teacher = choice
        assert seq_kd_index(args, names) == index
    args.seq_kd_teacher = "d"
    with pytest.raises(ValueError, match="`seq_kd_teacher` 'd' is no teacher"):
        seq_kd_index(args, names)


def test_seq_kd_generates_with_the_chosen_teacher(tmp_path, tok, rows, monkeypatch):
    writers, generate = [], on_policy.generate_completions

    def recorded(model, prompts, sampling, **kwargs):
        writers.append(model)
        return generate(model, prompts, sampling, **kwargs)

    monkeypatch.setattr(on_policy, "generate_completions", recorded)
    teachers = [tiny_causal_lm("gpt2", tok, seed=3), tiny_causal_lm("llama", tok, seed=4)]
    trainer = make_trainer(
        tmp_path, tok, rows, teachers=teachers, teacher_names=["g", "l"], lmbda=0.0, seq_kd=True, seq_kd_teacher="l"
    )
    recorder = Recorder(trainer)
    trainer.train()
    assert writers == [teachers[1]] * 2
    assert [batch[GENERATED_BY_KEY] for batch, _ in recorder.batches] == ["l", "l"]
    assert all(h["on_policy/share"] == 0 for h in trainer.state.log_history if "loss" in h)
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "On-policy distillation: the teacher `l` wrote the completions of every training batch (seq_kd)" in card


# ---- data formats, PEFT, cross-tokenizer teachers ----


def test_prompts_alone_train_on_policy(tmp_path, tok, conversations):
    prompts = Dataset.from_list([{"prompt": m[:1]} for m in conversations])  # conversational prompts alone
    trainer = make_trainer(tmp_path, tok, prompts)
    assert all(label == -100 for row in trainer.train_dataset["labels"] for label in row)
    assert math.isfinite(trainer.train().training_loss)
    assert all(h["on_policy/share"] == 1 for h in trainer.state.log_history if "loss" in h)
    text = Dataset.from_list([{"prompt": m[0]["content"]} for m in conversations])
    assert math.isfinite(make_trainer(tmp_path, tok, text, lmbda=0.0, seq_kd=True).train().training_loss)


def test_generated_batches_keep_their_rows_routing(tmp_path, tok, conversations):
    """Rows routed to a teacher by their prompt (sums to one, counts to the other) keep it when the student writes."""
    rows = Dataset.from_list(
        [
            {
                "prompt": m[0]["content"],
                "completion": " " + m[1]["content"],
                "teacher_ids": int("count" in m[0]["content"]),
            }
            for m in conversations
        ]
    )
    trainer = make_trainer(tmp_path, tok, rows, teacher_names=["g", "l"], teacher_weighting="static")
    recorder = Recorder(trainer)
    trainer.train()
    for batch, _ in recorder.batches:
        assert batch[GENERATED_BY_KEY] == "student"
        for ids, labels, prior in zip(batch["input_ids"], batch["labels"], batch["teacher_prior"], strict=True):
            prompt = tok.decode(ids[: int((labels != -100).int().argmax())])
            assert prior.tolist() == ([0.0, 1.0] if "count" in prompt else [1.0, 0.0])
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["on_policy/teacher_weight/g"] for h in logs] == pytest.approx([h["teacher_weight/g"] for h in logs])


def test_conversations_are_answered_from_their_first_assistant_turn(tmp_path, tok, conversations):
    data = Dataset.from_list([{"messages": m} for m in conversations])
    trainer = make_trainer(tmp_path, tok, data)
    recorder = Recorder(trainer)
    assert math.isfinite(trainer.train().training_loss)
    for batch, _ in recorder.batches:
        for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
            prompt = tok.decode(ids[: int((labels != -100).int().argmax())])
            assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
            assert prompt.count("<|im_start|>") == 2  # the first question only: the answer replaces the rest


def test_a_peft_student_generates_on_policy(tmp_path, tok, rows):
    peft = pytest.importorskip("peft")
    student = peft.get_peft_model(
        tiny_causal_lm("qwen2", tok, seed=1), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    trainer = make_trainer(tmp_path, tok, rows, student=student)
    recorder = Recorder(trainer)
    assert math.isfinite(trainer.train().training_loss)
    assert all(batch[GENERATED_BY_KEY] == "student" for batch, _ in recorder.batches)


@pytest.mark.parametrize("template", ["chatml", "mistral"])
def test_a_cut_generated_answer_gets_no_end_of_turn(tok, conversations, template):
    """Rendered anew for a teacher, an answer cut at max_new_tokens ends with its text; a closed one ends its turn."""
    tokenizer = tok if template == "chatml" else chat_tokenizer(conversations, "mistral", 300, "wordpiece")
    renderer = on_policy.GeneratedRenderer()
    learned = {}
    for closed in (True, False):
        example = {"prompt": conversations[0][:1], "completion": "one plus one", "closed": closed}
        encoded = renderer.encode(example, tokenizer)
        ids = [i for i, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != -100]
        learned[closed] = tokenizer.decode(ids)
        prompt = tokenizer.apply_chat_template(conversations[0][:1], tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(encoded.input_ids).startswith(tokenizer.decode(tokenizer(prompt)["input_ids"]))
    assert learned[False].strip() == "one plus one"
    assert learned[True].startswith(learned[False]) and len(learned[True].strip()) > len("one plus one")


@pytest.mark.parametrize(
    ("conversational", "prompts_alone", "prompt_evidence"),
    [(False, False, False), (True, False, False), (True, True, False), (False, False, True), (True, True, True)],
)
def test_cross_tokenizer_teachers_score_the_generated_text(
    tmp_path, tok, conversations, conversational, prompts_alone, prompt_evidence
):
    other = chat_tokenizer(conversations, "mistral", 300, "wordpiece")
    if prompts_alone:
        data = Dataset.from_list([{"prompt": m[:1]} for m in conversations])
    elif conversational:
        data = Dataset.from_list([{"prompt": m[:1], "completion": m[1:2]} for m in conversations])
    else:
        data = Dataset.from_list(
            [{"prompt": m[0]["content"], "completion": " " + m[1]["content"]} for m in conversations]
        )
    teachers = [tiny_causal_lm("gpt2", tok, seed=3), tiny_causal_lm("mistral", other, seed=4)]
    trainer = make_trainer(
        tmp_path, tok, data, teachers=teachers, teacher_tokenizers=[None, other], teacher_names=["same", "other"],
        prompt_evidence=prompt_evidence,
    )  # fmt: skip
    recorder = Recorder(trainer)
    assert math.isfinite(trainer.train().training_loss)
    aligned_anywhere = False
    for batch, count in recorder.batches:
        assert batch[GENERATED_BY_KEY] == "student"
        own = batch["teacher_inputs"][1]
        aligned = own["position_map"][:, :-1] >= 0  # aligned only where the student's next token carries loss
        assert not (aligned & (batch["labels"][:, 1:] == -100)).any()
        aligned_anywhere |= bool(aligned.any())
        if prompt_evidence:  # both read the prompt of the generated rows: the teacher in its own tokens
            assert own["prompt_mask"].sum(1).min() > 0 and batch[PROMPT_CONTENT_KEY].sum(1).min() > 0
        assert int(count) == int((batch["labels"][:, 1:] != -100).sum())
        for prompt, ids, labels in zip(batch[PROMPTS_KEY], batch["input_ids"], batch["labels"], strict=True):
            if conversational:
                prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            prompt_ids = tok(prompt)["input_ids"]
            assert ids[: len(prompt_ids)].tolist() == prompt_ids  # the student's prompt, rendered as in the data
            assert (labels[: len(prompt_ids)] == -100).all() and labels[len(prompt_ids)] != -100
    assert aligned_anywhere and any(h.get("teacher_aligned/other", 0) > 0 for h in trainer.state.log_history)
    if not prompts_alone:  # evaluation reads the data as it is (with the raw prompts)
        metrics = trainer.evaluate(data.select(range(8)))
        assert math.isfinite(metrics["eval_loss_kd"]) and "eval_on_policy/share" not in metrics


@pytest.mark.parametrize("disable", [False, True])
def test_disable_dropout_sets_every_dropout_of_the_student_to_zero(tmp_path, tok, rows, disable):
    student = tiny_causal_lm("qwen2", tok, seed=1)
    student.add_module("extra", torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Dropout(0.1)))
    trainer = make_trainer(tmp_path, tok, rows, student=student, lmbda=0.0, disable_dropout=disable)
    probabilities = [m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert probabilities == [0.0, 0.0] if disable else probabilities == [0.3, 0.1]


# ---- what is refused, up front ----


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"lmbda": 1.5}, r"`lmbda` \(the share of on-policy batches\) must be in \[0, 1\]"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be at least 1"),
        ({"generation_temperature": 0.0}, "`generation_temperature` must be > 0"),
        ({"generation_top_p": 0.0}, r"`generation_top_p` must be in \(0, 1\]"),
        ({"generation_top_k": -1}, "`generation_top_k` must be >= 0"),
        ({"packing": True, "max_length": 32, "seq_kd": True}, "`packing` cannot be combined with on-policy"),
        ({"seq_kd_teacher": "llama"}, "`seq_kd_teacher='llama'` has no effect without `seq_kd`: set seq_kd=True"),
    ],
)
def test_bad_settings_are_refused(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **config)


def test_what_on_policy_cannot_work_with_is_refused_before_loading_teachers(tmp_path, tok, rows, conversations):
    missing = [str(tmp_path / "no-such-teacher")]  # loading it would fail: every refusal comes first

    def refused(dataset, message, **config):
        with pytest.raises(ValueError, match=message):
            make_trainer(tmp_path, tok, dataset, teachers=missing, **config)

    refused(rows, "`seq_kd_teacher` 'other' is no teacher", seq_kd=True, seq_kd_teacher="other")
    refused(Dataset.from_list([{"text": "one two"}] * 4), "the training data is plain text")
    ids = tok("one plus one is two .")["input_ids"]
    refused(Dataset.from_list([{"input_ids": ids, "labels": ids}] * 4), "first token already carries loss")
    refused(rows, "`completion_only_loss=False` puts labels on the prompt", completion_only_loss=False)
    refused(rows, "`packing` cannot be combined with on-policy", packing=True, max_length=32)
    prompts = Dataset.from_list([{"prompt": m[0]["content"]} for m in conversations])
    refused(prompts, "Prompts alone train on-policy only", lmbda=0.5)
    short = tiny_causal_lm("gpt2", tok, max_positions=6)
    refused(
        rows, r"`max_new_tokens=6` can never fit in the 6 positions of the student", student=short, max_new_tokens=6
    )


def test_max_new_tokens_beyond_a_teachers_positions_is_refused_when_the_trainer_is_built(tmp_path, tok, rows):
    teachers = [tiny_causal_lm("gpt2", tok, seed=3, max_positions=8), tiny_causal_lm("llama", tok, seed=4)]
    with pytest.raises(ValueError, match=r"`max_new_tokens=9` can never fit in the 8 positions of teacher 'gpt2'"):
        make_trainer(tmp_path, tok, rows, teachers=teachers, max_new_tokens=9)


def test_a_teacher_cache_is_refused(tmp_path, tok, rows):
    from hf_mtkd import cache_teacher_logits

    data = Dataset.from_list([dict(tok(r["prompt"] + r["completion"])) for r in rows.select(range(4))])
    cache = cache_teacher_logits([tiny_causal_lm("gpt2", tok)], data, str(tmp_path / "cache"), k=4, disable_tqdm=True)
    with pytest.raises(ValueError, match="cannot use a teacher-logits cache"):
        make_trainer(tmp_path, tok, cache.dataset, teachers=cache)


def test_a_seq_kd_teacher_on_another_tokenizer_is_refused(tmp_path, tok, rows, conversations):
    other = chat_tokenizer(conversations, "mistral", 300, "wordpiece")
    teachers = [tiny_causal_lm("gpt2", tok, seed=3), tiny_causal_lm("mistral", other, seed=4)]
    with pytest.raises(ValueError, match="teacher 'other' does not share the student's tokenizer"):
        make_trainer(
            tmp_path, tok, rows, teachers=teachers, teacher_tokenizers=[None, other], teacher_names=["same", "other"],
            seq_kd=True, seq_kd_teacher="other",
        )  # fmt: skip


# ---- it learns, and the example script takes the flags ----


def test_the_on_policy_loss_goes_down(tmp_path, tok, rows):
    texts = [r["prompt"] + r["completion"] for r in rows]
    teacher = fit_causal_lm(tiny_causal_lm("gpt2", tok, seed=3), tok, texts, steps=40, seed=0)
    trainer = make_trainer(
        tmp_path, tok, rows, teachers=[teacher], teacher_names=["t"], max_steps=24, alpha_ce=0.0, alpha_kd=1.0,
        temperature=1.0, generation_temperature=1.0, max_new_tokens=8, learning_rate=1e-2,
    )  # fmt: skip
    trainer.train()
    losses = [h["loss_kd"] for h in trainer.state.log_history if "loss_kd" in h]
    assert len(losses) == 24
    assert sum(losses[-6:]) < 0.7 * sum(losses[:6])


@pytest.mark.parametrize("prompts_alone", [False, True])
def test_the_example_script_takes_lmbda(tmp_path, teacher_dirs, student_dir, conversations, prompts_alone):
    rows = [{"prompt": m[0]["content"], "completion": " " + m[1]["content"]} for m in conversations]
    if prompts_alone:
        rows = [{"prompt": row["prompt"]} for row in rows]
    paths = []
    for split, part in (("train", rows[:40]), ("validation", rows[40:])):
        paths.append(str(tmp_path / f"{split}.jsonl"))
        Dataset.from_list(part).to_json(paths[-1])
    flags = [
        "--teacher_model_name_or_path", *teacher_dirs[:2], "--model_name_or_path", student_dir, "--train_file",
        paths[0], "--validation_file", paths[1], "--lmbda", "1" if prompts_alone else "0.5", "--max_new_tokens", "4",
        "--generation_temperature", "0.9", "--do_train", "--output_dir", str(tmp_path / "out"), *QUICK,
    ]  # fmt: skip
    run_main(flags)
    state = (tmp_path / "out" / "trainer_state.json").read_text()
    assert '"on_policy/share"' in state and '"on_policy/generated_tokens"' in state


@pytest.mark.distributed
def test_zero3_on_two_processes_generates_in_step(tmp_path):
    """
    ZeRO-3 on two CPU processes: the student and the seq_kd teacher generate from partitioned weights, in step,
    gathered once per generation (ds3_gather_for_generation) or layer by layer at every token: the same text and
    losses either way.
    """
    worker = Path(__file__).parent / "distributed" / "on_policy_worker.py"
    # both settings in one launch; a rank left waiting: no report. Rank 0 writes it after the last collective, so
    # the gloo abort at exit after it is launched once more (`run`)
    results = tmp_path / "report.json"
    run([*launcher("torchrun"), str(worker), str(tmp_path), "zero3", "true", "false"], results=results, timeout=300)
    report = json.loads(results.read_text())
    for gather, run_report in report.items():
        ranks = run_report["ranks"]
        assert all(rank["partitioned"] for rank in ranks)
        assert ranks[0]["writers"] == ranks[1]["writers"]  # the same draws on every process
        assert {"student", "llama"} == set(ranks[0]["writers"])
        logs = [h for h in run_report["log_history"] if "loss" in h]
        assert len(logs) == 4 and all(math.isfinite(h["loss"]) for h in logs)
        assert ranks[0]["labels"] != ranks[1]["labels"]  # completions of other lengths: generation kept in step
        generations = [g for rank in ranks for g in rank["generations"]]
        assert len(generations) == 2 * len(ranks[0]["writers"])  # every micro-batch generated, on both processes
        # gathered: whole weights and no synced_gpus; else each layer gathered per token, the ranks kept in step
        assert all(g == {"synced_gpus": gather == "false", "whole": gather == "true"} for g in generations)
    gathered, per_token = report["true"], report["false"]
    for one, other in zip(gathered["ranks"], per_token["ranks"], strict=True):
        assert one["input_ids"] == other["input_ids"] and one["writers"] == other["writers"]
    losses = [[h["loss"] for h in run_report["log_history"] if "loss" in h] for run_report in (gathered, per_token)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
