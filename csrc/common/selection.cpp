// Pseudo-labels, confident negative tables and class-sorted anchor order, on any device.
//
// The same ATen sequence as rcps_kernels/selection.py, which stays the readable version and the
// oracle these ops are tested against, element for element. Issued from C++ because at small
// shapes on a GPU the fused loss is bound by the host: every torch call made from Python pays
// its binding on top of dispatch and launch, and selection is a dozen of them. Registered as
// CompositeImplicitAutograd (m.def with a function), so the ops run on CPU and CUDA tensors
// alike and torch.compile traces through them.
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace rcps {
namespace selection {
namespace {

using at::Tensor;

// Argmax class and max softmax probability per voxel, flattened over (B, *S); the softmax runs
// in float32 (float64 for float64 logits). The logits are detached: no gradient flows.
std::tuple<Tensor, Tensor> pseudo_labels(const Tensor& logits) {
  const Tensor x = logits.detach();
  const auto dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto [confidence, labels] = at::softmax(x, 1, dtype).max(1);
  return {labels.reshape({-1}), confidence.reshape({-1})};
}

// topk: per class c, the K most confident pool voxels of another class, most confident first,
// ties to the lower index; -1 past the eligible ones. counts: the valid entries per row.
std::tuple<Tensor, Tensor> topk_tables(const Tensor& labels, const Tensor& confidence,
                                       int64_t num_negatives, int64_t num_classes) {
  const Tensor classes = at::arange(num_classes, labels.options()).unsqueeze(1);
  // Eligible voxels keep their confidence (> 0); the others sort last at -1.
  const Tensor key = at::where(labels.unsqueeze(0) != classes, confidence.unsqueeze(0), -1.0);
  auto [sorted_key, order] =
      key.sort(/*stable=*/std::optional<bool>(true), /*dim=*/1, /*descending=*/true);
  const int64_t take = std::min(num_negatives, key.size(1));
  const Tensor eligible = sorted_key.narrow(1, 0, take) >= 0;
  Tensor index = at::where(eligible, order.narrow(1, 0, take), -1);
  if (take < num_negatives) index = at::constant_pad_nd(index, {0, num_negatives - take}, -1);
  return {index, eligible.sum(1)};
}

// random: per class c, every pool voxel of another class with confidence >= threshold, in
// increasing index order, then -1.
std::tuple<Tensor, Tensor> eligible_tables(const Tensor& labels, const Tensor& confidence,
                                           double threshold, int64_t num_classes) {
  const Tensor classes = at::arange(num_classes, labels.options()).unsqueeze(1);
  const Tensor eligible = (labels.unsqueeze(0) != classes).logical_and_(confidence >= threshold);
  // A stable descending sort of the 0/1 flags puts the eligible voxels first, in index order.
  auto [sorted_flag, order] = eligible.to(at::kByte).sort(/*stable=*/std::optional<bool>(true),
                                                          /*dim=*/1, /*descending=*/true);
  return {order.masked_fill_(sorted_flag == 0, -1), eligible.sum(1)};
}

// Everything the fused kernels need from the logits, in one call: the anchors' pseudo-labels,
// the per-class negative tables of the sampling mode, and the float32 sum of all logits (one
// number that is finite exactly when the logits are, up to overflow, for the finite-input check).
std::tuple<Tensor, Tensor, Tensor, Tensor> negative_tables(const Tensor& anchor_logits,
                                                           const Tensor& pool_logits,
                                                           int64_t num_negatives, bool random,
                                                           double confidence_threshold) {
  TORCH_CHECK(anchor_logits.dim() >= 3 && pool_logits.dim() >= 3 &&
                  anchor_logits.size(1) == pool_logits.size(1),
              "negative_tables: anchor_logits and pool_logits must be (B, num_classes, *S) with "
              "the same num_classes, got ",
              anchor_logits.sizes(), " and ", pool_logits.sizes());
  const int64_t num_classes = anchor_logits.size(1);
  const Tensor anchor_labels = std::get<0>(pseudo_labels(anchor_logits));
  auto [labels, confidence] = pseudo_labels(pool_logits);
  auto [index, counts] =
      random ? eligible_tables(labels, confidence, confidence_threshold, num_classes)
             : topk_tables(labels, confidence, num_negatives, num_classes);
  const Tensor logits_sum =
      anchor_logits.detach().sum(at::kFloat) + pool_logits.detach().sum(at::kFloat);
  return {anchor_labels, index, counts, logits_sum};
}

// Anchors sorted by class (stable) and where each class starts in that order: the tiles of the
// Triton top-K kernels. A narrow key makes the GPU radix sort take 1-2 passes, not 8.
std::tuple<Tensor, Tensor> anchor_class_order(const Tensor& labels, int64_t num_classes) {
  const auto key_type = num_classes < (1 << 15) ? at::kShort : at::kInt;
  auto [sorted_labels, order] =
      labels.to(key_type).sort(/*stable=*/std::optional<bool>(true), /*dim=*/0);
  const Tensor bounds = at::arange(num_classes + 1, sorted_labels.options());
  return {order, at::searchsorted(sorted_labels, bounds)};  // class_start[-1] == N
}

}  // namespace
}  // namespace selection
}  // namespace rcps

TORCH_LIBRARY_FRAGMENT(rcps_cpu, m) {
  m.def(
      "negative_tables(Tensor anchor_logits, Tensor pool_logits, int num_negatives, "
      "bool random, float confidence_threshold) -> (Tensor, Tensor, Tensor, Tensor)",
      &rcps::selection::negative_tables);
  m.def("anchor_class_order(Tensor labels, int num_classes) -> (Tensor, Tensor)",
        &rcps::selection::anchor_class_order);
}
