"""``EWCCallback`` under ``Trainer(strategy="ddp", accelerator="cpu", devices=2)``.

The script ``lightning_ddp_script.py`` runs in a subprocess, as a user's training script would,
and Lightning launches the second rank itself. Every rank must end each task with the same state,
equal to one process consolidating at the same weights over the task's whole data set.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from ewc import EWC
from tests import torchvision_shim
from tests.distributed.common import WORLD_SIZE, make_model

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("lightning_ddp_script.py")
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def lightning_results(tmp_path_factory: pytest.TempPathFactory) -> list[list[dict[str, Any]]]:
    torchvision_shim.apply()
    pytest.importorskip("lightning")
    out_dir = tmp_path_factory.mktemp("lightning")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(key, None)
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(out_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [
        [torch.load(out_dir / f"lightning_task{t}_rank{r}.pt") for r in range(WORLD_SIZE)]
        for t in range(2)
    ]


def test_ranks_agree_and_equal_one_process(lightning_results: list[list[dict[str, Any]]]) -> None:
    from tests.distributed.lightning_ddp_script import LAMBDA, task_data

    reference, net = EWC(LAMBDA, fisher="exact"), make_model()
    for task, per_rank in enumerate(lightning_results):
        first, second = per_rank
        for name in first["weights"]:  # DDP (and the identical penalty) kept the replicas equal
            assert torch.equal(first["weights"][name], second["weights"][name])
        net.load_state_dict(first["weights"])
        reference.consolidate(net, DataLoader(task_data(task), batch_size=3), nn.CrossEntropyLoss())
        want = reference.state_dict()["state"]
        for result in per_rank:
            # each rank read its half (Lightning's DistributedSampler, without its padding in
            # the odd-sized task); the counts were pooled
            assert result["examples"] == len(task_data(task))
            got = result["state"]["state"]
            assert got["tasks"] == want["tasks"] == task + 1
            for key in ("importance", "centre"):
                assert got[key].keys() == {f"net.{name}" for name in want[key]}
                for name in want[key]:
                    torch.testing.assert_close(
                        got[key][f"net.{name}"], want[key][name], msg=f"{key}[{name}]"
                    )
            torch.testing.assert_close(got["offset"], want["offset"])
