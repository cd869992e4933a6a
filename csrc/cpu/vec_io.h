// The vector operations the CPU kernels build on: loads and stores of `scalar_t` data as vectors of its math type
// (float for bf16/fp16/fp32, double for fp64), with partial vectors for tails (their lanes past the tail
// unspecified), stores past the caches, the sign selects of ReLU/PReLU and their derivatives, and a horizontal sum.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

namespace fusedrect::cpu {

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

template <typename scalar_t>
using MathVec = at::vec::Vectorized<opmath_t<scalar_t>>;

template <typename scalar_t>
inline constexpr bool is_reduced_float_v = !std::is_same_v<scalar_t, opmath_t<scalar_t>>;

// Loads `n` elements (n <= vector size). Lanes past `n` are unspecified: reductions mask them out.
// Partial 16-bit vectors are loaded as 16-bit vectors (masked on AVX-512) and widened, not copied element by
// element into a buffer that a vector load then reads: that load waited on the element stores (no store
// forwarding), once per run tail, and bf16 NCHW 7x7 took 2.4x the time of fp32.
template <typename scalar_t>
inline MathVec<scalar_t> load(const scalar_t* p, int64_t n) {
  using Vec = MathVec<scalar_t>;
  if constexpr (is_reduced_float_v<scalar_t>) {
    if (n == Vec::size()) {
      Vec out;
      at::vec::load_to_float<scalar_t>(p, out);
      return out;
    }
    return std::get<0>(at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p, n)));
  } else {
    return Vec::loadu(p, n);  // a masked load on AVX2/AVX512
  }
}

// Stores the first `n` lanes of `v` (n <= vector size), rounding to scalar_t.
template <typename scalar_t>
inline void store(scalar_t* p, const MathVec<scalar_t>& v, int64_t n) {
  using Vec = MathVec<scalar_t>;
  if constexpr (is_reduced_float_v<scalar_t>) {
    const auto narrowed = at::vec::convert_from_float<scalar_t>(v, v);  // v's lanes first
    if (n == Vec::size()) {
      narrowed.store(p, Vec::size());  // its mask a constant
    } else {
      narrowed.store(p, n);  // a masked store on AVX-512
    }
  } else {
    v.store(p, n);
  }
}

// Whether store_streaming can write scalar_t's whole vectors past the caches on this capability: fp32 and fp64
// on AVX2 and AVX-512 (16-bit outputs take store()).
template <typename scalar_t>
inline constexpr bool kCanStream =
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;
#else
    false;
#endif

// Stores a whole vector, past the caches (a non-temporal store: no read of the line for ownership first) where p
// is aligned to the vector's size, else as store(). The writer must call streaming_fence() before the data is read
// elsewhere: such stores are not ordered with other stores.
template <typename scalar_t>
inline void store_streaming(scalar_t* p, const MathVec<scalar_t>& v) {
  if constexpr (kCanStream<scalar_t>) {
    if (reinterpret_cast<std::uintptr_t>(p) % sizeof(MathVec<scalar_t>) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<scalar_t, float>) {
        _mm512_stream_ps(p, v);
      } else {
        _mm512_stream_pd(p, v);
      }
#elif defined(CPU_CAPABILITY_AVX2)
      if constexpr (std::is_same_v<scalar_t, float>) {
        _mm256_stream_ps(p, v);
      } else {
        _mm256_stream_pd(p, v);
      }
#endif
      return;
    }
  }
  store(p, v, MathVec<scalar_t>::size());
}

// Orders the store_streaming stores before those that follow.
inline void streaming_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Lane-wise select on the sign of v: v > 0 (kPositive) or v <= 0 (kNotPositive) ? a : b; a NaN lane tests
// false. On AVX-512 a compare into a mask register and one masked blend: at::vec's comparison operators return
// all-ones lanes that blendv turns back into a mask, two instructions more per select.
enum class SignTest { kPositive, kNotPositive };

