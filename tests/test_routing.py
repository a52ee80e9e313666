"""Routing by a dataset column: the per-row prior in the weights and the loss, against plain float64 references."""

import json
import math

import pytest
import torch
from datasets import Dataset
from test_losses import random_logits, valid_positions
from test_teacher_mask import reference_masked_weights
from trainer_helpers import tiny_config

from hf_mtkd import MultiTeacherDistillationTrainer, cache_teacher_logits
from hf_mtkd.losses import compute_teacher_weights, multi_teacher_kd, multi_teacher_kd_loss
from hf_mtkd.routing import RoutingCollator, routing_prior
from hf_mtkd.teachers import load_teachers
from hf_mtkd.testing import tiny_causal_lm
from hf_mtkd.topk import TopKLogits

B, T, V, K = 4, 6, 11, 3
ROW_PRIORS = [
    [0.0, 1.0, 0.0],  # one-hot: routed to teacher 1 by hand
    [0.5, 0.0, 0.5],  # two teachers
    [0.2, 0.5, 0.3],  # a float prior
    [1 / 3, 1 / 3, 1 / 3],  # uniform
]
WEIGHTINGS = ["static", "entropy", "correctness", "posterior", "entropy+posterior"]
GRANULARITIES = ["token", "sequence", "batch"]


def reference_routed_weights(teachers, labels, tau, weighting, prior, row_prior, granularity, min_weight=0.0):
    """
    w[k, b, t] at the valid positions: w_k ∝ prior_k * row_prior[b][k] * exp(pooled score); a teacher with
    row_prior 0 has weight 0 in that row and its scores there are left out of the pools (like an unavailable one).
    """
    routed = torch.tensor(row_prior).T[:, :, None].expand(-1, -1, labels.shape[1]) > 0
    return reference_masked_weights(
        teachers, labels, routed, tau, weighting, prior, granularity, min_weight, row_prior=row_prior
    )


@pytest.fixture
def batch():
    student, teachers, labels, _ = random_logits(2, B, T, V)
    labels[0, 4:] = -100  # right padding
    labels[2, :2] = -100  # an ignored prompt
    return student, teachers, labels


@pytest.mark.parametrize("min_weight", [0.0, 0.1])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_routed_weights_match_reference(batch, weighting, granularity, min_weight):
    _, teachers, labels = batch
    prior = [1.0, 2.0, 1.0]
    options = dict(temperature=1.3, weighting=weighting, teacher_weights=prior, granularity=granularity)
    weights = compute_teacher_weights(
        teachers, labels, teacher_prior=torch.tensor(ROW_PRIORS, dtype=torch.float64), min_weight=min_weight, **options
    )
    assert not weights.isnan().any()
    expected = reference_routed_weights(teachers, labels, 1.3, weighting, prior, ROW_PRIORS, granularity, min_weight)
    for (k, b, t), w in expected.items():
        if ROW_PRIORS[b][k] == 0:
            assert weights[k, b, t].item() == 0.0  # exactly
        else:
            assert weights[k, b, t].item() == pytest.approx(w, rel=1e-10)
    # a row routed to one teacher gives it everything, whatever the weighting
    valid_row0 = [t for b, t in valid_positions(labels) if b == 0]
    assert weights[1, 0, valid_row0].tolist() == [1.0] * len(valid_row0)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_uniform_prior_changes_nothing_exactly(batch, weighting, granularity):
    student, teachers, labels = batch
    options = dict(temperature=1.3, weighting=weighting, granularity=granularity, min_weight=0.05)
    uniform = torch.full((B, K), 1 / K)
    torch.testing.assert_close(
        compute_teacher_weights(teachers, labels, teacher_prior=uniform, **options),
        compute_teacher_weights(teachers, labels, **options),
        rtol=0,
        atol=0,
    )
    results = []
    for teacher_prior in (uniform, None):
        s = student.clone().requires_grad_(True)
        out = multi_teacher_kd(s, teachers, labels, teacher_prior=teacher_prior, alpha_ce=0.3, chunk_size=4, **options)
        results.append((out.loss, *torch.autograd.grad(out.loss, s)))
    for routed, plain in zip(*results, strict=True):
        torch.testing.assert_close(routed, plain, rtol=0, atol=0)


