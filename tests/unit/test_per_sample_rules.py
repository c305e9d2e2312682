"""Each layer rule of the per-example engine against the brute-force per-example reference."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from ewc._per_sample import squared_grad_sums
from tests.reference import brute_force_squared_grad_sums

DTYPES = st.sampled_from([torch.float32, torch.float64])
FAST = settings(max_examples=12, deadline=None)


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol relative to the largest entry): float64 tight, float32 single-precision."""
    return (1e-10, 1e-12) if dtype == torch.float64 else (1e-4, 1e-5)


def run_model(model: nn.Module, batch: Any) -> tuple[Tensor, Any]:
    return model(batch), None


def signal_maker(count: int, seed: int = 0) -> Any:
    """Deterministic random signals: the reference recomputes them from its own forward."""

    def make(output: Tensor, target: Any) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((count, *output.shape), generator=generator, dtype=torch.float64).to(
            output.dtype
        )

    return make


def check(
    model: nn.Module,
    batch: Any,
    *,
    signals: int = 2,
    path: str | None = None,
    budget: int | None = None,
) -> dict[str, str]:
    """The engine's sums equal the reference's for every parameter; returns the paths."""
    model.eval()
    params = dict(model.named_parameters())
    dtype = next(iter(params.values())).dtype
    make = signal_maker(signals)
    kwargs = {} if budget is None else {"memory_budget_bytes": budget}
    result = squared_grad_sums(model, params, batch, run_model, make, **kwargs)
    expected = brute_force_squared_grad_sums(model, params, batch, run_model, make)
    rtol, atol = tolerances(dtype)
    for name in params:
        scale = float(expected[name].abs().max()) or 1.0
        torch.testing.assert_close(
            result.sums[name].double(), expected[name], rtol=rtol, atol=atol * scale, msg=name
        )
        if path is not None:
            assert result.paths[name] == path, (name, result.paths)
    with torch.no_grad():
        examples = run_model(model, batch)[0].shape[0]  # as the reference counts them
    assert result.examples == examples
    assert result.signals == signals
    return result.paths


@FAST
@given(
    n=st.integers(1, 5),
    fan_in=st.integers(1, 6),
    fan_out=st.integers(1, 6),
    bias=st.booleans(),
    signals=st.integers(1, 3),
    dtype=DTYPES,
)
def test_linear_2d(n: int, fan_in: int, fan_out: int, bias: bool, signals: int, dtype: Any) -> None:
    torch.manual_seed(n + 7 * fan_in)
    model = nn.Linear(fan_in, fan_out, bias=bias).to(dtype)
    check(model, torch.randn(n, fan_in, dtype=dtype), signals=signals, path="rule:Linear")


@FAST
@given(
    n=st.integers(1, 4),
    extra=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    bias=st.booleans(),
    signals=st.integers(1, 3),
    tiny_budget=st.booleans(),
    dtype=DTYPES,
)
def test_linear_sequence(
    n: int, extra: list[int], bias: bool, signals: int, tiny_budget: bool, dtype: Any
) -> None:
    torch.manual_seed(n)
    model = nn.Linear(3, 4, bias=bias).to(dtype)
    x = torch.randn(n, *extra, 3, dtype=dtype)
    check(model, x, signals=signals, path="rule:Linear", budget=1 if tiny_budget else None)


@st.composite
def conv_cases(draw: Any) -> dict[str, Any]:
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    kernel = draw(st.integers(1, 3 if dims < 3 else 2))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding: Any = draw(
        st.sampled_from(["valid", "same", 0, 1, 2] if stride == 1 else ["valid", 0, 1, 2])
    )
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    smallest = max(3, dilation * (kernel - 1) + 1)  # a valid output; reflect padding < size
    size = draw(st.integers(smallest, smallest + (2 if dims < 3 else 1)))
    return {
        "dims": dims,
        "groups": groups,
        "in_channels": groups * draw(st.integers(1, 2)),
        "out_channels": groups * draw(st.integers(1, 2)),
        "kernel": kernel,
        "stride": stride,
        "dilation": dilation,
        "padding": padding,
        "padding_mode": mode,
        "size": size,
        "bias": draw(st.booleans()),
        "n": draw(st.integers(1, 3)),
        "signals": draw(st.integers(1, 2)),
        "tiny_budget": draw(st.booleans()),
        "dtype": draw(DTYPES),
    }


