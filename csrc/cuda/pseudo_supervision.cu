// Fused rectified pseudo supervision (L_urp) and logit cosine consistency (L_cr) on CUDA.
//
// One thread per voxel walks the voxel's classes (consecutive threads read consecutive voxels,
// so class rows of (B, num_classes, P) logits are read coalesced); the per-class and per-voxel
// formulas and their gradients are those of csrc/common/pseudo_supervision_math.h, which the CPU
// kernels (and their tests) share. The class loop re-reads the voxel's logits after the max pass,
// from L1/L2. Reductions write one partial sum per thread block (cub::BlockReduce), summed by torch
// in block order, so results are deterministic. Same contract as csrc/cpu/pseudo_supervision.cpp:
// reduction 0 = "none" ((B, P) map), 1 = "mean", 2 = "sum" (0-dim); fp16/bf16 accumulate in fp32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include "../common/pseudo_supervision_math.h"

namespace rcps {
namespace cuda {
namespace {

using at::Tensor;
namespace ps = rcps::pseudo_supervision;

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };
constexpr int kThreads = 256;

struct ExpFn {
  RCPS_HD float operator()(float x) const {
#ifdef __CUDA_ARCH__
    return __expf(x);
#else
    return expf(x);
#endif
  }
  RCPS_HD double operator()(double x) const { return exp(x); }
};

struct LogFn {
  RCPS_HD float operator()(float x) const { return logf(x); }
  RCPS_HD double operator()(double x) const { return log(x); }
};

struct SqrtFn {
  RCPS_HD float operator()(float x) const { return sqrtf(x); }
  RCPS_HD double operator()(double x) const { return sqrt(x); }
};

// Strides of a (B, num_classes, P) view and the start of one voxel's class column.
struct Layout {
  int64_t stride_b, stride_c, stride_p;

  explicit Layout(const Tensor& x)
      : stride_b(x.stride(0)), stride_c(x.stride(1)), stride_p(x.stride(2)) {}
  Layout() : stride_b(0), stride_c(0), stride_p(0) {}

  __device__ int64_t voxel(int64_t v, int64_t voxels_per_item) const {
    return (v / voxels_per_item) * stride_b + (v % voxels_per_item) * stride_p;
  }
};

// Gradient scale of voxel v: grad_output per voxel, or grad_output[0] * factor for all.
template <typename acc_t>
struct GradScale {
  const acc_t* grad_output;
  bool per_voxel;
  acc_t factor;

