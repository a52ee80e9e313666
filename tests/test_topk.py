"""The top-k (cached) form of teacher logits: what it stands for, and the KD loss computed from it."""

import math

import pytest
import torch
from test_losses import OPTIONS, random_logits, reference_kd, valid_positions

from hf_mtkd.losses import compute_teacher_weights, multi_teacher_kd, multi_teacher_kd_loss
from hf_mtkd.topk import TopKLogits

B, T, V = 3, 6, 11


@pytest.fixture
def batch():
    student, teachers, labels, _ = random_logits(1, B, T, V)
    labels[0, 4:] = -100
    labels[1, :3] = -100
    return student, teachers, labels


def plain_top_k_log_probs(z: torch.Tensor, k: int) -> torch.Tensor:
    """log p̂ written plainly: the k largest probabilities kept, the rest of the mass spread evenly."""
    out = torch.empty_like(z)
    for b in range(z.shape[0]):
        for t in range(z.shape[1]):
            logits = z[b, t].tolist()
            peak = max(logits)
            probs = [math.exp(v - peak) for v in logits]
            probs = [p / sum(probs) for p in probs]
            top = sorted(range(len(probs)), key=lambda v: -probs[v])[:k]
            tail = 1 - sum(probs[v] for v in top)
            for v in range(len(probs)):
                p = probs[v] if v in top else tail / (len(probs) - k)
                out[b, t, v] = math.log(p)
    return out


def test_from_logits_keeps_top_k_and_the_exact_tail_mass(batch):
    _, teachers, _ = batch
    z = teachers[1]
    topk = TopKLogits.from_logits(z, 4)
    assert topk.shape == (B, T, V) and topk.k == 4
    probs = torch.softmax(z, dim=-1)
    expected_top, expected_idx = probs.topk(4, dim=-1)
    torch.testing.assert_close(topk.indices, expected_idx)
    torch.testing.assert_close(topk.log_probs.exp(), expected_top)
    torch.testing.assert_close(topk.log_tail_mass.exp(), 1 - expected_top.sum(-1))
    rows, cols = torch.tensor([0, 2, 1]), torch.tensor([5, 0, 3])
    dense = topk.dense(rows * T + cols)
    torch.testing.assert_close(dense, plain_top_k_log_probs(z, 4)[rows, cols])
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(3, dtype=torch.float64))


def test_full_k_is_the_teacher_itself(batch):
    _, teachers, _ = batch
    topk = TopKLogits.from_logits(teachers[0], V)
    assert torch.isneginf(topk.log_tail_mass).all()
    torch.testing.assert_close(topk.dense(torch.arange(B * T)), torch.log_softmax(teachers[0], -1).flatten(0, 1))


@pytest.mark.parametrize(("weighting", "fusion", "granularity"), OPTIONS)
def test_full_k_gives_the_dense_loss_and_gradient(batch, weighting, fusion, granularity):
    student, teachers, labels = batch
    kwargs = dict(temperature=1.7, weighting=weighting, fusion=fusion, granularity=granularity, chunk_size=4)
    cached = [TopKLogits.from_logits(z, V) for z in teachers]
    s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    dense = multi_teacher_kd(s1, teachers, labels, **kwargs)
    sparse = multi_teacher_kd(s2, cached, labels, **kwargs)
    assert sparse.loss.item() == pytest.approx(dense.loss.item(), rel=1e-12)
    torch.testing.assert_close(sparse.weights, dense.weights, rtol=1e-12, atol=1e-12)
    dense.loss.backward()
    sparse.loss.backward()
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("weighting", "fusion", "granularity"), OPTIONS)
def test_top_k_loss_matches_reference(batch, weighting, fusion, granularity):
    student, teachers, labels = batch
    prior = [0.2, 0.3, 0.5]
    cached = [TopKLogits.from_logits(z, 3) for z in teachers]
    loss = multi_teacher_kd_loss(
        student,
        cached,
        labels,
        temperature=1.7,
        weighting=weighting,
        entropy_temperature=0.6,
        teacher_weights=prior,
        fusion=fusion,
        granularity=granularity,
        chunk_size=5,
    )
    # The reference tempers its "logits" like the loss does, so it is given log p̂ built plainly.
    plain = [plain_top_k_log_probs(z, 3) for z in teachers]
    expected = reference_kd(student, plain, labels, 1.7, weighting, 0.6, prior, fusion, granularity)
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_top_k_gradcheck(batch):
    student, teachers, labels = batch
    cached = [TopKLogits.from_logits(z, 2) for z in teachers]
    x = student.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: multi_teacher_kd_loss(s, cached, labels, temperature=1.5, chunk_size=3), (x,)
    )


