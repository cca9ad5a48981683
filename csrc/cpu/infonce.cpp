// Fused bidirectional voxel InfoNCE on the CPU: forward, and gradients for any per-anchor weights.
//
// Layout: anchor/positive are (B, C, P) and the pool is (Bn, C, Pn), any strides; anchor i is
// voxel i of the flattened (B, P). anchor_labels (N,) holds each anchor's pseudo-class; for class c,
// neg_index[c, :neg_count[c]] lists its negatives as flat pool voxels: the class bank (topk mode)
// or the eligible pool that random draws pick from (random mode).
//
// Per anchor i of class c, with u = z / max(||z||, eps), s = u1.u2, x = s / tau:
//   l_i = (lse1_i - x) + (lse2_i - x),  lse_d = log(exp(x) + sum_{n in N_c} exp(u_d . u_n / tau)).
// Gradient of sum_i w_i l_i, with p the softmax weights of direction d (positive first):
//   dU1_i = w_i/tau ((p1+ + p2+ - 2) u2_i + sum_n p1_in u_n),  dU2_i symmetric,
//   dU_n  = sum_i w_i/tau (p1_in u1_i + p2_in u2_i),
// then dz = (du - u (u.du)) / ||z|| through the normalisation (rcps_math.h).
//
// topk mode (topk_pass below): tiles of class-sorted anchors against their class bank with small
// GEMMs; nothing of size anchors x K is ever stored, and results are deterministic.
// random mode (random_pass): K Philox draws per anchor, regenerated whenever they are needed.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../rcps_math.h"
#include "fast_math.h"

namespace rcps {
namespace cpu {
namespace {

using at::Tensor;

// fp32 view of a (B, C, P) feature map; voxel v = b * P + p.
struct FeatureMap {
  const float* data;
  int64_t stride_b, stride_c, stride_p, voxels_per_item, channels;

  explicit FeatureMap(const Tensor& z)
      : data(z.data_ptr<float>()),
        stride_b(z.stride(0)),
        stride_c(z.stride(1)),
        stride_p(z.stride(2)),
        voxels_per_item(z.size(2)),
        channels(z.size(1)) {}

  int64_t offset(int64_t voxel) const {
    return (voxel / voxels_per_item) * stride_b + (voxel % voxels_per_item) * stride_p;
  }
};

// Per-row normalisation state kept for the chain rule.
struct NormalisedRows {
  std::vector<float> u;         // rows x C, fp32
  std::vector<float> inv_norm;  // 1 / max(||z||, eps)
  std::vector<uint8_t> clamped; // ||z|| <= eps
};

// Normalise the voxels `rows[r]` (or r itself when rows is null) of z into consecutive rows.
NormalisedRows normalise_rows(const FeatureMap& z, const int64_t* rows, int64_t n) {
  const int64_t C = z.channels;
  NormalisedRows out;
  out.u.resize(n * C);
  out.inv_norm.resize(n);
  out.clamped.resize(n);
  at::parallel_for(0, n, 512, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* src = z.data + z.offset(rows ? rows[r] : r);
      float sq = 0.f;
      for (int64_t c = 0; c < C; ++c) sq += src[c * z.stride_c] * src[c * z.stride_c];
      const float norm = clamped_norm_from_sq(sq);
      float* dst = out.u.data() + r * C;
      for (int64_t c = 0; c < C; ++c) dst[c] = src[c * z.stride_c] / norm;
      out.inv_norm[r] = 1.0f / norm;
      out.clamped[r] = norm_is_clamped(sq);
    }
  });
  return out;
}

// dz for one voxel from du (fp32, C contiguous), written (or added, for pool voxels that
// collect several contributions) with the output's channel stride.
template <bool kAccumulate>
inline void chain_input_grad(const float* du, const float* u, float inv_norm, bool clamped,
                             int64_t C, float* dz, int64_t stride_c) {
  float u_dot_du = 0.f;
  for (int64_t c = 0; c < C; ++c) u_dot_du += u[c] * du[c];
  for (int64_t c = 0; c < C; ++c) {
    const float g = normalize_backward(du[c], u[c], u_dot_du, inv_norm, clamped);
    dz[c * stride_c] = kAccumulate ? dz[c * stride_c] + g : g;
  }
}
constexpr auto write_input_grad = chain_input_grad<false>;
constexpr auto accumulate_input_grad = chain_input_grad<true>;

// Contiguous fp32 (B, C, P) gradient buffer and where voxel v's channel 0 lives in it.
struct GradMap {
  Tensor tensor;
  float* data;
  int64_t voxels_per_item, channels;

