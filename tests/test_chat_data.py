"""Instruction and chat data: formats, label masks checked by hand, per-template alignment, packing, end to end."""

import json
import math
import sys

import pytest
import torch
from datasets import Dataset
from test_run_clm_distill import QUICK, check_results, isolated_logging, run_main, run_subprocess
from trainer_helpers import tiny_config
from transformers import AutoTokenizer

from hf_mtkd import MultiTeacherDistillationTrainer, load_teacher_cache
from hf_mtkd.chat_data import (
    CompletionCollator,
    ExampleRenderer,
    detect_format,
    pack_rows,
    tokenize_dataset,
)
from hf_mtkd.cli import main as cli_main
from hf_mtkd.cross_tokenizer import MultiTokenizerCollator, VocabularyMap, align_encoded, segment_keys
from hf_mtkd.run_clm_distill import main
from hf_mtkd.testing import (
    CHAT_TEMPLATES,
    ConfidentlyWrongTeacher,
    chat_tokenizer,
    tiny_causal_lm,
)

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is one plus one ?"},
    {"role": "assistant", "content": "one plus one is two ."},
    {"role": "user", "content": "count from two ."},
    {"role": "assistant", "content": "count : two three four five six ."},
]


def learned_text(encoded, tokenizer) -> str:
    """The decoded tokens that carry loss, joined: what the model learns to write."""
    return "".join(
        tokenizer.decode([i]) for i, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != -100
    )


# ---- formats and masks, by hand ----


def test_detect_format():
    assert detect_format(["messages", "id"]) == "messages"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["text"]) == "text"
    assert detect_format(["input_ids", "attention_mask"]) is None
    with pytest.raises(ValueError, match="has a 'prompt' column but no 'completion' column"):
        detect_format(["prompt", "text"])


def test_assistant_masks_by_hand_system_user_assistant_multi_turn(chatml):
    encoded = ExampleRenderer("messages").encode({"messages": CONVERSATION}, chatml)
    text = encoded.rendered.text
    assert text == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is one plus one ?<|im_end|>\n"
        "<|im_start|>assistant\none plus one is two .<|im_end|>\n<|im_start|>user\ncount from two .<|im_end|>\n"
        "<|im_start|>assistant\ncount : two three four five six .<|im_end|>\n"
    )
    # both assistant turns, each with its end-of-turn marker, and nothing of the system or user turns
    assert [text[a:b] for a, b in encoded.rendered.loss_spans] == [
        "one plus one is two .<|im_end|>\n",
        "count : two three four five six .<|im_end|>\n",
    ]
    assert learned_text(encoded, chatml) == (
        "one plus one is two .<|im_end|>\ncount : two three four five six .<|im_end|>\n"
    )
    assert [text[a:b] for a, b in encoded.rendered.segments] == [m["content"] for m in CONVERSATION]
    everything = ExampleRenderer("messages", assistant_only_loss=False).encode({"messages": CONVERSATION}, chatml)
    assert everything.input_ids == encoded.input_ids and everything.labels == everything.input_ids


def test_assistant_masks_by_hand_with_a_template_without_generation_prompt(mistral):
    # Mistral style: no system turn, the assistant's text follows "[/INST]" after a space and ends with EOS
    messages = [m for m in CONVERSATION if m["role"] != "system"]
    encoded = ExampleRenderer("messages").encode({"messages": messages}, mistral)
    text = encoded.rendered.text
    assert text == (
        "<s>[INST] what is one plus one ? [/INST] one plus one is two .</s>"
        "[INST] count from two . [/INST] count : two three four five six .</s>"
    )
    assert [text[a:b] for a, b in encoded.rendered.loss_spans] == [
        " one plus one is two .</s>",
        " count : two three four five six .</s>",
    ]
    learned = [
        mistral.convert_ids_to_tokens(i)
        for i, label in zip(encoded.input_ids, encoded.labels, strict=True)
        if label != -100
    ]
    assert learned == [*"one plus one is two . </s>".split(), *"count : two three four five six . </s>".split()]


