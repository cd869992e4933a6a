// CPU implementation of the fused BatchNorm + ReLU/PReLU ops (schemas in csrc/fusedrect.cpp).
//
// Per channel c over its M elements (see ../../shared/DESIGN.md for the derivation):
//   forward   z = (x - mean) * scale + beta,  scale = gamma * invstd,  y = z > 0 ? z : a * z  (ReLU: max(z, 0))
//   backward  dz = dy * (z > 0 ? 1 : a),  dbeta = sum dz,  dgamma = invstd * sum dz * (x - mean),
//             da = sum dy * min(z, 0),  dx = A * dz + B * (x - mean) + D  with A = gamma * invstd and, when
//             the batch statistics were used, B = -A * invstd * dgamma / M and D = -A * dbeta / M (else 0).
// Every pass walks the tiles of tiling.h; reductions write per-tile partials merged in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "tiling.h"

namespace fusedrect::cpu {
namespace {

using at::Tensor;

constexpr int64_t kMergeGrain = 256;  // channels per thread when merging tile partials

// Statistics and reductions: fp64 for fp64 input, fp32 otherwise.
at::ScalarType stats_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A (C,) contiguous tensor of `dtype`: `p` (shape (C,) or (1,)) converted, or `fill` where `p` is absent.
Tensor per_channel(const std::optional<Tensor>& p, int64_t C, double fill, at::ScalarType dtype,
                   const char* name) {
  if (!p.has_value() || !p->defined()) return at::full({C}, fill, at::TensorOptions().dtype(dtype));
  TORCH_CHECK(p->dim() == 1 && (p->numel() == C || p->numel() == 1), name, ": expected shape (", C,
              ",) or (1,), got ", p->sizes());
  return p->to(dtype).expand({C}).contiguous();
}

template <typename Vec>
inline Vec activate(const Vec& z, const Vec* slope) {
  // ReLU as IEEE maximum so NaN propagates (as torch.relu); PReLU as torch.prelu: z > 0 ? z : a * z.
  return slope ? Vec::blendv(*slope * z, z, z > Vec(0)) : at::vec::maximum(z, Vec(0));
}

// Batch statistics: per tile, the local mean and sum of squared deviations from it (two passes over a
// tile that sits in cache), then Chan et al.'s pairwise merge of the tiles in a fixed order, in fp64.
template <typename scalar_t>
void batch_stats(const Geometry& geo, const scalar_t* x, double eps, Tensor& mean, Tensor& invstd) {
  using T = opmath_t<scalar_t>;
  using Vec = MathVec<scalar_t>;
  const Tiling t = tiling_of(geo);
  const int64_t M = geo.per_channel();
  const int64_t G = t.groups();
  Tensor partials = at::empty({2, G, geo.C}, mean.options());
  T* local_mean = partials.mutable_data_ptr<T>();
  T* local_m2 = local_mean + G * geo.C;
  parallel_for_tiles(geo, t, [&](const Tile& tile) {
    T* tile_mean = local_mean + tile.g * geo.C;
    T* tile_m2 = local_m2 + tile.g * geo.C;
    reduce_tile<scalar_t, 0, 1, 1>(geo, tile, {x}, {}, {tile_mean},
                                   [](const auto&, const auto& X) { return std::array<Vec, 1>{X[0]}; });
    const T inv_count = T(1) / T(tile.count());
    for (int64_t c = tile.c0; c < tile.c1; ++c) tile_mean[c] *= inv_count;
    reduce_tile<scalar_t, 1, 1, 1>(geo, tile, {x}, {tile_mean}, {tile_m2}, [](const auto& P, const auto& X) {
      const Vec d = X[0] - P[0];
      return std::array<Vec, 1>{d * d};
    });
  });
  // Chan's merge: with n elements merged so far and nb in tile row g (the same for every channel),
  //   delta = mean_g - mean,  mean += delta * nb / (n + nb),  m2 += m2_g + delta^2 * n * nb / (n + nb).
  // Rows in order, channels innermost (contiguous, vectorised by the compiler), in fp64.
  T* mean_out = mean.mutable_data_ptr<T>();
  T* invstd_out = invstd.mutable_data_ptr<T>();
  const std::vector<int64_t> counts = tile_counts(geo, t);
  at::parallel_for(0, geo.C, kMergeGrain, [&](int64_t begin, int64_t end) {
    std::vector<double> mu(end - begin, 0.0), m2(end - begin, 0.0);
    double n = 0;
    for (int64_t g = 0; g < G; ++g) {
      const double nb = double(counts[g]);
      const double total = n + nb;
      const double a = nb / total;
      const double b = n * nb / total;
      const T* lm = local_mean + g * geo.C + begin;
      const T* lm2 = local_m2 + g * geo.C + begin;
      for (int64_t c = 0; c < end - begin; ++c) {
        const double delta = double(lm[c]) - mu[c];
        mu[c] += delta * a;
        m2[c] += double(lm2[c]) + delta * delta * b;
      }
      n = total;
    }
    for (int64_t c = begin; c < end; ++c) {
      mean_out[c] = T(mu[c - begin]);
      invstd_out[c] = T(1.0 / std::sqrt(m2[c - begin] / double(M) + eps));
    }
  });
}

// y = act((x - mean) * scale + beta): the second pass of the training forward and the whole eval forward.
template <typename scalar_t, bool kPReLU>
void apply_forward(const Geometry& geo, const scalar_t* x, const Tensor& mean, const Tensor& scale,
                   const Tensor& beta, const Tensor& slope, scalar_t* y) {
  using T = opmath_t<scalar_t>;
  using Vec = MathVec<scalar_t>;
  ParamPtrs<T, kPReLU ? 4 : 3> params;
  params[0] = mean.const_data_ptr<T>();
  params[1] = scale.const_data_ptr<T>();
  params[2] = beta.const_data_ptr<T>();
  if constexpr (kPReLU) params[3] = slope.const_data_ptr<T>();
  const Tiling t = tiling_of(geo);
  parallel_for_tiles(geo, t, [&](const Tile& tile) {
    map_tile<scalar_t>(geo, tile, std::array<const scalar_t*, 1>{x}, params, y,
                       [](const auto& P, const auto& X) {
                         const Vec z = (X[0] - P[0]) * P[1] + P[2];
                         return activate(z, kPReLU ? &P.back() : nullptr);
                       });
  });
}

template <bool kPReLU, typename Vec>
inline Vec grad_z(const Vec& z, const Vec& dy, const Vec* slope) {
  // PReLU as torch.prelu's backward (z > 0 ? dy : a * dy); ReLU as threshold_backward (z <= 0 ? 0 : dy).
  if constexpr (kPReLU) {
    return Vec::blendv(*slope * dy, dy, z > Vec(0));
  } else {
    return Vec::blendv(dy, Vec(0), z <= Vec(0));
  }
}

// Backward: one reduce pass for dbeta, dgamma and the slope gradient, then one pass writing dx.
template <typename scalar_t, bool kPReLU>
std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Geometry& geo, const Tensor& grad_out,
                                                    const Tensor& input, const Tensor& mean,
                                                    const Tensor& invstd, const Tensor& gamma,
                                                    const Tensor& beta, const Tensor& slope, bool batch_stats) {
  using T = opmath_t<scalar_t>;
  using Vec = MathVec<scalar_t>;
  constexpr size_t K = kPReLU ? 3 : 2;
  const int64_t C = geo.C;
  const int64_t M = geo.per_channel();
  const Tiling t = tiling_of(geo);
  const Tensor scale = gamma * invstd;
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();

  ParamPtrs<T, kPReLU ? 4 : 3> zparams;
  zparams[0] = mean.const_data_ptr<T>();
  zparams[1] = scale.const_data_ptr<T>();
  zparams[2] = beta.const_data_ptr<T>();
  if constexpr (kPReLU) zparams[3] = slope.const_data_ptr<T>();

  const int64_t G = t.groups();
  Tensor partials = at::empty({int64_t(K), G, C}, mean.options());
  T* part = partials.mutable_data_ptr<T>();
  parallel_for_tiles(geo, t, [&](const Tile& tile) {
    std::array<T*, K> acc;
    for (size_t k = 0; k < K; ++k) acc[k] = part + (k * G + tile.g) * C;
    reduce_tile<scalar_t>(geo, tile, std::array<const scalar_t*, 2>{x, dy}, zparams, acc,
                          [](const auto& P, const auto& X) {
                            const Vec xc = X[0] - P[0];
                            const Vec z = xc * P[1] + P[2];
                            const Vec dz = grad_z<kPReLU>(z, X[1], kPReLU ? &P.back() : nullptr);
                            std::array<Vec, kPReLU ? 3 : 2> terms;
                            terms[0] = dz;
                            terms[1] = dz * xc;
                            if constexpr (kPReLU) terms[2] = Vec::blendv(z * X[1], Vec(0), z > Vec(0));
                            return terms;
                          });
  });
  // Fixed-order merge of the tile partials: dbeta, sum dz * (x - mean), and (PReLU) the slope gradient.
  std::array<Tensor, K> sums;
  for (auto& s : sums) s = at::empty({C}, mean.options());
  at::parallel_for(0, C, kMergeGrain, [&](int64_t begin, int64_t end) {
    std::vector<double> acc(end - begin);
    for (size_t k = 0; k < K; ++k) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t g = 0; g < G; ++g) {
        const T* p = part + (k * G + g) * C + begin;
        for (int64_t c = 0; c < end - begin; ++c) acc[c] += double(p[c]);
      }
      std::copy(acc.begin(), acc.end(), sums[k].template mutable_data_ptr<T>() + begin);
    }
  });
  const Tensor grad_bias = sums[0];
  const Tensor grad_weight = sums[1] * invstd;
  Tensor grad_slope = at::empty({0}, mean.options());
  if constexpr (kPReLU) grad_slope = sums[2];

  // dx = A * dz + B * (x - mean) + D
  const Tensor A = scale;
  const Tensor B = batch_stats ? -A * invstd * grad_weight / double(M) : at::zeros_like(A);
  const Tensor D = batch_stats ? -A * grad_bias / double(M) : at::zeros_like(A);
  ParamPtrs<T, kPReLU ? 7 : 6> dparams;
  std::copy(zparams.begin(), zparams.begin() + 3, dparams.begin());
  dparams[3] = A.const_data_ptr<T>();
  dparams[4] = B.const_data_ptr<T>();
  dparams[5] = D.const_data_ptr<T>();
  if constexpr (kPReLU) dparams[6] = slope.const_data_ptr<T>();
  Tensor grad_input = at::empty_like(input);
  scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
  parallel_for_tiles(geo, t, [&](const Tile& tile) {
    map_tile<scalar_t>(geo, tile, std::array<const scalar_t*, 2>{x, dy}, dparams, dx,
                       [](const auto& P, const auto& X) {
                         const Vec xc = X[0] - P[0];
                         const Vec z = xc * P[1] + P[2];
                         const Vec dz = grad_z<kPReLU>(z, X[1], kPReLU ? &P.back() : nullptr);
                         return P[3] * dz + P[4] * xc + P[5];
                       });
  });
  return {grad_input, grad_weight, grad_bias, grad_slope};
}

