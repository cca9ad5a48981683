"""Public functional API of the bidirectional voxel InfoNCE (docs/design.md section 2)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _validation as v
from ._backend import resolve_backend
from .ops import infonce as ops
from .reference.infonce import bidirectional_voxel_infonce_reference
from .selection import eligible_negatives, logits_sum, negative_tables, pseudo_labels

SAMPLING_MODES = ("topk", "random")
_BACKENDS = ("cpu", "triton", "cuda", "reference")
#: Smallest temperature served (2**-125, about 2.35e-38): a per-anchor loss reaches 4 / temperature,
#: which overflows float32 below it. Every backend is exact down to it.
MIN_TEMPERATURE = 2.0**-125


def _validate(anchor, positive, negative, anchor_logits, negative_logits, num_negatives,
              temperature, sampling, confidence_threshold, generator, reduction,
              deterministic) -> None:
    for name, t in (("anchor", anchor), ("positive", positive), ("negative", negative),
                    ("anchor_logits", anchor_logits), ("negative_logits", negative_logits)):
        v.check_volume(name, t)
    v.check_same_device(anchor=anchor, positive=positive, negative=negative,
                        anchor_logits=anchor_logits, negative_logits=negative_logits)
    if positive.shape != anchor.shape:
        raise ValueError(f"positive must have anchor's shape {v.shape_str(anchor)}, "
                         f"got {v.shape_str(positive)}")
    if positive.dtype != anchor.dtype or negative.dtype != anchor.dtype:
        raise ValueError(f"anchor, positive and negative must share a dtype, got {anchor.dtype}, "
                         f"{positive.dtype} and {negative.dtype}")
    if negative.dim() != anchor.dim() or negative.shape[1] != anchor.shape[1]:
        raise ValueError(f"negative must be (Bn, C, *S) with anchor's C={anchor.shape[1]} and "
                         f"{anchor.dim() - 2} spatial dims, got {v.shape_str(negative)}")
    if anchor_logits.shape[0] != anchor.shape[0] or anchor_logits.shape[2:] != anchor.shape[2:]:
        raise ValueError(f"anchor_logits must be (B, K_cls, *S) matching anchor "
                         f"{v.shape_str(anchor)}, got {v.shape_str(anchor_logits)}")
    if negative_logits.shape[0] != negative.shape[0] or negative_logits.shape[2:] != negative.shape[2:]:
        raise ValueError(f"negative_logits must be (Bn, K_cls, *S) matching negative "
                         f"{v.shape_str(negative)}, got {v.shape_str(negative_logits)}")
    if negative_logits.shape[1] != anchor_logits.shape[1]:
        raise ValueError(f"anchor_logits and negative_logits must have the same number of classes, "
                         f"got {v.shape_str(anchor_logits)} and {v.shape_str(negative_logits)}")
    if anchor_logits.shape[1] < 2:
        raise ValueError(f"anchor_logits needs at least 2 classes, got {v.shape_str(anchor_logits)}")
    v.check_count("num_negatives", num_negatives)
    v.check_positive_real("temperature", temperature)
    if temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {MIN_TEMPERATURE:.4g} (2**-125), got "
                         f"{temperature!r}: the loss reaches 4 / temperature, beyond float32")
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    if not 0.0 <= confidence_threshold <= 1.0:
        raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold!r}")
    v.check_generator(generator)
    v.check_reduction(reduction)
    v.check_optional_bool("deterministic", deterministic)


def _draw_seed(generator: torch.Generator | None) -> int:
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


def bidirectional_voxel_infonce(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    anchor_logits: Tensor,
    negative_logits: Tensor,
    *,
    num_negatives: int = 400,
    temperature: float = 0.1,
    sampling: str = "topk",
    confidence_threshold: float = 0.0,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    deterministic: bool | None = None,
) -> Tensor:
    """Bidirectional voxel InfoNCE with confident negative sampling (RCPS's L_bc).

    Every voxel of `anchor` is an anchor; its positive is the same voxel of `positive`; its
    negatives come from the pool `negative` (the other image's un-augmented view), chosen by the
    pseudo-labels of the logits. Per anchor i of pseudo-class c, with u = z / max(||z||, 1e-12)
    and s_i = u1_i . u2_i::

        l1_i = -s_i/tau + log(exp(s_i/tau) + sum_{n in N_c} exp(u1_i . u_n / tau))
        l2_i = -s_i/tau + log(exp(s_i/tau) + sum_{n in N_c} exp(u2_i . u_n / tau))

    ``sampling="topk"`` (official): N_c is the K most confident pool voxels whose pseudo-class is
    not c, shared by all anchors of class c. Unlike the official code, when fewer than K are
    eligible only those are used (no same-class "negatives"); an anchor with none gets l = 0.
    ``sampling="random"``: each anchor draws K negatives uniformly, with replacement, from the
    pool voxels of another class whose confidence is >= confidence_threshold (counter-based
    Philox draws keyed by a seed from `generator`, regenerated in backward, never stored).

    Gradients flow into anchor, positive and negative; none into the logits. Zero-norm features
    are allowed (u = 0). Memory of the fused backends is O(anchors * C), independent of K.

    Args:
        anchor: (B, C, *S) projections of augmented view 1 (1-3 spatial dims).
        positive: (B, C, *S) projections of augmented view 2.
        negative: (Bn, C, *Sn) projections of the negative pool.
        anchor_logits: (B, K_cls, *S) logits giving the anchors' pseudo-labels.
        negative_logits: (Bn, K_cls, *Sn) logits giving the pool's pseudo-labels and confidences.
        num_negatives: K, negatives per anchor.
        temperature: tau >= 2**-125 (~2.35e-38): below it the float32 loss, up to 4 / tau per
            anchor, would overflow.
        sampling: "topk" or "random".
        confidence_threshold: "random" only, minimum max-softmax confidence of a negative.
        generator: seeds "random" sampling (default: torch's global generator).
        reduction: "mean" (mean_i l1_i + mean_i l2_i), "sum", or "none" (l1 + l2, shape (B, *S)).
            The fused "mean" path computes its gradient in forward and scales it in place in
            backward, so its graph takes one backward: for ``retain_graph=True`` or
            ``torch.autograd.gradcheck`` use "sum" or "none".
        backend: "auto", "cpu", "triton", "cuda" or "reference".
        deterministic: "random" sampling on a GPU adds the pool gradient with float atomics
            unless it runs deterministically (int64 fixed-point atomics, bitwise reproducible).
            None (default) follows ``torch.are_deterministic_algorithms_enabled()`` when the
            kernel runs (``torch.use_deterministic_algorithms(True)`` turns it on); True or
            False forces it for this call. topk mode and the CPU kernels are always
            deterministic.

    Returns:
        The loss: a scalar, or (B, *S) for reduction="none"; float32 for float16/bfloat16/float32
        inputs, float64 for float64 inputs. Meta tensors give a result of the right shape and
        dtype (nothing is computed).

    Raises:
        TypeError: num_negatives not an int (a bool is refused), temperature not a real number,
            generator not a torch.Generator, deterministic not a bool or None.
        ValueError: bad shapes, dtypes, devices or values, NaN/Inf logits, or NaN/Inf
            features that reach the loss (names the argument; a non-finite pool voxel that is
            never selected as a negative does not affect the result and is not reported).
        RuntimeError: an explicitly requested backend that is not usable here.
    """
    anchor, positive, negative, anchor_logits, negative_logits = v.plain_tensors(
        anchor, positive, negative, anchor_logits, negative_logits)
    _validate(anchor, positive, negative, anchor_logits, negative_logits, num_negatives,
              temperature, sampling, confidence_threshold, generator, reduction, deterministic)
    impl = resolve_backend(backend, anchor.device, _BACKENDS)
    seed = _draw_seed(generator) if sampling == "random" else 0
    if impl == "reference":
        tables, logits_total = None, logits_sum(anchor_logits, negative_logits)
    else:
        *tables, logits_total = negative_tables(anchor_logits, negative_logits, num_negatives,
                                                sampling == "random", confidence_threshold)
    # Finite logits and features make a finite loss unless the temperature is so small that the
    # sum over anchors can overflow, so one host sync before the kernels settles the usual case,
    # and the kernels run on while the host returns. Otherwise the exact check runs on the loss: a
    # bad feature always reaches it, while a NaN pool voxel that is never selected does not and is
    # not reported.
    inputs_finite = v.all_finite(logits_total, (anchor, positive, negative))
    loss = _infonce(impl, tables, anchor, positive, negative, anchor_logits, negative_logits,
                    num_negatives, temperature, sampling, confidence_threshold, seed, reduction,
                    deterministic)
    if not inputs_finite or _loss_may_overflow(loss.dtype, anchor_logits, num_negatives, temperature):
        v.check_result_finite(loss, (("anchor_logits", anchor_logits, False),
                                     ("negative_logits", negative_logits, False),
                                     ("anchor", anchor, False), ("positive", positive, False),
                                     ("negative", negative, False)),
                              inputs_sum=None if inputs_finite else logits_total,
                              remedy="raise the temperature, or pass float64 features")
    return loss


def _loss_may_overflow(dtype: torch.dtype, anchor_logits: Tensor, num_negatives: int,
                       temperature: float) -> bool:
    # |u1 . u| <= 1, so each direction's per-anchor loss is at most 2 / temperature + log(K + 1),
    # and a sum or mean over N anchors adds N of them before dividing. A quarter of the dtype's
    # range leaves room for the partial sums of either direction.
    num_anchors = anchor_logits.numel() // max(anchor_logits.shape[1], 1)
    bound = num_anchors * 2 * (2.0 / temperature + math.log1p(num_negatives))
    return bound >= torch.finfo(dtype).max / 4


def _infonce(impl, tables, anchor, positive, negative, anchor_logits, negative_logits,
             num_negatives, temperature, sampling, confidence_threshold, seed, reduction,
             deterministic) -> Tensor:
    out_dtype = v.accumulation_dtype(anchor.dtype)
    if impl == "reference":
        return bidirectional_voxel_infonce_reference(
            anchor, positive, negative, anchor_logits, negative_logits,
            num_negatives=num_negatives, temperature=temperature, sampling=sampling,
            confidence_threshold=confidence_threshold, seed=seed, reduction=reduction,
        ).to(out_dtype)  # float32 for half inputs, as the fused backends return
    anchor_labels, neg_index, neg_count = tables
    # (B, C, P) views (copies only for layouts that cannot be flattened); kernels take any strides.
    z1 = anchor.reshape(anchor.shape[0], anchor.shape[1], -1)
    z2 = positive.reshape(z1.shape)
    zn = negative.reshape(negative.shape[0], negative.shape[1], -1)
    args = (z1, z2, zn, anchor_labels, neg_index, neg_count, float(temperature), num_negatives,
            sampling == "random", seed, 0, impl)
    wants_grad = torch.is_grad_enabled() and (
        anchor.requires_grad or positive.requires_grad or negative.requires_grad
    )
    if reduction == "mean" and wants_grad:
        loss, _, _, _ = ops.mean_loss_with_grads(*args, negative.requires_grad, deterministic)
        return loss
    per_anchor = ops.per_anchor_loss(*args, deterministic)
    if reduction == "mean":
        return per_anchor.mean()
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor.reshape(anchor.shape[0], *anchor.shape[2:])


def random_negative_draws(
    anchor_logits: Tensor,
    negative_logits: Tensor,
    *,
    num_negatives: int,
    seed: int,
    confidence_threshold: float = 0.0,
    offset: int = 0,
) -> Tensor:
    """The negatives that "random" sampling draws for each anchor, for inspection and tests.

    Returns:
        (B * prod(S), K) int64 flat pool voxels (-1 where the anchor's class has no eligible
        negative), computed by the CPU kernel's Philox generator.
    """
    anchor_logits, negative_logits = v.plain_tensors(anchor_logits, negative_logits)
    num_classes = anchor_logits.shape[1]
    labels, _ = pseudo_labels(anchor_logits)
    idx, counts = eligible_negatives(negative_logits, confidence_threshold, num_classes)
    return ops.random_draws(labels, idx, counts, num_negatives, seed, offset)
