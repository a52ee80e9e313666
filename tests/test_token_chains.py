"""The chained target: a teacher's probability of the student's whole next token, over the teacher's own tokens."""

import functools
import math

import pytest
import torch
from datasets import Dataset
from trainer_helpers import tiny_config

from hf_mtkd import MultiTeacherDistillationTrainer
from hf_mtkd.chunked import next_token_mask
from hf_mtkd.cross_tokenizer import LOG_ZERO, MultiTokenizerCollator, VocabularyMap, teacher_on_student_positions
from hf_mtkd.heads import HeadRunner
from hf_mtkd.logit_free import HeadLogits
from hf_mtkd.losses import DistillationLoss
from hf_mtkd.settings import DistillationSettings
from hf_mtkd.testing import tiny_causal_lm
from hf_mtkd.token_chains import CHAIN_STOP_KEY, chain_stops, interior_positions, rest_log_probs

# ---- finding the chains ----


def test_chain_stops_by_hand():
    text = "ab cdef gh"
    student = [(0, 2), (2, 7), (7, 10)]  # "ab" " cdef" " gh"
    byte_level = [(0, 2), (2, 5), (5, 7), (7, 10)]  # "ab" " cd" "ef" " gh"
    # student 0 (-> " cdef") is teacher 0; " cdef" is the teacher's " cd" "ef": its last piece is predicted at 2
    # - 1 = 1. Student 1 (-> " gh") is teacher 2, one token of its own: no chain
    assert chain_stops(text, student, [0, 2, -1], text, byte_level, [0] * 4) == [1, -1, -1]
    wordpiece = [(0, 2), (3, 5), (5, 7), (8, 10)]  # whitespace left out of the offsets: "ab" "cd" "##ef" "gh"
    assert chain_stops(text, student, [0, 2, -1], text, wordpiece, [0] * 4) == [1, -1, -1]
    # a teacher token that runs past the student's end: no chain
    crossing = [(0, 2), (2, 5), (5, 8), (8, 10)]  # "ab" " cd" "ef " "gh"
    assert chain_stops(text, student, [0, -1, -1], text, crossing, [0] * 4) == [-1, -1, -1]
    # a special token inside: no chain; an unaligned position: none either
    assert chain_stops(text, student, [0, 2, -1], text, byte_level, [0, 0, 1, 0]) == [-1, -1, -1]
    assert chain_stops(text, student, [-1, 2, -1], text, byte_level, [0] * 4) == [-1, -1, -1]
    # the student's token ends inside a character (its next token is the rest of its bytes): no chain
    assert chain_stops("a é", [(0, 1), (1, 3), (2, 3)], [0, -1, -1], "a é", [(0, 1), (1, 2), (2, 3)], [0] * 3) == [
        -1,
        -1,
        -1,
    ]
    # the teacher's last piece ends inside a character: no chain
    assert (
        chain_stops("a éb", [(0, 1), (1, 3), (3, 4)], [0, -1, -1], "a éb", [(0, 1), (1, 2), (2, 3), (2, 3)], [0] * 4)[
            0
        ]
        == -1
    )


def test_interior_positions_and_rest_log_probs_by_hand():
    position_map = torch.tensor([[0, 3, -1, 5], [1, -1, -1, -1]])
    chain_stop = torch.tensor([[2, -1, -1, 7], [1, -1, -1, -1]])  # chains 1..2 and 6..7 of row 0; none in row 1
    chain_stop[1, 0] = 3  # row 1: the chain 2..3
    interior = interior_positions(position_map, chain_stop, 9)
    expected = torch.zeros(2, 9, dtype=torch.bool)
    expected[0, [1, 2, 6, 7]] = True
    expected[1, [2, 3]] = True
    assert torch.equal(interior, expected)
    log_prob = torch.tensor([-1.0, -2.0, -4.0, -8.0, -16.0, -32.0])  # row-major over the interior positions
    rest = rest_log_probs(log_prob, interior, position_map, chain_stop)
    assert torch.equal(rest, torch.tensor([[-3.0, 0.0, 0.0, -12.0], [-48.0, 0.0, 0.0, 0.0]]))


# ---- the chained target against a plain float64 reference ----


