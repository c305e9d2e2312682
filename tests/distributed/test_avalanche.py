"""``ewc.adapters.avalanche.EWCPlugin`` in Avalanche's own distributed training (2 ranks, gloo).

Avalanche 0.6 initialises torch.distributed from the environment (``DistributedHelper``), shards
the training data with a ``DistributedSampler`` and leaves wrapping the model in DDP to the user
(``DistributedHelper.wrap_model``). The plugin's importance pass reads the whole experience on
every rank, as Avalanche's own ``compute_importances`` does; ``consolidate`` all-reduces sums and
counts, so every rank gets the Fisher of the experience at the trained weights. The reference is
one process (no distributed) consolidating at the same weights over the same experiences.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ewc import EWC
from tests import torchvision_shim
from tests.distributed.common import WORLD_SIZE, exit_when_done

pytestmark = pytest.mark.distributed

LAMBDA = 10.0


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))


def _benchmark() -> Any:
    from avalanche.benchmarks import nc_benchmark

    generator = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 4
    x = torch.randn(120, 10, generator=generator) + nn.functional.one_hot(y, 10).float()
    data = TensorDataset(x, y)
    return nc_benchmark(
        data, data, n_experiences=2, task_labels=False, seed=0, fixed_class_order=list(range(4))
    )


def _avalanche_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
    )
    torch.set_num_threads(1)
    torchvision_shim.apply()
    from avalanche.distributed import DistributedHelper
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from ewc.adapters.avalanche import EWCPlugin

    if not DistributedHelper.init_distributed(0, use_cuda=False):
        raise RuntimeError("Avalanche did not initialise torch.distributed")
    model = DistributedHelper.wrap_model(_model())
    plugin = EWCPlugin(LAMBDA, fisher="exact")
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=16,
        train_epochs=1,
        eval_mb_size=64,
        device="cpu",
        plugins=[plugin],
        evaluator=EvaluationPlugin(loggers=[]),
    )
    weights = []
    for experience in _benchmark().train_stream:
        strategy.train(experience, num_workers=0)
        weights.append({k: v.clone() for k, v in model.module.state_dict().items()})
    out = {
        "compatible": strategy._check_distributed_training_compatibility(),
        "state": plugin.reg.state_dict(),
        "weights": weights,
    }
    torch.save(out, Path(out_dir) / f"avalanche_rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def avalanche_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    torchvision_shim.apply()
    pytest.importorskip("avalanche")
    tmp_path = tmp_path_factory.mktemp("avalanche")
    torch.multiprocessing.spawn(
        exit_when_done,
        args=(_avalanche_worker, _free_port(), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=True,
    )
    return [torch.load(tmp_path / f"avalanche_rank{r}.pt") for r in range(WORLD_SIZE)]


def test_plugin_declares_distributed_support(avalanche_results: list[dict[str, Any]]) -> None:
    assert all(result["compatible"] for result in avalanche_results)


def test_every_rank_equals_one_process_at_the_same_weights(
    avalanche_results: list[dict[str, Any]],
) -> None:
    first, second = avalanche_results
    for a, b in zip(first["weights"], second["weights"]):  # DDP kept the replicas in step
        for name in a:
            assert torch.equal(a[name], b[name])
    reference, model = EWC(LAMBDA, fisher="exact"), _model()
    for experience, weights in zip(_benchmark().train_stream, first["weights"]):
        model.load_state_dict(weights)
        reference.consolidate(
            model,
            DataLoader(experience.dataset, batch_size=16),
            nn.CrossEntropyLoss(),
            forward=lambda m, batch: (m(batch[0]), batch[1]),
        )
    want = reference.state_dict()["state"]
    for result in avalanche_results:
        got = result["state"]["state"]
        assert got["tasks"] == want["tasks"] == 2
        for key in ("importance", "centre"):
            for name in want[key]:
                torch.testing.assert_close(got[key][name], want[key][name], msg=f"{key}[{name}]")
        torch.testing.assert_close(got["offset"], want["offset"])