template <SignTest kTest, typename T>
inline at::vec::Vectorized<T> where(const at::vec::Vectorized<T>& v, const at::vec::Vectorized<T>& a,
                                    const at::vec::Vectorized<T>& b) {
  using Vec = at::vec::Vectorized<T>;
#ifdef CPU_CAPABILITY_AVX512
  constexpr int kPredicate = kTest == SignTest::kPositive ? _CMP_GT_OQ : _CMP_LE_OQ;
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), kPredicate), b, a);
  } else if constexpr (std::is_same_v<T, double>) {
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(v, _mm512_setzero_pd(), kPredicate), b, a);
  }
#endif
#if defined(CPU_CAPABILITY_AVX2) && defined(__GNUC__) && !defined(__clang__)
  // GCC lowers _mm256_blendv_ps/pd (blendv's) to a select on the sign of the mask, which it takes again from the
  // all-ones compare result with an integer compare (vpcmpgtd/q) before the blend: one instruction more per select,
  // and a crossing from the floating-point pipes and back. A select in GCC's vector extensions is the compare and
  // the blend alone (a NaN lane still tests false). One thread, 32x256x14x14, median of 8 alternating pairs of
  // processes: the eval forward 0.91x the time (NCHW) and 1.03x (channels-last), PReLU's backward sums 0.96x and
  // 0.92x.
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    using Raw = std::conditional_t<std::is_same_v<T, float>, __m256, __m256d>;
    const Raw x = v, zero = Vec(T(0));
    if constexpr (kTest == SignTest::kPositive) {
      return Raw(x > zero ? Raw(a) : Raw(b));
    } else {
      return Raw(x <= zero ? Raw(a) : Raw(b));
    }
  }
#endif
  const Vec zero(T(0));
  if constexpr (kTest == SignTest::kPositive) {
    return Vec::blendv(b, a, v > zero);
  } else {
    return Vec::blendv(b, a, v <= zero);
  }
}

// v > 0 ? a : a * s, lane by lane (a NaN v takes a * s): PReLU with a = v and s its slope, PReLU's derivative
// applied to a, bit for bit where<kPositive>(v, a, s * a) (a NaN's payload aside: the operands' order is the
// compiler's). On AVX-512 one multiply under the mask "v not > 0", no blend (the backward's reduction does two
// such selects among ten operations a vector).
template <typename T>
inline at::vec::Vectorized<T> prelu_scale(const at::vec::Vectorized<T>& v, const at::vec::Vectorized<T>& a,
                                          const at::vec::Vectorized<T>& s) {
#ifdef CPU_CAPABILITY_AVX512
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_mask_mul_ps(a, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NGT_UQ), a, s);
  } else if constexpr (std::is_same_v<T, double>) {
    return _mm512_mask_mul_pd(a, _mm512_cmp_pd_mask(v, _mm512_setzero_pd(), _CMP_NGT_UQ), a, s);
  }
#endif
  return where<SignTest::kPositive>(v, a, s * a);
}

// v > 0 ? 0 : v * b, lane by lane (a NaN v takes v * b), bit for bit where<kPositive>(v, 0, v * b): PReLU's
// slope-gradient term with b = dy. On AVX-512 one zero-masked multiply.
template <typename T>
inline at::vec::Vectorized<T> product_where_not_positive(const at::vec::Vectorized<T>& v,
                                                         const at::vec::Vectorized<T>& b) {
#ifdef CPU_CAPABILITY_AVX512
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NGT_UQ), v, b);
  } else if constexpr (std::is_same_v<T, double>) {
    return _mm512_maskz_mul_pd(_mm512_cmp_pd_mask(v, _mm512_setzero_pd(), _CMP_NGT_UQ), v, b);
  }
#endif
  return where<SignTest::kPositive>(v, at::vec::Vectorized<T>(T(0)), v * b);
}

// Horizontal sum in a fixed lane order (deterministic).
template <typename T>
inline T reduce_add(const at::vec::Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>(
      [](at::vec::Vectorized<T>& a, at::vec::Vectorized<T>& b) { return a + b; }, v);
}

}  // namespace fusedrect::cpu