def single_teacher_sum(student, teachers, labels, routes, **options):
    """Σ_b (the single-teacher loss of row b with its routed teacher), each over the whole batch's N positions."""
    n = len(valid_positions(labels))
    return sum(
        multi_teacher_kd_loss(student[b : b + 1], [teachers[k][b : b + 1]], labels[b : b + 1], num_items_in_batch=n,
                              **options)
        for b, k in enumerate(routes)
    )  # fmt: skip


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("fusion", ["probability", "logit"])
@pytest.mark.parametrize(("weighting", "granularity"), [("entropy", "token"), ("posterior", "sequence"),
                                                        ("correctness", "batch"), ("static", "token")])  # fmt: skip
def test_one_hot_prior_is_the_single_teacher_loss_of_each_row(batch, weighting, granularity, fusion, chunk_size):
    student, teachers, labels = batch
    routes = [1, 0, 2, 0]
    one_hot = torch.eye(K)[routes]
    options = dict(temperature=1.7, fusion=fusion, chunk_size=chunk_size)
    s = student.clone().requires_grad_(True)
    routed = multi_teacher_kd_loss(
        s, teachers, labels, weighting=weighting, granularity=granularity, teacher_prior=one_hot, **options
    )
    r = student.clone().requires_grad_(True)
    expected = single_teacher_sum(r, teachers, labels, routes, **options)
    assert routed.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(routed, s)[0], torch.autograd.grad(expected, r)[0])


def test_one_hot_prior_on_cached_top_k_teachers(batch):
    """The sparse (teacher-cache) path routes too: one-hot rows give each row its teacher's top-k loss."""
    student, teachers, labels = batch
    top_k = [TopKLogits.from_logits(z, 4) for z in teachers]
    routes = [2, 2, 0, 1]
    routed = multi_teacher_kd_loss(student, top_k, labels, temperature=1.5, teacher_prior=torch.eye(K)[routes])
    n = len(valid_positions(labels))
    expected = sum(
        multi_teacher_kd_loss(
            student[b : b + 1],
            [TopKLogits.from_logits(teachers[k][b : b + 1], 4)],
            labels[b : b + 1],
            temperature=1.5,
            num_items_in_batch=n,
        )
        for b, k in enumerate(routes)
    )
    assert routed.item() == pytest.approx(expected.item(), rel=1e-10)


def test_routing_combines_with_teacher_availability(batch):
    """A routed teacher that is unavailable at a position leaves the others' renormalised weights, never a NaN."""
    _, teachers, labels = batch
    available = torch.ones(K, B, T, dtype=torch.bool)
    available[0, 1, :3] = False  # row 1 is routed to teachers 0 and 2
    available[1, 0, 2] = False  # row 0 is routed to teacher 1 alone: no teacher at (0, 2)
    weights = compute_teacher_weights(
        teachers, labels, weighting="entropy", teacher_prior=torch.tensor(ROW_PRIORS), teacher_mask=available
    )
    assert not weights.isnan().any()
    assert weights[:, 0, 2].tolist() == [0.0, 0.0, 0.0]
    assert weights[:, 1, 1].tolist() == [0.0, 0.0, 1.0]
    s = batch[0].clone().requires_grad_(True)
    loss = multi_teacher_kd_loss(
        s, teachers, labels, teacher_prior=torch.tensor(ROW_PRIORS), teacher_mask=available, chunk_size=3
    )
    assert torch.isfinite(loss) and torch.isfinite(torch.autograd.grad(loss, s)[0]).all()


