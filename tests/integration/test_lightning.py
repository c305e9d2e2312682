"""``ewc.adapters.lightning.EWCCallback`` with a real Lightning ``Trainer`` on CPU, against the same
``Trainer`` run with ``reg.penalty(module)`` added to the loss (the reference)."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from ewc import EWC  # noqa: E402
from ewc.adapters.lightning import EWCCallback  # noqa: E402

pytestmark = pytest.mark.integration

LAMBDA = 20.0


class Classifier(pl.LightningModule):  # type: ignore[misc]
    """Tiny classifier; with ``reg_in_loss`` it adds the penalty to its loss (the reference),
    once per optimizer step under gradient accumulation."""

    def __init__(self, reg_in_loss: EWC | None = None, accumulate: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.reg_in_loss = reg_in_loss
        self.accumulate = accumulate

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.reg_in_loss is not None and batch_idx % self.accumulate == 0:
            # Lightning divides the loss by `accumulate`: this is the penalty once per step
            loss = loss + self.accumulate * self.reg_in_loss.penalty(self)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(seed: int, shift: float, size: int = 96) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (size,), generator=generator)
    x = torch.randn(size, 6, generator=generator)
    x[:, :3] += shift * nn.functional.one_hot(y, 3).float()
    x[:, 3:] -= shift * nn.functional.one_hot(y, 3).float()
    return DataLoader(TensorDataset(x, y), batch_size=16)


TASK_A = _loader(1, 2.0)
TASK_B = _loader(2, -2.0)  # conflicting: the features point the other way


def _trainer(tmp_path: Path, callbacks: list[Any], **options: Any) -> Any:
    settings: dict[str, Any] = {
        "max_epochs": 2,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    settings.update(options)
    return pl.Trainer(callbacks=callbacks, **settings)


def _weights(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _distance(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return float(sum(((a[name] - b[name]) ** 2).sum() for name in a)) ** 0.5


@pytest.fixture(scope="module")
def after_task_a(tmp_path_factory: pytest.TempPathFactory) -> tuple[Classifier, EWCCallback]:
    """Task A fitted with the callback: consolidated at the end of the fit."""
    module = Classifier()
    callback = EWCCallback(EWC(LAMBDA), criterion=nn.CrossEntropyLoss())
    _trainer(tmp_path_factory.mktemp("task_a"), [callback]).fit(module, TASK_A)
    return module, callback


def test_fit_end_consolidates_on_the_train_dataloader(
    after_task_a: tuple[Classifier, EWCCallback],
) -> None:
    module, callback = after_task_a
    assert callback.reg.tasks == 1
    assert callback.last_report is not None and callback.last_report.examples == 96
    reference = EWC(LAMBDA)
    reference.consolidate(module, TASK_A, nn.CrossEntropyLoss())
    for name, fisher in reference.state.importance.items():
        torch.testing.assert_close(callback.reg.state.importance[name], fisher)
        torch.testing.assert_close(callback.reg.state.centre[name], reference.state.centre[name])


def _reg_like(callback: EWCCallback, ewc_lambda: float = LAMBDA) -> EWC:
    reg = EWC(ewc_lambda)
    reg.load_state_dict(callback.reg.state_dict())
    return reg


def _reference_fit(
    module_a: Classifier, reg: EWC, tmp_path: Path, **options: Any
) -> dict[str, Tensor]:
    """The same fit of task B with the penalty added to the loss instead of the callback."""
    reference = Classifier(reg, options.get("accumulate_grad_batches", 1))
    reference.load_state_dict(module_a.state_dict())
    _trainer(tmp_path, [], **options).fit(reference, TASK_B)
    return _weights(reference)


def test_same_callback_over_a_new_trainer_per_task(tmp_path: Path) -> None:
    module = Classifier()
    callback = EWCCallback(EWC(LAMBDA), criterion=nn.CrossEntropyLoss())
    _trainer(tmp_path, [callback]).fit(module, TASK_A)
    module_a, reg_a = copy.deepcopy(module), _reg_like(callback)

    trainer_b = _trainer(tmp_path, [callback])
    trainer_b.fit(module, TASK_B)

    reference = _reference_fit(module_a, reg_a, tmp_path)
    for name, weight in reference.items():
        torch.testing.assert_close(_weights(module)[name], weight, rtol=1e-6, atol=1e-7)
    assert callback.reg.tasks == 2
    logged = trainer_b.callback_metrics["ewc_penalty"]
    assert torch.isfinite(logged) and float(logged) > 0


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"accumulate_grad_batches": 3}, id="accumulate-3"),
        pytest.param({"gradient_clip_val": 0.05}, id="clipped-after-the-penalty"),
        pytest.param({"precision": "bf16-mixed"}, id="bf16-mixed"),
    ],
)
def test_callback_trains_like_the_penalty_in_the_loss(
    after_task_a: tuple[Classifier, EWCCallback], tmp_path: Path, options: dict[str, Any]
) -> None:
    module_a, callback_a = after_task_a
    anchor = _weights(module_a)
    reference = _reference_fit(module_a, _reg_like(callback_a), tmp_path, **options)

    ours = copy.deepcopy(module_a)
    callback = EWCCallback(_reg_like(callback_a), criterion=nn.CrossEntropyLoss())
    _trainer(tmp_path, [callback], **options).fit(ours, TASK_B)

    unregularised = copy.deepcopy(module_a)
    callback_zero = EWCCallback(_reg_like(callback_a, 0.0), criterion=nn.CrossEntropyLoss())
    _trainer(tmp_path, [callback_zero], **options).fit(unregularised, TASK_B)

    for name, weight in reference.items():
        torch.testing.assert_close(_weights(ours)[name], weight, rtol=1e-5, atol=1e-6)
    assert callback.reg.tasks == 2
    if "gradient_clip_val" not in options:
        held = _distance(_weights(ours), anchor)
        free = _distance(_weights(unregularised), anchor)
        assert held < 0.7 * free  # the penalty holds the weights nearer the task-A anchor
        return
    # clipping caps every step, so compare with the penalty added *after* clipping instead
    clipped_first = _ClipThenPenalty(_reg_like(callback_a))
    clipped_first.load_state_dict(module_a.state_dict())
    _trainer(tmp_path, [], **options).fit(clipped_first, TASK_B)
    assert _distance(_weights(ours), _weights(clipped_first)) > 1e-3
    assert _distance(_weights(ours), _weights(unregularised)) > 1e-3


class _ClipThenPenalty(Classifier):
    """Adds the penalty gradient after Lightning clips: what the callback must *not* do."""

    def configure_gradient_clipping(self, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        super().configure_gradient_clipping(optimizer, *args, **kwargs)
        assert self.reg_in_loss is not None
        self.reg_in_loss.penalty_grad_(self)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


class _PenaltyProbe(pl.Callback):  # type: ignore[misc]
    """Records each EWC callback's state and penalty at the first batch and after every step."""

    def __init__(self, callbacks: list[EWCCallback]) -> None:
        self.callbacks = callbacks
        self.first: list[tuple[int, float]] | None = None
        self.after_step: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, index: int) -> None:
        if self.first is None:
            self.first = [
                (c.reg.tasks, float(c.reg.penalty(module).detach())) for c in self.callbacks
            ]

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        penalties = [float(c.reg.penalty(module).detach()) for c in self.callbacks]
        self.after_step[trainer.global_step] = penalties


