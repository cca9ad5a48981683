// Fused rectified pseudo supervision (L_urp) and logit cosine consistency (L_cr) on the CPU.
//
// Inputs are (B, K, P) views of (B, K, *S) logits with any strides and dtype (fp32, fp64, fp16,
// bf16). The voxels are cut into blocks of one batch item; a block's K x V logits are converted
// once into a small fp32 (fp64 for double) buffer that stays in L1/L2, and every per-class loop
// then runs over V contiguous voxels, which the compiler vectorises. So each op reads the logits
// once in forward and once in backward, and the only logits-sized tensor it allocates is the
// gradient. The per-voxel and per-class formulas (and their gradients) are those of
// csrc/common/pseudo_supervision_math.h, the same lines the CUDA kernels run.
//
// Reductions: 0 = "none" (a (B, P) map), 1 = "mean", 2 = "sum" (a 0-dim tensor). Block partial sums
// are accumulated in double per block and added in block order, so results do not depend on the
// thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/pseudo_supervision_math.h"
#include "fast_math.h"

namespace rcps {
namespace cpu {
namespace {

using at::Tensor;
namespace ps = rcps::pseudo_supervision;

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
// Blocked access to (B, K, P) logits.
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
struct LogitsView {
  scalar_t* data;
  int64_t stride_b, stride_c, stride_p, classes, voxels_per_item;

