"""The collapsed quadratic against the naive per-task sum, and the closed-form gradient."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ewc import EWC
from ewc.penalty import CPU_SMALL_ELEMENTS, add_penalty_grad_, merge_separate, pad_to
from ewc.store import ConsolidatedState


def naive_separate(params: dict[str, torch.Tensor], tasks: list[tuple[dict, dict]], lam: float):
    """Avalanche's definition: ``lam * sum_t sum_i F_t,i (theta_i - a_t,i)^2``, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for fisher, anchor in tasks:
        for name, theta in params.items():
            f = pad_to(fisher[name].double(), theta.shape)
            a = pad_to(anchor[name].double(), theta.shape)
            total = total + (f * (theta.double() - a).square()).sum()
    return lam * total


def random_task(
    shapes: dict[str, tuple[int, ...]],
    generator: torch.Generator,
    log_lo: float,
    log_hi: float,
    dtype: torch.dtype = torch.float64,
) -> tuple[dict, dict]:
    fisher, anchor = {}, {}
    for name, shape in shapes.items():
        exponent = torch.empty(shape, dtype=torch.float64).uniform_(
            log_lo, log_hi, generator=generator
        )
        fisher[name] = (10.0**exponent).to(dtype)
        anchor[name] = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return fisher, anchor


def collapse(tasks, mode="separate", decay=None, dtype=torch.float64) -> ConsolidatedState:
    state = ConsolidatedState()
    for fisher, anchor in tasks:
        state = state.with_task(
            {n: f.to(dtype) for n, f in fisher.items()},
            {n: a.to(dtype) for n, a in anchor.items()},
            mode=mode,
            decay_factor=decay,
            keep_history=False,
        )
    return state


def collapsed_value(state: ConsolidatedState, params: dict[str, torch.Tensor], lam: float):
    reg = EWC(lam)
    reg._set_state(state)
    module = nn.Module()
    for name, value in params.items():
        module.register_parameter(name, nn.Parameter(value.clone()))
    return reg.penalty(module)


def test_sixty_tasks_spanning_ten_decades_equal_the_naive_sum():
    generator = torch.Generator().manual_seed(0)
    shapes = {"w": (7, 5), "b": (5,)}
    tasks = [random_task(shapes, generator, -6.0, 4.0) for _ in range(60)]
    params = {
        n: torch.randn(s, generator=generator, dtype=torch.float64) for n, s in shapes.items()
    }
    state = collapse(tasks)
    expected = naive_separate(params, tasks, lam=3.0)
    got = collapsed_value(state, params, lam=3.0)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0.0)


def test_sixty_tasks_in_float32_storage_stay_within_float32_rounding():
    generator = torch.Generator().manual_seed(1)
    shapes = {"w": (6, 4)}
    tasks = [random_task(shapes, generator, -6.0, 4.0) for _ in range(60)]
    params = {"w": torch.randn(6, 4, generator=generator, dtype=torch.float64)}
    state = collapse(tasks, dtype=torch.float32)
    assert state.importance["w"].dtype == torch.float32
    assert state.offset.dtype == torch.float64
    expected = naive_separate(params, tasks, lam=1.0)
    got = collapsed_value(state, {"w": params["w"].float()}, lam=1.0)
    # float32 parameters and state: a few ulps of float32 on the total
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=0.0)


