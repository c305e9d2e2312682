"""Orchestration of the per-example squared-gradient paths.

Paths, fastest first, chosen per parameter:

* ``rule:<Layer>``: one forward with hooks on the modules that own requested parameters, then the
  ``K`` backward signals are propagated to those modules' captured *outputs only*
  (``torch.autograd.grad`` w.r.t. the captured nodes, batched over signals with
  ``is_grads_batched``), never through the weight-gradient kernels; each rule turns (inputs,
  output gradients) into the sum of squared per-example gradients in closed form.
* several uses of one parameter (a module called twice, an embedding tied to the output
  projection): each use's per-example gradients (the rule's ``per_example``, else the per-layer
  step) are summed per example *before* squaring, in chunks of examples sized to the budget; the
  path names every use (``"rule:Embedding+rule:Linear"``).
* ``layer:<Module>``: a module without a rule (or a call its rule does not take) that holds
  requested parameters itself: the per-layer ``torch.func`` step differentiates that call alone
  from its recorded arguments and output gradients (:mod:`ewc._per_sample.layerwise`).
* ``vmap``: only for parameters none of the above can attribute (used outside the modules that
  hold them, calls not batched along dim 0, a per-layer step that fails): ``torch.func.vmap`` over
  examples of the whole model, restricted to those parameters, in budget-sized chunks.
* ``loop``: a per-example ``torch.autograd.grad`` loop when ``vmap`` fails.

Signals are read from a :class:`~ewc._per_sample.signals.SignalSource` (a tensor is wrapped) in
chunks: on the rule path so that ``signals_in_chunk * (output + captured outputs bytes) <=
memory_budget_bytes``; rules that materialise per-example gradients (sequence Linear, Conv, the
shared-use and per-layer paths) do so in chunks within the same budget. The fallback paths size
their chunks of signals and examples to the budget too.

No result carries an autograd graph: the rules read detached inputs and output gradients from
``torch.autograd.grad`` without ``create_graph``, and the ``torch.func`` paths run under
``torch.no_grad()`` (which the transforms ignore inside), so the parameters that stay requiring
grad do not record the computation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ewc._per_sample.batching import batch_size_of
from ewc._per_sample.capture import (
    Call,
    Candidate,
    Capture,
    call_edges,
    edges_into,
    modified_in_place,
    plan_candidates,
    release,
)
from ewc._per_sample.fallback import RunModel, loop_sums, vmap_sums
from ewc._per_sample.layerwise import LayerStepError, layer_per_example
from ewc._per_sample.rules.registry import accumulator_dtype, chunk_size
from ewc._per_sample.signals import SignalSource, as_source
from ewc._per_sample.workspace import Workspace
from ewc._typing import TensorDict, present

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "MakeSignals",
    "RunModel",
    "SquaredGradSums",
    "squared_grad_sums",
]

logger = logging.getLogger("ewc")

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20
"""Budget (bytes) for the tensors the engine materialises beyond an ordinary forward/backward:
per-example gradients on the fallback paths and in the chunked rules, and the batch of output
gradients of the signals on the rule path. Chunks are sized to it; one example (one signal) is
always processed even if it alone exceeds the budget."""

MakeSignals = Callable[[Tensor, Any], "Tensor | SignalSource"]
"""``make_signals(output, target) -> (K, *output.shape)`` backward signals, or a
:class:`~ewc._per_sample.signals.SignalSource` of them."""


@dataclass
class SquaredGradSums:
    """Result of :func:`squared_grad_sums` for one batch.

    Attributes:
        sums: per parameter, ``sum_k sum_n g_{k,n}^2`` in float32 (float64 for float64 params).
        examples: ``n``, the number of examples in the batch.
        signals: ``k``, the number of backward signals per example.
        paths: per parameter name, the path that computed it (``"rule:Linear"``,
            ``"rule:Embedding+rule:Linear"``, ``"layer:ViTEmbeddings"``, ``"vmap"``, ``"loop"``,
            ``"unused"``).
        reasons: per parameter on ``"vmap"`` or ``"loop"``, why it left the per-layer paths.
    """

    sums: TensorDict
    examples: int
    signals: int
    paths: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)


def squared_grad_sums(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    run_model: RunModel,
    make_signals: MakeSignals,
    *,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    workspace: Workspace | None = None,
) -> SquaredGradSums:
    """Sum over examples and signals of squared per-example gradients, for every ``params`` entry.

    ``run_model(model, batch)`` returns ``(output, target)`` with examples along dim 0 of the
    output; ``make_signals(output, target)`` maps the (detached) output of shape ``(n, ...)`` to
    ``K`` backward signals of shape ``(K, n, ...)`` (a tensor, or a
    :class:`~ewc._per_sample.signals.SignalSource` read in chunks). The per-example gradient for
    signal ``k`` and example ``n`` is ``g_kn = d <signals[k, n], output[n]> / d theta`` and the
    result is ``sum_k sum_n g_kn^2``. Examples must not interact (eval mode); a module's input and
    output must carry the examples along dim 0 (a call whose dim 0 is not the batch size is sent
    to the fallback; the per-layer step also checks that its per-example outputs equal the
    batched ones).

    Cost: one forward; the ``K`` signals backpropagated to the captured modules' outputs (about
    ``K`` input-gradient passes, no weight-gradient kernels); per rule-covered module the rule
    (for ``nn.Linear`` on 2-D input one ``(o, n) @ (n, i)`` matmul whatever ``K``); per module
    without a rule a per-layer ``torch.func`` step (the module's forward and ``K`` VJPs per
    example, batched); for parameters nothing can attribute the whole-model ``vmap`` fallback
    (``K`` VJPs of the whole model per example) or the per-example loop.

    Args:
        model: the model, in the mode it should be evaluated in (eval for the Fisher).
        params: the parameters, by their name in ``model.named_parameters()``.
        batch: the batch, any pytree whose tensors carry examples along dim 0.
        run_model: ``run_model(model, batch) -> (output, target)``.
        make_signals: ``make_signals(output, target) -> (K, *output.shape)`` or a source.
        memory_budget_bytes: bound on the extra tensors materialised (see
            :data:`DEFAULT_MEMORY_BUDGET_BYTES`).
        workspace: buffers for the output gradients of the signals, reused across calls (pass
            the same one for every batch of a pass); default: a fresh one for this call.

    Returns:
        A :class:`SquaredGradSums` with the sums and the path per parameter.

    Raises:
        ValueError: ``memory_budget_bytes`` is not a positive integer.
    """
    if (
        isinstance(memory_budget_bytes, bool)
        or not isinstance(memory_budget_bytes, int)
        or memory_budget_bytes <= 0
    ):
        raise ValueError(
            "Expected argument `memory_budget_bytes` to be a positive integer but got "
            f"{memory_budget_bytes!r}"
        )
    names = list(params)
    candidates = plan_candidates(model, params)
    output, target = _captured_forward(model, batch, run_model, candidates)
    examples = int(output.shape[0])
    source = as_source(make_signals(output.detach(), target))
    count = len(source)

    sums: TensorDict = {}
    paths: dict[str, str] = {}
    reasons: dict[str, str] = {}
    try:
        if candidates:
            _rule_paths(
                output,
                examples,
                candidates,
                params,
                source,
                memory_budget_bytes,
                workspace if workspace is not None else Workspace(),
                sums,
                paths,
                reasons,
            )
    finally:
        release(candidates)
        del output
    remaining = {name: params[name] for name in names if name not in sums}
    if remaining:
        if not candidates:
            reasons.update(dict.fromkeys(remaining, "no module holds these parameters"))
        fallback, path, failure = _fallback_sums(
            model, remaining, batch, run_model, source, memory_budget_bytes
        )
        sums.update(fallback)
        paths.update(dict.fromkeys(remaining, path))
        if failure:
            for name in remaining:
                reasons[name] = f"{reasons.get(name, 'no per-layer path')}; {failure}"
    if logger.isEnabledFor(logging.DEBUG):
        for name in names:
            why = f" ({reasons[name]})" if name in reasons else ""
            logger.debug("ewc: squared gradients of %s via %s%s", name, paths[name], why)
    return SquaredGradSums(
        {name: sums[name] for name in names},
        examples,
        count,
        paths,
        {name: reasons[name] for name in names if name in reasons},
    )


def _captured_forward(
    model: nn.Module, batch: Any, run_model: RunModel, candidates: list[Candidate]
) -> tuple[Tensor, Any]:
    """The forward with hooks on the candidates (no graph at all when there is none).

    Outputs broadcast along dim 0 are expanded to the batch size for the rules that accept it; if
    that forward fails or changes the output's batch size, it is re-run without expanding.
    """
    if not candidates:
        with torch.no_grad():
            return run_model(model, batch)
    hint = batch_size_of(batch)
    capture = Capture(candidates, hint)
    try:
        with capture, torch.enable_grad():
            output, target = run_model(model, batch)
    except Exception:
        if not capture.expanded:
            raise
        logger.debug("ewc: the forward fails with broadcast outputs expanded; not expanding")
        output = None
    if output is not None and (not capture.expanded or int(output.shape[0]) == hint):
        return output, target
    release(candidates)
    with Capture(candidates, hint, expand=False), torch.enable_grad():
        return run_model(model, batch)


@dataclass
class _Use:
    """A call that contributes per-example gradients to parameters with several uses."""

    candidate: Candidate
    call: Call
    mode: str  # "rule" (the rule's per_example) or "layer" (the per-layer step)
    names: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> str:
        rule = self.candidate.rule
        return rule.path if self.mode == "rule" and rule is not None else self.candidate.layer_path


@dataclass
class _Plan:
    square: list[tuple[Candidate, Call, dict[str, str]]]
    shared: list[_Use]
    rejected: dict[str, str]
    paths: dict[str, str]


class _UseFailed(Exception):
    def __init__(self, use: _Use, error: Exception) -> None:
        super().__init__(str(error))
        self.use = use


def _rule_paths(
    output: Tensor,
    examples: int,
    candidates: list[Candidate],
    params: Mapping[str, Tensor],
    source: SignalSource,
    memory_budget_bytes: int,
    workspace: Workspace,
    sums: TensorDict,
    paths: dict[str, str],
    reasons: dict[str, str],
) -> None:
    """Fill ``sums``/``paths`` for every parameter the candidates can attribute; the others get
    a reason in ``reasons`` and are left for the whole-model fallback."""
    # With the graph at hand, a requested parameter with no edge into the output's graph has
    # exactly zero per-example gradients (the heads of other tasks): no pass is needed.
    edges, seen = edges_into(output, {id(p) for p in params.values()})
    for name, param in params.items():
        if edges[id(param)] == 0:
            sums[name] = param.new_zeros(param.shape, dtype=accumulator_dtype(param.dtype))
            paths[name] = "unused"
    excluded: dict[str, str] = {}
    while True:
        plan = _plan(output, examples, candidates, params, edges, seen, sums, excluded)
        try:
            found = _accumulate(output, examples, plan, source, memory_budget_bytes, workspace)
        except _UseFailed as failure:  # a per-layer step that cannot run: drop it, start over
            reason = f"per-layer step on {failure.use.candidate.label} failed: {_short(failure)}"
            logger.debug("ewc: %s", reason)
            excluded.update(dict.fromkeys(failure.use.names.values(), reason))
            continue
        break
    for name, total in found.items():
        sums[name] = total
    paths.update({name: path for name, path in plan.paths.items() if name in sums})
    reasons.update(plan.rejected)


def _plan(
    output: Tensor,
    examples: int,
    candidates: list[Candidate],
    params: Mapping[str, Tensor],
    edges: dict[int, int],
    seen: set[Any],
    done: Mapping[str, Tensor],
    excluded: Mapping[str, str],
) -> _Plan:
    """Which call computes which parameter, and how."""
    status: dict[int, str | None] = {}  # id(call) -> "rule" | "layer" | "idle" | None (rejected)
    why: dict[int, str] = {}
    owners: dict[str, list[tuple[Candidate, str]]] = {}
    for candidate in candidates:
        for local, name in candidate.names.items():
            owners.setdefault(name, []).append((candidate, local))
        for call in candidate.calls:
            mode, reason = _call_mode(candidate, call, examples, output, seen)
            status[id(call)] = mode
            if reason is not None:
                why[id(call)] = f"{candidate.label}: {reason}"
    own_edges: dict[int, dict[int, int]] = {}
    square: dict[int, tuple[Candidate, Call, dict[str, str]]] = {}
    shared: dict[int, _Use] = {}
    rejected: dict[str, str] = {}
    paths: dict[str, str] = {}
    for name, param in params.items():
        if name in done:
            continue
        if name in excluded:
            rejected[name] = excluded[name]
            continue
        uses = [
            (candidate, local, call)
            for candidate, local in owners.get(name, [])
            for call in candidate.calls
            if status[id(call)] != "idle"
        ]
        bad = [why[id(call)] for _, _, call in uses if status[id(call)] is None]
        if not uses or bad:
            rejected[name] = bad[0] if bad else "not used inside the modules that hold it"
            continue
        attributed = 0
        for candidate, _, call in uses:
            if id(call) not in own_edges:
                watched = {id(candidate.module.get_parameter(n)) for n in candidate.names}
                own_edges[id(call)] = call_edges(call, watched)
            attributed += own_edges[id(call)].get(id(param), 0)
        if attributed != edges[id(param)]:
            rejected[name] = (
                "also used outside the calls of the modules that hold it "
                f"({edges[id(param)]} uses in the graph, {attributed} inside those calls)"
            )
            continue
        if len(uses) == 1 and status[id(uses[0][2])] == "rule":
            candidate, local, call = uses[0]
            entry = square.setdefault(id(call), (candidate, call, {}))
            entry[2][local] = name
            paths[name] = present(candidate.rule, "a covered module's rule").path
            continue
        labels = []
        for candidate, local, call in uses:
            mode = present(status[id(call)], "the mode of a resolved call")
            if mode == "rule" and (candidate.rule is None or candidate.rule.per_example is None):
                mode = "layer"  # no per-example gradients from the rule: the per-layer step
            use = shared.setdefault(id(call), _Use(candidate, call, mode))
            use.names[local] = name
            labels.append(use.path)
        paths[name] = "+".join(dict.fromkeys(labels))
    return _Plan(list(square.values()), list(shared.values()), rejected, paths)


def _call_mode(
    candidate: Candidate, call: Call, examples: int, output: Tensor, seen: set[Any]
) -> tuple[str | None, str | None]:
    """``("rule" | "layer" | "idle" | None, reason)`` for one recorded call."""
    if call.leaves and not any(
        leaf.grad_fn is None or leaf.grad_fn in seen for leaf in call.leaves
    ):
        return "idle", None  # nothing it computed reaches the output: it contributes zero
    changed = modified_in_place(call)
    if changed is not None:
        return None, changed
    layer_reason = call.reason
    if layer_reason is None and any(
        leaf.shape[0] != examples or leaf.dim() == 0 for leaf in call.leaves
    ):
        layer_reason = f"an output's dim 0 is not the batch size {examples}"
    rule = candidate.rule
    if rule is not None:
        rule_reason = _rule_rejection(candidate, call, examples, output)
        if rule_reason is None:
            return "rule", None
        if layer_reason is None:
            return "layer", None
        return None, rule_reason
    if layer_reason is None:
        return "layer", None
    return None, layer_reason


def _rule_rejection(
    candidate: Candidate, call: Call, examples: int, model_output: Tensor
) -> str | None:
    rule = present(candidate.rule, "a candidate's rule")
    if call.unbound:
        return "the rule does not take this call's arguments (keyword arguments?)"
    if len(call.leaves) != 1 or call.leaf_index != [0]:
        return call.reason or "the output is not one tensor"
    node = call.leaves[0]
    if node.dim() == 0 or node.shape[0] != examples:
        return f"output dim 0 is not the batch size {examples}"
    if call.side_outputs and _reaches(model_output, call.side_outputs):
        return "another of its outputs (e.g. attention weights) reaches the model output"
    if not rule.supports(candidate.module, call.inputs, examples):
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


def _accumulate(
    output: Tensor,
    examples: int,
    plan: _Plan,
    source: SignalSource,
    memory_budget_bytes: int,
    workspace: Workspace,
) -> TensorDict:
    """Backpropagate the signals to the captured nodes in budget-sized chunks; apply the rules,
    sum the per-example gradients of shared parameters before squaring."""
    sums: TensorDict = {}
    nodes: dict[int, Tensor] = {}
    for _, call, _ in plan.square:
        nodes[id(call.leaves[0])] = call.leaves[0]
    for use in plan.shared:
        for leaf in use.call.leaves:
            nodes[id(leaf)] = leaf
    targets = list(nodes.values())
    count = len(source)
    if targets and output.requires_grad:
        index = {key: i for i, key in enumerate(nodes)}
        bytes_per_signal = sum(t.numel() * t.element_size() for t in targets)
        bytes_per_signal += output.numel() * output.element_size()
        step = chunk_size(count, bytes_per_signal, memory_budget_bytes)
        batched = _batch_signals(plan)
        examples_first = {
            index[id(call.leaves[0])]
            for candidate, call, _ in plan.square
            if candidate.rule is not None and candidate.rule.examples_first
        }
        for start in range(0, count, step):
            chunk = source.chunk(start, min(count, start + step)).to(output.dtype)
            grads = _output_grads(
                output, targets, chunk, workspace, batched=batched, examples_first=examples_first
            )
            del chunk
            for candidate, call, names in plan.square:
                grad = grads[index[id(call.leaves[0])]]
                if grad is None:
                    continue
                terms = present(candidate.rule, "a covered module's rule").compute(
                    candidate.module, call.inputs, grad, names.keys(), memory_budget_bytes
                )
                for local, name in names.items():
                    _add(sums, name, terms[local])
            if plan.shared:
                leaf_grads = {
                    id(use.call): [grads[index[id(leaf)]] for leaf in use.call.leaves]
                    for use in plan.shared
                }
                _shared_terms(
                    plan.shared, leaf_grads, examples, memory_budget_bytes, start == 0, sums
                )
            del grads
    for candidate, _, names in plan.square:
        _fill_zeros(candidate, names, sums)
    for use in plan.shared:
        _fill_zeros(use.candidate, use.names, sums)
    return sums


def _fill_zeros(candidate: Candidate, names: Mapping[str, str], sums: TensorDict) -> None:
    for local, name in names.items():
        if name not in sums:  # the output does not depend on this use
            param = candidate.module.get_parameter(local)
            sums[name] = param.new_zeros(param.shape, dtype=accumulator_dtype(param.dtype))


def _add(sums: TensorDict, name: str, term: Tensor) -> None:
    if name in sums:
        sums[name].add_(term)
    else:  # rules return fresh tensors: the first chunk's term is the accumulator
        sums[name] = term


def _shared_terms(
    uses: list[_Use],
    leaf_grads: dict[int, list[Tensor | None]],
    examples: int,
    memory_budget_bytes: int,
    first_chunk: bool,
    sums: TensorDict,
) -> None:
    """``sum_k sum_n (sum_uses g_kn^use)^2`` for the parameters of ``uses``, per example chunk."""
    signals = max(
        (int(g.shape[0]) for grads in leaf_grads.values() for g in grads if g is not None),
        default=0,
    )
    if signals == 0:
        return
    sizes: dict[str, int] = {}
    for use in uses:
        for local, name in use.names.items():
            sizes[name] = use.candidate.module.get_parameter(local).numel()
    bytes_per_example = 3 * 4 * signals * sum(sizes.values())
    step = chunk_size(examples, bytes_per_example, memory_budget_bytes)
    for start in range(0, examples, step):
        stop = min(examples, start + step)
        total: dict[str, Tensor] = {}
        for use in uses:
            grads = leaf_grads[id(use.call)]
            if all(g is None for g in grads):
                continue
            for local, term in _use_per_example(use, grads, start, stop, examples, first_chunk):
                name = use.names[local]
                term = term.to(accumulator_dtype(term.dtype))
                total[name] = total[name] + term if name in total else term
        for name, per_example in total.items():
            _add(sums, name, per_example.square().sum((0, 1)))


def _use_per_example(
    use: _Use,
    grads: list[Tensor | None],
    start: int,
    stop: int,
    examples: int,
    check: bool,
) -> list[tuple[str, Tensor]]:
    candidate, call = use.candidate, use.call
    rule = candidate.rule
    if use.mode == "rule" and rule is not None and rule.per_example is not None:
        grad = present(grads[0], "the output gradient of a rule-path use")
        inputs = tuple(
            x[start:stop]
            if isinstance(x, Tensor) and x.dim() >= 1 and x.shape[0] == examples
            else x
            for x in call.inputs
        )
        terms = rule.per_example(candidate.module, inputs, grad[:, start:stop], use.names.keys())
        return list(terms.items())
    try:
        terms = layer_per_example(
            candidate.module, call, grads, list(use.names), start, stop, examples, check=check
        )
    except LayerStepError as error:
        raise _UseFailed(use, error) from error
    return list(terms.items())


def _batch_signals(plan: _Plan) -> bool:
    """Whether to backpropagate the signals in one batched backward (``is_grads_batched``)
    rather than one backward per signal.

    Batched only when every captured module is an ``nn.Linear`` (and no parameter is shared):
    its backward is then a few matmuls that ``vmap`` merges into one with ``K`` times the rows.
    Elsewhere ``vmap`` loops inside some backward kernels (convolution, max-pool) or broadcasts
    the saved activations to ``K`` copies, and its ``(K, ...)`` temporaries are fresh
    allocations on every batch. Measured with ``exact`` (10 signals, 1 thread, batch 128):
    per-signal backward into reused buffers against batched, small CNN 0.675 s vs 0.825 s, the
    transformer layer 1.75 s vs 2.58 s, ResNet-18-shaped (256 examples) 6.8 s vs 7.6 s; the
    784-1000-1000-10 MLP 0.97 s vs 0.85 s.
    """
    if plan.shared:
        return False
    return all(type(candidate.module) is nn.Linear for candidate, _, _ in plan.square)


def _output_grads(
    output: Tensor,
    targets: list[Tensor],
    signals: Tensor,
    workspace: Workspace,
    *,
    batched: bool,
    examples_first: Collection[int] = (),
) -> tuple[Tensor | None, ...]:
    """``d <signals[k], output> / d target`` for every target: ``(K, *target.shape)`` or None.

    With ``batched`` one backward over the ``K`` signals (``is_grads_batched``), falling back to
    the loop when an op on the way has no batching rule. Otherwise one backward per signal,
    written into ``workspace`` buffers that the next chunk (and the next batch) reuses: the
    caller must be done with the result before asking again. The targets whose index is in
    ``examples_first`` get a transposed view of an ``(n, K, ...)`` buffer (see
    :attr:`~ewc._per_sample.rules.registry.LayerRule.examples_first`).
    """
    count = int(signals.shape[0])
    if batched and count > 1:
        try:
            return torch.autograd.grad(
                output,
                targets,
                grad_outputs=signals,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        except RuntimeError as error:
            logger.debug("ewc: batched backward over signals failed (%s); looping", error)
    stacked: list[Tensor | None] = []
    for k in range(count):
        grads = torch.autograd.grad(
            output, targets, grad_outputs=signals[k], retain_graph=True, allow_unused=True
        )
        if count == 1:  # one signal (empirical): a view, not a copy
            return tuple(None if grad is None else grad.unsqueeze(0) for grad in grads)
        if k == 0:
            stacked = [
                None if grad is None else _signal_buffer(workspace, i, grad, count, examples_first)
                for i, grad in enumerate(grads)
            ]
        for buffer, grad in zip(stacked, grads):
            if buffer is not None and grad is not None:
                buffer[k].copy_(grad)
    return tuple(stacked)


def _signal_buffer(
    workspace: Workspace, slot: int, grad: Tensor, count: int, examples_first: Collection[int]
) -> Tensor:
    """The ``(K, *grad.shape)`` buffer for target ``slot``: a transposed view of an
    ``(n, K, ...)`` buffer when the target is in ``examples_first``."""
    if slot in examples_first:
        shape = (grad.shape[0], count, *grad.shape[1:])
        return workspace.buffer("signal-grads", slot, shape, grad.dtype, grad.device).transpose(
            0, 1
        )
    shape = (count, *grad.shape)
    return workspace.buffer("signal-grads", slot, shape, grad.dtype, grad.device)


def _fallback_sums(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    run_model: RunModel,
    signals: SignalSource,
    memory_budget_bytes: int,
) -> tuple[TensorDict, str, str | None]:
    """``vmap`` over examples for ``params``; the per-example loop if ``vmap`` cannot run.

    Returns the sums, the path, and why ``vmap`` failed (None if it ran)."""
    try:
        sums = vmap_sums(model, params, batch, run_model, signals, memory_budget_bytes)
        return sums, "vmap", None
    except Exception as error:  # vmap cannot run this model: fall back to the example loop
        logger.debug("ewc: vmap path failed (%s); using the per-example loop", error)
        failure = f"vmap failed: {type(error).__name__}: {_short(error)}"
        sums = loop_sums(model, params, batch, run_model, signals, memory_budget_bytes)
        return sums, "loop", failure


def _short(error: BaseException, limit: int = 120) -> str:
    """The first line of an error message, cut to ``limit`` characters (for the warning)."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
