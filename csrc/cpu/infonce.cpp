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
// Every kernel is templated on the accumulation type: float64 inputs are computed in double
// (torch.autograd.gradcheck holds on them), everything else in float.
//
// topk mode (topk_pass below): tiles of class-sorted anchors against their class bank with small
// GEMMs; nothing of size anchors x K is ever stored, and results are deterministic.
// random mode (random_pass): K Philox draws per anchor, regenerated whenever they are needed.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/rcps_math.h"
#include "fast_math.h"

namespace rcps {
namespace cpu {
namespace {

using at::Tensor;

// View of a (B, C, P) feature map in the accumulation type T; voxel v = b * P + p.
template <typename T>
struct FeatureMap {
  const T* data;
  int64_t stride_b, stride_c, stride_p, voxels_per_item, channels;

  explicit FeatureMap(const Tensor& z)
      : data(z.data_ptr<T>()),
        stride_b(z.stride(0)),
        stride_c(z.stride(1)),
        stride_p(z.stride(2)),
        voxels_per_item(z.size(2)),
        channels(z.size(1)) {}

  int64_t offset(int64_t voxel) const {
    return (voxel / voxels_per_item) * stride_b + (voxel % voxels_per_item) * stride_p;
  }
};

// ||z|| of one voxel (C channels at the given stride), scaled before squaring (rcps_math.h).
template <typename T>
T voxel_norm(const T* src, int64_t C, int64_t stride_c) {
  T amax = 0;
  for (int64_t c = 0; c < C; ++c) amax = std::max(amax, std::abs(src[c * stride_c]));
  if (!(amax > 0)) return amax;  // zero row (a NaN channel still reaches u = z / eps)
  T scaled_sq = 0;
  for (int64_t c = 0; c < C; ++c) {
    const T scaled = src[c * stride_c] / amax;
    scaled_sq += scaled * scaled;
  }
  return scaled_norm(amax, scaled_sq);
}

// Per-row normalisation state kept for the chain rule.
template <typename T>
struct NormalisedRows {
  std::vector<T> u;              // rows x C
  std::vector<T> inv_norm;       // 1 / max(||z||, eps)
  std::vector<uint8_t> clamped;  // ||z|| <= eps
};

// Normalise the voxels `rows[r]` (or r itself when rows is null) of z into consecutive rows.
template <typename T>
NormalisedRows<T> normalise_rows(const FeatureMap<T>& z, const int64_t* rows, int64_t n) {
  const int64_t C = z.channels;
  NormalisedRows<T> out;
  out.u.resize(n * C);
  out.inv_norm.resize(n);
  out.clamped.resize(n);
  at::parallel_for(0, n, 512, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* src = z.data + z.offset(rows ? rows[r] : r);
      const T raw_norm = voxel_norm(src, C, z.stride_c), norm = clamp_norm(raw_norm);
      T* dst = out.u.data() + r * C;
      for (int64_t c = 0; c < C; ++c) dst[c] = src[c * z.stride_c] / norm;
      out.inv_norm[r] = T(1) / norm;
      out.clamped[r] = is_clamped_norm(raw_norm);
    }
  });
  return out;
}

// dz for one voxel from du (C contiguous), written (or added, for pool voxels that collect
// several contributions) with the output's channel stride.
template <bool kAccumulate, typename T>
inline void chain_input_grad(const T* du, const T* u, T inv_norm, bool clamped, int64_t C, T* dz,
                             int64_t stride_c) {
  T u_dot_du = 0;
  for (int64_t c = 0; c < C; ++c) u_dot_du += u[c] * du[c];
  for (int64_t c = 0; c < C; ++c) {
    const T g = normalize_backward(du[c], u[c], u_dot_du, inv_norm, clamped);
    dz[c * stride_c] = kAccumulate ? dz[c * stride_c] + g : g;
  }
}
template <typename T>
inline void write_input_grad(const T* du, const T* u, T inv_norm, bool clamped, int64_t C, T* dz,
                             int64_t stride_c) {
  chain_input_grad<false>(du, u, inv_norm, clamped, C, dz, stride_c);
}
template <typename T>
inline void accumulate_input_grad(const T* du, const T* u, T inv_norm, bool clamped, int64_t C,
                                  T* dz, int64_t stride_c) {
  chain_input_grad<true>(du, u, inv_norm, clamped, C, dz, stride_c);
}

// Contiguous (B, C, P) gradient buffer and where voxel v's channel 0 lives in it.
template <typename T>
struct GradMap {
  Tensor tensor;
  T* data;
  int64_t voxels_per_item, channels;