  explicit LogitsView(const Tensor& x)
      : data(x.data_ptr<scalar_t>()),
        stride_b(x.stride(0)),
        stride_c(x.stride(1)),
        stride_p(x.stride(2)),
        classes(x.size(1)),
        voxels_per_item(x.size(2)) {}
};

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
    for (int64_t c = 0; c < x.classes; ++c) {
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
      for (int64_t c = 0; c < x.classes; ++c) buffer[c * V + j] = static_cast<acc_t>(src[c]);
    }
  }
}

// The inverse of load_block: x[item, c, first + j] = buffer[c * V + j], converted to scalar_t.
template <typename acc_t, typename scalar_t>
void store_block(const acc_t* buffer, const Block& blk, int64_t V, const LogitsView<scalar_t>& x) {
  scalar_t* base = x.data + blk.item * x.stride_b + blk.first * x.stride_p;
  if (x.stride_p == 1 || x.stride_c != 1) {
    for (int64_t c = 0; c < x.classes; ++c) {
      scalar_t* dst = base + c * x.stride_c;
      const acc_t* src = buffer + c * V;
      for (int64_t j = 0; j < blk.count; ++j) dst[j * x.stride_p] = static_cast<scalar_t>(src[j]);
    }
  } else {
    for (int64_t j = 0; j < blk.count; ++j) {
      scalar_t* dst = base + j * x.stride_p;
      for (int64_t c = 0; c < x.classes; ++c) dst[c] = static_cast<scalar_t>(buffer[c * V + j]);
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

// ---------------------------------------------------------------------------------------------
// L_urp
// ---------------------------------------------------------------------------------------------

// Per-voxel state of one block, structure of arrays so that the voxel loops vectorise.
template <typename acc_t>
struct UrpBlockState {
  std::vector<acc_t> student, teacher, sharpened;  // K x V: logits, then their exponentials
  std::vector<acc_t> student_max, teacher_max, sum_student, sum_teacher, sum_sharpened,
      sharpened_dot_half, teacher_gap_half, loss, inv_sum_student, inv_sum_teacher,
      inv_sum_sharpened,
      weight, kl_coefficient, grad_scale;

  UrpBlockState(int64_t K, int64_t V)
      : student(K * V), teacher(K * V), sharpened(K * V), student_max(V), teacher_max(V),
        sum_student(V), sum_teacher(V), sum_sharpened(V), sharpened_dot_half(V),
        teacher_gap_half(V),
        loss(V), inv_sum_student(V), inv_sum_teacher(V), inv_sum_sharpened(V), weight(V),
        kl_coefficient(V), grad_scale(V) {}

  // Forward sums and per-voxel results of the loaded block; leaves e^zs, e^ts, e^(ts/T) in
  // student, teacher, sharpened for the gradient.
  void evaluate(int64_t K, int64_t V, int64_t count, acc_t inv_temperature) {
    const ExpFn exp_fn;
    std::fill(student_max.begin(), student_max.end(), -INFINITY);
    std::fill(teacher_max.begin(), teacher_max.end(), -INFINITY);
    for (int64_t c = 0; c < K; ++c) {
      const acc_t* z = student.data() + c * V;
      const acc_t* t = teacher.data() + c * V;
      #pragma omp simd  // no aliasing between the block's arrays
      for (int64_t j = 0; j < count; ++j) {
        student_max[j] = std::max(student_max[j], z[j]);
        teacher_max[j] = std::max(teacher_max[j], t[j]);
      }
    }
    std::fill(sum_student.begin(), sum_student.end(), acc_t(0));
    std::fill(sum_teacher.begin(), sum_teacher.end(), acc_t(0));
    std::fill(sum_sharpened.begin(), sum_sharpened.end(), acc_t(0));
    std::fill(sharpened_dot_half.begin(), sharpened_dot_half.end(), acc_t(0));
    std::fill(teacher_gap_half.begin(), teacher_gap_half.end(), acc_t(0));
    for (int64_t c = 0; c < K; ++c) {
      acc_t* z = student.data() + c * V;
      acc_t* t = teacher.data() + c * V;
      acc_t* s = sharpened.data() + c * V;
      #pragma omp simd  // no aliasing between the block's arrays
      for (int64_t j = 0; j < count; ++j) {
        const ps::UrpClassTerms<acc_t> terms = ps::urp_class_terms<acc_t>(
            z[j], t[j], student_max[j], teacher_max[j], inv_temperature, exp_fn);
        sum_student[j] += terms.exp_student;
        sum_teacher[j] += terms.exp_teacher;
        sum_sharpened[j] += terms.exp_sharpened;
        sharpened_dot_half[j] += terms.sharpened_dot_half;
        teacher_gap_half[j] += terms.teacher_gap_half;
        z[j] = terms.exp_student;
        t[j] = terms.exp_teacher;
        s[j] = terms.exp_sharpened;
      }
    }
    #pragma omp simd  // no aliasing between the block's arrays
    for (int64_t j = 0; j < count; ++j) {
      const ps::UrpVoxel<acc_t> v =
          ps::urp_voxel<acc_t>(sum_student[j], sum_teacher[j], sum_sharpened[j],
                               sharpened_dot_half[j], teacher_gap_half[j], LogFn(), exp_fn);
      loss[j] = v.loss;
      inv_sum_student[j] = v.inv_sum_student;
      inv_sum_teacher[j] = v.inv_sum_teacher;
      inv_sum_sharpened[j] = v.inv_sum_sharpened;
      weight[j] = v.weight;
      kl_coefficient[j] = v.kl_coefficient;
    }
  }

  // Overwrites `student` with the gradient of sum_j grad_scale_j loss_j (after evaluate).
  void student_gradient(int64_t K, int64_t V, int64_t count) {
    for (int64_t c = 0; c < K; ++c) {
      acc_t* z = student.data() + c * V;
      const acc_t* t = teacher.data() + c * V;
      const acc_t* s = sharpened.data() + c * V;
      #pragma omp simd  // no aliasing between the block's arrays
      for (int64_t j = 0; j < count; ++j) {
        const ps::UrpVoxel<acc_t> v{loss[j],   inv_sum_student[j], inv_sum_teacher[j],
                                    inv_sum_sharpened[j], weight[j], kl_coefficient[j]};
        z[j] = ps::urp_student_grad<acc_t>(z[j], t[j], s[j], v, grad_scale[j]);
      }
    }
  }
};

void check_pair(const Tensor& x, const Tensor& y, const char* op, const char* x_name,
                const char* y_name) {
  TORCH_CHECK(x.dim() == 3 && x.sizes() == y.sizes(), op, ": ", x_name, " and ", y_name,
              " must both be (B, K, P), got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), op, ": ", x_name, " and ", y_name,
              " must share a dtype");
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), op, ": tensors must be on the CPU");
  TORCH_CHECK(x.size(1) >= 2, op, ": need at least 2 classes, got ", x.size(1));
}

at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The reduced loss as a 0-dim tensor of the accumulation type.
Tensor reduce_partials(const std::vector<double>& partials, int64_t reduction, int64_t voxels,
                       at::ScalarType acc) {
  double total = 0.0;
  for (double p : partials) total += p;
  if (reduction == kMean) total /= static_cast<double>(voxels);
  // Converted as a tensor: a total beyond the float range becomes inf (which the Python layer
  // reports), where scalar_tensor(total, kFloat) would throw.
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble)).to(acc);
}

