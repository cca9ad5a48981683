// Blocked access to (B, num_classes, P) logits for the CPU L_urp / L_cr kernels
// (pseudo_supervision.cpp): blocks of one batch item's voxels converted into small
// accumulation-type buffers, where the per-loss losses and gradients go, and the vectorisable
// elementary functions those loops call.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "fast_math.h"
#include "strided_view.h"

namespace rcps {
namespace cpu {

using at::Tensor;

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

struct ExpFn {
  float operator()(float x) const { return fast_exp(x); }
  double operator()(double x) const { return std::exp(x); }
};

struct LogFn {
  float operator()(float x) const { return fast_log(x); }
  double operator()(double x) const { return std::log(x); }
};

// sqrt of a sum of squares (x >= 0) that vectorises (sqrtf does not while it may set errno):
// 1/sqrt(x) from the bit-level estimate (3e-2) and three Newton steps (~2 ulp), times x.
// x = 0 gives 0; +inf and NaN give NaN.
inline float vector_sqrt(float x) {
  const float half = 0.5f * x;
  float y = __builtin_bit_cast(float, 0x5f375a86 - (__builtin_bit_cast(int32_t, x) >> 1));
  y = y * (1.5f - half * y * y);
  y = y * (1.5f - half * y * y);
  y = y * (1.5f - half * y * y);
  return x * y;
}

struct SqrtFn {
  float operator()(float x) const { return vector_sqrt(x); }
  double operator()(double x) const { return std::sqrt(x); }
};

// ---------------------------------------------------------------------------------------------
// Blocked access to (B, num_classes, P) logits.
// ---------------------------------------------------------------------------------------------

// (B, num_classes, P) logits (or their gradient) in their own dtype; channels = num_classes.
template <typename scalar_t>
using LogitsView = StridedView<scalar_t>;

// Voxels [first, first + count) of batch item `item`.
struct Block {
  int64_t item, first, count;
};

struct BlockGrid {
  int64_t block_voxels, blocks_per_item, num_blocks;

  BlockGrid(int64_t batch, int64_t classes, int64_t voxels_per_item) {
    // About 32 KB of fp32 logits per input and block, a multiple of 16 voxels.
    block_voxels = std::clamp<int64_t>((8192 / std::max<int64_t>(classes, 1)) / 16 * 16, 16, 256);
    blocks_per_item = (voxels_per_item + block_voxels - 1) / block_voxels;
    num_blocks = batch * blocks_per_item;
  }

  // Blocks per parallel task: about 16K voxels, so small inputs run without waking threads.
  int64_t grain() const { return std::max<int64_t>(1, 16384 / block_voxels); }

  Block block(int64_t index, int64_t voxels_per_item) const {
    const int64_t item = index / blocks_per_item;
    const int64_t first = (index % blocks_per_item) * block_voxels;
    return Block{item, first, std::min(block_voxels, voxels_per_item - first)};
  }
};

// buffer[c * V + j] = x[item, c, first + j] in the accumulation type (V = grid's block_voxels).
template <typename acc_t, typename scalar_t>
void load_block(const LogitsView<scalar_t>& x, const Block& blk, int64_t V, acc_t* buffer) {
  const scalar_t* base = x.data + blk.item * x.stride_b + blk.first * x.stride_p;
  if (x.stride_p == 1 || x.stride_c != 1) {
    for (int64_t c = 0; c < x.channels; ++c) {
      const scalar_t* src = base + c * x.stride_c;
      acc_t* dst = buffer + c * V;
      if (x.stride_p == 1) {
        for (int64_t j = 0; j < blk.count; ++j) dst[j] = static_cast<acc_t>(src[j]);
      } else {
        for (int64_t j = 0; j < blk.count; ++j) dst[j] = static_cast<acc_t>(src[j * x.stride_p]);
      }
    }
  } else {  // channels-last: the classes of a voxel are contiguous
    for (int64_t j = 0; j < blk.count; ++j) {
      const scalar_t* src = base + j * x.stride_p;
      for (int64_t c = 0; c < x.channels; ++c) buffer[c * V + j] = static_cast<acc_t>(src[c]);
    }
  }
}

// The inverse of load_block: x[item, c, first + j] = buffer[c * V + j], converted to scalar_t.
template <typename acc_t, typename scalar_t>
void store_block(const acc_t* buffer, const Block& blk, int64_t V, const LogitsView<scalar_t>& x) {
  scalar_t* base = x.data + blk.item * x.stride_b + blk.first * x.stride_p;
  if (x.stride_p == 1 || x.stride_c != 1) {
    for (int64_t c = 0; c < x.channels; ++c) {
      scalar_t* dst = base + c * x.stride_c;
      const acc_t* src = buffer + c * V;
      for (int64_t j = 0; j < blk.count; ++j) dst[j * x.stride_p] = static_cast<scalar_t>(src[j]);
    }
  } else {
    for (int64_t j = 0; j < blk.count; ++j) {
      scalar_t* dst = base + j * x.stride_p;
      for (int64_t c = 0; c < x.channels; ++c) dst[c] = static_cast<scalar_t>(buffer[c * V + j]);
    }
  }
}

// Where a block's per-voxel losses go: a (B, P) map, or a partial sum per block.
template <typename acc_t>
struct LossSink {
  acc_t* voxel_loss;       // (B, P) contiguous, reduction "none"
  double* block_partials;  // (num_blocks,), "mean" / "sum"

