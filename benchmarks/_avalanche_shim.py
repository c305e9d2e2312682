"""Import Avalanche's ``EWCPlugin`` in a CPU-only environment, or report why it is unavailable.

Avalanche imports torchvision, whose compiled operators (``torchvision::nms``) fail to load when
torchvision was built against another torch than the CPU build installed here. Registering the
two operator *schemas* ourselves lets ``import torchvision`` succeed; the benchmarks never call
those operators. This lives in ``benchmarks/`` only: the ``ewc`` package never imports Avalanche.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch

__all__ = ["load_avalanche_ewc_plugin"]

_SCHEMAS = {
    "torchvision::nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "torchvision::qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _define_torchvision_schemas() -> None:
    if torch.cuda.is_available():
        return
    for name, schema in _SCHEMAS.items():
        # already defined (by torchvision itself or an earlier call): nothing to do
        with contextlib.suppress(Exception):
            torch.library.define(name, schema)


def load_avalanche_ewc_plugin() -> tuple[Any | None, str]:
    """``(EWCPlugin class, "")`` or ``(None, reason)`` when Avalanche cannot be imported."""
    _define_torchvision_schemas()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation and optional-solver chatter
            from avalanche.training.plugins import EWCPlugin
    except Exception as error:  # ImportError, or torchvision failing to load its ops
        return None, f"Avalanche unavailable ({type(error).__name__}: {error})"
    return EWCPlugin, ""
