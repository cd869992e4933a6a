// CPU implementation of the fused BatchNorm + ReLU/PReLU ops (schemas in csrc/fusedrect.cpp).
//
// Per channel c over its M elements (fusedrect/reference.py computes the same in PyTorch):
//   forward   z = (x - mean) * scale + beta,  scale = gamma * invstd,  y = z > 0 ? z : a * z  (ReLU: max(z, 0))
//   backward  dz = dy * (z > 0 ? 1 : a),  dbeta = sum dz,  dgamma = invstd * sum dz * (x - mean),
//             da = sum dy * min(z, 0),  dx = A * dz + B * (x - mean) + D  with A = gamma * invstd and, when
//             the batch statistics were used, B = -A * invstd * dgamma / M and D = -A * dbeta / M (else 0).
// The passes compute z = x * scale + shift and dx = A * dz + B * x + E, with shift = beta - mean * scale and
// E = D - B * mean rounded once per channel from fp64 (as ATen's CPU batch norm folds the mean into its shift): one
// coefficient fewer per vector, and one multiply-add (fused where the capability has FMA), bit for bit alike in
// every pass that tests z's sign. Where |mean| >> std the folded constant's rounding adds an error of the order of
// the one that the mean's own fp32 rounding makes (half an ulp of mean * scale). Channels-last rows of more than 64
// channels, whose passes re-read every vector's coefficients from L1, took 0.72-0.97x the time (two threads, fp32,
// AVX-512, caches warm; NCHW 0.91-0.99x).
// SyncBN runs the halves as separate ops: bn_stats (mean, var), bn_act_bwd_reduce (dbeta, dgamma, da) and
// bn_act_bwd_elemt (dx with M and the sums taken over every rank).
// Every pass walks the tiles of tiling.h; reductions write per-tile partials merged in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>

#include "bn_act.h"
#include "buffer_cache.h"
#include "tiling.h"

namespace fusedrect::cpu {
namespace {

using at::Tensor;

// Merging the G tile partials of C channels runs on several threads only when each gets at least kMergeWork
// partials: the merge is a few operations per partial, and a parallel region costs more than a few thousand of
// them (7x7 inputs: G = 6 tile rows).
constexpr int64_t kMergeWork = 1 << 16;

int64_t merge_grain(int64_t groups) { return std::max<int64_t>(1, kMergeWork / std::max<int64_t>(groups, 1)); }

// a - b * c rounded once from fp64: the per-channel constants into which the mean is folded (shift, E).
template <typename T>
T fold(T a, T b, T c) {
  return static_cast<T>(double(a) - double(b) * double(c));
}

// The per-channel coefficients every pass reads, one row of C values each, in the statistics dtype.
enum Row : int64_t { kMean, kScale, kBeta, kShift, kSlope, kB, kD, kE, kInvScale, kInvSlope, kRows };

// Each row starts on a 64-byte line, so that the channels-last passes' vector loads of coefficients (channel
// blocks start at multiples of the vector width) never span two lines, but for an elementwise pass's row tail
// (the vector ending at the last channel, where C is not a multiple of it): from malloc's 16-byte alignment about
// half the processes had every such load split, and the row-by-row channels-last eval took up to 1.7x the time
// in those (32x256x14x14, one thread: 206 against 118 us).
template <typename T>
class ChannelTable {
 public:
  // Every channel's rows from args (args.mean and args.invstd defined).
  ChannelTable(int64_t C, const ChannelArgs& args) : ChannelTable(C) { fill(args, 0, C); }

  // Rows to be filled channel range by range (the training forward's, as its statistics are merged).
  explicit ChannelTable(int64_t C) : C_(ceil_div(C, kLineElems) * kLineElems), data_(kRows * C_ + kLineElems) {
    void* start = data_.data();
    size_t space = data_.size() * sizeof(T);
    base_ = static_cast<T*>(std::align(kLine, kRows * C_ * sizeof(T), start, space));
  }

  // The rows of channels [begin, end) from args (their mean and invstd defined there); a slope of 1 element is
  // shared by every channel.
  void fill(const ChannelArgs& args, int64_t begin, int64_t end) {
    const T* mu = args.mean.const_data_ptr<T>();
    const T* istd = args.invstd.const_data_ptr<T>();
    const T* w = args.weight.defined() ? args.weight.const_data_ptr<T>() : nullptr;
    const T* b = args.bias.defined() ? args.bias.const_data_ptr<T>() : nullptr;
    const T* a = args.slope.defined() ? args.slope.const_data_ptr<T>() : nullptr;
    const bool shared = args.slope.defined() && args.slope.numel() == 1;
    for (int64_t c = begin; c < end; ++c) {
      row(kMean)[c] = mu[c];
      row(kScale)[c] = (w ? w[c] : T(1)) * istd[c];
      row(kBeta)[c] = b ? b[c] : T(0);
      row(kShift)[c] = fold(row(kBeta)[c], mu[c], row(kScale)[c]);
      row(kSlope)[c] = a ? a[shared ? 0 : c] : T(0);
      row(kInvScale)[c] = T(1) / row(kScale)[c];
      row(kInvSlope)[c] = a ? T(1) / row(kSlope)[c] : T(0);
    }
  }

  ChannelTable(const ChannelTable&) = delete;  // base_ points into data_
  ChannelTable& operator=(const ChannelTable&) = delete;

  T* row(Row r) { return base_ + r * C_; }
  const T* row(Row r) const { return base_ + r * C_; }

