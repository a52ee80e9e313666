"""Distill several teacher LMs into a student on a text dataset, on one device or many.

Every `MultiTeacherDistillationConfig` field is a flag (`--temperature`, `--alpha_feat`, `--deepspeed zero3`, ...).
Launch it with `python`, `torchrun`, `accelerate launch` or `deepspeed`; see "Scaling to many GPUs" in the README:

    accelerate launch --num_processes 8 examples/distill.py --student S --teachers T1 T2 T3 \\
        --dataset_name D --deepspeed zero3 --bf16 --teacher_dtype bfloat16 --output_dir out
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from hf_mtkd import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer


@dataclass
class ScriptArguments:
    student: str = field(metadata={"help": "Name or path of the student model (a causal LM)."})
    teachers: list[str] = field(metadata={"help": "Names or paths of the teachers, sharing the student's tokenizer."})
    dataset_name: str = field(
        metadata={"help": "Dataset for `datasets.load_dataset`: a Hub name or a format ('json') with --data_files."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_files: list[str] | None = field(default=None, metadata={"help": "Local data files, e.g. train.jsonl."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    text_column: str = field(default="text", metadata={"help": "Column holding the raw text."})
    max_length: int = field(default=1024, metadata={"help": "Texts are truncated to this many tokens."})


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, MultiTeacherDistillationConfig))
    script_args, training_args = parser.parse_args_into_dataclasses()
    # Models are loaded after the arguments, so that under ZeRO-3 they are created already partitioned.
    tokenizer = AutoTokenizer.from_pretrained(script_args.student)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    student = AutoModelForCausalLM.from_pretrained(script_args.student)
    dataset = load_dataset(
        script_args.dataset_name,
        script_args.dataset_config,
        data_files=script_args.data_files,
        split=script_args.dataset_split,
    )

    def tokenize(batch: dict) -> dict:
        return tokenizer(batch[script_args.text_column], truncation=True, max_length=script_args.max_length)

    with training_args.main_process_first(desc="tokenizing"):
        dataset = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
    trainer = MultiTeacherDistillationTrainer(
        model=student,
        teachers=script_args.teachers,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()


if __name__ == "__main__":
    main()
