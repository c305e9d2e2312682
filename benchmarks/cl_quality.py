"""Suite c/d: continual-learning quality per Fisher estimator, after van de Ven (2025).

Reproduces the protocol of "On the Computation of the Fisher Information in Continual Learning"
(G. M. van de Ven, arXiv 2502.11756) at CPU scale, on scikit-learn's bundled 8x8 digits:

* **Split Digits**, task-incremental: five tasks of two classes, one output head per task (the
  task id picks the head; ``consolidate`` gets ``forward=`` to run the right head). Online EWC
  with ``decay_factor=1.0`` -- the paper uses the "online" EWC of Huszar (2018), whose Fisher is
  the plain sum over tasks, anchored at the latest weights. Adam, lr 1e-3. A lambda grid
  1 .. 1e13 in x10 steps, in the paper's convention (its lambda/2 is our ``ewc_lambda``).
  Estimators ``exact``, ``exact`` with ``max_samples`` = a quarter of the task's training set
  (the paper's EXACT(n)), ``sample`` (one label drawn per example), ``empirical``, ``batched``
  (Avalanche's), and no regularisation. MLP 64-100-100 with a 2-way head per task; Fisher on
  the task's training set, batches of 128 (BATCHED squares the gradients of those batches).
* **Permuted Digits**, domain-incremental: ten tasks (the digits, then fixed pixel
  permutations), an MLP 64-400-400-10 with one shared head; fine-tuning vs EWC separate vs EWC
  online (``decay_factor=1.0``), ``exact`` Fisher, Adam lr 1e-3.
* The paper's published Split MNIST accuracies quoted beside ours (a different dataset).

Accuracy is the mean test accuracy over all tasks after the last one; mean +- standard error
over seeds. The best lambda is the one with the highest mean.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks._common import (
    MultiHeadMLP,
    Row,
    Task,
    mean_and_stderr,
    mlp,
    permuted_digits,
    plot_lambda_curve,
    progress,
    split_digits,
)
from ewc import EWC

__all__ = ["ESTIMATORS", "PUBLISHED_SPLIT_MNIST", "run"]

# name -> (fisher=, fraction of the task's training set for max_samples)
ESTIMATORS: dict[str, tuple[str, float | None]] = {
    "exact": ("exact", None),
    "exact(n=N/4)": ("exact", 0.25),
    "sample": ("sample", None),
    "empirical": ("empirical", None),
    "batched": ("batched", None),
}
NONE = "none"

# van de Ven (2025), Split MNIST (task-incremental), average accuracy (%) at the best lambda.
PUBLISHED_SPLIT_MNIST = {
    "exact": 99.12,
    "sample": 99.12,
    "empirical": 99.12,
    "batched": 99.11,
    NONE: 85.41,
}

CONFIGS: dict[str, dict[str, Any]] = {
    "full": {
        "seeds": 5,
        "lambdas": [10.0**k for k in range(14)],
        "epochs": 20,
        "perm_seeds": 3,
        "perm_tasks": 10,
        "perm_epochs": 5,
        "perm_lambdas": [10.0**k for k in range(6)],
    },
    "quick": {
        "seeds": 3,
        # accuracy has levelled off by 1e6 for every estimator (the full grid goes to 1e13)
        "lambdas": [1.0, 1e2, 1e4, 1e6],
        "epochs": 8,
        "perm_seeds": 2,
        "perm_tasks": 5,
        "perm_epochs": 3,
        "perm_lambdas": [1e1, 1e2, 1e3],
    },
    "smoke": {
        "seeds": 1,
        "lambdas": [1e2],
        "epochs": 1,
        "perm_seeds": 1,
        "perm_tasks": 2,
        "perm_epochs": 1,
        "perm_lambdas": [1e2],
    },
}

HIDDEN = 100  # Split Digits: two classes per head
PERM_HIDDEN = 400  # Permuted Digits: ten 10-way tasks through one head need more room
TRAIN_BATCH = 32
FISHER_BATCH = 128


def _batches(x: Tensor, y: Tensor, size: int, generator: torch.Generator | None) -> list[Any]:
    order = torch.randperm(len(x), generator=generator) if generator is not None else None
    if order is not None:
        x, y = x[order], y[order]
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _train_task(
    model: nn.Module,
    run_model: Callable[[nn.Module, Tensor], Tensor],
    task: Task,
    reg: EWC | None,
    epochs: int,
    generator: torch.Generator,
) -> None:
    """Adam (lr 1e-3, fresh per task) on one task, with the EWC penalty in the loss."""
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for xb, yb in _batches(task[0], task[1], TRAIN_BATCH, generator):
            optimizer.zero_grad()
            criterion(run_model(model, xb), yb).backward()
            if reg is not None:
                reg.penalty_grad_(model)  # == adding reg.penalty(model) to the loss
            optimizer.step()


def _accuracy(
    model: nn.Module, run_model: Callable[[nn.Module, Tensor], Tensor], task: Task
) -> float:
    model.eval()
    with torch.no_grad():
        return (run_model(model, task[2]).argmax(-1) == task[3]).float().mean().item()


def sequential_run(
    tasks: Sequence[Task],
    *,
    multi_head: bool,
    reg: EWC | None,
    epochs: int,
    seed: int,
    max_fraction: float | None = None,
    make_model: Callable[[], nn.Module] | None = None,
) -> dict[str, Any]:
    """Train on ``tasks`` in order; returns final mean accuracy and consolidation seconds.

    ``make_model`` (called after seeding) replaces the MLPs; a multi-head model takes
    ``forward(x, task)``.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if make_model is not None:
        model: nn.Module = make_model()
    elif multi_head:
        model = MultiHeadMLP(64, HIDDEN, len(tasks), 2)
    else:
        model = mlp([64, PERM_HIDDEN, PERM_HIDDEN, 10])
    criterion = nn.CrossEntropyLoss()
    consolidation = 0.0
    for t, task in enumerate(tasks):

        def run_model(m: nn.Module, x: Tensor, t: int = t) -> Tensor:
            return m(x, t) if multi_head else m(x)

        _train_task(model, run_model, task, reg, epochs, generator)
        if reg is not None and t < len(tasks) - 1:
            if max_fraction is not None:
                reg.max_samples = max(1, int(max_fraction * len(task[0])))
            report = reg.consolidate(
                model,
                _batches(task[0], task[1], FISHER_BATCH, None),
                criterion,
                forward=lambda m, batch, rm=run_model: (rm(m, batch[0]), batch[1]),
            )
            consolidation += report.seconds
    accuracies = []
    for t, task in enumerate(tasks):
        accuracies.append(_accuracy(model, lambda m, x, t=t: m(x, t) if multi_head else m(x), task))
    return {
        "accuracy": 100 * statistics.fmean(accuracies),
        "consolidation_s": consolidation / max(1, len(tasks) - 1),
    }