 private:
  static constexpr size_t kLine = 64;
  static constexpr int64_t kLineElems = kLine / sizeof(T);
  int64_t C_;  // row stride: C rounded up to whole lines
  std::vector<T> data_;
  T* base_;  // the first line in data_
};

// z = x * scale + shift, as every pass that tests z's sign computes it (bit for bit alike).
template <typename Vec>
inline Vec z_of(const Vec& x, const Vec& scale, const Vec& shift) {
  return at::vec::fmadd(x, scale, shift);
}

template <typename Vec>
inline Vec activate(const Vec& z, const Vec* slope) {
  // ReLU as IEEE maximum so NaN propagates (as torch.relu); PReLU as torch.prelu: z > 0 ? z : a * z.
  return slope ? prelu_scale(z, z, *slope) : at::vec::maximum(z, Vec(0));
}

template <bool kPReLU, typename Vec>
inline Vec grad_z(const Vec& z, const Vec& dy, const Vec* slope) {
  // PReLU as torch.prelu's backward (z > 0 ? dy : a * dy); ReLU as threshold_backward (z <= 0 ? 0 : dy).
  if constexpr (kPReLU) {
    return prelu_scale(z, dy, *slope);
  } else {
    return where<SignTest::kNotPositive>(z, Vec(0), dy);
  }
}

// (x - mean, z) for one vector v of the pass's input: x itself (z = x * scale + shift), or, in the
// memory-efficient mode, the output y from which both are recovered (every slope a > 0 and scale != 0):
// z = y > 0 ? y : y / a, x - mean = (z - beta) / scale. P holds {mean, scale, shift, ...} or {1/scale, 1/a, beta,
// ...}.
template <bool kFromOutput, typename Vec, typename Params>
inline std::pair<Vec, Vec> centred_and_z(const Params& P, const Vec& v) {
  if constexpr (kFromOutput) {
    const Vec z = prelu_scale(v, v, P[1]);
    return {(z - P[2]) * P[0], z};
  } else {
    return {v - P[0], z_of(v, P[1], P[2])};
  }
}

// The per-channel rows from which a pass recomputes (x - mean, z) and dz (centred_and_z, grad_z).
template <bool kPReLU, bool kFromOutput, typename T>
ParamPtrs<T, kPReLU ? 4 : 3> z_params(const ChannelTable<T>& table) {
  ParamPtrs<T, kPReLU ? 4 : 3> p;
  p[0] = table.row(kFromOutput ? kInvScale : kMean);
  p[1] = table.row(kFromOutput ? kInvSlope : kScale);
  p[2] = table.row(kFromOutput ? kBeta : kShift);
  if constexpr (kPReLU) p[3] = table.row(kSlope);
  return p;
}

// Tiles of at least this many samples (rows, channels-last) take shifted_stats where it pays: channels-last tiles
// (at least 16 rows but where the batch has fewer than 5 per channel; the two-pass walk down a block's rows, the
// second one from L2, took 2.1-2.7x its time, one thread, fp32, the four ResNet stages), and NCHW tiles of short
// runs (S < kMinChannelElems; the statistics' tiles give them kShiftedChannelElems / S samples or more where N
// allows): with 4 samples or fewer its pass over the per-position rows cost more than the run tails it saves
// (32x256x14x14 statistics, one thread: 1.5x the two-pass walk's time with 2 samples, 1.15-1.2x with 4), and long
// runs have no tails to save.
constexpr int64_t kMinShiftedSamples = 5;

// shifted_stats' one-pass sums lose up to log2(kShiftedSamples) bits where the shift is an outlier (in 2x1
// runs, one sample in six scaled by 1000: 145 ulps of the variance with all 256 samples in one group).
constexpr int64_t kShiftedSamples = 16;

// The statistics' NCHW tiles of short runs hold about this many elements of each channel (N allowing; the other
// passes' tiles kMinChannelElems): 16 samples of 7x7, one group of kShiftedSamples. shifted_stats' finish per
// channel (its per-position rows summed across, five horizontal sums) then serves 16 samples instead of 6: the
// statistics took 0.58-0.76x the time at 7x7, 10x10 and 5x5, 0.85-0.99x at 3x3 and 12x12, and 14x14's tiles (4
// samples, now the two-pass walk's: kMinShiftedSamples) 0.72-0.95x (one thread, AVX-512, fp32, medians of 6-8
// alternating pairs of processes). (The backward's sums, walked run by run, gained nothing from such tiles:
// 1.05-1.23x the time.)
constexpr int64_t kShiftedChannelElems = 768;

// The local mean and sum of squared deviations of each channel of an NCHW tile of whole runs and nt >=
// kMinShiftedSamples samples (a channels-last tile: runs of one position, S = 1, its rows the samples), in one pass
// of shifted sums. A sample's part of the tile, channels [c0, c1) x S positions, is one block of
// L = (c1 - c0) * S contiguous elements; the nt blocks are walked together in columns of vectors (no run tails:
// one partial vector, at the end), a column's vectors of a group of nb <= kShiftedSamples samples in one pass.
// Per position j, with the group's first value k_j as the shift (x - k_j is exact where x is within 2x of k_j, and
// small; 0 where that value is infinite or NaN, so that an infinite input makes the mean infinite, as PyTorch's,
// not NaN), d = x[n][j] - k_j:
//   s1_j = sum_n d,  s2_j = sum_n d^2,  r_j = s1_j / nb (the position's mean is k_j + r_j),  m2_j = s2_j - s1_j r_j.
// The subtraction amplifies the sums' rounding by s2_j / m2_j = 1 + nb (k_j - mean_j)^2 / m2_j <= nb, k_j being
// one of the nb values ((k_j - mean_j)^2 <= (nb - 1) / nb * m2_j): hence the groups. Later groups join by Chan's
// merge, their means as offsets from the shift so far, which then moves to the merged mean (k_j and r_j below
// are the last shift and offset). (Two passes, the second over d - r_j, had taken 1.3-1.7x the time: four
// dependent adds a vector.) Then per channel c over its S positions (Chan's combination of S groups of nt
// elements), walked as the runs of one NCHW sample of c1 - c0 channels over the rows of k_j, r_j and m2_j:
//   mean_c = (sum_j k_j + sum_j r_j) / S,  m2_c = sum_j m2_j + nt * (sum_j e^2 - (sum_j e)^2 / S)
//   with e = (k_j - mean_c) + r_j,
// where the rounding of mean_c shifts every e alike and the (sum_j e)^2 term removes it. (Position means rounded
// on their own instead had independent errors of eps * |mean|, and the variance of x = 300 + 2 * randn lost a
// digit to them.) Run by run, a 7x7 run was 3 vectors and a 1-lane tail, and the statistics took 2.4x the time of
// the channels-last ones (then two passes) over the same bytes.
template <typename scalar_t>
void shifted_stats(const Geometry& geo, const Tile& tile, const scalar_t* x, opmath_t<scalar_t>* tile_mean,
                   opmath_t<scalar_t>* tile_m2) {
  using T = opmath_t<scalar_t>;
  using Vec = MathVec<scalar_t>;
  using TVec = MathVec<T>;
  constexpr int64_t V = Vec::size();
  const int64_t S = geo.S;
  const int64_t width = tile.c1 - tile.c0;
  const int64_t L = width * S;
  const int64_t nt = tile.n1 - tile.n0;
  const int64_t stride = geo.C * S;  // from one sample's block to the next
  const scalar_t* block = x + (tile.n0 * geo.C + tile.c0) * S;
  // Left uninitialised (every value is written before it is read): zeroing it had cost a tenth of the pass.
  const std::unique_ptr<T[]> scratch(new T[3 * L + 2 * width]);
  T* pos_k = scratch.get();  // k_j
  T* pos_r = pos_k + L;       // r_j
  T* pos_m2 = pos_r + L;      // m2_j
  T* e_sum = pos_m2 + L;      // per channel: sum_j e
  T* within = e_sum + width;  // per channel: sum_j m2_j
  const int64_t groups = ceil_div(nt, kShiftedSamples);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t lo = g * nt / groups;  // the group's samples [lo, hi), shared out evenly
    const int64_t hi = (g + 1) * nt / groups;
    const Vec inv_nb(T(1) / T(hi - lo));
    const Vec weight_a(T(lo) / T(hi));             // na / (na + nb), joining the na = lo samples before it
    const Vec weight_b(T(hi - lo) / T(hi));        // nb / (na + nb)
    const Vec joined(T(lo) * T(hi - lo) / T(hi));  // na nb / (na + nb)
    // Three values a vector (the shift and two sums): 2 * kBlockVectors vectors a column take 12 of AVX2's 16
    // registers (24 of AVX-512's 32), and keep as many independent chains of adds in flight.
    for_vector_blocks<2 * kBlockVectors, V>(0, L, [&](int64_t j, auto vectors, int64_t n) {
      constexpr size_t B = decltype(vectors)::value;
      std::array<Vec, B> k, sum, sq;
      static_for<B>([&](auto b) {
        const Vec first = load(block + lo * stride + j + int64_t(b) * V, n);
        k[b] = Vec::blendv(Vec(T(0)), first, (first - first) == Vec(T(0)));  // an infinite or NaN shift: 0
        sum[b] = first - k[b];  // the first sample's d: 0 where its value is the shift
        sq[b] = sum[b] * sum[b];
      });
      for (int64_t s = lo + 1; s < hi; ++s) {
        static_for<B>([&](auto b) {
          const Vec d = load(block + s * stride + j + int64_t(b) * V, n) - k[b];
          sum[b] = sum[b] + d;
          sq[b] = sq[b] + d * d;
        });
      }
      static_for<B>([&](auto b) {
        const int64_t at = j + int64_t(b) * V;
        Vec shift = k[b];
        Vec r = sum[b] * inv_nb;
        // Where the squares of finite deviations overflowed (|d| > ~1e19 in fp32) so did sum * r: m2 stays
        // infinite (as PyTorch's variance), not inf - inf. (Fused into one multiply-add, as the AVX builds
        // compile it, the product is not rounded to inf: the same result without the blend; the DEFAULT build,
        // without FMA, gave NaN.) An infinite input, whose sum is not finite, still gives NaN, as PyTorch's.
        const auto overflowed = (sq[b] == Vec(std::numeric_limits<T>::infinity())) & ((sum[b] - sum[b]) == Vec(T(0)));
        Vec m2 = Vec::blendv(sq[b] - sum[b] * r, sq[b], overflowed);
        if (g > 0) {  // Chan's merge, the group's mean as an offset from the samples so far's shift
          // (a weighted sum, not ra + delta * nb / n: an infinite ra would make that NaN)
          shift = load(pos_k + at, n);
          const Vec ra = load(pos_r + at, n);
          const Vec rb = (k[b] - shift) + r;
          const Vec delta = rb - ra;
          r = ra * weight_a + rb * weight_b;
          m2 = load(pos_m2 + at, n) + m2 + delta * delta * joined;
        }
        // The shift moves to the mean so far (where finite), the offset keeping what that rounded off (exactly
        // where |shift| >= |r|, else but for about eps * |r|): so later merges round offsets the size of the
        // group means' spread, not of an outlier shift's distance from them (kept at the first value, 63 merges
        // of 16 channels-last rows lost 1.3e-6 of a standard deviation of the mean where the first sample was
        // 1000x the others).
        const Vec moved = shift + r;
        const auto finite = (moved - moved) == Vec(T(0));
        store(pos_k + at, Vec::blendv(shift, moved, finite), n);
        store(pos_r + at, Vec::blendv(r, (shift - moved) + r, finite), n);
        store(pos_m2 + at, m2, n);
      });
    });
  }
  T* mean = tile_mean + tile.c0;
  T* m2 = tile_m2 + tile.c0;
  if (S == 1) {  // one position a channel: its mean k + r, its m2 the position's
    for (int64_t c = 0; c < width; ++c) {
      mean[c] = pos_k[c] + pos_r[c];
      m2[c] = pos_m2[c];
    }
    return;
  }
  const Geometry rows{1, width, S, false};
  const Tile all{0, 0, 1, 0, width, 0, S};
  reduce_tile<T, 0, 2, 2>(rows, all, {pos_k, pos_r}, {}, {mean, e_sum},
                          [](const auto&, const auto& X) { return std::array<TVec, 2>{X[0], X[1]}; });
  for (int64_t c = 0; c < width; ++c) mean[c] = (mean[c] + e_sum[c]) / T(S);  // (sum_j k_j + sum_j r_j) / S
  reduce_tile<T, 1, 3, 3>(rows, all, {pos_k, pos_r, pos_m2}, {mean}, {m2, e_sum, within},
                          [](const auto& P, const auto& X) {
                            const TVec e = (X[0] - P[0]) + X[1];
                            return std::array<TVec, 3>{e * e, e, X[2]};
                          });
  for (int64_t c = 0; c < width; ++c) {
    // NaN only where sum_j e^2 and (sum_j e)^2 both overflowed: then the spread is beyond fp range too.
    const T spread = m2[c] - e_sum[c] * e_sum[c] / T(S);
    m2[c] = within[c] + T(nt) * (std::isnan(spread) ? std::numeric_limits<T>::infinity() : spread);
  }
}

// Bytes of an input-sized tensor.
template <typename scalar_t>
int64_t tensor_bytes(const Geometry& geo) {
  return geo.per_channel() * geo.C * int64_t(sizeof(scalar_t));
}

// Batch statistics: per tile, the local mean and sum of squared deviations from it (shifted_stats, or, for NCHW
// tiles of long runs and tiles of too few samples, two passes over a tile that sits in cache, the second one
// corrected), then Chan et al.'s pairwise merge of the tiles in a fixed order, in fp64. Tiled as the training
// forward (two_pass_plan: x read twice, y written), which bn_stats follows where it runs alone.
template <typename scalar_t>
class BatchStats {
 public:
  using T = opmath_t<scalar_t>;

