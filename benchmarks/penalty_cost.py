"""Suite a: cost of the EWC penalty per training step against the number of consolidated tasks.

Model: the 784-1000-1000-10 MLP of issue 3, batch 128, random inputs (only the cost matters).
Each method consolidates the same sequence of weights (the model is nudged between "tasks"):

* ``step``: a plain forward+backward (zero_grad, loss, backward), the reference;
* ``ewc.penalty_grad_``: the step, then ``reg.penalty_grad_(model)`` (closed form, no graph);
* ``ewc.penalty``: ``loss + reg.penalty(model)`` through autograd;
* ``avalanche``: the real ``avalanche.training.plugins.EWCPlugin`` -- its ``after_training_exp``
  consolidates each task and its ``before_backward`` adds the penalty to ``strategy.loss``;
  both are called on a minimal stand-in for a strategy (the attributes the plugin reads);
* ``naive``: a per-task loop ``sum_t (F_t * (theta - a_t)^2).sum()`` through autograd.

All use separate mode (one quadratic per task, Avalanche's default). Overheads are the median
over interleaved repeats of ``(method step time) / (plain step time) - 1``, in percent in every
table (at the headline task count the sweep row shows the headline's longer measurement).

:func:`floor_rows` (table ``penalty_vs_floor``) times ``penalty_grad_`` alone against the memory
floor, one multi-tensor pass that reads the gradient, A and theta and writes the gradient (the
real update must also read m, so nothing that keeps m can be cheaper; a perfect single pass costs
about 1.25x), at 1 and 2 threads, for the MLP (each timing right after a real forward+backward,
so caches hold what a training step leaves) and for a transformer-sized parameter list (a
32000x512 embedding and 8 layers of attention, MLP and norms: 41.6 M parameters in 97 tensors).
Rows: the default path, ``fused=True``, a plain ``_foreach_sub`` + ``_foreach_addcmul_`` pair,
and the floor; ``ratio_to_floor`` is the median of paired per-repeat ratios. Where the fused
kernel builds, three more rows, timed in a round of their own, place it against the hardware:
that round's floor (their reference), torch's own kernel moving the update's traffic (four
arrays in, one out), and the fused kernel on the floor's traffic.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks._avalanche_shim import load_avalanche_ewc_plugin
from benchmarks._common import Row, interleaved_times, median_ratio, mlp, progress
from ewc import EWC

__all__ = ["adamw_step_rows", "eager_profile_rows", "floor_rows", "run", "sgd_step_rows"]

LAMBDA = 100.0


def _state_bytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _ours_bytes(reg: EWC) -> int:
    state = reg.state
    tensors = [*state.importance.values(), *state.centre.values(), state.offset]
    for task in state.history:
        for part in task.values():
            tensors.extend(part.values())
    return _state_bytes(tensors)


def _avalanche_bytes(plugin: Any) -> int:
    tensors = [
        p.data
        for store in (plugin.importances, plugin.saved_params)
        for per_task in store.values()
        for p in per_task.values()
    ]
    return _state_bytes(tensors)


class _Methods:
    """Every method's consolidated state on one model, grown one task at a time."""

    def __init__(self, sizes: list[int], batch: int, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = mlp(sizes)
        self.x = torch.randn(batch, sizes[0])
        self.y = torch.randint(0, sizes[-1], (batch,))
        self.criterion = nn.CrossEntropyLoss()
        self.reg = EWC(LAMBDA, mode="separate", fisher="batched")
        plugin_cls, self.note = load_avalanche_ewc_plugin()
        self.plugin = plugin_cls(LAMBDA, mode="separate") if plugin_cls is not None else None
        self.naive: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []
        self.tasks = 0
        self._optimizer = torch.optim.SGD(self.model.parameters(), lr=0.0)
        self._dataset = torch.utils.data.TensorDataset(
            self.x, self.y, torch.zeros(batch, dtype=torch.long)
        )

    def _nudge(self) -> None:
        """Stands in for training on a task: every weight moves a little."""
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn_like(p), alpha=0.01)

    def add_task(self) -> None:
        """Train (nudge), then consolidate the task into every method's state."""
        model, x, y = self.model, self.x, self.y
        self._nudge()
        self.reg.consolidate(model, [(x, y)], self.criterion)
        fisher = _batch_fisher(model, x, y, self.criterion)
        self.naive.append((fisher, {n: p.detach().clone() for n, p in model.named_parameters()}))
        if self.plugin is not None:
            strategy = SimpleNamespace(
                clock=SimpleNamespace(train_exp_counter=self.tasks),
                model=model,
                _criterion=self.criterion,
                optimizer=self._optimizer,
                experience=SimpleNamespace(dataset=self._dataset),
                device="cpu",
                train_mb_size=len(x),
            )
            self.plugin.after_training_exp(strategy)
        self.tasks += 1

    def measure(self) -> dict[str, Any]:
        """Closures for one training step of each method, penalty values and state sizes.

        The weights are first nudged away from the last anchor (training on the next task);
        the nudge is undone by the next :meth:`add_task`'s own, so states stay comparable.
        """
        self._nudge()
        model, x, y, criterion, reg = self.model, self.x, self.y, self.criterion, self.reg
        model.train()
        params = dict(model.named_parameters())
        naive, plugin = self.naive, self.plugin

        def step() -> None:
            model.zero_grad(set_to_none=False)
            criterion(model(x), y).backward()

        def ours_grad() -> None:
            model.zero_grad(set_to_none=False)
            criterion(model(x), y).backward()
            reg.penalty_grad_(model)

        def ours_loss() -> None:
            model.zero_grad(set_to_none=False)
            (criterion(model(x), y) + reg.penalty(model)).backward()

        def naive_penalty() -> Tensor:
            total = torch.zeros(())
            for fisher, anchor in naive:
                for name, p in params.items():
                    total = total + (fisher[name] * (p - anchor[name]).pow(2)).sum()
            return LAMBDA * total

        def naive_step() -> None:
            model.zero_grad(set_to_none=False)
            (criterion(model(x), y) + naive_penalty()).backward()

        strategy = SimpleNamespace(
            clock=SimpleNamespace(train_exp_counter=self.tasks), model=model, device="cpu"
        )

        def avalanche_penalty() -> Tensor:
            strategy.loss = torch.zeros(())
            plugin.before_backward(strategy)
            return strategy.loss

        def avalanche_step() -> None:
            model.zero_grad(set_to_none=False)
            strategy.loss = criterion(model(x), y)
            plugin.before_backward(strategy)
            strategy.loss.backward()

        fns = {
            "step": step,
            "ewc.penalty_grad_": ours_grad,
            "ewc.penalty": ours_loss,
            "naive": naive_step,
        }
        with torch.no_grad():
            values = {"ewc": float(reg.penalty(model)), "naive": float(naive_penalty())}
        naive_tensors = [t for pair in naive for part in pair for t in part.values()]
        memory = {"ewc": _ours_bytes(reg), "naive": _state_bytes(naive_tensors)}
        if plugin is not None:
            fns["avalanche"] = avalanche_step
            with torch.no_grad():
                values["avalanche"] = float(avalanche_penalty())
            memory["avalanche"] = _avalanche_bytes(plugin)
        return {"fns": fns, "values": values, "memory": memory}