@pytest.mark.parametrize(
    ("teacher_prior", "message"),
    [
        (torch.ones(B, K + 1), r"shape \(4, 4\) but must be \[batch, teachers\] = \[4, 3\]"),
        (torch.tensor([[1.0, -1.0, 1.0]] * B), "must be finite and non-negative"),
        (torch.tensor([[0.0, 0.0, 0.0]] + [[1.0, 1.0, 1.0]] * (B - 1)), "all zeros"),
    ],
)
def test_bad_teacher_prior_is_refused(batch, teacher_prior, message):
    student, teachers, labels = batch
    with pytest.raises(ValueError, match=message):
        multi_teacher_kd_loss(student, teachers, labels, teacher_prior=teacher_prior)
    with pytest.raises(ValueError, match=message):
        compute_teacher_weights(teachers, labels, teacher_prior=teacher_prior)


# ---- the column's values and the collator ----

NAMES = ["code", "math", "prose"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, [0.0, 1.0, 0.0]),
        ("prose", [0.0, 0.0, 1.0]),
        ([0, "prose"], [0.5, 0.0, 0.5]),
        (["math", 1], [0.0, 1.0, 0.0]),  # listed twice: still that teacher alone
        ([1.0, 3.0, 0.0], [0.25, 0.75, 0.0]),
        ([0, 0.5, 1.5], [0.0, 0.25, 0.75]),  # integers among floats are weights
        (None, [1 / 3, 1 / 3, 1 / 3]),
    ],
)
def test_routing_values(value, expected):
    assert routing_prior(value, NAMES) == pytest.approx(expected, abs=0)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("poetry", r"`teacher_ids` names an unknown teacher 'poetry'; the teachers are \['code', 'math', 'prose'\]"),
        (3, r"`teacher_ids` teacher index 3 is out of range for 3 teachers"),
        ([0, -1], r"teacher index -1 is out of range"),
        ([0.5, 0.5], r"weights \[0.5, 0.5\] have 2 entries but there are 3 teachers"),
        ([0.0, 0.0, 0.0], "are all zero: a row must keep at least one teacher"),
        ([0.5, -0.5, 1.0], "must be finite and non-negative"),
        ([], "is not a teacher or a non-empty list"),
        (0.5, "is not a teacher or a non-empty list"),
        (["math", 0.5, 1.0], "mixes weights with teachers"),
    ],
)
def test_bad_routing_values_are_refused(value, message):
    with pytest.raises(ValueError, match=message):
        routing_prior(value, NAMES)


def test_collator_carries_the_prior_and_wraps_any_collator():
    seen = []

    def own_collator(features):  # a user's collator that knows nothing about routing
        seen.append([sorted(f) for f in features])
        return {"input_ids": torch.tensor([f["input_ids"] for f in features])}

    collate = RoutingCollator(own_collator, "teacher_ids", NAMES)
    batch = collate([{"input_ids": [1, 2], "teacher_ids": "math"}, {"input_ids": [3, 4], "teacher_ids": [0, 2]}])
    assert seen[-1] == [["input_ids"], ["input_ids"]]  # the column does not reach the inner collator
    torch.testing.assert_close(batch["teacher_prior"], torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]))
    assert batch["teacher_prior"].dtype == torch.float32
    assert "teacher_prior" not in collate([{"input_ids": [1, 2]}])  # no column: passes through
    with pytest.raises(ValueError, match="unknown teacher 'art'"):
        collate([{"input_ids": [1, 2], "teacher_ids": "art"}])


# ---- the trainer: live teachers, the teacher-logits cache and cross-tokenizer teachers ----


def routing_args(tmp_path, **config):
    return tiny_config(tmp_path, **{"max_steps": 2, "per_device_eval_batch_size": 4, **config})


