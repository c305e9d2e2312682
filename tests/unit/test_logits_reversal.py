"""EWC-DR's options: ``logits_reversal`` against a brute-force reference of the reversed loss
(per example for ``empirical``, per mini-batch for ``batched``) and the ``max_importance`` clamp.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from ewc import EWC, ConsolidationError

CrossEntropy = nn.CrossEntropyLoss()


def per_token_ce(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class TwoHeads(nn.Module):
    """A shared body and two heads; the batch picks none: head 0 only, head 1 never reaches
    the output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.heads = nn.ModuleList([nn.Linear(3 * 6, 4), nn.Linear(3 * 6, 4)])

    def forward(self, x: Tensor) -> Tensor:
        return self.heads[0](self.body(x))


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.norm(self.embed(tokens))))


def make_case(name: str) -> tuple[nn.Module, list[tuple[Tensor, ...]], Callable[..., Tensor]]:
    g = torch.Generator().manual_seed(0)
    criterion: Callable[..., Tensor] = CrossEntropy
    if name == "mlp-dropout":
        model: nn.Module = nn.Sequential(
            nn.Linear(5, 7), nn.Tanh(), nn.Dropout(0.5), nn.Linear(7, 3)
        )
        x, y = torch.randn(11, 5, generator=g), torch.randint(0, 3, (11,), generator=g)
    elif name == "conv1d-two-heads":
        model = TwoHeads()
        x, y = torch.randn(10, 1, 6, generator=g), torch.randint(0, 4, (10,), generator=g)
    elif name == "per-token-logits":
        model, criterion = Tokens(), per_token_ce
        x, y = torch.randint(0, 9, (7, 4), generator=g), torch.randint(0, 3, (7, 4), generator=g)
    else:
        raise KeyError(name)
    model = model.double()
    if x.is_floating_point():
        x = x.double()
    # uneven last batch and an ignored extra item (a task label)
    batches = [
        (x[i : i + 4], y[i : i + 4], torch.zeros(len(x[i : i + 4]))) for i in range(0, len(x), 4)
    ]
    return model, batches, criterion


CASES = ["mlp-dropout", "conv1d-two-heads", "per-token-logits"]


def reversed_reference(
    model: nn.Module,
    batches: list[tuple[Tensor, ...]],
    criterion: Callable[..., Tensor],
    estimator: str,
) -> dict[str, Tensor]:
    """EWC-DR's importance by its definition, in float64 with plain autograd.

    ``empirical``: ``mean_n (grad criterion(-f(x_n), y_n))^2``, one example at a time;
    ``batched``: ``mean_b (grad criterion(-f(X_b), Y_b))^2``, one mini-batch at a time.
    """
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0
    for x, y, _ in batches:
        pieces = (
            [(x, y)]
            if estimator == "batched"
            else [(x[i : i + 1], y[i : i + 1]) for i in range(len(x))]
        )
        for xs, ys in pieces:
            loss = criterion(-model(xs), ys)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for name, grad in zip(params, grads):
                if grad is not None:
                    total[name] += grad.double().square()
            count += 1
    return {name: value / count for name, value in total.items()}


@pytest.mark.parametrize("estimator", ["empirical", "batched"])
@pytest.mark.parametrize("case", CASES)
def test_reversed_importance_matches_brute_force(case: str, estimator: str) -> None:
    model, batches, criterion = make_case(case)
    reg = EWC(1.0, fisher=estimator, logits_reversal=True)
    model.train()
    reg.consolidate(model, batches, criterion)
    assert all(m.training for m in model.modules()), "training flags must be restored"
    expected = reversed_reference(model, batches, criterion, estimator)
    assert set(reg.state.importance) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(reg.state.importance[name], value, rtol=1e-9, atol=1e-12)
    # and it is not the ordinary estimate: the reversal changes the importance
    plain = EWC(1.0, fisher=estimator)
    plain.consolidate(model, batches, criterion)
    differs = [
        not torch.allclose(plain.state.importance[n], v, rtol=1e-3)
        for n, v in expected.items()
        if v.abs().sum() > 0
    ]
    assert any(differs)


