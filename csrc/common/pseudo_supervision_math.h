// Per-voxel math of the rectified pseudo supervision (L_urp) and the logit cosine consistency
// (L_cr), shared by the C++ CPU kernels (csrc/cpu/pseudo_supervision.cpp) and the CUDA kernels
// (csrc/cuda/pseudo_supervision.cu), so that the CPU tests check the arithmetic the GPU runs.
//
// Every function works on one voxel (or one class of one voxel) in the accumulation type `T`
// (float for fp32/fp16/bf16 inputs, double for float64). The caller owns the memory layout and
// supplies the exponential (`ExpFn`): a vectorisable polynomial on the CPU, __expf on the GPU.
// An `ExpFn` must return exactly 0 for -inf (and may flush very small results to 0).
//
// L_urp, per voxel with student logits z, teacher logits t (over the classes), temperature T:
//   shifted values  zs = z - max z,  ts = t - max t (ts = -inf where t = -inf)
//   sums            Sz = sum e^zs,  St = sum e^ts,  Ss = sum e^(ts/T)
//   CE = -sum q~ log p           = log Sz - sum e^(ts/T) zs / Ss      (q~ = softmax(t/T))
//   D  = sum q (log q - log p)   = sum e^ts (ts - zs) / St - log St + log Sz   (q = softmax(t))
//   loss = exp(-D) CE + D
// zs is carried as zs / 2 = z/2 - (max z)/2: logits of opposite signs near the largest finite
// value (3e38 in fp32) have a difference that overflows, while its half does not, and halving is
// exact, so ordinary inputs get the same bits as with zs itself. The two sums that multiply zs
// are formed in halves and doubled after the division by St or Ss.
// Gradient (teacher detached), with p = softmax(z), w = exp(-D):
//   dCE/dz = p - q~,  dD/dz = p - q,  dw/dz = -w (p - q)
//   dloss/dz = w (p - q~) + (1 - w CE)(p - q)
//
// L_cr, per voxel with logits a, b: n_a = max(||a||, eps), n_b = max(||b||, eps),
//   cos = a.b / (n_a n_b),  loss = 1 - cos
//   dloss/da = -(b / (n_a n_b) - cos a / n_a^2)   (the last term only where ||a|| > eps: a clamped
//   norm is a constant), symmetrically for b.
// The sums of squares are taken of a * s_a and b * s_b, with s_a, s_b powers of two that bring
// each voxel's largest |logit| to [1, 4): in fp32, a^2 overflows for |a| >= 2e19 and underflows
// for |a| < 1e-19, and a power-of-two scale is exact, so ordinary inputs are unaffected.
#pragma once

#include <string.h>

#include "rcps_math.h"