@settings(max_examples=40, deadline=None)
@given(
    task_count=st.integers(1, 60),
    rows=st.integers(1, 6),
    cols=st.integers(1, 6),
    log_lo=st.floats(-6, 0),
    span=st.floats(0, 10),
    lam=st.floats(0, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_collapsed_penalty_equals_naive_sum(task_count, rows, cols, log_lo, span, lam, seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"w": (rows, cols), "b": (cols,)}
    tasks = [random_task(shapes, generator, log_lo, log_lo + span) for _ in range(task_count)]
    params = {
        n: torch.randn(s, generator=generator, dtype=torch.float64) for n, s in shapes.items()
    }
    expected = naive_separate(params, tasks, lam)
    got = collapsed_value(collapse(tasks), params, lam)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-300)


def test_collapsed_penalty_equals_naive_sum_at_the_anchors():
    """At each anchor the per-task sum is a sum over the *other* tasks: r must carry it."""
    generator = torch.Generator().manual_seed(2)
    shapes = {"w": (3, 3)}
    tasks = [random_task(shapes, generator, -3, 3) for _ in range(5)]
    state = collapse(tasks)
    for _, anchor in tasks:
        expected = naive_separate(anchor, tasks, 1.0)
        torch.testing.assert_close(
            collapsed_value(state, anchor, 1.0), expected, rtol=1e-12, atol=0
        )


def test_zero_fisher_entries_take_the_anchor_and_add_nothing():
    importance = torch.tensor([0.0, 2.0])
    centre = torch.tensor([5.0, 1.0])
    fisher = torch.tensor([0.0, 0.0])
    anchor = torch.tensor([3.0, 4.0])
    merged, new_centre, delta = merge_separate(importance, centre, fisher, anchor)
    assert merged.tolist() == [0.0, 2.0]
    assert new_centre.tolist() == [3.0, 1.0]
    assert float(delta) == 0.0


@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("mode, decay", [("separate", None), ("online", 0.7)])
def test_penalty_grad_equals_autograd_of_penalty(mode, decay, scale):
    """``g + scale * dP/dtheta``: what backward of ``scale * P`` adds to existing gradients."""
    generator = torch.Generator().manual_seed(3)
    shapes = {"0.weight": (4, 3), "0.bias": (4,)}
    tasks = [random_task(shapes, generator, -2, 2, dtype=torch.float64) for _ in range(4)]
    model = nn.Sequential(nn.Linear(3, 4)).double()
    reg = EWC(2.5, mode=mode, decay_factor=decay)
    reg._set_state(collapse(tasks, mode, decay))
    expected = torch.autograd.grad(reg.penalty(model) * scale, list(model.parameters()))
    existing = [
        torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in model.parameters()
    ]
    for p, g in zip(model.parameters(), existing):
        p.grad = g.clone()
    reg.penalty_grad_(model, scale=scale)
    for p, g, e in zip(model.parameters(), existing, expected):
        torch.testing.assert_close(p.grad, g + e, rtol=1e-12, atol=1e-12)


def test_penalty_grad_creates_missing_grads_and_reuses_its_buffers():
    model = nn.Linear(3, 2)
    reg = EWC(1.0)
    reg.consolidate(model, [(torch.randn(4, 3), torch.randint(0, 2, (4,)))], nn.CrossEntropyLoss())
    with torch.no_grad():
        model.weight.add_(1.0)
    reg.penalty_grad_(model)
    assert model.weight.grad is not None and model.bias.grad is not None
    view = reg.state.bind(model)
    assert view.workspace is not None
    assert reg.state.bind(model, reuse=view) is view  # the same parameters: the same view
    buffer = reg._aligned.workspace.data_ptr()
    first = model.weight.grad.clone()
    model.zero_grad(set_to_none=False)
    reg.penalty_grad_(model)
    assert reg._aligned.workspace.data_ptr() == buffer
    torch.testing.assert_close(model.weight.grad, first)


def test_online_mode_follows_avalanche_recursion():
    """G <- decay * G + F (zero-padded when grown); the anchor is the latest weights."""
    generator = torch.Generator().manual_seed(4)
    decay = 0.6
    sizes = [3, 3, 5, 5]  # the head grows after task 2
    tasks = [random_task({"w": (s, 2)}, generator, -2, 2) for s in sizes]
    state = collapse(tasks, mode="online", decay=decay)
    expected_g = tasks[0][0]["w"]
    for fisher, _ in tasks[1:]:
        expected_g = decay * pad_to(expected_g, fisher["w"].shape) + fisher["w"]
    torch.testing.assert_close(state.importance["w"], expected_g, rtol=1e-14, atol=0)
    torch.testing.assert_close(state.centre["w"], tasks[-1][1]["w"], rtol=0, atol=0)
    assert float(state.offset) == 0.0
    theta = torch.randn(5, 2, dtype=torch.float64, generator=generator)
    expected = 1.5 * (expected_g * (theta - tasks[-1][1]["w"]).square()).sum()
    reg = EWC(1.5, mode="online", decay_factor=decay)
    reg._set_state(state)
    torch.testing.assert_close(collapsed_value(state, {"w": theta}, 1.5), expected)


def test_grown_parameter_is_penalised_only_on_its_consolidated_block():
    generator = torch.Generator().manual_seed(5)
    tasks = [random_task({"w": (3, 2)}, generator, -1, 1)]
    state = collapse(tasks)
    theta = torch.randn(5, 2, dtype=torch.float64, generator=generator)
    expected = naive_separate({"w": theta}, tasks, 1.0)
    torch.testing.assert_close(collapsed_value(state, {"w": theta}, 1.0), expected)
    # and the gradient of the new rows is exactly zero
    reg = EWC(1.0)
    reg._set_state(state)
    module = nn.Module()
    module.w = nn.Parameter(theta.clone())
    reg.penalty_grad_(module)
    assert torch.count_nonzero(module.w.grad[3:]) == 0
    grad = torch.autograd.grad(reg.penalty(module), module.w)[0]
    torch.testing.assert_close(module.w.grad, grad)


def test_penalty_is_zero_before_any_consolidation_and_differentiable_after():
    model = nn.Linear(3, 2)
    reg = EWC(10.0)
    value = reg.penalty(model)
    assert value.shape == () and float(value) == 0.0
    reg.penalty_grad_(model)
    assert model.weight.grad is None
    reg.consolidate(model, [(torch.randn(6, 3), torch.randint(0, 2, (6,)))], nn.CrossEntropyLoss())
    assert float(reg.penalty(model)) == 0.0
    with torch.no_grad():
        model.weight.add_(0.5)
    value = reg.penalty(model)
    assert value.requires_grad and float(value) > 0.0


def test_mixed_dtype_gradients_are_updated_per_tensor():
    grads = [torch.zeros(3, dtype=torch.bfloat16), torch.zeros(2)]
    params = [torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16), torch.tensor([1.0, -1.0])]
    importances = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0])]
    centres = [torch.zeros(3), torch.ones(2)]
    add_penalty_grad_(grads, params, importances, centres, 0.5, workspace=torch.empty(3))
    assert grads[0].dtype == torch.bfloat16
    assert grads[0].float().tolist() == [1.0, 4.0, 9.0]
    assert grads[1].tolist() == [0.0, -10.0]


