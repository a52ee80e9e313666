"""
Loss fingerprint of a checkout, for refactors that must not change a number: the functional API on fixed random
tensors (every weighting x granularity x fusion x dense/top-k/mixed teachers x none/mask/routing/floor: the loss, its
terms, the weights, the entropies and the gradient), the ULD loss, six fixed-seed trainer runs (entropy with
features; posterior, sequence, logit fusion and a floor; routing; a teacher-logits cache; cross-tokenizer KL with
features; cross-tokenizer ULD: every logged value and the evaluation) and the demo's evaluation, each as float.hex().

    PYTHONPATH=. HF_HUB_OFFLINE=1 python scripts/loss_fingerprint.py before.json   # in each checkout
    python scripts/loss_fingerprint.py --compare before.json after.json            # exit 1 on any difference
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
from typing import Any

import torch
from datasets import Dataset

WEIGHTINGS = ["static", "entropy", "correctness", "posterior", "entropy+posterior"]


def total(t: torch.Tensor) -> str:
    return float(t.detach().double().sum()).hex()


def functional() -> dict[str, Any]:
    from hf_mtkd import (
        TopKLogits,
        causal_lm_loss,
        compute_teacher_weights,
        multi_teacher_kd,
        multi_teacher_kd_loss,
        universal_logit_distillation_loss,
    )

    g = torch.Generator().manual_seed(0)
    b, t, v, k = 3, 9, 40, 3
    student = torch.randn(b, t, v, generator=g)
    teachers = [3 * torch.randn(b, t, v, generator=g) for _ in range(k)]
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 5:] = -100
    labels[2, :2] = -100
    mask = torch.rand(k, b, t, generator=g) > 0.3
    prior = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [1.0, 1.0, 1.0]])
    topk = [TopKLogits.from_logits(z, 7) for z in teachers]
    forms = {"dense": teachers, "topk": topk, "mixed": [teachers[0], *topk[1:]]}
    extras = {
        "none": {},
        "mask": {"teacher_mask": mask},
        "prior": {"teacher_prior": prior},
        "minw": {"min_weight": 0.1},
    }
    out: dict[str, Any] = {}
    grid = itertools.product(WEIGHTINGS, ["token", "sequence", "batch"], ["probability", "logit"], forms, extras)
    for weighting, granularity, fusion, form, extra in grid:
        options = dict(
            temperature=2.0, weighting=weighting, granularity=granularity, entropy_temperature=0.7,
            teacher_weights=[0.5, 0.3, 0.2], label_temperature=1.3, posterior_decay=0.8, chunk_size=5, **extras[extra],
        )  # fmt: skip
        x = student.clone().requires_grad_()
        kd = multi_teacher_kd(x, forms[form], labels, fusion=fusion, alpha_ce=0.4, alpha_kd=0.6, **options)
        kd.loss.backward()
        key = f"{weighting}/{granularity}/{fusion}/{form}/{extra}"
        out[key] = [total(kd.loss), total(kd.loss_kd), total(kd.loss_ce), total(kd.weights)]
        out[key] += [total(kd.signals.entropy), total(x.grad), total(x.grad**2)]
        out[key + "/w"] = total(compute_teacher_weights(forms[form], labels, **options) ** 2)
    x = student.clone().requires_grad_()
    loss = multi_teacher_kd_loss(x, teachers, labels, temperature=1.0, weighting="entropy")
    loss.backward()
    out["kd_loss_t1"] = [total(loss), total(x.grad)]
    weights = compute_teacher_weights(teachers, labels, temperature=2.0)
    x = student.clone().requires_grad_()
    uld = universal_logit_distillation_loss(
        x, [z[..., :30] for z in teachers], labels, weights, temperature=2.0, chunk_size=4
    )
    uld.backward()
    out["uld"] = [total(uld), total(x.grad)]
    out["ce"] = total(causal_lm_loss(student, labels))
    return out


def logged(values: dict[str, Any]) -> dict[str, str]:
    skip = ("runtime", "per_second", "total_flos")
    return {k: float(v).hex() for k, v in sorted(values.items()) if isinstance(v, float) and not k.endswith(skip)}


def trainer_runs() -> dict[str, Any]:
    from hf_mtkd import MultiTeacherDistillationConfig, MultiTeacherDistillationTrainer, cache_teacher_logits
    from hf_mtkd.demo.evaluation import evaluate_domains
    from hf_mtkd.teachers import load_teachers
    from hf_mtkd.testing import fit_causal_lm, synthetic_corpus, tiny_causal_lm, train_tiny_tokenizer

    corpus = synthetic_corpus(64, seed=0)
    tokenizer = train_tiny_tokenizer(corpus)
    ids = Dataset.from_dict({"text": corpus}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=24), batched=True, remove_columns=["text"]
    )
    tmp = tempfile.mkdtemp()
    shared = []
    for k, model_type in enumerate(["gpt2", "llama"]):
        model = tiny_causal_lm(model_type, tokenizer, seed=10 + k)
        fit_causal_lm(model, tokenizer, corpus, steps=10, seed=k)
        model.save_pretrained(f"{tmp}/t{k}")
        tokenizer.save_pretrained(f"{tmp}/t{k}")
        shared.append(f"{tmp}/t{k}")
    other = train_tiny_tokenizer(corpus, 300)
    model = tiny_causal_lm("gpt_neox", other, seed=20)
    fit_causal_lm(model, other, corpus, steps=10, seed=3)
    model.save_pretrained(f"{tmp}/x")
    other.save_pretrained(f"{tmp}/x")
    out: dict[str, Any] = {}

    def run(name: str, teachers: Any, train: Any, **config: Any) -> None:
        args = MultiTeacherDistillationConfig(
            output_dir=f"{tmp}/{name}", max_steps=3, per_device_train_batch_size=4, learning_rate=3e-3,
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=0, **config,
        )  # fmt: skip
        trainer = MultiTeacherDistillationTrainer(
            model=tiny_causal_lm("qwen2", tokenizer, seed=1), teachers=teachers, args=args, train_dataset=train,
            eval_dataset=train.select(range(8)), processing_class=tokenizer,
        )  # fmt: skip
        trainer.train()
        out["trainer/" + name] = [logged(log) for log in trainer.state.log_history] + [logged(trainer.evaluate())]

    run("entropy_feat", shared, ids, alpha_feat=0.1, teacher_weighting="entropy")
    run("posterior_seq_logit", shared, ids, teacher_weighting="posterior", weighting_granularity="sequence",
        fusion="logit", min_weight=0.05)  # fmt: skip
    routed = ids.add_column("teacher_ids", [i % 3 if i % 3 < 2 else None for i in range(len(ids))])
    run("routing_static", shared, routed, teacher_weighting="static")
    cache = cache_teacher_logits(shared, ids, f"{tmp}/cache", k=8, tokenizer=tokenizer)
    run("cache", cache, cache.dataset, teacher_weighting="entropy")
    texts = Dataset.from_dict({"text": corpus})
    run("cross_kl", [shared[0], f"{tmp}/x"], texts, cross_tokenizer_max_length=20, alpha_feat=0.1)
    run("cross_uld", [shared[0], f"{tmp}/x"], texts, cross_tokenizer_max_length=20, cross_tokenizer_loss="uld")

    blocks = ids.filter(lambda e: len(e["input_ids"]) >= 8).map(
        lambda e: {"input_ids": e["input_ids"][:8]}, remove_columns=ids.column_names
    )
    domains = {"a": blocks.select(range(8)), "b": blocks.select(range(8, 20))}
    fields = {"teacher_weighting": "entropy+posterior", "temperature": 2.0, "posterior_decay": 0.7}
    student = tiny_causal_lm("qwen2", tokenizer, seed=1)
    result = evaluate_domains(student, domains, load_teachers(shared), weighted=[0, 1], weighting=settings(fields))
    out["demo_eval"] = {d: logged(m) for d, m in result.items()}
    rows = {"a": cache.dataset.filter(lambda e: len(e["input_ids"]) == 12).select(range(4))}
    fields = {"teacher_weighting": "entropy", "temperature": 1.0}
    result = evaluate_domains(student, rows, cache, weighted=[0, 1], weighting=settings(fields))
    out["demo_eval_cache"] = {d: logged(m) for d, m in result.items()}
    return out


def settings(fields: dict[str, Any]) -> Any:
    """The demo's weighting argument: `DistillationSettings`, or the keywords the demo passed before them."""
    try:
        from hf_mtkd.settings import DistillationSettings
    except ImportError:
        return {("weighting" if k == "teacher_weighting" else k): v for k, v in fields.items()}
    return DistillationSettings.from_fields(fields)


def compare(before: str, after: str) -> int:
    with open(before) as a, open(after) as b:
        old, new = json.load(a), json.load(b)
    differ = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    print(f"{len(old)} entries; " + ("identical" if not differ else f"{len(differ)} differ: {differ[:10]}"))
    return 1 if differ else 0


def main() -> int:
    if sys.argv[1:2] == ["--compare"]:
        return compare(*sys.argv[2:4])
    os.environ["HF_HUB_OFFLINE"] = "1"
    fingerprint = {**functional(), **trainer_runs()}
    with open(sys.argv[1], "w") as file:
        json.dump(fingerprint, file, indent=0, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
