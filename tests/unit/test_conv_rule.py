"""The convolution rule's two exact methods (``gram`` and ``examples``) against brute force.

``tests/unit/test_per_sample_rules.py`` checks the rule through the engine with the method the
cost model picks; here each method is forced on the same grid of geometries (1-d to 3-d, stride,
string and integer padding, every padding mode, dilation, groups), with several signals and a
budget small enough to force chunking, and the choice itself is checked.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from ewc._per_sample import squared_grad_sums
from ewc._per_sample.rules import conv as conv_module
from ewc._per_sample.rules.conv import conv_rule, conv_weight_squared_sums, unfold_input
from tests.reference import brute_force_squared_grad_sums

FAST = settings(max_examples=25, deadline=None)
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol relative to the largest entry), as in ``test_per_sample_rules.py``."""
    return (1e-10, 1e-12) if dtype == torch.float64 else (1e-4, 1e-5)


@st.composite
def geometries(draw: Any) -> dict[str, Any]:
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 3]))
    kernel = draw(st.integers(1, 3 if dims < 3 else 2))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding: Any = draw(
        st.sampled_from(["valid", "same", 0, 1, 2] if stride == 1 else ["valid", 0, 1, 2])
    )
    smallest = max(3, dilation * (kernel - 1) + 1)  # a valid output; reflect padding < size
    return {
        "dims": dims,
        "groups": groups,
        "in_channels": groups * draw(st.integers(1, 2)),
        "out_channels": groups * draw(st.integers(1, 2)),
        "kernel": kernel,
        "stride": stride,
        "dilation": dilation,
        "padding": padding,
        "padding_mode": draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])),
        "size": draw(st.integers(smallest, smallest + (3 if dims < 3 else 1))),
        "bias": draw(st.booleans()),
        "n": draw(st.integers(1, 4)),
        "signals": draw(st.integers(1, 3)),
        "budget": draw(st.sampled_from([1, 512, 2**28])),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
    }


def build(case: dict[str, Any]) -> tuple[nn.Module, Tensor, Tensor]:
    """The convolution, an input batch and random output signals ``(K, n, O, *out)``."""
    torch.manual_seed(case["size"] + 10 * case["n"])
    conv = CONV[case["dims"]](
        case["in_channels"],
        case["out_channels"],
        case["kernel"],
        stride=case["stride"],
        padding=case["padding"],
        dilation=case["dilation"],
        groups=case["groups"],
        bias=case["bias"],
        padding_mode=case["padding_mode"],
    ).to(case["dtype"])
    x = torch.randn(
        case["n"], case["in_channels"], *[case["size"]] * case["dims"], dtype=case["dtype"]
    )
    with torch.no_grad():
        out = conv(x)
    signals = torch.randn(case["signals"], *out.shape, dtype=case["dtype"])
    return conv, x, signals


def reference(conv: nn.Module, x: Tensor, signals: Tensor) -> dict[str, Tensor]:
    params = dict(conv.named_parameters())
    return brute_force_squared_grad_sums(
        conv, params, x, lambda model, batch: (model(batch), None), lambda out, target: signals
    )


def assert_matches(result: Tensor, expected: Tensor, dtype: torch.dtype, name: str) -> None:
    rtol, atol = tolerances(dtype)
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(result.double(), expected, rtol=rtol, atol=atol * scale, msg=name)


@pytest.mark.parametrize("method", ["gram", "examples"])
@FAST
@given(case=geometries())
def test_each_method_matches_brute_force(method: str, case: dict[str, Any]) -> None:
    conv, x, signals = build(case)
    expected = reference(conv, x, signals)
    g = signals.reshape(*signals.shape[:3], -1)
    result = conv_weight_squared_sums(conv, x, g, case["budget"], method=method)  # type: ignore[arg-type]
    assert result.shape == conv.weight.shape
    assert result.dtype == case["dtype"]
    assert bool((result >= 0).all())
    assert_matches(result, expected["weight"], case["dtype"], f"{method} weight")


@FAST
@given(case=geometries())
def test_rule_matches_brute_force_with_the_chosen_method(case: dict[str, Any]) -> None:
    conv, x, signals = build(case)
    expected = reference(conv, x, signals)
    names = [name for name, _ in conv.named_parameters()]
    result = conv_rule(conv, (x,), signals, names, case["budget"])
    assert sorted(result) == sorted(names)
    for name in names:
        assert_matches(result[name], expected[name], case["dtype"], name)


@pytest.mark.parametrize("method", ["gram", "examples"])
def test_engine_path_with_each_method(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Through the engine (hooks, batched output gradients) with the cost model forced."""
    monkeypatch.setattr(conv_module, "GRAM_WEIGHT", 1e9 if method == "gram" else 0.0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, groups=2)
    ).double()
    model.eval()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    params = dict(model.named_parameters())

    def make(output: Tensor, target: Any) -> Tensor:
        generator = torch.Generator().manual_seed(1)
        return torch.randn((2, *output.shape), generator=generator, dtype=torch.float64)

    def run(model: nn.Module, batch: Any) -> tuple[Tensor, Any]:
        return model(batch), None

    result = squared_grad_sums(model, params, x, run, make)
    expected = brute_force_squared_grad_sums(model, params, x, run, make)
    for name in params:
        assert result.paths[name] == "rule:Conv2d"
        assert_matches(result.sums[name], expected[name], torch.float64, name)


@pytest.mark.parametrize(
    ("size", "signals", "expected"),
    [(1, 1, "gram"), (2, 1, "gram"), (8, 1, "examples"), (3, 10, "gram"), (8, 10, "examples")],
)
def test_cost_model_choice(
    monkeypatch: pytest.MonkeyPatch, size: int, signals: int, expected: str
) -> None:
    """Few output positions take the Gram path, many take per-example gradients; more signals
    move the boundary up (the Gram path's cost does not grow with them)."""
    calls: list[str] = []
    for method in ("gram", "examples"):
        original = getattr(conv_module, f"_by_{method}")

        def spy(*args: Any, method: str = method, original: Any = original) -> Tensor:
            calls.append(method)
            return original(*args)

        monkeypatch.setattr(conv_module, f"_by_{method}", spy)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, size, size)
    g = torch.randn(signals, 2, 4, size * size)
    conv_weight_squared_sums(conv, x, g, 2**28)
    assert calls == [expected]


def test_gram_never_negative_under_cancellation() -> None:
    """Per-example gradients that cancel to ~0 across positions stay >= 0 on the Gram path."""
    conv = nn.Conv1d(1, 1, 1, bias=False)
    x = torch.ones(4, 1, 3) * 1e3
    g = torch.tensor([1.0, -2.0, 1.0]).expand(1, 4, 1, 3).contiguous()  # sums to 0 exactly
    g = g + 1e-7 * torch.randn_like(g)
    result = conv_weight_squared_sums(conv, x, g, 2**28, method="gram")
    assert bool((result >= 0).all())


def test_unknown_method_is_an_error() -> None:
    conv = nn.Conv1d(1, 1, 1)
    with pytest.raises(ValueError, match=r"`method`.*'fast'"):
        conv_weight_squared_sums(
            conv, torch.ones(1, 1, 2), torch.ones(1, 1, 1, 2), 1, method="fast"
        )  # type: ignore[arg-type]


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_positions_first_layout(dims: int) -> None:
    conv = CONV[dims](4, 2, 2, stride=1, padding=1, dilation=2, groups=2, padding_mode="circular")
    x = torch.randn(3, 4, *[5] * dims)
    default = unfold_input(conv, x)
    assert torch.equal(unfold_input(conv, x, positions_first=True), default.permute(2, 0, 1))