def test_reversal_applies_to_a_custom_forward() -> None:
    model, batches, criterion = make_case("mlp-dropout")
    dict_batches = [{"x": x, "y": y} for x, y, _ in batches]
    reg = EWC(1.0, fisher="empirical", logits_reversal=True)
    reg.consolidate(model, dict_batches, criterion, forward=lambda m, b: (m(b["x"]), b["y"]))
    expected = reversed_reference(model, batches, criterion, "empirical")
    for name, value in expected.items():
        torch.testing.assert_close(reg.state.importance[name], value, rtol=1e-9, atol=1e-12)


def test_reversal_keeps_the_output_checks() -> None:
    model, batches, criterion = make_case("mlp-dropout")
    reg = EWC(1.0, fisher="batched", logits_reversal=True)
    with pytest.raises(ConsolidationError, match="tensor output"):
        reg.consolidate(model, batches, criterion, forward=lambda m, b: ({"logits": m(b[0])}, b[1]))
    assert reg.tasks == 0


@pytest.mark.parametrize("estimator", ["exact", "sample"])
def test_exact_and_sample_refuse_the_reversal(estimator: str) -> None:
    with pytest.raises(ValueError, match=r"logits_reversal.*" + estimator):
        EWC(1.0, fisher=estimator, logits_reversal=True)
    EWC(1.0, fisher=estimator, logits_reversal=False)  # the default is fine


@pytest.mark.parametrize("value", [1, "yes", None], ids=["int", "str", "None"])
def test_logits_reversal_must_be_a_bool(value: Any) -> None:
    with pytest.raises(TypeError, match=rf"`logits_reversal`.*{value!r}"):
        EWC(1.0, fisher="empirical", logits_reversal=value)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0.0, ValueError),
        (-1e-4, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (True, TypeError),
        ("1e-4", TypeError),
        (torch.tensor(1e-4), TypeError),
    ],
    ids=["zero", "negative", "nan", "inf", "bool", "str", "tensor"],
)
def test_max_importance_is_validated(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="`max_importance`") as info:
        EWC(1.0, max_importance=value)
    assert repr(value) in str(info.value)


def _fisher_of(
    model: nn.Module, batches: list, criterion: Callable[..., Tensor], **kw: Any
) -> dict:
    reg = EWC(1.0, **kw)
    reg.consolidate(model, batches, criterion)
    return reg.state.importance


@pytest.mark.parametrize("estimator", ["exact", "empirical", "batched"])
def test_max_importance_clamps_every_entry_of_the_estimate(estimator: str) -> None:
    model, batches, criterion = make_case("conv1d-two-heads")
    free = _fisher_of(model, batches, criterion, fisher=estimator)
    values = torch.cat([v.flatten() for v in free.values()])
    cap = float(values[values > 0].median())  # about half the non-zero entries are clamped
    capped = _fisher_of(model, batches, criterion, fisher=estimator, max_importance=cap)
    assert (values > cap).any() and ((values > 0) & (values < cap)).any()
    for name, value in free.items():
        assert torch.equal(capped[name], value.clamp(max=cap)), name


def test_max_importance_clamps_each_task_before_it_is_folded_in() -> None:
    g = torch.Generator().manual_seed(1)
    f1, f2 = (
        torch.rand(6, generator=g, dtype=torch.float64),
        torch.rand(6, generator=g, dtype=torch.float64),
    )
    a1, a2 = (
        torch.randn(6, generator=g, dtype=torch.float64),
        torch.randn(6, generator=g, dtype=torch.float64),
    )
    cap = 0.5
    online = EWC(1.0, "online", 0.5, max_importance=cap)
    online.add_task({"w": f1}, {"w": a1})
    online.add_task({"w": f2}, {"w": a2})
    # the decayed sum of the clamped Fishers, not the clamp of the decayed sum
    torch.testing.assert_close(
        online.state.importance["w"], 0.5 * f1.clamp(max=cap) + f2.clamp(max=cap)
    )
    separate = EWC(1.0, max_importance=cap, keep_importance_data=True)
    separate.add_task({"w": f1}, {"w": a1})
    separate.add_task({"w": f2}, {"w": a2})
    reference = EWC(1.0, keep_importance_data=True)
    reference.add_task({"w": f1.clamp(max=cap)}, {"w": a1})
    reference.add_task({"w": f2.clamp(max=cap)}, {"w": a2})
    for key in ("importance", "centre"):
        torch.testing.assert_close(
            getattr(separate.state, key)["w"], getattr(reference.state, key)["w"]
        )
    torch.testing.assert_close(separate.state.offset, reference.state.offset)
    assert torch.equal(separate.state.history[0]["fisher"]["w"], f1.clamp(max=cap))