// grad_output as a per-voxel (B, P) map (reduction "none") or a uniform scale.
template <typename acc_t>
GradScale<acc_t> make_grad_scale(const Tensor& grad_output, int64_t reduction, int64_t B,
                                 int64_t P, Tensor* holder) {
  if (reduction == kNone) {
    *holder = grad_output.reshape({B, P}).to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    return GradScale<acc_t>{holder->data_ptr<acc_t>(), acc_t(0)};
  }
  const double g = grad_output.item<double>();
  return GradScale<acc_t>{nullptr,
                          static_cast<acc_t>(reduction == kMean ? g / static_cast<double>(B * P) : g)};
}

Tensor urp_forward_cpu(const Tensor& student, const Tensor& teacher, double temperature,
                       int64_t reduction) {
  check_pair(student, teacher, "urp_forward_cpu", "student", "teacher");
  const int64_t B = student.size(0), K = student.size(1), P = student.size(2);
  const at::ScalarType acc = accumulation_type(student.scalar_type());
  const BlockGrid grid(B, K, P);
  Tensor voxel_loss = reduction == kNone ? at::empty({B, P}, student.options().dtype(acc))
                                         : Tensor();
  std::vector<double> partials(reduction == kNone ? 0 : grid.num_blocks);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "urp_forward_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LogitsView<scalar_t> z(student), t(teacher);
    const LossSink<acc_t> sink{voxel_loss.defined() ? voxel_loss.data_ptr<acc_t>() : nullptr,
                               partials.data()};
    const acc_t inv_temperature = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, grid.num_blocks, grid.grain(), [&](int64_t begin, int64_t end) {
      UrpBlockState<acc_t> state(K, grid.block_voxels);
      for (int64_t b = begin; b < end; ++b) {
        const Block blk = grid.block(b, P);
        load_block(z, blk, grid.block_voxels, state.student.data());
        load_block(t, blk, grid.block_voxels, state.teacher.data());
        state.evaluate(K, grid.block_voxels, blk.count, inv_temperature);
        sink.write(b, blk, P, state.loss.data());
      }
    });
  });
  return reduction == kNone ? voxel_loss : reduce_partials(partials, reduction, B * P, acc);
}

Tensor urp_backward_cpu(const Tensor& grad_output, const Tensor& student, const Tensor& teacher,
                        double temperature, int64_t reduction) {
  check_pair(student, teacher, "urp_backward_cpu", "student", "teacher");
  const int64_t B = student.size(0), K = student.size(1), P = student.size(2);
  const BlockGrid grid(B, K, P);
  Tensor grad_student = at::empty_like(student);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "urp_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LogitsView<scalar_t> z(student), t(teacher), dz(grad_student);
    Tensor scale_holder;
    const GradScale<acc_t> scale = make_grad_scale<acc_t>(grad_output, reduction, B, P, &scale_holder);
    const acc_t inv_temperature = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, grid.num_blocks, grid.grain(), [&](int64_t begin, int64_t end) {
      UrpBlockState<acc_t> state(K, grid.block_voxels);
      for (int64_t b = begin; b < end; ++b) {
        const Block blk = grid.block(b, P);
        load_block(z, blk, grid.block_voxels, state.student.data());
        load_block(t, blk, grid.block_voxels, state.teacher.data());
        state.evaluate(K, grid.block_voxels, blk.count, inv_temperature);
        scale.fill(blk, P, state.grad_scale.data());
        state.student_gradient(K, grid.block_voxels, blk.count);
        store_block(state.student.data(), blk, grid.block_voxels, dz);
      }
    });
  });
  return grad_student;
}