  BatchStats(const Geometry& geo, const scalar_t* x)
      : geo_(geo),
        x_(x),
        short_runs_(!geo.channels_last && geo.S < kMinChannelElems),
        plan_(two_pass_plan(geo, short_runs_ ? kShiftedChannelElems : kMinChannelElems, sizeof(scalar_t),
                            2 * tensor_bytes<scalar_t>(geo))),
        G_(plan_.tiling.groups()),
        partials_(3 * G_ * geo.C),
        counts_(tile_counts(geo, plan_.tiling)) {}

  const TwoPassPlan& plan() const { return plan_; }
  int64_t finish_grain() const { return merge_grain(G_); }

  // The tile's partials: its channels' local mean and m2.
  void reduce(const Tile& tile) {
    using Vec = MathVec<scalar_t>;
    const int64_t C = geo_.C;
    T* tile_mean = partials_.data() + tile.g * C;
    T* tile_m2 = tile_mean + G_ * C;
    T* tile_dsum = tile_m2 + G_ * C;  // scratch: sum of deviations from the tile's (rounded) mean
    if ((geo_.channels_last || short_runs_) && tile.n1 - tile.n0 >= kMinShiftedSamples) {
      // A channels-last tile is an NCHW one of runs of one position (its s0 = 0, s1 = 1), its rows the samples.
      shifted_stats(geo_.channels_last ? Geometry{plan_.tiling.rows, C, 1, false} : geo_, tile, x_, tile_mean,
                    tile_m2);
      return;
    }
    reduce_tile<scalar_t, 0, 1, 1>(geo_, tile, {x_}, {}, {tile_mean},
                                   [](const auto&, const auto& X) { return std::array<Vec, 1>{X[0]}; });
    const T inv_count = T(1) / T(tile.count());
    for (int64_t c = tile.c0; c < tile.c1; ++c) tile_mean[c] *= inv_count;
    reduce_tile<scalar_t, 1, 1, 2>(geo_, tile, {x_}, {tile_mean}, {tile_m2, tile_dsum},
                                   [](const auto& P, const auto& X) {
                                     const Vec d = X[0] - P[0];
                                     return std::array<Vec, 2>{d * d, d};
                                   });
    // Corrected two-pass: m2 = sum d^2 - (sum d)^2 / n removes the error of the rounded tile mean. The
    // correction is at most sum d^2: where it overflows, so did sum d^2 (|x| > 1e19 in fp32), and m2 stays
    // infinite (the variance, as PyTorch's), not inf - inf = NaN. (Where the tile's sum of x itself overflows,
    // |x| > ~1e34, its mean and every d are not finite: NaN, where PyTorch's fp64 sums give inf.)
    for (int64_t c = tile.c0; c < tile.c1; ++c) {
      const T correction = tile_dsum[c] * inv_count * tile_dsum[c];
      if (std::isfinite(correction)) tile_m2[c] -= correction;
    }
  }