  GradMap(int64_t B, int64_t C, int64_t P)
      : tensor(at::zeros({B, C, P}, c10::CppTypeToScalarType<T>::value)),
        data(tensor.data_ptr<T>()),
        voxels_per_item(P),
        channels(C) {}

  T* voxel(int64_t v) {
    return data + (v / voxels_per_item) * channels * voxels_per_item + v % voxels_per_item;
  }
};

// Row-major matrix view over raw memory, for at::mm_out on thread-local buffers.
template <typename T>
Tensor matrix(const T* data, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, c10::CppTypeToScalarType<T>::value);
}

// exp(S/tau - m) in place over one row block: returns (m, sum of the exps). m is `shift` when
// that is a known upper bound of the row (saving a pass), else the row's max. Simple loops with
// OpenMP simd reductions, so that the compiler vectorises them.
//
// Without a bound the logits S/tau are rounded into the row first and m is their max: the
// dominant logit's exponent is then exactly 0. Forming S * inv_tau - m in one expression lets
// the compiler fuse it into an FMA whose unrounded product differs from the rounded m by up to
// half an ulp of 1/tau: exp(+-4) at tau = 1e-8, and overflow or 0 (NaN, lost terms) below.
template <typename T>
inline LseStateT<T> exp_block(T* row, int64_t K, T inv_tau, T shift) {
  if (K == 0) return lse_init<T>();
  T m = shift;
  if (std::isinf(shift)) {
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < K; ++k) {
      row[k] *= inv_tau;
      m = std::max(m, row[k]);
    }
    inv_tau = 1;
  }
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < K; ++k) {
    row[k] = loop_exp(row[k] * inv_tau - m);
    sum += row[k];
  }
  return LseStateT<T>{m, sum};
}

// Upper bound of every logit u.v/tau of normalised rows (|u.v| <= 1), usable as the shift of
// exp_block while exp(-2/tau) stays far from float underflow; -inf: compute each row's max.
template <typename T>
inline T logit_bound(T inv_tau) {
  return 2 * inv_tau < 80 ? inv_tau : static_cast<T>(-INFINITY);
}

// S -> scale exp((S/tau - anchor) - rel) in place, from the row's log-normaliser anchor + rel
// (positive_nll), logits rounded first as in exp_block.
template <typename T>
inline void softmax_weights(T* row, int64_t K, T inv_tau, T anchor, T rel, T scale) {
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) row[k] *= inv_tau;
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) row[k] = loop_exp((row[k] - anchor) - rel) * scale;
}

template <typename T>
struct Options {
  T inv_tau;
  bool want_grad;          // compute gradients of sum_i w_i l_i
  bool want_negative_grad; // ... including the pool's
  T grad_scale;            // w_i = grad_scale * grad_weight[i] (or grad_scale)
  const T* grad_weight;    // (N,) or null

  T weight(int64_t anchor) const { return grad_scale * (grad_weight ? grad_weight[anchor] : T(1)); }
};