def reference_mapped(logits, own_ids, position_map, chain_stop, targets, vocabulary_map, tau, chains=True):
    """
    `[B, T, V_s]` tau log p~ of every aligned position, one position at a time: the teacher's tempered distribution
    summed onto the student's vocabulary (only exact twins without `prefix_mass`), then (`chains`) its chained
    probability of the student's next token put there, taken from where its first token went (if it went anywhere).
    """
    carried = [
        int(s) >= 0 and (vocabulary_map.prefix_mass or bool(e))
        for s, e in zip(vocabulary_map.index.tolist(), vocabulary_map.exact.tolist(), strict=True)
    ]
    b, t = position_map.shape
    out = torch.zeros(b, t, vocabulary_map.student_vocab_size, dtype=torch.float64)
    for row in range(b):
        for s in range(t):
            j = int(position_map[row, s])
            if j < 0:
                continue
            p = torch.softmax(logits[row, j].double() / tau, dim=-1)
            mapped = torch.zeros(vocabulary_map.student_vocab_size, dtype=torch.float64)
            for v in range(p.numel()):
                if carried[v]:
                    mapped[vocabulary_map.index[v]] += p[v]
            stop = int(chain_stop[row, s])
            if chains and stop >= 0 and targets[row, s] >= 0:
                first = int(own_ids[row, j + 1])
                chained = float(p[first])
                for i in range(j + 1, stop + 1):
                    chained *= float(torch.softmax(logits[row, i].double() / tau, dim=-1)[own_ids[row, i + 1]])
                mapped[targets[row, s]] += chained
                if carried[first]:
                    mapped[vocabulary_map.index[first]] -= chained
            out[row, s] = tau * (mapped / mapped.sum()).log().clamp(min=LOG_ZERO)
    return out


@pytest.fixture(scope="module")
def chained_batch(corpus, cross_tokenizers):
    """A collated batch of plain text for the student and its Unigram teacher (shorter tokens: many chains)."""
    student, teacher = cross_tokenizers["student"], cross_tokenizers["unigram"]
    collator = MultiTokenizerCollator(student, [teacher], max_length=32)
    return collator([{"text": text} for text in corpus[:6]])


def test_collated_chains_spell_the_students_token(chained_batch, cross_tokenizers):
    student, teacher = cross_tokenizers["student"], cross_tokenizers["unigram"]
    own = chained_batch["teacher_inputs"][0]
    chain_stop, position_map = own[CHAIN_STOP_KEY], own["position_map"]
    assert chain_stop.shape == position_map.shape and (chain_stop >= 0).sum() >= 10
    for row, s in (chain_stop >= 0).nonzero().tolist():
        j, stop = int(position_map[row, s]), int(chain_stop[row, s])
        assert stop >= j + 1  # at least two of the teacher's tokens
        pieces = teacher.convert_ids_to_tokens(own["input_ids"][row, j + 1 : stop + 2].tolist())
        spelled = "".join(pieces).replace("▁", " ")
        assert spelled.strip() == student.decode(chained_batch["input_ids"][row, s + 1]).strip()


@pytest.mark.parametrize("logit_free", [False, True])
@pytest.mark.parametrize(("tau", "prefix_mass"), [(1.0, True), (2.0, True), (2.0, False)])
def test_the_chained_target_matches_the_reference(chained_batch, cross_tokenizers, logit_free, tau, prefix_mass):
    student_tok, teacher_tok = cross_tokenizers["student"], cross_tokenizers["unigram"]
    model = tiny_causal_lm("llama", teacher_tok, seed=2).double().eval()
    vocabulary_map = VocabularyMap.build(
        teacher_tok, student_tok, teacher_vocab_size=model.config.vocab_size, prefix_mass=prefix_mass
    )
    assert (vocabulary_map.mapped & ~vocabulary_map.exact).any()  # some tokens are mapped by prefix only
    own, labels = chained_batch["teacher_inputs"][0], chained_batch["labels"]
    mask = next_token_mask(labels)
    run_head = functools.partial(HeadRunner(model), mask=mask) if logit_free else None
    with torch.no_grad():
        view = teacher_on_student_positions(
            model, "unigram", own, vocabulary_map, temperature=tau, output_hidden_states=False,
            run_head=run_head, mask=mask if logit_free else None, student_labels=labels,
        )  # fmt: skip
        logits = model(input_ids=own["input_ids"], attention_mask=own["attention_mask"]).logits
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    expected = reference_mapped(
        logits, own["input_ids"], own["position_map"], own[CHAIN_STOP_KEY], targets, vocabulary_map, tau
    )
    read = mask & (own["position_map"] >= 0)  # the rows the loss reads
    dense = view.mapped.dense(slice(None))
    got = dense if logit_free else dense.view(*mask.shape, -1)[read]
    want = expected[mask] if logit_free else expected[read]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # the chains moved mass onto the student's true token: its mapped probability rose where a chain is known
    plain = reference_mapped(
        logits, own["input_ids"], own["position_map"], own[CHAIN_STOP_KEY], targets, vocabulary_map, tau, False
    )
    chained = read & (own[CHAIN_STOP_KEY] >= 0)
    at_target = expected.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    before = plain.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    assert (at_target[chained] > before[chained]).all()
    assert (view.chained_mass[chained] > 0).all() and not view.chained_mass[~chained].any()