def test_checkpoint_restores_every_callback_state_before_the_first_step(
    after_task_a: tuple[Classifier, EWCCallback], tmp_path: Path
) -> None:
    module_a, callback_a = after_task_a
    head_only = EWC(5.0, params=["net.2.weight", "net.2.bias"], fisher="empirical")
    head_only.consolidate(module_a, TASK_A, nn.CrossEntropyLoss())
    callbacks = [
        EWCCallback(_reg_like(callback_a), criterion=nn.CrossEntropyLoss(), name="all"),
        EWCCallback(head_only, criterion=nn.CrossEntropyLoss(), name="head"),
    ]
    probe = _PenaltyProbe(callbacks)
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}"
    )
    module = copy.deepcopy(module_a)
    trainer = _trainer(
        tmp_path, [*callbacks, probe, checkpoint], max_epochs=1, enable_checkpointing=True
    )
    trainer.fit(module, TASK_B)
    saved = torch.load(tmp_path / "step=6.ckpt", weights_only=False)["callbacks"]
    assert {"EWCCallback{'name': 'all'}", "EWCCallback{'name': 'head'}"} <= saved.keys()

    restored = [
        EWCCallback(EWC(LAMBDA), criterion=nn.CrossEntropyLoss(), name="all"),
        EWCCallback(EWC(5.0), criterion=nn.CrossEntropyLoss(), name="head"),
    ]
    restored_probe = _PenaltyProbe(restored)
    trainer = _trainer(tmp_path, [*restored, restored_probe], max_epochs=2)
    trainer.fit(Classifier(), TASK_B, ckpt_path=tmp_path / "step=6.ckpt")

    assert restored_probe.first is not None
    assert [tasks for tasks, _ in restored_probe.first] == [1, 1]
    assert [penalty for _, penalty in restored_probe.first] == probe.after_step[6]
    assert all(penalty > 0 for penalty in probe.after_step[6])
    assert probe.after_step[6][0] != probe.after_step[6][1]  # two states, not one


