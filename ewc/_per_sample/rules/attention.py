"""Rule for ``nn.MultiheadAttention`` with ``batch_first=True`` (what transformer layers use).

The module is ``out = O(attend(Q(query), K(key), V(value))) `` with linear maps ``Q, K, V``
(``in_proj_*`` or ``q/k/v_proj_weight``) and ``O`` (``out_proj``), plus optional extra key/value
tokens ``bias_k``/``bias_v``. Attention mixes positions but never examples, so the gradients of
each signal with respect to the projected ``q, k, v`` of example ``n`` are that example's own:
one batched backward through ``attend`` alone gives them for every example at once. The
parameters are then linear maps with known inputs and output gradients:

    O:        inputs attend(...) (n, L, E),  output gradients g            (K, n, L, E)
    Q, K, V:  inputs query/key/value,        output gradients dq, dk, dv   (K, n, L|S, E)
    bias_k:   the gradient of the extra key token of example n, dk[:, n, S]

and their sums of squared per-example gradients come from the linear rule
(:func:`~ewc._per_sample.rules.linear.linear_squared_sums`). ``attend`` is PyTorch's own
``F.multi_head_attention_forward`` with identity projections, so masks (``attn_mask``,
``key_padding_mask``, ``is_causal``) and ``add_zero_attn`` mean exactly what they mean in the
module.

Cost: the attention forward again, one backward through it per chunk of signals (the signals
folded into the batch), plus the linear rule's cost for four maps; memory bounded by the budget.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc._per_sample.rules.linear import linear_squared_sums
from ewc._per_sample.rules.registry import accumulator_dtype, chunk_size, register_rule
from ewc._typing import TensorDict

__all__ = ["attention_rule"]

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _bind(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``(query, key, value, key_padding_mask, attn_mask, need_weights, is_causal)``."""
    try:
        bound = _SIGNATURE.bind(module, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    a = bound.arguments
    return (
        a["query"],
        a["key"],
        a["value"],
        a["key_padding_mask"],
        a["attn_mask"],
        a["need_weights"],
        a["is_causal"],
    )


def _supports(module: nn.Module, inputs: tuple[Any, ...], batch_size: int) -> bool:
    if not isinstance(module, nn.MultiheadAttention) or not module.batch_first:
        return False
    if module.training and module.dropout > 0:
        return False
    query, key, value = inputs[:3]
    return all(
        isinstance(t, Tensor) and t.dim() == 3 and t.shape[0] == batch_size
        for t in (query, key, value)
    )


def _projections(module: nn.MultiheadAttention) -> tuple[list[Tensor], list[Tensor | None]]:
    """The weights and biases of the query, key and value maps (detached)."""
    if module._qkv_same_embed_dim:
        weights = list(module.in_proj_weight.detach().chunk(3))
    else:
        weights = [
            module.q_proj_weight.detach(),
            module.k_proj_weight.detach(),
            module.v_proj_weight.detach(),
        ]
    if module.in_proj_bias is None:
        return weights, [None, None, None]
    return weights, list(module.in_proj_bias.detach().chunk(3))


def _pad_mask(mask: Tensor | None) -> Tensor | None:
    """One more (attendable) key position at the end, for a ``bias_k`` token."""
    if mask is None:
        return None
    return F.pad(mask, (0, 1))


def _repeat_masks(
    key_padding_mask: Tensor | None, attn_mask: Tensor | None, times: int
) -> tuple[Tensor | None, Tensor | None]:
    """Masks for the batch repeated ``times`` (signal-major, as ``Tensor.repeat`` orders it)."""
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.repeat(times, 1)
    if attn_mask is not None and attn_mask.dim() == 3:  # (n * heads, L, S): example-major
        attn_mask = attn_mask.repeat(times, 1, 1)
    return key_padding_mask, attn_mask


def _attend(
    module: nn.MultiheadAttention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    need_weights: bool,
    is_causal: bool,
) -> Tensor:
    """The module's attention between already projected ``q, k, v`` (batch first), before
    ``out_proj``: ``F.multi_head_attention_forward`` with identity projections."""
    embed = module.embed_dim
    eye = torch.eye(embed, dtype=q.dtype, device=q.device)
    out, _ = F.multi_head_attention_forward(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        embed,
        module.num_heads,
        None,
        None,
        None,
        None,
        module.add_zero_attn,
        0.0,
        eye,
        None,
        training=False,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        use_separate_proj_weight=True,
        q_proj_weight=eye,
        k_proj_weight=eye,
        v_proj_weight=eye,
        average_attn_weights=False,
        is_causal=is_causal,
    )
    return out.transpose(0, 1)


@register_rule(
    nn.MultiheadAttention, supports=_supports, bind=_bind, owns_children=True, tuple_output=True
)
def attention_rule(
    module: nn.Module,
    inputs: tuple[Any, ...],
    grad_outputs: Tensor,
    names: Collection[str],
    memory_budget_bytes: int,
) -> TensorDict:
    """Sums of squared per-example gradients of every parameter of a ``MultiheadAttention``.

    Args:
        module: the ``nn.MultiheadAttention`` (``batch_first=True``).
        inputs: what :func:`_bind` made of the call.
        grad_outputs: ``(K, n, L, E)``, gradients with respect to the attention output.
        names: the wanted local names (``"in_proj_weight"``, ``"out_proj.weight"``, ...).
        memory_budget_bytes: bound on the signals folded into one backward through attention.

    Returns:
        ``{local name: sum}`` for ``names``.
    """
    module = cast(nn.MultiheadAttention, module)  # registered for this exact type only
    query, key, value, key_padding_mask, attn_mask, need_weights, is_causal = inputs
    dtype = accumulator_dtype(query.dtype)
    count, examples = int(grad_outputs.shape[0]), int(grad_outputs.shape[1])
    weights, biases = _projections(module)
    sources = (query, key, value)
    with torch.no_grad():
        projected = [F.linear(x, w, b) for x, w, b in zip(sources, weights, biases)]
        if module.bias_k is not None and module.bias_v is not None:
            extra = (module.bias_k.detach(), module.bias_v.detach())
            for index, token in zip((1, 2), extra):
                token = token.reshape(1, 1, -1).expand(examples, 1, -1)
                projected[index] = torch.cat([projected[index], token], dim=1)
            key_padding_mask = _pad_mask(key_padding_mask)
            attn_mask = _pad_mask(attn_mask)
        q, k, v = projected
        attended = _attend(module, q, k, v, key_padding_mask, attn_mask, need_weights, is_causal)
    out_weight = module.out_proj.weight.detach()
    result: TensorDict = {}
    out_w, out_b = linear_squared_sums(
        attended.to(dtype),
        grad_outputs.to(dtype),
        memory_budget_bytes,
        weight="out_proj.weight" in names,
        bias="out_proj.bias" in names,
    )
    if out_w is not None:
        result["out_proj.weight"] = out_w
    if out_b is not None:
        result["out_proj.bias"] = out_b
    inner = {"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"}
    if not set(names) & (inner | {"bias_k", "bias_v"}):
        return result

    grad_attended = grad_outputs.to(out_weight.dtype) @ out_weight  # (K, n, L, E)
    per_signal = 4 * sum(t.numel() * t.element_size() for t in (*projected, attended))
    per_signal += attended.shape[1] * projected[1].shape[1] * examples * module.num_heads * 8
    step = chunk_size(count, per_signal, memory_budget_bytes)
    sums: dict[str, Tensor] = {}
    for start in range(0, count, step):
        chunk = grad_attended[start : start + step]
        signals = int(chunk.shape[0])
        q, k, v = (p.repeat(signals, 1, 1).requires_grad_(True) for p in projected)
        padding, mask = _repeat_masks(key_padding_mask, attn_mask, signals)
        with torch.enable_grad():
            again = _attend(module, q, k, v, padding, mask, need_weights, is_causal)
            folded = torch.autograd.grad(again, (q, k, v), chunk.reshape(again.shape))
        grads = [g.reshape(signals, examples, *g.shape[1:]).to(dtype) for g in folded]
        _add(sums, _projection_terms(module, sources, grads, names, memory_budget_bytes))
    result.update(sums)
    return result


def _projection_terms(
    module: nn.MultiheadAttention,
    sources: tuple[Tensor, Tensor, Tensor],
    grads: list[Tensor],
    names: Collection[str],
    memory_budget_bytes: int,
) -> dict[str, Tensor]:
    """Terms of one chunk of signals for the query/key/value maps and ``bias_k``/``bias_v``."""
    terms: dict[str, Tensor] = {}
    pieces_w, pieces_b = [], []
    for source, grad in zip(sources, grads):
        positions = source.shape[1]
        w, b = linear_squared_sums(
            source.to(grad.dtype),
            grad[:, :, :positions],
            memory_budget_bytes,
            weight=True,
            bias=module.in_proj_bias is not None,
        )
        pieces_w.append(w)
        pieces_b.append(b)
    if module._qkv_same_embed_dim:
        if "in_proj_weight" in names:
            terms["in_proj_weight"] = torch.cat(pieces_w)  # type: ignore[arg-type]
    else:
        for local, piece in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), pieces_w):
            if local in names:
                terms[local] = piece  # type: ignore[assignment]
    if "in_proj_bias" in names:
        terms["in_proj_bias"] = torch.cat(pieces_b)  # type: ignore[arg-type]
    for local, grad, source in (("bias_k", grads[1], sources[1]), ("bias_v", grads[2], sources[2])):
        if local in names:  # the extra token sits right after the example's own positions
            terms[local] = grad[:, :, source.shape[1]].square().sum((0, 1)).reshape(1, 1, -1)
    return terms


def _add(sums: dict[str, Tensor], terms: dict[str, Tensor]) -> None:
    for name, term in terms.items():
        if name in sums:
            sums[name].add_(term)
        else:
            sums[name] = term
