"""Rule for ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``: per-example squared weight gradients.

Unfolding the (padded) input of example ``n`` gives columns ``X_n: (G, R, L)`` with
``R = C/G * prod(kernel)`` rows per group and ``L`` output positions; with output gradients
``g_kn: (G, O/G, L)`` of signal ``k``, the per-example weight gradient of group ``j`` is
``dW_knj = g_knj @ X_nj^T``. There is no closed form for the square of a sum over positions, so
the rule picks, per call, the cheaper of two exact ways of computing
``sum_k sum_n dW_kn * dW_kn``:

* ``"gram"`` (few positions): expanding the square over pairs of positions,

      sum_k sum_n dW_kn[o, r]^2 = sum_n sum_{l <= l'} c_ll' M_n[o, (l, l')] X_n[r, l] X_n[r, l']
      M_n[o, (l, l')] = sum_k g_kn[o, l] g_kn[o, l'],     c_ll' = 1 if l == l' else 2

  which is one matmul ``(O, n P) @ (n P, R)`` with ``P = L (L + 1) / 2`` pairs, whatever the
  number of signals ``K``, and no per-example gradient is ever built. For ``L == 1`` (the last
  stage of a ResNet on CIFAR-size inputs) this costs one ordinary weight gradient.
* ``"examples"`` (many positions): per-example gradients ``g_kn @ X_n^T`` from one batched matmul
  per chunk of examples and signals, squared and summed. The chunk is sized to stay in cache
  (:data:`CACHE_BYTES` per thread) and within the memory budget, so the squares are summed
  while the gradients are still in cache.

Cost: ``"gram"`` ``n P O R`` multiply-adds (plus ``K n O P`` elementwise); ``"examples"``
``K n L O R`` multiply-adds plus a pass over ``K n O R`` per-example entries. The rule takes
``"gram"`` when ``P <= GRAM_WEIGHT * K ** SIGNAL_EXPONENT * (L + EXAMPLE_OVERHEAD)`` (constants
measured on CPU, one thread: with one signal it picks ``"gram"`` up to ``L = 5``, with ten up to
``L = 15``). Memory: chunks of examples bounded by ``memory_budget_bytes``.

Rounding: ``"gram"`` sums ``L (L + 1) / 2`` signed products where ``"examples"`` squares one
sum, so its relative error per entry is at most about ``L`` units of rounding times
``sum_l |g_l x_l|^2 / (sum_l g_l x_l)^2``; the result is clamped at 0 so rounding can never
yield a negative importance.

Padding modes (``zeros``, ``reflect``, ``replicate``, ``circular``), string padding (``"same"``,
``"valid"``), stride, dilation and groups follow the module's own forward.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc._per_sample.rules.registry import (
    accumulator_dtype,
    chunk_size,
    register_rule,
    single_batched_input,
)
from ewc._typing import TensorDict

__all__ = [
    "CACHE_BYTES",
    "EXAMPLE_OVERHEAD",
    "GRAM_WEIGHT",
    "MAX_CACHE_THREADS",
    "SIGNAL_EXPONENT",
    "conv_padding",
    "conv_rule",
    "conv_weight_squared_sums",
    "unfold_input",
]

_Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d
Method = Literal["gram", "examples"]

CACHE_BYTES = 2 * 2**20
"""Target size (bytes) per intra-op thread of one chunk of per-example gradients (and its
unfolded input) on the ``"examples"`` path: small enough to be squared and summed while still in
cache (and for the unfolded chunk to reuse freed memory instead of faulting in fresh pages),
large enough that the per-chunk dispatch cost stays small. Measured on the small CNN's `exact`
(batch 128, 9 signals, medians of 15 interleaved passes): at 1 thread 2 MiB 3-4% faster than
4 or 8 MiB; at 2 threads 4-8 MiB 3-6% faster than 2 MiB."""

MAX_CACHE_THREADS = 8
"""Threads counted in the chunk size (:data:`CACHE_BYTES` each), so that many threads do not
make chunks of fresh, page-faulting memory."""

GRAM_WEIGHT = 0.6
"""Cost of the ``"examples"`` path per signal and position, in units of one position pair on the
``"gram"`` path, for one signal; it grows as ``K ** SIGNAL_EXPONENT`` with ``K`` signals (the
per-example matmuls get ``K`` times more rows and run faster per row)."""

SIGNAL_EXPONENT = 0.7

EXAMPLE_OVERHEAD = 25
"""Cost of writing, squaring and summing one per-example gradient entry on the ``"examples"``
path, in units of one multiply-add per position of its matmul (a short inner dimension ``L``
makes the batched matmul memory-bound)."""


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


def unfold_input(conv: _Conv, x: Tensor, *, positions_first: bool = False) -> Tensor:
    """Columns ``(n, C * prod(kernel), L)`` of ``x`` as the module's forward sees them, or with
    ``positions_first`` the same columns laid out ``(L, n, C * prod(kernel))``. One copy."""
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
    window = [1, *range(2 + spatial, 2 + 2 * spatial)]  # C, k_1..k_s
    out_positions = list(range(2, 2 + spatial))  # O_1..O_s
    rows = channels * math.prod(kernel)
    if positions_first:  # (O_1..O_s, n, C, k_1..k_s)
        return x.permute([*out_positions, 0, *window]).reshape(-1, n, rows)
    # (n, C, O_1..O_s, k_1..k_s) -> (n, C, k_1..k_s, O_1..O_s)
    return x.permute([0, *window, *out_positions]).reshape(n, rows, -1)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, supports=_supports, examples_first=True)
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
        memory_budget_bytes: bound on the unfolded inputs and per-example gradients (or position
            pairs) of one chunk of examples.

    Returns:
        ``{"weight": (O, C/G, *kernel), "bias": (O,)}`` restricted to ``names``.
    """
    conv = cast(_Conv, module)
    dtype = accumulator_dtype(conv.weight.dtype)
    count, examples, outputs = (int(s) for s in grad_outputs.shape[:3])
    g = grad_outputs.to(dtype).reshape(count, examples, outputs, -1)
    result: TensorDict = {}
    if "bias" in names:  # summed over positions in memory order (twice as fast as strided)
        examples_major = g.transpose(0, 1)
        by_memory = examples_major if examples_major.is_contiguous() else g
        result["bias"] = by_memory.sum(-1).square().sum((0, 1))
    if "weight" in names:
        result["weight"] = conv_weight_squared_sums(
            conv, inputs[0].to(dtype), g, memory_budget_bytes
        )
    return result


