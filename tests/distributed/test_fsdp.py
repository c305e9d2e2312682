"""EWC under FSDP2 (``fully_shard``, DTensor parameters; 2 ranks, gloo, CPU).

The state must be each rank's shard of the single-process state over the union of the data
shards; ``penalty`` must return the global value with the unsharded model's gradient, and
``penalty_grad_`` must add the same gradient shard-locally. ``state_dict`` is per rank (sharded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from ewc import EWC
from tests.distributed.common import (
    LAMBDA,
    WORLD_SIZE,
    consolidate_tasks,
    init_worker,
    make_model,
    reference,
    reference_grads,
    shard_batches,
    spawn,
)

pytestmark = pytest.mark.distributed

FSDP_ESTIMATORS = ("exact", "batched")


def _sharded_model() -> nn.Module:
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _full_grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.full_tensor() for p in model.parameters()]  # type: ignore[union-attr]


def _fsdp_worker(rank: int, init_file: str, out_dir: str) -> None:
    init_worker(rank, init_file)
    criterion = nn.CrossEntropyLoss()
    out: dict[str, Any] = {}
    for estimator in FSDP_ESTIMATORS:
        model = _sharded_model()
        reg = EWC(LAMBDA, fisher=estimator)
        consolidate_tasks(reg, model, rank)
        result: dict[str, Any] = {
            "state": reg.state_dict(),
            "param_types": {type(p).__name__ for p in model.parameters()},
            "grads_untouched": all(p.grad is None for p in model.parameters()),
        }
        penalty = reg.penalty(model)
        result["penalty"] = penalty.detach()
        penalty.backward()
        result["penalty_grads"] = _full_grads(model)

        x, y = shard_batches(rank, task=2)[0]
        model.zero_grad(set_to_none=True)
        (criterion(model(x), y) + reg.penalty(model)).backward()
        result["grads_penalty_in_loss"] = _full_grads(model)
        model.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        result["penalty_from_grad_pass"] = reg.penalty_grad_(model, return_penalty=True)
        result["grads_penalty_grad_"] = _full_grads(model)

        # per-rank (sharded) save and load
        path = Path(out_dir) / f"ewc_{estimator}_rank{rank}.pt"
        torch.save(reg.state_dict(), path)
        restored = EWC(LAMBDA, fisher=estimator)
        restored.load_state_dict(torch.load(path, weights_only=True))
        result["restored_penalty"] = restored.penalty(model).detach()
        out[estimator] = result
    torch.save(out, Path(out_dir) / f"fsdp_rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp_path = tmp_path_factory.mktemp("fsdp")
    spawn(_fsdp_worker, tmp_path)
    return [torch.load(tmp_path / f"fsdp_rank{r}.pt") for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("estimator", FSDP_ESTIMATORS)
def test_state_is_this_ranks_shard_of_the_single_process_state(
    fsdp_results: list[dict[str, Any]], estimator: str
) -> None:
    want = reference(estimator)[0].state_dict()["state"]
    offsets = []
    for rank in range(WORLD_SIZE):
        assert fsdp_results[rank][estimator]["param_types"] == {"DTensor"}
        assert fsdp_results[rank][estimator]["grads_untouched"]
        got = fsdp_results[rank][estimator]["state"]["state"]
        assert got["tasks"] == want["tasks"]
        for key in ("importance", "centre"):
            assert got[key].keys() == want[key].keys()
            for name, full in want[key].items():
                shard = torch.chunk(full, WORLD_SIZE, dim=0)[rank]  # FSDP2's Shard(0) layout
                torch.testing.assert_close(got[key][name], shard, msg=f"{key}[{name}]")
        offsets.append(got["offset"])
    torch.testing.assert_close(sum(offsets), want["offset"])  # the constant is stored per shard


@pytest.mark.parametrize("estimator", FSDP_ESTIMATORS)
def test_penalty_value_and_gradient_equal_the_unsharded_model(
    fsdp_results: list[dict[str, Any]], estimator: str
) -> None:
    reg, model = reference(estimator)
    penalty = reg.penalty(model)
    grads = torch.autograd.grad(penalty, list(model.parameters()))
    for rank in range(WORLD_SIZE):
        result = fsdp_results[rank][estimator]
        torch.testing.assert_close(result["penalty"], penalty.detach())
        torch.testing.assert_close(result["restored_penalty"], penalty.detach())
        # the value penalty_grad_ returns is global too (summed over the shards)
        torch.testing.assert_close(result["penalty_from_grad_pass"].float(), penalty.detach())
        for got, want in zip(result["penalty_grads"], grads):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("estimator", FSDP_ESTIMATORS)
@pytest.mark.parametrize("path", ["grads_penalty_in_loss", "grads_penalty_grad_"])
def test_training_step_gradient_equals_the_unsharded_model(
    fsdp_results: list[dict[str, Any]], estimator: str, path: str
) -> None:
    want = reference_grads(estimator)
    for rank in range(WORLD_SIZE):
        for got, ref in zip(fsdp_results[rank][estimator][path], want):
            torch.testing.assert_close(got, ref)
