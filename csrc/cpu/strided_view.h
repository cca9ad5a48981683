// A (B, C, P) tensor seen through its data pointer and strides, as the CPU kernels read and write
// it: features (B, C, P) and logits (B, K, P) alike. Voxel v is item v / P, position v % P.
#pragma once

#include <ATen/ATen.h>

#include <stdint.h>

#include <type_traits>

namespace rcps {
namespace cpu {

// T is const for a tensor that is only read.
template <typename T>
struct StridedView {
  T* data;
  int64_t stride_b, stride_c, stride_p;
  int64_t channels;         // size of dim 1: feature channels, or classes of logits
  int64_t voxels_per_item;  // P

  explicit StridedView(const at::Tensor& x)
      : data(x.data_ptr<std::remove_const_t<T>>()),
        stride_b(x.stride(0)),
        stride_c(x.stride(1)),
        stride_p(x.stride(2)),
        channels(x.size(1)),
        voxels_per_item(x.size(2)) {}

  // Where voxel v's channel 0 lives, relative to data.
  int64_t offset(int64_t voxel) const {
    return (voxel / voxels_per_item) * stride_b + (voxel % voxels_per_item) * stride_p;
  }
};

}  // namespace cpu
}  // namespace rcps