@FAST
@given(case=conv_cases())
def test_conv(case: dict[str, Any]) -> None:
    torch.manual_seed(case["size"])
    conv_type = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[case["dims"]]
    model = conv_type(
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
    check(
        model,
        x,
        signals=case["signals"],
        path=f"rule:{conv_type.__name__}",
        budget=64 if case["tiny_budget"] else None,
    )


@FAST
@given(
    n=st.integers(1, 4),
    length=st.sampled_from([None, 1, 3, 6]),
    vocabulary=st.integers(2, 5),
    padding_idx=st.sampled_from([None, 0, -1]),
    signals=st.integers(1, 3),
    dtype=DTYPES,
)
def test_embedding(
    n: int, length: int | None, vocabulary: int, padding_idx: int | None, signals: int, dtype: Any
) -> None:
    torch.manual_seed(n * 11 + vocabulary)
    model = nn.Embedding(vocabulary, 3, padding_idx=padding_idx).to(dtype)
    shape = (n,) if length is None else (n, length)
    index = torch.randint(0, vocabulary, shape)  # a small vocabulary: indices repeat
    check(model, index, signals=signals, path="rule:Embedding")


def test_embedding_two_index_dims_repeat_within_example() -> None:
    model = nn.Embedding(4, 2).double()
    index = torch.tensor([[[1, 1], [1, 2]], [[3, 3], [0, 3]]])
    check(model, index, signals=2, path="rule:Embedding")


@FAST
@given(
    n=st.integers(1, 4),
    extra=st.lists(st.integers(1, 3), max_size=2),
    # one normalised element makes xhat == 0 exactly; autograd's backward then returns rounding
    # noise amplified by 1/sqrt(eps), which no tolerance can compare meaningfully
    normalized=st.lists(st.integers(1, 4), min_size=1, max_size=2).filter(
        lambda s: sum(s) > len(s)
    ),
    bias=st.booleans(),
    signals=st.integers(1, 3),
    dtype=DTYPES,
)
def test_layer_norm(
    n: int, extra: list[int], normalized: list[int], bias: bool, signals: int, dtype: Any
) -> None:
    torch.manual_seed(n + len(extra))
    model = nn.LayerNorm(normalized, bias=bias).to(dtype)
    with torch.no_grad():  # away from the (1, 0) initialisation
        model.weight.normal_()
    x = torch.randn(n, *extra, *normalized, dtype=dtype)
    check(model, x, signals=signals, path="rule:LayerNorm")


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="nn.RMSNorm needs torch >= 2.4")
@FAST
@given(n=st.integers(1, 4), extra=st.lists(st.integers(1, 3), max_size=1), dtype=DTYPES)
def test_rms_norm(n: int, extra: list[int], dtype: Any) -> None:
    torch.manual_seed(n)
    model = nn.RMSNorm(4, eps=1e-6).to(dtype)
    check(model, torch.randn(n, *extra, 4, dtype=dtype), path="rule:RMSNorm")


@FAST
@given(
    n=st.integers(1, 4),
    groups=st.sampled_from([1, 2, 4]),
    spatial=st.lists(st.integers(1, 3), max_size=2),
    signals=st.integers(1, 3),
    dtype=DTYPES,
)
def test_group_norm(n: int, groups: int, spatial: list[int], signals: int, dtype: Any) -> None:
    torch.manual_seed(n + groups)
    model = nn.GroupNorm(groups, 4).to(dtype)
    with torch.no_grad():
        model.weight.normal_()
        model.bias.normal_()
    check(
        model, torch.randn(n, 4, *spatial, 2, dtype=dtype), signals=signals, path="rule:GroupNorm"
    )


@FAST
@given(
    n=st.integers(1, 4),
    dims=st.sampled_from([0, 1, 2, 3]),
    affine_bias=st.booleans(),
    signals=st.integers(1, 3),
    dtype=DTYPES,
)
def test_batch_norm_eval(n: int, dims: int, affine_bias: bool, signals: int, dtype: Any) -> None:
    torch.manual_seed(n + dims)
    norm_type = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    model = norm_type(3).to(dtype)
    assert model.running_mean is not None and model.running_var is not None
    with torch.no_grad():
        model.running_mean.normal_()
        model.running_var.uniform_(0.5, 2.0)
        model.weight.normal_()
    x = torch.randn(n, 3, *[2] * dims, dtype=dtype)
    check(model, x, signals=signals, path=f"rule:{norm_type.__name__}")


class _Attention(nn.Module):
    """Wraps ``nn.MultiheadAttention`` so that a batch ``(query, key, value, padding)`` feeds it
    with the keyword arguments a transformer layer passes."""

    def __init__(self, attention: nn.MultiheadAttention, call: dict[str, Any]) -> None:
        super().__init__()
        self.attention = attention
        self.call = call

    def forward(self, batch: tuple[Tensor, ...]) -> Tensor:
        query, key, value, padding, per_head = batch
        kwargs = dict(self.call)
        if kwargs.pop("padding"):
            kwargs["key_padding_mask"] = padding
        if kwargs.pop("per_head"):  # (n, heads, L, S) in the batch, so the reference can slice it
            kwargs["attn_mask"] = per_head.reshape(-1, *per_head.shape[2:])
        if kwargs.pop("positional"):
            mask = kwargs.pop("key_padding_mask", None)
            return self.attention(query, key, value, mask, **kwargs)[0]
        return self.attention(query, key, value, **kwargs)[0]


