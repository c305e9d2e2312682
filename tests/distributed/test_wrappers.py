"""Single-process checks of :mod:`ewc.distributed`: wrappers are unwrapped, and without an
initialised process group nothing is communicated (the state is that of the plain model)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ewc import EWC
from ewc.distributed import is_distributed, is_sharded, local_tensor, unwrap
from tests.distributed.common import make_model, perturb_, union_batches


def test_unwrap_removes_nested_data_parallel_wrappers() -> None:
    model = make_model()
    assert unwrap(nn.DataParallel(nn.DataParallel(model))) is model
    assert unwrap(model) is model


def test_wrapped_and_plain_model_give_the_same_state_and_penalty() -> None:
    assert not (dist.is_available() and dist.is_initialized())
    assert not is_distributed()
    plain, wrapped_inner = make_model(), make_model()
    wrapped = nn.DataParallel(wrapped_inner)
    regs = [EWC(5.0), EWC(5.0)]
    regs[0].consolidate(plain, union_batches(), nn.CrossEntropyLoss())
    regs[1].consolidate(wrapped, union_batches(), nn.CrossEntropyLoss())
    assert set(regs[1].state.importance) == {name for name, _ in plain.named_parameters()}
    for name, importance in regs[0].state.importance.items():
        assert torch.equal(importance, regs[1].state.importance[name])
    perturb_(plain)
    perturb_(wrapped_inner)
    assert torch.equal(regs[0].penalty(plain), regs[1].penalty(wrapped))
    regs[1].penalty_grad_(wrapped)
    grads = torch.autograd.grad(regs[0].penalty(plain), list(plain.parameters()))
    for grad, param in zip(grads, wrapped_inner.parameters()):
        torch.testing.assert_close(param.grad, grad)


def test_plain_tensors_are_not_sharded() -> None:
    tensor = torch.ones(3)
    assert not is_sharded(tensor)
    assert local_tensor(tensor) is tensor
