"""The per-example engine on real Hugging Face ``transformers`` / ``peft`` models (small configs,
random weights, no downloads): every family against the brute-force per-example reference, and
every parameter's path asserted (no whole-model fallback, no per-example loop)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from ewc import EWC
from ewc._per_sample import squared_grad_sums
from tests.reference import brute_force_squared_grad_sums

transformers = pytest.importorskip(
    "transformers", reason="the Hugging Face tests need `pip install transformers`"
)

VOCAB, LENGTH, BATCH = 37, 7, 4


def _gpt2(**extra: Any) -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, **extra
    )
    return transformers.GPT2LMHeadModel(config)


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


def _bert_mlm() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return transformers.BertForMaskedLM(config)


def _vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(config)


def _lora_gpt2() -> nn.Module:
    peft = pytest.importorskip("peft", reason="the LoRA test needs `pip install peft`")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    return peft.get_peft_model(_gpt2(), config)


def _tokens() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[0, -2:] = 0  # a padded example: the SDPA mask path
    return ids, mask


def _text_forward(model: nn.Module, batch: Any) -> tuple[Tensor, Any]:
    ids, mask = batch
    return model(input_ids=ids, attention_mask=mask).logits, None


def _image_forward(model: nn.Module, batch: Any) -> tuple[Tensor, Any]:
    return model(pixel_values=batch).logits, None


def _signals(count: int) -> Callable[[Tensor, Any], Tensor]:
    def make(output: Tensor, target: Any) -> Tensor:
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn((count, *output.shape), generator=generator, dtype=torch.float64)
        return noise.to(output.dtype)

    return make


FAMILIES = {
    "gpt2": (_gpt2, _tokens, _text_forward),
    "bert": (_bert, _tokens, _text_forward),
    "bert-mlm-tied": (_bert_mlm, _tokens, _text_forward),
    "lora-gpt2": (_lora_gpt2, _tokens, _text_forward),
    "vit": (_vit, lambda: torch.randn(BATCH, 3, 8, 8), _image_forward),
}

# Every parameter's path, by a fragment of its name (first match wins).
EXPECTED_PATHS = {
    "gpt2": [
        ("wte", "rule:Embedding+rule:Linear"),  # tied to lm_head
        ("wpe", "rule:Embedding"),  # position ids (1, L), broadcast
        ("ln_", "rule:LayerNorm"),
        ("c_", "rule:Conv1D"),
    ],
    "bert": [
        ("LayerNorm", "rule:LayerNorm"),
        ("embeddings.", "rule:Embedding"),
        ("", "rule:Linear"),
    ],
    "bert-mlm-tied": [
        ("word_embeddings", "rule:Embedding+rule:Linear"),  # tied to the decoder
        ("LayerNorm", "rule:LayerNorm"),
        ("embeddings.", "rule:Embedding"),
        ("", "rule:Linear"),
    ],
    "lora-gpt2": [("lora_", "rule:Linear")],
    "vit": [
        ("cls_token", "layer:ViTEmbeddings"),  # raw parameters: the per-layer step
        ("embeddings.position_embeddings", "layer:ViTEmbeddings"),
        ("patch_embeddings", "rule:Conv2d"),
        ("layernorm", "rule:LayerNorm"),
        ("", "rule:Linear"),
    ],
}


def _expected(family: str, name: str) -> str:
    for fragment, path in EXPECTED_PATHS[family]:
        if fragment in name:
            return path
    raise AssertionError(f"no expected path for {name}")


@pytest.mark.parametrize("signals", [1, 2], ids=["one-signal", "two-signals"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_engine_matches_brute_force_on_rules(family: str, signals: int) -> None:
    build, data, forward = FAMILIES[family]
    torch.manual_seed(0)
    model = build().double().eval()
    batch = data()
    if isinstance(batch, Tensor):
        batch = batch.double()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    make = _signals(signals)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' own deprecations
        result = squared_grad_sums(model, params, batch, forward, make)
        expected = brute_force_squared_grad_sums(model, params, batch, forward, make)
    # Attention's key bias has an exactly zero gradient (softmax ignores a shift shared by all
    # keys): its sums are rounding noise, so the absolute tolerance is relative to the model's
    # largest sum rather than to the parameter's own.
    scale = max(float(value.abs().max()) for value in expected.values())
    for name in params:
        assert result.paths[name] == _expected(family, name), (name, result.paths[name])
        torch.testing.assert_close(
            result.sums[name].double(), expected[name], rtol=1e-9, atol=1e-13 * scale
        )
        assert not result.sums[name].requires_grad


def test_no_parameter_leaves_the_per_layer_paths_in_float32() -> None:
    """The paths do not depend on the dtype; no fallback warning on any family."""
    for family, (build, data, forward) in FAMILIES.items():
        torch.manual_seed(0)
        model = build().eval()
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            result = squared_grad_sums(model, params, data(), forward, _signals(1))
        off = {n: p for n, p in result.paths.items() if p in ("vmap", "loop")}
        assert not off, (family, off)


def test_gpt2_consolidation_empirical_with_penalty_in_the_loss() -> None:
    """A consolidation on GPT-2 (tied weights, broadcast position ids), then two training steps
    with the penalty in the loss; the state carries no graph and deepcopies."""
    torch.manual_seed(0)
    model = _gpt2()
    ids, mask = _tokens()
    loader = [((ids[:2], mask[:2]), ids[:2]), ((ids[2:], mask[2:]), ids[2:])]

    def forward(m: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        (x, attention), labels = batch
        logits = m(input_ids=x, attention_mask=attention).logits[:, :-1]
        return logits.reshape(logits.shape[0], -1), labels[:, 1:]

    def criterion(output: Tensor, target: Tensor) -> Tensor:
        return nn.functional.cross_entropy(output.reshape(-1, VOCAB), target.reshape(-1))

    reg = EWC(10.0, fisher="empirical")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reg.consolidate(model, loader, criterion, forward=forward)
    for value in reg.state_dict()["state"].values():
        if isinstance(value, Tensor):
            assert not value.requires_grad and value.grad_fn is None
    copy.deepcopy(reg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        output, target = forward(model, loader[0])
        loss = criterion(output, target) + reg.penalty(model)
        loss.backward()
        optimizer.step()


class _Conv1DTwice(nn.Module):
    """HF ``Conv1D`` on 2-D and on 3-D inputs, one of them called twice (per-example path)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.flat = Conv1D(5, 3)  # nf=5 outputs, nx=3 inputs
        self.again = Conv1D(5, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.flat(x))
        return self.again(torch.tanh(self.again(h)))


