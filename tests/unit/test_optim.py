"""``ewc.optim.SGD``/``AdamW``: the penalty inside the optimizer's pass, against
``penalty_grad_`` + the torch optimizer.

The reference is the two-pass step users would otherwise write, on a copy of the same model:
``reg.penalty_grad_(reference); torch.optim.SGD(..., foreach=False).step()`` (or ``AdamW``). Most
tests run for both optimizers (the ``kind`` parameter). Skipped only where no C++ compiler or
ninja exists, like ``EWC(fused=True)``.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import ewc._fused
from ewc import EWC
from ewc.optim import SGD, AdamW

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None or shutil.which("ninja") is None,
    reason="ewc.optim builds a C++ kernel: needs a C++ compiler and ninja",
)


@dataclass(frozen=True)
class Kind:
    """One optimizer of ewc.optim, its torch counterpart, and the options tested."""

    ours: type
    theirs: type
    hyperparameters: list[dict[str, Any]]
    stateful: dict[str, Any]  # options that give the optimizer per-parameter state
    state_keys: tuple[str, ...]
    lr: float
    extra: dict[str, Any] = field(default_factory=dict)  # torch-only options of the reference

    def __str__(self) -> str:
        return self.ours.__name__


SGD_KIND = Kind(
    SGD,
    torch.optim.SGD,
    [
        {},
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True},
        {"momentum": 0.8, "dampening": 0.3, "weight_decay": 0.01},
        {"weight_decay": 0.05},
        {"momentum": 0.5, "nesterov": True, "weight_decay": 0.1},
    ],
    {"momentum": 0.9},
    ("momentum_buffer",),
    lr=0.05,
)
ADAMW_KIND = Kind(
    AdamW,
    torch.optim.AdamW,
    [
        {},
        {"weight_decay": 0.0},
        {"amsgrad": True},
        {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True},
        {"betas": (0.3, 0.9)},  # 1 - beta1 >= 0.5: the other branch of lerp
        {"lr": torch.tensor(0.02), "betas": (torch.tensor(0.9), torch.tensor(0.99))},
        {  # a one-element 1-d lr and float64 betas: squeezed and promoted as torch does
            "lr": torch.tensor([0.02]),
            "betas": (torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.99)),
        },
    ],
    {"amsgrad": True},
    ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    lr=0.01,
)
KINDS = [SGD_KIND, ADAMW_KIND]
CASES = [(kind, hyper) for kind in KINDS for hyper in kind.hyperparameters]


def case_id(value: Any) -> str:
    """``AdamW-amsgrad``: the optimizer and the options a case sets."""
    if isinstance(value, tuple):
        return "-".join(case_id(part) for part in value)
    if isinstance(value, dict):
        return ",".join(value) or "plain"
    return str(value)


class Net(nn.Module):
    """A body consolidated on, a frozen layer, and a head added after consolidation."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 200), nn.Tanh())
        self.frozen = nn.Linear(200, 200)
        self.head = nn.Linear(200, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.frozen(self.body(x))))


def not_the_head(name: str, param: nn.Parameter) -> bool:
    return not name.startswith("head")


def consolidated(dtype: torch.dtype, seed: int = 0) -> tuple[Net, EWC, torch.Generator]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Net().to(dtype)
    reg = EWC(5.0, fisher="empirical", params=not_the_head)
    for _ in range(2):
        x = torch.randn(16, 6, generator=generator).to(dtype)
        y = torch.randint(0, 3, (16,), generator=generator)
        reg.consolidate(net, [(x, y)], nn.CrossEntropyLoss())
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=generator).to(dtype))
    net.frozen.requires_grad_(False)
    return net, reg, generator


