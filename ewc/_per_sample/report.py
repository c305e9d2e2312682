"""One warning per consolidation for parameters that left the per-layer paths.

The engine reports a path per parameter for every batch; the estimator collects them over the
pass and calls :func:`warn_fallbacks` once. Parameters on ``"vmap"`` (the whole model vectorised
over examples) or ``"loop"`` (one forward and backward per example) are grouped by the module
that holds them, with their share of the parameter entries and the reason they left the rules.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from torch import Tensor

from ewc.errors import FallbackWarning

__all__ = ["FALLBACK_PATHS", "fallback_message", "warn_fallbacks"]

FALLBACK_PATHS = ("vmap", "loop")


def fallback_message(
    paths: Mapping[str, str], params: Mapping[str, Tensor], reasons: Mapping[str, str]
) -> str | None:
    """The warning text for the parameters on a fallback path, or None when there are none."""
    fallen = [name for name in params if paths.get(name) in FALLBACK_PATHS]
    if not fallen:
        return None
    total = sum(p.numel() for p in params.values()) or 1
    groups: dict[tuple[str, str], list[str]] = {}
    for name in fallen:
        module = name.rpartition(".")[0] or "<model>"
        groups.setdefault((paths[name], module), []).append(name)
    share = sum(params[name].numel() for name in fallen) / total
    parts = []
    for (path, module), names in groups.items():
        entries = sum(params[name].numel() for name in names)
        locals_ = ", ".join(name.rpartition(".")[2] for name in names)
        reason = next((reasons[name] for name in names if name in reasons), "no rule applies")
        parts.append(f"{module} ({locals_}; {entries / total:.1%}) on {path!r}: {reason}")
    return (
        f"ewc: {len(fallen)} of {len(params)} parameter tensors ({share:.1%} of the "
        "parameter entries) left the per-layer paths of the per-example Fisher for the slower "
        "whole-model paths: " + "; ".join(parts) + ". The result is exact; `report.paths` has "
        "every parameter's path, and a layer rule (`ewc.register_rule`) brings a module back."
    )


def warn_fallbacks(
    paths: Mapping[str, str],
    params: Mapping[str, Tensor],
    reasons: Mapping[str, str],
    *,
    stacklevel: int = 4,
) -> None:
    """Issue one :class:`~ewc.errors.FallbackWarning` when some parameters took ``vmap`` or the
    loop (see :func:`fallback_message`)."""
    message = fallback_message(paths, params, reasons)
    if message is not None:
        warnings.warn(message, FallbackWarning, stacklevel=stacklevel)
