"""Cross-tokenizer distillation: offset alignment, the vocabulary map, the collator and the trainer end to end."""

import math

import pytest
import torch
from datasets import Dataset
from trainer_helpers import tiny_config
from transformers import PreTrainedTokenizerFast

from hf_mtkd import MultiTeacherDistillationTrainer
from hf_mtkd.chunked import next_token_mask
from hf_mtkd.cross_tokenizer import (
    MappedLogits,
    MultiTokenizerCollator,
    VocabularyMap,
    align_positions,
    boundary_keys,
    token_bytes,
)
from hf_mtkd.logit_free import HeadLogits
from hf_mtkd.losses import DistillationLoss, multi_teacher_kd
from hf_mtkd.settings import DistillationSettings
from hf_mtkd.testing import tiny_causal_lm

HARD_TEXTS = [
    "ada  sees the cat.\nbob likes it",  # double space, newline, punctuation
    "count : 12 345 six 7.5",  # digits
    "héllo 😀 naïve façade ok",  # accents, an emoji (split into bytes by byte-level BPE)
]


@pytest.fixture(scope="module")
def tokenizers(cross_tokenizers):
    return cross_tokenizers


# ---- alignment ----


def test_boundaries_by_hand():
    text = "ab cd"
    # byte-level style: the space belongs to the next token, whose text starts at 3; a leading BOS (special, (0, 0))
    # ends an empty context
    assert boundary_keys(text, [(0, 0), (0, 2), (2, 5)], [1, 0, 0]) == [(0, 0), (2, 3), None]
    # WordPiece style: whitespace left out of the offsets; the next word still starts at 3 after skipping the space
    assert boundary_keys(text, [(0, 2), (3, 5)]) == [(2, 3), None]
    assert boundary_keys(text, [(0, 2), (2, 5)]) == [(2, 3), None]
    # two byte pieces of one character: the first piece predicts the second, which is not a character boundary
    assert boundary_keys("é!", [(0, 1), (0, 1), (1, 2)]) == [None, (1, 1), None]
    # a whitespace-only token starts where it starts; an EOS next is not alignable
    assert boundary_keys("a  b", [(0, 1), (1, 2), (2, 4), (0, 0)], [0, 0, 0, 1]) == [(1, 1), (2, 3), None, None]


def test_alignment_by_hand():
    text = "ab cd ef"
    student = [(0, 2), (2, 5), (5, 8)]  # "ab" " cd" " ef"
    teacher = [(0, 1), (1, 2), (2, 3), (3, 5), (5, 8)]  # "a" "b" " " "cd" " ef"
    # student 0 ("ab" -> " cd") has no twin: the teacher predicts " " after "ab"; student 1 (" cd" -> " ef") is
    # teacher 3; the last student position predicts nothing
    assert align_positions(text, student, teacher) == [-1, 3, -1]
    wordpiece = [(0, 2), (3, 5), (6, 8)]
    assert align_positions(text, student, wordpiece) == [0, 1, -1]


@pytest.mark.parametrize("teacher", ["bpe300", "unigram", "wordpiece"])
def test_aligned_positions_share_context_and_next_token_start(tokenizers, teacher):
    student, other = tokenizers["student"], tokenizers[teacher]
    total = aligned = 0
    for text in HARD_TEXTS:
        s = student(text, return_offsets_mapping=True)["offset_mapping"]
        t = other(text, return_offsets_mapping=True)["offset_mapping"]
        position_map = align_positions(text, s, t)
        for i, j in enumerate(position_map):
            if j < 0:
                continue
            aligned += 1
            assert s[i][1] == t[j][1]  # both contexts are text[:end]
            assert text[s[i + 1][0] :].lstrip() == text[t[j + 1][0] :].lstrip()  # both next tokens start there
        total += len(position_map) - 1
        # the same positions, found independently: every student boundary that is also a teacher boundary
        student_ends = {s[i][1]: i for i in range(len(s) - 1) if s[i + 1][0] >= s[i][1]}
        teacher_ends = {t[j][1] for j in range(len(t) - 1) if t[j + 1][0] >= t[j][1]}
        for end, i in student_ends.items():
            if end in teacher_ends and position_map[i] < 0:
                # only a whitespace-only next token on one side may break a shared boundary
                assert text[s[i + 1][0] : s[i + 1][1]].isspace() or any(
                    text[t[j + 1][0] : t[j + 1][1]].isspace() for j in range(len(t) - 1) if t[j][1] == end
                )
    assert 0.2 < aligned / total <= 1  # out-of-corpus words: the student splits them into characters


