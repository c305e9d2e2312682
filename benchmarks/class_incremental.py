"""Suite ``class_incremental``: exemplar-free class-incremental MNIST-1D, EWC vs EWC-DR vs MAS.

After Liu & Chang, "Elastic Weight Consolidation Done Right for Continual Learning" (CVPR 2026,
arXiv 2603.18596), whose exemplar-free class-incremental CIFAR-100 (ResNet-18, 50 + 5 x 10
classes) ranks EWC 11.53 < online EWC 26.36 < MAS 29.09 < EWC-DR 44.88 (A_last, %). Here, at CPU
scale and on another dataset: MNIST-1D (:func:`benchmarks.mnist1d_quality.mnist1d`) split as
the paper splits CIFAR-100 (a large first task, then small increments): four initial classes
(0-3), then three tasks of two new classes each (4/5, 6/7, 8/9), 100 training examples per class,
no stored examples, the 1-D CNN body of
``mnist1d_quality`` with **one head that grows** by two outputs per task (the old rows are
copied; ``ewc`` pads the grown head's importance with zeros, so new rows are free). Each task
trains with cross-entropy over all classes seen so far (Adam lr 1e-3 fresh per task, batches of
32), on that task's data only.

Methods (importance computed on the task's training data at the end of the task):

* ``fine-tuning``: no regulariser.
* ``EWC``: separate mode, ``fisher="batched"`` (squared mini-batch gradients, the estimate the
  published EWC baselines and EWC-DR's code use); ``EWC (exact)`` the same with the true Fisher.
* ``online EWC``: ``fisher="batched"``, ``decay_factor=0.5``.
* ``EWC-DR``: ``EWC`` plus ``logits_reversal=True`` and the published clamp
  ``max_importance=1e-4``; ``EWC-DR (no clamp)`` without the clamp.
* ``MAS`` (Aljundi et al. 2018): importance = mean over batches of ``|grad ||f(x)||^2|``, merged
  as ``alpha * old + (1 - alpha) * new`` (``alpha = 0.5``), computed by Avalanche's own
  ``MASPlugin._get_importance`` when Avalanche imports (else the same formula here), and fed to
  ``EWC(mode="online", decay_factor=alpha)`` through ``add_task``, which gives exactly
  Avalanche's merged importance and penalty.

``A_last`` is the test accuracy over all ten classes after the last task; ``A_avg`` the mean over
the four stages of the test accuracy over the classes seen so far. λ (``ewc_lambda``,
Avalanche's scale) is chosen per method on a grid, by the mean ``A_last`` over seeds (an oracle
choice, as in the task-incremental suites).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks._avalanche_shim import _define_torchvision_schemas
from benchmarks._common import Row, mean_and_stderr, plot_lambda_curve, progress
from benchmarks.cl_quality import _batches, _train_task
from benchmarks.mnist1d_quality import cnn1d_body, mnist1d
from ewc import EWC

__all__ = ["CONFIGS", "METHODS", "PUBLISHED_CIFAR100", "GrowingHeadNet", "run"]

FINE_TUNING = "fine-tuning"
MAS = "MAS"
MAS_ALPHA = 0.5
DR_CLAMP = 1e-4  # the published code's clamp (ResNet-18 / CIFAR-100 scale)
HIDDEN = 64
FISHER_BATCH = 32  # the training batch size, as Avalanche's plugins use train_mb_size

# name -> EWC keyword arguments (None: fine-tuning; MAS is built separately)
METHODS: dict[str, dict[str, Any] | None] = {
    FINE_TUNING: None,
    "EWC": {"mode": "separate", "fisher": "batched"},
    "EWC (exact)": {"mode": "separate", "fisher": "exact"},
    "online EWC": {"mode": "online", "decay_factor": 0.5, "fisher": "batched"},
    "EWC-DR": {
        "mode": "separate",
        "fisher": "batched",
        "logits_reversal": True,
        "max_importance": DR_CLAMP,
    },
    "EWC-DR (no clamp)": {"mode": "separate", "fisher": "batched", "logits_reversal": True},
    MAS: {"mode": "online", "decay_factor": MAS_ALPHA},
}

# Liu & Chang (CVPR 2026), exemplar-free class-incremental CIFAR-100, A_last (%).
PUBLISHED_CIFAR100 = {"EWC": 11.53, "online EWC": 26.36, MAS: 29.09, "EWC-DR": 44.88}

CONFIGS: dict[str, dict[str, Any]] = {
    "full": {
        "seeds": 3,
        "lambdas": [10.0**k for k in range(0, 11, 2)],
        "epochs": 15,
        "train_per_class": 100,
        "channels": 16,
    },
    "quick": {
        "seeds": 1,
        "lambdas": [1e2, 1e6],
        "epochs": 4,
        "train_per_class": 100,
        "channels": 16,
    },
    "smoke": {
        "seeds": 1,
        "lambdas": [1e2],
        "epochs": 1,
        "train_per_class": 16,
        "channels": 8,
    },
}

TASK_CLASSES = ((0, 1, 2, 3), (4, 5), (6, 7), (8, 9))


class GrowingHeadNet(nn.Module):
    """:func:`cnn1d_body` and one linear ``head`` over all classes seen so far."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.body = cnn1d_body(channels, HIDDEN)
        self.head = nn.Linear(HIDDEN, classes)

    @torch.no_grad()
    def grow(self, classes: int) -> None:
        """Replace the head by one with ``classes`` outputs; the old rows are kept."""
        old = self.head
        self.head = nn.Linear(HIDDEN, classes)
        self.head.weight[: old.out_features] = old.weight
        self.head.bias[: old.out_features] = old.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _class_incremental_tasks(seed: int, train_per_class: int) -> list[tuple[Tensor, ...]]:
    """Per task: its training examples (global labels) and the test set of the classes so far."""
    x, y, x_test, y_test = mnist1d()
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for classes in TASK_CLASSES:
        parts = []
        for c in classes:
            index = (y == c).nonzero().flatten()
            parts.append(index[torch.randperm(len(index), generator=generator)][:train_per_class])
        keep = torch.cat(parts)
        keep = keep[torch.randperm(len(keep), generator=generator)]
        seen = y_test <= classes[-1]
        tasks.append((x[keep], y[keep], x_test[seen], y_test[seen]))
    return tasks