bool has(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

void check_floating(const Tensor& x, const char* name) {
  const auto s = x.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, name,
              ": expected a float16, bfloat16, float32 or float64 tensor, got ", s);
}

template <typename F>
void dispatch_activation(bool prelu, const F& f) {
  if (prelu) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

std::tuple<Tensor, Tensor, Tensor> bn_act_fwd_train(const Tensor& input, const std::optional<Tensor>& weight,
                                                    const std::optional<Tensor>& bias,
                                                    const std::optional<Tensor>& slope, double eps) {
  check_floating(input, "input");
  const Geometry geo = geometry_of(input, "input");
  const auto sdtype = stats_dtype(input);
  const int64_t C = geo.C;
  Tensor mean = at::zeros({C}, input.options().dtype(sdtype));
  Tensor invstd = at::full({C}, 1.0 / std::sqrt(eps), input.options().dtype(sdtype));
  Tensor out = at::empty_like(input);
  const Tensor gamma = per_channel(weight, C, 1.0, sdtype, "weight");
  const Tensor beta = per_channel(bias, C, 0.0, sdtype, "bias");
  const Tensor a = per_channel(slope, C, 0.0, sdtype, "slope");
  if (geo.per_channel() == 0) return {out, mean, invstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "bn_act_fwd_train", [&] {
    batch_stats<scalar_t>(geo, input.const_data_ptr<scalar_t>(), eps, mean, invstd);
    dispatch_activation(has(slope), [&](auto prelu) {
      apply_forward<scalar_t, decltype(prelu)::value>(geo, input.const_data_ptr<scalar_t>(), mean, gamma * invstd,
                                                      beta, a, out.mutable_data_ptr<scalar_t>());
    });
  });
  return {out, mean, invstd};
}

Tensor bn_act_fwd_eval(const Tensor& input, const Tensor& mean, const Tensor& invstd,
                       const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                       const std::optional<Tensor>& slope) {
  check_floating(input, "input");
  const Geometry geo = geometry_of(input, "input");
  const auto sdtype = stats_dtype(input);
  const int64_t C = geo.C;
  const Tensor mu = per_channel(mean, C, 0.0, sdtype, "mean");
  const Tensor scale = per_channel(weight, C, 1.0, sdtype, "weight") * per_channel(invstd, C, 1.0, sdtype, "invstd");
  const Tensor beta = per_channel(bias, C, 0.0, sdtype, "bias");
  const Tensor a = per_channel(slope, C, 0.0, sdtype, "slope");
  Tensor out = at::empty_like(input);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "bn_act_fwd_eval", [&] {
    dispatch_activation(has(slope), [&](auto prelu) {
      apply_forward<scalar_t, decltype(prelu)::value>(geo, input.const_data_ptr<scalar_t>(), mu, scale, beta, a,
                                                      out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_bwd(const Tensor& grad_out, const Tensor& input,
                                                      const Tensor& mean, const Tensor& invstd,
                                                      const std::optional<Tensor>& weight,
                                                      const std::optional<Tensor>& bias,
                                                      const std::optional<Tensor>& slope, bool batch_stats) {
  check_floating(input, "input");
  const Geometry geo = geometry_of(input, "input");
  TORCH_CHECK(grad_out.sizes() == input.sizes() && grad_out.scalar_type() == input.scalar_type(),
              "grad_out: expected the shape and dtype of input ", input.sizes(), " ", input.scalar_type(),
              ", got ", grad_out.sizes(), " ", grad_out.scalar_type());
  TORCH_CHECK(geometry_of(grad_out, "grad_out").channels_last == geo.channels_last,
              "grad_out: expected the memory layout of input");
  const auto sdtype = stats_dtype(input);
  const int64_t C = geo.C;
  const Tensor mu = per_channel(mean, C, 0.0, sdtype, "mean");
  const Tensor istd = per_channel(invstd, C, 1.0, sdtype, "invstd");
  const Tensor gamma = per_channel(weight, C, 1.0, sdtype, "weight");
  const Tensor beta = per_channel(bias, C, 0.0, sdtype, "bias");
  const Tensor a = per_channel(slope, C, 0.0, sdtype, "slope");
  if (geo.per_channel() == 0) {
    const Tensor zeros = at::zeros({C}, mu.options());
    return {at::empty_like(input), zeros, zeros.clone(), has(slope) ? zeros.clone() : at::empty({0}, mu.options())};
  }
  std::tuple<Tensor, Tensor, Tensor, Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "bn_act_bwd", [&] {
    dispatch_activation(has(slope), [&](auto prelu) {
      grads = backward<scalar_t, decltype(prelu)::value>(geo, grad_out, input, mu, istd, gamma, beta, a,
                                                         batch_stats);
    });
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrect, CPU, m) {
  m.impl("bn_act_fwd_train", &bn_act_fwd_train);
  m.impl("bn_act_fwd_eval", &bn_act_fwd_eval);
  m.impl("bn_act_bwd", &bn_act_bwd);
}

}  // namespace fusedrect::cpu
