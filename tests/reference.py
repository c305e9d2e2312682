"""Brute-force references: a Python loop over examples with plain autograd.

Slow on purpose and written without any of the package's code paths, so the package is always
compared against the definition, not against itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["brute_force_fisher", "brute_force_squared_grad_sums", "example_slices"]


def example_slices(batch: Any, size: int) -> list[Any]:
    """Each example of a batch (tuple/list/dict/tensor) as a batch of one."""

    def take(x: Any, n: int) -> Any:
        if isinstance(x, Tensor) and x.dim() >= 1 and x.shape[0] == size:
            return x[n : n + 1]
        if isinstance(x, (tuple, list)):
            return type(x)(take(v, n) for v in x)
        if isinstance(x, dict):
            return {k: take(v, n) for k, v in x.items()}
        return x

    return [take(batch, n) for n in range(size)]


def brute_force_squared_grad_sums(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    run_model: Callable[[nn.Module, Any], tuple[Tensor, Any]],
    make_signals: Callable[[Tensor, Any], Tensor],
) -> dict[str, Tensor]:
    """``sum_k sum_n (d <s_k[n], out(x_n)> / d theta)^2``, one example and one signal at a time.

    Computed in float64 accumulators. Signals are made once from the full batch's output.
    """
    with torch.no_grad():
        output, target = run_model(model, batch)
    signals = make_signals(output.detach(), target)
    names = list(params)
    sums = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    size = output.shape[0]
    for n, example in enumerate(example_slices(batch, size)):
        for k in range(signals.shape[0]):
            out, _ = run_model(model, example)
            inner = (signals[k, n : n + 1].to(out.dtype) * out).sum()
            grads = torch.autograd.grad(inner, [params[m] for m in names], allow_unused=True)
            for name, grad in zip(names, grads):
                if grad is not None:
                    sums[name] += grad.double().square()
    return sums


def brute_force_fisher(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batches: Iterable[Any],
    estimator: str,
    likelihood: str = "categorical",
    criterion: Callable[..., Tensor] | None = None,
) -> dict[str, Tensor]:
    """The definition of each deterministic estimator, one example (or batch) at a time, float64.

    * exact/categorical: ``mean_n sum_c p_c (grad log p_c)^2`` (every output position summed);
    * exact/gaussian: ``mean_n sum_d (grad f_d)^2``;
    * empirical: ``mean_n (grad criterion(f(x_n), y_n))^2``;
    * batched: ``mean_b (grad criterion(batch_b))^2``.
    The model must already be in eval mode.
    """
    names = list(params)
    total = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    count = 0

    def add(value: Tensor, weight: float = 1.0) -> None:
        grads = torch.autograd.grad(value, [params[m] for m in names], allow_unused=True)
        for name, grad in zip(names, grads):
            if grad is not None:
                total[name] += weight * grad.double().square()

    for batch in batches:
        x, y = batch[0], batch[1]
        if estimator == "batched":
            assert criterion is not None
            add(criterion(model(x), y))
            count += 1
            continue
        for n in range(x.shape[0]):
            xn, yn = x[n : n + 1], y[n : n + 1]
            count += 1
            if estimator == "empirical":
                assert criterion is not None
                add(criterion(model(xn), yn))
                continue
            out = model(xn)
            flat = (
                out.reshape(-1, out.shape[-1]) if likelihood == "categorical" else out.reshape(-1)
            )
            if likelihood == "categorical":
                probs = torch.softmax(flat.detach().double(), dim=-1)
                log_probs = torch.log_softmax(flat, dim=-1)
                for pos in range(flat.shape[0]):
                    for c in range(flat.shape[1]):
                        add(log_probs[pos, c], float(probs[pos, c]))
                        out = model(xn)
                        flat = out.reshape(-1, out.shape[-1])
                        log_probs = torch.log_softmax(flat, dim=-1)
            else:
                for d in range(flat.shape[0]):
                    add(flat[d])
                    flat = model(xn).reshape(-1)
    return {name: value / count for name, value in total.items()}
