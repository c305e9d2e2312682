"""Bad or degenerate data, outputs and criteria: a clear error naming the argument and the value,
and the consolidated state bit for bit as it was. Cases at the data/criterion/output level (the
EWC-level cases live in ``test_bad_input.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from ewc import EWC, ConsolidationError, EWCError, UnsupportedCriterionError, fisher_sums


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def data(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def consolidated(estimator: str) -> tuple[EWC, nn.Module]:
    model = net()
    reg = EWC(1.0, fisher=estimator)
    reg.consolidate(model, [data()], nn.CrossEntropyLoss())
    return reg, model


def snapshot(reg: EWC) -> list[Any]:
    leaves = pytree.tree_leaves(reg.state_dict())
    return [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]


def assert_unchanged(before: list[Any], reg: EWC) -> None:
    after = pytree.tree_leaves(reg.state_dict())
    assert len(before) == len(after)
    for old, new in zip(before, after):
        if isinstance(old, torch.Tensor):
            assert old.dtype == new.dtype and old.shape == new.shape and torch.equal(old, new)
        else:
            assert old == new


@dataclass
class Case:
    id: str
    estimators: tuple[str, ...]
    error: type[Exception]
    match: str
    batches: Callable[[], list] = lambda: [data()]
    criterion: Any = field(default_factory=nn.CrossEntropyLoss)
    forward: Any = None


def labels(values: list[int]) -> list:
    x, _ = data(len(values))
    return [(x, torch.tensor(values))]


def detached(model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
    return model(batch[0]).detach(), batch[1]


def without_grad(model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
    with torch.no_grad():
        return model(batch[0]), batch[1]


def integer_output(model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
    return (model(batch[0]) * 100).long(), batch[1]


def three_tuple(model: nn.Module, batch: Any) -> tuple:
    return model(batch[0]), batch[1], None


def scalar_output(model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
    return model(batch[0]).sum(), batch[1]


def vector_output(model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
    return model(batch[0])[:, 0], batch[1]


ALL = ("exact", "sample", "empirical", "batched")
PER_EXAMPLE = ("exact", "sample", "empirical")
CASES = [
    Case("only-empty-batches", ALL, ConsolidationError, "no examples",
         batches=lambda: [data(0), data(0)]),
    Case("label-minus-one", ("empirical",), ConsolidationError,
         r"target \(label\) -1 is out of range for 3 classes", batches=lambda: labels([0, -1, 2])),
    Case("label-too-large", ("empirical",), ConsolidationError,
         r"target \(label\) 3 is out of range for 3 classes", batches=lambda: labels([0, 3, 2])),
    Case("output-detached", ALL, ConsolidationError, r"without an autograd graph.*detach",
         forward=detached),
    Case("forward-under-no-grad", ALL, ConsolidationError, r"without an autograd graph.*no_grad",
         forward=without_grad),
    Case("integer-output", ALL, ConsolidationError, r"output of dtype torch\.int64",
         forward=integer_output),
    Case("forward-returns-three", ALL, ConsolidationError,
         r"pair \(output, target\); got a tuple of length 3", forward=three_tuple),
    Case("output-0d", ALL, ConsolidationError, r"0-d output", forward=scalar_output),
    Case("output-1d-categorical", PER_EXAMPLE, ConsolidationError,
         r"output of shape \(4,\) has 1 dimension", forward=vector_output),
    Case("labels-wrong-length", ALL, ConsolidationError,
         r"target \(labels\) has 3 entries.*output has 4 examples",
         batches=lambda: [(data()[0], data()[1][:3])]),
    Case("criterion-none", ALL, UnsupportedCriterionError, r"`criterion` is None.*Sequential",
         criterion=None),
    Case("reduction-none-batched", ("batched",), UnsupportedCriterionError,
         r"scalar loss.*got \(4,\).*`reduction`='none'",
         criterion=nn.CrossEntropyLoss(reduction="none")),
    Case("empirical-without-targets", ("empirical",), ConsolidationError, r"needs targets",
         batches=lambda: [data()[0]]),
]  # fmt: skip
GRID = [(case, estimator) for case in CASES for estimator in case.estimators]


@pytest.mark.parametrize(("case", "estimator"), GRID, ids=[f"{c.id}-{e}" for c, e in GRID])
def test_bad_data_is_a_clear_error_and_leaves_the_state_unchanged(case: Case, estimator: str):
    reg, model = consolidated(estimator)
    before = snapshot(reg)
    with pytest.raises(case.error, match=case.match):
        reg.consolidate(model, case.batches(), case.criterion, forward=case.forward)
    assert reg.tasks == 1
    assert_unchanged(before, reg)


@pytest.mark.parametrize("estimator", ALL)
def test_an_empty_batch_in_the_middle_is_skipped(estimator: str):
    model = net()
    (x1, y1), (x2, y2) = data(4, seed=1), data(3, seed=2)
    empty = (x1[:0], y1[:0])
    torch.manual_seed(5)
    with_empty = EWC(1.0, fisher=estimator)
    report = with_empty.consolidate(model, [(x1, y1), empty, (x2, y2)], nn.CrossEntropyLoss())
    torch.manual_seed(5)
    without = EWC(1.0, fisher=estimator)
    without.consolidate(model, [(x1, y1), (x2, y2)], nn.CrossEntropyLoss())
    assert report.examples == 7 and report.batches == 2
    for name, value in without.state.importance.items():
        assert torch.equal(with_empty.state.importance[name], value), name


def test_a_misspelt_estimator_names_the_argument_and_the_valid_names():
    model = net()
    with pytest.raises(ValueError, match=r"`estimator`.*'exact', 'sample'.*'exakt'"):
        fisher_sums(model, dict(model.named_parameters()), [data()], nn.CrossEntropyLoss(),
                    estimator="exakt")  # fmt: skip
    from ewc.fisher import check_estimator

    assert check_estimator("sample") == "sample"
    with pytest.raises(ValueError, match=r"`fisher`.*None"):
        check_estimator(None)


def failing_loader(error: Exception) -> Iterator:
    yield data()
    raise error


@pytest.mark.parametrize("max_samples", [None, 6])
def test_a_loaders_error_propagates_and_is_not_called_a_max_samples_problem(max_samples):
    model = net()
    with pytest.raises(ValueError, match="shard 3 is corrupt") as info:
        fisher_sums(
            model,
            dict(model.named_parameters()),
            failing_loader(ValueError("shard 3 is corrupt")),
            nn.CrossEntropyLoss(),
            estimator="empirical",
            max_samples=max_samples,
        )
    assert not isinstance(info.value, EWCError)  # user code's error: the core wraps it
    reg = EWC(1.0, fisher="empirical", max_samples=max_samples)
    with pytest.raises((ValueError, ConsolidationError)) as info:
        reg.consolidate(model, failing_loader(ValueError("shard 3 is corrupt")),
                        nn.CrossEntropyLoss())  # fmt: skip
    assert "max_samples" not in str(info.value)
    original = info.value if not isinstance(info.value, EWCError) else info.value.__cause__
    assert isinstance(original, ValueError) and "shard 3 is corrupt" in str(original)
    assert reg.tasks == 0


def test_a_batch_that_cannot_be_cut_is_a_max_samples_error():
    model = net()
    with pytest.raises(ConsolidationError, match=r"max_samples=2.*type str"):
        fisher_sums(model, dict(model.named_parameters()), ["not a tensor batch"],
                    nn.CrossEntropyLoss(), estimator="empirical", max_samples=2,
                    forward=lambda m, b: (m(torch.zeros(1, 4)), None))  # fmt: skip


def test_errors_from_the_forward_propagate_unwrapped_from_fisher_sums():
    def broken(model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        raise TypeError("the user's forward is broken")

    model = net()
    with pytest.raises(TypeError, match="the user's forward is broken"):
        fisher_sums(model, dict(model.named_parameters()), [data()], nn.CrossEntropyLoss(),
                    estimator="exact", forward=broken)  # fmt: skip
