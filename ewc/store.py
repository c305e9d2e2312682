"""The consolidated EWC state: one collapsed quadratic per parameter, versioned and serialisable.

The state is immutable in use: :meth:`ConsolidatedState.with_task` returns a *new* state, so a
consolidation that fails part-way can never leave a half-updated one behind. Every rule about
what may enter the state (finite, non-negative importance, float32/float64 strided tensors with
no autograd graph, parameters that only grow) is checked here, once, for every way in:
:meth:`~ConsolidatedState.with_task` (consolidation, ``EWC.add_task``) and
:meth:`~ConsolidatedState.from_state_dict` / :func:`unpack` (loading).

:meth:`ConsolidatedState.bind` gives the view of the state aligned with one model that the
penalty and its gradient read (see :mod:`ewc.aligned`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ewc._typing import TensorDict
from ewc.errors import ParameterMismatchError, StateDictError
from ewc.penalty import merge_online, merge_separate, pad_to

if TYPE_CHECKING:
    from ewc.aligned import AlignedState

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "STORAGE_DTYPES",
    "ConsolidatedState",
    "check_fits",
    "check_task",
    "pack",
    "storage_dtype",
    "task_copies",
    "unpack",
]

FORMAT_NAME = "ewc.EWC"
FORMAT_VERSION = 1
"""Version of :meth:`ConsolidatedState.state_dict`'s layout; bumped on every change of format."""

STORAGE_DTYPES = (torch.float32, torch.float64)
"""Dtypes a state tensor may have (see :func:`storage_dtype`)."""


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the state keeps for a parameter of ``dtype``: float32, or wider if the model is."""
    return torch.promote_types(dtype, torch.float32)


def check_fits(name: str, stored: torch.Size, new: torch.Size) -> None:
    """A parameter may grow (padded with zero importance); it may not shrink or change rank.

    Raises:
        ParameterMismatchError: naming the parameter and both shapes.
    """
    if len(stored) != len(new) or any(n < s for s, n in zip(stored, new)):
        raise ParameterMismatchError(
            f"parameter {name!r} was consolidated with shape {tuple(stored)} but now has shape "
            f"{tuple(new)}; a consolidated parameter may only grow along its dimensions"
        )


def _tensor_problem(tensor: Tensor, *, importance: bool) -> str | None:
    """Why ``tensor`` may not enter the state, or None. Cost: one pass over the tensor."""
    if tensor.layout != torch.strided:
        return f"is a {tensor.layout} tensor; only dense (strided) tensors can be stored"
    if tensor.device.type == "meta":
        return "is on the meta device (it holds no values)"
    if tensor.dtype not in STORAGE_DTYPES:
        return f"has dtype {tensor.dtype}; the state stores float32 or float64"
    if importance:
        # entries are >= 0 when valid, so a float64 sum is finite iff every entry is (or the
        # sum overflowed: then look closer), and one min finds a negative entry
        if tensor.numel() and (
            float(tensor.min()) < 0
            or (
                not math.isfinite(float(tensor.sum(dtype=torch.float64)))
                and not bool(torch.isfinite(tensor).all())
            )
        ):
            return "has negative or non-finite values"
    elif not bool(torch.isfinite(tensor).all()):
        return "has NaN or infinite values"
    return None


def check_task(
    fisher: Mapping[str, Any],
    anchor: Mapping[str, Any],
    *,
    error: type[Exception] = ValueError,
    what: tuple[str, str] = ("fisher", "anchor"),
) -> None:
    """Check one task ``(F, a)`` before it enters the state; raise ``error`` naming the problem.

    Same names in both, tensors of equal shapes, float32/float64 dense values, ``F`` finite and
    ``>= 0``, ``a`` finite. Cost: O(P), no copy.
    """
    if set(fisher) != set(anchor):
        raise error(
            f"`{what[0]}` and `{what[1]}` must name the same parameters but got {sorted(fisher)} "
            f"and {sorted(anchor)}"
        )
    for name, value in fisher.items():
        for key, tensor, is_importance in ((what[0], value, True), (what[1], anchor[name], False)):
            if not isinstance(tensor, Tensor):
                raise error(f"`{key}[{name!r}]` is a {type(tensor).__name__}; expected a tensor")
            problem = _tensor_problem(tensor.detach(), importance=is_importance)
            if problem is not None:
                raise error(f"`{key}[{name!r}]` {problem}")
        if value.shape != anchor[name].shape:
            raise error(
                f"parameter {name!r} has `{what[0]}` of shape {tuple(value.shape)} but "
                f"`{what[1]}` of shape {tuple(anchor[name].shape)}"
            )


def task_copies(
    fisher: Mapping[str, Any], anchor: Mapping[str, Any]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Checked copies of a task given by a user (``EWC.add_task``): each pair in the state's
    dtype for the anchor's (float32 or wider), the anchor on the Fisher's device.

    Raises:
        TypeError: not mappings of names to tensors.
        ValueError: no parameter, or :func:`check_task` refuses the copies.
    """
    for given, argument in ((fisher, "fisher"), (anchor, "anchor")):
        if not isinstance(given, Mapping):
            raise TypeError(
                f"Expected argument `{argument}` to map parameter names to tensors but got "
                f"{type(given).__name__}"
            )
    if not fisher and not anchor:
        raise ValueError("Arguments `fisher` and `anchor` name no parameter; nothing to add")
    if set(fisher) != set(anchor):
        raise ValueError(
            f"Arguments `fisher` and `anchor` must name the same parameters but got "
            f"{sorted(fisher)} and {sorted(anchor)}"
        )
    copies: tuple[dict[str, Tensor], dict[str, Tensor]] = ({}, {})
    for name, value in fisher.items():
        if not isinstance(value, Tensor) or not isinstance(anchor[name], Tensor):
            raise TypeError(f"Expected tensors for parameter {name!r} in `fisher`/`anchor`")
        dtype = storage_dtype(anchor[name].dtype)
        copies[0][name] = value.detach().to(dtype=dtype, copy=True)
        copies[1][name] = anchor[name].detach().to(device=value.device, dtype=dtype, copy=True)
    check_task(*copies, error=ValueError)
    return copies


