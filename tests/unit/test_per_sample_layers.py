"""The per-layer ``torch.func`` step, shared and tied parameters, lazy signal sources, the public
rule registry and the fallback warning, all against the brute-force per-example reference."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import ewc
from ewc import EWC, FallbackWarning
from ewc._per_sample import squared_grad_sums
from ewc._per_sample.rules.registry import MATCHERS, RULES
from ewc._per_sample.signals import SignalSource, as_source
from tests.reference import brute_force_squared_grad_sums
from tests.unit.test_per_sample_rules import check, run_model, signal_maker


class Unusual(nn.Module):
    """One layer no rule knows: a learned gain and offset around a nonlinearity."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, features))
        self.offset = nn.Parameter(torch.linspace(-0.2, 0.3, features))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(x * self.gain) + self.offset


def test_one_unusual_layer_keeps_the_rest_on_rules() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.LayerNorm(6), Unusual(6), nn.Tanh(), nn.Linear(6, 3)
    ).double()
    paths = check(model, torch.randn(7, 4, dtype=torch.float64), signals=3)
    assert paths["2.gain"] == paths["2.offset"] == "layer:Unusual"
    assert paths["0.weight"] == paths["4.bias"] == "rule:Linear"
    assert paths["1.weight"] == "rule:LayerNorm"


class KeywordCall(nn.Module):
    """The unusual layer called with keyword arguments and a broadcast (unbatched) tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Unusual(3)
        self.fc = nn.Linear(3, 2)
        self.shift: Tensor
        self.register_buffer("shift", torch.tensor([[0.1, -0.2, 0.3]]))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.inner(x=x + self.shift))


def test_per_layer_step_takes_keyword_arguments() -> None:
    torch.manual_seed(0)
    paths = check(KeywordCall().double(), torch.randn(5, 3, dtype=torch.float64), signals=2)
    assert paths["inner.gain"] == "layer:Unusual"


class Centred(nn.Module):
    """Examples interact inside the module (a batch mean): the per-layer step must notice."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor([0.5, 1.5, -1.0]))

    def forward(self, x: Tensor) -> Tensor:
        return (x - x.mean(0, keepdim=True)) * self.gain


def test_per_layer_step_refuses_modules_where_examples_interact() -> None:
    """Outside the engine's contract (examples interact), so no reference to compare with: the
    per-layer step must see that its per-example outputs differ and leave the module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), Centred(), nn.Linear(3, 2)).double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    result = squared_grad_sums(model, dict(model.named_parameters()), x, run_model, signal_maker(2))
    assert result.paths["1.gain"] == "vmap"
    assert "examples interact" in result.reasons["1.gain"]
    assert result.paths["0.weight"] == "rule:Linear"


class RawAttention(nn.Module):
    """Attention with raw projection parameters through ``F.scaled_dot_product_attention`` and a
    padding mask given as a keyword (no rule: the per-layer step must run it under vmap)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv = nn.Parameter(torch.randn(3, width, width) / width**0.5)
        self.heads = 2

    def forward(self, x: Tensor, *, padding: Tensor) -> Tensor:
        n, length, width = x.shape
        q, k, v = (
            (x @ w).reshape(n, length, self.heads, -1).transpose(1, 2) for w in self.qkv.unbind(0)
        )
        mask = ~padding[:, None, None, :]  # (n, 1, 1, L): True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(n, length, width)


class AttentionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 4)
        self.attention = RawAttention(4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        padding = tokens == 0
        return self.head(self.attention(self.embed(tokens), padding=padding).mean(1))


def test_per_layer_step_runs_sdpa_with_a_mask() -> None:
    torch.manual_seed(0)
    tokens = torch.randint(1, 9, (4, 5))
    tokens[0, -2:] = 0  # padding
    paths = check(AttentionModel().double(), tokens, signals=3)
    assert paths["attention.qkv"] == "layer:RawAttention"
    assert paths["embed.weight"] == "rule:Embedding" and paths["head.weight"] == "rule:Linear"


class Recurrent(nn.Module):
    """A cell applied three times (shared weights) plus a tied read-out."""

    def __init__(self, width: int, vocabulary: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.cell = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.gate = Unusual(width)
        self.out = nn.Linear(width, vocabulary, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens).mean(1)
        for _ in range(3):
            h = self.gate(torch.tanh(self.cell(self.norm(h))))
        return self.out(h)


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 4),
    width=st.integers(2, 4),  # width 1: LayerNorm's weight has an exactly zero gradient
    vocabulary=st.integers(2, 5),
    length=st.integers(1, 3),
    signals=st.integers(1, 3),
    budget=st.sampled_from([1, 10_000, 2**28]),
)
def test_shared_and_tied_parameters_match_brute_force(
    n: int, width: int, vocabulary: int, length: int, signals: int, budget: int
) -> None:
    torch.manual_seed(n + 10 * width + 100 * vocabulary)
    model = Recurrent(width, vocabulary).double()
    tokens = torch.randint(0, vocabulary, (n, length))
    paths = check(model, tokens, signals=signals, budget=budget)
    assert paths["embed.weight"] == "rule:Embedding+rule:Linear"
    assert paths["cell.weight"] == "rule:Linear"
    assert paths["norm.weight"] == "layer:LayerNorm"  # called thrice, no per-example rule
    assert paths["gate.gain"] == "layer:Unusual"