def run_both(
    kind: Kind, hyper: dict[str, Any], dtype: torch.dtype, steps: int = 3
) -> tuple[Net, Net, Any, Any, list[list[torch.Tensor]]]:
    net, reg, generator = consolidated(dtype)
    reference = copy.deepcopy(net)
    options = {"lr": kind.lr, **hyper}
    ours = kind.ours(
        [p for p in net.parameters() if p.requires_grad], reg=reg, model=net, **options
    )
    theirs = kind.theirs(
        [p for p in reference.parameters() if p.requires_grad], foreach=False, **options
    )
    task_grads = []
    for _ in range(steps):
        x = torch.randn(8, 6, generator=generator).to(dtype)
        y = torch.randint(0, 3, (8,), generator=generator)
        for model, optimizer in ((net, ours), (reference, theirs)):
            optimizer.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
        task_grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
        reg.penalty_grad_(reference)
        theirs.step()
        ours.step()
        kept = [p.grad for p in net.parameters() if p.grad is not None]
        for before, after in zip(task_grads[-1], kept):
            assert torch.equal(before, after)  # .grad keeps the task gradient
    return net, reference, ours, theirs, task_grads


def assert_same_state(kind: Kind, ours: Any, theirs: Any, pairs: Any, **tolerance: Any) -> None:
    """Every state tensor of ``kind`` equal between the two optimizers, per parameter pair."""
    for mine, expected in pairs:
        for key in kind.state_keys:
            if expected in theirs.state and key in theirs.state[expected]:
                torch.testing.assert_close(
                    ours.state[mine][key], theirs.state[expected][key], **tolerance, msg=key
                )


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_one_pass_step_equals_penalty_grad_then_the_torch_optimizer(case):
    """In float64 to 1e-12. In float32 the two paths round differently (the penalised gradient
    stays in a register on one, is stored on the other), and Adam divides by ``sqrt(v)``, which
    magnifies a rounding difference where ``exp_avg`` nearly cancels; so each float32 result is
    compared with the float64 run of the same case: ours may be at most twice as far from it as
    torch's own float32 step is."""
    kind, hyper = case
    net, reference, ours, theirs, _ = run_both(kind, hyper, torch.float64)
    for (name, mine), expected in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(mine, expected, rtol=1e-12, atol=1e-14, msg=name)
    pairs = zip(net.parameters(), reference.parameters())
    assert_same_state(kind, ours, theirs, pairs, rtol=1e-12, atol=1e-14)
    assert torch.equal(net.frozen.weight, reference.frozen.weight)  # frozen: never stepped

    net32, reference32, *_ = run_both(kind, hyper, torch.float32)
    compared = zip(net32.named_parameters(), reference32.parameters(), reference.parameters())
    for (name, mine), torch_result, exact in compared:
        ours_error = (mine.double() - exact).abs().max().item()
        torch_error = (torch_result.double() - exact).abs().max().item()
        assert ours_error <= 2 * torch_error + 1e-7, (name, ours_error, torch_error)


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_the_penalty_moves_the_weights_and_a_new_head_takes_the_plain_step(kind: Kind):
    """Against the same optimizer without the penalty: only the consolidated parameters
    differ, and the new head (not in the state) steps as the plain torch optimizer."""
    net, reg, generator = consolidated(torch.float64)
    plain = copy.deepcopy(net)
    ours = kind.ours([p for p in net.parameters() if p.requires_grad], lr=0.1, reg=reg, model=net)
    theirs = kind.theirs([p for p in plain.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=generator)
    for model, optimizer in ((net, ours), (plain, theirs)):
        nn.CrossEntropyLoss()(model(x), y).backward()
        optimizer.step()
    assert not torch.allclose(net.body[0].weight, plain.body[0].weight)
    torch.testing.assert_close(net.head.weight, plain.head.weight, rtol=1e-15, atol=1e-16)


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_a_grown_parameter_takes_the_two_pass_step_with_the_same_result(kind: Kind):
    net, reg, generator = consolidated(torch.float64)
    with torch.no_grad():  # body[2] grows by 5 outputs after consolidation
        grown = nn.Linear(40, 205).double()
        grown.weight[:200].copy_(net.body[2].weight)
        grown.bias[:200].copy_(net.body[2].bias)
    net.body[2] = grown
    net.frozen = nn.Linear(205, 200).double().requires_grad_(False)
    reference = copy.deepcopy(net)
    options = {"lr": kind.lr, **kind.stateful}
    ours = kind.ours(
        [p for p in net.parameters() if p.requires_grad], reg=reg, model=net, **options
    )
    theirs = kind.theirs([p for p in reference.parameters() if p.requires_grad], **options)
    for _ in range(2):
        x = torch.randn(8, 6, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=generator)
        for model, optimizer in ((net, ours), (reference, theirs)):
            optimizer.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
        task = net.body[2].weight.grad.clone()
        reg.penalty_grad_(reference)
        theirs.step()
        ours.step()
        assert torch.equal(net.body[2].weight.grad, task)  # restored after the two passes
    for mine, expected in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, expected, rtol=1e-13, atol=1e-15)
    pairs = zip(net.parameters(), reference.parameters())
    assert_same_state(kind, ours, theirs, pairs, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_lr_schedulers_closures_and_state_dicts_work_as_for_the_torch_optimizer(kind: Kind):
    net, reg, generator = consolidated(torch.float64)
    reference = copy.deepcopy(net)
    params = [p for p in net.parameters() if p.requires_grad]
    options = {"lr": 0.1, **kind.stateful}
    ours = kind.ours(params, reg=reg, model=net, **options)
    theirs = kind.theirs([p for p in reference.parameters() if p.requires_grad], **options)
    schedulers = [
        torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (ours, theirs)
    ]
    x = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=generator)
    for _ in range(3):
        for model, optimizer in ((net, ours), (reference, theirs)):

            def closure(model: nn.Module = model, optimizer: Any = optimizer) -> torch.Tensor:
                optimizer.zero_grad()
                loss = nn.CrossEntropyLoss()(model(x), y)
                loss.backward()
                return loss

            if optimizer is theirs:
                closure()
                reg.penalty_grad_(reference)
                theirs.step()
            else:
                assert isinstance(ours.step(closure), torch.Tensor)
        for scheduler in schedulers:
            scheduler.step()
    for mine, expected in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, expected, rtol=1e-12, atol=1e-14)
    restored = kind.theirs(params, **options)
    restored.load_state_dict(ours.state_dict())  # the state is the torch optimizer's own format
    for p in params:
        for key in kind.state_keys:
            assert torch.equal(restored.state[p][key], ours.state[p][key]), key
    back = kind.ours(params, reg=reg, model=net, **options)
    back_model = copy.deepcopy(reference)
    back = kind.ours(
        [p for p in back_model.parameters() if p.requires_grad], reg=reg, model=back_model,
        **options,
    )  # fmt: skip
    # and back: the torch optimizer's state is ours (a copy: loading shares tensors, as in torch)
    back.load_state_dict(copy.deepcopy(theirs.state_dict()))
    back_params = [p for p in back_model.parameters() if p.requires_grad]
    their_params = [p for p in reference.parameters() if p.requires_grad]
    for mine, expected in zip(back_params, their_params):
        for key in kind.state_keys:
            if key in theirs.state[expected]:
                assert torch.equal(back.state[mine][key], theirs.state[expected][key]), key
    for model, optimizer in ((back_model, back), (reference, theirs)):  # and steps alike
        optimizer.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()
    reg.penalty_grad_(reference)
    theirs.step()
    back.step()
    for mine, expected in zip(back_params, their_params):
        torch.testing.assert_close(mine, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_before_any_task_it_is_the_plain_torch_optimizer(kind: Kind):
    torch.manual_seed(0)
    net = nn.Linear(4, 3).double()
    reference = copy.deepcopy(net)
    options = {"lr": 0.1, **kind.stateful}
    ours = kind.ours(net.parameters(), reg=EWC(10.0), model=net, **options)
    theirs = kind.theirs(reference.parameters(), **options)
    x = torch.randn(5, 4, dtype=torch.float64)
    for _ in range(2):
        for model, optimizer in ((net, ours), (reference, theirs)):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
    for mine, expected in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, expected, rtol=1e-15, atol=1e-16)


