"""One distillation run for the distributed tests, launched by `torchrun` (or as a plain process for references).

Usage: `worker.py SPEC.json`. The spec names the saved tokenizer/student/teachers (and the tokenizers of teachers on
their own, `teacher_tokenizers`), the DeepSpeed config (or none),
the batch layout, the optimizer (and, for one process, noise to add to the gradients) and what to do (`train`, or
`evaluate` a saved student in a fresh process). Rank 0 writes a JSON report: the training logs, evaluation metrics
and, per process, how much of each teacher and of the student it holds.
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import sys

import torch
import torch.distributed as dist
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from hf_mtkd import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer
from hf_mtkd.testing import synthetic_corpus
from hf_mtkd.trainer import PROJECTOR_WEIGHTS_NAME


def tokenized(tokenizer, num_texts: int, seed: int, text: bool = False) -> Dataset:
    """`num_texts` texts tokenized for the student, or kept as text (`text`: for cross-tokenizer teachers)."""
    texts = synthetic_corpus(num_texts, seed=seed)
    if text:
        return Dataset.from_dict({"text": texts})
    return Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"]
    )


def holdings(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of `model` in full (`total`), in this process's ZeRO-3 shard (`shard`) and materialised now."""
    params = list(model.parameters())
    return {
        "total": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "shard": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
        "materialized": sum(p.numel() for p in params),
        "partitioned": all(hasattr(p, "ds_id") for p in params),
        "dtype": str(params[0].dtype),
    }


def add_gradient_noise(parameters: list[torch.nn.Parameter], scale: float) -> None:
    """
    Add noise drawn uniformly from [-scale, scale] to every gradient coordinate of `parameters` as it is computed: a
    stand-in for the rounding of another reduction order (processes, micro-batches, threads), for one process.
    """
    generator = torch.Generator().manual_seed(0)

    def perturb(grad: torch.Tensor) -> torch.Tensor:
        return grad + scale * (2 * torch.rand(grad.shape, generator=generator, dtype=grad.dtype) - 1)

    for parameter in parameters:
        parameter.register_hook(perturb)


def main(spec_path: str) -> None:
    with open(spec_path) as file:
        spec = json.load(file)
    logging.set_verbosity_info()
    package_logger = pylogging.getLogger("hf_mtkd")  # the package's info lines (where the teachers live)
    package_logger.setLevel(pylogging.INFO)
    package_logger.addHandler(pylogging.StreamHandler())
    tokenizer = AutoTokenizer.from_pretrained(spec["teachers"][0])
    # The first teacher is an in-memory model built before the arguments (so never created under zero.Init); the
    # others are paths, loaded by the trainer.
    teachers = [AutoModelForCausalLM.from_pretrained(spec["teachers"][0]), *spec["teachers"][1:]]
    args = MultiTeacherDistillationConfig(
        output_dir=spec["output_dir"],
        deepspeed=spec.get("deepspeed"),
        use_cpu=True,
        max_steps=spec.get("max_steps", 3),
        per_device_train_batch_size=spec["per_device_train_batch_size"],
        gradient_accumulation_steps=spec.get("gradient_accumulation_steps", 1),
        per_device_eval_batch_size=4,
        learning_rate=spec["learning_rate"],
        optim=spec["optim"],
        **{key: spec[key] for key in ("optim_args", "adam_epsilon") if key in spec},
        alpha_feat=0.1,
        teacher_names=spec.get("teacher_names"),
        teacher_dtype=spec.get("teacher_dtype", "auto"),
        logging_steps=1,
        save_strategy="steps" if spec.get("save_steps") else "no",
        save_steps=spec.get("save_steps") or 500,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    student = AutoModelForCausalLM.from_pretrained(spec["student"])
    own = spec.get("teacher_tokenizers")  # None, or a path (or null) per teacher
    trainer = MultiTeacherDistillationTrainer(
        model=student,
        teachers=teachers,
        args=args,
        train_dataset=tokenized(tokenizer, 8, seed=3, text=own is not None),
        eval_dataset=tokenized(tokenizer, 16, seed=4, text=own is not None),
        processing_class=tokenizer,
        teacher_tokenizers=None if own is None else [path and AutoTokenizer.from_pretrained(path) for path in own],
    )
    if spec.get("gradient_noise"):
        add_gradient_noise([*trainer.model.parameters(), *trainer.projector.parameters()], spec["gradient_noise"])
    report: dict = {
        "world_size": args.world_size,
        "teacher_types": [type(t).__name__ for t in trainer.teachers],
        "cross_tokenizer": trainer.cross_tokenizer,
    }
    if spec["action"] == "evaluate":
        trainer.projector.load_state_dict(load_file(os.path.join(spec["student"], PROJECTOR_WEIGHTS_NAME)))
    else:
        trainer.train(resume_from_checkpoint=spec.get("resume_from_checkpoint"))
        report["log_history"] = trainer.state.log_history
        if spec["save_dir"]:
            trainer.save_model(spec["save_dir"])
    report["eval"] = trainer.evaluate()
    # which models the loss read logit-free, after training and evaluation (a model that fell back is None)
    report["logit_free"] = {
        "student": trainer.logit_free.student is not None,
        "teachers": [runner is not None for runner in trainer.logit_free.teachers],
    }
    local = {
        "teachers": [holdings(t) for t in trainer.teachers],
        "student": holdings(trainer.model),
        "projector": holdings(trainer.projector),
    }
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    report["ranks"] = gathered
    if args.process_index == 0:
        with open(spec["report"], "w") as file:
            json.dump(report, file, indent=1)
    if dist.is_initialized():
        dist.barrier()  # no process exits before rank 0 has written the report (docs/scaling.md, "The gloo abort ...")
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
