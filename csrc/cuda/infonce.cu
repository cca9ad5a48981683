// Fused bidirectional voxel InfoNCE on CUDA: forward, and gradients for any per-anchor weights.
//
// Same kernel signature and semantics as csrc/cpu/infonce.cpp (read it for the maths); the
// arithmetic shared with the CPU (normalisation and its chain rule, online log-sum-exp, Philox
// draws and their mapping onto the eligible list) comes from csrc/common/rcps_math.h.
//
// Inputs are read as fp32 (fp16/bf16/fp64 are converted once), everything accumulates in fp32,
// and the gradients are written in the input dtype. Flat offsets are int64.
//
// topk mode, anchors stable-sorted by class and tiled (kTileM anchors of one class per block,
// device-side tile map, no host sync):
//   normalise_rows    one warp per row: fp32 normalised copies (sorted anchors, positives, banks)
//   topk_lse          per tile, bank blocks of 32 rows in shared memory; warp w owns anchor rows
//                     w, w+8, ..., lane n the bank row n: dot products, warp max/sum, lse_merge
//   topk_anchor_grad  the same loop, softmax weights, dU += P N_c through shuffles into shared
//                     du rows owned by one warp, then the normalisation chain into (B, C, P)
//   topk_bank_grad    per (class, 32-row bank block, anchor split): P^T U accumulated in shared
//                     memory where each (row, channel) belongs to one thread: no atomics
//   bank_scatter      per class in class order: pool_grad[j] += sum over splits (deterministic)
//   pool_chain        the pool gradient through the pool's normalisation into (Bn, C, Pn)
// random mode: one warp per anchor, lane k holds draw k of a 32-draw chunk (Philox counters of
// csrc/common/rcps_math.h, regenerated in the backward pass); pool gradient by fp32 atomicAdd,
// or, when deterministic, by int64 fixed-point atomicAdd (bitwise reproducible, see
// infonce_triton.py).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "../common/rcps_math.h"
#include "infonce_kernels.cuh"

