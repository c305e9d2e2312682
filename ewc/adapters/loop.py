"""Attach the EWC penalty to a hand-written training loop without touching the loss.

:func:`attach` registers an optimizer *step pre-hook* that calls
:meth:`ewc.EWC.penalty_grad_` right before every ``optimizer.step()``. The penalty gradient is
therefore added exactly once per optimizer step, whatever the loop does before it:

* **gradient accumulation** over ``k`` micro-batches adds it once, not ``k`` times;
* **``torch.autocast``** does not see it: the closed-form gradient is computed in the state's
  dtype (float32 or wider) outside the autocast region;
* **``GradScaler``**: ``scaler.step(optimizer)`` unscales the gradients and checks them for
  inf/NaN *before* it calls ``optimizer.step()``, so the hook adds the penalty gradient to the
  unscaled gradients, and a skipped step (overflow) adds nothing;
* **gradient clipping** done by the loop before ``optimizer.step()`` sees only the task
  gradient; the penalty gradient is added after clipping;
* **closures** (``optimizer.step(closure)``, e.g. ``LBFGS``): the closure is wrapped so that each
  evaluation adds the penalty gradient after computing the task gradient, and returns the loss
  plus the penalty value.

**Optimizer wrappers** (Accelerate's ``AcceleratedOptimizer``, or any object exposing the
optimizer it wraps as ``.optimizer``) are unwrapped: the hook goes on the innermost
``torch.optim.Optimizer``, which the wrapper steps only on a real update. Under
``accelerator.accumulate(model)`` that is once per ``gradient_accumulation_steps`` micro-batches
(the wrapper's ``step()`` does nothing in between), and with Accelerate's fp16 ``GradScaler`` the
inner ``step`` runs after unscaling and not at all when the scaler skips the step for inf/NaN,
so a skipped step never gets the penalty.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from ewc import EWC
    >>> from ewc.adapters.loop import attach
    >>> model = nn.Linear(4, 3)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> reg = EWC(ewc_lambda=10.0)
    >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    >>> _ = reg.consolidate(model, data, nn.CrossEntropyLoss())
    >>> handle = attach(reg, model, optimizer)
    >>> for x, y in data:
    ...     optimizer.zero_grad()
    ...     nn.functional.cross_entropy(model(x), y).backward()
    ...     optimizer.step()  # adds d penalty / d theta to .grad first
    >>> handle.remove()
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from ewc.core import EWC
from ewc.optim import applies_penalty

__all__ = ["PenaltyHookHandle", "attach", "innermost_optimizer"]

_ATTACHED: weakref.WeakKeyDictionary[Optimizer, PenaltyHookHandle] = weakref.WeakKeyDictionary()


class PenaltyHookHandle:
    """Removable handle of an attached penalty hook; also a context manager.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from ewc import EWC
        >>> from ewc.adapters.loop import attach
        >>> model = nn.Linear(2, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with attach(EWC(ewc_lambda=1.0), model, optimizer):
        ...     pass  # the penalty is applied on every optimizer.step() in here
    """

    def __init__(self, optimizer: Optimizer, inner: RemovableHandle) -> None:
        self._optimizer = weakref.ref(optimizer)
        self._inner = inner
        self.removed = False

    def remove(self) -> None:
        """Detach the hook; calling it again does nothing."""
        if self.removed:
            return
        self._inner.remove()
        self.removed = True
        optimizer = self._optimizer()
        if optimizer is not None and _ATTACHED.get(optimizer) is self:
            del _ATTACHED[optimizer]

    def __enter__(self) -> PenaltyHookHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PenaltyHookHandle(removed={self.removed})"


def attach(reg: EWC, model: nn.Module, optimizer: Any) -> PenaltyHookHandle:
    """Apply ``reg``'s penalty gradient to ``model`` before every ``optimizer.step()``.

    Args:
        reg: the :class:`~ewc.EWC` regulariser; consolidate it as usual at the end of each task
            (the hook reads its state at every step, so later consolidations take effect).
        model: the model whose parameters ``reg`` regularises.
        optimizer: the optimizer stepping those parameters: a ``torch.optim.Optimizer`` or a
            wrapper exposing one as ``.optimizer`` (Accelerate's ``AcceleratedOptimizer``,
            ``transformers.Trainer.optimizer``); the hook is registered on the innermost one.

    Returns:
        a :class:`PenaltyHookHandle`; ``handle.remove()`` detaches the hook.

    Raises:
        TypeError: an argument is of the wrong type.
        ValueError: ``optimizer`` is an ``ewc.optim`` optimizer that applies ``reg``'s penalty in
            its own step (the hook would apply it twice).
        RuntimeError: a penalty hook is already attached to ``optimizer``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from ewc import EWC
        >>> from ewc.adapters.loop import attach
        >>> model = nn.Linear(4, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> handle = attach(EWC(ewc_lambda=5.0), model, optimizer)
        >>> handle.remove()
    """
    if not isinstance(reg, EWC):
        raise TypeError(f"Expected argument `reg` to be an ewc.EWC but got {reg!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected argument `model` to be a torch.nn.Module but got {model!r}")
    optimizer = innermost_optimizer(optimizer)
    _refuse_penalty_in_step(reg, optimizer)
    existing = _ATTACHED.get(optimizer)
    if existing is not None and not existing.removed:
        raise RuntimeError(
            f"an EWC penalty hook is already attached to optimizer {optimizer!r}; remove its "
            "handle first (attaching twice would apply the penalty twice per step)"
        )

    def step_pre_hook(_: Optimizer, args: Any, kwargs: Any) -> Any:
        # `args` is what `step` was called with, the optimizer itself first
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            reg.penalty_grad_(model)
            return None
        wrapped = _closure_with_penalty(reg, model, closure)
        if "closure" in kwargs:
            return args, {**kwargs, "closure": wrapped}
        return (args[0], wrapped, *args[2:]), kwargs

    handle = PenaltyHookHandle(optimizer, optimizer.register_step_pre_hook(step_pre_hook))
    _ATTACHED[optimizer] = handle
    return handle


def _refuse_penalty_in_step(reg: EWC, optimizer: Optimizer) -> None:
    """Raise if ``optimizer`` (innermost) already applies ``reg``'s penalty in its step.

    Raises:
        ValueError: it does; an adapter adding the penalty gradient too would apply it twice.
    """
    if applies_penalty(optimizer, reg):
        raise ValueError(
            f"Expected argument `optimizer` to be an optimizer without the EWC penalty but got "
            f"{type(optimizer).__name__} from ewc.optim, which applies this "
            "regulariser's penalty in its own step: use it without the adapter (or the adapter "
            "with a torch optimizer), or the penalty is applied twice per step"
        )


def innermost_optimizer(optimizer: Any) -> Optimizer:
    """The ``torch.optim.Optimizer`` that ``optimizer`` is or wraps (through ``.optimizer``).

    Accelerate's ``AcceleratedOptimizer`` subclasses ``Optimizer`` without initialising it (it
    has no step hooks of its own) and exposes the optimizer it wraps as ``.optimizer``; wrappers
    may nest.

    Raises:
        TypeError: no initialised ``torch.optim.Optimizer`` is found.
    """
    current, seen = optimizer, 0
    while not (isinstance(current, Optimizer) and hasattr(current, "_optimizer_step_pre_hooks")):
        inner = getattr(current, "optimizer", None)
        seen += 1
        if inner is None or inner is current or seen > 16:
            raise TypeError(
                "Expected argument `optimizer` to be a torch.optim.Optimizer or a wrapper "
                f"exposing one as `.optimizer` but got {optimizer!r}"
            )
        current = inner
    return current


def _closure_with_penalty(
    reg: EWC, model: nn.Module, closure: Callable[[], Any]
) -> Callable[[], Any]:
    """``optimizer.step(closure)`` evaluates the closure inside the step (LBFGS may do so several
    times): add the penalty gradient after each evaluation, and its value to the returned loss so
    that line searches see the whole objective."""

    def closure_with_penalty() -> Any:
        loss = closure()
        reg.penalty_grad_(model)
        if loss is None or reg.tasks == 0:
            return loss
        with torch.no_grad():
            return loss + reg.penalty(model)

    return closure_with_penalty
