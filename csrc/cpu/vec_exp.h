// exp for the CPU kernels' vectorised loops. libm's expf is a call GCC will not vectorise without
// -ffast-math, and it dominated the fused ViPO-map surrogates (measured ~3.4 of 4.1 ns per
// position, one thread, AMD EPYC). This one is branch-free straight-line float arithmetic, so an
// `omp simd` loop runs it 8 (AVX2) or 16 (AVX-512) lanes at a time.
//
// Method: exp(x) = 2^n exp(r) with n = round(x / ln 2) and r = x - n ln 2 in [-ln2/2, ln2/2],
// ln 2 split in two parts (Cody-Waite) so that n ln 2 is subtracted without rounding error; exp(r)
// by a degree-6 polynomial with the Cephes expf coefficients; 2^n applied as two exact powers of
// two, 2^(n/2) 2^(n - n/2), so results that underflow into subnormals or overflow to inf are
// rounded by the final multiply like any other product. Error within 1 ulp of the exact value
// over the normal range (0.990 at most, measured exhaustively over all 2^32 inputs;
// tests/test_cpu_vec_exp.py checks a sweep of 4M), as glibc's expf, where CUDA's expf is within 2.
// NaN stays NaN, exp(-inf) = 0, exp(inf) = inf.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace tbk {
namespace vec {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// 2^k for an integer k in [-126, 127], exactly.
inline float exp2_int(int32_t k) { return bits_to_float(static_cast<uint32_t>(k + 127) << 23); }

inline float exp(float x) {
  // Past these bounds exp underflows to 0 or overflows to inf anyway; clamping keeps n (below)
  // within the range of the two exact powers of two. NaN fails both comparisons and passes.
  x = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
  // n = round-to-nearest(x / ln 2) without a float-to-int conversion (undefined for NaN): adding
  // 1.5 * 2^23 leaves n in the low mantissa bits.
  constexpr float kShift = 12582912.0f;
  const float t = x * 1.44269504088896341f + kShift;
  const int32_t n = static_cast<int32_t>(float_to_bits(t) - float_to_bits(kShift));
  const float nf = t - kShift;
  const float r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * (r * r) + r + 1.0f;
  const int32_t n1 = n >> 1;  // arithmetic shift: floor(n / 2)
  return er * exp2_int(n1) * exp2_int(n - n1);
}

// float64 is the checking path, not the fast one: libm's exp.
inline double exp(double x) { return std::exp(x); }

}  // namespace vec
}  // namespace tbk
