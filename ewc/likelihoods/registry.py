"""The likelihood registry: which likelihood a criterion defines, and what a likelihood owes.

A :class:`Likelihood` is built from a criterion (``likelihood_for(nn.CrossEntropyLoss())``) and
gives the three things the estimators need, for outputs ``(n, *S, K)`` with examples along dim 0:

* :meth:`Likelihood.exact_signals`: backward signals ``s_k`` on the output whose squared
  per-example gradients ``(d <s_k[n], f(x_n)> / d theta)^2`` summed over ``k`` are the exact
  Fisher term ``E_{y ~ p(.|x_n)} (grad log p(y|x_n))^2``;
* :meth:`Likelihood.sample_signals`: ``mc_samples`` signals ``grad_f log p(y_m|x_n) / sqrt(m)``
  with ``y_m`` drawn from the model;
* :meth:`Likelihood.loss_grads`: the closed-form per-example gradient
  ``d loss(f(x_n), y_n) / d f(x_n)`` for ``empirical``.

An example's log-likelihood is the sum over its positions (``S``) whose target is not the
criterion's ``ignore_index``; the example count N is the number of examples (sequences), not of
positions.

Adding a likelihood is one file in this package that subclasses :class:`Likelihood` and calls
:func:`register_likelihood` (the package imports every module in it), plus its test.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any, ClassVar, Union

import torch
from torch import Tensor

from ewc.errors import ConsolidationError, UnsupportedCriterionError

__all__ = [
    "LazySignals",
    "Likelihood",
    "likelihood_for",
    "register_likelihood",
    "registered_criteria",
    "widened",
]

LikelihoodFactory = Callable[[Any], "Likelihood"]

_BY_TYPE: dict[type, LikelihoodFactory] = {}
_BY_FUNCTION: dict[Callable[..., Any], LikelihoodFactory] = {}


def register_likelihood(
    criterion: type | Callable[..., Any], factory: LikelihoodFactory
) -> LikelihoodFactory:
    """Map a criterion type (matched with ``isinstance``, subclasses included) or a loss function
    (matched by identity, e.g. ``F.cross_entropy``) to ``factory(criterion) -> Likelihood``.

    A later registration for the same key replaces the earlier one.

    Example:
        >>> from torch import nn
        >>> from ewc.likelihoods import likelihood_for
        >>> likelihood_for(nn.CrossEntropyLoss()).name
        'categorical'

    Returns:
        ``factory``, so that it can be used as a decorator's result.
    """
    if not callable(factory):
        raise TypeError(f"Expected argument `factory` to be callable but got {factory!r}")
    if isinstance(criterion, type):
        _BY_TYPE[criterion] = factory
    elif callable(criterion):
        _BY_FUNCTION[criterion] = factory
    else:
        raise TypeError(
            f"Expected argument `criterion` to be a loss type or a loss function but got "
            f"{criterion!r}"
        )
    return factory


def likelihood_for(criterion: Any) -> Likelihood | None:
    """The likelihood the criterion defines, or None when no registered likelihood matches.

    Types are matched along the criterion's MRO (the most derived registration wins).
    """
    for klass in type(criterion).__mro__:
        factory = _BY_TYPE.get(klass)
        if factory is not None:
            return factory(criterion)
    try:
        factory = _BY_FUNCTION.get(criterion)
    except TypeError:  # unhashable criterion
        return None
    return None if factory is None else factory(criterion)


def registered_criteria() -> list[str]:
    """Names of the registered criteria, for error messages."""
    names = [klass.__name__ for klass in _BY_TYPE]
    names += [getattr(fn, "__qualname__", repr(fn)) for fn in _BY_FUNCTION]
    return names


def widened(tensor: Tensor) -> Tensor:
    """At least float32, so bfloat16 models get accurate probabilities and float64 keep theirs."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class LazySignals:
    """``count`` backward signals of shape ``(n, *output.shape[1:])``, built a chunk at a time.

    Satisfies the engine's signal-source protocol (``len(source)`` and
    ``source.chunk(start, stop) -> (stop - start, n, ...)``), so no more than one chunk of signals
    is ever in memory. ``materialize()`` builds all of them (only for small counts).
    """

    def __init__(
        self,
        count: int,
        make_chunk: Callable[[int, int], Tensor],
        example_shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> None:
        self.count = count
        self._make_chunk = make_chunk
        self.example_shape = example_shape
        self.dtype = dtype

    def __len__(self) -> int:
        return self.count

    def chunk(self, start: int, stop: int) -> Tensor:
        """Signals ``start:stop``: a tensor ``(stop - start, n, *output.shape[1:])``."""
        start, stop = max(0, start), min(self.count, stop)
        return self._make_chunk(start, stop)

    def bytes_per_signal(self) -> int:
        """Bytes one signal occupies once built."""
        return math.prod(self.example_shape) * torch.empty((), dtype=self.dtype).element_size()

    def materialize(self) -> Tensor:
        """All signals as one tensor ``(count, n, ...)``; memory ``count * bytes_per_signal()``."""
        return self.chunk(0, self.count)


Signals = Union[Tensor, LazySignals]  # noqa: UP007


class Likelihood(abc.ABC):
    """The per-example likelihood a criterion defines; subclasses hold the criterion's options.

    Subclasses set :attr:`name` and implement the signal makers and :meth:`loss_grads`. They
    validate their inputs and raise :class:`~ewc.errors.ConsolidationError` (bad output/target)
    or :class:`~ewc.errors.UnsupportedCriterionError` (an option they cannot honour), naming the
    argument and the value.
    """

    name: ClassVar[str]

    def __init__(self, criterion: Any) -> None:
        self.criterion = criterion

    # -- options ---------------------------------------------------------------------------
    def check_estimator(self, estimator: str) -> None:  # noqa: B027 - optional hook
        """Raise :class:`UnsupportedCriterionError` if a criterion option cannot be honoured by
        ``estimator``. Default: every option is fine."""

    def _refuse(self, estimator: str, option: str, value: Any, why: str) -> None:
        raise UnsupportedCriterionError(
            f"fisher={estimator!r} cannot honour {type(self.criterion).__name__}'s option "
            f"`{option}`={value!r}: {why}"
        )

    # -- checks ----------------------------------------------------------------------------
    def check_output(self, output: Tensor, *, min_dim: int = 1) -> None:
        """Outputs carry the examples along dim 0 and are floating point."""
        if output.dim() < min_dim:
            raise ConsolidationError(
                f"the model output of shape {tuple(output.shape)} has {output.dim()} dimension(s) "
                f"but the {self.name} likelihood needs at least {min_dim}: examples along dim 0"
                + (", classes along the last dim" if min_dim > 1 else "")
            )
        if not output.is_floating_point():
            raise ConsolidationError(
                f"the model output has dtype {output.dtype}; the Fisher needs a floating-point "
                "output that carries the autograd graph"
            )

    @staticmethod
    def check_batch_size(output: Tensor, target: Any) -> None:
        """A target tensor carries one entry per example along dim 0."""
        if isinstance(target, Tensor) and target.dim() >= 1 and target.shape[0] != output.shape[0]:
            raise ConsolidationError(
                f"the target (labels) has {target.shape[0]} entries along dim 0 (shape "
                f"{tuple(target.shape)}) but the model output has {output.shape[0]} examples "
                f"(shape {tuple(output.shape)})"
            )

    # -- what the estimators need ------------------------------------------------------------
    @abc.abstractmethod
    def exact_signal_count(self, output: Tensor, target: Any) -> int:
        """How many signals :meth:`exact_signals` yields for this output (cheap, builds none)."""

    @abc.abstractmethod
    def exact_signals(self, output: Tensor, target: Any) -> Signals:
        """Signals whose squared per-example gradients sum to the exact Fisher term."""

    @abc.abstractmethod
    def sample_signals(self, output: Tensor, target: Any, mc_samples: int) -> Signals:
        """``mc_samples`` signals ``grad_f log p(y_m|x) / sqrt(mc_samples)``, ``y_m ~ p(.|x)``."""

    @abc.abstractmethod
    def loss_grads(self, output: Tensor, target: Any) -> Tensor:
        """``d loss_n / d f(x_n)`` per example, shape of ``output``, float32 or wider."""

    def batch_loss(self, output: Tensor, target: Any) -> Tensor:
        """The criterion on a whole batch (``batched``); layouts may be adapted (class dim)."""
        return self.criterion(output, target)