def test_identical_tokenizers_align_everywhere(tokenizers):
    tok = tokenizers["student"]
    for text in HARD_TEXTS:
        offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
        position_map = align_positions(text, offsets, offsets)
        expected = [i if offsets[i + 1][0] >= offsets[i][1] else -1 for i in range(len(offsets) - 1)] + [-1]
        assert position_map == expected
        if text.isascii():  # no character split into byte pieces: every position but the last is aligned
            assert position_map == [*range(len(offsets) - 1), -1]


# ---- the vocabulary map ----


def test_token_bytes_normalises_conventions(tokenizers):
    marked = next(t for t in tokenizers["unigram"].get_vocab() if t.startswith("▁") and len(t) > 2)
    for name, token, expected in [
        ("student", "Ġthe", b" the"),
        ("unigram", marked, (" " + marked[1:]).encode()),
        ("wordpiece", "the", b" the"),
    ]:
        tok = tokenizers[name]
        ids = tok.convert_tokens_to_ids([token])
        assert ids[0] != tok.unk_token_id, (name, token)
        assert token_bytes(tok)[ids[0]] == expected
    wordpiece = tokenizers["wordpiece"]
    continuation = next(t for t in wordpiece.get_vocab() if t.startswith("##") and len(t) > 2)
    assert token_bytes(wordpiece)[wordpiece.convert_tokens_to_ids(continuation)] == continuation[2:].encode()
    assert token_bytes(tokenizers["student"])[tokenizers["student"].eos_token_id] is None


@pytest.mark.parametrize("teacher", ["bpe300", "unigram", "wordpiece"])
def test_vocabulary_map_coverage(tokenizers, teacher):
    student, other = tokenizers["student"], tokenizers[teacher]
    vocabulary_map = VocabularyMap.build(other, student)
    coverage = vocabulary_map.coverage()
    assert coverage["exact"] + coverage["prefix"] + coverage["unmapped"] == pytest.approx(1)
    assert coverage["exact"] > 0.5
    if teacher == "bpe300":  # the same algorithm on the same text: the smaller vocabulary is nested in the larger
        assert coverage["exact"] == 1
    s_bytes, t_bytes = token_bytes(student), token_bytes(other)
    for v in range(len(other)):
        s = vocabulary_map.index[v].item()
        if v in other.all_special_ids:
            continue
        if vocabulary_map.exact[v]:
            assert s_bytes[s] == t_bytes[v]
        elif s >= 0:  # the student token that begins the teacher token's text, and the longest such
            assert t_bytes[v].startswith(s_bytes[s]) and len(s_bytes[s]) < len(t_bytes[v])
            assert not any(t_bytes[v].startswith(b) and len(b) > len(s_bytes[s]) for b in s_bytes if b)
    assert vocabulary_map.index[other.eos_token_id] == student.eos_token_id


