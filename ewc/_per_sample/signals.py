"""Backward signals, plain or lazy: the engine only ever asks for budget-sized chunks of them.

An estimator hands the engine ``K`` backward signals on the model output ``(n, *S)``: either one
tensor ``(K, n, *S)`` or a :class:`SignalSource`, which makes any ``chunk(start, stop)`` of them on
demand (``exact`` on a token-level output has one signal per position and class, far too many to
hold at once). Every engine path (the rule path, the per-layer step, ``vmap``, the loop) reads
signals through :func:`as_source` in chunks whose size the memory budget sets.

Example:
    >>> import torch
    >>> source = as_source(torch.zeros(10, 4, 3))
    >>> len(source), tuple(source.chunk(2, 5).shape)
    (10, (3, 4, 3))
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["SignalSource", "TensorSignals", "as_source"]


@runtime_checkable
class SignalSource(Protocol):
    """``K`` backward signals on an output of shape ``(n, *S)``, made chunk by chunk.

    ``len(source)`` is ``K``; ``source.chunk(start, stop)`` returns the signals
    ``start:stop`` as a tensor ``(stop - start, n, *S)``. A chunk may be asked for more than once
    (the engine may read the signals once per path), so a random source must return the same
    values each time.
    """

    def __len__(self) -> int: ...

    def chunk(self, start: int, stop: int) -> Tensor: ...


class TensorSignals:
    """A :class:`SignalSource` over a tensor ``(K, n, *S)`` that already holds every signal."""

    def __init__(self, signals: Tensor) -> None:
        if signals.dim() < 2:
            raise ValueError(
                "Expected the backward signals to have shape (K, n, *output.shape[1:]) but got "
                f"shape {tuple(signals.shape)}"
            )
        self.tensor = signals

    def __len__(self) -> int:
        return int(self.tensor.shape[0])

    def chunk(self, start: int, stop: int) -> Tensor:
        return self.tensor[start:stop]

    def __repr__(self) -> str:
        return f"TensorSignals(shape={tuple(self.tensor.shape)})"


def as_source(signals: Tensor | SignalSource) -> SignalSource:
    """``signals`` as a :class:`SignalSource` (a tensor is wrapped, a source kept).

    Raises:
        TypeError: ``signals`` is neither a tensor nor has ``__len__`` and ``chunk``.
    """
    if isinstance(signals, Tensor):
        return TensorSignals(signals)
    if isinstance(signals, SignalSource):
        return signals
    raise TypeError(
        "Expected the backward signals to be a Tensor (K, n, ...) or an object with __len__() "
        f"and chunk(start, stop) but got {type(signals).__name__}"
    )