@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"reg": "reg"}, TypeError, r"`reg`.*ewc\.EWC.*'reg'"),
        ({"model": 3}, TypeError, r"`model`.*nn\.Module.*3"),
        ({"lr": -1.0}, ValueError, r"-1\.0"),
        ({"maximize": True}, ValueError, r"`maximize`.*True"),
    ],
)
def test_bad_arguments_are_clear_errors(kind: Kind, kwargs: dict[str, Any], error, message):
    net = nn.Linear(2, 2)
    arguments = {"lr": 0.1, "reg": EWC(1.0), "model": net, **kwargs}
    with pytest.raises(error, match=message):
        kind.ours(net.parameters(), **arguments)


@pytest.mark.parametrize(
    ("kind", "kwargs", "message"),
    [
        (SGD_KIND, {"momentum": -0.5}, r"-0\.5"),
        (ADAMW_KIND, {"betas": (1.5, 0.999)}, r"1\.5"),
        (ADAMW_KIND, {"eps": -1e-3}, r"-0\.001"),
    ],
    ids=case_id,
)
def test_options_torch_refuses_are_refused_alike(kind: Kind, kwargs: dict[str, Any], message):
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=message):
        kind.ours(net.parameters(), lr=0.1, reg=EWC(1.0), model=net, **kwargs)


