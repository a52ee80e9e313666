"""Loss functions against an independent float64 reference written plainly, position by position."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_mtkd.losses import (
    causal_lm_loss,
    compute_teacher_weights,
    feature_alignment_loss,
    multi_teacher_kd,
    multi_teacher_kd_loss,
)
from hf_mtkd.weighting import MIN_TARGET_LOG_PROB

B, T, V, K = 3, 6, 11, 3


def softmax(x):
    e = [math.exp(v - max(x)) for v in x]
    return [v / sum(e) for v in e]


def entropy(p):
    return -sum(v * math.log(v) for v in p if v > 0)


def valid_positions(labels):
    return [(b, t) for b in range(labels.shape[0]) for t in range(labels.shape[1] - 1) if labels[b, t + 1] != -100]


def reference_weights(
    teachers,
    labels,
    tau,
    weighting,
    gamma,
    prior,
    granularity,
    label_gamma=1.0,
    decay=0.9,
    min_weight=0.0,
    position_ids=None,
):
    """w[k, b, t] at the valid positions, from the DESIGN.md formulas and issue 8's label-aware weightings."""
    valid = valid_positions(labels)
    prior = [p / sum(prior) for p in prior]
    document = {}  # (b, t) -> (b, number of packed documents begun in row b up to t)
    for b in range(labels.shape[0]):
        begun = 0
        for t in range(labels.shape[1]):
            begun += int(position_ids is not None and position_ids[b, t] == 0)
            document[b, t] = (b, begun)
    score = {}
    for k, z in enumerate(teachers):
        log_p = {(b, t): math.log(softmax(z[b, t].tolist())[labels[b, t + 1]]) for b, t in valid}
        for b in range(labels.shape[0]):
            running = 0.0
            for t in range(labels.shape[1]):
                if position_ids is not None and position_ids[b, t] == 0:
                    running = 0.0  # a new packed document
                running *= decay
                if (b, t) not in valid:
                    continue
                running += log_p[b, t]
                h = entropy(softmax([v / tau for v in z[b, t].tolist()]))
                whole_document = sum(v for pos, v in log_p.items() if document[pos] == document[b, t])
                score[k, b, t] = {
                    "static": 0.0,
                    "entropy": -h / gamma,
                    "correctness": log_p[b, t] / label_gamma,
                    "posterior": running / label_gamma,
                    "entropy+posterior": -h / gamma + running / label_gamma,
                    "likelihood": whole_document / label_gamma,
                }[weighting]
    pooled = {}
    for k in range(len(teachers)):
        for b, t in valid:
            if granularity == "token":
                group = [(b, t)]
            elif granularity == "sequence":
                group = [(bb, tt) for bb, tt in valid if bb == b]
            else:
                group = valid
            pooled[k, b, t] = sum(score[k, bb, tt] for bb, tt in group) / len(group)
    weights = {}
    for b, t in valid:
        unnorm = [prior[k] * math.exp(pooled[k, b, t]) for k in range(len(teachers))]
        for k in range(len(teachers)):
            weights[k, b, t] = min_weight + (1 - len(teachers) * min_weight) * unnorm[k] / sum(unnorm)
    return weights


def reference_kd(
    student, teachers, labels, tau, weighting, gamma, prior, fusion, granularity, n=None, **weight_options
):
    weights = reference_weights(teachers, labels, tau, weighting, gamma, prior, granularity, **weight_options)
    valid = valid_positions(labels)
    total = 0.0
    for b, t in valid:
        w = [weights[k, b, t] for k in range(len(teachers))]
        if fusion == "probability":
            ps = [softmax([v / tau for v in z[b, t].tolist()]) for z in teachers]
            target = [sum(w[k] * ps[k][v] for k in range(len(teachers))) for v in range(student.shape[-1])]
        else:
            mixed = [sum(w[k] * teachers[k][b, t, v].item() for k in range(len(teachers))) for v in range(V)]
            target = softmax([m / tau for m in mixed])
        q = softmax([v / tau for v in student[b, t].tolist()])
        total += sum(p * (math.log(p) - math.log(qq)) for p, qq in zip(target, q, strict=True) if p > 0)
    return tau**2 * total / (n if n is not None else max(len(valid), 1))