def conv_weight_squared_sums(
    conv: _Conv,
    x: Tensor,
    g: Tensor,
    memory_budget_bytes: int,
    *,
    method: Method | None = None,
) -> Tensor:
    """``sum_k sum_n dW_kn * dW_kn`` of shape ``conv.weight.shape``.

    Args:
        conv: the convolution (its geometry; its weight is not read).
        x: the input ``(n, C, *spatial)`` in the accumulator dtype.
        g: output gradients ``(K, n, O, L)`` in the same dtype.
        memory_budget_bytes: bound on what one chunk materialises.
        method: ``"gram"`` or ``"examples"`` (module docstring); default: the cheaper by the
            cost model.
    """
    count, positions = int(g.shape[0]), int(g.shape[-1])
    groups = conv.groups
    row = conv.weight[0].numel()  # (C/G) * prod(kernel)
    pairs = positions * (positions + 1) // 2
    if method is None:
        examples_cost = GRAM_WEIGHT * count**SIGNAL_EXPONENT * (positions + EXAMPLE_OVERHEAD)
        cheaper = pairs <= examples_cost
        method = "gram" if cheaper else "examples"
    if method == "gram":
        total = _by_gram(conv, x, g, groups, row, memory_budget_bytes).clamp_min_(0.0)
    elif method == "examples":
        total = _by_examples(conv, x, g, groups, row, memory_budget_bytes)
    else:
        raise ValueError(
            f"Expected argument `method` to be 'gram' or 'examples' but got {method!r}"
        )
    return total.reshape(conv.weight.shape)