// ---------------------------------------------------------------------------------------------
// L_cr
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
struct CosineBlockState {
  std::vector<acc_t> a, b;  // K x V logits, then (backward) their gradients
  std::vector<acc_t> scale_a, scale_b, sq_norm_a, sq_norm_b, dot, loss, cosine, unit_a, unit_b,
      inv_norm_a, inv_norm_b, grad_scale;
  std::vector<uint8_t> clamped_a, clamped_b;

  CosineBlockState(int64_t K, int64_t V)
      : a(K * V), b(K * V), scale_a(V), scale_b(V), sq_norm_a(V), sq_norm_b(V), dot(V), loss(V),
        cosine(V), unit_a(V), unit_b(V), inv_norm_a(V), inv_norm_b(V), grad_scale(V),
        clamped_a(V), clamped_b(V) {}

  // Per voxel, the power-of-two scales that bring the largest |a_c| and |b_c| to [1, 4).
  void find_scales(int64_t K, int64_t V, int64_t count) {
    std::fill(scale_a.begin(), scale_a.end(), acc_t(0));  // the largest |logit| first
    std::fill(scale_b.begin(), scale_b.end(), acc_t(0));
    for (int64_t c = 0; c < K; ++c) {
      const acc_t* x = a.data() + c * V;
      const acc_t* y = b.data() + c * V;
      #pragma omp simd  // no aliasing between the block's arrays
      for (int64_t j = 0; j < count; ++j) {  // selects, not std::max/abs: this form vectorises
        const acc_t abs_x = x[j] < 0 ? -x[j] : x[j], abs_y = y[j] < 0 ? -y[j] : y[j];
        scale_a[j] = abs_x > scale_a[j] ? abs_x : scale_a[j];
        scale_b[j] = abs_y > scale_b[j] ? abs_y : scale_b[j];
      }
    }
    #pragma omp simd  // no aliasing between the block's arrays
    for (int64_t j = 0; j < count; ++j) {
      scale_a[j] = ps::power_of_two_scale(scale_a[j]);
      scale_b[j] = ps::power_of_two_scale(scale_b[j]);
    }
  }

  void evaluate(int64_t K, int64_t V, int64_t count, acc_t eps) {
    find_scales(K, V, count);
    std::fill(sq_norm_a.begin(), sq_norm_a.end(), acc_t(0));
    std::fill(sq_norm_b.begin(), sq_norm_b.end(), acc_t(0));
    std::fill(dot.begin(), dot.end(), acc_t(0));
    for (int64_t c = 0; c < K; ++c) {
      const acc_t* x = a.data() + c * V;
      const acc_t* y = b.data() + c * V;
      #pragma omp simd  // no aliasing between the block's arrays
      for (int64_t j = 0; j < count; ++j) {
        const acc_t xs = x[j] * scale_a[j], ys = y[j] * scale_b[j];
        sq_norm_a[j] += xs * xs;
        sq_norm_b[j] += ys * ys;
        dot[j] += xs * ys;
      }
    }
    per_voxel(count, eps, sq_norm_a.data(), sq_norm_b.data(), dot.data(), scale_a.data(),
              scale_b.data(), loss.data(), cosine.data(), unit_a.data(), unit_b.data(),
              inv_norm_a.data(), inv_norm_b.data(), clamped_a.data(), clamped_b.data());
  }