def random_logits(seed, b=B, t=T, v=V):
    """float64 student logits, three teachers of growing sharpness, labels, and the generator (for more draws)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    teachers = [torch.randn(b, t, v, generator=g, dtype=torch.float64) * s for s in (0.5, 2.0, 4.0)]
    return student, teachers, torch.randint(0, v, (b, t), generator=g), g


@pytest.fixture
def batch():
    student, teachers, labels, _ = random_logits(0)
    labels[0, 4:] = -100  # right padding
    labels[1, :3] = -100  # an ignored prompt
    return student, teachers, labels


OPTIONS = [
    (weighting, fusion, granularity)
    for weighting in ("entropy", "static", "correctness", "posterior", "entropy+posterior", "likelihood")
    for fusion in ("probability", "logit")
    for granularity in ("token", "sequence", "batch")
]


@pytest.mark.parametrize(("weighting", "fusion", "granularity"), OPTIONS)
def test_kd_loss_matches_reference(batch, weighting, fusion, granularity):
    student, teachers, labels = batch
    prior = [0.2, 0.3, 0.5]
    kwargs = dict(temperature=1.7, weighting=weighting, entropy_temperature=0.6, teacher_weights=prior)
    loss = multi_teacher_kd_loss(student, teachers, labels, fusion=fusion, granularity=granularity, **kwargs)
    expected = reference_kd(student, teachers, labels, 1.7, weighting, 0.6, prior, fusion, granularity)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("granularity", ["token", "sequence", "batch"])
@pytest.mark.parametrize("weighting", ["entropy", "correctness", "posterior", "entropy+posterior", "likelihood"])
def test_weights_match_reference(batch, weighting, granularity):
    _, teachers, labels = batch
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1], [0, 1, 0, 1, 2, 3]])  # packed documents
    options = dict(
        temperature=1.3, entropy_temperature=0.5, teacher_weights=[1, 1, 2], granularity=granularity, min_weight=0.1
    )
    weights = compute_teacher_weights(
        teachers,
        labels,
        weighting=weighting,
        label_temperature=0.7,
        posterior_decay=0.8,
        position_ids=position_ids,
        **options,
    )
    assert weights.shape == (K, B, T)
    torch.testing.assert_close(weights.sum(0), torch.ones(B, T, dtype=torch.float64))
    assert (weights >= 0.1 - 1e-12).all()
    expected = reference_weights(
        teachers, labels, 1.3, weighting, 0.5, [1, 1, 2], granularity, 0.7, 0.8, 0.1, position_ids
    )
    for (k, b, t), w in expected.items():
        assert weights[k, b, t].item() == pytest.approx(w, rel=1e-10)


def test_granularity_shapes_weights(batch):
    _, teachers, labels = batch
    seq = compute_teacher_weights(teachers, labels, granularity="sequence")
    assert torch.allclose(seq, seq[:, :, :1].expand_as(seq))  # constant along each sequence
    whole = compute_teacher_weights(teachers, labels, granularity="batch")
    assert torch.allclose(whole, whole[:, :1, :1].expand_as(whole))
    token = compute_teacher_weights(teachers, labels, granularity="token", teacher_weights=[0.2, 0.3, 0.5])
    # positions without a next-token label get the prior
    torch.testing.assert_close(token[:, 0, 5], torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))


def test_num_items_in_batch_normalises(batch):
    student, teachers, labels = batch
    n = len(valid_positions(labels))
    own = multi_teacher_kd_loss(student, teachers, labels)
    assert multi_teacher_kd_loss(student, teachers, labels, num_items_in_batch=2 * n).item() == pytest.approx(
        own.item() / 2
    )
    assert multi_teacher_kd_loss(student, teachers, labels, num_items_in_batch=torch.tensor(n)).item() == (
        pytest.approx(own.item())
    )


@pytest.mark.parametrize(("weighting", "fusion", "granularity"), OPTIONS)
def test_gradcheck_student_path(batch, weighting, fusion, granularity):
    student, teachers, labels = batch
    student = student[:2, :4, :7].clone().requires_grad_(True)
    teachers = [t[:2, :4, :7] for t in teachers]
    labels = labels[:2, :4].clamp(max=6)

    def fn(s):
        return multi_teacher_kd_loss(
            s, teachers, labels, temperature=1.5, weighting=weighting, fusion=fusion, granularity=granularity
        )

    assert torch.autograd.gradcheck(fn, (student,))


def test_identical_teachers_get_uniform_weights(batch):
    _, teachers, labels = batch
    weights = compute_teacher_weights([teachers[1]] * 3, labels)
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 3))


def test_confident_teacher_gets_more_weight(batch):
    _, teachers, labels = batch
    sharp, flat = teachers[0] * 10, teachers[0] * 0.1
    mask = labels[:, 1:] != -100
    weights = compute_teacher_weights([flat, sharp], labels, weighting="entropy")[:, :, :-1]
    assert (weights[1][mask] > weights[0][mask]).all()
    routed = compute_teacher_weights([flat, sharp], labels, weighting="entropy", entropy_temperature=0.1)[:, :, :-1]
    assert (routed[1][mask] > 0.99).all()  # a small gamma routes each position to the most certain teacher


def test_static_single_teacher_is_classic_kd(batch):
    student, teachers, labels = batch
    tau = 2.0
    loss = multi_teacher_kd_loss(student, teachers[:1], labels, temperature=tau, weighting="static")
    mask = labels[:, 1:] != -100
    s, t = student[:, :-1][mask], teachers[0][:, :-1][mask]
    classic = F.kl_div(F.log_softmax(s / tau, -1), F.softmax(t / tau, -1), reduction="batchmean") * tau**2
    torch.testing.assert_close(loss, classic)


def test_probability_and_logit_fusion_differ_as_they_should():
    # two teachers each sure of a different token: averaging probabilities keeps both modes, averaging logits
    # gives the normalised geometric mean.
    a = torch.tensor([[[4.0, 0.0, 0.0]]], dtype=torch.float64)
    b = torch.tensor([[[0.0, 4.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[0, 1]])
    two = [torch.cat([a, a], 1), torch.cat([b, b], 1)]
    student = torch.zeros(1, 2, 3, dtype=torch.float64)
    pa, pb = F.softmax(a[0, 0], -1), F.softmax(b[0, 0], -1)
    prob_target = (pa + pb) / 2
    logit_target = F.softmax((a[0, 0] + b[0, 0]) / 2, -1)
    uniform = torch.full((3,), 1 / 3, dtype=torch.float64)
    for fusion, target in (("probability", prob_target), ("logit", logit_target)):
        loss = multi_teacher_kd_loss(student, two, labels, weighting="static", fusion=fusion)
        expected = (target * (target.log() - uniform.log())).sum()
        torch.testing.assert_close(loss, expected)
    # the mixture keeps both modes sharp; the geometric mean of two disagreeing teachers is flatter
    assert prob_target[2].item() == pytest.approx(1 / (math.e**4 + 2))
    assert logit_target[2].item() == pytest.approx(1 / (2 * math.e**2 + 1))


def test_masked_positions_are_ignored(batch):
    student, teachers, labels = batch
    loss = multi_teacher_kd_loss(student, teachers, labels)
    mask = F.pad(labels[:, 1:] != -100, (0, 1), value=False)
    garbage = [t.masked_fill(~mask[..., None], float("nan")) for t in teachers]
    student_garbage = student.masked_fill(~mask[..., None], 1e6)
    torch.testing.assert_close(multi_teacher_kd_loss(student_garbage, garbage, labels), loss)


def test_all_masked_batch_is_zero_with_a_graph(batch):
    student, teachers, labels = batch
    student = student.float().requires_grad_(True)
    masked = torch.full_like(labels, -100)
    out = multi_teacher_kd(student, [t.float() for t in teachers], masked)
    ce = causal_lm_loss(student, masked)
    for loss in (out.loss, ce):
        assert loss.item() == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(grad).all() and (grad == 0).all()


def test_float32_is_stable_with_huge_logits(batch):
    student, teachers, labels = batch
    big = [t.float() * 1e4 for t in teachers]
    loss = multi_teacher_kd_loss(student.float() * 1e4, big, labels, temperature=0.5)
    assert torch.isfinite(loss)
    half = multi_teacher_kd_loss(student.bfloat16(), [t.bfloat16() for t in teachers], labels)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, multi_teacher_kd_loss(student, teachers, labels).float(), rtol=0.05, atol=0.05)


def test_mismatched_vocabularies_are_refused(batch):
    student, teachers, labels = batch
    with pytest.raises(ValueError, match=r"Teacher 1 logits have shape \(3, 6, 12\)"):
        multi_teacher_kd_loss(student, [teachers[0], F.pad(teachers[1], (0, 1))], labels)
    with pytest.raises(ValueError, match="at least one teacher"):
        multi_teacher_kd_loss(student, [], labels)


def test_causal_lm_loss_matches_reference(batch):
    student, _, labels = batch
    total = 0.0
    valid = valid_positions(labels)
    for b, t in valid:
        total -= math.log(softmax(student[b, t].tolist())[labels[b, t + 1]])
    assert causal_lm_loss(student, labels).item() == pytest.approx(total / len(valid), rel=1e-10)


def standardise(v):
    mean = sum(v) / len(v)
    var = sum((x - mean) ** 2 for x in v) / len(v)
    return [(x - mean) / math.sqrt(var + 1e-5) for x in v]


def reference_feature_loss(student_feats, teacher_feats, pair_teachers, weights, kind, normalize):
    n = weights.shape[1]
    total = 0.0
    for i in range(n):
        num = den = 0.0
        for k in sorted(set(pair_teachers)):
            ds = []
            for s, t, kk in zip(student_feats, teacher_feats, pair_teachers, strict=True):
                if kk != k:
                    continue
                a, b = s[i].tolist(), t[i].tolist()
                b = standardise(b) if normalize else b
                if kind == "mse":
                    ds.append(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / len(a))
                else:
                    dot = sum(x * y for x, y in zip(a, b, strict=True))
                    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
                    ds.append(1 - dot / norm)
            num += weights[k, i].item() * sum(ds) / len(ds)
            den += weights[k, i].item()
        total += num / den
    return total / n


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_loss_matches_reference_and_gradcheck(kind, normalize):
    g = torch.Generator().manual_seed(1)
    n, widths, pair_teachers = 5, [4, 6, 6, 3], [0, 2, 2, 0]  # teacher 1 has no pair
    student = [torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True) for d in widths]
    teacher = [torch.randn(n, d, generator=g, dtype=torch.float64) * 30 + 5 for d in widths]
    weights = torch.softmax(torch.randn(3, n, generator=g, dtype=torch.float64), 0)
    options = dict(kind=kind, normalize_targets=normalize)
    loss = feature_alignment_loss(student, teacher, pair_teachers, weights, **options)
    expected = reference_feature_loss(student, teacher, pair_teachers, weights, kind, normalize)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert torch.autograd.gradcheck(
        lambda *s: feature_alignment_loss(list(s), teacher, pair_teachers, weights, **options), tuple(student)
    )
    with pytest.raises(ValueError, match="no layer pairs"):
        feature_alignment_loss([], [], [], weights)


def test_correctness_follows_the_teacher_that_predicts_the_labels(batch):
    *_, labels = batch
    targets = F.pad(labels[:, 1:], (0, 1), value=0).clamp(min=0)
    right = F.one_hot(targets, V).double() * 3.0  # puts its mass on the true next token
    wrong = right.roll(1, dims=-1) * 3  # sharper, and always on the wrong token
    mask = labels[:, 1:] != -100
    by_entropy = compute_teacher_weights([right, wrong], labels, weighting="entropy")[:, :, :-1]
    assert (by_entropy[1][mask] > 0.5).all()  # entropy trusts the confident one
    for weighting in ("correctness", "posterior", "likelihood"):
        weights = compute_teacher_weights([right, wrong], labels, weighting=weighting)[:, :, :-1]
        assert (weights[0][mask] > 0.99).all(), weighting


def test_posterior_does_not_leak_across_rows_or_documents(batch):
    _, teachers, labels = batch
    packed = labels[2:3]  # one row holding two documents: tokens 0-1 and 2-5
    position_ids = torch.tensor([[0, 1, 0, 1, 2, 3]])
    args = dict(weighting="posterior", posterior_decay=1.0, position_ids=position_ids)
    together = compute_teacher_weights([t[2:3] for t in teachers], packed, **args)
    alone = compute_teacher_weights(
        [t[2:3, 2:] for t in teachers], packed[:, 2:], weighting="posterior", posterior_decay=1.0
    )
    torch.testing.assert_close(together[:, :, 2:5], alone[:, :, :3])
    # changing another row's labels does not move this row's weights
    other = labels.clone()
    other[0, 1:4] = (other[0, 1:4] + 1) % V
    first = compute_teacher_weights(teachers, labels, weighting="posterior")
    second = compute_teacher_weights(teachers, other, weighting="posterior")
    torch.testing.assert_close(first[:, 1:], second[:, 1:])
    assert not torch.allclose(first[:, 0], second[:, 0])


@pytest.mark.parametrize("scan_block", [3, 256])
@pytest.mark.parametrize("chunk_size", [1, 2, 5, None])
@pytest.mark.parametrize("weighting", ["posterior", "entropy+posterior"])
def test_weights_along_a_document_carry_across_chunks(monkeypatch, weighting, chunk_size, scan_block):
    """
    `posterior` at `token` granularity is made in the loss's one pass, chunk by chunk, its running sums carried
    from chunk to chunk (and from block to block inside a chunk): the loss is the reference's for every cut, with
    packed documents, a prompt and padding, and no first pass reads the teachers.
    """
    monkeypatch.setattr("hf_mtkd.weighting.SCAN_BLOCK", scan_block)
    first_passes = []
    monkeypatch.setattr("hf_mtkd.losses.teacher_statistics", lambda *args, **kwargs: first_passes.append(args))
    student, teachers, labels, _ = random_logits(3, b=2, t=12)
    labels[0, 9:] = -100  # right padding
    labels[1, :2] = -100  # an ignored prompt
    position_ids = torch.tensor([list(range(12)), [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])  # packed documents
    options = dict(label_temperature=0.7, posterior_decay=0.8, min_weight=0.05, position_ids=position_ids)
    loss = multi_teacher_kd_loss(
        student,
        teachers,
        labels,
        temperature=1.3,
        weighting=weighting,
        entropy_temperature=0.6,
        teacher_weights=[1, 2, 3],
        chunk_size=chunk_size,
        **options,
    )
    expected = reference_kd(
        student,
        teachers,
        labels,
        1.3,
        weighting,
        0.6,
        [1, 2, 3],
        "probability",
        "token",
        label_gamma=0.7,
        decay=0.8,
        min_weight=0.05,
        position_ids=position_ids,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert first_passes == []


@pytest.mark.parametrize(("weighting", "granularity"), [("likelihood", "token"), ("posterior", "sequence")])
def test_weights_that_read_later_positions_take_a_first_pass(monkeypatch, weighting, granularity):
    import hf_mtkd.losses

    first_passes = []
    statistics = hf_mtkd.losses.teacher_statistics

    def counted(*args, **kwargs):
        first_passes.append(args)
        return statistics(*args, **kwargs)

    monkeypatch.setattr("hf_mtkd.losses.teacher_statistics", counted)
    student, teachers, labels, _ = random_logits(4)
    loss = multi_teacher_kd_loss(student, teachers, labels, weighting=weighting, granularity=granularity, chunk_size=2)
    expected = reference_kd(student, teachers, labels, 1.0, weighting, 1.0, [1, 1, 1], "probability", granularity)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert len(first_passes) == 1


@pytest.mark.parametrize("weighting", ["correctness", "posterior", "entropy+posterior", "likelihood"])
def test_a_token_no_teacher_can_produce_bounds_the_evidence(weighting):
    """
    A true token that a teacher gives probability 0 (logit -inf: a padding row, an unmapped token) counts as
    log p = MIN_TARGET_LOG_PROB: where every teacher gives it 0 the weights stay finite, and a teacher that gave it 0
    once is not silenced for the rest of the document (`posterior` forgets it at the rate λ).
    """
    length, vocab = 48, 16
    labels = torch.randint(0, vocab - 1, (1, length), generator=torch.Generator().manual_seed(0))
    labels[0, 1] = vocab - 1  # the first next-token target: a token...
    logits = torch.zeros(1, length, vocab, dtype=torch.float64)
    both = [logits.clone(), logits.clone()]
    for z in both:
        z[0, 0, vocab - 1] = -torch.inf  # ...that neither teacher can produce
    weights = compute_teacher_weights(both, labels, weighting=weighting)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights[:, 0, :-1], torch.full((2, length - 1), 0.5, dtype=torch.float64))
    one = [logits.clone(), logits.clone()]
    one[1][0, 0, vocab - 1] = -torch.inf  # only the second teacher cannot; otherwise the two are the same
    weights = compute_teacher_weights(one, labels, weighting=weighting)
    floor = MIN_TARGET_LOG_PROB - math.log(1 / vocab)  # the second teacher's evidence against the first at t = 0
    if weighting in ("correctness", "posterior"):
        first = torch.sigmoid(torch.tensor(floor, dtype=torch.float64))
        torch.testing.assert_close(weights[1, 0, 0], first, rtol=1e-9, atol=0)
    if weighting in ("posterior", "entropy+posterior"):  # forgotten at λ = 0.9 per position
        late = torch.sigmoid(torch.tensor(0.9 ** (length - 2) * floor, dtype=torch.float64))
        torch.testing.assert_close(weights[1, 0, length - 2], late, rtol=1e-9, atol=0)
        assert weights[1, 0, length - 2] > 0.4
    if weighting == "correctness":
        torch.testing.assert_close(weights[1, 0, 1:-1], torch.full((length - 2,), 0.5, dtype=torch.float64))


@pytest.mark.parametrize(("weighting", "fusion", "granularity"), OPTIONS)
def test_chunked_loss_equals_unchunked(batch, weighting, fusion, granularity):
    student, teachers, labels = batch
    options = dict(weighting=weighting, fusion=fusion, granularity=granularity, temperature=1.5)
    results = []
    for chunk_size in (None, 1, 4):
        s = student.clone().requires_grad_(True)
        loss = multi_teacher_kd_loss(s, teachers, labels, chunk_size=chunk_size, **options)
        (grad,) = torch.autograd.grad(loss, s)
        weighting_options = {k: v for k, v in options.items() if k != "fusion"}
        weights = compute_teacher_weights(teachers, labels, chunk_size=chunk_size, **weighting_options)
        results.append((loss, grad, weights))
    for loss, grad, weights in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(weights, results[0][2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_in_low_precision_matches_float64(batch, dtype):
    student, teachers, labels = batch
    exact = multi_teacher_kd_loss(student, teachers, labels, chunk_size=None)
    s = student.to(dtype).requires_grad_(True)
    loss = multi_teacher_kd_loss(s, [t.to(dtype) for t in teachers], labels, chunk_size=3)
    assert loss.dtype == torch.float32
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(loss.double(), exact, rtol=tolerance, atol=tolerance)
    loss.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()


def plain_distillation(student, teachers, labels, weights, tau, fusion, alpha_kd, alpha_ce):
    """alpha_kd * L_kd + alpha_ce * L_ce written with whole-batch torch ops, for autograd to differentiate."""
    valid = valid_positions(labels)
    kd, ce = 0.0, 0.0
    for b, t in valid:
        w = torch.tensor([weights[k, b, t] for k in range(len(teachers))], dtype=torch.float64)
        zs = torch.stack([z[b, t] for z in teachers])
        if fusion == "probability":
            target = (w[:, None] * torch.softmax(zs / tau, dim=-1)).sum(0)
        else:
            target = torch.softmax((w[:, None] * zs).sum(0) / tau, dim=-1)
        kd = kd + (target * (target.log() - torch.log_softmax(student[b, t] / tau, dim=-1))).sum()
        ce = ce - torch.log_softmax(student[b, t], dim=-1)[labels[b, t + 1]]
    return alpha_kd * tau**2 * kd / len(valid) + alpha_ce * ce / len(valid)


FUSED_OPTIONS = [("entropy", "token"), ("correctness", "token"), ("posterior", "token"), ("entropy", "sequence")]


@pytest.mark.parametrize("fusion", ["probability", "logit"])
@pytest.mark.parametrize(("weighting", "granularity"), FUSED_OPTIONS)
@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_fused_ce_and_kd_match_the_two_losses(batch, tau, weighting, granularity, fusion):
    student, teachers, labels = batch
    options = dict(temperature=tau, weighting=weighting, granularity=granularity, fusion=fusion)
    s = student.clone().requires_grad_(True)
    out = multi_teacher_kd(s, teachers, labels, alpha_kd=0.7, alpha_ce=0.4, chunk_size=4, **options)
    expected_kd = reference_kd(student, teachers, labels, tau, weighting, 1.0, [1, 1, 1], fusion, granularity)
    valid = valid_positions(labels)
    expected_ce = -sum(math.log(softmax(student[b, t].tolist())[labels[b, t + 1]]) for b, t in valid) / len(valid)
    assert out.loss_kd.item() == pytest.approx(expected_kd, rel=1e-10)
    assert out.loss_ce.item() == pytest.approx(expected_ce, rel=1e-10)
    assert out.loss.item() == pytest.approx(0.7 * expected_kd + 0.4 * expected_ce, rel=1e-10)
    assert not out.loss_kd.requires_grad and not out.loss_ce.requires_grad
    (grad,) = torch.autograd.grad(out.loss, s)
    weights = reference_weights(teachers, labels, tau, weighting, 1.0, [1, 1, 1], granularity)
    r = student.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(plain_distillation(r, teachers, labels, weights, tau, fusion, 0.7, 0.4), r)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 1.5])
def test_gradcheck_fused_ce_and_kd(batch, tau):
    student, teachers, labels = batch
    student = student[:2, :4, :7].clone().requires_grad_(True)
    teachers = [t[:2, :4, :7] for t in teachers]
    labels = labels[:2, :4].clamp(max=6)

    def fn(s):
        return multi_teacher_kd(s, teachers, labels, temperature=tau, alpha_kd=0.6, alpha_ce=0.3).loss

    assert torch.autograd.gradcheck(fn, (student,))


def test_upstream_gradient_scales_the_fused_gradient(batch):
    student, teachers, labels = batch
    s = student.clone().requires_grad_(True)
    out = multi_teacher_kd(s, teachers, labels, temperature=1.5, alpha_ce=0.5)
    (once,) = torch.autograd.grad(out.loss, s, retain_graph=True)
    (scaled,) = torch.autograd.grad(-2.5 * out.loss, s)
    torch.testing.assert_close(scaled, -2.5 * once)
    assert out.loss_ce is not None
    assert multi_teacher_kd(s, teachers, labels).loss_ce is None  # no alpha_ce: no cross-entropy


def test_chunks_are_views_of_the_valid_runs():
    from hf_mtkd.chunked import chunks as _chunks

    mask = torch.tensor([[True, True, False, False], [False, True, True, False]])
    chunks = _chunks(mask, 3, vocab_size=10)
    # flat positions 0 1 | 5 6: a run never starts or ends on an invalid position, and never exceeds 3
    assert [(c.rows.start, c.rows.stop, c.all_valid) for c in chunks] == [(0, 2, True), (5, 7, True)]
    wide = _chunks(mask, 7, vocab_size=10)
    assert [(c.rows.start, c.rows.stop, c.all_valid) for c in wide] == [(0, 7, False)]
    assert wide[0].valid.tolist() == [True, True, False, False, False, True, True]
    assert _chunks(torch.zeros(2, 3, dtype=torch.bool), None, 10) == []
