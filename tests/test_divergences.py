"""
The divergences of the fused target (reverse KL, generalized JSD, skew KLs) against a plain float64 reference, by
gradcheck, logit-free and on top-k teachers, against TRL's GKD loss, and their config fields.
"""

import pytest
import torch
from trainer_helpers import make_trainer

from hf_mtkd import MultiTeacherDistillationConfig
from hf_mtkd.divergences import LOG_PROB_FLOOR, ForwardKL, ReverseKL, SkewKL, SkewReverseKL, divergence
from hf_mtkd.fusion import DenseTarget
from hf_mtkd.logit_free import HeadLogits
from hf_mtkd.losses import compute_teacher_weights, multi_teacher_kd, multi_teacher_kd_loss
from hf_mtkd.settings import DistillationSettings
from hf_mtkd.storage import TopKLogProbs

B, T, V = 3, 6, 11
DIVERGENCES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.9}),
    ("skew_kl", {"skew_alpha": 0.1}),
    ("skew_kl", {"skew_alpha": 0.6}),
    ("skew_reverse_kl", {"skew_alpha": 0.1}),
    ("skew_reverse_kl", {"skew_alpha": 0.6}),
]
IDS = [name + "".join(f"-{v}" for v in kwargs.values()) for name, kwargs in DIVERGENCES]


def kl(a, b):
    """KL(a || b) per row of two probability tensors, 0 log 0 = 0."""
    return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(dim=-1)


def reference_divergence(p, q, name, beta=0.5, skew_alpha=0.1):
    """D(p, q) `[...]` from the definitions."""
    if name == "forward_kl" or (name == "jsd" and beta == 0):
        return kl(p, q)
    if name == "reverse_kl" or (name == "jsd" and beta == 1):
        return kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skew_kl":
        return kl(p, skew_alpha * p + (1 - skew_alpha) * q)
    return kl(q, (1 - skew_alpha) * p + skew_alpha * q)


def reference_loss(student, teachers, labels, weights, tau, fusion, name, **kwargs):
    """tau^2 * mean over the valid positions of D(fused target, q), on the whole tensors."""
    valid = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100) != -100
    if fusion == "probability":
        target = sum(w[..., None] * torch.softmax(z / tau, dim=-1) for w, z in zip(weights, teachers, strict=True))
    else:
        target = torch.softmax(sum(w[..., None] * z for w, z in zip(weights, teachers, strict=True)) / tau, dim=-1)
    q = torch.softmax(student / tau, dim=-1)
    return tau**2 * reference_divergence(target, q, name, **kwargs)[valid].sum() / valid.sum().clamp(min=1)


def random_batch(seed, num_teachers=3):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teachers = [torch.randn(B, T, V, generator=g, dtype=torch.float64) * s for s in (0.5, 2.0, 4.0)[:num_teachers]]
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 4:] = -100  # right padding
    labels[1, :3] = -100  # an ignored prompt
    return student, teachers, labels


@pytest.mark.parametrize(("name", "kwargs"), DIVERGENCES, ids=IDS)
@pytest.mark.parametrize("fusion", ["probability", "logit"])
@pytest.mark.parametrize("num_teachers", [1, 3])
@pytest.mark.parametrize(("weighting", "granularity"), [("entropy", "token"), ("posterior", "sequence")])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_loss_and_gradient_match_the_reference(name, kwargs, fusion, num_teachers, weighting, granularity, tau):
    student, teachers, labels = random_batch(0, num_teachers)
    settings = dict(temperature=tau, weighting=weighting, granularity=granularity, fusion=fusion, chunk_size=4)
    x = student.clone().requires_grad_(True)
    ours = multi_teacher_kd_loss(x, teachers, labels, divergence=name, **kwargs, **settings)
    (grad,) = torch.autograd.grad(ours, x)
    weights = compute_teacher_weights(teachers, labels, temperature=tau, weighting=weighting, granularity=granularity)
    y = student.clone().requires_grad_(True)
    reference = reference_loss(y, teachers, labels, weights, tau, fusion, name, **kwargs)
    (reference_grad,) = torch.autograd.grad(reference, y)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-10, abs=1e-12)
    assert torch.allclose(grad, reference_grad, rtol=1e-9, atol=1e-12), (grad - reference_grad).abs().max()


@pytest.mark.parametrize(("name", "kwargs"), DIVERGENCES, ids=IDS)
def test_the_divergences_differ_from_each_other(name, kwargs):
    """Each one is its own quantity: the reference of every other divergence gives another value."""
    student, teachers, labels = random_batch(1)
    ours = multi_teacher_kd_loss(student, teachers, labels, temperature=1.5, divergence=name, **kwargs)
    weights = compute_teacher_weights(teachers, labels, temperature=1.5)
    for other, other_kwargs in DIVERGENCES:
        if (other, other_kwargs) != (name, kwargs):
            value = reference_loss(student, teachers, labels, weights, 1.5, "probability", other, **other_kwargs)
            assert abs(ours.item() - value.item()) > 1e-3, other


