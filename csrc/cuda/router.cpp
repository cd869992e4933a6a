// The CUDA kernel of each BatchNorm op with the dispatcher: the CUDA C++ implementation (bn_act.h), unless
// FUSEDRECT_BACKEND names "triton", whose launchers are Python: such a call goes to the Python router that
// fusedrect/ops/bn_act.py hands set_python_router. On the default backend a training step thus runs no Python
// between the module and the kernels (a router in Python cost 15-20 us of host time per op on an H200's host,
// as much as the op's own launches).
#include "router.h"

#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "bn_act.h"

namespace fusedrect::cuda {
namespace {

// Leaked on purpose: a static pybind11::object would be released after the interpreter is gone.
pybind11::object* python_router = nullptr;

bool triton_requested() {
  const char* requested = std::getenv("FUSEDRECT_BACKEND");  // os.environ's writes reach it through putenv
  return requested != nullptr && std::strcmp(requested, "triton") == 0;
}

template <typename Signature>
struct Routed;

template <typename Result, typename... Args>
struct Routed<Result(Args...)> {
  template <Result (*Impl)(Args...), const char* Name>
  static Result kernel(Args... args) {
    if (!triton_requested()) return Impl(args...);
    pybind11::gil_scoped_acquire gil;
    TORCH_CHECK(python_router != nullptr, "FUSEDRECT_BACKEND=triton: the Triton router is not registered yet "
                "(import fusedrect before calling torch.ops.fusedrect.", Name, ")");
    return (*python_router)(Name, args...).template cast<Result>();
  }
};

constexpr char kFwdTrain[] = "bn_act_fwd_train";
constexpr char kFwdEval[] = "bn_act_fwd_eval";
constexpr char kBwd[] = "bn_act_bwd";
constexpr char kBwdFromOutput[] = "bn_act_bwd_from_output";
constexpr char kStats[] = "bn_stats";
constexpr char kBwdReduce[] = "bn_act_bwd_reduce";
constexpr char kBwdElemt[] = "bn_act_bwd_elemt";

template <auto Impl, const char* Name>
constexpr auto routed = &Routed<std::remove_pointer_t<decltype(Impl)>>::template kernel<Impl, Name>;

}  // namespace

void set_python_router(pybind11::object route) {
  if (python_router == nullptr) python_router = new pybind11::object();
  *python_router = std::move(route);
}

TORCH_LIBRARY_IMPL(fusedrect, CUDA, m) {
  m.impl(kFwdTrain, routed<&bn_act_fwd_train, kFwdTrain>);
  m.impl(kFwdEval, routed<&bn_act_fwd_eval, kFwdEval>);
  m.impl(kBwd, routed<&bn_act_bwd, kBwd>);
  m.impl(kBwdFromOutput, routed<&bn_act_bwd_from_output, kBwdFromOutput>);
  m.impl(kStats, routed<&bn_stats, kStats>);
  m.impl(kBwdReduce, routed<&bn_act_bwd_reduce, kBwdReduce>);
  m.impl(kBwdElemt, routed<&bn_act_bwd_elemt, kBwdElemt>);
}

}  // namespace fusedrect::cuda