def expected_shares(trainer, dataset, priors):
    """Σ_b r_b n_b / Σ_b n_b: each teacher's share of the valid positions (n_b of them in row b) by routing alone."""
    dataset = trainer._remove_unused_columns(dataset)  # as the Trainer's dataloaders do
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    counts = (batch["labels"][:, 1:] != -100).sum(dim=1).double()
    return ((torch.tensor(priors, dtype=torch.float64) * counts[:, None]).sum(dim=0) / counts.sum()).tolist()


def assert_logged_shares(trainer, dataset, priors, names):
    metrics = trainer.evaluate()
    for name, share in zip(names, expected_shares(trainer, dataset, priors), strict=True):
        assert metrics[f"eval_teacher_weight/{name}"] == pytest.approx(share, rel=1e-5, abs=1e-7), name


LIVE_NAMES = ["gpt2", "llama", "gpt_neox"]
LIVE_ROUTES = [["gpt2"], ["llama"], ["gpt2", "llama"], ["llama"], ["gpt2"], ["llama", "gpt2"]] * 2
"""Names, one or two per row; gpt_neox is never asked for."""


def test_live_teachers_follow_the_column(tmp_path, make_student, teacher_dirs, dataset, tokenizer):
    data = dataset.select(range(len(LIVE_ROUTES))).add_column("teacher_ids", LIVE_ROUTES)
    trainer = MultiTeacherDistillationTrainer(
        model=make_student(),
        teachers=teacher_dirs,
        args=routing_args(tmp_path, teacher_names=LIVE_NAMES, teacher_weighting="static"),
        train_dataset=data,
        eval_dataset=data,
        processing_class=tokenizer,
    )
    priors = [routing_prior(value, LIVE_NAMES) for value in LIVE_ROUTES]
    assert_logged_shares(trainer, data, priors, LIVE_NAMES)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "teacher_weight/gpt2" in log]
    assert len(logs) == 2 and all(math.isfinite(log["loss"]) for log in logs)
    assert all(log["teacher_weight/gpt_neox"] == 0.0 for log in logs)
    for log in logs:
        assert log["teacher_weight/gpt2"] + log["teacher_weight/llama"] == pytest.approx(1.0, rel=1e-6)


def test_routing_mixes_with_dynamic_weights(tmp_path, make_student, teacher_dirs, dataset, tokenizer):
    """With entropy weights, routing only restricts each row to its teachers: the others get exactly 0."""
    routes = [[1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]]
    data = dataset.select(range(len(routes))).add_column("teacher_ids", routes)
    trainer = MultiTeacherDistillationTrainer(
        model=make_student(),
        teachers=teacher_dirs,
        args=routing_args(tmp_path, teacher_names=LIVE_NAMES, teacher_weighting="entropy", alpha_feat=0.1),
        train_dataset=data,
        processing_class=tokenizer,
    )
    batch = trainer._prepare_inputs(trainer.data_collator([data[i] for i in range(len(routes))]))
    seen = {}
    original = trainer._record_metrics

    def record(mode, kd, *args):
        seen["weights"] = kd.weights
        return original(mode, kd, *args)

    trainer._record_metrics = record
    loss = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(loss)
    weights, valid = seen["weights"], batch["labels"][:, 1:] != -100
    for b, prior in enumerate(routes):
        at_valid = weights[:, b, :-1][:, valid[b]]
        for k, r in enumerate(prior):
            assert (at_valid[k] == 0).all() if r == 0 else (at_valid[k] > 0).all()
    assert torch.equal(weights[0, 0, :-1][valid[0]], torch.ones(int(valid[0].sum())))