  GradMap(int64_t B, int64_t C, int64_t P)
      : tensor(at::zeros({B, C, P}, at::kFloat)),
        data(tensor.data_ptr<float>()),
        voxels_per_item(P),
        channels(C) {}

  float* voxel(int64_t v) {
    return data + (v / voxels_per_item) * channels * voxels_per_item + v % voxels_per_item;
  }
};

// Row-major fp32 matrix view over raw memory, for at::mm_out on thread-local buffers.
Tensor matrix(const float* data, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<float*>(data), {rows, cols}, at::kFloat);
}

// exp(S/tau - m) in place over one row block: returns (m, sum of the exps). m is `shift` when
// that is a known upper bound of the row (saving a pass), else the row's max. Simple loops with
// OpenMP simd reductions, so that the compiler vectorises them.
inline LseState exp_block(float* row, int64_t K, float inv_tau, float shift) {
  if (K == 0) return lse_init();
  float m = shift;
  if (std::isinf(shift)) {
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < K; ++k) m = std::max(m, row[k] * inv_tau);
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < K; ++k) {
    row[k] = fast_exp(row[k] * inv_tau - m);
    sum += row[k];
  }
  return LseState{m, sum};
}

// Upper bound of every logit u.v/tau of normalised rows (|u.v| <= 1), usable as the shift of
// exp_block while exp(-2/tau) stays far from float underflow; -inf: compute each row's max.
inline float logit_bound(float inv_tau) { return 2.f * inv_tau < 80.f ? inv_tau : -INFINITY; }

// S/tau -> exp(S/tau - lse) * scale in place, from a known log-sum-exp.
inline void softmax_weights(float* row, int64_t K, float inv_tau, float lse, float scale) {
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) row[k] = fast_exp(row[k] * inv_tau - lse) * scale;
}

struct Options {
  float inv_tau;
  bool want_grad;            // compute gradients of sum_i w_i l_i
  bool want_negative_grad;   // ... including the pool's
  float grad_scale;          // w_i = grad_scale * grad_weight[i] (or grad_scale)
  const float* grad_weight;  // (N,) or null

  float weight(int64_t anchor) const {
    return grad_scale * (grad_weight ? grad_weight[anchor] : 1.f);
  }
};

// ---------------------------------------------------------------------------------------------
// topk mode
//
// Anchors are counting-sorted by class, so a tile of anchors shares one bank N_c. Tiles are
// independent tasks: S = U_tile N_c^T (one GEMM per direction), exact row log-sum-exps with the
// positive logit, S turned in place into E = exp(S/tau - shift), then dU = P N_c and
// dN_c += P^T U (two GEMMs each, P = diag(row scale) E with the scale folded into the small
// operands) while E is still in cache: six GEMMs in all, the floor.
//
// The bank gradient dN_c is summed over tiles. While one copy of it per thread is small
// (kPartialBudget), each thread accumulates its own and the copies are added in thread order.
// For larger banks a second pass owns blocks of bank rows and recomputes the similarity of every
// tile against its block from the stored log-sum-exps (two more GEMMs), so memory stays flat in
// K. Both orders are fixed: results are deterministic for a given thread count.
// ---------------------------------------------------------------------------------------------

// Rows of the anchor tile: keep a (tile x K) similarity block around 128 KB.
int64_t tile_rows(int64_t K) {
  return std::clamp<int64_t>(32768 / std::max<int64_t>(K, 1), 8, 128);
}

