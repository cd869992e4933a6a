// What the host code and the kernels agree on: the rows of the per-channel coefficient table and the
// activation modes (plain C++: included by the host-only sources too).
#pragma once

namespace fusedrect::cuda {

// The per-channel coefficients every pass reads: a (kRows, C) table in the statistics dtype, built once per
// call by coefficients_kernel. With scale = gamma * invstd:
//   z = (x - mean) * scale + beta,  y = act(z);  from the output y (memory-efficient mode, a > 0, scale != 0):
//   z = y > 0 ? y : y * (1 / a),  x - mean = (z - beta) * (1 / scale);
//   dx = scale * dz + B * (x - mean) + D   (B = D = 0 unless the statistics came from this batch).
enum Row : int { kMean, kScale, kBeta, kSlope, kInvScale, kInvSlope, kB, kD, kRows };

// The activation, and how the pass recovers x - mean and z from what it reads.
enum class Mode { kReLU, kPReLU, kPReLUFromOutput };

constexpr bool is_prelu(Mode m) { return m != Mode::kReLU; }

}  // namespace fusedrect::cuda
