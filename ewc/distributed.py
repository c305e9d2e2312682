"""EWC under ``torch.distributed``: data-parallel consolidation, DDP wrappers and FSDP2 shards.

Everything here is communication and bookkeeping; the maths stays in :mod:`ewc.fisher` and
:mod:`ewc.penalty`. Only ``torch.distributed`` collectives are used (``all_reduce``), never
point-to-point code of our own.

**Data-parallel consolidation** (DDP, or any process group whose ranks see different data):
each rank accumulates its own squared-gradient sums ``S_r`` and example count ``n_r`` (batch
count for ``fisher="batched"``); one ``all_reduce(SUM)`` of the sums and one of the counts give

    F = (sum_r S_r) / (sum_r n_r)

on every rank: the Fisher of one process over the union of the shards, also for uneven shards,
never an average of per-rank averages. Cost: one int64 all-reduce of 4 numbers plus one
all-reduce of P floats per dtype (a flattened copy: O(P) extra memory during the call).

**DDP wrappers** (``DistributedDataParallel``, ``DataParallel``) are unwrapped: the Fisher pass
runs on ``model.module`` so no gradient all-reduce happens in its backward passes, and state keys
are the unwrapped model's parameter names (no ``module.`` prefix), so a state saved from a plain
model loads into a wrapped one and vice versa.

**FSDP2** (``torch.distributed.fsdp.fully_shard``; parameters are ``DTensor`` shards): the
consolidated quadratic is sharded like the parameters. Each rank stores its local shard of ``A``
and ``m`` and its part ``r_r`` of the constant, so that
``P = ewc_lambda * sum_r (sum A_r (theta_r - m_r)^2 + r_r)``. The Fisher pass all-gathers every
FSDP2 module once (``unshard()``), runs the ordinary per-example engine on the full parameters
with resharding switched off (so the pass itself needs no collective and ranks may see different
numbers of batches), reshards, all-reduces the full sums and keeps the local shard. Memory
trade-off: during consolidation each rank holds the full parameters and the full Fisher sums
(2 P plus the engine's workspace), as in a full-state-dict gather; afterwards only O(P / world)
stays. ``penalty_grad_`` is shard-local (no communication); ``penalty`` all-reduces one scalar.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ewc.errors import ConsolidationError, ParameterMismatchError
from ewc.fisher import FisherSums

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "FisherPass",
    "all_reduce_fisher_sums",
    "checked_local",
    "dtensors_in_use",
    "fisher_pass",
    "global_penalty",
    "is_distributed",
    "is_sharded",
    "local_tensor",
    "shard_groups",
    "sum_over_groups",
    "unwrap",
]

Reduce = Callable[[FisherSums], FisherSums]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (nested too).

    FSDP2 needs no unwrapping: ``fully_shard`` keeps the module and its parameter names.
    """
    wrappers: tuple[type[nn.Module], ...] = (nn.DataParallel,)
    if dist.is_available():
        from torch.nn.parallel import DistributedDataParallel

        wrappers = (*wrappers, DistributedDataParallel)
    while isinstance(model, wrappers):
        inner = model.module
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _dtensor_class() -> type | None:
    # A DTensor can only exist once torch.distributed.tensor is imported; checking sys.modules
    # keeps `import ewc` from importing it.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def dtensors_in_use() -> bool:
    """Whether any ``DTensor`` can exist in this process (``torch.distributed.tensor`` is
    imported): a one-lookup test that lets hot paths skip per-tensor :func:`is_sharded` checks."""
    return _dtensor_class() is not None


def is_sharded(tensor: Any) -> bool:
    """True for a ``DTensor`` (an FSDP2 parameter or gradient)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's local shard of a ``DTensor``; any other tensor unchanged.

    Under ``torch.no_grad`` the result shares storage with the DTensor (in-place updates of a
    gradient's local shard update the gradient); with grad enabled it is differentiable, and the
    gradient flows back to the DTensor's local shard.
    """
    return tensor.to_local() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def checked_local(name: str, importance: Tensor, param: Tensor) -> Tensor:
    """``param`` itself, or for a sharded parameter its local shard after checking that it has
    exactly the stored shard's shape (a sharded parameter cannot grow: its shards would move)."""
    if not is_sharded(param):
        return param
    with torch.no_grad():
        local = local_tensor(param)
    if local.shape != importance.shape:
        raise ParameterMismatchError(
            f"parameter {name!r} is sharded (DTensor of global shape {tuple(param.shape)}) with "
            f"a local shard of shape {tuple(local.shape)}, but its consolidated shard has shape "
            f"{tuple(importance.shape)}; under FSDP2 a consolidated parameter must keep its shape "
            "and sharding (same mesh and world size as at consolidation)"
        )
    return local