// Largest per-thread bank-gradient copies (floats, all threads together) before the second pass.
constexpr int64_t kPartialBudget = 1 << 18;
// Bank rows per task of the second pass.
constexpr int64_t kBankBlock = 128;

struct ClassTiles {
  const NormalisedRows& a1;
  const NormalisedRows& a2;
  const NormalisedRows& bank;
  const int64_t* order;  // sorted row -> anchor
  int64_t first, count, K, C;
};

// Similarities of sorted rows [r0, r0 + rows) against bank rows [k0, k0 + nk), both directions.
void similarity_block(const ClassTiles& ct, int64_t r0, int64_t rows, int64_t k0, int64_t nk,
                      Tensor& s1, Tensor& s2) {
  const Tensor bank_t = matrix(ct.bank.u.data() + k0 * ct.C, nk, ct.C);
  at::mm_out(s1, matrix(ct.a1.u.data() + r0 * ct.C, rows, ct.C), bank_t.t());
  at::mm_out(s2, matrix(ct.a2.u.data() + r0 * ct.C, rows, ct.C), bank_t.t());
}

// Add dN (rows x C, fp32) of bank rows [k0, k0 + nk) into the pool gradient, through the
// normalisation of those rows. Callers own these rows: no other thread writes them meanwhile.
void chain_bank_grad(const ClassTiles& ct, const int64_t* bank_voxels, const float* grad,
                     int64_t k0, int64_t nk, GradMap* gn) {
  for (int64_t b = 0; b < nk; ++b) {
    const int64_t k = k0 + b;
    accumulate_input_grad(grad + b * ct.C, ct.bank.u.data() + k * ct.C, ct.bank.inv_norm[k],
                          ct.bank.clamped[k], ct.C, gn->voxel(bank_voxels[k]),
                          gn->voxels_per_item);
  }
}

// Second pass for large banks: each task owns kBankBlock bank rows and sweeps all tiles,
// recomputing P from the stored log-sum-exps: dN_block = sum_tiles P_block^T U_tile.
void bank_grad_pass(const ClassTiles& ct, const int64_t* bank_voxels, const float* lse1,
                    const float* lse2, const Options& opt, GradMap* gn) {
  const int64_t C = ct.C, num_blocks = (ct.K + kBankBlock - 1) / kBankBlock;
  const int64_t T = tile_rows(kBankBlock);
  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<float> s1(T * kBankBlock), s2(T * kBankBlock), grad(kBankBlock * C);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t k0 = block * kBankBlock, nk = std::min(kBankBlock, ct.K - k0);
      Tensor grad_t = matrix(grad.data(), nk, C);
      grad_t.zero_();
      for (int64_t r0 = ct.first; r0 < ct.first + ct.count; r0 += T) {
        const int64_t rows = std::min(T, ct.first + ct.count - r0);
        Tensor s1_t = matrix(s1.data(), rows, nk), s2_t = matrix(s2.data(), rows, nk);
        similarity_block(ct, r0, rows, k0, nk, s1_t, s2_t);
        for (int64_t t = 0; t < rows; ++t) {
          const float wt = opt.weight(ct.order[r0 + t]) * opt.inv_tau;
          softmax_weights(s1.data() + t * nk, nk, opt.inv_tau, lse1[r0 + t], wt);
          softmax_weights(s2.data() + t * nk, nk, opt.inv_tau, lse2[r0 + t], wt);
        }
        grad_t.addmm_(s1_t.t(), matrix(ct.a1.u.data() + r0 * C, rows, C));
        grad_t.addmm_(s2_t.t(), matrix(ct.a2.u.data() + r0 * C, rows, C));
      }
      chain_bank_grad(ct, bank_voxels, grad.data(), k0, nk, gn);
    }
  });
}