  // The per-voxel results, over restrict pointers: with the vectors' operator[] (whose data
  // pointers a uint8_t store might alias) GCC leaves this loop scalar.
  static void per_voxel(int64_t count, acc_t eps, const acc_t* __restrict sq_a,
                        const acc_t* __restrict sq_b, const acc_t* __restrict dot_ab,
                        const acc_t* __restrict s_a, const acc_t* __restrict s_b,
                        acc_t* __restrict loss_out, acc_t* __restrict cosine_out,
                        acc_t* __restrict unit_a_out, acc_t* __restrict unit_b_out,
                        acc_t* __restrict inv_a_out, acc_t* __restrict inv_b_out,
                        uint8_t* __restrict clamped_a_out, uint8_t* __restrict clamped_b_out) {
    #pragma omp simd
    for (int64_t j = 0; j < count; ++j) {
      const ps::CosineVoxel<acc_t> v =
          ps::cosine_voxel<acc_t>(sq_a[j], sq_b[j], dot_ab[j], s_a[j], s_b[j], eps, SqrtFn());
      loss_out[j] = v.loss;
      cosine_out[j] = v.cosine;
      unit_a_out[j] = v.unit_a;
      unit_b_out[j] = v.unit_b;
      inv_a_out[j] = v.inv_norm_a;
      inv_b_out[j] = v.inv_norm_b;
      clamped_a_out[j] = v.clamped_a;
      clamped_b_out[j] = v.clamped_b;
    }
  }

  // Overwrites a and b with the gradients of sum_j grad_scale_j loss_j (after evaluate).
  void gradients(int64_t K, int64_t V, int64_t count) {
    for (int64_t c = 0; c < K; ++c) {
      acc_t* x = a.data() + c * V;
      acc_t* y = b.data() + c * V;
      #pragma omp simd  // no aliasing between the block's arrays
      for (int64_t j = 0; j < count; ++j) {
        const acc_t xa = x[j], yb = y[j];
        x[j] = ps::cosine_grad<acc_t>(xa, yb, scale_a[j], unit_a[j], inv_norm_a[j],
                                      clamped_a[j] != 0, scale_b[j], unit_b[j], cosine[j],
                                      grad_scale[j]);
        y[j] = ps::cosine_grad<acc_t>(yb, xa, scale_b[j], unit_b[j], inv_norm_b[j],
                                      clamped_b[j] != 0, scale_a[j], unit_a[j], cosine[j],
                                      grad_scale[j]);
      }
    }
  }
};

Tensor cosine_consistency_forward_cpu(const Tensor& logits_a, const Tensor& logits_b, double eps,
                                      int64_t reduction) {
  check_pair(logits_a, logits_b, "cosine_consistency_forward_cpu", "logits_a", "logits_b");
  const int64_t B = logits_a.size(0), K = logits_a.size(1), P = logits_a.size(2);
  const at::ScalarType acc = accumulation_type(logits_a.scalar_type());
  const BlockGrid grid(B, K, P);
  Tensor voxel_loss = reduction == kNone ? at::empty({B, P}, logits_a.options().dtype(acc))
                                         : Tensor();
  std::vector<double> partials(reduction == kNone ? 0 : grid.num_blocks);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits_a.scalar_type(),
                                  "cosine_consistency_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LogitsView<scalar_t> xa(logits_a), xb(logits_b);
    const LossSink<acc_t> sink{voxel_loss.defined() ? voxel_loss.data_ptr<acc_t>() : nullptr,
                               partials.data()};
    at::parallel_for(0, grid.num_blocks, grid.grain(), [&](int64_t begin, int64_t end) {
      CosineBlockState<acc_t> state(K, grid.block_voxels);
      for (int64_t b = begin; b < end; ++b) {
        const Block blk = grid.block(b, P);
        load_block(xa, blk, grid.block_voxels, state.a.data());
        load_block(xb, blk, grid.block_voxels, state.b.data());
        state.evaluate(K, grid.block_voxels, blk.count, static_cast<acc_t>(eps));
        sink.write(b, blk, P, state.loss.data());
      }
    });
  });
  return reduction == kNone ? voxel_loss : reduce_partials(partials, reduction, B * P, acc);
}

