"""Helpers to treat any batch layout (tensor, tuple, dict, nested) as a pytree of examples."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["batch_size_of", "slice_examples", "vmap_in_dims"]


def _is_batched(leaf: Any, size: int) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 and leaf.shape[0] == size


def slice_examples(batch: Any, start: int, stop: int, size: int) -> Any:
    """The examples ``start:stop`` of every tensor leaf whose first dimension is ``size``."""
    return pytree.tree_map(lambda x: x[start:stop] if _is_batched(x, size) else x, batch)


def vmap_in_dims(batch: Any, size: int) -> Any:
    """``in_dims`` for :func:`torch.func.vmap`: 0 for leaves batched along dim 0, else None."""
    return pytree.tree_map(lambda x: 0 if _is_batched(x, size) else None, batch)


def batch_size_of(batch: Any) -> int | None:
    """First dimension of the first tensor leaf, or None if the batch holds no tensor."""
    for leaf in pytree.tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
            return int(leaf.shape[0])
    return None