void topk_pass(const FeatureMap& z1, const FeatureMap& z2, const FeatureMap& zn,
               const int64_t* labels, const int64_t* neg_index, int64_t index_stride,
               const int64_t* neg_count, int64_t num_classes, int64_t N, const Options& opt,
               float* loss, GradMap* g1, GradMap* g2, GradMap* gn) {
  const int64_t C = z1.channels;

  // Counting sort of anchors by class: class c owns sorted rows [start[c], start[c + 1]).
  std::vector<int64_t> start(num_classes + 1, 0), order(N);
  for (int64_t i = 0; i < N; ++i) ++start[labels[i] + 1];
  for (int64_t c = 0; c < num_classes; ++c) start[c + 1] += start[c];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < N; ++i) order[fill[labels[i]]++] = i;
  }
  const NormalisedRows a1 = normalise_rows(z1, order.data(), N);
  const NormalisedRows a2 = normalise_rows(z2, order.data(), N);
  const int num_slots = std::max(1, at::get_num_threads());
  // Row log-sum-exps, kept for the second pass of large banks.
  std::vector<float> lse1(N), lse2(N);

  for (int64_t c = 0; c < num_classes; ++c) {
    const int64_t first = start[c], count = start[c + 1] - first;
    const int64_t K = neg_count[c];
    if (count == 0) continue;
    const int64_t* bank_voxels = neg_index + c * index_stride;
    const NormalisedRows bank = normalise_rows(zn, bank_voxels, K);
    const ClassTiles ct{a1, a2, bank, order.data(), first, count, K, C};
    const bool bank_grad = opt.want_negative_grad && K > 0;
    const bool use_partials = bank_grad && num_slots * K * C <= kPartialBudget;
    std::vector<float> partials(use_partials ? num_slots * K * C : 0, 0.f);
    const Tensor bank_t = matrix(bank.u.data(), K, C);

    const int64_t T = tile_rows(K);
    const int64_t num_tiles = (count + T - 1) / T;
    const float shift = logit_bound(opt.inv_tau);
    at::parallel_for(0, num_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
      std::vector<float> s1(T * K), s2(T * K), du1(T * C), du2(T * C), us1(T * C), us2(T * C);
      std::vector<float> scale1(T), scale2(T), coef(T);
      const int slot = at::get_thread_num();
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t r0 = first + tile * T, rows = std::min(T, first + count - r0);
        const float* u1 = a1.u.data() + r0 * C;
        const float* u2 = a2.u.data() + r0 * C;
        Tensor s1_t = matrix(s1.data(), rows, K), s2_t = matrix(s2.data(), rows, K);
        if (K > 0) similarity_block(ct, r0, rows, 0, K, s1_t, s2_t);
        for (int64_t t = 0; t < rows; ++t) {
          const int64_t r = r0 + t, anchor = order[r];
          float dot = 0.f;
          for (int64_t ch = 0; ch < C; ++ch) dot += u1[t * C + ch] * u2[t * C + ch];
          const float x = dot * opt.inv_tau;
          // The block's (shift, sum) is the negatives' state; the rows of S now hold
          // E = exp(S/tau - shift).
          const LseState b1 = exp_block(s1.data() + t * K, K, opt.inv_tau, shift);
          const LseState b2 = exp_block(s2.data() + t * K, K, opt.inv_tau, shift);
          const PositiveNll d1 = positive_nll(b1, x), d2 = positive_nll(b2, x);
          lse1[r] = d1.lse;
          lse2[r] = d2.lse;
          loss[anchor] = d1.nll + d2.nll;
          if (!opt.want_grad) continue;
          // Softmax weights times w/tau: P = diag(scale) E with scale = w/tau exp(shift - lse).
          // The scale is applied to the (rows x C) operands and results of the GEMMs below,
          // never to the (rows x K) block: P N = diag(scale) (E N), P^T U = E^T (diag(scale) U).
          const float wt = opt.weight(anchor) * opt.inv_tau;
          scale1[t] = wt * std::exp(b1.max - lse1[r]);
          scale2[t] = wt * std::exp(b2.max - lse2[r]);
          // dU1 = coef u2 + P1 N_c, dU2 = coef u1 + P2 N_c, coef = w/tau (p1_pos + p2_pos - 2).
          // 1 - p_pos is the negatives' softmax mass, sum(E) scale: exact in relative terms,
          // where 1 - exp(x - lse) would cancel for a confident anchor.
          coef[t] = -(scale1[t] * b1.sum + scale2[t] * b2.sum);
          for (int64_t ch = 0; ch < C; ++ch) {
            us1[t * C + ch] = scale1[t] * u1[t * C + ch];
            us2[t * C + ch] = scale2[t] * u2[t * C + ch];
          }
        }
        if (!opt.want_grad) continue;
        Tensor du1_t = matrix(du1.data(), rows, C), du2_t = matrix(du2.data(), rows, C);
        if (K > 0) {
          at::mm_out(du1_t, s1_t, bank_t);
          at::mm_out(du2_t, s2_t, bank_t);
        } else {
          du1_t.zero_();
          du2_t.zero_();
        }
        for (int64_t t = 0; t < rows; ++t) {
          const int64_t r = r0 + t, anchor = order[r];
          float* d1 = du1.data() + t * C;
          float* d2 = du2.data() + t * C;
          for (int64_t ch = 0; ch < C; ++ch) {
            d1[ch] = scale1[t] * d1[ch] + coef[t] * u2[t * C + ch];
            d2[ch] = scale2[t] * d2[ch] + coef[t] * u1[t * C + ch];
          }
          write_input_grad(d1, u1 + t * C, a1.inv_norm[r], a1.clamped[r], C,
                           g1->voxel(anchor), g1->voxels_per_item);
          write_input_grad(d2, u2 + t * C, a2.inv_norm[r], a2.clamped[r], C,
                           g2->voxel(anchor), g2->voxels_per_item);
        }
        if (use_partials) {
          // dN_c += P1^T U1 + P2^T U2 into this thread's copy.
          Tensor partial = matrix(partials.data() + slot * K * C, K, C);
          partial.addmm_(s1_t.t(), matrix(us1.data(), rows, C));
          partial.addmm_(s2_t.t(), matrix(us2.data(), rows, C));
        }
      }
    });
    if (use_partials) {
      for (int s = 1; s < num_slots; ++s)
        for (int64_t e = 0; e < K * C; ++e) partials[e] += partials[s * K * C + e];
      chain_bank_grad(ct, bank_voxels, partials.data(), 0, K, gn);
    } else if (bank_grad) {
      bank_grad_pass(ct, bank_voxels, lse1.data(), lse2.data(), opt, gn);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// random mode: K draws per anchor, with replacement, from neg_index[c, :neg_count[c]].
// ---------------------------------------------------------------------------------------------
struct Draws {
  uint64_t seed, offset;
  int64_t num_negatives;

  // Flat pool voxel of draw k of `anchor`, or -1 when its class has no eligible negative.
  int64_t pick(int64_t anchor, int64_t k, const int64_t* eligible, int64_t n) const {
    if (n == 0) return -1;
    const uint32_t r = philox_randint(seed, draw_counter(anchor, num_negatives, k, offset));
    return eligible[draw_to_index(r, n)];
  }
};

void random_pass(const FeatureMap& z1, const FeatureMap& z2, const FeatureMap& zn,
                 const int64_t* labels, const int64_t* neg_index, int64_t index_stride,
                 const int64_t* neg_count, int64_t N, int64_t M, const Draws& draws,
                 const Options& opt, float* loss, GradMap* g1, GradMap* g2, float* pool_grad) {
  const int64_t C = z1.channels, K = draws.num_negatives;
  const NormalisedRows pool = normalise_rows(zn, nullptr, M);
  const int num_slots = at::get_num_threads();
  const bool pool_partials = opt.want_negative_grad && num_slots > 1;
  std::vector<float> partials(pool_partials ? (num_slots - 1) * M * C : 0, 0.f);

  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    const int slot = at::get_thread_num();
    // Slot 0 writes straight into pool_grad, the others into their partial; summed below.
    float* my_pool_grad = slot == 0 ? pool_grad : partials.data() + (slot - 1) * M * C;
    std::vector<int64_t> picked(K);
    std::vector<float> dot1(K), dot2(K), u1(C), u2(C), du1(C), du2(C);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = labels[i];
      const int64_t* eligible = neg_index + c * index_stride;
      const int64_t n = neg_count[c];
      float sq1 = 0.f, sq2 = 0.f;
      const float* src1 = z1.data + z1.offset(i);
      const float* src2 = z2.data + z2.offset(i);
      for (int64_t ch = 0; ch < C; ++ch) {
        sq1 += src1[ch * z1.stride_c] * src1[ch * z1.stride_c];
        sq2 += src2[ch * z2.stride_c] * src2[ch * z2.stride_c];
      }
      const float norm1 = clamped_norm_from_sq(sq1), norm2 = clamped_norm_from_sq(sq2);
      const float inv1 = 1.0f / norm1, inv2 = 1.0f / norm2;
      float s = 0.f;
      for (int64_t ch = 0; ch < C; ++ch) {
        u1[ch] = src1[ch * z1.stride_c] / norm1;
        u2[ch] = src2[ch * z2.stride_c] / norm2;
        s += u1[ch] * u2[ch];
      }
      const float x = s * opt.inv_tau;
      LseState neg1 = lse_init(), neg2 = lse_init();
      const int64_t draws_here = n > 0 ? K : 0;
      for (int64_t k = 0; k < draws_here; ++k) {
        const int64_t j = draws.pick(i, k, eligible, n);
        const float* un = pool.u.data() + j * C;
        float d1 = 0.f, d2 = 0.f;
        for (int64_t ch = 0; ch < C; ++ch) {
          d1 += u1[ch] * un[ch];
          d2 += u2[ch] * un[ch];
        }
        picked[k] = j;
        dot1[k] = d1 * opt.inv_tau;
        dot2[k] = d2 * opt.inv_tau;
        neg1 = lse_push(neg1, dot1[k]);
        neg2 = lse_push(neg2, dot2[k]);
      }
      const PositiveNll n1 = positive_nll(neg1, x), n2 = positive_nll(neg2, x);
      const float l1 = n1.lse, l2 = n2.lse;
      loss[i] = n1.nll + n2.nll;
      if (!opt.want_grad) continue;
      const float w = opt.weight(i);
      const float wt = w * opt.inv_tau;
      // dU1 = sum_k P1_k n_k - (sum_k P1_k + P2_k) u2 (and 1 <-> 2): the positive's weight
      // p_pos - 1 is minus the negatives' softmax mass, summed here in relative precision.
      std::fill(du1.begin(), du1.end(), 0.f);
      std::fill(du2.begin(), du2.end(), 0.f);
      float mass = 0.f;
      for (int64_t k = 0; k < draws_here; ++k) {
        const float p1 = wt * std::exp(dot1[k] - l1), p2 = wt * std::exp(dot2[k] - l2);
        mass += p1 + p2;
        const float* un = pool.u.data() + picked[k] * C;
        for (int64_t ch = 0; ch < C; ++ch) {
          du1[ch] += p1 * un[ch];
          du2[ch] += p2 * un[ch];
        }
        if (!opt.want_negative_grad) continue;
        float* dun = my_pool_grad + picked[k] * C;
        for (int64_t ch = 0; ch < C; ++ch) dun[ch] += p1 * u1[ch] + p2 * u2[ch];
      }
      for (int64_t ch = 0; ch < C; ++ch) {
        du1[ch] -= mass * u2[ch];
        du2[ch] -= mass * u1[ch];
      }
      write_input_grad(du1.data(), u1.data(), inv1, norm_is_clamped(sq1), C, g1->voxel(i),
                       g1->voxels_per_item);
      write_input_grad(du2.data(), u2.data(), inv2, norm_is_clamped(sq2), C, g2->voxel(i),
                       g2->voxels_per_item);
    }
  });
  for (int s = 0; s + 1 < num_slots && pool_partials; ++s)
    for (int64_t e = 0; e < M * C; ++e) pool_grad[e] += partials[s * M * C + e];
}