def test_two_callbacks_with_one_state_key_are_an_error(tmp_path: Path) -> None:
    callbacks = [EWCCallback(EWC(1.0), criterion=nn.CrossEntropyLoss()) for _ in range(2)]
    with pytest.raises(RuntimeError, match="state_key` must be unique"):  # Lightning checks
        _trainer(tmp_path, callbacks, max_steps=1).fit(Classifier(), TASK_A)


def test_given_dataloader_is_used_for_the_fisher(tmp_path: Path) -> None:
    module = Classifier()
    callback = EWCCallback(EWC(LAMBDA), criterion=nn.CrossEntropyLoss(), dataloader=TASK_A)
    _trainer(tmp_path, [callback], max_steps=2).fit(module, TASK_B)
    reference = EWC(LAMBDA)
    reference.consolidate(module, TASK_A, nn.CrossEntropyLoss())
    for name, fisher in reference.state.importance.items():
        torch.testing.assert_close(callback.reg.state.importance[name], fisher)


def test_wrong_arguments_name_the_argument() -> None:
    with pytest.raises(TypeError, match="`reg`"):
        EWCCallback("reg", criterion=nn.CrossEntropyLoss())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`criterion`"):
        EWCCallback(EWC(1.0), criterion="ce")  # type: ignore[arg-type]


def test_falls_back_to_pytorch_lightning_when_lightning_is_missing() -> None:
    pytest.importorskip("pytorch_lightning")
    root = Path(__file__).resolve().parents[2]
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "import tests.integration.conftest  # the torchvision shim\n"
        "sys.modules['lightning'] = None\n"
        "import pytorch_lightning\n"
        "from ewc.adapters.lightning import EWCCallback\n"
        "assert issubclass(EWCCallback, pytorch_lightning.Callback)\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("examples", [13, 14, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_distributed_sampler_padding_is_left_out_of_the_fisher_data(examples, shuffle):
    """Across the ranks' cut loaders every example appears exactly once (world size 4)."""
    from torch.utils.data import DistributedSampler

    from ewc.adapters.lightning import _without_padding

    data = TensorDataset(torch.arange(examples), torch.zeros(examples))
    seen: list[int] = []
    for rank in range(4):
        sampler = DistributedSampler(data, num_replicas=4, rank=rank, shuffle=shuffle, seed=3)
        loader = DataLoader(data, batch_size=2, sampler=sampler)
        seen += [int(i) for x, _ in _without_padding(loader) for i in x]
    assert sorted(seen) == list(range(examples))