@pytest.mark.parametrize("prefix_mass", [True, False])
def test_projection_matches_dense_reference(tokenizers, prefix_mass):
    vocabulary_map = VocabularyMap.build(
        tokenizers["unigram"], tokenizers["student"], teacher_vocab_size=80, prefix_mass=prefix_mass
    )
    vocabulary_map.index[5] = -1  # one unmapped token, and rows 67..79 (beyond the tokenizer) unmapped too
    vocabulary_map.mapped = vocabulary_map.index >= 0
    logits = torch.randn(2, 3, 80, dtype=torch.float64) * 3
    tau = 1.7
    out = vocabulary_map.project(logits, tau)
    p = torch.softmax(logits / tau, dim=-1)
    matrix = torch.zeros(80, len(tokenizers["student"]), dtype=torch.float64)
    for v, (s, exact) in enumerate(zip(vocabulary_map.index.tolist(), vocabulary_map.exact.tolist(), strict=True)):
        if s >= 0 and (prefix_mass or exact):  # without prefix mass, a token mapped by prefix only is left out
            matrix[v, s] = 1
    dense = p @ matrix
    torch.testing.assert_close(torch.softmax(out.scaled_log_probs / tau, dim=-1), dense / dense.sum(-1, keepdim=True))
    torch.testing.assert_close(out.unmapped_mass, p[..., ~vocabulary_map.mapped].sum(-1))
    assert (out.unmapped_mass > 0).all() and (out.inexact_mass > 0).all()


@pytest.mark.parametrize(("weighting", "divergence"), [("entropy", "forward_kl"), ("entropy+posterior", "jsd")])
@pytest.mark.parametrize("form", ["own logits", "hidden and head", "own logits, student logits"])
@pytest.mark.parametrize("num_teachers", [1, 2])
def test_mapped_logits_per_chunk_equal_the_projected_tensor(tokenizers, weighting, divergence, form, num_teachers):
    """
    A cross-tokenizer teacher mapped a chunk of rows at a time (`MappedLogits`), beside a logit-free student (or one
    on logits) and, when K = 2, a teacher on the student's vocabulary, gives the loss and gradients of the
    `[B, T, V_s]` path, in float64: the teacher's logits gathered at the aligned positions, projected whole,
    unaligned positions 0.
    """
    student_vocab = len(tokenizers["student"])
    vocabulary_map = VocabularyMap.build(tokenizers["unigram"], tokenizers["student"], teacher_vocab_size=80)
    g = torch.Generator().manual_seed(0)
    b, t, t_own, d_s, d_k, tau = 3, 9, 7, 6, 8, 1.5
    labels = torch.randint(0, student_vocab, (b, t), generator=g)
    labels[0, 6:], labels[1, :3] = -100, -100  # right padding, a prompt
    position_map = torch.randint(0, t_own, (b, t), generator=g)
    position_map[:, ::4] = -1  # student positions without a twin
    position_map[0, 1] = 2
    aligned = position_map >= 0
    rows, index = torch.arange(b)[:, None], position_map.clamp(min=0)
    own_hidden = torch.randn(b, t_own, d_k, generator=g, dtype=torch.float64)
    own_head = torch.randn(80, d_k, generator=g, dtype=torch.float64) * 2
    # one aligned teacher position puts all its mass (to float64's last bit) on tokens the map leaves out: the
    # teacher is unavailable there
    vocabulary_map.index[70:] = -1
    vocabulary_map.mapped = vocabulary_map.index >= 0
    own_hidden[..., -1], own_head[:, -1] = 0.0, (vocabulary_map.index < 0).double()
    own_hidden[0, 2, -1] = 2000.0  # teacher position 2 of row 0, aligned with student position 1 (above)
    shared = torch.randn(b, t, student_vocab, generator=g, dtype=torch.float64) * 3
    hidden = torch.randn(b, t, d_s, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(student_vocab, d_s, generator=g, dtype=torch.float64, requires_grad=True)
    settings = DistillationSettings(
        temperature=tau, alpha_ce=0.5, weighting=weighting, divergence=divergence, chunk_size=4
    )
    mask = next_token_mask(labels)

    # the [B, T, V_s] path: the teacher's own logits at the aligned positions, projected at once
    own = (own_hidden @ own_head.T)[rows, index]
    projected = vocabulary_map.project(own[aligned], tau)
    dense = torch.zeros(b, t, student_vocab, dtype=torch.float64)
    dense[aligned] = projected.scaled_log_probs
    available = torch.zeros(b, t, dtype=torch.bool)
    available[aligned] = projected.has_mass
    assert not available[0, 1] and mask[0, 1]
    teacher_mask = torch.stack([available, torch.ones_like(available)][:num_teachers])
    expected = DistillationLoss(settings)(hidden @ head.T, [dense, shared][:num_teachers], labels,
                                          teacher_mask=teacher_mask)  # fmt: skip
    expected_grads = torch.autograd.grad(expected.loss, [hidden, head])

    # per chunk: the mapped rows made when the loss reads them
    if form.startswith("own logits"):
        mapped = MappedLogits(own, vocabulary_map, tau, aligned)
    else:
        head_logits = HeadLogits(own_hidden[rows, index][mask], own_head)
        mapped = MappedLogits(head_logits, vocabulary_map, tau, aligned, index=mask.flatten().nonzero().squeeze(1))
    unmapped, inexact, has_mass, _ = mapped.masses(chunk_size=5)
    read = mask if mapped.packed else torch.ones_like(mask)  # the positions whose masses it computed
    assert torch.equal(aligned & has_mass, available & read)
    torch.testing.assert_close(unmapped[aligned & read], projected.unmapped_mass[read[aligned]], rtol=0, atol=1e-14)
    torch.testing.assert_close(inexact[aligned & read], projected.inexact_mass[read[aligned]], rtol=0, atol=1e-14)
    student = hidden @ head.T if form.endswith("student logits") else HeadLogits.at_valid(hidden, labels, head)
    result = DistillationLoss(settings)(student, [mapped, shared][:num_teachers],
                                        labels, teacher_mask=teacher_mask)  # fmt: skip
    grads = torch.autograd.grad(result.loss, [hidden, head])
    assert float(result.loss.detach()) == pytest.approx(float(expected.loss.detach()), rel=1e-12, abs=1e-12)
    for key in ("loss_kd", "loss_ce"):
        assert float(result.terms[key]) == pytest.approx(float(expected.terms[key]), rel=1e-12, abs=1e-12), key
    torch.testing.assert_close(result.kd.weights[:, mask], expected.kd.weights[:, mask], rtol=0, atol=1e-12)
    for grad, reference in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, reference, rtol=0, atol=1e-12)


