"""The single-pass CPU kernels behind ``EWC(fused=True)``, ``ewc.optim.SGD`` and
``ewc.optim.AdamW``, built on first use (one extension holds all three).

Eager PyTorch has no elementwise operator with four tensor inputs, so the default
:func:`ewc.penalty.add_penalty_grad_` needs two kernels per block (``theta - m``, then
``addcmul_``). This module compiles, with PyTorch's own C++ extension loader
(:func:`torch.utils.cpp_extension.load_inline`), one loop that reads ``grad``, ``A``, ``theta``
and ``m`` once and writes ``grad`` once::

    grad[i] += scale * A[i] * (theta[i] - m[i])
    quadratic = sum_i A[i] * (theta[i] - m[i])^2              (only when asked; float64 sum)

Cost: one pass, O(P) time, no extra memory. The optimizer kernels (:data:`FusedSGDKernel`,
:data:`FusedAdamWKernel`) are torch's single-tensor steps on that penalised gradient, formed in
registers, in one pass over the weights and the optimizer state.

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

__all__ = [
    "FusedAdamWKernel",
    "FusedKernel",
    "FusedSGDKernel",
    "fused_adamw_kernel",
    "fused_kernel",
    "fused_sgd_kernel",
]

FusedKernel = Callable[[Tensor, Tensor, Tensor, Tensor, float, bool], float]
"""``kernel(grad, importance, param, centre, scale, want_quadratic) -> quadratic`` (0.0 unless
asked); every tensor on the CPU, one floating dtype, same shape."""

FusedSGDKernel = Callable[..., None]
"""``kernel(param, grad, buf, first_step, importance, centre, scale, lr, weight_decay, momentum,
dampening, nesterov)``: one step of ``torch.optim.SGD`` on ``param`` in place, on the
gradient ``grad + scale * importance * (param - centre)`` (``importance``/``centre`` None: no
penalty), updating the momentum buffer ``buf`` (None without momentum; ``first_step``: it is
written, not read). ``grad`` is not changed. Every tensor on the CPU, one dtype, same shape."""

FusedAdamWKernel = Callable[..., None]
"""``kernel(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, importance, centre, scale, decay,
beta1_weight, beta2, beta2_weight, bias2_sqrt, eps, neg_step_size)``: one step of
``torch.optim.AdamW`` on ``param`` and its moments in place, on the gradient
``grad + scale * importance * (param - centre)`` (``importance``/``centre`` None: no penalty;
``max_exp_avg_sq`` None: no AMSGrad). The scalars are torch's: ``1 - lr * weight_decay``,
``1 - beta1``, ``beta2``, ``1 - beta2``, ``sqrt(1 - beta2^t)``, ``eps``, ``-lr / (1 - beta1^t)``
(computed by the caller as torch computes them). ``grad`` is not changed. Every tensor on the
CPU, one dtype, same shape."""

KERNEL_NAME = "ewc_fused_penalty_v5"
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

namespace {

template <typename T>
struct SgdHyper {
  T scale, lr, weight_decay, momentum, keep;
  bool nesterov;
};

// One element of torch.optim.SGD's single-tensor step on the gradient g + scale A (theta - m),
// in its order of operations: weight decay, momentum (first step: buf = d), nesterov. Every
// option is a template parameter or branch-free arithmetic (weight decay 0 adds exactly 0), so
// the contiguous loop vectorises; ``buf`` is only touched with momentum.
template <typename T, bool Penalty, int Momentum, bool Nesterov>  // Momentum: 0 none, 1 first, 2
inline T sgd_element(T theta, T* buf, T g, T a, T m, const SgdHyper<T>& h) {
  T d = g;
  if constexpr (Penalty) d = EWC_MULTIPLY_ADD(h.scale * a, theta - m, d);
  d = EWC_MULTIPLY_ADD(h.weight_decay, theta, d);
  if constexpr (Momentum == 1) *buf = d;
  if constexpr (Momentum == 2) *buf = EWC_MULTIPLY_ADD(h.keep, d, *buf * h.momentum);
  if constexpr (Momentum != 0) d = Nesterov ? EWC_MULTIPLY_ADD(h.momentum, *buf, d) : *buf;
  return EWC_MULTIPLY_ADD(-h.lr, d, theta);
}

template <typename T, bool Penalty, int Momentum, bool Nesterov>
void sgd_run(at::TensorIterator& iter, const SgdHyper<T>& h) {
  // data: [theta (out), buf (out), theta, grad, buf, importance, centre]; absent ones repeat
  // theta, and are never read
  iter.for_each([&](char** data, const int64_t* strides, int64_t size0, int64_t size1) {
    bool contiguous = size1 == 1;
    for (int k = 0; k < 7; ++k) contiguous = contiguous && strides[k] == sizeof(T);
    if (contiguous) {
      T* __restrict__ theta = reinterpret_cast<T*>(data[0]);
      T* __restrict__ buf = reinterpret_cast<T*>(data[1]);
      const T* __restrict__ grad = reinterpret_cast<const T*>(data[3]);
      const T* __restrict__ a = reinterpret_cast<const T*>(data[5]);
      const T* __restrict__ m = reinterpret_cast<const T*>(data[6]);
#pragma omp simd
      for (int64_t i = 0; i < size0; ++i) {
        theta[i] = sgd_element<T, Penalty, Momentum, Nesterov>(
            theta[i], buf + i, grad[i], Penalty ? a[i] : T(0), Penalty ? m[i] : T(0), h);
      }
      return;
    }
    for (int64_t outer = 0; outer < size1; ++outer) {
      char* base[7];
      for (int k = 0; k < 7; ++k) base[k] = data[k] + outer * strides[7 + k];
      for (int64_t i = 0; i < size0; ++i) {
        T* theta = reinterpret_cast<T*>(base[0] + i * strides[0]);
        T* buf = reinterpret_cast<T*>(base[1] + i * strides[1]);
        const T g = *reinterpret_cast<const T*>(base[3] + i * strides[3]);
        const T a = Penalty ? *reinterpret_cast<const T*>(base[5] + i * strides[5]) : T(0);
        const T m = Penalty ? *reinterpret_cast<const T*>(base[6] + i * strides[6]) : T(0);
        *theta = sgd_element<T, Penalty, Momentum, Nesterov>(*theta, buf, g, a, m, h);
      }
    }
  });
}

template <typename T, bool Penalty>
void sgd_dispatch(at::TensorIterator& iter, const SgdHyper<T>& h, int mode) {
  if (mode == 0) sgd_run<T, Penalty, 0, false>(iter, h);
  else if (mode == 1 && h.nesterov) sgd_run<T, Penalty, 1, true>(iter, h);
  else if (mode == 1) sgd_run<T, Penalty, 1, false>(iter, h);
  else if (h.nesterov) sgd_run<T, Penalty, 2, true>(iter, h);
  else sgd_run<T, Penalty, 2, false>(iter, h);
}

}  // namespace

void sgd_penalty_step(torch::Tensor param, torch::Tensor grad, c10::optional<torch::Tensor> buf,
                      bool first_step, c10::optional<torch::Tensor> importance,
                      c10::optional<torch::Tensor> centre, double scale, double lr,
                      double weight_decay, double momentum, double dampening, bool nesterov) {
  TORCH_CHECK(param.device().is_cpu(), "ewc fused SGD: tensors must be on the CPU");
  const bool penalty = importance.has_value();
  const int mode = buf.has_value() ? (first_step ? 1 : 2) : 0;
  torch::Tensor b = buf.has_value() ? *buf : param;
  torch::Tensor a = penalty ? *importance : param;
  torch::Tensor m = penalty ? *centre : param;
  auto config = at::TensorIteratorConfig();
  config.add_output(param).add_output(b).add_const_input(param).add_const_input(grad);
  config.add_const_input(b).add_const_input(a).add_const_input(m);
  config.resize_outputs(false).set_check_mem_overlap(false).check_all_same_dtype(true);
  auto iter = config.build();
  AT_DISPATCH_FLOATING_TYPES(iter.common_dtype(), "ewc_sgd_penalty_step", [&] {
    const SgdHyper<scalar_t> hyper{static_cast<scalar_t>(scale), static_cast<scalar_t>(lr),
                                   static_cast<scalar_t>(weight_decay),
                                   static_cast<scalar_t>(momentum),
                                   static_cast<scalar_t>(1 - dampening), nesterov};
    if (penalty) sgd_dispatch<scalar_t, true>(iter, hyper, mode);
    else sgd_dispatch<scalar_t, false>(iter, hyper, mode);
  });
}

namespace {

template <typename T>
struct AdamHyper {
  T scale, decay, beta1_weight, beta2, beta2_weight, bias2_sqrt, eps, neg_step_size;
};

// One element of torch.optim.AdamW's single-tensor step on the gradient g + scale A (theta - m),
// in its order of operations: decoupled decay (param.mul_), exp_avg.lerp_, exp_avg_sq.mul_ then
// addcmul_, the AMSGrad maximum, denom = sqrt(v) / bias2_sqrt + eps, param.addcdiv_. ATen's
// lerp is fma(w, end - self, self) for w < 0.5, else fma(w - 1, end - self, end).
template <typename T, bool Penalty, bool Amsgrad>
inline void adam_element(T* theta, T* m1, T* v, T* vmax, T g, T a, T m, const AdamHyper<T>& h) {
  T d = g;
  if constexpr (Penalty) d = EWC_MULTIPLY_ADD(h.scale * a, *theta - m, d);
  const T decayed = *theta * h.decay;
  const T w = h.beta1_weight;
  *m1 = w < T(0.5) ? EWC_MULTIPLY_ADD(w, d - *m1, *m1) : EWC_MULTIPLY_ADD(w - T(1), d - *m1, d);
  *v = EWC_MULTIPLY_ADD(h.beta2_weight * d, d, *v * h.beta2);
  T second = *v;
  if constexpr (Amsgrad) {
    *vmax = (*v > *vmax || *v != *v) ? *v : *vmax;  // torch.maximum: a NaN wins
    second = *vmax;
  }
  const T denom = std::sqrt(second) / h.bias2_sqrt + h.eps;
  *theta = decayed + h.neg_step_size * *m1 / denom;
}

template <typename T, bool Penalty, bool Amsgrad>
void adam_run(at::TensorIterator& iter, const AdamHyper<T>& h) {
  // data: [theta, m1, v, vmax (out), theta, grad, m1, v, vmax, importance, centre]; absent ones
  // repeat theta, and are never read
  iter.for_each([&](char** data, const int64_t* strides, int64_t size0, int64_t size1) {
    bool contiguous = size1 == 1;
    for (int k = 0; k < 11; ++k) contiguous = contiguous && strides[k] == sizeof(T);
    if (contiguous) {
      T* __restrict__ theta = reinterpret_cast<T*>(data[0]);
      T* __restrict__ m1 = reinterpret_cast<T*>(data[1]);
      T* __restrict__ v = reinterpret_cast<T*>(data[2]);
      T* __restrict__ vmax = reinterpret_cast<T*>(data[3]);
      const T* __restrict__ grad = reinterpret_cast<const T*>(data[5]);
      const T* __restrict__ a = reinterpret_cast<const T*>(data[9]);
      const T* __restrict__ m = reinterpret_cast<const T*>(data[10]);
#pragma omp simd
      for (int64_t i = 0; i < size0; ++i) {
        adam_element<T, Penalty, Amsgrad>(theta + i, m1 + i, v + i, vmax + i, grad[i],
                                          Penalty ? a[i] : T(0), Penalty ? m[i] : T(0), h);
      }
      return;
    }
    for (int64_t outer = 0; outer < size1; ++outer) {
      char* base[11];
      for (int k = 0; k < 11; ++k) base[k] = data[k] + outer * strides[11 + k];
      for (int64_t i = 0; i < size0; ++i) {
        auto at = [&](int k) { return reinterpret_cast<T*>(base[k] + i * strides[k]); };
        const T a = Penalty ? *at(9) : T(0);
        const T m = Penalty ? *at(10) : T(0);
        adam_element<T, Penalty, Amsgrad>(at(0), at(1), at(2), at(3), *at(5), a, m, h);
      }
    }
  });
}

}  // namespace

void adamw_penalty_step(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg,
                        torch::Tensor exp_avg_sq, c10::optional<torch::Tensor> max_exp_avg_sq,
                        c10::optional<torch::Tensor> importance,
                        c10::optional<torch::Tensor> centre, double scale, double decay,
                        double beta1_weight, double beta2, double beta2_weight,
                        double bias2_sqrt, double eps, double neg_step_size) {
  TORCH_CHECK(param.device().is_cpu(), "ewc fused AdamW: tensors must be on the CPU");
  const bool penalty = importance.has_value();
  const bool amsgrad = max_exp_avg_sq.has_value();
  torch::Tensor vmax = amsgrad ? *max_exp_avg_sq : param;
  torch::Tensor a = penalty ? *importance : param;
  torch::Tensor m = penalty ? *centre : param;
  auto config = at::TensorIteratorConfig();
  config.add_output(param).add_output(exp_avg).add_output(exp_avg_sq).add_output(vmax);
  config.add_const_input(param).add_const_input(grad).add_const_input(exp_avg);
  config.add_const_input(exp_avg_sq).add_const_input(vmax).add_const_input(a).add_const_input(m);
  config.resize_outputs(false).set_check_mem_overlap(false).check_all_same_dtype(true);
  auto iter = config.build();
  AT_DISPATCH_FLOATING_TYPES(iter.common_dtype(), "ewc_adamw_penalty_step", [&] {
    using T = scalar_t;
    const AdamHyper<T> hyper{static_cast<T>(scale),        static_cast<T>(decay),
                             static_cast<T>(beta1_weight), static_cast<T>(beta2),
                             static_cast<T>(beta2_weight), static_cast<T>(bias2_sqrt),
                             static_cast<T>(eps),          static_cast<T>(neg_step_size)};
    if (penalty && amsgrad) adam_run<T, true, true>(iter, hyper);
    else if (penalty) adam_run<T, true, false>(iter, hyper);
    else if (amsgrad) adam_run<T, false, true>(iter, hyper);
    else adam_run<T, false, false>(iter, hyper);
  });
}
"""