def _by_gram(
    conv: _Conv, x: Tensor, g: Tensor, groups: int, row: int, memory_budget_bytes: int
) -> Tensor:
    """The ``"gram"`` path: one ``(O/G, P c) @ (P c, R)`` matmul per group and chunk."""
    count, examples, outputs, positions = (int(s) for s in g.shape)
    per_group = outputs // groups
    pairs = positions * (positions + 1) // 2
    item = x.element_size()
    # per example: columns (L G R) and their pair products (P G R); signal products (K P O)
    per_example = (positions + pairs) * row * groups + (count + 1) * pairs * outputs
    n_chunk = chunk_size(examples, per_example * item, memory_budget_bytes)
    total = x.new_zeros(groups, per_group, row)
    for n0 in range(0, examples, n_chunk):
        cols = unfold_input(conv, x[n0 : n0 + n_chunk], positions_first=True)  # (L, c, G R)
        c = cols.shape[1]
        products = _pair_products(cols, 1.0)  # (P, c, G R)
        gs = g[:, n0 : n0 + n_chunk]  # (K, c, O, L)
        # signals last, so that summing them over pairs is a reduction of the last dimension
        signals = gs[0].permute(2, 0, 1) if count == 1 else gs.permute(3, 1, 2, 0)
        signal_products = _pair_products(signals, 2.0)  # (P, c, O)
        lhs = signal_products.view(pairs * c, groups, per_group).permute(1, 2, 0)  # (G, O/G, Pc)
        rhs = products.view(pairs * c, groups, row).transpose(0, 1)  # (G, P c, R)
        total.baddbmm_(lhs, rhs)
    return total


def _pair_products(values: Tensor, off_diagonal: float) -> Tensor:
    """``out[(l, l')] = c_ll' * values[l] * values[l']`` for ``l <= l'`` (row-major pairs), with
    ``c = off_diagonal`` off the diagonal; a trailing dimension (signals) beyond the first
    ``values[l]`` shape is summed. One multiply per position: no index gathers."""
    positions = values.shape[0]
    summed = values.dim() == 4  # (L, c, O, K)
    shape = values.shape[1:3] if summed else values.shape[1:]
    out = values.new_empty(positions * (positions + 1) // 2, *shape)
    start = 0
    for first in range(positions):
        span = positions - first
        block = out[start : start + span]
        if summed:
            torch.sum(values[first : first + 1] * values[first:], dim=-1, out=block)
        else:
            torch.mul(values[first : first + 1], values[first:], out=block)
        if span > 1 and off_diagonal != 1.0:
            block[1:].mul_(off_diagonal)
        start += span
    return out


def _by_examples(
    conv: _Conv, x: Tensor, g: Tensor, groups: int, row: int, memory_budget_bytes: int
) -> Tensor:
    """The ``"examples"`` path: per-example gradients in cache-sized chunks, squared, summed.

    Per chunk of examples (and signals) sized to :data:`CACHE_BYTES` per thread, the input is
    unfolded and the per-example gradients are written into one buffer reused across chunks,
    squared in place and summed while still in cache. Small chunks matter twice: an unfolded
    batch of a few MiB is a fresh allocation whose pages fault on first touch (4 ms instead of
    0.9 ms for the small CNN's second convolution), and the gradients stay in cache between the
    matmul and the sum."""
    count, examples, outputs, positions = (int(s) for s in g.shape)
    per_group = outputs // groups
    g = g.view(count, examples, groups, per_group, positions)
    item = x.element_size()
    # per example and signal: its weight gradient, and its output gradients gathered for the
    # matmul unless they are already adjacent (example-major, one group: a view); per example:
    # its unfolded input
    adjacent = groups == 1 and g.transpose(0, 1).is_contiguous()
    per_signal = (outputs * row + (0 if adjacent else outputs * positions)) * item
    cols_bytes = groups * row * positions * item
    threads = min(max(1, torch.get_num_threads()), MAX_CACHE_THREADS)  # the matmul splits them
    budget = min(memory_budget_bytes, max(CACHE_BYTES * threads, per_signal + cols_bytes))
    k_chunk = chunk_size(count, per_signal, max(1, budget - cols_bytes))
    n_chunk = chunk_size(examples, k_chunk * per_signal + cols_bytes, budget)
    total = x.new_zeros(groups, per_group, row)
    buffer = x.new_empty(n_chunk * k_chunk * outputs * row)
    for n0 in range(0, examples, n_chunk):
        cols = unfold_input(conv, x[n0 : n0 + n_chunk])  # (c, G R, L)
        c = cols.shape[0]
        rhs = cols.view(c, groups, row, positions).transpose(-1, -2)  # (c, G, L, R), a view
        for k0 in range(0, count, k_chunk):
            gs = g[k0 : k0 + k_chunk, n0 : n0 + c]  # (kc, c, G, O/G, L)
            kc = gs.shape[0]
            lhs = gs.permute(1, 2, 0, 3, 4).reshape(c, groups, kc * per_group, positions)
            out = buffer[: c * groups * kc * per_group * row].view(c, groups, kc * per_group, row)
            grads = torch.matmul(lhs, rhs, out=out)
            squares = grads.square_().view(c, groups, kc, per_group, row)
            total += squares.sum((0, 2))
    return total