  void write(int64_t block_index, const Block& blk, int64_t P, const acc_t* loss) const {
    if (voxel_loss != nullptr) {
      std::copy(loss, loss + blk.count, voxel_loss + blk.item * P + blk.first);
    } else {
      double sum = 0.0;
      for (int64_t j = 0; j < blk.count; ++j) sum += static_cast<double>(loss[j]);
      block_partials[block_index] = sum;
    }
  }
};

// Per-voxel scale of the gradient: grad_output (scaled by 1/N for the mean) per voxel or for all.
template <typename acc_t>
struct GradScale {
  const acc_t* per_voxel;  // (B, P) contiguous, or null
  acc_t uniform;

  void fill(const Block& blk, int64_t P, acc_t* out) const {
    for (int64_t j = 0; j < blk.count; ++j)
      out[j] = per_voxel != nullptr ? per_voxel[blk.item * P + blk.first + j] : uniform;
  }
};

inline void check_pair(const Tensor& x, const Tensor& y, const char* op, const char* x_name,
                       const char* y_name) {
  TORCH_CHECK(x.dim() == 3 && x.sizes() == y.sizes(), op, ": ", x_name, " and ", y_name,
              " must both be (B, num_classes, P), got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), op, ": ", x_name, " and ", y_name,
              " must share a dtype");
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), op, ": tensors must be on the CPU");
  TORCH_CHECK(x.size(1) >= 2, op, ": need at least 2 classes, got ", x.size(1));
}

inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The reduced loss as a 0-dim tensor of the accumulation type.
inline Tensor reduce_partials(const std::vector<double>& partials, int64_t reduction,
                              int64_t voxels, at::ScalarType acc) {
  double total = 0.0;
  for (double p : partials) total += p;
  if (reduction == kMean) total /= static_cast<double>(voxels);
  // Converted as a tensor: a total beyond the float range becomes inf (which the Python layer
  // reports), where scalar_tensor(total, kFloat) would throw.
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble)).to(acc);
}

// grad_output as a per-voxel (B, P) map (reduction "none") or a uniform scale.
template <typename acc_t>
GradScale<acc_t> make_grad_scale(const Tensor& grad_output, int64_t reduction, int64_t B, int64_t P,
                                 Tensor* holder) {
  if (reduction == kNone) {
    *holder = grad_output.reshape({B, P}).to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    return GradScale<acc_t>{holder->data_ptr<acc_t>(), acc_t(0)};
  }
  const double g = grad_output.item<double>();
  return GradScale<acc_t>{
      nullptr, static_cast<acc_t>(reduction == kMean ? g / static_cast<double>(B * P) : g)};
}

}  // namespace cpu
}  // namespace rcps