@pytest.mark.parametrize(("name", "kwargs"), DIVERGENCES, ids=IDS)
@pytest.mark.parametrize("alpha_ce", [None, 0.3])
def test_gradcheck(name, kwargs, alpha_ce):
    student, teachers, labels = random_batch(2, num_teachers=2)
    student, teachers, labels = student[:, :4], [z[:, :4] for z in teachers], labels[:, :4]
    x = student.clone().requires_grad_(True)

    def loss(s):
        return multi_teacher_kd(
            s, teachers, labels, temperature=1.3, divergence=name, **kwargs, alpha_ce=alpha_ce, chunk_size=3
        ).loss

    assert torch.autograd.gradcheck(loss, (x,))


@pytest.mark.parametrize(("name", "kwargs"), DIVERGENCES, ids=IDS)
def test_logit_free_equals_the_logits_path(name, kwargs):
    g = torch.Generator().manual_seed(3)
    d = 5
    hidden = torch.randn(B, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    _, teachers, labels = random_batch(3, num_teachers=2)
    settings = dict(temperature=1.7, weighting="entropy", chunk_size=3, alpha_ce=0.4, divergence=name, **kwargs)
    dense = multi_teacher_kd(hidden @ head.T, teachers, labels, **settings)
    dense_grads = torch.autograd.grad(dense.loss, (hidden, head))
    free = multi_teacher_kd(HeadLogits.at_valid(hidden, labels, head), teachers, labels, **settings)
    free_grads = torch.autograd.grad(free.loss, (hidden, head))
    assert torch.allclose(dense.loss, free.loss, rtol=0, atol=1e-12)
    for a, b in zip(dense_grads, free_grads, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), (a - b).abs().max()


@pytest.mark.parametrize(("name", "kwargs"), DIVERGENCES, ids=IDS)
@pytest.mark.parametrize("fusion", ["probability", "logit"])
def test_top_k_teachers_equal_their_dense_distribution(name, kwargs, fusion):
    """Cached top-k teachers give the loss of the distribution they stand for (top-k, tail spread evenly)."""
    student, teachers, labels = random_batch(4, num_teachers=2)
    cached = [TopKLogProbs.from_logits(z, k=3) for z in teachers]
    dense = [c.dense(slice(None)).view(B, T, V) for c in cached]
    settings = dict(temperature=1.5, fusion=fusion, chunk_size=5, divergence=name, **kwargs)
    x, y = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    sparse_loss = multi_teacher_kd_loss(x, cached, labels, **settings)
    dense_loss = multi_teacher_kd_loss(y, dense, labels, **settings)
    assert sparse_loss.item() == pytest.approx(dense_loss.item(), rel=1e-10)
    assert torch.allclose(torch.autograd.grad(sparse_loss, x)[0], torch.autograd.grad(dense_loss, y)[0], atol=1e-12)


def test_limits_give_the_two_kls():
    """The formulas at alpha = 0 are the KLs themselves (beta = 0 and 1 are mapped to the KLs, as in GKD)."""
    g = torch.Generator().manual_seed(5)
    log_q = torch.log_softmax(torch.randn(4, V, generator=g, dtype=torch.float64), dim=-1)
    log_p = torch.log_softmax(torch.randn(4, V, generator=g, dtype=torch.float64) * 3, dim=-1)
    target = DenseTarget(log_p.exp(), log_p, (log_p.exp() * log_p).sum(dim=-1))
    scale = torch.full((4, 1), 0.7, dtype=torch.float64)
    for skewed, plain in ((SkewKL(0.0), ForwardKL()), (SkewReverseKL(0.0), ReverseKL())):
        for a, b in zip(skewed(log_q, target, scale), plain(log_q, target, scale), strict=True):
            assert torch.allclose(a, b, atol=1e-12)
    assert isinstance(divergence("jsd", beta=0.0), ForwardKL)
    assert isinstance(divergence("jsd", beta=1.0), ReverseKL)


def test_zero_target_probabilities_are_floored_not_infinite():
    """A token no teacher can produce (a padding row, logit -inf) costs the reverse KL a large finite amount."""
    student, teachers, labels = random_batch(6, num_teachers=2)
    for z in teachers:
        z[..., -2:] = -torch.inf
    x = student.clone().requires_grad_(True)
    for name in ("reverse_kl", "jsd", "skew_kl", "skew_reverse_kl"):
        loss = multi_teacher_kd_loss(x, teachers, labels, divergence=name)
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), name
    reverse = multi_teacher_kd_loss(student, teachers, labels, divergence="reverse_kl")
    q = torch.softmax(student, dim=-1)
    valid = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100) != -100
    padding_cost = (q[..., -2:] * (q[..., -2:].log() - LOG_PROB_FLOOR)).sum(dim=-1)[valid].mean()
    assert reverse.item() > padding_cost.item() > 10  # the floor dominates, as documented


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_one_teacher_equals_trl_generalized_jsd(beta, tau):
    gkd = pytest.importorskip("trl.experimental.gkd")
    student, teachers, labels = random_batch(7, num_teachers=1)
    ours = multi_teacher_kd_loss(student, teachers, labels, temperature=tau, divergence="jsd", beta=beta)
    theirs = gkd.GKDTrainer.generalized_jsd_loss(
        student[:, :-1], teachers[0][:, :-1], labels=labels[:, 1:], beta=beta, temperature=tau
    )
    assert ours.item() / tau**2 == pytest.approx(theirs.item(), rel=1e-10)


