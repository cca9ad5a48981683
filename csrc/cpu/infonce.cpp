// Fused bidirectional voxel InfoNCE on the CPU: forward, and gradients for any per-anchor weights.
//
// Layout: anchor/positive are (B, C, P) and the pool is (Bn, C, Pn), any strides; anchor i is
// voxel i of the flattened (B, P). anchor_labels (N,) holds each anchor's pseudo-class; for class
// c, neg_index[c, :neg_count[c]] lists its negatives as flat pool voxels: the class bank (topk
// mode) or the eligible pool that random draws pick from (random mode).
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
// topk mode (topk_pass, in infonce_topk.cpp): tiles of class-sorted anchors against their class
// bank with small GEMMs; nothing of size anchors x K is ever stored, and results are deterministic.
// random mode (random_pass): K Philox draws per anchor, regenerated whenever they are needed.
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
  const bool pool_partials = opt.pool_grad && num_slots > 1;
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
        if (!opt.pool_grad) continue;
        T* dun = my_pool_grad + picked[k] * C;
        for (int64_t ch = 0; ch < C; ++ch) dun[ch] += p1 * u1[ch] + p2 * u2[ch];
      }
      for (int64_t ch = 0; ch < C; ++ch) {
        du1[ch] -= mass * u2[ch];
        du2[ch] -= mass * u1[ch];
      }
      write_input_grad(du1.data(), u1.data(), inv1, clamped1, C, g1->voxel(i), g1->voxels_per_item);
      write_input_grad(du2.data(), u2.data(), inv2, clamped2, C, g2->voxel(i), g2->voxels_per_item);
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

void check_inputs(const Tensor& anchor, const Tensor& positive, const Tensor& pool,
                  const Tensor& labels, const Tensor& neg_index, const Tensor& neg_count) {
  TORCH_CHECK(anchor.dim() == 3 && positive.sizes() == anchor.sizes(),
              "rcps_cpu::voxel_infonce: anchor and positive must be equal (B, C, P), got ",
              anchor.sizes(), " and ", positive.sizes());
  TORCH_CHECK(pool.dim() == 3 && pool.size(1) == anchor.size(1),
              "rcps_cpu::voxel_infonce: pool must be (Bn, C, Pn) with C = ", anchor.size(1),
              ", got ", pool.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.numel() == anchor.size(0) * anchor.size(2),
              "rcps_cpu::voxel_infonce: anchor_labels must be contiguous int64 of B*P elements");
  TORCH_CHECK(
      neg_index.dim() == 2 && neg_index.scalar_type() == at::kLong && neg_index.is_contiguous(),
      "rcps_cpu::voxel_infonce: neg_index must be a contiguous int64 (classes, L) tensor");
  TORCH_CHECK(neg_count.scalar_type() == at::kLong && neg_count.is_contiguous() &&
                  neg_count.numel() == neg_index.size(0),
              "rcps_cpu::voxel_infonce: neg_count must be int64 with one entry per class");
  for (const Tensor* t : {&anchor, &positive, &pool, &labels, &neg_index, &neg_count})
    TORCH_CHECK(t->device().is_cpu(), "rcps_cpu::voxel_infonce: all tensors must be on the CPU");
}

