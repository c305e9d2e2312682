"""Test-only shim: make ``import torchvision`` work with the CPU-only torch of the test environment.

Lightning and Avalanche import torchvision. The torchvision wheel here is built for a CUDA torch,
so with the CPU-only torch its compiled extension does not load and its ``torchvision::nms`` /
``torchvision::qnms`` operators are never defined; torchvision's import then fails while it
registers fake kernels for them ("operator torchvision::nms does not exist"). Defining the two
operator *schemas* (no kernels) before the import fixes that; nothing here calls them.

``tests/integration/conftest.py`` calls :func:`apply` for the test process; spawned or
subprocess-launched workers (``tests/distributed``) start from scratch, so they call it before
importing lightning or avalanche. It only acts when torch has no CUDA and the operators are
missing. Test-only: never part of the ``ewc`` package.
"""

from __future__ import annotations

import torch

__all__ = ["apply"]

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None  # kept alive: a collected Library drops its ops


def _defined(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def apply() -> None:
    """Define the missing torchvision operator schemas (once per process; no-op with CUDA)."""
    global _library
    if _library is not None or torch.cuda.is_available():
        return
    missing = [name for name in _SCHEMAS if not _defined(name)]
    if missing:
        _library = torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            _library.define(_SCHEMAS[name])