def config(tmp_path, **fields):
    return MultiTeacherDistillationConfig(output_dir=str(tmp_path), report_to="none", **fields)


def test_config_selects_the_divergence_as_gkd_does(tmp_path):
    assert config(tmp_path).divergence == "forward_kl"
    assert config(tmp_path, beta=0.3).divergence == "jsd"
    settings = DistillationSettings.from_config(config(tmp_path, beta=0.3))
    assert (settings.divergence, settings.beta) == ("jsd", 0.3)
    settings = DistillationSettings.from_config(config(tmp_path, divergence="skew_reverse_kl"))
    assert (settings.divergence, settings.skew_alpha) == ("skew_reverse_kl", 0.1)
    assert isinstance(settings.kd_divergence, SkewReverseKL)


def test_the_former_name_of_the_forward_kl_is_named_in_the_error():
    with pytest.raises(ValueError, match=r"Unknown divergence 'kl' \(`kl` is now `forward_kl`\)"):
        DistillationSettings(divergence="kl")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"divergence": "tvd"}, r"Unknown `divergence` 'tvd'; choose one of \['forward_kl', "),
        ({"divergence": "uld"}, "ULD is `cross_tokenizer_loss='uld'`"),
        ({"divergence": "reverse_kl", "beta": 0.5}, r"`beta` has no effect with `divergence='reverse_kl'`"),
        ({"divergence": "jsd", "skew_alpha": 0.5}, r"`skew_alpha` has no effect with `divergence='jsd'`.*'skew_kl'"),
        ({"beta": 1.5}, r"`beta` \(of the generalized JSD\) must be in \[0, 1\], got 1.5"),
        ({"divergence": "skew_kl", "skew_alpha": 1.0}, r"`skew_alpha` .* must be in \[0, 1\), got 1.0"),
    ],
)
def test_config_refuses_what_does_not_fit(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **fields)


def test_uld_with_another_divergence_is_refused(tmp_path):
    """ULD replaces the fused divergence with cross-tokenizer teachers: a divergence chosen besides is refused."""
    args = config(tmp_path, divergence="reverse_kl", cross_tokenizer_loss="uld")
    assert DistillationSettings.from_config(args).divergence == "reverse_kl"  # no cross-tokenizer teacher: it applies
    with pytest.raises(ValueError, match=r"`divergence='reverse_kl'` has no effect with `cross_tokenizer_loss='uld'`"):
        DistillationSettings.from_config(args, cross_tokenizer=True)
    plain = DistillationSettings.from_config(config(tmp_path, cross_tokenizer_loss="uld"), cross_tokenizer=True)
    assert plain.divergence == "uld"


def test_float32_mixture_log_stays_exact_where_every_teacher_underflows():
    """Two teachers both give a token e^-120 (0 in float32): the reverse KL reads log p = -120, not the floor."""
    student, teachers, labels = random_batch(8, num_teachers=2)
    for z in teachers:
        z[..., 0] = z[..., 1:].max(dim=-1).values - 120
    reference = multi_teacher_kd_loss(student, teachers, labels, divergence="reverse_kl")  # float64: no underflow
    low = multi_teacher_kd_loss(student.float(), [z.float() for z in teachers], labels, divergence="reverse_kl")
    assert low.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize(("name", "kwargs"), [("reverse_kl", {}), ("jsd", {"beta": 0.3})])
def test_the_trainer_trains_on_the_configured_divergence(
    tmp_path, make_student, teacher_dirs, dataset, tokenizer, name, kwargs
):
    trainer = make_trainer(tmp_path, make_student(), teacher_dirs[:2], dataset, tokenizer, divergence=name, **kwargs)
    batch = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(3)]))
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        student = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teachers = [
            t(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits for t in trainer.teachers
        ]
    expected = multi_teacher_kd(
        student, teachers, batch["labels"], temperature=2.0, divergence=name, **kwargs, alpha_kd=0.5, alpha_ce=0.5
    )
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    forward = multi_teacher_kd(student, teachers, batch["labels"], temperature=2.0, alpha_kd=0.5, alpha_ce=0.5)
    assert abs(loss.item() - forward.loss.item()) > 1e-3  # not the forward KL
