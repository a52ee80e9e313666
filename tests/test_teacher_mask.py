"""Teacher availability masks (cross-tokenizer teachers) and the ULD loss, against plain float64 references."""

import math

import pytest
import torch
from test_losses import entropy, random_logits, softmax, valid_positions

from hf_mtkd.losses import (
    causal_lm_loss,
    compute_teacher_weights,
    multi_teacher_kd,
    universal_logit_distillation_loss,
)

B, T, V, K = 3, 7, 9, 3


def reference_masked_weights(
    teachers, labels, available, tau, weighting, prior, granularity, min_weight=0.0, row_prior=None
):
    """
    w[k, b, t] at valid positions: an unavailable teacher has no score there and weight 0; the rest renormalise.
    With `row_prior` (routing, [B][K]), w_k ∝ prior_k * row_prior[b][k] * exp(pooled score).
    """
    valid = valid_positions(labels)
    prior = [p / sum(prior) for p in prior]
    score = {}
    for k, z in enumerate(teachers):
        for b in range(labels.shape[0]):
            running = 0.0
            for t in range(labels.shape[1]):
                running *= 0.9
                if (b, t) not in valid or not available[k, b, t]:
                    continue
                log_p_true = math.log(softmax(z[b, t].tolist())[labels[b, t + 1]])
                running += log_p_true
                h = entropy(softmax([v / tau for v in z[b, t].tolist()]))
                score[k, b, t] = {
                    "static": 0.0,
                    "entropy": -h,
                    "correctness": log_p_true,
                    "posterior": running,
                    "entropy+posterior": -h + running,
                }[weighting]
    weights = {}
    for b, t in valid:
        present = [k for k in range(len(teachers)) if available[k, b, t]]
        unnorm = {}
        for k in present:
            if granularity == "token":
                group = [(b, t)]
            elif granularity == "sequence":
                group = [(bb, tt) for bb, tt in valid if bb == b and available[k, bb, tt]]
            else:
                group = [(bb, tt) for bb, tt in valid if available[k, bb, tt]]
            row = 1.0 if row_prior is None else row_prior[b][k]
            unnorm[k] = prior[k] * row * math.exp(sum(score[k, bb, tt] for bb, tt in group) / len(group))
        for k in range(len(teachers)):
            w = unnorm[k] / sum(unnorm.values()) if k in unnorm else 0.0
            weights[k, b, t] = min_weight + (1 - len(present) * min_weight) * w if k in unnorm else 0.0
    return weights


@pytest.fixture
def batch():
    student, teachers, labels, g = random_logits(1, B, T, V)
    labels[0, 5:] = -100
    available = torch.rand(K, B, T, generator=g) < 0.6
    available[:, 2, 3] = False  # no teacher at all at one valid position
    available[0, 1] = False  # a teacher missing from a whole row
    return student, teachers, labels, available


@pytest.mark.parametrize("weighting", ["static", "entropy", "correctness", "posterior"])
@pytest.mark.parametrize("granularity", ["token", "sequence", "batch"])
@pytest.mark.parametrize("min_weight", [0.0, 0.1])
def test_masked_weights_match_reference(batch, weighting, granularity, min_weight):
    _, teachers, labels, available = batch
    prior = [0.2, 0.3, 0.5]
    weights = compute_teacher_weights(
        teachers,
        labels,
        temperature=1.3,
        weighting=weighting,
        teacher_weights=prior,
        granularity=granularity,
        min_weight=min_weight,
        teacher_mask=available,
    )
    expected = reference_masked_weights(teachers, labels, available, 1.3, weighting, prior, granularity, min_weight)
    for (k, b, t), w in expected.items():
        assert weights[k, b, t].item() == pytest.approx(w, rel=1e-10, abs=1e-12), (k, b, t)
    assert (weights[~available] == 0).all()


