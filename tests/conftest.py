import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest
from datasets import Dataset

from hf_mtkd.testing import (
    chat_tokenizer,
    fit_causal_lm,
    synthetic_conversations,
    synthetic_corpus,
    tiny_causal_lm,
    train_tiny_tokenizer,
)

TEACHER_SHAPES = [  # three heterogeneous teachers: different architectures, widths and depths
    ("gpt2", {"hidden_size": 48, "num_layers": 4, "num_heads": 4}),
    ("llama", {"hidden_size": 64, "num_layers": 3, "num_heads": 4}),
    ("gpt_neox", {"hidden_size": 40, "num_layers": 5, "num_heads": 2}),
]
STUDENT_SHAPE = ("qwen2", {"hidden_size": 24, "num_layers": 2, "num_heads": 2})


@pytest.fixture(scope="session")
def corpus():
    return synthetic_corpus(256, seed=0)


@pytest.fixture(scope="session")
def tokenizer(corpus):
    return train_tiny_tokenizer(corpus)


@pytest.fixture(scope="session")
def dataset(corpus, tokenizer):
    return Dataset.from_dict({"text": corpus}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"]
    )


def _student_factory(tokenizer):
    def make():
        model_type, kwargs = STUDENT_SHAPE
        return tiny_causal_lm(model_type, tokenizer, seed=1, **kwargs)

    return make


@pytest.fixture
def make_student(tokenizer):
    return _student_factory(tokenizer)


@pytest.fixture(scope="module")
def make_student_module(tokenizer):
    return _student_factory(tokenizer)


@pytest.fixture(scope="session")
def teacher_dirs(tmp_path_factory, corpus, tokenizer):
    """Three heterogeneous teachers, each fitted briefly on the corpus and saved with the tokenizer."""
    dirs = []
    for k, (model_type, kwargs) in enumerate(TEACHER_SHAPES):
        model = tiny_causal_lm(model_type, tokenizer, seed=10 + k, **kwargs)
        fit_causal_lm(model, tokenizer, corpus, steps=30, seed=k)
        path = tmp_path_factory.mktemp(f"teacher_{model_type}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(str(path))
    return dirs


@pytest.fixture(scope="session")
def text_files(tmp_path_factory, corpus):
    """The corpus as train/validation data files: {"txt": (train, validation), "jsonl": ..., "csv": ...}."""
    root = tmp_path_factory.mktemp("text_files")
    splits = {"train": corpus[:200], "validation": corpus[200:]}
    files = {}
    for extension in ("txt", "jsonl", "csv"):
        paths = []
        for split, texts in splits.items():
            path = root / f"{split}.{extension}"
            if extension == "txt":
                path.write_text("\n".join(texts) + "\n")
            elif extension == "jsonl":
                path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
            else:
                path.write_text("text\n" + "".join(f'"{text}"\n' for text in texts))
            paths.append(str(path))
        files[extension] = tuple(paths)
    return files


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tokenizer):
    """The test student (STUDENT_SHAPE), untrained, saved with the tokenizer."""
    model_type, kwargs = STUDENT_SHAPE
    path = tmp_path_factory.mktemp("student")
    tiny_causal_lm(model_type, tokenizer, seed=1, **kwargs).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


CROSS_TEACHERS = [("bpe300", "gpt2"), ("unigram", "llama"), ("wordpiece", "gpt_neox")]
"""Cross-tokenizer teachers: (tokenizer, architecture); the student keeps the byte-level BPE of 512 tokens."""


@pytest.fixture(scope="session")
def cross_tokenizers(corpus):
    """The student's byte-level BPE (512) and three teachers' tokenizers of other sizes and algorithms."""
    return {
        "student": train_tiny_tokenizer(corpus),
        "bpe300": train_tiny_tokenizer(corpus, 300),
        "unigram": train_tiny_tokenizer(corpus, 200, algorithm="unigram"),
        "wordpiece": train_tiny_tokenizer(corpus, 200, algorithm="wordpiece"),
    }


@pytest.fixture(scope="session")
def cross_teacher_dirs(tmp_path_factory, corpus, cross_tokenizers):
    """Three teachers, each on its own tokenizer (CROSS_TEACHERS), fitted briefly and saved with it."""
    dirs = []
    for k, (name, kind) in enumerate(CROSS_TEACHERS):
        tok = cross_tokenizers[name]
        model = tiny_causal_lm(kind, tok, seed=10 + k, hidden_size=48, num_layers=2)
        fit_causal_lm(model, tok, corpus, steps=40, seed=k)
        path = tmp_path_factory.mktemp(f"teacher_{name}")
        model.save_pretrained(path)
        tok.save_pretrained(path)
        dirs.append(str(path))
    return dirs


# ---- chat data ----


@pytest.fixture(scope="session")
def conversations():
    """Synthetic user/assistant conversations (a test module may define its own)."""
    return synthetic_conversations(64, seed=0)


@pytest.fixture(scope="session")
def chatml(conversations):
    """A tokenizer trained on them with a ChatML template."""
    return chat_tokenizer(conversations, "chatml", 512, "bpe")


@pytest.fixture(scope="session")
def mistral(conversations):
    """Another: WordPiece, smaller, with a Mistral-style template."""
    return chat_tokenizer(conversations, "mistral", 300, "wordpiece")
