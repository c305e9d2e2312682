"""EWC for the Hugging Face ``transformers.Trainer``: a callback, and a mixin placing the penalty.

One ``train()`` is one task: build a ``Trainer`` per task (or call ``train()`` again on new data)
with the same :class:`EWCCallback`. At the end of each ``train()`` the task is consolidated on
the trainer's train dataloader (or the ``dataloader`` you give). With every checkpoint the
callback writes the EWC state next to the weights (``ewc_state.pt``), and
``train(resume_from_checkpoint=...)`` loads it back before the first step, also in a fresh
process into a fresh :class:`ewc.EWC`. PEFT models need nothing special: by default EWC
regularises the parameters that require grad, which under PEFT are the adapter's only.

**Where the penalty lands, and why a mixin.** A penalty in the loss has its gradient summed with
the task gradient by the last backward of an optimizer step, so it is added once per step
(whatever the gradient accumulation), unscaled with the rest under fp16 loss scaling, and
clipped together with the task gradient. In ``Trainer``'s loop the last micro-batch's backward is
followed directly by ``accelerator.clip_grad_norm_`` (which unscales, then clips), then
``on_pre_optimizer_step``, ``optimizer.step()`` and ``on_optimizer_step``: **no callback event
fires between the last backward and clipping**. A callback alone can only add the penalty
gradient after clipping. So the penalty is placed by :class:`EWCTrainerMixin`, which overrides
three public, documented-for-overriding ``Trainer`` methods:

* ``training_step``: after the backward of the micro-batch that ends an optimizer step
  (``accelerator.sync_gradients``), it adds the closed-form penalty gradient, multiplied by the
  loss scale when an fp16 ``GradScaler`` is active, so that unscaling leaves exactly
  ``d penalty / d theta``. Clipping then sees task + penalty gradient, and a step the scaler
  skips for inf/NaN applies neither. Under DDP the task gradient has been averaged by then;
  the penalty gradient is the same on every rank, so adding it after the average equals adding
  it before.
* ``log``: adds ``ewc_penalty`` (its mean over the steps since the last log) to the training
  logs, so it reaches ``log_history`` and every reporting integration (callbacks' ``on_log``
  runs after both).
* ``train``: tells the callbacks which checkpoint a ``resume_from_checkpoint`` resumes from.

A mixin rather than a ``Trainer`` subclass alone, so that it composes with ``Trainer``
subclasses (``class EWCSFTTrainer(EWCTrainerMixin, SFTTrainer): ...``); :class:`EWCTrainer` is
the mixin on ``transformers.Trainer``. With a plain ``Trainer`` the callback still works: it
registers the penalty on the optimizer (:func:`ewc.adapters.loop.attach`: once per real step,
after unscaling, never on a skipped step, but *after* clipping, with a warning when
``max_grad_norm > 0``), logs the current penalty in ``on_log`` (seen by the callbacks after it,
not by ``log_history``), and on resume reads the state from
``<output_dir>/checkpoint-<global_step>``.

DeepSpeed, which steps and clips inside its engine, is not supported.

Imports ``transformers`` lazily (``import ewc`` never does).

Example:
    >>> from ewc import EWC  # doctest: +SKIP
    >>> from ewc.adapters.transformers import EWCCallback, EWCTrainer
    >>> callback = EWCCallback(EWC(ewc_lambda=100.0))
    >>> for task in tasks:
    ...     EWCTrainer(model=model, args=args, train_dataset=task, callbacks=[callback]).train()
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

try:
    from transformers import Trainer, TrainerCallback
except ModuleNotFoundError as error:  # pragma: no cover - exercised without transformers
    raise ModuleNotFoundError(
        'ewc.adapters.transformers needs transformers: pip install "ewc[transformers]" '
        f"(import failed: {error})"
    ) from error

from ewc._per_sample.batching import first_examples
from ewc._typing import Batch, Criterion, ForwardFn
from ewc.adapters.loop import PenaltyHookHandle, attach
from ewc.core import EWC, ConsolidationReport
from ewc.optim import applies_penalty
from ewc.views import accelerate_shard_examples, examples_before_padding

__all__ = ["STATE_FILE", "EWCCallback", "EWCTrainer", "EWCTrainerMixin"]

STATE_FILE = "ewc_state.pt"
"""File name of the EWC state inside a checkpoint folder (``<name>_ewc_state.pt`` with a name)."""


class EWCCallback(TrainerCallback):
    """Elastic Weight Consolidation for ``transformers.Trainer``, backed by :class:`ewc.EWC`.

    Use it with a trainer built on :class:`EWCTrainerMixin` (e.g. :class:`EWCTrainer`) to put
    the penalty inside gradient clipping; see the module docstring for what a plain ``Trainer``
    does.

    Args:
        reg: the regulariser; its state is saved with every checkpoint.
        forward: ``forward(model, batch) -> (output, target)`` for the Fisher pass; None: the
            core's default, which for Hugging Face models reads the dict batches and
            ``ModelOutput`` (causal LM shifted, ``-100`` ignored).
        criterion: the task loss for the Fisher; None: the core picks it from the model.
        dataloader: data for the Fisher at the end of each ``train()``; default: the trainer's
            train dataloader (under several processes each rank reads its shard, without the
            examples Accelerate repeats to even out the shards, and the sums are pooled).
        name: distinguishes several EWC callbacks in one trainer (logged as
            ``ewc_penalty/<name>``, saved as ``<name>_ewc_state.pt``).
        log_penalty: log ``ewc_penalty`` with the training logs.
        consolidate_on_train_end: consolidate at the end of every ``train()``; turn off to call
            :meth:`consolidate` yourself.

    Example:
        >>> from ewc import EWC
        >>> from ewc.adapters.transformers import EWCCallback
        >>> EWCCallback(EWC(ewc_lambda=10.0), name="lm").state_file
        'lm_ewc_state.pt'
    """

    def __init__(
        self,
        reg: EWC,
        *,
        forward: ForwardFn | None = None,
        criterion: Criterion | None = None,
        dataloader: Iterable[Batch] | None = None,
        name: str | None = None,
        log_penalty: bool = True,
        consolidate_on_train_end: bool = True,
    ) -> None:
        if not isinstance(reg, EWC):
            raise TypeError(f"Expected argument `reg` to be an ewc.EWC but got {reg!r}")
        if forward is not None and not callable(forward):
            raise TypeError(f"Expected argument `forward` to be callable but got {forward!r}")
        if criterion is not None and not callable(criterion):
            raise TypeError(f"Expected argument `criterion` to be callable but got {criterion!r}")
        if name is not None and (not isinstance(name, str) or not name or os.sep in name):
            raise ValueError(
                f"Expected argument `name` to be None or a non-empty file-name-safe str but got "
                f"{name!r}"
            )
        self.reg = reg
        self.forward = forward
        self.criterion = criterion
        self.dataloader = dataloader
        self.name = name
        self.log_penalty = log_penalty
        self.consolidate_on_train_end = consolidate_on_train_end
        self.last_report: ConsolidationReport | None = None
        """What the latest consolidation did (examples, batches, seconds, engine paths)."""
        self.resume_from: str | None = None
        """Checkpoint folder the next ``train()`` resumes from (set by :class:`EWCTrainerMixin`)."""
        self.placed_by_trainer = False
        """True while an :class:`EWCTrainerMixin` trainer applies the penalty."""
        self.penalty_in_optimizer = False
        """True during a ``train()`` whose optimizer applies this regulariser's penalty in its
        own step (``ewc.optim``): the callback then adds no penalty gradient."""
        self._handle: PenaltyHookHandle | None = None
        self._penalty_sum = 0.0
        self._penalty_steps = 0

    @property
    def log_name(self) -> str:
        """Name the penalty is logged under."""
        return "ewc_penalty" if self.name is None else f"ewc_penalty/{self.name}"

    @property
    def state_file(self) -> str:
        """File name of this callback's EWC state inside a checkpoint folder."""
        return STATE_FILE if self.name is None else f"{self.name}_{STATE_FILE}"

    # ------------------------------------------------------------------ the penalty
    def add_penalty_grad(self, model: nn.Module, *, loss_scale: float = 1.0) -> None:
        """Add ``loss_scale * d penalty / d theta`` to the gradients (what the mixin calls once
        per optimizer step, after the last backward; ``loss_scale`` is the fp16 loss scale).
        When the optimizer applies the penalty (:attr:`penalty_in_optimizer`), nothing is added;
        with ``log_penalty`` the penalty is evaluated here (one more read of the state) so that
        the logged mean covers the same steps, before each one, as otherwise."""
        if self.penalty_in_optimizer:
            if self.log_penalty:
                with torch.no_grad():
                    self._penalty_sum += float(self.reg.penalty(model))
                self._penalty_steps += 1
            return
        value = _penalty_grad(self.reg, model, loss_scale, self.log_penalty)
        if value is not None:
            self._penalty_sum += float(value)
            self._penalty_steps += 1

    def pop_logged_penalty(self) -> float | None:
        """Mean penalty over the optimizer steps since the last call (None if there were none)."""
        if self._penalty_steps == 0:
            return None
        mean = self._penalty_sum / self._penalty_steps
        self._penalty_sum, self._penalty_steps = 0.0, 0
        return mean

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Restore the EWC state when resuming; without the mixin, hook the penalty on the
        optimizer. When the Trainer's optimizer is an ``ewc.optim`` optimizer of this
        regulariser, it applies the penalty itself: the callback then adds nothing (and warns
        if gradients are clipped, since clipping sees the task gradient only)."""
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        self.penalty_in_optimizer = optimizer is not None and applies_penalty(optimizer, self.reg)
        resume_from = self.resume_from
        self.resume_from = None
        if resume_from is None and state.global_step > 0:  # resumed by a plain Trainer
            resume_from = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        self._penalty_sum, self._penalty_steps = 0.0, 0
        clipping = bool(getattr(args, "max_grad_norm", 0)) and args.max_grad_norm > 0
        if self.penalty_in_optimizer:  # ewc.optim applies it in its step: nothing to hook
            if clipping:
                warnings.warn(
                    f"EWCCallback: the Trainer's optimizer ({type(optimizer).__name__} from "
                    "ewc.optim) applies the penalty inside its step, after gradient clipping "
                    f"(max_grad_norm={args.max_grad_norm}) has seen the task gradient only",
                    stacklevel=2,
                )
            return
        if self.placed_by_trainer:
            return
        if model is None or optimizer is None:
            raise RuntimeError(
                "EWCCallback got no model or optimizer from the Trainer at on_train_begin"
            )
        if clipping:
            warnings.warn(
                "EWCCallback in a plain transformers.Trainer adds the penalty gradient after "
                f"gradient clipping (max_grad_norm={args.max_grad_norm}); build the trainer with "
                "ewc.adapters.transformers.EWCTrainerMixin (or use EWCTrainer) to clip it with "
                "the task gradient",
                stacklevel=2,
            )
        self._handle = attach(self.reg, model, optimizer)

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Without the mixin: add the current penalty to training logs (for later callbacks)."""
        logs, model = kwargs.get("logs"), kwargs.get("model")
        if self.placed_by_trainer or not self.log_penalty or logs is None or model is None:
            return
        if "loss" in logs and self.log_name not in logs:
            with torch.no_grad():
                logs[self.log_name] = float(self.reg.penalty(model))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the EWC state into the checkpoint folder just saved (main process only)."""
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(self.reg.state_dict(), os.path.join(folder, self.state_file))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Detach the optimizer hook, then consolidate the task just trained."""
        self.penalty_in_optimizer = False
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.consolidate_on_train_end:
            self.consolidate(kwargs.get("model"), kwargs.get("train_dataloader"))

    # ------------------------------------------------------------------ consolidation, state
    def consolidate(
        self, model: nn.Module | None, train_dataloader: Iterable[Batch] | None = None
    ) -> ConsolidationReport:
        """Consolidate now, on ``dataloader`` or else ``train_dataloader``.

        ``forward``/``criterion`` are passed through as given (None: the core's defaults).
        """
        if model is None:
            raise RuntimeError("EWCCallback.consolidate needs the model; got None")
        data = self.dataloader if self.dataloader is not None else train_dataloader
        if data is None:
            raise RuntimeError(
                "EWCCallback has no data to consolidate on: the trainer has no train dataloader; "
                "pass `dataloader=` to EWCCallback"
            )
        self.last_report = self.reg.consolidate(
            model,
            _without_padding(data) if self.dataloader is None else data,
            self.criterion,  # None: resolved by the core
            forward=self.forward,
        )
        return self.last_report

    def load_checkpoint(self, folder: str) -> None:
        """Load the EWC state saved in checkpoint ``folder`` into :attr:`reg`."""
        path = os.path.join(folder, self.state_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resuming from checkpoint {folder!r}, but it holds no EWC state ({path!r} is "
                "missing); was it saved by a Trainer with this EWCCallback?"
            )
        self.reg.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


class EWCTrainerMixin:
    """Puts the EWC penalty where a penalty in the loss would land, for every
    :class:`EWCCallback` of the trainer: once per optimizer step, on the scaled gradients
    before unscaling, before clipping. Put it first: ``class T(EWCTrainerMixin, Trainer)``.

    See the module docstring for why this needs a mixin and not only a callback.
    """

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; the callbacks learn which checkpoint is resumed from."""
        folder = resume_from_checkpoint
        if isinstance(folder, bool):
            folder = _last_checkpoint(self.args.output_dir) if folder else None  # type: ignore[attr-defined]
        callbacks = self._ewc_callbacks()
        for callback in callbacks:
            callback.resume_from = folder
            callback.placed_by_trainer = True
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]
        finally:
            for callback in callbacks:
                callback.placed_by_trainer = False
                callback.resume_from = None

    def training_step(self, model: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        """``Trainer.training_step``; after the backward that ends an optimizer step, add the
        penalty gradient of every :class:`EWCCallback`."""
        loss: Tensor = super().training_step(model, *args, **kwargs)  # type: ignore[misc]
        accelerator = self.accelerator  # type: ignore[attr-defined]
        if accelerator.sync_gradients:
            scaler = getattr(accelerator, "scaler", None)
            scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
            for callback in self._ewc_callbacks():
                callback.add_penalty_grad(model, loss_scale=scale)
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log``; training logs get ``ewc_penalty`` (mean since the last log)."""
        if "loss" in logs:
            for callback in self._ewc_callbacks():
                value = callback.pop_logged_penalty() if callback.log_penalty else None
                if value is not None:
                    logs[callback.log_name] = value
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def _ewc_callbacks(self) -> list[EWCCallback]:
        handler = self.callback_handler  # type: ignore[attr-defined]
        return [cb for cb in handler.callbacks if isinstance(cb, EWCCallback)]


class EWCTrainer(EWCTrainerMixin, Trainer):
    """``transformers.Trainer`` with :class:`EWCTrainerMixin`."""


def _penalty_grad(reg: EWC, model: nn.Module, scale: float, return_penalty: bool) -> Tensor | None:
    """``reg.penalty_grad_`` with the gradient multiplied by ``scale`` (the fp16 loss scale);
    the value returned is the unscaled penalty."""
    return reg.penalty_grad_(model, return_penalty=return_penalty, scale=scale)


def _last_checkpoint(output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


def _without_padding(data: Iterable[Batch]) -> Iterable[Batch]:
    """The trainer's loader without the examples Accelerate repeats to even out the shards.

    Under several processes Accelerate deals whole batches round-robin
    (``BatchSamplerShard``) and, with ``even_batches``, fills the last ones with the first
    examples again; :func:`ewc.views.accelerate_shard_examples` says how many are this rank's
    own. A ``DistributedSampler`` is cut with :func:`ewc.views.examples_before_padding`.
    """
    shard = getattr(data, "batch_sampler", None)
    inner = getattr(shard, "batch_sampler", None)
    if shard is not None and hasattr(shard, "num_processes") and inner is not None:
        if shard.num_processes <= 1 or not getattr(shard, "even_batches", True):
            return data
        if getattr(shard, "split_batches", False):
            raise ValueError(
                "EWCCallback cannot tell Accelerate's padding apart with split_batches=True; pass "
                "the data to consolidate on as `dataloader=`"
            )
        own = accelerate_shard_examples(
            len(inner.sampler),
            inner.batch_size,
            shard.process_index,
            shard.num_processes,
            drop_last=inner.drop_last,
        )
        return first_examples(data, own)
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler) and not sampler.drop_last:
        own = examples_before_padding(
            len(sampler.dataset),  # type: ignore[arg-type]
            sampler.rank,
            sampler.num_replicas,
        )
        return first_examples(data, own)
    return data
