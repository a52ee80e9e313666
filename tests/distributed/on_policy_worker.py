"""An on-policy run (student and seq_kd teacher generating) on several processes, launched by `torchrun`.

Usage: `on_policy_worker.py OUTPUT_DIR DEEPSPEED [GATHER ...]` (DEEPSPEED: a shipped config name such as `zero3`, or
`none` for DDP; each GATHER, `true` or `false`, is one run with that `ds3_gather_for_generation`, default `true`).
Every process builds the same tiny models from seeds for each run; rank 0 writes `OUTPUT_DIR/report.json`: per run,
the training logs and, per process, each micro-batch's writer, token ids and labelled tokens, whether the student's
weights were partitioned, and for each generation whether it ran with `synced_gpus` and on whole weights.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from datasets import Dataset
from torch import nn

from hf_mtkd import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer, on_policy
from hf_mtkd.on_policy import GENERATED_BY_KEY
from hf_mtkd.testing import chat_tokenizer, synthetic_conversations, tiny_causal_lm


def models(tokenizer: Any) -> tuple[nn.Module, list[nn.Module]]:
    """The student and the teachers of a run, from seeds."""
    teachers = [tiny_causal_lm("gpt2", tokenizer, seed=3), tiny_causal_lm("llama", tokenizer, seed=4)]
    student = tiny_causal_lm("qwen2", tokenizer, seed=1)
    # EOS likely after about half the contexts: the processes' completions end after different numbers of tokens, so
    # a process that stopped generating early would wait for the others (without synced_gpus, forever)
    with torch.no_grad():
        student.lm_head.weight[tokenizer.eos_token_id] *= 30
    return student, teachers


def train(output_dir: str, deepspeed: str, gather: bool, student: nn.Module, teachers: list[nn.Module]) -> dict:
    """One run; returns this process's records and the training logs."""
    conversations = synthetic_conversations(32, seed=0)
    tokenizer = chat_tokenizer(conversations, "chatml", 512, "bpe")
    rows = Dataset.from_list([{"prompt": m[0]["content"], "completion": " " + m[1]["content"]} for m in conversations])
    args = MultiTeacherDistillationConfig(
        output_dir=output_dir,
        deepspeed=None if deepspeed == "none" else deepspeed,
        use_cpu=True,
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        lmbda=0.5,
        seq_kd=True,
        seq_kd_teacher="llama",
        max_new_tokens=12,
        generation_temperature=0.9,
        ds3_gather_for_generation=gather,
        teacher_names=["gpt2", "llama"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    trainer = MultiTeacherDistillationTrainer(
        model=student,
        teachers=teachers,
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
    )
    writers, labels, input_ids, generations = [], [], [], []
    compute_loss, generate = trainer.compute_loss, on_policy.generate_completions

    def recorded(model, inputs, **kwargs):
        writers.append(inputs.get(GENERATED_BY_KEY))
        labels.append(int((inputs["labels"] != -100).sum()))
        input_ids.append(inputs["input_ids"].tolist())
        return compute_loss(model, inputs, **kwargs)

    def generation(model, prompts, sampling, **kwargs):
        statuses = [getattr(p, "ds_status", None) for p in model.parameters()]  # ZeRO-3: AVAILABLE when whole
        whole = all(status is None or status.name == "AVAILABLE" for status in statuses)
        generations.append({"synced_gpus": kwargs["synced_gpus"], "whole": whole})
        return generate(model, prompts, sampling, **kwargs)

    trainer.compute_loss = recorded
    on_policy.generate_completions = generation
    try:
        trainer.train()
    finally:
        on_policy.generate_completions = generate
    local = {
        "labels": labels,
        "writers": writers,
        "input_ids": input_ids,
        "generations": generations,
        "partitioned": all(hasattr(p, "ds_id") for p in trainer.model.parameters()),
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {"log_history": trainer.state.log_history, "ranks": gathered}


def main(output_dir: str, deepspeed: str, settings: list[str]) -> None:
    settings = settings or ["true"]
    tokenizer = chat_tokenizer(synthetic_conversations(32, seed=0), "chatml", 512, "bpe")
    # every run's models built before the first arguments, so not created partitioned (zero.Init)
    built = [models(tokenizer) for _ in settings]
    runs = {
        setting: train(output_dir, deepspeed, setting == "true", *run_models)
        for setting, run_models in zip(settings, built, strict=True)
    }
    if dist.get_rank() == 0:
        with open(os.path.join(output_dir, "report.json"), "w") as file:
            json.dump(runs, file, indent=1)
    dist.barrier()  # no process exits before rank 0 has written the report (docs/scaling.md, "The gloo abort ...")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