# ---------------------------------------------------------------------- consolidation
def all_reduce_fisher_sums(
    sums: FisherSums, process_group: ProcessGroup | None = None, *, failed: bool = False
) -> FisherSums:
    """Sum ``sums.sums`` and the counts over ``process_group`` (default: the world).

    Collective: every rank of the group must call it. The first collective carries a failure
    flag, so a rank whose Fisher pass raised calls this with ``failed=True`` and every rank then
    raises :class:`ConsolidationError` instead of waiting forever for the failed one.

    Cost: one all-reduce of 4 int64 and one of P values per dtype (flattened, O(P) copy).
    """
    tensors = list(sums.sums.values())
    device = tensors[0].device if tensors else torch.device("cpu")
    status = torch.tensor(
        [int(failed), sums.count, sums.examples, sums.batches], dtype=torch.int64, device=device
    )
    dist.all_reduce(status, group=process_group)
    failures, count, examples, batches = (int(v) for v in status.tolist())
    if failures:
        raise ConsolidationError(
            f"consolidation failed on {failures} of {dist.get_world_size(process_group)} ranks; "
            "the consolidated state is unchanged on every rank"
        )
    reduced: dict[str, Tensor] = {}
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        names = [name for name, t in sums.sums.items() if t.dtype == dtype]
        flat = torch.cat([sums.sums[name].reshape(-1) for name in names])
        dist.all_reduce(flat, group=process_group)
        for name, part in zip(names, flat.split([sums.sums[n].numel() for n in names])):
            reduced[name] = part.view_as(sums.sums[name])
    return FisherSums(
        {name: reduced[name] for name in sums.sums}, count, examples, batches, dict(sums.paths)
    )


def _signal_failure(device: torch.device, process_group: ProcessGroup | None) -> None:
    status = torch.tensor([1, 0, 0, 0], dtype=torch.int64, device=device)
    dist.all_reduce(status, group=process_group)


@dataclass
class FisherPass:
    """What :func:`fisher_pass` hands to the consolidation.

    Attributes:
        params: the tensors to differentiate in the Fisher pass, by name (full, unsharded
            parameters under FSDP2; the given ones otherwise).
        reduce: turns this rank's sums into the sums to divide: all-reduced over the group when
            distributed (or the caller's ``reduce``), then cut to the local shard for sharded
            parameters.
    """

    params: dict[str, Tensor]
    reduce: Reduce


@contextmanager
def fisher_pass(
    model: nn.Module,
    params: Mapping[str, Tensor],
    process_group: ProcessGroup | None = None,
    *,
    reduce: Reduce | None = None,
) -> Iterator[FisherPass]:
    """Context for one Fisher pass of ``consolidate`` on any engine.

    Not distributed and no DTensor: the parameters as given and an identity (or the caller's)
    ``reduce``. Distributed: ``reduce`` all-reduces sums and counts over ``process_group``; if the
    pass raises on one rank, that rank tells the others (see :func:`all_reduce_fisher_sums`), so
    every rank raises and keeps its previous state. With FSDP2 parameters (DTensors), every
    FSDP2 module is unsharded for the pass (one all-gather each) and resharded afterwards, and
    ``reduce`` keeps this rank's shard of the sums. A caller's ``reduce`` replaces the built-in
    all-reduce (the caller then owns any communication and its failure handling).
    """
    sharded = {name: p for name, p in params.items() if is_sharded(p)}
    synchronise = reduce is None and is_distributed()
    device = next(iter(params.values())).device if params else torch.device("cpu")

    def reduce_sums(sums: FisherSums) -> FisherSums:
        if reduce is not None:
            sums = reduce(sums)
        elif synchronise:
            sums = all_reduce_fisher_sums(sums, process_group)
        if sharded:
            sums.sums = _keep_local_shards(sums.sums, sharded)
        return sums

    try:
        with _unsharded(model, sharded):
            full = dict(model.named_parameters()) if sharded else {}
            yield FisherPass({name: full.get(name, p) for name, p in params.items()}, reduce_sums)
    except Exception:
        if synchronise:
            _signal_failure(device, process_group)
        raise


