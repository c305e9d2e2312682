"""EWC under DistributedDataParallel (2 ranks, gloo, CPU), against one process over the union.

The shards are uneven in examples and in batches (9 examples / 3 batches against 4 / 2), so an
average of per-rank averages, or a gradient all-reduce in the Fisher backward passes, would show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ewc import ESTIMATORS, EWC, ConsolidationError, FisherSums, fisher_sums
from tests.distributed.common import (
    LAMBDA,
    SEED,
    WORLD_SIZE,
    assert_state_close,
    consolidate_tasks,
    init_worker,
    make_model,
    perturb_,
    reference,
    reference_grads,
    shard_batches,
    spawn,
)

pytestmark = pytest.mark.distributed


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    init_worker(rank, init_file)
    criterion = nn.CrossEntropyLoss()
    out: dict[str, Any] = {}
    for estimator in ESTIMATORS:
        model = make_model()
        ddp = DistributedDataParallel(model)
        reg = EWC(LAMBDA, fisher=estimator)
        consolidate_tasks(reg, ddp, rank)
        out[estimator] = {
            "state": reg.state_dict(),
            "grads_untouched": all(p.grad is None for p in model.parameters()),
            "penalty": reg.penalty(ddp).detach(),
            "penalty_unwrapped": reg.penalty(model).detach(),
        }

    # one training step at the current weights, with the penalty in the loss ...
    model = make_model()
    ddp = DistributedDataParallel(model)
    reg = EWC(LAMBDA, fisher="exact")
    consolidate_tasks(reg, ddp, rank)
    x, y = shard_batches(rank, task=2)[0]
    ddp.zero_grad(set_to_none=True)
    (criterion(ddp(x), y) + reg.penalty(ddp)).backward()
    out["grads_penalty_in_loss"] = [p.grad.clone() for p in model.parameters()]
    # ... and with the closed-form gradient added after DDP's gradient all-reduce
    ddp.zero_grad(set_to_none=True)
    criterion(ddp(x), y).backward()
    reg.penalty_grad_(ddp)
    out["grads_penalty_grad_"] = [p.grad.clone() for p in model.parameters()]

    # a failure on one rank (NaN inputs) makes every rank raise; no rank waits forever
    tasks_before = reg.tasks
    batches = shard_batches(rank)
    if rank == 1:
        batches[0] = (torch.full_like(batches[0][0], float("nan")), batches[0][1])
    try:
        reg.consolidate(ddp, batches, criterion)
    except ConsolidationError as error:
        out["failure"] = str(error)
    out["tasks_after_failure"] = (tasks_before, reg.tasks)
    torch.save(out, Path(out_dir) / f"ddp_rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp_path = tmp_path_factory.mktemp("ddp")
    spawn(_ddp_worker, tmp_path)
    return [torch.load(tmp_path / f"ddp_rank{r}.pt") for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("estimator", [e for e in ESTIMATORS if e != "sample"])
def test_state_equals_single_process_over_union(
    ddp_results: list[dict[str, Any]], estimator: str
) -> None:
    reg, _ = reference(estimator)
    for rank in range(WORLD_SIZE):
        assert_state_close(
            ddp_results[rank][estimator]["state"]["state"], reg.state_dict()["state"]
        )


def _rank_sums(model: nn.Module, task: int) -> list[FisherSums]:
    """Each rank's `sample` sums, redrawn here with that rank's seed on that rank's shard."""
    parts = []
    for rank in range(WORLD_SIZE):
        torch.manual_seed(SEED + rank)
        parts.append(
            fisher_sums(
                model,
                dict(model.named_parameters()),
                shard_batches(rank, task=task),
                nn.CrossEntropyLoss(),
                estimator="sample",
            )
        )
    return parts


def _pooled(parts: list[FisherSums]) -> FisherSums:
    sums = {name: sum(part.sums[name] for part in parts) for name in parts[0].sums}
    count = sum(part.count for part in parts)
    return FisherSums(sums, count, count, sum(part.batches for part in parts))  # type: ignore[arg-type]


def test_sample_is_the_pooled_estimate_of_the_ranks_draws(
    ddp_results: list[dict[str, Any]],
) -> None:
    # Each rank draws its own labels, so no single process over the union reproduces the draws.
    # What must hold: the state pools the ranks' squared-gradient sums and counts. Redraw each
    # rank's labels here (same seed, same shard) and feed the pooled sums to a one-process EWC.
    reference, model = EWC(LAMBDA, fisher="sample"), make_model()
    for task in range(2):
        parts = _rank_sums(model, task)
        if task == 0:  # the check is discriminating: pooling != averaging per-rank averages
            pooled = _pooled(parts)
            assert any(
                not torch.allclose(
                    pooled.sums[name] / pooled.count,
                    sum(part.sums[name] / part.count for part in parts) / len(parts),
                )
                for name in pooled.sums
            )
        reference.consolidate(
            model,
            shard_batches(0, task=task),
            nn.CrossEntropyLoss(),
            reduce=lambda _, parts=parts: _pooled(parts),
        )
        perturb_(model)
    for rank in range(WORLD_SIZE):
        assert_state_close(
            ddp_results[rank]["sample"]["state"]["state"], reference.state_dict()["state"]
        )


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_rank_has_the_same_state(ddp_results: list[dict[str, Any]], estimator: str) -> None:
    first, second = (ddp_results[r][estimator]["state"]["state"] for r in range(2))
    for key in ("importance", "centre"):
        for name in first[key]:
            assert torch.equal(first[key][name], second[key][name]), f"{key}[{name}]"
    assert torch.equal(first["offset"], second["offset"])


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fisher_pass_does_not_touch_grads_and_names_are_unwrapped(
    ddp_results: list[dict[str, Any]], estimator: str
) -> None:
    for rank in range(WORLD_SIZE):
        result = ddp_results[rank][estimator]
        assert result["grads_untouched"]
        assert set(result["state"]["state"]["importance"]) == {
            n for n, _ in make_model().named_parameters()
        }
        assert torch.equal(result["penalty"], result["penalty_unwrapped"])


@pytest.mark.parametrize("estimator", [e for e in ESTIMATORS if e != "sample"])
def test_penalty_value_equals_single_process(
    ddp_results: list[dict[str, Any]], estimator: str
) -> None:
    reg, model = reference(estimator)
    want = reg.penalty(model).detach()
    for rank in range(WORLD_SIZE):
        torch.testing.assert_close(ddp_results[rank][estimator]["penalty"], want)


@pytest.mark.parametrize("path", ["grads_penalty_in_loss", "grads_penalty_grad_"])
def test_penalty_gradient_under_ddp(ddp_results: list[dict[str, Any]], path: str) -> None:
    want = reference_grads("exact")
    for got, ref in zip(ddp_results[0][path], want):
        torch.testing.assert_close(got, ref)
    for first, second in zip(ddp_results[0][path], ddp_results[1][path]):
        assert torch.equal(first, second)  # the same update on every rank


def test_failure_on_one_rank_raises_on_every_rank(ddp_results: list[dict[str, Any]]) -> None:
    for rank in range(WORLD_SIZE):
        assert "failure" in ddp_results[rank], f"rank {rank} did not raise"
        before, after = ddp_results[rank]["tasks_after_failure"]
        assert before == after
    assert "1 of 2 ranks" in ddp_results[0]["failure"]
