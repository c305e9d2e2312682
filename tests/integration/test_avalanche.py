"""``ewc.adapters.avalanche.EWCPlugin`` inside real Avalanche strategies, against Avalanche's own
``EWCPlugin`` (the reference)."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

avalanche = pytest.importorskip("avalanche")

from avalanche.benchmarks import nc_benchmark  # noqa: E402
from avalanche.models import MultiTaskModule  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402
from avalanche.training.plugins import EWCPlugin as AvalancheEWCPlugin  # noqa: E402

from ewc import EWC  # noqa: E402
from ewc.adapters.avalanche import EWCPlugin  # noqa: E402

pytestmark = pytest.mark.integration

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


class TwoHeads(MultiTaskModule):  # type: ignore[misc]
    """A multi-task model: shared body, one head per task label (Avalanche routes by label)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(16, 2) for _ in range(3)])
        self.max_class_label = 2  # width of the output Avalanche assembles for mixed tasks

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self.heads[int(task_label)](self.body(x))


def _single_head() -> nn.Module:
    # BatchNorm and Dropout make the result depend on eval mode during the importance pass
    return nn.Sequential(
        nn.Linear(10, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Dropout(0.2), nn.Linear(24, 6)
    )


def _benchmark(task_labels: bool) -> Any:
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(210) % 6
    x = torch.randn(210, 10, generator=generator) + nn.functional.one_hot(y, 10).float()
    data = TensorDataset(x, y)
    return nc_benchmark(
        data,
        data,
        n_experiences=3,
        task_labels=task_labels,
        seed=0,
        fixed_class_order=list(range(6)),
        class_ids_from_zero_in_each_exp=task_labels,
    )


def _run(plugin: Any, task_labels: bool, device: str = "cpu", experiences: int = 3) -> nn.Module:
    """Train a fresh model (same seed every time) with ``plugin`` in a ``Naive`` strategy."""
    torch.manual_seed(1)
    model = TwoHeads() if task_labels else _single_head()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    strategy = Naive(
        model=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=16,  # 70 examples per experience: the last batch is smaller
        train_epochs=2,
        eval_mb_size=64,
        device=device,
        plugins=[plugin],
        evaluator=EvaluationPlugin(loggers=[]),
    )
    torch.manual_seed(2)
    for experience in _benchmark(task_labels).train_stream[:experiences]:
        strategy.train(experience)
    return model


def _max_difference(a: nn.Module, b: nn.Module) -> float:
    reference = a.state_dict()
    return max(
        float((reference[name].double() - tensor.double()).abs().max())
        for name, tensor in b.state_dict().items()
    )


def _assert_views_equal(reference: Any, ours: Any) -> None:
    """Bit for bit up to the first consolidation; after it, the collapsed penalty (one quadratic
    instead of Avalanche's per-experience sum) rounds differently by ~1e-7 relative, so weights
    and the importances computed at them agree to ~1e-6."""
    assert sorted(reference) == sorted(ours)
    for t, params in reference.items():
        assert sorted(params) == sorted(ours[t])
        for name, value in params.items():
            tolerance = {"rtol": 0.0, "atol": 0.0} if t == 0 else {"rtol": 1e-5, "atol": 1e-8}
            torch.testing.assert_close(ours[t][name].data.cpu(), value.data.cpu(), **tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("task_labels", "mode", "decay_factor", "keep"),
    [
        pytest.param(False, "separate", None, True, id="class-incremental-separate"),
        pytest.param(False, "separate", None, False, id="class-incremental-separate-collapsed"),
        pytest.param(False, "online", 0.7, False, id="class-incremental-online"),
        pytest.param(False, "online", 0.7, True, id="class-incremental-online-keep"),
        pytest.param(True, "separate", None, True, id="multi-head-separate"),
        pytest.param(True, "online", 0.7, True, id="multi-head-online-keep"),
    ],
)
def test_batched_reproduces_avalanche_ewc_plugin_in_naive(
    task_labels: bool, mode: str, decay_factor: float | None, keep: bool, device: str
) -> None:
    reference_plugin = AvalancheEWCPlugin(100.0, mode, decay_factor, keep)
    reference = _run(reference_plugin, task_labels, device)
    plugin = EWCPlugin(100.0, mode, decay_factor, keep, fisher="batched")
    ours = _run(plugin, task_labels, device)
    unregularised = _run(EWCPlugin(0.0, mode, decay_factor, fisher="batched"), task_labels, device)

    assert _max_difference(reference, ours) < 1e-5
    assert _max_difference(reference, unregularised) > 1e-2  # the penalty mattered
    assert plugin.reg.tasks == 3
    assert ours.training  # left in train mode, as Avalanche leaves it
    if mode == "online" or keep:
        _assert_views_equal(reference_plugin.importances, plugin.importances)
        _assert_views_equal(reference_plugin.saved_params, plugin.saved_params)
    else:
        with pytest.raises(RuntimeError, match="keep_importance_data=True"):
            plugin.importances  # noqa: B018


class _CollatedDataset(Dataset):  # type: ignore[type-arg]
    """Examples ``(x, y, t)`` whose ``collate_fn`` inserts an extra item and scales the inputs."""

    def __init__(self, x: Tensor, y: Tensor, t: Tensor) -> None:
        self.x, self.y, self.t = x, y, t

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.x[index], self.y[index], self.t[index]

    @staticmethod
    def collate_fn(items: list[tuple[Tensor, Tensor, Tensor]]) -> list[Tensor]:
        x, y, t = (torch.stack(column) for column in zip(*items))
        return [3.0 * x, y, torch.zeros(len(y)), t]


def _collated_dataset(size: int = 30) -> _CollatedDataset:
    generator = torch.Generator().manual_seed(3)
    return _CollatedDataset(
        torch.randn(size, 10, generator=generator),
        torch.randint(0, 2, (size,), generator=generator),
        torch.arange(size) % 3,  # every batch mixes task labels
    )


def _trained_two_heads() -> TwoHeads:
    torch.manual_seed(4)
    model = TwoHeads()
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.body(torch.randn(64, 10) * 2 + 1)
    return model


def test_compute_importances_respects_collate_fn_task_labels_and_batch_size() -> None:
    dataset = _collated_dataset()
    criterion = nn.CrossEntropyLoss()
    model = _trained_two_heads()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    reference_model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(reference_model.parameters(), lr=0.1)
    reference = AvalancheEWCPlugin(1.0).compute_importances(
        reference_model, criterion, optimizer, dataset, "cpu", 7
    )
    ours = EWCPlugin(1.0, fisher="batched").compute_importances(
        model, criterion, None, dataset, "cpu", 7
    )

    assert sorted(ours) == sorted(reference)
    for name, value in reference.items():
        torch.testing.assert_close(ours[name].data, value.data, rtol=1e-6, atol=1e-10)
    assert float(reference["heads.2.weight"].data.abs().sum()) > 0
    for name, buffer in model.named_buffers():  # eval mode: BatchNorm statistics untouched
        torch.testing.assert_close(buffer, buffers[name], rtol=0, atol=0)
    assert model.training and all(m.training for m in model.modules())

    batch_of_8 = EWCPlugin(1.0, fisher="batched").compute_importances(
        model, criterion, None, dataset, "cpu", 8
    )
    assert not torch.allclose(batch_of_8["body.0.weight"].data, ours["body.0.weight"].data)


def test_default_estimator_is_the_exact_fisher_of_the_experience() -> None:
    plugin = EWCPlugin(100.0, keep_importance_data=True)
    model = _run(plugin, task_labels=False, experiences=1)
    assert plugin.last_report is not None
    assert plugin.last_report.estimator == "exact"
    assert plugin.last_report.examples == 70

    experience = _benchmark(task_labels=False).train_stream[0]
    loader = DataLoader(
        experience.dataset, batch_size=5, collate_fn=experience.dataset.collate_fn
    )  # a per-example Fisher does not depend on the batch size
    reference = EWC(100.0, fisher="exact")
    reference.consolidate(model, loader, nn.CrossEntropyLoss())
    reference_model = copy.deepcopy(model)
    batched = AvalancheEWCPlugin(100.0).compute_importances(
        reference_model,
        nn.CrossEntropyLoss(),
        torch.optim.SGD(reference_model.parameters(), lr=0.1),
        experience.dataset,
        "cpu",
        16,
    )

    for name, fisher in reference.state.importance.items():
        torch.testing.assert_close(plugin.reg.state.importance[name], fisher, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(
            plugin.saved_params[0][name].data, dict(model.named_parameters())[name].detach()
        )
    difference = float(
        (batched["4.weight"].data - reference.state.importance["4.weight"]).abs().max()
    )
    assert difference > 1e-3  # the default is not Avalanche's batched estimate


def test_default_estimator_routes_task_labels_to_multi_task_models() -> None:
    dataset = _collated_dataset(size=12)
    model = _trained_two_heads()
    ours = EWCPlugin(1.0).compute_importances(model, nn.CrossEntropyLoss(), None, dataset, "cpu", 4)
    reference = EWC(1.0)
    loader = DataLoader(dataset, batch_size=6, collate_fn=dataset.collate_fn)
    reference.consolidate(
        model,
        loader,
        nn.CrossEntropyLoss(),
        forward=lambda model, batch: (model(batch[0], batch[-1]), batch[1]),
    )
    for name, fisher in reference.state.importance.items():
        torch.testing.assert_close(ours[name].data, fisher, rtol=1e-5, atol=1e-10)
        assert float(fisher.abs().sum()) > 0


def test_update_importances_needs_a_model_and_validates_t() -> None:
    plugin = EWCPlugin(1.0)
    with pytest.raises(RuntimeError, match="compute_importances"):
        plugin.update_importances({}, 0)
    with pytest.raises(ValueError, match="`t`"):
        plugin.update_importances({}, -1)


def test_update_importances_adds_an_experience_like_consolidate() -> None:
    dataset = _collated_dataset(size=12)
    model = _trained_two_heads()
    plugin = EWCPlugin(5.0, fisher="batched")
    importances = plugin.compute_importances(model, nn.CrossEntropyLoss(), None, dataset, "cpu", 4)
    plugin.update_importances(importances, 0)
    assert plugin.reg.tasks == 1
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    expected = 5.0 * sum(float((importances[name].data * 0.1**2).sum()) for name in importances)
    assert float(plugin.reg.penalty(model)) == pytest.approx(expected, rel=1e-4)


def test_ewc_lambda_is_assignable_and_validated() -> None:
    plugin = EWCPlugin(1.0)
    plugin.ewc_lambda = 2.5
    assert plugin.reg.ewc_lambda == 2.5
    with pytest.raises(ValueError, match="ewc_lambda"):
        plugin.ewc_lambda = -1.0
    with pytest.raises(ValueError, match="decay_factor"):
        EWCPlugin(1.0, mode="online")


def test_is_a_supervised_plugin_marked_distributed() -> None:
    from avalanche.training.plugins import SupervisedPlugin

    plugin = EWCPlugin(1.0)
    assert isinstance(plugin, SupervisedPlugin)
    # Distributed support is checked where it can fail: tests/distributed/test_avalanche.py runs
    # the plugin in Avalanche's distributed training and asks Avalanche's own compatibility check.


def test_adapters_raise_the_install_hint_without_their_framework() -> None:
    script = (
        "import sys\n"
        "sys.modules['avalanche'] = None\n"
        "sys.modules['lightning'] = None\n"
        "sys.modules['pytorch_lightning'] = None\n"
        "import ewc, ewc.adapters.loop\n"
        "for name, extra in [('avalanche', 'avalanche'), ('lightning', 'lightning')]:\n"
        "    try:\n"
        "        __import__('ewc.adapters.' + name)\n"
        "    except ModuleNotFoundError as error:\n"
        "        assert f'pip install \"ewc[{extra}]\"' in str(error), error\n"
        "    else:\n"
        "        raise SystemExit(name + ' imported without its framework')\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
