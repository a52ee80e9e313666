"""Depth pruning (`student_from_teacher`): the student is the teacher with the other layers skipped."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_mtkd import student_from_teacher
from hf_mtkd.pruning import decoder_layers, evenly_spaced_layers
from hf_mtkd.testing import synthetic_corpus, tiny_causal_lm, train_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(synthetic_corpus(64), vocab_size=128)


def teacher_of(model_type, tokenizer, tie=False):
    model = tiny_causal_lm(model_type, tokenizer, hidden_size=16, num_layers=4, seed=3).double().eval()
    if tie:
        model.config.tie_word_embeddings = True
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return model


def logits_skipping(teacher, kept, input_ids):
    """The teacher's logits with every layer outside `kept` replaced by the identity (hooks, nothing copied)."""

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    _, stack = decoder_layers(teacher)
    hooks = [layer.register_forward_hook(identity, with_kwargs=True) for i, layer in enumerate(stack) if i not in kept]
    try:
        with torch.no_grad():
            return teacher(input_ids, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()


def test_evenly_spaced_layers_keep_the_first_and_the_last():
    assert evenly_spaced_layers(2, 4) == [0, 3]
    assert evenly_spaced_layers(3, 5) == [0, 2, 4]
    assert evenly_spaced_layers(4, 8) == [0, 2, 5, 7]  # round(7/3) = 2, round(14/3) = 5
    assert evenly_spaced_layers(1, 6) == [0] and evenly_spaced_layers(6, 6) == list(range(6))


@pytest.mark.parametrize(
    "model_type, tie", [("gpt2", False), ("llama", False), ("llama", True), ("gpt_neox", False), ("qwen2", False)]
)
def test_student_computes_the_teacher_without_the_dropped_layers(tokenizer, model_type, tie):
    teacher = teacher_of(model_type, tokenizer, tie)
    input_ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    for kwargs, kept in (({"layers": [1, 2]}, [1, 2]), ({"num_layers": 2}, [0, 3]), ({"num_layers": 4}, [0, 1, 2, 3])):
        student = student_from_teacher(teacher, **kwargs).eval()
        assert student.config.num_hidden_layers == len(kept) and len(decoder_layers(student)[1]) == len(kept)
        with torch.no_grad():
            got = student(input_ids, use_cache=False).logits
        torch.testing.assert_close(got, logits_skipping(teacher, kept, input_ids), rtol=0, atol=1e-12)
    assert (student.get_output_embeddings().weight is student.get_input_embeddings().weight) == tie


def test_student_owns_its_weights_and_survives_save_and_load(tokenizer, tmp_path):
    teacher = teacher_of("qwen2", tokenizer)  # qwen2's config lists layer_types, one per layer
    teacher.config.use_sliding_window, teacher.config.sliding_window = True, 6
    teacher.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = student_from_teacher(teacher, layers=[-3, -1])
    assert student.config.layer_types == ["sliding_attention", "sliding_attention"]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    input_ids = torch.randint(3, len(tokenizer), (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, student.eval()(input_ids).logits, rtol=0, atol=0)
    assert loaded.config.num_hidden_layers == 2


def test_renumbered_layers_generate_with_the_kv_cache(tokenizer):
    student = student_from_teacher(teacher_of("llama", tokenizer), layers=[1, 3]).eval()
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    prompt = torch.randint(3, len(tokenizer), (1, 5), generator=torch.Generator().manual_seed(2))
    cached = student.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = student.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_student_from_a_directory(tokenizer, tmp_path):
    teacher = teacher_of("gpt2", tokenizer).float()
    teacher.save_pretrained(tmp_path)
    student = student_from_teacher(tmp_path, num_layers=3)
    assert student.config.num_hidden_layers == 3 and student.dtype == torch.float32
    torch.testing.assert_close(student.transformer.h[1].mlp.c_fc.weight, teacher.transformer.h[2].mlp.c_fc.weight)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of num_layers"),
        ({"num_layers": 2, "layers": [0, 1]}, "exactly one of num_layers"),
        ({"num_layers": 5}, "keeps 1 to 4 layers, not 5"),
        ({"num_layers": 0}, "keeps 1 to 4 layers, not 0"),
        ({"layers": [2, 1]}, "distinct, increasing"),
        ({"layers": [0, 0]}, "distinct, increasing"),
        ({"layers": [0, 4]}, "distinct, increasing"),
    ],
)
def test_bad_layer_choices_are_refused(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        student_from_teacher(teacher_of("llama", tokenizer), **kwargs)


def test_a_teacher_without_its_weights_is_refused(tokenizer):
    with torch.device("meta"):
        teacher = tiny_causal_lm("llama", tokenizer, hidden_size=16, num_layers=4)
    with pytest.raises(ValueError, match="not in memory"):
        student_from_teacher(teacher, num_layers=2)
