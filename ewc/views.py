"""Read-only views of the EWC state and of sharded data, for the framework adapters.

The adapters (:mod:`ewc.adapters`) hold no maths: every number they show or every cut they make
comes from a function here, tested once in ``tests/unit/test_views.py``. Pure torch; no
framework is imported.

* :func:`task_importances` / :func:`task_anchors`: Avalanche-style per-task views of a
  :class:`~ewc.store.ConsolidatedState` (its ``importances`` and ``saved_params``).
* :func:`examples_before_padding`: how many examples a rank's loader yields before the repeats a
  distributed sampler adds to even out the shards, so that a pooled Fisher counts each once.
* :func:`check_ewc_lambda`: the constructor's check of ``ewc_lambda``, for code that assigns it.

Example:
    >>> import torch
    >>> from ewc import EWC
    >>> from ewc.views import task_importances
    >>> reg = EWC(1.0, mode="online", decay_factor=0.5, keep_importance_data=True)
    >>> reg.add_task({"w": torch.tensor([2.0])}, {"w": torch.tensor([0.0])})
    >>> reg.add_task({"w": torch.tensor([1.0])}, {"w": torch.tensor([0.0])})
    >>> {t: float(view["w"]) for t, view in task_importances(reg.state, "online", 0.5).items()}
    {0: 2.0, 1: 2.0}
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ewc.core import _check_lambda
from ewc.store import ConsolidatedState

__all__ = [
    "accelerate_shard_examples",
    "check_ewc_lambda",
    "examples_before_padding",
    "task_anchors",
    "task_importances",
]


def check_ewc_lambda(value: Any) -> float:
    """``value`` as a float if it is a valid ``ewc_lambda`` (finite, >= 0), else the error
    :class:`ewc.EWC` raises for it.

    Raises:
        TypeError: not a real number (``bool`` included).
        ValueError: negative or not finite; the message names ``ewc_lambda`` and the value.
    """
    return _check_lambda(value)


def task_importances(
    state: ConsolidatedState, mode: str, decay_factor: float | None
) -> dict[int, dict[str, Tensor]]:
    """Per consolidated task ``t``, its importance as Avalanche keeps it.

    Separate mode: task ``t``'s own Fisher ``F_t``. Online mode: the running importance right
    after task ``t``, ``G_t = decay_factor * G_{t-1} + F_t`` (a parameter frozen during task
    ``t`` has no ``F_t`` and only decays), obtained by replaying the state's own update
    (:meth:`ConsolidatedState.with_task`) on the kept history, so the last view is the state's
    ``importance``. Without history (``keep_importance_data=False``) only the latest task is
    known, and only in online mode. Cost: O(T P) time and memory.

    Returns:
        ``{t: {name: tensor}}``; the tensors may be the state's own: clone before changing them.

    Raises:
        RuntimeError: separate mode without kept history (the tasks were collapsed into one
            quadratic and cannot be told apart).
    """
    if mode == "separate" and state.history:
        return {t: dict(entry["fisher"]) for t, entry in enumerate(state.history)}
    return {
        t: dict(s.importance) for t, s in _online_states(state, mode, decay_factor, "importances")
    }


def task_anchors(
    state: ConsolidatedState, mode: str, decay_factor: float | None = None
) -> dict[int, dict[str, Tensor]]:
    """Per consolidated task ``t``, the weights it is anchored at (Avalanche's ``saved_params``).

    Separate mode: the weights task ``t`` was consolidated at. Online mode: the anchor of the
    penalty right after task ``t`` (the latest anchor of each parameter; a parameter frozen
    during task ``t`` keeps its earlier one), replayed like :func:`task_importances`, so the last
    view is the state's ``centre``. Without history, the latest task only, in online mode.

    Raises:
        RuntimeError: separate mode without kept history.
    """
    if mode == "separate" and state.history:
        return {t: dict(entry["anchor"]) for t, entry in enumerate(state.history)}
    return {t: dict(s.centre) for t, s in _online_states(state, mode, decay_factor, "anchors")}


def _online_states(
    state: ConsolidatedState, mode: str, decay_factor: float | None, what: str
) -> list[tuple[int, ConsolidatedState]]:
    """``(t, state right after task t)`` in online mode: the whole history replayed through
    :meth:`ConsolidatedState.with_task`, or without history the latest task only."""
    if state.tasks == 0:
        return []
    if not state.history:
        if mode != "online":
            raise RuntimeError(
                f"per-task {what} need keep_importance_data=True; in separate mode the tasks "
                "are kept as one collapsed quadratic (see the `importance` and `centre` of the "
                "state)"
            )
        return [(state.tasks - 1, state)]
    states = []
    replay = ConsolidatedState()
    for t, entry in enumerate(state.history):
        replay = replay.with_task(
            entry["fisher"],
            entry["anchor"],
            mode="online",
            decay_factor=decay_factor,
            keep_history=False,
        )
        states.append((t, replay))
    return states


def examples_before_padding(dataset_size: int, rank: int, world_size: int) -> int:
    """Examples rank ``rank`` owns under ``torch.utils.data.DistributedSampler(drop_last=False)``.

    The sampler pads its index list to a multiple of ``world_size`` by repeating examples, and
    the repeats are the last positions of that list; rank ``r`` reads positions ``r, r + W, ...``,
    so its first ``len(range(r, N, W))`` examples are its own and the rest are repeats. Cut
    there, a Fisher pooled over ranks counts every example exactly once. Cost: O(1).

    Example:
        >>> [examples_before_padding(5, rank, 2) for rank in range(2)]
        [3, 2]
    """
    _check_rank(rank, world_size)
    return len(range(rank, dataset_size, world_size))


def accelerate_shard_examples(
    dataset_size: int, batch_size: int, rank: int, world_size: int, *, drop_last: bool = False
) -> int:
    """Examples rank ``rank`` owns when whole batches are dealt out round-robin
    (Accelerate's ``BatchSamplerShard`` with ``split_batches=False``, as ``Trainer`` uses).

    The batch sampler cuts ``N`` examples into ``ceil(N / B)`` batches (the last one short, or
    dropped with ``drop_last``); rank ``r`` gets batches ``r, r + W, ...`` and, with
    ``even_batches``, repeats of the first examples after them. Its own examples are the sizes of
    its batches summed. Cost: O(N / B).

    Example:
        >>> [accelerate_shard_examples(7, 2, rank, 2) for rank in range(2)]
        [4, 3]
    """
    _check_rank(rank, world_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected argument `batch_size` to be an int >= 1 but got {batch_size!r}")
    batches = dataset_size // batch_size if drop_last else math.ceil(dataset_size / batch_size)
    return sum(
        min(batch_size, dataset_size - index * batch_size)
        for index in range(rank, batches, world_size)
    )


def _check_rank(rank: int, world_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"Expected argument `world_size` to be an int >= 1 but got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(
            f"Expected argument `rank` to be an int in [0, {world_size}) but got {rank!r}"
        )