# ---- the collator ----


def test_collator_tokenizes_the_same_span_for_every_model(tokenizers):
    names = ["bpe300", "unigram", "wordpiece"]
    collator = MultiTokenizerCollator(
        tokenizers["student"], [None, *(tokenizers[n] for n in names)], max_length=8, text_column="raw"
    )
    batch = collator([{"raw": text} for text in HARD_TEXTS])
    assert batch["teacher_inputs"][0] is None
    assert batch["input_ids"].shape == (3, 8)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    for b, text in enumerate(HARD_TEXTS):
        span_end = tokenizers["student"](text, return_offsets_mapping=True)["offset_mapping"][7][1]
        for name, inputs in zip(names, batch["teacher_inputs"][1:], strict=True):
            ids = inputs["input_ids"][b][inputs["attention_mask"][b] == 1]
            assert ids.tolist() == tokenizers[name](text[:span_end])["input_ids"]  # the student's 8 tokens' text
            position_map = inputs["position_map"][b]
            assert position_map.shape == (8,) and position_map.max() < len(ids)
    with pytest.raises(ValueError, match="no 'raw' field"):
        collator([{"input_ids": [1, 2]}])


# ---- the loss and the trainer ----


def make_trainer(tmp_path, student, teachers, dataset, tokenizer, **config):
    teacher_tokenizers = config.pop("teacher_tokenizers", None)
    return MultiTeacherDistillationTrainer(
        model=student,
        teachers=teachers,
        args=tiny_config(
            tmp_path, **{"max_steps": 2, "per_device_train_batch_size": 8, "cross_tokenizer_max_length": 24, **config}
        ),
        train_dataset=dataset,
        eval_dataset=dataset.select(range(16)),
        processing_class=tokenizer,
        teacher_tokenizers=teacher_tokenizers,
    )