  __device__ acc_t operator()(int64_t v) const {
    return per_voxel ? grad_output[v] : grad_output[0] * factor;
  }
};

// Writes the per-voxel loss, or the block's partial sum, in double: per-voxel losses near the
// float maximum must not overflow a sum whose mean is representable.
template <typename acc_t>
__device__ void store_loss(acc_t loss, int64_t v, int64_t num_voxels, acc_t* voxel_loss,
                           double* block_partials) {
  if (voxel_loss != nullptr) {
    if (v < num_voxels) voxel_loss[v] = loss;
    return;
  }
  using BlockReduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const double block_sum =
      BlockReduce(storage).Sum(v < num_voxels ? static_cast<double>(loss) : 0.0);
  if (threadIdx.x == 0) block_partials[blockIdx.x] = block_sum;
}

// ---------------------------------------------------------------------------------------------
// L_urp
// ---------------------------------------------------------------------------------------------

// Softmax statistics and loss of one voxel (two passes over its classes).
template <typename scalar_t, typename acc_t>
__device__ ps::RectifiedVoxel<acc_t> rectified_voxel_at(const scalar_t* z, const scalar_t* t,
                                                        int64_t stride_z, int64_t stride_t,
                                                        int64_t num_classes, acc_t inv_temperature,
                                                        acc_t* student_max, acc_t* teacher_max) {
  acc_t z_max = -INFINITY, t_max = -INFINITY;
  for (int64_t c = 0; c < num_classes; ++c) {
    const acc_t zc = static_cast<acc_t>(z[c * stride_z]);
    const acc_t tc = static_cast<acc_t>(t[c * stride_t]);
    z_max = zc > z_max ? zc : z_max;
    t_max = tc > t_max ? tc : t_max;
  }
  acc_t sum_z = 0, sum_t = 0, sum_s = 0, sharpened_dot_half = 0, teacher_gap_half = 0;
  for (int64_t c = 0; c < num_classes; ++c) {
    const ps::RectifiedClassTerms<acc_t> terms = ps::rectified_class_terms<acc_t>(
        static_cast<acc_t>(z[c * stride_z]), static_cast<acc_t>(t[c * stride_t]), z_max, t_max,
        inv_temperature, ExpFn());
    sum_z += terms.exp_student;
    sum_t += terms.exp_teacher;
    sum_s += terms.exp_sharpened;
    sharpened_dot_half += terms.sharpened_dot_half;
    teacher_gap_half += terms.teacher_gap_half;
  }
  *student_max = z_max;
  *teacher_max = t_max;
  return ps::rectified_voxel<acc_t>(sum_z, sum_t, sum_s, sharpened_dot_half, teacher_gap_half,
                                    LogFn(), ExpFn());
}

template <typename scalar_t, typename acc_t>
__global__ void rectified_pseudo_supervision_forward_kernel(
    const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher, Layout zl,
    Layout tl, int64_t num_voxels, int64_t voxels_per_item, int64_t num_classes,
    acc_t inv_temperature, acc_t* voxel_loss, double* block_partials) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  acc_t loss = 0;
  if (v < num_voxels) {
    acc_t z_max, t_max;
    loss = rectified_voxel_at<scalar_t, acc_t>(
               student + zl.voxel(v, voxels_per_item), teacher + tl.voxel(v, voxels_per_item),
               zl.stride_c, tl.stride_c, num_classes, inv_temperature, &z_max, &t_max)
               .loss;
  }
  store_loss(loss, v, num_voxels, voxel_loss, block_partials);
}

template <typename scalar_t, typename acc_t>
__global__ void rectified_pseudo_supervision_backward_kernel(
    const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher, scalar_t* grad,
    Layout zl, Layout tl, Layout gl, int64_t num_voxels, int64_t voxels_per_item,
    int64_t num_classes, acc_t inv_temperature, GradScale<acc_t> scale) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (v >= num_voxels) return;
  const scalar_t* z = student + zl.voxel(v, voxels_per_item);
  const scalar_t* t = teacher + tl.voxel(v, voxels_per_item);
  scalar_t* g = grad + gl.voxel(v, voxels_per_item);
  acc_t z_max, t_max;
  const ps::RectifiedVoxel<acc_t> vox = rectified_voxel_at<scalar_t, acc_t>(
      z, t, zl.stride_c, tl.stride_c, num_classes, inv_temperature, &z_max, &t_max);
  const acc_t grad_scale = scale(v);
  for (int64_t c = 0; c < num_classes; ++c) {
    const ps::RectifiedClassTerms<acc_t> terms = ps::rectified_class_terms<acc_t>(
        static_cast<acc_t>(z[c * zl.stride_c]), static_cast<acc_t>(t[c * tl.stride_c]), z_max,
        t_max, inv_temperature, ExpFn());
    g[c * gl.stride_c] = static_cast<scalar_t>(ps::rectified_student_grad<acc_t>(
        terms.exp_student, terms.exp_teacher, terms.exp_sharpened, vox, grad_scale));
  }
}

// ---------------------------------------------------------------------------------------------
// L_cr
// ---------------------------------------------------------------------------------------------

