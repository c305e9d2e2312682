"""Suite ``mnist1d``: task-incremental Split MNIST-1D, per Fisher estimator, on a 1-D CNN.

A harder CPU-scale relative of ``benchmarks/cl_quality.py``'s Split Digits (same protocol and
helpers): MNIST-1D (Greydanus 2020, the ``mnist1d`` package; 40-sample signals generated
locally, no download; its default 4000 train / 1000 test examples, fixed by the package's seed)
split into five tasks of two classes (0/1, ..., 8/9), 200 training examples per task (a random
subset per seed; the test set whole), a head per task, a small 1-D CNN (three Conv1d layers of 16
channels, a hidden linear layer, 2-way heads), 56 iterations per task. Online EWC with
``decay_factor=1.0`` (van de Ven 2025's "online" EWC), Adam lr 1e-3 fresh per task, batches of
32, the Fisher on the task's training set in batches of 128. Seeds change the initialisation and
the batch order.

λ (the paper's convention, ``ewc_lambda = λ/2``) is chosen per estimator in two rounds over the
same seeds: a ×10 grid, then ×2 steps (×1/4, ×1/2, ×2, ×4) around that estimator's best, so that
a coarse grid cannot invent a ranking. The table is the mean ± s.e. over seeds at each
estimator's best λ of the mean test accuracy over the five tasks after the last one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks._common import SPLIT_PAIRS, Row, Task, progress
from benchmarks.cl_quality import (
    ESTIMATORS,
    NONE,
    _plot_estimators,
    _summarise,
    sequential_run,
)
from ewc import EWC

__all__ = ["CONFIGS", "MultiHeadCNN1d", "cnn1d_body", "mnist1d", "run", "split_mnist1d"]

REFINE = (0.25, 0.5, 2.0, 4.0)

CONFIGS: dict[str, dict[str, Any]] = {
    "full": {
        "seeds": 5,
        "lambdas": [10.0**k for k in range(1, 8)],
        "refine": REFINE,
        "epochs": 8,  # 8 x 7 batches of 32 = 56 iterations per task
        "train_per_task": 200,
        "channels": 16,
    },
    "quick": {
        "seeds": 1,
        "lambdas": [1e2, 1e4, 1e6],
        "refine": (),
        "epochs": 4,
        "train_per_task": 200,
        "channels": 16,
    },
    "smoke": {
        "seeds": 1,
        "lambdas": [1e2],
        "refine": (),
        "epochs": 1,
        "train_per_task": 64,
        "channels": 8,
    },
}


# Other settings tried in search of one where the estimators separate (run one with
# ``python -m benchmarks.mnist1d_quality --setting NAME``): changes to the full configuration.
SETTINGS: dict[str, dict[str, Any]] = {
    "few-shot-long": {"seeds": 3, "train_per_task": 50, "epochs": 40},  # 80 iterations, overfit
}


# ---------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=1)
def mnist1d() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST-1D with the package's default arguments: ``(x (4000, 1, 40), y, x_test, y_test)``.

    Generated locally by ``mnist1d.data.make_dataset`` (a few seconds of numpy; no download),
    then cached per process and in the temporary folder (keyed by the generation arguments).
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args(as_dict=True)
    key = hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()
    cache = Path(tempfile.gettempdir()) / f"ewc_bench_mnist1d_{key[:16]}.pt"
    if cache.exists():
        with contextlib.suppress(Exception):  # a damaged cache is regenerated
            x, y, x_test, y_test = torch.load(cache, weights_only=True)
            return x, y, x_test, y_test
    data = make_dataset(get_dataset_args())

    def tensor(name: str, dtype: torch.dtype) -> Tensor:
        return torch.as_tensor(data[name]).to(dtype)

    arrays = (
        tensor("x", torch.float32).unsqueeze(1),
        tensor("y", torch.long),
        tensor("x_test", torch.float32).unsqueeze(1),
        tensor("y_test", torch.long),
    )
    with contextlib.suppress(OSError):
        torch.save(arrays, cache)
    return arrays


def split_mnist1d(seed: int = 0, train_per_task: int | None = None) -> list[Task]:
    """Task-incremental Split MNIST-1D: five tasks (0/1, ..., 8/9), labels 0/1 within a task.

    ``train_per_task`` keeps a random subset (fixed by ``seed``) of each task's training set.
    """
    x, y, x_test, y_test = mnist1d()
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for first, second in SPLIT_PAIRS:
        keep = ((y == first) | (y == second)).nonzero().flatten()
        keep = keep[torch.randperm(len(keep), generator=generator)][:train_per_task]
        test = (y_test == first) | (y_test == second)
        tasks.append(
            (x[keep], (y[keep] == second).long(), x_test[test], (y_test[test] == second).long())
        )
    return tasks


# ---------------------------------------------------------------------------- model
def cnn1d_body(channels: int = 32, hidden: int = 64) -> nn.Sequential:
    """Three Conv1d layers (kernel 5; the last two stride 2) and a hidden linear layer."""
    return nn.Sequential(
        nn.Conv1d(1, channels, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 10, hidden),
        nn.ReLU(),
    )


class MultiHeadCNN1d(nn.Module):
    """:func:`cnn1d_body` shared by one linear head per task; ``forward(x, task)``."""

    def __init__(
        self, tasks: int, classes_per_task: int, channels: int = 32, hidden: int = 64
    ) -> None:
        super().__init__()
        self.body = cnn1d_body(channels, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, classes_per_task) for _ in range(tasks))

    def forward(self, x: Tensor, task: int) -> Tensor:
        return self.heads[task](self.body(x))


# ---------------------------------------------------------------------------- protocol
def _one_run(config: dict[str, Any], tasks: list[Task], seed: int, name: str, lam: float) -> Row:
    reg = None
    fraction = None
    if name != NONE:
        fisher, fraction = ESTIMATORS[name]
        reg = EWC(lam / 2, mode="online", decay_factor=1.0, fisher=fisher)
    channels = config["channels"]
    result = sequential_run(
        tasks,
        multi_head=True,
        reg=reg,
        epochs=config["epochs"],
        seed=seed,
        max_fraction=fraction,
        make_model=lambda: MultiHeadCNN1d(len(tasks), 2, channels),
    )
    return {"method": name, "lambda": lam, "seed": seed, **result}


def _grid(config: dict[str, Any], jobs: Sequence[tuple[int, str, float]], desc: str) -> list[Row]:
    datasets = {
        seed: split_mnist1d(seed, config["train_per_task"]) for seed in range(config["seeds"])
    }
    return [
        _one_run(config, datasets[seed], seed, name, lam)
        for seed, name, lam in progress(jobs, desc=desc)
    ]


def sweep(config: dict[str, Any]) -> list[Row]:
    """Every run of the two-round λ search (and the unregularised baseline), one row each."""
    seeds = range(config["seeds"])
    jobs = [(seed, NONE, 0.0) for seed in seeds]
    jobs += [(s, name, lam) for s in seeds for lam in config["lambdas"] for name in ESTIMATORS]
    runs = _grid(config, jobs, "mnist1d: x10 grid")
    if config["refine"]:
        _, best = _summarise(runs, list(ESTIMATORS))
        centre = {row["method"]: row["best_lambda"] for row in best}
        jobs = [
            (s, name, centre[name] * f)
            for s in seeds
            for f in config["refine"]
            for name in ESTIMATORS
        ]
        runs += _grid(config, jobs, "mnist1d: x2 refinement")
    return runs


def run(mode: str, out: Path) -> dict[str, list[Row]]:
    """Run the Split MNIST-1D sweep; plot accuracy vs λ into ``out``; return the tables.

    Args:
        mode: ``"full"`` (5 seeds, ×10 then ×2 λ grid), ``"quick"`` or ``"smoke"``.
        out: folder for ``quality_split_mnist1d.png``.
    """
    config = CONFIGS[mode]
    runs = sweep(config)
    curve, best = _summarise(runs, [*ESTIMATORS, NONE])
    curve.sort(key=lambda c: (c["method"], c["lambda"]))
    for row in best:
        row["seeds"] = config["seeds"]
    _plot(curve, out / "quality_split_mnist1d.png", config)
    return {"quality_split_mnist1d": best, "quality_split_mnist1d_curve": curve}


def _plot(curve: list[Row], path: Path, config: dict[str, Any]) -> None:
    title = (
        f"Split MNIST-1D, task-incremental, online EWC, 1-D CNN ({config['seeds']} seeds, ±1 s.e.)"
    )
    _plot_estimators(curve, path, title, markersize=3)


def main() -> None:
    """Run the full sweep in one of :data:`SETTINGS`; print and save its tables and plot."""
    import argparse

    from benchmarks._common import format_table, write_json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--setting", choices=sorted(SETTINGS), required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = {**CONFIGS["full"], **SETTINGS[args.setting]}
    args.out.mkdir(parents=True, exist_ok=True)
    curve, best = _summarise(sweep(config), [*ESTIMATORS, NONE])
    curve.sort(key=lambda c: (c["method"], c["lambda"]))
    _plot(curve, args.out / f"quality_split_mnist1d_{args.setting}.png", config)
    print(format_table(best, f"[Split MNIST-1D, {args.setting}: {config}]"))
    write_json(
        args.out / f"quality_split_mnist1d_{args.setting}.json",
        {"config": config, "best": best, "curve": curve},
    )


if __name__ == "__main__":
    main()
