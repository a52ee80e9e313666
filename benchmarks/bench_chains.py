"""
What the chained cross-tokenizer target costs (`cross_tokenizer_chains`, `hf_mtkd.token_chains`): the collator's
time per batch and the training step's, with the chains and with the vocabulary map alone, on the same batches.

Three small teachers on three tokenizers of their own (byte-level BPE of 300, Unigram and WordPiece of 200, trained on
the synthetic test corpus; the Unigram one spells most of the student's tokens as several of its own) and a student
on a byte-level BPE of 512, as in `examples/cross_tokenizer_tiny.py`. Each step is
`MultiTeacherDistillationTrainer.training_step` (logit-free, `posterior`); the two settings are interleaved, step by
step, so that drift hits both alike, and each figure is a median over `--repeats`.

    python benchmarks/bench_chains.py --output docs/bench_chains   # writes docs/bench_chains.json and .md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from hf_mtkd import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer, __version__
from hf_mtkd.testing import synthetic_corpus, tiny_causal_lm, train_tiny_tokenizer

TEACHERS = [
    ("bpe300", "gpt2", "bpe", 300),
    ("unigram", "llama", "unigram", 200),
    ("wordpiece", "gpt_neox", "wordpiece", 200),
]


def trainer(chains: bool, length: int, batch: int) -> MultiTeacherDistillationTrainer:
    """A trainer of the fixed student and teachers (seeded), with or without the chains."""
    corpus = synthetic_corpus(512, seed=0)
    student_tokenizer = train_tiny_tokenizer(corpus)
    tokenizers = [train_tiny_tokenizer(corpus, size, algorithm=algorithm) for _, _, algorithm, size in TEACHERS]
    teachers = [
        tiny_causal_lm(architecture, tokenizer, seed=10 + k, hidden_size=64, num_layers=2)
        for k, ((_, architecture, _, _), tokenizer) in enumerate(zip(TEACHERS, tokenizers, strict=True))
    ]
    text = " ".join(corpus)
    rows = [text[i : i + 8 * length] for i in range(0, len(text) - 8 * length, 8 * length)]
    args = MultiTeacherDistillationConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, report_to="none", disable_tqdm=True,
        use_cpu=True, seed=0, cross_tokenizer_max_length=length, teacher_names=[name for name, *_ in TEACHERS],
        logit_free="always", cross_tokenizer_chains=chains,
    )  # fmt: skip
    return MultiTeacherDistillationTrainer(
        model=tiny_causal_lm("qwen2", student_tokenizer, seed=1, hidden_size=64, num_layers=2),
        teachers=teachers,
        args=args,
        train_dataset=Dataset.from_dict({"text": rows}),
        processing_class=student_tokenizer,
        teacher_tokenizers=tokenizers,
    )


def measure(length: int, batch: int, repeats: int) -> dict[str, Any]:
    """Median collator and step milliseconds per setting, interleaved, on the same rows."""
    trainers = {"map alone": trainer(False, length, batch), "chains": trainer(True, length, batch)}
    features = [trainers["chains"].train_dataset[i] for i in range(batch)]
    times: dict[str, dict[str, list[float]]] = {name: {"collator": [], "step": []} for name in trainers}
    for step in range(repeats + 1):  # the first round warms up
        for name, run in trainers.items():
            start = time.perf_counter()
            inputs = run.data_collator(features)
            collated = time.perf_counter()
            run.model.train()
            num_items = int((inputs["labels"][:, 1:] != -100).sum())
            run.training_step(run.model, run._prepare_inputs(inputs), num_items)
            run.model.zero_grad(set_to_none=True)
            done = time.perf_counter()
            if step:
                times[name]["collator"].append(1000 * (collated - start))
                times[name]["step"].append(1000 * (done - collated))
    result = {name: {key: statistics.median(values) for key, values in parts.items()} for name, parts in times.items()}
    chained = (inputs["teacher_inputs"][1]["chain_stop"] >= 0).sum() / (inputs["labels"] != -100).sum()
    return {"length": length, "batch": batch, "unigram_chained_share": float(chained), **result}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"`{report['command']}` (hf_mtkd {report['version']}, torch {report['torch']}, {report['machine']}; medians "
        f"over {report['repeats']} interleaved steps)",
        "",
        "| student tokens x rows | Unigram positions chained | collator ms, map alone | collator ms, chains "
        "| step ms, map alone | step ms, chains | step ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        plain, chained = row["map alone"], row["chains"]
        lines.append(
            f"| {row['length']} x {row['batch']} | {row['unigram_chained_share']:.0%} | {plain['collator']:.1f} | "
            f"{chained['collator']:.1f} | {plain['step']:.1f} | {chained['step']:.1f} | "
            f"{chained['step'] / plain['step']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="One small shape, 2 repeats (a smoke run).")
    parser.add_argument("--output", default=None, help="Write OUTPUT.json and OUTPUT.md.")
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = [(32, 4)] if args.quick else [(64, 8), (256, 8)]
    repeats = 2 if args.quick else args.repeats
    report = {
        "command": "python benchmarks/bench_chains.py" + (" --quick" if args.quick else ""),
        "version": __version__,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "repeats": repeats,
        "rows": [measure(length, batch, repeats) for length, batch in shapes],
    }
    text = markdown(report)
    print(text)
    if args.output:
        Path(f"{args.output}.json").write_text(json.dumps(report, indent=2))
        Path(f"{args.output}.md").write_text(text)


if __name__ == "__main__":
    main()
