"""Orchestration of the per-example engine: rule/fallback routing, weight sharing, the loop
fallback, budgets, the registry, all against the brute-force per-example reference."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc._per_sample import squared_grad_sums
from ewc._per_sample.rules import RULES, register_rule
from ewc._per_sample.workspace import Workspace
from tests.reference import brute_force_squared_grad_sums
from tests.unit.test_per_sample_rules import check, run_model, signal_maker


class Scaled(nn.Module):
    """A custom module with a raw parameter: no rule, so the fallback computes it."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, features))
        self.fc = nn.Linear(features, features)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc(x)) * self.scale


def test_mlp_with_inplace_relu_uses_linear_rule() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6),
        nn.ReLU(inplace=True),
        nn.Linear(6, 6),
        nn.ReLU(inplace=True),
        nn.Linear(6, 3),
    ).double()
    check(model, torch.randn(7, 5, dtype=torch.float64), signals=3, path="rule:Linear")


def test_small_cnn_float32() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 4),
    )
    paths = check(model, torch.randn(5, 1, 8, 8), signals=4)
    assert paths["0.weight"] == "rule:Conv2d" and paths["5.bias"] == "rule:Linear"


def test_one_workspace_serves_every_batch_of_a_pass_and_changes_no_result() -> None:
    """The signals' output gradients go to reused buffers (example-major for the conv rule):
    batches of two sizes, in one chunk of signals or several (a budget that fits two), each equal
    to the reference; one buffer per captured output, however the shapes vary."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    ).double()
    model.eval()
    params = dict(model.named_parameters())
    workspace = Workspace()
    batches = [torch.randn(size, 1, 6, 6, dtype=torch.float64) for size in (3, 5, 3)]
    per_signal = 5 * 8 * (3 * 36 + 4 * 36 + 3)  # output gradients of one signal, batch of 5
    for budget in (2**28, 2 * per_signal):  # all 3 signals in one chunk, then several chunks
        for seed, x in enumerate(batches):
            make = signal_maker(3, seed=seed)
            result = squared_grad_sums(
                model, params, x, run_model, make, memory_budget_bytes=budget, workspace=workspace
            )
            expected = brute_force_squared_grad_sums(model, params, x, run_model, make)
            assert result.paths["2.weight"] == "rule:Conv2d"
            for name in params:
                torch.testing.assert_close(result.sums[name], expected[name], rtol=1e-10, atol=0)
    assert len(workspace) == 3  # one per captured layer output


def test_mixed_rule_and_raw_parameter() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), Scaled(3), nn.Linear(3, 2)).double()
    paths = check(model, torch.randn(6, 4, dtype=torch.float64), signals=2)
    assert paths["1.scale"] == "layer:Scaled"  # the per-layer step, not the whole model
    assert paths["0.weight"] == paths["1.fc.weight"] == paths["2.bias"] == "rule:Linear"


class Shared(nn.Module):
    """The same Linear applied twice in one forward (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def test_module_called_twice_sums_per_example_before_squaring() -> None:
    torch.manual_seed(0)
    paths = check(Shared().double(), torch.randn(5, 3, dtype=torch.float64), signals=2)
    assert paths["inner.weight"] == paths["inner.bias"] == "rule:Linear"
    assert paths["head.weight"] == "rule:Linear"


class Tied(nn.Module):
    """An embedding whose weight is also the output projection (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.embed.weight
        self.mix = nn.Linear(3, 3)

    def forward(self, index: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mix(self.embed(index)))).sum(1)


def test_tied_weights_sum_every_use_before_squaring() -> None:
    torch.manual_seed(0)
    paths = check(Tied().double(), torch.randint(0, 5, (4, 3)), signals=2)
    assert paths["embed.weight"] == "rule:Embedding+rule:Linear"
    assert paths["mix.weight"] == "rule:Linear"


class UsesWeightOutside(nn.Module):
    """A parent that also uses its child's weight directly: the rule alone would miss a term."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + F.linear(x.square(), self.fc.weight)


def test_parameter_used_outside_its_module_goes_to_fallback() -> None:
    torch.manual_seed(0)
    paths = check(UsesWeightOutside().double(), torch.randn(4, 3, dtype=torch.float64))
    assert paths["fc.weight"] == "vmap"
    assert paths["fc.bias"] == "rule:Linear"  # used by its module only


class SequenceFirst(nn.Module):
    """A Linear fed (L, n, d): its dim 0 is not the batch, so no rule may read it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.transpose(0, 1)).sum(0)


def test_input_not_batched_along_dim0_goes_to_fallback() -> None:
    torch.manual_seed(0)
    paths = check(SequenceFirst().double(), torch.randn(4, 5, 3, dtype=torch.float64))
    assert paths["fc.weight"] == "vmap"


class DataDependent(nn.Module):
    """Python control flow on tensor values (an overflow guard): vmap cannot run it, the
    per-example loop can. The branch is the same per example and per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.gain = nn.Parameter(torch.tensor([0.7, -1.2, 2.0]))

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if float(h.detach().abs().max()) > 1e6:
            h = h / 1e6
        return torch.tanh(h) * self.gain


def test_vmap_failure_falls_back_to_loop() -> None:
    torch.manual_seed(0)
    paths = check(DataDependent().double(), torch.randn(5, 3, dtype=torch.float64), signals=2)
    assert paths["gain"] == "loop"


class InPlaceOnCaptured(nn.Module):
    """An in-place op on a tensor the fallback captures (vmap cannot write into it)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3))
        self.memory: Tensor
        self.register_buffer("memory", torch.zeros(3))

    def forward(self, x: Tensor) -> Tensor:
        self.memory.copy_(x[0].detach())  # buffer update: fails under vmap
        return x @ self.weight


def test_in_place_buffer_write_falls_back_to_loop() -> None:
    torch.manual_seed(0)
    paths = check(InPlaceOnCaptured().double(), torch.randn(4, 3, dtype=torch.float64))
    assert paths["weight"] == "loop"


class NoBatchRule(torch.autograd.Function):
    """An identity whose backward reads a Python number: no batched (vmapped) backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad * (1.0 + 0.0 * float(grad.abs().sum()))


def test_signals_loop_when_batched_backward_fails() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()

    def run(m: nn.Module, batch: Any) -> tuple[Tensor, Any]:
        return NoBatchRule.apply(m(batch)), None

    params = dict(model.named_parameters())
    x = torch.randn(5, 3, dtype=torch.float64)
    make = signal_maker(3)
    result = squared_grad_sums(model, params, x, run, make)
    expected = brute_force_squared_grad_sums(model, params, x, run, make)
    for name in params:
        assert result.paths[name] == "rule:Linear"
        torch.testing.assert_close(result.sums[name], expected[name], rtol=1e-10, atol=0)


def test_tiny_budget_chunks_signals_and_examples() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, 2), Scaled(2)
    ).double()
    paths = check(model, torch.randn(6, 2, 6, dtype=torch.float64), signals=3, budget=1)
    assert paths["4.scale"] == "layer:Scaled" and paths["0.weight"] == "rule:Conv1d"