// A row's log-normaliser as positive_nll gives it: lse = anchor + rel.
template <typename T>
struct RowNormaliser {
  std::vector<T> anchor, rel;
  explicit RowNormaliser(int64_t n) : anchor(n), rel(n) {}
  void set(int64_t r, const PositiveNllT<T>& d) {
    anchor[r] = d.anchor;
    rel[r] = d.rel;
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
// tile against its block from the stored log-normalisers (two more GEMMs), so memory stays flat
// in K (at temperatures above 1/40; below, see use_partials). Both orders are fixed: results are
// deterministic for a given thread count.
// ---------------------------------------------------------------------------------------------

// Rows of the anchor tile: keep a (tile x K) similarity block around 128 KB.
int64_t tile_rows(int64_t K) {
  return std::clamp<int64_t>(32768 / std::max<int64_t>(K, 1), 8, 128);
}

// Largest per-thread bank-gradient copies (floats, all threads together) before the second pass.
constexpr int64_t kPartialBudget = 1 << 18;
// Bank rows per task of the second pass.
constexpr int64_t kBankBlock = 128;

template <typename T>
struct ClassTiles {
  const NormalisedRows<T>& a1;
  const NormalisedRows<T>& a2;
  const NormalisedRows<T>& bank;
  const int64_t* order;  // sorted row -> anchor
  int64_t first, count, K, C;
};

// Similarities of sorted rows [r0, r0 + rows) against bank rows [k0, k0 + nk), both directions.
template <typename T>
void similarity_block(const ClassTiles<T>& ct, int64_t r0, int64_t rows, int64_t k0, int64_t nk,
                      Tensor& s1, Tensor& s2) {
  const Tensor bank_t = matrix(ct.bank.u.data() + k0 * ct.C, nk, ct.C);
  at::mm_out(s1, matrix(ct.a1.u.data() + r0 * ct.C, rows, ct.C), bank_t.t());
  at::mm_out(s2, matrix(ct.a2.u.data() + r0 * ct.C, rows, ct.C), bank_t.t());
}

// Add dN (rows x C) of bank rows [k0, k0 + nk) into the pool gradient, through the
// normalisation of those rows. Callers own these rows: no other thread writes them meanwhile.
template <typename T>
void chain_bank_grad(const ClassTiles<T>& ct, const int64_t* bank_voxels, const T* grad,
                     int64_t k0, int64_t nk, GradMap<T>* gn) {
  for (int64_t b = 0; b < nk; ++b) {
    const int64_t k = k0 + b;
    accumulate_input_grad(grad + b * ct.C, ct.bank.u.data() + k * ct.C, ct.bank.inv_norm[k],
                          static_cast<bool>(ct.bank.clamped[k]), ct.C,
                          gn->voxel(bank_voxels[k]), gn->voxels_per_item);
  }
}

// Second pass for large banks: each task owns kBankBlock bank rows and sweeps all tiles,
// recomputing P from the stored log-normalisers: dN_block = sum_tiles P_block^T U_tile.
template <typename T>
void bank_grad_pass(const ClassTiles<T>& ct, const int64_t* bank_voxels,
                    const RowNormaliser<T>& norm1, const RowNormaliser<T>& norm2,
                    const Options<T>& opt, GradMap<T>* gn) {
  const int64_t C = ct.C, num_blocks = (ct.K + kBankBlock - 1) / kBankBlock;
  const int64_t T_rows = tile_rows(kBankBlock);
  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<T> s1(T_rows * kBankBlock), s2(T_rows * kBankBlock), grad(kBankBlock * C);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t k0 = block * kBankBlock, nk = std::min(kBankBlock, ct.K - k0);
      Tensor grad_t = matrix(grad.data(), nk, C);
      grad_t.zero_();
      for (int64_t r0 = ct.first; r0 < ct.first + ct.count; r0 += T_rows) {
        const int64_t rows = std::min(T_rows, ct.first + ct.count - r0);
        Tensor s1_t = matrix(s1.data(), rows, nk), s2_t = matrix(s2.data(), rows, nk);
        similarity_block(ct, r0, rows, k0, nk, s1_t, s2_t);
        for (int64_t t = 0; t < rows; ++t) {
          const int64_t r = r0 + t;
          const T wt = opt.weight(ct.order[r]) * opt.inv_tau;
          softmax_weights(s1.data() + t * nk, nk, opt.inv_tau, norm1.anchor[r], norm1.rel[r], wt);
          softmax_weights(s2.data() + t * nk, nk, opt.inv_tau, norm2.anchor[r], norm2.rel[r], wt);
        }
        grad_t.addmm_(s1_t.t(), matrix(ct.a1.u.data() + r0 * C, rows, C));
        grad_t.addmm_(s2_t.t(), matrix(ct.a2.u.data() + r0 * C, rows, C));
      }
      chain_bank_grad(ct, bank_voxels, grad.data(), k0, nk, gn);
    }
  });
}