def _batch_fisher(
    model: nn.Module, x: Tensor, y: Tensor, criterion: nn.Module
) -> dict[str, Tensor]:
    """Squared mini-batch gradient: what Avalanche and ``fisher="batched"`` store for one batch."""
    grads = torch.autograd.grad(criterion(model(x), y), list(model.parameters()))
    return {n: g.pow(2) for (n, _), g in zip(model.named_parameters(), grads)}


CONFIGS = {
    "full": {"sizes": [784, 1000, 1000, 10], "task_counts": [1, 5, 10, 20, 50], "repeats": 15},
    "quick": {"sizes": [784, 1000, 1000, 10], "task_counts": [1, 20, 50], "repeats": 4},
    "smoke": {"sizes": [20, 16, 4], "task_counts": [1, 2], "repeats": 2},
}


FLOOR = "floor: one fused kernel"
"""A lower bound for any penalty-gradient implementation on this machine: one fused multi-tensor
kernel that reads the gradient, A and theta once and writes the gradient (``grad += c A theta``).
The real update must also read m, so no implementation can cost less than this."""


def _floor_step(model: nn.Module, reg: EWC, step: Callable[[], None]) -> Callable[[], None]:
    names = [name for name, _ in model.named_parameters() if name in reg.state.importance]
    params = dict(model.named_parameters())
    importances = [reg.state.importance[name] for name in names]
    weights = [params[name].detach() for name in names]

    def floor_step() -> None:
        step()
        grads = [params[name].grad for name in names]
        torch._foreach_addcmul_(grads, importances, weights, value=1e-30)

    return floor_step


