// Fused rectified pseudo supervision (L_urp) and logit cosine consistency (L_cr) on the CPU.
//
// Inputs are (B, num_classes, P) views of (B, num_classes, *S) logits with any strides and dtype
// (fp32, fp64, fp16, bf16). The voxels are cut into blocks of one batch item; a block's num_classes
// x V logits are converted once into a small fp32 (fp64 for double) buffer that stays in L1/L2, and
// every per-class loop then runs over V contiguous voxels, which the compiler vectorises. So each
// op reads the logits once in forward and once in backward, and the only logits-sized tensor it
// allocates is the gradient. The per-voxel and per-class formulas (and their gradients) are those
// of csrc/common/pseudo_supervision_math.h, the same lines the CUDA kernels run.
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
#include <tuple>
#include <vector>

#include "../common/pseudo_supervision_math.h"
#include "fast_math.h"
#include "logit_blocks.h"

namespace rcps {
namespace cpu {
namespace {

namespace ps = rcps::pseudo_supervision;

// ---------------------------------------------------------------------------------------------
// L_urp
// ---------------------------------------------------------------------------------------------

// Per-voxel state of one block, structure of arrays so that the voxel loops vectorise.
template <typename acc_t>
struct RectifiedBlockState {
  std::vector<acc_t> student, teacher,
      sharpened;  // num_classes x V: logits, then their exponentials
  std::vector<acc_t> student_max, teacher_max, sum_student, sum_teacher, sum_sharpened,
      sharpened_dot_half, teacher_gap_half, loss, inv_sum_student, inv_sum_teacher,
      inv_sum_sharpened, weight, kl_coefficient, grad_scale;

  RectifiedBlockState(int64_t num_classes, int64_t V)
      : student(num_classes * V),
        teacher(num_classes * V),
        sharpened(num_classes * V),
        student_max(V),
        teacher_max(V),
        sum_student(V),
        sum_teacher(V),
        sum_sharpened(V),
        sharpened_dot_half(V),
        teacher_gap_half(V),
        loss(V),
        inv_sum_student(V),
        inv_sum_teacher(V),
        inv_sum_sharpened(V),
        weight(V),
        kl_coefficient(V),
        grad_scale(V) {}