@pytest.mark.parametrize(("block", "small"), [(1, 0), (7, 0), (30, 0), (64, 0), (7, 6), (64, 30)])
def test_blocked_gradient_equals_the_unblocked_formula(block, small):
    """Blocked (tensors above ``small`` elements) and multi-tensor (the rest) vs the formula."""
    generator = torch.Generator().manual_seed(6)
    shapes = [(5, 6), (30,), (2, 3, 4)]
    params = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    importances = [torch.rand(s, generator=generator, dtype=torch.float64) for s in shapes]
    centres = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    start = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    grads = [g.clone() for g in start]
    workspace = torch.full((min(block, 30),), math.nan, dtype=torch.float64)
    add_penalty_grad_(
        grads,
        params,
        importances,
        centres,
        1.5,
        workspace=workspace,
        block_elements=block,
        small_elements=small,
    )
    for g, g0, p, a, m in zip(grads, start, params, importances, centres):
        torch.testing.assert_close(g, g0 + 3.0 * a * (p - m), rtol=1e-14, atol=1e-14)


def test_non_contiguous_blocks_of_grown_parameters_are_handled():
    param = torch.randn(4, 6, dtype=torch.float64)
    grad = torch.zeros(4, 6, dtype=torch.float64)
    importance, centre = (
        torch.rand(4, 3, dtype=torch.float64),
        torch.randn(4, 3, dtype=torch.float64),
    )
    add_penalty_grad_(
        [grad[:, :3]],
        [param[:, :3]],
        [importance],
        [centre],
        1.0,
        workspace=torch.empty(12, dtype=torch.float64),
    )
    torch.testing.assert_close(grad[:, :3], 2.0 * importance * (param[:, :3] - centre))
    assert torch.count_nonzero(grad[:, 3:]) == 0


def test_penalty_grad_returns_the_penalty_value_from_the_same_pass():
    generator = torch.Generator().manual_seed(7)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5))
    reg = EWC(2.0)
    assert float(reg.penalty_grad_(net, return_penalty=True)) == 0.0  # nothing consolidated yet
    for _ in range(3):
        batch = (
            torch.randn(6, 3, generator=generator),
            torch.randint(0, 5, (6,), generator=generator),
        )
        reg.consolidate(net, [batch], nn.CrossEntropyLoss())
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    # a grown head and a frozen layer, as after adding classes and freezing a body
    grown = nn.Linear(4, 7)
    with torch.no_grad():
        grown.weight[:5] = net[1].weight
        grown.bias[:5] = net[1].bias
    net[1] = grown
    net[0].requires_grad_(False)
    expected = reg.penalty(net).double()
    value = reg.penalty_grad_(net, return_penalty=True)
    assert value is not None and value.dtype == torch.float64 and not value.requires_grad
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=0.0)
    assert reg.penalty_grad_(net) is None