namespace rcps {
namespace pseudo_supervision {

// ---------------------------------------------------------------------------------------------
// L_urp
// ---------------------------------------------------------------------------------------------

// What one class adds to the voxel's forward sums (the maxima already known).
template <typename T>
struct RectifiedClassTerms {
  T exp_student;         // e^zs
  T exp_teacher;         // e^ts
  T exp_sharpened;       // e^(ts/T)
  T sharpened_dot_half;  // e^(ts/T) zs / 2
  T teacher_gap_half;    // e^ts (ts - zs) / 2, 0 where the teacher class has zero probability
  // (student logits must be finite: a -inf student logit makes the loss non-finite)
};

template <typename T, typename ExpFn>
RCPS_HD RectifiedClassTerms<T> rectified_class_terms(T student, T teacher, T student_max,
                                                     T teacher_max, T inv_temperature,
                                                     ExpFn exp_fn) {
  const T zs_half = T(0.5) * student - T(0.5) * student_max;  // never overflows (see top)
  const T ts = teacher - teacher_max;  // may overflow to -inf, where e^ts is 0 anyway
  RectifiedClassTerms<T> terms;
  terms.exp_student = exp_fn(zs_half + zs_half);
  terms.exp_teacher = exp_fn(ts);
  terms.exp_sharpened = exp_fn(ts * inv_temperature);
  // 0 * log 0 := 0: a class the teacher rules out (ts = -inf, e^ts = 0) must add nothing, so ts
  // is floored at a finite value before the product (e^ts is 0 long before the floor matters).
  // A select of values rather than of products keeps the CPU loops branch-free (vectorised).
  const T ts_floored = ts > T(-1e30) ? ts : T(-1e30);
  terms.sharpened_dot_half = terms.exp_sharpened * zs_half;
  terms.teacher_gap_half = terms.exp_teacher * (T(0.5) * ts_floored - zs_half);
  return terms;
}

// Per-voxel results, also everything the backward needs besides the logits.
template <typename T>
struct RectifiedVoxel {
  T loss;               // exp(-D) CE + D
  T inv_sum_student;    // 1 / Sz
  T inv_sum_teacher;    // 1 / St
  T inv_sum_sharpened;  // 1 / Ss
  T weight;             // w = exp(-D)
  T kl_coefficient;     // 1 - w CE
};

template <typename T, typename LogFn, typename ExpFn>
RCPS_HD RectifiedVoxel<T> rectified_voxel(T sum_student, T sum_teacher, T sum_sharpened,
                                          T sharpened_dot_half, T teacher_gap_half, LogFn log_fn,
                                          ExpFn exp_fn) {
  RectifiedVoxel<T> v;
  v.inv_sum_student = T(1) / sum_student;
  v.inv_sum_teacher = T(1) / sum_teacher;
  v.inv_sum_sharpened = T(1) / sum_sharpened;
  const T log_sum_student = log_fn(sum_student);
  const T cross_entropy = log_sum_student - T(2) * (sharpened_dot_half * v.inv_sum_sharpened);
  const T kl =
      T(2) * (teacher_gap_half * v.inv_sum_teacher) - log_fn(sum_teacher) + log_sum_student;
  v.weight = exp_fn(-kl);
  v.loss = v.weight * cross_entropy + kl;
  v.kl_coefficient = T(1) - v.weight * cross_entropy;
  return v;
}

// d(grad_scale * loss) / d z_c from the class's exponentials (as rectified_class_terms returns
// them).
template <typename T>
RCPS_HD T rectified_student_grad(T exp_student, T exp_teacher, T exp_sharpened,
                                 const RectifiedVoxel<T>& v, T grad_scale) {
  const T p = exp_student * v.inv_sum_student;
  const T q = exp_teacher * v.inv_sum_teacher;
  const T q_sharpened = exp_sharpened * v.inv_sum_sharpened;
  return grad_scale * (v.weight * (p - q_sharpened) + v.kl_coefficient * (p - q));
}

// ---------------------------------------------------------------------------------------------
// L_cr
// ---------------------------------------------------------------------------------------------

// Bit layout of a float type: its unsigned twin, mantissa width and exponent-field mask.
template <typename T>
struct FloatLayout;
template <>
struct FloatLayout<float> {
  using Bits = uint32_t;
  static constexpr int kMantissaBits = 23;
  static constexpr Bits kExponentMask = 0xff;
};
template <>
struct FloatLayout<double> {
  using Bits = uint64_t;
  static constexpr int kMantissaBits = 52;
  static constexpr Bits kExponentMask = 0x7ff;
};

// A power of two s with s * max_abs in [1, 4) (max_abs >= 0; for 0 and subnormals s is the
// largest normal power of two, 2^127 in fp32; inf and NaN keep their value): the exponent field
// of max_abs, mirrored, and kept below the largest finite exponent so that s stays normal. Bit
// operations only, so the CPU loops that call it vectorise.
template <typename T>
RCPS_HD T power_of_two_scale(T max_abs) {
  using Layout = FloatLayout<T>;
  using Bits = typename Layout::Bits;
  Bits bits;
  memcpy(&bits, &max_abs, sizeof(bits));
  const Bits largest_finite = Layout::kExponentMask - 1;  // 254 in fp32
  Bits biased = (bits >> Layout::kMantissaBits) & Layout::kExponentMask;
  biased = biased < largest_finite - 1 ? biased : largest_finite - 1;
  const Bits scale_bits = (largest_finite - biased) << Layout::kMantissaBits;
  T scale;
  memcpy(&scale, &scale_bits, sizeof(scale));
  return scale;
}

template <typename T>
struct CosineVoxel {
  T loss;  // 1 - cos
  T cosine;
  T unit_a;  // (a * s_a) * unit_a = a / max(||a||, eps)
  T unit_b;
  T inv_norm_a;  // 1 / max(||a||, eps)
  T inv_norm_b;
  bool clamped_a;  // ||a|| <= eps: the norm is the constant eps
  bool clamped_b;
};

// From the sums of squares and the dot product of the scaled logits a * scale_a, b * scale_b.
template <typename T, typename SqrtFn>
RCPS_HD CosineVoxel<T> cosine_voxel(T sq_norm_a, T sq_norm_b, T dot, T scale_a, T scale_b, T eps,
                                    SqrtFn sqrt_fn) {
  CosineVoxel<T> v;
  const T norm_a = sqrt_fn(sq_norm_a);  // ||a|| * scale_a
  const T norm_b = sqrt_fn(sq_norm_b);
  const T eps_a = eps * scale_a;  // eps in the same units (+inf only where ||a|| << eps)
  const T eps_b = eps * scale_b;
  v.clamped_a = !(norm_a > eps_a);
  v.clamped_b = !(norm_b > eps_b);
  v.unit_a = T(1) / (v.clamped_a ? eps_a : norm_a);
  v.unit_b = T(1) / (v.clamped_b ? eps_b : norm_b);
  // Both sides of each select computed first: a select of values vectorises on the CPU, one
  // of a division or product that might trap (-ftrapping-math) does not.
  const T inv_eps = T(1) / eps, inv_norm_a = scale_a * v.unit_a, inv_norm_b = scale_b * v.unit_b;
  v.inv_norm_a = v.clamped_a ? inv_eps : inv_norm_a;
  v.inv_norm_b = v.clamped_b ? inv_eps : inv_norm_b;
  v.cosine = dot * v.unit_a * v.unit_b;
  v.loss = T(1) - v.cosine;
  return v;
}

// d(grad_scale * (1 - cos)) / d x_c for x = a (other = b) or x = b (other = a); the unit vectors
// are formed from the scaled logits, so they keep full precision where 1 / ||x|| is subnormal.
template <typename T>
RCPS_HD T cosine_grad(T x, T other, T scale_x, T unit_x, T inv_norm_x, bool clamped_x,
                      T scale_other, T unit_other, T cosine, T grad_scale) {
  const T x_hat = x * scale_x * unit_x;
  const T other_hat = other * scale_other * unit_other;
  const T radial = cosine * x_hat * (clamped_x ? T(0) : T(1));  // a select of constants
  return -(grad_scale * inv_norm_x) * (other_hat - radial);
}

}  // namespace pseudo_supervision
}  // namespace rcps