// Counting sort of anchors by class: class c owns sorted rows [start[c], start[c + 1]).
void sort_by_class(const int64_t* labels, int64_t N, int64_t num_classes,
                   std::vector<int64_t>& start, std::vector<int64_t>& order) {
  start.assign(num_classes + 1, 0);
  order.resize(N);
  for (int64_t i = 0; i < N; ++i) ++start[labels[i] + 1];
  for (int64_t c = 0; c < num_classes; ++c) start[c + 1] += start[c];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < N; ++i) order[fill[labels[i]]++] = i;
}

// Per-tile scratch of topk_pass.
template <typename T>
struct TileBuffers {
  std::vector<T> s1, s2, du1, du2, us1, us2, scale1, scale2, coef;
  TileBuffers(int64_t rows, int64_t K, int64_t C)
      : s1(rows * K), s2(rows * K), du1(rows * C), du2(rows * C), us1(rows * C), us2(rows * C),
        scale1(rows), scale2(rows), coef(rows) {}
};

// Loss rows of one tile; with gradients, P = diag(scale) E and the (rows x C) operands
// us = diag(scale) U for the GEMMs. Returns nothing: results go to loss, norm1/2 and buf.
template <typename T>
void tile_loss(const ClassTiles<T>& ct, int64_t r0, int64_t rows, T shift, const Options<T>& opt,
               T* loss, RowNormaliser<T>& norm1, RowNormaliser<T>& norm2, TileBuffers<T>& buf) {
  const int64_t C = ct.C, K = ct.K;
  const T* u1 = ct.a1.u.data() + r0 * C;
  const T* u2 = ct.a2.u.data() + r0 * C;
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t r = r0 + t, anchor = ct.order[r];
    T dot = 0;
    for (int64_t ch = 0; ch < C; ++ch) dot += u1[t * C + ch] * u2[t * C + ch];
    const T x = dot * opt.inv_tau;
    // The block's (shift, sum) is the negatives' state; the rows of S now hold
    // E = exp(S/tau - shift).
    const LseStateT<T> b1 = exp_block(buf.s1.data() + t * K, K, opt.inv_tau, shift);
    const LseStateT<T> b2 = exp_block(buf.s2.data() + t * K, K, opt.inv_tau, shift);
    const PositiveNllT<T> d1 = positive_nll(b1, x), d2 = positive_nll(b2, x);
    norm1.set(r, d1);
    norm2.set(r, d2);
    loss[anchor] = d1.nll + d2.nll;
    if (!opt.want_grad) continue;
    // Softmax weights times w/tau: P = diag(scale) E with scale = w/tau exp(shift - lse).
    // The scale is applied to the (rows x C) operands and results of the GEMMs,
    // never to the (rows x K) block: P N = diag(scale) (E N), P^T U = E^T (diag(scale) U).
    const T wt = opt.weight(anchor) * opt.inv_tau;
    buf.scale1[t] = wt * math_exp((b1.max - d1.anchor) - d1.rel);
    buf.scale2[t] = wt * math_exp((b2.max - d2.anchor) - d2.rel);
    // dU1 = coef u2 + P1 N_c, dU2 = coef u1 + P2 N_c, coef = w/tau (p1_pos + p2_pos - 2).
    // 1 - p_pos is the negatives' softmax mass, sum(E) scale: exact in relative terms,
    // where 1 - exp(x - lse) would cancel for a confident anchor.
    buf.coef[t] = -(buf.scale1[t] * b1.sum + buf.scale2[t] * b2.sum);
    for (int64_t ch = 0; ch < C; ++ch) {
      buf.us1[t * C + ch] = buf.scale1[t] * u1[t * C + ch];
      buf.us2[t * C + ch] = buf.scale2[t] * u2[t * C + ch];
    }
  }
}

