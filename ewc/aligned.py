"""The consolidated state aligned with one model: the one route of the penalty and its gradient.

:meth:`ewc.store.ConsolidatedState.bind` returns an :class:`AlignedState`. Building it matches
every consolidated parameter with the model's parameter of the same name (present, dense data,
same dtype family, grown but never shrunk, the same local shard under FSDP2), and fixes once
per model what every later step reads:

* the leading block of a grown parameter that the state covers (``param[overlap(A.shape)]``);
* the local shard of a ``DTensor`` parameter, and the process groups a value is summed over;
* the trainable/frozen split (parameters frozen since consolidation get no gradient);
* ``A`` and ``m`` on the parameter's device: the stored tensors, or copies when the model has
  moved (the stored state is never moved or changed by a penalty call);
* the CPU workspace of :func:`ewc.penalty.add_penalty_grad_`.

A view is reused as long as the model's parameters keep their names, identities, shapes,
dtypes, devices and trainable flags (one list comparison per call); it holds the parameters
weakly, so it keeps no model alive.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ewc import distributed as _distributed
from ewc._fused import FusedKernel
from ewc.errors import ParameterMismatchError
from ewc.penalty import CPU_BLOCK_ELEMENTS, add_penalty_grad_, overlap, penalty_value
from ewc.store import check_fits

if TYPE_CHECKING:
    from ewc.store import ConsolidatedState

__all__ = ["AlignedState", "check_model_fits", "named_parameters", "unwrap"]

_Fingerprint = list[tuple[torch.Size, torch.dtype, torch.device, bool]]


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``model``'s parameters by the names the state uses (see :func:`unwrap`)."""
    return dict(unwrap(model).named_parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP/DataParallel (:func:`ewc.distributed.unwrap`) and ``torch.compile``
    wrappers, whose parameter names are the state's (no ``module.``/``_orig_mod.`` prefix)."""
    model = _distributed.unwrap(model)
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # imported once torch.compile is used
    compiled = getattr(dynamo, "OptimizedModule", None)
    while compiled is not None and isinstance(model, compiled):
        model = _distributed.unwrap(model._orig_mod)
    return model


def check_model_fits(state: ConsolidatedState, named: dict[str, nn.Parameter]) -> None:
    """Every consolidated parameter is in ``named`` and fits its stored quadratic.

    Raises:
        ParameterMismatchError: naming the parameter and what no longer fits.
    """
    for name, importance in state.importance.items():
        _local_fitting(name, importance, named)


def _local_fitting(name: str, importance: Tensor, named: dict[str, nn.Parameter]) -> Tensor:
    """The model's tensor for consolidated parameter ``name`` (its local shard under FSDP2)."""
    param = named.get(name)
    if param is None:
        raise ParameterMismatchError(
            f"parameter {name!r} was consolidated but the model has no parameter of that name "
            f"(renamed, removed, or a wrapper added a prefix?); its parameters are "
            f"{_listing(named)}"
        )
    if param.device.type == "meta":
        raise ParameterMismatchError(
            f"parameter {name!r} is on the meta device (it holds no values); the penalty needs "
            "the model's weights"
        )
    local = _distributed.checked_local(name, importance, param)
    check_fits(name, importance.shape, local.shape)
    if local.is_complex() or not local.is_floating_point():
        raise ParameterMismatchError(
            f"parameter {name!r} was consolidated as {importance.dtype} but is now {param.dtype}"
        )
    return local


def _listing(named: dict[str, Any], limit: int = 8) -> str:
    names = list(named)
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} in all)"