def test_prompt_completion_masks_by_hand(chatml):
    standard = ExampleRenderer("prompt_completion").encode(
        {"prompt": "one plus one is", "completion": " two ."}, chatml
    )
    assert standard.rendered.text == "one plus one is two ."
    assert learned_text(standard, chatml) == " two .</s>"  # the completion and an EOS appended
    assert standard.input_ids[-1] == chatml.eos_token_id
    every = ExampleRenderer("prompt_completion", completion_only_loss=False)
    assert every.encode({"prompt": "one plus one is", "completion": " two ."}, chatml).labels == standard.input_ids
    conversational = ExampleRenderer("prompt_completion").encode(
        {"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:3]}, chatml
    )
    assert learned_text(conversational, chatml) == "one plus one is two .<|im_end|>\n"
    with pytest.raises(ValueError, match="mixes a string with a list of messages"):
        ExampleRenderer("prompt_completion").render({"prompt": "hi", "completion": CONVERSATION[2:3]}, chatml)


def test_a_row_without_assistant_turn_and_a_template_less_tokenizer_are_refused(chatml, tokenizer):
    rows = Dataset.from_list([{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}])
    with pytest.raises(
        ValueError, match=r"Example 1: A conversation has no assistant turn \(roles \['system', 'user'\]"
    ):
        tokenize_dataset(rows, chatml, ExampleRenderer("messages"))
    assert not getattr(tokenizer, "chat_template", None)
    with pytest.raises(ValueError, match=r"The tokenizer of the student has no chat template.*--chat_template_path"):
        ExampleRenderer("messages").render({"messages": CONVERSATION}, tokenizer)
    collator = MultiTokenizerCollator(chatml, [tokenizer], renderer=ExampleRenderer("messages"), teacher_names=["t"])
    with pytest.raises(
        ValueError, match=r"tokenizer of teacher 't' has no chat template.*--teacher_chat_template_path"
    ):
        collator([{"messages": CONVERSATION}])


# ---- cross-tokenizer: each model renders with its own template, aligned inside the contents ----


def test_segment_keys_by_hand():
    # "<a>hi yo</a><b>ok</b>": contents "hi yo" at [3, 8) and "ok" at [15, 17)
    keys = [(3, 3), (5, 6), (8, 8), (15, 15), (17, 17)]
    assert segment_keys(keys, [(3, 8), (15, 17)]) == [(0, 0, 0), (0, 2, 3), None, (1, 0, 0), None]
    assert segment_keys([(2, 3), (5, 6)], [None, (5, 9)]) == [None, (1, 0, 1)]  # a context ending before a content


def test_two_templates_align_on_the_completion_spans(chatml, mistral, conversations):
    renderer = ExampleRenderer("messages")
    aligned = learned = 0
    for messages in conversations[:16]:
        student, teacher = (
            renderer.encode({"messages": messages}, chatml),
            renderer.encode({"messages": messages}, mistral),
        )
        position_map = align_encoded(student, teacher)
        for t, j in enumerate(position_map[:-1]):
            learned += student.labels[t + 1] != -100
            if j < 0:
                continue
            aligned += 1
            # the same message, the same context end and the same next-token start relative to its content
            s_next, t_next = student.offsets[t + 1], teacher.offsets[j + 1]
            (segment,) = [i for i, s in enumerate(student.rendered.segments) if s[0] <= s_next[0] < s[1]]
            assert messages[segment]["role"] in ("user", "assistant")
            s_start, t_start = student.rendered.segments[segment][0], teacher.rendered.segments[segment][0]
            assert student.offsets[t][1] - s_start == teacher.offsets[j][1] - t_start
            s_text = student.rendered.text[s_next[0] : s_next[1]].strip()
            t_text = teacher.rendered.text[t_next[0] : t_next[1]].strip()
            assert s_text and t_text and (s_text.startswith(t_text) or t_text.startswith(s_text))
    assert learned > 0 and aligned > 0.5 * learned  # most learned positions have a twin in the other rendering


# ---- packing ----


def test_pack_rows_by_hand():
    examples = {
        "input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]],
        "labels": [[1, 2, 3], [-100, 5], [6, 7, 8, 9], [10]],
    }
    assert pack_rows(examples, max_length=5) == {
        "input_ids": [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]],
        "labels": [[-100, 2, 3, -100, 5], [-100, 7, 8, 9, -100]],
        "position_ids": [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]],
    }


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
def test_packed_row_logits_equal_each_example_alone(chatml, model_type):
    model = tiny_causal_lm(model_type, chatml, seed=0).double().eval()
    examples = [chatml(text)["input_ids"] for text in ("one plus one is two .", "count : two three", "six .")]
    rows = pack_rows({"input_ids": examples, "labels": examples}, max_length=16)
    assert len(rows["input_ids"]) == 1
    batch = CompletionCollator(chatml.pad_token_id)(
        [
            {key: rows[key][0] for key in rows},
            {"input_ids": examples[2], "labels": examples[2], "position_ids": list(range(len(examples[2])))},
        ]
    )
    assert "attention_mask" not in batch  # the padding of row 2 is an example of its own
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in examples]
    torch.testing.assert_close(packed[0, : sum(map(len, examples))], torch.cat(alone), rtol=0, atol=1e-10)
    torch.testing.assert_close(packed[1, : len(examples[2])], alone[2], rtol=0, atol=1e-10)


