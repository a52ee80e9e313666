"""What the trainer tests share: a tiny configuration and a trainer on the conftest's student and teachers."""

from hf_mtkd import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer

TEACHER_NAMES = ["gpt2", "llama", "gpt_neox"]


def tiny_config(tmp_path, **config):
    """A `MultiTeacherDistillationConfig` for a few logged steps on the CPU, without saving; `config` overrides."""
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    return MultiTeacherDistillationConfig(**{**defaults, **config})


def make_trainer(tmp_path, student, teachers, dataset, tokenizer, **config):
    args = tiny_config(tmp_path, **{"teacher_names": TEACHER_NAMES[: len(teachers)], **config})
    return MultiTeacherDistillationTrainer(
        model=student,
        teachers=teachers,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(16)),
        processing_class=tokenizer,
    )
