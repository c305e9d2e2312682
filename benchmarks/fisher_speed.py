"""Suite: cost of the per-example Fisher against Avalanche's batched ``compute_importances``.

Models (CPU, random data, only the cost matters):

* ``mlp``: the 784-1000-1000-10 MLP of issue 4, 2048 examples, batch 128;
* ``cnn``: two 3x3 conv layers and a linear classifier on 1x8x8 inputs, same data sizes;
* ``transformer``: token embedding (100 x 64), one ``nn.TransformerEncoderLayer(64, 4 heads,
  128, batch_first=True)``, mean pooling and a linear classifier; 512 sequences of 32 tokens,
  batch 128. Its ``exact (no attention rule)`` row is ``exact`` with the attention rule switched
  off: the attention then takes the per-layer ``torch.func`` step (before that step existed, the
  whole-model ``vmap`` fallback).

Per model, measured side by side in one process (round-robin repeats, see
:func:`benchmarks._common.interleaved_times`):

* ``avalanche``: the real ``avalanche.training.plugins.EWCPlugin().compute_importances(model,
  criterion, optimizer, dataset, device, batch_size)`` on a ``TensorDataset``: squared
  *mini-batch* gradients (cheap but not the Fisher);
* ``empirical``: ``EWC(fisher="empirical").consolidate(model, loader, criterion)``: squared
  *per-example* gradients of the loss;
* ``exact``: ``EWC(fisher="exact")``: ``sum_c p_c (grad log p_c)^2`` per example (10 signals).

``ratio_vs_avalanche`` is the median over repeats of the paired ratio ``time / avalanche time``;
``seconds`` is the median time per consolidation. Targets (issue 4): empirical <= 1.0 and
exact <= 4.0 on the MLP.

Hugging Face rows (:func:`hugging_face_rows`, when ``transformers``/``peft`` are installed): small
configs with random weights of GPT-2 (LM head tied to the token embedding, position ids
``(1, L)``, SDPA attention with a padding mask), LoRA-GPT-2 (``peft``, rank 8 on ``c_attn`` and
``c_proj``), BERT (sequence classification) and ViT (image classification). Per model
``empirical`` and ``batched`` consolidations against an Avalanche-style batched pass on the same
batches (forward, loss, backward, squared gradients summed; the real plugin wants ``(x, y)``
tensors, not dict batches), plus the share of parameter entries left on the ``vmap``/``loop``
paths. Target (issue 13): ``empirical`` within 2x of the batched pass, nothing on the loop.
:func:`backpack_rows` puts the same estimators beside BackPACK (``backpack-for-pytorch``), the
per-example peer: ``exact`` against ``DiagGGNExact`` (the GGN of cross-entropy is its Fisher)
and ``empirical`` against ``SumGradSquared`` / N, both with ``CrossEntropyLoss(reduction="sum")``
summed over the batches, on the MLP, the small CNN and a ResNet-18-shaped model
(:mod:`benchmarks._resnet`, 3x32x32 inputs, BackPACK through its ``torch.fx`` converter for the
residual additions). ``ratio_vs_backpack`` is paired as above; ``max_rel_diff`` is the largest
``max |ours - theirs| / max |theirs|`` over the parameters. :func:`resnet_rows` times the
ResNet-18-shaped model's ``empirical``/``exact`` against one batched backward per batch
(``criterion(model(x), y).backward()`` over the same batches, what any gradient step costs).
"""

from __future__ import annotations

import contextlib
import statistics
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._avalanche_shim import load_avalanche_ewc_plugin
from benchmarks._common import Row, format_table, interleaved_times, median_ratio, mlp, small_cnn
from benchmarks._resnet import ResNet18
from ewc import EWC
from ewc._per_sample.rules import RULES

__all__ = ["backpack_rows", "floor_rows", "hugging_face_rows", "resnet_rows", "run"]

EXAMPLES = 2048
BATCH = 128
CLASSES = 10