def test_packing_is_refused_for_token_ids_that_are_not_packed(tmp_path, chatml):
    ids = Dataset.from_dict({"input_ids": [chatml("one plus one is two .")["input_ids"]] * 4})
    with pytest.raises(ValueError, match=r"`packing` packs the data the trainer tokenizes .* pack it first"):
        make_trainer(tmp_path, chatml, ids, packing=True, max_length=32)


def make_trainer(tmp_path, tok, dataset, teachers=None, **config):
    teacher_tokenizers = config.pop("teacher_tokenizers", None)
    return MultiTeacherDistillationTrainer(
        model=tiny_causal_lm("qwen2", tok, seed=1),
        teachers=teachers or [tiny_causal_lm("gpt2", tok, seed=3), tiny_causal_lm("llama", tok, seed=4)],
        args=tiny_config(tmp_path, **{"max_steps": 2, "per_device_train_batch_size": 4, **config}),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tok,
        teacher_tokenizers=teacher_tokenizers,
    )


def test_packed_loss_equals_the_unpacked_loss(tmp_path, chatml, conversations):
    """Attention and the posterior weighting's running sums (never forgotten here) stay within each example."""
    rows = Dataset.from_list([{"messages": m} for m in conversations[:6]])
    losses = {}
    for packing in (False, True):
        teachers = [tiny_causal_lm("gpt2", chatml, seed=3), ConfidentlyWrongTeacher(tiny_causal_lm("llama", chatml))]
        trainer = make_trainer(
            tmp_path, chatml, rows, teachers=teachers, packing=packing, max_length=128,
            teacher_weighting="posterior", posterior_decay=1.0, label_temperature=0.5,
        )  # fmt: skip
        dataset = trainer.train_dataset
        assert len(dataset) == 6 or (packing and 1 < len(dataset) < 6)
        batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
        trainer.model.eval()
        losses[packing] = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)


# ---- the trainer on each format ----


@pytest.mark.parametrize("data_format", ["messages", "prompt_completion", "conversational_prompt_completion", "text"])
def test_each_format_trains_end_to_end(tmp_path, chatml, conversations, data_format):
    if data_format == "messages":
        rows = [{"messages": m} for m in conversations]
    elif data_format == "prompt_completion":
        rows = [{"prompt": m[0]["content"], "completion": " " + m[1]["content"]} for m in conversations]
    elif data_format == "conversational_prompt_completion":
        rows = [{"prompt": m[:1], "completion": m[1:2]} for m in conversations]
    else:
        rows = [{"text": m[0]["content"] + " " + m[1]["content"]} for m in conversations]
    config = {"packing": True, "max_length": 64} if data_format == "text" else {}
    trainer = make_trainer(tmp_path, chatml, Dataset.from_list(rows), **config)
    assert set(trainer.train_dataset.column_names) >= {"input_ids", "labels"}
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss_kd"]) and metrics["eval_perplexity"] > 1