def _keep_local_shards(
    sums: Mapping[str, Tensor], sharded: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Cut each full sum to this rank's shard, laid out exactly like the DTensor parameter."""
    from torch.distributed.tensor import distribute_tensor

    kept = dict(sums)
    for name, param in sharded.items():
        spec: Any = param
        shard = distribute_tensor(
            sums[name], spec.device_mesh, spec.placements, src_data_rank=None
        ).to_local()
        kept[name] = shard.clone()  # own storage: the full sum can be freed
    return kept


@contextmanager
def _unsharded(model: nn.Module, sharded: Mapping[str, Tensor]) -> Iterator[None]:
    """All-gather every FSDP2 module of ``model`` and keep it unsharded until exit."""
    if not sharded:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        raise ConsolidationError(
            f"parameters {sorted(sharded)} are DTensors but the model has no FSDP2 module; only "
            "FSDP2 (torch.distributed.fsdp.fully_shard) sharding is supported by consolidate"
        )
    saved = [_reshard_settings(m) for m in modules]
    try:
        for module in modules:
            module.unshard()
            module.set_reshard_after_forward(False, recurse=False)
            module.set_reshard_after_backward(False, recurse=False)
        yield
    finally:
        for module, settings in zip(modules, saved):
            module.reshard()
            _restore_reshard_settings(module, settings)


def _reshard_settings(module: Any) -> tuple[Any, list[tuple[Any, Any]]]:
    # FSDP2 has setters but no getters for these flags; read them so the user's choice (and the
    # root's automatic "no reshard after forward") is restored exactly after the pass.
    state = module._get_fsdp_state()
    groups = [
        (group.post_forward_mesh_info, group.reshard_after_backward)
        for group in state._fsdp_param_groups
    ]
    return getattr(state, "_auto_reshard_after_forward", None), groups


def _restore_reshard_settings(module: Any, settings: tuple[Any, list[tuple[Any, Any]]]) -> None:
    auto, groups = settings
    state = module._get_fsdp_state()
    if hasattr(state, "_auto_reshard_after_forward"):
        state._auto_reshard_after_forward = auto
    for group, (mesh_info, after_backward) in zip(state._fsdp_param_groups, groups):
        group.post_forward_mesh_info = mesh_info
        group.reshard_after_backward = after_backward


# ---------------------------------------------------------------------- penalty
def shard_groups(params: Sequence[Tensor]) -> list[Any]:
    """Process groups of the mesh dimensions the DTensor ``params`` are sharded over (all must
    agree): what a penalty evaluated on local shards is summed over."""
    layouts = set()
    for param in params:
        spec: Any = param
        mesh = spec.device_mesh
        dims = tuple(i for i, placement in enumerate(spec.placements) if placement.is_shard())
        layouts.add((mesh, dims))
    if len(layouts) != 1:
        raise ParameterMismatchError(
            "the consolidated parameters are sharded over different meshes or mesh dimensions; "
            "ewc supports one FSDP2 mesh per model"
        )
    mesh, dims = layouts.pop()
    return [mesh.get_group(mesh_dim=dim) for dim in dims]


def global_penalty(local: Tensor, groups: Sequence[Any]) -> Tensor:
    """The penalty over all shards from this rank's part, differentiable on this rank's shard.

    Each rank evaluates ``v_r = ewc_lambda * (sum A_r (theta_r - m_r)^2 + r_r)`` on its local
    shards; one scalar ``all_reduce`` per sharded mesh dimension gives ``V = sum_r v_r``. The
    result is ``v_r + (V - v_r).detach()``: its value is the global penalty on every rank and
    its gradient with respect to each rank's shard is ``dV/dtheta_r = dv_r/dtheta_r`` -- the
    gradient of the (identical, replicated) penalty, which FSDP2 adds to the reduce-scattered
    task gradient in ``p.grad``. Cost: one scalar all-reduce per group.
    """
    total = sum_over_groups(local, groups)
    return local + (total - local).detach()


def sum_over_groups(value: Tensor, groups: Sequence[Any]) -> Tensor:
    """``value`` (detached) summed over the process groups of :func:`shard_groups`; ``value``
    itself when there are none. One scalar ``all_reduce`` per group; no autograd."""
    if not groups:
        return value
    total = value.detach().clone()
    for group in groups:
        dist.all_reduce(total, group=group)
    return total