FUSED = "ewc.penalty_grad_ (fused=True)"

BIND = "its parameter check alone (state.bind)"
"""The part of every ``penalty_grad_`` call that is Python: re-checking that the model's
parameters are still the consolidated ones (names, identities, shapes, dtypes, devices, trainable
flags). About 15 us on a warm interpreter; right after a step, with the caches full of the
step's data, about ten times that."""
"""The same state in ``EWC(fused=True)``: one compiled pass instead of two PyTorch kernels."""


def _fused_step(
    reg: EWC, model: nn.Module, step: Callable[[], None], notes: list[str]
) -> Callable[[], None] | None:
    """A step plus the fused penalty gradient, or None (with a note) where it cannot be built."""
    try:
        twin = EWC(LAMBDA, mode="separate", fisher="batched", fused=True)
    except RuntimeError as error:
        notes.append(f"{FUSED} not measured: {error}")
        return None
    twin.load_state_dict(reg.state_dict())

    def fused_step() -> None:
        step()
        twin.penalty_grad_(model)

    return fused_step


def run(mode: str, out: Path) -> dict[str, list[Row]]:
    """Time every method at each number of tasks; plot into ``out``; return the tables.

    Args:
        mode: ``"full"``, ``"quick"`` (fewer repeats) or ``"smoke"`` (a tiny model, for tests).
        out: folder for ``penalty_cost.png``.
    """
    config = CONFIGS[mode]
    sizes, task_counts, repeats = config["sizes"], config["task_counts"], config["repeats"]
    headline_at = 20 if 20 in task_counts else max(task_counts)
    precise: dict[str, list[float]] = {}
    rows: list[Row] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Avalanche's import-time deprecation chatter
        methods = _Methods(sizes, batch=128, seed=0)
    notes = [methods.note] if methods.note else []
    bar = progress(range(1, max(task_counts) + 1), desc="penalty cost: consolidating tasks")
    for tasks in bar:
        methods.add_task()
        if tasks not in task_counts:
            continue
        built = methods.measure()
        times = interleaved_times(built["fns"], repeats=repeats, inner=2)
        reference = built["values"]["naive"]
        for name, samples in times.items():
            key = name.split(".")[0] if name != "step" else None
            rows.append(
                {
                    "tasks": tasks,
                    "method": name,
                    "ms_per_step": 1e3 * statistics.median(samples),
                    "overhead_%": (
                        0.0
                        if name == "step"
                        else 100 * (median_ratio(samples, times["step"]) - 1.0)
                    ),
                    "state_MB": (built["memory"][key] / 2**20 if key in built["memory"] else 0.0),
                    "penalty_rel_diff_vs_naive": (
                        abs(built["values"][key] - reference) / abs(reference)
                        if key in built["values"]
                        else float("nan")
                    ),
                }
            )
        if tasks == headline_at:
            # the issue-3 figure: the cheap methods again, with many more paired repeats
            cheap = {
                k: v
                for k, v in built["fns"].items()
                if k in ("step", "ewc.penalty_grad_", "ewc.penalty")
            }
            cheap[FLOOR] = _floor_step(methods.model, methods.reg, built["fns"]["step"])
            fused = _fused_step(methods.reg, methods.model, built["fns"]["step"], notes)
            if fused is not None:
                cheap[FUSED] = fused
            precise = interleaved_times(cheap, repeats=3 * repeats, inner=5)
        del built
    for r in rows:  # one figure per method and run: the sweep row at the headline count
        samples = precise.get(r["method"]) if r["tasks"] == headline_at else None
        if samples and r["method"] != "step":
            r["ms_per_step"] = 1e3 * statistics.median(samples)
            r["overhead_%"] = 100 * (median_ratio(samples, precise["step"]) - 1)
    _plot(rows, out / "penalty_cost.png", sizes)
    headline = []
    for r in rows:
        if r["tasks"] != headline_at or r["method"] == "step":
            continue
        samples = precise.get(r["method"])
        headline.append(
            {
                "tasks": headline_at,
                "method": r["method"],
                "ms_per_step": 1e3 * statistics.median(samples) if samples else r["ms_per_step"],
                "overhead_%": 100
                * (
                    median_ratio(samples, precise["step"]) - 1 if samples else r["overhead_%"] / 100
                ),
                "repeats": len(samples) if samples else repeats,
                "target": "<= 8%" if r["method"] == "ewc.penalty_grad_" else "",
            }
        )
    for method, target in ((FUSED, "<= 8%"), (FLOOR, "lower bound")):
        if method in precise:  # measured only in the precise round, not in the task sweep
            headline.append(
                {
                    "tasks": headline_at,
                    "method": method,
                    "ms_per_step": 1e3 * statistics.median(precise[method]),
                    "overhead_%": 100 * (median_ratio(precise[method], precise["step"]) - 1),
                    "repeats": len(precise[method]),
                    "target": target,
                }
            )
    tables = {
        "penalty_cost": rows,
        "penalty_overhead_headline": headline,
        "penalty_vs_floor": floor_rows(mode, notes),
        "penalty_eager_profile": eager_profile_rows(mode),
        "penalty_in_sgd_step": sgd_step_rows(mode, notes),
        "penalty_in_adamw_step": adamw_step_rows(mode, notes),
    }
    if notes:
        tables["penalty_notes"] = [{"note": n} for n in notes]
    return tables


