"""``EWC(fused=True)``: the compiled single-pass CPU kernel of :mod:`ewc._fused`.

The kernel is built once per machine (about 20 s, then cached on disk by PyTorch). These tests
are skipped only where no C++ compiler or ninja exists; where they exist, a build failure fails.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ewc._fused
from ewc import EWC
from ewc.penalty import CPU_SMALL_ELEMENTS, add_penalty_grad_

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None or shutil.which("ninja") is None,
    reason="EWC(fused=True) builds a C++ kernel: needs a C++ compiler and ninja",
)


@pytest.fixture(scope="module")
def kernel() -> ewc._fused.FusedKernel:
    return ewc._fused.fused_kernel()


def wide(dtype: torch.dtype, inputs: int = 5, outputs: int = 3) -> nn.Sequential:
    """The middle weight (130 x 130) is above ``CPU_SMALL_ELEMENTS`` (the default path blocks
    it), the other tensors are small (the default path's multi-tensor pair); with the kernel,
    every tensor takes the kernel."""
    assert CPU_SMALL_ELEMENTS < 130 * 130
    return nn.Sequential(
        nn.Linear(inputs, 130), nn.Tanh(), nn.Linear(130, 130), nn.Tanh(), nn.Linear(130, outputs)
    ).to(dtype)


def consolidated(
    net: nn.Module, fused: bool, generator: torch.Generator, tasks: int = 3
) -> tuple[EWC, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The same state in a fused and a default regulariser; the model is moved off the anchor."""
    reg = EWC(3.0, fisher="empirical", fused=fused)
    dtype = next(net.parameters()).dtype
    batches = []
    for _ in range(tasks):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=generator).to(dtype))
        x = torch.randn(6, net[0].in_features, generator=generator).to(dtype)
        batches.append((x, torch.randint(0, 3, (6,), generator=generator)))
        reg.consolidate(net, batches[-1:], nn.CrossEntropyLoss())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator).to(dtype))
    return reg, batches


