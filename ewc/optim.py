"""``ewc.optim.SGD``: the EWC penalty applied inside the optimizer's own pass over the weights.

``reg.penalty_grad_(model)`` followed by ``optimizer.step()`` walks the parameters twice: the
penalty reads ``grad``, ``A``, ``theta`` and ``m`` and writes ``grad``; then SGD reads ``theta``,
``grad`` (and its momentum buffer) and writes ``theta`` (and the buffer). :class:`SGD` does both in
one compiled pass per tensor (:func:`ewc._fused.fused_sgd_kernel`)::

    d = grad + 2 * ewc_lambda * A * (theta - m)       # the penalised gradient, never stored
    d = -d if maximize;  d = d + weight_decay * theta
    buf = d (first step) or momentum * buf + (1 - dampening) * d
    d = d + momentum * buf if nesterov else buf
    theta = theta - lr * d

which is ``torch.optim.SGD``'s step, in its order of operations, on the penalised gradient. The
penalty then costs two more arrays read in a pass that happens anyway (``A`` and ``m``) instead of
a pass of its own. Measured in ``benchmarks/penalty_cost.py`` (table ``penalty_vs_floor``).

Differences from ``penalty_grad_`` + ``torch.optim.SGD``, by design:

* ``.grad`` keeps the task gradient (the penalty's part is never written): gradient clipping or
  logging of ``.grad`` before the step sees the task gradient only. Use ``penalty_grad_`` where
  clipping must see the penalty (the Hugging Face adapter does).
* Results equal the two-pass reference to rounding (a few units in the last place; the
  penalised gradient is not rounded to storage in between), not bit for bit.

Parameters the state does not hold (a new head) take the plain SGD step. When some consolidated
parameter cannot be read in one pass (grown since consolidation, an FSDP2 shard, off the CPU, or
a dtype other than the state's), the step is the two-pass equivalent, with ``.grad`` restored
afterwards, so the result and the meaning of ``.grad`` do not depend on the path.

The kernel needs a C++ compiler and ninja (``pip install "ewc[fused]"``), like
``EWC(fused=True)``; it is built at construction (about 30 s the first time, then cached on disk).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ewc._fused import FusedSGDKernel, fused_sgd_kernel
from ewc._typing import short_repr
from ewc.aligned import AlignedState
from ewc.core import EWC

__all__ = ["SGD"]


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` whose step adds the gradient of ``reg.penalty(model)`` in its own pass.

    Args:
        params: as ``torch.optim.SGD`` (tensors or parameter groups).
        lr, momentum, dampening, weight_decay, nesterov, maximize: as ``torch.optim.SGD``
            (checked by it).
        reg: the :class:`~ewc.EWC` regulariser whose penalty is applied (read at every step, so
            consolidating more tasks or changing ``reg.ewc_lambda`` takes effect at once).
        model: the model whose parameters ``reg`` was consolidated on (DDP/compiled wrappers are
            unwrapped as everywhere in the package).

    Raises:
        TypeError: ``reg`` is not an :class:`~ewc.EWC` or ``model`` not an ``nn.Module``.
        RuntimeError: the compiled kernel cannot be built (no C++ compiler or ninja).

    Cost per step: one pass over each parameter reading ``theta``, ``grad``, the momentum buffer,
    ``A`` and ``m`` and writing ``theta`` and the buffer; no allocation after the first step.

    Example:
        >>> optimizer = ewc.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,  # doctest: +SKIP
        ...                           reg=reg, model=model)
        >>> loss_fn(model(x), y).backward(); optimizer.step()  # doctest: +SKIP
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        reg: EWC,
        model: nn.Module,
        maximize: bool = False,
    ) -> None:
        if not isinstance(reg, EWC):
            raise TypeError(f"Expected argument `reg` to be an ewc.EWC but got {short_repr(reg)}")
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Expected argument `model` to be a torch.nn.Module but got {short_repr(model)}"
            )
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=False,
        )
        self.reg = reg
        self.model = model
        self._kernel = _build_kernel()
        self._view: AlignedState | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One SGD step on the penalised gradient (see the module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        terms, scale = self._penalty_terms()
        if terms is None:
            self._two_pass_step()
            return loss
        for group in self.param_groups:
            lr = float(group["lr"])
            momentum = float(group["momentum"])
            for param in group["params"]:
                importance, centre = terms.get(id(param), (None, None))
                grad = param.grad
                if grad is None and importance is not None:  # as penalty_grad_: zeros
                    grad = param.grad = torch.zeros_like(param)
                if grad is None:
                    continue
                buffer, first = None, False
                if momentum != 0.0:
                    state = self.state[param]
                    buffer = state.get("momentum_buffer")
                    if buffer is None:
                        buffer = state["momentum_buffer"] = torch.empty_like(grad)
                        first = True
                self._kernel(
                    param.detach(),
                    grad,
                    buffer,
                    first,
                    importance,
                    centre,
                    scale,
                    lr,
                    float(group["weight_decay"]),
                    momentum,
                    float(group["dampening"]),
                    bool(group["nesterov"]),
                    bool(group["maximize"]),
                )
        return loss

    def _penalty_terms(self) -> tuple[dict[int, tuple[Tensor, Tensor]] | None, float]:
        """The single-pass terms by parameter and ``2 * ewc_lambda``; None when some parameter
        needs the two-pass step (the module docstring says which)."""
        reg = self.reg
        if reg.tasks == 0 or reg.ewc_lambda == 0.0:
            terms: dict[int, tuple[Tensor, Tensor]] | None = {}
        else:
            self._view = reg.state.bind(self.model, reuse=self._view)
            terms = self._view.whole_cpu_terms()
        if terms is not None and not self._one_pass_fits(terms):
            terms = None
        return terms, 2.0 * reg.ewc_lambda

    def _one_pass_fits(self, terms: dict[int, tuple[Tensor, Tensor]]) -> bool:
        for group in self.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if (
                    param.device.type != "cpu"
                    or grad.layout != torch.strided
                    or grad.device != param.device
                    or grad.dtype != param.dtype
                    or not param.dtype.is_floating_point
                    or param.dtype in (torch.float16, torch.bfloat16)
                ):
                    return False
                buffer = self.state[param].get("momentum_buffer") if param in self.state else None
                if buffer is not None and (
                    buffer.dtype != param.dtype or buffer.layout != grad.layout
                ):
                    return False
        return True

    def _two_pass_step(self) -> None:
        """``penalty_grad_`` then ``torch.optim.SGD.step``, with ``.grad`` put back as it was."""
        kept = {
            id(p): p.grad.clone()
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None and p.grad.layout == torch.strided
        }
        self.reg.penalty_grad_(self.model)  # creates zero gradients where there were none
        super().step()
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in kept:
                    p.grad.copy_(kept[id(p)])
                elif p.grad is not None:
                    p.grad.zero_()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(reg=self.reg, model=self.model)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._kernel = _build_kernel()
        self._view = None

    def __repr__(self) -> str:
        return super().__repr__().replace("SGD (", f"ewc.optim.SGD (reg={self.reg!r}, ", 1)


def _build_kernel() -> FusedSGDKernel:
    try:
        return fused_sgd_kernel()
    except RuntimeError as error:
        raise RuntimeError(
            f"ewc.optim.SGD: {error}. Use torch.optim.SGD with reg.penalty_grad_(model) before "
            "each step instead."
        ) from error.__cause__ or error