def _summarise(runs: list[Row], methods: Sequence[str]) -> tuple[list[Row], list[Row]]:
    """Per (method, lambda): mean +- se; per method: the best lambda."""
    curve: list[Row] = []
    for method in methods:
        for lam in dict.fromkeys(r["lambda"] for r in runs if r["method"] == method):
            mine = [r for r in runs if r["method"] == method and r["lambda"] == lam]
            mean, se = mean_and_stderr([r["accuracy"] for r in mine])
            curve.append(
                {
                    "method": method,
                    "lambda": lam,
                    "accuracy_mean": mean,
                    "accuracy_se": se,
                    "seeds": len(mine),
                    "consolidation_s": statistics.median(r["consolidation_s"] for r in mine),
                }
            )
    best: list[Row] = []
    for method in methods:
        mine = [c for c in curve if c["method"] == method]
        top = max(mine, key=lambda c: c["accuracy_mean"])
        best.append(
            {
                "method": method,
                "best_accuracy_%": top["accuracy_mean"],
                "se": top["accuracy_se"],
                "best_lambda": top["lambda"],
                "consolidation_s_per_task": statistics.median(c["consolidation_s"] for c in mine),
            }
        )
    return curve, best


def _split_digits_suite(config: dict[str, Any]) -> list[Row]:
    runs: list[Row] = []
    jobs = [(seed, None, NONE) for seed in range(config["seeds"])]
    jobs += [
        (seed, lam, name)
        for seed in range(config["seeds"])
        for lam in config["lambdas"]
        for name in ESTIMATORS  # estimators interleaved, so their timings share the same load
    ]
    datasets = {seed: split_digits(seed) for seed in range(config["seeds"])}
    for seed, lam, name in progress(jobs, desc="quality: Split Digits runs"):
        reg = None
        fraction = None
        if lam is not None:
            fisher, fraction = ESTIMATORS[name]
            reg = EWC(lam / 2, mode="online", decay_factor=1.0, fisher=fisher)
        result = sequential_run(
            datasets[seed],
            multi_head=True,
            reg=reg,
            epochs=config["epochs"],
            seed=seed,
            max_fraction=fraction,
        )
        runs.append({"method": name, "lambda": lam or 0.0, "seed": seed, **result})
    return runs


