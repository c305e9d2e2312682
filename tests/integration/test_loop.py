"""The optimizer step pre-hook of :mod:`ewc.adapters.loop` against the penalty-in-the-loss loop."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from ewc import EWC
from ewc.adapters.loop import attach

pytestmark = pytest.mark.integration

Batches = list[tuple[Tensor, Tensor]]


def _data(seed: int, batches: int = 6, size: int = 8) -> Batches:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 6, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (size,), generator=generator),
        )
        for _ in range(batches)
    ]


def _consolidated(ewc_lambda: float = 50.0) -> tuple[nn.Module, EWC]:
    """A model trained a little on task A, and an EWC consolidated on it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    task_a = _data(1)
    for x, y in task_a:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    reg = EWC(ewc_lambda=ewc_lambda)
    reg.consolidate(model, task_a, nn.CrossEntropyLoss())
    return model, reg


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


def _train(
    model: nn.Module,
    batches: Batches,
    loss_of: Callable[[nn.Module, Tensor, Tensor, int], Tensor],
    *,
    accumulate: int = 1,
    hook_reg: EWC | None = None,
) -> dict[str, Tensor]:
    """SGD over ``batches``, one step per ``accumulate`` micro-batches; returns final weights."""
    optimizer = _optimizer(model)
    handle = attach(hook_reg, model, optimizer) if hook_reg is not None else None
    for index, (x, y) in enumerate(batches):
        micro = index % accumulate
        loss = loss_of(model, x, y, micro) / accumulate
        loss.backward()
        if micro == accumulate - 1:
            optimizer.step()
            optimizer.zero_grad()
    if handle is not None:
        handle.remove()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _task_loss(model: nn.Module, x: Tensor, y: Tensor, micro: int) -> Tensor:
    return nn.functional.cross_entropy(model(x), y)


def _max_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def test_hook_trains_to_the_weights_of_the_penalty_in_the_loss() -> None:
    model, reg = _consolidated()
    task_b = _data(2, batches=12)

    def with_penalty(model: nn.Module, x: Tensor, y: Tensor, micro: int) -> Tensor:
        return _task_loss(model, x, y, micro) + reg.penalty(model)

    reference = _train(copy.deepcopy(model), task_b, with_penalty)
    hooked = _train(copy.deepcopy(model), task_b, _task_loss, hook_reg=reg)
    unregularised = _train(copy.deepcopy(model), task_b, _task_loss)

    for name in reference:
        torch.testing.assert_close(hooked[name], reference[name], rtol=1e-12, atol=1e-12)
    # the penalty moved the weights: the comparison above can tell hook from no hook
    assert _max_difference(reference, unregularised) > 1e-3


def test_gradient_accumulation_applies_the_penalty_once_per_step() -> None:
    model, reg = _consolidated()
    task_b = _data(3, batches=12)
    k = 3

    def penalty_once(model: nn.Module, x: Tensor, y: Tensor, micro: int) -> Tensor:
        # the loop divides by k, so k * penalty on one micro-batch is the penalty once per step
        loss = _task_loss(model, x, y, micro)
        return loss + k * reg.penalty(model) if micro == 0 else loss

    def penalty_every_micro_batch(model: nn.Module, x: Tensor, y: Tensor, micro: int) -> Tensor:
        return _task_loss(model, x, y, micro) + k * reg.penalty(model)

    reference = _train(copy.deepcopy(model), task_b, penalty_once, accumulate=k)
    hooked = _train(copy.deepcopy(model), task_b, _task_loss, accumulate=k, hook_reg=reg)
    k_times = _train(copy.deepcopy(model), task_b, penalty_every_micro_batch, accumulate=k)

    for name in reference:
        torch.testing.assert_close(hooked[name], reference[name], rtol=1e-12, atol=1e-12)
    assert _max_difference(reference, k_times) > 1e-3