def test_cached_teachers_follow_the_column(tmp_path, make_student, teacher_dirs, dataset, tokenizer):
    """The column sits beside the cached ones; the cached loss with routing equals the live one (k = V)."""
    teachers = load_teachers(teacher_dirs[:2])
    rows = dataset.select(range(12))
    cache = cache_teacher_logits(teachers, rows, str(tmp_path / "cache"), k=teachers[0].config.vocab_size)
    routes = [0, 1, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    cached_data = cache.dataset.add_column("teacher_ids", routes)
    args = routing_args(tmp_path, teacher_names=["a", "b"], teacher_weighting="entropy")
    cached = MultiTeacherDistillationTrainer(
        model=make_student(), teachers=cache, args=args, train_dataset=cached_data, eval_dataset=cached_data,
        processing_class=tokenizer,
    )  # fmt: skip
    priors = [routing_prior(value, ["a", "b"]) for value in routes]
    assert_logged_shares(cached, cached_data, priors, ["a", "b"])
    live_data = rows.add_column("teacher_ids", routes)
    live = MultiTeacherDistillationTrainer(
        model=make_student(), teachers=teachers, args=args, eval_dataset=live_data, processing_class=tokenizer
    )
    cached_loss, live_loss = cached.evaluate()["eval_loss_kd"], live.evaluate()["eval_loss_kd"]
    assert cached_loss == pytest.approx(live_loss, rel=1e-5)
    unrouted = MultiTeacherDistillationTrainer(
        model=make_student(), teachers=teachers, args=args, eval_dataset=rows, processing_class=tokenizer
    )
    assert unrouted.evaluate()["eval_loss_kd"] != pytest.approx(live_loss, rel=1e-3)  # the routing mattered


CROSS_ROUTES = [[1.0, 0.0], [0.0, 1.0], [0.25, 0.75], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]


def test_cross_tokenizer_teachers_follow_the_column(tmp_path, corpus, cross_tokenizers, cross_teacher_dirs):
    tok = cross_tokenizers["student"]
    data = Dataset.from_dict({"text": corpus[: len(CROSS_ROUTES)], "teacher_ids": CROSS_ROUTES})
    # the same tokenizer in cross-tokenizer mode aligns every valid position: the shares are the routing's
    same = [tiny_causal_lm(kind, tok, seed=3 + k) for k, kind in enumerate(["gpt2", "llama"])]
    trainer = MultiTeacherDistillationTrainer(
        model=tiny_causal_lm("qwen2", tok, seed=1), teachers=same,
        args=routing_args(tmp_path, teacher_names=["x", "y"], cross_tokenizer="always", teacher_weighting="static"),
        train_dataset=data, eval_dataset=data, processing_class=tok, teacher_tokenizers=[tok, tok],
    )  # fmt: skip
    assert trainer.cross_tokenizer
    assert_logged_shares(trainer, data, CROSS_ROUTES, ["x", "y"])
    # teachers on their own tokenizers: a teacher no row asks for gets no weight anywhere
    three = [[*route, 0.0] for route in CROSS_ROUTES]
    data = Dataset.from_dict({"text": corpus[: len(three)], "teacher_ids": three})
    trainer = MultiTeacherDistillationTrainer(
        model=tiny_causal_lm("qwen2", tok, seed=1), teachers=cross_teacher_dirs,
        args=routing_args(tmp_path, teacher_names=["bpe", "uni", "wp"], teacher_weighting="entropy"),
        train_dataset=data, eval_dataset=data, processing_class=tok,
    )  # fmt: skip
    assert trainer.cross_tokenizer
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_teacher_weight/wp"] == 0.0 and math.isfinite(metrics["eval_loss"])
    assert 0 < metrics["eval_teacher_weight/bpe"] + metrics["eval_teacher_weight/uni"] <= 1 + 1e-6


ROW = "of the train_dataset: `teacher_ids`"


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        (["gpt2", "llama", "bert", "gpt2"], rf"Row 2 {ROW} names an unknown teacher 'bert'"),
        ([0, 1, 5, 0], rf"Row 2 {ROW} teacher index 5 is out of range for 2 teachers"),
        ([[1.0, 0.0]] * 3 + [[0.0, 0.0]], rf"Row 3 {ROW} weights \[0.0, 0.0\] are all zero"),
        ([[1.0, 0.0], [1.0, 0.0, 0.0]] * 2, rf"Row 1 {ROW} weights .* have 3 entries"),
        ([[1.0, -1.0]] * 4, rf"Row 0 {ROW} weights .* must be finite and non-negative"),
    ],
)
def test_bad_column_is_refused_before_any_teacher_loads(tmp_path, make_student, dataset, tokenizer, routes, message):
    data = dataset.select(range(len(routes))).add_column("teacher_ids", routes)
    with pytest.raises(ValueError, match=message):
        MultiTeacherDistillationTrainer(
            model=make_student(),
            teachers=[str(tmp_path / "gpt2"), str(tmp_path / "llama")],  # paths that do not exist: never loaded
            args=routing_args(tmp_path),
            train_dataset=data,
            processing_class=tokenizer,
        )


