// A branch-free expf for the CPU kernels' inner loops.
//
// glibc's expf does not vectorise without -ffast-math (which would also break the isfinite
// checks elsewhere), so the hot loops use this Cephes-style approximation instead: range
// reduction x = n ln2 + r with a two-constant ln2, a degree-6 polynomial for e^r, and 2^n built in
// the exponent bits. Relative error is about 2 ulp over the clamped range [-87.3, 88.3]; inputs
// below it (including -inf) give ~1e-38 instead of 0, which is harmless in a log-sum-exp whose
// terms are at most 1.
#pragma once

#include <stdint.h>
#include <string.h>

namespace rcps {
namespace cpu {

inline float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace cpu
}  // namespace rcps
