// Vectorisable elementary functions for the CPU kernels' inner loops.
//
// glibc's expf/logf do not vectorise without -ffast-math (which would also break the NaN/Inf
// handling elsewhere), so the hot loops use these branch-free Cephes-style approximations
// (about 2 ulp) instead; the loops that call them carry `#pragma omp simd`.
#pragma once

#include <stdint.h>

#include <cmath>

namespace rcps {
namespace cpu {

// Branch-free expf (Cephes-style: x = n ln2 + r, degree-6 polynomial for e^r, 2^n built in the
// exponent bits; ~2 ulp). Unlike glibc's expf (and a floorf-based range reduction, which GCC does
// not vectorise under the default -ftrapping-math) it vectorises. n is rounded with the 1.5 * 2^23
// trick. Results below e^-87 are flushed to exactly 0, as the shared math requires for -inf.
inline float fast_exp(float x) {
  const float flush = x < -87.0f ? 0.0f : 1.0f;
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  return p * scale * flush;
}

// Branch-free natural log for the per-voxel sums (which are >= 1): x = m 2^e with m in
// [sqrt(1/2), sqrt(2)), log x = e ln2 + log1p(m - 1) by a Cephes-style polynomial (~2 ulp).
// NaN and +inf give NaN, so that bad inputs still show in the loss.
inline float fast_log(float x) {
  const int32_t bits = __builtin_bit_cast(int32_t, x);
  int32_t exponent = ((bits >> 23) & 0xff) - 126;
  float m = __builtin_bit_cast(float, (bits & 0x807fffff) | 0x3f000000);  // in [0.5, 1)
  const bool below = m < 0.707106781186547524f;
  exponent -= below ? 1 : 0;
  m = m + (below ? m : 0.0f) - 1.0f;
  const float e = static_cast<float>(exponent);
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  // + (x - x): 0 for finite x, NaN for NaN and +inf (branch-free, so the loop vectorises).
  return m + y + 0.693359375f * e + (x - x);
}

// The inner loops' exp per accumulation type: the vectorising approximation in float; in double,
// where the loops exist for exactness (gradcheck) rather than speed, std::exp.
inline float loop_exp(float x) { return fast_exp(x); }
inline double loop_exp(double x) { return std::exp(x); }

}  // namespace cpu
}  // namespace rcps
