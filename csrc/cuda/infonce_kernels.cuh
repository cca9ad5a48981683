// Device code of the CUDA voxel InfoNCE: the kernels that csrc/cuda/infonce.cu launches (see
// the overview there). Included by that one translation unit only.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "../common/rcps_math.h"

namespace rcps {
namespace cuda {
namespace {

using at::Tensor;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTileN = 32;  // bank rows per block step: one per lane
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Offset of channel 0 of voxel v in a (B, C, P) tensor with the given strides.
__device__ __forceinline__ int64_t voxel_offset(int64_t v, int64_t P, int64_t sb, int64_t sp) {
  const int64_t b = v / P;
  return b * sb + (v - b * P) * sp;
}

// A logit s / tau, rounded. Under -fmad a plain product may be fused into the FMA of a later
// exp(logit - max), whose unrounded value differs from the rounded logit that the max was taken
// of by up to half an ulp of 1/tau (exp(+-4) at tau = 1e-8); __fmul_rn is never fused.
__device__ __forceinline__ float logit(float dot, float inv_tau) { return __fmul_rn(dot, inv_tau); }

// ||z|| of one row spread over a warp's lanes, scaled before squaring (rcps_math.h scaled_norm):
// the plain squared norm overflows float32 from ||z|| ~ 1.8e19.
__device__ float warp_norm(const float* src, int C, int64_t stride_c, int lane) {
  float amax = 0.f;
  for (int c = lane; c < C; c += 32) amax = fmaxf(amax, fabsf(src[c * stride_c]));
  amax = warp_max(amax);
  if (!(amax > 0.f)) return amax;  // zero row (a NaN channel still reaches u = z / eps)
  float scaled_sq = 0.f;
  for (int c = lane; c < C; c += 32) {
    const float scaled = src[c * stride_c] / amax;
    scaled_sq += scaled * scaled;
  }
  return scaled_norm(amax, warp_sum(scaled_sq));
}

// One warp: dz of one row from u and du (shared or registers via pointers), written into a
// contiguous (B, C, P) gradient at voxel v.
template <typename out_t>
__device__ void chain_store_row(const float* u, const float* du, float norm, out_t* g, int64_t v,
                                int C, int64_t P, int lane) {
  float dot = 0.f;
  for (int c = lane; c < C; c += 32) dot += u[c] * du[c];
  dot = warp_sum(dot);
  const float inv = 1.0f / clamp_norm(norm);
  const bool clamped = is_clamped_norm(norm);
  const int64_t b = v / P, p = v - b * P;
  out_t* dst = g + b * C * P + p;
  for (int c = lane; c < C; c += 32)
    dst[static_cast<int64_t>(c) * P] =
        static_cast<out_t>(normalise_backward(du[c], u[c], dot, inv, clamped));
}

// ---------------------------------------------------------------------------------------------
// Normalisation
// ---------------------------------------------------------------------------------------------
__global__ void normalise_rows_kernel(const float* __restrict__ z, const int64_t* __restrict__ rows,
                                      float* __restrict__ u, float* __restrict__ norm_out,
                                      int64_t R, int C, int64_t P, int64_t sb, int64_t sc,
                                      int64_t sp) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (r >= R) return;
  const int64_t v = rows ? rows[r] : r;
  float* dst = u + r * C;
  if (v < 0) {  // padding row of a bank
    for (int c = lane; c < C; c += 32) dst[c] = 0.f;
    if (norm_out && lane == 0) norm_out[r] = 0.f;
    return;
  }
  const float* src = z + voxel_offset(v, P, sb, sp);
  const float raw_norm = warp_norm(src, C, sc, lane), norm = clamp_norm(raw_norm);
  for (int c = lane; c < C; c += 32) dst[c] = src[c * sc] / norm;
  if (norm_out && lane == 0) norm_out[r] = raw_norm;
}

// grad_negative from the (M, C) gradient of the normalised pool (fp32, or int64 fixed point).
template <typename out_t, typename acc_t>
__global__ void pool_chain_kernel(const float* __restrict__ z, const acc_t* __restrict__ pg,
                                  double descale, out_t* __restrict__ g, int64_t M, int C,
                                  int64_t P, int64_t sb, int64_t sc, int64_t sp) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (r >= M) return;
  float* u = smem + warp * 2 * C;
  float* du = u + C;
  const float* src = z + voxel_offset(r, P, sb, sp);
  const float raw_norm = warp_norm(src, C, sc, lane), norm = clamp_norm(raw_norm);
  for (int c = lane; c < C; c += 32) {
    u[c] = src[c * sc] / norm;
    if constexpr (std::is_same<acc_t, float>::value) {
      du[c] = pg[r * C + c];
    } else {
      du[c] = static_cast<float>(static_cast<double>(pg[r * C + c]) * descale);
    }
  }
  __syncwarp();
  chain_store_row(u, du, raw_norm, g, r, C, P, lane);
}

// ---------------------------------------------------------------------------------------------
// topk mode
// ---------------------------------------------------------------------------------------------
struct TileMap {
  const int64_t* cls;
  const int64_t* row0;
  const int64_t* end;
};

// Load rows [row0, row0 + TM) (masked by end) of the sorted normalised copies into shared.
__device__ void load_tile_rows(const float* u1, const float* u2, float* s1, float* s2, int64_t row0,
                               int64_t end, int TM, int C) {
  for (int e = threadIdx.x; e < TM * C; e += kThreads) {
    const int a = e / C;
    const int64_t r = row0 + a;
    s1[e] = r < end ? u1[r * C + (e - a * C)] : 0.f;
    s2[e] = r < end ? u2[r * C + (e - a * C)] : 0.f;
  }
}

__device__ void load_bank_block(const float* bank, float* sb, int64_t n0, int64_t kc, int C) {
  const int ld = C + 1;
  for (int e = threadIdx.x; e < kTileN * C; e += kThreads) {
    const int n = e / C, c = e - n * C;
    sb[n * ld + c] = (n0 + n < kc) ? bank[(n0 + n) * C + c] : 0.f;
  }
}

__device__ __forceinline__ float row_dot(const float* a, const float* b, int C) {
  float s = 0.f;
  for (int c = 0; c < C; ++c) s += a[c] * b[c];
  return s;
}

// A row's log-normaliser lse = anchor + rel (positive_nll), stored as a pair at 2 r.
__device__ __forceinline__ void store_normaliser(float* dst, int64_t r, const PositiveNll& d) {
  dst[2 * r] = d.anchor;
  dst[2 * r + 1] = d.rel;
}

// Softmax weight exp(logit - lse) from a stored (anchor, rel) pair, without forming lse.
__device__ __forceinline__ float softmax_weight(float logit_value, const float* normaliser) {
  return expf((logit_value - normaliser[0]) - normaliser[1]);
}

__global__ void topk_lse_kernel(const float* __restrict__ u1, const float* __restrict__ u2,
                                const float* __restrict__ bank, TileMap tiles,
                                const int64_t* __restrict__ neg_count,
                                const int64_t* __restrict__ order, float* __restrict__ lse1,
                                float* __restrict__ lse2, float* __restrict__ loss, int C,
                                int64_t L, int TM, float inv_tau) {
  extern __shared__ float smem[];
  float* su1 = smem;
  float* su2 = su1 + TM * C;
  float* sbank = su2 + TM * C;
  const int t = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t cls = tiles.cls[t], row0 = tiles.row0[t], end = tiles.end[t];
  if (row0 >= end) return;
  const int64_t kc = neg_count[cls];
  const float* cbank = bank + cls * L * C;
  load_tile_rows(u1, u2, su1, su2, row0, end, TM, C);
  __syncthreads();
  const int rows_per_warp = TM / kWarps;
  // Online LSE state of this warp's rows, replicated across lanes (at most 4 rows per warp).
  LseState st1[4], st2[4];
  float x[4];
  for (int q = 0; q < rows_per_warp; ++q) {
    const int a = warp + q * kWarps;
    float s = 0.f;
    for (int c = lane; c < C; c += 32) s += su1[a * C + c] * su2[a * C + c];
    x[q] = logit(warp_sum(s), inv_tau);
    st1[q] = lse_init();  // the negatives' state; the positive enters through positive_nll
    st2[q] = st1[q];
  }
  for (int64_t n0 = 0; n0 < kc; n0 += kTileN) {
    __syncthreads();
    load_bank_block(cbank, sbank, n0, kc, C);
    __syncthreads();
    const bool valid = n0 + lane < kc;
    const float* brow = sbank + lane * (C + 1);
    for (int q = 0; q < rows_per_warp; ++q) {
      const int a = warp + q * kWarps;
      const float d1 = valid ? logit(row_dot(su1 + a * C, brow, C), inv_tau) : -INFINITY;
      const float d2 = valid ? logit(row_dot(su2 + a * C, brow, C), inv_tau) : -INFINITY;
      const float m1 = warp_max(d1), m2 = warp_max(d2);
      const float e1 = warp_sum(valid ? expf(d1 - m1) : 0.f);
      const float e2 = warp_sum(valid ? expf(d2 - m2) : 0.f);
      st1[q] = lse_merge(st1[q], m1, e1);
      st2[q] = lse_merge(st2[q], m2, e2);
    }
  }
  if (lane == 0) {
    for (int q = 0; q < rows_per_warp; ++q) {
      const int64_t r = row0 + warp + q * kWarps;
      if (r >= end) continue;
      const PositiveNll d1 = positive_nll(st1[q], x[q]), d2 = positive_nll(st2[q], x[q]);
      store_normaliser(lse1, r, d1);
      store_normaliser(lse2, r, d2);
      loss[order[r]] = d1.nll + d2.nll;
    }
  }
}

template <typename out_t>
__global__ void topk_anchor_grad_kernel(
    const float* __restrict__ u1, const float* __restrict__ u2, const float* __restrict__ norm1,
    const float* __restrict__ norm2, const float* __restrict__ bank, TileMap tiles,
    const int64_t* __restrict__ neg_count, const int64_t* __restrict__ order,
    const float* __restrict__ lse1, const float* __restrict__ lse2,
    const float* __restrict__ weight, float grad_scale, out_t* __restrict__ g1,
    out_t* __restrict__ g2, int C, int64_t P, int64_t L, int TM, float inv_tau) {
  extern __shared__ float smem[];
  float* su1 = smem;
  float* su2 = su1 + TM * C;
  float* sdu1 = su2 + TM * C;
  float* sdu2 = sdu1 + TM * C;
  float* sbank = sdu2 + TM * C;
  const int t = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t cls = tiles.cls[t], row0 = tiles.row0[t], end = tiles.end[t];
  if (row0 >= end) return;
  const int64_t kc = neg_count[cls];
  const float* cbank = bank + cls * L * C;
  load_tile_rows(u1, u2, su1, su2, row0, end, TM, C);
  __syncthreads();
  const int rows_per_warp = TM / kWarps;
  // mass[q]: w/tau times both directions' negative softmax mass, 1 - p_pos, summed over the
  // bank in relative precision (1 - exp(x - lse) would cancel for a confident anchor).
  float l1[4][2], l2[4][2], wt[4], mass[4];  // (anchor, rel) per row and direction
  for (int q = 0; q < rows_per_warp; ++q) {
    const int a = warp + q * kWarps;
    const int64_t r = row0 + a;
    const bool in = r < end;
    for (int e = 0; e < 2; ++e) {
      l1[q][e] = in ? lse1[2 * r + e] : 0.f;
      l2[q][e] = in ? lse2[2 * r + e] : 0.f;
    }
    const float w = in ? grad_scale * (weight ? weight[order[r]] : 1.f) : 0.f;
    wt[q] = w * inv_tau;
    mass[q] = 0.f;
    for (int c = lane; c < C; c += 32) {
      sdu1[a * C + c] = 0.f;
      sdu2[a * C + c] = 0.f;
    }
  }
  for (int64_t n0 = 0; n0 < kc; n0 += kTileN) {
    __syncthreads();
    load_bank_block(cbank, sbank, n0, kc, C);
    __syncthreads();
    const bool valid = n0 + lane < kc;
    const float* brow = sbank + lane * (C + 1);
    for (int q = 0; q < rows_per_warp; ++q) {
      const int a = warp + q * kWarps;
      const float d1 = logit(row_dot(su1 + a * C, brow, C), inv_tau);
      const float d2 = logit(row_dot(su2 + a * C, brow, C), inv_tau);
      const float p1 = valid ? softmax_weight(d1, l1[q]) * wt[q] : 0.f;
      const float p2 = valid ? softmax_weight(d2, l2[q]) * wt[q] : 0.f;
      mass[q] += warp_sum(p1 + p2);
      for (int n = 0; n < kTileN; ++n) {
        const float q1 = __shfl_sync(kFull, p1, n), q2 = __shfl_sync(kFull, p2, n);
        const float* bn = sbank + n * (C + 1);
        for (int c = lane; c < C; c += 32) {
          sdu1[a * C + c] += q1 * bn[c];
          sdu2[a * C + c] += q2 * bn[c];
        }
      }
    }
  }
  // dU1 = P1 N_c - mass u2, dU2 = P2 N_c - mass u1 (each lane owns the same channels throughout).
  for (int q = 0; q < rows_per_warp; ++q) {
    const int a = warp + q * kWarps;
    for (int c = lane; c < C; c += 32) {
      sdu1[a * C + c] -= mass[q] * su2[a * C + c];
      sdu2[a * C + c] -= mass[q] * su1[a * C + c];
    }
  }
  __syncwarp();
  for (int q = 0; q < rows_per_warp; ++q) {
    const int a = warp + q * kWarps;
    const int64_t r = row0 + a;
    if (r >= end) continue;
    const int64_t v = order[r];
    chain_store_row(su1 + a * C, sdu1 + a * C, norm1[r], g1, v, C, P, lane);
    chain_store_row(su2 + a * C, sdu2 + a * C, norm2[r], g2, v, C, P, lane);
  }
}

// partial[split, cls, n, :] = sum over this split's anchors of class cls of (P1 U1 + P2 U2)[., n].
__global__ void topk_bank_grad_kernel(
    const float* __restrict__ u1, const float* __restrict__ u2, const float* __restrict__ bank,
    const int64_t* __restrict__ class_start, const int64_t* __restrict__ neg_count,
    const int64_t* __restrict__ order, const float* __restrict__ lse1,
    const float* __restrict__ lse2, const float* __restrict__ weight, float grad_scale,
    float* __restrict__ partial, int C, int64_t L, int64_t num_classes, int split, int TM,
    float inv_tau) {
  extern __shared__ float smem[];
  float* sbank = smem;                     // kTileN x (C + 1)
  float* sacc = sbank + kTileN * (C + 1);  // kTileN x C
  float* su1 = sacc + kTileN * C;          // TM x C
  float* su2 = su1 + TM * C;               // TM x C
  float* sp1 = su2 + TM * C;               // TM x (kTileN + 1)
  float* sp2 = sp1 + TM * (kTileN + 1);    // TM x (kTileN + 1)
  const int64_t cls = blockIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int sp = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t kc = neg_count[cls];
  const int64_t start = class_start[cls], end = class_start[cls + 1];
  const int64_t per = ((end - start + split - 1) / split + TM - 1) / TM * TM;
  const int64_t lo = start + sp * per;
  const int64_t hi = n0 < kc ? (lo + per < end ? lo + per : end) : lo;
  load_bank_block(bank + cls * L * C, sbank, n0, kc, C);
  for (int e = threadIdx.x; e < kTileN * C; e += kThreads) sacc[e] = 0.f;
  const int rows_per_warp = TM / kWarps;
  const bool valid = n0 + lane < kc;
  for (int64_t r0 = lo; r0 < hi; r0 += TM) {
    __syncthreads();
    load_tile_rows(u1, u2, su1, su2, r0, hi, TM, C);
    __syncthreads();
    const float* brow = sbank + lane * (C + 1);
    for (int q = 0; q < rows_per_warp; ++q) {
      const int a = warp + q * kWarps;
      const int64_t r = r0 + a;
      float p1 = 0.f, p2 = 0.f;
      if (r < hi && valid) {
        const float wt = grad_scale * (weight ? weight[order[r]] : 1.f) * inv_tau;
        p1 = softmax_weight(logit(row_dot(su1 + a * C, brow, C), inv_tau), lse1 + 2 * r) * wt;
        p2 = softmax_weight(logit(row_dot(su2 + a * C, brow, C), inv_tau), lse2 + 2 * r) * wt;
      }
      sp1[a * (kTileN + 1) + lane] = p1;
      sp2[a * (kTileN + 1) + lane] = p2;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kTileN * C; e += kThreads) {
      const int n = e / C, c = e - n * C;
      float acc = 0.f;
      for (int a = 0; a < TM; ++a)
        acc +=
            sp1[a * (kTileN + 1) + n] * su1[a * C + c] + sp2[a * (kTileN + 1) + n] * su2[a * C + c];
      sacc[e] += acc;
    }
  }
  __syncthreads();
  float* out = partial + ((static_cast<int64_t>(sp) * num_classes + cls) * L) * C;
  for (int e = threadIdx.x; e < kTileN * C; e += kThreads) {
    const int n = e / C;
    if (n0 + n < L) out[(n0 + n) * C + (e - n * C)] = sacc[e];
  }
}

__global__ void bank_scatter_kernel(const float* __restrict__ partial,
                                    const int64_t* __restrict__ neg_index,
                                    const int64_t* __restrict__ neg_count,
                                    float* __restrict__ pool_grad, int64_t cls, int C, int64_t L,
                                    int64_t num_classes, int split) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t kc = neg_count[cls];
  if (e >= kc * C) return;
  const int64_t k = e / C, c = e - k * C;
  float acc = 0.f;
  for (int s = 0; s < split; ++s) acc += partial[((s * num_classes + cls) * L + k) * C + c];
  pool_grad[neg_index[cls * L + k] * C + c] += acc;
}