FLOOR_CONFIGS = {
    "full": {"repeats": 15, "mlp": [784, 1000, 1000, 10], "width": 512, "layers": 8},
    "quick": {"repeats": 5, "mlp": [784, 1000, 1000, 10], "width": 512, "layers": 8},
    "smoke": {"repeats": 2, "mlp": [20, 16, 4], "width": 8, "layers": 1},
}


class _ParameterList(nn.Module):
    """A model that is only a parameter list with transformer shapes (only the update's cost
    matters): embedding ``(32000, d)``, per layer qkv/out projections, a ``4d`` MLP, two norms."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        shapes: list[tuple[int, ...]] = [(32000 if width >= 64 else 100, width)]
        for _ in range(layers):
            ff = 4 * width
            shapes += [(3 * width, width), (3 * width,), (width, width), (width,)]
            shapes += [(width,), (width,), (ff, width), (ff,), (width, ff), (width,)]
            shapes += [(width,), (width,)]
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(s) * 0.02) for s in shapes)

    def forward(self, x: Tensor) -> Tensor:
        total = sum((w.sum() for w in self.weights), torch.zeros(()))
        return x * total


def _penalty_setups(config: dict[str, Any]) -> dict[str, tuple[nn.Module, EWC, Callable[[], None]]]:
    """Per model: the model (gradients set), a consolidated EWC, and what precedes each timing."""
    torch.manual_seed(0)
    setups: dict[str, tuple[nn.Module, EWC, Callable[[], None]]] = {}
    sizes = config["mlp"]
    model = mlp(sizes)
    x, y = torch.randn(128, sizes[0]), torch.randint(0, sizes[-1], (128,))
    criterion = nn.CrossEntropyLoss()
    reg = EWC(LAMBDA, fisher="batched")
    reg.consolidate(model, [(x, y)], criterion)

    def step(model: nn.Module = model) -> None:
        model.zero_grad(set_to_none=False)
        criterion(model(x), y).backward()

    step()  # the gradients exist (and stay the same tensors: zero_grad keeps them)
    setups["mlp"] = (model, reg, step)
    big = _ParameterList(config["width"], config["layers"])
    reg_big = EWC(LAMBDA, fisher="batched")
    reg_big.consolidate(big, [(torch.ones(2, 1), torch.zeros(2, 1))], nn.MSELoss())
    for w in big.parameters():
        w.grad = torch.randn_like(w)
        w.data.add_(torch.randn_like(w), alpha=0.01)  # away from the anchor
    setups["transformer list"] = (big, reg_big, lambda: None)
    return setups


def _timed_after(
    fns: dict[str, Callable[[], object]], before: Callable[[], None], repeats: int
) -> dict[str, list[float]]:
    """Seconds of each function alone, each call right after ``before()`` (untimed), round-robin
    with a rotating order (as :func:`benchmarks._common.interleaved_times`)."""
    names = list(fns)
    for name in names:
        before()
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            before()
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def _update_operands(
    model: nn.Module, reg: EWC
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """``(grads, weights, importances, centres)`` of the consolidated parameters, in order."""
    params = dict(model.named_parameters())
    names = [name for name in params if name in reg.state.importance]
    return (
        [params[name].grad for name in names],
        [params[name].detach() for name in names],
        [reg.state.importance[name] for name in names],
        [reg.state.centre[name] for name in names],
    )


def _floor_fns(
    model: nn.Module, reg: EWC, notes: list[str] | None
) -> tuple[dict[str, Callable[[], object]], list[Tensor]]:
    """The timed updates for one model (floor, default, foreach pair, fused) and its weights."""
    grads, weights, importances, centres = _update_operands(model, reg)
    view = reg.state.bind(model)
    fns: dict[str, Callable[[], object]] = {
        FLOOR: lambda: torch._foreach_addcmul_(grads, importances, weights, value=1e-30),
        "ewc.penalty_grad_": lambda: reg.penalty_grad_(model),
        BIND: lambda: reg.state.bind(model, reuse=view),
        "foreach sub + addcmul_": lambda: torch._foreach_addcmul_(
            grads, importances, torch._foreach_sub(weights, centres), value=1e-30
        ),
    }
    try:
        twin = EWC(LAMBDA, fisher="batched", fused=True)
    except RuntimeError as error:
        if notes is not None:
            notes.append(f"{FUSED} not measured: {error}")
    else:
        twin.load_state_dict(reg.state_dict())
        fns[FUSED] = lambda: twin.penalty_grad_(model)
    return fns, weights


TRAFFIC_ROUND_FLOOR = f"{FLOOR} (traffic round)"
"""The floor as timed in the round of the two traffic rows: their reference."""

SAME_TRAFFIC = "torch addcmul into a 4th array (the update's traffic)"
"""``out = g + c A theta`` by torch's own kernel, per tensor, into a preallocated fourth array:
three arrays read and a fourth written, whose lines are filled before they are written back, so
four arrays in and one out, the memory traffic of the real update (which reads g, A, theta, m
and writes g). What this machine's memory allows a correct separate pass, beside the floor."""