@pytest.mark.parametrize("shape", [(6, 3), (4, 5, 3)], ids=["2d", "sequence"])
def test_conv1d_rule_and_its_per_example_gradients(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = _Conv1DTwice().double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    params = dict(model.named_parameters())

    def run(m: nn.Module, batch: Tensor) -> tuple[Tensor, Any]:
        return m(batch), None

    make = _signals(3)
    result = squared_grad_sums(model, params, x, run, make, memory_budget_bytes=1)
    expected = brute_force_squared_grad_sums(model, params, x, run, make)
    for name in params:
        assert result.paths[name] == "rule:Conv1D", (name, result.paths[name])
        torch.testing.assert_close(result.sums[name].double(), expected[name], rtol=1e-10, atol=0)


def test_conv1d_match_is_structural_and_exact() -> None:
    from transformers.pytorch_utils import Conv1D

    from ewc.rules import rule_for

    class Tweaked(Conv1D):  # a subclass may change forward: no rule
        pass

    class Lookalike(nn.Module):  # same name and attributes, not from transformers
        def __init__(self) -> None:
            super().__init__()
            self.nf = 2
            self.weight = nn.Parameter(torch.zeros(3, 2))
            self.bias = nn.Parameter(torch.zeros(2))

    Lookalike.__name__ = "Conv1D"
    rule = rule_for(Conv1D(2, 3))
    assert rule is not None and rule.path == "rule:Conv1D"
    assert rule_for(Tweaked(2, 3)) is None
    assert rule_for(Lookalike()) is None
