"""The consolidated EWC state: one collapsed quadratic per parameter, versioned and serialisable.

The state is immutable in use: :meth:`ConsolidatedState.with_task` returns a *new* state, so a
consolidation that fails part-way can never leave a half-updated one behind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ewc._typing import TensorDict
from ewc.errors import ParameterMismatchError, StateDictError
from ewc.penalty import merge_online, merge_separate, pad_to

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "ConsolidatedState", "storage_dtype"]

FORMAT_NAME = "ewc.EWC"
FORMAT_VERSION = 1
"""Version of :meth:`ConsolidatedState.state_dict`'s layout; bumped on every change of format."""


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the state keeps for a parameter of ``dtype``: float32, or wider if the model is."""
    return torch.promote_types(dtype, torch.float32)


def _check_fits(name: str, stored: torch.Size, new: torch.Size) -> None:
    """A parameter may grow (padded with zero importance); it may not shrink or change rank."""
    if len(stored) != len(new) or any(n < s for s, n in zip(stored, new)):
        raise ParameterMismatchError(
            f"parameter {name!r} was consolidated with shape {tuple(stored)} but now has shape "
            f"{tuple(new)}; a consolidated parameter may only grow along its dimensions"
        )


@dataclass(frozen=True)
class ConsolidatedState:
    """Collapsed quadratic ``(A, m, r)`` over all consolidated tasks, plus optional history.

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

        Parameters present before but absent from ``fisher`` (frozen since) keep their quadratic.
        A parameter that shrank or changed rank raises :class:`ParameterMismatchError`.
        Cost: O(P) time and memory.
        """
        importance = dict(self.importance)
        centre = dict(self.centre)
        offset = self.offset.clone()
        for name, new_fisher in fisher.items():
            new_anchor = anchor[name]
            if name not in importance:
                importance[name], centre[name] = new_fisher, new_anchor
                continue
            _check_fits(name, importance[name].shape, new_fisher.shape)
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
        """Plain, ``torch.save``/``torch.load(weights_only=True)``-able dict of the state."""
        return {
            "tasks": self.tasks,
            "importance": dict(self.importance),
            "centre": dict(self.centre),
            "offset": self.offset,
            "history": [
                {"fisher": dict(entry["fisher"]), "anchor": dict(entry["anchor"])}
                for entry in self.history
            ],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> ConsolidatedState:
        """Validate and rebuild a state from :meth:`state_dict`'s output (tensors are cloned)."""
        expected = {"tasks", "importance", "centre", "offset", "history"}
        missing = expected - state.keys()
        if missing:
            raise StateDictError(f"EWC state dict is missing key(s) {sorted(missing)}")
        tasks = state["tasks"]
        if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 0:
            raise StateDictError(f"EWC state dict has `tasks` = {tasks!r}; expected an int >= 0")
        importance = _tensor_dict(state["importance"], "importance")
        centre = _tensor_dict(state["centre"], "centre")
        if importance.keys() != centre.keys():
            raise StateDictError(
                "EWC state dict has mismatched parameter names: importance has "
                f"{sorted(importance)}, centre has {sorted(centre)}"
            )
        for name in importance:
            if importance[name].shape != centre[name].shape:
                raise StateDictError(
                    f"EWC state dict: parameter {name!r} has importance of shape "
                    f"{tuple(importance[name].shape)} but centre of shape "
                    f"{tuple(centre[name].shape)}"
                )
            if not torch.isfinite(importance[name]).all() or (importance[name] < 0).any():
                raise StateDictError(
                    f"EWC state dict: importance of parameter {name!r} has negative or "
                    "non-finite values"
                )
        offset = state["offset"]
        if not isinstance(offset, Tensor) or offset.numel() != 1:
            raise StateDictError(f"EWC state dict has `offset` = {offset!r}; expected a scalar")
        if not math.isfinite(float(offset)):
            raise StateDictError(f"EWC state dict has a non-finite `offset` = {float(offset)}")
        if tasks == 0 and importance:
            raise StateDictError("EWC state dict has parameters but `tasks` = 0")
        raw_history = state["history"]
        if not isinstance(raw_history, list):
            raise StateDictError(f"EWC state dict has `history` of type {type(raw_history)}")
        history = []
        for index, entry in enumerate(raw_history):
            if not isinstance(entry, Mapping) or entry.keys() != {"fisher", "anchor"}:
                raise StateDictError(f"EWC state dict: `history[{index}]` is damaged")
            history.append(
                {
                    "fisher": _tensor_dict(entry["fisher"], f"history[{index}].fisher"),
                    "anchor": _tensor_dict(entry["anchor"], f"history[{index}].anchor"),
                }
            )
        return cls(
            importance,
            centre,
            offset.detach().clone().reshape(()).to(torch.float64),
            tasks,
            tuple(history),
        )


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