def test_first_examples_needs_batched_tensors():
    from ewc._per_sample.batching import first_examples

    assert list(first_examples([1, 2], None)) == [1, 2]
    with pytest.raises(ValueError, match=r"first 1 examples.*type str"):
        list(first_examples(["no tensors"], 1))


@pytest.mark.skipif(
    shutil.which("c++") is None or shutil.which("ninja") is None,
    reason="ewc.optim builds a C++ kernel: needs a C++ compiler and ninja",
)
def test_an_ewc_optim_optimizer_trains_like_the_callback_which_then_defers_to_it(
    after_task_a: tuple[Classifier, EWCCallback], tmp_path: Path
) -> None:
    """``configure_optimizers`` returning ``ewc.optim.SGD`` trains like the callback with
    ``torch.optim.SGD`` (the same lr, no clipping); with the callback of the same regulariser
    as well, the callback adds nothing (the same weights again), logs the penalty and
    consolidates at the end of the fit."""
    import ewc.optim

    module_a, callback_a = after_task_a

    class OwnStep(Classifier):
        def __init__(self, reg: EWC) -> None:
            super().__init__()
            self.reg = reg

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return ewc.optim.SGD(self.parameters(), lr=0.1, reg=self.reg, model=self)

    ours = OwnStep(_reg_like(callback_a))
    ours.load_state_dict(module_a.state_dict())
    _trainer(tmp_path, []).fit(ours, TASK_B)
    reference = copy.deepcopy(module_a)
    callback = EWCCallback(
        _reg_like(callback_a), criterion=nn.CrossEntropyLoss(), consolidate_on_fit_end=False
    )
    _trainer(tmp_path, [callback]).fit(reference, TASK_B)
    for name, weight in _weights(reference).items():
        torch.testing.assert_close(_weights(ours)[name], weight, rtol=1e-5, atol=1e-6)

    reg = _reg_like(callback_a)
    both = OwnStep(reg)
    both.load_state_dict(module_a.state_dict())
    deferring = EWCCallback(reg, criterion=nn.CrossEntropyLoss())
    probe = _LoggedPenalty()
    trainer = _trainer(tmp_path, [deferring, probe], logger=pl.loggers.CSVLogger(tmp_path))
    trainer.fit(both, TASK_B)
    for name, weight in _weights(ours).items():
        torch.testing.assert_close(_weights(both)[name], weight, rtol=1e-6, atol=1e-7)
    assert reg.tasks == 2  # consolidated at the end of the fit
    # the logged value is the penalty at each step, before the step moves the weights
    assert len(probe.logged) == len(probe.before) == 12  # 2 epochs of 6 batches
    assert probe.logged == pytest.approx(probe.before, rel=1e-6)
    assert probe.before[0] == 0.0 < probe.before[1]

    clipped = OwnStep(_reg_like(callback_a))
    clipped.load_state_dict(module_a.state_dict())
    with pytest.warns(UserWarning, match=r"applies the penalty inside its step.*clipping"):
        _trainer(tmp_path, [EWCCallback(clipped.reg, criterion=nn.CrossEntropyLoss())],
                 gradient_clip_val=1e9, max_epochs=1).fit(clipped, TASK_B)  # fmt: skip


class _LoggedPenalty(pl.Callback):  # type: ignore[misc]
    """The penalty the callback logged at each step, and the penalty before each step."""

    def __init__(self) -> None:
        self.logged: list[float] = []
        self.before: list[float] = []

    def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
        self.before.append(float(module.reg.penalty(module).detach()))

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        self.logged.append(float(trainer.callback_metrics["ewc_penalty"]))
