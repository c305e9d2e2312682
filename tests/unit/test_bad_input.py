"""Bad input: a clear error naming the argument or key and the value, and the consolidated state
bit for bit as it was (every tensor of ``state_dict()``, dtype and device).

Each case is ``(action, exception type, pattern)``; the pattern must match the message and names
both the argument/key and the offending value. The EWC-level cases (calls, ``scale``, the
constructor, damaged state dicts) come first, then the data-level ones (labels, outputs,
criteria, empty batches), each run with every estimator it applies to.
"""

from __future__ import annotations

import copy
import io
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from ewc import (
    EWC,
    ConsolidationError,
    EWCError,
    FisherSums,
    ParameterMismatchError,
    StateDictError,
    UnsupportedCriterionError,
    fisher_sums,
)


def one_batch(n: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` examples of 4 features and labels in ``range(3)`` (``n = 0``: an empty batch)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def data(n: int = 12, batch: int = 4, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    x, y = one_batch(n, seed)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def consolidated() -> tuple[EWC, nn.Sequential]:
    """Two tasks, with history, the model moved off the anchor (a non-zero penalty)."""
    reg, net = EWC(2.0, keep_importance_data=True), model()
    for seed in range(2):
        reg.consolidate(net, data(seed=seed), nn.CrossEntropyLoss())
        with torch.no_grad():
            net[0].weight.add_(0.1)
    return reg, net


def tensors_of(value: Any, prefix: str = "") -> dict[str, Tensor]:
    if isinstance(value, Tensor):
        return {prefix: value}
    if not isinstance(value, (dict, list, tuple)):
        return {}
    items = value.items() if isinstance(value, dict) else enumerate(value)
    found: dict[str, Tensor] = {}
    for key, item in items:
        found.update(tensors_of(item, f"{prefix}/{key}"))
    return found


def snapshot(reg: EWC) -> tuple[bytes, dict[str, tuple[Tensor, torch.dtype, torch.device]]]:
    saved = reg.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    tensors = {k: (t.clone(), t.dtype, t.device) for k, t in tensors_of(saved).items()}
    return buffer.getvalue(), tensors


def assert_unchanged(reg: EWC, before: tuple[bytes, dict]) -> None:
    after = snapshot(reg)
    assert after[1].keys() == before[1].keys()
    for key, (tensor, dtype, device) in before[1].items():
        now, now_dtype, now_device = after[1][key]
        assert (now_dtype, now_device) == (dtype, device), key
        assert torch.equal(now, tensor), key
    assert after[0] == before[0], "torch.save bytes of state_dict() differ"


@dataclass(frozen=True)
class Case:
    id: str
    action: Callable[[EWC, nn.Sequential], Any]
    error: type[BaseException]
    pattern: str
    cause: type[BaseException] | None = None


# ---------------------------------------------------------------- helpers for the actions
def with_params(selector: Any) -> Callable[[EWC, nn.Sequential], Any]:
    def act(reg: EWC, net: nn.Sequential) -> Any:
        reg.params = selector
        return reg.consolidate(net, data(), nn.CrossEntropyLoss())

    return act


def frozen_model(reg: EWC, net: nn.Sequential) -> Any:
    net.requires_grad_(False)
    return reg.consolidate(net, data(), nn.CrossEntropyLoss())


class FailingLoader:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __iter__(self) -> Any:
        yield data()[0]
        raise self.error


def forward_raising(model: nn.Module, batch: Any) -> Any:
    raise TypeError("my forward got an unexpected batch")


def batched_with_criterion_raising(reg: EWC, net: nn.Sequential) -> Any:
    def criterion(output: Tensor, target: Tensor) -> Tensor:
        raise ValueError("my criterion failed")

    return batched(reg, lambda: reg.consolidate(net, data(), criterion))


def batched(reg: EWC, call: Callable[[], Any]) -> Any:
    """``call()`` with ``reg`` estimating ``batched`` (which calls the criterion itself)."""
    reg.fisher = "batched"
    try:
        return call()
    finally:
        reg.fisher = "exact"


def batched_with_criterion_on_wrong_targets(reg: EWC, net: nn.Sequential) -> Any:
    return batched(
        reg,
        lambda: reg.consolidate(net, data(), lambda o, t: nn.functional.cross_entropy(o, t[:1])),
    )


def reduce_with(change: Callable[[FisherSums], FisherSums]) -> Callable[[EWC, nn.Sequential], Any]:
    def act(reg: EWC, net: nn.Sequential) -> Any:
        return reg.consolidate(net, data(), nn.CrossEntropyLoss(), reduce=change)

    return act


def scaled_sums(factor: float) -> Callable[[FisherSums], FisherSums]:
    def change(sums: FisherSums) -> FisherSums:
        scaled = {n: t * factor for n, t in sums.sums.items()}
        return FisherSums(scaled, sums.count, sums.examples, sums.batches, sums.paths)

    return change


def counted(count: Any) -> Callable[[FisherSums], FisherSums]:
    def change(sums: FisherSums) -> FisherSums:
        return FisherSums(sums.sums, count, sums.examples, sums.batches, sums.paths)

    return change


def reduce_raising(sums: FisherSums) -> FisherSums:
    raise OSError("the network is down")


def add_task_with(
    fisher_change: Callable[[Tensor], Tensor] = lambda t: t,
    anchor_change: Callable[[Tensor], Tensor] = lambda t: t,
) -> Callable[[EWC, nn.Sequential], Any]:
    def act(reg: EWC, net: nn.Sequential) -> Any:
        fisher = {n: torch.ones_like(p) for n, p in net.named_parameters()}
        anchor = {n: p.detach().clone() for n, p in net.named_parameters()}
        fisher["0.bias"] = fisher_change(fisher["0.bias"])
        anchor["0.bias"] = anchor_change(anchor["0.bias"])
        return reg.add_task(fisher, anchor)

    return act


def nan_at_0(t: Tensor) -> Tensor:
    t = t.clone()
    t[0] = math.nan
    return t


def renamed_after_a_cached_call(reg: EWC, net: nn.Sequential) -> Any:
    reg.penalty_grad_(net)  # fills the alignment cache
    renamed = nn.Sequential()
    renamed.add_module("first", net[0])  # the same parameter objects, other names
    renamed.add_module("act", net[1])
    renamed.add_module("last", net[2])
    return reg.penalty(renamed)


def prefixed_after_a_cached_call(reg: EWC, net: nn.Sequential) -> Any:
    reg.penalty(net)
    return reg.penalty_grad_(nn.ModuleDict({"_orig_mod": net}))  # names '_orig_mod.0.weight'


def on_meta(method: str) -> Callable[[EWC, nn.Sequential], Any]:
    def act(reg: EWC, net: nn.Sequential) -> Any:
        return getattr(reg, method)(copy.deepcopy(net).to("meta"))

    return act


def sparse_gradient(reg: EWC, net: nn.Sequential) -> Any:
    embedding = nn.Sequential(nn.Embedding(6, 3, sparse=True), nn.Flatten(), nn.Linear(6, 3))
    batch = [(torch.randint(0, 6, (5, 2)), torch.randint(0, 3, (5,)))]
    other = EWC(1.0, fisher="empirical")
    other.consolidate(embedding, batch, nn.CrossEntropyLoss())
    nn.functional.cross_entropy(embedding(batch[0][0]), batch[0][1]).backward()
    assert embedding[0].weight.grad.is_sparse
    # the case checks the shared `reg` is untouched too; the error comes from `other`
    return other.penalty_grad_(embedding)


CALL_CASES = [
    Case(
        "consolidate-dataloader-None",
        lambda reg, net: reg.consolidate(net, None, nn.CrossEntropyLoss()),
        TypeError,
        r"`dataloader`.*None",
    ),
    Case(
        "consolidate-forward-not-callable",
        lambda reg, net: reg.consolidate(net, data(), nn.CrossEntropyLoss(), forward="x"),
        TypeError,
        r"`forward`.*'x'",
    ),
    Case(
        "consolidate-criterion-not-callable",
        lambda reg, net: reg.consolidate(net, data(), "ce"),
        TypeError,
        r"`criterion`.*'ce'",
    ),
    Case(
        "consolidate-model-None",
        lambda reg, net: reg.consolidate(None, data(), nn.CrossEntropyLoss()),
        TypeError,
        r"`model`.*None",
    ),
    Case(
        "consolidate-progress-not-bool",
        lambda reg, net: reg.consolidate(net, data(), nn.CrossEntropyLoss(), progress="yes"),
        TypeError,
        r"`progress`.*'yes'",
    ),
    Case(
        "estimate-reduce-not-callable",
        lambda reg, net: reg.estimate(net, data(), nn.CrossEntropyLoss(), reduce=3),
        TypeError,
        r"`reduce`.*3",
    ),
    Case(
        "params-predicate-returns-tensor",
        with_params(lambda name, p: torch.tensor(True)),
        TypeError,
        r"`params`.*bool.*tensor\(True\).*'0\.weight'",
    ),
    Case(
        "params-predicate-returns-int",
        with_params(lambda name, p: 1),
        TypeError,
        r"`params`.*bool.*returned 1 for parameter '0\.weight'",
    ),
    Case(
        "params-predicate-always-false",
        with_params(lambda name, p: False),
        ConsolidationError,
        r"no parameter to consolidate: `params`=<function.*no task",
    ),
    Case(
        "params-names-only-frozen",
        lambda reg, net: (
            net[0].requires_grad_(False),
            with_params(["0.weight"])(reg, net),
        ),
        ConsolidationError,
        r"no parameter to consolidate: `params`=\['0\.weight'\].*frozen.*'0\.weight'",
    ),
    Case(
        "model-without-trainable-parameters",
        frozen_model,
        ConsolidationError,
        r"no parameter to consolidate: `params`=None.*4 of them frozen",
    ),
    Case(
        "loader-raises-ValueError",
        lambda reg, net: reg.consolidate(
            net, FailingLoader(ValueError("corrupt record 7")), nn.CrossEntropyLoss()
        ),
        ConsolidationError,
        r"ValueError: corrupt record 7",
        ValueError,
    ),
    Case(
        "loader-raises-KeyError",
        lambda reg, net: reg.consolidate(
            net, FailingLoader(KeyError("label")), nn.CrossEntropyLoss()
        ),
        ConsolidationError,
        r"KeyError: 'label'",
        KeyError,
    ),
    Case(
        "loader-raises-TypeError",
        lambda reg, net: reg.consolidate(
            net, FailingLoader(TypeError("collate got a str")), nn.CrossEntropyLoss()
        ),
        ConsolidationError,
        r"TypeError: collate got a str",
        TypeError,
    ),
    Case(
        "forward-raises-TypeError",
        lambda reg, net: reg.consolidate(
            net, data(), nn.CrossEntropyLoss(), forward=forward_raising
        ),
        ConsolidationError,
        r"TypeError: my forward got an unexpected batch",
        TypeError,
    ),
    Case(
        "criterion-raises-ValueError",
        batched_with_criterion_raising,
        ConsolidationError,
        r"consolidation failed.*\(ValueError: my criterion failed\)",
        ValueError,
    ),
    Case(
        "criterion-shape-error-from-torch",
        batched_with_criterion_on_wrong_targets,
        ConsolidationError,
        r"consolidation failed.*\((Value|Runtime)Error: .*",
        Exception,
    ),
    Case(
        "reduce-raises",
        reduce_with(reduce_raising),
        ConsolidationError,
        r"OSError: the network is down",
        OSError,
    ),
    Case(
        "reduce-returns-nan",
        reduce_with(scaled_sums(math.nan)),
        ConsolidationError,
        r"`fisher\['0\.weight'\]` has negative or non-finite values returned by `reduce`",
    ),
    Case(
        "reduce-returns-inf",
        reduce_with(scaled_sums(math.inf)),
        ConsolidationError,
        r"`fisher\['0\.weight'\]` has negative or non-finite values returned by `reduce`",
    ),
    Case(
        "reduce-returns-negative",
        reduce_with(scaled_sums(-1.0)),
        ConsolidationError,
        r"`fisher\['0\.weight'\]` has negative or non-finite values",
    ),
    Case(
        "reduce-returns-count-0",
        reduce_with(counted(0)),
        ConsolidationError,
        r"count = 0 returned|returned by `reduce` have count = 0",
    ),
    Case(
        "reduce-returns-count-float",
        reduce_with(counted(2.5)),
        ConsolidationError,
        r"have count = 2\.5; expected an int > 0",
    ),
    Case(
        "add_task-nan-anchor",
        add_task_with(anchor_change=nan_at_0),
        ValueError,
        r"`anchor\['0\.bias'\]` has NaN or infinite values",
    ),
    Case(
        "add_task-nan-fisher",
        add_task_with(fisher_change=nan_at_0),
        ValueError,
        r"`fisher\['0\.bias'\]` has negative or non-finite values",
    ),
    Case(
        "add_task-negative-fisher",
        add_task_with(fisher_change=lambda t: -t),
        ValueError,
        r"`fisher\['0\.bias'\]` has negative",
    ),
    Case(
        "add_task-sparse-fisher",
        add_task_with(fisher_change=lambda t: t.to_sparse()),
        ValueError,
        r"`fisher\['0\.bias'\]` is a torch\.sparse_coo tensor",
    ),
    Case(
        "add_task-complex-anchor",
        add_task_with(anchor_change=lambda t: t.to(torch.complex64)),
        ValueError,
        r"`fisher\['0\.bias'\]` has dtype torch\.complex64",
    ),
    Case(
        "add_task-meta-fisher",
        add_task_with(fisher_change=lambda t: t.to("meta")),
        ValueError,
        r"`fisher\['0\.bias'\]` is on the meta device",
    ),
    Case(
        "add_task-nothing",
        lambda reg, net: reg.add_task({}, {}),
        ValueError,
        r"`fisher` and `anchor` name no parameter",
    ),
    Case(
        "add_task-not-a-mapping",
        lambda reg, net: reg.add_task([torch.ones(2)], {}),
        TypeError,
        r"`fisher`.*list",
    ),
    Case("penalty-None", lambda reg, net: reg.penalty(None), TypeError, r"`model`.*None"),
    Case(
        "penalty_grad_-None", lambda reg, net: reg.penalty_grad_(None), TypeError, r"`model`.*None"
    ),
    Case("penalty-string", lambda reg, net: reg.penalty("net"), TypeError, r"`model`.*'net'"),
    Case(
        "penalty-meta-model",
        on_meta("penalty"),
        ParameterMismatchError,
        r"'0\.weight' is on the meta device",
    ),
    Case(
        "penalty_grad_-meta-model",
        on_meta("penalty_grad_"),
        ParameterMismatchError,
        r"'0\.weight' is on the meta device",
    ),
    Case(
        "renamed-model-after-cached-call",
        renamed_after_a_cached_call,
        ParameterMismatchError,
        r"'0\.weight' was consolidated but the model has no parameter of that name"
        r".*'first\.weight'",
    ),
    Case(
        "prefixed-model-after-cached-call",
        prefixed_after_a_cached_call,
        ParameterMismatchError,
        r"'0\.weight'.*no parameter of that name.*'_orig_mod\.0\.weight'",
    ),
    Case(
        "sparse-gradient",
        sparse_gradient,
        TypeError,
        r"'0\.weight' has a torch\.sparse_coo gradient.*not support sparse",
    ),
]


@pytest.mark.parametrize(
    "case",
    CALL_CASES,
    ids=[case.id for case in CALL_CASES],
)
def test_bad_calls_name_the_argument_and_value_and_change_nothing(case: Case) -> None:
    reg, net = consolidated()
    before = snapshot(reg)
    tasks = reg.tasks
    with pytest.raises(case.error, match=case.pattern) as info:
        case.action(reg, net)
    if case.cause is not None:
        assert isinstance(info.value.__cause__, case.cause), repr(info.value.__cause__)
    assert_unchanged(reg, before)
    assert reg.tasks == tasks
    # and the object still works on the original model
    value = reg.penalty(model_like(net))
    assert math.isfinite(float(value.detach())) and value.device.type == "cpu"


# ---------------------------------------------------------------- penalty_grad_(scale=...)
def with_scale(scale: Any) -> Callable[[EWC, nn.Sequential], Any]:
    def act(reg: EWC, net: nn.Sequential) -> Any:
        return reg.penalty_grad_(net, return_penalty=True, scale=scale)

    return act


SCALE_CASES = [
    Case("scale-True", with_scale(True), TypeError, r"`scale` to be a float but got True"),
    Case("scale-False", with_scale(False), TypeError, r"`scale` to be a float but got False"),
    Case("scale-None", with_scale(None), TypeError, r"`scale` to be a float but got None"),
    Case("scale-str", with_scale("1024"), TypeError, r"`scale` to be a float but got '1024'"),
    Case(
        "scale-tensor",
        with_scale(torch.tensor(1024.0)),
        TypeError,
        r"`scale` to be a float but got tensor\(1024\.\)",
    ),
    Case(
        "scale-nan", with_scale(math.nan), ValueError, r"`scale` to be finite and > 0 but got nan"
    ),
    Case(
        "scale-inf", with_scale(math.inf), ValueError, r"`scale` to be finite and > 0 but got inf"
    ),
    Case(
        "scale--inf",
        with_scale(-math.inf),
        ValueError,
        r"`scale` to be finite and > 0 but got -inf",
    ),
    Case("scale-0.0", with_scale(0.0), ValueError, r"`scale` to be finite and > 0 but got 0\.0"),
    Case("scale--0.0", with_scale(-0.0), ValueError, r"`scale` to be finite and > 0 but got -0\.0"),
    Case("scale-int-0", with_scale(0), ValueError, r"`scale` to be finite and > 0 but got 0$"),
    Case(
        "scale-negative", with_scale(-1024.0), ValueError, r"`scale` to be finite and > 0.*-1024\.0"
    ),
    Case(
        "scale-10**400",
        with_scale(10**400),
        ValueError,
        r"`scale` to be finite and > 0 but got 1000000000.*too large for a float",
    ),
]


def grads_of(net: nn.Module) -> list[Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("fused", [False, True], ids=["default", "fused"])
@pytest.mark.parametrize("case", SCALE_CASES, ids=[case.id for case in SCALE_CASES])
def test_a_bad_scale_names_the_argument_and_value_and_changes_no_state_and_no_grad(
    case: Case, fused: bool
) -> None:
    reg, net = consolidated()
    if fused:  # the same state through the compiled kernel
        if shutil.which("c++") is None or shutil.which("ninja") is None:
            pytest.skip("EWC(fused=True) builds a C++ kernel: needs a C++ compiler and ninja")
        fused_reg = EWC(2.0, keep_importance_data=True, fused=True)
        fused_reg.load_state_dict(reg.state_dict())
        reg = fused_reg
    generator = torch.Generator().manual_seed(1)
    for p in list(net.parameters())[:-1]:  # the last one keeps grad None
        p.grad = torch.randn(p.shape, generator=generator)
    before, grads = snapshot(reg), grads_of(net)
    with pytest.raises(case.error, match=case.pattern):
        case.action(reg, net)
    assert_unchanged(reg, before)
    for got, want in zip(grads_of(net), grads):
        assert (got is None) == (want is None)
        assert got is None or torch.equal(got, want)
    assert reg.penalty_grad_(net, scale=2.0) is None  # and the object still works


@pytest.mark.parametrize("reg", [EWC(1.0), EWC(0.0)], ids=["nothing-consolidated", "lambda-0"])
def test_a_bad_scale_is_refused_even_when_there_is_nothing_to_add(reg: EWC) -> None:
    if reg.ewc_lambda == 0.0:
        reg.consolidate(model(), data(), nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match=r"`scale`.*-1\.0"):
        reg.penalty_grad_(model(), scale=-1.0)
    with pytest.raises(TypeError, match=r"`scale`.*True"):
        reg.penalty_grad_(model(), return_penalty=True, scale=True)


def model_like(net: nn.Sequential) -> nn.Sequential:
    """The consolidated architecture with ``net``'s weights (``net`` may be frozen now)."""
    fresh = model()
    fresh.load_state_dict(net.state_dict())
    return fresh


# ---------------------------------------------------------------- constructor
CONSTRUCTOR_CASES = [
    ({"ewc_lambda": 10**400}, ValueError, r"`ewc_lambda`.*1000000000.*too large"),
    ({"ewc_lambda": -(10**400)}, ValueError, r"`ewc_lambda`.*-1000000000"),
    ({"ewc_lambda": 1.0, "params": []}, ValueError, r"`params`.*at least one.*\[\]"),
    ({"ewc_lambda": 1.0, "params": ()}, ValueError, r"`params`.*at least one.*\(\)"),
    ({"ewc_lambda": 1.0, "fused": 1}, TypeError, r"`fused`.*1"),
    ({"ewc_lambda": torch.tensor(1.0)}, TypeError, r"`ewc_lambda`.*tensor\(1\.\)"),
    ({"ewc_lambda": 1.0, "mode": "online", "decay_factor": 10**400}, ValueError, "`decay_factor`"),
]


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    CONSTRUCTOR_CASES,
    ids=[
        "lambda-10**400",
        "lambda--10**400",
        "params-empty-list",
        "params-empty-tuple",
        "fused-int",
        "lambda-tensor",
        "decay-10**400",
    ],
)
def test_bad_constructor_arguments(kwargs: dict, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        EWC(**kwargs)


# ---------------------------------------------------------------- load_state_dict
def damaged(change: Callable[[dict], Any]) -> Callable[[dict], dict]:
    def make(saved: dict) -> dict:
        change(saved)
        return saved

    return make


def setitem(path: tuple, value: Any) -> Callable[[dict], dict]:
    def change(saved: dict) -> None:
        target = saved
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(target[path[-1]]) if callable(value) else value

    return damaged(change)


def nan_first(t: Tensor) -> Tensor:
    t = t.clone()
    t.view(-1)[0] = math.nan
    return t


def inf_first(t: Tensor) -> Tensor:
    t = t.clone()
    t.view(-1)[0] = math.inf
    return t


def extra_history(saved: dict) -> None:
    saved["state"]["history"].append(copy.deepcopy(saved["state"]["history"][0]))


def history_rename(saved: dict) -> None:
    entry = saved["state"]["history"][0]
    entry["anchor"]["renamed"] = entry["anchor"].pop("0.bias")


def history_unknown_name(saved: dict) -> None:
    entry = saved["state"]["history"][0]
    entry["fisher"]["ghost"] = torch.ones(2)
    entry["anchor"]["ghost"] = torch.ones(2)


STATE_CASES = [
    (
        "centre-nan",
        setitem(("state", "centre", "0.weight"), nan_first),
        r"`centre\['0\.weight'\]`.*NaN",
    ),
    (
        "centre-inf",
        setitem(("state", "centre", "2.bias"), inf_first),
        r"`centre\['2\.bias'\]`.*infinite",
    ),
    (
        "importance-nan",
        setitem(("state", "importance", "0.bias"), nan_first),
        r"`importance\['0\.bias'\]`.*non-finite",
    ),
    (
        "importance-negative",
        setitem(("state", "importance", "0.bias"), lambda t: -t - 1),
        r"`importance\['0\.bias'\]`.*negative",
    ),
    (
        "offset-negative",
        setitem(("state", "offset"), torch.tensor(-1.0, dtype=torch.float64)),
        r"negative `offset` = -1\.0",
    ),
    (
        "offset-nan",
        setitem(("state", "offset"), torch.tensor(math.nan, dtype=torch.float64)),
        r"non-finite `offset` = nan",
    ),
    (
        "offset-int",
        setitem(("state", "offset"), torch.tensor(3)),
        r"`offset` of dtype torch\.int64",
    ),
    ("offset-float", setitem(("state", "offset"), 0.5), r"`offset` = 0\.5"),
    (
        "importance-int",
        setitem(("state", "importance", "0.bias"), lambda t: t.long()),
        r"`importance\['0\.bias'\]` has dtype torch\.int64",
    ),
    (
        "importance-bool",
        setitem(("state", "importance", "0.bias"), lambda t: t > 0),
        r"`importance\['0\.bias'\]` has dtype torch\.bool",
    ),
    (
        "importance-complex",
        setitem(("state", "importance", "0.bias"), lambda t: t.to(torch.complex64)),
        r"`importance\['0\.bias'\]` has dtype torch\.complex64",
    ),
    (
        "importance-half",
        setitem(("state", "importance", "0.bias"), lambda t: t.half()),
        r"`importance\['0\.bias'\]` has dtype torch\.float16",
    ),
    (
        "importance-bfloat16",
        setitem(("state", "importance", "0.bias"), lambda t: t.bfloat16()),
        r"`importance\['0\.bias'\]` has dtype torch\.bfloat16",
    ),
    (
        "dtypes-disagree",
        setitem(("state", "importance", "0.bias"), lambda t: t.double()),
        r"'0\.bias' has importance of dtype torch\.float64 but centre of dtype torch\.float32",
    ),
    (
        "importance-sparse",
        setitem(("state", "importance", "0.bias"), lambda t: t.to_sparse()),
        r"`importance\['0\.bias'\]` is a torch\.sparse_coo tensor",
    ),
    (
        "centre-meta",
        setitem(("state", "centre", "0.bias"), lambda t: t.to("meta")),
        r"`centre\['0\.bias'\]` is on the meta device",
    ),
    (
        "history-shape",
        setitem(("state", "history", 0, "fisher", "0.bias"), torch.ones(2)),
        r"parameter '0\.bias' has `history\[0\]\.fisher` of shape \(2,\) but "
        r"`history\[0\]\.anchor` of shape \(5,\)",
    ),
    (
        "history-larger-than-state",
        setitem(
            ("state", "history", 0),
            lambda e: {
                "fisher": {**e["fisher"], "0.bias": torch.ones(7)},
                "anchor": {**e["anchor"], "0.bias": torch.ones(7)},
            },
        ),
        r"`history\[0\]\.fisher\['0\.bias'\]` has shape \(7,\), larger than the "
        r"consolidated shape \(5,\)",
    ),
    (
        "history-nan",
        setitem(("state", "history", 1, "anchor", "2.weight"), nan_first),
        r"`history\[1\]\.anchor\['2\.weight'\]` has NaN",
    ),
    (
        "history-names-mismatch",
        damaged(history_rename),
        r"`history\[0\]\.fisher` and `history\[0\]\.anchor` must name the same "
        r"parameters.*'renamed'",
    ),
    (
        "history-unknown-name",
        damaged(history_unknown_name),
        r"`history\[0\]` names parameter 'ghost', which has no importance",
    ),
    ("history-longer-than-tasks", damaged(extra_history), r"3 `history` entries but `tasks` = 2"),
    ("history-without-tasks", setitem(("state", "tasks"), 0), r"parameters but `tasks` = 0"),
    ("tasks-bool", setitem(("state", "tasks"), True), r"`tasks` = True"),
    (
        "extra-top-level-key",
        setitem(("extra",), 1),
        r"unknown key\(s\) \['extra'\] in the state dict",
    ),
    ("extra-state-key", setitem(("state", "sums"), {}), r"unknown key\(s\) \['sums'\] in state"),
    ("extra-config-key", setitem(("config", "lr"), 0.1), r"unknown `config` key\(s\) \['lr'\]"),
    (
        "missing-state-key",
        damaged(lambda saved: saved["state"].pop("centre")),
        r"missing key\(s\) \['centre'\] in state",
    ),
    ("version-True", setitem(("version",), True), r"format version True"),
    ("version-1.0", setitem(("version",), 1.0), r"format version 1\.0"),
    ("version-2", setitem(("version",), 2), r"format version 2"),
    ("state-list", setitem(("state",), [1, 2]), r"`state` = \[1, 2\]"),
    ("state-None", setitem(("state",), None), r"`state` = None"),
    ("config-None", setitem(("config",), None), r"`config` \(got None\)"),
    ("not-a-dict", lambda saved: [saved], r"not an EWC state dict: expected a dict.*got a list"),
]


@pytest.mark.parametrize(
    "make, pattern", [c[1:] for c in STATE_CASES], ids=[c[0] for c in STATE_CASES]
)
def test_damaged_state_dicts_are_refused_naming_the_key_and_change_nothing(
    make: Callable[[dict], Any], pattern: str
) -> None:
    reg, _ = consolidated()
    source, _ = consolidated()
    before = snapshot(reg)
    with pytest.raises(StateDictError, match=pattern):
        reg.load_state_dict(make(source.state_dict()))
    assert_unchanged(reg, before)


def test_a_valid_state_dict_still_loads() -> None:
    """The cases above are refused for their damage, not for the dict they start from."""
    reg, net = consolidated()
    clone = EWC(2.0, keep_importance_data=True)
    clone.load_state_dict(reg.state_dict())
    assert torch.equal(clone.penalty(net), reg.penalty(net))
    assert len(clone.state.history) == 2


# ---------------------------------------------------------------- the state is never moved
def test_a_model_on_another_dtype_is_penalised_without_changing_the_state() -> None:
    reg, net = consolidated()
    before = snapshot(reg)
    wide = copy.deepcopy(net).double()
    value = reg.penalty(wide)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value.float(), reg.penalty(net).detach(), rtol=1e-5, atol=0)
    reg.penalty_grad_(wide)
    expected = torch.autograd.grad(reg.penalty(wide), list(wide.parameters()))
    for p, want in zip(wide.parameters(), expected):
        torch.testing.assert_close(p.grad, want)
    assert_unchanged(reg, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_moved_to_the_gpu_is_penalised_through_copies() -> None:
    reg, net = consolidated()
    before = snapshot(reg)
    on_gpu = copy.deepcopy(net).cuda()
    value = reg.penalty(on_gpu)
    assert value.device.type == "cuda"
    torch.testing.assert_close(value.cpu(), reg.penalty(net).detach(), rtol=1e-5, atol=0)
    reg.penalty_grad_(on_gpu)
    expected = torch.autograd.grad(reg.penalty(on_gpu), list(on_gpu.parameters()))
    for p, want in zip(on_gpu.parameters(), expected):
        torch.testing.assert_close(p.grad, want)
    assert_unchanged(reg, before)  # still on the CPU, bit for bit
    assert all(t.device.type == "cpu" for t in reg.state.importance.values())


def test_torch_compile_wrapper_is_looked_through() -> None:
    reg, net = consolidated()
    compiled = torch.compile(net)  # no compilation happens until it is called
    assert torch.equal(reg.penalty(compiled).detach(), reg.penalty(net).detach())
    other = EWC(2.0)
    estimate = other.estimate(compiled, data(), nn.CrossEntropyLoss())  # no `_orig_mod.`
    assert set(estimate.fisher) == set(reg.state.importance)


def test_state_tensors_never_carry_a_graph() -> None:
    """Tensors with a graph given to add_task (or built into a state) are stored detached."""
    reg, net = consolidated()
    fisher = {n: (p * 0 + 1).abs() for n, p in net.named_parameters()}  # grad_fn attached
    anchor = {n: p * 1 for n, p in net.named_parameters()}
    assert all(t.grad_fn is not None for t in fisher.values())
    reg.add_task(fisher, anchor)
    from ewc.store import ConsolidatedState

    built = ConsolidatedState({"w": torch.ones(2, requires_grad=True)}, {"w": torch.zeros(2) * 1})
    for state in (reg.state, built):
        for tensor in tensors_of(state.state_dict()).values():
            assert not tensor.requires_grad and tensor.grad_fn is None
        for tensor in (*state.importance.values(), *state.centre.values(), state.offset):
            assert not tensor.requires_grad and tensor.grad_fn is None
    copy.deepcopy(reg)


# ---------------------------------------------------------------- state_dict aliasing
def test_state_dict_returns_copies_not_live_tensors() -> None:
    """Documented choice: unlike nn.Module, state_dict() copies (writes cannot corrupt it)."""
    reg, _ = consolidated()
    before = snapshot(reg)
    saved = reg.state_dict()
    live = [*reg.state.importance.values(), *reg.state.centre.values(), reg.state.offset]
    pointers = {t.untyped_storage().data_ptr() for t in live}
    for tensor in tensors_of(saved["state"]).values():
        assert tensor.untyped_storage().data_ptr() not in pointers
        tensor.fill_(-1.0)
    assert_unchanged(reg, before)


# ---------------------------------------------------------------- data, outputs and criteria
def one_task(estimator: str) -> tuple[EWC, nn.Sequential]:
    """One task consolidated with ``estimator`` on one batch."""
    net = model()
    reg = EWC(1.0, fisher=estimator)
    reg.consolidate(net, [one_batch()], nn.CrossEntropyLoss())
    return reg, net


@dataclass
class DataCase:
    id: str
    estimators: tuple[str, ...]
    error: type[Exception]
    match: str
    batches: Callable[[], list] = lambda: [one_batch()]
    criterion: Any = field(default_factory=nn.CrossEntropyLoss)
    forward: Any = None


def labels(values: list[int]) -> list:
    x, _ = one_batch(len(values))
    return [(x, torch.tensor(values))]


def detached(model: nn.Module, batch: Any) -> tuple[Tensor, Any]:
    return model(batch[0]).detach(), batch[1]


def without_grad(model: nn.Module, batch: Any) -> tuple[Tensor, Any]:
    with torch.no_grad():
        return model(batch[0]), batch[1]


def integer_output(model: nn.Module, batch: Any) -> tuple[Tensor, Any]:
    return (model(batch[0]) * 100).long(), batch[1]


def three_tuple(model: nn.Module, batch: Any) -> tuple:
    return model(batch[0]), batch[1], None


def scalar_output(model: nn.Module, batch: Any) -> tuple[Tensor, Any]:
    return model(batch[0]).sum(), batch[1]


def vector_output(model: nn.Module, batch: Any) -> tuple[Tensor, Any]:
    return model(batch[0])[:, 0], batch[1]


ALL = ("exact", "sample", "empirical", "batched")
PER_EXAMPLE = ("exact", "sample", "empirical")
DATA_CASES = [
    DataCase("only-empty-batches", ALL, ConsolidationError, "no examples",
             batches=lambda: [one_batch(0), one_batch(0)]),
    DataCase("label-minus-one", ("empirical",), ConsolidationError,
             r"target \(label\) -1 is out of range for 3 classes",
             batches=lambda: labels([0, -1, 2])),
    DataCase("label-too-large", ("empirical",), ConsolidationError,
             r"target \(label\) 3 is out of range for 3 classes",
             batches=lambda: labels([0, 3, 2])),
    DataCase("output-detached", ALL, ConsolidationError, r"without an autograd graph.*detach",
             forward=detached),
    DataCase("forward-under-no-grad", ALL, ConsolidationError,
             r"without an autograd graph.*no_grad", forward=without_grad),
    DataCase("integer-output", ALL, ConsolidationError, r"output of dtype torch\.int64",
             forward=integer_output),
    DataCase("forward-returns-three", ALL, ConsolidationError,
             r"pair \(output, target\); got a tuple of length 3", forward=three_tuple),
    DataCase("output-0d", ALL, ConsolidationError, r"0-d output", forward=scalar_output),
    DataCase("output-1d-categorical", PER_EXAMPLE, ConsolidationError,
             r"output of shape \(4,\) has 1 dimension", forward=vector_output),
    DataCase("labels-wrong-length", ALL, ConsolidationError,
             r"target \(labels\) has 3 entries.*output has 4 examples",
             batches=lambda: [(one_batch()[0], one_batch()[1][:3])]),
    DataCase("criterion-none", ALL, UnsupportedCriterionError,
             r"`criterion` is None.*Sequential", criterion=None),
    DataCase("reduction-none-batched", ("batched",), UnsupportedCriterionError,
             r"scalar loss.*got \(4,\).*`reduction`='none'",
             criterion=nn.CrossEntropyLoss(reduction="none")),
    DataCase("empirical-without-targets", ("empirical",), ConsolidationError, r"needs targets",
             batches=lambda: [one_batch()[0]]),
]  # fmt: skip
DATA_GRID = [(case, estimator) for case in DATA_CASES for estimator in case.estimators]


@pytest.mark.parametrize(
    ("case", "estimator"), DATA_GRID, ids=[f"{c.id}-{e}" for c, e in DATA_GRID]
)
def test_bad_data_is_a_clear_error_and_leaves_the_state_unchanged(case: DataCase, estimator: str):
    reg, net = one_task(estimator)
    before = snapshot(reg)
    with pytest.raises(case.error, match=case.match):
        reg.consolidate(net, case.batches(), case.criterion, forward=case.forward)
    assert reg.tasks == 1
    assert_unchanged(reg, before)


@pytest.mark.parametrize("estimator", ALL)
def test_an_empty_batch_in_the_middle_is_skipped(estimator: str):
    net = model()
    (x1, y1), (x2, y2) = one_batch(4, seed=1), one_batch(3, seed=2)
    empty = (x1[:0], y1[:0])
    torch.manual_seed(5)
    with_empty = EWC(1.0, fisher=estimator)
    report = with_empty.consolidate(net, [(x1, y1), empty, (x2, y2)], nn.CrossEntropyLoss())
    torch.manual_seed(5)
    without = EWC(1.0, fisher=estimator)
    without.consolidate(net, [(x1, y1), (x2, y2)], nn.CrossEntropyLoss())
    assert report.examples == 7 and report.batches == 2
    for name, value in without.state.importance.items():
        assert torch.equal(with_empty.state.importance[name], value), name


def test_a_misspelt_estimator_names_the_argument_and_the_valid_names():
    net = model()
    with pytest.raises(ValueError, match=r"`estimator`.*'exact', 'sample'.*'exakt'"):
        fisher_sums(net, dict(net.named_parameters()), [one_batch()], nn.CrossEntropyLoss(),
                    estimator="exakt")  # fmt: skip
    from ewc.fisher import check_estimator

    assert check_estimator("sample") == "sample"
    with pytest.raises(ValueError, match=r"`fisher`.*None"):
        check_estimator(None)


def failing_loader(error: Exception) -> Iterator:
    """A one-shot loader (a generator): one batch, then ``error``."""
    yield one_batch()
    raise error


@pytest.mark.parametrize("max_samples", [None, 6])
def test_a_loaders_error_propagates_and_is_not_called_a_max_samples_problem(max_samples):
    net = model()
    with pytest.raises(ValueError, match="shard 3 is corrupt") as info:
        fisher_sums(
            net,
            dict(net.named_parameters()),
            failing_loader(ValueError("shard 3 is corrupt")),
            nn.CrossEntropyLoss(),
            estimator="empirical",
            max_samples=max_samples,
        )
    assert not isinstance(info.value, EWCError)  # user code's error: the core wraps it
    reg = EWC(1.0, fisher="empirical", max_samples=max_samples)
    with pytest.raises((ValueError, ConsolidationError)) as info:
        reg.consolidate(net, failing_loader(ValueError("shard 3 is corrupt")),
                        nn.CrossEntropyLoss())  # fmt: skip
    assert "max_samples" not in str(info.value)
    original = info.value if not isinstance(info.value, EWCError) else info.value.__cause__
    assert isinstance(original, ValueError) and "shard 3 is corrupt" in str(original)
    assert reg.tasks == 0


def test_a_batch_that_cannot_be_cut_is_a_max_samples_error():
    net = model()
    with pytest.raises(ConsolidationError, match=r"max_samples=2.*type str"):
        fisher_sums(net, dict(net.named_parameters()), ["not a tensor batch"],
                    nn.CrossEntropyLoss(), estimator="empirical", max_samples=2,
                    forward=lambda m, b: (m(torch.zeros(1, 4)), None))  # fmt: skip


def test_errors_from_the_forward_propagate_unwrapped_from_fisher_sums():
    def broken(model: nn.Module, batch: Any) -> tuple[Tensor, Any]:
        raise TypeError("the user's forward is broken")

    net = model()
    with pytest.raises(TypeError, match="the user's forward is broken"):
        fisher_sums(net, dict(net.named_parameters()), [one_batch()], nn.CrossEntropyLoss(),
                    estimator="exact", forward=broken)  # fmt: skip


def test_a_sparse_gradient_is_refused_before_any_missing_gradient_is_created() -> None:
    """``penalty_grad_`` creates zero gradients where there are none, but only once every check
    has passed: a sparse gradient after a parameter without one leaves that one None."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(3, 2), "e": nn.Embedding(5, 2, sparse=True)})
    x, tokens = torch.randn(4, 3), torch.randint(0, 5, (4,))
    reg = EWC(1.0, fisher="empirical")
    reg.consolidate(
        model,
        [((x, tokens), torch.zeros(4, 2))],
        lambda output, target: (output - target).square().mean(),
        forward=lambda m, batch: (m["a"](batch[0][0]) + m["e"](batch[0][1]), batch[1]),
    )
    model["e"](tokens).sum().backward()  # only the embedding has a gradient, and it is sparse
    with pytest.raises(TypeError, match=r"'e\.weight' has a torch\.sparse_coo gradient"):
        reg.penalty_grad_(model)
    assert model["a"].weight.grad is None and model["a"].bias.grad is None
