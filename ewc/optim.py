"""``ewc.optim``: the EWC penalty applied inside the optimizer's own pass over the weights.

``reg.penalty_grad_(model)`` followed by ``optimizer.step()`` walks the parameters twice: the
penalty reads ``grad``, ``A``, ``theta`` and ``m`` and writes ``grad``; then the optimizer reads
``theta``, ``grad`` and its state and writes ``theta`` and its state. :class:`SGD` and
:class:`AdamW` do both in one compiled pass per tensor (:mod:`ewc._fused`). The penalised gradient
``d = grad + 2 * ewc_lambda * A * (theta - m)`` is formed in registers, never stored, and torch's
own update follows in its order of operations. For SGD::

    d = d + weight_decay * theta
    buf = d (first step) or momentum * buf + (1 - dampening) * d
    d = d + momentum * buf if nesterov else buf
    theta = theta - lr * d

for AdamW, at step ``t``::

    theta = theta * (1 - lr * weight_decay)
    exp_avg = lerp(exp_avg, d, 1 - beta1)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * d * d
    v = max(max_exp_avg_sq, exp_avg_sq) with amsgrad (stored back), else exp_avg_sq
    theta = theta - lr / (1 - beta1^t) * exp_avg / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The penalty then costs two more arrays read in a pass that happens anyway (``A`` and ``m``)
instead of a pass of its own. Measured in ``benchmarks/penalty_cost.py`` (tables
``penalty_in_sgd_step`` and ``penalty_in_adamw_step``).

Differences from ``penalty_grad_`` + the torch optimizer, by design:

* ``.grad`` keeps the task gradient (the penalty's part is never written): gradient clipping or
  logging of ``.grad`` before the step sees the task gradient only. Use ``penalty_grad_`` where
  clipping must see the penalty (the Hugging Face adapter does).
* Results equal the two-pass reference to rounding (a few units in the last place; the
  penalised gradient is not rounded to storage in between), not bit for bit. The optimizer state
  has torch's names and format (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq``), so a ``state_dict`` loads into the torch optimizer and back.
* ``maximize=True`` is refused: the penalty is minimised, and ascending the penalised gradient
  would push the weights away from the consolidated ones. So are AdamW's ``capturable`` and
  ``differentiable`` (CUDA graphs, and autograd through the step, which one compiled pass cannot
  record); ``foreach``/``fused`` do not exist here: the step is always the compiled pass.
* Combine it with nothing else that applies the penalty (``penalty_grad_``, ``reg.penalty`` in
  the loss, the loop adapter's hook): each would add it again.

Parameters the state does not hold (a new head) take the plain step. When some consolidated
parameter cannot be read in one pass (grown since consolidation, an FSDP2 shard, off the CPU, or
a dtype other than the state's, a sparse gradient), the step is the two-pass equivalent with
torch's functional SGD or Adam, and every gradient of the model is put back afterwards, so the
result and the meaning of ``.grad`` do not depend on the path.

The kernels need a C++ compiler and ninja (``pip install "ewc[fused]"``), like
``EWC(fused=True)``; they are built at construction (about 30 s the first time, then cached on
disk).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import increment_version
from torch.optim.adam import adam
from torch.optim.sgd import sgd

import ewc
from ewc import distributed as _distributed
from ewc._fused import fused_adamw_kernel, fused_sgd_kernel
from ewc._typing import short_repr
from ewc.aligned import AlignedState
from ewc.core import EWC, _check_module

__all__ = ["SGD", "AdamW", "applies_penalty"]

_Terms = dict[int, tuple[Tensor, Tensor]]
"""Per ``id(param)``: ``(A, m)`` of a consolidated parameter the compiled pass can read."""


class _PenaltyInStep(torch.optim.Optimizer):
    """What :class:`SGD` and :class:`AdamW` share: the terms read once per aligned view, the
    per-parameter work list, the two-pass fallback, the refused options and pickling. Placed
    before the torch optimizer in a subclass's bases; the subclass provides ``_state_of`` (its
    per-parameter state, allocated before any weight moves), ``_one_pass`` (the kernel call) and
    ``_functional_step`` (torch's functional step of one group, for the fallback)."""

    _NAME: str
    _STATE_KEYS: tuple[str, ...]  # the per-parameter state tensors the compiled pass reads
    _SPARSE_GRADIENTS: bool  # whether the torch optimizer takes sparse gradients
    _REFUSED = (("capturable", False), ("differentiable", False), ("foreach", False))
    """Parameter-group options that one compiled CPU pass cannot honour, with the one value
    accepted (None, torch's "default", is accepted too)."""

    def _attach(self, reg: EWC, model: nn.Module) -> None:
        self.reg = reg
        self.model = model
        self._refuse_maximize()
        self._kernel = self._build_kernel()
        self._view: AlignedState | None = None
        self._terms: _Terms | None = None  # of self._view
        self._warned_unrelated = False

    @staticmethod
    def _build_kernel() -> Callable[..., None]:
        raise NotImplementedError

    def _state_of(self, param: Tensor, grad: Tensor, group: dict[str, Any]) -> tuple[Any, ...]:
        raise NotImplementedError

    def _one_pass(
        self, param: Tensor, grad: Tensor, state: tuple[Any, ...], terms: tuple[Any, Any],
        scale: float, group: dict[str, Any],
    ) -> None:  # fmt: skip
        raise NotImplementedError

    def _fallback_state(self, group: dict[str, Any], stepped: list[Tensor]) -> Any:
        raise NotImplementedError

    def _functional_step(
        self, group: dict[str, Any], stepped: list[Tensor], grads: list[Tensor], state: Any
    ) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step on the penalised gradient (see the module docstring).

        Raises:
            ValueError: a parameter group has ``maximize=True`` (loaded with a state dict), or a
                state tensor's shape differs from its parameter's (another model's state).
            RuntimeError: a sparse gradient where the torch optimizer refuses one (AdamW).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._refuse_maximize()
        fits = self._inspect()  # raises on bad gradients or state, before anything is written
        terms, scale = self._penalty_terms(fits)
        if terms is None:
            self._two_pass_step()
            return loss
        work = self._prepared(terms)  # every check and allocation before any weight moves
        for param, grad, state, penalty, group in work:
            self._one_pass(param, grad, state, penalty, scale, group)
            increment_version(param)  # written in place, as torch's own in-place ops record
            for tensor in state:
                if isinstance(tensor, Tensor):
                    increment_version(tensor)
        return loss

    def _prepared(self, terms: _Terms) -> list[tuple[Any, ...]]:
        """Per parameter to step: ``(param, grad, state, (A, m), group)``. A consolidated
        parameter without a gradient gets zeros (as ``penalty_grad_`` does)."""
        work = []
        zeros = []
        penalised = 0
        for group in self.param_groups:
            for param in group["params"]:
                penalty = terms.get(id(param), (None, None))
                penalised += penalty[0] is not None
                grad = param.grad
                if grad is None and penalty[0] is not None:
                    grad = torch.zeros_like(param)
                    zeros.append((param, grad))
                if grad is None:
                    continue
                work.append((param, grad, self._state_of(param, grad, group), penalty, group))
        for param, grad in zeros:  # set only once nothing can fail any more
            param.grad = grad
        if terms and penalised == 0 and not self._warned_unrelated:
            self._warned_unrelated = True
            warnings.warn(
                f"{self._NAME}: none of this optimizer's parameters is a consolidated parameter "
                f"of `model` ({type(self.model).__name__}), so its steps apply no penalty; pass "
                "the model whose parameters the optimizer holds",
                stacklevel=_first_frame_outside(),
            )
        return work

    def _penalty_terms(self, fits: bool) -> tuple[_Terms | None, float]:
        """The single-pass terms by parameter and ``2 * ewc_lambda``; None when some parameter
        needs the two-pass step (``fits`` False, or the view says so: the module docstring
        says which)."""
        reg = self.reg
        if reg.tasks == 0 or reg.ewc_lambda == 0.0:
            terms: _Terms | None = {}
        else:
            view = reg.state.bind(self.model, reuse=self._view)
            if view is not self._view:  # the terms follow from the view: read them once
                self._view, self._terms = view, view.whole_cpu_terms()
            terms = self._terms
        return (terms if fits else None), 2.0 * reg.ewc_lambda

    def _inspect(self) -> bool:
        """One walk over the parameters: raise on what torch's optimizer refuses (a sparse
        gradient, for AdamW) and on state tensors that do not fit their parameter; return
        whether the compiled pass can read every parameter, gradient and state tensor (dense
        float32 or float64 CPU tensors of one dtype, no FSDP2 shard).

        Raises:
            RuntimeError: a sparse gradient where the torch optimizer refuses one.
            ValueError: a state tensor's shape differs from its parameter's.
        """
        sharded = _distributed.dtensors_in_use()  # one lookup unless DTensors can exist
        fits = True
        for group in self.param_groups:
            for param in group["params"]:  # a few microseconds each: property reads only
                grad = param.grad
                if grad is not None and grad.is_sparse and not self._SPARSE_GRADIENTS:
                    raise RuntimeError(
                        f"{self._NAME} does not support sparse gradients, but the parameter of "
                        f"shape {tuple(param.shape)} has one; use torch.optim.SparseAdam for it"
                    )
                shape, dtype = param.shape, param.dtype
                state = self.state.get(param)
                tensors = [state.get(key) for key in self._STATE_KEYS] if state else []
                for key, tensor in zip(self._STATE_KEYS, tensors):
                    if isinstance(tensor, Tensor) and tensor.shape != shape:
                        raise ValueError(
                            f"{self._NAME}: Expected the optimizer state `{key}` of the "
                            f"parameter of shape {tuple(shape)} to have that shape but got "
                            f"{tuple(tensor.shape)} (a state dict of another model?)"
                        )
                fits = (
                    fits
                    and param.is_cpu
                    and dtype in (torch.float32, torch.float64)
                    and not (sharded and _distributed.is_sharded(param))  # FSDP2: torch's step
                    and (grad is None or (_dense_cpu(grad, dtype) and grad.shape == shape))
                    and all(tensor is None or _dense_cpu(tensor, dtype) for tensor in tensors)
                )
        return fits

    def _two_pass_step(self) -> None:
        """``penalty_grad_`` then torch's functional step on this optimizer's parameters, with
        every gradient of the model put back as it was (``penalty_grad_`` writes them all)."""
        params = {id(p): p for p in self.model.parameters()}
        params.update({id(p): p for group in self.param_groups for p in group["params"]})
        kept = {key: None if p.grad is None else p.grad.clone() for key, p in params.items()}
        try:
            self.reg.penalty_grad_(self.model)  # zero gradients where there were none
            plan = []
            for group in self.param_groups:  # every state read (or created) before any step
                stepped = [p for p in group["params"] if p.grad is not None]
                plan.append((group, stepped, self._fallback_state(group, stepped)))
            for group, stepped, state in plan:
                self._functional_step(group, stepped, [p.grad for p in stepped], state)
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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As the torch optimizer's; a group asking for ``capturable``, ``differentiable``,
        ``foreach`` or ``fused`` is refused (the step is always the one compiled pass)."""
        for key, allowed in (*self._REFUSED, ("fused", False)):
            value = param_group.get(key)
            if value is not None and value != allowed:
                raise ValueError(
                    f"{self._NAME}: Expected parameter group option `{key}` to be {allowed} but "
                    f"got {value!r}: the step is one compiled CPU pass"
                )
        if param_group.get("maximize"):
            self._refuse_maximize([param_group])
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As the torch optimizer's; a state dict of torch's ``fused``/``foreach``/
        ``capturable`` optimizer loads with those mechanism options reset to this one's (its
        values are the same maths), and ``maximize=True`` in it is refused at the next step."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.update({key: value for key, value in self._REFUSED if key in group})
            if "fused" in group:
                group["fused"] = None

    def _refuse_maximize(self, groups: list[dict[str, Any]] | None = None) -> None:
        if any(
            group.get("maximize") for group in (self.param_groups if groups is None else groups)
        ):
            raise ValueError(
                f"{self._NAME}: Expected argument `maximize` to be False (in every parameter "
                "group) but got maximize=True: the EWC penalty is minimised, and ascending the "
                "penalised gradient would push the weights away from the consolidated ones"
            )

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "reg": self.reg, "model": self.model}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._kernel = self._build_kernel()
        self._view = None
        self._terms = None
        self._warned_unrelated = False

    def __repr__(self) -> str:
        torch_name = type(self).__name__
        return super().__repr__().replace(f"{torch_name} (", f"{self._NAME} (reg={self.reg!r}, ", 1)


def applies_penalty(optimizer: object, reg: EWC | None = None) -> bool:
    """Whether ``optimizer`` (or the optimizer it wraps as ``.optimizer``: Accelerate, Lightning)
    is an ``ewc.optim`` optimizer applying ``reg``'s penalty in its step (any ``reg`` if None).

    ``ewc.adapters.loop.attach`` refuses such an optimizer for the same ``reg`` (its hook would
    apply the penalty a second time); the Lightning and transformers callbacks then add none."""
    current: object = optimizer
    for _ in range(16):
        if isinstance(current, _PenaltyInStep):
            return reg is None or current.reg is reg
        inner = getattr(current, "optimizer", None)
        if inner is None or inner is current:
            return False
        current = inner
    return False


def _check_arguments(reg: object, model: object) -> None:
    if not isinstance(reg, EWC):
        raise TypeError(f"Expected argument `reg` to be an ewc.EWC but got {short_repr(reg)}")
    _check_module(model)


class SGD(_PenaltyInStep, torch.optim.SGD):
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

    _NAME = "ewc.optim.SGD"
    _STATE_KEYS = ("momentum_buffer",)
    _SPARSE_GRADIENTS = True

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
        _check_arguments(reg, model)
        torch.optim.SGD.__init__(  # the mixin has no __init__ of its own
            self,
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=False,
        )
        self._attach(reg, model)

    @staticmethod
    def _build_kernel() -> Callable[..., None]:
        return fused_sgd_kernel()

    def _state_of(self, param: Tensor, grad: Tensor, group: dict[str, Any]) -> tuple[Any, ...]:
        """``(momentum_buffer or None, first_step)``."""
        if float(group["momentum"]) == 0.0:
            return (None, False)
        state = self.state[param]
        buffer = state.get("momentum_buffer")
        if buffer is None:
            state["momentum_buffer"] = torch.empty_like(grad)
            return (state["momentum_buffer"], True)
        return (buffer, False)

    def _one_pass(
        self, param: Tensor, grad: Tensor, state: tuple[Any, ...], terms: tuple[Any, Any],
        scale: float, group: dict[str, Any],
    ) -> None:  # fmt: skip
        buffer, first = state
        self._kernel(
            param.detach(),
            grad,
            buffer,
            first,
            *terms,
            scale,
            float(group["lr"]),
            float(group["weight_decay"]),
            float(group["momentum"]),
            float(group["dampening"]),
            bool(group["nesterov"]),
        )

    def _fallback_state(self, group: dict[str, Any], stepped: list[Tensor]) -> Any:
        return [self.state[p].get("momentum_buffer") for p in stepped]

    def _functional_step(
        self, group: dict[str, Any], stepped: list[Tensor], grads: list[Tensor], state: Any
    ) -> None:
        buffers = state
        sgd(
            stepped,
            grads,
            buffers,
            has_sparse_grad=any(grad.is_sparse for grad in grads),
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


class AdamW(_PenaltyInStep, torch.optim.AdamW):
    """``torch.optim.AdamW`` whose step adds the gradient of ``reg.penalty(model)`` in its pass.

    The penalised gradient enters both moments, exactly as after ``penalty_grad_`` (the EWC
    penalty is part of the loss here, unlike the decoupled weight decay).

    Args:
        params: as ``torch.optim.AdamW`` (tensors or parameter groups).
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW`` (checked by
            it; a tensor ``lr`` or ``betas`` is read as its value at each step).
        reg: the :class:`~ewc.EWC` regulariser whose penalty is applied (read at every step).
        model: the model whose parameters ``reg`` was consolidated on.

    Raises:
        TypeError: ``reg`` is not an :class:`~ewc.EWC` or ``model`` not an ``nn.Module``.
        ValueError: ``maximize=True``, or an argument ``torch.optim.AdamW`` refuses.
        RuntimeError: the compiled kernel cannot be built (no C++ compiler or ninja).

    Cost per step: one pass over each parameter reading ``theta``, ``grad``, ``exp_avg``,
    ``exp_avg_sq`` (and ``max_exp_avg_sq``), ``A`` and ``m`` and writing ``theta`` and the
    moments; torch's single-tensor AdamW makes about nine passes over each parameter.

    Example:
        >>> optimizer = ewc.optim.AdamW(model.parameters(), lr=1e-3,  # doctest: +SKIP
        ...                             reg=reg, model=model)
    """

    _NAME = "ewc.optim.AdamW"
    _STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _SPARSE_GRADIENTS = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        reg: EWC,
        model: nn.Module,
        maximize: bool = False,
    ) -> None:
        _check_arguments(reg, model)
        torch.optim.AdamW.__init__(
            self,
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=False,
        )
        self._attach(reg, model)

    @staticmethod
    def _build_kernel() -> Callable[..., None]:
        return fused_adamw_kernel()

    def _state_of(self, param: Tensor, grad: Tensor, group: dict[str, Any]) -> tuple[Any, ...]:
        """``(step, exp_avg, exp_avg_sq, max_exp_avg_sq or None)``, created as torch does."""
        state = self.state[param]
        if len(state) == 0:
            double = torch.get_default_dtype() == torch.float64
            state["step"] = torch.tensor(0.0, dtype=torch.float64 if double else torch.float32)
            for key in self._STATE_KEYS[: 3 if group["amsgrad"] else 2]:
                state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        maximum = state["max_exp_avg_sq"] if group["amsgrad"] else None
        return (state["step"], state["exp_avg"], state["exp_avg_sq"], maximum)

    def _one_pass(
        self, param: Tensor, grad: Tensor, state: tuple[Any, ...], terms: tuple[Any, Any],
        scale: float, group: dict[str, Any],
    ) -> None:  # fmt: skip
        step, exp_avg, exp_avg_sq, maximum = state
        self._kernel(
            param.detach(),
            grad,
            exp_avg,
            exp_avg_sq,
            maximum,
            *terms,
            scale,
            *_adamw_scalars(group, float(step) + 1, param.dtype),
        )
        step += 1  # after the kernel, which checks the shapes before writing anything

    def _fallback_state(self, group: dict[str, Any], stepped: list[Tensor]) -> Any:
        return [self._state_of(p, p, group) for p in stepped]

    def _functional_step(
        self, group: dict[str, Any], stepped: list[Tensor], grads: list[Tensor], state: Any
    ) -> None:
        states = state
        beta1, beta2 = group["betas"]
        adam(
            stepped,
            grads,
            [s[1] for s in states],
            [s[2] for s in states],
            [s[3] for s in states] if group["amsgrad"] else [],
            [s[0] for s in states],
            foreach=False,
            decoupled_weight_decay=True,
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )


def _adamw_scalars(group: dict[str, Any], step: float, dtype: torch.dtype) -> tuple[float, ...]:
    """``(1 - lr wd, 1 - beta1, beta2, 1 - beta2, sqrt(1 - beta2^t), eps, -lr / (1 - beta1^t))``
    by the expressions of torch's single-tensor AdamW, so that tensor ``lr``/``betas`` round as
    there (in their own dtype; ``1 - beta1`` in the parameter's, as torch's lerp weight)."""
    lr, beta1, beta2 = (_squeezed(value) for value in (group["lr"], *group["betas"]))
    beta1_weight = 1 - (beta1.to(dtype) if isinstance(beta1, Tensor) else beta1)
    step_size = lr / (1 - beta1**step)
    bias2_sqrt = (1 - beta2**step) ** 0.5
    return tuple(
        float(value)
        for value in (
            1 - lr * group["weight_decay"],
            beta1_weight,
            beta2,
            1 - beta2,
            bias2_sqrt,
            group["eps"],
            -step_size,
        )
    )


def _squeezed(value: Any) -> Any:
    """A one-element tensor hyperparameter as the 0-dim tensor torch's step computes with
    (``torch.optim.optimizer._to_scalar``); anything else as it is."""
    return value.squeeze() if isinstance(value, Tensor) and value.dim() != 0 else value


def _dense_cpu(tensor: Tensor, dtype: torch.dtype) -> bool:
    """``tensor`` is a dense CPU tensor of ``dtype``."""
    return tensor.layout == torch.strided and tensor.is_cpu and tensor.dtype == dtype


_INSIDE = tuple(
    os.path.dirname(module.__file__) + os.sep for module in (torch, ewc) if module.__file__
)


def _first_frame_outside() -> int:
    """The ``stacklevel`` of the first caller outside torch and ewc (the user's ``step()``,
    whatever wraps it: hooks, ``no_grad``, an LR scheduler), for a warning raised here."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level
