"""The default forward and criterion for Hugging Face models, on real ``transformers`` models built
from small configs (random weights, no downloads), against a brute-force per-example reference
that uses its own, independently written forward."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from tests import torchvision_shim

torchvision_shim.apply()
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from ewc import EWC, UnsupportedCriterionError  # noqa: E402
from ewc import huggingface as hf  # noqa: E402
from ewc.fisher import default_forward  # noqa: E402
from ewc.likelihoods import likelihood_for  # noqa: E402
from tests.reference_likelihoods import brute_force_likelihood_fisher  # noqa: E402

VOCAB, LENGTH, EXAMPLES = 13, 6, 4


def bert_config(**overrides: Any) -> Any:
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    settings.update(overrides)
    return transformers.BertConfig(**settings)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (EXAMPLES, LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding
    mask[3, 5:] = 0
    return ids, mask


def make_family(name: str) -> tuple[nn.Module, list[dict], str, type]:
    """model, batches, likelihood, the criterion type the default must pick."""
    torch.manual_seed(0)
    ids, mask = inputs()
    generator = torch.Generator().manual_seed(1)
    batch: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    if name.startswith("gpt2"):
        config = transformers.GPT2Config(
            n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
        if name == "gpt2-causal":
            batch["labels"] = ids.masked_fill(mask == 0, -100)
            batch["labels"][0, :2] = -100  # a prompt
        likelihood, criterion = "categorical", nn.CrossEntropyLoss
    elif name == "bert-sequence":
        model = transformers.BertForSequenceClassification(bert_config(num_labels=3))
        batch["labels"] = torch.randint(0, 3, (EXAMPLES,), generator=generator)
        likelihood, criterion = "categorical", nn.CrossEntropyLoss
    elif name == "bert-regression":
        model = transformers.BertForSequenceClassification(bert_config(num_labels=1))
        batch["labels"] = torch.randn(EXAMPLES, generator=generator)
        likelihood, criterion = "gaussian", nn.MSELoss
    elif name == "bert-multilabel":
        config = bert_config(num_labels=3, problem_type="multi_label_classification")
        model = transformers.BertForSequenceClassification(config)
        batch["labels"] = torch.randint(0, 2, (EXAMPLES, 3), generator=generator).float()
        likelihood, criterion = "bernoulli", nn.BCEWithLogitsLoss
    elif name == "bert-token":
        model = transformers.BertForTokenClassification(bert_config(num_labels=3))
        labels = torch.randint(0, 3, (EXAMPLES, LENGTH), generator=generator)
        batch["labels"] = labels.masked_fill(mask == 0, -100)
        likelihood, criterion = "categorical", nn.CrossEntropyLoss
    elif name == "bert-masked":
        model = transformers.BertForMaskedLM(bert_config())
        labels = torch.full((EXAMPLES, LENGTH), -100)
        labels[:, 2] = ids[:, 2]
        labels[0, 1] = ids[0, 1]
        batch["labels"] = labels
        likelihood, criterion = "categorical", nn.CrossEntropyLoss
    else:
        raise KeyError(name)
    model = model.double()
    if "labels" in batch and batch["labels"].is_floating_point():
        batch["labels"] = batch["labels"].double()
    half = EXAMPLES // 2
    batches = [
        transformers.BatchEncoding({k: v[:half] for k, v in batch.items()}),  # a BatchEncoding
        {k: v[half:] for k, v in batch.items()},  # a plain dict
    ]
    return model, batches, likelihood, criterion


def reference_forward(name: str):
    """Written from Hugging Face's documented semantics, independently of ``ewc.huggingface``."""

    def forward(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if name.startswith("gpt2"):
            labels = batch.get("labels")
            if labels is None:
                labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            return logits[:, :-1], labels[:, 1:]  # token t predicts token t + 1
        if name == "bert-regression":
            return logits.squeeze(-1), batch["labels"]
        return logits, batch["labels"]

    return forward


def consolidate(reg: EWC, model: nn.Module, batches: list) -> Any:
    """``reg.consolidate(model, batches)``: no forward, no criterion (``None`` until the core's
    criterion argument has its default)."""
    default = inspect.signature(EWC.consolidate).parameters["criterion"].default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # exact's signal-count notice
        if default is inspect.Parameter.empty:
            return reg.consolidate(model, batches, None)
        return reg.consolidate(model, batches)


FAMILIES = [
    "gpt2-causal",
    "gpt2-causal-no-labels",
    "bert-sequence",
    "bert-regression",
    "bert-multilabel",
    "bert-token",
    "bert-masked",
]
GRID = [
    (family, estimator)
    for family in FAMILIES
    for estimator in ("exact", "empirical", "batched")
    if not (family == "gpt2-causal-no-labels" and estimator != "exact")
]


@pytest.mark.parametrize(("family", "estimator"), GRID, ids=[f"{f}-{e}" for f, e in GRID])
def test_default_forward_and_criterion_match_brute_force(family: str, estimator: str):
    model, batches, likelihood, criterion_type = make_family(family)
    criterion = hf.default_criterion(model)
    assert type(criterion) is criterion_type
    reg = EWC(1.0, fisher=estimator)
    report = consolidate(reg, model, batches)
    assert report.examples == EXAMPLES  # N counts sequences
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = brute_force_likelihood_fisher(
        model, params, batches, estimator, likelihood, criterion, reference_forward(family)
    )
    assert set(reg.state.importance) == set(params)
    for name, value in expected.items():
        torch.testing.assert_close(reg.state.importance[name], value, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt2-causal-no-labels"])
def test_default_forward_reproduces_the_models_own_loss(family: str):
    """The shift, the ignored labels and the criterion, checked against the model's own loss."""
    model, batches, _, _ = make_family(family)
    model.eval()
    criterion = hf.default_criterion(model)
    for batch in batches:
        output, target = default_forward(model, batch)
        ours = likelihood_for(criterion).batch_loss(output, target)
        theirs = model(**batch).loss
        # transformers' causal-LM loss upcasts the logits to float32, whatever the model's dtype
        tolerance = 1e-12 if theirs.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(ours.to(theirs.dtype), theirs, rtol=tolerance, atol=tolerance)


def test_sample_runs_on_a_causal_lm_and_ignores_masked_tokens():
    torch.manual_seed(0)
    model, batches, _, _ = make_family("gpt2-causal")
    report = consolidate(EWC(1.0, fisher="sample", mc_samples=3), model, batches)
    assert report.examples == EXAMPLES
    model.eval()
    output, target = default_forward(model, batches[0])
    signals = likelihood_for(hf.default_criterion(model)).sample_signals(output.detach(), target, 3)
    ignored = target == -100
    assert ignored.any() and torch.count_nonzero(signals[:, ignored]) == 0


def test_tasks_are_read_from_the_class_names():
    assert hf.task_of(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1))) == (
        "causal-lm"
    )
    assert hf.task_of(transformers.BertForMaskedLM(bert_config())) == "masked-lm"
    assert hf.task_of(transformers.BertForTokenClassification(bert_config())) == (
        "token-classification"
    )
    assert hf.task_of(transformers.BertForSequenceClassification(bert_config())) == (
        "sequence-classification"
    )
    assert not hf.is_hf_model(nn.Linear(2, 2))
    assert hf.default_criterion(nn.Linear(2, 2)) is None


def test_no_criterion_on_a_plain_model_names_the_argument():
    model = nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    for estimator in ("exact", "empirical", "batched"):
        reg = EWC(1.0, fisher=estimator)
        with pytest.raises(UnsupportedCriterionError, match=r"`criterion` is None.*Linear"):
            reg.consolidate(model, batches, None)
        assert reg.tasks == 0


def test_the_core_does_not_import_transformers():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "import ewc, ewc.fisher, ewc.huggingface\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
