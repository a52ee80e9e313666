"""The demo's report: a table (printed and Markdown), the results as JSON, and a plot."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from .evaluation import OWN_TEXT_METRICS


def summarize(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def add_summaries(results: dict[str, Any]) -> None:
    """Each method's mean and spread over seeds of every test metric and of the throughput."""
    for entry in results["methods"].values():
        runs = entry["runs"]
        statistics = [key for key in runs[0] if key in RUN_STATISTICS or key.startswith("on_policy_weight/")]
        summary = {key: summarize([r[key] for r in runs]) for key in statistics}
        for domain, metrics in runs[0]["test"].items():
            for key in metrics:
                summary[f"{domain}/{key}"] = summarize([r["test"][domain][key] for r in runs])
        entry["summary"] = summary


RUN_STATISTICS = (
    "tokens_per_second",
    "train_seconds",
    "on_policy_share",
    "generated_per_step",
    "generation_seconds_per_step",
)
"""What a run records beside its test metrics (`hf_mtkd.demo.run.run_statistics`), and `on_policy_weight/<teacher>`."""


def compare(results: dict[str, Any], method: str, baseline: str, metric: str = "overall/perplexity") -> dict | None:
    """
    Relative change of `method` over `baseline` in `metric`, paired by seed (both runs of a seed share the student's
    initialisation and data order, so most of the seed noise cancels): the mean and spread of the per-seed changes,
    and whether the change is clear, i.e. of one sign on every seed and beyond twice its standard error.
    """
    entries = results["methods"]
    if method not in entries or baseline not in entries:
        return None
    domain, key = metric.split("/", 1)
    ours = {run["seed"]: run["test"][domain][key] for run in entries[method]["runs"]}
    theirs = {run["seed"]: run["test"][domain][key] for run in entries[baseline]["runs"]}
    changes = [100 * (ours[seed] - theirs[seed]) / theirs[seed] for seed in sorted(ours.keys() & theirs.keys())]
    summary = summarize(changes)
    standard_error = summary["std"] / math.sqrt(len(changes))
    same_sign = all(c < 0 for c in changes) or all(c > 0 for c in changes)
    return {
        "baseline": baseline,
        "metric": metric,
        "relative_change_percent": summary["mean"],
        "relative_change_std": summary["std"],
        "seeds": len(changes),
        "clear": bool(len(changes) > 1 and same_sign and abs(summary["mean"]) > 2 * standard_error),
    }


ROUTING = "domain routing"
"""The routing-by-hand row (`hf_mtkd.demo.methods.ROUTING`)."""
WEIGHTINGS_SHOWN = ("entropy", "correctness", "posterior", "entropy+posterior", "likelihood")
"""The dynamic weightings whose weights the report tabulates, when they ran."""


def best_single(results: dict[str, Any]) -> str | None:
    """The single-teacher row with the lowest mean overall test perplexity."""
    singles = [name for name in results["methods"] if name.startswith("single: ")]
    return min(singles, key=lambda n: results["methods"][n]["summary"]["overall/perplexity"]["mean"], default=None)


def comparisons(results: dict[str, Any]) -> dict[str, Any]:
    """
    The default weighting (`results["default_method"]`) and the other dynamic weightings against the best single
    teacher, the static ensemble and domain routing; and the run's own `pairs` (row, baseline), as the on-policy
    comparison's on- against off-policy rows.
    """
    single = best_single(results)
    default = results.get("default_method", "entropy")
    methods = [default, *[m for m in ("entropy", "entropy + features", *WEIGHTINGS_SHOWN) if m != default]]
    out = {}
    scored = {key for entry in results["methods"].values() for key in entry["runs"][0]["test"]["overall"]}
    own_text = [f"overall/{key}" for key in OWN_TEXT_METRICS if key in scored]
    pairs = [(m, b) for m in dict.fromkeys(methods) for b in (single, "static ensemble", ROUTING) if b and b != m]
    for method, baseline in [*pairs, *map(tuple, results.get("pairs", ()))]:
        for metric in ("overall/perplexity", "overall/kd_loss", *own_text):
            found = compare(results, method, baseline, metric)
            if found:
                out[f"{method} vs {baseline} ({metric})"] = found
    return out