def _mas_importance(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """MAS importance of ``model`` on ``x``: Avalanche's ``MASPlugin._get_importance`` if it
    imports, else the same formula (mean over batches of ``|grad mean_n ||f(x_n)||^2|``)."""
    dataset = torch.utils.data.TensorDataset(x, y)
    plugin = _avalanche_mas()
    if plugin is not None:
        strategy = SimpleNamespace(
            model=model,
            experience=SimpleNamespace(dataset=dataset),
            train_mb_size=FISHER_BATCH,
            device="cpu",
            optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        )
        importance = plugin()._get_importance(strategy)
        model.zero_grad(set_to_none=True)
        return {name: value.data.detach().clone() for name, value in importance.items()}
    sums = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    batches = _batches(x, y, FISHER_BATCH, None)
    for xb, _ in batches:
        model.zero_grad(set_to_none=True)
        model(xb).square().sum(dim=1).mean().backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                sums[name] += p.grad.abs()
    model.zero_grad(set_to_none=True)
    return {name: total / len(batches) for name, total in sums.items()}


_MAS_PLUGIN: list[Any] = []


def _avalanche_mas() -> Any:
    """Avalanche's ``MASPlugin`` class, or None when Avalanche cannot be imported."""
    if not _MAS_PLUGIN:
        _define_torchvision_schemas()
        try:
            from avalanche.training.plugins import MASPlugin
        except Exception:  # ImportError, or torchvision failing to load its ops
            MASPlugin = None
        _MAS_PLUGIN.append(MASPlugin)
    return _MAS_PLUGIN[0]


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return 100 * (model(x).argmax(-1) == y).float().mean().item()


def class_incremental_run(
    config: dict[str, Any], tasks: list[tuple[Tensor, ...]], method: str, lam: float, seed: int
) -> Row:
    """Train the tasks in order with one method; A_last, A_avg and per-task accuracies."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    spec = METHODS[method]
    clamp = spec is not None and spec.get("max_importance") is not None
    reg = None if spec is None else EWC(lam, keep_importance_data=clamp, **spec)
    model = GrowingHeadNet(config["channels"], len(TASK_CLASSES[0]))
    criterion = nn.CrossEntropyLoss()
    run_model: Callable[[nn.Module, Tensor], Tensor] = lambda m, x: m(x)  # noqa: E731
    accuracies = []
    for t, (x, y, x_test, y_test) in enumerate(tasks):
        if t:
            model.grow(TASK_CLASSES[t][-1] + 1)
        _train_task(model, run_model, (x, y, x_test, y_test), reg, config["epochs"], generator)
        accuracies.append(_accuracy(model, x_test, y_test))
        if reg is None or t == len(tasks) - 1:
            continue
        if method == MAS:
            importance = _mas_importance(model, x, y)
            scale = 1.0 if t == 0 else 1.0 - MAS_ALPHA  # Avalanche: first task as is
            anchor = {name: p.detach() for name, p in model.named_parameters()}
            reg.add_task({n: scale * v for n, v in importance.items()}, anchor)
        else:
            reg.consolidate(model, _batches(x, y, FISHER_BATCH, None), criterion)
    clamped = float("nan")
    if clamp and reg is not None:  # share of importance entries at the cap, over the tasks
        tasks_fisher = [entry["fisher"] for entry in reg.state.history]
        at_cap = sum(int((v >= DR_CLAMP).sum()) for f in tasks_fisher for v in f.values())
        clamped = 100 * at_cap / sum(v.numel() for f in tasks_fisher for v in f.values())
    return {
        "method": method,
        "lambda": lam,
        "seed": seed,
        "clamped_%": clamped,
        "A_last": accuracies[-1],
        "A_avg": statistics.fmean(accuracies),
        "per_task": accuracies,
    }


def _summary(runs: list[Row]) -> tuple[list[Row], list[Row]]:
    curve: list[Row] = []
    for method in METHODS:
        for lam in sorted({r["lambda"] for r in runs if r["method"] == method}):
            mine = [r for r in runs if r["method"] == method and r["lambda"] == lam]
            last, last_se = mean_and_stderr([r["A_last"] for r in mine])
            avg, avg_se = mean_and_stderr([r["A_avg"] for r in mine])
            curve.append(
                {
                    "method": method,
                    "lambda": lam,
                    "A_last_%": last,
                    "A_last_se": last_se,
                    "A_avg_%": avg,
                    "A_avg_se": avg_se,
                    "base_%": statistics.fmean(r["per_task"][0] for r in mine),
                    "seeds": len(mine),
                    "clamped_%": statistics.fmean(r["clamped_%"] for r in mine),
                }
            )
    best = []
    for method in METHODS:
        top = max((c for c in curve if c["method"] == method), key=lambda c: c["A_last_%"])
        best.append(
            {
                **top,
                "lambda": top["lambda"] if METHODS[method] is not None else float("nan"),
                "published_CIFAR100_A_last_%": PUBLISHED_CIFAR100.get(method, float("nan")),
            }
        )
    return curve, best


def run(mode: str, out: Path) -> dict[str, list[Row]]:
    """Run every method over its λ grid and the seeds; plot A_last vs λ into ``out``.

    Args:
        mode: ``"full"``, ``"quick"`` or ``"smoke"``.
        out: folder for ``class_incremental_mnist1d.png``.
    """
    config = CONFIGS[mode]
    seeds = range(config["seeds"])
    datasets = {s: _class_incremental_tasks(s, config["train_per_class"]) for s in seeds}
    jobs = [
        (seed, method, lam)
        for seed in seeds
        for lam in config["lambdas"]
        for method, spec in METHODS.items()
        if spec is not None
    ]
    jobs = [(seed, FINE_TUNING, 0.0) for seed in seeds] + jobs
    runs = [
        class_incremental_run(config, datasets[seed], method, lam, seed)
        for seed, method, lam in progress(jobs, desc="class-incremental MNIST-1D runs")
    ]
    curve, best = _summary(runs)
    for row in best:
        row["mas_importance_by"] = (
            ("avalanche.MASPlugin" if _avalanche_mas() is not None else "ours")
            if row["method"] == MAS
            else ""
        )
    _plot(curve, out / "class_incremental_mnist1d.png", config)
    return {"class_incremental_mnist1d": best, "class_incremental_mnist1d_curve": curve}


def _plot(curve: list[Row], path: Path, config: dict[str, Any]) -> None:
    plot_lambda_curve(
        curve,
        path,
        methods=[method for method, spec in METHODS.items() if spec is not None],
        baseline=FINE_TUNING,
        baseline_label=FINE_TUNING,
        mean="A_last_%",
        se="A_last_se",
        xlabel="ewc_lambda (Avalanche's scale)",
        ylabel="A_last: accuracy over all 10 classes (%)",
        title=f"Class-incremental MNIST-1D, exemplar-free, growing head "
        f"({config['seeds']} seeds, ±1 s.e.)",
        markersize=3,
    )
