"""`DistillationLoss`: the total alpha_ce L_ce + alpha_kd L_kd + alpha_feat L_feat, assembled in one place."""

import math

import pytest
import torch
from test_losses import random_logits, reference_feature_loss, reference_kd, softmax, valid_positions
from test_teacher_mask import reference_uld

import hf_mtkd.chunked
import hf_mtkd.storage
import hf_mtkd.topk
from hf_mtkd.losses import DistillationLoss, compute_teacher_weights
from hf_mtkd.settings import DistillationSettings


def reference_ce(student, labels):
    valid = valid_positions(labels)
    return -sum(math.log(softmax(student[b, t].tolist())[labels[b, t + 1]]) for b, t in valid) / len(valid)


def test_the_total_is_its_weighted_terms():
    student, teachers, labels, g = random_logits(5)
    labels[0, 4:] = -100
    b, t, _ = student.shape
    student_hidden = torch.randn(b, t, 4, generator=g, dtype=torch.float64)
    teacher_hidden = [torch.randn(b, t, 4, generator=g, dtype=torch.float64) * 3 for _ in teachers]
    pairs = [0, 2, 2]  # (teacher of each pair); teacher 1 has none

    def features(mask):
        return (
            [student_hidden[mask] * (i + 1) for i in range(len(pairs))],
            [teacher_hidden[k][mask] for k in pairs],
            pairs,
        )

    settings = DistillationSettings(temperature=2.0, weighting="static", alpha_ce=0.3, alpha_kd=0.6, alpha_feat=0.2)
    out = DistillationLoss(settings)(student, teachers, labels, features=features)
    uniform = [1 / 3] * 3
    kd = reference_kd(student, teachers, labels, 2.0, "static", 1.0, uniform, "probability", "token")
    mask = out.kd.mask
    student_feats, teacher_feats, _ = features(mask)
    feat = reference_feature_loss(student_feats, teacher_feats, pairs, out.kd.weights[:, mask], "mse", False)
    ce = reference_ce(student, labels)
    assert out.terms["loss_ce"].item() == pytest.approx(ce, rel=1e-10)
    assert out.terms["loss_kd"].item() == pytest.approx(kd, rel=1e-10)
    assert out.terms["loss_feat"].item() == pytest.approx(feat, rel=1e-10)
    assert out.loss.item() == pytest.approx(0.3 * ce + 0.6 * kd + 0.2 * feat, rel=1e-10)


def test_uld_computes_no_kl_and_adds_the_weighted_distance(monkeypatch):
    def no_kl(*args):
        raise AssertionError("the ULD divergence must not compute the fused KL")

    monkeypatch.setattr(DistillationSettings, "kd_divergence", property(no_kl))
    student, teachers, labels, g = random_logits(6)
    labels[1, :2] = -100
    own = [torch.randn(*labels.shape, size, generator=g, dtype=torch.float64) * 2 for size in (5, 9, 23)]
    settings = DistillationSettings(temperature=1.5, divergence="uld", alpha_ce=0.4, alpha_kd=0.6, chunk_size=3)
    loss = DistillationLoss(settings)
    out = loss(student, teachers, labels, own_logits=own)
    weights = compute_teacher_weights(teachers, labels, temperature=1.5)
    uld = reference_uld(student, own, labels, weights, 1.5)
    assert torch.equal(out.kd.weights, weights)
    assert out.terms["loss_kd"].item() == pytest.approx(uld, rel=1e-10)
    assert out.loss.item() == pytest.approx(0.4 * reference_ce(student, labels) + 0.6 * uld, rel=1e-10)
    x = student[:, :4].clone().requires_grad_(True)
    small_teachers, small_own = [z[:, :4] for z in teachers], [z[:, :4] for z in own]
    torch.autograd.gradcheck(lambda s: loss(s, small_teachers, labels[:, :4], own_logits=small_own).loss, (x,))


def test_the_top_k_form_keeps_its_old_names():
    assert hf_mtkd.topk.TopKLogits is hf_mtkd.storage.TopKLogProbs is hf_mtkd.storage.TopKLogits