def gap_closed(results: dict[str, Any], method: str) -> dict[str, float] | None:
    """
    The share of the static-to-routing gap in overall test perplexity that `method` closes, paired by seed:
    $(ppl_{static} - ppl_{method}) / (ppl_{static} - ppl_{routing})$ per seed (mean and spread; 1 = as good as
    routing by hand, 0 = no better than the static ensemble).
    """
    entries = results["methods"]
    if any(name not in entries for name in (method, "static ensemble", ROUTING)):
        return None

    def by_seed(name: str) -> dict[int, float]:
        return {run["seed"]: run["test"]["overall"]["perplexity"] for run in entries[name]["runs"]}

    ours, static, routing = by_seed(method), by_seed("static ensemble"), by_seed(ROUTING)
    seeds = sorted(ours.keys() & static.keys() & routing.keys())
    shares = [(static[s] - ours[s]) / (static[s] - routing[s]) for s in seeds if static[s] != routing[s]]
    if not shares:
        return None
    return {"method": method, **summarize(shares), "seeds": len(shares)}


def _cell(summary: dict[str, float], digits: int = 2) -> str:
    if summary["std"] == 0:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def markdown_table(results: dict[str, Any]) -> str:
    domains = results["domains"]
    header = ["method", *[f"ppl {d}" for d in domains], "ppl overall", "KD loss", "tokens/s", "params"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for domain, teacher in results["teachers"].items():
        test = teacher["test"]
        cells = [f"{test[d]['perplexity']:.2f}" for d in [*domains, "overall"]]
        row = [f"*teacher: {domain} ({teacher['architecture']})*", *cells, "", "", f"{teacher['parameters']:,}"]
        lines.append("| " + " | ".join(row) + " |")
    student_parameters = f"{results['student']['parameters']:,}"
    for name, entry in results["methods"].items():
        s = entry["summary"]
        cells = [_cell(s[f"{d}/perplexity"]) for d in [*domains, "overall"]]
        row = [name, *cells, _cell(s["overall/kd_loss"], 3), _cell(s["tokens_per_second"], 0), student_parameters]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def on_policy_table(results: dict[str, Any]) -> str | None:
    """
    Per method: the share of on-policy batches, the tokens generated and the seconds spent generating per step, the
    training time (generation included), and each teacher's mean weight on the student's own text (the training
    batches the student wrote).
    """
    rows = [
        (name, entry["summary"]) for name, entry in results["methods"].items() if "train_seconds" in entry["summary"]
    ]
    if not any("on_policy_share" in summary for _, summary in rows):
        return None
    teachers = list(results["teachers"])
    header = ["method", "on-policy batches", "generated tokens per step", "generation s per step", "training time (s)"]
    header += [f"weight of {t} on the student's text" for t in teachers]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, s in rows:
        share = _cell(s["on_policy_share"]) if "on_policy_share" in s else "0"
        generated = _cell(s["generated_per_step"], 0) if "generated_per_step" in s else "0"
        seconds = _cell(s["generation_seconds_per_step"], 3) if "generation_seconds_per_step" in s else "0"
        weights = [_cell(s[f"on_policy_weight/{t}"], 3) if f"on_policy_weight/{t}" in s else "" for t in teachers]
        cells = [name, share, generated, seconds, _cell(s["train_seconds"], 0), *weights]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def own_text_table(results: dict[str, Any]) -> str | None:
    """
    Per method (and the warm start): how its students write each domain, the specialist's perplexity of their
    samples and the reverse KL from them to the specialist (`hf_mtkd.demo.evaluation.own_text_quality`).
    """
    rows = [(name, entry["summary"]) for name, entry in results["methods"].items()]
    if not any("overall/own_text_kl" in summary for _, summary in rows):
        return None
    if results.get("warm_start"):
        runs = results["warm_start"]["runs"]
        keys = [(d, k) for d in [*results["domains"], "overall"] for k in OWN_TEXT_METRICS]
        summary = {f"{d}/{k}": summarize([r["test"][d][k] for r in runs]) for d, k in keys}
        rows.insert(0, ("warm start (before any row's training)", summary))
    domains = results["domains"]
    header = ["method", *[f"ppl of own {d} text" for d in domains], "overall", "KL(q ‖ specialist) per token"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, s in rows:
        cells = [_cell(s[f"{d}/own_text_perplexity"], 1) for d in [*domains, "overall"]]
        lines.append("| " + " | ".join([name, *cells, _cell(s["overall/own_text_kl"], 3)]) + " |")
    return "\n".join(lines)


def teacher_table(results: dict[str, Any]) -> str:
    """Each teacher's test perplexity (rows) on each held-out domain (columns), the best of each column in bold."""
    domains = results["domains"]
    teachers = results["teachers"]
    best = {d: min(t["test"][d]["perplexity"] for t in teachers.values()) for d in domains}
    lines = ["| teacher | " + " | ".join(domains) + " |", "|" + "---|" * (len(domains) + 1)]
    for name, teacher in teachers.items():
        cells = []
        for domain in domains:
            value = teacher["test"][domain]["perplexity"]
            cells.append(f"**{value:.1f}**" if value == best[domain] else f"{value:.1f}")
        lines.append(f"| {name} ({teacher['architecture']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def weights_table(results: dict[str, Any], method: str) -> str | None:
    """Mean weight of each teacher (columns) on each held-out domain (rows), under `method`."""
    entry = results["methods"].get(method)
    if entry is None or "overall/weight/0" not in entry["summary"]:
        return None
    teachers = list(results["teachers"])
    lines = ["| held-out domain | " + " | ".join(teachers) + " |", "|" + "---|" * (len(teachers) + 1)]
    for domain in [*results["domains"], "overall"]:
        cells = [_cell(entry["summary"][f"{domain}/weight/{k}"], 3) for k in range(len(teachers))]
        lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def score_scales_table(results: dict[str, Any]) -> str | None:
    """The validation evidence per held-out domain: specialist against runner-up, per token and per block."""
    scales = results.get("score_scales")
    if not scales:
        return None
    teachers = list(results["teachers"])
    header = [
        "held-out domain",
        "runner-up",
        "log p margin per token (mean ± std, share > 0)",
        "summed over a block (mean ± std, share > 0)",
        "entropy margin per token (mean ± std, share > 0)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for domain, s in scales.items():
        cells = [
            f"{s[f'{key}_mean']:.2f} ± {s[f'{key}_std']:.2f}, {100 * s[f'{key}_positive']:.0f} %"
            for key in ("token_margin", "block_margin", "entropy_margin")
        ]
        lines.append(f"| {domain} | {teachers[int(s['runner_up'])]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Perplexity by method and domain, and the teachers' mean weight by domain under entropy weighting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = results["domains"]
    methods = list(results["methods"])
    shown = (results.get("default_method", "entropy"), "entropy")
    weighted = [
        m for m in dict.fromkeys(shown) if "overall/weight/0" in results["methods"].get(m, {}).get("summary", {})
    ]
    fig, axes = plt.subplots(1, 1 + len(weighted), figsize=(7 + 4 * len(weighted), 0.45 * len(methods) + 2.5))
    axes = list(axes) if len(weighted) else [axes]
    height = 0.8 / len(domains)
    for j, domain in enumerate(domains):
        means = [results["methods"][m]["summary"][f"{domain}/perplexity"]["mean"] for m in methods]
        errors = [results["methods"][m]["summary"][f"{domain}/perplexity"]["std"] for m in methods]
        positions = [i + j * height for i in range(len(methods))]
        axes[0].barh(positions, means, height=height, xerr=errors, label=domain)
    axes[0].set_yticks([i + 0.4 - height / 2 for i in range(len(methods))], methods)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("held-out perplexity (lower is better)")
    axes[0].legend(fontsize=8)
    teachers = list(results["teachers"])
    for ax, method in zip(axes[1:], weighted, strict=True):
        summary = results["methods"][method]["summary"]
        width = 0.8 / len(teachers)
        for k, teacher in enumerate(teachers):
            values = [summary[f"{d}/weight/{k}"]["mean"] for d in domains]
            ax.bar([i + k * width for i in range(len(domains))], values, width=width, label=f"{teacher} teacher")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(domains))], domains, rotation=20)
        ax.set_ylabel("mean teacher weight")
        ax.set_title(f"who teaches what ({method})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[str, Any], output_dir: Path) -> None:
    """Add summaries and comparisons to `results`; write results.json, results.md and results.png; print the table."""
    add_summaries(results)
    results["comparisons"] = comparisons(results)
    shown = dict.fromkeys([results.get("default_method", "entropy"), *WEIGHTINGS_SHOWN])
    found = {m: gap_closed(results, m) for m in shown}
    results["gap_closed"] = {m: g for m, g in found.items() if g}
    table = markdown_table(results)
    sections = [f"Command: `{results['command']}`", "", table]
    if results.get("divergence", "forward_kl") != "forward_kl":
        sections[1:1] = [
            "",
            f"Every distilled row trains with the `{results['divergence']}` divergence (its hyperparameters were "
            "tuned with `forward_kl`).",
        ]
    if results.get("bad_teacher"):
        sections[1:1] = ["", f"Robustness scenario: the {results['bad_teacher']} teacher is confidently wrong."]
    if results.get("pretrained_teacher"):
        sections[1:1] = ["", f"Pretrained teacher: {results['pretrained_teacher']}, beside the specialists."]
    if results.get("teacher_top_k"):
        sections[1:1] = [
            "",
            f"Teachers read from a cache of their top-{results['teacher_top_k']} logits, computed once: every method "
            "and seed trains on the same training blocks, and the KD loss is the KL from the mixture of the teachers' "
            "top-k forms (their k most likely tokens exact, the rest of their mass spread evenly over the other "
            "tokens); perplexity is exact.",
        ]
    if results.get("warm_start"):
        warm = results["warm_start"]
        perplexities = [run["test"]["overall"]["perplexity"] for run in warm["runs"]]
        spread = f" ± {statistics.stdev(perplexities):.2f}" if len(perplexities) > 1 else ""
        sections[1:1] = [
            "",
            f"Warm start: every method starts from the seed's student after {warm['steps']} steps of plain "
            f"cross-entropy on the training blocks (its overall test perplexity: "
            f"{statistics.fmean(perplexities):.2f}{spread}).",
        ]
    on_policy = on_policy_table(results)
    if on_policy:
        sections += ["", "Generation (on-policy batches are continued by the student before the step):", "", on_policy]
    own_text = own_text_table(results)
    if own_text:
        sections += [
            "",
            "The students' own text: each test block's first tokens continued by the student (sampled at "
            "temperature 1, seeded), judged by the domain's specialist teacher (its perplexity of the samples, and "
            "the reverse KL per token from the student to it along them; lower is better):",
            "",
            own_text,
        ]
    sections += [
        "",
        "Teachers' test perplexity by held-out domain (best of each column in bold):",
        "",
        teacher_table(results),
    ]
    default = results.get("default_method")
    for method in dict.fromkeys([default, *WEIGHTINGS_SHOWN, ROUTING]):
        weights = weights_table(results, method) if method else None
        if weights:
            label = f"{method}, the default" if method == default else method
            sections += ["", f"Mean teacher weight by held-out domain ({label}):", "", weights]
    scales = score_scales_table(results)
    if scales:
        sections += [
            "",
            "Evidence the weightings see, on the validation split (τ = 1): each domain's specialist against the "
            "runner-up teacher. A weighting with temperature γ multiplies the specialist's weight against the "
            "runner-up's by exp(margin / γ): per token for `correctness` (log p) and `entropy` (entropy), summed "
            f"over a {results['scale']['block_size']}-token block for `likelihood`.",
            "",
            scales,
        ]
    sections += [
        "",
        "Comparisons, paired by seed (overall held-out perplexity and KD loss"
        + (", and the own-text metrics" if own_text else "")
        + "; negative is better; clear = one sign on every seed and beyond twice the standard error):",
        "",
    ]
    for name, c in results["comparisons"].items():
        if c["seeds"] == 1:
            verdict = "one seed: no spread"
        else:
            verdict = f"± {c['relative_change_std']:.1f} over {c['seeds']} seeds, " + (
                "clear" if c["clear"] else "not clear"
            )
        sections.append(f"- {name}: {c['relative_change_percent']:+.1f} % ({verdict})")
    for name, g in results["gap_closed"].items():
        spread = f" ± {100 * g['std']:.0f}" if g["seeds"] > 1 else ""
        sections.append(
            f"- {name} closes {100 * g['mean']:.0f}{spread} % of the static-ensemble-to-domain-routing gap "
            f"(overall perplexity, {g['seeds']} seed{'s' if g['seeds'] > 1 else ''})"
        )
    report = "\n".join(sections) + "\n"
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (output_dir / "results.md").write_text(report)
    plot(results, output_dir / "results.png")
    print(report)