@pytest.mark.parametrize("block", [1, 7, 64])
def test_blocked_quadratic_equals_the_penalty_sum(block):
    generator = torch.Generator().manual_seed(8)
    shapes = [(5, 6), (30,)]
    params = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    importances = [torch.rand(s, generator=generator, dtype=torch.float64) for s in shapes]
    centres = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    grads = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    workspace = torch.empty(min(block, 30), dtype=torch.float64)
    quadratic = add_penalty_grad_(
        grads,
        params,
        importances,
        centres,
        1.0,
        workspace=workspace,
        block_elements=block,
        small_elements=0,
        return_quadratic=True,
    )
    expected = sum((a * (p - m).square()).sum() for p, a, m in zip(params, importances, centres))
    torch.testing.assert_close(quadratic, expected, rtol=1e-13, atol=0.0)


# ---------------------------------------------------------------- scale (the fp16 loss scale)
def scaled_paths_operands(generator: torch.Generator):
    """Operands for every CPU path of ``add_penalty_grad_``: float32 tensors of at most ``small``
    elements (multi-tensor; with ``small=24`` the strided one too), contiguous ones above it
    (blocked), a non-contiguous block of a grown parameter and a bfloat16 gradient (unblocked)."""
    shapes = [(5, 6), (30,), (2, 3, 4), (4, 3), (7,)]
    params = [torch.randn(s, generator=generator) for s in shapes]
    params[3] = torch.randn(4, 6, generator=generator)[:, :3]  # grown: a strided block
    params[4] = params[4].bfloat16()
    importances = [torch.rand(s, generator=generator) for s in shapes]
    centres = [torch.randn(s, generator=generator) for s in shapes]
    return params, importances, centres


def added_gradient(params, importances, centres, *, block, small, **kwargs):
    """What ``add_penalty_grad_`` adds to zero gradients (grown ones: into a larger tensor)."""
    grads = [torch.zeros(p.shape, dtype=p.dtype) for p in params]
    grads[3] = torch.zeros(4, 6)[:, :3]
    quadratic = add_penalty_grad_(
        grads,
        params,
        importances,
        centres,
        1.5,
        workspace=torch.empty(min(block, 30)),
        block_elements=block,
        small_elements=small,
        return_quadratic=True,
        **kwargs,
    )
    return grads, quadratic


@pytest.mark.parametrize(("block", "small"), [(7, 0), (64, 0), (7, 24)])
@settings(max_examples=10, deadline=None)
@given(exponent=st.integers(-8, 24), seed=st.integers(0, 2**16))
def test_a_power_of_two_scale_adds_exactly_scale_times_the_gradient(block, small, exponent, seed):
    params, importances, centres = scaled_paths_operands(torch.Generator().manual_seed(seed))
    scale = 2.0**exponent
    plain, plain_quadratic = added_gradient(params, importances, centres, block=block, small=small)
    scaled, scaled_quadratic = added_gradient(
        params, importances, centres, block=block, small=small, scale=scale
    )
    for got, want in zip(scaled, plain):
        assert got.dtype == want.dtype
        assert torch.equal(got, want * scale)
    assert torch.equal(scaled_quadratic, plain_quadratic)  # the value is never scaled


@pytest.mark.parametrize(("block", "small"), [(7, 0), (64, 24)])
@pytest.mark.parametrize("scale", [1000.3, 3.0, 0.37])
def test_any_scale_multiplies_the_gradient_to_float32_rounding(block, small, scale):
    params, importances, centres = scaled_paths_operands(torch.Generator().manual_seed(9))
    plain, plain_quadratic = added_gradient(params, importances, centres, block=block, small=small)
    scaled, scaled_quadratic = added_gradient(
        params, importances, centres, block=block, small=small, scale=scale
    )
    for got, want in zip(scaled, plain):
        rtol = 1e-6 if got.dtype == torch.float32 else 2.0**-7  # bfloat16: 8 mantissa bits
        torch.testing.assert_close(got, want * scale, rtol=rtol, atol=0.0)
    assert torch.equal(scaled_quadratic, plain_quadratic)


