"""Rule for ``nn.Linear``: ``y = x W^T + b`` applied over the last input dimension.

2-D input ``x: (n, i)``, output gradients ``g: (K, n, o)``. The per-example gradient for signal
``k`` is the outer product ``g_kn x_n^T``, so its square is ``g_kn^2 (x_n^2)^T`` and

    sum_k sum_n (dW_kn)^2 = (sum_k g_k * g_k)^T (x * x)      one (o, n) @ (n, i) matmul
    sum_k sum_n (db_kn)^2 = sum_k sum_n g_kn * g_kn

Cost: O(n (i + o) K) elementwise plus one matmul of ``n i o`` multiply-adds (the cost of one
ordinary weight gradient), whatever ``K``; memory O(n (i + o) + i o).

Input with extra dimensions ``(n, *, i)`` (sequences): the per-example gradient sums over the
positions before squaring, so per-example gradients ``(n, K, o, i)`` are built with a batched
matmul in chunks of examples and signals sized to the memory budget. Cost ``K n L i o``.
"""

from __future__ import annotations

from collections.abc import Collection

from torch import Tensor, nn

from ewc._per_sample.rules.registry import accumulator_dtype, chunk_size, register_rule
from ewc._typing import TensorDict

__all__ = ["linear_rule", "linear_squared_sums"]


@register_rule(nn.Linear)
def linear_rule(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    grad_outputs: Tensor,
    names: Collection[str],
    memory_budget_bytes: int,
) -> TensorDict:
    """Sum over examples and signals of squared per-example ``weight``/``bias`` gradients.

    Args:
        module: the ``nn.Linear``.
        inputs: ``(x,)`` with ``x`` of shape ``(n, *, in_features)``.
        grad_outputs: ``(K, n, *, out_features)``.
        names: the local parameter names wanted (``"weight"``, ``"bias"``).
        memory_budget_bytes: bound on per-example gradients materialised for sequence inputs.

    Returns:
        ``{"weight": (out, in), "bias": (out,)}`` restricted to ``names``.
    """
    weight = module.get_parameter("weight")
    dtype = accumulator_dtype(weight.dtype)
    weight_sum, bias_sum = linear_squared_sums(
        inputs[0].to(dtype),
        grad_outputs.to(dtype),
        memory_budget_bytes,
        weight="weight" in names,
        bias="bias" in names,
    )
    result: TensorDict = {}
    if weight_sum is not None:
        result["weight"] = weight_sum
    if bias_sum is not None:
        result["bias"] = bias_sum
    return result


def linear_squared_sums(
    x: Tensor, g: Tensor, memory_budget_bytes: int, *, weight: bool, bias: bool
) -> tuple[Tensor | None, Tensor | None]:
    """For ``y = x W^T + b`` with inputs ``x: (n, *, i)`` and output gradients
    ``g: (K, n, *, o)``: ``sum_{k,n} dW_kn^2`` and ``sum_{k,n} db_kn^2`` (each only if asked),
    in the dtype of ``x`` and ``g``. Shared by every rule whose layer contains a linear map."""
    count, examples = int(g.shape[0]), int(g.shape[1])
    x = x.reshape(examples, -1, x.shape[-1])  # (n, L, i)
    g = g.reshape(count, examples, -1, g.shape[-1])  # (K, n, L, o)
    if x.shape[1] == 1:
        g_sq = g[0, :, 0].square() if count == 1 else g[:, :, 0].square().sum(0)  # (n, o)
        return (
            g_sq.T @ x[:, 0].square() if weight else None,
            g_sq.sum(0) if bias else None,
        )
    return (
        _sequence_weight(x, g, memory_budget_bytes) if weight else None,
        g.sum(2).square().sum((0, 1)) if bias else None,
    )


def _sequence_weight(x: Tensor, g: Tensor, memory_budget_bytes: int) -> Tensor:
    """``sum_{k,n} (sum_l g_knl x_nl^T)^2`` with per-example gradients built in bounded chunks."""
    count, examples, positions, outputs = g.shape
    inputs = x.shape[-1]
    item_bytes = outputs * inputs * x.element_size()
    total = x.new_zeros(outputs, inputs)
    k_chunk = chunk_size(count, item_bytes, memory_budget_bytes)
    n_chunk = chunk_size(examples, k_chunk * item_bytes, memory_budget_bytes)
    for n0 in range(0, examples, n_chunk):
        xs = x[n0 : n0 + n_chunk]  # (c, L, i)
        for k0 in range(0, count, k_chunk):
            gs = g[k0 : k0 + k_chunk, n0 : n0 + n_chunk]  # (kc, c, L, o)
            kc, c = gs.shape[0], gs.shape[1]
            lhs = gs.permute(1, 0, 3, 2).reshape(c, kc * outputs, positions)
            per_example = lhs @ xs  # (c, kc*o, i)
            total += per_example.square().reshape(c * kc, outputs, inputs).sum(0)
    return total