  // Chan's merge of channels [begin, end) once all their tiles are reduced: with n elements merged so far and nb
  // in tile row g (the same for every channel),
  //   delta = mean_g - mean,  mean += delta * nb / (n + nb),  m2 += m2_g + delta^2 * n * nb / (n + nb).
  // Rows in order, channels innermost (contiguous, vectorised by the compiler), in fp64. Calls store(c, mean_c,
  // var_c) with channel c's mean and biased variance, in fp64.
  template <typename Store>
  void merge(int64_t begin, int64_t end, const Store& store) const {
    const int64_t C = geo_.C;
    const T* local_mean = partials_.data();
    const T* local_m2 = local_mean + G_ * C;
    std::vector<double> mu(end - begin, 0.0), m2(end - begin, 0.0);
    double n = 0;
    for (int64_t g = 0; g < G_; ++g) {
      const double nb = double(counts_[g]);
      const double total = n + nb;
      const double a = nb / total;
      const double b = n * nb / total;
      const T* lm = local_mean + g * C + begin;
      const T* lm2 = local_m2 + g * C + begin;
      for (int64_t c = 0; c < end - begin; ++c) {
        const double delta = double(lm[c]) - mu[c];
        // An infinite mean so far or in the tile (an infinite input): the weighted sum, which keeps it (as
        // PyTorch's sums: inf, or NaN from inf and -inf), where mu + delta * a would be inf - inf.
        mu[c] = std::isfinite(delta) ? mu[c] + delta * a : mu[c] * (1 - a) + double(lm[c]) * a;
        // The first tile (n = 0, b = 0) adds no delta^2 term: inf * 0 = NaN where delta^2 overflows even fp64
        // (|x| > ~1e154, fp64 inputs; the variance is then infinite, not NaN).
        const double spread = n > 0 ? delta : 0.0;
        m2[c] += double(lm2[c]) + spread * spread * b;
      }
      n = total;
    }
    const double M = double(geo_.per_channel());
    for (int64_t c = begin; c < end; ++c) store(c, mu[c - begin], m2[c - begin] / M);
  }