_lock = threading.Lock()
_module: Any = None


def fused_kernel() -> FusedKernel:
    """Return the compiled penalty kernel of ``EWC(fused=True)``, building the extension on the
    first call in this process.

    Raises:
        RuntimeError: the kernel could not be built (no C++ compiler or ninja, ...), naming
            ``EWC(fused=True)``; the compiler's own error is chained as the cause.
    """
    module = _compiled(
        "EWC(fused=True)", "Use fused=False (the default, pure PyTorch) on this machine"
    )
    kernel: FusedKernel = module.add_penalty_grad
    return kernel


def fused_sgd_kernel() -> FusedSGDKernel:
    """Return the compiled SGD step of :class:`ewc.optim.SGD` (same extension; a failed build
    names ``ewc.optim.SGD``)."""
    module = _compiled(
        "ewc.optim.SGD",
        "Use torch.optim.SGD with reg.penalty_grad_(model) before each step instead",
    )
    kernel: FusedSGDKernel = module.sgd_penalty_step
    return kernel


def fused_adamw_kernel() -> FusedAdamWKernel:
    """Return the compiled AdamW step of :class:`ewc.optim.AdamW` (same extension; a failed
    build names ``ewc.optim.AdamW``)."""
    module = _compiled(
        "ewc.optim.AdamW",
        "Use torch.optim.AdamW with reg.penalty_grad_(model) before each step instead",
    )
    kernel: FusedAdamWKernel = module.adamw_penalty_step
    return kernel


