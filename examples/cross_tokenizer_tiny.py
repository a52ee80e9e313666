"""
Three teachers on three tokenizers (byte-level BPE of 300 tokens, Unigram, WordPiece) distilled into a student on a
byte-level BPE of 512, offline in about a minute on a CPU: the numbers of the cross-tokenizer guide's table.
"""

import tempfile

from datasets import Dataset

from hf_mtkd import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer, VocabularyMap
from hf_mtkd.testing import fit_causal_lm, synthetic_corpus, tiny_causal_lm, train_tiny_tokenizer

TEACHERS = [
    ("bpe300", "gpt2", "bpe", 300),
    ("unigram", "llama", "unigram", 200),
    ("wordpiece", "gpt_neox", "wordpiece", 200),
]


def main() -> None:
    corpus = synthetic_corpus(256, seed=0)
    student_tokenizer = train_tiny_tokenizer(corpus)
    teachers, tokenizers = [], []
    for k, (name, architecture, algorithm, size) in enumerate(TEACHERS):
        tokenizer = train_tiny_tokenizer(corpus, size, algorithm=algorithm)
        model = tiny_causal_lm(architecture, tokenizer, seed=10 + k, hidden_size=48, num_layers=2)
        teachers.append(fit_causal_lm(model, tokenizer, corpus, steps=40, seed=k))
        tokenizers.append(tokenizer)
        coverage = VocabularyMap.build(tokenizer, student_tokenizer).coverage()
        print(f"{name}: {len(tokenizer)} tokens, vocabulary coverage {coverage}")
    dataset = Dataset.from_dict({"text": corpus})  # raw text: every model tokenizes it itself
    args = MultiTeacherDistillationConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=60,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=32,
        learning_rate=3e-3,
        logging_steps=20,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        cross_tokenizer_max_length=24,
        teacher_names=[name for name, *_ in TEACHERS],
    )
    trainer = MultiTeacherDistillationTrainer(
        model=tiny_causal_lm("qwen2", student_tokenizer, seed=1, hidden_size=24),
        teachers=teachers,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(64)),
        processing_class=student_tokenizer,
        teacher_tokenizers=tokenizers,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    print({"before": {k: round(before[k], 3) for k in ("eval_loss_kd", "eval_perplexity")}})
    print({k: round(v, 3) for k, v in after.items() if k.startswith(("eval_loss", "eval_perplexity", "eval_teacher"))})


if __name__ == "__main__":
    main()
