"""
The logit-free loss (hidden states at the valid positions and output heads) against today's path on the logits
`h W^T + b`, in float64: the loss, the teacher weights and the gradients of the hidden states and heads.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_mtkd.chunked import next_token_mask
from hf_mtkd.logit_free import HeadLogits, at_valid_positions
from hf_mtkd.losses import DistillationLoss, compute_teacher_weights, multi_teacher_kd
from hf_mtkd.settings import DistillationSettings
from hf_mtkd.storage import TopKLogProbs
from hf_mtkd.teachers import on_student_vocabulary

B, T, V, D = 3, 7, 17, 5
WEIGHTINGS = ("entropy", "static", "correctness", "posterior", "entropy+posterior")
OPTIONS = [(w, f, g) for w in WEIGHTINGS for f in ("probability", "logit") for g in ("token", "sequence", "batch")]


class Student:
    """A tiny float64 student: embedding E, h = tanh(E[ids] A), logits h W^T + b with W = E when `tied`."""

    def __init__(self, seed: int, tied: bool) -> None:
        g = torch.Generator().manual_seed(seed)
        self.embedding = torch.randn(V, D, generator=g, dtype=torch.float64).requires_grad_()
        self.mix = torch.randn(D, D, generator=g, dtype=torch.float64).requires_grad_()
        self.head = self.embedding if tied else torch.randn(V, D, generator=g, dtype=torch.float64).requires_grad_()
        self.bias = None if tied else torch.randn(V, generator=g, dtype=torch.float64).requires_grad_()
        self.parameters = [self.embedding, self.mix] + ([] if tied else [self.head, self.bias])

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.embedding[ids] @ self.mix)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.hidden(ids), self.head, self.bias)

    def head_logits(self, ids: torch.Tensor, labels: torch.Tensor) -> HeadLogits:
        return HeadLogits.at_valid(self.hidden(ids), labels, self.head, self.bias)


def batch(seed: int, num_teachers: int, masked: bool):
    """Token ids, labels (with a prompt and right padding when `masked`) and teachers (hidden states, head, bias)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    if masked:
        labels[0, 5:] = -100  # right padding
        labels[1, :4] = -100  # an ignored prompt
    teachers = []
    for k in range(num_teachers):
        width = D + 1 + k  # teachers are wider than the student, and differ
        hidden = torch.randn(B, T, width, generator=g, dtype=torch.float64) * (1 + k)
        head = torch.randn(V, width, generator=g, dtype=torch.float64)
        bias = torch.randn(V, generator=g, dtype=torch.float64) if k == 1 else None
        teachers.append((hidden, head, bias))
    return ids, labels, teachers


def dense_teachers(teachers):
    return [torch.nn.functional.linear(hidden, head, bias) for hidden, head, bias in teachers]


def free_teachers(teachers, labels):
    return [HeadLogits.at_valid(hidden, labels, head, bias) for hidden, head, bias in teachers]


def settings_kwargs(weighting, fusion, granularity, num_teachers):
    return dict(
        temperature=1.7,
        weighting=weighting,
        entropy_temperature=0.6,
        label_temperature=0.8,
        teacher_weights=[0.2, 0.3, 0.5][:num_teachers],
        fusion=fusion,
        granularity=granularity,
        chunk_size=3,  # chunks run across rows and around masked positions
        alpha_ce=0.4,
    )


def both_paths(student, ids, labels, teachers, **kwargs):
    """(loss, loss_kd, loss_ce, weights, grads) of today's path and of the logit-free one."""
    results = []
    for free in (False, True):
        if free:
            out = multi_teacher_kd(student.head_logits(ids, labels), free_teachers(teachers, labels), labels, **kwargs)
        else:
            out = multi_teacher_kd(student.logits(ids), dense_teachers(teachers), labels, **kwargs)
        grads = torch.autograd.grad(out.loss, student.parameters)
        results.append((out.loss, out.loss_kd, out.loss_ce, out.weights, grads))
    return results


def assert_same(dense, free, tol=1e-12):
    for a, b in zip(dense[:4], free[:4], strict=True):
        assert torch.allclose(a, b, rtol=0, atol=tol), (a, b)
    for a, b in zip(dense[4], free[4], strict=True):
        assert torch.allclose(a, b, rtol=0, atol=tol), (a - b).abs().max()


