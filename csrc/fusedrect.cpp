// The op schemas of fusedrect (the only place with m.def) and the Python module fusedrect._C.
// The CPU implementations register per op with the dispatcher (csrc/cpu/*.cpp). In a build with CUDA, the CUDA
// kernel of every BatchNorm op is C++ (cuda/router.cpp: the CUDA C++ functions of csrc/cuda, or the Triton
// launchers through a Python router where FUSEDRECT_BACKEND=triton), and this module exposes those functions as
// fusedrect._C.cuda.<op name> (same signature as the op); in a build without, the CUDA kernel is a Python router
// that runs Triton (fusedrect/ops/bn_act.py). That of the pre-activation convolution ops is
// fusedrect/ops/preact_conv.py.
// The forward ops' autograd is C++ (autograd.cpp), the running-statistics update a composite of ATen ops with
// a one-loop CPU kernel (running_stats.cpp); fake (meta) implementations, and the backward ops' autograd (which
// raises on a second order gradient), are registered in Python next to each op (fusedrect/ops/).
// fusedrect._C.buffer_cache controls the CPU ops' cache of output buffers (cpu/buffer_cache.h), wrapped by
// fusedrect/buffer_cache.py.
//
// Activation: a `slope` (shape (1,) or (C,)) makes the op BatchNorm + PReLU; no slope makes it
// BatchNorm + ReLU. Statistics (mean, invstd) and per-channel gradients are fp64 for fp64 input and fp32
// otherwise.
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include "cpu/buffer_cache.h"

#ifdef FUSEDRECT_WITH_CUDA
#include "cuda/bn_act.h"
#include "cuda/router.h"
#endif

