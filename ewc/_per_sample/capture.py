"""One forward pass that records, for every module that owns requested parameters, each call's
inputs and output nodes.

Two kinds of candidate:

* a module with a layer rule (:mod:`ewc._per_sample.rules`): its rule turns (inputs, output
  gradients) into squared sums in closed form;
* a module without a rule that holds requested parameters itself (a raw ``nn.Parameter`` used in
  ``forward``, ViT's ``cls_token``): the per-layer ``torch.func`` step
  (:mod:`ewc._per_sample.layerwise`) differentiates that module's call alone.

Forward hooks record every call's (detached) arguments and its output tensors as the nodes the
backward signals are propagated to; the hook hands the rest of the model *clones* of them, so
later in-place ops (``ReLU(inplace=True)``) cannot rewrite the captured nodes. An output of
size 1 along dim 0 (an embedding of position ids ``(1, L)``, for rules that declare
``broadcast``) is handed on expanded to the batch size, so each example's gradient with
respect to it stays its own; the values the model computes do not change where the model
broadcasts it anyway (the engine re-runs the forward without expansion if the expanded one
fails or changes the batch size).

After the forward, graph walks check the attribution: the autograd edges into a parameter's
gradient accumulator must all come from the calls of the modules that own it (a parent using
``self.fc.weight`` directly adds an edge no call accounts for, and sends the parameter to the
whole-model fallback). Uses that do not reach the output contribute no gradient and do not count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils.hooks import RemovableHandle

from ewc._per_sample.rules.registry import LayerRule, rule_for
from ewc._typing import present

__all__ = [
    "Call",
    "Candidate",
    "Capture",
    "call_edges",
    "edges_into",
    "plan_candidates",
    "release",
]


@dataclass
class Call:
    """One call of a candidate module, as the forward hook saw it.

    Attributes:
        args, kwargs: the call's arguments, tensors detached (the per-layer step re-runs the call).
        inputs: the rule's view of the arguments (its ``bind``), detached; ``()`` without a rule.
        unbound: the rule's ``bind`` refused the arguments.
        leaves: the captured output nodes (tensors in the autograd graph).
        leaf_index: per captured node, its index among the flattened output's leaves.
        reason: why the per-layer step cannot take this call (None: it can).
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[Any, ...] = ()
    unbound: bool = False
    input_tensors: tuple[Tensor, ...] = ()
    input_versions: tuple[int, ...] = ()
    stops: frozenset[Any] = frozenset()
    leaves: list[Tensor] = field(default_factory=list)
    leaf_index: list[int] = field(default_factory=list)
    leaf_versions: list[int] = field(default_factory=list)
    side_outputs: tuple[Tensor, ...] = ()
    reason: str | None = None


@dataclass
class Candidate:
    """A module that owns some of the requested parameters, with or without a rule.

    Attributes:
        module: the module.
        rule: its rule, or None (the per-layer ``torch.func`` step).
        names: local parameter name (``"weight"``) -> name in ``params`` (``"fc.weight"``).
        calls: the calls recorded in the captured forward.
    """

    module: nn.Module
    rule: LayerRule | None
    names: dict[str, str]
    calls: list[Call] = field(default_factory=list)

    @property
    def label(self) -> str:
        return type(self.module).__name__

    @property
    def layer_path(self) -> str:
        """The path name of the per-layer step on this module: ``"layer:<Type>"``."""
        return f"layer:{self.label}"


def plan_candidates(model: nn.Module, params: Mapping[str, Tensor]) -> list[Candidate]:
    """The modules that own requested parameters: those with a rule, and those without one that
    hold requested parameters directly.

    A parameter held by several modules (tied weights) goes to each of them; a module whose rule
    owns its children's parameters (``MultiheadAttention.out_proj``) takes them from the children,
    and a module holding a parameter that a descendant also holds leaves it to the descendant.

    Cost: one walk over ``model.named_modules()``.
    """
    wanted = {id(tensor): name for name, tensor in params.items()}
    modules = dict(model.named_modules(remove_duplicate=False))
    holders: dict[int, list[str]] = {}
    for prefix, module in modules.items():
        for _, tensor in module.named_parameters(recurse=False):
            if id(tensor) in wanted:
                holders.setdefault(id(tensor), []).append(prefix)
    claimed: set[int] = set()  # by a parent whose rule owns its children's parameters
    candidates: list[Candidate] = []
    seen: set[int] = set()
    for prefix, module in modules.items():
        if id(module) in seen:
            continue
        seen.add(id(module))
        rule = rule_for(module)
        recurse = rule is not None and rule.owns_children
        names: dict[str, str] = {}
        for local, tensor in module.named_parameters(recurse=recurse):
            key = id(tensor)
            if key not in wanted or key in claimed:
                continue
            if not recurse and _held_below(prefix, holders[key]):
                continue
            names[local] = wanted[key]
        if names:
            if recurse:
                claimed.update(id(module.get_parameter(local)) for local in names)
            candidates.append(Candidate(module, rule, names))
    return candidates


def _held_below(prefix: str, holders: list[str]) -> bool:
    """Whether a strict descendant of module ``prefix`` also holds the parameter."""
    start = f"{prefix}." if prefix else ""
    return any(holder != prefix and holder.startswith(start) for holder in holders)


def edges_into(output: Tensor, watched: set[int]) -> tuple[dict[int, int], set[Any]]:
    """Per watched parameter id, the number of autograd edges into its gradient accumulator in
    the graph of ``output``, and the set of graph nodes visited. Cost: one visit per node."""
    counts = dict.fromkeys(watched, 0)
    root = output.grad_fn
    if root is None:
        return counts, set()
    seen = _walk([root], counts, frozenset())
    return counts, seen


