"""Rule for ``nn.Embedding``: the weight gradient of one example scatters its output gradients to
the rows it looked up, so an index repeated within an example sums its gradients *before* the
square, and ``padding_idx`` gets no gradient:

    dW_kn[v] = sum_{l : idx_nl = v, v != padding_idx} g_knl
    sum_k sum_n (dW_kn)^2 = scatter_v( sum_k (per (n, v) sum of g_knl)^2 )

Implemented with one ``unique`` over (example, index) keys and two ``index_add_``. Cost
``O(K n L D)`` plus a sort of ``n L`` keys; memory ``O(K n L D + V D)``; no ``(n, V, D)`` tensor.
``max_norm`` (the forward rewrites the weight) and ``scale_grad_by_freq`` (a per-batch rescaling)
are left to the fallback.

Broadcast indices: position ids ``(1, L)`` looked up once and broadcast against the batch (as
Hugging Face models call their position embeddings). The engine hands the model the output
expanded to the batch size (the rule declares ``broadcast``), so the output gradients are per
example, and every example uses the same index set: ``idx_nl = idx_0l``.

Per-example gradients (for a weight tied to an output projection): ``(K, c, V, D)`` dense, built
with one ``index_add_`` per chunk of examples.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor, nn

from ewc._per_sample.rules.registry import accumulator_dtype, register_rule, single_batched_input
from ewc._typing import TensorDict

__all__ = ["embedding_rule"]


def _supports(module: nn.Module, inputs: tuple[Tensor, ...], batch_size: int) -> bool:
    return (
        (
            single_batched_input(inputs, batch_size, 1)
            or single_batched_input(inputs, 1, 1)  # broadcast along dim 0
        )
        and module.max_norm is None
        and not module.scale_grad_by_freq
    )


def _indices(inputs: tuple[Tensor, ...], examples: int) -> Tensor:
    """``(n, L)`` indices; broadcast ids ``(1, *)`` repeated for every example."""
    index = inputs[0].reshape(inputs[0].shape[0], -1).long()
    if index.shape[0] != examples:
        index = index.expand(examples, index.shape[1])
    return index


def embedding_per_example(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_outputs: Tensor, names: Collection[str]
) -> TensorDict:
    """Per-example weight gradients ``(K, c, V, D)`` of ``c`` examples."""
    weight = module.get_parameter("weight")
    vocabulary, dim = weight.shape
    count, examples = int(grad_outputs.shape[0]), int(grad_outputs.shape[1])
    index = _indices(inputs, examples)
    g = grad_outputs.to(accumulator_dtype(weight.dtype)).reshape(count, -1, dim)
    owner = torch.arange(examples, device=index.device).repeat_interleave(index.shape[1])
    rows = owner * vocabulary + index.reshape(-1)
    padding_idx = module.padding_idx
    if padding_idx is not None:
        keep = index.reshape(-1) != padding_idx
        g, rows = g[:, keep], rows[keep]
    total = g.new_zeros(count, examples * vocabulary, dim).index_add_(1, rows, g)
    return {"weight": total.reshape(count, examples, vocabulary, dim)}


@register_rule(nn.Embedding, supports=_supports, per_example=embedding_per_example, broadcast=True)
def embedding_rule(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    grad_outputs: Tensor,
    names: Collection[str],
    memory_budget_bytes: int,
) -> TensorDict:
    """Sum over examples and signals of squared per-example ``weight`` gradients.

    Args:
        module: the ``nn.Embedding``.
        inputs: ``(indices,)`` with ``indices: (n, *)``.
        grad_outputs: ``(K, n, *, D)``.
        names: the local parameter names wanted (``"weight"``).
        memory_budget_bytes: unused (the rule needs no per-example gradients).

    Returns:
        ``{"weight": (V, D)}``.
    """
    weight = module.get_parameter("weight")
    vocabulary, dim = weight.shape
    count, examples = int(grad_outputs.shape[0]), int(grad_outputs.shape[1])
    index = _indices(inputs, examples)
    g = grad_outputs.to(accumulator_dtype(weight.dtype)).reshape(count, -1, dim)  # (K, n*L, D)
    rows = index.reshape(-1)
    padding_idx = module.padding_idx
    if padding_idx is not None:
        keep = rows != padding_idx
        g, rows = g[:, keep], rows[keep]
        owner = torch.arange(examples, device=index.device).repeat_interleave(index.shape[1])
        owner = owner[keep]
    else:
        owner = torch.arange(examples, device=index.device).repeat_interleave(index.shape[1])
    total = g.new_zeros(vocabulary, dim)
    if index.shape[1] == 1:  # one lookup per example: nothing to merge
        return {"weight": total.index_add_(0, rows, g.square().sum(0))}
    keys, inverse = torch.unique(owner * vocabulary + rows, return_inverse=True)
    merged = g.new_zeros(count, keys.shape[0], dim).index_add_(1, inverse, g)
    return {"weight": total.index_add_(0, keys % vocabulary, merged.square().sum(0))}
