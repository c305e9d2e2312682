"""``ewc.adapters.loop.attach`` with Accelerate's real ``Accelerator`` and ``AcceleratedOptimizer``:
once per real optimizer step under ``accelerator.accumulate``, bf16 autocast, and no penalty on
a step the fp16 ``GradScaler`` skips."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

accelerate = pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

from ewc import EWC  # noqa: E402
from ewc.adapters.loop import attach, innermost_optimizer  # noqa: E402

pytestmark = pytest.mark.integration

LAMBDA = 50.0


class CountingEWC(EWC):
    """An EWC that counts how often its penalty gradient is applied."""

    calls = 0

    def penalty_grad_(self, model: nn.Module, **kwargs: object) -> Tensor | None:  # type: ignore[override]
        self.calls += 1
        return super().penalty_grad_(model, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def fresh_accelerator_state() -> Iterator[None]:
    """Accelerate keeps one process-wide state; each test builds its own Accelerator."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(seed: int, count: int = 6) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 6, generator=generator), torch.randint(0, 3, (4,), generator=generator))
        for _ in range(count)
    ]


def _consolidated(model: nn.Module) -> CountingEWC:
    reg = CountingEWC(LAMBDA)
    reg.consolidate(model, _batches(1), nn.CrossEntropyLoss())
    with torch.no_grad():  # move away from the anchor so that the penalty gradient is large
        for param in model.parameters():
            param.add_(0.2)
    return reg


def _reference(precision: str, accumulation: int, *, penalty: bool) -> nn.Module:
    """The same training written by hand: autocast, loss / k, penalty gradient once per k."""
    model = _model()
    reg = _consolidated(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for index, (x, y) in enumerate(_batches(2)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = nn.functional.cross_entropy(model(x), y)
        (loss / accumulation).backward()
        if (index + 1) % accumulation == 0:
            if penalty:
                reg.penalty_grad_(model)
            optimizer.step()
            optimizer.zero_grad()
    return model


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("accumulation", [1, 3])
def test_attach_to_an_accelerated_optimizer_adds_the_penalty_once_per_real_step(
    precision: str, accumulation: int
) -> None:
    accelerator = Accelerator(
        cpu=True, mixed_precision=precision, gradient_accumulation_steps=accumulation
    )
    model = _model()
    reg = _consolidated(model)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(optimizer, AcceleratedOptimizer)
    assert innermost_optimizer(optimizer) is optimizer.optimizer
    handle = attach(reg, model, optimizer)
    for x, y in _batches(2):
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.cross_entropy(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    handle.remove()

    assert reg.calls == 6 // accumulation  # once per real step, not per micro-batch
    want = _reference(precision, accumulation, penalty=True)
    without = _reference(precision, accumulation, penalty=False)
    for (name, got), expected in zip(model.named_parameters(), want.parameters()):
        torch.testing.assert_close(got, expected, msg=name)
    moved = max(float((a - b).abs().max()) for a, b in zip(want.parameters(), without.parameters()))
    assert moved > 1e-3  # the penalty mattered


def test_a_step_the_grad_scaler_skips_never_gets_the_penalty() -> None:
    Accelerator(cpu=True)  # the process state an AcceleratedOptimizer reads
    model = _model()
    reg = _consolidated(model)
    scale = 2.0**10
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = AcceleratedOptimizer(inner, scaler=torch.amp.GradScaler("cpu", init_scale=scale))
    attach(reg, model, optimizer)
    x, y = _batches(2, 1)[0]

    # a finite step: the penalty gradient lands on the unscaled task gradient
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(x), y)
    task_grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    optimizer.scaler.scale(loss).backward()
    optimizer.step()
    assert reg.calls == 1 and not optimizer.step_was_skipped
    reference = _model()
    with torch.no_grad():
        for param, value in zip(reference.parameters(), before):
            param.copy_(value)
            param.grad = None
    reg.penalty_grad_(reference)  # the penalty gradient alone, at the same weights
    reg.calls -= 1
    for param, old, grad, ref in zip(
        model.parameters(), before, task_grads, reference.parameters()
    ):
        assert ref.grad is not None and float(ref.grad.abs().max()) > 0.1
        torch.testing.assert_close(param.detach(), old - 0.1 * (grad + ref.grad))

    # an overflowing step: skipped by the scaler, so no penalty and no update
    optimizer.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.scaler.scale(nn.functional.cross_entropy(model(x * float("inf")), y)).backward()
    optimizer.step()
    assert optimizer.step_was_skipped
    assert reg.calls == 1
    for param, old in zip(model.parameters(), before):
        assert torch.equal(param.detach(), old)


def test_attach_refuses_an_object_that_wraps_no_optimizer() -> None:
    class NotAnOptimizer:
        optimizer = None

    with pytest.raises(TypeError, match="`optimizer`"):
        attach(EWC(1.0), _model(), NotAnOptimizer())
