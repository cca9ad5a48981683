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

// Smallest norm used when L2-normalising a feature vector (torch.nn.functional.normalize's eps).
constexpr float kNormEps = 1e-12f;

// ---------------------------------------------------------------------------------------------
// L2 normalisation: u = z / max(||z||, eps).
// ---------------------------------------------------------------------------------------------

// max(||z||, eps) from the squared norm. Normalise by dividing by it (u = z / n, as torch's
// F.normalize does) rather than multiplying by its inverse: for 1-channel features that keeps
// u exactly +-1, so the normalisation's analytically zero gradient is computed as exactly zero.
RCPS_HD float clamped_norm_from_sq(float sq_norm) {
  float norm = sqrtf(sq_norm);
  return norm > kNormEps ? norm : kNormEps;
}

// 1 / max(||z||, eps) from the squared norm.
RCPS_HD float inv_norm_from_sq(float sq_norm) { return 1.0f / clamped_norm_from_sq(sq_norm); }

// Chain rule through u = z / max(||z||, eps), per element.
// Where ||z|| > eps:  dz = (du - u (u . du)) / ||z||   (the Jacobian of z/||z|| is (I - u u^T)/||z||);
// otherwise the denominator is the constant eps and dz = du / eps.
RCPS_HD float normalize_backward(float du, float u, float u_dot_du, float inv_norm, bool clamped) {
  return clamped ? du * inv_norm : (du - u * u_dot_du) * inv_norm;
}

RCPS_HD bool norm_is_clamped(float sq_norm) { return sqrtf(sq_norm) <= kNormEps; }

// ---------------------------------------------------------------------------------------------
// Online log-sum-exp (flash-attention style), in fp32.
// State (m, s) represents log(s) + m; empty state is m = -inf, s = 0.
// ---------------------------------------------------------------------------------------------

struct LseState {
  float max;
  float sum;
};

RCPS_HD LseState lse_init() { return LseState{-INFINITY, 0.0f}; }

// Add one logit x.
RCPS_HD LseState lse_push(LseState st, float x) {
  if (x > st.max) {
    st.sum = st.sum * expf(st.max - x) + 1.0f;
    st.max = x;
  } else {
    st.sum += expf(x - st.max);
  }
  return st;
}

// Merge a block whose running max is block_max and whose sum of exp(x - block_max) is block_sum.
RCPS_HD LseState lse_merge(LseState st, float block_max, float block_sum) {
  if (block_sum == 0.0f) return st;
  if (block_max > st.max) {
    st.sum = st.sum * expf(st.max - block_max) + block_sum;
    st.max = block_max;
  } else {
    st.sum += block_sum * expf(block_max - st.max);
  }
  return st;
}

RCPS_HD float lse_value(LseState st) { return st.max + logf(st.sum); }

// One direction's loss of an anchor, -log softmax of its positive logit x, and the softmax's
// log-normaliser lse = log(exp(x) + sum_n exp(s_n)), from the state of the negatives alone.
// With t = log sum_n exp(s_n - x): nll = softplus(t), and lse is x + softplus(t) when the
// positive dominates (t <= 0), else (max + log sum) + log1p(exp(-t)). Not nll = lse - x: that
// cancels at |x| ~ 1/tau and leaves a near-zero loss (a confident anchor) with few correct
// digits in fp32; and not lse = x + nll, which loses lse's digits when the negatives dominate.
struct PositiveNll {
  float nll;
  float lse;
};

RCPS_HD PositiveNll positive_nll(LseState negatives, float x) {
  const float log_sum = logf(negatives.sum);
  const float t = (negatives.max - x) + log_sum;
  const float tail = log1pf(expf(-fabsf(t)));
  return PositiveNll{fmaxf(t, 0.0f) + tail, (t > 0.0f ? negatives.max + log_sum : x) + tail};
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
