"""The offline teacher-logits cache: what it stores, resuming, refusing stale caches, and training from it."""

import copy
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, DataCollatorForLanguageModeling
from transformers.modeling_outputs import CausalLMOutput

import hf_mtkd.teacher_cache as teacher_cache
from hf_mtkd import (
    MultiTeacherDistillationConfig,
    MultiTeacherDistillationTrainer,
    StaleCacheError,
    TeacherCacheCollator,
    cache_teacher_logits,
    load_teacher_cache,
)
from hf_mtkd.teacher_cache import batch_teacher_logits, data_fingerprint, tokenizer_fingerprint
from hf_mtkd.teachers import load_teachers, teacher_record
from hf_mtkd.testing import tiny_causal_lm, train_tiny_tokenizer
from hf_mtkd.topk import TopKLogits


@pytest.fixture(scope="module")
def teachers(teacher_dirs):
    return load_teachers(teacher_dirs[:2])


@pytest.fixture(scope="module")
def small_data(dataset):
    return dataset.select(range(24))


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, teachers, small_data, tokenizer):
    """k = V: the cache holds the teachers' whole distributions."""
    vocab = teachers[0].config.vocab_size
    path = str(tmp_path_factory.mktemp("full_cache"))
    return cache_teacher_logits(teachers, small_data, path, k=vocab, tokenizer=tokenizer, shard_size=10)


def test_cache_stores_each_teachers_top_k_at_every_position_with_a_next_token(tmp_path, teachers, small_data):
    cache = cache_teacher_logits(teachers, small_data, str(tmp_path), k=5, shard_size=7, batch_size=3)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["completed_shards"] == [0, 1, 2, 3] and manifest["k"] == 5
    assert [t["class"] for t in manifest["teachers"]] == [type(t).__name__ for t in teachers]
    assert len(cache.dataset) == len(small_data)
    assert cache.dataset["input_ids"] == small_data["input_ids"]
    for row in (0, 9, 23):  # one row per shard boundary case
        example = cache.dataset[row]
        ids = torch.tensor([small_data[row]["input_ids"]])
        for k, teacher in enumerate(teachers):
            with torch.no_grad():
                log_probs = torch.log_softmax(teacher(ids).logits[0, :-1].float(), -1)
            top, indices = log_probs.topk(5, -1)
            assert example["mtkd_topk_indices"].shape == (ids.shape[1] - 1, 2, 5)
            torch.testing.assert_close(torch.from_numpy(example["mtkd_topk_log_probs"][:, k]), top)
            assert (torch.from_numpy(example["mtkd_topk_indices"][:, k]).long() == indices).all()
            tail = torch.log1p(-top.exp().sum(-1))
            torch.testing.assert_close(torch.from_numpy(example["mtkd_log_tail_mass"][:, k]), tail, atol=1e-4, rtol=0)


