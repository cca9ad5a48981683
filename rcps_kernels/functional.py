"""The public functions: the voxel InfoNCE, negative selection and the pseudo-supervision losses.

Every function takes MONAI-style ``(B, C, *spatial)`` tensors (1-3 spatial dims), checks its
inputs (``validation``), picks a backend (``backend=``, one of :data:`rcps_kernels.backends.NAMES`)
and calls the op in ``ops/`` or the float64-exact reference in ``reference/``. L_urp and L_cr are
per-voxel, so their plain formulas (``reference/``) already need memory linear in the logits, with
no K factor: a backend whose kernel table has no pseudo-supervision kernels (``torch``) runs those.
The losses' semantics and gradients are in docs/design.md sections 2 and 3.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import backends
from . import validation as v
from .ops import infonce as infonce_ops
from .ops import pseudo_supervision as pseudo_supervision_ops
from .ops.kernels import InfoNCEParams
from .ops.selection import eligible_negatives, logits_sum, negative_tables, pseudo_labels, topk_negatives
from .reference.infonce import bidirectional_voxel_infonce_reference
from .reference.pseudo_supervision import (
    logit_cosine_consistency_reference,
    rectified_pseudo_supervision_reference,
)
from .validation import MIN_TEMPERATURE, SAMPLING_MODES  # noqa: F401  (public constants)


def _resolve_on(backend: str, tensor: Tensor) -> str:
    """The concrete backend for `tensor` (a constant under torch.compile: see resolve_backend)."""
    return backends.resolve_backend(backend, tensor.device)


# Evaluated eagerly while torch.compile traces, as resolve_backend: building a kernel table imports modules.
@torch.compiler.assume_constant_result
def _runs_formulas(backend: str) -> bool:
    """Whether `backend` computes L_urp and L_cr with the plain formulas of reference/ (no kernel
    table, or one without pseudo-supervision kernels)."""
    return backends.BY_NAME[backend].kernels is None or not backends.kernel_table(backend).fuses_pseudo_supervision


def _runs_reference(backend: str) -> bool:
    """Whether `backend` is the float64-exact oracle (no kernel table): the InfoNCE then runs reference/."""
    return backends.BY_NAME[backend].kernels is None


def _flat(logits: Tensor) -> Tensor:
    """(B, C, *S) -> (B, C, P), a view unless the spatial dims cannot be merged. The ops take
    these views: under torch.compile a graph input then reaches a custom op as a new view, never
    as the caller's object, which may be a tensor subclass (MONAI MetaTensor)."""
    return logits.reshape(logits.shape[0], logits.shape[1], -1)


def _spatial(loss: Tensor, logits: Tensor, reduction: str) -> Tensor:
    """An op's (B, P) loss map back to (B, *S); scalars as they are."""
    return loss.view(logits.shape[0], *logits.shape[2:]) if reduction == "none" else loss


# --------------------------------------------------------------------------------------------
# Bidirectional voxel InfoNCE and confident negative selection
# --------------------------------------------------------------------------------------------
def _draw_seed(generator: torch.Generator | None) -> int:
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