// One voxel's cosine (three passes over its classes: the largest |logit|, then the sums of the
// scaled logits); the power-of-two scales are returned for the gradient.
template <typename scalar_t, typename acc_t>
__device__ ps::CosineVoxel<acc_t> cosine_voxel_at(const scalar_t* a, const scalar_t* b,
                                                  int64_t stride_a, int64_t stride_b,
                                                  int64_t num_classes, acc_t eps, acc_t* scale_a,
                                                  acc_t* scale_b) {
  acc_t max_a = 0, max_b = 0;
  for (int64_t c = 0; c < num_classes; ++c) {
    max_a = fmax(max_a, fabs(static_cast<acc_t>(a[c * stride_a])));
    max_b = fmax(max_b, fabs(static_cast<acc_t>(b[c * stride_b])));
  }
  *scale_a = ps::power_of_two_scale(max_a);
  *scale_b = ps::power_of_two_scale(max_b);
  acc_t sq_a = 0, sq_b = 0, dot = 0;
  for (int64_t c = 0; c < num_classes; ++c) {
    const acc_t x = static_cast<acc_t>(a[c * stride_a]) * *scale_a;
    const acc_t y = static_cast<acc_t>(b[c * stride_b]) * *scale_b;
    sq_a += x * x;
    sq_b += y * y;
    dot += x * y;
  }
  return ps::cosine_voxel<acc_t>(sq_a, sq_b, dot, *scale_a, *scale_b, eps, SqrtFn());
}

template <typename scalar_t, typename acc_t>
__global__ void logit_cosine_consistency_forward_kernel(const scalar_t* __restrict__ logits_a,
                                                        const scalar_t* __restrict__ logits_b,
                                                        Layout al, Layout bl, int64_t num_voxels,
                                                        int64_t voxels_per_item,
                                                        int64_t num_classes, acc_t eps,
                                                        acc_t* voxel_loss, double* block_partials) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  acc_t loss = 0;
  if (v < num_voxels) {
    acc_t scale_a, scale_b;
    loss = cosine_voxel_at<scalar_t, acc_t>(logits_a + al.voxel(v, voxels_per_item),
                                            logits_b + bl.voxel(v, voxels_per_item), al.stride_c,
                                            bl.stride_c, num_classes, eps, &scale_a, &scale_b)
               .loss;
  }
  store_loss(loss, v, num_voxels, voxel_loss, block_partials);
}