def test_batch_norm_training_mode_is_not_a_rule() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    model.double().train()
    params = dict(model.named_parameters())
    x = torch.randn(3, 1, 3, 3, dtype=torch.float64)
    make = signal_maker(1)
    result = squared_grad_sums(model, params, x, run_model, make)
    assert result.paths["1.weight"] in ("vmap", "loop")
    assert result.paths["0.weight"] == "rule:Conv2d"


def test_subset_of_parameters_and_frozen_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    model.get_parameter("0.weight").requires_grad_(False)
    params = {name: model.get_parameter(name) for name in ("0.bias", "2.weight")}
    x = torch.randn(5, 3, dtype=torch.float64)
    make = signal_maker(2)
    result = squared_grad_sums(model, params, x, run_model, make)
    expected = brute_force_squared_grad_sums(model, params, x, run_model, make)
    assert set(result.sums) == set(params)
    for name in params:
        assert result.paths[name] == "rule:Linear"
        torch.testing.assert_close(result.sums[name], expected[name], rtol=1e-10, atol=0)


def test_paths_are_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Linear(3, 2), Scaled(2))
    with caplog.at_level(logging.DEBUG, logger="ewc"):
        squared_grad_sums(
            model, dict(model.named_parameters()), torch.randn(2, 3), run_model, signal_maker(1)
        )
    assert "0.weight via rule:Linear" in caplog.text
    assert "1.scale via layer:Scaled" in caplog.text