// The kernel in accumulation type T: loss (N,) in T, gradients in the inputs' dtype.
template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> voxel_infonce_impl(
    const Tensor& anchor, const Tensor& positive, const Tensor& pool, const Tensor& anchor_labels,
    const Tensor& neg_index, const Tensor& neg_count, double temperature, int64_t num_negatives,
    bool random, int64_t seed, int64_t offset, const c10::optional<Tensor>& grad_weight,
    double grad_scale, bool pool_grad) {
  constexpr auto kType = c10::CppTypeToScalarType<T>::value;
  const Tensor z1 = anchor.to(kType), z2 = positive.to(kType), zn = pool.to(kType);
  const int64_t B = z1.size(0), C = z1.size(1), P = z1.size(2), N = B * P;
  const int64_t M = zn.size(0) * zn.size(2), num_classes = neg_index.size(0);
  const Tensor weight = grad_weight.has_value() ? grad_weight->to(kType).contiguous() : Tensor();
  const Options<T> opt{static_cast<T>(1.0 / temperature), grad_scale != 0.0,
                       grad_scale != 0.0 && pool_grad, static_cast<T>(grad_scale),
                       weight.defined() ? weight.data_ptr<T>() : nullptr};

  Tensor loss = at::zeros({N}, kType);
  const FeatureMap<T> f1(z1), f2(z2), fn(zn);
  const int64_t rows = opt.want_grad ? B : 0, pool_rows = opt.pool_grad ? zn.size(0) : 0;
  GradMap<T> g1(rows, C, P), g2(rows, C, P), gn(pool_rows, C, zn.size(2));

  if (random) {
    const Draws draws{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), num_negatives};
    // Random draws scatter anywhere in the pool: collect du per pool row, then chain once.
    Tensor pool_du = opt.pool_grad ? at::zeros({M, C}, kType) : Tensor();
    T* pool_du_ptr = pool_du.defined() ? pool_du.data_ptr<T>() : nullptr;
    random_pass(f1, f2, fn, anchor_labels.data_ptr<int64_t>(), neg_index.data_ptr<int64_t>(),
                neg_index.size(1), neg_count.data_ptr<int64_t>(), N, M, draws, opt,
                loss.data_ptr<T>(), &g1, &g2, pool_du_ptr);
    if (opt.pool_grad) pool_input_grad(fn, pool_du_ptr, M, &gn);
  } else {
    topk_pass(f1, f2, fn, anchor_labels.data_ptr<int64_t>(), neg_index.data_ptr<int64_t>(),
              neg_index.size(1), neg_count.data_ptr<int64_t>(), num_classes, N, opt,
              loss.data_ptr<T>(), &g1, &g2, &gn);
  }

  const auto as_output = [](GradMap<T>& g, const Tensor& like) {
    return g.tensor.size(0) > 0 ? g.tensor.to(like.scalar_type()) : at::empty({0}, like.options());
  };
  Tensor grad_anchor = as_output(g1, anchor), grad_positive = as_output(g2, positive),
         grad_pool = as_output(gn, pool);
  return {loss, grad_anchor, grad_positive, grad_pool};
}

// float64 features are computed in double (loss float64); every other dtype in float.
std::tuple<Tensor, Tensor, Tensor, Tensor> voxel_infonce(
    const Tensor& anchor, const Tensor& positive, const Tensor& pool, const Tensor& anchor_labels,
    const Tensor& neg_index, const Tensor& neg_count, double temperature, int64_t num_negatives,
    bool random, int64_t seed, int64_t offset, const c10::optional<Tensor>& grad_weight,
    double grad_scale, bool pool_grad) {
  check_inputs(anchor, positive, pool, anchor_labels, neg_index, neg_count);
  const auto kernel = anchor.scalar_type() == at::kDouble ? &voxel_infonce_impl<double>
                                                          : &voxel_infonce_impl<float>;
  return kernel(anchor, positive, pool, anchor_labels, neg_index, neg_count, temperature,
                num_negatives, random, seed, offset, grad_weight, grad_scale, pool_grad);
}

// The flat pool voxel of every draw, (N, K), -1 where the anchor's class has no eligible
// negative: what random mode uses, for tests and for the reference.
Tensor random_draws(const Tensor& anchor_labels, const Tensor& neg_index, const Tensor& neg_count,
                    int64_t num_negatives, int64_t seed, int64_t offset) {
  TORCH_CHECK(anchor_labels.scalar_type() == at::kLong && neg_index.scalar_type() == at::kLong &&
                  neg_count.scalar_type() == at::kLong,
              "rcps_cpu::random_draws: labels, neg_index and neg_count must be int64");
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
}  // namespace infonce
}  // namespace cpu
}  // namespace rcps

TORCH_LIBRARY_FRAGMENT(rcps_cpu, m) {
  m.def(
      "voxel_infonce(Tensor anchor, Tensor positive, Tensor pool, Tensor anchor_labels, "
      "Tensor neg_index, Tensor neg_count, float temperature, int num_negatives, bool random, "
      "int seed, int offset, Tensor? grad_weight, float grad_scale, bool pool_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      &rcps::cpu::infonce::voxel_infonce);
  m.def(
      "random_draws(Tensor anchor_labels, Tensor neg_index, Tensor neg_count, "
      "int num_negatives, int seed, int offset) -> Tensor",
      &rcps::cpu::infonce::random_draws);
}
