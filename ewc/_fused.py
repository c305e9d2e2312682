"""The single-pass CPU kernel behind ``EWC(fused=True)``, built on first use.

Eager PyTorch has no elementwise operator with four tensor inputs, so the default
:func:`ewc.penalty.add_penalty_grad_` needs two kernels per block (``theta - m``, then
``addcmul_``). This module compiles, with PyTorch's own C++ extension loader
(:func:`torch.utils.cpp_extension.load_inline`), one loop that reads ``grad``, ``A``, ``theta``
and ``m`` once and writes ``grad`` once::

    grad[i] += scale * A[i] * (theta[i] - m[i])
    quadratic = sum_i A[i] * (theta[i] - m[i])^2              (only when asked; float64 sum)

Cost: one pass, O(P) time, no extra memory.

It iterates with ATen's ``TensorIterator``, so strides (the leading block of a grown parameter)
and PyTorch's intra-op thread pool (``torch.set_num_threads``) are honoured, and it evaluates
the same expression in the same order as ``addcmul_`` (no FMA contraction), so its result equals
the default path's. The first build takes about 20 s and needs a C++ compiler and ninja; PyTorch
caches it on disk (``TORCH_EXTENSIONS_DIR``), so later processes load it in about a second.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from torch import Tensor

__all__ = ["FusedKernel", "fused_kernel"]

FusedKernel = Callable[[Tensor, Tensor, Tensor, Tensor, float, bool], float]
"""``kernel(grad, importance, param, centre, scale, want_quadratic) -> quadratic`` (0.0 unless
asked); every tensor on the CPU, one floating dtype, same shape."""

KERNEL_NAME = "ewc_fused_penalty_v1"
"""Part of the on-disk cache key: bump it whenever the source changes."""

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <cmath>
#include <vector>

// ATen's addcmul_ computes fma(value * t1, t2, self) where the CPU has FMA, else the plain sum.
#ifdef EWC_USE_FMA
#define EWC_MULTIPLY_ADD(x, y, z) std::fma((x), (y), (z))
#else
#define EWC_MULTIPLY_ADD(x, y, z) ((z) + (x) * (y))
#endif

namespace {

template <typename T>
void penalty_loop(char** data, const int64_t* strides, int64_t size0, int64_t size1,
                  T scale, bool want_quadratic, std::vector<double>& partial) {
  // data: [grad (out), grad (in), importance, param, centre]
  double sum = 0.0;
  const bool contiguous = strides[0] == sizeof(T) && strides[1] == sizeof(T) &&
                          strides[2] == sizeof(T) && strides[3] == sizeof(T) &&
                          strides[4] == sizeof(T);
  for (int64_t outer = 0; outer < size1; ++outer) {
    char* base[5];
    for (int k = 0; k < 5; ++k) base[k] = data[k] + outer * strides[5 + k];
    if (contiguous) {
      T* grad_out = reinterpret_cast<T*>(base[0]);
      const T* grad_in = reinterpret_cast<const T*>(base[1]);
      const T* __restrict__ a = reinterpret_cast<const T*>(base[2]);
      const T* __restrict__ p = reinterpret_cast<const T*>(base[3]);
      const T* __restrict__ m = reinterpret_cast<const T*>(base[4]);
      if (want_quadratic) {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < size0; ++i) {
          const T d = p[i] - m[i];
          grad_out[i] = EWC_MULTIPLY_ADD(scale * a[i], d, grad_in[i]);
          sum += static_cast<double>(a[i] * d) * static_cast<double>(d);
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < size0; ++i) {
          grad_out[i] = EWC_MULTIPLY_ADD(scale * a[i], p[i] - m[i], grad_in[i]);
        }
      }
    } else {
      for (int64_t i = 0; i < size0; ++i) {
        const T g = *reinterpret_cast<const T*>(base[1] + i * strides[1]);
        const T a = *reinterpret_cast<const T*>(base[2] + i * strides[2]);
        const T p = *reinterpret_cast<const T*>(base[3] + i * strides[3]);
        const T m = *reinterpret_cast<const T*>(base[4] + i * strides[4]);
        const T d = p - m;
        *reinterpret_cast<T*>(base[0] + i * strides[0]) = EWC_MULTIPLY_ADD(scale * a, d, g);
        if (want_quadratic) sum += static_cast<double>(a * d) * static_cast<double>(d);
      }
    }
  }
  if (want_quadratic) partial[at::get_thread_num()] += sum;
}

}  // namespace

double add_penalty_grad(torch::Tensor grad, torch::Tensor importance, torch::Tensor param,
                        torch::Tensor centre, double scale, bool want_quadratic) {
  TORCH_CHECK(grad.device().is_cpu(), "ewc fused kernel: tensors must be on the CPU");
  auto iter = at::TensorIteratorConfig()
                  .add_output(grad)
                  .add_const_input(grad)
                  .add_const_input(importance)
                  .add_const_input(param)
                  .add_const_input(centre)
                  .resize_outputs(false)
                  .build();
  std::vector<double> partial(at::get_num_threads() + 1, 0.0);
  AT_DISPATCH_FLOATING_TYPES(iter.common_dtype(), "ewc_add_penalty_grad", [&] {
    const scalar_t scale_t = static_cast<scalar_t>(scale);
    iter.for_each([&](char** data, const int64_t* strides, int64_t size0, int64_t size1) {
      penalty_loop<scalar_t>(data, strides, size0, size1, scale_t, want_quadratic, partial);
    });
  });
  double total = 0.0;
  for (double part : partial) total += part;
  return total;
}
"""

_lock = threading.Lock()
_kernel: FusedKernel | None = None


def fused_kernel() -> FusedKernel:
    """Return the compiled kernel, building it on the first call in this process.

    Raises:
        RuntimeError: the kernel could not be built (no C++ compiler or ninja, ...); the
            compiler's own error is chained as the cause.
    """
    global _kernel
    with _lock:
        if _kernel is None:
            _kernel = _build()
        return _kernel


_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DEWC_USE_FMA"],
    "AVX2": ["-mavx2", "-mfma", "-DEWC_USE_FMA"],
}
"""Instruction sets per ATen CPU capability (``torch.backends.cpu.get_cpu_capability()``): the
kernel is built for what ATen itself uses on this machine, and the capability is part of its
cache name, so a cache shared between different machines never runs unsupported code."""


def _build() -> FusedKernel:
    try:
        import torch
        from torch.utils.cpp_extension import load_inline

        capability = torch.backends.cpu.get_cpu_capability()
        module: Any = load_inline(
            name=f"{KERNEL_NAME}_{capability.lower()}",
            cpp_sources=[_SOURCE],
            functions=["add_penalty_grad"],
            # no FMA contraction beyond the one addcmul_ itself uses (EWC_USE_FMA)
            extra_cflags=[
                "-O3",
                "-fopenmp-simd",
                "-ffp-contract=off",
                *_CAPABILITY_FLAGS.get(capability, []),
            ],
            verbose=False,
        )
    except Exception as error:  # the loader raises several kinds; say what was being built
        raise RuntimeError(
            "EWC(fused=True) could not build its C++ CPU kernel (it needs a C++ compiler and "
            f"ninja; torch.utils.cpp_extension reported {type(error).__name__}: {error}). "
            "Use fused=False (the default, pure PyTorch) on this machine."
        ) from error
    kernel: FusedKernel = module.add_penalty_grad
    return kernel
