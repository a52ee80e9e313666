"""Teacher sources: one interface, so the trainer never asks which kind it holds and a new source is one class."""

import ast
from pathlib import Path

import pytest
import torch
from trainer_helpers import tiny_config

import hf_mtkd.trainer
from hf_mtkd import MultiTeacherDistillationTrainer
from hf_mtkd.sources import TeacherBatch, TeacherOutput, TeacherSource
from hf_mtkd.teachers import load_teachers

KINDS = {
    "TeacherLogitsCache",
    "LiveTeachers",
    "CachedTeacherLogits",
    "SharedVocabularyTeacher",
    "CrossTokenizerTeacher",
    "MultiTokenizerCollator",
    "TeacherCacheCollator",
    "VocabularyMap",
    "CACHE_COLUMNS",
    "TEACHER_INPUTS_KEY",
}
"""Names that tell one kind of teacher source from another."""


def test_the_trainer_never_asks_which_kind_of_source_it_holds():
    tree = ast.parse(Path(hf_mtkd.trainer.__file__).read_text(encoding="utf-8"))
    annotations = {
        id(n) for a in ast.walk(tree) if isinstance(a, ast.arg) and a.annotation for n in ast.walk(a.annotation)
    }
    used = {
        node.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and node.id in KINDS and id(node) not in annotations
    }
    assert used == set()


class ServedTeacher(TeacherSource):
    """A fourth source in one class: a teacher answered by a function (as by another process), on the student's ids."""

    def __init__(self, name, serve):
        self.names, self.records, self.serve = [name], [{"name": name}], serve

    def describe(self, args):
        return f"1 served teacher ({self.names[0]})"

    def __call__(self, inputs, *, student_vocab, temperature, output_hidden_states):
        return TeacherBatch([TeacherOutput(self.serve(inputs["input_ids"], inputs["attention_mask"]))])


def test_a_served_teacher_is_one_class_and_trains_like_the_live_one(
    tmp_path, make_student, teacher_dirs, dataset, tokenizer
):
    (teacher,) = load_teachers(teacher_dirs[:1])

    @torch.no_grad()
    def serve(input_ids, attention_mask):
        return teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    runs = {}
    for name, teachers in (("live", [teacher]), ("served", ServedTeacher("gpt2", serve))):
        trainer = MultiTeacherDistillationTrainer(
            model=make_student(),
            teachers=teachers,
            args=tiny_config(tmp_path / name, max_steps=2, teacher_names=["gpt2"]),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
        runs[name] = [
            {k: v for k, v in log.items() if k.startswith(("loss", "teacher_"))}
            for log in trainer.state.log_history[:-1]
        ]
    assert runs["served"] == runs["live"] and len(runs["live"]) == 2 and "loss_kd" in runs["live"][0]
    with pytest.raises(ValueError, match="`teacher_weights` has 2 entries but there are 1 teachers"):
        MultiTeacherDistillationTrainer(
            model=make_student(),
            teachers=ServedTeacher("gpt2", serve),
            args=tiny_config(tmp_path, teacher_weights=[1, 1]),
        )
    with pytest.raises(ValueError, match=r"`prompt_evidence=True` needs .* gives no log-probabilities of the prompt"):
        MultiTeacherDistillationTrainer(  # a source that does not give them is refused before training
            model=make_student(),
            teachers=ServedTeacher("gpt2", serve),
            args=tiny_config(tmp_path, teacher_names=["gpt2"], prompt_evidence=True),
        )