@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize(
    ("option", "value"),
    [("capturable", True), ("differentiable", True), ("foreach", True), ("fused", True)],
)
def test_parameter_group_options_one_compiled_pass_cannot_honour_are_refused(
    kind: Kind, option: str, value: Any
):
    net = nn.Linear(2, 2)
    ours = kind.ours([net.weight], lr=0.1, reg=EWC(1.0), model=net)
    with pytest.raises(ValueError, match=rf"`{option}`.*{value}"):
        ours.add_param_group({"params": [net.bias], option: value})
    assert len(ours.param_groups) == 1


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_a_failed_build_names_the_optimizer(kind: Kind, monkeypatch, tmp_path):
    monkeypatch.setattr(ewc._fused, "_module", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    net = nn.Linear(2, 2)
    name = kind.ours.__name__
    with pytest.raises(
        RuntimeError, match=rf"(?s)ewc\.optim\.{name}: .*C\+\+ compiler.*penalty_grad_"
    ) as caught:
        kind.ours(net.parameters(), lr=0.1, reg=EWC(1.0), model=net)
    assert caught.value.__cause__ is not None


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_a_pickled_optimizer_rebuilds_its_kernel_and_steps_alike(kind: Kind):
    import pickle

    net, reg, generator = consolidated(torch.float64)
    ours = kind.ours(
        [p for p in net.parameters() if p.requires_grad],
        lr=0.1,
        reg=reg,
        model=net,
        **kind.stateful,
    )
    x = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=generator)
    nn.CrossEntropyLoss()(net(x), y).backward()
    ours.step()
    net2, ours2 = pickle.loads(pickle.dumps((net, ours)))
    assert ours2.model is net2 and ours2.reg.tasks == 2
    assert repr(ours2).startswith(f"ewc.optim.{kind.ours.__name__} (reg=")
    for model, optimizer in ((net, ours), (net2, ours2)):
        optimizer.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()  # gradients are not pickled
        optimizer.step()
    for mine, theirs in zip(net.parameters(), net2.parameters()):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_parameter_groups_a_missing_gradient_and_a_later_task_match_the_reference(kind: Kind):
    """Two groups with their own options; the head gets no gradient in the second step (a
    consolidated parameter without one gets zeros and the penalty, as with penalty_grad_); a
    third task and a new ewc_lambda after the optimizer was built take effect."""
    net, reg, generator = consolidated(torch.float64)
    reg2 = copy.deepcopy(reg)
    reference = copy.deepcopy(net)

    def groups(model: Net) -> list[dict[str, Any]]:
        return [
            {"params": list(model.body.parameters()), "lr": 0.05, **kind.stateful},
            {"params": list(model.head.parameters()), "lr": 0.2, "weight_decay": 0.0},
        ]

    ours = kind.ours(groups(net), lr=0.1, reg=reg, model=net)
    theirs = kind.theirs(groups(reference), lr=0.1, foreach=False)
    for step in range(4):
        x = torch.randn(8, 6, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=generator)
        for model, optimizer in ((net, ours), (reference, theirs)):
            optimizer.zero_grad()
            if step != 1:
                nn.CrossEntropyLoss()(model(x), y).backward()
        if step == 2:  # a new task and a new strength, after construction
            for r, model in ((reg, net), (reg2, reference)):
                r.consolidate(model, [(x, y)], nn.CrossEntropyLoss())
                r.ewc_lambda = 11.0
        reg2.penalty_grad_(reference)
        theirs.step()
        ours.step()
    for (name, mine), expected in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(mine, expected, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_the_two_pass_step_leaves_every_other_gradient_as_it_was(kind: Kind):
    """A grown parameter forces the two-pass step: the gradients of parameters outside the
    optimizer (dense, sparse, or None) are exactly as before, and the step equals the
    reference on the optimizer's own parameters."""
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "a": nn.Linear(3, 4).double(),
            "b": nn.Linear(4, 2).double(),
            "e": nn.Embedding(5, 2, sparse=True).double(),
        }
    )

    def loss_of(m: nn.ModuleDict, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return m["b"](torch.tanh(m["a"](x))).square().sum() + m["e"](t).sum()

    x, t = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 3])
    reg = EWC(4.0, fisher="empirical", params=lambda n, p: not n.startswith("e"))
    reg.consolidate(
        model,
        [(x, torch.zeros(6, 2, dtype=torch.float64))],
        _mse_of(model),
        forward=lambda m, batch: (m["b"](torch.tanh(m["a"](batch[0]))), batch[1]),
    )
    with torch.no_grad():  # "b" grows by one output after consolidation: the two-pass step
        grown = nn.Linear(4, 3).double()
        grown.weight[:2].copy_(model["b"].weight)
        grown.bias[:2].copy_(model["b"].bias)
        model["b"] = grown
        for p in model.parameters():
            p.add_(0.1)
    reference = copy.deepcopy(model)
    options = {"lr": 0.1, **kind.stateful}
    ours = kind.ours(model["b"].parameters(), reg=reg, model=model, **options)
    theirs = kind.theirs(reference["b"].parameters(), **options)
    for m in (model, reference):
        loss_of(m, x, t).backward()
        m["a"].bias.grad = None  # a consolidated parameter outside the optimizer, no gradient
    before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    calls: list[str] = []
    ours.register_step_pre_hook(lambda *args: calls.append("pre"))
    reg.penalty_grad_(reference)
    theirs.step()
    ours.step()
    assert calls == ["pre"]  # the two-pass step does not go through torch's hooked step again
    for name, p in model.named_parameters():
        if name.startswith("b."):
            continue
        if before[name] is None:
            assert p.grad is None, name
        elif p.grad.is_sparse:
            assert torch.equal(p.grad.to_dense(), before[name].to_dense()), name
        else:
            assert torch.equal(p.grad, before[name]), name
    for mine, expected in zip(model["b"].parameters(), reference["b"].parameters()):
        torch.testing.assert_close(mine, expected, rtol=1e-13, atol=1e-15)


