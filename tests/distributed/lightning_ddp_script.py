"""Two tasks fitted with ``EWCCallback`` under ``Trainer(strategy="ddp", accelerator="cpu",
devices=2)``; run as ``python tests/distributed/lightning_ddp_script.py OUT_DIR``.

Lightning's DDP launcher re-runs this very command for rank 1, exactly as in a user's script, and
injects a ``DistributedSampler`` into the training loader, so each rank consolidates on its half
of the data and ``consolidate`` pools the halves. Each rank saves, after every fit, its EWC state
and the weights it consolidated at, as ``OUT_DIR/lightning_task{t}_rank{r}.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests import torchvision_shim

torchvision_shim.apply()

import lightning.pytorch as pl  # noqa: E402

from ewc import EWC  # noqa: E402
from ewc.adapters.lightning import EWCCallback  # noqa: E402
from tests.distributed.common import make_model  # noqa: E402

LAMBDA = 10.0
EXAMPLES = (16, 13)
"""Per task. 13 is not divisible by the world size: Lightning's DistributedSampler pads rank 1's
shard with a repeat of one example, which the callback must leave out of the Fisher."""


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def task_data(task: int) -> TensorDataset:
    """The examples of task ``task`` (tasks differ by a shift of the inputs)."""
    generator = torch.Generator().manual_seed(10 + task)
    x = torch.randn(EXAMPLES[task], 5, generator=generator) + task
    return TensorDataset(x, torch.randint(0, 3, (EXAMPLES[task],), generator=generator))


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = Classifier()
    callback = EWCCallback(EWC(LAMBDA, fisher="exact"), criterion=nn.CrossEntropyLoss())
    for task in range(2):
        trainer = pl.Trainer(
            strategy="ddp",
            accelerator="cpu",
            devices=2,
            max_epochs=2,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, DataLoader(task_data(task), batch_size=3))
        weights = {name: p.detach().clone() for name, p in module.net.named_parameters()}
        torch.save(
            {
                "state": callback.reg.state_dict(),
                "weights": weights,
                "examples": callback.last_report.examples if callback.last_report else None,
            },
            out_dir / f"lightning_task{task}_rank{trainer.global_rank}.pt",
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # Lightning leaves the process group up after fit; tearing it down at interpreter exit can
    # abort ("terminate called without an active exception"), so end it explicitly
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
