"""Fixtures for the integration tests, and a test-only shim that makes torchvision importable.

Why the shim: avalanche imports torchvision, and so does lightning when torchvision is installed.
The torchvision wheel from the registry is built against a CUDA torch; with the CPU-only torch of
the test environment its compiled extension does not load, so its ``torchvision::nms`` and
``torchvision::qnms`` operators are never defined, and ``import torchvision`` fails while it
registers fake (meta) kernels for them ("operator torchvision::nms does not exist"). Defining the
two operator *schemas* (no kernels) with ``torch.library`` before anything imports torchvision lets
the import succeed. Nothing in these tests calls those operators.

The shim is applied only when torch has no CUDA and the operators are missing, and only here: it is
never part of the ``ewc`` package.
"""

from __future__ import annotations

import torch

_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _operator_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _define_missing_torchvision_schemas() -> torch.library.Library | None:
    if torch.cuda.is_available():
        return None
    missing = [name for name in _TORCHVISION_SCHEMAS if not _operator_exists(name)]
    if not missing:
        return None
    library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        library.define(_TORCHVISION_SCHEMAS[name])
    return library


# Kept referenced for the whole session: a garbage-collected Library removes its definitions.
_TORCHVISION_SHIM = _define_missing_torchvision_schemas()