def test_autocast_bfloat16_on_cpu() -> None:
    model, reg = _consolidated()
    model = model.float()
    reg32 = EWC(ewc_lambda=reg.ewc_lambda)
    task_a = [(x.float(), y) for x, y in _data(1)]
    reg32.consolidate(model, task_a, nn.CrossEntropyLoss())
    task_b = [(x.float(), y) for x, y in _data(4, batches=8)]

    def autocast_loss(model: nn.Module, x: Tensor, y: Tensor, micro: int) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(x)
        assert output.dtype == torch.bfloat16
        return nn.functional.cross_entropy(output.float(), y)

    def autocast_loss_with_penalty(model: nn.Module, x: Tensor, y: Tensor, micro: int) -> Tensor:
        return autocast_loss(model, x, y, micro) + reg32.penalty(model)

    reference = _train(copy.deepcopy(model), task_b, autocast_loss_with_penalty)
    hooked = _train(copy.deepcopy(model), task_b, autocast_loss, hook_reg=reg32)
    unregularised = _train(copy.deepcopy(model), task_b, autocast_loss)

    for name in reference:
        assert hooked[name].dtype == torch.float32
        torch.testing.assert_close(hooked[name], reference[name], rtol=1e-5, atol=1e-6)
    assert _max_difference(reference, unregularised) > 1e-3


def test_grad_scaler_unscales_before_the_hook_adds_the_penalty() -> None:
    """``scaler.step`` unscales first, so a scaled loop equals the unscaled one (scale 2**10)."""
    model, reg = _consolidated()
    model = model.float()
    reg32 = EWC(ewc_lambda=reg.ewc_lambda)
    task_a = [(x.float(), y) for x, y in _data(1)]
    reg32.consolidate(model, task_a, nn.CrossEntropyLoss())
    task_b = [(x.float(), y) for x, y in _data(5, batches=8)]

    unscaled = _train(copy.deepcopy(model), task_b, _task_loss, hook_reg=reg32)

    scaled_model = copy.deepcopy(model)
    optimizer = _optimizer(scaled_model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
    with attach(reg32, scaled_model, optimizer):
        for x, y in task_b:
            optimizer.zero_grad()
            scaler.scale(nn.functional.cross_entropy(scaled_model(x), y)).backward()
            scaler.step(optimizer)
            scaler.update()
    assert scaler.get_scale() == 2.0**10
    for name, p in scaled_model.named_parameters():
        torch.testing.assert_close(p.detach(), unscaled[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("as_keyword", [False, True], ids=["positional", "keyword"])
def test_closure_steps_see_the_whole_objective(as_keyword: bool) -> None:
    """LBFGS with a line search evaluates the closure several times per step and reads its loss."""
    model, reg = _consolidated()
    x = torch.cat([x for x, _ in _data(6)])
    y = torch.cat([y for _, y in _data(6)])

    def fit(model: nn.Module, with_penalty: bool, hook: bool) -> dict[str, Tensor]:
        optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, line_search_fn="strong_wolfe")
        handle = attach(reg, model, optimizer) if hook else None

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if with_penalty:
                loss = loss + reg.penalty(model)
            loss.backward()
            return loss

        for _ in range(3):
            optimizer.step(closure=closure) if as_keyword else optimizer.step(closure)
        if handle is not None:
            handle.remove()
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    reference = fit(copy.deepcopy(model), with_penalty=True, hook=False)
    hooked = fit(copy.deepcopy(model), with_penalty=False, hook=True)
    unregularised = fit(copy.deepcopy(model), with_penalty=False, hook=False)
    for name in reference:
        torch.testing.assert_close(hooked[name], reference[name], rtol=1e-9, atol=1e-10)
    assert _max_difference(reference, unregularised) > 1e-3


def test_attaching_twice_to_one_optimizer_is_an_error_and_remove_allows_it_again() -> None:
    model, reg = _consolidated()
    optimizer = _optimizer(model)
    handle = attach(reg, model, optimizer)
    with pytest.raises(RuntimeError, match="already attached to optimizer SGD"):
        attach(reg, model, optimizer)
    handle.remove()
    handle.remove()  # idempotent
    attach(reg, model, optimizer).remove()


def test_removed_hook_no_longer_adds_the_penalty() -> None:
    model, reg = _consolidated()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # away from the anchor, so the penalty gradient is non-zero
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    handle = attach(reg, model, optimizer)
    optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    grads = [p.grad.clone() for p in model.parameters()]
    assert all(g.abs().sum() > 0 for g in grads)
    handle.remove()
    optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("args", "argument"),
    [
        (("reg", nn.Linear(1, 1), "opt"), "reg"),
        ((EWC(1.0), "model", "opt"), "model"),
        ((EWC(1.0), nn.Linear(1, 1), "opt"), "optimizer"),
    ],
)
def test_wrong_argument_types_name_the_argument(args: tuple[object, ...], argument: str) -> None:
    with pytest.raises(TypeError, match=f"`{argument}`"):
        attach(*args)  # type: ignore[arg-type]
