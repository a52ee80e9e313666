"""The demo's scoring of a student's own text (`own_text_quality`) against a plain float64 reference."""

import math

import pytest
import torch
from datasets import Dataset

from hf_mtkd.demo.evaluation import own_text_quality, sample_continuations
from hf_mtkd.testing import synthetic_corpus, tiny_causal_lm, train_tiny_tokenizer

PROMPT, NEW, SEED = 4, 6, 7


@pytest.fixture(scope="module")
def setup():
    tokenizer = train_tiny_tokenizer(synthetic_corpus(32), vocab_size=120)
    student = tiny_causal_lm("qwen2", tokenizer, seed=1)
    judges = {"a": tiny_causal_lm("gpt2", tokenizer, seed=2), "b": tiny_causal_lm("llama", tokenizer, seed=3)}
    generator = torch.Generator().manual_seed(0)
    data = {
        domain: Dataset.from_dict({"input_ids": torch.randint(3, len(tokenizer), (rows, 12), generator=generator)})
        for domain, rows in (("a", 3), ("b", 2))
    }
    return tokenizer, student, judges, data


def quality(setup, judges=None, seed=SEED):
    tokenizer, student, own_judges, data = setup
    return own_text_quality(
        student,
        data,
        judges or own_judges,
        prompt_tokens=PROMPT,
        new_tokens=NEW,
        seed=seed,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=8,
    )


def reference(setup):
    """The same samples (one batch per domain, the same seeded draw), scored position by position in float64."""
    tokenizer, student, judges, data = setup
    sums = {}
    torch.manual_seed(SEED)
    for domain, rows in data.items():
        prompts = torch.tensor(rows["input_ids"])[:, :PROMPT]
        with torch.no_grad():
            text = sample_continuations(student, prompts, NEW, tokenizer.pad_token_id)
            assert text.shape == (len(rows), PROMPT + NEW) and torch.equal(text[:, :PROMPT], prompts)
            q = student(input_ids=text).logits.double().softmax(-1)
            p = judges[domain](input_ids=text).logits.double().softmax(-1)
        nll = kl = tokens = 0.0
        for row in range(text.shape[0]):
            for t in range(PROMPT - 1, text.shape[1] - 1):  # the positions that predict a sampled token
                nll -= math.log(p[row, t, text[row, t + 1]].item())
                kl += sum(
                    qv * math.log(qv / pv) for qv, pv in zip(q[row, t].tolist(), p[row, t].tolist(), strict=True)
                )
                tokens += 1
        sums[domain] = (nll, kl, tokens)
    sums["overall"] = tuple(sum(v[i] for v in sums.values()) for i in range(3))
    return {d: {"own_text_perplexity": math.exp(n / c), "own_text_kl": k / c} for d, (n, k, c) in sums.items()}


def test_own_text_quality_matches_a_plain_reference(setup):
    before = torch.random.get_rng_state()
    got = quality(setup)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global random state is left alone
    expected = reference(setup)
    assert got.keys() == {"a", "b", "overall"}
    for domain, metrics in expected.items():
        for key, value in metrics.items():
            assert got[domain][key] == pytest.approx(value, rel=1e-5), (domain, key)
    assert got["a"]["own_text_kl"] > 0.01  # a random student is far from a random judge
    assert quality(setup) == got  # seeded
    assert quality(setup, seed=SEED + 1)["a"] != got["a"]


def test_a_student_judged_by_itself_has_no_kl(setup):
    _, student, _, _ = setup
    got = quality(setup, judges={"a": student, "b": student})
    assert got["overall"]["own_text_kl"] == pytest.approx(0.0, abs=1e-6)
