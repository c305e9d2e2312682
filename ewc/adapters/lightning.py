"""A Lightning callback that applies EWC during ``fit`` and consolidates at its end.

One ``fit`` is one task, the common pattern: build a ``Trainer`` per task (or reuse one) with
the same :class:`EWCCallback`. During training the penalty gradient is added to ``.grad`` in
``on_before_optimizer_step``: after the closure (so once per optimizer step under
``accumulate_grad_batches``), after AMP unscaling and before gradient clipping, exactly where a
penalty added to the loss would land. At the end of each ``fit`` the task is consolidated on
``trainer.train_dataloader`` (or the ``dataloader`` you give); under DDP, the examples its
``DistributedSampler`` repeats to even out the shards are left out. The callback's checkpoint
state is the :class:`ewc.EWC` state, so ``fit(ckpt_path=...)`` restores it before training
starts.

Imports ``lightning`` (or, when only that is installed, ``pytorch_lightning``); ``import ewc``
never does.

Example:
    >>> import lightning.pytorch as pl  # doctest: +SKIP
    >>> from torch import nn
    >>> from ewc import EWC
    >>> from ewc.adapters.lightning import EWCCallback
    >>> callback = EWCCallback(EWC(ewc_lambda=100.0), criterion=nn.CrossEntropyLoss())
    >>> for task in tasks:  # doctest: +SKIP
    ...     pl.Trainer(max_epochs=5, callbacks=[callback]).fit(module, task.train_loader)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

try:
    import lightning.pytorch as pl
except ModuleNotFoundError:
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ModuleNotFoundError as error:  # pragma: no cover - exercised without lightning
        raise ModuleNotFoundError(
            'ewc.adapters.lightning needs Lightning: pip install "ewc[lightning]" '
            f"(import failed: {error})"
        ) from error

from torch.utils.data import DistributedSampler

from ewc._per_sample.batching import first_examples
from ewc._typing import Batch, Criterion, ForwardFn
from ewc.core import EWC, ConsolidationReport
from ewc.optim import applies_penalty
from ewc.views import examples_before_padding

__all__ = ["EWCCallback"]


class EWCCallback(pl.Callback):
    """Elastic Weight Consolidation for a Lightning ``Trainer``, backed by :class:`ewc.EWC`.

    Args:
        reg: the regulariser; its state is this callback's checkpoint state.
        criterion: the task loss used for the Fisher (e.g. ``nn.CrossEntropyLoss()``); it also
            selects the likelihood of ``fisher="exact"``/``"sample"``.
        dataloader: data for the Fisher at the end of each fit; default: the fit's
            ``trainer.train_dataloader``. Batches go through the module's batch transfer hooks.
        forward: ``forward(module, batch) -> (output, target)``; default
            ``(module(batch[0]), batch[1])``.
        name: distinguishes several EWC callbacks in one ``Trainer`` (their checkpoint state keys
            and logged names); Lightning refuses two with the same name in one ``Trainer``.
        log_penalty: log the penalty value each optimizer step as ``ewc_penalty`` (with a name:
            ``ewc_penalty/<name>``) through the module's ``log``.
        consolidate_on_fit_end: consolidate at the end of every ``fit``; turn off to call
            :meth:`consolidate` yourself.

    Example:
        >>> from torch import nn
        >>> from ewc import EWC
        >>> from ewc.adapters.lightning import EWCCallback
        >>> callback = EWCCallback(EWC(100.0), criterion=nn.CrossEntropyLoss(), name="backbone")
        >>> callback.state_key
        "EWCCallback{'name': 'backbone'}"
    """

    def __init__(
        self,
        reg: EWC,
        *,
        criterion: Criterion,
        dataloader: Iterable[Batch] | None = None,
        forward: ForwardFn | None = None,
        name: str | None = None,
        log_penalty: bool = True,
        consolidate_on_fit_end: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(reg, EWC):
            raise TypeError(f"Expected argument `reg` to be an ewc.EWC but got {reg!r}")
        if not callable(criterion):
            raise TypeError(f"Expected argument `criterion` to be callable but got {criterion!r}")
        if forward is not None and not callable(forward):
            raise TypeError(f"Expected argument `forward` to be callable but got {forward!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"Expected argument `name` to be a str or None but got {name!r}")
        self.reg = reg
        self.criterion = criterion
        self.dataloader = dataloader
        self.forward = forward
        self.name = name
        self.log_penalty = log_penalty
        self.consolidate_on_fit_end = consolidate_on_fit_end
        self._warned_clipping = False
        self.last_report: ConsolidationReport | None = None
        """What the latest consolidation did (examples, batches, seconds, engine paths)."""

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint; includes ``name``."""
        return self._generate_state_key(name=self.name)

    @property
    def log_name(self) -> str:
        """Name the penalty is logged under."""
        return "ewc_penalty" if self.name is None else f"ewc_penalty/{self.name}"

    # ------------------------------------------------------------------ hooks
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Add the penalty gradient (unscaled gradients, before clipping) and log the penalty.

        With several optimizers, each optimizer step adds the gradient of every regularised
        parameter of the module, not only of the parameters that optimizer steps.

        An ``ewc.optim`` optimizer of this regulariser applies the penalty in its own step: then
        nothing is added here, and the logged value is the penalty evaluated at the step (one
        more read of the state; pass ``log_penalty=False`` to skip it). Gradient clipping then
        sees the task gradient only (a warning says so once). Under manual optimization with
        such an optimizer beside a torch one, zero the gradients between their steps: the torch
        one's step adds the penalty gradient of every regularised parameter.
        """
        if applies_penalty(optimizer, self.reg):
            if trainer.gradient_clip_val and not self._warned_clipping:
                self._warned_clipping = True
                warnings.warn(
                    f"EWCCallback: the optimizer ({type(optimizer).__name__} from ewc.optim) "
                    "applies the penalty inside its step, after gradient clipping "
                    f"(gradient_clip_val={trainer.gradient_clip_val}) has seen the task gradient "
                    "only",
                    stacklevel=2,
                )
            if self.log_penalty:
                with torch.no_grad():
                    current = self.reg.penalty(pl_module)
                pl_module.log(self.log_name, current.float(), on_step=True, on_epoch=False)
            return
        value = self.reg.penalty_grad_(pl_module, return_penalty=self.log_penalty)
        if value is not None:  # the value comes from the same pass as the gradient
            pl_module.log(self.log_name, value.float(), on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Consolidate the task just fitted (skipped if the fit was interrupted)."""
        if not self.consolidate_on_fit_end or trainer.interrupted:
            return
        self.consolidate(trainer, pl_module)

    def consolidate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> ConsolidationReport:
        """Consolidate now, on ``dataloader`` or the trainer's training data.

        Batches are moved with the module's batch transfer hooks and converted to the input
        precision of the trainer (``*-true`` precisions); the Fisher pass itself runs without
        autocast, in the parameters' precision.
        """
        data = self.dataloader if self.dataloader is not None else trainer.train_dataloader
        if data is None:
            raise RuntimeError(
                "EWCCallback has no data to consolidate on: the trainer has no train_dataloader; "
                "pass `dataloader=` to EWCCallback"
            )
        if isinstance(data, (Mapping, list, tuple)):
            raise ValueError(
                f"EWCCallback cannot consolidate on several train dataloaders "
                f"({type(data).__name__}); pass the one to use as `dataloader=`"
            )
        self.last_report = self.reg.consolidate(
            pl_module,
            _on_device(trainer, _without_padding(data)),
            self.criterion,
            forward=self.forward,
        )
        return self.last_report

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The :class:`ewc.EWC` state dict (saved in checkpoints under :attr:`state_key`)."""
        return self.reg.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the :class:`ewc.EWC` state (called by ``fit(ckpt_path=...)``)."""
        self.reg.load_state_dict(state_dict)


def _without_padding(data: Iterable[Batch]) -> Iterable[Batch]:
    """The loader without the examples its ``DistributedSampler`` repeats to even out the shards.

    With ``drop_last=False`` (Lightning's default) the sampler repeats examples to even out the
    shards; :func:`ewc.views.examples_before_padding` says how many come first on this rank.
    """
    sampler = getattr(data, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return data
    own = examples_before_padding(
        len(sampler.dataset),  # type: ignore[arg-type]
        sampler.rank,
        sampler.num_replicas,
    )
    return data if own >= sampler.num_samples else first_examples(data, own)


def _on_device(trainer: pl.Trainer, data: Iterable[Batch]) -> Iterator[Batch]:
    for batch in data:
        batch = trainer.strategy.batch_to_device(batch)
        yield trainer.precision_plugin.convert_input(batch)
