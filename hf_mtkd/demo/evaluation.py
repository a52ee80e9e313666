"""Held-out evaluation of a model per domain: perplexity, distillation loss and the teachers' weights."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from datasets import Dataset
from torch import nn

from ..chunked import teacher_statistics
from ..losses import DistillationLoss, causal_lm_loss, multi_teacher_kd_loss
from ..settings import DistillationSettings
from ..teacher_cache import TeacherCacheCollator, TeacherLogitsCache, batch_teacher_logits
from ..teachers import pad_rows
from ..topk import TeacherLogits


@torch.no_grad()
def evaluate_domains(
    model: nn.Module,
    datasets: Mapping[str, Dataset],
    teachers: Sequence[nn.Module] | TeacherLogitsCache,
    *,
    weighted: Sequence[int] = (),
    weighting: DistillationSettings | None = None,
    routes: Mapping[str, Sequence[float]] | None = None,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    """
    Per domain (and `overall`, token-weighted): the model's `perplexity` (exact: it needs only the model);
    `kd_loss`, KL(p̄ ‖ q) at temperature 1 against the uniform probability mixture p̄ of all `teachers` (the same
    target for every method); and, when `weighting` (a method's loss settings) is given, the mean weight each of the
    teachers at positions `weighted` gets under it (`weight/<index>`), with each domain's rows routed by
    `routes[domain]` (a prior over the teachers at `weighted`, `hf_mtkd.routing`) when given.

    `teachers` are models run on every batch, or a teacher-logits cache whose rows `datasets` are (subsets of
    `cache.dataset`). From a cache, each teacher is its top-k form (`hf_mtkd.topk.TopKLogits`: its k most likely
    tokens exact, the rest of its mass spread evenly over the other tokens), so `kd_loss` is then the KL from the
    mixture of the teachers' top-k forms, not from their full distributions, and the weights are those of the
    top-k forms too.
    """
    model.eval()
    device = next(model.parameters()).device
    totals: dict[str, dict[str, float]] = {}
    for domain, dataset in datasets.items():
        sums: dict[str, float] = {}
        for start in range(0, len(dataset), batch_size):
            input_ids, teacher_logits = _batch(dataset, start, min(start + batch_size, len(dataset)), teachers, device)
            labels = input_ids
            logits = model(input_ids=input_ids).logits
            count = float(input_ids.shape[0] * (input_ids.shape[1] - 1))
            batch = {
                "tokens": count,
                "ce": causal_lm_loss(logits, labels).item() * count,
                "kd_loss": multi_teacher_kd_loss(logits, teacher_logits, labels, weighting="static").item() * count,
            }
            if weighting is not None:
                own = [teacher_logits[k] for k in weighted]
                prior = None if routes is None else torch.tensor([routes[domain]] * len(labels), device=device)
                weights = DistillationLoss(weighting).weights(own, labels, teacher_prior=prior)[:, :, :-1]
                for k, w in enumerate(weights.sum(dim=(1, 2)).tolist()):
                    batch[f"weight/{k}"] = w
            for key, value in batch.items():
                sums[key] = sums.get(key, 0.0) + value
        totals[domain] = sums
    totals["overall"] = {key: sum(t.get(key, 0.0) for t in totals.values()) for key in next(iter(totals.values()))}
    return {domain: _means(sums) for domain, sums in totals.items()}


def sample_continuations(model: nn.Module, prompts: torch.Tensor, new_tokens: int, pad_token_id: int) -> torch.Tensor:
    """
    `prompts` `[B, P]` and exactly `new_tokens` tokens after them, sampled from `model` at temperature 1 (its whole
    distribution: no top-k or top-p), `[B, P + new_tokens]`.
    """
    return model.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=pad_token_id,
    )


OWN_TEXT_METRICS = ("own_text_perplexity", "own_text_kl")
"""The metrics of `own_text_quality`, beside the held-out ones of a domain."""


@torch.no_grad()
def own_text_quality(
    model: nn.Module,
    datasets: Mapping[str, Dataset],
    judges: Mapping[str, nn.Module],
    *,
    prompt_tokens: int,
    new_tokens: int,
    seed: int,
    pad_token_id: int,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    r"""
    How well the model q writes each domain d, judged by d's specialist teacher $p_d$ (`judges[d]`): the first
    `prompt_tokens` of every block of `datasets[d]` are continued by `new_tokens` tokens x sampled from q at
    temperature 1 (seeded by `seed`), and over the sampled positions:

    * `own_text_perplexity`: $\exp(-\overline{\log p_d(x_t \mid x_{<t})})$, the specialist's perplexity of the
      model's own text;
    * `own_text_kl`: $\overline{\mathrm{KL}(q(\cdot \mid x_{<t}) \| p_d(\cdot \mid x_{<t}))}$, the reverse KL per
      token along the model's own samples (summed over a sample, it estimates the sequence-level
      $\mathrm{KL}(q \| p_d)$), what on-policy distillation lowers and off-policy distillation does not target.

    Per domain and `overall` (token-weighted); the global random state is left as it was.
    """
    model.eval()
    device = next(model.parameters()).device
    totals: dict[str, dict[str, float]] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for domain, dataset in datasets.items():
            sums = {"tokens": 0.0, "nll": 0.0, "kl": 0.0}
            for start in range(0, len(dataset), batch_size):
                prompts = torch.tensor(dataset[start : start + batch_size]["input_ids"], device=device)
                text = sample_continuations(model, prompts[:, :prompt_tokens], new_tokens, pad_token_id)
                labels = text.clone()
                labels[:, :prompt_tokens] = -100
                own, judged = model(input_ids=text).logits, judges[domain](input_ids=text).logits
                count = float(labels[:, 1:].ne(-100).sum())
                sums["tokens"] += count
                sums["nll"] += causal_lm_loss(judged, labels).item() * count
                kl = multi_teacher_kd_loss(own, [judged], labels, weighting="static", divergence="reverse_kl")
                sums["kl"] += kl.item() * count
            totals[domain] = sums
    totals["overall"] = {key: sum(t[key] for t in totals.values()) for key in ("tokens", "nll", "kl")}
    return {
        domain: {
            "own_text_perplexity": math.exp(sums["nll"] / sums["tokens"]),
            "own_text_kl": sums["kl"] / sums["tokens"],
        }
        for domain, sums in totals.items()
    }


@torch.no_grad()
def score_scales(
    datasets: Mapping[str, Dataset],
    teachers: Sequence[nn.Module] | TeacherLogitsCache,
    specialists: Mapping[str, int],
    *,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    r"""
    The size of the evidence the weightings see, per held-out domain d whose specialist is teacher `specialists[d]`
    (τ = 1), against the runner-up r (the other teacher with the lowest perplexity on d):

    * `token_margin_*`: $\Delta_t = \log p_{own}(y_{t+1}) - \log p_r(y_{t+1})$ per token (mean, std, share > 0),
      what `correctness` divides by its γ;
    * `block_margin_*`: $\sum_t \Delta_t$ over each block (mean, std, share > 0), what `likelihood` divides by γ;
    * `entropy_margin_*`: $H_r - H_{own}$ per token (mean, std, share > 0), what `entropy` divides by its γ.
    """
    out: dict[str, dict[str, float]] = {}
    cached = isinstance(teachers, TeacherLogitsCache)
    device = torch.device("cpu") if cached else next(teachers[0].parameters()).device
    for domain, dataset in datasets.items():
        if domain not in specialists:
            continue
        log_probs, entropies, blocks = [], [], []
        for start in range(0, len(dataset), batch_size):
            input_ids, logits = _batch(dataset, start, min(start + batch_size, len(dataset)), teachers, device)
            signals = teacher_statistics(logits, input_ids, temperature=1.0, position_ids=None, chunk_size=None)
            log_probs.append(signals.target_log_prob.double())
            entropies.append(signals.entropy.double())
            blocks.append(signals.mask.nonzero()[:, 0] + start)
        log_prob, entropy, block = torch.cat(log_probs, 1), torch.cat(entropies, 1), torch.cat(blocks)
        own = specialists[domain]
        others = [k for k in range(log_prob.shape[0]) if k != own]
        runner_up = max(others, key=lambda k: log_prob[k].mean().item())
        token = log_prob[own] - log_prob[runner_up]
        summed = token.new_zeros(len(dataset)).index_add_(0, block, token)
        out[domain] = {
            "runner_up": runner_up,
            **_spread("token_margin", token),
            **_spread("block_margin", summed),
            **_spread("entropy_margin", entropy[runner_up] - entropy[own]),
        }
    return out


def _spread(name: str, values: torch.Tensor) -> dict[str, float]:
    return {
        f"{name}_mean": values.mean().item(),
        f"{name}_std": values.std().item(),
        f"{name}_positive": (values > 0).double().mean().item(),
    }


def _batch(
    dataset: Dataset, start: int, stop: int, teachers: Sequence[nn.Module] | TeacherLogitsCache, device: torch.device
) -> tuple[torch.Tensor, list[TeacherLogits]]:
    """Rows `start:stop` as `[B, T]` input ids, and every teacher's logits on them (run, or read from the cache)."""
    if not isinstance(teachers, TeacherLogitsCache):
        input_ids = torch.tensor(dataset[start:stop]["input_ids"], device=device)
        return input_ids, [teacher(input_ids=input_ids).logits for teacher in teachers]
    collator = TeacherCacheCollator(
        lambda rows: {"input_ids": pad_rows([r["input_ids"] for r in rows])}, teachers.teacher_indices
    )
    batch = {key: value.to(device) for key, value in collator([dataset[i] for i in range(start, stop)]).items()}
    return batch["input_ids"], batch_teacher_logits(batch, teachers.manifest.vocab_size)


def _means(sums: dict[str, float]) -> dict[str, float]:
    tokens = sums["tokens"]
    means = {key: value / tokens for key, value in sums.items() if key not in ("tokens", "ce")}
    means["perplexity"] = math.exp(sums["ce"] / tokens)
    return means
