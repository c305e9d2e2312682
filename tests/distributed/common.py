"""Shared problem, data shards and process launcher for the multi-process tests.

Workers run under ``torch.multiprocessing.spawn`` with the gloo backend on CPU; the process group
is initialised from a file store in the test's temporary directory, so no port is ever reserved
(no race with other test runs on the machine). Each worker saves what it computed with
``torch.save``; the test process then compares against a single-process reference over the union
of the shards.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ewc import EWC

__all__ = [
    "LAMBDA",
    "SEED",
    "SHARDS",
    "WORLD_SIZE",
    "assert_state_close",
    "consolidate_tasks",
    "init_worker",
    "make_model",
    "perturb_",
    "reference",
    "reference_grads",
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


def exit_when_done(rank: int, worker: Callable[..., None], *args: Any) -> None:
    """Run ``worker(rank, *args)``, then end the process without the interpreter's teardown.

    With torch 2.13 a worker that has finished (results written, process group destroyed)
    sometimes aborts while the interpreter shuts down ("terminate called without an active
    exception", SIGABRT; about one run in five of the DDP/FSDP tests here, with or without
    ``ewc``), which ``spawn`` reports as a failure. ``os._exit`` skips that teardown. An
    exception raised by the worker still reaches ``spawn`` as usual.
    """
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(worker: Callable[..., None], tmp_path: Path, *args: Any) -> None:
    """Run ``worker(rank, init_file, out_dir, *args)`` on ``WORLD_SIZE`` spawned processes."""
    init_file = tmp_path / "dist_store"
    torch.multiprocessing.spawn(
        exit_when_done,
        args=(worker, str(init_file), str(tmp_path), *args),
        nprocs=WORLD_SIZE,
        join=True,
    )


LAMBDA = 10.0
SEED = 100  # rank r draws the `sample` labels from seed SEED + r


def consolidate_tasks(reg: EWC, model: nn.Module, rank: int | None) -> None:
    """Two tasks, with a weight change between them (so the merged centre and offset matter)."""
    for task in range(2):
        batches = union_batches(task=task) if rank is None else shard_batches(rank, task=task)
        torch.manual_seed(SEED + (rank or 0))
        reg.consolidate(model, batches, nn.CrossEntropyLoss())
        perturb_(model)


def reference(estimator: str) -> tuple[EWC, nn.Module]:
    """One process over the union of the shards: two tasks, then the weights after them."""
    model = make_model()
    reg = EWC(LAMBDA, fisher=estimator)
    consolidate_tasks(reg, model, None)
    return reg, model


def assert_state_close(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Two ``ConsolidatedState.state_dict()`` dicts agree to float32 rounding."""
    assert got["tasks"] == want["tasks"]
    for key in ("importance", "centre"):
        assert got[key].keys() == want[key].keys()
        for name in want[key]:
            torch.testing.assert_close(got[key][name], want[key][name], msg=f"{key}[{name}]")
    torch.testing.assert_close(got["offset"], want["offset"])


def reference_grads(estimator: str) -> list[Tensor]:
    """Mean over ranks of the task gradient, plus the penalty gradient: what DDP must give."""
    reg, model = reference(estimator)
    criterion = nn.CrossEntropyLoss()
    task = [torch.zeros_like(p) for p in model.parameters()]
    for rank in range(WORLD_SIZE):
        x, y = shard_batches(rank, task=2)[0]  # the batch of the training step
        grads = torch.autograd.grad(criterion(model(x), y), list(model.parameters()))
        for total, grad in zip(task, grads):
            total.add_(grad / WORLD_SIZE)
    penalty = torch.autograd.grad(reg.penalty(model), list(model.parameters()))
    return [t + p for t, p in zip(task, penalty)]
