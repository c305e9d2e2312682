"""The :class:`EWC` regulariser: a thin stateful object over pure functions.

It checks its own arguments and orchestrates; the work is done below it: :mod:`ewc.fisher`
estimates the Fisher, :mod:`ewc.store` keeps the consolidated quadratic and validates everything
that enters it, :meth:`ewc.store.ConsolidatedState.bind` (:mod:`ewc.aligned`) aligns that state
with a model, and :mod:`ewc.penalty` evaluates the penalty and its gradient.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ewc import _reversal
from ewc import distributed as _distributed
from ewc import fisher as fisher_lib
from ewc._fused import FusedKernel, fused_kernel
from ewc._typing import Batch, Criterion, ForwardFn, ParamSelector
from ewc._typing import short_repr as _short
from ewc.aligned import AlignedState, check_model_fits, named_parameters, unwrap
from ewc.errors import ConsolidationError, EWCError, StateDictError
from ewc.store import ConsolidatedState, check_task, pack, storage_dtype, task_copies, unpack

__all__ = ["EWC", "ConsolidationReport", "FisherEstimate"]

MODES = ("separate", "online")

Reduce = Callable[[fisher_lib.FisherSums], fisher_lib.FisherSums]


@dataclass(frozen=True)
class ConsolidationReport:
    """What one :meth:`EWC.consolidate` (or :meth:`EWC.estimate`) did.

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


@dataclass(frozen=True)
class FisherEstimate:
    """A Fisher estimated by :meth:`EWC.estimate`, not yet added as a task.

    ``reg.add_task(estimate.fisher, estimate.anchor)`` adds it, exactly as
    :meth:`EWC.consolidate` would have.

    Attributes:
        fisher: the diagonal Fisher ``F`` per selected parameter (float32 or wider; under FSDP2
            this rank's shard).
        anchor: the weights it was estimated at, ``a`` (copies, same dtypes as ``fisher``).
        report: what the estimation did.
    """

    fisher: dict[str, Tensor]
    anchor: dict[str, Tensor]
    report: ConsolidationReport