template <typename scalar_t, typename acc_t>
__global__ void logit_cosine_consistency_backward_kernel(
    const scalar_t* __restrict__ logits_a, const scalar_t* __restrict__ logits_b, scalar_t* grad_a,
    scalar_t* grad_b, Layout al, Layout bl, Layout gal, Layout gbl, int64_t num_voxels,
    int64_t voxels_per_item, int64_t num_classes, acc_t eps, GradScale<acc_t> scale) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (v >= num_voxels) return;
  const scalar_t* a = logits_a + al.voxel(v, voxels_per_item);
  const scalar_t* b = logits_b + bl.voxel(v, voxels_per_item);
  acc_t scale_a, scale_b;
  const ps::CosineVoxel<acc_t> vox = cosine_voxel_at<scalar_t, acc_t>(
      a, b, al.stride_c, bl.stride_c, num_classes, eps, &scale_a, &scale_b);
  const acc_t grad_scale = scale(v);
  scalar_t* ga = grad_a != nullptr ? grad_a + gal.voxel(v, voxels_per_item) : nullptr;
  scalar_t* gb = grad_b != nullptr ? grad_b + gbl.voxel(v, voxels_per_item) : nullptr;
  for (int64_t c = 0; c < num_classes; ++c) {
    const acc_t x = static_cast<acc_t>(a[c * al.stride_c]);
    const acc_t y = static_cast<acc_t>(b[c * bl.stride_c]);
    if (ga != nullptr)
      ga[c * gal.stride_c] = static_cast<scalar_t>(
          ps::cosine_grad<acc_t>(x, y, scale_a, vox.unit_a, vox.inv_norm_a, vox.clamped_a, scale_b,
                                 vox.unit_b, vox.cosine, grad_scale));
    if (gb != nullptr)
      gb[c * gbl.stride_c] = static_cast<scalar_t>(
          ps::cosine_grad<acc_t>(y, x, scale_b, vox.unit_b, vox.inv_norm_b, vox.clamped_b, scale_a,
                                 vox.unit_a, vox.cosine, grad_scale));
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

void check_pair(const Tensor& x, const Tensor& y, const char* op) {
  TORCH_CHECK(x.dim() == 3 && x.sizes() == y.sizes(), op,
              ": inputs must both be (B, num_classes, P), got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), op, ": inputs must share a dtype");
  TORCH_CHECK(x.is_cuda() && y.is_cuda() && x.device() == y.device(), op,
              ": inputs must be on one CUDA device");
  TORCH_CHECK(x.size(1) >= 2, op, ": need at least 2 classes, got ", x.size(1));
}

at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

int64_t num_blocks(int64_t num_voxels) { return (num_voxels + kThreads - 1) / kThreads; }

// Output buffers of a forward: the (B, P) map or the (double) block partials.
struct LossBuffers {
  Tensor voxel_loss, block_partials;
  at::ScalarType acc;

  LossBuffers(const Tensor& x, int64_t reduction) : acc(accumulation_type(x.scalar_type())) {
    if (reduction == kNone) {
      voxel_loss = at::empty({x.size(0), x.size(2)}, x.options().dtype(acc));
    } else {
      block_partials =
          at::empty({num_blocks(x.size(0) * x.size(2))}, x.options().dtype(at::kDouble));
    }
  }

  template <typename acc_t>
  acc_t* voxel_ptr() const {
    return voxel_loss.defined() ? voxel_loss.data_ptr<acc_t>() : nullptr;
  }
  double* partial_ptr() const {
    return block_partials.defined() ? block_partials.data_ptr<double>() : nullptr;
  }

  Tensor result(int64_t reduction, int64_t num_voxels) const {
    if (reduction == kNone) return voxel_loss;
    const Tensor total = block_partials.sum();
    return (reduction == kMean ? total / static_cast<double>(num_voxels) : total).to(acc);
  }
};

template <typename acc_t>
GradScale<acc_t> grad_scale_of(const Tensor& grad_output, int64_t reduction, int64_t B, int64_t P,
                               Tensor* holder) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  if (reduction == kNone) {
    *holder = grad_output.reshape({B, P}).to(acc).contiguous();
    return GradScale<acc_t>{holder->data_ptr<acc_t>(), true, acc_t(1)};
  }
  *holder = grad_output.to(acc).contiguous();
  const acc_t factor = reduction == kMean ? acc_t(1) / static_cast<acc_t>(B * P) : acc_t(1);
  return GradScale<acc_t>{holder->data_ptr<acc_t>(), false, factor};
}

Tensor rectified_pseudo_supervision_forward(const Tensor& student, const Tensor& teacher,
                                            double temperature, int64_t reduction) {
  check_pair(student, teacher, "rcps_cuda::rectified_pseudo_supervision_forward");
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t B = student.size(0), num_classes = student.size(1), P = student.size(2), N = B * P;
  const LossBuffers buffers(student, reduction);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student.scalar_type(),
      "rcps_cuda::rectified_pseudo_supervision_forward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        rectified_pseudo_supervision_forward_kernel<scalar_t, acc_t>
            <<<num_blocks(N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), Layout(student),
                Layout(teacher), N, P, num_classes, static_cast<acc_t>(1.0 / temperature),
                buffers.voxel_ptr<acc_t>(), buffers.partial_ptr());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return buffers.result(reduction, N);
}

Tensor rectified_pseudo_supervision_backward(const Tensor& grad_output, const Tensor& student,
                                             const Tensor& teacher, double temperature,
                                             int64_t reduction) {
  check_pair(student, teacher, "rcps_cuda::rectified_pseudo_supervision_backward");
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t B = student.size(0), num_classes = student.size(1), P = student.size(2), N = B * P;
  Tensor grad = at::empty_like(student);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student.scalar_type(),
      "rcps_cuda::rectified_pseudo_supervision_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        Tensor holder;
        const GradScale<acc_t> scale = grad_scale_of<acc_t>(grad_output, reduction, B, P, &holder);
        rectified_pseudo_supervision_backward_kernel<scalar_t, acc_t>
            <<<num_blocks(N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(),
                grad.data_ptr<scalar_t>(), Layout(student), Layout(teacher), Layout(grad), N, P,
                num_classes, static_cast<acc_t>(1.0 / temperature), scale);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad;
}