def test_interrupted_cache_resumes_where_it_stopped(tmp_path, teachers, small_data, monkeypatch):
    reference = cache_teacher_logits(teachers, small_data, str(tmp_path / "reference"), k=4, shard_size=8)
    calls = []
    real = teacher_cache._cache_columns

    def crash_on_second_shard(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_cache, "_cache_columns", crash_on_second_shard)
    path = str(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        cache_teacher_logits(teachers, small_data, path, k=4, shard_size=8)
    with pytest.raises(ValueError, match=r"unfinished \(1 of 3 shards\).*again with the same arguments"):
        load_teacher_cache(path)
    calls.clear()
    monkeypatch.setattr(teacher_cache, "_cache_columns", lambda *a, **kw: calls.append(len(a[2])) or real(*a, **kw))
    resumed = cache_teacher_logits(teachers, small_data, path, k=4, shard_size=8)
    assert calls == [8, 8]  # only the two missing shards ran
    for column in ("mtkd_topk_indices", "mtkd_topk_log_probs", "mtkd_log_tail_mass"):
        for a, b in zip(resumed.dataset[column], reference.dataset[column], strict=True):
            assert (a == b).all()
    calls.clear()
    cache_teacher_logits(teachers, small_data, path, k=4, shard_size=8)
    assert calls == []  # complete: nothing to do


def test_stale_caches_are_refused_naming_each_difference_with_both_values(
    tmp_path, teachers, small_data, tokenizer, corpus
):
    path = str(tmp_path)
    manifest = cache_teacher_logits(teachers, small_data, path, k=4, tokenizer=tokenizer, shard_size=8).manifest
    stale = re.escape(f"The teacher-logits cache in {path} was computed from other inputs than those given now: ")
    fix = re.escape(". Give the same teachers, tokenizer vocabulary, data and k, or write this cache to another")
    with pytest.raises(StaleCacheError, match=f"^{stale}k: cache 4, now 6{fix}"):
        cache_teacher_logits(teachers, small_data, path, k=6, tokenizer=tokenizer, shard_size=8)
    fewer = small_data.select(range(20))
    ids = f"token ids (sha256): cache {manifest.data_fingerprint[:12]}, now {data_fingerprint(fewer)[:12]}"
    with pytest.raises(StaleCacheError, match=f"^{stale}{re.escape(ids)}{fix}"):
        cache_teacher_logits(teachers, fewer, path, k=4, tokenizer=tokenizer, shard_size=8)
    with pytest.raises(StaleCacheError, match=f"^{stale}{re.escape(ids)}{fix}"):
        load_teacher_cache(path, dataset=fewer)
    changed = tiny_causal_lm("gpt2", tokenizer, hidden_size=48, num_layers=4, num_heads=4, seed=99)
    old, kept = (record["weights_sha256"][:12] for record in manifest.teachers)
    new = teacher_record(changed, "gpt2", hash_weights=True)["weights_sha256"][:12]
    weights = f"teacher weights (sha256): cache [{old}, {kept}], now [{new}, {kept}]; k: cache 4, now 5"
    with pytest.raises(StaleCacheError, match=f"^{stale}{re.escape(weights)}{fix}"):
        cache_teacher_logits([changed, teachers[1]], small_data, path, k=5, tokenizer=tokenizer, shard_size=8)
    other_tokenizer = train_tiny_tokenizer(corpus[:50], vocab_size=200)
    other_vocab = tokenizer_fingerprint(other_tokenizer)["vocab_sha256"][:12]
    vocab = (
        f"tokenizer vocabulary (sha256): cache {manifest.tokenizer['vocab_sha256'][:12]} "
        f"({tokenizer.name_or_path}), now {other_vocab} ({other_tokenizer.name_or_path})"
    )
    with pytest.raises(StaleCacheError, match=f"^{stale}{re.escape(vocab)}{fix}"):
        load_teacher_cache(path, tokenizer=other_tokenizer)
    assert len(load_teacher_cache(path, tokenizer=tokenizer, dataset=small_data).dataset) == 24
    with pytest.raises(FileNotFoundError, match="not a teacher-logits cache"):
        load_teacher_cache(str(tmp_path / "nothing"))


def test_a_cache_is_identified_by_content_not_by_paths(
    tmp_path, teacher_dirs, student_dir, small_data, make_student, monkeypatch
):
    """A teacher given by a relative instead of an absolute path, and the tokenizer of the student's directory
    instead of the teacher's (the same vocabulary), find the cache complete: nothing is recomputed or refused."""
    path = str(tmp_path / "cache")
    teacher_tokenizer, student_tokenizer = (AutoTokenizer.from_pretrained(d) for d in (teacher_dirs[0], student_dir))
    assert teacher_tokenizer.name_or_path != student_tokenizer.name_or_path
    cache_teacher_logits(teacher_dirs[:2], small_data, path, k=4, tokenizer=teacher_tokenizer, shard_size=8)
    monkeypatch.chdir(Path(teacher_dirs[0]).parent)
    relative = [os.path.relpath(d) for d in teacher_dirs[:2]]
    assert relative != teacher_dirs[:2] and not os.path.isabs(relative[0])
    computed = []
    monkeypatch.setattr(teacher_cache, "_cache_columns", lambda *args, **kwargs: computed.append(args))
    cache = cache_teacher_logits(relative, small_data, path, k=4, tokenizer=student_tokenizer, shard_size=8)
    assert computed == [] and len(cache.dataset) == 24
    assert len(load_teacher_cache(path, tokenizer=student_tokenizer, dataset=small_data).dataset) == 24
    args = MultiTeacherDistillationConfig(output_dir=str(tmp_path / "out"), report_to="none")
    trainer = MultiTeacherDistillationTrainer(
        model=make_student(), teachers=cache, args=args, processing_class=student_tokenizer
    )
    assert trainer.train_dataset is cache.dataset


def test_bad_cache_requests_are_refused(tmp_path, teachers, small_data, tokenizer):
    with pytest.raises(ValueError, match="empty"):
        cache_teacher_logits(teachers, small_data.select([]), str(tmp_path), k=4)
    with pytest.raises(ValueError, match="k = 0"):
        cache_teacher_logits(teachers, small_data, str(tmp_path), k=0)
    with pytest.raises(ValueError, match="dtype"):
        cache_teacher_logits(teachers, small_data, str(tmp_path), dtype="int8")
    other = tiny_causal_lm("llama", train_tiny_tokenizer(["a b c"] * 20, vocab_size=120), hidden_size=16)
    with pytest.raises(ValueError, match="vocabularies differ"):
        cache_teacher_logits([teachers[0], other], small_data, str(tmp_path), k=4)


def _batch(trainer, rows):
    return trainer.data_collator([trainer.train_dataset[i] for i in rows])


def _live_and_cached_steps(live, cached, cached_batch, tokenizer, full_cache, rows):
    """(loss, gradients, logged metrics) of one step of each trainer, the live one on the same rows, uncached."""
    live_batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)(
        [{"input_ids": full_cache.dataset[i]["input_ids"]} for i in rows]
    )
    results = []
    for trainer, inputs in ((live, live_batch), (cached, cached_batch)):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, inputs, num_items_in_batch=None)
        loss.backward()
        grads = [p.grad.clone() for p in trainer.model.parameters()]
        results.append((loss.item(), grads, trainer._pop_metrics("train")))
    return results


