"""Fixtures for the integration tests, and a test-only shim that makes torchvision importable.

Why the shim: avalanche imports torchvision, and so does lightning when torchvision is installed.
The torchvision wheel from the registry is built against a CUDA torch; with the CPU-only torch of
the test environment its compiled extension does not load, so its ``torchvision::nms`` and
``torchvision::qnms`` operators are never defined, and ``import torchvision`` fails while it
registers fake (meta) kernels for them ("operator torchvision::nms does not exist"). Defining the
two operator *schemas* (no kernels) with ``torch.library`` before anything imports torchvision lets
the import succeed. Nothing in these tests calls those operators.

The shim lives in ``tests/torchvision_shim.py`` (the distributed tests' spawned workers use it
too); it acts only when torch has no CUDA and the operators are missing, and it is never part of
the ``ewc`` package.
"""

from __future__ import annotations

from tests import torchvision_shim

torchvision_shim.apply()  # before any test module imports lightning or avalanche
