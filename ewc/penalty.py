"""The EWC quadratic penalty and its closed-form gradient, as pure functions.

All consolidated tasks collapse into one quadratic per parameter. With ``A = sum_t F_t`` (the
summed Fisher), a centre ``m`` and one float64 constant ``r``::

    P(theta) = ewc_lambda * (sum_i A_i (theta_i - m_i)^2 + r)
    dP/dtheta = 2 * ewc_lambda * A * (theta - m)

which equals the naive per-task sum ``ewc_lambda * sum_t sum_i F_t,i (theta_i - a_t,i)^2`` for any
number of tasks, at O(P) memory and O(P) time per evaluation. Online EWC is the same quadratic with
``A <- decay * A + F``, ``m <- a`` and ``r = 0``.

Functions here take and return tensors; no state, no framework, no model traversal.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from ewc._fused import FusedKernel

__all__ = [
    "CPU_BLOCK_ELEMENTS",
    "add_penalty_grad_",
    "merge_online",
    "merge_separate",
    "overlap",
    "pad_to",
    "penalty_value",
]


def pad_to(tensor: Tensor, shape: torch.Size | Sequence[int]) -> Tensor:
    """Zero-pad ``tensor`` at the end of every dimension up to ``shape`` (a grown parameter).

    Returns ``tensor`` itself when the shape already matches. Cost: one allocation of ``shape``.
    """
    shape = torch.Size(shape)
    if tensor.shape == shape:
        return tensor
    padded = tensor.new_zeros(shape)
    padded[overlap(tensor.shape)] = tensor
    return padded


def overlap(shape: torch.Size | Sequence[int]) -> tuple[slice, ...]:
    """Index of the leading block of size ``shape``: ``param[overlap(A.shape)]`` is a view."""
    return tuple(slice(0, size) for size in shape)


def merge_separate(
    importance: Tensor, centre: Tensor, fisher: Tensor, anchor: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Add one task ``(F, a)`` to the collapsed quadratic ``(A, m)`` of one parameter.

    ``A' = A + F``; ``m' = (A m + F a) / A'`` (``m' = a`` where ``A' == 0``); and the increase of
    the constant in the stable form ``sum (A F / A') (m - a)^2``, never as a difference of large
    sums. Elementwise work runs in the state's dtype (float32 or wider); the constant is summed
    in float64. ``importance``/``centre`` must already be padded to ``fisher``'s shape.
    Cost: O(P) time, a few O(P) temporaries.

    Returns:
        ``(A', m', delta_r)`` with ``delta_r`` a float64 scalar tensor.
    """
    merged = importance + fisher
    positive = merged > 0
    # Where A' == 0 the quotients are 0/0; torch.where discards those entries.
    new_centre = torch.where(positive, (importance * centre + fisher * anchor) / merged, anchor)
    weight = torch.where(positive, importance * fisher / merged, 0.0)
    delta_r = (weight * (centre - anchor).square()).sum(dtype=torch.float64)
    return merged, new_centre, delta_r


def merge_online(importance: Tensor, fisher: Tensor, decay_factor: float) -> Tensor:
    """Online EWC importance update ``G' = decay_factor * G + F`` (``G`` padded to ``F``'s shape).

    The anchor becomes the latest weights and the constant stays 0. Cost: O(P).
    """
    return decay_factor * importance + fisher


def penalty_value(
    params: Sequence[Tensor],
    importances: Sequence[Tensor],
    centres: Sequence[Tensor],
    offset: Tensor,
    ewc_lambda: float,
) -> Tensor:
    """Differentiable ``ewc_lambda * (sum A (theta - m)^2 + r)`` over aligned parameter lists.

    Each ``params[k]`` may be larger than ``importances[k]`` (grown after consolidation); only the
    leading block is penalised. The result has the promoted dtype of parameters and state, so a
    bfloat16 model is penalised in float32. Cost: O(P) time, autograd keeps O(P) temporaries.
    """
    if not params:
        return ewc_lambda * offset
    terms = [
        (importance * (param[overlap(importance.shape)] - centre).square()).sum()
        for param, importance, centre in zip(params, importances, centres)
    ]
    value = functools.reduce(torch.add, terms)
    return ewc_lambda * (value + offset.to(device=value.device, dtype=value.dtype))


CPU_SMALL_ELEMENTS = 1 << 14
"""Tensors of at most this many elements (64 KiB in float32: biases, norms, small layers) are
done together on CPU by two multi-tensor kernels, whose per-call cost is one dispatch for the
whole list instead of two per tensor; their temporaries are small and stay in cache."""

CPU_BLOCK_ELEMENTS = 1 << 19
"""Elements per block on CPU: blocks of theta, m, A and the gradient (2 MiB each in float32) stay
in cache between the two kernels, so ``theta - m`` never travels to memory and back."""