@pytest.mark.parametrize("fusion", ["probability", "logit"])
def test_masked_kd_matches_reference(batch, fusion):
    student, teachers, labels, available = batch
    tau = 1.7
    out = multi_teacher_kd(
        student, teachers, labels, temperature=tau, weighting="entropy", fusion=fusion, teacher_mask=available
    )
    weights = reference_masked_weights(teachers, labels, available, tau, "entropy", [1, 1, 1], "token")
    valid = valid_positions(labels)
    total = 0.0
    for b, t in valid:
        w = [weights[k, b, t] for k in range(K)]
        if sum(w) == 0:
            continue  # no teacher here: no KD term, but the position still counts in N
        if fusion == "probability":
            ps = [softmax([v / tau for v in z[b, t].tolist()]) for z in teachers]
            target = [sum(w[k] * ps[k][v] for k in range(K)) for v in range(V)]
        else:
            target = softmax([sum(w[k] * teachers[k][b, t, v].item() for k in range(K)) / tau for v in range(V)])
        q = softmax([v / tau for v in student[b, t].tolist()])
        total += sum(p * (math.log(p) - math.log(qq)) for p, qq in zip(target, q, strict=True) if p > 0)
    assert out.loss.item() == pytest.approx(tau**2 * total / len(valid), rel=1e-10)


def test_position_without_teachers_has_no_gradient(batch):
    student, teachers, labels, available = batch
    student = student.clone().requires_grad_(True)
    multi_teacher_kd(student, teachers, labels, teacher_mask=available).loss.backward()
    assert (student.grad[2, 3] == 0).all()  # valid, but no teacher is available there
    assert student.grad[2, 4].abs().sum() > 0
    # with the cross-entropy in the same pass, such a position learns from its label alone
    s = student.detach().clone().requires_grad_(True)
    out = multi_teacher_kd(s, teachers, labels, teacher_mask=available, temperature=1.5, alpha_kd=0.5, alpha_ce=0.4)
    out.loss.backward()
    ce_only = student.detach().clone().requires_grad_(True)
    (0.4 * causal_lm_loss(ce_only, labels)).backward()
    torch.testing.assert_close(s.grad[2, 3], ce_only.grad[2, 3], rtol=1e-12, atol=1e-15)
    assert not torch.allclose(s.grad[2, 4], ce_only.grad[2, 4])


def test_full_mask_equals_no_mask(batch):
    student, teachers, labels, _ = batch
    everywhere = torch.ones(K, B, T, dtype=torch.bool)
    for weighting in ("entropy", "posterior"):
        kwargs = dict(temperature=2.0, weighting=weighting, granularity="sequence", min_weight=0.05)
        masked = multi_teacher_kd(student, teachers, labels, teacher_mask=everywhere, **kwargs)
        plain = multi_teacher_kd(student, teachers, labels, **kwargs)
        torch.testing.assert_close(masked.weights, plain.weights, rtol=0, atol=1e-15)
        torch.testing.assert_close(masked.loss, plain.loss, rtol=1e-14, atol=0)


def reference_uld(student, teachers, labels, weights, tau):
    valid = valid_positions(labels)
    total = 0.0
    for b, t in valid:
        q = sorted(softmax([v / tau for v in student[b, t].tolist()]), reverse=True)
        for k, z in enumerate(teachers):
            p = sorted(softmax([v / tau for v in z[b, t].tolist()]), reverse=True)
            width = max(len(p), len(q))
            p, qq = p + [0.0] * (width - len(p)), q + [0.0] * (width - len(q))
            total += weights[k, b, t].item() * sum(abs(a - c) for a, c in zip(p, qq, strict=True))
    return total / len(valid)


def test_uld_matches_reference_across_vocabulary_sizes(batch):
    student, _, labels, available = batch
    g = torch.Generator().manual_seed(2)
    teachers = [torch.randn(B, T, size, generator=g, dtype=torch.float64) * 2 for size in (5, 9, 23)]
    weights = torch.rand(K, B, T, generator=g, dtype=torch.float64) * available
    loss = universal_logit_distillation_loss(student, teachers, labels, weights, temperature=1.5, chunk_size=4)
    assert loss.item() == pytest.approx(reference_uld(student, teachers, labels, weights, 1.5), rel=1e-10)
    s = student[:, :4, :].clone().requires_grad_(True)
    small = [z[:, :4] for z in teachers]
    torch.autograd.gradcheck(
        lambda x: universal_logit_distillation_loss(x, small, labels[:, :4], weights[:, :, :4], temperature=1.5),
        (s,),
    )