 private:
  Geometry geo_;
  const scalar_t* x_;
  bool short_runs_;
  TwoPassPlan plan_;
  int64_t G_;
  std::vector<T> partials_;  // per (row g, channel): local mean, local m2, scratch
  std::vector<int64_t> counts_;
};

// y = act(x * scale + shift) over one tile: the second pass of the training forward and the whole eval forward.
template <typename scalar_t, bool kPReLU>
void forward_tile(const Geometry& geo, const Tile& tile, const scalar_t* x,
                  const ChannelTable<opmath_t<scalar_t>>& table, scalar_t* y) {
  using Vec = MathVec<scalar_t>;
  ParamPtrs<opmath_t<scalar_t>, kPReLU ? 3 : 2> params;
  params[0] = table.row(kScale);
  params[1] = table.row(kShift);
  if constexpr (kPReLU) params[2] = table.row(kSlope);
  map_tile<scalar_t>(geo, tile, std::array<const scalar_t*, 1>{x}, params, y, [](const auto& P, const auto& X) {
    return activate(z_of(X[0], P[0], P[1]), kPReLU ? &P.back() : nullptr);
  });
}

// The reduce half of backward: (sum_dz, sum_dz_xhat, grad_slope) per channel, in T, from one pass over the tiles
// and a fixed-order merge of their partials:
//   sum_dz = sum dz = dbeta,  sum_dz_xhat = invstd * sum dz * (x - mean) = dgamma,  grad_slope = sum dy * min(z, 0)
// (grad_slope of shape (0,) for ReLU). `input` is x, or the output y where kFromOutput (the memory-efficient
// mode, PReLU only). Tiled as the whole backward (two_pass_plan: x and dy read twice, dx written), which the
// reduce half (bn_act_bwd_reduce) follows where it runs alone.
template <typename scalar_t, bool kPReLU, bool kFromOutput = false>
class BackwardSums {
 public:
  using T = opmath_t<scalar_t>;
  static constexpr size_t K = kPReLU ? 3 : 2;
  static_assert(kPReLU || !kFromOutput, "ReLU's output does not determine its input");

  BackwardSums(const Geometry& geo, const Tensor& grad_out, const Tensor& input, const Tensor& invstd,
               const ChannelTable<T>& table)
      : geo_(geo),
        plan_(two_pass_plan(geo, kMinChannelElems, 2 * int64_t(sizeof(scalar_t)), 3 * tensor_bytes<scalar_t>(geo))),
        G_(plan_.tiling.groups()),
        x_(input.const_data_ptr<scalar_t>()),
        dy_(grad_out.const_data_ptr<scalar_t>()),
        zparams_(z_params<kPReLU, kFromOutput>(table)),
        istd_(invstd.const_data_ptr<T>()),
        partials_(K * G_ * geo.C),
        sum_dz_(at::empty({geo.C}, invstd.options())),
        sum_dz_xhat_(at::empty({geo.C}, invstd.options())),
        grad_slope_(at::empty({kPReLU ? geo.C : 0}, invstd.options())),
        dbeta_(sum_dz_.mutable_data_ptr<T>()),
        dgamma_(sum_dz_xhat_.mutable_data_ptr<T>()),
        dslope_(grad_slope_.mutable_data_ptr<T>()) {}

  const TwoPassPlan& plan() const { return plan_; }
  int64_t finish_grain() const { return merge_grain(G_); }

  // Per tile: sum dz, sum dz * (x - mean) and (PReLU) sum dy * min(z, 0).
  void reduce(const Tile& tile) {
    using Vec = MathVec<scalar_t>;
    std::array<T*, K> acc;
    for (size_t k = 0; k < K; ++k) acc[k] = partials_.data() + (k * G_ + tile.g) * geo_.C;
    reduce_tile<scalar_t>(geo_, tile, std::array<const scalar_t*, 2>{x_, dy_}, zparams_, acc,
                          [](const auto& P, const auto& X) {
                            const auto [xc, z] = centred_and_z<kFromOutput, Vec>(P, X[0]);
                            const Vec dz = grad_z<kPReLU>(z, X[1], kPReLU ? &P.back() : nullptr);
                            std::array<Vec, K> terms;
                            terms[0] = dz;
                            terms[1] = dz * xc;
                            if constexpr (kPReLU) terms[2] = product_where_not_positive(z, X[1]);
                            return terms;
                          });
  }

  // Fixed-order merge of channels [begin, end)'s partials, in fp64, once all their tiles are reduced.
  void merge(int64_t begin, int64_t end) {
    const int64_t C = geo_.C;
    std::vector<double> sums(K * (end - begin), 0.0);
    for (size_t k = 0; k < K; ++k) {
      double* s = sums.data() + k * (end - begin);
      for (int64_t g = 0; g < G_; ++g) {
        const T* p = partials_.data() + (k * G_ + g) * C + begin;
        for (int64_t c = 0; c < end - begin; ++c) s[c] += double(p[c]);
      }
    }
    for (int64_t c = begin; c < end; ++c) {
      const int64_t i = c - begin;
      dbeta_[c] = T(sums[i]);
      dgamma_[c] = T(sums[(end - begin) + i]) * istd_[c];
      if constexpr (kPReLU) dslope_[c] = T(sums[2 * (end - begin) + i]);
    }
  }

  // (sum_dz, sum_dz_xhat, grad_slope), merged.
  std::tuple<Tensor, Tensor, Tensor> result() const { return {sum_dz_, sum_dz_xhat_, grad_slope_}; }

