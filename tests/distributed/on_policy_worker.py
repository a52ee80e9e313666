"""An on-policy run (student and seq_kd teacher generating) on several processes, launched by `torchrun`.

Usage: `on_policy_worker.py OUTPUT_DIR DEEPSPEED` (a shipped config name such as `zero3`, or `none` for DDP). Every
process builds the same tiny models from seeds; rank 0 writes `OUTPUT_DIR/report.json`: the training logs and, per
process, each micro-batch's writer and labelled tokens, and whether the student's weights were partitioned.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from datasets import Dataset

from hf_mtkd import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer
from hf_mtkd.on_policy import GENERATED_BY_KEY
from hf_mtkd.testing import chat_tokenizer, synthetic_conversations, tiny_causal_lm


def main(output_dir: str, deepspeed: str) -> None:
    conversations = synthetic_conversations(32, seed=0)
    tokenizer = chat_tokenizer(conversations, "chatml", 512, "bpe")
    rows = Dataset.from_list([{"prompt": m[0]["content"], "completion": " " + m[1]["content"]} for m in conversations])
    teachers = [tiny_causal_lm("gpt2", tokenizer, seed=3), tiny_causal_lm("llama", tokenizer, seed=4)]
    # built before the arguments, so not created partitioned (zero.Init)
    student = tiny_causal_lm("qwen2", tokenizer, seed=1)
    # EOS likely after about half the contexts: the processes' completions end after different numbers of tokens, so
    # a process that stopped generating early would wait for the others (without synced_gpus, forever)
    with torch.no_grad():
        student.lm_head.weight[tokenizer.eos_token_id] *= 30
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
    writers, labels = [], []
    compute_loss = trainer.compute_loss

    def recorded(model, inputs, **kwargs):
        writers.append(inputs.get(GENERATED_BY_KEY))
        labels.append(int((inputs["labels"] != -100).sum()))
        return compute_loss(model, inputs, **kwargs)

    trainer.compute_loss = recorded
    trainer.train()
    local = {
        "labels": labels,
        "writers": writers,
        "partitioned": all(hasattr(p, "ds_id") for p in trainer.model.parameters()),
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if args.process_index == 0:
        with open(os.path.join(output_dir, "report.json"), "w") as file:
            json.dump({"log_history": trainer.state.log_history, "ranks": gathered}, file, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