KERNEL_ON_FLOOR_TRAFFIC = "the fused kernel with m = theta (the floor's 3 arrays)"
"""The compiled kernel of ``EWC(fused=True)`` called with the centre aliased to the parameter:
the floor's traffic through our loop, to compare its code with torch's."""


def _traffic_fns(model: nn.Module, reg: EWC) -> dict[str, Callable[[], object]]:
    """The two rows that place the fused kernel against the hardware (their docstrings), or none
    where the kernel does not build. Timed in their own round beside the floor: their
    parameter-sized fourth arrays would otherwise leave less memory for the other rows'
    temporaries to reuse (the foreach pair then faults in fresh pages: 3.4-4.5x instead of 2x)."""
    from ewc._fused import fused_kernel

    try:
        kernel = fused_kernel()
    except RuntimeError:
        return {}
    grads, weights, importances, _ = _update_operands(model, reg)
    outs = [torch.empty_like(w) for w in weights]

    def same_traffic() -> None:
        for grad, importance, weight, out in zip(grads, importances, weights, outs):
            torch.addcmul(grad, importance, weight, value=1e-30, out=out)

    def kernel_on_floor_traffic() -> None:
        for grad, importance, weight in zip(grads, importances, weights):
            kernel(grad, importance, weight, weight, 1e-30, False)

    return {SAME_TRAFFIC: same_traffic, KERNEL_ON_FLOOR_TRAFFIC: kernel_on_floor_traffic}


def floor_rows(mode: str, notes: list[str] | None = None) -> list[Row]:
    """The ``penalty_vs_floor`` table: ``penalty_grad_`` alone against the memory floor, at 1 and
    2 threads, for the MLP and the transformer-sized parameter list (see the module docstring)."""
    config = FLOOR_CONFIGS[mode]
    rows: list[Row] = []
    previous = torch.get_num_threads()
    try:
        for model_name, (model, reg, before) in _penalty_setups(config).items():
            fns, weights = _floor_fns(model, reg, notes)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                times = _timed_after(fns, before, config["repeats"])
                references = dict.fromkeys(times, times[FLOOR])
                traffic = _traffic_fns(model, reg)
                if traffic:  # their own round, each paired with that round's floor
                    own = _timed_after({FLOOR: fns[FLOOR], **traffic}, before, config["repeats"])
                    del traffic
                    own[TRAFFIC_ROUND_FLOOR] = own.pop(FLOOR)
                    for method in (TRAFFIC_ROUND_FLOOR, SAME_TRAFFIC, KERNEL_ON_FLOOR_TRAFFIC):
                        times[method], references[method] = own[method], own[TRAFFIC_ROUND_FLOOR]
                for method, samples in times.items():
                    rows.append(
                        {
                            "model": model_name,
                            "params_M": sum(w.numel() for w in weights) / 1e6,
                            "tensors": len(weights),
                            "threads": threads,
                            "method": method,
                            "ms": 1e3 * statistics.median(samples),
                            "ratio_to_floor": median_ratio(samples, references[method]),
                        }
                    )
    finally:
        torch.set_num_threads(previous)
    return rows