 private:
  Geometry geo_;
  TwoPassPlan plan_;
  int64_t G_;
  const scalar_t* x_;
  const scalar_t* dy_;
  ParamPtrs<T, kPReLU ? 4 : 3> zparams_;
  const T* istd_;
  std::vector<T> partials_;  // per (term k, row g, channel)
  Tensor sum_dz_, sum_dz_xhat_, grad_slope_;
  T* dbeta_;  // their data
  T* dgamma_;
  T* dslope_;
};

// The coefficients of dx = A * dz + B * (x - mean) + D for channels [begin, end): A = gamma * invstd (the table's
// scale) and, from batch statistics over `count` elements per channel (on every rank together, for SyncBN),
// B = -A * invstd * sum_dz_xhat / count, D = -A * sum_dz / count and E = D - B * mean into the table. Returns
// whether any B or D is nonzero (zero sums, as frozen_input_grad passes for given statistics, make the terms
// vanish).
template <typename T>
bool dx_coefficients(ChannelTable<T>& table, int64_t begin, int64_t end, const T* istd, const T* sum_dz,
                     const T* sum_dz_xhat, int64_t count) {
  const T inv_count = T(1) / T(count);
  bool nonzero = false;
  for (int64_t c = begin; c < end; ++c) {
    const T A = table.row(kScale)[c];
    table.row(kB)[c] = -A * istd[c] * sum_dz_xhat[c] * inv_count;
    table.row(kD)[c] = -A * sum_dz[c] * inv_count;
    table.row(kE)[c] = fold(table.row(kD)[c], table.row(kB)[c], table.row(kMean)[c]);
    nonzero = nonzero || table.row(kB)[c] != T(0) || table.row(kD)[c] != T(0);
  }
  return nonzero;
}

// The elementwise half of backward over one tile: dx = A * dz + B * x + E (from the output y in the
// memory-efficient mode: A * dz + B * (x - mean) + D) with the table's coefficients (dx_coefficients), in the
// input's dtype and layout, into dx (which may be grad_out itself: each element is read before it is written).
// Without batch terms (given statistics) dx = A * dz, so an infinite x gives PyTorch's finite gradient, not
// inf * 0. With them, the whole backward's (batch statistics), which knows no channel's sums before it walks the
// first (two_passes, slab by slab), takes every channel's B and E as they are, zero or not (a zero adds nothing
// but the sign of a zero); the elementwise half alone, given every sum, drops them where all B and D are zero.
template <typename scalar_t, bool kPReLU, bool kFromOutput, bool kBatchTerms>
void grad_input_tile(const Geometry& geo, const Tile& tile, const scalar_t* x, const scalar_t* dy,
                     const ChannelTable<opmath_t<scalar_t>>& table, scalar_t* dx) {
  using Vec = MathVec<scalar_t>;
  // Rows: z's (from x: scale = A, shift; from y: z_params' three, then A), B and E (from y: D), the slope last.
  constexpr size_t iA = kFromOutput ? 3 : 0;
  constexpr size_t iB = kFromOutput ? 4 : 2;
  ParamPtrs<opmath_t<scalar_t>, iB + 2 * kBatchTerms + kPReLU> params;
  if constexpr (kFromOutput) {
    const auto zparams = z_params<kPReLU, true>(table);
    std::copy(zparams.begin(), zparams.begin() + 3, params.begin());
  } else {
    params[1] = table.row(kShift);
  }
  params[iA] = table.row(kScale);
  if constexpr (kBatchTerms) {
    params[iB] = table.row(kB);
    params[iB + 1] = table.row(kFromOutput ? kD : kE);
  }
  if constexpr (kPReLU) params.back() = table.row(kSlope);
  map_tile<scalar_t>(geo, tile, std::array<const scalar_t*, 2>{x, dy}, params, dx,
                     [](const auto& P, const auto& X) {
                       const Vec* slope = kPReLU ? &P.back() : nullptr;
                       if constexpr (kFromOutput) {
                         const auto [xc, z] = centred_and_z<true, Vec>(P, X[0]);
                         const Vec dz = grad_z<kPReLU>(z, X[1], slope);
                         if constexpr (kBatchTerms) {
                           return P[iA] * dz + P[iB] * xc + P[iB + 1];
                         } else {
                           return P[iA] * dz;
                         }
                       } else {
                         const Vec dz = grad_z<kPReLU>(z_of(X[0], P[0], P[1]), X[1], slope);
                         if constexpr (kBatchTerms) {
                           return at::vec::fmadd(P[iA], dz, at::vec::fmadd(P[iB], X[0], P[iB + 1]));
                         } else {
                           return P[iA] * dz;
                         }
                       }
                     });
}

// Calls f(std::bool_constant<b>{}).
template <typename F>
void with_bool(bool b, const F& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Whole backward, the two halves (two_passes): (grad_input, grad_weight, grad_bias, grad_slope), per-channel
// gradients of dtype T. batch_stats: mean and invstd were computed from this input's M elements. dx_out: where
// defined, dx is written there (grad_out itself, or a tensor overlapping neither input), else into a new tensor.
template <typename scalar_t, bool kPReLU, bool kFromOutput = false>
std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Geometry& geo, const Tensor& grad_out,
                                                    const Tensor& input, const Tensor& invstd,
                                                    ChannelTable<opmath_t<scalar_t>>& table, bool batch_stats,
                                                    const Tensor& dx_out = Tensor()) {
  using T = opmath_t<scalar_t>;
  BackwardSums<scalar_t, kPReLU, kFromOutput> sums(geo, grad_out, input, invstd, table);
  Tensor sum_dz, sum_dz_xhat, grad_slope;
  std::tie(sum_dz, sum_dz_xhat, grad_slope) = sums.result();
  Tensor grad = dx_out.defined() ? dx_out : empty_like_recycled(input);
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();
  scalar_t* dx = grad.mutable_data_ptr<scalar_t>();
  const T* istd = invstd.const_data_ptr<T>();
  const T* dbeta = sum_dz.const_data_ptr<T>();
  const T* dgamma = sum_dz_xhat.const_data_ptr<T>();
  with_bool(batch_stats, [&](auto batch_terms) {
    two_passes(
        geo, sums.plan(), sums.finish_grain(), tiling_of(geo), [&](const Tile& tile) { sums.reduce(tile); },
        [&](int64_t begin, int64_t end) {
          sums.merge(begin, end);
          if constexpr (decltype(batch_terms)::value) {
            dx_coefficients(table, begin, end, istd, dbeta, dgamma, geo.per_channel());
          }
        },
        [&](const Tile& tile) {
          grad_input_tile<scalar_t, kPReLU, kFromOutput, decltype(batch_terms)::value>(geo, tile, x, dy, table, dx);
        });
  });
  return {grad, sum_dz_xhat, sum_dz, grad_slope};
}

// Calls f(scalar_t{}, std::bool_constant<prelu>{}) for the input dtype and the activation.
template <typename F>
void dispatch(const Tensor& input, bool prelu, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fusedrect::bn_act", [&] {
    with_bool(prelu, [&](auto activation) { f(scalar_t{}, activation); });
  });
}