class Positional(nn.Module):
    """Token and position embeddings, the positions looked up once as ``(1, L)`` ids."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(7, 4)
        self.positions = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: Tensor) -> Tensor:
        where = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.head(torch.tanh(self.tokens(ids) + self.positions(where))).sum(1)


def test_broadcast_position_ids_stay_on_the_embedding_rule() -> None:
    torch.manual_seed(0)
    paths = check(Positional().double(), torch.randint(0, 7, (4, 5)), signals=2)
    assert paths["positions.weight"] == "rule:Embedding"


class Squeezing(nn.Module):
    """The broadcast output is reshaped as if it had size 1 along dim 0: expanding it would
    break the forward, so the engine re-runs it without expanding (and falls back)."""

    def __init__(self) -> None:
        super().__init__()
        self.positions = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        table = self.positions(torch.arange(x.shape[1]).unsqueeze(0)).view(x.shape[1], 4)
        return self.head(torch.tanh(x + table)).sum(1)


def test_broadcast_expansion_is_undone_when_the_forward_needs_dim0_of_one() -> None:
    torch.manual_seed(0)
    paths = check(Squeezing().double(), torch.randn(3, 5, 4, dtype=torch.float64), signals=2)
    assert paths["positions.weight"] in ("vmap", "loop")
    assert paths["head.weight"] == "rule:Linear"


class CountingSource:
    """A lazy signal source that records every chunk asked of it."""

    def __init__(self, signals: Tensor) -> None:
        self.signals = signals
        self.asked: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return int(self.signals.shape[0])

    def chunk(self, start: int, stop: int) -> Tensor:
        self.asked.append((start, stop))
        return self.signals[start:stop]


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.gain = nn.Parameter(torch.tensor([0.7, -1.2, 2.0]))

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if float(h.detach().abs().max()) > 1e6:
            h = h / 1e6
        return torch.tanh(h) * self.gain


class WeightOutside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + F.linear(x.square(), self.fc.weight)


SOURCE_MODELS = {
    "rule": (lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)), "rule:Linear"),
    "layer": (lambda: nn.Sequential(nn.Linear(3, 3), Unusual(3)), "layer:Unusual"),
    "vmap": (WeightOutside, "vmap"),
    "loop": (DataDependent, "loop"),
}


@pytest.mark.parametrize("budget", [1, 2**28], ids=["tiny-budget", "large-budget"])
@pytest.mark.parametrize("case", sorted(SOURCE_MODELS))
def test_every_path_reads_a_lazy_source_in_chunks(case: str, budget: int) -> None:
    build, path = SOURCE_MODELS[case]
    torch.manual_seed(0)
    model = build().double().eval()
    params = dict(model.named_parameters())
    x = torch.randn(5, 3, dtype=torch.float64)
    plain = signal_maker(4)
    sources: list[CountingSource] = []

    def lazy(output: Tensor, target: Any) -> SignalSource:
        sources.append(CountingSource(plain(output, target)))
        return sources[-1]

    result = squared_grad_sums(model, params, x, run_model, lazy, memory_budget_bytes=budget)
    expected = brute_force_squared_grad_sums(model, params, x, run_model, plain)
    assert path in result.paths.values()
    for name in params:
        torch.testing.assert_close(result.sums[name], expected[name], rtol=1e-10, atol=1e-14)
        assert not result.sums[name].requires_grad
    asked = sources[0].asked
    assert asked and all(0 <= start < stop <= 4 for start, stop in asked)
    if budget == 1:  # a tiny budget: one signal at a time, never the whole set
        assert all(stop - start == 1 for start, stop in asked)


def test_as_source_wraps_tensors_and_refuses_other_things() -> None:
    source = as_source(torch.zeros(3, 2, 5))
    assert len(source) == 3 and source.chunk(1, 3).shape == (2, 2, 5)
    assert as_source(source) is source
    with pytest.raises(TypeError, match="chunk"):
        as_source([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        as_source(torch.zeros(3))


class Gain(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, features))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w


def test_public_register_rule_end_to_end() -> None:
    assert ewc.register_rule is ewc.rules.register_rule
    calls: list[int] = []

    def gain_rule(
        module: nn.Module, inputs: Any, grad_outputs: Tensor, names: Any, budget: int
    ) -> dict[str, Tensor]:
        calls.append(1)
        (x,) = inputs
        g = grad_outputs.to(ewc.rules.accumulator_dtype(x.dtype))
        return {"w": (g.square() * x.square()).sum((0, 1))}

    try:
        ewc.register_rule(Gain)(gain_rule)
        assert ewc.rules.rule_for(Gain(2)) is not None
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), Gain(4), nn.Tanh(), nn.Linear(4, 2)).double()
        paths = check(model, torch.randn(6, 3, dtype=torch.float64), signals=3)
        assert paths["1.w"] == "rule:Gain" and calls
    finally:
        RULES.pop(Gain, None)


def test_register_rule_by_structure() -> None:
    def matches(module: nn.Module) -> bool:
        return type(module).__name__ == "Gain" and hasattr(module, "w")

    def gain_rule(
        module: nn.Module, inputs: Any, grad_outputs: Tensor, names: Any, budget: int
    ) -> dict[str, Tensor]:
        (x,) = inputs
        return {"w": (grad_outputs.square() * x.square()).sum((0, 1))}

    with pytest.raises(ValueError, match="not both"):
        ewc.register_rule(Gain, matches=matches, name="Gain")
    with pytest.raises(ValueError, match="matches"):
        ewc.register_rule(matches=matches)
    ewc.register_rule(matches=matches, name="GainByName")(gain_rule)
    try:
        with pytest.raises(ValueError, match="already registered"):
            ewc.register_rule(matches=matches, name="GainByName")(gain_rule)
        torch.manual_seed(0)
        model = nn.Sequential(Gain(3), nn.Linear(3, 2)).double()
        paths = check(model, torch.randn(4, 3, dtype=torch.float64))
        assert paths["0.w"] == "rule:GainByName"
    finally:
        MATCHERS[:] = [(m, r) for m, r in MATCHERS if r.name != "GainByName"]


def test_one_fallback_warning_per_consolidation_naming_module_share_and_reason() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(WeightOutside(), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = EWC(1.0, fisher="empirical").consolidate(model, loader, nn.CrossEntropyLoss())
    fallbacks = [w for w in caught if issubclass(w.category, FallbackWarning)]
    assert len(fallbacks) == 1
    message = str(fallbacks[0].message)
    assert "0.fc (weight; 45.0%) on 'vmap'" in message
    assert "outside the calls" in message
    assert report.paths["0.fc.weight"] == "vmap" and report.paths["2.weight"] == "rule:Linear"


def test_no_fallback_warning_on_rules() -> None:
    model = nn.Sequential(nn.Linear(3, 4), Unusual(4), nn.Linear(4, 2))
    loader = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        EWC(1.0, fisher="exact").consolidate(model, loader, nn.CrossEntropyLoss())


class SharedInBatch(nn.Module):
    """The batch carries a tensor shared by all examples (no batch dim); the weight is also used
    outside its module, so the whole-model ``vmap`` computes it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, shift = batch
        return self.fc(x + shift) + F.linear(x.square(), self.fc.weight)


def test_whole_model_vmap_leaves_shared_batch_tensors_alone() -> None:
    torch.manual_seed(0)
    batch = (torch.randn(4, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64))
    paths = check(SharedInBatch().double(), batch, signals=2, budget=1)
    assert paths["fc.weight"] == "vmap"


def test_core_needs_no_transformers_for_its_hugging_face_rules() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('transformers', 'peft', 'torchvision'):\n"
        "    sys.modules[m] = None\n"
        "import torch, ewc\n"
        "from ewc.rules import rule_for\n"
        "assert rule_for(torch.nn.Linear(2, 2)) is not None\n"
        "assert 'transformers' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