def _then(first: Callable[[], object], second: Callable[[], object]) -> Callable[[], None]:
    def both() -> None:
        first()
        second()

    return both


def sgd_step_rows(mode: str, notes: list[str] | None = None) -> list[Row]:
    """The ``penalty_in_sgd_step`` table: what the penalty adds to a ``torch.optim.SGD`` step
    (momentum 0.9, single-tensor), at 1 and 2 threads, per model of :func:`floor_rows`.

    Methods: the SGD step alone; ``penalty_grad_`` (default, and ``fused=True``) then the step;
    :class:`ewc.optim.SGD`, which applies the penalty inside its own pass; and the floor of
    :func:`floor_rows`. ``penalty_in_floors`` is ``(method - step) / floor`` from paired
    per-repeat times: the penalty's own cost in units of the memory floor (1.25 is a perfect
    separate pass; below 1 only by sharing the step's pass).
    """
    from ewc.optim import SGD

    def optimizers(params: list[nn.Parameter], reg: EWC, model: nn.Module) -> tuple[Any, Any]:
        plain = torch.optim.SGD(params, lr=1e-12, momentum=0.9, foreach=False)
        return plain, SGD(params, lr=1e-12, momentum=0.9, reg=reg, model=model)

    return _optimizer_step_rows(mode, notes, "sgd", optimizers)


def adamw_step_rows(mode: str, notes: list[str] | None = None) -> list[Row]:
    """The ``penalty_in_adamw_step`` table: as :func:`sgd_step_rows` for AdamW. The step alone is
    torch's fastest CPU AdamW, ``fused=True`` (one compiled pass, no penalty); against it,
    ``penalty_grad_`` then that step, and :class:`ewc.optim.AdamW`, whose one pass also applies
    the penalty. A negative ``penalty_in_floors`` means ours, penalty included, beats torch's
    step without it."""
    from ewc.optim import AdamW

    def optimizers(params: list[nn.Parameter], reg: EWC, model: nn.Module) -> tuple[Any, Any]:
        plain = torch.optim.AdamW(params, lr=1e-12, fused=True)
        return plain, AdamW(params, lr=1e-12, reg=reg, model=model)

    return _optimizer_step_rows(mode, notes, "adamw", optimizers)


def _optimizer_step_rows(
    mode: str,
    notes: list[str] | None,
    name: str,
    optimizers: Callable[[list[nn.Parameter], EWC, nn.Module], tuple[Any, Any]],
) -> list[Row]:
    config = FLOOR_CONFIGS[mode]
    rows: list[Row] = []
    previous = torch.get_num_threads()
    step = f"{name} step"
    try:
        for model_name, (model, reg, before) in _penalty_setups(config).items():
            fns, _ = _floor_fns(model, reg, notes)
            params = [p for p in model.parameters() if p.requires_grad]
            try:
                plain, ours = optimizers(params, reg, model)
            except RuntimeError as error:
                if notes is not None:
                    notes.append(f"ewc.optim ({name}) not measured: {error}")
                continue
            methods: dict[str, Callable[[], object]] = {
                FLOOR: fns[FLOOR],
                step: plain.step,
                f"penalty_grad_ + {step}": _then(fns["ewc.penalty_grad_"], plain.step),
                f"{type(ours).__module__}.{type(ours).__name__} step": ours.step,
            }
            if FUSED in fns:
                methods[f"penalty_grad_ (fused=True) + {step}"] = _then(fns[FUSED], plain.step)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                times = _timed_after(methods, before, config["repeats"])
                for method, samples in times.items():
                    extra = [
                        (t - alone) / floor
                        for t, alone, floor in zip(samples, times[step], times[FLOOR])
                    ]
                    rows.append(
                        {
                            "model": model_name,
                            "threads": threads,
                            "method": method,
                            "ms": 1e3 * statistics.median(samples),
                            "penalty_in_floors": statistics.median(extra)
                            if method not in (FLOOR, step)
                            else float("nan"),
                        }
                    )
    finally:
        torch.set_num_threads(previous)
    return rows