// The geometry of `input` after the checks every op opens with (those of `grad_out` too, where given).
Geometry checked_geometry(const Tensor& input, const char* name, const Tensor* grad_out = nullptr) {
  check_floating(input, name);
  const Geometry geo = geometry_of(input, name);
  if (grad_out != nullptr) check_grad_out(*grad_out, "grad_out", input, name, geo);
  return geo;
}

// The reduce half's sums over an empty batch: (sum_dz, sum_dz_xhat, grad_slope), all zero.
std::tuple<Tensor, Tensor, Tensor> zero_sums(const ChannelArgs& args, int64_t C) {
  const auto options = args.invstd.options();
  return {at::zeros({C}, options), at::zeros({C}, options), at::zeros({args.slope.defined() ? C : 0}, options)};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> bn_act_fwd_train(const Tensor& input, const std::optional<Tensor>& weight,
                                                    const std::optional<Tensor>& bias,
                                                    const std::optional<Tensor>& slope, double eps) {
  const Geometry geo = checked_geometry(input, "input");
  const auto sdtype = stats_dtype(input);
  const int64_t C = geo.C;
  ChannelArgs args(C, sdtype, std::nullopt, std::nullopt, weight, bias, slope);
  Tensor out = empty_like_recycled(input);
  if (geo.per_channel() == 0) {  // an empty batch: mean 0, var 0 (never used to update running statistics)
    return {out, at::zeros({C}, input.options().dtype(sdtype)),
            at::full({C}, 1.0 / std::sqrt(eps), input.options().dtype(sdtype))};
  }
  args.mean = at::empty({C}, input.options().dtype(sdtype));
  args.invstd = at::empty({C}, input.options().dtype(sdtype));
  dispatch(input, args.slope.defined(), [&](auto scalar, auto prelu) {
    using scalar_t = decltype(scalar);
    using T = opmath_t<scalar_t>;
    T* mean = args.mean.mutable_data_ptr<T>();
    T* invstd = args.invstd.mutable_data_ptr<T>();
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    BatchStats<scalar_t> stats(geo, x);
    ChannelTable<T> table(C);
    two_passes(
        geo, stats.plan(), stats.finish_grain(), tiling_of(geo), [&](const Tile& tile) { stats.reduce(tile); },
        [&](int64_t begin, int64_t end) {
          stats.merge(begin, end, [&](int64_t c, double mu, double var) {
            mean[c] = T(mu);
            invstd[c] = T(1.0 / std::sqrt(var + eps));
          });
          table.fill(args, begin, end);
        },
        [&](const Tile& tile) { forward_tile<scalar_t, decltype(prelu)::value>(geo, tile, x, table, y); });
  });
  return {out, args.mean, args.invstd};
}

Tensor bn_act_fwd_eval(const Tensor& input, const Tensor& mean, const Tensor& invstd,
                       const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                       const std::optional<Tensor>& slope) {
  const Geometry geo = checked_geometry(input, "input");
  const int64_t C = geo.C;
  const ChannelArgs args(C, stats_dtype(input), mean, invstd, weight, bias, slope);
  Tensor out = empty_like_recycled(input);
  if (out.numel() == 0) return out;
  dispatch(input, args.slope.defined(), [&](auto scalar, auto prelu) {
    using scalar_t = decltype(scalar);
    const ChannelTable<opmath_t<scalar_t>> table(C, args);
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    parallel_for_tiles(geo, tiling_of(geo), [&](const Tile& tile) {
      forward_tile<scalar_t, decltype(prelu)::value>(geo, tile, x, table, y);
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_bwd_into(const Tensor& dx_out, const Tensor& grad_out,
                                                           const Tensor& input, const Tensor& mean,
                                                           const Tensor& invstd, const std::optional<Tensor>& weight,
                                                           const std::optional<Tensor>& bias,
                                                           const std::optional<Tensor>& slope, bool batch_stats) {
  const Geometry geo = checked_geometry(input, "input", &grad_out);
  if (dx_out.defined()) {  // grad_out itself (read before written, element by element) or no overlap at all
    check_grad_out(dx_out, "dx_out", input, "input", geo);
    at::assert_no_partial_overlap(dx_out, grad_out);
    at::assert_no_overlap(dx_out, input);
  }
  const int64_t C = geo.C;
  const ChannelArgs args(C, stats_dtype(input), mean, invstd, weight, bias, slope);
  if (geo.per_channel() == 0) {
    const auto [sum_dz, sum_dz_xhat, grad_slope] = zero_sums(args, C);
    return {dx_out.defined() ? dx_out : at::empty_like(input), sum_dz_xhat, sum_dz, grad_slope};
  }
  std::tuple<Tensor, Tensor, Tensor, Tensor> grads;
  dispatch(input, args.slope.defined(), [&](auto scalar, auto prelu) {
    using scalar_t = decltype(scalar);
    ChannelTable<opmath_t<scalar_t>> table(C, args);
    grads = backward<scalar_t, decltype(prelu)::value>(geo, grad_out, input, args.invstd, table, batch_stats,
                                                       dx_out);
  });
  return grads;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_bwd(const Tensor& grad_out, const Tensor& input,
                                                      const Tensor& mean, const Tensor& invstd,
                                                      const std::optional<Tensor>& weight,
                                                      const std::optional<Tensor>& bias,
                                                      const std::optional<Tensor>& slope, bool batch_stats) {
  return bn_act_bwd_into(Tensor(), grad_out, input, mean, invstd, weight, bias, slope, batch_stats);
}

namespace {

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_bwd_from_output(const Tensor& grad_out, const Tensor& output,
                                                                  const Tensor& invstd,
                                                                  const std::optional<Tensor>& weight,
                                                                  const std::optional<Tensor>& bias,
                                                                  const Tensor& slope) {
  const Geometry geo = checked_geometry(output, "output", &grad_out);
  const int64_t C = geo.C;
  ChannelArgs args(C, stats_dtype(output), std::nullopt, invstd, weight, bias, slope);
  args.mean = at::zeros({C}, args.invstd.options());  // unused: x - mean is recovered from the output
  if (geo.per_channel() == 0) {
    const auto [sum_dz, sum_dz_xhat, grad_slope] = zero_sums(args, C);
    return {at::empty_like(output), sum_dz_xhat, sum_dz, grad_slope};
  }
  std::tuple<Tensor, Tensor, Tensor, Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, output.scalar_type(), "bn_act_bwd_from_output", [&] {
    ChannelTable<opmath_t<scalar_t>> table(C, args);
    grads = backward<scalar_t, true, true>(geo, grad_out, output, args.invstd, table, true);
  });
  return grads;
}

// The statistics half of bn_act_fwd_train (for SyncBN, which merges them over ranks): (mean, biased var).
std::tuple<Tensor, Tensor> bn_stats(const Tensor& input) {
  const Geometry geo = checked_geometry(input, "input");
  const auto options = input.options().dtype(stats_dtype(input));
  if (geo.per_channel() == 0) return {at::zeros({geo.C}, options), at::zeros({geo.C}, options)};
  Tensor mean = at::empty({geo.C}, options);
  Tensor var = at::empty({geo.C}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "bn_stats", [&] {
    using T = opmath_t<scalar_t>;
    T* mean_out = mean.mutable_data_ptr<T>();
    T* var_out = var.mutable_data_ptr<T>();
    BatchStats<scalar_t> stats(geo, input.const_data_ptr<scalar_t>());  // the training forward's tiles: same bits
    reduce_whole(
        geo, stats.plan().tiling, stats.finish_grain(), [&](const Tile& tile) { stats.reduce(tile); },
        [&](int64_t begin, int64_t end) {
          stats.merge(begin, end, [&](int64_t c, double mu, double v) {
            mean_out[c] = T(mu);
            var_out[c] = T(v);
          });
        });
  });
  return {mean, var};
}

// The reduce half of bn_act_bwd: (sum_dz, sum_dz_xhat, grad_slope).
std::tuple<Tensor, Tensor, Tensor> bn_act_bwd_reduce(const Tensor& grad_out, const Tensor& input,
                                                     const Tensor& mean, const Tensor& invstd,
                                                     const std::optional<Tensor>& weight,
                                                     const std::optional<Tensor>& bias,
                                                     const std::optional<Tensor>& slope) {
  const Geometry geo = checked_geometry(input, "input", &grad_out);
  const int64_t C = geo.C;
  const ChannelArgs args(C, stats_dtype(input), mean, invstd, weight, bias, slope);
  if (geo.per_channel() == 0) return zero_sums(args, C);
  std::tuple<Tensor, Tensor, Tensor> sums;
  dispatch(input, args.slope.defined(), [&](auto scalar, auto prelu) {
    using scalar_t = decltype(scalar);
    const ChannelTable<opmath_t<scalar_t>> table(C, args);
    BackwardSums<scalar_t, decltype(prelu)::value> reduction(geo, grad_out, input, args.invstd, table);
    reduce_whole(
        geo, reduction.plan().tiling, reduction.finish_grain(), [&](const Tile& tile) { reduction.reduce(tile); },
        [&](int64_t begin, int64_t end) { reduction.merge(begin, end); });
    sums = reduction.result();
  });
  return sums;
}

// The elementwise half of bn_act_bwd, with the per-channel sums and element count given (over every rank).
Tensor bn_act_bwd_elemt(const Tensor& grad_out, const Tensor& input, const Tensor& mean, const Tensor& invstd,
                        const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                        const std::optional<Tensor>& slope, const Tensor& sum_dz, const Tensor& sum_dz_xhat,
                        int64_t count) {
  const Geometry geo = checked_geometry(input, "input", &grad_out);
  const int64_t C = geo.C;
  const auto sdtype = stats_dtype(input);
  const ChannelArgs args(C, sdtype, mean, invstd, weight, bias, slope);
  const Tensor dz_sum = per_channel(sum_dz, C, sdtype, "sum_dz");
  const Tensor dz_xhat_sum = per_channel(sum_dz_xhat, C, sdtype, "sum_dz_xhat");
  if (geo.per_channel() == 0) return at::empty_like(input);
  TORCH_CHECK(count >= geo.per_channel(), "count: expected at least the input's ", geo.per_channel(),
              " elements per channel, got ", count);
  Tensor dx;
  dispatch(input, args.slope.defined(), [&](auto scalar, auto prelu) {
    using scalar_t = decltype(scalar);
    using T = opmath_t<scalar_t>;
    ChannelTable<T> table(C, args);
    const bool batch_terms = dx_coefficients(table, 0, C, args.invstd.const_data_ptr<T>(),
                                             dz_sum.const_data_ptr<T>(), dz_xhat_sum.const_data_ptr<T>(), count);
    dx = empty_like_recycled(input);
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();
    scalar_t* out = dx.mutable_data_ptr<scalar_t>();
    with_bool(batch_terms, [&](auto terms) {
      parallel_for_tiles(geo, tiling_of(geo), [&](const Tile& tile) {
        grad_input_tile<scalar_t, decltype(prelu)::value, false, decltype(terms)::value>(geo, tile, x, dy, table,
                                                                                         out);
      });
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrect, CPU, m) {
  m.impl("bn_act_bwd_from_output", &bn_act_bwd_from_output);
  m.impl("bn_act_fwd_train", &bn_act_fwd_train);
  m.impl("bn_act_fwd_eval", &bn_act_fwd_eval);
  m.impl("bn_act_bwd", &bn_act_bwd);
  m.impl("bn_stats", &bn_stats);
  m.impl("bn_act_bwd_reduce", &bn_act_bwd_reduce);
  m.impl("bn_act_bwd_elemt", &bn_act_bwd_elemt);
}

}  // namespace fusedrect::cpu