def _permuted_digits_suite(config: dict[str, Any]) -> list[Row]:
    runs: list[Row] = []
    methods = {
        "fine-tuning": None,
        "ewc separate": ("separate", None),
        "ewc online": ("online", 1.0),
    }
    jobs = [
        (seed, lam, name)
        for seed in range(config["perm_seeds"])
        for name, spec in methods.items()
        for lam in ([0.0] if spec is None else config["perm_lambdas"])
    ]
    datasets = {s: permuted_digits(config["perm_tasks"], s) for s in range(config["perm_seeds"])}
    for seed, lam, name in progress(jobs, desc="quality: Permuted Digits runs"):
        spec = methods[name]
        reg = None
        if spec is not None:
            reg = EWC(lam / 2, mode=spec[0], decay_factor=spec[1], fisher="exact")
        result = sequential_run(
            datasets[seed], multi_head=False, reg=reg, epochs=config["perm_epochs"], seed=seed
        )
        runs.append({"method": name, "lambda": lam, "seed": seed, **result})
    return runs


def run(mode: str, out: Path) -> dict[str, list[Row]]:
    """Run both protocols; plot accuracy vs lambda into ``out``; return the tables.

    Args:
        mode: ``"full"``, ``"quick"`` (fewer seeds, lambda points and epochs) or ``"smoke"``.
        out: folder for ``quality_split_digits.png``.
    """
    config = CONFIGS[mode]
    split_runs = _split_digits_suite(config)
    split_curve, split_best = _summarise(split_runs, [*ESTIMATORS, NONE])
    exact_time = next(b for b in split_best if b["method"] == "exact")["consolidation_s_per_task"]
    for row in split_best:
        row["time_vs_exact"] = (
            row["consolidation_s_per_task"] / exact_time if row["method"] != NONE else float("nan")
        )
    perm_runs = _permuted_digits_suite(config)
    _, perm_best = _summarise(perm_runs, ["fine-tuning", "ewc separate", "ewc online"])
    paper = [
        {
            "estimator": name,
            "ours_split_digits_%": next(b for b in split_best if b["method"] == name)[
                "best_accuracy_%"
            ],
            "paper_split_MNIST_%": PUBLISHED_SPLIT_MNIST.get(name, float("nan")),
        }
        for name in [*ESTIMATORS, NONE]
    ]
    _plot(split_curve, out / "quality_split_digits.png", config)
    return {
        "quality_split_digits": split_best,
        "quality_split_digits_curve": split_curve,
        "quality_permuted_digits": perm_best,
        "quality_vs_published_split_mnist": paper,
    }


def _plot(curve: list[Row], path: Path, config: dict[str, Any]) -> None:
    title = f"Split Digits, task-incremental, online EWC ({config['seeds']} seeds, ±1 s.e.)"
    _plot_estimators(curve, path, title)


def _plot_estimators(
    curve: list[Row], path: Path, title: str, *, markersize: float | None = None
) -> None:
    """Accuracy against λ per estimator, fine-tuning as the baseline (also ``mnist1d``'s plot)."""
    plot_lambda_curve(
        curve,
        path,
        methods=ESTIMATORS,
        baseline=NONE,
        baseline_label="none (fine-tuning)",
        mean="accuracy_mean",
        se="accuracy_se",
        xlabel="λ (paper's convention; ewc_lambda = λ/2)",
        ylabel="average accuracy over 5 tasks (%)",
        title=title,
        markersize=markersize,
    )