// Anchor gradients of one tile from E (in buf.s1/s2) and the tile's scales.
template <typename T>
void tile_anchor_grad(const ClassTiles<T>& ct, int64_t r0, int64_t rows, const Tensor& bank_t,
                      TileBuffers<T>& buf, GradMap<T>* g1, GradMap<T>* g2) {
  const int64_t C = ct.C, K = ct.K;
  const T* u1 = ct.a1.u.data() + r0 * C;
  const T* u2 = ct.a2.u.data() + r0 * C;
  Tensor du1_t = matrix(buf.du1.data(), rows, C), du2_t = matrix(buf.du2.data(), rows, C);
  if (K > 0) {
    at::mm_out(du1_t, matrix(buf.s1.data(), rows, K), bank_t);
    at::mm_out(du2_t, matrix(buf.s2.data(), rows, K), bank_t);
  } else {
    du1_t.zero_();
    du2_t.zero_();
  }
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t r = r0 + t, anchor = ct.order[r];
    T* d1 = buf.du1.data() + t * C;
    T* d2 = buf.du2.data() + t * C;
    for (int64_t ch = 0; ch < C; ++ch) {
      d1[ch] = buf.scale1[t] * d1[ch] + buf.coef[t] * u2[t * C + ch];
      d2[ch] = buf.scale2[t] * d2[ch] + buf.coef[t] * u1[t * C + ch];
    }
    write_input_grad(d1, u1 + t * C, ct.a1.inv_norm[r], static_cast<bool>(ct.a1.clamped[r]), C,
                     g1->voxel(anchor), g1->voxels_per_item);
    write_input_grad(d2, u2 + t * C, ct.a2.inv_norm[r], static_cast<bool>(ct.a2.clamped[r]), C,
                     g2->voxel(anchor), g2->voxels_per_item);
  }
}

