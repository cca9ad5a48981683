// The pieces of the CPU voxel InfoNCE that both sampling modes use: views of the (B, C, P)
// features, their normalised rows with the state the chain rule needs, the gradient buffers and
// the per-call options; and the topk pass (infonce_topk.cpp) that infonce.cpp calls. The maths
// is described at the top of infonce.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/rcps_math.h"
#include "strided_view.h"

namespace rcps {
namespace cpu {
namespace infonce {

using at::Tensor;

// View of a (B, C, P) feature map in the accumulation type T; voxel v = b * P + p.
template <typename T>
using FeatureMap = StridedView<const T>;

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
    const T g = normalise_backward(du[c], u[c], u_dot_du, inv_norm, clamped);
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

template <typename T>
struct Options {
  T inv_tau;
  bool want_grad;        // compute gradients of sum_i w_i l_i
  bool pool_grad;        // ... including the pool's
  T grad_scale;          // w_i = grad_scale * grad_weight[i] (or grad_scale)
  const T* grad_weight;  // (N,) or null

  T weight(int64_t anchor) const { return grad_scale * (grad_weight ? grad_weight[anchor] : T(1)); }
};

// topk mode over all classes: the loss of every anchor and, with opt.want_grad, the gradients
// (infonce_topk.cpp; instantiated for float and double).
template <typename T>
void topk_pass(const FeatureMap<T>& z1, const FeatureMap<T>& z2, const FeatureMap<T>& zn,
               const int64_t* labels, const int64_t* neg_index, int64_t index_stride,
               const int64_t* neg_count, int64_t num_classes, int64_t N, const Options<T>& opt,
               T* loss, GradMap<T>* g1, GradMap<T>* g2, GradMap<T>* gn);

}  // namespace infonce
}  // namespace cpu
}  // namespace rcps
