// Compiled by nvcc into the CUDA build of fusedrect._C: the CUDA runtime version it was built against.
// CUDA kernels of the ops register here with TORCH_LIBRARY_IMPL(fusedrect, CUDA, m).
#include <cuda_runtime_api.h>

int fusedrect_cuda_runtime_version() { return CUDART_VERSION; }