template <typename T>
void topk_pass(const FeatureMap<T>& z1, const FeatureMap<T>& z2, const FeatureMap<T>& zn,
               const int64_t* labels, const int64_t* neg_index, int64_t index_stride,
               const int64_t* neg_count, int64_t num_classes, int64_t N, const Options<T>& opt,
               T* loss, GradMap<T>* g1, GradMap<T>* g2, GradMap<T>* gn) {
  const int64_t C = z1.channels;
  std::vector<int64_t> start, order;
  sort_by_class(labels, N, num_classes, start, order);
  const NormalisedRows<T> a1 = normalise_rows(z1, order.data(), N);
  const NormalisedRows<T> a2 = normalise_rows(z2, order.data(), N);
  const int num_slots = std::max(1, at::get_num_threads());
  // Row log-normalisers, kept for the second pass of large banks.
  RowNormaliser<T> norm1(N), norm2(N);

  for (int64_t c = 0; c < num_classes; ++c) {
    const int64_t first = start[c], count = start[c + 1] - first;
    const int64_t K = neg_count[c];
    if (count == 0) continue;
    const int64_t* bank_voxels = neg_index + c * index_stride;
    const NormalisedRows<T> bank = normalise_rows(zn, bank_voxels, K);
    const ClassTiles<T> ct{a1, a2, bank, order.data(), first, count, K, C};
    const T shift = logit_bound(opt.inv_tau);
    const bool bank_grad = opt.want_negative_grad && K > 0;
    // The second pass recomputes S in other GEMM shapes, which round differently: each logit
    // moves by its rounding times 1/tau. Harmless under a known shift (1/tau < 40), but at
    // smaller temperatures exp(+-that) would scale the dominant weights, so there the bank
    // gradient always goes through per-thread copies (memory O(threads * K * C)).
    const bool use_partials =
        bank_grad && (num_slots * K * C <= kPartialBudget || std::isinf(shift));
    std::vector<T> partials(use_partials ? num_slots * K * C : 0, T(0));
    const Tensor bank_t = matrix(bank.u.data(), K, C);

    const int64_t T_rows = tile_rows(K);
    const int64_t num_tiles = (count + T_rows - 1) / T_rows;
    at::parallel_for(0, num_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
      TileBuffers<T> buf(T_rows, K, C);
      const int slot = at::get_thread_num();
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t r0 = first + tile * T_rows, rows = std::min(T_rows, first + count - r0);
        Tensor s1_t = matrix(buf.s1.data(), rows, K), s2_t = matrix(buf.s2.data(), rows, K);
        if (K > 0) similarity_block(ct, r0, rows, 0, K, s1_t, s2_t);
        tile_loss(ct, r0, rows, shift, opt, loss, norm1, norm2, buf);
        if (!opt.want_grad) continue;
        tile_anchor_grad(ct, r0, rows, bank_t, buf, g1, g2);
        if (use_partials) {
          // dN_c += P1^T U1 + P2^T U2 into this thread's copy.
          Tensor partial = matrix(partials.data() + slot * K * C, K, C);
          partial.addmm_(s1_t.t(), matrix(buf.us1.data(), rows, C));
          partial.addmm_(s2_t.t(), matrix(buf.us2.data(), rows, C));
        }
      }
    });
    if (use_partials) {
      for (int s = 1; s < num_slots; ++s)
        for (int64_t e = 0; e < K * C; ++e) partials[e] += partials[s * K * C + e];
      chain_bank_grad(ct, bank_voxels, partials.data(), 0, K, gn);
    } else if (bank_grad) {
      bank_grad_pass(ct, bank_voxels, norm1, norm2, opt, gn);
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

// One voxel normalised into u (C contiguous); returns 1 / max(||z||, eps), sets *clamped.
template <typename T>
T normalise_voxel(const FeatureMap<T>& z, int64_t voxel, T* u, bool* clamped) {
  const T* src = z.data + z.offset(voxel);
  const T raw_norm = voxel_norm(src, z.channels, z.stride_c), norm = clamp_norm(raw_norm);
  for (int64_t c = 0; c < z.channels; ++c) u[c] = src[c * z.stride_c] / norm;
  *clamped = is_clamped_norm(raw_norm);
  return T(1) / norm;
}

template <typename T>
void random_pass(const FeatureMap<T>& z1, const FeatureMap<T>& z2, const FeatureMap<T>& zn,
                 const int64_t* labels, const int64_t* neg_index, int64_t index_stride,
                 const int64_t* neg_count, int64_t N, int64_t M, const Draws& draws,
                 const Options<T>& opt, T* loss, GradMap<T>* g1, GradMap<T>* g2, T* pool_grad) {
  const int64_t C = z1.channels, K = draws.num_negatives;
  const NormalisedRows<T> pool = normalise_rows(zn, nullptr, M);
  const int num_slots = at::get_num_threads();
  const bool pool_partials = opt.want_negative_grad && num_slots > 1;
  std::vector<T> partials(pool_partials ? (num_slots - 1) * M * C : 0, T(0));

  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    const int slot = at::get_thread_num();
    // Slot 0 writes straight into pool_grad, the others into their partial; summed below.
    T* my_pool_grad = slot == 0 ? pool_grad : partials.data() + (slot - 1) * M * C;
    std::vector<int64_t> picked(K);
    std::vector<T> dot1(K), dot2(K), u1(C), u2(C), du1(C), du2(C);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = labels[i];
      const int64_t* eligible = neg_index + c * index_stride;
      const int64_t n = neg_count[c];
      bool clamped1, clamped2;
      const T inv1 = normalise_voxel(z1, i, u1.data(), &clamped1);
      const T inv2 = normalise_voxel(z2, i, u2.data(), &clamped2);
      T s = 0;
      for (int64_t ch = 0; ch < C; ++ch) s += u1[ch] * u2[ch];
      const T x = s * opt.inv_tau;
      LseStateT<T> neg1 = lse_init<T>(), neg2 = lse_init<T>();
      const int64_t draws_here = n > 0 ? K : 0;
      for (int64_t k = 0; k < draws_here; ++k) {
        const int64_t j = draws.pick(i, k, eligible, n);
        const T* un = pool.u.data() + j * C;
        T d1 = 0, d2 = 0;
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
      const PositiveNllT<T> n1 = positive_nll(neg1, x), n2 = positive_nll(neg2, x);
      loss[i] = n1.nll + n2.nll;
      if (!opt.want_grad) continue;
      const T wt = opt.weight(i) * opt.inv_tau;
      // dU1 = sum_k P1_k n_k - (sum_k P1_k + P2_k) u2 (and 1 <-> 2): the positive's weight
      // p_pos - 1 is minus the negatives' softmax mass, summed here in relative precision.
      std::fill(du1.begin(), du1.end(), T(0));
      std::fill(du2.begin(), du2.end(), T(0));
      T mass = 0;
      for (int64_t k = 0; k < draws_here; ++k) {
        const T p1 = wt * math_exp((dot1[k] - n1.anchor) - n1.rel);
        const T p2 = wt * math_exp((dot2[k] - n2.anchor) - n2.rel);
        mass += p1 + p2;
        const T* un = pool.u.data() + picked[k] * C;
        for (int64_t ch = 0; ch < C; ++ch) {
          du1[ch] += p1 * un[ch];
          du2[ch] += p2 * un[ch];
        }
        if (!opt.want_negative_grad) continue;
        T* dun = my_pool_grad + picked[k] * C;
        for (int64_t ch = 0; ch < C; ++ch) dun[ch] += p1 * u1[ch] + p2 * u2[ch];
      }
      for (int64_t ch = 0; ch < C; ++ch) {
        du1[ch] -= mass * u2[ch];
        du2[ch] -= mass * u1[ch];
      }
      write_input_grad(du1.data(), u1.data(), inv1, clamped1, C, g1->voxel(i),
                       g1->voxels_per_item);
      write_input_grad(du2.data(), u2.data(), inv2, clamped2, C, g2->voxel(i),
                       g2->voxels_per_item);
    }
  });
  for (int s = 0; s + 1 < num_slots && pool_partials; ++s)
    for (int64_t e = 0; e < M * C; ++e) pool_grad[e] += partials[s * M * C + e];
}

