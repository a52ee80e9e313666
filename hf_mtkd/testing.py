"""Tiny, fully offline building blocks: a synthetic corpus, a locally trained tokenizer and small causal LMs.

They let the examples, the tests and a new user try distillation end to end without downloading anything.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

_NAMES = ["ada", "bob", "cy", "dee", "eve", "finn", "gus", "hal", "ivy", "jo"]
_ANIMALS = ["cat", "dog", "fox", "owl", "eel", "yak", "ram", "bee"]
_PLACES = ["mill", "barn", "lake", "hill", "wood", "dock", "yard"]
_VERBS = ["sees", "likes", "chases", "finds", "feeds", "meets"]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _story(rng: random.Random) -> str:
    name, animal, place = rng.choice(_NAMES), rng.choice(_ANIMALS), rng.choice(_PLACES)
    return f"{name} {rng.choice(_VERBS)} the {animal} at the {place} . the {animal} {rng.choice(_VERBS)} {name} ."


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randrange(5), rng.randrange(5)
    x, y, total = _NUMBERS[a], _NUMBERS[b], _NUMBERS[a + b]
    return f"{x} plus {y} is {total} . {y} plus {x} is {total} ."


def _counting(rng: random.Random) -> str:
    start = rng.randrange(5)
    return "count : " + " ".join(_NUMBERS[start : start + 5]) + " ."


DOMAINS = {"stories": _story, "arithmetic": _arithmetic, "counting": _counting}


def synthetic_corpus(num_texts: int, seed: int = 0, domains: list[str] | None = None) -> list[str]:
    """`num_texts` short texts drawn from small templated domains (stories, arithmetic, counting), reproducibly."""
    rng = random.Random(seed)
    generators = [DOMAINS[d] for d in (domains or list(DOMAINS))]
    return [generators[i % len(generators)](rng) for i in range(num_texts)]


TOKENIZER_ALGORITHMS = ("bpe", "unigram", "wordpiece")


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 512, algorithm: str = "bpe") -> PreTrainedTokenizerFast:
    """
    A tokenizer trained on `texts`, with `<s>`, `</s>`, `<pad>` and `<unk>`: byte-level BPE (`bpe`, GPT-2 style),
    SentencePiece-style Unigram with the `▁` space marker (`unigram`) or BERT-style WordPiece with `##`
    continuations (`wordpiece`).
    """
    specials = list(SPECIAL_TOKENS.values())
    if algorithm == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif algorithm == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token=SPECIAL_TOKENS["unk_token"], show_progress=False
        )
    elif algorithm == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk_token"]))
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        raise ValueError(f"Unknown tokenizer algorithm {algorithm!r}; choose one of {list(TOKENIZER_ALGORITHMS)}.")
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


_DROPOUTS = {"gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
"""Dropout settings that default to non-zero; tiny models trained for a few steps do better without dropout."""


def tiny_causal_lm(
    model_type: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    max_positions: int = 128,
    seed: int = 0,
    vocab_size: int | None = None,
) -> PreTrainedModel:
    """
    A randomly initialised causal LM of `model_type` (e.g. gpt2, llama, gpt_neox, qwen2) on `tokenizer`'s vocab
    (or a larger `vocab_size`, for benchmarks), without dropout.
    """
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **{name: 0.0 for name in _DROPOUTS.get(model_type, ())},
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def fit_causal_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    *,
    steps: int = 50,
    batch_size: int = 16,
    learning_rate: float = 1e-2,
    max_length: int = 32,
    seed: int = 0,
) -> PreTrainedModel:
    """Fit `model` on `texts` with a few plain AdamW steps of next-token cross-entropy (to make quick teachers)."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    for _ in range(steps):
        batch = tokenizer(
            rng.sample(texts, batch_size), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


class ConfidentlyWrongTeacher(nn.Module):
    """
    A broken but confident teacher: `model`'s logits with the vocabulary shuffled and sharpened by `sharpness`.

    Its predictions are as certain as ever (lower entropy, even) and almost always wrong, the case that fools
    entropy weighting. Hidden states and everything else pass through from `model`.
    """

    def __init__(self, model: PreTrainedModel, sharpness: float = 4.0, seed: int = 0) -> None:
        super().__init__()
        self.model, self.config, self.sharpness = model, model.config, sharpness
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("permutation", torch.randperm(model.config.vocab_size, generator=generator))

    def forward(self, **kwargs: Any) -> Any:
        outputs = self.model(**kwargs)
        outputs["logits"] = outputs.logits[..., self.permutation] * self.sharpness
        return outputs


CHAT_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    ),
}
"""Small chat templates in the styles of ChatML (Qwen), Llama 3 and Mistral, for offline chat examples."""
CHAT_MARKERS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "mistral": ["[INST]", "[/INST]"],
}
"""The markup tokens of each of `CHAT_TEMPLATES`, added to a tokenizer as special tokens."""


def synthetic_conversations(num_conversations: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """
    `num_conversations` short user/assistant conversations (one or two exchanges) about the synthetic domains: the
    user asks for a sum or a count, the assistant answers in the corpus's words.
    """
    rng = random.Random(seed)
    conversations = []
    for _ in range(num_conversations):
        messages = []
        for _ in range(rng.choice([1, 2])):
            if rng.random() < 0.5:
                a, b = rng.randrange(5), rng.randrange(5)
                question = f"what is {_NUMBERS[a]} plus {_NUMBERS[b]} ?"
                answer = f"{_NUMBERS[a]} plus {_NUMBERS[b]} is {_NUMBERS[a + b]} ."
            else:
                start = rng.randrange(5)
                question = f"count from {_NUMBERS[start]} ."
                answer = "count : " + " ".join(_NUMBERS[start : start + 5]) + " ."
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        conversations.append(messages)
    return conversations


def chat_tokenizer(
    conversations: list[list[dict[str, str]]], style: str, vocab_size: int = 512, algorithm: str = "bpe"
) -> PreTrainedTokenizerFast:
    """A tokenizer trained on the conversations' texts, with the chat template of `style` and its markup tokens."""
    texts = ["\n".join(m["content"] for m in conversation) for conversation in conversations]
    tokenizer = train_tiny_tokenizer(texts, vocab_size, algorithm=algorithm)
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_MARKERS[style]})
    tokenizer.chat_template = CHAT_TEMPLATES[style]
    return tokenizer
