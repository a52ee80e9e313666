"""The demo's report: a table (printed and Markdown), the results as JSON, and a plot."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any


def summarize(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def add_summaries(results: dict[str, Any]) -> None:
    """Each method's mean and spread over seeds of every test metric and of the throughput."""
    for entry in results["methods"].values():
        runs = entry["runs"]
        summary = {"tokens_per_second": summarize([r["tokens_per_second"] for r in runs])}
        for domain, metrics in runs[0]["test"].items():
            for key in metrics:
                summary[f"{domain}/{key}"] = summarize([r["test"][domain][key] for r in runs])
        entry["summary"] = summary


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


def comparisons(results: dict[str, Any]) -> dict[str, Any]:
    """Entropy weighting (and the label-aware weightings) against the best single teacher and the static ensemble."""
    singles = [name for name in results["methods"] if name.startswith("single: ")]
    best_single = min(
        singles, key=lambda n: results["methods"][n]["summary"]["overall/perplexity"]["mean"], default=None
    )
    out = {}
    for method in ("entropy", "entropy + features", "correctness", "posterior", "entropy+posterior"):
        for baseline in (best_single, "static ensemble"):
            for metric in ("overall/perplexity", "overall/kd_loss"):
                found = compare(results, method, baseline, metric) if baseline else None
                if found:
                    out[f"{method} vs {baseline} ({metric})"] = found
    return out


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


def plot(results: dict[str, Any], path: Path) -> None:
    """Perplexity by method and domain, and the teachers' mean weight by domain under entropy weighting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = results["domains"]
    methods = list(results["methods"])
    weighted = [m for m in ("entropy", "posterior") if m in results["methods"]]
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
    table = markdown_table(results)
    sections = [f"Command: `{results['command']}`", "", table]
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
    for method in ("entropy", "correctness", "posterior"):
        weights = weights_table(results, method)
        if weights:
            sections += ["", f"Mean teacher weight by held-out domain ({method}):", "", weights]
    sections += [
        "",
        "Comparisons, paired by seed (overall held-out perplexity and KD loss; negative is better; clear = one sign "
        "on every seed and beyond twice the standard error):",
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
    report = "\n".join(sections) + "\n"
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (output_dir / "results.md").write_text(report)
    plot(results, output_dir / "results.png")
    print(report)
