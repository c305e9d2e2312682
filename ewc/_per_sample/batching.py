"""Helpers to treat any batch layout (tensor, tuple, dict, nested) as a pytree of examples."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = [
    "UncuttableBatchError",
    "batch_size_of",
    "first_examples",
    "slice_examples",
    "vmap_in_dims",
]


class UncuttableBatchError(ValueError):
    """A batch must be cut to the first examples but holds no tensor with a batch dimension."""


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


def first_examples(batches: Iterable[Any], count: int | None) -> Iterator[Any]:
    """The batches, the last one cut, so that exactly the first ``count`` examples are yielded
    (all of them when ``count`` is None or the batches hold fewer).

    Raises:
        UncuttableBatchError: (a ``ValueError``) a batch that must be cut holds no tensor with a
            batch dimension. Whatever ``batches`` raises propagates unchanged.
    """
    seen = 0
    for batch in batches:
        if count is None:
            yield batch
            continue
        size = batch_size_of(batch)
        if size is None:
            raise UncuttableBatchError(
                f"cutting the data to its first {count} examples needs batches holding tensors "
                f"with a batch dimension, but got a batch of type {type(batch).__name__}"
            )
        if seen + size > count:
            batch = slice_examples(batch, 0, count - seen, size)
            size = count - seen
        if size > 0:
            yield batch
        seen += size
        if seen >= count:
            return
