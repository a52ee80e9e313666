"""No valid token: all labels -100 or one-token sequences are refused, warned about, and never given a perplexity."""

import json
import logging
import math

import pytest
from datasets import Dataset
from test_run_clm_distill import QUICK, run_main
from transformers import default_data_collator

from hf_mtkd import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer
from hf_mtkd.testing import tiny_causal_lm

NO_TOKEN = "no position with a next-token label"
LENGTH = 8


@pytest.fixture(scope="module")
def blocks(tokenizer, corpus):
    """16 blocks of 8 tokens with their labels (as the example script makes them)."""
    ids = [row[:LENGTH] for row in tokenizer(corpus)["input_ids"] if len(row) >= LENGTH][:16]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * LENGTH] * 16, "labels": ids})


def masked(dataset, rows=None):
    """`dataset` with every label -100 (in `rows`, default: all)."""
    rows = set(range(len(dataset)) if rows is None else rows)
    return dataset.map(lambda ex, i: {"labels": [-100] * LENGTH if i in rows else ex["labels"]}, with_indices=True)


def make_trainer(tmp_path, tokenizer, train_dataset, **config):
    defaults = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no")
    return MultiTeacherDistillationTrainer(
        model=tiny_causal_lm("qwen2", tokenizer, seed=1),
        teachers=[tiny_causal_lm("llama", tokenizer, seed=3)],
        args=MultiTeacherDistillationConfig(**{**defaults, **config}),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )


def test_a_training_set_without_a_valid_token_is_refused_at_construction(tmp_path, tokenizer, blocks, dataset):
    expected = (
        rf"The training dataset has {NO_TOKEN} .*all labels -100 or sequences of one token.*nothing to learn.*"
        r"examples of at least two tokens"
    )
    with pytest.raises(ValueError, match=expected):
        make_trainer(tmp_path, tokenizer, masked(blocks))
    one_token = dataset.map(lambda ex: {"input_ids": ex["input_ids"][:1], "attention_mask": [1]})
    with pytest.raises(ValueError, match=expected):  # the default collator of a tokenizer makes the labels
        MultiTeacherDistillationTrainer(
            model=tiny_causal_lm("qwen2", tokenizer, seed=1),
            teachers=[tiny_causal_lm("llama", tokenizer, seed=3)],
            args=MultiTeacherDistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True),
            train_dataset=one_token,
            processing_class=tokenizer,
        )
    # one valid example in the last batch is enough
    make_trainer(tmp_path, tokenizer, masked(blocks, range(15)), per_device_train_batch_size=4)


def test_the_script_refuses_texts_of_one_token_in_one_line(tmp_path, teacher_dirs, student_dir, capsys):
    train = tmp_path / "train.jsonl"  # texts of one byte-level token, trained on as raw texts in cross-tokenizer mode
    train.write_text("".join(json.dumps({"text": text}) + "\n" for text in ["a", "b", ".", "c"]))
    with pytest.raises(SystemExit):
        run_main([
            "--teacher_model_name_or_path", teacher_dirs[0], "--model_name_or_path", student_dir,
            "--cross_tokenizer", "always", "--train_file", str(train), "--do_train", "--output_dir", str(tmp_path),
            *QUICK,
        ])  # fmt: skip
    err = capsys.readouterr().err
    assert f"error: The training dataset has {NO_TOKEN}" in err and "Traceback" not in err


def test_all_masked_training_batches_are_warned_about_at_a_decreasing_rate(tmp_path, tokenizer, blocks, caplog):
    data = masked(blocks.select(range(8)), rows=[1, 2, 4, 7])  # one batch per example: 4 of the 8 are empty
    trainer = make_trainer(
        tmp_path, tokenizer, data, per_device_train_batch_size=1, max_steps=8, logging_steps=1, learning_rate=1e-3
    )
    with caplog.at_level(logging.WARNING, logger="hf_mtkd"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if NO_TOKEN in r.getMessage()]
    # the 1st, 2nd and 4th empty batch are reported, not the 3rd
    assert [w.split(" training batch")[0] for w in warnings] == [
        "1 of the last 1",
        "1 of the last 1",
        "1 of the last 1",
    ]
    assert [w.split("(")[1].split(" ")[0] for w in warnings] == ["1", "2", "4"]
    assert all("they add no loss and no gradient" in w and "Check how the labels are made" in w for w in warnings)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 8
    empty = [log for log in logs if "loss_kd" not in log]  # no per-token metric over zero tokens
    assert len(empty) == 4 and all(log["loss"] == 0 for log in empty)


def test_evaluation_over_zero_tokens_reports_no_perplexity(tmp_path, tokenizer, blocks, caplog):
    trainer = make_trainer(tmp_path, tokenizer, blocks)
    with caplog.at_level(logging.WARNING, logger="hf_mtkd"):
        metrics = trainer.evaluate(eval_dataset=masked(blocks))
    assert "eval_perplexity" not in metrics and "eval_loss_kd" not in metrics
    assert "eval_teacher_weight/llama" not in metrics
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"The evaluation data has {NO_TOKEN}" in m and "no perplexity is reported" in m for m in messages)
    metrics = trainer.evaluate(eval_dataset=blocks)
    assert math.isfinite(metrics["eval_perplexity"]) and metrics["eval_perplexity"] > 1
