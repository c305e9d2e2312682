"""Rule for ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` via unfold (im2col).

Unfolding the (padded) input of example ``n`` gives columns ``X_n: (G, C/G * prod(k), L)`` over
the ``L`` output positions, so the per-example weight gradient of signal ``k`` for group ``j`` is
``g_knj @ X_nj^T`` with ``g_knj: (O/G, L)``. There is no closed form for the sum of squares of a
sum over positions, so per-example gradients are built with one batched matmul per chunk of
examples and signals, squared and summed:

    sum_k sum_n (dW_kn)^2 = sum_k sum_n (g_kn @ X_n^T)^2      (chunked; budget-bounded)
    sum_k sum_n (db_kn)^2 = sum_k sum_n (sum_l g_knl)^2

Cost: ``K n O (C/G) prod(k) L`` multiply-adds (``K`` times one ordinary weight gradient); memory
``chunk * (C prod(k) L + K O (C/G) prod(k))`` elements, with the chunk sized to the budget.
Padding modes (``zeros``, ``reflect``, ``replicate``, ``circular``), string padding (``"same"``,
``"valid"``), stride, dilation and groups follow the module's own forward.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import cast

import torch.nn.functional as F
from torch import Tensor, nn

from ewc._per_sample.rules.registry import (
    accumulator_dtype,
    chunk_size,
    register_rule,
    single_batched_input,
)
from ewc._typing import TensorDict

__all__ = ["conv_padding", "conv_rule", "unfold_input"]

_Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d


def _supports(module: nn.Module, inputs: tuple[Tensor, ...], batch_size: int) -> bool:
    spatial = len(cast(_Conv, module).kernel_size)
    return single_batched_input(inputs, batch_size, spatial + 2) and inputs[0].dim() == spatial + 2


def conv_padding(conv: _Conv) -> list[int]:
    """The module's padding in ``F.pad`` order (last dim first, (left, right) pairs)."""
    kernel, dilation, padding = conv.kernel_size, conv.dilation, conv.padding
    pad: list[int] = []
    for i in reversed(range(len(kernel))):
        if isinstance(padding, str):
            total = dilation[i] * (kernel[i] - 1) if padding == "same" else 0
            left, right = total // 2, total - total // 2
        else:
            left = right = int(padding[i])
        pad.extend((left, right))
    return pad


def unfold_input(conv: _Conv, x: Tensor) -> Tensor:
    """Columns ``(n, C * prod(kernel), L)`` of ``x`` as the module's forward sees them."""
    kernel, stride, dilation = tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)
    pad = conv_padding(conv)
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else str(conv.padding_mode)
        x = F.pad(x, pad, mode=mode)
    n, channels = x.shape[0], x.shape[1]
    spatial = len(kernel)  # strided windows + one copy: faster than F.unfold's im2col on CPU
    for i in range(spatial):
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
    for i, step in enumerate(dilation):  # keep every dilation-th element of each window
        if step > 1:
            x = x[(slice(None),) * (2 + spatial + i) + (slice(None, None, step),)]
    # (n, C, O_1..O_s, k_1..k_s) -> (n, C, k_1..k_s, O_1..O_s)
    order = [0, 1, *range(2 + spatial, 2 + 2 * spatial), *range(2, 2 + spatial)]
    return x.permute(order).reshape(n, channels * math.prod(kernel), -1)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, supports=_supports)
def conv_rule(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    grad_outputs: Tensor,
    names: Collection[str],
    memory_budget_bytes: int,
) -> TensorDict:
    """Sum over examples and signals of squared per-example ``weight``/``bias`` gradients.

    Args:
        module: the convolution.
        inputs: ``(x,)`` with ``x: (n, C, *spatial)``.
        grad_outputs: ``(K, n, O, *out_spatial)``.
        names: the local parameter names wanted.
        memory_budget_bytes: bound on unfolded inputs plus per-example gradients of one chunk.

    Returns:
        ``{"weight": (O, C/G, *kernel), "bias": (O,)}`` restricted to ``names``.
    """
    conv = cast(_Conv, module)
    weight = conv.weight
    dtype = accumulator_dtype(weight.dtype)
    groups = conv.groups
    count, examples, outputs = (int(s) for s in grad_outputs.shape[:3])
    g = grad_outputs.to(dtype).reshape(count, examples, groups, outputs // groups, -1)
    result: TensorDict = {}
    if "bias" in names:
        result["bias"] = g.sum(-1).square().sum((0, 1)).reshape(outputs)
    if "weight" not in names:
        return result
    x = inputs[0].to(dtype)
    positions = g.shape[-1]
    row = weight[0].numel()  # (C/G) * prod(kernel)
    item = x.element_size()
    grads_bytes = outputs * row * item
    k_chunk = chunk_size(count, grads_bytes, memory_budget_bytes)
    n_chunk = chunk_size(
        examples, k_chunk * grads_bytes + groups * row * positions * item, memory_budget_bytes
    )
    total = x.new_zeros(groups, outputs // groups, row)
    for n0 in range(0, examples, n_chunk):
        cols = unfold_input(conv, x[n0 : n0 + n_chunk])
        c = cols.shape[0]
        cols_t = cols.reshape(c, groups, row, positions).transpose(-1, -2)  # (c, G, L, row)
        for k0 in range(0, count, k_chunk):
            gs = g[k0 : k0 + k_chunk, n0 : n0 + n_chunk]  # (kc, c, G, O/G, L)
            kc = gs.shape[0]
            lhs = gs.permute(1, 2, 0, 3, 4).reshape(c, groups, kc * (outputs // groups), positions)
            per_example = lhs @ cols_t  # (c, G, kc*O/G, row)
            squares = per_example.square_().reshape(c, groups, kc, outputs // groups, row)
            total += squares.sum((0, 2))
    result["weight"] = total.reshape(weight.shape)
    return result