@v.renamed_keywords(negative="pool", negative_logits="pool_logits")
def bidirectional_voxel_infonce(
    anchor: Tensor,
    positive: Tensor,
    pool: Tensor,
    anchor_logits: Tensor,
    pool_logits: Tensor,
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
    negatives come from `pool` (the other image's un-augmented view), chosen by the
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

    Gradients flow into anchor, positive and pool; none into the logits. Zero-norm features
    are allowed (u = 0). Memory of the fused backends is O(anchors * C), independent of K; of
    "torch" (plain PyTorch, any device) O(anchors * C) plus one bounded tile; "reference"
    materialises anchors x K x C.

    Args:
        anchor: (B, C, *S) projections of augmented view 1 (1-3 spatial dims).
        positive: (B, C, *S) projections of augmented view 2.
        pool: (Bn, C, *Sn) projections of the negative pool (every voxel a candidate negative).
            Until the next release it may also be passed as ``negative=`` (deprecated).
        anchor_logits: (B, num_classes, *S) logits giving the anchors' pseudo-labels.
        pool_logits: (Bn, num_classes, *Sn) logits giving the pool's pseudo-labels and
            confidences (deprecated name: ``negative_logits=``).
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
        backend: one of :data:`rcps_kernels.backends.NAMES` ("auto" picks per device).
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
    anchor, positive, pool, anchor_logits, pool_logits = v.plain_tensors(
        anchor, positive, pool, anchor_logits, pool_logits
    )
    v.check_infonce_inputs(anchor, positive, pool, anchor_logits, pool_logits)
    v.check_infonce_options(
        num_negatives, temperature, sampling, confidence_threshold, generator, reduction, deterministic
    )
    if sampling == "topk":
        # topk takes each pool voxel at most once: a larger K would only size the tables (classes x K) and
        # their loops. Random mode draws with replacement, so its K may exceed the pool.
        num_negatives = min(num_negatives, pool_logits[:, 0].numel())
    backend = _resolve_on(backend, anchor)
    seed = _draw_seed(generator) if sampling == "random" else 0
    if _runs_reference(backend):
        tables, logits_total = None, logits_sum(anchor_logits, pool_logits)
    else:
        *tables, logits_total = negative_tables(
            anchor_logits, pool_logits, num_negatives, sampling == "random", confidence_threshold
        )
    # Finite logits and features make a finite loss unless the temperature is so small that the
    # sum over anchors can overflow, so one host sync before the kernels settles the usual case,
    # and the kernels run on while the host returns. Otherwise the exact check runs on the loss: a
    # bad feature always reaches it, while a NaN pool voxel that is never selected does not and is
    # not reported.
    inputs_finite = v.all_finite(logits_total, (anchor, positive, pool))
    if _runs_reference(backend):
        loss = bidirectional_voxel_infonce_reference(
            anchor,
            positive,
            pool,
            anchor_logits,
            pool_logits,
            num_negatives=num_negatives,
            temperature=temperature,
            sampling=sampling,
            confidence_threshold=confidence_threshold,
            seed=seed,
            reduction=reduction,
        ).to(v.accumulation_dtype(anchor.dtype))  # float32 for half inputs, as the fused backends
    else:
        params = InfoNCEParams(
            *tables, temperature=float(temperature), num_negatives=num_negatives, random=sampling == "random", seed=seed
        )
        loss = _fused_infonce(anchor, positive, pool, params, reduction, backend, deterministic)
    if not inputs_finite or _loss_may_overflow(loss.dtype, anchor_logits, num_negatives, temperature):
        v.check_result_finite(
            loss,
            (
                ("anchor_logits", anchor_logits, False),
                ("pool_logits", pool_logits, False),
                ("anchor", anchor, False),
                ("positive", positive, False),
                ("pool", pool, False),
            ),
            inputs_sum=None if inputs_finite else logits_total,
            remedy="raise the temperature, or pass float64 features",
        )
    return loss


def _loss_may_overflow(dtype: torch.dtype, anchor_logits: Tensor, num_negatives: int, temperature: float) -> bool:
    # |u1 . u| <= 1, so each direction's per-anchor loss is at most 2 / temperature + log(K + 1),
    # and a sum or mean over N anchors adds N of them before dividing. A quarter of the dtype's
    # range leaves room for the partial sums of either direction.
    num_anchors = anchor_logits.numel() // max(anchor_logits.shape[1], 1)
    bound = num_anchors * 2 * (2.0 / temperature + math.log1p(num_negatives))
    return bound >= torch.finfo(dtype).max / 4


def _fused_infonce(
    anchor: Tensor,
    positive: Tensor,
    pool: Tensor,
    params: InfoNCEParams,
    reduction: str,
    backend: str,
    deterministic: bool | None,
) -> Tensor:
    # (B, C, P) views (copies only for layouts that cannot be flattened); kernels take any strides.
    z1 = anchor.reshape(anchor.shape[0], anchor.shape[1], -1)
    z2 = positive.reshape(z1.shape)
    zn = pool.reshape(pool.shape[0], pool.shape[1], -1)
    wants_grad = torch.is_grad_enabled() and (anchor.requires_grad or positive.requires_grad or pool.requires_grad)
    if reduction == "mean" and wants_grad:
        loss, _, _, _ = infonce_ops.mean_loss_with_grads(z1, z2, zn, params, backend, deterministic)
        return loss
    per_anchor = infonce_ops.per_anchor_loss(z1, z2, zn, params, backend, deterministic)
    if reduction == "mean":
        return per_anchor.mean()
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor.reshape(anchor.shape[0], *anchor.shape[2:])


@v.renamed_keywords(negative_logits="pool_logits")
def random_negative_draws(
    anchor_logits: Tensor,
    pool_logits: Tensor,
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
    anchor_logits, pool_logits = v.plain_tensors(anchor_logits, pool_logits)
    labels, _ = pseudo_labels(anchor_logits)
    idx, counts = eligible_negatives(pool_logits, confidence_threshold, anchor_logits.shape[1])
    params = InfoNCEParams(
        labels.cpu(),
        idx.cpu(),
        counts.cpu(),
        temperature=1.0,
        num_negatives=num_negatives,
        random=True,
        seed=seed,
        offset=offset,
    )
    return backends.kernel_table("cpu").random_draws(params).to(anchor_logits.device)


@v.renamed_keywords(negative_logits="pool_logits")
def select_confident_negatives(
    pool_logits: Tensor, num_negatives: int, num_classes: int | None = None
) -> tuple[Tensor, Tensor]:
    """Per class c, the K most confident pool voxels whose pseudo-class is not c.

    This is the official RCPS selection (top-K over p_j * [c_j != c]) with one deliberate
    difference: when fewer than K voxels have another class, only those are used (the official
    code pads with same-class voxels, i.e. false negatives). Ties in confidence go to the lower
    voxel index.

    Args:
        pool_logits: (Bn, num_classes, *S) logits of the negative pool (deprecated name:
            ``negative_logits=``).
        num_negatives: K >= 1.
        num_classes: number of classes (default: the logits' class axis).

    Returns:
        idx (num_classes, K) int64 into the flattened pool (Bn * prod(S)), most confident first,
        -1 where fewer than K are eligible; counts (num_classes,) int64, the valid entries per row.

    Raises:
        TypeError: num_negatives or num_classes is not an int (a float or bool).
        ValueError: num_negatives < 1, num_classes below the logits' class axis, logits that
            are not a floating (Bn, num_classes, *S) tensor with 1-3 spatial dims, or NaN/Inf logits.
    """
    (pool_logits,) = v.plain_tensors(pool_logits)
    num_negatives = v.check_count("num_negatives", num_negatives)
    num_classes = v.check_pool_logits(pool_logits, num_classes)
    return topk_negatives(pool_logits, num_negatives, num_classes)


# --------------------------------------------------------------------------------------------
# Rectified pseudo supervision (L_urp) and logit cosine consistency (L_cr)
# --------------------------------------------------------------------------------------------
def rectified_pseudo_supervision(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 0.5,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Uncertainty-rectified pseudo supervision L_urp of RCPS (docs/design.md section 3.1).

    Per voxel, ``exp(-D) * CE + D`` with ``CE`` the cross-entropy of the student against the
    sharpened teacher ``softmax(teacher / temperature)`` and ``D = KL(softmax(teacher) ||
    softmax(student))``. The teacher is detached; the weight ``exp(-D)`` is not.

    Args:
        student_logits: (B, num_classes, *S) logits of an augmented view (1-3 spatial dims, num_classes >= 2).
        teacher_logits: (B, num_classes, *S) logits of the original view; never receives gradient. Classes
            may be ruled out with -inf logits (at least one finite logit per voxel).
        temperature: sharpening temperature T > 0 of the cross-entropy target; 1/T must be a
            finite normal float32 (float64 for float64 inputs), i.e. T in [2.9e-39, 8.5e37].
        reduction: "mean" (over batch and voxels), "sum", or "none" (a (B, *S) map).
        backend: one of :data:`rcps_kernels.backends.NAMES` ("auto" picks per device).

    Returns:
        The loss, float32 for float16/bfloat16/float32 inputs, float64 for float64 inputs
        (computed in float64 on every backend, so ``torch.autograd.gradcheck`` applies, with
        any reduction). Gradients reach ``student_logits`` in its dtype. Any finite logits up to
        the largest float work (the shifted logits are kept in halves, so differences near
        +-3e38 do not overflow).

    Raises:
        TypeError: temperature is not a real number (a bool, string or None).
        ValueError: mismatched shapes/dtypes/devices, wrong rank, fewer than 2 classes,
            temperature not finite, <= 0 or out of the range above, unknown reduction,
            NaN/Inf logits (names the argument and shape), or a loss that overflows its dtype
            although the logits are finite (names them with their largest magnitude).
        RuntimeError: an explicitly requested backend that is not usable here.
    """
    student_logits, teacher_logits = v.plain_tensors(student_logits, teacher_logits)
    v.check_logits_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    v.check_loss_options(reduction, student_logits.dtype, temperature=temperature)
    backend = _resolve_on(backend, student_logits)
    if _runs_formulas(backend):
        loss = rectified_pseudo_supervision_reference(student_logits, teacher_logits, temperature, reduction)
    else:
        loss = _spatial(
            pseudo_supervision_ops.rectified_pseudo_supervision_op(
                _flat(student_logits), _flat(teacher_logits), float(temperature), reduction, backend
            ),
            student_logits,
            reduction,
        )
    v.check_result_finite(loss, (("student_logits", student_logits, False), ("teacher_logits", teacher_logits, True)))
    return loss


def logit_cosine_consistency(
    logits_a: Tensor,
    logits_b: Tensor,
    *,
    eps: float = 1e-8,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Logit cosine consistency L_cr of RCPS: ``1 - cos(logits_a(v), logits_b(v))`` per voxel.

    The cosine runs over the class axis of the raw logits; each norm is clamped to at least
    ``eps`` (the values of torch.nn.functional.cosine_similarity; a clamped norm counts as a
    constant in the gradient). Both inputs receive gradient. Each voxel's logits are scaled by
    a power of two before they are squared, so logits of any finite size work (a float32 square
    overflows from 2e19).

    Args:
        logits_a: (B, num_classes, *S) logits of augmented view 1 (1-3 spatial dims, num_classes >= 2).
        logits_b: (B, num_classes, *S) logits of augmented view 2.
        eps: smallest norm, > 0, with 1/eps a finite normal float32 (float64 for float64 inputs).
        reduction: "mean" (over batch and voxels), "sum", or "none" (a (B, *S) map).
        backend: one of :data:`rcps_kernels.backends.NAMES` ("auto" picks per device).

    Returns:
        The loss, float32 for float16/bfloat16/float32 inputs, float64 for float64 inputs
        (computed in float64 on every backend, so ``torch.autograd.gradcheck`` applies).

    Raises:
        TypeError: eps is not a real number.
        ValueError: mismatched shapes/dtypes/devices, wrong rank, fewer than 2 classes,
            eps not finite, <= 0 or out of range, unknown reduction, NaN/Inf logits (names the
            argument and shape).
        RuntimeError: an explicitly requested backend that is not usable here.
    """
    logits_a, logits_b = v.plain_tensors(logits_a, logits_b)
    v.check_logits_pair("logits_a", logits_a, "logits_b", logits_b)
    v.check_loss_options(reduction, logits_a.dtype, eps=eps)
    backend = _resolve_on(backend, logits_a)
    if _runs_formulas(backend):
        loss = logit_cosine_consistency_reference(logits_a, logits_b, eps, reduction)
    else:
        loss = _spatial(
            pseudo_supervision_ops.logit_cosine_consistency_op(
                _flat(logits_a), _flat(logits_b), float(eps), reduction, backend
            ),
            logits_a,
            reduction,
        )
    v.check_result_finite(loss, (("logits_a", logits_a, False), ("logits_b", logits_b, False)))
    return loss


def pseudo_supervision_losses(
    view_a: Tensor,
    view_b: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 0.5,
    eps: float = 1e-8,
    reduction: str = "mean",
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """L_urp and L_cr of one head: ``(L_urp(view_a, teacher) + L_urp(view_b, teacher),
    L_cr(view_a, view_b))``, the values of :func:`rectified_pseudo_supervision` and
    :func:`logit_cosine_consistency`, with one backward that writes each view's gradient once.

    Args:
        view_a: (B, num_classes, *S) logits of augmented view 1 (1-3 spatial dims, num_classes >= 2).
        view_b: (B, num_classes, *S) logits of augmented view 2.
        teacher_logits: (B, num_classes, *S) logits of the original view; never receives gradient. Classes
            may be ruled out with -inf logits (at least one finite logit per voxel).
        temperature: sharpening temperature T > 0 of L_urp's cross-entropy target (1/T a finite
            normal float32, float64 for float64 inputs).
        eps: smallest norm in L_cr's cosine, > 0 (1/eps likewise).
        reduction: "mean" (over batch and voxels, per loss), "sum", or "none" ((B, *S) maps).
        backend: one of :data:`rcps_kernels.backends.NAMES` ("auto" picks per device).

    Returns:
        ``(l_urp, l_cr)``, float32 for float16/bfloat16/float32 inputs, float64 for float64
        (computed in float64, so ``torch.autograd.gradcheck`` applies with any reduction: the
        backward recomputes from the saved logits and can run more than once).

    Raises:
        TypeError: temperature or eps is not a real number.
        ValueError: mismatched shapes/dtypes/devices, wrong rank, fewer than 2 classes,
            temperature or eps not finite, <= 0 or out of range, unknown reduction, NaN/Inf
            logits (names the argument), or losses that overflow although the logits are finite.
        RuntimeError: an explicitly requested backend that is not usable here.
    """
    view_a, view_b, teacher_logits = v.plain_tensors(view_a, view_b, teacher_logits)
    v.check_logits_pair("view_a", view_a, "view_b", view_b)
    v.check_logits_pair("view_a", view_a, "teacher_logits", teacher_logits)
    v.check_loss_options(reduction, view_a.dtype, temperature=temperature, eps=eps)
    backend = _resolve_on(backend, view_a)
    if _runs_formulas(backend):
        urp = rectified_pseudo_supervision_reference(
            view_a, teacher_logits, temperature, reduction
        ) + rectified_pseudo_supervision_reference(view_b, teacher_logits, temperature, reduction)
        cr = logit_cosine_consistency_reference(view_a, view_b, eps, reduction)
    else:
        urp, cr = pseudo_supervision_ops.pseudo_supervision_losses_op(
            _flat(view_a), _flat(view_b), _flat(teacher_logits), float(temperature), float(eps), reduction, backend
        )
        urp, cr = _spatial(urp, view_a, reduction), _spatial(cr, view_a, reduction)
    v.check_result_finite(
        urp + cr, (("view_a", view_a, False), ("view_b", view_b, False), ("teacher_logits", teacher_logits, True))
    )
    return urp, cr