def test_full_cache_trains_exactly_like_live_teachers(full_cache, teachers, tokenizer, make_student, tmp_path):
    """With k = V the cached loss and its gradient equal the live-teacher ones on the same batch."""
    args = MultiTeacherDistillationConfig(
        output_dir=str(tmp_path), report_to="none", teacher_weighting="entropy", temperature=2.0
    )
    live = MultiTeacherDistillationTrainer(
        model=make_student(),
        teachers=teachers,
        args=args,
        train_dataset=full_cache.dataset,
        processing_class=tokenizer,
    )
    cached = MultiTeacherDistillationTrainer(
        model=make_student(), teachers=full_cache, args=args, processing_class=tokenizer
    )
    rows = [3, 0, 17, 8]  # different lengths: padded on the right
    batch = _batch(cached, rows)
    assert batch["mtkd_topk_log_probs"].shape[:3] == (2, *batch["input_ids"].shape)
    (live_loss, live_grads, live_metrics), (cached_loss, cached_grads, cached_metrics) = _live_and_cached_steps(
        live, cached, batch, tokenizer, full_cache, rows
    )
    assert cached_loss == pytest.approx(live_loss, rel=1e-5)
    for a, b in zip(cached_grads, live_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for key in live_metrics:
        assert cached_metrics[key] == pytest.approx(live_metrics[key], rel=1e-4), key


def test_training_from_a_cache_runs_no_teacher_and_lowers_the_loss(
    tmp_path, teachers, dataset, tokenizer, make_student
):
    cache = cache_teacher_logits(teachers, dataset, str(tmp_path / "cache"), k=16, tokenizer=tokenizer)
    split = cache.dataset.train_test_split(test_size=32, seed=0)
    args = MultiTeacherDistillationConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=40,
        learning_rate=3e-3,
        per_device_train_batch_size=8,
        logging_steps=10,
        report_to="none",
        teacher_names=["a", "b"],
        disable_tqdm=True,
    )
    trainer = MultiTeacherDistillationTrainer(
        model=make_student(),
        teachers=cache,
        args=args,
        train_dataset=split["train"],
        eval_dataset=split["test"],
        processing_class=tokenizer,
    )
    assert trainer.teachers == []
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < 0.8 * before["eval_loss"]
    assert after["eval_loss_kd"] < before["eval_loss_kd"]
    logged = trainer.state.log_history[0]
    assert math.isclose(logged["teacher_weight/a"] + logged["teacher_weight/b"], 1.0, rel_tol=1e-5)
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "teacher `a`" in card and "teacher `b`" in card


def test_trainer_refuses_what_a_cache_cannot_do(full_cache, dataset, tokenizer, make_student, corpus, tmp_path):
    args = MultiTeacherDistillationConfig(output_dir=str(tmp_path), report_to="none")
    with pytest.raises(ValueError, match="has no cached teacher logits"):
        MultiTeacherDistillationTrainer(
            model=make_student(), teachers=full_cache, args=args, train_dataset=dataset, processing_class=tokenizer
        )
    feature_args = MultiTeacherDistillationConfig(output_dir=str(tmp_path), report_to="none", alpha_feat=0.1)
    with pytest.raises(ValueError, match="hidden states, which a teacher-logits cache does not hold"):
        MultiTeacherDistillationTrainer(model=make_student(), teachers=full_cache, args=feature_args)
    other_tokenizer = train_tiny_tokenizer(corpus[:50], vocab_size=200)
    with pytest.raises(ValueError, match=f"vocabulary of .* tokens but the student has {len(other_tokenizer)}"):
        MultiTeacherDistillationTrainer(
            model=tiny_causal_lm("qwen2", other_tokenizer, hidden_size=16), teachers=full_cache, args=args
        )


