// Host/device math shared by the C++ CPU kernels and the CUDA kernels.
//
// Everything here is header-only, `inline`, free of torch and of the standard library beyond
// <stdint.h> and <math.h>, so that the same lines compile under g++ (the CPU extension, whose
// tests therefore check the arithmetic the GPU runs) and under nvcc (csrc/cuda/*.cu).
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RCPS_HD __host__ __device__ __forceinline__
#else
#define RCPS_HD inline
#endif

namespace rcps {

// Smallest norm used when L2-normalising a feature vector (torch.nn.functional.normalize's
// eps), in the accumulation type T (1e-12 rounded once: float64 matches F.normalize's).
template <typename T>
RCPS_HD T norm_eps() {
  return static_cast<T>(1e-12);
}

// Elementary functions by overload, so that templates pick expf for float and exp for double
// in both g++ and nvcc without relying on <cmath>'s overload set.
RCPS_HD float math_exp(float x) { return expf(x); }
RCPS_HD double math_exp(double x) { return exp(x); }
RCPS_HD float math_log(float x) { return logf(x); }
RCPS_HD double math_log(double x) { return log(x); }
RCPS_HD float math_log1p(float x) { return log1pf(x); }
RCPS_HD double math_log1p(double x) { return log1p(x); }
RCPS_HD float math_sqrt(float x) { return sqrtf(x); }
RCPS_HD double math_sqrt(double x) { return sqrt(x); }

// ---------------------------------------------------------------------------------------------
// L2 normalisation: u = z / max(||z||, eps).
// ---------------------------------------------------------------------------------------------

// ||z|| from amax = max_c |z_c| and scaled_sq = sum_c (z_c / amax)^2, the scaling that
// torch.linalg.vector_norm's name promises: squaring z itself overflows float32 from
// ||z|| ~ 1.8e19 (and underflows below ~1e-19), squaring z / amax never does.
template <typename T>
RCPS_HD T scaled_norm(T amax, T scaled_sq) {
  return amax * math_sqrt(scaled_sq);
}

// max(||z||, eps). Normalise by dividing by it (u = z / n, as torch's F.normalize does) rather
// than multiplying by its inverse: for 1-channel features that keeps u exactly +-1, so the
// normalisation's analytically zero gradient is computed as exactly zero.
template <typename T>
RCPS_HD T clamp_norm(T norm) {
  return norm > norm_eps<T>() ? norm : norm_eps<T>();
}

template <typename T>
RCPS_HD bool is_clamped_norm(T norm) {
  return norm <= norm_eps<T>();
}

// Chain rule through u = z / max(||z||, eps), per element.
// Where ||z|| > eps:  dz = (du - u (u . du)) / ||z||   (the Jacobian of z/||z|| is (I - u
// u^T)/||z||); otherwise the denominator is the constant eps and dz = du / eps.
template <typename T>
RCPS_HD T normalise_backward(T du, T u, T u_dot_du, T inv_norm, bool clamped) {
  return clamped ? du * inv_norm : (du - u * u_dot_du) * inv_norm;
}

// ---------------------------------------------------------------------------------------------
// Online log-sum-exp (flash-attention style) in the accumulation type T (float unless given).
// State (m, s) represents log(s) + m; empty state is m = -inf, s = 0.
// ---------------------------------------------------------------------------------------------

template <typename T>
struct LseStateT {
  T max;
  T sum;
};
using LseState = LseStateT<float>;

template <typename T = float>
RCPS_HD LseStateT<T> lse_init() {
  return LseStateT<T>{static_cast<T>(-INFINITY), T(0)};
}

// Add one logit x.
template <typename T>
RCPS_HD LseStateT<T> lse_push(LseStateT<T> st, T x) {
  if (x > st.max) {
    st.sum = st.sum * math_exp(st.max - x) + T(1);
    st.max = x;
  } else {
    st.sum += math_exp(x - st.max);
  }
  return st;
}

// Merge a block whose running max is block_max and whose sum of exp(x - block_max) is block_sum.
template <typename T>
RCPS_HD LseStateT<T> lse_merge(LseStateT<T> st, T block_max, T block_sum) {
  if (block_sum == T(0)) return st;
  if (block_max > st.max) {
    st.sum = st.sum * math_exp(st.max - block_max) + block_sum;
    st.max = block_max;
  } else {
    st.sum += block_sum * math_exp(block_max - st.max);
  }
  return st;
}

// One direction's loss of an anchor, -log softmax of its positive logit x, and the softmax's
// log-normaliser lse = log(exp(x) + sum_n exp(s_n)), from the state of the negatives alone.
// With t = log sum_n exp(s_n - x): nll = softplus(t), and lse is x + softplus(t) when the
// positive dominates (t <= 0), else (max + log sum) + log1p(exp(-t)). Not nll = lse - x: that
// cancels at |x| ~ 1/tau and leaves a near-zero loss (a confident anchor) with few correct
// digits in fp32; and not lse = x + nll, which loses lse's digits when the negatives dominate.
//
// lse is kept as anchor + rel, anchor the dominant logit (x or the negatives' max) and
// rel = lse - anchor formed without that sum: a softmax weight is exp((s - anchor) - rel). At a
// small temperature lse ~ 1/tau has an ulp far above 1, and exp(s - lse) would be off by
// exp(+-ulp/2) even for the dominant logit, whose weight this keeps exact.
template <typename T>
struct PositiveNllT {
  T nll;
  T anchor;
  T rel;
};
using PositiveNll = PositiveNllT<float>;

template <typename T>
RCPS_HD PositiveNllT<T> positive_nll(LseStateT<T> negatives, T x) {
  const T log_sum = math_log(negatives.sum);
  const T t = (negatives.max - x) + log_sum;
  const T tail = math_log1p(math_exp(t > T(0) ? -t : t));
  const bool negatives_dominate = t > T(0);
  const T anchor = negatives_dominate ? negatives.max : x;
  const T rel = (negatives_dominate ? log_sum : T(0)) + tail;
  return PositiveNllT<T>{(negatives_dominate ? t : T(0)) + tail, anchor, rel};
}

// ---------------------------------------------------------------------------------------------
// Philox4x32-10, laid out exactly like Triton's tl.randint(seed, offset) with a 64-bit offset:
// counter (c0, c1, c2, c3) = (lo32(offset), hi32(offset), 0, 0), key (k0, k1) = (lo32(seed),
// hi32(seed)); the draw is the first output word. The same seed and counter therefore give the
// same 32-bit draw on the CPU, in CUDA and in Triton.
// ---------------------------------------------------------------------------------------------

RCPS_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

RCPS_HD uint32_t philox_randint(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t prev_c0 = c0, prev_c2 = c2;
    c0 = mulhi32(0xCD9E8D57u, prev_c2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, prev_c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * prev_c2;
    c3 = 0xD2511F53u * prev_c0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Counter of draw k of anchor i: anchor * K + k + per-call offset (64-bit, no wrap for any
// realistic volume).
RCPS_HD uint64_t draw_counter(int64_t anchor, int64_t num_negatives, int64_t k, uint64_t offset) {
  return static_cast<uint64_t>(anchor) * static_cast<uint64_t>(num_negatives) +
         static_cast<uint64_t>(k) + offset;
}

// Map a uniform 32-bit draw onto [0, n): floor(r * n / 2^32). Unbiased up to n / 2^32.
RCPS_HD int64_t draw_to_index(uint32_t r, int64_t n) {
  return static_cast<int64_t>((static_cast<uint64_t>(r) * static_cast<uint64_t>(n)) >> 32);
}

}  // namespace rcps