// ---------------------------------------------------------------------------------------------
// random mode
// ---------------------------------------------------------------------------------------------
struct RandomArgs {
  const float* z1;
  const float* z2;
  int64_t s1b, s1c, s1p, s2b, s2c, s2p;
  const float* un;
  const int64_t* labels;
  const int64_t* neg_index;
  const int64_t* neg_count;
  float* loss;
  const float* weight;
  float grad_scale;
  int64_t N, P, L, K;
  int C;
  uint64_t seed, offset;
  float inv_tau;
  bool neg_grad;
  float qscale;  // fixed-point scale (deterministic pool gradient)
};

template <typename out_t, typename acc_t, bool kGrad>
__global__ void random_kernel(RandomArgs a, out_t* __restrict__ g1, out_t* __restrict__ g2,
                              acc_t* __restrict__ pool_grad) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (i >= a.N) return;
  const int C = a.C;
  float* u1 = smem + warp * 4 * C;
  float* u2 = u1 + C;
  float* du1 = u2 + C;
  float* du2 = du1 + C;
  const int64_t cls = a.labels[i];
  const int64_t n = a.neg_count[cls];
  const int64_t draws = n > 0 ? a.K : 0;
  const int64_t* eligible = a.neg_index + cls * a.L;
  const float* src1 = a.z1 + voxel_offset(i, a.P, a.s1b, a.s1p);
  const float* src2 = a.z2 + voxel_offset(i, a.P, a.s2b, a.s2p);
  const float raw_norm1 = warp_norm(src1, C, a.s1c, lane), norm1 = clamp_norm(raw_norm1);
  const float raw_norm2 = warp_norm(src2, C, a.s2c, lane), norm2 = clamp_norm(raw_norm2);
  float s = 0.f;
  for (int c = lane; c < C; c += 32) {
    u1[c] = src1[c * a.s1c] / norm1;  // divide, like F.normalize (rcps_math.h)
    u2[c] = src2[c * a.s2c] / norm2;
    s += u1[c] * u2[c];
  }
  const float x = logit(warp_sum(s), a.inv_tau);
  __syncwarp();
  // Each lane pushes its draws into its own LSE state; the states are merged across lanes.
  LseState st1 = lse_init(), st2 = lse_init();
  for (int64_t k0 = 0; k0 < draws; k0 += 32) {
    const int64_t k = k0 + lane;
    if (k < draws) {
      const uint32_t r = philox_randint(a.seed, draw_counter(i, a.K, k, a.offset));
      const float* row = a.un + eligible[draw_to_index(r, n)] * C;
      st1 = lse_push(st1, logit(row_dot(u1, row, C), a.inv_tau));
      st2 = lse_push(st2, logit(row_dot(u2, row, C), a.inv_tau));
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float m1 = __shfl_xor_sync(kFull, st1.max, o), t1 = __shfl_xor_sync(kFull, st1.sum, o);
    const float m2 = __shfl_xor_sync(kFull, st2.max, o), t2 = __shfl_xor_sync(kFull, st2.sum, o);
    st1 = lse_merge(st1, m1, t1);
    st2 = lse_merge(st2, m2, t2);
  }
  // Lanes may differ in the last bits (merge order): use lane 0's state everywhere.
  st1.max = __shfl_sync(kFull, st1.max, 0);
  st1.sum = __shfl_sync(kFull, st1.sum, 0);
  st2.max = __shfl_sync(kFull, st2.max, 0);
  st2.sum = __shfl_sync(kFull, st2.sum, 0);
  const PositiveNll d1 = positive_nll(st1, x), d2 = positive_nll(st2, x);
  const float l1[2] = {d1.anchor, d1.rel}, l2[2] = {d2.anchor, d2.rel};
  if (lane == 0) a.loss[i] = d1.nll + d2.nll;
  if constexpr (kGrad) {
    const float wt = a.grad_scale * (a.weight ? a.weight[i] : 1.f) * a.inv_tau;
    // mass: w/tau times both directions' negative softmax mass (1 - p_pos), summed over the draws.
    float mass = 0.f;
    for (int c = lane; c < C; c += 32) {
      du1[c] = 0.f;
      du2[c] = 0.f;
    }
    for (int64_t k0 = 0; k0 < draws; k0 += 32) {
      const int64_t k = k0 + lane;
      int64_t j = 0;
      float p1 = 0.f, p2 = 0.f;
      if (k < draws) {
        const uint32_t r = philox_randint(a.seed, draw_counter(i, a.K, k, a.offset));
        j = eligible[draw_to_index(r, n)];
        const float* row = a.un + j * C;
        p1 = softmax_weight(logit(row_dot(u1, row, C), a.inv_tau), l1) * wt;
        p2 = softmax_weight(logit(row_dot(u2, row, C), a.inv_tau), l2) * wt;
      }
      mass += warp_sum(p1 + p2);
      const int count = draws - k0 < 32 ? static_cast<int>(draws - k0) : 32;
      for (int q = 0; q < count; ++q) {
        const float q1 = __shfl_sync(kFull, p1, q), q2 = __shfl_sync(kFull, p2, q);
        const int64_t jq = __shfl_sync(kFull, j, q);
        const float* row = a.un + jq * C;
        for (int c = lane; c < C; c += 32) {
          du1[c] += q1 * row[c];
          du2[c] += q2 * row[c];
          if (a.neg_grad) {
            const float v = q1 * u1[c] + q2 * u2[c];
            if constexpr (std::is_same<acc_t, float>::value) {
              atomicAdd(pool_grad + jq * C + c, v);
            } else {
              atomicAdd(reinterpret_cast<unsigned long long*>(pool_grad + jq * C + c),
                        static_cast<unsigned long long>(static_cast<long long>(v * a.qscale)));
            }
          }
        }
      }
    }
    for (int c = lane; c < C; c += 32) {
      du1[c] -= mass * u2[c];
      du2[c] -= mass * u1[c];
    }
    __syncwarp();
    chain_store_row(u1, du1, raw_norm1, g1, i, C, a.P, lane);
    chain_store_row(u2, du2, raw_norm2, g2, i, C, a.P, lane);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace rcps