@pytest.mark.parametrize(("weighting", "fusion", "granularity"), OPTIONS)
@pytest.mark.parametrize("num_teachers", [1, 2, 3])
@pytest.mark.parametrize("masked", [False, True], ids=["all-valid", "masked"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logit_free_equals_the_logits_path(weighting, fusion, granularity, num_teachers, masked, tied):
    student = Student(0, tied)
    ids, labels, teachers = batch(1, num_teachers, masked)
    kwargs = settings_kwargs(weighting, fusion, granularity, num_teachers)
    dense, free = both_paths(student, ids, labels, teachers, **kwargs)
    assert dense[0].item() > 0
    assert_same(dense, free)


@pytest.mark.parametrize("weighting", ["posterior", "entropy+posterior"])
def test_packed_documents_restart_the_posterior_alike(weighting):
    student = Student(2, tied=False)
    ids, labels, teachers = batch(3, 3, masked=True)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6], [0, 1, 0, 1, 2, 0, 1]])
    kwargs = settings_kwargs(weighting, "probability", "token", 3)
    dense, free = both_paths(student, ids, labels, teachers, position_ids=position_ids, **kwargs)
    undivided = both_paths(student, ids, labels, teachers, **kwargs)[0]
    assert not torch.allclose(dense[0], undivided[0])  # the documents do change the loss
    assert_same(dense, free)


@pytest.mark.parametrize("weighting", ["entropy", "posterior"])
def test_teacher_mask_routing_and_floor_alike(weighting):
    student = Student(4, tied=True)
    ids, labels, teachers = batch(5, 3, masked=True)
    g = torch.Generator().manual_seed(6)
    teacher_mask = torch.rand(3, B, T, generator=g) > 0.3
    teacher_mask[:, 2, 3] = False  # a valid position without any teacher
    teacher_prior = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [1.0, 1.0, 1.0]], dtype=torch.float64)
    kwargs = settings_kwargs(weighting, "probability", "token", 3)
    kwargs.update(min_weight=0.05, teacher_mask=teacher_mask, teacher_prior=teacher_prior, num_items_in_batch=40)
    assert_same(*both_paths(student, ids, labels, teachers, **kwargs))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha_ce", [None, 0.5])
def test_temperature_one_and_without_cross_entropy_alike(temperature, alpha_ce):
    student = Student(7, tied=False)
    ids, labels, teachers = batch(8, 2, masked=True)
    kwargs = settings_kwargs("entropy", "logit", "token", 2)
    kwargs.update(temperature=temperature, alpha_ce=alpha_ce, alpha_kd=0.7)
    dense, free = both_paths(student, ids, labels, teachers, **kwargs)
    assert (dense[2] is None) == (alpha_ce is None)
    assert_same((*dense[:2], torch.zeros(()), *dense[3:]), (*free[:2], torch.zeros(()), *free[3:]))


def test_teacher_head_cut_to_the_shared_vocabulary():
    """A teacher head with more (padding) rows, cut to the shared ids and -inf beyond, as on the logits path."""
    student = Student(9, tied=False)
    ids, labels, teachers = batch(10, 2, masked=True)
    shared = V - 3
    wide_head = torch.cat([teachers[0][1], torch.randn(4, teachers[0][1].shape[1], dtype=torch.float64)])
    dense = [on_student_vocabulary(torch.nn.functional.linear(teachers[0][0], wide_head), shared, V)]
    dense.append(torch.nn.functional.linear(*teachers[1]))
    free = [
        HeadLogits.at_valid(teachers[0][0], labels, wide_head[:shared], None, vocab_size=V),
        *free_teachers(teachers[1:], labels),
    ]
    kwargs = settings_kwargs("entropy", "probability", "sequence", 2)
    a = multi_teacher_kd(student.logits(ids), dense, labels, **kwargs)
    b = multi_teacher_kd(student.head_logits(ids, labels), free, labels, **kwargs)
    assert torch.allclose(a.loss, b.loss, rtol=0, atol=1e-12)
    assert torch.allclose(a.weights, b.weights, rtol=0, atol=1e-12)


