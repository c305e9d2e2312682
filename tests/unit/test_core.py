"""The EWC object: argument validation, failure safety, parameter changes, state round trips."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from ewc import (
    EWC,
    ConsolidationError,
    ParameterMismatchError,
    StateDictError,
)


def data(n: int = 12, batch: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def consolidated(reg: EWC | None = None, seed: int = 0) -> tuple[EWC, nn.Module]:
    reg = reg or EWC(1.0)
    net = model(seed)
    reg.consolidate(net, data(seed=seed), nn.CrossEntropyLoss())
    return reg, net


def snapshot(reg: EWC) -> dict:
    buffer = io.BytesIO()
    torch.save(reg.state_dict(), buffer)
    return {"bytes": buffer.getvalue(), "tasks": reg.tasks}


# ---------------------------------------------------------------- constructor validation
@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"ewc_lambda": -1.0}, ValueError, "`ewc_lambda`.*-1.0"),
        ({"ewc_lambda": math.nan}, ValueError, "`ewc_lambda`.*nan"),
        ({"ewc_lambda": math.inf}, ValueError, "`ewc_lambda`.*inf"),
        ({"ewc_lambda": "1"}, TypeError, "`ewc_lambda`.*'1'"),
        ({"ewc_lambda": True}, TypeError, "`ewc_lambda`.*True"),
        ({"ewc_lambda": 1.0, "mode": "offline"}, ValueError, "`mode`.*'offline'"),
        ({"ewc_lambda": 1.0, "mode": "online"}, ValueError, "`decay_factor`.*None"),
        ({"ewc_lambda": 1.0, "decay_factor": 0.5}, ValueError, "`decay_factor`.*0.5.*separate"),
        (
            {"ewc_lambda": 1.0, "mode": "online", "decay_factor": 1.5},
            ValueError,
            r"`decay_factor`.*\[0, 1\].*1.5",
        ),
        (
            {"ewc_lambda": 1.0, "mode": "online", "decay_factor": -0.1},
            ValueError,
            "`decay_factor`.*-0.1",
        ),
        (
            {"ewc_lambda": 1.0, "mode": "online", "decay_factor": "x"},
            TypeError,
            "`decay_factor`.*'x'",
        ),
        ({"ewc_lambda": 1.0, "keep_importance_data": 1}, TypeError, "`keep_importance_data`.*1"),
        ({"ewc_lambda": 1.0, "fisher": "diag"}, ValueError, "`fisher`.*'diag'"),
        ({"ewc_lambda": 1.0, "mc_samples": 0}, ValueError, "`mc_samples`.*0"),
        ({"ewc_lambda": 1.0, "mc_samples": 2.0}, TypeError, "`mc_samples`.*2.0"),
        ({"ewc_lambda": 1.0, "max_samples": 0}, ValueError, "`max_samples`.*0"),
        ({"ewc_lambda": 1.0, "max_samples": 1.5}, TypeError, "`max_samples`.*1.5"),
        ({"ewc_lambda": 1.0, "params": 3}, TypeError, "`params`.*3"),
        ({"ewc_lambda": 1.0, "params": ["a", 3]}, TypeError, "`params`.*3"),
    ],
)
def test_invalid_arguments_name_the_argument_and_value(kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        EWC(**kwargs)


def test_positional_arguments_mirror_avalanche():
    reg = EWC(5.0, "online", 0.9, True)
    assert (reg.ewc_lambda, reg.mode, reg.decay_factor, reg.keep_importance_data) == (
        5.0,
        "online",
        0.9,
        True,
    )
    with pytest.raises(TypeError):
        EWC(5.0, "online", 0.9, True, "exact")  # estimator options are keyword-only


def test_params_naming_an_unknown_parameter_is_an_error_and_loses_nothing():
    reg, net = consolidated()
    before = snapshot(reg)
    reg.params = ("0.weight", "nope")
    with pytest.raises(ValueError, match="'nope'"):
        reg.consolidate(net, data(), nn.CrossEntropyLoss())
    assert snapshot(reg) == before


def test_params_selection_by_names_and_predicate():
    net = model()
    by_name = EWC(1.0, params=["2.weight"])
    by_name.consolidate(net, data(), nn.CrossEntropyLoss())
    assert set(by_name.state.importance) == {"2.weight"}
    by_predicate = EWC(1.0, params=lambda name, p: name.endswith("bias"))
    by_predicate.consolidate(net, data(), nn.CrossEntropyLoss())
    assert set(by_predicate.state.importance) == {"0.bias", "2.bias"}


# ---------------------------------------------------------------- failure safety
class ExplodingLoader:
    def __init__(self, batches, fail_at: int, error: BaseException):
        self.batches, self.fail_at, self.error = batches, fail_at, error

    def __iter__(self):
        for index, batch in enumerate(self.batches):
            if index == self.fail_at:
                raise self.error
            yield batch


@pytest.mark.parametrize("estimator", ["exact", "sample", "empirical", "batched"])
def test_nan_in_the_data_fails_cleanly(estimator):
    reg, net = consolidated(EWC(1.0, fisher=estimator))
    before = snapshot(reg)
    bad = data(seed=1)
    bad[1][0][0, 0] = math.nan
    with pytest.raises(ConsolidationError, match=r"NaN or infinite.*unchanged"):
        reg.consolidate(net, bad, nn.CrossEntropyLoss())
    assert snapshot(reg) == before


def test_inf_weights_fail_cleanly():
    reg, net = consolidated()
    before = snapshot(reg)
    with torch.no_grad():
        net[0].weight[0, 0] = math.inf
    with pytest.raises(ConsolidationError):
        reg.consolidate(net, data(), nn.CrossEntropyLoss())
    assert snapshot(reg) == before


def test_empty_dataloader_fails_cleanly():
    reg, net = consolidated()
    before = snapshot(reg)
    with pytest.raises(ConsolidationError, match="no examples"):
        reg.consolidate(net, [], nn.CrossEntropyLoss())
    assert snapshot(reg) == before


def test_exception_in_the_data_pipeline_is_wrapped_and_loses_nothing():
    reg, net = consolidated()
    before = snapshot(reg)
    net.train()
    loader = ExplodingLoader(data(seed=2), fail_at=2, error=OSError("disk gone"))
    with pytest.raises(ConsolidationError, match="OSError: disk gone") as info:
        reg.consolidate(net, loader, nn.CrossEntropyLoss())
    assert isinstance(info.value.__cause__, OSError)
    assert snapshot(reg) == before
    assert net.training, "the model's mode is restored after a failure"


def test_keyboard_interrupt_propagates_and_loses_nothing():
    reg, net = consolidated()
    before = snapshot(reg)
    loader = ExplodingLoader(data(seed=2), fail_at=1, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        reg.consolidate(net, loader, nn.CrossEntropyLoss())
    assert snapshot(reg) == before


def test_consolidation_never_touches_grads_and_restores_modes():
    net = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.2), nn.BatchNorm1d(5), nn.Linear(5, 3))
    net.train()
    net[2].eval()  # a module the user keeps in eval on purpose
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0)
    running = net[2].running_mean.clone()
    for estimator in ("exact", "sample", "empirical", "batched"):
        EWC(1.0, fisher=estimator).consolidate(net, data(), nn.CrossEntropyLoss())
    assert [m.training for m in net.modules()] == [True, True, True, False, True]
    assert all(torch.all(p.grad == 7.0) for p in net.parameters())
    assert torch.equal(net[2].running_mean, running)


def test_consolidate_works_under_no_grad():
    net = model()
    reg = EWC(1.0)
    with torch.no_grad():
        reg.consolidate(net, data(), nn.CrossEntropyLoss())
    assert reg.tasks == 1


# ---------------------------------------------------------------- changed parameters
class Head(nn.Module):
    def __init__(self, classes: int, width: int = 4):
        super().__init__()
        self.body = nn.Linear(4, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_grown_head_is_padded_with_zero_importance():
    torch.manual_seed(0)
    net = Head(3)
    reg = EWC(1.0, mode="online", decay_factor=0.5)
    reg.consolidate(net, data(), nn.CrossEntropyLoss())
    old_head = reg.state.importance["head.weight"].clone()
    grown = Head(5)
    grown.body.load_state_dict(net.body.state_dict())
    with torch.no_grad():
        grown.head.weight[:3] = net.head.weight
        grown.head.bias[:3] = net.head.bias
    assert float(reg.penalty(grown)) == 0.0, "new rows are not penalised"
    reg.consolidate(grown, data(seed=3), nn.CrossEntropyLoss())
    new_head = reg.state.importance["head.weight"]
    assert new_head.shape == (5, 4)
    fresh = EWC(1.0)
    fresh.consolidate(grown, data(seed=3), nn.CrossEntropyLoss())
    torch.testing.assert_close(
        new_head[:3], 0.5 * old_head + fresh.state.importance["head.weight"][:3]
    )
    torch.testing.assert_close(new_head[3:], fresh.state.importance["head.weight"][3:])


def test_new_parameter_names_are_not_penalised():
    reg, net = consolidated()
    net.add_module("extra", nn.Linear(2, 2))
    assert float(reg.penalty(net)) == 0.0
    reg.penalty_grad_(net)
    assert net.extra.weight.grad is None


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda net: setattr(net, "2", nn.Linear(5, 2)), r"'2.weight'.*\(3, 5\).*\(2, 5\)"),
        (lambda net: setattr(net, "2", nn.Linear(5, 3, bias=False)), "'2.bias'"),
        (
            lambda net: net[2].register_parameter("weight", nn.Parameter(torch.zeros(15))),
            r"'2.weight'.*\(15,\)",
        ),
    ],
    ids=["shrunk", "missing", "changed-rank"],
)
def test_a_consolidated_parameter_that_no_longer_fits_is_named(change, fragment):
    reg, net = consolidated()
    before = snapshot(reg)
    change(net)
    with pytest.raises(ParameterMismatchError, match=fragment):
        reg.penalty(net)
    with pytest.raises(ParameterMismatchError, match=fragment):
        reg.penalty_grad_(net)
    with pytest.raises(ParameterMismatchError, match=fragment):
        reg.consolidate(net, data(), nn.CrossEntropyLoss())
    assert snapshot(reg) == before


# ---------------------------------------------------------------- state dict
@pytest.mark.parametrize(
    "mode, decay, keep",
    [("separate", None, False), ("separate", None, True), ("online", 0.8, True)],
)
def test_state_dict_round_trips_bit_exactly_through_torch_save(tmp_path, mode, decay, keep):
    reg = EWC(2.0, mode, decay, keep, fisher="empirical")
    net = model()
    for seed in range(3):
        reg.consolidate(net, data(seed=seed), nn.CrossEntropyLoss())
        with torch.no_grad():
            net[0].weight.add_(0.1)
    torch.save(reg.state_dict(), tmp_path / "ewc.pt")
    loaded = torch.load(tmp_path / "ewc.pt", weights_only=True)
    clone = EWC(2.0, mode, decay, keep, fisher="empirical")
    clone.load_state_dict(loaded)
    assert clone.tasks == 3
    assert len(clone.state.history) == (3 if keep else 0)
    for name in reg.state.importance:
        assert torch.equal(clone.state.importance[name], reg.state.importance[name])
        assert torch.equal(clone.state.centre[name], reg.state.centre[name])
    assert torch.equal(clone.state.offset, reg.state.offset)
    assert torch.equal(clone.penalty(net), reg.penalty(net))


def test_a_hand_written_version_1_state_dict_loads_and_gives_its_penalty():
    """The saved format pinned from outside the code: built by hand, not by state_dict()."""
    saved = {
        "format": "ewc.EWC",
        "version": 1,
        "config": {"mode": "separate", "ewc_lambda": 9.0},
        "state": {
            "tasks": 2,
            "importance": {"weight": torch.tensor([[1.0, 2.0]]), "bias": torch.tensor([4.0])},
            "centre": {"weight": torch.tensor([[0.5, -1.0]]), "bias": torch.tensor([0.0])},
            "offset": torch.tensor(0.25, dtype=torch.float64),
            "history": [],
        },
    }
    net = nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.5, 0.0]]))
        net.bias.fill_(0.5)
    reg = EWC(3.0)
    reg.load_state_dict(saved)
    # 3 * (1 * 1.0^2 + 2 * 1.0^2 + 4 * 0.5^2 + 0.25) = 3 * 4.25
    assert float(reg.penalty(net)) == pytest.approx(12.75, rel=1e-7)
    assert reg.tasks == 2


def test_loading_does_not_alias_the_source_dict():
    reg, _ = consolidated()
    saved = reg.state_dict()
    clone = EWC(1.0)
    clone.load_state_dict(saved)
    saved["state"]["importance"]["0.weight"].fill_(123.0)
    assert not torch.equal(
        clone.state.importance["0.weight"], saved["state"]["importance"]["0.weight"]
    )


def damaged(key_path: tuple, value) -> dict:
    reg, _ = consolidated()
    state = reg.state_dict()
    target = state
    for key in key_path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[key_path[-1]]
    else:
        target[key_path[-1]] = value
    return state


@pytest.mark.parametrize(
    "state, fragment",
    [
        ({"weight": torch.zeros(2)}, "not an EWC state dict"),
        ("nonsense", "not an EWC state dict"),
        (damaged(("version",), 99), "format version 99"),
        (damaged(("config",), KeyError), "config"),
        (damaged(("config", "mode"), "online"), "mode='online'"),
        (damaged(("state", "importance"), KeyError), "importance"),
        (damaged(("state", "tasks"), -1), "`tasks` = -1"),
        (
            damaged(("state", "importance", "0.weight"), torch.zeros(2)),
            "'0.weight'.*importance of shape",
        ),
        (damaged(("state", "importance", "0.weight"), "x"), "'0.weight'"),
        (damaged(("state", "centre", "0.bias"), KeyError), "mismatched parameter names"),
        (damaged(("state", "offset"), torch.tensor(math.nan, dtype=torch.float64)), "non-finite"),
        (damaged(("state", "importance", "0.bias"), -torch.ones(5)), "'0.bias'.*negative"),
        (damaged(("state", "history"), "x"), "history"),
    ],
    ids=[
        "foreign",
        "not-a-dict",
        "newer-version",
        "no-config",
        "other-mode",
        "no-importance",
        "negative-tasks",
        "shape-mismatch",
        "not-a-tensor",
        "missing-centre",
        "nan-offset",
        "negative-importance",
        "damaged-history",
    ],
)
def test_foreign_or_damaged_state_dicts_are_rejected_and_lose_nothing(state, fragment):
    reg, _ = consolidated(seed=5)
    before = snapshot(reg)
    with pytest.raises(StateDictError, match=fragment):
        reg.load_state_dict(state)
    assert snapshot(reg) == before


def test_progress_bar_and_report(capsys):
    net = model()
    reg = EWC(1.0, fisher="empirical")
    report = reg.consolidate(net, data(n=10, batch=4), nn.CrossEntropyLoss(), progress=True)
    assert (report.examples, report.batches, report.estimator) == (10, 3, "empirical")
    assert report.seconds > 0.0
    assert set(report.paths) == {name for name, _ in net.named_parameters()}
    assert "ex" in capsys.readouterr().err  # tqdm writes examples to stderr


def test_batched_report_counts_batches():
    report = EWC(1.0, fisher="batched").consolidate(
        model(), data(n=10, batch=4), nn.CrossEntropyLoss()
    )
    assert (report.examples, report.batches) == (10, 3)


def test_add_task_equals_consolidate_and_validates():
    net = model()
    via_consolidate = EWC(1.0, fisher="empirical")
    via_consolidate.consolidate(net, data(), nn.CrossEntropyLoss())
    direct = EWC(1.0)
    direct.add_task(dict(via_consolidate.state.importance), dict(net.named_parameters()))
    for name in via_consolidate.state.importance:
        assert torch.equal(direct.state.importance[name], via_consolidate.state.importance[name])
        assert torch.equal(direct.state.centre[name], via_consolidate.state.centre[name])
    before = snapshot(direct)
    with pytest.raises(ValueError, match="same parameters"):
        direct.add_task({"0.weight": torch.ones(5, 4)}, {})
    with pytest.raises(ValueError, match=r"'0.bias'.*shape \(2,\).*\(5,\)"):
        direct.add_task({"0.bias": torch.ones(2)}, {"0.bias": torch.ones(5)})
    with pytest.raises(ValueError, match=r"'0.bias'.*negative"):
        direct.add_task({"0.bias": -torch.ones(5)}, {"0.bias": torch.ones(5)})
    assert snapshot(direct) == before


def test_penalty_grad_skips_parameters_frozen_since_consolidation():
    reg, net = consolidated()
    net[0].requires_grad_(False)
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[2].weight.add_(1.0)
    reg.penalty_grad_(net)
    assert net[0].weight.grad is None
    expected = torch.autograd.grad(reg.penalty(net), net[2].weight)[0]
    torch.testing.assert_close(net[2].weight.grad, expected)


def test_penalty_checks_are_redone_whenever_the_model_changes():
    """The alignment checks are cached per model; any change of a parameter invalidates them."""
    import gc
    import weakref

    reg, net = consolidated()
    reg.penalty_grad_(net)  # fills the cache
    with torch.no_grad():
        net[0].weight.data = net[0].weight.data[:, :2].clone()  # shrunk in place
    with pytest.raises(ParameterMismatchError, match=r"'0\.weight'.*shape"):
        reg.penalty_grad_(net)
    with pytest.raises(ParameterMismatchError, match=r"'0\.weight'.*shape"):
        reg.penalty(net)

    reg, net = consolidated()
    reg.penalty_grad_(net)
    fresh = model(seed=5)  # the same architecture, other parameters
    net.zero_grad(set_to_none=True)
    reg.penalty_grad_(fresh)
    expected = torch.autograd.grad(reg.penalty(fresh), list(fresh.parameters()))
    for p, want in zip(fresh.parameters(), expected):
        torch.testing.assert_close(p.grad, want)
    assert all(p.grad is None for p in net.parameters())

    watched = weakref.ref(fresh[0].weight)
    del fresh, p, expected
    gc.collect()
    assert watched() is None  # the cache keeps no model alive
