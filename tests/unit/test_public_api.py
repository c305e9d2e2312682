"""Every public import path works, and the core stands alone without any training framework."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PUBLIC = {
    "ewc": [
        "EWC",
        "ConsolidationReport",
        "FisherEstimate",
        "ConsolidationError",
        "EWCError",
        "ParameterMismatchError",
        "StateDictError",
        "UnsupportedCriterionError",
        "ESTIMATORS",
        "FORMAT_VERSION",
        "fisher_sums",
        "fisher_from_sums",
        "FisherSums",
        "ConsolidatedState",
    ],
    "ewc.fisher": [
        "fisher_sums",
        "fisher_from_sums",
        "default_forward",
        "likelihood_of",
        "ESTIMATORS",
    ],
    "ewc.penalty": [
        "penalty_value",
        "add_penalty_grad_",
        "merge_separate",
        "merge_online",
        "pad_to",
    ],
    "ewc.store": ["ConsolidatedState", "FORMAT_VERSION"],
    "ewc.core": ["EWC", "ConsolidationReport", "FisherEstimate"],
    "ewc.aligned": ["AlignedState", "check_model_fits", "named_parameters", "unwrap"],
    "ewc.errors": ["EWCError", "ConsolidationError"],
    "ewc.optim": ["SGD"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_import_and_are_listed_in_all(module):
    imported = importlib.import_module(module)
    for name in PUBLIC[module]:
        assert hasattr(imported, name), f"{module}.{name}"
        assert name in imported.__all__, f"{name} missing from {module}.__all__"


def test_import_ewc_works_with_lightning_and_avalanche_blocked():
    code = (
        "import sys\n"
        "for m in ('lightning', 'pytorch_lightning', 'avalanche', 'torchvision'):\n"
        "    sys.modules[m] = None\n"
        "import ewc, ewc.adapters\n"
        "from ewc import EWC\n"
        "assert not any(k.split('.')[0] in ('lightning', 'pytorch_lightning', 'avalanche')\n"
        "               for k, v in sys.modules.items() if v is not None)\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
