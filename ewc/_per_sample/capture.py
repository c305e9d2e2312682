"""One forward pass that records, for every rule-covered module, its inputs and its output.

Forward hooks capture each call's (detached) inputs and the module output as the node the backward
signals are propagated to; the hook hands the rest of the model a *clone* of the output, so later
in-place ops (``ReLU(inplace=True)``) cannot rewrite the captured node. After the forward, one
walk over the autograd graph counts the edges into each covered parameter's gradient
accumulator: more than the one its module's call creates means the parameter also reaches the
output some other way (a parent using ``self.fc.weight`` directly), which disqualifies its module
from the rule path. Uses that do not reach the output contribute no gradient and do not count.

A module's rule applies only when, in that forward, the module ran exactly once, with positional
inputs whose dim 0 is the batch size (checked by the rule's ``supports``), its parameters were used
nowhere else, and its inputs and output were not modified in place afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ewc._per_sample.rules.registry import LayerRule, rule_for

__all__ = ["Candidate", "Capture", "CoveredCall", "edges_into", "plan_candidates", "release"]


@dataclass
class Candidate:
    """A module with a registered rule that owns some of the requested parameters.

    Attributes:
        module: the module.
        rule: its rule.
        names: local parameter name (``"weight"``) -> name in ``params`` (``"fc.weight"``).
    """

    module: nn.Module
    rule: LayerRule
    names: dict[str, str]
    calls: int = 0
    inputs: tuple[Any, ...] = ()
    versions: tuple[int, ...] = ()
    output: Tensor | None = None
    output_version: int = 0
    unbound: bool = False
    side_outputs: tuple[Tensor, ...] = ()


@dataclass
class CoveredCall:
    """A candidate whose single call qualifies for its rule: inputs and the output node."""

    candidate: Candidate
    inputs: tuple[Tensor, ...]
    output: Tensor


def plan_candidates(model: nn.Module, params: Mapping[str, Tensor]) -> list[Candidate]:
    """Modules with a rule that own requested parameters held by no other module.

    Cost: one walk over ``model.named_parameters(remove_duplicate=False)``.
    """
    wanted = {id(tensor): name for name, tensor in params.items()}
    slots: dict[int, int] = {}
    for _, tensor in model.named_parameters(remove_duplicate=False):
        slots[id(tensor)] = slots.get(id(tensor), 0) + 1
    claimed: set[int] = set()  # a parent whose rule owns its children's parameters comes first
    candidates = []
    for module in model.modules():
        rule = rule_for(module)
        if rule is None:
            continue
        names = {
            local: wanted[id(tensor)]
            for local, tensor in module.named_parameters(recurse=rule.owns_children)
            if id(tensor) in wanted and slots.get(id(tensor)) == 1 and id(tensor) not in claimed
        }
        if names:
            claimed.update(id(module.get_parameter(local)) for local in names)
            candidates.append(Candidate(module, rule, names))
    return candidates


def edges_into(output: Tensor, watched: set[int]) -> dict[int, int]:
    """Per watched parameter id, the number of autograd edges into its gradient accumulator in
    the graph of ``output``. Cost: one visit per graph node."""
    counts = dict.fromkeys(watched, 0)
    root = output.grad_fn
    if root is None:
        return counts
    stack, seen = [root], {root}
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)  # set on AccumulateGrad nodes only
            if variable is not None:
                if id(variable) in counts:
                    counts[id(variable)] += 1
            elif child not in seen:
                seen.add(child)
                stack.append(child)
    return counts


class Capture:
    """Context manager: forward hooks on the candidates for one forward.

    Example:
        >>> capture = Capture(plan_candidates(model, params))  # doctest: +SKIP
        >>> with capture, torch.enable_grad():
        ...     output, target = run_model(model, batch)
        >>> covered, rejected = capture.covered(output, batch_size=output.shape[0])
    """

    def __init__(self, candidates: list[Candidate]) -> None:
        self.candidates = candidates
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> Capture:
        for candidate in self.candidates:
            self._handles.append(
                candidate.module.register_forward_hook(self._hook(candidate), with_kwargs=True)
            )
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, candidate: Candidate) -> Any:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Any:
            candidate.calls += 1
            rest: tuple[Any, ...] | None = None
            if candidate.rule.tuple_output and isinstance(output, tuple) and output:
                output, rest = output[0], tuple(output[1:])
            if candidate.calls > 1 or not isinstance(output, Tensor):
                candidate.output = None
                candidate.inputs = ()
                return None
            bound = candidate.rule.bind(module, args, kwargs)
            candidate.unbound = bound is None
            bound = () if bound is None else bound
            candidate.inputs = tuple(a.detach() if isinstance(a, Tensor) else a for a in bound)
            candidate.versions = tuple(a._version for a in bound if isinstance(a, Tensor))
            if not output.requires_grad and torch.is_grad_enabled() and output.is_floating_point():
                # frozen weights and an input without grad: a leaf gives the signals a target
                output = output.detach().requires_grad_(True)
            candidate.output = output
            candidate.output_version = output._version
            candidate.side_outputs = tuple(
                t for t in rest or () if isinstance(t, Tensor) and t.grad_fn is not None
            )
            if rest is None:
                return output.clone()
            return (output.clone(), *rest)

        return hook

    def covered(
        self, output: Tensor, batch_size: int, edges: dict[int, int] | None = None
    ) -> tuple[list[CoveredCall], dict[str, str]]:
        """The calls whose rule applies, and per rejected module name a reason (for the log).

        Args:
            output: the model output of the captured forward (its graph is inspected).
            batch_size: the number of examples (dim 0 of the output).
            edges: :func:`edges_into` of ``output`` for (at least) the candidates' parameters,
                if the caller already walked the graph.
        """
        covered: list[CoveredCall] = []
        rejected: dict[str, str] = {}
        watched = {
            id(candidate.module.get_parameter(local))
            for candidate in self.candidates
            for local in candidate.names
        }
        edges = edges if edges is not None else edges_into(output, watched)
        for candidate in self.candidates:
            reason = self._rejection(candidate, batch_size, edges, output)
            if reason is None and candidate.output is not None:
                covered.append(CoveredCall(candidate, candidate.inputs, candidate.output))
            else:
                rejected[f"{type(candidate.module).__name__}@{id(candidate.module):x}"] = (
                    reason or "no output"
                )
        return covered, rejected

    def _rejection(
        self, candidate: Candidate, batch_size: int, edges: dict[int, int], model_output: Tensor
    ) -> str | None:
        if candidate.calls == 0:
            return "not called"
        if candidate.calls > 1:
            return f"called {candidate.calls} times in one forward (weight sharing)"
        if any(edges[id(candidate.module.get_parameter(local))] > 1 for local in candidate.names):
            return "a parameter also reaches the output outside the module's own call"
        if candidate.unbound:
            return "the rule does not take this call's arguments (keyword arguments?)"
        output = candidate.output
        if output is None or not output.requires_grad:
            return "the output is not part of the autograd graph"
        if output.dim() == 0 or output.shape[0] != batch_size:
            return f"output dim 0 is not the batch size {batch_size}"
        tensors = [a for a in candidate.inputs if isinstance(a, Tensor)]
        if [a._version for a in tensors] != list(candidate.versions):
            return "an input was modified in place after the call"
        if output._version != candidate.output_version:
            return "the output was modified in place"
        if candidate.side_outputs and _reaches(model_output, candidate.side_outputs):
            return "another of its outputs (e.g. attention weights) reaches the model output"
        if not candidate.rule.supports(candidate.module, candidate.inputs, batch_size):
            return "the rule does not support this call (input layout or mode)"
        return None


def _reaches(output: Tensor, tensors: tuple[Tensor, ...]) -> bool:
    """Whether any of ``tensors`` is part of the autograd graph of ``output`` (one graph walk)."""
    targets = {t.grad_fn for t in tensors}
    root = output.grad_fn
    stack, seen = ([root], {root}) if root is not None else ([], set())
    while stack:
        node = stack.pop()
        if node in targets:
            return True
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return False


def release(candidates: list[Candidate]) -> None:
    """Drop captured tensors so the autograd graph can be freed."""
    for candidate in candidates:
        candidate.inputs = ()
        candidate.output = None
        candidate.side_outputs = ()
