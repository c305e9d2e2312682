"""The :class:`EWC` regulariser: orchestrates :mod:`ewc.fisher`, :mod:`ewc.penalty` and
:mod:`ewc.store`; it holds no maths of its own."""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ewc import _reversal
from ewc import distributed as _distributed
from ewc import fisher as fisher_lib
from ewc._fused import FusedKernel, fused_kernel
from ewc._typing import Batch, Criterion, ForwardFn, ParamSelector
from ewc.errors import ConsolidationError, ParameterMismatchError, StateDictError
from ewc.penalty import CPU_BLOCK_ELEMENTS, add_penalty_grad_, overlap
from ewc.store import FORMAT_NAME, FORMAT_VERSION, ConsolidatedState, storage_dtype

__all__ = ["EWC", "ConsolidationReport"]

MODES = ("separate", "online")


@dataclass(frozen=True)
class ConsolidationReport:
    """What one :meth:`EWC.consolidate` did.

    Attributes:
        examples: examples the Fisher was averaged over.
        batches: batches read from the dataloader.
        seconds: wall time of the consolidation.
        estimator: the Fisher estimator used.
        paths: per parameter, the engine path that computed its Fisher.
    """

    examples: int
    batches: int
    seconds: float
    estimator: str
    paths: dict[str, str] = field(default_factory=dict)


_AlignedCache = tuple[
    list[tuple[torch.Size, torch.dtype, torch.device]],
    list["weakref.ref[nn.Parameter]"],
    list[tuple[str, Tensor, Tensor]],
]
"""What :meth:`EWC._aligned` last checked: the model parameters' (shape, dtype, device), the
parameters themselves (weakly: the cache keeps no model alive) and (name, A, m) per
consolidated parameter."""


