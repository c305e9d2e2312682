"""``ewc.optim.SGD``: the EWC penalty applied inside the optimizer's own pass over the weights.

``reg.penalty_grad_(model)`` followed by ``optimizer.step()`` walks the parameters twice: the
penalty reads ``grad``, ``A``, ``theta`` and ``m`` and writes ``grad``; then SGD reads ``theta``,
``grad`` (and its momentum buffer) and writes ``theta`` (and the buffer). :class:`SGD` does both in
one compiled pass per tensor (:func:`ewc._fused.fused_sgd_kernel`)::

    d = grad + 2 * ewc_lambda * A * (theta - m)       # the penalised gradient, never stored
    d = d + weight_decay * theta
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
* ``maximize=True`` is refused: the penalty is minimised, and ascending the penalised gradient
  would push the weights away from the consolidated ones.
* Combine it with nothing else that applies the penalty (``penalty_grad_``, ``reg.penalty`` in
  the loss, the loop adapter's hook): each would add it again.

Parameters the state does not hold (a new head) take the plain SGD step. When some consolidated
parameter cannot be read in one pass (grown since consolidation, an FSDP2 shard, off the CPU, or
a dtype other than the state's, a sparse gradient), the step is the two-pass equivalent with
torch's functional SGD, and every gradient of the model is put back afterwards, so the result and
the meaning of ``.grad`` do not depend on the path.

The kernel needs a C++ compiler and ninja (``pip install "ewc[fused]"``), like
``EWC(fused=True)``; it is built at construction (about 30 s the first time, then cached on disk).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import increment_version
from torch.optim.sgd import sgd

from ewc._fused import fused_sgd_kernel
from ewc._typing import short_repr
from ewc.aligned import AlignedState
from ewc.core import EWC, _check_module

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
        ValueError: ``maximize=True``, or an argument ``torch.optim.SGD`` refuses.
        RuntimeError: the compiled kernel cannot be built (no C++ compiler or ninja).

    Cost per step: one pass over each parameter reading ``theta``, ``grad``, the momentum buffer,
    ``A`` and ``m`` and writing ``theta`` and the buffer; no allocation after the first step
    unless a consolidated parameter has no gradient (it gets zeros, as with ``penalty_grad_``).

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
        _check_module(model)
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
        _refuse_maximize(self.param_groups)
        self._kernel = fused_sgd_kernel()
        self._view: AlignedState | None = None
        self._terms: dict[int, tuple[Tensor, Tensor]] | None = None  # of self._view
        self._warned_unrelated = False

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One SGD step on the penalised gradient (see the module docstring).

        Raises:
            ValueError: a parameter group has ``maximize=True`` while a task is consolidated.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        terms, scale = self._penalty_terms()
        if terms is None:
            self._two_pass_step()
            return loss
        work = self._prepared(terms)  # every check and allocation before any weight moves
        for param, grad, buffer, first, importance, centre, group in work:
            self._kernel(
                param.detach(),
                grad,
                buffer,
                first,
                importance,
                centre,
                scale,
                float(group["lr"]),
                float(group["weight_decay"]),
                float(group["momentum"]),
                float(group["dampening"]),
                bool(group["nesterov"]),
            )
            increment_version(param)  # written in place, as torch's own in-place ops record
            if buffer is not None:
                increment_version(buffer)
        return loss

    def _prepared(self, terms: dict[int, tuple[Tensor, Tensor]]) -> list[tuple[Any, ...]]:
        """Per parameter to step: ``(param, grad, buffer, first_step, A, m, group)``. A
        consolidated parameter without a gradient gets zeros (as ``penalty_grad_`` does)."""
        work = []
        penalised = 0
        for group in self.param_groups:
            momentum = float(group["momentum"])
            for param in group["params"]:
                importance, centre = terms.get(id(param), (None, None))
                penalised += importance is not None
                grad = param.grad
                if grad is None and importance is not None:
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
                work.append((param, grad, buffer, first, importance, centre, group))
        if terms and penalised == 0 and not self._warned_unrelated:
            self._warned_unrelated = True
            warnings.warn(
                "ewc.optim.SGD: none of this optimizer's parameters is a consolidated parameter "
                f"of `model` ({type(self.model).__name__}), so its steps apply no penalty; pass "
                "the model whose parameters the optimizer holds",
                stacklevel=3,
            )
        return work

    def _penalty_terms(self) -> tuple[dict[int, tuple[Tensor, Tensor]] | None, float]:
        """The single-pass terms by parameter and ``2 * ewc_lambda``; None when some parameter
        needs the two-pass step (the module docstring says which)."""
        reg = self.reg
        if reg.tasks == 0 or reg.ewc_lambda == 0.0:
            terms: dict[int, tuple[Tensor, Tensor]] | None = {}
        else:
            _refuse_maximize(self.param_groups)
            view = reg.state.bind(self.model, reuse=self._view)
            if view is not self._view:  # the terms follow from the view: read them once
                self._view, self._terms = view, view.whole_cpu_terms()
            terms = self._terms
        if terms is not None and not self._one_pass_fits():
            terms = None
        return terms, 2.0 * reg.ewc_lambda

    def _one_pass_fits(self) -> bool:
        """Whether every parameter, its gradient and its momentum buffer are dense float32 or
        float64 CPU tensors of one dtype, as the compiled pass reads them."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.device.type != "cpu" or param.dtype not in (torch.float32, torch.float64):
                    return False
                buffer = self.state.get(param, {}).get("momentum_buffer")
                if not (_like(param.grad, param) and _like(buffer, param)):
                    return False
        return True

    def _two_pass_step(self) -> None:
        """``penalty_grad_`` then torch's functional SGD on this optimizer's parameters, with
        every gradient of the model put back as it was (``penalty_grad_`` writes them all)."""
        params = {id(p): p for p in self.model.parameters()}
        params.update({id(p): p for group in self.param_groups for p in group["params"]})
        kept = {key: None if p.grad is None else p.grad.clone() for key, p in params.items()}
        try:
            self.reg.penalty_grad_(self.model)  # zero gradients where there were none
            for group in self.param_groups:
                stepped = [p for p in group["params"] if p.grad is not None]
                buffers = [self.state[p].get("momentum_buffer") for p in stepped]
                sgd(
                    stepped,
                    [p.grad for p in stepped],
                    buffers,
                    has_sparse_grad=any(p.grad.is_sparse for p in stepped),
                    foreach=False,
                    weight_decay=group["weight_decay"],
                    momentum=group["momentum"],
                    lr=group["lr"],
                    dampening=group["dampening"],
                    nesterov=group["nesterov"],
                    maximize=group["maximize"],
                )
                if group["momentum"] != 0:
                    for p, buffer in zip(stepped, buffers):
                        self.state[p]["momentum_buffer"] = buffer
        finally:
            mine = {id(p) for group in self.param_groups for p in group["params"]}
            for key, p in params.items():
                before = kept[key]
                if before is None and p.grad is not None:  # made by penalty_grad_
                    if key in mine:  # zeros, as on the single-pass path
                        p.grad.zero_()
                    else:
                        p.grad = None
                elif before is not None and p.grad is not None and before.layout == torch.strided:
                    p.grad.copy_(before)
                elif before is not None:
                    p.grad = before

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(reg=self.reg, model=self.model)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._kernel = fused_sgd_kernel()
        self._view = None
        self._terms = None
        self._warned_unrelated = False

    def __repr__(self) -> str:
        return super().__repr__().replace("SGD (", f"ewc.optim.SGD (reg={self.reg!r}, ", 1)


def _refuse_maximize(groups: list[dict[str, Any]]) -> None:
    if any(group["maximize"] for group in groups):
        raise ValueError(
            "ewc.optim.SGD: Expected argument `maximize` to be False (in every parameter group) "
            "but got maximize=True: the EWC penalty is minimised, and ascending the penalised "
            "gradient would push the weights away from the consolidated ones"
        )


def _like(tensor: Tensor | None, param: Tensor) -> bool:
    """``tensor`` is absent, or dense with ``param``'s device and dtype."""
    return tensor is None or (
        tensor.layout == torch.strided
        and tensor.device == param.device
        and tensor.dtype == param.dtype
    )