def add_penalty_grad_(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    importances: Sequence[Tensor],
    centres: Sequence[Tensor],
    ewc_lambda: float,
    *,
    scale: float = 1.0,
    workspace: Tensor | None = None,
    block_elements: int = CPU_BLOCK_ELEMENTS,
    small_elements: int = CPU_SMALL_ELEMENTS,
    return_quadratic: bool = False,
    fused_kernel: FusedKernel | None = None,
) -> Tensor | None:
    """In place, ``grad += scale * 2 * ewc_lambda * A * (theta - m)`` for aligned lists.

    No autograd. ``grads[k]``/``params[k]`` are the leading blocks matching ``importances[k]``.
    The difference is taken before multiplying, so there is no cancellation when theta is close
    to m. ``scale`` (an fp16 loss scale) multiplies the gradient only: it enters as the one factor
    ``2 * ewc_lambda * scale`` of the multiply-add, so a power-of-two ``scale`` adds to zero
    gradients exactly ``scale`` times what ``scale=1`` adds (barring overflow and underflow).

    * CPU: per block of ``block_elements``, ``workspace = theta - m`` (``out=``) then
      ``grad += 2 lambda scale A workspace`` (``addcmul_``) while the block is still in cache:
      memory traffic of one fused pass (read theta, m, A, grad; write grad), no allocation.
      ``workspace`` is a 1-D buffer of at least ``min(block_elements, largest numel)`` elements
      in the state's dtype; without one (or for non-contiguous blocks of grown parameters, or a
      gradient dtype other than the state's, e.g. bfloat16) the tensor is done unblocked.
    * CPU with ``fused_kernel`` (``EWC(fused=True)``, :mod:`ewc._fused`): one compiled pass per
      tensor whose four operands share a dtype, small ones included, same result as the
      blocked path.
    * Otherwise, CPU tensors of at most ``small_elements`` whose operands share a dtype: all
      together, by two multi-tensor kernels (one dispatch each for the whole list, small
      temporaries).
    * Other devices: two fused multi-tensor kernels (``torch._foreach_sub``,
      ``torch._foreach_addcmul_``); the temporaries come from the caching allocator.

    With ``return_quadratic=True`` it also returns ``sum A (theta - m)^2`` (float64 scalar, not
    multiplied by ``scale``), taken from the differences already in hand (on CPU while the block
    is in cache): the penalty's value for logging without a second pass over the parameters.

    Cost: O(P) time; O(block) extra memory on CPU.
    """
    quadratic = torch.zeros((), dtype=torch.float64) if return_quadratic else None
    if not grads:
        return quadratic
    factor = 2.0 * ewc_lambda * scale
    same_dtype = all(grad.dtype == a.dtype for grad, a in zip(grads, importances))
    if grads[0].device.type != "cpu" and same_dtype:
        return _multi_tensor_pass(grads, params, importances, centres, factor, return_quadratic)
    small: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] = ([], [], [], [])
    for grad, param, importance, centre in zip(grads, params, importances, centres):
        same = grad.dtype == importance.dtype == param.dtype
        if fused_kernel is not None and same and grad.device.type == "cpu":
            value = fused_kernel(grad, importance, param, centre, factor, return_quadratic)
            if quadratic is not None:
                quadratic += value
        elif same and grad.device.type == "cpu" and grad.numel() <= small_elements:
            for part, tensor in zip(small, (grad, param, importance, centre)):
                part.append(tensor)
        else:
            _one_tensor_pass(
                grad, param, importance, centre, factor, workspace, block_elements, quadratic
            )
    if small[0]:
        term = _multi_tensor_pass(*small, factor, return_quadratic)
        if quadratic is not None and term is not None:
            quadratic += term
    return quadratic


def _multi_tensor_pass(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    importances: Sequence[Tensor],
    centres: Sequence[Tensor],
    scale: float,
    return_quadratic: bool,
) -> Tensor | None:
    """Two multi-tensor kernels for the whole list (the differences are temporaries); with
    ``return_quadratic``, ``sum A (theta - m)^2`` as a float64 scalar on the tensors' device."""
    differences = torch._foreach_sub(list(params), list(centres))
    torch._foreach_addcmul_(list(grads), list(importances), differences, value=scale)
    if not return_quadratic:
        return None
    torch._foreach_mul_(differences, differences)
    terms = [torch.dot(d.reshape(-1), a.reshape(-1)) for d, a in zip(differences, importances)]
    return torch.stack(terms).sum(dtype=torch.float64)


def _one_tensor_pass(
    grad: Tensor,
    param: Tensor,
    importance: Tensor,
    centre: Tensor,
    scale: float,
    workspace: Tensor | None,
    block_elements: int,
    quadratic: Tensor | None,
) -> None:
    """One tensor: cache-blocked through ``workspace`` where possible, else with temporaries
    (non-contiguous blocks of grown parameters, a gradient dtype other than the state's)."""
    blockable = grad.dtype == importance.dtype and grad.is_contiguous() and param.is_contiguous()
    if workspace is None or workspace.dtype != importance.dtype or not blockable:
        difference = torch.sub(param, centre)
        weighted = difference * importance
        grad.add_(weighted.to(grad.dtype), alpha=scale)
        if quadratic is not None:
            quadratic += torch.dot(weighted.reshape(-1), difference.reshape(-1)).double().cpu()
        return
    flat_grad, flat_param = grad.view(-1), param.view(-1)
    flat_importance, flat_centre = importance.view(-1), centre.view(-1)
    size = flat_grad.numel()
    for start in range(0, size, block_elements):
        stop = min(size, start + block_elements)
        work = workspace[: stop - start]
        torch.sub(flat_param[start:stop], flat_centre[start:stop], out=work)
        flat_grad[start:stop].addcmul_(flat_importance[start:stop], work, value=scale)
        if quadratic is not None:
            quadratic += torch.dot(work.square_(), flat_importance[start:stop]).double()
