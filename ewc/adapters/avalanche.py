"""An Avalanche plugin that is a drop-in for ``avalanche.training.plugins.EWCPlugin``.

Same constructor (``ewc_lambda, mode="separate", decay_factor=None, keep_importance_data=False``)
plus the keyword-only options of :class:`ewc.EWC`, and the same public methods. What differs:

* the default estimator is ``fisher="exact"``, the true diagonal Fisher; ``fisher="batched"``
  reproduces Avalanche's squared mini-batch gradients numerically;
* separate mode keeps one collapsed quadratic (O(P) memory and penalty cost whatever the number of
  experiences) instead of one copy of weights and importances per experience, so Avalanche's
  forcing of ``keep_importance_data=True`` in separate mode is not needed: the per-experience
  ``saved_params``/``importances`` views exist when ``keep_importance_data=True`` (in online mode
  also without it, for the latest experience, as in Avalanche).

The maths lives in :class:`ewc.EWC`, available as :attr:`EWCPlugin.reg` (``state_dict`` etc.).

Example:
    >>> from avalanche.training import Naive
    >>> from ewc.adapters.avalanche import EWCPlugin
    >>> plugin = EWCPlugin(ewc_lambda=100.0)  # fisher="exact"
    >>> strategy = Naive(model, optimizer, criterion, plugins=[plugin])  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

try:
    from avalanche.models.utils import avalanche_forward
    from avalanche.training.plugins.strategy_plugin import SupervisedPlugin
    from avalanche.training.utils import ParamData
except ModuleNotFoundError as error:  # pragma: no cover - exercised without avalanche installed
    raise ModuleNotFoundError(
        'ewc.adapters.avalanche needs Avalanche: pip install "ewc[avalanche]" '
        f"(import failed: {error})"
    ) from error

from ewc._typing import Batch, ParamSelector
from ewc.core import EWC, ConsolidationReport
from ewc.distributed import unwrap
from ewc.views import check_ewc_lambda, task_anchors, task_importances

__all__ = ["EWCPlugin"]


class EWCPlugin(SupervisedPlugin, supports_distributed=True):  # type: ignore[call-arg, unused-ignore]
    """Elastic Weight Consolidation for Avalanche strategies, backed by :class:`ewc.EWC`.

    At the end of each training experience the Fisher is estimated on the experience's dataset
    (the strategy's ``train_mb_size``, the dataset's ``collate_fn``, the strategy's device, the
    model in eval mode, task labels passed to multi-task models) and the experience is
    consolidated; before every backward pass the penalty is added to ``strategy.loss``, as in
    Avalanche, so loss metrics include it.

    Args:
        ewc_lambda: penalty strength, a float >= 0 (same scale as Avalanche's).
        mode: ``"separate"`` or ``"online"``.
        decay_factor: online mode only, in ``[0, 1]``.
        keep_importance_data: keep every experience's Fisher and weights (for the
            ``saved_params``/``importances`` views); not needed for the penalty.
        fisher: ``"exact"`` (default), ``"sample"``, ``"empirical"``, or ``"batched"`` for
            Avalanche's estimate.
        mc_samples: labels drawn per example for ``fisher="sample"``.
        max_samples: estimate the Fisher on the first ``max_samples`` examples only.
        params: which parameters to regularise (see :class:`ewc.EWC`).
        logits_reversal: EWC-DR's importance from the loss on -logits (``empirical``/``batched``).
        max_importance: clamp each experience's importance at this value (EWC-DR's code: 1e-4).

    Example:
        >>> from ewc.adapters.avalanche import EWCPlugin
        >>> plugin = EWCPlugin(ewc_lambda=1000.0, mode="online", decay_factor=0.9)
        >>> plugin.reg.tasks
        0
    """

    def __init__(
        self,
        ewc_lambda: float,
        mode: str = "separate",
        decay_factor: float | None = None,
        keep_importance_data: bool = False,
        *,
        fisher: str = "exact",
        mc_samples: int = 1,
        max_samples: int | None = None,
        params: ParamSelector = None,
        logits_reversal: bool = False,
        max_importance: float | None = None,
    ) -> None:
        super().__init__()
        self.reg = EWC(
            ewc_lambda,
            mode,
            decay_factor,
            keep_importance_data,
            fisher=fisher,
            mc_samples=mc_samples,
            max_samples=max_samples,
            params=params,
            logits_reversal=logits_reversal,
            max_importance=max_importance,
        )
        self.last_report: ConsolidationReport | None = None
        """What the latest importance computation did (examples, batches, seconds, paths)."""
        self._model: nn.Module | None = None

    # ------------------------------------------------------------------ Avalanche's attributes
    @property
    def ewc_lambda(self) -> float:
        """Penalty strength; assigning it changes the strength of later penalties."""
        return self.reg.ewc_lambda

    @ewc_lambda.setter
    def ewc_lambda(self, value: float) -> None:
        self.reg.ewc_lambda = check_ewc_lambda(value)

    @property
    def mode(self) -> str:
        """``"separate"`` or ``"online"``."""
        return self.reg.mode

    @property
    def decay_factor(self) -> float | None:
        """Online mode's decay of the accumulated importance."""
        return self.reg.decay_factor

    @property
    def keep_importance_data(self) -> bool:
        """Whether every experience's Fisher and weights are kept (``saved_params`` etc.)."""
        return self.reg.keep_importance_data

    # ------------------------------------------------------------------ strategy callbacks
    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        """Add the EWC penalty to ``strategy.loss`` (nothing before the first consolidation)."""
        if self.reg.tasks == 0:
            return
        strategy.loss += self.reg.penalty(strategy.model)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        """Estimate the importances on the experience just trained and consolidate it."""
        self._model = strategy.model
        importances = self.compute_importances(
            strategy.model,
            strategy._criterion,
            strategy.optimizer,
            strategy.experience.dataset,
            strategy.device,
            strategy.train_mb_size,
            num_workers=kwargs.get("num_workers", 0),
        )
        self.update_importances(importances, strategy.clock.train_exp_counter)

    # ------------------------------------------------------------------ Avalanche's public methods
    def compute_importances(
        self,
        model: nn.Module,
        criterion: Callable[..., Tensor],
        optimizer: torch.optim.Optimizer | None,
        dataset: Any,
        device: torch.device | str,
        batch_size: int,
        num_workers: int = 0,
    ) -> dict[str, ParamData]:
        """The diagonal Fisher of ``model`` on ``dataset`` at its current weights.

        Reads ``dataset`` in order with a ``DataLoader`` built as Avalanche builds it (its
        ``collate_fn``, ``batch_size``, ``num_workers``), moves inputs and targets to ``device``,
        and passes task labels to multi-task models. The model is in eval mode meanwhile and in
        train mode afterwards (as Avalanche leaves it). ``.grad`` is not touched, so
        ``optimizer`` is accepted for compatibility only. The consolidated state is unchanged:
        :meth:`update_importances` adds the result.

        Returns:
            ``{parameter name: ParamData}`` of the regularised parameters.
        """
        self._model = model
        collate_fn = getattr(dataset, "collate_fn", None)
        loader = DataLoader(
            dataset, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers
        )
        estimate = self.reg.estimate(model, loader, criterion, forward=_avalanche_forward(device))
        self.last_report = estimate.report
        fisher = estimate.fisher
        model.train()
        return {
            name: ParamData(name, init_tensor=value, device=value.device)
            for name, value in fisher.items()
        }

    @torch.no_grad()
    def update_importances(self, importances: Mapping[str, ParamData | Tensor], t: int) -> None:
        """Consolidate one experience: ``importances`` with the model's current weights as anchor.

        The anchor is read from the model last passed to :meth:`compute_importances` (or seen by
        :meth:`after_training_exp`), as Avalanche copies the weights right after this call.
        Experiences are numbered in consolidation order; ``t`` is accepted for compatibility.
        """
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"Expected argument `t` to be an int >= 0 but got {t!r}")
        if self._model is None:
            raise RuntimeError(
                "update_importances needs the model whose weights are the anchor: call "
                "compute_importances(model, ...) first"
            )
        named = dict(unwrap(self._model).named_parameters())
        unknown = sorted(set(importances) - set(named))
        if unknown:
            raise ValueError(
                f"Argument `importances` names parameters {unknown} which the model does not have"
            )
        fisher: dict[str, Tensor] = {}
        anchor: dict[str, Tensor] = {}
        for name, value in importances.items():
            param = named[name]
            tensor = value.data if isinstance(value, (ParamData, Tensor)) else value
            if not isinstance(tensor, Tensor):
                raise TypeError(
                    f"Expected argument `importances` to map names to tensors or ParamData but "
                    f"{name!r} maps to {type(value).__name__}"
                )
            fisher[name] = tensor.to(param.device)
            anchor[name] = param
        self.reg.add_task(fisher, anchor)

    # ------------------------------------------------------------------ Avalanche's views
    @property
    def saved_params(self) -> dict[int, dict[str, ParamData]]:
        """Per experience, the weights it was consolidated at (a read-only snapshot)."""
        return self._views(
            task_anchors, "saved_params", self.reg.state, self.reg.mode, self.reg.decay_factor
        )

    @property
    def importances(self) -> dict[int, dict[str, ParamData]]:
        """Per experience, its importance as Avalanche keeps it (a read-only snapshot).

        Separate mode: that experience's Fisher. Online mode: the decayed sum up to it
        (:func:`ewc.views.task_importances`; the latest equals ``reg.state.importance``).
        """
        return self._views(
            task_importances, "importances", self.reg.state, self.reg.mode, self.reg.decay_factor
        )

    @staticmethod
    def _views(view: Callable[..., dict[int, dict[str, Tensor]]], what: str, *args: Any) -> Any:
        try:
            per_task = view(*args)
        except RuntimeError as error:
            raise RuntimeError(
                f"`{what}` per experience needs EWCPlugin(..., keep_importance_data=True) in "
                f"separate mode ({error})"
            ) from None
        return {t: _param_data(tensors) for t, tensors in per_task.items()}


def _param_data(tensors: Mapping[str, Tensor]) -> dict[str, ParamData]:
    return {
        name: ParamData(name, init_tensor=tensor.clone(), device=tensor.device)
        for name, tensor in tensors.items()
    }


def _avalanche_forward(device: torch.device | str) -> Callable[[nn.Module, Batch], Any]:
    """``forward(model, batch)`` for Avalanche's ``(x, y, ..., task_labels)`` batches."""
    on_cuda = torch.device(device).type == "cuda"

    def forward(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        x, y, task_labels = batch[0], batch[1], batch[-1]
        if on_cuda:
            _rnns_to_train_mode(model)
        return avalanche_forward(model, x.to(device), task_labels), y.to(device)

    return forward


def _rnns_to_train_mode(model: nn.Module) -> None:
    """cuDNN RNNs cannot run backward in eval mode; Avalanche switches them to train mode too.

    The consolidation restores every module's own mode afterwards.
    """
    for module in model.modules():
        if isinstance(module, nn.RNNBase) and not module.training:
            warnings.warn(
                "RNN-like modules do not support backward calls in eval mode on CUDA; setting "
                "them to train mode for the importance computation (dropout > 0 in them makes "
                "the estimate noisy)",
                stacklevel=2,
            )
            module.train()