def test_the_clamp_does_not_hide_invalid_importances() -> None:
    reg = EWC(1.0, max_importance=1e-4)
    for bad in (
        torch.tensor([math.inf, 1.0]),
        torch.tensor([math.nan, 1.0]),
        torch.tensor([-1.0, 1.0]),
    ):
        with pytest.raises(ValueError, match=r"non-finite|negative"):
            reg.add_task({"w": bad}, {"w": torch.zeros(2)})
    assert reg.tasks == 0


def test_options_are_not_part_of_the_state_dict() -> None:
    model, batches, criterion = make_case("mlp-dropout")
    dr = EWC(3.0, fisher="batched", logits_reversal=True, max_importance=1e-2)
    dr.consolidate(model, batches, criterion)
    saved = dr.state_dict()
    assert "logits_reversal" not in saved["config"] and "max_importance" not in saved["config"]
    plain = EWC(3.0, fisher="batched")  # loading does not depend on them
    plain.load_state_dict(saved)
    for name, value in dr.state.importance.items():
        assert torch.equal(plain.state.importance[name], value)
    torch.testing.assert_close(plain.penalty(model), dr.penalty(model))


def test_avalanche_plugin_passes_both_options_through() -> None:
    from tests import torchvision_shim

    torchvision_shim.apply()
    pytest.importorskip("avalanche")
    from ewc.adapters.avalanche import EWCPlugin

    model, batches, criterion = make_case("mlp-dropout")
    plugin = EWCPlugin(1.0, fisher="batched", logits_reversal=True, max_importance=1e-2)
    assert plugin.reg.logits_reversal and plugin.reg.max_importance == 1e-2
    dataset = torch.utils.data.TensorDataset(
        torch.cat([b[0] for b in batches]),
        torch.cat([b[1] for b in batches]),
        torch.zeros(11, dtype=torch.long),
    )
    importances = plugin.compute_importances(model, criterion, None, dataset, "cpu", 4)
    expected = reversed_reference(model, batches, criterion, "batched")
    for name, value in expected.items():
        torch.testing.assert_close(
            importances[name].data, value.clamp(max=1e-2), rtol=1e-9, atol=1e-12
        )
    plugin.update_importances(importances, 0)
    for name, value in expected.items():
        torch.testing.assert_close(
            plugin.reg.state.importance[name], value.clamp(max=1e-2), rtol=1e-9, atol=1e-12
        )
    with pytest.raises(ValueError, match="logits_reversal"):
        EWCPlugin(1.0, fisher="exact", logits_reversal=True)


def test_estimate_returns_the_reversed_clamped_fisher_and_adds_no_task() -> None:
    model, batches, criterion = make_case("conv1d-two-heads")
    expected = reversed_reference(model, batches, criterion, "empirical")
    values = torch.cat([v.flatten() for v in expected.values()])
    cap = float(values[values > 0].median())
    reg = EWC(1.0, fisher="empirical", logits_reversal=True, max_importance=cap)
    estimate = reg.estimate(model, batches, criterion)
    assert reg.tasks == 0
    for name, value in expected.items():
        torch.testing.assert_close(
            estimate.fisher[name], value.clamp(max=cap), rtol=1e-9, atol=1e-12
        )
    reg.add_task(estimate.fisher, estimate.anchor)  # clamping again changes nothing
    for name, value in estimate.fisher.items():
        assert torch.equal(reg.state.importance[name], value)