class AlignedState:
    """One consolidated state aligned with one model's parameters (see the module docstring).

    Build it with :meth:`ewc.store.ConsolidatedState.bind`. :meth:`penalty` and
    :meth:`add_penalty_grad_` evaluate the collapsed quadratic
    ``P = ewc_lambda * (sum A (theta - m)^2 + r)`` and its gradient
    ``2 ewc_lambda A (theta - m)`` on the aligned blocks, then sum over FSDP2 shards.
    """

    def __init__(
        self,
        state: ConsolidatedState,
        named: dict[str, nn.Parameter],
        workspace: Tensor | None = None,
    ) -> None:
        self.state = state
        """The view's state (the stored tensors are never changed through the view)."""
        values = list(named.values())
        self._names = tuple(named)
        self._refs = [weakref.ref(p) for p in values]
        index = {name: position for position, name in enumerate(named)}
        locals_ = {n: _local_fitting(n, a, named) for n, a in state.importance.items()}
        consolidated = [named[name] for name in state.importance]  # present: checked above
        self._fingerprint = _fingerprint(consolidated)
        self._consolidated_refs = [weakref.ref(p) for p in consolidated]
        self._root: weakref.ref[nn.Module] | None = None
        self._hops: list[tuple[weakref.ref[nn.Module], str, str, weakref.ref[Any]]] = []
        self._sharded = any(_distributed.is_sharded(named[n]) for n in locals_)
        if self._sharded and not all(_distributed.is_sharded(named[n]) for n in locals_):
            raise ParameterMismatchError(
                "under FSDP2 every consolidated parameter must be sharded (a DTensor), because "
                "the constant of the collapsed penalty is stored per shard; apply fully_shard to "
                "the root module too, or select sharded parameters only with EWC(params=...)"
            )
        self._groups = (
            _distributed.shard_groups([named[n] for n in locals_]) if self._sharded else []
        )

        def on_device(tensor: Tensor, device: torch.device) -> Tensor:
            return tensor if tensor.device == device else tensor.to(device)  # a copy if moved

        entries = []
        for name, importance in state.importance.items():
            local = locals_[name]
            block = None if importance.shape == local.shape else overlap(importance.shape)
            entries.append(
                (
                    index[name],
                    on_device(importance, local.device),
                    on_device(state.centre[name], local.device),
                    block,
                    named[name].requires_grad,
                )
            )
        # all positions, for the value; trainable ones, for the gradient; frozen ones, for the
        # value logged by add_penalty_grad_
        self._all = [(i, block) for i, _, _, block, _ in entries]
        self._importances = [a for _, a, _, _, _ in entries]
        self._centres = [m for _, _, m, _, _ in entries]
        self._trainable = [(i, block) for i, _, _, block, trains in entries if trains]
        self._trainable_importances = [a for _, a, _, _, trains in entries if trains]
        self._trainable_centres = [m for _, _, m, _, trains in entries if trains]
        self._frozen = [(i, a, m, block) for i, a, m, block, trains in entries if not trains]
        first = locals_[next(iter(locals_))].device if locals_ else state.offset.device
        self._offset = on_device(state.offset, first)
        self._workspace = self._fitting_workspace(workspace)

    @classmethod
    def of(
        cls, state: ConsolidatedState, model: nn.Module, reuse: AlignedState | None = None
    ) -> AlignedState:
        """``reuse`` when it still aligns ``state`` with ``model``, else a new view."""
        root = unwrap(model)
        if reuse is not None and reuse.state is state and reuse._still_fits(root):
            return reuse
        view = cls(state, named_parameters(model), reuse._workspace if reuse is not None else None)
        view._remember_paths(root)
        return view

    def _remember_paths(self, root: nn.Module) -> None:
        """The attribute hops from ``root`` to every consolidated parameter (``root._modules``
        entries down to the owning module, then its ``_parameters`` entry), for
        :meth:`_still_fits`."""
        hops: dict[tuple[int, str, str], tuple[weakref.ref[nn.Module], str, str, Any]] = {}
        for name, ref in zip(self.state.importance, self._consolidated_refs):
            *path, leaf = name.split(".")
            owner = root
            try:
                for part in path:
                    child = owner._modules[part]
                    hops[(id(owner), "_modules", part)] = (
                        weakref.ref(owner),
                        "_modules",
                        part,
                        child,
                    )
                    if child is None:
                        return
                    owner = child
                if owner._parameters.get(leaf) is not ref():
                    return  # not reachable by plain attributes: check by the full walk
            except (KeyError, TypeError, RuntimeError):
                return
            hops[(id(owner), "_parameters", leaf)] = (weakref.ref(owner), "_parameters", leaf, ref)
        self._root = weakref.ref(root)
        self._hops = [
            (owner, kind, key, value if isinstance(value, weakref.ref) else weakref.ref(value))
            for owner, kind, key, value in hops.values()
        ]

    def _still_fits(self, root: nn.Module) -> bool:
        """Whether every consolidated parameter is still the same tensor at the same place,
        with the same shape, dtype, device and trainable flag.

        Only what the view reads is checked: the attribute hops from the model down to each
        consolidated parameter (a module or parameter replaced, renamed or deleted on the way
        breaks a hop), then the parameters' fingerprint. Parameters added since, or others
        changed, do not matter to the penalty. About a microsecond per hop, instead of a walk
        over the whole model with ``named_parameters`` (which costs ten times more right after
        a training step, with the caches full of the step's data).
        """
        if self._root is None or self._root() is not root:
            return self._matches(named_parameters(root))
        for owner_ref, kind, key, value_ref in self._hops:
            owner, value = owner_ref(), value_ref()
            if owner is None or value is None or getattr(owner, kind).get(key) is not value:
                return False
        params = [ref() for ref in self._consolidated_refs]
        return _fingerprint(params) == self._fingerprint

    def _matches(self, named: dict[str, nn.Parameter]) -> bool:
        # the full check, where the paths could not be recorded: every consolidated parameter is
        # the same tensor under the same name, with the same shape, dtype, device and flag
        try:
            consolidated = [named[name] for name in self.state.importance]
        except KeyError:
            return False
        return _fingerprint(consolidated) == self._fingerprint and all(
            ref() is p for ref, p in zip(self._consolidated_refs, consolidated)
        )

    def _params(self) -> list[nn.Parameter]:
        """The model's parameters at bind time, by position; a parameter the state does not hold
        may have been deleted since (None), a consolidated one may not."""
        params = [ref() for ref in self._refs]
        if any(params[i] is None for i, _ in self._all):  # the model was freed since bind
            raise RuntimeError("the model of this aligned view no longer exists; bind again")
        return params  # type: ignore[return-value]

    def _fitting_workspace(self, previous: Tensor | None) -> Tensor | None:
        """Size of the CPU buffer of :func:`ewc.penalty.add_penalty_grad_`; ``previous`` is
        kept when it is large enough (no new buffer after a model change)."""
        importances = self._trainable_importances
        if not importances or importances[0].device.type != "cpu":
            return None
        size = min(CPU_BLOCK_ELEMENTS, max(t.numel() for t in importances))
        dtype = importances[0].dtype
        if previous is not None and previous.dtype == dtype and previous.numel() >= size:
            return previous
        return torch.empty(size, dtype=dtype)

    def whole_cpu_terms(self) -> dict[int, tuple[Tensor, Tensor]] | None:
        """``id(param) -> (A, m)`` for every trainable aligned parameter, or None unless each is
        a whole (never grown), unsharded CPU tensor with the state's dtype (any strides): what a
        single-pass optimizer step (:class:`ewc.optim.SGD`) can read directly."""
        params = self._params()
        if self._sharded:
            return None
        terms: dict[int, tuple[Tensor, Tensor]] = {}
        for (i, block), importance, centre in zip(
            self._trainable, self._trainable_importances, self._trainable_centres
        ):
            param = params[i]
            if block is not None or param.device.type != "cpu" or param.dtype != importance.dtype:
                return None
            terms[id(param)] = (importance, centre)
        return terms

    @property
    def workspace(self) -> Tensor | None:
        """The reusable CPU buffer of the gradient pass (None off the CPU)."""
        return self._workspace

    # ------------------------------------------------------------------ evaluation
    def penalty(self, ewc_lambda: float) -> Tensor:
        """Differentiable ``ewc_lambda * (sum A (theta - m)^2 + r)``, global over FSDP2 shards.

        Cost: O(P) time, autograd keeps O(P) temporaries; one scalar all-reduce per sharded
        mesh dimension under FSDP2.
        """
        params = self._params()
        values = []
        for i, block in self._all:
            value = _distributed.local_tensor(params[i]) if self._sharded else params[i]
            values.append(value if block is None else value[block])
        local = penalty_value(values, self._importances, self._centres, self._offset, ewc_lambda)
        return _distributed.global_penalty(local, self._groups) if self._sharded else local

    @torch.no_grad()
    def add_penalty_grad_(
        self,
        ewc_lambda: float,
        *,
        scale: float = 1.0,
        return_penalty: bool = False,
        fused_kernel: FusedKernel | None = None,
    ) -> Tensor | None:
        """``p.grad += scale * 2 ewc_lambda A (theta - m)`` on every trainable aligned block.

        A ``.grad`` that is None is created as zeros; a sparse one is refused. ``scale`` (an fp16
        loss scale, checked by the caller) multiplies the gradient only. With
        ``return_penalty``, also the penalty's value (float64, no graph; frozen parameters and
        the constant included; not multiplied by ``scale``) from the same pass. Cost: O(P), no
        parameter-sized allocation.

        Raises:
            TypeError: a parameter has a sparse gradient (``nn.Embedding(sparse=True)``).
        """
        params = self._params()
        grads, values = [], []
        sharded = self._sharded
        for i, _ in self._trainable:  # every check before any gradient is created
            grad = params[i].grad
            if grad is not None and grad.layout != torch.strided:
                raise TypeError(
                    f"parameter {self._names[i]!r} has a {grad.layout} gradient "
                    "(nn.Embedding(sparse=True)?); penalty_grad_ adds a dense gradient and does "
                    "not support sparse ones: add reg.penalty(model) to the loss instead, or use "
                    "sparse=False"
                )
        for i, block in self._trainable:
            param = params[i]
            grad = param.grad
            if grad is None:
                grad = param.grad = torch.zeros_like(param)
            value = _distributed.local_tensor(param) if sharded else param
            if sharded:
                grad = _distributed.local_tensor(grad)
            if block is not None:  # grown since: only the consolidated block is penalised
                value, grad = value[block], grad[block]
            grads.append(grad)
            values.append(value)
        quadratic = add_penalty_grad_(
            grads,
            values,
            self._trainable_importances,
            self._trainable_centres,
            ewc_lambda,
            scale=scale,
            workspace=self._workspace,
            return_quadratic=return_penalty,
            fused_kernel=fused_kernel,
        )
        if quadratic is None:
            return None
        for i, importance, centre, block in self._frozen:
            value = _distributed.local_tensor(params[i]) if sharded else params[i]
            value = value if block is None else value[block]
            term = (importance * (value - centre).square()).sum(dtype=torch.float64)
            quadratic = quadratic + term.to(quadratic.device)
        offset = self._offset.to(device=quadratic.device, dtype=torch.float64)
        local = ewc_lambda * (quadratic + offset)
        return _distributed.sum_over_groups(local, self._groups) if sharded else local


def _fingerprint(values: Sequence[nn.Parameter] | Any) -> _Fingerprint:
    return [(p.shape, p.dtype, p.device, p.requires_grad) for p in values]