// Gradients for a and b; a zero-element tensor for one not asked for.
std::tuple<Tensor, Tensor> cosine_consistency_backward_cpu(const Tensor& grad_output,
                                                           const Tensor& logits_a,
                                                           const Tensor& logits_b, double eps,
                                                           int64_t reduction, bool need_grad_a,
                                                           bool need_grad_b) {
  check_pair(logits_a, logits_b, "cosine_consistency_backward_cpu", "logits_a", "logits_b");
  const int64_t B = logits_a.size(0), K = logits_a.size(1), P = logits_a.size(2);
  const BlockGrid grid(B, K, P);
  Tensor grad_a = need_grad_a ? at::empty_like(logits_a) : at::empty({0}, logits_a.options());
  Tensor grad_b = need_grad_b ? at::empty_like(logits_b) : at::empty({0}, logits_b.options());
  if (!need_grad_a && !need_grad_b) return {grad_a, grad_b};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits_a.scalar_type(),
                                  "cosine_consistency_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LogitsView<scalar_t> xa(logits_a), xb(logits_b);
    const LogitsView<scalar_t> da(need_grad_a ? grad_a : logits_a),
        db(need_grad_b ? grad_b : logits_b);
    Tensor scale_holder;
    const GradScale<acc_t> scale = make_grad_scale<acc_t>(grad_output, reduction, B, P, &scale_holder);
    at::parallel_for(0, grid.num_blocks, grid.grain(), [&](int64_t begin, int64_t end) {
      CosineBlockState<acc_t> state(K, grid.block_voxels);
      for (int64_t b = begin; b < end; ++b) {
        const Block blk = grid.block(b, P);
        load_block(xa, blk, grid.block_voxels, state.a.data());
        load_block(xb, blk, grid.block_voxels, state.b.data());
        state.evaluate(K, grid.block_voxels, blk.count, static_cast<acc_t>(eps));
        scale.fill(blk, P, state.grad_scale.data());
        state.gradients(K, grid.block_voxels, blk.count);
        if (need_grad_a) store_block(state.a.data(), blk, grid.block_voxels, da);
        if (need_grad_b) store_block(state.b.data(), blk, grid.block_voxels, db);
      }
    });
  });
  return {grad_a, grad_b};
}

// ---------------------------------------------------------------------------------------------
// One head's L_urp(a, t) + L_urp(b, t) and L_cr(a, b): each view's gradient is written once
// ---------------------------------------------------------------------------------------------

// into += from over the first `count` voxels of each of the K class rows of a K x V block.
template <typename acc_t>
void add_block(acc_t* into, const acc_t* from, int64_t K, int64_t V, int64_t count) {
  for (int64_t c = 0; c < K; ++c) {
    #pragma omp simd  // distinct buffers
    for (int64_t j = 0; j < count; ++j) into[c * V + j] += from[c * V + j];
  }
}