def test_another_routing_column_and_no_routing(tmp_path, make_student, teacher_dirs, dataset, tokenizer):
    data = dataset.select(range(8)).add_column("domain", [0, 1] * 4).add_column("teacher_ids", ["zz"] * 8)
    trainer = MultiTeacherDistillationTrainer(
        model=make_student(), teachers=teacher_dirs[:2], args=routing_args(tmp_path, routing_column="domain",
        teacher_names=["a", "b"], teacher_weighting="static"), eval_dataset=data, processing_class=tokenizer,
    )  # fmt: skip
    assert_logged_shares(trainer, data, [[1.0, 0.0], [0.0, 1.0]] * 4, ["a", "b"])
    trainer = MultiTeacherDistillationTrainer(
        model=make_student(), teachers=teacher_dirs[:2], args=routing_args(tmp_path, routing_column=None,
        teacher_names=["a", "b"], teacher_weighting="static", remove_unused_columns=True), eval_dataset=data,
        processing_class=tokenizer,
    )  # fmt: skip
    metrics = trainer.evaluate()  # the column is an ordinary (unused) column again
    assert metrics["eval_teacher_weight/a"] == pytest.approx(0.5) == metrics["eval_teacher_weight/b"]


# ---- the example script ----


def write_routed_jsonl(path, texts, routes):
    path.write_text("".join(json.dumps({"text": text, "teacher_ids": route}) + "\n" for text, route in zip(
        texts, routes, strict=True)))  # fmt: skip
    return str(path)


def test_script_keeps_the_column_one_text_per_example(tmp_path, corpus, tokenizer, teacher_dirs, student_dir, capsys):
    from test_run_clm_distill import QUICK, run_main

    routes = [["a"], ["b"], ["a", "b"], ["b"]] * 6
    train = write_routed_jsonl(tmp_path / "train.jsonl", corpus[:24], routes)
    validation = write_routed_jsonl(tmp_path / "validation.jsonl", corpus[24:48], routes)
    output_dir = tmp_path / "out"
    command = [
        "--teacher_model_name_or_path", *teacher_dirs[:2], "--teacher_names", "a", "b", "--model_name_or_path",
        student_dir, "--train_file", train, "--validation_file", validation, "--do_train", "--do_eval",
        "--teacher_weighting", "static", "--output_dir", str(output_dir), *QUICK,
    ]  # fmt: skip
    run_main(command)
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["eval_samples"] == 24  # one example per text, not blocks
    counts = [len(tokenizer(text, truncation=True, max_length=32)["input_ids"]) - 1 for text in corpus[24:48]]
    for k, name in enumerate(["a", "b"]):
        share = sum(routing_prior(r, ["a", "b"])[k] * n for r, n in zip(routes, counts, strict=True)) / sum(counts)
        assert results[f"eval_teacher_weight/{name}"] == pytest.approx(share, rel=1e-5)
    bad = write_routed_jsonl(tmp_path / "bad.jsonl", corpus[:4], [["a"], ["c"], ["b"], ["a"]])
    command[command.index("--train_file") + 1] = bad
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(command)
    assert exit_info.value.code == 2
    assert "error: Row 1 of the train_dataset: `teacher_ids` names an unknown teacher 'c'" in capsys.readouterr().err