def _owned(tensor: Tensor) -> Tensor:
    """``tensor`` without an autograd graph (a detached view; no copy when it has none)."""
    return tensor.detach() if tensor.requires_grad or tensor.grad_fn is not None else tensor


@dataclass(frozen=True)
class ConsolidatedState:
    """Collapsed quadratic ``(A, m, r)`` over all consolidated tasks, plus optional history.

    No tensor of a state carries an autograd graph: every tensor is detached on the way in.

    Attributes:
        importance: ``A``, summed (separate) or decayed (online) Fisher per parameter.
        centre: ``m``, the importance-weighted mean of the anchors (online: the latest anchor).
        offset: ``r``, float64 scalar so that the collapsed penalty equals the per-task sum.
        tasks: number of consolidations so far.
        history: per task ``{"fisher": {...}, "anchor": {...}}`` when importance data is kept.
    """

    importance: TensorDict = field(default_factory=dict)
    centre: TensorDict = field(default_factory=dict)
    offset: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    tasks: int = 0
    history: tuple[dict[str, TensorDict], ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: the constructor is the only writer
        set_(self, "importance", {n: _owned(t) for n, t in self.importance.items()})
        set_(self, "centre", {n: _owned(t) for n, t in self.centre.items()})
        set_(self, "offset", _owned(self.offset))
        set_(
            self,
            "history",
            tuple(
                {part: {n: _owned(t) for n, t in entry[part].items()} for part in entry}
                for entry in self.history
            ),
        )

    def bind(self, model: nn.Module, *, reuse: AlignedState | None = None) -> AlignedState:
        """The state aligned with ``model``'s parameters; see :class:`ewc.aligned.AlignedState`.

        ``reuse``: a view from an earlier call; returned as is when it is a view of this state
        and the model's parameters (names, identities, shapes, dtypes, devices, trainable flags)
        are unchanged, so that per-step callers pay for the checks once.

        Raises:
            ParameterMismatchError: a consolidated parameter is missing or no longer fits.
        """
        from ewc.aligned import AlignedState  # the view imports this module

        return AlignedState.of(self, model, reuse)

    def with_task(
        self,
        fisher: Mapping[str, Tensor],
        anchor: Mapping[str, Tensor],
        *,
        mode: str,
        decay_factor: float | None,
        keep_history: bool,
    ) -> ConsolidatedState:
        """Return the state after consolidating one more task ``(F, a)``; ``self`` is untouched.

        ``F`` and ``a`` must have passed :func:`check_task` and be owned by the caller (they are
        stored, not copied). Parameters present before but absent from ``fisher`` (frozen
        since) keep their quadratic. A parameter that shrank or changed rank raises
        :class:`ParameterMismatchError`. Cost: O(P) time and memory.
        """
        fisher = {name: _owned(value) for name, value in fisher.items()}
        anchor = {name: _owned(value) for name, value in anchor.items()}
        importance = dict(self.importance)
        centre = dict(self.centre)
        offset = self.offset.clone()
        for name, new_fisher in fisher.items():
            new_anchor = anchor[name]
            if name not in importance:
                importance[name], centre[name] = new_fisher, new_anchor
                continue
            check_fits(name, importance[name].shape, new_fisher.shape)
            old_importance = pad_to(importance[name], new_fisher.shape).to(new_fisher.device)
            old_centre = pad_to(centre[name], new_fisher.shape).to(new_fisher.device)
            if mode == "online":
                if decay_factor is None:
                    raise ValueError("online mode needs `decay_factor`, got None")
                importance[name] = merge_online(old_importance, new_fisher, decay_factor)
                centre[name] = new_anchor
            else:
                importance[name], centre[name], delta = merge_separate(
                    old_importance, old_centre, new_fisher, new_anchor
                )
                offset = offset + delta.to(offset.device)
        if mode == "online":
            # A parameter frozen since the last task gets no new Fisher, so its importance only
            # decays (as in Avalanche, where it would get a zero importance). One centre per
            # parameter means the constant is always 0.
            for name in importance.keys() - fisher.keys():
                importance[name] = merge_online(
                    importance[name], torch.zeros_like(importance[name]), decay_factor or 0.0
                )
            offset = torch.zeros_like(offset)
        history = self.history
        if keep_history:
            history = (*history, {"fisher": dict(fisher), "anchor": dict(anchor)})
        return ConsolidatedState(importance, centre, offset, self.tasks + 1, history)

    def state_dict(self) -> dict[str, Any]:
        """Plain, ``torch.save``/``torch.load(weights_only=True)``-able dict of the state.

        The tensors are **copies** (unlike ``nn.Module.state_dict``): writing into them cannot
        put negative or non-finite values into the state. Cost: O(P) memory on the state's
        device per call (O(T P) with history).
        """
        return {
            "tasks": self.tasks,
            "importance": {n: t.clone() for n, t in self.importance.items()},
            "centre": {n: t.clone() for n, t in self.centre.items()},
            "offset": self.offset.clone(),
            "history": [
                {part: {n: t.clone() for n, t in entry[part].items()} for part in entry}
                for entry in self.history
            ],
        }

    @classmethod
    def from_state_dict(cls, state: Any) -> ConsolidatedState:
        """Validate and rebuild a state from :meth:`state_dict`'s output (tensors are cloned).

        Refuses, with a :class:`StateDictError` naming the key and the problem: missing or extra
        keys; ``tasks`` not an int >= 0 or fewer than the history's entries; importance and
        centre tensors that are not float32/float64, dense, off the meta device, of one dtype
        and shape per parameter, importance finite and >= 0, centre finite; an offset that is
        not a finite float scalar >= 0; history entries that are not valid tasks of
        consolidated parameters (at most their shapes).
        """
        if not isinstance(state, Mapping):
            raise StateDictError(
                f"EWC state dict has `state` = {_short(state)}; expected a dict with keys "
                f"{sorted(_STATE_KEYS)}"
            )
        _check_keys(state, _STATE_KEYS, "state")
        tasks = state["tasks"]
        if type(tasks) is not int or tasks < 0:
            raise StateDictError(f"EWC state dict has `tasks` = {tasks!r}; expected an int >= 0")
        importance = _tensor_dict(state["importance"], "importance")
        centre = _tensor_dict(state["centre"], "centre")
        if importance.keys() != centre.keys():
            raise StateDictError(
                "EWC state dict has mismatched parameter names: importance has "
                f"{sorted(importance)}, centre has {sorted(centre)}"
            )
        for name in importance:
            _check_stored("importance", name, importance[name], importance=True)
            _check_stored("centre", name, centre[name], importance=False)
            if importance[name].shape != centre[name].shape:
                raise StateDictError(
                    f"EWC state dict: parameter {name!r} has importance of shape "
                    f"{tuple(importance[name].shape)} but centre of shape "
                    f"{tuple(centre[name].shape)}"
                )
            if importance[name].dtype != centre[name].dtype:
                raise StateDictError(
                    f"EWC state dict: parameter {name!r} has importance of dtype "
                    f"{importance[name].dtype} but centre of dtype {centre[name].dtype}"
                )
        offset = _checked_offset(state["offset"])
        if tasks == 0 and importance:
            raise StateDictError("EWC state dict has parameters but `tasks` = 0")
        history = _checked_history(state["history"], importance, tasks)
        return cls(importance, centre, offset, tasks, history)


_STATE_KEYS = frozenset({"tasks", "importance", "centre", "offset", "history"})
_ENVELOPE_KEYS = frozenset({"format", "version", "config", "state"})


def pack(config: Mapping[str, Any], state: ConsolidatedState) -> dict[str, Any]:
    """The versioned dict ``EWC.state_dict`` returns: format, version, options and the state."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": dict(config),
        "state": state.state_dict(),
    }


def unpack(
    state_dict: Any, config_keys: frozenset[str] | set[str]
) -> tuple[dict[str, Any], ConsolidatedState]:
    """Validate a dict from :func:`pack`; return its options and its (cloned) state.

    ``config_keys``: the options the reader knows; others are refused, missing ones are not
    (older writers), except ``mode``. Raises :class:`StateDictError` naming the key.
    """
    if not isinstance(state_dict, Mapping):
        raise StateDictError(
            f"not an EWC state dict: expected a dict with `format` = {FORMAT_NAME!r}, got a "
            f"{type(state_dict).__name__}: {_short(state_dict)}"
        )
    if state_dict.get("format") != FORMAT_NAME:
        raise StateDictError(
            f"not an EWC state dict: expected `format` = {FORMAT_NAME!r}, found "
            f"{_short(state_dict.get('format'))}"
        )
    version = state_dict.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise StateDictError(
            f"EWC state dict has format version {version!r}; this ewc reads version "
            f"{FORMAT_VERSION} (an int)"
        )
    _check_keys(state_dict, _ENVELOPE_KEYS, "the state dict", required={"config", "state"})
    config = state_dict["config"]
    if not isinstance(config, Mapping) or "mode" not in config:
        raise StateDictError(f"EWC state dict is missing its `config` (got {_short(config)})")
    extra = sorted(set(config) - set(config_keys))
    if extra:
        raise StateDictError(f"EWC state dict has unknown `config` key(s) {extra}")
    return dict(config), ConsolidatedState.from_state_dict(state_dict["state"])


# ---------------------------------------------------------------------- loading checks
def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _check_keys(
    mapping: Mapping[str, Any],
    expected: frozenset[str],
    where: str,
    required: set[str] | frozenset[str] | None = None,
) -> None:
    missing = sorted((expected if required is None else required) - mapping.keys())
    if missing:
        raise StateDictError(f"EWC state dict is missing key(s) {missing} in {where}")
    extra = sorted(str(key) for key in mapping.keys() - expected)
    if extra:
        raise StateDictError(f"EWC state dict has unknown key(s) {extra} in {where}")


def _tensor_dict(value: Any, key: str) -> TensorDict:
    if not isinstance(value, Mapping):
        raise StateDictError(f"EWC state dict has `{key}` of type {type(value).__name__}")
    result: TensorDict = {}
    for name, tensor in value.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise StateDictError(
                f"EWC state dict: `{key}` maps {name!r} to {type(tensor).__name__}; "
                "expected parameter names to tensors"
            )
        result[name] = tensor.detach().clone()
    return result


def _check_stored(key: str, name: str, tensor: Tensor, *, importance: bool) -> None:
    problem = _tensor_problem(tensor, importance=importance)
    if problem is not None:
        raise StateDictError(f"EWC state dict: `{key}[{name!r}]` {problem}")


def _checked_offset(offset: Any) -> Tensor:
    if not isinstance(offset, Tensor) or offset.numel() != 1:
        raise StateDictError(f"EWC state dict has `offset` = {_short(offset)}; expected a scalar")
    if offset.layout != torch.strided or offset.device.type == "meta":
        raise StateDictError(
            f"EWC state dict has `offset` = {_short(offset)}; expected a dense one"
        )
    if not offset.is_floating_point():
        raise StateDictError(f"EWC state dict has `offset` of dtype {offset.dtype}; expected float")
    value = float(offset)
    if not math.isfinite(value):
        raise StateDictError(f"EWC state dict has a non-finite `offset` = {value}")
    if value < 0:
        raise StateDictError(
            f"EWC state dict has a negative `offset` = {value}; it is a sum of squares (>= 0)"
        )
    return offset.detach().clone().reshape(()).to(torch.float64)


def _checked_history(
    raw: Any, importance: Mapping[str, Tensor], tasks: int
) -> tuple[dict[str, TensorDict], ...]:
    if not isinstance(raw, list):
        raise StateDictError(f"EWC state dict has `history` of type {type(raw).__name__}")
    if len(raw) > tasks:
        raise StateDictError(
            f"EWC state dict has {len(raw)} `history` entries but `tasks` = {tasks}; the history "
            "holds at most one entry per task"
        )
    history = []
    for index, entry in enumerate(raw):
        key = f"history[{index}]"
        if not isinstance(entry, Mapping) or set(entry) != {"fisher", "anchor"}:
            raise StateDictError(
                f"EWC state dict: `{key}` is damaged: expected a dict with keys "
                f"['anchor', 'fisher'], got {_short(entry)}"
            )
        fisher = _tensor_dict(entry["fisher"], f"{key}.fisher")
        anchor = _tensor_dict(entry["anchor"], f"{key}.anchor")
        check_task(fisher, anchor, error=StateDictError, what=(f"{key}.fisher", f"{key}.anchor"))
        for name, value in fisher.items():
            if name not in importance:
                raise StateDictError(
                    f"EWC state dict: `{key}` names parameter {name!r}, which has no importance"
                )
            stored = importance[name].shape
            if len(stored) != value.dim() or any(h > s for h, s in zip(value.shape, stored)):
                raise StateDictError(
                    f"EWC state dict: `{key}.fisher[{name!r}]` has shape {tuple(value.shape)}, "
                    f"larger than the consolidated shape {tuple(stored)}"
                )
        history.append({"fisher": fisher, "anchor": anchor})
    return tuple(history)
