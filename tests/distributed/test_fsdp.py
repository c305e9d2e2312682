"""EWC under FSDP2 (``fully_shard``, DTensor parameters; 2 ranks, gloo, CPU).

The state must be each rank's shard of the single-process state over the union of the data
shards; ``penalty`` must return the global value with the unsharded model's gradient, and
``penalty_grad_`` must add the same gradient shard-locally. ``state_dict`` is per rank (sharded).
"""

from __future__ import annotations

import shutil
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
        if estimator == "exact" and CAN_BUILD:
            result["optimizer_steps"] = _optimizer_steps(model, reg, rank)
        out[estimator] = result
    torch.save(out, Path(out_dir) / f"fsdp_rank{rank}.pt")
    dist.destroy_process_group()


CAN_BUILD = shutil.which("c++") is not None and shutil.which("ninja") is not None
"""``ewc.optim`` builds its C++ kernel at construction."""


def _optimizer_steps(model: nn.Module, reg: EWC, rank: int) -> dict[str, Any]:
    """Per ``ewc.optim`` optimizer (and before any task): the full weights after two steps from
    the same start, by the torch optimizer after ``penalty_grad_`` and by ours (whose DTensor
    parameters take the two-pass step)."""
    import ewc.optim

    x, y = shard_batches(rank, task=2)[0]
    start = [p.detach().clone() for p in model.parameters()]
    cases = {
        "SGD": (ewc.optim.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, reg),
        "AdamW": (ewc.optim.AdamW, torch.optim.AdamW, {"lr": 0.01}, reg),
        "AdamW-no-task": (ewc.optim.AdamW, torch.optim.AdamW, {"lr": 0.01}, EWC(LAMBDA)),
    }
    out: dict[str, Any] = {}
    for name, (ours, theirs, options, regulariser) in cases.items():
        weights = {}
        for which in ("torch", "ewc"):
            with torch.no_grad():
                for p, value in zip(model.parameters(), start):
                    p.copy_(value)
            if which == "torch":
                optimizer: Any = theirs(model.parameters(), foreach=False, **options)
            else:
                optimizer = ours(model.parameters(), reg=regulariser, model=model, **options)
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                nn.CrossEntropyLoss()(model(x), y).backward()
                if which == "torch":
                    regulariser.penalty_grad_(model)
                optimizer.step()
            weights[which] = [p.full_tensor() for p in model.parameters()]  # type: ignore[operator]
        out[name] = weights
    return out


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


@pytest.mark.skipif(not CAN_BUILD, reason="ewc.optim needs a C++ compiler and ninja")
@pytest.mark.parametrize("case", ["SGD", "AdamW", "AdamW-no-task"])
def test_ewc_optim_steps_sharded_parameters_like_penalty_grad_and_the_torch_optimizer(
    fsdp_results: list[dict[str, Any]], case: str
) -> None:
    """DTensor parameters take the two-pass step: ``penalty_grad_`` and torch's functional step,
    so the weights equal the torch optimizer's after ``penalty_grad_``, on every rank."""
    for rank in range(WORLD_SIZE):
        weights = fsdp_results[rank]["exact"]["optimizer_steps"][case]
        for ours, theirs in zip(weights["ewc"], weights["torch"]):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