class EWC:
    """Elastic Weight Consolidation regulariser (Kirkpatrick et al. 2017; online: Schwarz et al.).

    The penalty is kept as in Avalanche so that ``ewc_lambda`` carries over:
    separate mode ``P = ewc_lambda * sum_t sum_i F_t,i (theta_i - a_t,i)^2``; online mode
    ``P = ewc_lambda * sum_i G_i (theta_i - a_i)^2`` with ``G <- decay_factor * G + F``. Either
    is stored as one quadratic per parameter, so memory and per-step cost are O(P) whatever the
    number of tasks.

    :meth:`consolidate` ends a task (:meth:`estimate` then :meth:`add_task`); :meth:`penalty`
    (for the loss) and :meth:`penalty_grad_` (added to ``.grad``) read the consolidated state
    through one aligned view of it (:meth:`ewc.store.ConsolidatedState.bind`).

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
            :func:`ewc.fisher.fisher_sums` and :mod:`ewc._reversal`).
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
        self.mode, self.decay_factor = _check_mode(mode, decay_factor)
        self.keep_importance_data = _check_bool(keep_importance_data, "keep_importance_data")
        if fisher not in fisher_lib.ESTIMATORS:
            raise ValueError(
                f"Expected argument `fisher` to be one of {fisher_lib.ESTIMATORS} "
                f"but got {fisher!r}"
            )
        self.fisher = fisher
        self.mc_samples = _check_positive_int(mc_samples, "mc_samples")
        self.max_samples = (
            None if max_samples is None else _check_positive_int(max_samples, "max_samples")
        )
        self.params = _check_selector(params)
        self.logits_reversal = _reversal.check_logits_reversal(logits_reversal, fisher)
        self.max_importance = _reversal.check_max_importance(max_importance)
        self.process_group = process_group
        self.fused = _check_bool(fused, "fused")
        # built now, so a machine without a compiler fails here rather than mid-training
        self._fused_kernel: FusedKernel | None = fused_kernel() if fused else None
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
        self._aligned: AlignedState | None = None

    def _bind(self, model: nn.Module) -> AlignedState:
        """The state aligned with ``model``; the view of the last call when it still fits."""
        self._aligned = self._state.bind(model, reuse=self._aligned)
        return self._aligned

    # ------------------------------------------------------------------ consolidation
    def estimate(
        self,
        model: nn.Module,
        dataloader: Iterable[Batch],
        criterion: Criterion | None = None,
        *,
        forward: ForwardFn | None = None,
        progress: bool = False,
        reduce: Reduce | None = None,
    ) -> FisherEstimate:
        """Estimate the Fisher at the current weights with this object's settings; add no task.

        Arguments as for :meth:`consolidate`. The result's ``fisher`` and ``anchor`` are what
        :meth:`consolidate` would add (``add_task`` adds them). Cost: one Fisher pass (see
        :mod:`ewc.fisher`); O(P) for the result.

        Raises:
            ConsolidationError: as :meth:`consolidate`; the consolidated state is never changed.
        """
        started = time.perf_counter()
        _check_module(model)
        _check_call_arguments(dataloader, criterion, forward, progress, reduce)
        module = unwrap(model)
        params = _selected(module, self.params)
        with (
            _eval_mode(module),
            _progress_bar(progress) as on_batch,
            _distributed.fisher_pass(
                module, params, self.process_group, reduce=reduce
            ) as fisher_pass,
        ):
            sums = _user_code(
                lambda: fisher_lib.fisher_sums(
                    module,
                    fisher_pass.params,
                    dataloader,
                    criterion,  # None: ewc.fisher picks a default
                    estimator=self.fisher,
                    mc_samples=self.mc_samples,
                    max_samples=self.max_samples,
                    forward=forward,
                    on_batch=on_batch,
                    logits_reversal=self.logits_reversal,
                )
            )
        sums = _user_code(lambda: fisher_pass.reduce(sums)) if reduce else fisher_pass.reduce(sums)
        fisher, anchor = _task_from(sums, params, reduced=reduce is not None)
        fisher = _reversal.clamped(fisher, self.max_importance)
        report = ConsolidationReport(
            examples=sums.examples,
            batches=sums.batches,
            seconds=time.perf_counter() - started,
            estimator=self.fisher,
            paths=sums.paths,
        )
        return FisherEstimate(fisher, anchor, report)

    def consolidate(
        self,
        model: nn.Module,
        dataloader: Iterable[Batch],
        criterion: Criterion | None = None,
        *,
        forward: ForwardFn | None = None,
        progress: bool = False,
        reduce: Reduce | None = None,
    ) -> ConsolidationReport:
        """Estimate the Fisher at the current weights on ``dataloader`` and add the task.

        :meth:`estimate` followed by :meth:`add_task`.

        Args:
            model: the model, trained on the task just finished.
            dataloader: any iterable of batches; by default ``(inputs, targets, *ignored)``.
            criterion: the task loss, e.g. ``nn.CrossEntropyLoss()``; selects the likelihood for
                ``exact``/``sample``. None: :func:`ewc.fisher.fisher_sums` picks the default.
            forward: ``forward(model, batch) -> (output, target)`` for other batch layouts.
            progress: show a tqdm progress bar with examples/s.
            reduce: combines the Fisher sums across processes before the division; default: an
                all-reduce over ``process_group`` when ``torch.distributed`` is initialised.
                Its result is checked (finite, non-negative sums and a positive count).

        Returns:
            a :class:`ConsolidationReport`.

        Raises:
            TypeError: an argument of the wrong type (named in the message).
            ParameterMismatchError: a consolidated parameter no longer fits the model.
            ConsolidationError: no parameter selected, no data, NaN/inf, or an exception raised
                by the data pipeline, the model's forward, the criterion or ``reduce`` (the
                original as ``__cause__``); the previous state is left exactly as it was (also
                on KeyboardInterrupt).
        """
        _check_module(model)
        check_model_fits(self._state, named_parameters(model))  # before the expensive pass
        estimate = self.estimate(
            model, dataloader, criterion, forward=forward, progress=progress, reduce=reduce
        )
        self._add_task(estimate.fisher, estimate.anchor)
        return estimate.report

    def add_task(self, fisher: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> None:
        """Consolidate a task whose diagonal Fisher ``F`` and anchor weights ``a`` you already have.

        The last step of :meth:`consolidate`, for importances computed elsewhere (Avalanche's
        ``update_importances``, a Fisher from another library, :meth:`estimate`). The tensors are
        copied into the state's dtype (float32 or wider) and checked. Cost: O(P).

        Raises:
            TypeError: ``fisher``/``anchor`` are not mappings of names to tensors.
            ValueError: no parameter, names or shapes differ between ``fisher`` and ``anchor``,
                the Fisher has negative or non-finite entries, the anchor non-finite ones, or a
                tensor is sparse, on the meta device or complex; the state is unchanged.
            ParameterMismatchError: a consolidated parameter shrank or changed rank.
        """
        fisher_copy, anchor_copy = task_copies(fisher, anchor)
        self._add_task(_reversal.clamped(fisher_copy, self.max_importance), anchor_copy)

    def _add_task(self, fisher: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> None:
        """Fold a checked ``(F, a)`` that this object owns (no copies) into a new state."""
        self._set_state(
            self._state.with_task(
                fisher,
                anchor,
                mode=self.mode,
                decay_factor=self.decay_factor,
                keep_history=self.keep_importance_data,
            )
        )

    # ------------------------------------------------------------------ penalty
    def penalty(self, model: nn.Module) -> Tensor:
        """Differentiable ``ewc_lambda * (sum A (theta - m)^2 + r)``; 0 before any consolidation.

        Cost: O(P) time; autograd keeps O(P) temporaries. For a cheaper gradient-only path that
        builds no graph, see :meth:`penalty_grad_`. The state is never changed, whatever model
        is passed; a model moved to another device is penalised with copies of ``A`` and ``m``
        on that device, made once.

        Raises:
            TypeError: ``model`` is not an ``nn.Module``.
            ParameterMismatchError: a consolidated parameter is missing, shrank, changed rank or
                dtype family, or is on the meta device.
        """
        _check_module(model)
        if self._state.tasks == 0:
            first = next(iter(model.parameters()), None)
            return torch.zeros((), device=first.device if first is not None else None)
        return self._bind(model).penalty(self.ewc_lambda)

    def penalty_grad_(
        self, model: nn.Module, *, return_penalty: bool = False, scale: float = 1.0
    ) -> Tensor | None:
        """Add ``scale * d penalty / d theta = scale * 2 * ewc_lambda * A * (theta - m)`` to each
        ``p.grad``.

        No autograd graph and no parameter-sized allocation per call (see
        :func:`ewc.penalty.add_penalty_grad_`; a ``.grad`` that is None is created as zeros,
        parameters frozen since consolidation are left alone). Cost: O(P) time.

        Args:
            model: the model (DDP/FSDP2-wrapped models are accepted).
            return_penalty: also return the penalty's value (detached, float64), computed from
                the same pass; what loggers want, at a fraction of a separate :meth:`penalty`.
            scale: multiplies the gradient added, not the returned value: under fp16 loss
                scaling, the ``GradScaler``'s scale (``scaler.get_scale()``), so that the penalty
                gradient lands on the scaled gradients as if the penalty were in the scaled loss.
                A finite float > 0; a power of two (as ``GradScaler`` uses) gives, on zero
                gradients, exactly ``scale`` times what ``scale=1`` adds.

        Returns:
            None, or with ``return_penalty=True`` the value of :meth:`penalty` (unscaled).

        Raises:
            TypeError: ``model`` is not an ``nn.Module``, ``scale`` is not a real number (a bool
                included), or a parameter has a sparse gradient (not supported: add
                :meth:`penalty` to the loss instead).
            ValueError: ``scale`` is not finite or not > 0; no gradient is changed.
            ParameterMismatchError: as :meth:`penalty`.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from ewc import EWC
            >>> model = nn.Linear(2, 1)
            >>> reg = EWC(ewc_lambda=1.0)
            >>> reg.add_task({"weight": torch.ones(1, 2), "bias": torch.ones(1)},
            ...              {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)})
            >>> with torch.no_grad():
            ...     _ = model.weight.fill_(0.5), model.bias.fill_(0.0)
            >>> float(reg.penalty_grad_(model, return_penalty=True, scale=1024.0))
            0.5
            >>> model.weight.grad.tolist()  # 1024 * 2 * 1.0 * 1 * (0.5 - 0)
            [[1024.0, 1024.0]]
        """
        _check_module(model)
        scale = _check_scale(scale)
        if self._state.tasks == 0 or self.ewc_lambda == 0.0:
            return torch.zeros((), dtype=torch.float64) if return_penalty else None
        return self._bind(model).add_penalty_grad_(
            self.ewc_lambda,
            scale=scale,
            return_penalty=return_penalty,
            fused_kernel=self._fused_kernel,
        )

    # ------------------------------------------------------------------ (de)serialisation
    def _config(self) -> dict[str, Any]:
        return {
            "ewc_lambda": self.ewc_lambda,
            "mode": self.mode,
            "decay_factor": self.decay_factor,
            "keep_importance_data": self.keep_importance_data,
            "fisher": self.fisher,
            "mc_samples": self.mc_samples,
            "max_samples": self.max_samples,
        }

    def state_dict(self) -> dict[str, Any]:
        """A ``torch.save``-able dict with a format version, the options and the state.

        Its tensors are copies, not the live state (unlike ``nn.Module.state_dict``): changing
        them changes nothing here. Cost: O(P) memory on the state's device.
        """
        return pack(self._config(), self._state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`.

        The consolidated quadratic is replaced; this object's options (``ewc_lambda``, estimator)
        stay as constructed, but ``mode`` must match, since the stored quadratic means something
        else in the other mode. Raises :class:`StateDictError` for a foreign, damaged or newer
        dict (see :meth:`ewc.store.ConsolidatedState.from_state_dict`), leaving the current
        state unchanged.
        """
        config, state = unpack(state_dict, set(self._config()))
        if config["mode"] != self.mode:
            raise StateDictError(
                f"EWC state dict was saved with mode={config['mode']!r} but this EWC has "
                f"mode={self.mode!r}"
            )
        self._set_state(state)

    def __getstate__(self) -> dict[str, Any]:
        # the compiled kernel is a function of a module only this process has loaded, and the
        # aligned view holds weak references
        return {**self.__dict__, "_fused_kernel": None, "_aligned": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for stale in ("_workspace", "_aligned_cache"):  # pickles of ewc <= 0.1.0.dev0
            state.pop(stale, None)
        self.__dict__.update({"fused": False, "_aligned": None, **state})
        self._fused_kernel = fused_kernel() if self.fused else None

    def __repr__(self) -> str:
        fused = ", fused=True" if self.fused else ""
        return (
            f"EWC(ewc_lambda={self.ewc_lambda}, mode={self.mode!r}, "
            f"decay_factor={self.decay_factor}, keep_importance_data={self.keep_importance_data}, "
            f"fisher={self.fisher!r}{fused}, tasks={self.tasks})"
        )


# ---------------------------------------------------------------------- argument checks
def _check_lambda(value: Any) -> float:
    return _finite_float(value, "ewc_lambda", "finite and >= 0", lambda number: number >= 0)


def _check_scale(value: Any) -> float:
    return _finite_float(value, "scale", "finite and > 0", lambda number: number > 0)


def _finite_float(value: Any, name: str, expected: str, valid: Callable[[float], bool]) -> float:
    """``value`` as a float if it is a real number (``bool`` excluded), finite and ``valid``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected argument `{name}` to be a float but got {_short(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(
            f"Expected argument `{name}` to be {expected} but got {_short(value)}, "
            "too large for a float"
        ) from None
    if not math.isfinite(number) or not valid(number):
        raise ValueError(f"Expected argument `{name}` to be {expected} but got {value!r}")
    return number


def _check_mode(mode: Any, decay_factor: Any) -> tuple[str, float | None]:
    if mode not in MODES:
        raise ValueError(f"Expected argument `mode` to be one of {MODES} but got {mode!r}")
    if mode == "online" and decay_factor is None:
        raise ValueError("Argument `decay_factor` is required with mode='online' but got None")
    if mode == "separate" and decay_factor is not None:
        raise ValueError(
            f"Argument `decay_factor` is only used with mode='online' but got "
            f"decay_factor={decay_factor!r} with mode='separate'"
        )
    if decay_factor is None:
        return mode, None
    return mode, _check_unit_interval(decay_factor, "decay_factor")


def _check_unit_interval(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected argument `{name}` to be a float but got {_short(value)}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"Expected argument `{name}` to be in [0, 1] but got {_short(value)}")
    return float(value)


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected argument `{name}` to be an int but got {_short(value)}")
    if value < 1:
        raise ValueError(f"Expected argument `{name}` to be >= 1 but got {value!r}")
    return value


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"Expected argument `{name}` to be a bool but got {_short(value)}")
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
            f"(name, param) -> bool but got {_short(params)}"
        ) from None
    bad = [name for name in names if not isinstance(name, str)]
    if bad:
        raise TypeError(f"Expected argument `params` to hold parameter names but got {bad!r}")
    if not names:
        raise ValueError(
            f"Expected argument `params` to name at least one parameter but got {_short(params)}; "
            "use params=None for every trainable parameter"
        )
    return names


def _check_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"Expected argument `model` to be a torch.nn.Module but got {_short(model)}"
        )


def _check_call_arguments(
    dataloader: Any, criterion: Any, forward: Any, progress: Any, reduce: Any
) -> None:
    kind = type(dataloader)
    if not (hasattr(kind, "__iter__") or hasattr(kind, "__getitem__")) or isinstance(
        dataloader, (str, bytes, Tensor)
    ):
        raise TypeError(
            "Expected argument `dataloader` to be an iterable of batches (a DataLoader, a list "
            f"of (inputs, targets), ...) but got {_short(dataloader)}"
        )
    for value, argument in ((criterion, "criterion"), (forward, "forward"), (reduce, "reduce")):
        if value is not None and not callable(value):
            raise TypeError(
                f"Expected argument `{argument}` to be None or a callable but got {_short(value)}"
            )
    _check_bool(progress, "progress")


def _selected(model: nn.Module, selector: Any) -> dict[str, nn.Parameter]:
    """The trainable parameters ``selector`` (None, names or a predicate) picks; never none."""
    named = dict(model.named_parameters())
    if selector is None:
        chosen = {name: p for name, p in named.items() if p.requires_grad}
    elif callable(selector):
        chosen = {}
        for name, p in named.items():
            if not p.requires_grad:
                continue
            keep = selector(name, p)
            if not isinstance(keep, bool):
                raise TypeError(
                    f"Expected argument `params` (a predicate) to return a bool but it returned "
                    f"{_short(keep)} for parameter {name!r}"
                )
            if keep:
                chosen[name] = p
    else:
        unknown = [name for name in selector if name not in named]
        if unknown:
            raise ValueError(
                f"Argument `params` names {unknown} which the model does not have; its "
                f"parameters are {sorted(named)}"
            )
        chosen = {name: named[name] for name in selector if named[name].requires_grad}
    if not chosen:
        frozen = sorted(name for name, p in named.items() if not p.requires_grad)
        raise ConsolidationError(
            f"no parameter to consolidate: `params`={_short(selector)} selects none of the "
            f"model's {len(named)} parameters ({len(frozen)} of them frozen: "
            f"{_short(frozen)}); no task was added"
        )
    return chosen


# ---------------------------------------------------------------------- consolidation helpers
_T = TypeVar("_T")
_PACKAGE = str(Path(__file__).resolve().parent) + os.sep


def _user_code(call: Callable[[], _T]) -> _T:
    """``call()``, with any error of user code (the data pipeline, ``forward``, the criterion,
    ``reduce``) as a :class:`ConsolidationError` whose ``__cause__`` is the original.

    ewc's own errors pass through: every :class:`EWCError`, and a ``TypeError``/``ValueError``
    raised by a ``raise`` statement in ewc's own files (an argument check).
    """
    try:
        return call()
    except EWCError:
        raise
    except Exception as error:
        if isinstance(error, (TypeError, ValueError)) and _raised_in_ewc(error):
            raise
        raise ConsolidationError(
            f"consolidation failed while reading data or running the model "
            f"({type(error).__name__}: {error}); the consolidated state is unchanged"
        ) from error


def _raised_in_ewc(error: BaseException) -> bool:
    trace = error.__traceback__
    if trace is None:
        return False
    while trace.tb_next is not None:
        trace = trace.tb_next
    return str(Path(trace.tb_frame.f_code.co_filename).resolve()).startswith(_PACKAGE)


def _task_from(
    sums: fisher_lib.FisherSums, params: Mapping[str, Tensor], *, reduced: bool
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(F, a)`` from the (reduced) sums: ``F = sums / count`` in the state's dtypes and a copy
    of the weights, checked after the reduction (finite, ``F >= 0``, a positive count)."""
    after = " returned by `reduce`" if reduced else ""
    count = sums.count
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise ConsolidationError(
            f"the Fisher sums{after} have count = {count!r}; expected an int > 0; the "
            "consolidated state is unchanged"
        )
    if set(sums.sums) != set(params):
        raise ConsolidationError(
            f"the Fisher sums{after} name {sorted(sums.sums)} but the selected parameters are "
            f"{sorted(params)}; the consolidated state is unchanged"
        )
    fisher = {
        name: value.detach().to(storage_dtype(params[name].dtype))
        for name, value in fisher_lib.fisher_from_sums(sums.sums, count).items()
    }
    anchor = {
        name: _distributed.local_tensor(p.detach()).to(storage_dtype(p.dtype), copy=True)
        for name, p in params.items()
    }
    try:
        check_task(fisher, anchor, error=ConsolidationError)
    except ConsolidationError as error:
        raise ConsolidationError(f"{error}{after}; the consolidated state is unchanged") from None
    return fisher, anchor


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