def _problem(name: str, quick: bool) -> tuple[nn.Module, TensorDataset]:
    examples = 256 if quick else EXAMPLES
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":
        model: nn.Module = mlp([784, 1000, 1000, CLASSES])
        x = torch.randn(examples, 784, generator=generator)
    elif name == "transformer":
        model = _Transformer()
        x = torch.randint(0, 100, (examples // 4, 32), generator=generator)
        y = torch.randint(0, CLASSES, (examples // 4,), generator=generator)
        return model, TensorDataset(x, y)
    else:
        model = small_cnn(CLASSES)
        x = torch.randn(examples, 1, 8, 8, generator=generator)
    y = torch.randint(0, CLASSES, (examples,), generator=generator)
    return model, TensorDataset(x, y)


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(100, 64)
        self.layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
        self.head = nn.Linear(64, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embedding(tokens)).mean(1))


@contextlib.contextmanager
def _without_attention_rule() -> Iterator[None]:
    """The per-example engine without its ``MultiheadAttention`` rule."""
    rule = RULES.pop(nn.MultiheadAttention)
    try:
        yield
    finally:
        RULES[nn.MultiheadAttention] = rule


def _consolidator(model: nn.Module, dataset: TensorDataset, estimator: str) -> Callable[[], object]:
    criterion = nn.CrossEntropyLoss()

    def consolidate() -> object:
        loader = DataLoader(dataset, batch_size=BATCH)
        return EWC(1.0, fisher=estimator).consolidate(model, loader, criterion)

    return consolidate


def _avalanche(model: nn.Module, dataset: TensorDataset) -> Callable[[], object] | None:
    plugin_class, reason = load_avalanche_ewc_plugin()
    if plugin_class is None:
        warnings.warn(f"fisher_speed: {reason}; no Avalanche baseline", stacklevel=2)
        return None
    plugin = plugin_class(ewc_lambda=1.0)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def compute() -> object:
        return plugin.compute_importances(model, criterion, optimizer, dataset, "cpu", BATCH)

    return compute


def run(quick: bool = False, *, threads: int | None = None) -> list[Row]:
    """Rows ``(model, estimator, seconds, ratio_vs_avalanche)`` for the MLP, the small CNN and
    the transformer layer.

    Args:
        quick: 256 examples and 3 repeats instead of 2048 and 7 (a smoke run).
        threads: ``torch.set_num_threads`` for the run (restored after); default: unchanged.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(quick)
    finally:
        torch.set_num_threads(previous)


def _measure(quick: bool) -> list[Row]:
    repeats = 3 if quick else 7
    rows: list[Row] = []
    for name in ("mlp", "cnn", "transformer"):
        model, dataset = _problem(name, quick)
        fns: dict[str, Callable[[], object]] = {
            estimator: _consolidator(model, dataset, estimator)
            for estimator in ("empirical", "exact")
        }
        if name == "transformer":
            exact = fns["exact"]

            def exact_by_vmap(exact: Callable[[], object] = exact) -> object:
                with _without_attention_rule():
                    return exact()

            fns["exact (no attention rule)"] = exact_by_vmap
        baseline = _avalanche(model, dataset)
        if baseline is not None:
            fns["avalanche"] = baseline
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times = interleaved_times(fns, repeats=repeats, inner=1)
        for estimator, samples in times.items():
            ratio = (
                median_ratio(samples, times["avalanche"]) if "avalanche" in times else float("nan")
            )
            rows.append(
                {
                    "model": name,
                    "estimator": estimator,
                    "seconds": statistics.median(samples),
                    "ratio_vs_avalanche": ratio,
                }
            )
    return rows


# ---------------------------------------------------------------------------- BackPACK, ResNet-18
BACKPACK = {
    "exact": ("DiagGGNExact", "diag_ggn_exact"),
    "empirical": ("SumGradSquared", "sum_grad_squared"),
}
"""Our estimator -> (BackPACK extension, the attribute it fills on each parameter)."""


def _resnet_problem(examples: int) -> tuple[nn.Module, TensorDataset]:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ResNet18(CLASSES).eval()
    x = torch.randn(examples, 3, 32, 32, generator=generator)
    y = torch.randint(0, CLASSES, (examples,), generator=generator)
    return model, TensorDataset(x, y)


def _ours(
    model: nn.Module, dataset: TensorDataset, estimator: str, batch: int
) -> Callable[[], dict[str, torch.Tensor]]:
    criterion = nn.CrossEntropyLoss()

    def estimate() -> dict[str, torch.Tensor]:
        reg = EWC(1.0, fisher=estimator)
        reg.consolidate(model, DataLoader(dataset, batch_size=batch), criterion)
        return dict(reg.state.importance)  # one task: the importance is that task's Fisher

    return estimate


def _backpack(
    model: nn.Module, dataset: TensorDataset, estimator: str, batch: int, convert: bool
) -> Callable[[], dict[str, torch.Tensor]]:
    """BackPACK's diagonal for ``estimator`` on a copy of ``model`` (its hooks stay off ours)."""
    import copy

    import backpack
    from backpack import extensions

    extension_name, attribute = BACKPACK[estimator]
    extension = getattr(extensions, extension_name)
    copied = copy.deepcopy(model).eval()
    names = {id(p): name for name, p in copied.named_parameters()}
    twin = backpack.extend(copied, use_converter=convert)
    criterion = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))
    # the converter renames modules but keeps the parameter tensors: match them by identity
    params = {names[id(p)]: p for p in twin.parameters()}

    def estimate() -> dict[str, torch.Tensor]:
        sums = {name: torch.zeros_like(p) for name, p in params.items()}
        for x, y in DataLoader(dataset, batch_size=batch):
            twin.zero_grad()
            loss = criterion(twin(x), y)
            with backpack.backpack(extension()):
                loss.backward()
            for name, p in params.items():
                sums[name] += getattr(p, attribute)
        return {name: value / len(dataset) for name, value in sums.items()}

    return estimate


def _max_rel_diff(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    """``max |ours - theirs| / max |theirs|`` over the parameters."""
    worst = 0.0
    for name, b in theirs.items():
        a = ours[name]
        scale = float(b.abs().max()) or 1.0
        worst = max(worst, float((a - b.to(a.dtype)).abs().max()) / scale)
    return worst


def backpack_rows(quick: bool = False, *, threads: int | None = None) -> list[Row]:
    """Rows ``(model, estimator, backpack, seconds, backpack_seconds, ratio_vs_backpack,
    max_rel_diff)``; ``[]`` with a warning when BackPACK is not installed.

    The ResNet-18-shaped model uses 64 examples in batches of 32 (quick: 32): BackPACK's
    ``DiagGGNExact`` on it costs about half a second per example on one CPU thread.
    """
    try:
        import backpack  # noqa: F401
    except ImportError:
        warnings.warn(
            "fisher_speed: backpack-for-pytorch is not installed; no BackPACK rows", stacklevel=2
        )
        return []
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows: list[Row] = []
    try:
        for name in ("mlp", "cnn", "resnet18"):
            if name == "resnet18":
                model, dataset = _resnet_problem(32 if quick else 64)
                batch, repeats, convert = 32, 1 if quick else 2, True
            else:
                model, dataset = _problem(name, quick)
                batch, repeats, convert = BATCH, 3 if quick else 5, False
            model.eval()
            for estimator, (extension, _) in BACKPACK.items():
                fns = {
                    "ours": _ours(model, dataset, estimator, batch),
                    "backpack": _backpack(model, dataset, estimator, batch, convert),
                }
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    agreement = _max_rel_diff(fns["ours"](), fns["backpack"]())
                    times = interleaved_times(fns, repeats=repeats, inner=1, warmup=0)
                rows.append(
                    {
                        "model": name,
                        "estimator": estimator,
                        "backpack": extension,
                        "seconds": statistics.median(times["ours"]),
                        "backpack_seconds": statistics.median(times["backpack"]),
                        "ratio_vs_backpack": median_ratio(times["ours"], times["backpack"]),
                        "max_rel_diff": agreement,
                    }
                )
    finally:
        torch.set_num_threads(previous)
    return rows


def resnet_rows(quick: bool = False, *, threads: int | None = None) -> list[Row]:
    """Rows ``(model, method, seconds, ratio_vs_batched_backward)`` for the ResNet-18-shaped
    model: one batched backward per batch, ``empirical`` and ``exact`` (512 examples, batch 128;
    quick: 128 examples)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model, dataset = _resnet_problem(128 if quick else 512)
        criterion = nn.CrossEntropyLoss()

        def batched_backward() -> None:
            for x, y in DataLoader(dataset, batch_size=BATCH):
                model.zero_grad()
                criterion(model(x), y).backward()

        fns: dict[str, Callable[[], object]] = {"batched backward": batched_backward}
        for estimator in ("empirical", "exact"):
            fns[estimator] = _ours(model, dataset, estimator, BATCH)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times = interleaved_times(fns, repeats=2 if quick else 3, inner=1)
        return [
            {
                "model": "resnet18",
                "method": method,
                "seconds": statistics.median(samples),
                "ratio_vs_batched_backward": median_ratio(samples, times["batched backward"]),
            }
            for method, samples in times.items()
        ]
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------- compute floors
FLOOR_CASES = (("mlp", "empirical"), ("cnn", "exact"))
"""The two targets of issue 16 the floor rows test: the Linear rule's ``empirical`` on the MLP
(aim 0.6x Avalanche) and ``exact`` on the small CNN (at most 4x)."""


FLOOR_CHUNK = 4
"""Examples per per-example matmul in :func:`_floor`: the fastest chunk for the small CNN's
second convolution on this machine (one thread, batch 128: 8.5 ms against 10.2 ms unchunked,
minima of 30 interleaved repeats), so the floor is no slower than the best blocking."""


FLOOR_WITH_SQUARES = "floor + squares"
"""The floor of :func:`_floor` with the squares and sums of the per-example conv gradients, which
the conv rule's ``"examples"`` path (the one it takes on the small CNN) cannot skip."""


class _LayerOutputs:
    """Forward hooks keeping the inputs and outputs of every ``nn.Linear``/``nn.Conv2d``."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self.handles = [layer.register_forward_hook(self._keep) for layer in self.layers]

    def _keep(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        self.inputs.append(args[0].detach())
        self.outputs.append(output)

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _floor(
    model: nn.Module, dataset: TensorDataset, signals: int, *, squares: bool = False
) -> Callable[[], None]:
    """The work any per-example rule path must do, with nothing else: per batch one forward,
    ``signals`` backward passes to the layers' outputs (no weight-gradient kernels), and per
    layer the one matmul of its closed form -- ``(sum_k g_k^2)^T (x^2)`` for a Linear layer,
    the per-example ``(K O, L) @ (L, R)`` product for a convolution (in chunks of
    :data:`FLOOR_CHUNK` examples, into a reused buffer), on a buffer already in the layout it
    needs. No squares of per-example gradients, no sums, no copies: a lower bound.

    With ``squares`` also what the per-example products of a convolution need to become an
    importance, and nothing else: squared in place and summed over examples and signals while
    in cache (one multiply and one add per entry, as the conv rule's ``"examples"`` path). Still
    a lower bound for that path: an exact method that builds per-example gradients must square
    and sum every entry."""
    from ewc._per_sample.rules.conv import unfold_input

    weights = torch.randn(signals, BATCH, CLASSES)  # the values do not change the cost
    stacked: dict[int, Tensor] = {}
    products: dict[int, Tensor] = {}
    totals: dict[int, Tensor] = {}

    def run() -> None:
        # hooks only while the floor runs: the other timed methods' forwards are not recorded
        hooks = _LayerOutputs(model)
        try:
            batches(hooks)
        finally:
            hooks.remove()

    def batches(hooks: _LayerOutputs) -> None:
        for x, _ in DataLoader(dataset, batch_size=BATCH):
            hooks.clear()
            output = model(x)
            for k in range(signals):
                grads = torch.autograd.grad(
                    output, hooks.outputs, weights[k, : x.shape[0]], retain_graph=True
                )
            for i, (layer, inputs, grad) in enumerate(zip(hooks.layers, hooks.inputs, grads)):
                if isinstance(layer, nn.Linear):
                    torch.mm(grad.square().t(), inputs.square())
                    continue
                cols = unfold_input(layer, inputs).transpose(1, 2)  # (n, L, R)
                n, out_channels = grad.shape[0], grad.shape[1]
                if i not in stacked or stacked[i].shape[0] != n:
                    stacked[i] = torch.randn(n, signals * out_channels, cols.shape[1])
                    products[i] = torch.empty(FLOOR_CHUNK, signals * out_channels, cols.shape[2])
                    totals[i] = torch.zeros(out_channels, cols.shape[2])
                for n0 in range(0, n, FLOOR_CHUNK):  # in cache-sized chunks, as the rule does
                    lhs, rhs = stacked[i][n0 : n0 + FLOOR_CHUNK], cols[n0 : n0 + FLOOR_CHUNK]
                    product = torch.bmm(lhs, rhs, out=products[i][: lhs.shape[0]])
                    if squares:
                        per_entry = product.square_().view(-1, out_channels, cols.shape[2])
                        totals[i] += per_entry.sum(0)

    return run


def floor_rows(quick: bool = False, *, threads: int | None = None) -> list[Row]:
    """Rows ``(model, estimator, method, seconds, ratio_vs_avalanche)``: ours, Avalanche's
    ``compute_importances`` and the compute floor of :func:`_floor`, side by side, for
    :data:`FLOOR_CASES` (``exact``: ``C - 1 = 9`` signals); for a model with convolutions also
    :data:`FLOOR_WITH_SQUARES`. A target below the floor's ratio cannot be met by any rule path
    on this machine."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows: list[Row] = []
    try:
        for name, estimator in FLOOR_CASES:
            model, dataset = _problem(name, quick)
            model.eval()
            baseline = _avalanche(model, dataset)
            if baseline is None:
                continue
            signals = 1 if estimator == "empirical" else CLASSES - 1
            fns: dict[str, Callable[[], object]] = {
                "ewc": _consolidator(model, dataset, estimator),
                "floor": _floor(model, dataset, signals),
                "avalanche": baseline,
            }
            if any(isinstance(m, nn.Conv2d) for m in model.modules()):
                fns[FLOOR_WITH_SQUARES] = _floor(model, dataset, signals, squares=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                times = interleaved_times(fns, repeats=3 if quick else 7, inner=1)
            for method, samples in times.items():
                rows.append(
                    {
                        "model": name,
                        "estimator": estimator,
                        "method": method,
                        "seconds": statistics.median(samples),
                        "ratio_vs_avalanche": median_ratio(samples, times["avalanche"]),
                    }
                )
    finally:
        torch.set_num_threads(previous)
    return rows


# ------------------------------------------------------------------ Hugging Face models
HF_VOCAB, HF_LENGTH, HF_BATCH = 1000, 32, 16


def _hf_problem(name: str, quick: bool) -> tuple[nn.Module, list[tuple[Any, Tensor]], Any]:
    """A small Hugging Face model, its batches ``(inputs, labels)`` and ``forward``."""
    import transformers

    examples = 64 if quick else 256
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name in ("gpt2", "lora-gpt2"):
        config = transformers.GPT2Config(
            vocab_size=HF_VOCAB, n_positions=64, n_embd=128, n_layer=2, n_head=4
        )
        model: nn.Module = transformers.GPT2LMHeadModel(config)
        if name == "lora-gpt2":
            import peft

            lora = peft.LoraConfig(r=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
            model = peft.get_peft_model(model, lora)
    elif name == "bert":
        config = transformers.BertConfig(
            vocab_size=HF_VOCAB,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=64,
            num_labels=4,
        )
        model = transformers.BertForSequenceClassification(config)
    else:
        config = transformers.ViTConfig(
            image_size=32,
            patch_size=4,
            num_channels=3,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            num_labels=4,
        )
        model = transformers.ViTForImageClassification(config)
    batches: list[tuple[Any, Tensor]] = []
    for _ in range(examples // HF_BATCH):
        if name == "vit":
            pixels = torch.randn(HF_BATCH, 3, 32, 32, generator=generator)
            batches.append((pixels, torch.randint(0, 4, (HF_BATCH,), generator=generator)))
            continue
        ids = torch.randint(0, HF_VOCAB, (HF_BATCH, HF_LENGTH), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, -4:] = 0  # one padded sequence: HF's SDPA mask path
        labels = ids if name != "bert" else torch.randint(0, 4, (HF_BATCH,), generator=generator)
        batches.append(((ids, mask), labels))
    return model.eval(), batches, _hf_forward(name)


def _hf_forward(name: str) -> Callable[[nn.Module, Any], tuple[Tensor, Tensor]]:
    def forward(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        inputs, labels = batch
        if name == "vit":
            return model(pixel_values=inputs).logits, labels
        ids, mask = inputs
        logits = model(input_ids=ids, attention_mask=mask).logits
        if name == "bert":
            return logits, labels
        return logits[:, :-1], labels[:, 1:]  # causal LM: the next token

    return forward


def _hf_criterion(output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over the batch's (example, position) pairs."""
    return nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def _hf_batched_pass(
    model: nn.Module, batches: list[tuple[Any, Tensor]], forward: Any
) -> Callable[[], object]:
    """Avalanche's ``compute_importances`` loop on dict-style inputs: per batch forward, loss,
    backward, ``importance += grad^2``, then divide by the number of batches."""
    params = [p for p in model.parameters() if p.requires_grad]

    def compute() -> object:
        importances = [torch.zeros_like(p) for p in params]
        for batch in batches:
            model.zero_grad()
            output, target = forward(model, batch)
            _hf_criterion(output, target).backward()
            for importance, p in zip(importances, params):
                if p.grad is not None:
                    importance += p.grad.detach() ** 2
        model.zero_grad()
        return [importance / len(batches) for importance in importances]

    return compute


def _hf_consolidator(
    model: nn.Module, batches: list[tuple[Any, Tensor]], forward: Any, estimator: str
) -> Callable[[], object]:
    def consolidate() -> object:
        return EWC(1.0, fisher=estimator).consolidate(
            model, batches, _hf_criterion, forward=forward
        )

    return consolidate


def hugging_face_rows(quick: bool = False, *, threads: int | None = None) -> list[Row]:
    """Rows for GPT-2, LoRA-GPT-2, BERT and ViT (empty when transformers or peft is missing).

    Row fields: ``model``, ``estimator`` (``empirical``, ``batched``, ``batched pass``),
    ``seconds``, ``ratio_vs_batched_pass`` and ``fallback_share`` (the share of parameter
    entries on ``vmap``/``loop``; ``empirical`` rows only).
    """
    try:
        from tests import torchvision_shim

        torchvision_shim.apply()  # transformers imports torchvision
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        warnings.warn(f"fisher_speed: no Hugging Face rows ({error})", stacklevel=2)
        return []
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure_hugging_face(quick)
    finally:
        torch.set_num_threads(previous)


def _measure_hugging_face(quick: bool) -> list[Row]:
    repeats = 3 if quick else 5
    rows: list[Row] = []
    for name in ("gpt2", "lora-gpt2", "bert", "vit"):
        model, batches, forward = _hf_problem(name, quick)
        fns: dict[str, Callable[[], object]] = {
            estimator: _hf_consolidator(model, batches, forward, estimator)
            for estimator in ("empirical", "batched")
        }
        fns["batched pass"] = _hf_batched_pass(model, batches, forward)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = fns["empirical"]()
            times = interleaved_times(fns, repeats=repeats, inner=1)
        paths = getattr(report, "paths", {})
        sizes = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
        fallen = sum(sizes[n] for n, path in paths.items() if path in ("vmap", "loop"))
        for estimator, samples in times.items():
            rows.append(
                {
                    "model": name,
                    "estimator": estimator,
                    "seconds": statistics.median(samples),
                    "ratio_vs_batched_pass": median_ratio(samples, times["batched pass"]),
                    "fallback_share": fallen / sum(sizes.values())
                    if estimator == "empirical"
                    else float("nan"),
                }
            )
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, few repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--hf", action="store_true", help="only the Hugging Face rows (GPT-2, LoRA, BERT, ViT)"
    )
    arguments = parser.parse_args()
    used = arguments.threads or torch.get_num_threads()
    if not arguments.hf:
        table = run(quick=arguments.quick, threads=arguments.threads)
        print(
            format_table(
                table, title=f"Fisher cost vs Avalanche compute_importances ({used} threads)"
            )
        )
        print()
        print(
            format_table(
                resnet_rows(arguments.quick, threads=arguments.threads),
                title=f"ResNet-18-shaped model vs a batched backward ({used} threads)",
            )
        )
        print()
        print(
            format_table(
                backpack_rows(arguments.quick, threads=arguments.threads),
                title=f"Fisher cost vs BackPACK ({used} threads)",
            )
        )
        print()
        print(
            format_table(
                floor_rows(arguments.quick, threads=arguments.threads),
                title=f"Fisher cost vs its compute floor and Avalanche ({used} threads)",
            )
        )
    hf = hugging_face_rows(quick=arguments.quick, threads=arguments.threads)
    if hf:
        print(format_table(hf, title=f"Hugging Face models vs a batched pass ({used} threads)"))