class EWC:
    """Elastic Weight Consolidation regulariser (Kirkpatrick et al. 2017; online: Schwarz et al.).

    The penalty is kept as in Avalanche so that ``ewc_lambda`` carries over:
    separate mode ``P = ewc_lambda * sum_t sum_i F_t,i (theta_i - a_t,i)^2``; online mode
    ``P = ewc_lambda * sum_i G_i (theta_i - a_i)^2`` with ``G <- decay_factor * G + F``. Either
    is stored as one quadratic per parameter, so memory and per-step cost are O(P) whatever the
    number of tasks.

    Args:
        ewc_lambda: penalty strength, a float >= 0.
        mode: ``"separate"`` (sum over tasks) or ``"online"`` (decayed running Fisher).
        decay_factor: online only, in ``[0, 1]``.
        keep_importance_data: also keep every task's ``(F_t, a_t)`` (O(T P) memory).
        fisher: ``"exact"``, ``"sample"``, ``"empirical"`` or ``"batched"`` (see :mod:`ewc.fisher`).
        mc_samples: labels drawn per example for ``fisher="sample"``.
        max_samples: use only the first ``n`` examples the loader yields (the paper's EXACT(n)).
        params: which parameters to regularise: None (all trainable), names, or a predicate
            ``(name, param) -> bool``.
        process_group: the group ``consolidate`` all-reduces Fisher sums and counts over when
            ``torch.distributed`` is initialised (None: the default group); see
            :mod:`ewc.distributed`.
        fused: ``penalty_grad_`` on CPU uses one compiled loop that reads ``grad``, ``A``,
            ``theta`` and ``m`` once (see :mod:`ewc._fused`) instead of two PyTorch kernels
            per block; same result. The kernel is built here with PyTorch's C++ extension
            loader (about 20 s the first time on a machine, then cached on disk), so it needs a
            C++ compiler and ninja; a RuntimeError says so when the build fails. Other
            devices, and gradients whose dtype differs from the state's, use the default path.
        logits_reversal: EWC-DR (Liu & Chang 2026): the importance comes from the loss on the
            negated output, ``loss(-f(x), y)``; ``empirical`` and ``batched`` only (see
            :mod:`ewc._reversal`).
        max_importance: clamp every entry of each task's Fisher at this value (finite, > 0)
            before the task is folded in, also for :meth:`add_task`; EWC-DR's code uses 1e-4.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from ewc import EWC
        >>> model = nn.Linear(4, 3)
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> reg = EWC(ewc_lambda=10.0)
        >>> report = reg.consolidate(model, data, nn.CrossEntropyLoss())
        >>> float(reg.penalty(model))
        0.0
    """

    def __init__(
        self,
        ewc_lambda: float,
        mode: str = "separate",
        decay_factor: float | None = None,
        keep_importance_data: bool = False,
        *,
        fisher: str = "exact",
        mc_samples: int = 1,
        max_samples: int | None = None,
        params: ParamSelector = None,
        process_group: Any = None,
        fused: bool = False,
        logits_reversal: bool = False,
        max_importance: float | None = None,
    ) -> None:
        self.ewc_lambda = _check_lambda(ewc_lambda)
        if mode not in MODES:
            raise ValueError(f"Expected argument `mode` to be one of {MODES} but got {mode!r}")
        if mode == "online" and decay_factor is None:
            raise ValueError("Argument `decay_factor` is required with mode='online' but got None")
        if mode == "separate" and decay_factor is not None:
            raise ValueError(
                f"Argument `decay_factor` is only used with mode='online' but got "
                f"decay_factor={decay_factor!r} with mode='separate'"
            )
        if decay_factor is not None:
            decay_factor = _check_unit_interval(decay_factor, "decay_factor")
        if not isinstance(keep_importance_data, bool):
            raise TypeError(
                "Expected argument `keep_importance_data` to be a bool but got "
                f"{keep_importance_data!r}"
            )
        if fisher not in fisher_lib.ESTIMATORS:
            raise ValueError(
                f"Expected argument `fisher` to be one of {fisher_lib.ESTIMATORS} "
                f"but got {fisher!r}"
            )
        self.mode = mode
        self.decay_factor = decay_factor
        self.keep_importance_data = keep_importance_data
        self.fisher = fisher
        self.mc_samples = _check_positive_int(mc_samples, "mc_samples")
        self.max_samples = (
            None if max_samples is None else _check_positive_int(max_samples, "max_samples")
        )
        self.params = _check_selector(params)
        self.logits_reversal = _reversal.check_logits_reversal(logits_reversal, fisher)
        self.max_importance = _reversal.check_max_importance(max_importance)
        self.process_group = process_group
        if not isinstance(fused, bool):
            raise TypeError(f"Expected argument `fused` to be a bool but got {fused!r}")
        self.fused = fused
        # built now, so a machine without a compiler fails here rather than mid-training
        self._fused_kernel: FusedKernel | None = fused_kernel() if fused else None
        self._workspace: dict[str, Tensor] = {}
        self._set_state(ConsolidatedState())

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> ConsolidatedState:
        """The consolidated state (read-only; replaced as a whole by each consolidation)."""
        return self._state

    @property
    def tasks(self) -> int:
        """Number of consolidations so far."""
        return self._state.tasks

    def _set_state(self, state: ConsolidatedState) -> None:
        self._state = state
        self._workspace = {}
        self._aligned_cache: _AlignedCache | None = None

    # ------------------------------------------------------------------ consolidation
    def consolidate(
        self,
        model: nn.Module,
        dataloader: Iterable[Batch],
        criterion: Criterion,
        *,
        forward: ForwardFn | None = None,
        progress: bool = False,
        reduce: Callable[[fisher_lib.FisherSums], fisher_lib.FisherSums] | None = None,
    ) -> ConsolidationReport:
        """Estimate the Fisher at the current weights on ``dataloader`` and add the task.

        Args:
            model: the model, trained on the task just finished.
            dataloader: any iterable of batches; by default ``(inputs, targets, *ignored)``.
            criterion: the task loss, e.g. ``nn.CrossEntropyLoss()``; selects the likelihood for
                ``exact``/``sample``.
            forward: ``forward(model, batch) -> (output, target)`` for other batch layouts.
            progress: show a tqdm progress bar with examples/s.
            reduce: combines the Fisher sums across processes before the division; default: an
                all-reduce over ``process_group`` when ``torch.distributed`` is initialised.

        Returns:
            a :class:`ConsolidationReport`.

        Raises:
            ConsolidationError: no data, NaN/inf, or an exception in the data pipeline; the
                previous state is left exactly as it was (also on KeyboardInterrupt).
        """
        started = time.perf_counter()
        model = _distributed.unwrap(model)
        params = self._selected_params(model)
        _check_state_fits_model(self._state, model)
        with (
            _eval_mode(model),
            _progress_bar(progress) as on_batch,
            _distributed.fisher_pass(
                model, params, self.process_group, reduce=reduce
            ) as fisher_pass,
        ):
            try:
                sums = fisher_lib.fisher_sums(
                    model,
                    fisher_pass.params,
                    dataloader,
                    criterion,
                    estimator=self.fisher,
                    mc_samples=self.mc_samples,
                    max_samples=self.max_samples,
                    forward=_reversal.fisher_forward(forward, self.logits_reversal),
                    on_batch=on_batch,
                )
            except (ConsolidationError, TypeError, ValueError):
                raise
            except Exception as error:
                raise ConsolidationError(
                    f"consolidation failed while reading data or running the model "
                    f"({type(error).__name__}: {error}); the consolidated state is unchanged"
                ) from error
        sums = fisher_pass.reduce(sums)
        fisher = {
            name: value.to(storage_dtype(params[name].dtype))
            for name, value in fisher_lib.fisher_from_sums(sums.sums, sums.count).items()
        }
        fisher = _reversal.clamped(fisher, self.max_importance)
        anchor = {
            name: _distributed.local_tensor(p.detach()).to(storage_dtype(p.dtype), copy=True)
            for name, p in params.items()
        }
        self._add_checked_task(fisher, anchor)
        return ConsolidationReport(
            examples=sums.examples,
            batches=sums.batches,
            seconds=time.perf_counter() - started,
            estimator=self.fisher,
            paths=sums.paths,
        )

    def add_task(self, fisher: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> None:
        """Consolidate a task whose diagonal Fisher ``F`` and anchor weights ``a`` you already have.

        The last step of :meth:`consolidate`, for importances computed elsewhere (Avalanche's
        ``update_importances``, a Fisher from another library). The tensors are validated and
        copied into the state's dtype (float32 or wider). Cost: O(P).

        Raises:
            ValueError: names differ between ``fisher`` and ``anchor``, shapes differ, or the
                Fisher has negative or non-finite entries; the state is unchanged.
            ParameterMismatchError: a consolidated parameter shrank or changed rank.
        """
        if set(fisher) != set(anchor):
            raise ValueError(
                f"Arguments `fisher` and `anchor` must name the same parameters but got "
                f"{sorted(fisher)} and {sorted(anchor)}"
            )
        checked_fisher: dict[str, Tensor] = {}
        checked_anchor: dict[str, Tensor] = {}
        for name, value in fisher.items():
            if not isinstance(value, Tensor) or not isinstance(anchor[name], Tensor):
                raise TypeError(f"Expected tensors for parameter {name!r} in `fisher`/`anchor`")
            if value.shape != anchor[name].shape:
                raise ValueError(
                    f"parameter {name!r} has a Fisher of shape {tuple(value.shape)} but an anchor "
                    f"of shape {tuple(anchor[name].shape)}"
                )
            if not torch.isfinite(value).all() or (value < 0).any():
                raise ValueError(
                    f"the Fisher of parameter {name!r} has negative or non-finite values"
                )
            dtype = storage_dtype(anchor[name].dtype)
            checked_fisher[name] = value.detach().to(dtype=dtype, copy=True)
            checked_anchor[name] = (
                anchor[name].detach().to(device=value.device, dtype=dtype, copy=True)
            )
        self._add_checked_task(
            _reversal.clamped(checked_fisher, self.max_importance), checked_anchor
        )

    def _add_checked_task(self, fisher: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> None:
        """Fold a validated ``(F, a)`` that this object owns (no copies) into a new state."""
        self._set_state(
            self._state.with_task(
                fisher,
                anchor,
                mode=self.mode,
                decay_factor=self.decay_factor,
                keep_history=self.keep_importance_data,
            )
        )

    def _selected_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        named = dict(model.named_parameters())
        if self.params is None:
            return {name: p for name, p in named.items() if p.requires_grad}
        if callable(self.params):
            return {n: p for n, p in named.items() if p.requires_grad and self.params(n, p)}
        unknown = [name for name in self.params if name not in named]
        if unknown:
            raise ValueError(
                f"Argument `params` names {unknown} which the model does not have; its parameters "
                f"are {sorted(named)}"
            )
        return {name: named[name] for name in self.params if named[name].requires_grad}

    # ------------------------------------------------------------------ penalty
    def _aligned(self, model: nn.Module) -> list[tuple[str, nn.Parameter, Tensor, Tensor]]:
        """(name, param, A, m) for every consolidated parameter, checked, state on its device.

        The first call after the model moved to another device moves the state once.
        """
        named = dict(_distributed.unwrap(model).named_parameters())
        # the checks below cost more than the penalty for small models: skip them while the
        # state and the model's parameters (identity, shape, dtype, device) are unchanged
        fingerprint = [(p.shape, p.dtype, p.device) for p in named.values()]
        cached = self._aligned_cache
        if (
            cached is not None
            and cached[0] == fingerprint
            and len(cached[1]) == len(named)
            and all(ref() is p for ref, p in zip(cached[1], named.values()))
        ):
            return [(name, named[name], a, m) for name, a, m in cached[2]]
        for name, importance in self._state.importance.items():
            param = named.get(name)
            if param is None:
                raise ParameterMismatchError(
                    f"parameter {name!r} was consolidated but the model has no parameter of that "
                    "name (renamed, removed, or a wrapper added a prefix?)"
                )
            _check_param_fits(name, importance, param)
        state = self._state
        if any(state.importance[name].device != named[name].device for name in state.importance):
            self._set_state(
                ConsolidatedState(
                    {n: t.to(named[n].device) for n, t in state.importance.items()},
                    {n: t.to(named[n].device) for n, t in state.centre.items()},
                    state.offset,
                    state.tasks,
                    state.history,
                )
            )
        state = self._state
        aligned = [
            (name, named[name], importance, state.centre[name])
            for name, importance in state.importance.items()
        ]
        refs = [weakref.ref(p) for p in named.values()]  # the cache keeps no model alive
        entries = [(name, importance, centre) for name, _, importance, centre in aligned]
        self._aligned_cache = (fingerprint, refs, entries)
        return aligned

    def penalty(self, model: nn.Module) -> Tensor:
        """Differentiable ``ewc_lambda * (sum A (theta - m)^2 + r)``; 0 before any consolidation.

        Cost: O(P) time; autograd keeps O(P) temporaries. For a cheaper gradient-only path that
        builds no graph, see :meth:`penalty_grad_`.
        """
        if self._state.tasks == 0:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else None
            return torch.zeros((), device=device)
        aligned = self._aligned(model)
        params = [param for _, param, _, _ in aligned]
        offset = self._state.offset.to(params[0].device) if params else self._state.offset
        return _distributed.penalty_value(
            params,
            [importance for _, _, importance, _ in aligned],
            [centre for _, _, _, centre in aligned],
            offset,
            self.ewc_lambda,
        )

    @torch.no_grad()
    def penalty_grad_(self, model: nn.Module, *, return_penalty: bool = False) -> Tensor | None:
        """Add ``d penalty / d theta = 2 * ewc_lambda * A * (theta - m)`` to each ``p.grad``.

        No autograd graph and no parameter-sized allocation per call (see
        :func:`ewc.penalty.add_penalty_grad_`; a ``.grad`` that is None is created as zeros,
        parameters frozen since consolidation are left alone). Cost: O(P) time.

        Args:
            model: the model (DDP/FSDP2-wrapped models are accepted).
            return_penalty: also return the penalty's value (detached, float64), computed from
                the same pass; what loggers want, at a fraction of a separate :meth:`penalty`.

        Returns:
            None, or with ``return_penalty=True`` the value of :meth:`penalty`.
        """
        if self._state.tasks == 0 or self.ewc_lambda == 0.0:
            return torch.zeros((), dtype=torch.float64) if return_penalty else None
        aligned = self._aligned(model)
        grads, params, importances, centres = [], [], [], []
        frozen_quadratic = torch.zeros((), dtype=torch.float64) if return_penalty else None
        sharded = _distributed.dtensors_in_use()
        for _, param, importance, centre in aligned:
            # under no_grad, the parameter itself is read without building a graph
            value = _distributed.local_tensor(param) if sharded else param
            if importance.shape != value.shape:  # grown since: penalise the consolidated block
                value = value[overlap(importance.shape)]
            if not param.requires_grad:  # frozen since: autograd of penalty() gives it no grad
                if frozen_quadratic is not None:
                    term = (importance * (value - centre).square()).sum(dtype=torch.float64)
                    frozen_quadratic += term.cpu()
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grad = _distributed.local_tensor(param.grad) if sharded else param.grad
            if grad.shape != importance.shape:
                grad = grad[overlap(importance.shape)]
            grads.append(grad)
            params.append(value)
            importances.append(importance)
            centres.append(centre)
        quadratic = add_penalty_grad_(
            grads,
            params,
            importances,
            centres,
            self.ewc_lambda,
            workspace=self._penalty_workspace(importances),
            return_quadratic=return_penalty,
            fused_kernel=self._fused_kernel,
        )
        if quadratic is None or frozen_quadratic is None:
            return None
        offset = self._state.offset.to(device=quadratic.device, dtype=torch.float64)
        local = self.ewc_lambda * (quadratic + frozen_quadratic.to(quadratic.device) + offset)
        return _distributed.sum_over_shards(local, [param for _, param, _, _ in aligned])

    def _penalty_workspace(self, importances: list[Tensor]) -> Tensor | None:
        """One reusable CPU buffer of ``min(block, largest numel)`` elements (see
        :func:`ewc.penalty.add_penalty_grad_`); None when the state is not on the CPU."""
        if not importances or importances[0].device.type != "cpu":
            return None
        dtype = importances[0].dtype
        size = min(CPU_BLOCK_ELEMENTS, max(t.numel() for t in importances))
        work = self._workspace.get(str(dtype))
        if work is None or work.numel() < size:
            work = self._workspace[str(dtype)] = torch.empty(size, dtype=dtype)
        return work

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        """A ``torch.save``-able dict with a format version, the options and the state."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": {
                "ewc_lambda": self.ewc_lambda,
                "mode": self.mode,
                "decay_factor": self.decay_factor,
                "keep_importance_data": self.keep_importance_data,
                "fisher": self.fisher,
                "mc_samples": self.mc_samples,
                "max_samples": self.max_samples,
            },
            "state": self._state.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`.

        The consolidated quadratic is replaced; this object's options (``ewc_lambda``, estimator)
        stay as constructed, but ``mode`` must match, since the stored quadratic means something
        else in the other mode. Raises :class:`StateDictError` for a foreign, damaged or newer
        dict, leaving the current state unchanged.
        """
        if not isinstance(state_dict, dict) or state_dict.get("format") != FORMAT_NAME:
            found = state_dict.get("format") if isinstance(state_dict, dict) else type(state_dict)
            raise StateDictError(
                f"not an EWC state dict: expected `format` = {FORMAT_NAME!r}, found {found!r}"
            )
        version = state_dict.get("version")
        if version != FORMAT_VERSION:
            raise StateDictError(
                f"EWC state dict has format version {version!r}; this ewc reads version "
                f"{FORMAT_VERSION}"
            )
        config = state_dict.get("config")
        if not isinstance(config, dict) or "mode" not in config:
            raise StateDictError("EWC state dict is missing its `config`")
        if config["mode"] != self.mode:
            raise StateDictError(
                f"EWC state dict was saved with mode={config['mode']!r} but this EWC has "
                f"mode={self.mode!r}"
            )
        self._set_state(ConsolidatedState.from_state_dict(state_dict.get("state", {})))

    def __getstate__(self) -> dict[str, Any]:
        # the compiled kernel is a function of a module only this process has loaded
        return {**self.__dict__, "_fused_kernel": None, "_workspace": {}, "_aligned_cache": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"fused": False, **state})
        self._fused_kernel = fused_kernel() if self.fused else None

    def __repr__(self) -> str:
        fused = ", fused=True" if self.fused else ""
        return (
            f"EWC(ewc_lambda={self.ewc_lambda}, mode={self.mode!r}, "
            f"decay_factor={self.decay_factor}, keep_importance_data={self.keep_importance_data}, "
            f"fisher={self.fisher!r}{fused}, tasks={self.tasks})"
        )


# ---------------------------------------------------------------------- validation helpers
def _check_lambda(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected argument `ewc_lambda` to be a float but got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Expected argument `ewc_lambda` to be finite and >= 0 but got {value!r}")
    return float(value)


def _check_unit_interval(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected argument `{name}` to be a float but got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"Expected argument `{name}` to be in [0, 1] but got {value!r}")
    return float(value)


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected argument `{name}` to be an int but got {value!r}")
    if value < 1:
        raise ValueError(f"Expected argument `{name}` to be >= 1 but got {value!r}")
    return value


def _check_selector(params: Any) -> Any:
    if params is None or callable(params):
        return params
    if isinstance(params, str):
        return (params,)
    try:
        names = tuple(params)
    except TypeError:
        raise TypeError(
            "Expected argument `params` to be None, an iterable of parameter names or a callable "
            f"(name, param) -> bool but got {params!r}"
        ) from None
    bad = [name for name in names if not isinstance(name, str)]
    if bad:
        raise TypeError(f"Expected argument `params` to hold parameter names but got {bad!r}")
    return names


def _check_param_fits(name: str, importance: Tensor, param: Tensor) -> None:
    param = _distributed.checked_local(name, importance, param)
    stored, current = importance.shape, param.shape
    if len(stored) != len(current) or any(c < s for s, c in zip(stored, current)):
        raise ParameterMismatchError(
            f"parameter {name!r} was consolidated with shape {tuple(stored)} but the model's has "
            f"shape {tuple(current)}; consolidated parameters may only grow"
        )
    if param.is_complex() != importance.is_complex() or not param.is_floating_point():
        raise ParameterMismatchError(
            f"parameter {name!r} was consolidated as {importance.dtype} but is now {param.dtype}"
        )


def _check_state_fits_model(state: ConsolidatedState, model: nn.Module) -> None:
    named = dict(model.named_parameters())
    for name, importance in state.importance.items():
        if name not in named:
            raise ParameterMismatchError(
                f"parameter {name!r} was consolidated but the model has no parameter of that name"
            )
        _check_param_fits(name, importance, named[name])


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the Fisher pass; every module's own training flag is restored afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[Callable[[int], None] | None]:
    if not enabled:
        yield None
        return
    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "consolidate(progress=True) needs tqdm: pip install tqdm (or ewc[progress])"
        ) from error
    bar = tqdm(desc="ewc consolidate", unit="ex", unit_scale=True)
    try:
        yield bar.update
    finally:
        bar.close()
