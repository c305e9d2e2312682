"""The adapters' views (ewc.views): per-task importances and anchors, the sampler padding cut."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

from ewc import EWC
from ewc.views import (
    accelerate_shard_examples,
    check_ewc_lambda,
    examples_before_padding,
    task_anchors,
    task_importances,
)


def _data(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 4, generator=generator), torch.randint(0, 3, (6,), generator=generator))
    ]


def _two_tasks_one_frozen(reg: EWC) -> nn.Module:
    """Task 0 trains everything; during task 1 the first layer is frozen (no Fisher for it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    reg.consolidate(model, _data(1), nn.CrossEntropyLoss())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3)
    model[0].requires_grad_(False)
    reg.consolidate(model, _data(2), nn.CrossEntropyLoss())
    return model


@pytest.mark.parametrize("keep", [True, False], ids=["history", "no-history"])
def test_online_importances_view_equals_the_state_with_a_layer_frozen_for_one_task(
    keep: bool,
) -> None:
    reg = EWC(1.0, mode="online", decay_factor=0.6, keep_importance_data=keep)
    _two_tasks_one_frozen(reg)
    views = task_importances(reg.state, "online", 0.6)
    assert sorted(views) == ([0, 1] if keep else [1])
    latest = views[1]
    assert (
        latest.keys() == reg.state.importance.keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    )
    for name, importance in reg.state.importance.items():
        assert torch.equal(latest[name], importance), name
    if keep:
        first = reg.state.history[0]["fisher"]
        # the frozen layer only decayed; a view that skips the decay would differ from the state
        assert "0.weight" not in reg.state.history[1]["fisher"]
        torch.testing.assert_close(latest["0.weight"], 0.6 * first["0.weight"], rtol=0, atol=0)
        assert not torch.equal(latest["0.weight"], first["0.weight"])
        for name in first:
            assert torch.equal(views[0][name], first[name])


def test_separate_importances_view_is_each_tasks_fisher_and_sums_to_the_state() -> None:
    reg = EWC(1.0, keep_importance_data=True)
    _two_tasks_one_frozen(reg)
    views = task_importances(reg.state, "separate", None)
    assert sorted(views) == [0, 1]
    for t, entry in enumerate(reg.state.history):
        assert views[t].keys() == entry["fisher"].keys()
    assert "0.weight" not in views[1]
    for name, importance in reg.state.importance.items():
        total = sum(view[name] for view in views.values() if name in view)
        torch.testing.assert_close(total, importance)


def test_anchors_view_is_the_weights_of_each_consolidation() -> None:
    reg = EWC(1.0, keep_importance_data=True)
    model = _two_tasks_one_frozen(reg)
    anchors = task_anchors(reg.state, "separate")
    assert sorted(anchors) == [0, 1]
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.equal(anchors[1][name], param.detach())
    torch.testing.assert_close(anchors[0]["2.weight"] + 0.3, anchors[1]["2.weight"])

    online = EWC(1.0, mode="online", decay_factor=0.5)
    model = _two_tasks_one_frozen(online)
    latest = task_anchors(online.state, "online", 0.5)
    assert sorted(latest) == [1]
    assert torch.equal(latest[1]["2.bias"], model[2].bias.detach())
    kept = EWC(1.0, mode="online", decay_factor=0.5, keep_importance_data=True)
    _two_tasks_one_frozen(kept)
    anchors = task_anchors(kept.state, "online", 0.5)
    for name, centre in kept.state.centre.items():  # the frozen layer keeps its first anchor
        assert torch.equal(anchors[1][name], centre), name
    assert torch.equal(anchors[1]["0.weight"], kept.state.history[0]["anchor"]["0.weight"])


def test_views_without_history_in_separate_mode_say_what_they_need() -> None:
    reg = EWC(1.0)
    assert task_importances(reg.state, "separate", None) == {}
    _two_tasks_one_frozen(reg)
    with pytest.raises(RuntimeError, match="keep_importance_data=True"):
        task_importances(reg.state, "separate", None)
    with pytest.raises(RuntimeError, match="keep_importance_data=True"):
        task_anchors(reg.state, "separate")


@pytest.mark.parametrize(
    ("size", "world"), [(10, 2), (11, 2), (7, 3), (2, 3), (13, 4)], ids=lambda v: str(v)
)
def test_examples_before_padding_cuts_exactly_the_distributed_samplers_repeats(
    size: int, world: int
) -> None:
    dataset = TensorDataset(torch.arange(size))
    own_indices: list[int] = []
    for rank in range(world):
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=3)
        indices = list(sampler)
        assert len(indices) == math.ceil(size / world)  # padded
        own = examples_before_padding(size, rank, world)
        own_indices += indices[:own]
    assert sorted(own_indices) == list(range(size))  # each example once over the ranks


def test_accelerate_shard_examples_counts_each_ranks_whole_batches() -> None:
    # 7 examples in batches of 2: [2, 2, 2, 1]; rank 0 gets batches 0 and 2, rank 1 gets 1 and 3
    assert [accelerate_shard_examples(7, 2, r, 2) for r in range(2)] == [4, 3]
    assert [accelerate_shard_examples(7, 2, r, 2, drop_last=True) for r in range(2)] == [4, 2]
    assert [accelerate_shard_examples(5, 4, r, 3) for r in range(3)] == [4, 1, 0]
    assert sum(accelerate_shard_examples(103, 8, r, 4) for r in range(4)) == 103


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        pytest.param(lambda: examples_before_padding(4, 2, 2), "rank", id="rank-too-large"),
        pytest.param(lambda: examples_before_padding(4, 0, 0), "world_size", id="no-world"),
        pytest.param(lambda: accelerate_shard_examples(4, 0, 0, 1), "batch_size", id="batch-0"),
    ],
)
def test_bad_shard_arguments_name_the_argument(call: object, argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        call()  # type: ignore[operator]


def test_check_ewc_lambda_is_the_constructors_check() -> None:
    assert check_ewc_lambda(3) == 3.0 and isinstance(check_ewc_lambda(3), float)
    for bad, error in [
        (-1.0, ValueError),
        (math.inf, ValueError),
        (True, TypeError),
        ("1", TypeError),
    ]:
        with pytest.raises(error, match="ewc_lambda") as from_view:
            check_ewc_lambda(bad)
        with pytest.raises(error) as from_constructor:
            EWC(bad)
        assert str(from_view.value) == str(from_constructor.value)