def test_a_streamed_chat_dataset_keeps_its_masks(tmp_path, chatml, conversations):
    stream = Dataset.from_list([{"messages": m} for m in conversations]).to_iterable_dataset()
    trainer = make_trainer(tmp_path, chatml, stream, packing=True, max_length=96)
    rows = list(trainer.train_dataset.take(4))
    batch = trainer.data_collator(rows)
    for i, row in enumerate(rows):  # the assistant masks and the packed position ids, kept
        assert batch["labels"][i, : len(row["labels"])].tolist() == row["labels"]
        assert batch["position_ids"][i, : len(row["position_ids"])].tolist() == row["position_ids"]
    assert math.isfinite(trainer.train().training_loss)


class PromptPoisoned(torch.nn.Module):
    """A teacher whose logits are NaN wherever the next token carries no loss: any use of them would show."""

    def __init__(self, model, learned):
        super().__init__()
        self.model, self.config, self.learned = model, model.config, learned

    def forward(self, **kwargs):
        outputs = self.model(**kwargs)
        outputs["logits"] = outputs.logits.masked_fill(~self.learned[..., None], math.nan)
        return outputs


def test_prompt_positions_carry_no_loss_and_no_kd_work(tmp_path, chatml, conversations):
    rows = Dataset.from_list([{"prompt": m[:1], "completion": m[1:2]} for m in conversations[:8]])
    trainer = make_trainer(tmp_path, chatml, rows)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    learned = torch.zeros_like(batch["labels"], dtype=torch.bool)
    learned[:, :-1] = batch["labels"][:, 1:] != -100  # positions that predict a completion token
    assert 0 < learned.sum() < learned.numel() / 2
    trainer.model.eval()
    clean = trainer.compute_loss(trainer.model, batch)
    trainer.teachers = [PromptPoisoned(t, learned) for t in trainer.teachers]
    poisoned = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(poisoned)
    torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)


def test_cross_tokenizer_teachers_render_with_their_own_templates(
    tmp_path, chatml, mistral, conversations, monkeypatch
):
    llama3 = chat_tokenizer(conversations, "llama3", 300, "bpe")
    rows = Dataset.from_list([{"messages": m} for m in conversations])
    teachers = [tiny_causal_lm("llama", llama3, seed=3), tiny_causal_lm("mistral", mistral, seed=4)]
    trainer = make_trainer(
        tmp_path, chatml, rows, teachers=teachers, teacher_tokenizers=[llama3, mistral], teacher_names=["l", "m"],
        cross_tokenizer_max_length=96,
    )  # fmt: skip
    batch = trainer.data_collator([rows[i] for i in range(4)])
    texts = [chatml.decode(ids) for ids in batch["input_ids"]]
    assert all(text.startswith("<|im_start|>user\n") for text in texts)
    assert llama3.decode(batch["teacher_inputs"][0]["input_ids"][0]).startswith("<s><|start_header_id|>user")
    assert mistral.decode(batch["teacher_inputs"][1]["input_ids"][0]).startswith("<s> [INST]")
    for own in batch["teacher_inputs"]:  # aligned only where the student's next token carries loss
        aligned = own["position_map"][:, :-1] >= 0
        assert aligned.any() and not (aligned & (batch["labels"][:, 1:] == -100)).any()
    projected, masses = {}, VocabularyMap.masses  # rows each teacher's map reads its distribution at, by map

    def counted(self, probs):
        projected[id(self)] = projected.get(id(self), 0) + probs.shape[0]
        return masses(self, probs)

    monkeypatch.setattr(VocabularyMap, "masses", counted)
    trainer.compute_loss(trainer.model, batch)
    assert list(projected.values()) == [int((own["position_map"] >= 0).sum()) for own in batch["teacher_inputs"]]
    trainer.train()
    logged = trainer.state.log_history[0]
    for name in ("l", "m"):
        assert 0.3 < logged[f"teacher_aligned/{name}"] <= 1


