"""Turn a run's ``results.json`` into the README's Markdown tables and copy its two key plots.

python benchmarks/report.py                       # reads benchmarks/results/
python benchmarks/report.py --results /tmp/bench --figures benchmarks/figures
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["main", "markdown"]

FIGURES = ("penalty_cost.png", "quality_split_digits.png")

# table -> (columns, heading)
SHOWN: dict[str, tuple[tuple[str, ...], str]] = {
    "penalty_overhead_headline": (
        ("tasks", "method", "ms_per_step", "overhead_%", "target"),
        "Penalty overhead at 20 tasks (784-1000-1000-10 MLP, batch 128)",
    ),
    "penalty_cost": (
        (),  # pivoted, see _penalty_pivot
        "Penalty cost vs number of tasks: overhead over a plain forward+backward (%), state size",
    ),
    "penalty_vs_floor": (
        ("model", "params_M", "tensors", "threads", "method", "ms", "ratio_to_floor"),
        "penalty_grad_ alone against the memory floor (reads g, A, θ; writes g)",
    ),
    "penalty_in_sgd_step": (
        ("model", "threads", "method", "ms", "penalty_in_floors"),
        "What the penalty adds to an SGD step (momentum 0.9), in memory-floor passes",
    ),
    "penalty_in_adamw_step": (
        ("model", "threads", "method", "ms", "penalty_in_floors"),
        "What the penalty adds to a torch AdamW(fused=True) step, in memory-floor passes",
    ),
    "penalty_eager_profile": (
        ("model", "part", "calls_per_call", "ms_per_call", "share_%"),
        "Where the default penalty_grad_ spends its time (torch.profiler, 1 thread)",
    ),
    "fisher_fidelity": (
        (
            "model",
            "method",
            "examples_per_s",
            "time_vs_avalanche",
            "rel_err_vs_exact",
            "rel_err_vs_own_definition",
        ),
        "Fisher cost and fidelity (digits, 8x8)",
    ),
    "fisher_speed": (
        ("model", "estimator", "seconds", "ratio_vs_avalanche"),
        "Fisher speed vs Avalanche (benchmarks/fisher_speed.py)",
    ),
    "fisher_resnet18": (
        ("model", "method", "seconds", "ratio_vs_batched_backward"),
        "ResNet-18-shaped model (3x32x32) vs a batched backward",
    ),
    "fisher_vs_backpack": (
        (
            "model",
            "estimator",
            "backpack",
            "seconds",
            "backpack_seconds",
            "ratio_vs_backpack",
            "max_rel_diff",
        ),
        "Fisher speed and agreement vs BackPACK",
    ),
    "fisher_hugging_face": (
        ("model", "estimator", "seconds", "ratio_vs_batched_pass", "fallback_share"),
        "Hugging Face models (random-weight configs) vs a batched pass",
    ),
    "fisher_floor": (
        ("model", "estimator", "method", "seconds", "ratio_vs_avalanche"),
        "Fisher cost beside its compute floor and Avalanche",
    ),
    "quality_split_digits": (
        ("method", "best_accuracy_%", "se", "best_lambda", "consolidation_s_per_task"),
        "Split Digits (task-incremental, online EWC)",
    ),
    "quality_permuted_digits": (
        ("method", "best_accuracy_%", "se", "best_lambda"),
        "Permuted Digits (domain-incremental, 10 tasks)",
    ),
    "quality_vs_published_split_mnist": (
        ("estimator", "ours_split_digits_%", "paper_split_MNIST_%"),
        "Ours (Split Digits) beside the published Split MNIST numbers (a different dataset)",
    ),
}


def _cell(value: Any, column: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if "lambda" in column:
            return f"{value:.0e}".replace("e+0", "e") if value else "–"
        if value == 0.0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.2f}"
        return f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.1e}"
    return str(value).replace("|", "\\|")


def markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of ``columns`` (those present) from ``rows``."""
    columns = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c), c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _penalty_pivot(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per task count: each method's step-time ratio, then the state sizes."""
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "step"]
    pivot = []
    for tasks in dict.fromkeys(r["tasks"] for r in rows):
        mine = {r["method"]: r for r in rows if r["tasks"] == tasks}
        row: dict[str, Any] = {"tasks": tasks}
        for method in methods:
            if method in mine:
                row[f"{method} overhead_%"] = mine[method]["overhead_%"]
        for method in ("ewc.penalty_grad_", "avalanche", "naive"):
            if method in mine:
                row[f"{method.split('.')[0]} MiB"] = mine[method]["state_MB"]
        pivot.append(row)
    return pivot, list(pivot[0]) if pivot else []


def main(argv: Sequence[str] | None = None) -> str:
    """Print the Markdown for every table in the results and copy the plots."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--figures", type=Path, default=ROOT / "benchmarks" / "figures")
    args = parser.parse_args(argv)
    results = json.loads((args.results / "results.json").read_text())
    parts = [
        f"_mode: {results['mode']}, torch {results['torch']}, {results['threads']} thread(s), "
        f"{results['seconds'] / 60:.1f} min_"
    ]
    for table, (columns, heading) in SHOWN.items():
        rows = results["tables"].get(table)
        if rows and table == "penalty_cost":
            rows, columns = _penalty_pivot(rows)
        if rows:
            parts.append(f"**{heading}**\n\n{markdown(rows, columns)}")
    args.figures.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:
        if (args.results / name).exists():
            shutil.copyfile(args.results / name, args.figures / name)
    text = "\n\n".join(parts)
    sys.stdout.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