// The gradients of g_urp * (L_urp(a, t) + L_urp(b, t)) + g_cr * L_cr(a, b) for a and b, summed in
// each block's buffers: the only logits-sized tensors are the two gradients themselves (two
// separate ops would hold a third while autograd adds up a's two gradients).
std::tuple<Tensor, Tensor> pseudo_supervision_losses_backward_cpu(
    const Tensor& grad_urp, const Tensor& grad_cr, const Tensor& view_a, const Tensor& view_b,
    const Tensor& teacher, double temperature, double eps, int64_t reduction) {
  const char* op = "pseudo_supervision_losses_backward_cpu";
  check_pair(view_a, view_b, op, "view_a", "view_b");
  check_pair(view_a, teacher, op, "view_a", "teacher");
  const int64_t B = view_a.size(0), K = view_a.size(1), P = view_a.size(2);
  const BlockGrid grid(B, K, P);
  const int64_t V = grid.block_voxels;
  Tensor grad_a = at::empty_like(view_a), grad_b = at::empty_like(view_b);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, view_a.scalar_type(),
                                  "pseudo_supervision_losses_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LogitsView<scalar_t> xa(view_a), xb(view_b), t(teacher), da(grad_a), db(grad_b);
    Tensor urp_holder, cr_holder;
    const GradScale<acc_t> urp_scale = make_grad_scale<acc_t>(grad_urp, reduction, B, P, &urp_holder);
    const GradScale<acc_t> cr_scale = make_grad_scale<acc_t>(grad_cr, reduction, B, P, &cr_holder);
    const acc_t inv_temperature = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, grid.num_blocks, grid.grain(), [&](int64_t begin, int64_t end) {
      UrpBlockState<acc_t> urp_a(K, V), urp_b(K, V);
      CosineBlockState<acc_t> cosine(K, V);
      for (int64_t b = begin; b < end; ++b) {
        const Block blk = grid.block(b, P);
        load_block(xa, blk, V, urp_a.student.data());
        load_block(xb, blk, V, urp_b.student.data());
        load_block(t, blk, V, urp_a.teacher.data());
        // evaluate() turns the buffers into exponentials: copy the logits first
        std::copy(urp_a.teacher.begin(), urp_a.teacher.end(), urp_b.teacher.begin());
        std::copy(urp_a.student.begin(), urp_a.student.end(), cosine.a.begin());
        std::copy(urp_b.student.begin(), urp_b.student.end(), cosine.b.begin());
        for (UrpBlockState<acc_t>* state : {&urp_a, &urp_b}) {
          state->evaluate(K, V, blk.count, inv_temperature);
          urp_scale.fill(blk, P, state->grad_scale.data());
          state->student_gradient(K, V, blk.count);
        }
        cosine.evaluate(K, V, blk.count, static_cast<acc_t>(eps));
        cr_scale.fill(blk, P, cosine.grad_scale.data());
        cosine.gradients(K, V, blk.count);
        add_block(urp_a.student.data(), cosine.a.data(), K, V, blk.count);
        add_block(urp_b.student.data(), cosine.b.data(), K, V, blk.count);
        store_block(urp_a.student.data(), blk, V, da);
        store_block(urp_b.student.data(), blk, V, db);
      }
    });
  });
  return {grad_a, grad_b};
}

}  // namespace
}  // namespace cpu
}  // namespace rcps

TORCH_LIBRARY_FRAGMENT(rcps_C, m) {
  m.def("urp_forward_cpu(Tensor student, Tensor teacher, float temperature, int reduction) -> Tensor",
        &rcps::cpu::urp_forward_cpu);
  m.def(
      "urp_backward_cpu(Tensor grad_output, Tensor student, Tensor teacher, float temperature, "
      "int reduction) -> Tensor",
      &rcps::cpu::urp_backward_cpu);
  m.def(
      "cosine_consistency_forward_cpu(Tensor logits_a, Tensor logits_b, float eps, int reduction) "
      "-> Tensor",
      &rcps::cpu::cosine_consistency_forward_cpu);
  m.def(
      "cosine_consistency_backward_cpu(Tensor grad_output, Tensor logits_a, Tensor logits_b, "
      "float eps, int reduction, bool need_grad_a, bool need_grad_b) -> (Tensor, Tensor)",
      &rcps::cpu::cosine_consistency_backward_cpu);
  m.def(
      "pseudo_supervision_losses_backward_cpu(Tensor grad_urp, Tensor grad_cr, Tensor view_a, "
      "Tensor view_b, Tensor teacher, float temperature, float eps, int reduction) "
      "-> (Tensor, Tensor)",
      &rcps::cpu::pseudo_supervision_losses_backward_cpu);
}