def test_collator_places_cached_rows_under_left_padding(full_cache, tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = "left"
    collator = TeacherCacheCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False))
    rows = [full_cache.dataset[i] for i in (0, 5)]
    batch = collator(rows)
    length = batch["input_ids"].shape[1]
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        start = length - n
        assert batch["input_ids"][i, start:].tolist() == list(row["input_ids"])
        placed = batch["mtkd_topk_log_probs"][:, i, start : start + n - 1]
        torch.testing.assert_close(placed, torch.from_numpy(row["mtkd_topk_log_probs"]).transpose(0, 1))
    with pytest.raises(ValueError, match="changed an example's token ids"):
        TeacherCacheCollator(lambda f: {"input_ids": torch.zeros(2, 40, dtype=torch.long)})(rows)


def test_dataset_with_short_examples(tmp_path, teachers, tokenizer):
    data = Dataset.from_dict({"input_ids": [[5], [5, 6, 7], [8, 9]]})
    cache = cache_teacher_logits(teachers, data, str(tmp_path), k=3, shard_size=2)
    assert [cache.dataset[i]["mtkd_topk_indices"].shape[0] for i in range(3)] == [0, 2, 1]


class NaNTeacher(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, **kwargs):
        return CausalLMOutput(logits=self.inner(**kwargs).logits * float("nan"))


def test_nan_teacher_logits_are_refused_when_caching(tmp_path, teachers, small_data):
    with pytest.raises(FloatingPointError, match="Teacher 'broken' produced NaN/inf logits"):
        cache_teacher_logits(
            [teachers[0], NaNTeacher(teachers[1])], small_data, str(tmp_path), k=4, names=["ok", "broken"]
        )


def test_teacher_selection_batches_exactly_the_selected_teachers_top_k(tmp_path, teacher_dirs, small_data, tokenizer):
    """A view of some teachers, in any order, batches the rows of their own live top-k, without copying the cache."""
    models = load_teachers(teacher_dirs)
    cache = cache_teacher_logits(models, small_data, str(tmp_path), k=6, names=["a", "b", "c"], shard_size=10)
    view = cache.select_teachers(["c", "a"])
    assert view.teacher_names == ["c", "a"] and view.teacher_indices == (2, 0) and view.dataset is cache.dataset
    nested = view.select_teachers(["a"])  # positions resolve against the view, indices against the stored axis
    assert nested.teacher_names == ["a"] and nested.teacher_indices == (0,)
    assert cache.select_teachers([1]).teacher_names == ["b"] and cache.teacher_indices is None
    rows = [0, 13, 7]  # different lengths, across shards
    collator = TeacherCacheCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False), view.teacher_indices)
    batch = collator([cache.dataset[i] for i in rows])
    cached = batch_teacher_logits(dict(batch), cache.manifest.vocab_size)
    assert len(cached) == 2
    for i, row in enumerate(rows):
        ids = torch.tensor([small_data[row]["input_ids"]])
        n = ids.shape[1] - 1
        for selected, model in zip(cached, (models[2], models[0]), strict=True):
            with torch.no_grad():
                live = TopKLogits.from_logits(model(ids).logits[:, :-1], 6)
            assert torch.equal(selected.indices[i, :n].long(), live.indices[0])
            torch.testing.assert_close(selected.log_probs[i, :n], live.log_probs[0])
            torch.testing.assert_close(selected.log_tail_mass[i, :n], live.log_tail_mass[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"has no teacher 'd': it has \['a', 'b', 'c'\]"):
        cache.select_teachers(["d"])
    with pytest.raises(ValueError, match="each once"):
        cache.select_teachers(["a", "a"])
    with pytest.raises(ValueError, match="out of range"):
        view.select_teachers([2])


def test_trainer_on_a_teacher_selection_matches_the_live_teacher(
    full_cache, teachers, tokenizer, make_student, tmp_path
):
    """With k = V, training on a view of the second teacher alone gives the loss and gradient of that live teacher."""
    args = MultiTeacherDistillationConfig(output_dir=str(tmp_path), report_to="none", temperature=2.0)
    view = full_cache.select_teachers([1])
    cached = MultiTeacherDistillationTrainer(
        model=make_student(), teachers=view, args=args, processing_class=tokenizer
    )
    live = MultiTeacherDistillationTrainer(
        model=make_student(), teachers=[teachers[1]], args=args, processing_class=tokenizer
    )
    assert cached.teacher_names == live.teacher_names
    rows = [2, 9, 4]
    batch = _batch(cached, rows)
    assert batch["mtkd_topk_log_probs"].shape[0] == 1
    results = _live_and_cached_steps(live, cached, batch, tokenizer, full_cache, rows)
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    for a, b in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    mismatch = "selected teachers: training cache [1], eval_dataset None. Cache both splits with the same teachers"
    with pytest.raises(ValueError, match=re.escape(mismatch)):
        MultiTeacherDistillationTrainer(
            model=make_student(), teachers=view, args=args, eval_dataset=full_cache, processing_class=tokenizer
        )