def _mse_of(model: nn.ModuleDict) -> Any:
    def criterion(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (output - target).square().mean()

    return criterion


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_step_hooks_run_once_and_the_weights_record_the_in_place_write(kind: Kind):
    net, reg, generator = consolidated(torch.float64)
    ours = kind.ours(net.parameters(), lr=0.1, reg=reg, model=net, **kind.stateful)
    kind.theirs(nn.Linear(1, 1).parameters(), lr=0.1)  # torch patches its own step too
    calls: list[str] = []
    ours.register_step_pre_hook(lambda *args: calls.append("pre"))
    ours.register_step_post_hook(lambda *args: calls.append("post"))
    x = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    loss = net(x).square().sum()
    loss.backward(retain_graph=True)
    ours.step()
    assert calls == ["pre", "post"]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # the graph saw the weights before the step, as with torch's optimizers
    state = ours.state[net.body[0].weight]
    key = kind.state_keys[-1]
    before = state[key]._version
    net(x).square().sum().backward()
    ours.step()
    assert state[key]._version > before  # and so do the state tensors written in place


@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("consolidated_first", [True, False], ids=["task", "no-task"])
def test_maximize_is_refused_in_a_group_and_from_a_state_dict(kind: Kind, consolidated_first):
    """The compiled pass descends: ``maximize=True`` is refused when a group asks for it, and
    at the step when a loaded state dict brings it, with or without a task consolidated (the
    weights unchanged)."""
    net, reg, _ = consolidated(torch.float64)
    if not consolidated_first:
        reg = EWC(1.0)
    ours = kind.ours(net.body.parameters(), lr=0.1, reg=reg, model=net)
    with pytest.raises(ValueError, match=r"`maximize`.*maximize=True"):
        ours.add_param_group({"params": list(net.head.parameters()), "maximize": True})
    assert len(ours.param_groups) == 1
    saved = ours.state_dict()
    saved["param_groups"][0]["maximize"] = True
    ours.load_state_dict(saved)
    net(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    weights = [p.clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"`maximize`.*maximize=True"):
        ours.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters()))


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_a_state_dict_of_a_fused_torch_optimizer_loads_with_this_ones_mechanism(kind: Kind):
    """torch's ``fused=True``/``foreach=True`` state dicts are the same maths: they load, the
    groups take this optimizer's mechanism options, and the step matches the reference."""
    net, reg, generator = consolidated(torch.float64)
    params = [p for p in net.parameters() if p.requires_grad]
    options = {"lr": 0.1, **kind.stateful}
    fused = kind.theirs(params, fused=True, **options)
    x = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=generator)
    nn.CrossEntropyLoss()(net(x), y).backward()
    fused.step()
    ours = kind.ours(params, reg=reg, model=net, **options)
    saved = copy.deepcopy(fused.state_dict())  # loading shares tensors, as in torch
    saved["param_groups"][0].update(foreach=True, capturable=True, differentiable=True)
    ours.load_state_dict(saved)
    group = ours.param_groups[0]
    assert (group["fused"], group["foreach"]) == (None, False)
    assert not group.get("capturable") and not group.get("differentiable")
    reference = copy.deepcopy(net)
    theirs = kind.theirs([p for p in reference.parameters() if p.requires_grad], **options)
    theirs.load_state_dict(copy.deepcopy(fused.state_dict()))
    for model, optimizer in ((net, ours), (reference, theirs)):
        optimizer.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()
    reg.penalty_grad_(reference)
    theirs.step()
    ours.step()
    for mine, expected in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, expected, rtol=1e-12, atol=1e-14)