def eager_profile_rows(mode: str) -> list[Row]:
    """The ``penalty_eager_profile`` table: where the default (eager) ``penalty_grad_`` spends
    its time, at 1 thread, per model of :func:`floor_rows`.

    ``torch.profiler`` over ``repeats`` calls, each right after the model's step: per ATen op
    its calls and self CPU time per ``penalty_grad_``, then ``python + dispatch`` (the wall time
    the ops do not account for: binding the view, the Python loop over tensors and blocks, op
    dispatch) and, for scale, the floor kernel timed the same way. ``share_%`` is of the wall
    time of ``penalty_grad_``.
    """
    from torch.profiler import ProfilerActivity, profile

    config = FLOOR_CONFIGS[mode]
    repeats = config["repeats"] * 4
    rows: list[Row] = []
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for model_name, (model, reg, before) in _penalty_setups(config).items():
            fns, _ = _floor_fns(model, reg, None)
            walls: dict[str, float] = {}
            ops: dict[str, dict[str, tuple[int, float]]] = {}
            for method in ("ewc.penalty_grad_", FLOOR):
                fn = fns[method]
                before()
                fn()  # warm: the view is bound, the workspace exists
                wall = 0.0
                counted: dict[str, tuple[int, float]] = {}
                for _ in range(repeats):
                    before()  # outside the profiled region: only the call is recorded
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        start = time.perf_counter()
                        fn()
                        wall += time.perf_counter() - start
                    for name, (calls, ms) in _op_times(prof).items():
                        seen_calls, seen_ms = counted.get(name, (0, 0.0))
                        counted[name] = (seen_calls + calls, seen_ms + ms)
                walls[method] = 1e3 * wall / repeats
                ops[method] = {
                    name: (round(calls / repeats), ms / repeats)
                    for name, (calls, ms) in counted.items()
                }
            total = walls["ewc.penalty_grad_"]
            accounted = 0.0
            for name, (calls, ms) in sorted(
                ops["ewc.penalty_grad_"].items(), key=lambda kv: -kv[1][1]
            ):
                accounted += ms
                rows.append(_profile_row(model_name, name, calls, ms, total))
            rows.append(_profile_row(model_name, "python + dispatch", 0, total - accounted, total))
            rows.append(_profile_row(model_name, "ewc.penalty_grad_ (wall)", 0, total, total))
            rows.append(_profile_row(model_name, f"{FLOOR} (wall)", 0, walls[FLOOR], total))
    finally:
        torch.set_num_threads(previous)
    return rows


def _op_times(prof: Any) -> dict[str, tuple[int, float]]:
    """Per ATen op of one profiled call: its calls and self CPU milliseconds."""
    return {
        event.key: (event.count, event.self_cpu_time_total / 1e3)
        for event in prof.key_averages()
        if event.key.startswith("aten::") and event.self_cpu_time_total > 0
    }


def _profile_row(model: str, part: str, calls: int, ms: float, total: float) -> Row:
    return {
        "model": model,
        "part": part,
        "calls_per_call": calls,
        "ms_per_call": ms,
        "share_%": 100 * ms / total,
    }


def _plot(rows: list[Row], path: Path, sizes: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        tasks = [r["tasks"] for r in mine]
        style = "--" if method == "naive" else "-"
        # paired ratios are robust to load on a shared machine; absolute times are not
        left.plot(tasks, [1 + r["overhead_%"] / 100 for r in mine], style, marker="o", label=method)
        if method not in ("step", "ewc.penalty"):  # ewc.penalty shares ewc's state
            label = "ewc" if method == "ewc.penalty_grad_" else method
            right.plot(tasks, [r["state_MB"] for r in mine], style, marker="o", label=label)
    arch = "-".join(map(str, sizes))
    left.set(
        xlabel="consolidated tasks",
        ylabel="training-step time / plain step",
        yscale="log",
        title=f"step cost, MLP {arch}, batch 128",
    )
    right.set(
        xlabel="consolidated tasks",
        ylabel="penalty state (MiB)",
        yscale="log",
        title="memory of the consolidated state",
    )
    for ax in (left, right):
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