@pytest.fixture(scope="module")
def text_dataset(corpus):
    return Dataset.from_dict({"text": corpus})


@pytest.mark.parametrize("fusion", ["probability", "logit"])
def test_identical_tokenizers_give_the_same_loss_as_the_shared_path(tmp_path, corpus, tokenizers, fusion):
    tok = tokenizers["student"]
    teachers = [tiny_causal_lm(kind, tok, seed=3 + k) for k, kind in enumerate(["gpt2", "llama"])]
    student = tiny_causal_lm("qwen2", tok, seed=1)
    dataset = Dataset.from_dict({"text": corpus[:32]})
    losses = {}
    tokenized = dataset.map(lambda batch: tok(batch["text"]), batched=True)  # the shared path reads token ids
    for mode in ("always", "never"):
        trainer = make_trainer(
            tmp_path, student, teachers, dataset if mode == "always" else tokenized, tok, cross_tokenizer=mode,
            fusion=fusion, alpha_feat=0.1,
            teacher_weighting="entropy+posterior", teacher_tokenizers=[tok, tok] if mode == "always" else None,
        )  # fmt: skip
        assert trainer.cross_tokenizer == (mode == "always")
        batch = MultiTokenizerCollator(tok, [tok, tok])([dataset[i] for i in range(8)])
        if mode == "never":
            batch.pop("teacher_inputs")
        else:  # every student position but the last of each row is aligned with the same position
            position_map = batch["teacher_inputs"][0]["position_map"]
            valid = batch["labels"][:, 1:] != -100
            assert (
                position_map[:, :-1][valid] == torch.arange(position_map.shape[1] - 1).expand_as(valid)[valid]
            ).all()
        torch.manual_seed(0)
        student.eval()
        losses[mode] = trainer.compute_loss(student, batch)
    torch.testing.assert_close(losses["always"], losses["never"], rtol=1e-6, atol=1e-7)


