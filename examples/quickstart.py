from datasets import Dataset

from hf_mtkd import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer
from hf_mtkd.testing import fit_causal_lm, synthetic_corpus, tiny_causal_lm, train_tiny_tokenizer

# Offline stand-ins. With real models: teachers=["org/teacher-a", "path/to/teacher-b", model_c] and a student
# from AutoModelForCausalLM.from_pretrained(...), all sharing one tokenizer.
texts = synthetic_corpus(512)
tokenizer = train_tiny_tokenizer(texts)
teachers = [
    fit_causal_lm(tiny_causal_lm(arch, tokenizer, hidden_size=64, num_layers=4, seed=k), tokenizer, texts)
    for k, arch in enumerate(["gpt2", "llama", "gpt_neox"])
]
student = tiny_causal_lm("qwen2", tokenizer, hidden_size=32, num_layers=2)
data = Dataset.from_dict({"text": texts}).map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])

args = MultiTeacherDistillationConfig(
    output_dir="distilled-student", max_steps=100, learning_rate=3e-3, temperature=2.0, alpha_ce=0.5,
    alpha_kd=0.5, alpha_feat=0.1, teacher_weighting="posterior", logging_steps=25, report_to="none",
)  # fmt: skip
trainer = MultiTeacherDistillationTrainer(
    model=student, teachers=teachers, args=args, train_dataset=data, eval_dataset=data.select(range(64)),
    processing_class=tokenizer,
)  # fmt: skip
trainer.train()
print(trainer.evaluate())  # eval_loss_kd, eval_perplexity, eval_teacher_weight/<teacher>, ...
trainer.save_model()  # a plain student: AutoModelForCausalLM.from_pretrained("distilled-student")
