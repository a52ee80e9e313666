"""A confidently wrong teacher fools entropy weighting; the label-aware weightings route around it."""

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM

from hf_mtkd import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer
from hf_mtkd.testing import ConfidentlyWrongTeacher, synthetic_corpus


@pytest.fixture(scope="module")
def results(tmp_path_factory, teacher_dirs, dataset, tokenizer, make_student_module):
    held_out = Dataset.from_dict({"text": synthetic_corpus(64, seed=99)}).map(
        lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"]
    )
    bad = ConfidentlyWrongTeacher(AutoModelForCausalLM.from_pretrained(teacher_dirs[0]), sharpness=4.0)
    teachers = [bad, *teacher_dirs[1:]]
    out = {}
    for weighting in ("entropy", "correctness", "posterior"):
        args = MultiTeacherDistillationConfig(
            output_dir=str(tmp_path_factory.mktemp(weighting)),
            max_steps=60,
            per_device_train_batch_size=8,
            learning_rate=3e-3,
            alpha_ce=0.2,
            alpha_kd=0.8,
            teacher_weighting=weighting,
            teacher_names=["bad", "llama", "gpt_neox"],
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
        )
        trainer = MultiTeacherDistillationTrainer(
            model=make_student_module(),
            teachers=teachers,
            args=args,
            train_dataset=dataset,
            eval_dataset=held_out,
            processing_class=tokenizer,
        )
        trainer.train()
        out[weighting] = trainer.evaluate()
    return out


def test_entropy_weighting_trusts_the_confident_wrong_teacher(results):
    assert results["entropy"]["eval_teacher_weight/bad"] > 0.5


@pytest.mark.parametrize("weighting", ["correctness", "posterior"])
def test_label_aware_weightings_route_around_it(results, weighting):
    assert results[weighting]["eval_teacher_weight/bad"] < 0.05
    assert results[weighting]["eval_perplexity"] < 0.8 * results["entropy"]["eval_perplexity"]