# ---- the example script ----


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory, conversations):
    """Train/validation data files: standard prompt/completion as parquet, messages as jsonl; a ChatML template."""
    root = tmp_path_factory.mktemp("chat_files")
    files = {}
    for name, rows in {
        "parquet": [{"prompt": m[0]["content"], "completion": " " + m[1]["content"]} for m in conversations],
        "jsonl": [{"messages": m} for m in conversations],
    }.items():
        paths = []
        for split, part in (("train", rows[:48]), ("validation", rows[48:])):
            path = root / f"{split}.{name}"
            getattr(Dataset.from_list(part), "to_parquet" if name == "parquet" else "to_json")(str(path))
            paths.append(str(path))
        files[name] = paths
    template = root / "chatml.jinja"
    template.write_text(CHAT_TEMPLATES["chatml"])
    files["template"] = str(template)
    return files


def test_script_on_packed_completions_with_the_teacher_cache(tmp_path, teacher_dirs, student_dir, chat_files):
    """Prompt/completion parquet files, packed; the teachers' cache written on the packed rows and trained on."""
    train, validation = chat_files["parquet"]
    common = [
        "--teacher_model_name_or_path", *teacher_dirs[:2], "--teacher_names", "a", "b", "--model_name_or_path",
        student_dir, "--train_file", train, "--validation_file", validation, "--packing", "--teacher_logits_cache",
        str(tmp_path / "cache"), "--teacher_logits_top_k", "8", *QUICK,
    ]  # fmt: skip
    with isolated_logging():
        cli_main(["cache-teachers", *common, "--output_dir", str(tmp_path / "unused")])
    cached = load_teacher_cache(str(tmp_path / "cache" / "train"))
    assert {"input_ids", "labels", "position_ids"} <= set(cached.dataset.column_names)
    assert len(cached.dataset) < 48  # packed: several completions per row of --block_size tokens
    starts = [[i for i, p in enumerate(row) if p == 0] for row in cached.dataset["position_ids"]]
    assert max(map(len, starts)) > 1
    assert all(labels[i] == -100 for labels, row in zip(cached.dataset["labels"], starts, strict=True) for i in row)
    run_main([*common, "--do_train", "--do_eval", "--output_dir", str(tmp_path / "out")])
    check_results(tmp_path / "out", ["a", "b"])


def test_script_on_chat_data_needs_a_template(tmp_path, teacher_dirs, student_dir, chat_files, capsys):
    """A template-less tokenizer is refused in one line naming --chat_template_path; given one, it trains."""
    train, validation = chat_files["jsonl"]
    common = [
        "--teacher_model_name_or_path", *teacher_dirs[:2], "--teacher_names", "a", "b", "--model_name_or_path",
        student_dir, "--train_file", train, "--validation_file", validation, "--do_train", "--do_eval", *QUICK,
        "--block_size", "128",
    ]  # fmt: skip
    with pytest.raises(SystemExit), isolated_logging():
        main([*common, "--output_dir", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error: Example 0: The tokenizer of the student has no chat template" in err
    assert "--chat_template_path" in err
    run_main([*common, "--chat_template_path", chat_files["template"], "--output_dir", str(tmp_path / "out")])
    check_results(tmp_path / "out", ["a", "b"])
    student_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert student_tokenizer.chat_template == CHAT_TEMPLATES["chatml"]  # saved with the student
    streamed = ["--streaming", "--max_eval_samples", "8", "--packing", "--output_dir", str(tmp_path / "streamed")]
    run_main([*common, "--chat_template_path", chat_files["template"], *streamed])  # rendered and packed lazily
    check_results(tmp_path / "streamed", ["a", "b"], trained=False)  # a stream has no sample count


@pytest.mark.slow
def test_chat_tiny_example_runs(tmp_path):
    result = run_subprocess(sys.executable, "examples/chat_tiny.py", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "distilled" / "all_results.json").read_text())
    assert results["perplexity"] < 20  # an untrained student is at ~500 (the vocabulary size)
    for name in ("llama3-style", "qwen-style", "mistral-style"):
        assert results[f"eval_teacher_aligned/{name}"] > 0.5
