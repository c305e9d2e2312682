"""Brute-force references for every likelihood and token-level layout, from the definitions.

One example, one position, one class (or unit, or label) at a time, with plain autograd and no
code of the package: ``exact`` sums ``p(y) (grad log p(y))^2`` over every label value of every
position (categorical), unit (Bernoulli) or component (Gaussian); ``empirical`` squares the
gradient of the example's loss, the sum over its positions (``reduction='none'``, weights
applied, ``ignore_index`` positions left out); ``batched`` squares the gradient of the criterion
on the batch, token-level outputs flattened to ``(n * S, C)``. Float64 accumulators.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.reference import example_slices

__all__ = ["brute_force_likelihood_fisher", "pair_forward"]

Forward = Callable[[nn.Module, Any], tuple[Tensor, Any]]


def pair_forward(model: nn.Module, batch: Any) -> tuple[Tensor, Any]:
    """``(model(batch[0]), batch[1])``."""
    return model(batch[0]), batch[1]


def _size(batch: Any) -> int:
    if isinstance(batch, Mapping):
        return int(next(v for v in batch.values() if isinstance(v, Tensor)).shape[0])
    if isinstance(batch, (tuple, list)):
        return int(batch[0].shape[0])
    return int(batch.shape[0])


def brute_force_likelihood_fisher(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batches: Iterable[Any],
    estimator: str,
    likelihood: str,
    criterion: nn.Module | None = None,
    forward: Forward = pair_forward,
) -> dict[str, Tensor]:
    """``mean_n`` (``batched``: ``mean_b``) of the estimator's term; see the module docstring.

    ``criterion`` supplies ``ignore_index``/``weight``/``label_smoothing``/``pos_weight`` (for
    ``empirical``) and is called as given, flattened, for ``batched``. The model must be in eval
    mode.
    """
    names = list(params)
    total = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    count = 0

    def add(value: Tensor, weight: float = 1.0) -> None:
        grads = torch.autograd.grad(
            value, [params[m] for m in names], allow_unused=True, retain_graph=True
        )
        for name, grad in zip(names, grads):
            if grad is not None:
                total[name] += weight * grad.double().square()

    ignore_index = getattr(criterion, "ignore_index", -100)
    for batch in batches:
        if estimator == "batched":
            assert criterion is not None
            out, tgt = forward(model, batch)
            if likelihood == "categorical" and out.dim() > 2:
                add(criterion(out.reshape(-1, out.shape[-1]), tgt.reshape(-1)))
            else:
                add(criterion(out, tgt))
            count += 1
            continue
        if isinstance(batch, Mapping) and not isinstance(batch, dict):  # a BatchEncoding
            batch = dict(batch)
        for example in example_slices(batch, _size(batch)):
            count += 1
            out, tgt = forward(model, example)
            if estimator == "empirical":
                assert criterion is not None
                add(_example_loss(likelihood, criterion, out, tgt))
                continue
            if likelihood == "categorical":
                flat = out.reshape(-1, out.shape[-1])
                keep = (
                    (tgt.reshape(-1) != ignore_index).tolist()
                    if isinstance(tgt, Tensor) and not tgt.is_floating_point()
                    else [True] * flat.shape[0]
                )
                log_probs = torch.log_softmax(flat, dim=-1)
                probs = log_probs.detach().double().exp()
                for pos in range(flat.shape[0]):
                    if not keep[pos]:
                        continue
                    for c in range(flat.shape[1]):
                        add(log_probs[pos, c], float(probs[pos, c]))
            elif likelihood == "bernoulli":
                flat = out.reshape(-1)
                for u in range(flat.shape[0]):
                    p_one = float(torch.sigmoid(flat[u].detach().double()))
                    add(F.logsigmoid(flat[u]), p_one)  # label 1
                    add(F.logsigmoid(-flat[u]), 1.0 - p_one)  # label 0
            elif likelihood == "gaussian":
                flat = out.reshape(-1)
                for d in range(flat.shape[0]):
                    add(flat[d])
            else:
                raise KeyError(likelihood)
    return {name: value / count for name, value in total.items()}


def _example_loss(likelihood: str, criterion: nn.Module, out: Tensor, tgt: Tensor) -> Tensor:
    """The example's loss: per-position losses (``reduction='none'``) summed."""
    if likelihood == "categorical":
        classes = out.shape[-1]
        flat_target = tgt.reshape(-1) if not tgt.is_floating_point() else tgt.reshape(-1, classes)
        if isinstance(criterion, nn.NLLLoss):
            return F.nll_loss(
                out.reshape(-1, classes),
                flat_target,
                weight=criterion.weight,
                ignore_index=criterion.ignore_index,
                reduction="none",
            ).sum()
        return F.cross_entropy(
            out.reshape(-1, classes),
            flat_target,
            weight=getattr(criterion, "weight", None),
            ignore_index=getattr(criterion, "ignore_index", -100),
            label_smoothing=getattr(criterion, "label_smoothing", 0.0),
            reduction="none",
        ).sum()
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(
            out,
            tgt.to(out.dtype),
            weight=getattr(criterion, "weight", None),
            pos_weight=getattr(criterion, "pos_weight", None),
            reduction="none",
        ).sum()
    return criterion(out, tgt)