def wide_consolidated(seed: int = 10) -> tuple[EWC, nn.Sequential]:
    """Two tasks, moved off the anchor; the middle weight (130 x 130) is above
    ``CPU_SMALL_ELEMENTS`` (the blocked path), the rest below it (the multi-tensor path)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(5, 130), nn.Tanh(), nn.Linear(130, 130), nn.Tanh(), nn.Linear(130, 3)
    )
    reg = EWC(3.0, fisher="empirical")
    for _ in range(2):
        batch = (
            torch.randn(6, 5, generator=generator),
            torch.randint(0, 3, (6,), generator=generator),
        )
        reg.consolidate(net, [batch], nn.CrossEntropyLoss())
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return reg, net


def penalty_grads(reg: EWC, net: nn.Module, **kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
    net.zero_grad(set_to_none=True)
    value = reg.penalty_grad_(net, return_penalty=True, **kwargs)
    assert value is not None
    return [p.grad.clone() for p in net.parameters()], value


@pytest.mark.parametrize("scale", [1024.0, 2.0**-3, 2.0**16])
def test_penalty_grad_with_a_power_of_two_scale_is_exact_and_returns_the_unscaled_penalty(scale):
    reg, net = wide_consolidated()
    assert any(p.numel() > CPU_SMALL_ELEMENTS for p in net.parameters())
    plain, plain_value = penalty_grads(reg, net)
    scaled, scaled_value = penalty_grads(reg, net, scale=scale)
    for got, want in zip(scaled, plain):
        assert torch.equal(got, want * scale)
    assert torch.equal(scaled_value, plain_value)
    torch.testing.assert_close(scaled_value, reg.penalty(net).detach().double(), rtol=1e-6, atol=0)


def test_penalty_grad_with_any_scale_is_scale_times_the_gradient():
    reg, net = wide_consolidated(seed=11)
    plain, plain_value = penalty_grads(reg, net)
    scaled, scaled_value = penalty_grads(reg, net, scale=1000.3)
    for got, want in zip(scaled, plain):
        torch.testing.assert_close(got, want * 1000.3, rtol=1e-6, atol=0.0)
    assert torch.equal(scaled_value, plain_value)


# ---------------------------------------------------------------- random models, every engine path
class ScaledInput(nn.Module):
    """``fc(tanh(x * scale))``: a raw parameter used in forward (the per-layer ``torch.func``
    step takes it)."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(features))
        self.fc = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(x * self.scale))


class WeightOutside(nn.Module):
    """``fc.weight`` also used outside ``fc``'s call: only the whole-model ``vmap`` takes it."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + torch.tanh(nn.functional.linear(x.square(), self.fc.weight))


class BufferWriting(ScaledInput):
    """Also writes a buffer in forward, which ``vmap`` refuses: the per-example loop."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__(features, classes)
        self.register_buffer("memory", torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.memory.copy_(x[0].detach())
        return super().forward(x)


def random_model(path: str, features: int, hidden: int, classes: int) -> nn.Module:
    if path == "rule":
        return nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes))
    if path == "layer":
        return ScaledInput(features, classes)
    if path == "vmap":
        return WeightOutside(features, classes)
    return BufferWriting(features, classes)


def naive_penalty(model: nn.Module, history, lam: float, mode: str, decay: float | None):
    """From the kept per-task ``(F_t, a_t)``: the per-task sum, or online's decayed sum."""
    params = {name: p.detach().double() for name, p in model.named_parameters()}
    if mode == "separate":
        tasks = [(entry["fisher"], entry["anchor"]) for entry in history]
        return naive_separate(params, tasks, lam)
    total = torch.zeros((), dtype=torch.float64)
    for name, theta in params.items():
        g = history[0]["fisher"][name].double()
        for entry in history[1:]:
            g = decay * g + entry["fisher"][name].double()
        total = total + (g * (theta - history[-1]["anchor"][name].double()).square()).sum()
    return lam * total


