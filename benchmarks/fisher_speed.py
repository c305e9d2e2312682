"""Suite: cost of the per-example Fisher against Avalanche's batched ``compute_importances``.

Models (CPU, random data, only the cost matters):

* ``mlp``: the 784-1000-1000-10 MLP of issue 4, 2048 examples, batch 128;
* ``cnn``: two 3x3 conv layers and a linear classifier on 1x8x8 inputs, same data sizes;
* ``transformer``: token embedding (100 x 64), one ``nn.TransformerEncoderLayer(64, 4 heads,
  128, batch_first=True)``, mean pooling and a linear classifier; 512 sequences of 32 tokens,
  batch 128. Its ``exact (attention by vmap)`` row is ``exact`` with the attention rule switched
  off, i.e. what the same consolidation cost before that rule (the attention takes the generic
  ``vmap`` fallback).

Per model, measured side by side in one process (round-robin repeats, see
:func:`benchmarks._common.interleaved_times`):

* ``avalanche``: the real ``avalanche.training.plugins.EWCPlugin().compute_importances(model,
  criterion, optimizer, dataset, device, batch_size)`` on a ``TensorDataset``: squared
  *mini-batch* gradients (cheap but not the Fisher);
* ``empirical``: ``EWC(fisher="empirical").consolidate(model, loader, criterion)``: squared
  *per-example* gradients of the loss;
* ``exact``: ``EWC(fisher="exact")``: ``sum_c p_c (grad log p_c)^2`` per example (10 signals).

``ratio_vs_avalanche`` is the median over repeats of the paired ratio ``time / avalanche time``;
``seconds`` is the median time per consolidation. Targets (issue 4): empirical <= 1.0 and
exact <= 4.0 on the MLP.
"""

from __future__ import annotations

import contextlib
import statistics
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._avalanche_shim import load_avalanche_ewc_plugin
from benchmarks._common import Row, format_table, interleaved_times, median_ratio, mlp, small_cnn
from ewc import EWC
from ewc._per_sample.rules import RULES

__all__ = ["run"]

EXAMPLES = 2048
BATCH = 128
CLASSES = 10


def _problem(name: str, quick: bool) -> tuple[nn.Module, TensorDataset]:
    examples = 256 if quick else EXAMPLES
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":
        model: nn.Module = mlp([784, 1000, 1000, CLASSES])
        x = torch.randn(examples, 784, generator=generator)
    elif name == "transformer":
        model = _Transformer()
        x = torch.randint(0, 100, (examples // 4, 32), generator=generator)
        y = torch.randint(0, CLASSES, (examples // 4,), generator=generator)
        return model, TensorDataset(x, y)
    else:
        model = small_cnn(CLASSES)
        x = torch.randn(examples, 1, 8, 8, generator=generator)
    y = torch.randint(0, CLASSES, (examples,), generator=generator)
    return model, TensorDataset(x, y)


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(100, 64)
        self.layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
        self.head = nn.Linear(64, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embedding(tokens)).mean(1))


@contextlib.contextmanager
def _without_attention_rule() -> Iterator[None]:
    """The per-example engine as it was before its ``MultiheadAttention`` rule."""
    rule = RULES.pop(nn.MultiheadAttention)
    try:
        yield
    finally:
        RULES[nn.MultiheadAttention] = rule


def _consolidator(model: nn.Module, dataset: TensorDataset, estimator: str) -> Callable[[], object]:
    criterion = nn.CrossEntropyLoss()

    def consolidate() -> object:
        loader = DataLoader(dataset, batch_size=BATCH)
        return EWC(1.0, fisher=estimator).consolidate(model, loader, criterion)

    return consolidate


def _avalanche(model: nn.Module, dataset: TensorDataset) -> Callable[[], object] | None:
    plugin_class, reason = load_avalanche_ewc_plugin()
    if plugin_class is None:
        warnings.warn(f"fisher_speed: {reason}; no Avalanche baseline", stacklevel=2)
        return None
    plugin = plugin_class(ewc_lambda=1.0)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def compute() -> object:
        return plugin.compute_importances(model, criterion, optimizer, dataset, "cpu", BATCH)

    return compute


def run(quick: bool = False, *, threads: int | None = None) -> list[Row]:
    """Rows ``(model, estimator, seconds, ratio_vs_avalanche)`` for the MLP, the small CNN and
    the transformer layer.

    Args:
        quick: 256 examples and 3 repeats instead of 2048 and 7 (a smoke run).
        threads: ``torch.set_num_threads`` for the run (restored after); default: unchanged.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(quick)
    finally:
        torch.set_num_threads(previous)


def _measure(quick: bool) -> list[Row]:
    repeats = 3 if quick else 7
    rows: list[Row] = []
    for name in ("mlp", "cnn", "transformer"):
        model, dataset = _problem(name, quick)
        fns: dict[str, Callable[[], object]] = {
            estimator: _consolidator(model, dataset, estimator)
            for estimator in ("empirical", "exact")
        }
        if name == "transformer":
            exact = fns["exact"]

            def exact_by_vmap(exact: Callable[[], object] = exact) -> object:
                with _without_attention_rule():
                    return exact()

            fns["exact (attention by vmap)"] = exact_by_vmap
        baseline = _avalanche(model, dataset)
        if baseline is not None:
            fns["avalanche"] = baseline
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times = interleaved_times(fns, repeats=repeats, inner=1)
        for estimator, samples in times.items():
            ratio = (
                median_ratio(samples, times["avalanche"]) if "avalanche" in times else float("nan")
            )
            rows.append(
                {
                    "model": name,
                    "estimator": estimator,
                    "seconds": statistics.median(samples),
                    "ratio_vs_avalanche": ratio,
                }
            )
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, few repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    arguments = parser.parse_args()
    table = run(quick=arguments.quick, threads=arguments.threads)
    used = arguments.threads or torch.get_num_threads()
    print(
        format_table(table, title=f"Fisher cost vs Avalanche compute_importances ({used} threads)")
    )
