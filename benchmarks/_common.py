"""Shared helpers for the benchmark suites: timing, tables, output files, plots, data, models."""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "MultiHeadMLP",
    "Row",
    "Task",
    "digits",
    "format_table",
    "interleaved_times",
    "mean_and_stderr",
    "median_ratio",
    "mlp",
    "permuted_digits",
    "plot_lambda_curve",
    "progress",
    "small_cnn",
    "split_digits",
    "write_csv",
    "write_json",
]

Row = dict[str, Any]
Task = tuple[Tensor, Tensor, Tensor, Tensor]  # x_train, y_train, x_test, y_test
SPLIT_PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


# ---------------------------------------------------------------------------- timing
def interleaved_times(
    fns: dict[str, Callable[[], object]], *, repeats: int, inner: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` samples each, measured round-robin.

    The functions are run one after another inside every repeat (the order rotating between
    repeats), so that load from other processes on a shared machine hits all of them alike.
    Compare them by the median of the per-repeat ratios, not by absolute times.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over repeats of ``numerator[r] / denominator[r]`` (paired, same repeat)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def progress(iterable: Iterable[Any], *, desc: str, total: int | None = None) -> Iterable[Any]:
    """A tqdm bar on stderr when tqdm is installed and stderr is a terminal or log; else as is."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------------------- output
def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if value == 0.0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def format_table(rows: Sequence[Row], title: str = "") -> str:
    """A plain-text table with the keys of the first row as columns."""
    if not rows:
        return f"{title}\n(no rows)"
    columns = list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells)
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    """Rows as CSV with a header (the union of keys, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, payload: Any) -> None:
    """Pretty JSON; NaN/inf become null so that any JSON reader accepts the file."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(payload), indent=2, allow_nan=False) + "\n")


def plot_lambda_curve(
    curve: Sequence[Row],
    path: Path,
    *,
    methods: Iterable[str],
    baseline: str,
    baseline_label: str,
    mean: str,
    se: str,
    xlabel: str,
    ylabel: str,
    title: str,
    markersize: float | None = None,
) -> None:
    """A PNG of a λ curve: per method, ``mean`` ± ``se`` against ``lambda`` (log axis).

    Args:
        curve: rows with ``method``, ``lambda``, ``mean`` and ``se`` keys; each method's points
            are drawn in order of λ.
        path: the PNG written.
        methods: the methods drawn as lines (mean, with a ±1 s.e. band).
        baseline: the method drawn as a dotted horizontal line at its (first) ``mean``, labelled
            ``baseline_label`` (the unregularised run).
        mean, se: the keys of the value and of its standard error.
        xlabel, ylabel, title: the axes' texts.
        markersize: of the points; None: matplotlib's default.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    reference = next(c for c in curve if c["method"] == baseline)
    ax.axhline(reference[mean], color="grey", linestyle=":", label=baseline_label)
    marker: dict[str, Any] = {} if markersize is None else {"markersize": markersize}
    for method in methods:
        mine = sorted((c for c in curve if c["method"] == method), key=lambda c: c["lambda"])
        lams = [c["lambda"] for c in mine]
        means = [c[mean] for c in mine]
        ses = [c[se] for c in mine]
        ax.plot(lams, means, marker="o", label=method, **marker)
        ax.fill_between(
            lams,
            [m - s for m, s in zip(means, ses)],
            [m + s for m, s in zip(means, ses)],
            alpha=0.2,
        )
    ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- models
def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers with ReLU between them, e.g. ``mlp([784, 1000, 1000, 10])``."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def small_cnn(classes: int = 10) -> nn.Sequential:
    """Two 3x3 conv layers and a linear classifier for 1x8x8 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, classes),
    )


class MultiHeadMLP(nn.Module):
    """A shared MLP body and one linear head per task; ``forward(x, task)``."""

    def __init__(self, inputs: int, hidden: int, tasks: int, classes_per_task: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleList(nn.Linear(hidden, classes_per_task) for _ in range(tasks))

    def forward(self, x: Tensor, task: int) -> Tensor:
        return self.heads[task](self.body(x))


# ---------------------------------------------------------------------------- data
def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits: ``(x (1797, 64) in [0, 1], y (1797,))``."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.as_tensor(x / 16.0, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)


def _split(x: Tensor, y: Tensor, seed: int, test_fraction: float = 0.3) -> Task:
    """A stratified-enough random train/test split (per class, fixed by ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in y.unique():
        index = (y == label).nonzero().flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        cut = round(len(index) * test_fraction)
        test.append(index[:cut])
        train.append(index[cut:])
    tr = torch.cat(train)[torch.randperm(sum(len(t) for t in train), generator=generator)]
    te = torch.cat(test)
    return x[tr], y[tr], x[te], y[te]


def split_digits(seed: int = 0) -> list[Task]:
    """Task-incremental Split Digits: five tasks (0/1, ..., 8/9), labels 0/1 within a task."""
    x, y = digits()
    tasks = []
    for first, second in SPLIT_PAIRS:
        keep = (y == first) | (y == second)
        tasks.append(_split(x[keep], (y[keep] == second).long(), seed))
    return tasks


def permuted_digits(tasks: int = 10, seed: int = 0) -> list[Task]:
    """Domain-incremental Permuted Digits: the first task as is, then fixed pixel permutations."""
    x_tr, y_tr, x_te, y_te = _split(*digits(), seed)
    generator = torch.Generator().manual_seed(1000 + seed)
    out = []
    for t in range(tasks):
        perm = torch.arange(64) if t == 0 else torch.randperm(64, generator=generator)
        out.append((x_tr[:, perm], y_tr, x_te[:, perm], y_te))
    return out
