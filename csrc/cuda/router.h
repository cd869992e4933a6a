// The dispatcher's CUDA kernels of the BatchNorm ops (router.cpp) and the Python router they hand Triton calls.
#pragma once

#include <pybind11/pytypes.h>

namespace fusedrect::cuda {

// `route(op_name, *args)`: runs op `op_name` with the Triton launchers (fusedrect/ops/bn_act.py registers it
// at import).
void set_python_router(pybind11::object route);

}  // namespace fusedrect::cuda