Tensor logit_cosine_consistency_forward(const Tensor& logits_a, const Tensor& logits_b, double eps,
                                        int64_t reduction) {
  check_pair(logits_a, logits_b, "rcps_cuda::logit_cosine_consistency_forward");
  const c10::cuda::CUDAGuard guard(logits_a.device());
  const int64_t B = logits_a.size(0), num_classes = logits_a.size(1), P = logits_a.size(2),
                N = B * P;
  const LossBuffers buffers(logits_a, reduction);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits_a.scalar_type(),
      "rcps_cuda::logit_cosine_consistency_forward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        logit_cosine_consistency_forward_kernel<scalar_t, acc_t>
            <<<num_blocks(N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                logits_a.data_ptr<scalar_t>(), logits_b.data_ptr<scalar_t>(), Layout(logits_a),
                Layout(logits_b), N, P, num_classes, static_cast<acc_t>(eps),
                buffers.voxel_ptr<acc_t>(), buffers.partial_ptr());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return buffers.result(reduction, N);
}

std::tuple<Tensor, Tensor> logit_cosine_consistency_backward(const Tensor& grad_output,
                                                             const Tensor& logits_a,
                                                             const Tensor& logits_b, double eps,
                                                             int64_t reduction, bool need_grad_a,
                                                             bool need_grad_b) {
  check_pair(logits_a, logits_b, "rcps_cuda::logit_cosine_consistency_backward");
  const c10::cuda::CUDAGuard guard(logits_a.device());
  const int64_t B = logits_a.size(0), num_classes = logits_a.size(1), P = logits_a.size(2),
                N = B * P;
  Tensor grad_a = need_grad_a ? at::empty_like(logits_a) : at::empty({0}, logits_a.options());
  Tensor grad_b = need_grad_b ? at::empty_like(logits_b) : at::empty({0}, logits_b.options());
  if (!need_grad_a && !need_grad_b) return {grad_a, grad_b};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits_a.scalar_type(),
      "rcps_cuda::logit_cosine_consistency_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        Tensor holder;
        const GradScale<acc_t> scale = grad_scale_of<acc_t>(grad_output, reduction, B, P, &holder);
        logit_cosine_consistency_backward_kernel<scalar_t, acc_t>
            <<<num_blocks(N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                logits_a.data_ptr<scalar_t>(), logits_b.data_ptr<scalar_t>(),
                need_grad_a ? grad_a.data_ptr<scalar_t>() : nullptr,
                need_grad_b ? grad_b.data_ptr<scalar_t>() : nullptr, Layout(logits_a),
                Layout(logits_b), need_grad_a ? Layout(grad_a) : Layout(),
                need_grad_b ? Layout(grad_b) : Layout(), N, P, num_classes, static_cast<acc_t>(eps),
                scale);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_a, grad_b};
}

}  // namespace
}  // namespace cuda
}  // namespace rcps

TORCH_LIBRARY_FRAGMENT(rcps_cuda, m) {
  m.def(
      "rectified_pseudo_supervision_forward(Tensor student, Tensor teacher, float temperature, "
      "int reduction) -> Tensor",
      &rcps::cuda::rectified_pseudo_supervision_forward);
  m.def(
      "rectified_pseudo_supervision_backward(Tensor grad_output, Tensor student, Tensor teacher, "
      "float temperature, int reduction) -> Tensor",
      &rcps::cuda::rectified_pseudo_supervision_backward);
  m.def(
      "logit_cosine_consistency_forward(Tensor logits_a, Tensor logits_b, float eps, "
      "int reduction) -> Tensor",
      &rcps::cuda::logit_cosine_consistency_forward);
  m.def(
      "logit_cosine_consistency_backward(Tensor grad_output, Tensor logits_a, Tensor logits_b, "
      "float eps, int reduction, bool need_grad_a, bool need_grad_b) -> (Tensor, Tensor)",
      &rcps::cuda::logit_cosine_consistency_backward);
}