@st.composite
def attention_cases(draw: Any) -> dict[str, Any]:
    heads = draw(st.sampled_from([1, 2]))
    embed = heads * draw(st.integers(1, 3))
    cross = draw(st.booleans())
    return {
        "n": draw(st.integers(1, 4)),
        "heads": heads,
        "embed": embed,
        "length": draw(st.integers(1, 4)),
        "source": draw(st.integers(1, 4)) if cross else None,
        "kdim": draw(st.sampled_from([None, embed + 1])) if cross else None,
        "vdim": draw(st.sampled_from([None, embed + 2])) if cross else None,
        "bias": draw(st.booleans()),
        "bias_kv": draw(st.booleans()),
        "zero_attn": draw(st.booleans()),
        "padding": draw(st.booleans()),
        "mask": draw(st.sampled_from([None, "bool", "float", "per-head", "causal"])),
        "need_weights": draw(st.booleans()),
        "positional": draw(st.booleans()),
        "signals": draw(st.integers(1, 3)),
        "tiny_budget": draw(st.booleans()),
    }


@settings(max_examples=40, deadline=None)
@given(case=attention_cases(), dtype=DTYPES)
def test_multihead_attention(case: dict[str, Any], dtype: Any) -> None:
    torch.manual_seed(case["n"] + 5 * case["embed"])
    embed, heads, n, length = case["embed"], case["heads"], case["n"], case["length"]
    source = case["source"] or length
    attention = nn.MultiheadAttention(
        embed,
        heads,
        bias=case["bias"],
        add_bias_kv=case["bias_kv"],
        add_zero_attn=case["zero_attn"],
        kdim=case["kdim"],
        vdim=case["vdim"],
        batch_first=True,
    ).to(dtype)
    if case["bias_kv"]:  # zero-initialised by default: make them matter
        with torch.no_grad():
            attention.bias_k.normal_()
            attention.bias_v.normal_()
    query = torch.randn(n, length, embed, dtype=dtype)
    if case["source"] is None:
        key = value = query
    else:
        key = torch.randn(n, source, case["kdim"] or embed, dtype=dtype)
        value = torch.randn(n, source, case["vdim"] or embed, dtype=dtype)
    padding = torch.zeros(n, source, dtype=torch.bool)
    padding[:, source - 1] = source > 1  # never mask every key of an example
    per_head = torch.randn(n, heads, length, source, dtype=dtype)
    call: dict[str, Any] = {
        "per_head": case["mask"] == "per-head",
        "padding": case["padding"],
        "positional": case["positional"],
        "need_weights": case["need_weights"],
    }
    mask = case["mask"]
    if mask == "bool":
        call["attn_mask"] = torch.triu(torch.ones(length, source, dtype=torch.bool), 1)
    elif mask == "float":
        call["attn_mask"] = torch.randn(length, source, dtype=dtype)
    elif mask == "causal" and length == source:
        call["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length, dtype=dtype)
        call["is_causal"] = True
    if (
        mask in ("float", "per-head", "causal")
        and call.get("attn_mask", per_head).is_floating_point()
    ):
        # the same mask type for both (torch deprecates mixing them)
        padding = torch.zeros(n, source, dtype=dtype).masked_fill(padding, float("-inf"))
    model = _Attention(attention, call)
    paths = check(
        model,
        (query, key, value, padding, per_head),
        signals=case["signals"],
        budget=1 if case["tiny_budget"] else None,
    )
    assert set(paths.values()) == {"rule:MultiheadAttention"}, paths


def test_multihead_attention_rule_is_not_used_where_it_does_not_hold() -> None:
    """Sequence-first layout, attention weights in the loss, dropout in training: fallbacks."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 4, dtype=torch.float64)

    class WeightsInLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(4, 2, batch_first=True).double()

        def forward(self, x: Tensor) -> Tensor:
            out, weights = self.attention(x, x, x)
            return out + weights.sum(-1, keepdim=True)

    paths = check(WeightsInLoss(), x, signals=2)
    assert paths["attention.in_proj_weight"] == "vmap"

    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(4, 2).double()

        def forward(self, x: Tensor) -> Tensor:
            seq = x.transpose(0, 1)
            return self.attention(seq, seq, seq)[0].transpose(0, 1)

    paths = check(SequenceFirst(), x, signals=2)
    assert paths["attention.in_proj_weight"] == "vmap"