def test_a_state_tensor_of_the_wrong_shape_moves_nothing():
    """A state tensor that does not fit its parameter (a state dict of another model) is an
    error naming it, raised before any weight, gradient or step counter moves."""
    net, reg, generator = consolidated(torch.float64)
    ours = AdamW(
        [{"params": list(net.body.parameters())}, {"params": list(net.head.parameters())}],
        lr=0.1, reg=reg, model=net,
    )  # fmt: skip
    x = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=generator)
    nn.CrossEntropyLoss()(net(x), y).backward()
    ours.step()
    ours.state[net.head.bias]["exp_avg"] = torch.zeros(1, dtype=torch.float64)
    ours.zero_grad()
    nn.CrossEntropyLoss()(net(x), y).backward()
    weights = [p.clone() for p in net.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
    steps = [ours.state[p]["step"].clone() for p in net.parameters() if p in ours.state]
    with pytest.raises(ValueError, match=r"`exp_avg`.*shape \(3,\).*\(1,\)"):
        ours.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters()))
    for before, p in zip(grads, net.parameters()):
        assert (before is None and p.grad is None) or torch.equal(before, p.grad)
    assert [ours.state[p]["step"] for p in net.parameters() if p in ours.state] == steps


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_an_optimizer_over_parameters_of_another_model_warns(kind: Kind):
    net, reg, _ = consolidated(torch.float64)
    other = copy.deepcopy(net)
    ours = kind.ours(other.parameters(), lr=0.1, reg=reg, model=net)
    other(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    torch.optim.lr_scheduler.StepLR(ours, step_size=1)  # wraps ours.step in one more frame
    with pytest.warns(UserWarning, match="none of this optimizer's parameters") as caught:
        ours.step()
    assert caught[0].filename == __file__  # points at the caller's step()


def test_adamw_refuses_a_sparse_gradient_before_anything_moves():
    """As torch.optim.AdamW: a sparse gradient is an error, on either path, and the weights, the
    gradients and the optimizer state are exactly as before."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(3, 2).double(), "e": nn.Embedding(5, 2, sparse=True)})
    model["e"].double()
    x = torch.randn(4, 3, dtype=torch.float64)
    reg = EWC(2.0, fisher="empirical", params=lambda n, p: n.startswith("a"))
    reg.consolidate(
        model,
        [(x, torch.zeros(4, 2, dtype=torch.float64))],
        _mse_of(model),
        forward=lambda m, batch: (m["a"](batch[0]), batch[1]),
    )
    ours = AdamW(model.parameters(), lr=0.1, reg=reg, model=model)
    model["a"](x).sum().backward()
    ours.step()  # a first step with dense gradients only
    weights = [p.clone() for p in model.parameters()]
    state = copy.deepcopy(ours.state_dict())
    ours.zero_grad()
    (model["a"](x).sum() + model["e"](torch.tensor([1, 3])).sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"AdamW does not support sparse gradients.*\(5, 2\)"):
        ours.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    for before, p in zip(grads, model.parameters()):
        assert torch.equal(before.to_dense(), p.grad.to_dense())
    after = ours.state_dict()
    for index, entries in state["state"].items():
        for key, value in entries.items():
            assert torch.equal(after["state"][index][key], value), (index, key)


def test_importing_the_module_builds_nothing(tmp_path):
    """The kernel is built at construction, never on import: with no usable compiler and an
    empty extension cache, ``import ewc.optim`` still works."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": str(tmp_path / "none")}
    code = "import ewc.optim, ewc._fused; assert ewc._fused._module is None; print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.stdout.strip() == "ok", result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_the_loop_adapter_refuses_an_optimizer_that_applies_the_same_penalty(kind: Kind):
    """``attach`` would add the penalty a second time: refused (through a wrapper exposing the
    optimizer as ``.optimizer`` too); another regulariser's hook is a second penalty, allowed."""
    from types import SimpleNamespace

    from ewc.adapters.loop import attach
    from ewc.optim import applies_penalty

    net, reg, _ = consolidated(torch.float64)
    ours = kind.ours(net.parameters(), lr=0.1, reg=reg, model=net)
    wrapped = SimpleNamespace(optimizer=ours)
    assert applies_penalty(ours) and applies_penalty(wrapped, reg)
    assert not applies_penalty(ours, EWC(1.0))
    assert not applies_penalty(torch.optim.SGD(net.parameters(), lr=0.1))
    for optimizer in (ours, wrapped):
        with pytest.raises(ValueError, match=rf"`optimizer`.*{kind.ours.__name__} from ewc\.optim"):
            attach(reg, net, optimizer)
    attach(EWC(1.0), net, ours).remove()