def test_gradcheck_through_a_chained_target(chained_batch, cross_tokenizers):
    """The student's gradient through the KD term on a chained target (the teacher side carries none)."""
    student_tok, teacher_tok = cross_tokenizers["student"], cross_tokenizers["unigram"]
    model = tiny_causal_lm("llama", teacher_tok, seed=2).double().eval()
    vocabulary_map = VocabularyMap.build(teacher_tok, student_tok, teacher_vocab_size=model.config.vocab_size)
    own, labels = chained_batch["teacher_inputs"][0], chained_batch["labels"][:2, :12]
    own = {key: value[:2] for key, value in own.items()}
    own["position_map"], own[CHAIN_STOP_KEY] = own["position_map"][:, :12], own[CHAIN_STOP_KEY][:, :12]
    assert (own[CHAIN_STOP_KEY] >= 0).any()
    with torch.no_grad():
        view = teacher_on_student_positions(
            model, "unigram", own, vocabulary_map, temperature=2.0, output_hidden_states=False,
            student_labels=labels,
        )  # fmt: skip
    settings = DistillationSettings(temperature=2.0, alpha_ce=0.3, weighting="posterior", chunk_size=5)
    g = torch.Generator().manual_seed(0)
    head = torch.randn(len(student_tok), 4, generator=g, dtype=torch.float64)
    hidden = torch.randn(2, 12, 4, generator=g, dtype=torch.float64, requires_grad=True)

    def loss(h):
        return DistillationLoss(settings)(
            HeadLogits.at_valid(h, labels, head), [view.mapped], labels, teacher_mask=view.available[None]
        ).loss

    assert torch.autograd.gradcheck(loss, (hidden,), eps=1e-6, atol=1e-6)


# ---- in the trainer ----


def test_chains_give_the_teacher_the_students_token(tmp_path, corpus, cross_teacher_dirs, cross_tokenizers):
    """On held-out text the chained teachers' NLL of the student's next token falls; their chained mass is logged."""
    tok, names = cross_tokenizers["student"], ["bpe300", "unigram", "wordpiece"]
    text_dataset = Dataset.from_dict({"text": corpus})
    metrics = {}
    for chains in (False, True):
        args = tiny_config(
            tmp_path, output_dir=str(tmp_path / str(chains)), teacher_names=names, cross_tokenizer_chains=chains,
            cross_tokenizer_max_length=24, per_device_eval_batch_size=16,
        )  # fmt: skip
        trainer = MultiTeacherDistillationTrainer(
            model=tiny_causal_lm("qwen2", tok, seed=1, hidden_size=24),
            teachers=[str(d) for d in cross_teacher_dirs],
            args=args,
            train_dataset=text_dataset,
            eval_dataset=text_dataset.select(range(16)),
            processing_class=tok,
        )
        maps = [teacher.vocabulary_map for teacher in trainer.teacher_source.teachers]
        assert all(not m.prefix_mass for m in maps)  # the default: tokens mapped by prefix only carry no mass
        metrics[chains] = trainer.evaluate()
    for name in names:
        assert f"eval_teacher_chained_mass/{name}" not in metrics[False]
        mass = metrics[True][f"eval_teacher_chained_mass/{name}"]
        assert 0 <= mass < 1 and math.isfinite(mass)
    # the teachers with shorter tokens than the student's: their NLL of its token falls with the chains (the floor
    # -100 of a token no teacher token maps to is gone); the WordPiece teacher spells these words whole: no change
    for name in ("bpe300", "unigram"):
        assert metrics[True][f"eval_teacher_chained_mass/{name}"] > 0
        assert metrics[True][f"eval_teacher_nll/{name}"] < 0.5 * metrics[False][f"eval_teacher_nll/{name}"]
    assert metrics[True]["eval_teacher_chained_mass/wordpiece"] == 0
    for key in ("teacher_nll/wordpiece", *(f"teacher_aligned/{name}" for name in names)):
        assert metrics[True][f"eval_{key}"] == metrics[False][f"eval_{key}"]


def test_the_prefix_mass_setting_reaches_every_map(tmp_path, corpus, cross_teacher_dirs, cross_tokenizers):
    args = tiny_config(tmp_path, cross_tokenizer_prefix_mass=True, teacher_names=["bpe300", "unigram", "wordpiece"])
    trainer = MultiTeacherDistillationTrainer(
        model=tiny_causal_lm("qwen2", cross_tokenizers["student"], seed=1, hidden_size=24),
        teachers=[str(d) for d in cross_teacher_dirs],
        args=args,
        train_dataset=Dataset.from_dict({"text": corpus}),
        processing_class=cross_tokenizers["student"],
    )
    assert all(teacher.vocabulary_map.prefix_mass for teacher in trainer.teacher_source.teachers)
