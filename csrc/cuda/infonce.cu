// Fused bidirectional voxel InfoNCE on CUDA: forward, and gradients for any per-anchor weights.
//
// Same kernel signature and semantics as csrc/cpu/infonce.cpp (read it for the maths); the
// arithmetic shared with the CPU (normalisation and its chain rule, online log-sum-exp, Philox
// draws and their mapping onto the eligible list) comes from csrc/rcps_math.h.
//
// Inputs are read as fp32 (fp16/bf16/fp64 are converted once), everything accumulates in fp32,
// and the gradients are written in the input dtype. Flat offsets are int64.
//
// topk mode, anchors stable-sorted by class and tiled (kTileM anchors of one class per block,
// device-side tile map, no host sync):
//   normalize_rows    one warp per row: fp32 normalised copies (sorted anchors, positives, banks)
//   topk_lse          per tile, bank blocks of 32 rows in shared memory; warp w owns anchor rows
//                     w, w+8, ..., lane n the bank row n: dot products, warp max/sum, lse_merge
//   topk_anchor_grad  the same loop, softmax weights, dU += P N_c through shuffles into shared
//                     du rows owned by one warp, then the normalisation chain into (B, C, P)
//   topk_bank_grad    per (class, 32-row bank block, anchor split): P^T U accumulated in shared
//                     memory where each (row, channel) belongs to one thread: no atomics
//   bank_scatter      per class in class order: pool_grad[j] += sum over splits (deterministic)
//   pool_chain        the pool gradient through the pool's normalisation into (Bn, C, Pn)
// random mode: one warp per anchor, lane k holds draw k of a 32-draw chunk (Philox counters of
// csrc/rcps_math.h, regenerated in the backward pass); pool gradient by fp32 atomicAdd, or, when
// deterministic, by int64 fixed-point atomicAdd (bitwise reproducible, see infonce_triton.py).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "../rcps_math.h"

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

// One warp: dz of one row from u and du (shared or registers via pointers), written into a
// contiguous (B, C, P) gradient at voxel v.
template <typename out_t>
__device__ void chain_store_row(const float* u, const float* du, float sq, out_t* g, int64_t v,
                                int C, int64_t P, int lane) {
  float dot = 0.f;
  for (int c = lane; c < C; c += 32) dot += u[c] * du[c];
  dot = warp_sum(dot);
  const float inv = inv_norm_from_sq(sq);
  const bool clamped = norm_is_clamped(sq);
  const int64_t b = v / P, p = v - b * P;
  out_t* dst = g + b * C * P + p;
  for (int c = lane; c < C; c += 32)
    dst[static_cast<int64_t>(c) * P] = static_cast<out_t>(normalize_backward(du[c], u[c], dot, inv, clamped));
}

// ---------------------------------------------------------------------------------------------
// Normalisation
// ---------------------------------------------------------------------------------------------
__global__ void normalize_rows_kernel(const float* __restrict__ z, const int64_t* __restrict__ rows,
                                      float* __restrict__ u, float* __restrict__ sq_out, int64_t R,
                                      int C, int64_t P, int64_t sb, int64_t sc, int64_t sp) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (r >= R) return;
  const int64_t v = rows ? rows[r] : r;
  float* dst = u + r * C;
  if (v < 0) {  // padding row of a bank
    for (int c = lane; c < C; c += 32) dst[c] = 0.f;
    if (sq_out && lane == 0) sq_out[r] = 0.f;
    return;
  }
  const float* src = z + voxel_offset(v, P, sb, sp);
  float sq = 0.f;
  for (int c = lane; c < C; c += 32) {
    const float x = src[c * sc];
    sq += x * x;
  }
  sq = warp_sum(sq);
  const float norm = clamped_norm_from_sq(sq);
  for (int c = lane; c < C; c += 32) dst[c] = src[c * sc] / norm;
  if (sq_out && lane == 0) sq_out[r] = sq;
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
  float sq = 0.f;
  for (int c = lane; c < C; c += 32) {
    const float x = src[c * sc];
    sq += x * x;
  }
  sq = warp_sum(sq);
  const float norm = clamped_norm_from_sq(sq);
  for (int c = lane; c < C; c += 32) {
    u[c] = src[c * sc] / norm;
    if constexpr (std::is_same<acc_t, float>::value) {
      du[c] = pg[r * C + c];
    } else {
      du[c] = static_cast<float>(static_cast<double>(pg[r * C + c]) * descale);
    }
  }
  __syncwarp();
  chain_store_row(u, du, sq, g, r, C, P, lane);
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
__device__ void load_tile_rows(const float* u1, const float* u2, float* s1, float* s2,
                               int64_t row0, int64_t end, int TM, int C) {
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
    x[q] = warp_sum(s) * inv_tau;
    st1[q] = lse_push(lse_init(), x[q]);
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
      const float d1 = valid ? row_dot(su1 + a * C, brow, C) * inv_tau : -INFINITY;
      const float d2 = valid ? row_dot(su2 + a * C, brow, C) * inv_tau : -INFINITY;
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
      const float l1 = lse_value(st1[q]), l2 = lse_value(st2[q]);
      lse1[r] = l1;
      lse2[r] = l2;
      loss[order[r]] = (l1 - x[q]) + (l2 - x[q]);
    }
  }
}

