"""``EWCCallback`` under ``transformers.Trainer`` on 2 CPU processes (gloo), launched by torchrun.

Run by ``tests/distributed/test_transformers.py``: each rank trains one task on its shard of an
odd-sized data set (Accelerate repeats examples to even out the shards) and saves its weights,
its EWC state and the example count of its consolidation.
"""

from __future__ import annotations

import os
import sys

from tests import torchvision_shim

torchvision_shim.apply()

import torch  # noqa: E402
from torch import nn  # noqa: E402

from ewc import EWC  # noqa: E402
from ewc.adapters.transformers import EWCCallback, EWCTrainer  # noqa: E402
from tests.integration.test_transformers import (  # noqa: E402
    TinyClassifier,
    args,
    classification_task,
    classifier_forward,
)

LAMBDA = 10.0
SIZE = 13  # batches of 2 dealt to 2 ranks: 7 batches, the last one short, one batch repeated


def main(out: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model, reg = TinyClassifier(), EWC(LAMBDA, fisher="exact")
    callback = EWCCallback(reg, forward=classifier_forward, criterion=nn.CrossEntropyLoss())
    for task in range(2):
        EWCTrainer(
            model=model,
            args=args(f"{out}/task{task}", per_device_train_batch_size=2, ddp_backend="gloo"),
            train_dataset=classification_task(task, size=SIZE),
            callbacks=[callback],
        ).train()
        assert callback.last_report is not None
        torch.save(
            {
                "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
                "state": reg.state_dict(),
                "examples": callback.last_report.examples,
            },
            f"{out}/hf_task{task}_rank{rank}.pt",
        )


if __name__ == "__main__":
    main(sys.argv[1])
