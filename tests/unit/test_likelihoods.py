"""The likelihood registry: every likelihood and token-level layout against brute force."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ewc.fisher as fisher_module
from ewc import EWC, ConsolidationError, UnsupportedCriterionError
from ewc.likelihoods import LazySignals, likelihood_for, register_likelihood
from ewc.likelihoods.categorical import Categorical
from tests.reference_likelihoods import brute_force_likelihood_fisher


class TokenTagger(nn.Module):
    """Per-token logits ``(n, L, C)``, class dim last as Hugging Face emits them."""

    def __init__(self, vocab: int = 7, width: int = 5, classes: int = 4, log_probs: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)
        self.log_probs = log_probs

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.tanh(self.norm(self.embed(tokens))))
        return torch.log_softmax(logits, dim=-1) if self.log_probs else logits


def token_batches(ignore: int = -100, classes: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 7, (7, 4), generator=generator)
    labels = torch.randint(0, classes, (7, 4), generator=generator)
    labels[0, :2] = ignore  # prompt-like prefix
    labels[3] = ignore  # an example with nothing to learn: still counts in N
    labels[:4, 3] = ignore  # a position ignored in every example of the first batch
    labels[5, 1] = ignore
    return [(tokens[:4], labels[:4]), (tokens[4:], labels[4:])]


def multilabel_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(9, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 2, (9, 5), generator=generator).double()
    return [(x[i : i + 4], y[i : i + 4]) for i in range(0, 9, 4)]


def make_case(name: str) -> tuple[nn.Module, list, nn.Module, str]:
    torch.manual_seed(0)
    if name == "tokens-ce":
        return TokenTagger().double(), token_batches(), nn.CrossEntropyLoss(), "categorical"
    if name == "tokens-ce-ignore-2":
        return (
            TokenTagger().double(),
            token_batches(ignore=2),
            nn.CrossEntropyLoss(ignore_index=2),
            "categorical",
        )
    if name == "tokens-nll-sum":
        return (
            TokenTagger(log_probs=True).double(),
            token_batches(),
            nn.NLLLoss(reduction="sum"),
            "categorical",
        )
    if name == "tokens-ce-weight-smoothing":
        weight = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
        return (
            TokenTagger().double(),
            token_batches(),
            nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1),
            "categorical",
        )
    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    if name == "multilabel-bce":
        return mlp, multilabel_batches(), nn.BCEWithLogitsLoss(), "bernoulli"
    if name == "multilabel-bce-weighted":
        criterion = nn.BCEWithLogitsLoss(
            weight=torch.linspace(0.5, 1.5, 5, dtype=torch.float64),
            pos_weight=torch.linspace(2.0, 0.5, 5, dtype=torch.float64),
        )
        return mlp, multilabel_batches(), criterion, "bernoulli"
    raise KeyError(name)


GRID = [
    ("tokens-ce", "exact"),
    ("tokens-ce", "empirical"),
    ("tokens-ce", "batched"),
    ("tokens-ce-ignore-2", "exact"),
    ("tokens-ce-ignore-2", "empirical"),
    ("tokens-ce-ignore-2", "batched"),
    ("tokens-nll-sum", "exact"),
    ("tokens-nll-sum", "empirical"),
    ("tokens-nll-sum", "batched"),
    ("tokens-ce-weight-smoothing", "empirical"),
    ("tokens-ce-weight-smoothing", "batched"),
    ("multilabel-bce", "exact"),
    ("multilabel-bce", "empirical"),
    ("multilabel-bce", "batched"),
    ("multilabel-bce-weighted", "empirical"),
    ("multilabel-bce-weighted", "batched"),
]


@pytest.mark.parametrize(("case", "estimator"), GRID, ids=[f"{c}-{e}" for c, e in GRID])
def test_estimator_matches_brute_force(case: str, estimator: str):
    model, batches, criterion, likelihood = make_case(case)
    reg = EWC(1.0, fisher=estimator)
    report = reg.consolidate(model, batches, criterion)
    examples = sum(len(b[0]) for b in batches)
    assert report.examples == examples  # N counts examples (sequences), ignored ones included
    model.eval()
    params = dict(model.named_parameters())
    expected = brute_force_likelihood_fisher(
        model, params, batches, estimator, likelihood, criterion
    )
    for name, value in expected.items():
        torch.testing.assert_close(reg.state.importance[name], value, rtol=1e-9, atol=1e-12)


def test_exact_bernoulli_is_the_probability_weighted_score_of_both_labels_per_unit():
    """The proof of the registry: BCEWithLogits with exact, against the definition."""
    model, batches, criterion, _ = make_case("multilabel-bce")
    reg = EWC(1.0, fisher="exact")
    reg.consolidate(model, batches, criterion)
    model.eval()
    # the definition, written out: per example, per unit, both labels
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    examples = 0
    for x, _ in batches:
        for row in x:
            examples += 1
            logits = model(row[None])[0]
            for unit in range(logits.shape[0]):
                p_one = torch.sigmoid(logits[unit]).detach()
                for label, prob in ((1, p_one), (0, 1.0 - p_one)):
                    log_p = torch.log(torch.sigmoid(logits[unit] if label else -logits[unit]))
                    grads = torch.autograd.grad(log_p, list(params.values()), retain_graph=True)
                    for name, grad in zip(params, grads):
                        total[name] += prob * grad.square()
    for name, value in total.items():
        torch.testing.assert_close(
            reg.state.importance[name], value / examples, rtol=1e-9, atol=1e-12
        )


@pytest.mark.parametrize("case", ["tokens-ce", "multilabel-bce"])
def test_sample_converges_to_exact(case: str):
    torch.manual_seed(4)
    model, batches, criterion, _ = make_case(case)
    exact, sample = EWC(1.0, fisher="exact"), EWC(1.0, fisher="sample", mc_samples=400)
    exact.consolidate(model, batches, criterion)
    sample.consolidate(model, batches, criterion)
    for name, value in exact.state.importance.items():
        error = (sample.state.importance[name] - value).norm() / value.norm()
        assert error < 0.15, (name, float(error))


def test_sample_signals_are_zero_at_ignored_positions():
    output = torch.randn(3, 4, 5, dtype=torch.float64)
    target = torch.randint(0, 5, (3, 4))
    target[0, 1] = target[2, 3] = -100
    signals = likelihood_for(nn.CrossEntropyLoss()).sample_signals(output, target, 6)
    assert signals.shape == (6, 3, 4, 5)
    assert torch.count_nonzero(signals[:, 0, 1]) == 0 and torch.count_nonzero(signals[:, 2, 3]) == 0
    assert torch.count_nonzero(signals[:, 1]) > 0


def test_exact_signals_skip_positions_ignored_in_every_example_and_chunks_agree():
    output = torch.randn(2, 3, 4, dtype=torch.float64)
    target = torch.tensor([[1, -100, 2], [0, -100, -100]])
    signals = likelihood_for(nn.CrossEntropyLoss()).exact_signals(output, target)
    assert isinstance(signals, LazySignals)
    assert len(signals) == 2 * 3  # position 1 is ignored everywhere: 2 positions x (4 - 1)
    whole = signals.materialize()
    parts = torch.cat([signals.chunk(start, start + 3) for start in range(0, len(signals), 3)])
    assert torch.equal(whole, parts)
    assert torch.count_nonzero(whole[:, 1, 2]) == 0  # ignored in example 1 only: zero there
    assert torch.count_nonzero(whole[:, 0, 2]) > 0


@pytest.mark.parametrize("case", ["tokens-ce", "multilabel-bce"])
def test_exact_in_budget_sized_chunks_matches_brute_force(case: str, monkeypatch):
    model, batches, criterion, likelihood = make_case(case)
    requested: list[int] = []
    original = LazySignals.chunk

    def recording(self, start, stop):
        requested.append((stop - start) * self.bytes_per_signal())
        return original(self, start, stop)

    monkeypatch.setattr(LazySignals, "chunk", recording)
    bytes_per_signal = batches[0][0].shape[0] * math.prod(model(batches[0][0]).shape[1:]) * 8
    budget = 3 * bytes_per_signal
    monkeypatch.setattr(fisher_module, "DEFAULT_MEMORY_BUDGET_BYTES", budget)  # the engine's too
    reg = EWC(1.0, fisher="exact")
    reg.consolidate(model, batches, criterion)
    assert len(requested) > 2 and max(requested) <= budget
    model.eval()
    expected = brute_force_likelihood_fisher(
        model, dict(model.named_parameters()), batches, "exact", likelihood, criterion
    )
    for name, value in expected.items():
        torch.testing.assert_close(reg.state.importance[name], value, rtol=1e-9, atol=1e-12)


def test_exact_with_a_vocabulary_over_positions_is_refused_before_any_backward(monkeypatch):
    model = TokenTagger(vocab=50, width=4, classes=1000)
    tokens = torch.randint(0, 50, (4, 64))
    batches = [(tokens, torch.randint(0, 1000, (4, 64)))]

    def no_backward(*args, **kwargs):
        raise AssertionError("a backward pass ran before the signal count was checked")

    monkeypatch.setattr(torch.autograd, "grad", no_backward)
    reg = EWC(1.0, fisher="exact")
    with pytest.raises(ConsolidationError, match=r"63936 backward signals.*fisher='sample'"):
        reg.consolidate(model, batches, nn.CrossEntropyLoss())
    assert reg.tasks == 0


def test_sample_on_a_vocabulary_over_positions_runs_one_signal_per_draw():
    torch.manual_seed(0)
    model = TokenTagger(vocab=50, width=4, classes=1000)
    batches = [(torch.randint(0, 50, (2, 16)), torch.randint(0, 1000, (2, 16)))]
    report = EWC(1.0, fisher="sample", mc_samples=2).consolidate(
        model, batches, nn.CrossEntropyLoss()
    )
    assert report.examples == 2


@pytest.mark.parametrize("estimator", ["exact", "sample"])
@pytest.mark.parametrize(
    ("criterion", "option", "value"),
    [
        (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0, 4.0])), "weight", "tensor"),
        (nn.CrossEntropyLoss(label_smoothing=0.2), "label_smoothing", "0.2"),
        (nn.NLLLoss(weight=torch.ones(4)), "weight", "tensor"),
        (nn.BCEWithLogitsLoss(pos_weight=torch.ones(4)), "pos_weight", "tensor"),
        (nn.BCEWithLogitsLoss(weight=torch.ones(4)), "weight", "tensor"),
    ],
    ids=["ce-weight", "ce-smoothing", "nll-weight", "bce-pos-weight", "bce-weight"],
)
def test_options_a_likelihood_estimator_cannot_honour_are_refused(
    criterion, option, value, estimator
):
    model = nn.Linear(3, 4)
    batches = [(torch.randn(5, 3), torch.randint(0, 2, (5, 4)).float())]
    reg = EWC(1.0, fisher=estimator)
    with pytest.raises(UnsupportedCriterionError, match=rf"`{option}`={value}") as info:
        reg.consolidate(model, batches, criterion)
    assert f"fisher={estimator!r}" in str(info.value) and "empirical" in str(info.value)
    assert reg.tasks == 0


def test_a_new_likelihood_is_one_registration():
    class TokenLoss(nn.Module):  # a user's own cross-entropy wrapper
        def forward(self, output, target):
            return nn.functional.cross_entropy(output.flatten(0, -2), target.flatten())

    assert likelihood_for(TokenLoss()) is None
    register_likelihood(TokenLoss, Categorical)
    try:
        assert likelihood_for(TokenLoss()).name == "categorical"
        model, batches, _, _ = make_case("tokens-ce")
        ours, reference = EWC(1.0, fisher="exact"), EWC(1.0, fisher="exact")
        ours.consolidate(model, batches, TokenLoss())
        reference.consolidate(model, batches, nn.CrossEntropyLoss())
        for name, value in reference.state.importance.items():
            torch.testing.assert_close(ours.state.importance[name], value, rtol=1e-12, atol=0)
    finally:
        from ewc.likelihoods import registry

        registry._BY_TYPE.pop(TokenLoss)


def test_likelihood_names():
    from ewc.fisher import likelihood_of

    assert likelihood_of(nn.CrossEntropyLoss()) == "categorical"
    assert likelihood_of(nn.functional.nll_loss) == "categorical"
    assert likelihood_of(nn.MSELoss()) == "gaussian"
    assert likelihood_of(nn.BCEWithLogitsLoss()) == "bernoulli"
    assert likelihood_of(nn.L1Loss()) is None
    assert likelihood_of(lambda o, t: o.sum()) is None


def test_public_names():
    import ewc.fisher
    import ewc.huggingface
    import ewc.likelihoods

    for module, names in [
        (ewc.likelihoods, ["register_likelihood", "likelihood_for", "Likelihood", "LazySignals"]),
        (ewc.fisher, ["check_estimator", "MAX_EXACT_SIGNALS", "per_example_loss_grads"]),
        (ewc.huggingface, ["forward", "default_criterion", "is_hf_model"]),
    ]:
        for name in names:
            assert hasattr(module, name) and name in module.__all__, (module.__name__, name)


@pytest.mark.parametrize("classes", [1, 2, 3, 10])
@pytest.mark.parametrize("sharpness", [1.0, 40.0])  # 40: p within 1e-17 of one-hot
def test_exact_signals_factor_the_logit_fisher_with_one_signal_fewer_than_classes(
    classes: int, sharpness: float
):
    """``sum_k s_k s_k^T = diag(p) - p p^T`` per example, from ``max(1, C - 1)`` signals."""
    torch.manual_seed(0)
    output = sharpness * torch.randn(4, classes, dtype=torch.float64)
    likelihood = likelihood_for(nn.CrossEntropyLoss())
    target = torch.zeros(4, dtype=torch.long)
    signals = likelihood.exact_signals(output, target).materialize()  # (K, n, C)
    assert signals.shape == (max(1, classes - 1), 4, classes)
    assert likelihood.exact_signal_count(output, target) == signals.shape[0]
    p = torch.softmax(output, dim=-1)
    expected = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    outer = torch.einsum("kni,knj->nij", signals, signals)
    torch.testing.assert_close(outer, expected, rtol=0, atol=1e-15)