template <typename out_t>
__global__ void topk_anchor_grad_kernel(
    const float* __restrict__ u1, const float* __restrict__ u2, const float* __restrict__ sq1,
    const float* __restrict__ sq2, const float* __restrict__ bank, TileMap tiles,
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
  float l1[4], l2[4], wt[4];
  for (int q = 0; q < rows_per_warp; ++q) {
    const int a = warp + q * kWarps;
    const int64_t r = row0 + a;
    const bool in = r < end;
    float s = 0.f;
    for (int c = lane; c < C; c += 32) s += su1[a * C + c] * su2[a * C + c];
    const float x = warp_sum(s) * inv_tau;
    l1[q] = in ? lse1[r] : 0.f;
    l2[q] = in ? lse2[r] : 0.f;
    const float w = in ? grad_scale * (weight ? weight[order[r]] : 1.f) : 0.f;
    wt[q] = w * inv_tau;
    const float coef = wt[q] * (expf(x - l1[q]) + expf(x - l2[q]) - 2.f);
    for (int c = lane; c < C; c += 32) {
      sdu1[a * C + c] = coef * su2[a * C + c];
      sdu2[a * C + c] = coef * su1[a * C + c];
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
      const float p1 = valid ? expf(row_dot(su1 + a * C, brow, C) * inv_tau - l1[q]) * wt[q] : 0.f;
      const float p2 = valid ? expf(row_dot(su2 + a * C, brow, C) * inv_tau - l2[q]) * wt[q] : 0.f;
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
  __syncwarp();
  for (int q = 0; q < rows_per_warp; ++q) {
    const int a = warp + q * kWarps;
    const int64_t r = row0 + a;
    if (r >= end) continue;
    const int64_t v = order[r];
    chain_store_row(su1 + a * C, sdu1 + a * C, sq1[r], g1, v, C, P, lane);
    chain_store_row(su2 + a * C, sdu2 + a * C, sq2[r], g2, v, C, P, lane);
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
  float* sbank = smem;                       // kTileN x (C + 1)
  float* sacc = sbank + kTileN * (C + 1);    // kTileN x C
  float* su1 = sacc + kTileN * C;            // TM x C
  float* su2 = su1 + TM * C;                 // TM x C
  float* sp1 = su2 + TM * C;                 // TM x (kTileN + 1)
  float* sp2 = sp1 + TM * (kTileN + 1);      // TM x (kTileN + 1)
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
        p1 = expf(row_dot(su1 + a * C, brow, C) * inv_tau - lse1[r]) * wt;
        p2 = expf(row_dot(su2 + a * C, brow, C) * inv_tau - lse2[r]) * wt;
      }
      sp1[a * (kTileN + 1) + lane] = p1;
      sp2[a * (kTileN + 1) + lane] = p2;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kTileN * C; e += kThreads) {
      const int n = e / C, c = e - n * C;
      float acc = 0.f;
      for (int a = 0; a < TM; ++a)
        acc += sp1[a * (kTileN + 1) + n] * su1[a * C + c] + sp2[a * (kTileN + 1) + n] * su2[a * C + c];
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
  float sq1 = 0.f, sq2 = 0.f;
  for (int c = lane; c < C; c += 32) {
    const float x1 = src1[c * a.s1c], x2 = src2[c * a.s2c];
    sq1 += x1 * x1;
    sq2 += x2 * x2;
  }
  sq1 = warp_sum(sq1);
  sq2 = warp_sum(sq2);
  const float norm1 = clamped_norm_from_sq(sq1), norm2 = clamped_norm_from_sq(sq2);
  float s = 0.f;
  for (int c = lane; c < C; c += 32) {
    u1[c] = src1[c * a.s1c] / norm1;  // divide, like F.normalize (rcps_math.h)
    u2[c] = src2[c * a.s2c] / norm2;
    s += u1[c] * u2[c];
  }
  const float x = warp_sum(s) * a.inv_tau;
  __syncwarp();
  // Each lane pushes its draws into its own LSE state; the states are merged across lanes.
  LseState st1 = lse_init(), st2 = lse_init();
  for (int64_t k0 = 0; k0 < draws; k0 += 32) {
    const int64_t k = k0 + lane;
    if (k < draws) {
      const uint32_t r = philox_randint(a.seed, draw_counter(i, a.K, k, a.offset));
      const float* row = a.un + eligible[draw_to_index(r, n)] * C;
      st1 = lse_push(st1, row_dot(u1, row, C) * a.inv_tau);
      st2 = lse_push(st2, row_dot(u2, row, C) * a.inv_tau);
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
  st1 = lse_merge(st1, x, 1.f);
  st2 = lse_merge(st2, x, 1.f);
  const float l1 = lse_value(st1), l2 = lse_value(st2);
  if (lane == 0) a.loss[i] = (l1 - x) + (l2 - x);
  if constexpr (kGrad) {
    const float wt = a.grad_scale * (a.weight ? a.weight[i] : 1.f) * a.inv_tau;
    const float coef = wt * (expf(x - l1) + expf(x - l2) - 2.f);
    for (int c = lane; c < C; c += 32) {
      du1[c] = coef * u2[c];
      du2[c] = coef * u1[c];
    }
    for (int64_t k0 = 0; k0 < draws; k0 += 32) {
      const int64_t k = k0 + lane;
      int64_t j = 0;
      float p1 = 0.f, p2 = 0.f;
      if (k < draws) {
        const uint32_t r = philox_randint(a.seed, draw_counter(i, a.K, k, a.offset));
        j = eligible[draw_to_index(r, n)];
        const float* row = a.un + j * C;
        p1 = expf(row_dot(u1, row, C) * a.inv_tau - l1) * wt;
        p2 = expf(row_dot(u2, row, C) * a.inv_tau - l2) * wt;
      }
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
    __syncwarp();
    chain_store_row(u1, du1, sq1, g1, i, C, a.P, lane);
    chain_store_row(u2, du2, sq2, g2, i, C, a.P, lane);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
constexpr size_t kMaxSmem = 96 * 1024;

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

size_t topk_smem(int TM, int C) {
  const size_t grad = (4 * TM * C + kTileN * (C + 1)) * sizeof(float);
  const size_t bank = (kTileN * (C + 1) + kTileN * C + 2 * TM * C + 2 * TM * (kTileN + 1)) *
                      sizeof(float);
  return grad > bank ? grad : bank;
}

Tensor normalize(const Tensor& z, const Tensor* rows, int64_t R, Tensor* sq) {
  const int64_t C = z.size(1);
  Tensor u = at::empty({R, C}, z.options().dtype(at::kFloat));
  if (sq) *sq = at::empty({R}, z.options().dtype(at::kFloat));
  if (R == 0) return u;
  const auto stream = at::cuda::getCurrentCUDAStream();
  normalize_rows_kernel<<<static_cast<unsigned>((R + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
      z.data_ptr<float>(), rows ? rows->data_ptr<int64_t>() : nullptr, u.data_ptr<float>(),
      sq ? sq->data_ptr<float>() : nullptr, R, static_cast<int>(C), z.size(2), z.stride(0),
      z.stride(1), z.stride(2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return u;
}

template <typename acc_t>
Tensor pool_input_grad(const Tensor& zn, const Tensor& pool_grad, double descale,
                       at::ScalarType out_type) {
  const int64_t Bn = zn.size(0), C = zn.size(1), Pn = zn.size(2), M = Bn * Pn;
  Tensor out = at::empty({Bn, C, Pn}, zn.options().dtype(out_type));
  if (M == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const size_t smem = 2 * kWarps * C * sizeof(float);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_type, "pool_chain", [&] {
    auto kernel = pool_chain_kernel<scalar_t, acc_t>;
    allow_smem(kernel, smem);
    kernel<<<static_cast<unsigned>((M + kWarps - 1) / kWarps), kThreads, smem, stream>>>(
        zn.data_ptr<float>(), pool_grad.data_ptr<acc_t>(), descale, out.data_ptr<scalar_t>(), M,
        static_cast<int>(C), Pn, zn.stride(0), zn.stride(1), zn.stride(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> topk_mode(
    const Tensor& z1, const Tensor& z2, const Tensor& zn, const Tensor& labels,
    const Tensor& neg_index, const Tensor& neg_count, float inv_tau, const Tensor& weight,
    float grad_scale, bool want_grad, bool neg_grad, at::ScalarType a_type,
    at::ScalarType n_type) {
  const int64_t B = z1.size(0), C = z1.size(1), P = z1.size(2), N = B * P;
  const int64_t num_classes = neg_index.size(0), L = neg_index.size(1);
  const auto opts = z1.options();
  const auto stream = at::cuda::getCurrentCUDAStream();
  int TM = 32;
  while (TM > kWarps && topk_smem(TM, C) > 48 * 1024) TM /= 2;
  const size_t smem = topk_smem(TM, C);
  TORCH_CHECK(smem <= kMaxSmem, "voxel_infonce_cuda: C = ", C, " channels is too many for the "
              "CUDA kernel's shared-memory tiles (use backend='triton')");

  // Stable sort by class and a device-side tile map (no host sync).
  const Tensor order = std::get<1>(at::sort(labels, /*stable=*/true, /*dim=*/0, false));
  const Tensor sorted = labels.index_select(0, order);
  const Tensor bounds = at::arange(num_classes + 1, labels.options());
  const Tensor class_start = at::searchsorted(sorted, bounds);
  const Tensor counts = class_start.slice(0, 1) - class_start.slice(0, 0, num_classes);
  const Tensor tiles = at::floor_divide(counts + (TM - 1), TM);
  const Tensor tile_end = at::cumsum(tiles, 0);
  const int64_t num_tiles = (N + TM - 1) / TM + num_classes;
  const Tensor t = at::arange(num_tiles, labels.options());
  Tensor tcls = at::searchsorted(tile_end, t, /*out_int32=*/false, /*right=*/true);
  const Tensor valid = tcls < num_classes;
  tcls = tcls.clamp_max(num_classes - 1);
  const Tensor zero = at::zeros({}, labels.options());
  const Tensor row0 = at::where(valid, class_start.index_select(0, tcls) +
                                           (t - (tile_end - tiles).index_select(0, tcls)) * TM,
                                zero).contiguous();
  const Tensor tend = at::where(valid, class_start.index_select(0, tcls + 1), zero).contiguous();
  tcls = tcls.contiguous();
  const TileMap map{tcls.data_ptr<int64_t>(), row0.data_ptr<int64_t>(), tend.data_ptr<int64_t>()};

  Tensor sq1, sq2;
  const Tensor u1 = normalize(z1, &order, N, &sq1);
  const Tensor u2 = normalize(z2, &order, N, &sq2);
  const Tensor flat_index = neg_index.reshape({-1});
  const Tensor bank = normalize(zn, &flat_index, num_classes * L, nullptr);
  Tensor loss = at::empty({N}, opts.dtype(at::kFloat));
  Tensor lse1 = at::empty({N}, opts.dtype(at::kFloat)), lse2 = at::empty({N}, opts.dtype(at::kFloat));
  const int Ci = static_cast<int>(C);
  allow_smem(topk_lse_kernel, smem);
  topk_lse_kernel<<<static_cast<unsigned>(num_tiles), kThreads, smem, stream>>>(
      u1.data_ptr<float>(), u2.data_ptr<float>(), bank.data_ptr<float>(), map,
      neg_count.data_ptr<int64_t>(), order.data_ptr<int64_t>(), lse1.data_ptr<float>(),
      lse2.data_ptr<float>(), loss.data_ptr<float>(), Ci, L, TM, inv_tau);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!want_grad) return {loss, Tensor(), Tensor(), Tensor()};

  const float* w = weight.defined() ? weight.data_ptr<float>() : nullptr;
  Tensor g1 = at::empty({B, C, P}, opts.dtype(a_type)), g2 = at::empty({B, C, P}, opts.dtype(a_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a_type, "topk_anchor_grad", [&] {
    auto kernel = topk_anchor_grad_kernel<scalar_t>;
    allow_smem(kernel, smem);
    kernel<<<static_cast<unsigned>(num_tiles), kThreads, smem, stream>>>(
        u1.data_ptr<float>(), u2.data_ptr<float>(), sq1.data_ptr<float>(), sq2.data_ptr<float>(),
        bank.data_ptr<float>(), map, neg_count.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
        lse1.data_ptr<float>(), lse2.data_ptr<float>(), w, grad_scale, g1.data_ptr<scalar_t>(),
        g2.data_ptr<scalar_t>(), Ci, P, L, TM, inv_tau);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!neg_grad) return {loss, g1, g2, Tensor()};

  const int64_t M = zn.size(0) * zn.size(2);
  Tensor pool_grad = at::zeros({M, C}, opts.dtype(at::kFloat));
  const int64_t nblocks = (L + kTileN - 1) / kTileN;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t split = (2 * sms) / std::max<int64_t>(1, num_classes * nblocks);
  split = std::max<int64_t>(1, std::min<int64_t>({split, 32, (N + 4 * TM * num_classes - 1) /
                                                                 (4 * TM * num_classes)}));
  Tensor partial = at::empty({split, num_classes, L, C}, opts.dtype(at::kFloat));
  allow_smem(topk_bank_grad_kernel, smem);
  topk_bank_grad_kernel<<<dim3(static_cast<unsigned>(num_classes), static_cast<unsigned>(nblocks),
                               static_cast<unsigned>(split)),
                          kThreads, smem, stream>>>(
      u1.data_ptr<float>(), u2.data_ptr<float>(), bank.data_ptr<float>(),
      class_start.data_ptr<int64_t>(), neg_count.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
      lse1.data_ptr<float>(), lse2.data_ptr<float>(), w, grad_scale, partial.data_ptr<float>(),
      Ci, L, num_classes, static_cast<int>(split), TM, inv_tau);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int64_t c = 0; c < num_classes; ++c) {  // class order: deterministic where banks overlap
    const int64_t total = L * C;
    bank_scatter_kernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(
        partial.data_ptr<float>(), neg_index.data_ptr<int64_t>(), neg_count.data_ptr<int64_t>(),
        pool_grad.data_ptr<float>(), c, Ci, L, num_classes, static_cast<int>(split));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {loss, g1, g2, pool_input_grad<float>(zn, pool_grad, 1.0, n_type)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> random_mode(
    const Tensor& z1, const Tensor& z2, const Tensor& zn, const Tensor& labels,
    const Tensor& neg_index, const Tensor& neg_count, float inv_tau, int64_t K, int64_t seed,
    int64_t offset, const Tensor& weight, float grad_scale, bool want_grad, bool neg_grad,
    bool deterministic, at::ScalarType a_type, at::ScalarType n_type) {
  const int64_t B = z1.size(0), C = z1.size(1), P = z1.size(2), N = B * P;
  const int64_t M = zn.size(0) * zn.size(2);
  const auto opts = z1.options();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const Tensor un = normalize(zn, nullptr, M, nullptr);
  Tensor loss = at::empty({N}, opts.dtype(at::kFloat));
  RandomArgs a{z1.data_ptr<float>(), z2.data_ptr<float>(), z1.stride(0), z1.stride(1),
               z1.stride(2), z2.stride(0), z2.stride(1), z2.stride(2), un.data_ptr<float>(),
               labels.data_ptr<int64_t>(), neg_index.data_ptr<int64_t>(),
               neg_count.data_ptr<int64_t>(), loss.data_ptr<float>(),
               weight.defined() ? weight.data_ptr<float>() : nullptr, grad_scale, N, P,
               neg_index.size(1), K, static_cast<int>(C), static_cast<uint64_t>(seed),
               static_cast<uint64_t>(offset), inv_tau, neg_grad, 0.f};
  const size_t smem = 4 * kWarps * C * sizeof(float);
  const unsigned blocks = static_cast<unsigned>((N + kWarps - 1) / kWarps);
  if (!want_grad) {
    auto kernel = random_kernel<float, float, false>;
    allow_smem(kernel, smem);
    kernel<<<blocks, kThreads, smem, stream>>>(a, nullptr, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {loss, Tensor(), Tensor(), Tensor()};
  }
  Tensor g1 = at::empty({B, C, P}, opts.dtype(a_type)), g2 = at::empty({B, C, P}, opts.dtype(a_type));
  Tensor pool_grad;
  double descale = 1.0;
  const bool fixed = neg_grad && deterministic;
  if (fixed) {
    // Bound of the whole pool gradient: unit = 2 sum_i |w_i| / tau (see infonce_triton.py).
    // One host sync for the weights' sum; the result is bitwise identical run to run.
    const double wsum = weight.defined() ? weight.abs().sum().item<double>() : static_cast<double>(N);
    const double unit = std::max(2.0 * std::abs(static_cast<double>(grad_scale)) * inv_tau * wsum, 1e-30);
    a.qscale = static_cast<float>(std::min(std::ldexp(1.0, 61) / unit, 1e38));
    descale = 1.0 / static_cast<double>(a.qscale);
    pool_grad = at::zeros({M, C}, opts.dtype(at::kLong));
  } else {
    pool_grad = at::zeros({neg_grad ? M : 0, C}, opts.dtype(at::kFloat));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a_type, "random_grad", [&] {
    if (fixed) {
      auto kernel = random_kernel<scalar_t, int64_t, true>;
      allow_smem(kernel, smem);
      kernel<<<blocks, kThreads, smem, stream>>>(a, g1.data_ptr<scalar_t>(), g2.data_ptr<scalar_t>(),
                                                 pool_grad.data_ptr<int64_t>());
    } else {
      auto kernel = random_kernel<scalar_t, float, true>;
      allow_smem(kernel, smem);
      kernel<<<blocks, kThreads, smem, stream>>>(a, g1.data_ptr<scalar_t>(), g2.data_ptr<scalar_t>(),
                                                 pool_grad.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!neg_grad) return {loss, g1, g2, Tensor()};
  Tensor gn = fixed ? pool_input_grad<int64_t>(zn, pool_grad, descale, n_type)
                    : pool_input_grad<float>(zn, pool_grad, 1.0, n_type);
  return {loss, g1, g2, gn};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> voxel_infonce_cuda(
    const Tensor& anchor, const Tensor& positive, const Tensor& negative,
    const Tensor& anchor_labels, const Tensor& neg_index, const Tensor& neg_count,
    double temperature, int64_t num_negatives, bool random, int64_t seed, int64_t offset,
    const c10::optional<Tensor>& grad_weight, double grad_scale, bool negative_grad,
    bool deterministic) {
  TORCH_CHECK(anchor.dim() == 3 && positive.sizes() == anchor.sizes(),
              "voxel_infonce_cuda: anchor and positive must be equal (B, C, P), got ",
              anchor.sizes(), " and ", positive.sizes());
  TORCH_CHECK(negative.dim() == 3 && negative.size(1) == anchor.size(1),
              "voxel_infonce_cuda: negative must be (Bn, C, Pn) with C = ", anchor.size(1),
              ", got ", negative.sizes());
  TORCH_CHECK(neg_index.dim() == 2 && neg_count.numel() == neg_index.size(0),
              "voxel_infonce_cuda: neg_index must be (classes, L) with one neg_count per class");
  TORCH_CHECK(anchor_labels.numel() == anchor.size(0) * anchor.size(2),
              "voxel_infonce_cuda: anchor_labels must have B*P elements");
  for (const Tensor* t : {&anchor, &positive, &negative})
    TORCH_CHECK(t->is_cuda(), "voxel_infonce_cuda: feature tensors must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(anchor.device());
  const auto dev = anchor.device();
  const Tensor z1 = anchor.to(at::kFloat), z2 = positive.to(at::kFloat), zn = negative.to(at::kFloat);
  const Tensor labels = anchor_labels.to(dev, at::kLong).contiguous();
  const Tensor index = neg_index.to(dev, at::kLong).contiguous();
  const Tensor count = neg_count.to(dev, at::kLong).contiguous();
  const bool want_grad = grad_scale != 0.0, neg_grad = want_grad && negative_grad;
  Tensor weight;
  if (want_grad && grad_weight.has_value() && grad_weight->defined())
    weight = grad_weight->to(dev, at::kFloat).contiguous();
  const int64_t N = anchor.size(0) * anchor.size(2);
  const float inv_tau = static_cast<float>(1.0 / temperature);
  Tensor loss, g1, g2, gn;
  if (N == 0 || index.size(0) == 0) {
    loss = at::zeros({N}, anchor.options().dtype(at::kFloat));
    if (want_grad) {
      g1 = at::zeros(anchor.sizes(), anchor.options());
      g2 = at::zeros(anchor.sizes(), anchor.options());
    }
    if (neg_grad) gn = at::zeros(negative.sizes(), negative.options());
  } else if (random) {
    std::tie(loss, g1, g2, gn) =
        random_mode(z1, z2, zn, labels, index, count, inv_tau, num_negatives, seed, offset,
                    weight, static_cast<float>(grad_scale), want_grad, neg_grad, deterministic,
                    anchor.scalar_type(), negative.scalar_type());
  } else {
    std::tie(loss, g1, g2, gn) =
        topk_mode(z1, z2, zn, labels, index, count, inv_tau, weight,
                  static_cast<float>(grad_scale), want_grad, neg_grad, anchor.scalar_type(),
                  negative.scalar_type());
  }
  if (!g1.defined()) g1 = at::empty({0}, anchor.options());
  if (!g2.defined()) g2 = at::empty({0}, anchor.options());
  if (!gn.defined()) gn = at::empty({0}, negative.options());
  return {loss, g1, g2, gn};
}

// (N, K) flat pool voxels of every random draw, as random_kernel picks them (tests).
__global__ void random_draws_kernel(const int64_t* labels, const int64_t* neg_index,
                                    const int64_t* neg_count, int64_t* out, int64_t N, int64_t K,
                                    int64_t L, uint64_t seed, uint64_t offset) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= N * K) return;
  const int64_t i = e / K, k = e - i * K;
  const int64_t cls = labels[i], n = neg_count[cls];
  if (n == 0) {
    out[e] = -1;
    return;
  }
  const uint32_t r = philox_randint(seed, draw_counter(i, K, k, offset));
  out[e] = neg_index[cls * L + draw_to_index(r, n)];
}

Tensor random_draws_cuda(const Tensor& anchor_labels, const Tensor& neg_index,
                         const Tensor& neg_count, int64_t num_negatives, int64_t seed,
                         int64_t offset) {
  TORCH_CHECK(anchor_labels.is_cuda(), "random_draws_cuda: anchor_labels must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(anchor_labels.device());
  const auto dev = anchor_labels.device();
  const Tensor labels = anchor_labels.to(at::kLong).contiguous();
  const Tensor index = neg_index.to(dev, at::kLong).contiguous();
  const Tensor count = neg_count.to(dev, at::kLong).contiguous();
  const int64_t N = labels.numel(), K = num_negatives;
  Tensor out = at::empty({N, K}, labels.options());
  if (N * K == 0) return out;
  random_draws_kernel<<<static_cast<unsigned>((N * K + 255) / 256), 256, 0,
                        at::cuda::getCurrentCUDAStream()>>>(
      labels.data_ptr<int64_t>(), index.data_ptr<int64_t>(), count.data_ptr<int64_t>(),
      out.data_ptr<int64_t>(), N, K, index.size(1), static_cast<uint64_t>(seed),
      static_cast<uint64_t>(offset));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace rcps

TORCH_LIBRARY_FRAGMENT(rcps_cuda, m) {
  m.def(
      "voxel_infonce_cuda(Tensor anchor, Tensor positive, Tensor negative, Tensor anchor_labels, "
      "Tensor neg_index, Tensor neg_count, float temperature, int num_negatives, bool random, "
      "int seed, int offset, Tensor? grad_weight, float grad_scale, bool negative_grad, "
      "bool deterministic) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "random_draws_cuda(Tensor anchor_labels, Tensor neg_index, Tensor neg_count, "
      "int num_negatives, int seed, int offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(rcps_cuda, CUDA, m) {
  m.impl("voxel_infonce_cuda", &rcps::cuda::voxel_infonce_cuda);
  m.impl("random_draws_cuda", &rcps::cuda::random_draws_cuda);
}