TORCH_LIBRARY(fusedrect, m) {
  // Training forward: batch statistics, then y = act(BN(x)). Returns (y, mean, invstd).
  m.def("bn_act_fwd_train(Tensor input, Tensor? weight, Tensor? bias, Tensor? slope, float eps)"
        " -> (Tensor, Tensor, Tensor)");
  // Forward with given statistics (eval mode): y = act((x - mean) * invstd * weight + bias).
  m.def("bn_act_fwd_eval(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias,"
        " Tensor? slope) -> Tensor");
  // The same from running statistics: mean = running_mean, invstd = bn_invstd(running_var, eps) in the
  // statistics dtype (a composite of the two ops, csrc/eval_running.cpp).
  m.def("bn_act_fwd_eval_running(Tensor input, Tensor running_mean, Tensor running_var, float eps, Tensor? weight,"
        " Tensor? bias, Tensor? slope) -> Tensor");
  // Backward of either forward; batch_stats=True when mean and invstd were computed from `input`.
  // Returns (grad_input, grad_weight, grad_bias, grad_slope): the per-channel gradients in the statistics
  // dtype, grad_slope per channel (shape (C,); (0,) for ReLU).
  m.def("bn_act_bwd(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight,"
        " Tensor? bias, Tensor? slope, bool batch_stats) -> (Tensor, Tensor, Tensor, Tensor)");
  // Backward of the training forward of BatchNorm + PReLU from its output y instead of its input (the
  // memory-efficient mode): needs every slope > 0 and every weight != 0 to invert the activation and affine.
  m.def("bn_act_bwd_from_output(Tensor grad_out, Tensor output, Tensor invstd, Tensor? weight, Tensor? bias,"
        " Tensor slope) -> (Tensor, Tensor, Tensor, Tensor)");
  // The halves of the training forward and backward, for SyncBN (fusedrect/ops/sync_bn.py), which combines
  // them over ranks. Per-channel batch statistics of `input` alone: (mean, biased variance).
  m.def("bn_stats(Tensor input) -> (Tensor, Tensor)");
  // The reduce half of bn_act_bwd: with z = (x - mean) * invstd * weight + bias and dz = dy * (z > 0 ? 1 : a),
  // returns (sum_dz, sum_dz_xhat, grad_slope) = (dbeta, dgamma, sum dy * min(z, 0)); grad_slope (C,), (0,) for ReLU.
  m.def("bn_act_bwd_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight,"
        " Tensor? bias, Tensor? slope) -> (Tensor, Tensor, Tensor)");
  // The elementwise half: dx = weight * invstd * (dz - sum_dz / count - xhat * sum_dz_xhat / count), with the
  // sums and the per-channel element count given (across all ranks, for SyncBN).
  m.def("bn_act_bwd_elemt(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight,"
        " Tensor? bias, Tensor? slope, Tensor sum_dz, Tensor sum_dz_xhat, int count) -> Tensor");

  // nn.BatchNorm's running-statistics update after a training forward over `count` elements per channel:
  // running += momentum * (batch - running) with batch = mean and the unbiased variance
  // count / (count - 1) * (1 / invstd^2 - eps); either buffer may be absent; count 0 changes nothing.
  // momentum_tensor, where given (one element: the modules' cumulative average, kept on the device), is used
  // instead of momentum.
  m.def("bn_update_running_stats(Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor mean, Tensor invstd,"
        " float eps, int count, float momentum, Tensor? momentum_tensor) -> ()");
  // Eval mode's statistic from a running variance: invstd = 1 / sqrt(var + eps), computed in `dtype` (the
  // statistics dtype, float or double) after converting var to it, as (var.to(dtype) + eps).rsqrt_() rounds it.
  m.def("bn_invstd(Tensor var, float eps, ScalarType dtype) -> Tensor");

  // Pre-activation convolution conv2d(act(BN(x)), conv_weight, conv_bias) (He et al. 2016, "Identity Mappings
  // in Deep Residual Networks"): the activation is never stored. Training forward returns (out, mean, invstd).
  m.def("preact_conv_fwd_train(Tensor input, Tensor? weight, Tensor? bias, Tensor? slope, float eps,"
        " Tensor conv_weight, Tensor? conv_bias, int[2] stride, int[2] padding, int[2] dilation, int groups)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("preact_conv_fwd_eval(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias,"
        " Tensor? slope, Tensor conv_weight, Tensor? conv_bias, int[2] stride, int[2] padding, int[2] dilation,"
        " int groups) -> Tensor");
  // Backward of either forward: recomputes the activation. Returns (grad_input, grad_weight, grad_bias,
  // grad_slope, grad_conv_weight, grad_conv_bias); grad_slope as in bn_act_bwd, grad_conv_bias (0,) when
  // has_conv_bias is false.
  m.def("preact_conv_bwd(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight,"
        " Tensor? bias, Tensor? slope, Tensor conv_weight, bool has_conv_bias, int[2] stride, int[2] padding,"
        " int[2] dilation, int groups, bool batch_stats)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

#define FUSEDRECT_STR_(x) #x
#define FUSEDRECT_STR(x) FUSEDRECT_STR_(x)

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedrect's compiled ops.";
  // What this build holds: the at::vec instruction set of the CPU kernels (and, set below, the CUDA runtime it was
  // built for, 0: none).
  m.attr("cpu_capability") = FUSEDRECT_STR(CPU_CAPABILITY);
  namespace fcpu = fusedrect::cpu;
  auto cache = m.def_submodule("buffer_cache", "The cache of recycled output buffers of the CPU ops "
                                               "(csrc/cpu/buffer_cache.h); wrapped by fusedrect.buffer_cache.");
  cache.def("stats", [] {
    const fcpu::BufferCacheStats s = fcpu::buffer_cache_stats();
    return pybind11::dict(pybind11::arg("limit_bytes") = s.limit_bytes, pybind11::arg("idle_bytes") = s.idle_bytes,
                          pybind11::arg("idle_buffers") = s.idle_buffers, pybind11::arg("hits") = s.hits,
                          pybind11::arg("misses") = s.misses);
  });
  cache.def("set_limit", &fcpu::set_buffer_cache_limit);
  cache.def("empty", &fcpu::empty_buffer_cache);
#ifdef FUSEDRECT_WITH_CUDA
  m.attr("cuda_runtime_version") = fusedrect::cuda::runtime_version();
  namespace fc = fusedrect::cuda;
  auto cuda = m.def_submodule("cuda", "The CUDA C++ implementations of the ops (the `cuda` backend), one function "
                                      "per op with the op's signature (the ops' CUDA kernels where FUSEDRECT_BACKEND "
                                      "does not name triton).");
  const auto release = pybind11::call_guard<pybind11::gil_scoped_release>();
  cuda.def("bn_act_fwd_train", &fc::bn_act_fwd_train, release);
  cuda.def("bn_act_fwd_eval", &fc::bn_act_fwd_eval, release);
  cuda.def("bn_act_bwd", &fc::bn_act_bwd, release);
  cuda.def("bn_act_bwd_from_output", &fc::bn_act_bwd_from_output, release);
  cuda.def("bn_stats", &fc::bn_stats, release);
  cuda.def("bn_act_bwd_reduce", &fc::bn_act_bwd_reduce, release);
  cuda.def("bn_act_bwd_elemt", &fc::bn_act_bwd_elemt, release);
  cuda.def("set_python_router", &fc::set_python_router,
           "route(op_name, *args): the ops' CUDA kernels hand it their calls where FUSEDRECT_BACKEND=triton.");
#else
  m.attr("cuda_runtime_version") = 0;
#endif
}
