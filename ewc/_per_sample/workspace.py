"""Buffers reused across the batches of one Fisher pass, so large temporaries are not reallocated.

On CPU a fresh tensor of several MiB is handed out by ``mmap`` and every page of it faults on
first touch; freed and allocated again for the next batch, it faults again. The stacked output
gradients of ``K`` signals (``K * n`` times a layer's activations) are the largest tensors the
rule path makes per batch: allocating them afresh cost the small CNN of ``benchmarks/
fisher_speed.py`` about 6,000 page faults per batch, as much time as its whole backward
(``exact``, 1 thread). A :class:`Workspace` keeps one buffer per role and shape for the length of
a pass (:func:`ewc.fisher.fisher_sums` holds one), and drops them when the pass ends.

Cost: one flat buffer per role and slot, as large as the largest request so far (a smaller batch,
a shorter sequence or a smaller last chunk of signals gets a view of it), so memory stays within
what a single batch needs, however the shapes vary.

Example:
    >>> import torch
    >>> space = Workspace()
    >>> first = space.buffer("grads", 0, (2, 3), torch.float32, torch.device("cpu"))
    >>> space.buffer("grads", 0, (2, 3), torch.float32, torch.device("cpu")) is first
    True
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

__all__ = ["Workspace"]


class Workspace:
    """Uninitialised buffers by ``(role, slot, dtype, device)``, kept until dropped.

    Each request gets a view of the same flat storage, so whoever asks for one must be done with
    its previous contents (the engine asks once per chunk of signals and the rules read it before
    the next chunk is made); a larger request replaces the storage.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Hashable, ...], Tensor] = {}

    def buffer(
        self,
        role: str,
        slot: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor:
        """A contiguous tensor of exactly ``shape``/``dtype``/``device`` for ``(role, slot)``;
        its values are whatever was last written (uninitialised the first time)."""
        key = (role, slot, dtype, device)
        size = math.prod(int(s) for s in shape)
        found = self._buffers.get(key)
        if found is None or found.numel() < size:
            found = torch.empty(size, dtype=dtype, device=device)
            self._buffers[key] = found
        return found[:size].view(tuple(int(s) for s in shape))

    def __len__(self) -> int:
        return len(self._buffers)

    def __repr__(self) -> str:
        megabytes = sum(b.numel() * b.element_size() for b in self._buffers.values()) / 2**20
        return f"Workspace(buffers={len(self._buffers)}, MiB={megabytes:.1f})"
