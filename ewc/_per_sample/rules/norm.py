"""Rules for the affine parameters of normalisation layers: ``y = xhat * w + b`` with ``xhat``
the normalised input, recomputed from the captured input. Per example, the gradients sum the
elementwise products over the positions sharing a parameter:

    dw_kn = sum_positions g_kn * xhat_n        db_kn = sum_positions g_kn
    result = sum_k sum_n (dw_kn)^2, sum_k sum_n (db_kn)^2

* ``nn.LayerNorm`` / ``nn.RMSNorm``: parameters over the trailing ``normalized_shape``;
* ``nn.GroupNorm``: one parameter per channel (dim 1), statistics per example and group;
* ``nn.BatchNorm1d/2d/3d`` in eval mode with running statistics (``xhat`` uses the running
  mean and variance, so examples do not interact); training mode is left to the fallback.

Cost ``O(K n A)`` for an activation of ``A`` elements per example, memory the same.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import cast

import torch.nn.functional as F
from torch import Tensor, nn

from ewc._per_sample.rules.registry import accumulator_dtype, register_rule, single_batched_input
from ewc._typing import TensorDict

__all__ = ["batch_norm_rule", "group_norm_rule", "layer_norm_rule"]

_BatchNorm = nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d


def _affine(
    module: nn.Module, xhat: Tensor, grad_outputs: Tensor, names: Collection[str], trailing: int
) -> TensorDict:
    """Sums for ``w``/``b`` whose shape is the trailing ``trailing`` dims (0: channel dim 1)."""
    dtype = accumulator_dtype(module.get_parameter(next(iter(names))).dtype)
    g = grad_outputs.to(dtype)
    # LayerNorm: the dims between the batch and normalized_shape; per channel (dim 2 of g): the
    # spatial dims after it
    reduce = tuple(range(2, g.dim() - trailing)) if trailing else tuple(range(3, g.dim()))
    result: TensorDict = {}
    if "weight" in names:
        product = g * xhat.to(dtype)
        per_example = product.sum(reduce) if reduce else product
        result["weight"] = per_example.square().sum((0, 1))
    if "bias" in names:
        per_example = g.sum(reduce) if reduce else g
        result["bias"] = per_example.square().sum((0, 1))
    return result


def _layer_norm_supports(module: nn.Module, inputs: tuple[Tensor, ...], batch_size: int) -> bool:
    normalized = len(cast(nn.LayerNorm, module).normalized_shape)
    return single_batched_input(inputs, batch_size, normalized + 1)


@register_rule(nn.LayerNorm, supports=_layer_norm_supports)
def layer_norm_rule(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    grad_outputs: Tensor,
    names: Collection[str],
    memory_budget_bytes: int,
) -> TensorDict:
    """``nn.LayerNorm`` affine: ``xhat = layer_norm(x)`` without weight and bias."""
    norm = cast(nn.LayerNorm, module)
    xhat = F.layer_norm(inputs[0], norm.normalized_shape, None, None, norm.eps)
    shape = norm.normalized_shape
    return _affine(module, xhat, grad_outputs, names, len(shape))


if hasattr(nn, "RMSNorm"):

    @register_rule(nn.RMSNorm, supports=_layer_norm_supports)
    def rms_norm_rule(
        module: nn.Module,
        inputs: tuple[Tensor, ...],
        grad_outputs: Tensor,
        names: Collection[str],
        memory_budget_bytes: int,
    ) -> TensorDict:
        """``nn.RMSNorm`` weight: ``xhat = x / rms(x)``."""
        norm = cast(nn.RMSNorm, module)
        shape = tuple(norm.normalized_shape)
        xhat = F.rms_norm(inputs[0], shape, None, norm.eps)
        return _affine(module, xhat, grad_outputs, names, len(shape))


def _channel_supports(module: nn.Module, inputs: tuple[Tensor, ...], batch_size: int) -> bool:
    return single_batched_input(inputs, batch_size, 2)


@register_rule(nn.GroupNorm, supports=_channel_supports)
def group_norm_rule(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    grad_outputs: Tensor,
    names: Collection[str],
    memory_budget_bytes: int,
) -> TensorDict:
    """``nn.GroupNorm`` affine: ``xhat = group_norm(x)`` per example and group."""
    norm = cast(nn.GroupNorm, module)
    xhat = F.group_norm(inputs[0], norm.num_groups, None, None, norm.eps)
    return _affine(module, xhat, grad_outputs, names, 0)


def _batch_norm_supports(module: nn.Module, inputs: tuple[Tensor, ...], batch_size: int) -> bool:
    return (
        not module.training
        and module.running_mean is not None
        and module.running_var is not None
        and _channel_supports(module, inputs, batch_size)
    )


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, supports=_batch_norm_supports)
def batch_norm_rule(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    grad_outputs: Tensor,
    names: Collection[str],
    memory_budget_bytes: int,
) -> TensorDict:
    """``nn.BatchNorm*d`` affine in eval mode: ``xhat = (x - running_mean) / sqrt(running_var
    + eps)`` per channel."""
    norm = cast(_BatchNorm, module)
    xhat = F.batch_norm(
        inputs[0], norm.running_mean, norm.running_var, None, None, False, 0.0, norm.eps
    )
    return _affine(module, xhat, grad_outputs, names, 0)