def _compiled(needed_by: str, instead: str) -> Any:
    """The extension, built once per process; a failed build is a RuntimeError that names
    ``needed_by`` and says what to do ``instead``."""
    global _module
    with _lock:
        if _module is None:
            try:
                _module = _build()
            except Exception as error:  # the loader raises several kinds; say what was built
                raise RuntimeError(
                    f"{needed_by}: the C++ CPU kernel of ewc could not be built: it needs a C++ "
                    f"compiler and ninja; torch.utils.cpp_extension reported "
                    f"{type(error).__name__}: {error}. {instead}."
                ) from error
        return _module


_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DEWC_USE_FMA"],
    "AVX2": ["-mavx2", "-mfma", "-DEWC_USE_FMA"],
}
"""Instruction sets per ATen CPU capability (``torch.backends.cpu.get_cpu_capability()``): the
kernel is built for what ATen itself uses on this machine, and the capability is part of its
cache name, so a cache shared between different machines never runs unsupported code."""


def _build() -> Any:
    import torch
    from torch.utils.cpp_extension import load_inline

    capability = torch.backends.cpu.get_cpu_capability()
    return load_inline(
        name=f"{KERNEL_NAME}_{capability.lower()}",
        cpp_sources=[_SOURCE],
        functions=["add_penalty_grad", "sgd_penalty_step", "adamw_penalty_step"],
        # no FMA contraction beyond the one addcmul_ itself uses (EWC_USE_FMA)
        extra_cflags=[
            "-O3",
            "-fopenmp-simd",
            "-ffp-contract=off",
            "-fno-math-errno",  # sqrt without errno, so AdamW's loop vectorises; same results
            *_CAPABILITY_FLAGS.get(capability, []),
        ],
        verbose=False,
    )
