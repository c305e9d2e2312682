"""The stored importance never carries an autograd graph, on every engine path.

Regression for a graph leaking from the ``torch.func`` paths: with rule-covered parameters that
still require grad, a ``vmap`` over ``functional_call`` recorded its computation on them, so the
sums (and then ``state.importance``) had ``requires_grad=True``. Then ``loss + reg.penalty(model)``
failed on the second step, the penalty's autograd gradient was wrong, and ``deepcopy`` raised.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc import EWC


class RawScale(nn.Module):
    """The issue's minimal case: a raw parameter in ``forward`` beside a rule-covered Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(x * self.scale))


class WeightOutside(nn.Module):
    """``fc.weight`` also used outside ``fc``'s call: only the whole-model ``vmap`` takes it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc(x) + F.linear(x.square(), self.fc.weight)))


class DataDependent(nn.Module):
    """A data-dependent branch in the module holding ``gain``: ``vmap`` fails, the loop runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.gain = nn.Parameter(torch.tensor([0.7, -1.2, 2.0]))

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if float(h.detach().abs().max()) > 1e6:
            h = h / 1e6
        return torch.tanh(h) * self.gain


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


CASES = {
    "rule": (_mlp, "0.weight", "rule:Linear"),
    "layer": (RawScale, "scale", "layer:RawScale"),
    "vmap": (WeightOutside, "fc.weight", "vmap"),
    "loop": (DataDependent, "gain", "loop"),
}


def _state_tensors(reg: EWC) -> list[Tensor]:
    found: list[Tensor] = []

    def visit(value: Any) -> None:
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(reg.state_dict())
    return found


@pytest.mark.filterwarnings("ignore::ewc.FallbackWarning")  # the vmap and loop cases
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_state_has_no_graph_and_the_penalty_trains(case: str, fisher: str) -> None:
    build, probe, path = CASES[case]
    torch.manual_seed(0)
    model = build()
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]
    criterion = nn.CrossEntropyLoss()
    reg = EWC(3.0, fisher=fisher, keep_importance_data=True)
    report = reg.consolidate(model, loader, criterion)
    assert report.paths[probe] == path  # the case exercises the path it names

    tensors = _state_tensors(reg)
    assert tensors
    for tensor in tensors:
        assert not tensor.requires_grad and tensor.grad_fn is None
    for tensor in (*reg.state.importance.values(), *reg.state.centre.values()):
        assert not tensor.requires_grad and tensor.grad_fn is None
    copy.deepcopy(reg)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):  # the second step failed when the state held a graph
        optimizer.zero_grad()
        loss = criterion(model(x), y) + reg.penalty(model)
        loss.backward()
        optimizer.step()

    model.zero_grad()
    reg.penalty(model).backward()
    for name, param in model.named_parameters():
        importance = reg.state.importance[name]
        centre = reg.state.centre[name]
        expected = 2 * 3.0 * importance * (param.detach() - centre)
        assert param.grad is not None
        torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-7)
    copy.deepcopy(reg)
