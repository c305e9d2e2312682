"""Suite b: Fisher estimators -- cost (examples/s) and fidelity to the brute-force exact Fisher.

For an MLP (64-256-256-10) and a small CNN (two 3x3 conv layers + linear) on the 8x8 digits, each
estimator of this package (through ``EWC.consolidate``) and Avalanche's
``EWCPlugin.compute_importances`` (at the training batch size, and at batch size 1, its only
per-example route) are timed side by side (interleaved repeats; medians) and compared with
``tests.reference.brute_force_fisher`` -- a float64 Python loop over examples and classes:

* ``rel_err_vs_exact``: ``||F - F_exact|| / ||F_exact||`` over all parameters, where ``F_exact``
  is the brute-force true Fisher ``mean_n sum_c p(c|x_n) (grad log p(c|x_n))^2``. This is how far
  each estimate is from the quantity EWC is defined with.
* ``rel_err_vs_own_definition``: the same against the brute-force version of the estimator's own
  definition (empirical: per-example squared loss gradients; batched: squared mini-batch
  gradients), i.e. the implementation error. ``sample`` is random, so it has none.
"""

from __future__ import annotations

import statistics
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks._avalanche_shim import load_avalanche_ewc_plugin
from benchmarks._common import (
    Row,
    digits,
    interleaved_times,
    median_ratio,
    mlp,
    progress,
    small_cnn,
)
from ewc import EWC

__all__ = ["run"]

CONFIGS: dict[str, dict[str, Any]] = {
    "full": {"examples": 1024, "repeats": 7, "models": ("mlp", "cnn")},
    "quick": {"examples": 512, "repeats": 5, "models": ("mlp", "cnn")},
    "smoke": {"examples": 8, "repeats": 1, "models": ("mlp",)},
}
BATCH = 64
ESTIMATORS = ("exact", "sample", "empirical", "batched")


def _model(name: str) -> tuple[nn.Module, Any]:
    """The model and a reshape of the flat 64-pixel digits into its input."""
    if name == "mlp":
        return mlp([64, 256, 256, 10]), lambda x: x
    return small_cnn(10), lambda x: x.reshape(-1, 1, 8, 8)


def _relative_error(estimate: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    num = sum(float((estimate[n].double() - reference[n]).pow(2).sum()) for n in reference)
    den = sum(float(reference[n].pow(2).sum()) for n in reference)
    return (num / den) ** 0.5


def _references(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], criterion: nn.Module
) -> dict[str, dict[str, Tensor]]:
    from tests.reference import brute_force_fisher

    params = dict(model.named_parameters())
    return {
        estimator: brute_force_fisher(model, params, batches, estimator, criterion=criterion)
        for estimator in ("exact", "empirical", "batched")
    }


def _one_model(name: str, config: dict[str, Any], plugin_cls: Any) -> list[Row]:
    torch.manual_seed(0)
    model, shape = _model(name)
    x, y = digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = shape(x[order][: config["examples"]]), y[order][: config["examples"]]
    criterion = nn.CrossEntropyLoss()
    # a partly trained model, so that the probabilities are not uniform
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
    model.eval()
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]
    references = _references(model, batches, criterion)

    results: dict[str, dict[str, Tensor]] = {}
    paths: dict[str, str] = {}

    def ours(estimator: str) -> Any:
        def consolidate() -> None:
            reg = EWC(1.0, fisher=estimator)
            report = reg.consolidate(model, batches, criterion)
            results[estimator] = dict(reg.state.importance)
            paths[estimator] = ", ".join(sorted(set(report.paths.values())))

        return consolidate

    fns = {estimator: ours(estimator) for estimator in ESTIMATORS}
    if plugin_cls is not None:
        plugin = plugin_cls(1.0)
        dataset = torch.utils.data.TensorDataset(x, y, torch.zeros(len(x), dtype=torch.long))
        sgd = torch.optim.SGD(model.parameters(), lr=0.0)

        def avalanche(batch_size: int) -> Any:
            def compute() -> None:
                importances = plugin.compute_importances(
                    model, criterion, sgd, dataset, "cpu", batch_size
                )
                model.eval()  # compute_importances leaves the model in train mode
                results[f"avalanche(batch={batch_size})"] = {
                    k: v.data.clone() for k, v in importances.items()
                }

            return compute

        fns[f"avalanche(batch={BATCH})"] = avalanche(BATCH)
        fns["avalanche(batch=1)"] = avalanche(1)
    times = interleaved_times(fns, repeats=config["repeats"], inner=1)
    own = {
        "exact": "exact",
        "empirical": "empirical",
        "batched": "batched",
        f"avalanche(batch={BATCH})": "batched",
        "avalanche(batch=1)": "empirical",
    }
    rows = []
    for method, samples in times.items():
        reference = own.get(method)
        rows.append(
            {
                "model": name,
                "method": method,
                "examples_per_s": len(x) / statistics.median(samples),
                "time_vs_avalanche": (
                    median_ratio(samples, times[f"avalanche(batch={BATCH})"])
                    if f"avalanche(batch={BATCH})" in times
                    else float("nan")
                ),
                "rel_err_vs_exact": _relative_error(results[method], references["exact"]),
                "rel_err_vs_own_definition": (
                    _relative_error(results[method], references[reference])
                    if reference
                    else float("nan")
                ),
                "engine_path": paths.get(method, "-"),
            }
        )
    return rows


def run(mode: str, out: Path) -> dict[str, list[Row]]:
    """Time and check every estimator on each model; return the table.

    Args:
        mode: ``"full"``, ``"quick"`` (fewer examples and repeats) or ``"smoke"``.
        out: unused (no plot; the table says it all), kept for the suite interface.
    """
    config = CONFIGS[mode]
    plugin_cls, note = load_avalanche_ewc_plugin()
    rows: list[Row] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # exact's signal-count advice
        for name in progress(config["models"], desc="fisher cost and fidelity"):
            rows.extend(_one_model(name, config, plugin_cls))
    tables = {"fisher_fidelity": rows}
    if note:
        tables["fisher_notes"] = [{"note": note + "; Avalanche rows skipped"}]
    return tables