def test_identity_map_keeps_the_kd_loss():
    """At the level of tensors: mapping onto the same vocabulary then the loss equals the loss on the raw logits."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 13, generator=g, dtype=torch.float64)
    teachers = [torch.randn(2, 5, 13, generator=g, dtype=torch.float64) * s for s in (1, 3)]
    labels = torch.randint(0, 13, (2, 5), generator=g)
    identity = VocabularyMap(torch.arange(13), torch.ones(13, dtype=torch.bool), 13)
    for tau in (0.7, 1.0, 2.5):
        mapped = [identity.project(z, tau).scaled_log_probs for z in teachers]
        for weighting in ("entropy", "static"):
            plain = multi_teacher_kd(student, teachers, labels, temperature=tau, weighting=weighting)
            via_map = multi_teacher_kd(student, mapped, labels, temperature=tau, weighting=weighting)
            torch.testing.assert_close(via_map.loss, plain.loss, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(via_map.weights, plain.weights, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def cross_teachers(cross_teacher_dirs):
    return cross_teacher_dirs


def test_three_teachers_on_three_tokenizers_end_to_end(tmp_path, cross_teachers, text_dataset, tokenizers):
    tok = tokenizers["student"]
    names = ["bpe300", "unigram", "wordpiece"]
    trainer = make_trainer(
        tmp_path,
        tiny_causal_lm("qwen2", tok, seed=1, hidden_size=24),
        cross_teachers,
        text_dataset,
        tok,
        max_steps=30,
        logging_steps=10,
        per_device_eval_batch_size=16,
        teacher_names=names,
        alpha_feat=0.1,
    )
    assert all(t is not None for t in trainer.teacher_tokenizers)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_loss_kd"] < before["eval_loss_kd"]
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3
    for log in [*logs, after]:
        prefix = "eval_" if "eval_loss" in log else ""
        for name in names:
            aligned = log[f"{prefix}teacher_aligned/{name}"]
            assert 0.3 < aligned <= 1
            assert 0 <= log[f"{prefix}teacher_unmapped_mass/{name}"] < 0.5
            assert 0 <= log[f"{prefix}teacher_prefix_mapped_mass/{name}"] < 1
            assert math.isfinite(log[f"{prefix}teacher_entropy/{name}"])
            assert 0 <= log[f"{prefix}teacher_weight/{name}"] <= aligned + 1e-6
    # the logged fraction, counted independently on the single evaluation batch
    for name in names:
        aligned = total = 0
        for text in text_dataset["text"][:16]:
            offsets = tok(text, truncation=True, max_length=24, return_offsets_mapping=True)["offset_mapping"]
            cut = text[: offsets[-1][1]]
            teacher_offsets = tokenizers[name](cut, return_offsets_mapping=True)["offset_mapping"]
            position_map = align_positions(cut, offsets, teacher_offsets)[:-1]
            aligned, total = aligned + sum(j >= 0 for j in position_map), total + len(position_map)
        assert after[f"eval_teacher_aligned/{name}"] == pytest.approx(aligned / total, rel=1e-5)


def test_uld_loss_trains(tmp_path, cross_teachers, text_dataset, tokenizers):
    tok = tokenizers["student"]
    trainer = make_trainer(
        tmp_path,
        tiny_causal_lm("qwen2", tok, seed=1, hidden_size=24),
        cross_teachers[:2],
        text_dataset,
        tok,
        max_steps=15,
        cross_tokenizer_loss="uld",
        per_device_eval_batch_size=16,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss_kd"] < before["eval_loss_kd"]
    assert 0 < after["eval_loss_kd"] <= 2  # an L1 distance between two distributions is at most 2


def test_teacher_without_its_tokenizer_is_refused(tmp_path, text_dataset, tokenizers):
    tok = tokenizers["student"]
    other = tiny_causal_lm("llama", tokenizers["unigram"])
    with pytest.raises(ValueError, match=r"tokenizer is missing .*teacher_tokenizers"):
        make_trainer(tmp_path, tiny_causal_lm("qwen2", tok), [other], text_dataset, tok)
    trainer = make_trainer(  # given explicitly, it works
        tmp_path, tiny_causal_lm("qwen2", tok), [other], text_dataset, tok, teacher_tokenizers=[tokenizers["unigram"]]
    )
    assert trainer.cross_tokenizer


def test_slow_tokenizer_is_refused(tmp_path, text_dataset, tokenizers):
    class SlowLooking(PreTrainedTokenizerFast):
        @property
        def is_fast(self) -> bool:
            return False

    slow = SlowLooking(
        tokenizer_object=tokenizers["unigram"].backend_tokenizer, **tokenizers["unigram"].special_tokens_map
    )
    tok = tokenizers["student"]
    other = tiny_causal_lm("llama", tokenizers["unigram"])
    with pytest.raises(ValueError, match=r"not a fast tokenizer: cross-tokenizer alignment needs character offsets"):
        make_trainer(tmp_path, tiny_causal_lm("qwen2", tok), [other], text_dataset, tok, teacher_tokenizers=[slow])


def test_never_mode_and_tokenized_datasets_are_refused_clearly(tmp_path, cross_teachers, text_dataset, tokenizers):
    tok = tokenizers["student"]
    with pytest.raises(ValueError, match=r"different tokenizer from the student .*cross_tokenizer='auto'"):
        make_trainer(
            tmp_path, tiny_causal_lm("qwen2", tok), cross_teachers[:1], text_dataset, tok, cross_tokenizer="never"
        )
    ids_only = text_dataset.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    with pytest.raises(ValueError, match=r"needs the raw text, but the dataset has no 'text' column"):
        make_trainer(tmp_path, tiny_causal_lm("qwen2", tok), cross_teachers[:1], ids_only, tok)