// Chain the pool's gradient (M, C) through its normalisation into a (Bn, C, Pn) buffer.
template <typename T>
void pool_input_grad(const FeatureMap<T>& zn, const T* pool_grad, int64_t M, GradMap<T>* gn) {
  const int64_t C = zn.channels;
  at::parallel_for(0, M, 512, [&](int64_t begin, int64_t end) {
    std::vector<T> u(C);
    for (int64_t j = begin; j < end; ++j) {
      const T* du = pool_grad + j * C;
      bool touched = false;
      for (int64_t c = 0; c < C; ++c) touched |= du[c] != T(0);
      if (!touched) continue;  // the buffer is zero-initialised
      bool clamped;
      const T inv_norm = normalise_voxel(zn, j, u.data(), &clamped);
      write_input_grad(du, u.data(), inv_norm, clamped, C, gn->voxel(j), gn->voxels_per_item);
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

// The kernel in accumulation type T: loss (N,) in T, gradients in the inputs' dtype.
template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> voxel_infonce_impl(
    const Tensor& anchor, const Tensor& positive, const Tensor& negative,
    const Tensor& anchor_labels, const Tensor& neg_index, const Tensor& neg_count,
    double temperature, int64_t num_negatives, bool random, int64_t seed, int64_t offset,
    const c10::optional<Tensor>& grad_weight, double grad_scale, bool negative_grad) {
  constexpr auto kType = c10::CppTypeToScalarType<T>::value;
  const Tensor z1 = anchor.to(kType), z2 = positive.to(kType), zn = negative.to(kType);
  const int64_t B = z1.size(0), C = z1.size(1), P = z1.size(2), N = B * P;
  const int64_t M = zn.size(0) * zn.size(2), num_classes = neg_index.size(0);
  const Tensor weight = grad_weight.has_value() ? grad_weight->to(kType).contiguous() : Tensor();
  const Options<T> opt{static_cast<T>(1.0 / temperature), grad_scale != 0.0,
                       grad_scale != 0.0 && negative_grad, static_cast<T>(grad_scale),
                       weight.defined() ? weight.data_ptr<T>() : nullptr};

  Tensor loss = at::zeros({N}, kType);
  const FeatureMap<T> f1(z1), f2(z2), fn(zn);
  const int64_t rows = opt.want_grad ? B : 0, pool_rows = opt.want_negative_grad ? zn.size(0) : 0;
  GradMap<T> g1(rows, C, P), g2(rows, C, P), gn(pool_rows, C, zn.size(2));

  if (random) {
    const Draws draws{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), num_negatives};
    // Random draws scatter anywhere in the pool: collect du per pool row, then chain once.
    Tensor pool_grad = opt.want_negative_grad ? at::zeros({M, C}, kType) : Tensor();
    T* pool_grad_ptr = pool_grad.defined() ? pool_grad.data_ptr<T>() : nullptr;
    random_pass(f1, f2, fn, anchor_labels.data_ptr<int64_t>(), neg_index.data_ptr<int64_t>(),
                neg_index.size(1), neg_count.data_ptr<int64_t>(), N, M, draws, opt,
                loss.data_ptr<T>(), &g1, &g2, pool_grad_ptr);
    if (opt.want_negative_grad) pool_input_grad(fn, pool_grad_ptr, M, &gn);
  } else {
    topk_pass(f1, f2, fn, anchor_labels.data_ptr<int64_t>(), neg_index.data_ptr<int64_t>(),
              neg_index.size(1), neg_count.data_ptr<int64_t>(), num_classes, N, opt,
              loss.data_ptr<T>(), &g1, &g2, &gn);
  }

  const auto as_output = [](GradMap<T>& g, const Tensor& like) {
    return g.tensor.size(0) > 0 ? g.tensor.to(like.scalar_type()) : at::empty({0}, like.options());
  };
  Tensor grad_anchor = as_output(g1, anchor), grad_positive = as_output(g2, positive),
         grad_negative = as_output(gn, negative);
  return {loss, grad_anchor, grad_positive, grad_negative};
}

// float64 features are computed in double (loss float64); every other dtype in float.
std::tuple<Tensor, Tensor, Tensor, Tensor> voxel_infonce_cpu(
    const Tensor& anchor, const Tensor& positive, const Tensor& negative,
    const Tensor& anchor_labels, const Tensor& neg_index, const Tensor& neg_count,
    double temperature, int64_t num_negatives, bool random, int64_t seed, int64_t offset,
    const c10::optional<Tensor>& grad_weight, double grad_scale, bool negative_grad) {
  check_inputs(anchor, positive, negative, anchor_labels, neg_index, neg_count);
  const auto kernel = anchor.scalar_type() == at::kDouble ? &voxel_infonce_impl<double>
                                                          : &voxel_infonce_impl<float>;
  return kernel(anchor, positive, negative, anchor_labels, neg_index, neg_count, temperature,
                num_negatives, random, seed, offset, grad_weight, grad_scale, negative_grad);
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
