"""Generation quality: prompts from held-out texts, greedy continuations, BLEU/ROUGE-L scoring and its backends."""

import evaluate
import pytest
import torch
from huggingface_hub import constants
from transformers import AutoModelForCausalLM

from hf_mtkd import generation_eval
from hf_mtkd.generation_eval import (
    PACKAGES_BACKEND,
    build_prompts,
    evaluate_generation,
    generate_continuations,
    score_continuations,
)
from hf_mtkd.testing import tiny_causal_lm


@pytest.fixture(autouse=True)
def fresh_metric_backend():
    generation_eval._hub_metrics.cache_clear()
    yield
    generation_eval._hub_metrics.cache_clear()


def test_identical_continuations_score_perfectly():
    texts = ["the cat sat on the mat .", "two plus three is five ."]
    scores = score_continuations(texts, texts)
    assert scores["bleu"] == pytest.approx(100)
    assert scores["rougeL"] == pytest.approx(1)
    assert scores["metrics_backend"] == PACKAGES_BACKEND  # the suite runs offline


def test_disjoint_continuations_score_zero():
    scores = score_continuations(["alpha beta gamma delta", "one two"], ["eta theta iota kappa", "three four"])
    assert scores["bleu"] == 0
    assert scores["rougeL"] == 0


def test_partial_overlap_matches_hand_computation():
    # n-gram precisions 4/5, 3/4, 2/3, 1/2, equal lengths (no brevity penalty): BLEU = 100 * (0.2) ** (1/4).
    assert score_continuations(["a b c d e"], ["a b c d f"])["bleu"] == pytest.approx(100 * 0.2**0.25, abs=1e-6)
    # Longest common subsequence "the cat sat on mat": 5 of 6 tokens each side, F1 = 5/6; averaged with a perfect 1.
    rouge = score_continuations(["the cat sat on the mat", "x y"], ["the cat sat on a mat", "x y"])["rougeL"]
    assert rouge == pytest.approx((5 / 6 + 1) / 2)
    # A short prediction: precision 3/3, recall 3/6, F1 = 2/3 (the score is the F-measure, not either side).
    assert score_continuations(["the cat sat"], ["the cat sat on the mat"])["rougeL"] == pytest.approx(2 / 3)


def test_scoring_refuses_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score_continuations(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        score_continuations([], [])


def test_unreachable_hub_falls_back_to_the_packages(monkeypatch, caplog):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", False)
    calls = []

    def unreachable(name, *args, **kwargs):
        calls.append(name)
        raise ConnectionError("no route to host")

    monkeypatch.setattr(evaluate, "load", unreachable)
    scores = score_continuations(["a b c d e"], ["a b c d f"])
    assert calls == ["sacrebleu"]
    assert scores["metrics_backend"] == PACKAGES_BACKEND
    assert scores["bleu"] == pytest.approx(100 * 0.2**0.25, abs=1e-6)


def test_offline_never_tries_the_hub(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(evaluate, "load", lambda *a, **k: pytest.fail("evaluate.load called while offline"))
    assert score_continuations(["a"], ["a"])["metrics_backend"] == PACKAGES_BACKEND


def test_build_prompts_cuts_texts_into_prompt_and_true_continuation(tokenizer):
    texts = ["ada sees the cat at the mill . the cat likes ada .", "hi", "count : one two three four five ."]
    prompts, references = build_prompts(texts, tokenizer, prompt_length=3, max_new_tokens=4)
    assert len(prompts) == len(references) == 2  # "hi" is too short
    for text, prompt, reference in zip([texts[0], texts[2]], prompts, references, strict=True):
        ids = tokenizer(text)["input_ids"]
        assert prompt == ids[:3]
        assert reference == tokenizer.decode(ids[3:7])
        assert text.startswith(tokenizer.decode(prompt) + reference)
    assert len(build_prompts(texts, tokenizer, prompt_length=3, max_new_tokens=4, max_samples=1)[0]) == 1
    with pytest.raises(ValueError, match="None of the 3 held-out texts is longer than prompt_length=50"):
        build_prompts(texts, tokenizer, prompt_length=50, max_new_tokens=4)


def test_generate_continuations_is_greedy_decoding(tokenizer):
    model = tiny_causal_lm("llama", tokenizer, hidden_size=32, num_layers=2, seed=3).train()
    prompts = [tokenizer("ada sees the")["input_ids"], tokenizer("two plus one")["input_ids"]]
    assert len(prompts[0]) == len(prompts[1])
    continuations = generate_continuations(model, tokenizer, prompts, max_new_tokens=5, batch_size=1)
    assert model.training  # the mode is restored
    model.eval()
    for prompt, continuation in zip(prompts, continuations, strict=True):
        ids = torch.tensor([prompt])
        for _ in range(5):  # plain argmax decoding, one token at a time
            next_id = model(ids).logits[0, -1].argmax()
            if next_id == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        assert continuation == tokenizer.decode(ids[0, len(prompt) :], skip_special_tokens=True)
    with pytest.raises(ValueError, match="same number of tokens"):
        generate_continuations(model, tokenizer, [[1, 2], [1, 2, 3]], max_new_tokens=2)


def test_a_fitted_teacher_continues_better_than_a_random_student(tokenizer, corpus, teacher_dirs):
    student = tiny_causal_lm("qwen2", tokenizer, hidden_size=16, num_layers=1, seed=7)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dirs[0])  # fitted on the corpus
    results = evaluate_generation(
        student,
        {"fitted": teacher},
        tokenizer,
        corpus[200:],
        prompt_length=4,
        max_new_tokens=6,
        max_samples=24,
        disable_tqdm=True,
    )
    assert set(results) == {
        "bleu",
        "rougeL",
        "teacher_bleu/fitted",
        "teacher_rougeL/fitted",
        "metrics_backend",
        "samples",
        "prompt_length",
        "max_new_tokens",
    }
    assert results["samples"] == 24 and results["metrics_backend"] == PACKAGES_BACKEND
    assert results["teacher_rougeL/fitted"] > results["rougeL"] + 0.05
