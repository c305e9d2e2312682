"""``EWCCallback`` under ``transformers.Trainer`` with 2 CPU processes (gloo, torchrun).

The script ``transformers_ddp_script.py`` runs as a user's training script would, under
``python -m torch.distributed.run --nproc_per_node 2``. Every rank must end each task with the
same state, equal to one process consolidating at the same weights over the task's whole data
set (each example counted once, although Accelerate repeats some to even out the shards).
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
from tests.distributed.common import WORLD_SIZE

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("transformers_ddp_script.py")
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[list[dict[str, Any]]]:
    torchvision_shim.apply()
    pytest.importorskip("transformers")
    out_dir = tmp_path_factory.mktemp("transformers_ddp")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={WORLD_SIZE}",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            str(SCRIPT),
            str(out_dir),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [
        [torch.load(out_dir / f"hf_task{t}_rank{r}.pt") for r in range(WORLD_SIZE)]
        for t in range(2)
    ]


def test_ranks_agree_and_equal_one_process(results: list[list[dict[str, Any]]]) -> None:
    from tests.distributed.transformers_ddp_script import LAMBDA, SIZE
    from tests.integration.test_transformers import (
        TinyClassifier,
        classification_task,
        classifier_forward,
    )

    reference, net = EWC(LAMBDA, fisher="exact"), TinyClassifier()
    for task, per_rank in enumerate(results):
        first, second = per_rank
        for name in first["weights"]:  # DDP (and the identical penalty) kept the replicas equal
            assert torch.equal(first["weights"][name], second["weights"][name])
        with torch.no_grad():
            for name, param in net.named_parameters():
                param.copy_(first["weights"][name])
        reference.consolidate(
            net,
            DataLoader(classification_task(task, size=SIZE), batch_size=5),
            nn.CrossEntropyLoss(),
            forward=classifier_forward,
        )
        want = reference.state_dict()["state"]
        for result in per_rank:
            assert result["examples"] == SIZE  # pooled, without Accelerate's repeats
            got = result["state"]["state"]
            assert got["tasks"] == want["tasks"] == task + 1
            for key in ("importance", "centre"):
                assert got[key].keys() == want[key].keys()
                for name in want[key]:
                    torch.testing.assert_close(
                        got[key][name], want[key][name], msg=f"{key}[{name}]"
                    )
            torch.testing.assert_close(got["offset"], want["offset"])