  // Forward sums and per-voxel results of the loaded block; leaves e^zs, e^ts, e^(ts/T) in
  // student, teacher, sharpened for the gradient.
  void evaluate(int64_t num_classes, int64_t V, int64_t count, acc_t inv_temperature) {
    const ExpFn exp_fn;
    std::fill(student_max.begin(), student_max.end(), -INFINITY);
    std::fill(teacher_max.begin(), teacher_max.end(), -INFINITY);
    for (int64_t c = 0; c < num_classes; ++c) {
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
    for (int64_t c = 0; c < num_classes; ++c) {
      acc_t* z = student.data() + c * V;
      acc_t* t = teacher.data() + c * V;
      acc_t* s = sharpened.data() + c * V;
#pragma omp simd  // no aliasing between the block's arrays
      for (int64_t j = 0; j < count; ++j) {
        const ps::RectifiedClassTerms<acc_t> terms = ps::rectified_class_terms<acc_t>(
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
      const ps::RectifiedVoxel<acc_t> v =
          ps::rectified_voxel<acc_t>(sum_student[j], sum_teacher[j], sum_sharpened[j],
                                     sharpened_dot_half[j], teacher_gap_half[j], LogFn(), exp_fn);
      loss[j] = v.loss;
      inv_sum_student[j] = v.inv_sum_student;
      inv_sum_teacher[j] = v.inv_sum_teacher;
      inv_sum_sharpened[j] = v.inv_sum_sharpened;
      weight[j] = v.weight;
      kl_coefficient[j] = v.kl_coefficient;
    }
  }

  acc_t* input_x() { return student.data(); }
  acc_t* input_y() { return teacher.data(); }

  // Overwrites `student` with the gradient of sum_j grad_scale_j loss_j (after evaluate); the
  // teacher is detached.
  void gradients(int64_t num_classes, int64_t V, int64_t count) {
    for (int64_t c = 0; c < num_classes; ++c) {
      acc_t* z = student.data() + c * V;
      const acc_t* t = teacher.data() + c * V;
      const acc_t* s = sharpened.data() + c * V;
#pragma omp simd  // no aliasing between the block's arrays
      for (int64_t j = 0; j < count; ++j) {
        const ps::RectifiedVoxel<acc_t> v{
            loss[j],   inv_sum_student[j], inv_sum_teacher[j], inv_sum_sharpened[j],
            weight[j], kl_coefficient[j]};
        z[j] = ps::rectified_student_grad<acc_t>(z[j], t[j], s[j], v, grad_scale[j]);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// L_cr
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
struct CosineBlockState {
  std::vector<acc_t> a, b;  // num_classes x V logits, then (backward) their gradients
  std::vector<acc_t> scale_a, scale_b, sq_norm_a, sq_norm_b, dot, loss, cosine, unit_a, unit_b,
      inv_norm_a, inv_norm_b, grad_scale;
  std::vector<uint8_t> clamped_a, clamped_b;

  CosineBlockState(int64_t num_classes, int64_t V)
      : a(num_classes * V),
        b(num_classes * V),
        scale_a(V),
        scale_b(V),
        sq_norm_a(V),
        sq_norm_b(V),
        dot(V),
        loss(V),
        cosine(V),
        unit_a(V),
        unit_b(V),
        inv_norm_a(V),
        inv_norm_b(V),
        grad_scale(V),
        clamped_a(V),
        clamped_b(V) {}

  acc_t* input_x() { return a.data(); }
  acc_t* input_y() { return b.data(); }

  // Per voxel, the power-of-two scales that bring the largest |a_c| and |b_c| to [1, 4).
  void find_scales(int64_t num_classes, int64_t V, int64_t count) {
    std::fill(scale_a.begin(), scale_a.end(), acc_t(0));  // the largest |logit| first
    std::fill(scale_b.begin(), scale_b.end(), acc_t(0));
    for (int64_t c = 0; c < num_classes; ++c) {
      const acc_t* x = a.data() + c * V;
      const acc_t* y = b.data() + c * V;
#pragma omp simd                             // no aliasing between the block's arrays
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

  void evaluate(int64_t num_classes, int64_t V, int64_t count, acc_t eps) {
    find_scales(num_classes, V, count);
    std::fill(sq_norm_a.begin(), sq_norm_a.end(), acc_t(0));
    std::fill(sq_norm_b.begin(), sq_norm_b.end(), acc_t(0));
    std::fill(dot.begin(), dot.end(), acc_t(0));
    for (int64_t c = 0; c < num_classes; ++c) {
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
  void gradients(int64_t num_classes, int64_t V, int64_t count) {
    for (int64_t c = 0; c < num_classes; ++c) {
      acc_t* x = a.data() + c * V;
      acc_t* y = b.data() + c * V;
#pragma omp simd  // no aliasing between the block's arrays
      for (int64_t j = 0; j < count; ++j) {
        const acc_t xa = x[j], yb = y[j];
        x[j] =
            ps::cosine_grad<acc_t>(xa, yb, scale_a[j], unit_a[j], inv_norm_a[j], clamped_a[j] != 0,
                                   scale_b[j], unit_b[j], cosine[j], grad_scale[j]);
        y[j] =
            ps::cosine_grad<acc_t>(yb, xa, scale_b[j], unit_b[j], inv_norm_b[j], clamped_b[j] != 0,
                                   scale_a[j], unit_a[j], cosine[j], grad_scale[j]);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// The block loops of the two-input ops. A block state State<acc_t> loads its inputs into
// input_x() / input_y() (num_classes x V buffers), evaluate(num_classes, V, count, parameter)
// leaves the block's per-voxel losses in `loss`, and gradients(num_classes, V, count) then
// overwrites the input buffers with the gradients of sum_j grad_scale_j loss_j.
// ---------------------------------------------------------------------------------------------

// Loads and evaluates every block of (x, y), in parallel, then calls
// `then(state, block_index, blk, V)`. `parameter` is the argument of evaluate() (1/T, or eps).
template <template <typename> class State, typename scalar_t, typename Then>
void for_each_block(const Tensor& x, const Tensor& y, double parameter, const Then& then) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_classes = x.size(1), P = x.size(2);
  const BlockGrid grid(x.size(0), num_classes, P);
  const int64_t V = grid.block_voxels;
  const LogitsView<scalar_t> xv(x), yv(y);
  const acc_t state_parameter = static_cast<acc_t>(parameter);
  at::parallel_for(0, grid.num_blocks, grid.grain(), [&](int64_t begin, int64_t end) {
    State<acc_t> state(num_classes, V);
    for (int64_t b = begin; b < end; ++b) {
      const Block blk = grid.block(b, P);
      load_block(xv, blk, V, state.input_x());
      load_block(yv, blk, V, state.input_y());
      state.evaluate(num_classes, V, blk.count, state_parameter);
      then(state, b, blk, V);
    }
  });
}

// The loss of (x, y): a (B, P) map (reduction "none") or the reduced 0-dim tensor, in the
// accumulation type.
template <template <typename> class State, typename scalar_t>
Tensor blockwise_loss(const Tensor& x, const Tensor& y, int64_t reduction, double parameter) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), P = x.size(2);
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  const BlockGrid grid(B, x.size(1), P);
  Tensor voxel_loss = reduction == kNone ? at::empty({B, P}, x.options().dtype(acc)) : Tensor();
  std::vector<double> partials(reduction == kNone ? 0 : grid.num_blocks);
  const LossSink<acc_t> sink{voxel_loss.defined() ? voxel_loss.data_ptr<acc_t>() : nullptr,
                             partials.data()};
  for_each_block<State, scalar_t>(x, y, parameter,
                                  [&](State<acc_t>& state, int64_t b, const Block& blk, int64_t) {
                                    sink.write(b, blk, P, state.loss.data());
                                  });
  return reduction == kNone ? voxel_loss : reduce_partials(partials, reduction, B * P, acc);
}

// The gradients of grad_output times the loss of (x, y), written into grad_x and grad_y; an
// undefined one is not computed.
template <template <typename> class State, typename scalar_t>
void blockwise_gradients(const Tensor& grad_output, const Tensor& x, const Tensor& y,
                         int64_t reduction, double parameter, const Tensor& grad_x,
                         const Tensor& grad_y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), num_classes = x.size(1), P = x.size(2);
  // (a view of the input stands in for a gradient that is not written)
  const LogitsView<scalar_t> dx(grad_x.defined() ? grad_x : x), dy(grad_y.defined() ? grad_y : y);
  Tensor scale_holder;
  const GradScale<acc_t> scale =
      make_grad_scale<acc_t>(grad_output, reduction, B, P, &scale_holder);
  for_each_block<State, scalar_t>(x, y, parameter,
                                  [&](State<acc_t>& state, int64_t, const Block& blk, int64_t V) {
                                    scale.fill(blk, P, state.grad_scale.data());
                                    state.gradients(num_classes, V, blk.count);
                                    if (grad_x.defined()) store_block(state.input_x(), blk, V, dx);
                                    if (grad_y.defined()) store_block(state.input_y(), blk, V, dy);
                                  });
}

// ---------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------

Tensor rectified_pseudo_supervision_forward(const Tensor& student, const Tensor& teacher,
                                            double temperature, int64_t reduction) {
  check_pair(student, teacher, "rcps_cpu::rectified_pseudo_supervision_forward", "student",
             "teacher");
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                         "rcps_cpu::rectified_pseudo_supervision_forward", [&] {
                                           return blockwise_loss<RectifiedBlockState, scalar_t>(
                                               student, teacher, reduction, 1.0 / temperature);
                                         });
}

// The student's gradient (the teacher is detached).
Tensor rectified_pseudo_supervision_backward(const Tensor& grad_output, const Tensor& student,
                                             const Tensor& teacher, double temperature,
                                             int64_t reduction) {
  check_pair(student, teacher, "rcps_cpu::rectified_pseudo_supervision_backward", "student",
             "teacher");
  Tensor grad_student = at::empty_like(student);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "rcps_cpu::rectified_pseudo_supervision_backward", [&] {
                                    blockwise_gradients<RectifiedBlockState, scalar_t>(
                                        grad_output, student, teacher, reduction, 1.0 / temperature,
                                        grad_student, Tensor());
                                  });
  return grad_student;
}

Tensor logit_cosine_consistency_forward(const Tensor& logits_a, const Tensor& logits_b, double eps,
                                        int64_t reduction) {
  check_pair(logits_a, logits_b, "rcps_cpu::logit_cosine_consistency_forward", "logits_a",
             "logits_b");
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits_a.scalar_type(),
                                         "rcps_cpu::logit_cosine_consistency_forward", [&] {
                                           return blockwise_loss<CosineBlockState, scalar_t>(
                                               logits_a, logits_b, reduction, eps);
                                         });
}

// Gradients for a and b; a zero-element tensor for one not asked for.
std::tuple<Tensor, Tensor> logit_cosine_consistency_backward(const Tensor& grad_output,
                                                             const Tensor& logits_a,
                                                             const Tensor& logits_b, double eps,
                                                             int64_t reduction, bool need_grad_a,
                                                             bool need_grad_b) {
  check_pair(logits_a, logits_b, "rcps_cpu::logit_cosine_consistency_backward", "logits_a",
             "logits_b");
  Tensor grad_a = need_grad_a ? at::empty_like(logits_a) : at::empty({0}, logits_a.options());
  Tensor grad_b = need_grad_b ? at::empty_like(logits_b) : at::empty({0}, logits_b.options());
  if (!need_grad_a && !need_grad_b) return {grad_a, grad_b};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits_a.scalar_type(),
                                  "rcps_cpu::logit_cosine_consistency_backward", [&] {
                                    blockwise_gradients<CosineBlockState, scalar_t>(
                                        grad_output, logits_a, logits_b, reduction, eps,
                                        need_grad_a ? grad_a : Tensor(),
                                        need_grad_b ? grad_b : Tensor());
                                  });
  return {grad_a, grad_b};
}

// ---------------------------------------------------------------------------------------------
// One head's L_urp(a, t) + L_urp(b, t) and L_cr(a, b): each view's gradient is written once
// ---------------------------------------------------------------------------------------------

// into += from over the first `count` voxels of each of the num_classes class rows of a num_classes
// x V block.
template <typename acc_t>
void add_block(acc_t* into, const acc_t* from, int64_t num_classes, int64_t V, int64_t count) {
  for (int64_t c = 0; c < num_classes; ++c) {
#pragma omp simd  // distinct buffers
    for (int64_t j = 0; j < count; ++j) into[c * V + j] += from[c * V + j];
  }
}

// The gradients of g_urp * (L_urp(a, t) + L_urp(b, t)) + g_cr * L_cr(a, b) for a and b, summed in
// each block's buffers: the only logits-sized tensors are the two gradients themselves (two
// separate ops would hold a third while autograd adds up a's two gradients).
std::tuple<Tensor, Tensor> pseudo_supervision_losses_backward(
    const Tensor& grad_urp, const Tensor& grad_cr, const Tensor& view_a, const Tensor& view_b,
    const Tensor& teacher, double temperature, double eps, int64_t reduction) {
  const char* op = "rcps_cpu::pseudo_supervision_losses_backward";
  check_pair(view_a, view_b, op, "view_a", "view_b");
  check_pair(view_a, teacher, op, "view_a", "teacher");
  const int64_t B = view_a.size(0), num_classes = view_a.size(1), P = view_a.size(2);
  const BlockGrid grid(B, num_classes, P);
  const int64_t V = grid.block_voxels;
  Tensor grad_a = at::empty_like(view_a), grad_b = at::empty_like(view_b);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, view_a.scalar_type(),
      "rcps_cpu::pseudo_supervision_losses_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const LogitsView<scalar_t> xa(view_a), xb(view_b), t(teacher), da(grad_a), db(grad_b);
        Tensor urp_holder, cr_holder;
        const GradScale<acc_t> urp_scale =
            make_grad_scale<acc_t>(grad_urp, reduction, B, P, &urp_holder);
        const GradScale<acc_t> cr_scale =
            make_grad_scale<acc_t>(grad_cr, reduction, B, P, &cr_holder);
        const acc_t inv_temperature = static_cast<acc_t>(1.0 / temperature);
        at::parallel_for(0, grid.num_blocks, grid.grain(), [&](int64_t begin, int64_t end) {
          RectifiedBlockState<acc_t> urp_a(num_classes, V), urp_b(num_classes, V);
          CosineBlockState<acc_t> cosine(num_classes, V);
          for (int64_t b = begin; b < end; ++b) {
            const Block blk = grid.block(b, P);
            load_block(xa, blk, V, urp_a.student.data());
            load_block(xb, blk, V, urp_b.student.data());
            load_block(t, blk, V, urp_a.teacher.data());
            // evaluate() turns the buffers into exponentials: copy the logits first
            std::copy(urp_a.teacher.begin(), urp_a.teacher.end(), urp_b.teacher.begin());
            std::copy(urp_a.student.begin(), urp_a.student.end(), cosine.a.begin());
            std::copy(urp_b.student.begin(), urp_b.student.end(), cosine.b.begin());
            for (RectifiedBlockState<acc_t>* state : {&urp_a, &urp_b}) {
              state->evaluate(num_classes, V, blk.count, inv_temperature);
              urp_scale.fill(blk, P, state->grad_scale.data());
              state->gradients(num_classes, V, blk.count);
            }
            cosine.evaluate(num_classes, V, blk.count, static_cast<acc_t>(eps));
            cr_scale.fill(blk, P, cosine.grad_scale.data());
            cosine.gradients(num_classes, V, blk.count);
            add_block(urp_a.student.data(), cosine.a.data(), num_classes, V, blk.count);
            add_block(urp_b.student.data(), cosine.b.data(), num_classes, V, blk.count);
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

TORCH_LIBRARY_FRAGMENT(rcps_cpu, m) {
  m.def(
      "rectified_pseudo_supervision_forward(Tensor student, Tensor teacher, float temperature, "
      "int reduction) -> Tensor",
      &rcps::cpu::rectified_pseudo_supervision_forward);
  m.def(
      "rectified_pseudo_supervision_backward(Tensor grad_output, Tensor student, Tensor teacher, "
      "float temperature, int reduction) -> Tensor",
      &rcps::cpu::rectified_pseudo_supervision_backward);
  m.def(
      "logit_cosine_consistency_forward(Tensor logits_a, Tensor logits_b, float eps, "
      "int reduction) -> Tensor",
      &rcps::cpu::logit_cosine_consistency_forward);
  m.def(
      "logit_cosine_consistency_backward(Tensor grad_output, Tensor logits_a, Tensor logits_b, "
      "float eps, int reduction, bool need_grad_a, bool need_grad_b) -> (Tensor, Tensor)",
      &rcps::cpu::logit_cosine_consistency_backward);
  m.def(
      "pseudo_supervision_losses_backward(Tensor grad_urp, Tensor grad_cr, Tensor view_a, "
      "Tensor view_b, Tensor teacher, float temperature, float eps, int reduction) "
      "-> (Tensor, Tensor)",
      &rcps::cpu::pseudo_supervision_losses_backward);
}