def call_edges(call: Call, watched: set[int]) -> dict[int, int]:
    """Edges into the watched accumulators from the graph between a call's inputs and its
    captured outputs (the call's own uses of the parameters)."""
    counts = dict.fromkeys(watched, 0)
    roots = [leaf.grad_fn for leaf in call.leaves if leaf.grad_fn is not None]
    _walk(roots, counts, call.stops)
    return counts


def _walk(roots: list[Any], counts: dict[int, int], stops: frozenset[Any]) -> set[Any]:
    stack = [root for root in roots if root not in stops]
    seen = set(stack)
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)  # set on AccumulateGrad nodes only
            if variable is not None:
                if id(variable) in counts:
                    counts[id(variable)] += 1
            elif child not in seen and child not in stops:
                seen.add(child)
                stack.append(child)
    return seen


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value


class Capture:
    """Context manager: forward hooks on the candidates for one forward.

    Args:
        candidates: from :func:`plan_candidates`.
        batch_size: the expected number of examples, or None; outputs of size 1 along dim 0 are
            expanded to it (for rules that accept broadcast inputs and for the per-layer step)
            when ``expand`` is true.

    Example:
        >>> capture = Capture(plan_candidates(model, params), 8)  # doctest: +SKIP
        >>> with capture, torch.enable_grad():
        ...     output, target = run_model(model, batch)
    """

    def __init__(
        self, candidates: list[Candidate], batch_size: int | None, *, expand: bool = True
    ) -> None:
        self.candidates = candidates
        self.batch_size = batch_size
        self.expand = expand and batch_size is not None and batch_size > 1
        self.expanded = False
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> Capture:
        for candidate in self.candidates:
            candidate.calls = []
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

    def _node(self, tensor: Tensor, may_expand: bool) -> Tensor | None:
        """The tensor as a captured node (a graph leaf if nothing upstream requires grad, expanded
        along a broadcast dim 0), or None when it cannot carry per-example gradients."""
        if not tensor.is_floating_point() or tensor.dim() == 0:
            return None
        if not tensor.requires_grad:
            if not torch.is_grad_enabled():
                return None
            # frozen weights and an input without grad: a leaf gives the signals a target
            tensor = tensor.detach().requires_grad_(True)
        if may_expand and self.expand and tensor.shape[0] == 1:
            batch_size = present(self.batch_size, "the batch size of an expanded input")
            tensor = tensor.expand(batch_size, *tensor.shape[1:])
            self.expanded = True
        return tensor

    def _hook(self, candidate: Candidate) -> Any:
        rule = candidate.rule

        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Any:
            call = Call()
            candidate.calls.append(call)
            flat_inputs = pytree.tree_leaves((args, kwargs))
            tensors = tuple(t for t in flat_inputs if isinstance(t, Tensor))
            call.input_tensors = tuple(t.detach() for t in tensors)
            call.input_versions = tuple(t._version for t in tensors)
            call.stops = frozenset(t.grad_fn for t in tensors if t.grad_fn is not None)
            call.args = tuple(pytree.tree_map(_detach, list(args)))
            call.kwargs = pytree.tree_map(_detach, dict(kwargs))
            if rule is not None:
                bound = rule.bind(module, args, kwargs)
                call.unbound = bound is None
                call.inputs = () if bound is None else tuple(_detach(a) for a in bound)
            if rule is not None and rule.tuple_output and isinstance(output, tuple) and output:
                main, rest = output[0], tuple(output[1:])
                call.side_outputs = tuple(
                    t for t in rest if isinstance(t, Tensor) and t.grad_fn is not None
                )
                if not isinstance(main, Tensor):
                    call.reason = "the output is not a tensor"
                    return None
                node = self._node(main, rule.broadcast)
                if node is None:
                    call.reason = "the output cannot carry gradients"
                    return None
                call.leaves, call.leaf_index = [node], [0]
                call.leaf_versions = [node._version]
                call.reason = "the call returns a tuple"  # the per-layer step takes one output
                return (node.clone(), *rest)
            leaves, spec = pytree.tree_flatten(output)
            may_expand = rule is not None and rule.broadcast
            replaced = list(leaves)
            for index, leaf in enumerate(leaves):
                if not isinstance(leaf, Tensor):
                    continue
                if leaf.dim() >= 1 and self.batch_size is not None and leaf.requires_grad:
                    broadcast = may_expand and self.expand and leaf.shape[0] == 1
                    if leaf.shape[0] != self.batch_size and not broadcast:
                        call.reason = "an output is not batched along dim 0"
                        continue
                node = self._node(leaf, may_expand)
                if node is None:
                    continue
                call.leaves.append(node)
                call.leaf_index.append(index)
                call.leaf_versions.append(node._version)
                replaced[index] = node.clone()
            if not call.leaves:
                call.reason = call.reason or "no output carries a gradient"
                return None
            if isinstance(output, Tensor):
                return replaced[0]
            return pytree.tree_unflatten(replaced, spec)

        return hook


def modified_in_place(call: Call) -> str | None:
    """Why the recorded call can no longer be trusted (an input or output changed in place
    after the call), or None."""
    if [t._version for t in call.input_tensors] != list(call.input_versions):
        return "an input was modified in place after the call"
    if [leaf._version for leaf in call.leaves] != call.leaf_versions:
        return "the output was modified in place"
    return None


def release(candidates: list[Candidate]) -> None:
    """Drop captured tensors so the autograd graph can be freed."""
    for candidate in candidates:
        candidate.calls = []