@pytest.mark.parametrize("weighting", ["entropy", "posterior"])
def test_cached_teachers_beside_a_logit_free_student(weighting):
    """Teachers from the cache (top-k, [B, T, k]) are taken at the valid positions; the student stays logit-free."""
    student = Student(11, tied=True)
    ids, labels, teachers = batch(12, 2, masked=True)
    cached = [TopKLogProbs.from_logits(logits, k=4) for logits in dense_teachers(teachers)]
    kwargs = settings_kwargs(weighting, "probability", "token", 2)
    a = multi_teacher_kd(student.logits(ids), cached, labels, **kwargs)
    b = multi_teacher_kd(student.head_logits(ids, labels), cached, labels, **kwargs)
    grads_a = torch.autograd.grad(a.loss, student.parameters)
    grads_b = torch.autograd.grad(b.loss, student.parameters)
    assert torch.allclose(a.loss, b.loss, rtol=0, atol=1e-12)
    for x, y in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(x, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_teacher_weights_from_heads(granularity):
    _, labels, teachers = batch(13, 3, masked=True)
    kwargs = dict(weighting="entropy+posterior", granularity=granularity, temperature=1.3, chunk_size=2)
    expected = compute_teacher_weights(dense_teachers(teachers), labels, **kwargs)
    got = compute_teacher_weights(free_teachers(teachers, labels), labels, **kwargs)
    assert torch.allclose(expected, got, rtol=0, atol=1e-12)


def test_all_masked_batch_gives_zero_and_zero_gradients():
    student = Student(14, tied=False)
    ids, labels, teachers = batch(15, 2, masked=False)
    labels[:] = -100
    out = multi_teacher_kd(
        student.head_logits(ids, labels), free_teachers(teachers, labels), labels, alpha_ce=0.5, chunk_size=3
    )
    grads = torch.autograd.grad(out.loss, student.parameters)
    assert out.loss.item() == 0
    assert all(bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize(
    ("temperature", "fusion", "weighting"),
    [(1.0, "probability", "entropy"), (1.5, "logit", "correctness"), (0.8, "probability", "posterior")],
)
def test_gradcheck(temperature, fusion, weighting):
    g = torch.Generator().manual_seed(16)
    n, d, v = 5, 3, 7
    labels = torch.randint(0, v, (2, 4), generator=g)
    labels[0, 3] = -100  # 5 valid positions
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    teachers = [
        HeadLogits(
            torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(v, 4, generator=g, dtype=torch.float64)
        )
        for _ in range(2)
    ]
    settings = DistillationSettings(
        temperature=temperature, fusion=fusion, weighting=weighting, chunk_size=2, alpha_ce=0.3
    )

    def loss(h, w, b):
        return DistillationLoss(settings)(HeadLogits(h, w, b), teachers, labels).loss

    assert torch.autograd.gradcheck(loss, (hidden, head, bias))


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_all_positions_by_the_vocabulary():
    """With chunks of 4 positions, no tensor of the forward or backward has N x V elements (B x T x V is more)."""
    v, d, n = 512, 8, 64
    g = torch.Generator().manual_seed(17)
    labels = torch.randint(0, v, (4, n // 4 + 1), generator=g)
    labels[:, 0] = -100  # the first label of a row is never a target
    hidden = torch.randn(4, n // 4 + 1, d, dtype=torch.float64, generator=g, requires_grad=True)
    head = torch.randn(v, d, dtype=torch.float64, generator=g, requires_grad=True)
    teachers = [
        HeadLogits.at_valid(torch.randn(4, n // 4 + 1, d, generator=g), labels, torch.randn(v, d, generator=g))
        for _ in range(3)
    ]
    settings = DistillationSettings(weighting="posterior", granularity="sequence", chunk_size=4, alpha_ce=0.5)
    with LargestTensor() as probe:
        out = DistillationLoss(settings)(HeadLogits.at_valid(hidden, labels, head), teachers, labels)
        out.loss.backward()
    assert int(next_token_mask(labels).sum()) == n
    assert probe.largest == v * d  # the head and its gradient; a chunk's tensors are [4, V]


def test_teachers_at_valid_positions_must_match_the_labels():
    _, labels, teachers = batch(18, 1, masked=True)
    hidden, head, _ = teachers[0]
    with pytest.raises(ValueError, match="valid ones"):
        at_valid_positions(HeadLogits(hidden[0], head), next_token_mask(labels))


def test_head_teachers_need_a_head_student():
    ids, labels, teachers = batch(19, 1, masked=True)
    with pytest.raises(ValueError, match="student in the same form"):
        multi_teacher_kd(Student(0, tied=False).logits(ids), free_teachers(teachers, labels), labels)


def test_head_shapes_are_checked():
    with pytest.raises(ValueError, match="do not fit"):
        HeadLogits(torch.zeros(4, 3), torch.zeros(9, 5))
    assert math.isinf(HeadLogits(torch.zeros(2, 3), torch.zeros(4, 3), vocab_size=6).dense(slice(0, 2))[0, 5])