namespace rcps {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
// Shared memory one block may opt into: at most 96 KB (the tiles' design size), and never more
// than the GPU allows (64 KB on Turing, 7.5; 99 KB on 8.6/8.9; more on 8.0, 9.0 and later).
size_t max_smem() {
  const size_t device_limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  return device_limit < 96 * 1024 ? device_limit : 96 * 1024;
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

size_t topk_smem(int TM, int C) {
  const size_t grad = (4 * TM * C + kTileN * (C + 1)) * sizeof(float);
  const size_t bank =
      (kTileN * (C + 1) + kTileN * C + 2 * TM * C + 2 * TM * (kTileN + 1)) * sizeof(float);
  return grad > bank ? grad : bank;
}

Tensor normalise(const Tensor& z, const Tensor* rows, int64_t R, Tensor* norm) {
  const int64_t C = z.size(1);
  Tensor u = at::empty({R, C}, z.options().dtype(at::kFloat));
  if (norm) *norm = at::empty({R}, z.options().dtype(at::kFloat));
  if (R == 0) return u;
  const auto stream = at::cuda::getCurrentCUDAStream();
  normalise_rows_kernel<<<static_cast<unsigned>((R + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
      z.data_ptr<float>(), rows ? rows->data_ptr<int64_t>() : nullptr, u.data_ptr<float>(),
      norm ? norm->data_ptr<float>() : nullptr, R, static_cast<int>(C), z.size(2), z.stride(0),
      z.stride(1), z.stride(2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return u;
}

template <typename acc_t>
Tensor pool_input_grad(const Tensor& zn, const Tensor& pool_grad, double descale,
                       at::ScalarType out_type) {
  const int64_t Bn = zn.size(0), C = zn.size(1), Pn = zn.size(2), M = Bn * Pn;
  Tensor out = at::empty({Bn, C, Pn}, zn.options().dtype(out_type));
  if (M == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const size_t smem = 2 * kWarps * C * sizeof(float);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_type, "pool_chain", [&] {
    auto kernel = pool_chain_kernel<scalar_t, acc_t>;
    allow_smem(kernel, smem);
    kernel<<<static_cast<unsigned>((M + kWarps - 1) / kWarps), kThreads, smem, stream>>>(
        zn.data_ptr<float>(), pool_grad.data_ptr<acc_t>(), descale, out.data_ptr<scalar_t>(), M,
        static_cast<int>(C), Pn, zn.stride(0), zn.stride(1), zn.stride(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> topk_mode(
    const Tensor& z1, const Tensor& z2, const Tensor& zn, const Tensor& labels,
    const Tensor& neg_index, const Tensor& neg_count, float inv_tau, const Tensor& weight,
    float grad_scale, bool want_grad, bool neg_grad, at::ScalarType a_type, at::ScalarType n_type) {
  const int64_t B = z1.size(0), C = z1.size(1), P = z1.size(2), N = B * P;
  const int64_t num_classes = neg_index.size(0), L = neg_index.size(1);
  const auto opts = z1.options();
  const auto stream = at::cuda::getCurrentCUDAStream();
  int TM = 32;
  while (TM > kWarps && topk_smem(TM, C) > 48 * 1024) TM /= 2;
  const size_t smem = topk_smem(TM, C);
  TORCH_CHECK(smem <= max_smem(), "rcps_cuda::voxel_infonce: C = ", C,
              " channels is too many for the CUDA kernel's shared-memory tiles on this GPU "
              "(use backend='triton' or 'torch')");

  // Stable sort by class and a device-side tile map (no host sync).
  const Tensor order = std::get<1>(at::sort(labels, /*stable=*/true, /*dim=*/0, false));
  const Tensor sorted = labels.index_select(0, order);
  const Tensor bounds = at::arange(num_classes + 1, labels.options());
  const Tensor class_start = at::searchsorted(sorted, bounds);
  const Tensor counts = class_start.slice(0, 1) - class_start.slice(0, 0, num_classes);
  const Tensor tiles = at::floor_divide(counts + (TM - 1), TM);
  const Tensor tile_end = at::cumsum(tiles, 0);
  const int64_t num_tiles = (N + TM - 1) / TM + num_classes;
  const Tensor t = at::arange(num_tiles, labels.options());
  Tensor tcls = at::searchsorted(tile_end, t, /*out_int32=*/false, /*right=*/true);
  const Tensor valid = tcls < num_classes;
  tcls = tcls.clamp_max(num_classes - 1);
  const Tensor zero = at::zeros({}, labels.options());
  const Tensor row0 = at::where(valid,
                                class_start.index_select(0, tcls) +
                                    (t - (tile_end - tiles).index_select(0, tcls)) * TM,
                                zero)
                          .contiguous();
  const Tensor tend = at::where(valid, class_start.index_select(0, tcls + 1), zero).contiguous();
  tcls = tcls.contiguous();
  const TileMap map{tcls.data_ptr<int64_t>(), row0.data_ptr<int64_t>(), tend.data_ptr<int64_t>()};

  Tensor norm1, norm2;
  const Tensor u1 = normalise(z1, &order, N, &norm1);
  const Tensor u2 = normalise(z2, &order, N, &norm2);
  const Tensor flat_index = neg_index.reshape({-1});
  const Tensor bank = normalise(zn, &flat_index, num_classes * L, nullptr);
  Tensor loss = at::empty({N}, opts.dtype(at::kFloat));
  // Each row's log-normaliser as an (anchor, rel) pair (rcps_math.h positive_nll).
  Tensor lse1 = at::empty({N, 2}, opts.dtype(at::kFloat));
  Tensor lse2 = at::empty({N, 2}, opts.dtype(at::kFloat));
  const int Ci = static_cast<int>(C);
  allow_smem(topk_lse_kernel, smem);
  topk_lse_kernel<<<static_cast<unsigned>(num_tiles), kThreads, smem, stream>>>(
      u1.data_ptr<float>(), u2.data_ptr<float>(), bank.data_ptr<float>(), map,
      neg_count.data_ptr<int64_t>(), order.data_ptr<int64_t>(), lse1.data_ptr<float>(),
      lse2.data_ptr<float>(), loss.data_ptr<float>(), Ci, L, TM, inv_tau);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!want_grad) return {loss, Tensor(), Tensor(), Tensor()};

  const float* w = weight.defined() ? weight.data_ptr<float>() : nullptr;
  Tensor g1 = at::empty({B, C, P}, opts.dtype(a_type)),
         g2 = at::empty({B, C, P}, opts.dtype(a_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a_type, "topk_anchor_grad", [&] {
    auto kernel = topk_anchor_grad_kernel<scalar_t>;
    allow_smem(kernel, smem);
    kernel<<<static_cast<unsigned>(num_tiles), kThreads, smem, stream>>>(
        u1.data_ptr<float>(), u2.data_ptr<float>(), norm1.data_ptr<float>(),
        norm2.data_ptr<float>(), bank.data_ptr<float>(), map, neg_count.data_ptr<int64_t>(),
        order.data_ptr<int64_t>(), lse1.data_ptr<float>(), lse2.data_ptr<float>(), w, grad_scale,
        g1.data_ptr<scalar_t>(), g2.data_ptr<scalar_t>(), Ci, P, L, TM, inv_tau);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!neg_grad) return {loss, g1, g2, Tensor()};

  const int64_t M = zn.size(0) * zn.size(2);
  Tensor pool_grad = at::zeros({M, C}, opts.dtype(at::kFloat));
  const int64_t nblocks = (L + kTileN - 1) / kTileN;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t split = (2 * sms) / std::max<int64_t>(1, num_classes * nblocks);
  split = std::max<int64_t>(
      1, std::min<int64_t>({split, 32, (N + 4 * TM * num_classes - 1) / (4 * TM * num_classes)}));
  Tensor partial = at::empty({split, num_classes, L, C}, opts.dtype(at::kFloat));
  allow_smem(topk_bank_grad_kernel, smem);
  topk_bank_grad_kernel<<<dim3(static_cast<unsigned>(num_classes), static_cast<unsigned>(nblocks),
                               static_cast<unsigned>(split)),
                          kThreads, smem, stream>>>(
      u1.data_ptr<float>(), u2.data_ptr<float>(), bank.data_ptr<float>(),
      class_start.data_ptr<int64_t>(), neg_count.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
      lse1.data_ptr<float>(), lse2.data_ptr<float>(), w, grad_scale, partial.data_ptr<float>(), Ci,
      L, num_classes, static_cast<int>(split), TM, inv_tau);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int64_t c = 0; c < num_classes; ++c) {  // class order: deterministic where banks overlap
    const int64_t total = L * C;
    bank_scatter_kernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(
        partial.data_ptr<float>(), neg_index.data_ptr<int64_t>(), neg_count.data_ptr<int64_t>(),
        pool_grad.data_ptr<float>(), c, Ci, L, num_classes, static_cast<int>(split));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {loss, g1, g2, pool_input_grad<float>(zn, pool_grad, 1.0, n_type)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> random_mode(
    const Tensor& z1, const Tensor& z2, const Tensor& zn, const Tensor& labels,
    const Tensor& neg_index, const Tensor& neg_count, float inv_tau, int64_t K, int64_t seed,
    int64_t offset, const Tensor& weight, float grad_scale, bool want_grad, bool neg_grad,
    bool deterministic, at::ScalarType a_type, at::ScalarType n_type) {
  const int64_t B = z1.size(0), C = z1.size(1), P = z1.size(2), N = B * P;
  const int64_t M = zn.size(0) * zn.size(2);
  const auto opts = z1.options();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const Tensor un = normalise(zn, nullptr, M, nullptr);
  Tensor loss = at::empty({N}, opts.dtype(at::kFloat));
  RandomArgs a{z1.data_ptr<float>(),
               z2.data_ptr<float>(),
               z1.stride(0),
               z1.stride(1),
               z1.stride(2),
               z2.stride(0),
               z2.stride(1),
               z2.stride(2),
               un.data_ptr<float>(),
               labels.data_ptr<int64_t>(),
               neg_index.data_ptr<int64_t>(),
               neg_count.data_ptr<int64_t>(),
               loss.data_ptr<float>(),
               weight.defined() ? weight.data_ptr<float>() : nullptr,
               grad_scale,
               N,
               P,
               neg_index.size(1),
               K,
               static_cast<int>(C),
               static_cast<uint64_t>(seed),
               static_cast<uint64_t>(offset),
               inv_tau,
               neg_grad,
               0.f};
  const size_t smem = 4 * kWarps * C * sizeof(float);
  const unsigned blocks = static_cast<unsigned>((N + kWarps - 1) / kWarps);
  if (!want_grad) {
    auto kernel = random_kernel<float, float, false>;
    allow_smem(kernel, smem);
    kernel<<<blocks, kThreads, smem, stream>>>(a, nullptr, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {loss, Tensor(), Tensor(), Tensor()};
  }
  Tensor g1 = at::empty({B, C, P}, opts.dtype(a_type)),
         g2 = at::empty({B, C, P}, opts.dtype(a_type));
  Tensor pool_grad;
  double descale = 1.0;
  const bool fixed = neg_grad && deterministic;
  if (fixed) {
    // Bound of the whole pool gradient: unit = 2 sum_i |w_i| / tau (see infonce_triton.py).
    // One host sync for the weights' sum; the result is bitwise identical run to run.
    const double wsum =
        weight.defined() ? weight.abs().sum().item<double>() : static_cast<double>(N);
    const double unit =
        std::max(2.0 * std::abs(static_cast<double>(grad_scale)) * inv_tau * wsum, 1e-30);
    a.qscale = static_cast<float>(std::min(std::ldexp(1.0, 61) / unit, 1e38));
    descale = 1.0 / static_cast<double>(a.qscale);
    pool_grad = at::zeros({M, C}, opts.dtype(at::kLong));
  } else {
    pool_grad = at::zeros({neg_grad ? M : 0, C}, opts.dtype(at::kFloat));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a_type, "random_grad", [&] {
    if (fixed) {
      auto kernel = random_kernel<scalar_t, int64_t, true>;
      allow_smem(kernel, smem);
      kernel<<<blocks, kThreads, smem, stream>>>(
          a, g1.data_ptr<scalar_t>(), g2.data_ptr<scalar_t>(), pool_grad.data_ptr<int64_t>());
    } else {
      auto kernel = random_kernel<scalar_t, float, true>;
      allow_smem(kernel, smem);
      kernel<<<blocks, kThreads, smem, stream>>>(
          a, g1.data_ptr<scalar_t>(), g2.data_ptr<scalar_t>(), pool_grad.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!neg_grad) return {loss, g1, g2, Tensor()};
  Tensor gn = fixed ? pool_input_grad<int64_t>(zn, pool_grad, descale, n_type)
                    : pool_input_grad<float>(zn, pool_grad, 1.0, n_type);
  return {loss, g1, g2, gn};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> voxel_infonce(
    const Tensor& anchor, const Tensor& positive, const Tensor& pool, const Tensor& anchor_labels,
    const Tensor& neg_index, const Tensor& neg_count, double temperature, int64_t num_negatives,
    bool random, int64_t seed, int64_t offset, const c10::optional<Tensor>& grad_weight,
    double grad_scale, bool pool_grad, bool deterministic) {
  TORCH_CHECK(anchor.dim() == 3 && positive.sizes() == anchor.sizes(),
              "rcps_cuda::voxel_infonce: anchor and positive must be equal (B, C, P), got ",
              anchor.sizes(), " and ", positive.sizes());
  TORCH_CHECK(pool.dim() == 3 && pool.size(1) == anchor.size(1),
              "rcps_cuda::voxel_infonce: pool must be (Bn, C, Pn) with C = ", anchor.size(1),
              ", got ", pool.sizes());
  TORCH_CHECK(neg_index.dim() == 2 && neg_count.numel() == neg_index.size(0),
              "rcps_cuda::voxel_infonce: neg_index must be (classes, L) with one neg_count per "
              "class");
  TORCH_CHECK(anchor_labels.numel() == anchor.size(0) * anchor.size(2),
              "rcps_cuda::voxel_infonce: anchor_labels must have B*P elements");
  for (const Tensor* t : {&anchor, &positive, &pool})
    TORCH_CHECK(t->is_cuda(), "rcps_cuda::voxel_infonce: feature tensors must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(anchor.device());
  const auto dev = anchor.device();
  const Tensor z1 = anchor.to(at::kFloat), z2 = positive.to(at::kFloat), zn = pool.to(at::kFloat);
  const Tensor labels = anchor_labels.to(dev, at::kLong).contiguous();
  const Tensor index = neg_index.to(dev, at::kLong).contiguous();
  const Tensor count = neg_count.to(dev, at::kLong).contiguous();
  const bool want_grad = grad_scale != 0.0, neg_grad = want_grad && pool_grad;
  Tensor weight;
  if (want_grad && grad_weight.has_value() && grad_weight->defined())
    weight = grad_weight->to(dev, at::kFloat).contiguous();
  const int64_t N = anchor.size(0) * anchor.size(2);
  const float inv_tau = static_cast<float>(1.0 / temperature);
  Tensor loss, g1, g2, gn;
  if (N == 0 || index.size(0) == 0) {
    loss = at::zeros({N}, anchor.options().dtype(at::kFloat));
    if (want_grad) {
      g1 = at::zeros(anchor.sizes(), anchor.options());
      g2 = at::zeros(anchor.sizes(), anchor.options());
    }
    if (neg_grad) gn = at::zeros(pool.sizes(), pool.options());
  } else if (random) {
    std::tie(loss, g1, g2, gn) =
        random_mode(z1, z2, zn, labels, index, count, inv_tau, num_negatives, seed, offset, weight,
                    static_cast<float>(grad_scale), want_grad, neg_grad, deterministic,
                    anchor.scalar_type(), pool.scalar_type());
  } else {
    std::tie(loss, g1, g2, gn) =
        topk_mode(z1, z2, zn, labels, index, count, inv_tau, weight, static_cast<float>(grad_scale),
                  want_grad, neg_grad, anchor.scalar_type(), pool.scalar_type());
  }
  if (!g1.defined()) g1 = at::empty({0}, anchor.options());
  if (!g2.defined()) g2 = at::empty({0}, anchor.options());
  if (!gn.defined()) gn = at::empty({0}, pool.options());
  return {loss, g1, g2, gn};
}

// (N, K) flat pool voxels of every random draw, as random_kernel picks them (tests).
__global__ void random_draws_kernel(const int64_t* labels, const int64_t* neg_index,
                                    const int64_t* neg_count, int64_t* out, int64_t N, int64_t K,
                                    int64_t L, uint64_t seed, uint64_t offset) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= N * K) return;
  const int64_t i = e / K, k = e - i * K;
  const int64_t cls = labels[i], n = neg_count[cls];
  if (n == 0) {
    out[e] = -1;
    return;
  }
  const uint32_t r = philox_randint(seed, draw_counter(i, K, k, offset));
  out[e] = neg_index[cls * L + draw_to_index(r, n)];
}

Tensor random_draws(const Tensor& anchor_labels, const Tensor& neg_index, const Tensor& neg_count,
                    int64_t num_negatives, int64_t seed, int64_t offset) {
  TORCH_CHECK(anchor_labels.is_cuda(),
              "rcps_cuda::random_draws: anchor_labels must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(anchor_labels.device());
  const auto dev = anchor_labels.device();
  const Tensor labels = anchor_labels.to(at::kLong).contiguous();
  const Tensor index = neg_index.to(dev, at::kLong).contiguous();
  const Tensor count = neg_count.to(dev, at::kLong).contiguous();
  const int64_t N = labels.numel(), K = num_negatives;
  Tensor out = at::empty({N, K}, labels.options());
  if (N * K == 0) return out;
  random_draws_kernel<<<static_cast<unsigned>((N * K + 255) / 256), 256, 0,
                        at::cuda::getCurrentCUDAStream()>>>(
      labels.data_ptr<int64_t>(), index.data_ptr<int64_t>(), count.data_ptr<int64_t>(),
      out.data_ptr<int64_t>(), N, K, index.size(1), static_cast<uint64_t>(seed),
      static_cast<uint64_t>(offset));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace rcps

TORCH_LIBRARY_FRAGMENT(rcps_cuda, m) {
  m.def(
      "voxel_infonce(Tensor anchor, Tensor positive, Tensor pool, Tensor anchor_labels, "
      "Tensor neg_index, Tensor neg_count, float temperature, int num_negatives, bool random, "
      "int seed, int offset, Tensor? grad_weight, float grad_scale, bool pool_grad, "
      "bool deterministic) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "random_draws(Tensor anchor_labels, Tensor neg_index, Tensor neg_count, "
      "int num_negatives, int seed, int offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(rcps_cuda, CUDA, m) {
  m.impl("voxel_infonce", &rcps::cuda::voxel_infonce);
  m.impl("random_draws", &rcps::cuda::random_draws);
}
