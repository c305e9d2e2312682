"""Rule for Hugging Face's ``Conv1D`` (GPT-2, GPT): a Linear with a transposed weight.

``Conv1D(nf, nx)`` holds ``weight: (nx, nf)`` and ``bias: (nf,)`` and computes
``y = x @ W + b`` over the last input dimension. It is ``nn.Linear`` with ``W^T``, so its sums are
the linear rule's (:func:`~ewc._per_sample.rules.linear.linear_squared_sums`), transposed:

    sum_k sum_n (dW_kn)^2 = ((sum_k g_k * g_k)^T (x * x))^T      2-D input: one matmul
    sum_k sum_n (db_kn)^2 = sum_k sum_n g_kn * g_kn

Matched by structure, so the core never imports ``transformers``: the class is named ``Conv1D``,
comes from a ``transformers`` module, and holds ``nf``, a 2-D ``weight`` of shape ``(nx, nf)`` and
a ``bias`` of shape ``(nf,)``. A subclass (which could override ``forward``) does not match.

Also here: per-example gradients of ``nn.Linear`` and ``Conv1D`` (``(K, c, o, i)`` and
``(K, c, i, o)``, one batched matmul per chunk of examples), which the engine uses when a weight
has several uses (an output projection tied to the token embedding).

Cost: as the linear rule; memory the same.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor, nn

from ewc._per_sample.rules.linear import linear_squared_sums
from ewc._per_sample.rules.registry import accumulator_dtype, register_rule, set_per_example
from ewc._typing import TensorDict

__all__ = ["is_hf_conv1d", "linear_per_example", "transposed_linear_rule"]


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is exactly Hugging Face's ``transformers.pytorch_utils.Conv1D``."""
    cls = type(module)
    if cls.__name__ != "Conv1D" or not cls.__module__.startswith("transformers."):
        return False
    nf = getattr(module, "nf", None)
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    return (
        isinstance(nf, int)
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and weight.shape[1] == nf
        and isinstance(bias, Tensor)
        and tuple(bias.shape) == (nf,)
    )


def _per_example_weight(x: Tensor, g: Tensor) -> Tensor:
    """Per-example gradients ``(K, c, o, i)``: ``sum_l g_kcl x_cl^T``.

    ``x: (c, *, i)``, ``g: (K, c, *, o)``.
    """
    count, examples = int(g.shape[0]), int(g.shape[1])
    x = x.reshape(examples, -1, x.shape[-1])
    g = g.reshape(count, examples, -1, g.shape[-1])
    return torch.einsum("kclo,cli->kcoi", g, x)


def linear_per_example(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_outputs: Tensor, names: Collection[str]
) -> TensorDict:
    """Per-example gradients of ``nn.Linear`` (``weight (K, c, o, i)``, ``bias (K, c, o)``) or of
    ``Conv1D`` (``weight (K, c, i, o)``)."""
    weight = module.get_parameter("weight")
    dtype = accumulator_dtype(weight.dtype)
    x, g = inputs[0].to(dtype), grad_outputs.to(dtype)
    result: TensorDict = {}
    if "weight" in names:
        per_example = _per_example_weight(x, g)
        result["weight"] = per_example.transpose(-1, -2) if is_hf_conv1d(module) else per_example
    if "bias" in names:
        count, examples = int(g.shape[0]), int(g.shape[1])
        result["bias"] = g.reshape(count, examples, -1, g.shape[-1]).sum(2)
    return result


@register_rule(matches=is_hf_conv1d, name="Conv1D", per_example=linear_per_example)
def transposed_linear_rule(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    grad_outputs: Tensor,
    names: Collection[str],
    memory_budget_bytes: int,
) -> TensorDict:
    """Sum over examples and signals of squared per-example ``weight``/``bias`` gradients.

    Args:
        module: the ``Conv1D``.
        inputs: ``(x,)`` with ``x`` of shape ``(n, *, nx)``.
        grad_outputs: ``(K, n, *, nf)``.
        names: the local parameter names wanted (``"weight"``, ``"bias"``).
        memory_budget_bytes: bound on per-example gradients materialised for sequence inputs.

    Returns:
        ``{"weight": (nx, nf), "bias": (nf,)}`` restricted to ``names``.
    """
    dtype = accumulator_dtype(module.get_parameter("weight").dtype)
    weight_sum, bias_sum = linear_squared_sums(
        inputs[0].to(dtype),
        grad_outputs.to(dtype),
        memory_budget_bytes,
        weight="weight" in names,
        bias="bias" in names,
    )
    result: TensorDict = {}
    if weight_sum is not None:
        result["weight"] = weight_sum.T.contiguous()
    if bias_sum is not None:
        result["bias"] = bias_sum
    return result


set_per_example(nn.Linear, linear_per_example)
