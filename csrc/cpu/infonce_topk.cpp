// topk mode of the CPU voxel InfoNCE (the maths and the op are in infonce.cpp).
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
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/rcps_math.h"
#include "fast_math.h"
#include "infonce_rows.h"

namespace rcps {
namespace cpu {
namespace infonce {
namespace {

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
void chain_bank_grad(const ClassTiles<T>& ct, const int64_t* bank_voxels, const T* grad, int64_t k0,
                     int64_t nk, GradMap<T>* gn) {
  for (int64_t b = 0; b < nk; ++b) {
    const int64_t k = k0 + b;
    accumulate_input_grad(grad + b * ct.C, ct.bank.u.data() + k * ct.C, ct.bank.inv_norm[k],
                          static_cast<bool>(ct.bank.clamped[k]), ct.C, gn->voxel(bank_voxels[k]),
                          gn->voxels_per_item);
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
      : s1(rows * K),
        s2(rows * K),
        du1(rows * C),
        du2(rows * C),
        us1(rows * C),
        us2(rows * C),
        scale1(rows),
        scale2(rows),
        coef(rows) {}
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

}  // namespace

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
    const bool bank_grad = opt.pool_grad && K > 0;
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

template void topk_pass<float>(const FeatureMap<float>&, const FeatureMap<float>&,
                               const FeatureMap<float>&, const int64_t*, const int64_t*, int64_t,
                               const int64_t*, int64_t, int64_t, const Options<float>&, float*,
                               GradMap<float>*, GradMap<float>*, GradMap<float>*);
template void topk_pass<double>(const FeatureMap<double>&, const FeatureMap<double>&,
                                const FeatureMap<double>&, const int64_t*, const int64_t*, int64_t,
                                const int64_t*, int64_t, int64_t, const Options<double>&, double*,
                                GradMap<double>*, GradMap<double>*, GradMap<double>*);

}  // namespace infonce
}  // namespace cpu
}  // namespace rcps
