"""Default forward and criterion for Hugging Face ``transformers`` models, duck-typed.

Pure torch: nothing here imports ``transformers``. A model counts as a Hugging Face model when it
has a ``config`` with a ``model_type`` (``PreTrainedModel``, and PEFT wrappers that forward
attribute access to it); a batch is a Hugging Face batch when it is a ``Mapping`` (a ``dict`` or
a ``BatchEncoding``).

:func:`forward` (used by :func:`ewc.fisher.default_forward` for Mapping batches and for outputs
with ``.logits``) returns ``(logits, labels)``:

=========================  ===================  ==================  ============================
task (class name)          logits               labels              notes
=========================  ===================  ==================  ============================
``*ForSequenceClassif.``   ``(n, C)``           ``(n,)``            regression: labels reshaped
                                                                    to the logits' ``(n, 1)``
``*ForTokenClassif.``      ``(n, L, C)``        ``(n, L)``          ``-100`` ignored
``*ForMaskedLM``           ``(n, L, V)``        ``(n, L)``          ``-100`` (unmasked) ignored
``*ForCausalLM``,          ``(n, L-1, V)``      ``(n, L-1)``        the shift: position ``t``
``*LMHeadModel``                                                    predicts token ``t+1``
=========================  ===================  ==================  ============================

The model is called with every key of the batch except ``labels`` (so it computes no loss of its
own). A causal LM batch without ``labels`` uses ``input_ids`` as labels, with positions whose
``attention_mask`` is 0 set to ``-100``.

:func:`default_criterion` gives the criterion from the model's task: ``nn.MSELoss()`` for
regression (``problem_type="regression"``, or a sequence classifier with ``num_labels=1`` and no
``problem_type``), ``nn.BCEWithLogitsLoss()`` for ``problem_type="multi_label_classification"``,
and ``nn.CrossEntropyLoss(ignore_index=-100)`` otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ewc.errors import ConsolidationError

__all__ = [
    "IGNORE_INDEX",
    "LABEL_KEYS",
    "aligned",
    "default_criterion",
    "forward",
    "is_hf_model",
    "labels_of",
    "logits_of",
    "task_of",
]

IGNORE_INDEX = -100
"""The label Hugging Face uses for positions without a loss (padding, prompt, unmasked)."""

LABEL_KEYS = ("labels", "label", "label_ids")
"""Batch keys read as labels (in this order); none of them is passed to the model."""


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` looks like a ``transformers`` model: a ``config`` with a ``model_type``."""
    config = getattr(model, "config", None)
    return config is not None and isinstance(getattr(config, "model_type", None), str)


def _base_model(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)  # PEFT
    if callable(get_base):
        try:
            return get_base()
        except Exception:  # not a PEFT model after all
            return model
    return model


def task_of(model: Any) -> str:
    """``"causal-lm"``, ``"masked-lm"``, ``"token-classification"``, ``"sequence-classification"``,
    ``"seq2seq"`` or ``"other"``, from the class name (and ``can_generate`` as a last resort)."""
    name = type(_base_model(model)).__name__
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) or "ForConditionalGeneration" in name:
        return "seq2seq"
    if "ForCausalLM" in name or name.endswith("LMHeadModel"):
        return "causal-lm"
    if "ForMaskedLM" in name:
        return "masked-lm"
    if "ForTokenClassification" in name:
        return "token-classification"
    if "Classification" in name or "ForMultipleChoice" in name:
        return "sequence-classification"
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate):
        try:
            if can_generate():
                return "causal-lm"
        except Exception:  # a model whose can_generate needs more than self
            pass
    return "other"


def logits_of(output: Any) -> Any:
    """The logits of a model output: a tensor itself, ``output.logits`` (``ModelOutput``), or
    ``output["logits"]``; anything else unchanged."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    return output


def labels_of(batch: Mapping[str, Any]) -> Any:
    """The first of :data:`LABEL_KEYS` present in the batch, or None."""
    for key in LABEL_KEYS:
        if key in batch:
            return batch[key]
    return None


def aligned(model: Any, logits: Any, labels: Any, batch: Any = None) -> tuple[Any, Any]:
    """``(logits, labels)`` as the estimators read them for the model's task: the causal shift,
    labels from ``input_ids`` for a causal LM batch without labels, regression labels reshaped."""
    task = task_of(model)
    if not isinstance(logits, Tensor):
        return logits, labels
    if task == "causal-lm" and logits.dim() >= 3:
        if labels is None and isinstance(batch, Mapping) and "input_ids" in batch:
            labels = batch["input_ids"]
            mask = batch.get("attention_mask")
            if isinstance(mask, Tensor) and mask.shape == labels.shape:
                labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        logits = logits[:, :-1, :]
        if isinstance(labels, Tensor) and labels.dim() >= 2:
            labels = labels[:, 1:]
        return logits, labels
    if (
        isinstance(labels, Tensor)
        and labels.is_floating_point()
        and labels.shape != logits.shape
        and labels.numel() == logits.numel()
    ):
        labels = labels.reshape(logits.shape)  # regression: (n,) labels for (n, 1) logits
    return logits, labels


def forward(model: nn.Module, batch: Mapping[str, Any]) -> tuple[Any, Any]:
    """``model(**inputs)`` on a Mapping batch -> ``(logits, labels)`` (see the module docstring).

    Raises:
        ConsolidationError: the batch is not a Mapping.
    """
    if not isinstance(batch, Mapping):
        raise ConsolidationError(
            f"the Hugging Face default forward needs a Mapping batch (dict or BatchEncoding); got "
            f"{type(batch).__name__}"
        )
    inputs = {key: value for key, value in batch.items() if key not in LABEL_KEYS}
    output = model(**inputs)
    return aligned(model, logits_of(output), labels_of(batch), batch)


def default_criterion(model: Any) -> nn.Module | None:
    """The criterion of the model's task, or None when ``model`` is not a Hugging Face model."""
    if not is_hf_model(model):
        return None
    config = model.config
    problem = getattr(config, "problem_type", None)
    if problem == "regression":
        return nn.MSELoss()
    if problem == "multi_label_classification":
        return nn.BCEWithLogitsLoss()
    if (
        problem is None
        and task_of(model) == "sequence-classification"
        and getattr(config, "num_labels", None) == 1
    ):
        return nn.MSELoss()
    return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
