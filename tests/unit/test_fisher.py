"""Every estimator against the brute-force per-example autograd reference, on a zoo of models."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from ewc import EWC, UnsupportedCriterionError
from tests.reference import brute_force_fisher


class SequenceClassifier(nn.Module):
    """Embedding + LayerNorm + mean pooling; or per-token logits with ``per_token=True``."""

    def __init__(self, vocab: int = 11, width: int = 6, classes: int = 3, per_token: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)
        self.per_token = per_token

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.norm(self.embed(tokens)))
        return self.head(hidden if self.per_token else hidden.mean(dim=1))


class FrozenAndUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(5, 6)
        self.frozen.requires_grad_(False)
        self.used = nn.Linear(6, 3)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(torch.relu(self.frozen(x)))


def mlp_with_dropout() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Dropout(0.5), nn.Linear(7, 3))


def cnn_with_batchnorm() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    )
    with torch.no_grad():  # non-trivial running statistics, as after training
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def loader(
    inputs: torch.Tensor, targets: torch.Tensor, batch: int
) -> list[tuple[torch.Tensor, ...]]:
    """Batches with an uneven last one and an extra item (a task label) to be ignored."""
    return [
        (inputs[i : i + batch], targets[i : i + batch], torch.zeros(len(inputs[i : i + batch])))
        for i in range(0, len(inputs), batch)
    ]


def make_case(name: str) -> tuple[nn.Module, list, str]:
    generator = torch.Generator().manual_seed(0)
    if name == "mlp-dropout":
        model, x = mlp_with_dropout(), torch.randn(11, 5, generator=generator)
        y, likelihood = torch.randint(0, 3, (11,), generator=generator), "categorical"
    elif name == "cnn-batchnorm":
        model, x = cnn_with_batchnorm(), torch.randn(9, 1, 4, 4, generator=generator)
        y, likelihood = torch.randint(0, 3, (9,), generator=generator), "categorical"
    elif name == "embedding-layernorm":
        model, x = SequenceClassifier(), torch.randint(0, 11, (10, 5), generator=generator)
        y, likelihood = torch.randint(0, 3, (10,), generator=generator), "categorical"
    elif name == "per-token-logits":
        model, x = (
            SequenceClassifier(per_token=True),
            torch.randint(0, 11, (7, 3), generator=generator),
        )
        y, likelihood = torch.randint(0, 3, (7, 3), generator=generator), "categorical"
    elif name == "frozen-and-unused":
        model, x = FrozenAndUnused(), torch.randn(10, 5, generator=generator)
        y, likelihood = torch.randint(0, 3, (10,), generator=generator), "categorical"
    elif name == "regression-mse":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
        x, likelihood = torch.randn(9, 4, generator=generator), "gaussian"
        y = torch.randn(9, 2, generator=generator)
    else:
        raise KeyError(name)
    return (
        model.double(),
        loader(
            x.double() if x.is_floating_point() else x,
            y.double() if y.is_floating_point() else y,
            4,
        ),
        likelihood,
    )


CASES = [
    "mlp-dropout",
    "cnn-batchnorm",
    "embedding-layernorm",
    "per-token-logits",
    "frozen-and-unused",
    "regression-mse",
]


def criterion_for(likelihood: str, per_token: bool) -> Callable[..., torch.Tensor]:
    if likelihood == "gaussian":
        return nn.MSELoss()
    if per_token:
        return lambda out, y: nn.functional.cross_entropy(
            out.reshape(-1, out.shape[-1]), y.reshape(-1)
        )
    return nn.CrossEntropyLoss()


@pytest.mark.parametrize("estimator", ["exact", "empirical", "batched"])
@pytest.mark.parametrize("case", CASES)
def test_estimator_matches_brute_force(case: str, estimator: str):
    model, batches, likelihood = make_case(case)
    per_token = case == "per-token-logits"
    criterion = criterion_for(likelihood, per_token)
    # exact reads the likelihood from the criterion's type; the per-token lambda flattens for
    # empirical/batched, which call it.
    criterion_for_ewc = nn.CrossEntropyLoss() if (estimator == "exact" and per_token) else criterion
    reg = EWC(1.0, fisher=estimator)
    model.train()
    reg.consolidate(model, batches, criterion_for_ewc)
    assert all(m.training for m in model.modules()), "training flags must be restored"
    model.eval()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = brute_force_fisher(model, trainable, batches, estimator, likelihood, criterion)
    assert set(reg.state.importance) == set(trainable)
    for name, value in expected.items():
        torch.testing.assert_close(reg.state.importance[name], value, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(reg.state.centre[name], trainable[name].detach())


def test_frozen_parameters_are_skipped_and_unused_ones_get_zero_importance():
    model, batches, _ = make_case("frozen-and-unused")
    reg = EWC(1.0, fisher="empirical")
    reg.consolidate(model, batches, nn.CrossEntropyLoss())
    assert not any(name.startswith("frozen") for name in reg.state.importance)
    assert torch.count_nonzero(reg.state.importance["unused.weight"]) == 0
    assert torch.count_nonzero(reg.state.importance["used.weight"]) > 0


def test_max_samples_uses_only_the_first_examples():
    model, batches, likelihood = make_case("mlp-dropout")
    reg = EWC(1.0, fisher="exact", max_samples=6)
    report = reg.consolidate(model, batches, nn.CrossEntropyLoss())
    assert report.examples == 6 and report.batches == 2
    x = torch.cat([b[0] for b in batches])[:6]
    y = torch.cat([b[1] for b in batches])[:6]
    model.eval()
    expected = brute_force_fisher(
        model, dict(model.named_parameters()), [(x, y)], "exact", likelihood
    )
    for name, value in expected.items():
        torch.testing.assert_close(reg.state.importance[name], value, rtol=1e-9, atol=1e-12)


def test_forward_hook_for_dict_batches():
    model, batches, likelihood = make_case("mlp-dropout")
    dict_batches = [{"pixels": b[0], "label": b[1], "meta": "ignored"} for b in batches]
    reg = EWC(1.0, fisher="exact")
    reg.consolidate(
        model,
        dict_batches,
        nn.CrossEntropyLoss(),
        forward=lambda m, batch: (m(batch["pixels"]), batch["label"]),
    )
    model.eval()
    expected = brute_force_fisher(
        model, dict(model.named_parameters()), batches, "exact", likelihood
    )
    for name, value in expected.items():
        torch.testing.assert_close(reg.state.importance[name], value, rtol=1e-9, atol=1e-12)


def test_nll_loss_on_log_probabilities_gives_the_same_exact_fisher():
    torch.manual_seed(0)
    logits_model = nn.Sequential(nn.Linear(4, 3)).double()
    logprob_model = nn.Sequential(logits_model[0], nn.LogSoftmax(dim=-1))
    batches = [(torch.randn(6, 4).double(), torch.randint(0, 3, (6,)))]
    a, b = EWC(1.0), EWC(1.0)
    a.consolidate(logits_model, batches, nn.CrossEntropyLoss())
    b.consolidate(logprob_model, batches, nn.NLLLoss())
    for name in a.state.importance:
        torch.testing.assert_close(a.state.importance[name], b.state.importance[name])


def test_sample_estimator_converges_to_exact():
    """Light Monte Carlo check: many label draws per example average to the exact Fisher."""
    torch.manual_seed(0)
    model, batches, _ = make_case("mlp-dropout")
    exact, sample = EWC(1.0, fisher="exact"), EWC(1.0, fisher="sample", mc_samples=400)
    exact.consolidate(model, batches, nn.CrossEntropyLoss())
    sample.consolidate(model, batches, nn.CrossEntropyLoss())
    for name, value in exact.state.importance.items():
        error = (sample.state.importance[name] - value).norm() / value.norm()
        assert error < 0.15, (name, float(error))


@pytest.mark.slow
def test_sample_estimator_is_unbiased_tightly():
    torch.manual_seed(1)
    model, batches, _ = make_case("cnn-batchnorm")
    exact, sample = EWC(1.0, fisher="exact"), EWC(1.0, fisher="sample", mc_samples=20000)
    exact.consolidate(model, batches, nn.CrossEntropyLoss())
    sample.consolidate(model, batches, nn.CrossEntropyLoss())
    for name, value in exact.state.importance.items():
        error = (sample.state.importance[name] - value).norm() / value.norm()
        assert error < 0.03, (name, float(error))


def test_gaussian_sample_estimator_converges_to_exact():
    torch.manual_seed(2)
    model, batches, _ = make_case("regression-mse")
    exact, sample = EWC(1.0, fisher="exact"), EWC(1.0, fisher="sample", mc_samples=400)
    exact.consolidate(model, batches, nn.MSELoss())
    sample.consolidate(model, batches, nn.MSELoss())
    for name, value in exact.state.importance.items():
        error = (sample.state.importance[name] - value).norm() / value.norm()
        assert error < 0.15, (name, float(error))


@pytest.mark.parametrize("estimator", ["exact", "sample"])
def test_unknown_criterion_with_a_likelihood_estimator_suggests_empirical(estimator: str):
    model, batches, _ = make_case("mlp-dropout")
    reg = EWC(1.0, fisher=estimator)
    with pytest.raises(UnsupportedCriterionError, match="fisher='empirical'") as info:
        reg.consolidate(model, batches, nn.L1Loss())
    assert "L1Loss" in str(info.value)
    assert reg.tasks == 0


def test_bfloat16_model_keeps_float32_fisher():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).to(torch.bfloat16)
    batches = [(torch.randn(8, 4, dtype=torch.bfloat16), torch.randint(0, 3, (8,)))]
    reg = EWC(1.0)
    reg.consolidate(model, batches, nn.CrossEntropyLoss())
    assert all(t.dtype == torch.float32 for t in reg.state.importance.values())
    assert all(t.dtype == torch.float32 for t in reg.state.centre.values())
    # the anchor is the bf16 weights, exactly
    for name, p in model.named_parameters():
        assert torch.equal(reg.state.centre[name], p.detach().float())
    reference = EWC(1.0)
    reference.consolidate(
        model.float(), [(b[0].float(), b[1]) for b in batches], nn.CrossEntropyLoss()
    )
    for name, value in reference.state.importance.items():
        error = (reg.state.importance[name] - value).norm() / value.norm()
        assert error < 0.05, (name, float(error))
    penalty = reg.penalty(model.to(torch.bfloat16))
    assert penalty.dtype == torch.float32


@pytest.mark.parametrize(
    "criterion, target_kind",
    [
        (nn.CrossEntropyLoss(), "classes"),
        (nn.CrossEntropyLoss(reduction="sum"), "classes"),
        (nn.functional.cross_entropy, "classes"),
        (nn.NLLLoss(), "classes"),
        (nn.MSELoss(), "values"),
        (nn.MSELoss(reduction="sum"), "values"),
        (
            nn.CrossEntropyLoss(
                weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), reduction="sum"
            ),
            "classes",
        ),
        (nn.CrossEntropyLoss(label_smoothing=0.1), "classes"),
        (nn.CrossEntropyLoss(ignore_index=1), "classes"),
    ],
    ids=[
        "ce",
        "ce-sum",
        "f.ce",
        "nll",
        "mse",
        "mse-sum",
        "ce-weighted-sum",
        "ce-smoothing",
        "ce-ignore",
    ],
)
def test_closed_form_loss_gradients_equal_the_criterion_on_a_batch_of_one(criterion, target_kind):
    """The registered likelihoods' closed forms against the generic path (autograd of the
    criterion applied to each example as a batch of one), where the two definitions agree."""
    from ewc.fisher import per_example_loss_grads
    from ewc.likelihoods import likelihood_for

    generator = torch.Generator().manual_seed(0)
    output = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    if isinstance(criterion, nn.NLLLoss):
        output = torch.log_softmax(output, dim=-1)
    target = (
        torch.tensor([0, 1, 2, 1, 0, 2])
        if target_kind == "classes"
        else torch.randn(6, 3, generator=generator, dtype=torch.float64)
    )
    assert likelihood_for(criterion) is not None
    fast = per_example_loss_grads(criterion, output, target)
    if getattr(criterion, "ignore_index", -100) == 1:  # a batch of one with only ignored: NaN
        keep = target != 1
        assert torch.count_nonzero(fast[~keep]) == 0
        output, target, fast = output[keep], target[keep], fast[keep]
    generic = per_example_loss_grads(lambda o, t: criterion(o, t), output, target)  # not recognised
    torch.testing.assert_close(fast, generic, rtol=1e-12, atol=1e-12)


def test_exact_warns_once_with_the_cost_when_signals_exceed_one_hundred():
    import warnings

    from ewc import fisher as fisher_module

    fisher_module._warned_signal_counts.discard(120)
    model = nn.Linear(3, 121)  # C - 1 = 120 signals
    batches = [(torch.randn(2, 3), torch.randint(0, 121, (2,)))] * 2
    with pytest.warns(UserWarning, match=r"120 backward signals per batch.*fisher='sample'"):
        EWC(1.0).consolidate(model, batches, nn.CrossEntropyLoss())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second consolidation does not warn again
        EWC(1.0).consolidate(model, batches, nn.CrossEntropyLoss())
    small = nn.Linear(3, 101)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 100 signals is within the threshold
        EWC(1.0).consolidate(
            small, [(torch.randn(2, 3), torch.randint(0, 101, (2,)))], nn.CrossEntropyLoss()
        )


@pytest.mark.parametrize("estimator", ["empirical", "batched"])
@pytest.mark.parametrize("case", ["mlp-dropout", "per-token-logits"])
def test_logits_reversal_matches_brute_force_of_the_reversed_loss(case: str, estimator: str):
    """EWC-DR: the importance from ``criterion(-f(x), y)``, per example and per mini-batch."""
    from ewc.fisher import fisher_sums

    model, batches, _ = make_case(case)
    model.eval()
    params = dict(model.named_parameters())
    sums = fisher_sums(
        model, params, batches, nn.CrossEntropyLoss(), estimator=estimator, logits_reversal=True
    )
    flat = nn.functional.cross_entropy
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    count = 0
    for x, y, _ in batches:
        pieces = (
            [(x, y)]
            if estimator == "batched"
            else [(x[i : i + 1], y[i : i + 1]) for i in range(len(x))]
        )
        for xs, ys in pieces:
            logits = model(xs)
            loss = flat(-logits.reshape(-1, logits.shape[-1]), ys.reshape(-1))
            if estimator == "empirical":  # the example's loss: summed over its positions
                loss = loss * ys.numel()
            for name, grad in zip(params, torch.autograd.grad(loss, list(params.values()))):
                total[name] += grad.square()
            count += 1
    assert sums.count == count
    plain = fisher_sums(model, params, batches, nn.CrossEntropyLoss(), estimator=estimator)
    for name, value in total.items():
        torch.testing.assert_close(sums.sums[name], value, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(plain.sums[name], value)  # the reversal changes the importance


@pytest.mark.parametrize("estimator", ["exact", "sample"])
def test_logits_reversal_is_refused_by_likelihood_estimators(estimator: str):
    from ewc.fisher import fisher_sums

    model, batches, _ = make_case("mlp-dropout")
    with pytest.raises(ValueError, match=rf"`logits_reversal`=True.*fisher={estimator!r}"):
        fisher_sums(
            model,
            dict(model.named_parameters()),
            batches,
            nn.CrossEntropyLoss(),
            estimator=estimator,
            logits_reversal=True,
        )
