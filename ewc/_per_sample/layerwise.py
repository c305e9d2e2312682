"""The per-layer ``torch.func`` step: per-example gradients of one module call.

For a module without a rule (or a call its rule does not take), the engine already has the call's
arguments and the gradients of the ``K`` signals with respect to the call's outputs (one
backward of the signals to the captured nodes, shared with the rules). The per-example gradients
of the module's own parameters are then the vector-Jacobian products of the call alone:

    g_kn = d <grad_out_kn, module(theta; args_n)> / d theta

computed with ``vmap`` over examples of a ``vjp`` through ``functional_call(module, ...)``, like
opacus' per-layer functorch sampler. The rest of the model is never re-run, and never leaves its
rules. Arguments batched along dim 0 are cut per example; others (masks broadcast over the
batch, position ids ``(1, L)``) are shared.

Checked, not trusted: the outputs the step recomputes per example must equal the outputs the
batched forward produced (else examples interact inside the module, e.g. batch statistics, and
the step raises :class:`LayerStepError`, sending its parameters to the whole-model fallback).

Cost per call: the module's forward and ``K`` VJPs per example, batched by ``vmap``; memory
``O(c K P_module)`` for a chunk of ``c`` examples, sized by the engine to its budget.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils import _pytree as pytree

from ewc._per_sample.capture import Call

__all__ = ["LayerStepError", "layer_per_example"]

_SLOW_BATCHING_NOTICE = "There is a performance drop because we have not yet implemented"


class LayerStepError(RuntimeError):
    """The per-layer step cannot differentiate this call (``vmap`` failed, or the per-example
    outputs disagree with the batched ones)."""


def layer_per_example(
    module: nn.Module,
    call: Call,
    leaf_grads: list[Tensor | None],
    names: Collection[str],
    start: int,
    stop: int,
    examples: int,
    *,
    check: bool = True,
) -> dict[str, Tensor]:
    """Per-example gradients ``(K, stop - start, *param.shape)`` of ``module``'s parameters
    ``names`` (local names) for the examples ``start:stop`` of one recorded call.

    Args:
        module: the module.
        call: the recorded call (arguments, captured output nodes).
        leaf_grads: per captured node, the gradients ``(K, n, *node.shape[1:])`` of the signals
            with respect to it (None: zero).
        names: the local parameter names to differentiate.
        start, stop: the examples.
        examples: ``n``, the batch size (arguments whose dim 0 is ``n`` are cut per example).
        check: compare the recomputed outputs with the recorded ones.

    Raises:
        LayerStepError: ``vmap`` cannot run the call, or the outputs disagree.
    """
    values = {name: module.get_parameter(name).detach() for name in names}
    flat, spec = pytree.tree_flatten((call.args, call.kwargs))
    batched = [
        i
        for i, leaf in enumerate(flat)
        if isinstance(leaf, Tensor) and leaf.dim() >= 1 and leaf.shape[0] == examples
    ]
    parts = tuple(flat[i][start:stop] for i in batched)
    cotangents = tuple(
        (
            torch.zeros((1, stop - start, *leaf.shape[1:]), dtype=leaf.dtype, device=leaf.device)
            if grad is None
            else grad[:, start:stop].to(leaf.dtype)
        )
        for leaf, grad in zip(call.leaves, leaf_grads)
    )
    count = max(int(c.shape[0]) for c in cotangents)
    cotangents = tuple(c.expand(count, *c.shape[1:]) for c in cotangents)
    leaf_index = call.leaf_index

    def outputs_of(param_values: dict[str, Tensor], example: tuple[Tensor, ...]) -> Any:
        leaves = list(flat)
        for i, tensor in zip(batched, example):
            leaves[i] = tensor.unsqueeze(0)
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        out = functional_call(module, param_values, tuple(args), kwargs, strict=False)
        out_leaves = pytree.tree_leaves(out)
        return tuple(out_leaves[j] for j in leaf_index)

    def one(example: tuple[Tensor, ...], example_cotangents: tuple[Tensor, ...]) -> Any:
        primal, pullback = vjp(lambda p: outputs_of(p, example), values)[:2]
        seeds = tuple(c.unsqueeze(1) for c in example_cotangents)  # (K, 1, ...) per node
        (grads,) = vmap(pullback)(seeds)
        return primal, grads

    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", message=_SLOW_BATCHING_NOTICE)
            primal, grads = vmap(one, in_dims=(0, 1))(parts, cotangents)
    except Exception as error:
        raise LayerStepError(f"torch.func cannot run this call: {error}") from error
    if check:
        for recomputed, recorded in zip(primal, call.leaves):
            _check_same(recomputed, recorded[start:stop].detach())
    return {name: grad.transpose(0, 1) for name, grad in grads.items()}


def _check_same(recomputed: Tensor, recorded: Tensor) -> None:
    if recomputed.numel() != recorded.numel():
        raise LayerStepError(
            f"the call's per-example outputs have {recomputed.numel()} elements, the batched "
            f"output {recorded.numel()}"
        )
    recomputed = recomputed.reshape(recorded.shape).to(recorded.dtype)
    eps = torch.finfo(recorded.dtype).eps if recorded.is_floating_point() else 0.0
    scale = float(recorded.abs().max()) if recorded.numel() else 0.0
    rtol = min(1e3 * eps, 5e-2)  # float32: 1.2e-4; half precisions: rounding-sized, capped
    if not torch.allclose(recomputed, recorded, rtol=rtol, atol=rtol * max(scale, 1.0)):
        raise LayerStepError(
            "the call's outputs recomputed one example at a time differ from the batched ones "
            "(examples interact inside the module, e.g. batch statistics)"
        )