def test_top_k_weights_follow_the_truncated_entropy(batch):
    _, teachers, labels = batch
    cached = [TopKLogits.from_logits(z.float(), 5) for z in teachers]
    weights = compute_teacher_weights(cached, labels, temperature=2.0, weighting="entropy")
    assert weights.dtype == torch.float32
    b, t = valid_positions(labels)[0]
    entropies = []
    for z in teachers:
        p = torch.softmax(plain_top_k_log_probs(z, 5)[b, t] / 2.0, -1)
        entropies.append(-(p * p.log()).sum())
    expected = torch.softmax(-torch.stack(entropies), 0)
    torch.testing.assert_close(weights[:, b, t].double(), expected, rtol=1e-5, atol=1e-6)


def test_empty_tail_stays_finite():
    z = torch.tensor([[[0.0, -200.0, 3.0, 1.0]]])
    cached = TopKLogits.from_logits(z, 3)
    assert cached.log_tail_mass.item() < -190
    labels = torch.tensor([[2, 0]])
    student = torch.zeros(1, 2, 4, requires_grad=True)
    teacher = TopKLogits(
        indices=torch.tensor([[[2, 0, 3], [0, 1, 2]]]),
        log_probs=torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]]])),
        log_tail_mass=torch.full((1, 2), -math.inf),
        vocab_size=4,
    )
    for fusion in ("probability", "logit"):
        loss = multi_teacher_kd_loss(student, [teacher, teacher], labels, fusion=fusion, weighting="posterior")
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_bad_shapes_and_k_are_refused():
    with pytest.raises(ValueError, match="k = 0"):
        TopKLogits.from_logits(torch.zeros(1, 2, 5), 0)
    with pytest.raises(ValueError, match="shapes disagree"):
        TopKLogits(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 2), torch.zeros(1, 2), vocab_size=5)
    with pytest.raises(ValueError, match="same \\[batch, length, vocab\\]"):
        multi_teacher_kd_loss(
            torch.zeros(1, 2, 6), [TopKLogits.from_logits(torch.zeros(1, 2, 5), 2)], torch.zeros(1, 2).long()
        )


def densified(cached: TopKLogits) -> torch.Tensor:
    return cached.dense(torch.arange(cached.shape[0] * cached.shape[1])).view(cached.shape)


@pytest.mark.parametrize(("weighting", "fusion", "granularity"), OPTIONS)
@pytest.mark.parametrize(("k", "tau", "alpha_ce"), [(1, 1.7, None), (4, 1.7, None), (4, 1.0, 0.3), (4, 1.7, 0.3)])
def test_sparse_path_equals_the_densified_teachers(batch, weighting, fusion, granularity, k, tau, alpha_ce):
    """With every teacher in top-k form the loss never builds [n, V] teacher rows; it must not change a thing."""
    student, teachers, labels = batch
    cached = [TopKLogits.from_logits(z, k) for z in teachers]
    kwargs = dict(
        temperature=tau, weighting=weighting, fusion=fusion, granularity=granularity, chunk_size=5, alpha_ce=alpha_ce
    )
    s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    sparse = multi_teacher_kd(s1, cached, labels, **kwargs)
    dense = multi_teacher_kd(s2, [densified(c) for c in cached], labels, **kwargs)
    assert sparse.loss.item() == pytest.approx(dense.loss.item(), rel=1e-12)
    torch.testing.assert_close(sparse.weights, dense.weights, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sparse.signals.entropy, dense.signals.entropy, rtol=1e-12, atol=1e-12)
    sparse.loss.backward()
    dense.loss.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-10, atol=1e-13)


def test_sparse_path_in_float32_and_with_a_large_vocabulary():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 5, 5000, generator=g) * 3
    teachers = [torch.randn(2, 5, 5000, generator=g) * 4 for _ in range(3)]
    labels = torch.randint(0, 5000, (2, 5), generator=g)
    cached = [TopKLogits.from_logits(z, 64) for z in teachers]
    for fusion in ("probability", "logit"):
        sparse = multi_teacher_kd_loss(student, cached, labels, temperature=2.0, fusion=fusion)
        dense = multi_teacher_kd_loss(student, [densified(c) for c in cached], labels, temperature=2.0, fusion=fusion)
        assert sparse.item() == pytest.approx(dense.item(), rel=1e-5)
