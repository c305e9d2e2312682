"""Shared problem, data shards and process launcher for the multi-process tests.

Workers run under ``torch.multiprocessing.spawn`` with the gloo backend on CPU; the process group
is initialised from a file store in the test's temporary directory, so no port is ever reserved
(no race with other test runs on the machine). Each worker saves what it computed with
``torch.save``; the test process then compares against a single-process reference over the union
of the shards.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "SHARDS",
    "WORLD_SIZE",
    "init_worker",
    "make_model",
    "perturb_",
    "shard_batches",
    "spawn",
    "union_batches",
]

WORLD_SIZE = 2

SHARDS: dict[int, list[tuple[int, int]]] = {
    0: [(0, 4), (4, 8), (8, 9)],  # 9 examples in 3 batches
    1: [(9, 12), (12, 13)],  # 4 examples in 2 batches: uneven examples *and* batches
}
"""Example ranges of each rank's batches; together they cover the 13 examples once."""


def make_model() -> nn.Module:
    """The same small classifier on every rank (weights from a fixed seed)."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def _data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(13, 5, generator=generator), torch.randint(0, 3, (13,), generator=generator)


def shard_batches(rank: int, *, task: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Rank ``rank``'s batches of task ``task`` (tasks differ by a shift of the inputs)."""
    x, y = _data()
    x = x + task
    return [(x[a:b], y[a:b]) for a, b in SHARDS[rank]]


def union_batches(*, task: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Every rank's batches, rank 0's first: what one process sees over the union of shards."""
    return [batch for rank in range(WORLD_SIZE) for batch in shard_batches(rank, task=task)]


@torch.no_grad()
def perturb_(model: nn.Module) -> None:
    """A deterministic move of the weights (as training on a task would), DTensors included."""
    for param in model.parameters():
        param.mul_(0.9).add_(0.05)


def init_worker(rank: int, init_file: str) -> None:
    """Join the gloo group of ``WORLD_SIZE`` ranks; one thread per process (cores are shared)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )


def spawn(worker: Callable[..., None], tmp_path: Path, *args: Any) -> None:
    """Run ``worker(rank, init_file, out_dir, *args)`` on ``WORLD_SIZE`` spawned processes."""
    init_file = tmp_path / "dist_store"
    torch.multiprocessing.spawn(
        worker, args=(str(init_file), str(tmp_path), *args), nprocs=WORLD_SIZE, join=True
    )