def grads_after(reg: EWC, net: nn.Module, start: list[torch.Tensor]) -> list[torch.Tensor]:
    for p, g in zip(net.parameters(), start):
        p.grad = g.clone()
    reg.penalty_grad_(net)
    return [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_penalty_grad_equals_autograd_of_the_penalty(kernel, dtype):
    generator = torch.Generator().manual_seed(0)
    net = wide(dtype)
    reg, _ = consolidated(net, True, generator)
    expected = torch.autograd.grad(reg.penalty(net), list(net.parameters()))
    start = [torch.zeros_like(p) for p in net.parameters()]
    for got, want in zip(grads_after(reg, net, start), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="bit-equality with addcmul_ holds where ATen uses FMA (AVX2/AVX512 builds)",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_and_default_paths_give_identical_gradients(kernel, dtype):
    generator = torch.Generator().manual_seed(1)
    net = wide(dtype)
    fused, _ = consolidated(net, True, generator)
    default = EWC(3.0, fisher="empirical")
    default.load_state_dict(fused.state_dict())
    start = [torch.randn(p.shape, generator=generator).to(dtype) for p in net.parameters()]
    for a, b in zip(grads_after(fused, net, start), grads_after(default, net, start)):
        assert torch.equal(a, b)
    got = float(fused.penalty_grad_(net, return_penalty=True))
    assert got == pytest.approx(float(default.penalty(net).detach()), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_scale_multiplies_the_gradient_not_the_value(kernel, dtype):
    """``penalty_grad_(scale=s)`` through the kernel: exactly ``s`` times for a power of two,
    to rounding otherwise; the returned penalty is the unscaled one."""
    generator = torch.Generator().manual_seed(6)
    net = wide(dtype)
    reg, _ = consolidated(net, True, generator)

    def added(**kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
        net.zero_grad(set_to_none=True)
        value = reg.penalty_grad_(net, return_penalty=True, **kwargs)
        assert value is not None
        return [p.grad.clone() for p in net.parameters()], value

    plain, plain_value = added()
    exact, exact_value = added(scale=1024.0)
    rounded, rounded_value = added(scale=1000.3)
    assert torch.equal(exact_value, plain_value) and torch.equal(rounded_value, plain_value)
    rtol = 1e-6 if dtype == torch.float32 else 1e-14
    for want, got_exact, got_rounded in zip(plain, exact, rounded):
        assert torch.equal(got_exact, want * 1024.0)
        torch.testing.assert_close(got_rounded, want * 1000.3, rtol=rtol, atol=0.0)


def test_fused_penalty_value_and_frozen_parameters(kernel):
    generator = torch.Generator().manual_seed(2)
    net = wide(torch.float64)
    reg, _ = consolidated(net, True, generator)
    net[0].requires_grad_(False)
    value = reg.penalty_grad_(net, return_penalty=True)
    assert net[0].weight.grad is None
    assert float(value) == pytest.approx(float(reg.penalty(net).detach()), rel=1e-12)
    expected = torch.autograd.grad(reg.penalty(net), net[2].weight)[0]
    torch.testing.assert_close(net[2].weight.grad, expected)


def test_grown_parameters_use_the_strided_loop(kernel):
    """A layer that gained inputs: the consolidated block ``grad[:, :130]`` is not contiguous."""
    generator = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(130, 130), nn.Tanh(), nn.Linear(130, 3)).double()
    reg, _ = consolidated(net, True, generator)
    grown = nn.Sequential(nn.Linear(134, 130), nn.Tanh(), nn.Linear(130, 5)).double()
    with torch.no_grad():
        for small, big in zip(net.parameters(), grown.parameters()):
            big[tuple(slice(0, n) for n in small.shape)] = small
    reg.penalty_grad_(grown)
    expected = torch.autograd.grad(reg.penalty(grown), list(grown.parameters()))
    for p, want in zip(grown.parameters(), expected):
        torch.testing.assert_close(p.grad, want)
    assert torch.count_nonzero(grown[0].weight.grad[:, 130:]) == 0
    assert torch.count_nonzero(grown[2].weight.grad[3:]) == 0


def test_bfloat16_gradients_fall_back_to_the_default_path(kernel):
    generator = torch.Generator().manual_seed(4)
    net = wide(torch.bfloat16)
    fused, _ = consolidated(net, True, generator)
    default = EWC(3.0, fisher="empirical")
    default.load_state_dict(fused.state_dict())
    start = [torch.zeros_like(p) for p in net.parameters()]
    for a, b in zip(grads_after(fused, net, start), grads_after(default, net, start)):
        assert a.dtype == torch.bfloat16
        assert torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 70),
    cols=st.integers(1, 70),
    grow_cols=st.integers(0, 3),
    scale=st.floats(1e-6, 1e6),
    threads=st.sampled_from([1, 2]),
    quadratic=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_the_formula(kernel, rows, cols, grow_cols, scale, threads, quadratic, seed):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    grad, param = rand(rows, cols + grow_cols), rand(rows, cols + grow_cols)
    importance, centre = rand(rows, cols).abs(), rand(rows, cols)
    start = grad.clone()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        value = kernel(grad[:, :cols], importance, param[:, :cols], centre, scale, quadratic)
    finally:
        torch.set_num_threads(previous)
    difference = param[:, :cols] - centre
    expected = start[:, :cols] + scale * importance * difference
    torch.testing.assert_close(grad[:, :cols], expected, rtol=1e-13, atol=1e-13 * scale)
    assert torch.equal(grad[:, cols:], start[:, cols:])
    want = float((importance * difference.square()).sum()) if quadratic else 0.0
    assert value == pytest.approx(want, rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_on_tensors_large_enough_to_run_in_parallel(kernel, threads):
    """Above ATen's grain size (32768 elements) the loop is split over the intra-op threads."""
    generator = torch.Generator().manual_seed(5)
    shape = (400, 300)
    grad, param, centre = (torch.randn(shape, generator=generator) for _ in range(3))
    importance = torch.rand(shape, generator=generator)
    start = grad.clone()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        value = kernel(grad, importance, param, centre, 2.0, True)
    finally:
        torch.set_num_threads(previous)
    difference = (param - centre).double()
    expected = start.double() + 2.0 * importance.double() * difference
    torch.testing.assert_close(grad.double(), expected, rtol=1e-6, atol=1e-5)
    want = float((importance.double() * difference.square()).sum())
    assert value == pytest.approx(want, rel=1e-6)


def test_add_penalty_grad_uses_the_kernel_for_every_dtype_matched_tensor(kernel):
    calls = []

    def counting(*args):
        calls.append((args[0].dtype, args[0].numel()))
        return kernel(*args)

    large = CPU_SMALL_ELEMENTS + 1
    sizes = (large, 3, large)
    dtypes = (torch.float32, torch.float32, torch.bfloat16)
    grads = [torch.zeros(n, dtype=d) for n, d in zip(sizes, dtypes)]
    params = [torch.ones(n, dtype=d) for n, d in zip(sizes, dtypes)]
    importances = [torch.full((n,), 2.0) for n in sizes]
    centres = [torch.zeros(n) for n in sizes]
    add_penalty_grad_(grads, params, importances, centres, 0.5, fused_kernel=counting)
    # small tensors take the kernel too (cheaper than the multi-tensor pair and its
    # temporaries); the bfloat16 gradient takes the default path
    assert calls == [(torch.float32, large), (torch.float32, 3)]
    assert all(bool((g.float() == 2.0).all()) for g in grads)


def test_fused_must_be_a_bool():
    with pytest.raises(TypeError, match=r"`fused`.*'yes'"):
        EWC(1.0, fused="yes")  # type: ignore[arg-type]


def test_a_failed_build_is_a_clear_error(monkeypatch, tmp_path):
    """A real build with no usable compiler, in an empty extension cache."""
    monkeypatch.setattr(ewc._fused, "_module", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match=r"fused=True.*C\+\+ compiler") as caught:
        EWC(1.0, fused=True)
    assert caught.value.__cause__ is not None


def test_a_pickled_fused_regulariser_works_in_a_fresh_process(kernel, tmp_path):
    """The kernel is not pickled (its module exists only where it was loaded): it is reloaded."""
    import pickle
    import subprocess
    import sys

    generator = torch.Generator().manual_seed(6)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    reg, _ = consolidated(net, True, generator)
    (tmp_path / "reg.pkl").write_bytes(pickle.dumps((reg, net)))
    expected = torch.autograd.grad(reg.penalty(net), list(net.parameters()))
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import pickle, torch
reg, net = pickle.loads(open({str(tmp_path / "reg.pkl")!r}, "rb").read())
assert reg.fused and reg._fused_kernel is not None, reg
reg.penalty_grad_(net)
for p, want in zip(net.parameters(), torch.load({str(tmp_path / "expected.pt")!r})):
    torch.testing.assert_close(p.grad, want)
print("ok", repr(reg))
"""
    command = [sys.executable, "-c", script]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "fused=True" in run.stdout