// Chain the pool's gradient (M, C) through its normalisation into a (Bn, C, Pn) buffer.
void pool_input_grad(const FeatureMap& zn, const float* pool_grad, int64_t M, GradMap* gn) {
  const int64_t C = zn.channels;
  at::parallel_for(0, M, 512, [&](int64_t begin, int64_t end) {
    std::vector<float> u(C);
    for (int64_t j = begin; j < end; ++j) {
      const float* du = pool_grad + j * C;
      bool touched = false;
      for (int64_t c = 0; c < C; ++c) touched |= du[c] != 0.f;
      if (!touched) continue;  // the buffer is zero-initialised
      const float* src = zn.data + zn.offset(j);
      float sq = 0.f;
      for (int64_t c = 0; c < C; ++c) sq += src[c * zn.stride_c] * src[c * zn.stride_c];
      const float norm = clamped_norm_from_sq(sq);
      for (int64_t c = 0; c < C; ++c) u[c] = src[c * zn.stride_c] / norm;
      write_input_grad(du, u.data(), 1.0f / norm, norm_is_clamped(sq), C, gn->voxel(j),
                       gn->voxels_per_item);
    }
  });
}

void check_inputs(const Tensor& anchor, const Tensor& positive, const Tensor& negative,
                  const Tensor& labels, const Tensor& neg_index, const Tensor& neg_count) {
  TORCH_CHECK(anchor.dim() == 3 && positive.sizes() == anchor.sizes(),
              "voxel_infonce_cpu: anchor and positive must be equal (B, C, P), got ",
              anchor.sizes(), " and ", positive.sizes());
  TORCH_CHECK(negative.dim() == 3 && negative.size(1) == anchor.size(1),
              "voxel_infonce_cpu: negative must be (Bn, C, Pn) with C = ", anchor.size(1),
              ", got ", negative.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.numel() == anchor.size(0) * anchor.size(2),
              "voxel_infonce_cpu: anchor_labels must be contiguous int64 of B*P elements");
  TORCH_CHECK(neg_index.dim() == 2 && neg_index.scalar_type() == at::kLong &&
                  neg_index.is_contiguous(),
              "voxel_infonce_cpu: neg_index must be a contiguous int64 (classes, L) tensor");
  TORCH_CHECK(neg_count.scalar_type() == at::kLong && neg_count.is_contiguous() &&
                  neg_count.numel() == neg_index.size(0),
              "voxel_infonce_cpu: neg_count must be int64 with one entry per class");
  for (const Tensor* t : {&anchor, &positive, &negative, &labels, &neg_index, &neg_count})
    TORCH_CHECK(t->device().is_cpu(), "voxel_infonce_cpu: all tensors must be on the CPU");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> voxel_infonce_cpu(
    const Tensor& anchor, const Tensor& positive, const Tensor& negative,
    const Tensor& anchor_labels, const Tensor& neg_index, const Tensor& neg_count,
    double temperature, int64_t num_negatives, bool random, int64_t seed, int64_t offset,
    const c10::optional<Tensor>& grad_weight, double grad_scale, bool negative_grad) {
  check_inputs(anchor, positive, negative, anchor_labels, neg_index, neg_count);
  const Tensor z1 = anchor.to(at::kFloat), z2 = positive.to(at::kFloat),
               zn = negative.to(at::kFloat);
  const int64_t B = z1.size(0), C = z1.size(1), P = z1.size(2), N = B * P;
  const int64_t M = zn.size(0) * zn.size(2), num_classes = neg_index.size(0);
  const Tensor weight = grad_weight.has_value() ? grad_weight->to(at::kFloat).contiguous()
                                                : Tensor();
  Options opt{static_cast<float>(1.0 / temperature), grad_scale != 0.0,
              grad_scale != 0.0 && negative_grad, static_cast<float>(grad_scale),
              weight.defined() ? weight.data_ptr<float>() : nullptr};

  Tensor loss = at::zeros({N}, at::kFloat);
  const FeatureMap f1(z1), f2(z2), fn(zn);
  const int64_t rows = opt.want_grad ? B : 0, pool_rows = opt.want_negative_grad ? zn.size(0) : 0;
  GradMap g1(rows, C, P), g2(rows, C, P), gn(pool_rows, C, zn.size(2));

  if (random) {
    const Draws draws{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), num_negatives};
    // Random draws scatter anywhere in the pool: collect du per pool row, then chain once.
    Tensor pool_grad = opt.want_negative_grad ? at::zeros({M, C}, at::kFloat) : Tensor();
    float* pool_grad_ptr = pool_grad.defined() ? pool_grad.data_ptr<float>() : nullptr;
    random_pass(f1, f2, fn, anchor_labels.data_ptr<int64_t>(), neg_index.data_ptr<int64_t>(),
                neg_index.size(1), neg_count.data_ptr<int64_t>(), N, M, draws, opt,
                loss.data_ptr<float>(), &g1, &g2, pool_grad_ptr);
    if (opt.want_negative_grad) pool_input_grad(fn, pool_grad_ptr, M, &gn);
  } else {
    topk_pass(f1, f2, fn, anchor_labels.data_ptr<int64_t>(), neg_index.data_ptr<int64_t>(),
              neg_index.size(1), neg_count.data_ptr<int64_t>(), num_classes, N, opt,
              loss.data_ptr<float>(), &g1, &g2, &gn);
  }

  const auto as_output = [](GradMap& g, const Tensor& like) {
    return g.tensor.size(0) > 0 ? g.tensor.to(like.scalar_type()) : at::empty({0}, like.options());
  };
  Tensor grad_anchor = as_output(g1, anchor), grad_positive = as_output(g2, positive),
         grad_negative = as_output(gn, negative);
  return {loss, grad_anchor, grad_positive, grad_negative};
}