@pytest.mark.parametrize("budget", [0, -5, 1.5, True, "1GB"])
def test_memory_budget_is_validated(budget: Any) -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        squared_grad_sums(
            model,
            dict(model.named_parameters()),
            torch.randn(2, 2),
            run_model,
            signal_maker(1),
            memory_budget_bytes=budget,
        )


def test_registering_a_rule_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_rule(nn.Linear)
    with pytest.raises(ValueError, match="module_types"):
        register_rule(int)  # type: ignore[arg-type]

    class Custom(nn.Module):
        pass

    try:
        register_rule(Custom)(lambda *args: {})
        with pytest.raises(ValueError, match="Custom"):
            register_rule(Custom)
    finally:
        RULES.pop(Custom, None)


def test_hooks_are_removed_and_model_unchanged() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    squared_grad_sums(
        model, dict(model.named_parameters()), torch.randn(2, 3), run_model, signal_maker(1)
    )
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


class RoutedHeads(nn.Module):
    """A shared body and one head per task, routed by a data-dependent Python branch (like
    Avalanche's MultiTaskModule), so vmap cannot run it; only head ``task`` is used."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.heads = nn.ModuleList([nn.Linear(5, 2) for _ in range(3)])

    def forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, task = batch
        head = self.heads[int(task[0].item())]  # data-dependent: breaks vmap
        return head(torch.tanh(self.body(x)))


def test_parameters_outside_the_output_graph_are_zero_without_a_fallback_pass() -> None:
    torch.manual_seed(0)
    model = RoutedHeads().double()
    params = dict(model.named_parameters())
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.ones(6, dtype=torch.long))
    make = signal_maker(3)
    result = squared_grad_sums(model, params, batch, run_model, make)
    expected = brute_force_squared_grad_sums(model, params, batch, run_model, make)
    for name in params:
        torch.testing.assert_close(result.sums[name], expected[name], rtol=1e-10, atol=0)
    for name, path in result.paths.items():
        used = name.startswith(("body.", "heads.1."))
        assert path == ("rule:Linear" if used else "unused"), (name, path)
    assert torch.count_nonzero(result.sums["heads.0.weight"]) == 0


class _Transformer(nn.Module):
    """Token embedding, one transformer encoder layer with a key padding mask, a linear head."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embedding = nn.Embedding(11, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embedding(tokens)
        padding = tokens == 0
        if self.batch_first:
            x = self.layer(x, src_key_padding_mask=padding)
        else:
            x = self.layer(x.transpose(0, 1), src_key_padding_mask=padding).transpose(0, 1)
        return self.head(x.mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_layer_quietly_and_exactly(batch_first: bool) -> None:
    """Batch first: every parameter has a rule (attention included). Sequence first: the layer's
    inputs do not carry the examples along dim 0, so the whole layer takes the vmap fallback,
    without functorch's notice on batching attention's backward."""
    import warnings

    torch.manual_seed(0)
    model = _Transformer(batch_first).double()
    tokens = torch.randint(1, 11, (5, 4))
    tokens[0, 3] = 0  # one padded position
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = check(model, tokens, signals=3)
    inside = {
        "layer.self_attn.in_proj_weight": "rule:MultiheadAttention",
        "layer.self_attn.out_proj.weight": "rule:MultiheadAttention",
        "layer.linear1.weight": "rule:Linear",
        "layer.norm1.weight": "rule:LayerNorm",
    }
    for name, rule in inside.items():
        assert paths[name] == (rule if batch_first else "vmap"), name
    assert paths["embedding.weight"] == "rule:Embedding"
    assert paths["head.weight"] == "rule:Linear"