@pytest.mark.filterwarnings("ignore::ewc.FallbackWarning")  # the vmap and loop cases
@pytest.mark.parametrize("path", ["rule", "layer", "vmap", "loop"])
@settings(max_examples=12, deadline=None)
@given(
    features=st.integers(1, 4),
    hidden=st.integers(1, 4),
    classes=st.integers(2, 4),
    task_count=st.integers(1, 3),
    estimator=st.sampled_from(["exact", "sample", "empirical", "batched"]),
    online=st.booleans(),
    lam=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_models_penalty_equals_naive_sum_and_grad_equals_autograd(
    path, features, hidden, classes, task_count, estimator, online, lam, seed
):
    torch.manual_seed(seed)
    model = random_model(path, features, hidden, classes).double()
    mode, decay = ("online", 0.7) if online else ("separate", None)
    reg = EWC(lam, mode, decay, True, fisher=estimator)
    for _ in range(task_count):
        batches = [(torch.randn(5, features, dtype=torch.float64), torch.randint(0, classes, (5,)))]
        report = reg.consolidate(model, batches, nn.CrossEntropyLoss())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
    if estimator != "batched":  # the engine path this case is about was taken
        assert path in {v.split(":")[0] for v in report.paths.values()}, report.paths
    state_tensors = [*reg.state.importance.values(), *reg.state.centre.values(), reg.state.offset]
    assert not any(t.requires_grad or t.grad_fn is not None for t in state_tensors)

    value = reg.penalty(model)
    expected = naive_penalty(model, reg.state.history, lam, mode, decay)
    torch.testing.assert_close(value.detach(), expected, rtol=1e-9, atol=1e-12)

    autograd = torch.autograd.grad(value, list(model.parameters()))
    model.zero_grad(set_to_none=True)
    returned = reg.penalty_grad_(model, return_penalty=True)
    for p, want in zip(model.parameters(), autograd):
        torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(returned, expected, rtol=1e-9, atol=1e-12)

    # the penalty in the loss for two steps (a graph in the state would fail the second)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(5, features, dtype=torch.float64), torch.randint(0, classes, (5,))
    for _ in range(2):
        optimizer.zero_grad()
        (nn.functional.cross_entropy(model(x), y) + reg.penalty(model)).backward()
        optimizer.step()
    copy.deepcopy(reg)


def _grown_first_layer(net: nn.Sequential) -> None:
    with torch.no_grad():
        net[0].weight.data = torch.cat([net[0].weight, torch.ones(1, net[0].in_features)])
        net[0].bias.data = torch.cat([net[0].bias, torch.ones(1)])
        net[2].weight.data = torch.cat([net[2].weight, torch.ones(net[2].out_features, 1)], 1)


MUTATIONS = {
    "parameter replaced": lambda net: setattr(
        net[0], "weight", nn.Parameter(net[0].weight.detach() + 1.0)
    ),
    "module replaced": lambda net: net.__setitem__(2, nn.Linear(4, 2)),
    "module deleted": lambda net: net.__delitem__(2),
    "module set to None": lambda net: setattr(net, "2", None),
    "parameter deleted": lambda net: delattr(net[0], "bias"),
    "grown through .data": _grown_first_layer,
    "frozen": lambda net: net[0].weight.requires_grad_(False),
    "retyped": lambda net: net.double(),
    "module added": lambda net: net.add_module("extra", nn.Linear(2, 2)),
    "weights changed in place": lambda net: net[0].weight.data.add_(0.5),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_model_changed_after_a_call_is_seen_by_the_next_one_as_by_a_fresh_regulariser(
    mutation: str,
):
    """The view of the last call is reused only while every consolidated parameter is the same
    tensor at the same place with the same shape, dtype, device and flag: after any change the
    next call gives what a regulariser that never saw the model gives (values or error)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    reg = EWC(2.0, fisher="empirical")
    reg.consolidate(net, [(torch.randn(5, 3), torch.randint(0, 2, (5,)))], nn.CrossEntropyLoss())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3)
    reg.penalty_grad_(net)  # the view is cached
    MUTATIONS[mutation](net)
    fresh = EWC(2.0, fisher="empirical")
    fresh.load_state_dict(reg.state_dict())
    outcomes = []
    for regulariser in (reg, fresh):
        net.zero_grad(set_to_none=True)
        try:
            regulariser.penalty_grad_(net)
            value = regulariser.penalty(net).detach()
            outcomes.append(
                (
                    "ok",
                    value,
                    [None if p.grad is None else p.grad.clone() for p in net.parameters()],
                )
            )
        except Exception as error:  # the same error as a fresh regulariser
            outcomes.append((type(error).__name__, str(error), []))
    (kind, value, grads), (fresh_kind, fresh_value, fresh_grads) = outcomes
    assert kind == fresh_kind, (outcomes[0][:2], outcomes[1][:2])
    if kind == "ok":
        assert torch.equal(value, fresh_value)
        for mine, theirs in zip(grads, fresh_grads):
            assert (mine is None) == (theirs is None)
            if mine is not None:
                assert torch.equal(mine, theirs)
    else:
        assert value == fresh_value