// The flat pool voxel of every draw, (N, K), -1 where the anchor's class has no eligible
// negative: what random mode uses, for tests and for the reference.
Tensor random_draws_cpu(const Tensor& anchor_labels, const Tensor& neg_index,
                        const Tensor& neg_count, int64_t num_negatives, int64_t seed,
                        int64_t offset) {
  TORCH_CHECK(anchor_labels.scalar_type() == at::kLong && neg_index.scalar_type() == at::kLong &&
                  neg_count.scalar_type() == at::kLong,
              "random_draws_cpu: labels, neg_index and neg_count must be int64");
  const Tensor labels = anchor_labels.contiguous(), index = neg_index.contiguous(),
               count = neg_count.contiguous();
  const int64_t N = labels.numel(), K = num_negatives, L = index.size(1);
  Tensor out = at::empty({N, K}, at::kLong);
  const Draws draws{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), K};
  const int64_t *lab = labels.data_ptr<int64_t>(), *idx = index.data_ptr<int64_t>(),
                *cnt = count.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t k = 0; k < K; ++k)
        dst[i * K + k] = draws.pick(i, k, idx + lab[i] * L, cnt[lab[i]]);
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace rcps

TORCH_LIBRARY_FRAGMENT(rcps_C, m) {
  m.def(
      "voxel_infonce_cpu(Tensor anchor, Tensor positive, Tensor negative, Tensor anchor_labels, "
      "Tensor neg_index, Tensor neg_count, float temperature, int num_negatives, bool random, "
      "int seed, int offset, Tensor? grad_weight, float grad_scale, bool negative_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      &rcps::cpu::voxel_infonce_cpu);
  m.def(
      "random_draws_cpu(Tensor anchor_labels, Tensor neg_index, Tensor neg_count, "
      "int num_negatives, int seed, int offset) -> Tensor",
      &rcps::cpu::random_draws_cpu);
}
