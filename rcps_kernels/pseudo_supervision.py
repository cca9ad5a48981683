"""Fused rectified pseudo supervision (L_urp) and logit cosine consistency (L_cr) of RCPS.

For ``(B, K, *S)`` logits (docs/design.md section 3), per voxel v:

- ``L_urp``: with the teacher ``z_o`` detached, ``q~ = softmax(z_o / T)``,
  ``CE_v = -sum_c q~_c log softmax(z_a)_c`` and ``D_v = KL(softmax(z_o) || softmax(z_a))``,
  ``L_urp = mean_v(exp(-D_v) CE_v) + mean_v(D_v)``; the weight ``exp(-D_v)`` is not detached.
- ``L_cr = mean_v(1 - cos(z_a(v), z_b(v)))`` over the class axis of the raw logits.

The fused backends read the logits once in forward and once in backward (the backward recomputes
the per-voxel softmax sums instead of storing them) and allocate no logits-sized tensor besides the
gradients. Each loss is a ``torch.library`` custom op (``rcps::rectified_pseudo_supervision``,
``rcps::logit_cosine_consistency``) with a fake implementation and a backward op, so
``torch.compile(fullgraph=True)`` traces through it; the op's ``impl`` argument picks the
kernel: ``cpu`` (C++, csrc/cpu/pseudo_supervision.cpp), ``triton``
(rcps_kernels/ops/pseudo_supervision_triton.py) or ``cuda`` (csrc/cuda/pseudo_supervision.cu).
Every kernel takes ``(B, K, P)`` views with any strides and returns the loss as a ``(B, P)`` map
(reduction code 0) or a 0-dim tensor (1 = mean, 2 = sum), in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import importlib
import types

import torch
from torch import Tensor, nn

from . import _validation as v
from ._backend import resolve_backend
from ._extension import load_cpu_extension, load_cuda_extension
from .reference.pseudo_supervision import (
    logit_cosine_consistency_reference,
    rectified_pseudo_supervision_reference,
)

_BACKENDS = ("cpu", "triton", "cuda", "reference")
_REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}


# --------------------------------------------------------------------------------------------
# Kernels per impl: forward(x, y, parameter, reduction_code) and backward(grad_output, x, y,
# parameter, reduction_code[, need_grad_x, need_grad_y]) on (B, K, P) views; and, where there is
# one, the fused backward of one head's three losses (rcps_kernels/head_losses.py), else None.
# --------------------------------------------------------------------------------------------
def _kernels(impl: str) -> types.SimpleNamespace:
    if impl == "cpu":
        reason = load_cpu_extension()
        if reason is not None:
            raise RuntimeError(f"the rcps_kernels CPU extension is not usable: {reason}")
        ops = torch.ops.rcps_C
        return types.SimpleNamespace(
            urp_forward=ops.urp_forward_cpu, urp_backward=ops.urp_backward_cpu,
            cosine_forward=ops.cosine_consistency_forward_cpu,
            cosine_backward=ops.cosine_consistency_backward_cpu,
            pseudo_supervision_losses_backward=ops.pseudo_supervision_losses_backward_cpu,
        )
    if impl == "cuda":
        reason = load_cuda_extension()
        if reason is not None:
            raise RuntimeError(f"the rcps_kernels CUDA extension is not usable: {reason}")
        ops = torch.ops.rcps_cuda
        return types.SimpleNamespace(
            urp_forward=ops.urp_forward_cuda, urp_backward=ops.urp_backward_cuda,
            cosine_forward=ops.cosine_consistency_forward_cuda,
            cosine_backward=ops.cosine_consistency_backward_cuda,
            pseudo_supervision_losses_backward=None,
        )
    if impl == "triton":
        # Imported on demand: triton is only needed when it is asked for.
        module = importlib.import_module(f"{__package__}.ops.pseudo_supervision_triton")
        return types.SimpleNamespace(
            urp_forward=module.urp_forward, urp_backward=module.urp_backward,
            cosine_forward=module.cosine_forward, cosine_backward=module.cosine_backward,
            pseudo_supervision_losses_backward=None,
        )
    raise ValueError(f"impl must be 'cpu', 'triton' or 'cuda', got {impl!r}")


@torch.compiler.assume_constant_result
def _resolve_impl(backend: str, device_type: str) -> str:
    # Loading extensions and reading the environment cannot be traced: under torch.compile the
    # choice is made once at trace time and baked into the graph as a constant.
    return resolve_backend(backend, torch.device(device_type), _BACKENDS)


def _flat(logits: Tensor) -> Tensor:
    """(B, K, *S) -> (B, K, P), a view unless the spatial dims cannot be merged."""
    return logits.reshape(logits.shape[0], logits.shape[1], -1)


def _loss_shape(logits: Tensor, reduction: str) -> tuple[int, ...]:
    return (logits.shape[0], *logits.shape[2:]) if reduction == "none" else ()


def _unflatten_loss(loss: Tensor, logits: Tensor, reduction: str) -> Tensor:
    return loss.view(_loss_shape(logits, reduction))


def _as_input_layout(grad_flat: Tensor, logits: Tensor) -> Tensor:
    """The (B, K, P) gradient shaped and strided like torch.empty_like(logits) (as the fake is)."""
    grad = grad_flat.reshape(logits.shape)
    if logits.is_contiguous():
        return grad  # empty_like of a contiguous tensor is contiguous; no logits-sized template
    template = torch.empty_like(logits)
    if grad.stride() != template.stride():
        grad = template.copy_(grad)
    return grad


def _flat_grad_output(grad_output: Tensor, logits: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return grad_output.reshape(logits.shape[0], -1)
    return grad_output


# --------------------------------------------------------------------------------------------
# rcps::rectified_pseudo_supervision and its backward
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("rcps::rectified_pseudo_supervision", mutates_args=())
def _urp_op(student: Tensor, teacher: Tensor, temperature: float, reduction: str, impl: str) -> Tensor:
    raise NotImplementedError(f"rcps::rectified_pseudo_supervision has no kernel for {student.device}")


@_urp_op.register_fake
def _(student, teacher, temperature, reduction, impl):
    return student.new_empty(_loss_shape(student, reduction), dtype=v.accumulation_dtype(student.dtype))


def _urp_forward_kernel(student, teacher, temperature, reduction, impl):
    loss = _kernels(impl).urp_forward(
        _flat(student), _flat(teacher), temperature, _REDUCTION_CODES[reduction]
    )
    return _unflatten_loss(loss, student, reduction)


_urp_op.register_kernel("cpu")(_urp_forward_kernel)
_urp_op.register_kernel("cuda")(_urp_forward_kernel)


@torch.library.custom_op("rcps::rectified_pseudo_supervision_backward", mutates_args=())
def _urp_backward_op(
    grad_output: Tensor, student: Tensor, teacher: Tensor, temperature: float, reduction: str,
    impl: str,
) -> Tensor:
    raise NotImplementedError(
        f"rcps::rectified_pseudo_supervision_backward has no kernel for {student.device}"
    )


@_urp_backward_op.register_fake
def _(grad_output, student, teacher, temperature, reduction, impl):
    return torch.empty_like(student)


def _urp_backward_kernel(grad_output, student, teacher, temperature, reduction, impl):
    grad_flat = _kernels(impl).urp_backward(
        _flat_grad_output(grad_output, student, reduction), _flat(student), _flat(teacher),
        temperature, _REDUCTION_CODES[reduction],
    )
    return _as_input_layout(grad_flat, student)


_urp_backward_op.register_kernel("cpu")(_urp_backward_kernel)
_urp_backward_op.register_kernel("cuda")(_urp_backward_kernel)


def _urp_setup_context(ctx, inputs, output) -> None:
    student, teacher, temperature, reduction, impl = inputs
    ctx.save_for_backward(student, teacher)
    ctx.options = (temperature, reduction, impl)


def _urp_backward(ctx, grad_output):
    student, teacher = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = _urp_backward_op(grad_output, student, teacher, *ctx.options)
    return grad_student, None, None, None, None  # the teacher never receives gradient


_urp_op.register_autograd(_urp_backward, setup_context=_urp_setup_context)


# --------------------------------------------------------------------------------------------
# rcps::logit_cosine_consistency and its backward
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("rcps::logit_cosine_consistency", mutates_args=())
def _cosine_op(logits_a: Tensor, logits_b: Tensor, eps: float, reduction: str, impl: str) -> Tensor:
    raise NotImplementedError(f"rcps::logit_cosine_consistency has no kernel for {logits_a.device}")


@_cosine_op.register_fake
def _(logits_a, logits_b, eps, reduction, impl):
    return logits_a.new_empty(_loss_shape(logits_a, reduction), dtype=v.accumulation_dtype(logits_a.dtype))


def _cosine_forward_kernel(logits_a, logits_b, eps, reduction, impl):
    loss = _kernels(impl).cosine_forward(
        _flat(logits_a), _flat(logits_b), eps, _REDUCTION_CODES[reduction]
    )
    return _unflatten_loss(loss, logits_a, reduction)


_cosine_op.register_kernel("cpu")(_cosine_forward_kernel)
_cosine_op.register_kernel("cuda")(_cosine_forward_kernel)


@torch.library.custom_op("rcps::logit_cosine_consistency_backward", mutates_args=())
def _cosine_backward_op(
    grad_output: Tensor, logits_a: Tensor, logits_b: Tensor, eps: float, reduction: str,
    impl: str, need_grad_a: bool, need_grad_b: bool,
) -> tuple[Tensor, Tensor]:
    raise NotImplementedError(
        f"rcps::logit_cosine_consistency_backward has no kernel for {logits_a.device}"
    )


@_cosine_backward_op.register_fake
def _(grad_output, logits_a, logits_b, eps, reduction, impl, need_grad_a, need_grad_b):
    return (
        torch.empty_like(logits_a) if need_grad_a else logits_a.new_empty((0,)),
        torch.empty_like(logits_b) if need_grad_b else logits_b.new_empty((0,)),
    )


def _cosine_backward_kernel(grad_output, logits_a, logits_b, eps, reduction, impl, need_grad_a,
                            need_grad_b):
    grad_a, grad_b = _kernels(impl).cosine_backward(
        _flat_grad_output(grad_output, logits_a, reduction), _flat(logits_a), _flat(logits_b),
        eps, _REDUCTION_CODES[reduction], need_grad_a, need_grad_b,
    )
    return (
        _as_input_layout(grad_a, logits_a) if need_grad_a else grad_a,
        _as_input_layout(grad_b, logits_b) if need_grad_b else grad_b,
    )


_cosine_backward_op.register_kernel("cpu")(_cosine_backward_kernel)
_cosine_backward_op.register_kernel("cuda")(_cosine_backward_kernel)


def _cosine_setup_context(ctx, inputs, output) -> None:
    logits_a, logits_b, eps, reduction, impl = inputs
    ctx.save_for_backward(logits_a, logits_b)
    ctx.options = (eps, reduction, impl)


def _cosine_backward(ctx, grad_output):
    logits_a, logits_b = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_a or need_b):
        return None, None, None, None, None
    grad_a, grad_b = _cosine_backward_op(
        grad_output, logits_a, logits_b, *ctx.options, need_a, need_b
    )
    return grad_a if need_a else None, grad_b if need_b else None, None, None, None


_cosine_op.register_autograd(_cosine_backward, setup_context=_cosine_setup_context)


# --------------------------------------------------------------------------------------------
# Public functions and modules
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
        student_logits: (B, K, *S) logits of an augmented view (1-3 spatial dims, K >= 2).
        teacher_logits: (B, K, *S) logits of the original view; never receives gradient. Classes
            may be ruled out with -inf logits (at least one finite logit per voxel).
        temperature: sharpening temperature T > 0 of the cross-entropy target; 1/T must be a
            finite normal float32 (float64 for float64 inputs), i.e. T in [2.9e-39, 8.5e37].
        reduction: "mean" (over batch and voxels), "sum", or "none" (a (B, *S) map).
        backend: "auto", "cpu", "triton", "cuda" or "reference".

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
    impl = _resolve_impl(backend, student_logits.device.type)
    if impl == "reference":
        loss = rectified_pseudo_supervision_reference(
            student_logits, teacher_logits, temperature, reduction
        )
    else:
        # (B, K, P) views: under torch.compile a graph input reaches a custom op only as a new
        # view, never as the caller's object, which may be a tensor subclass (MONAI MetaTensor).
        loss = _unflatten_loss(_urp_op(_flat(student_logits), _flat(teacher_logits),
                                       float(temperature), reduction, impl), student_logits, reduction)
    v.check_result_finite(loss, (("student_logits", student_logits, False),
                                ("teacher_logits", teacher_logits, True)))
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
        logits_a: (B, K, *S) logits of augmented view 1 (1-3 spatial dims, K >= 2).
        logits_b: (B, K, *S) logits of augmented view 2.
        eps: smallest norm, > 0, with 1/eps a finite normal float32 (float64 for float64 inputs).
        reduction: "mean" (over batch and voxels), "sum", or "none" (a (B, *S) map).
        backend: "auto", "cpu", "triton", "cuda" or "reference".

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
    impl = _resolve_impl(backend, logits_a.device.type)
    if impl == "reference":
        loss = logit_cosine_consistency_reference(logits_a, logits_b, eps, reduction)
    else:
        loss = _unflatten_loss(_cosine_op(_flat(logits_a), _flat(logits_b), float(eps), reduction, impl),
                               logits_a, reduction)  # (B, K, P) views, as in rectified_pseudo_supervision
    v.check_result_finite(loss, (("logits_a", logits_a, False), ("logits_b", logits_b, False)))
    return loss


class RectifiedPseudoSupervisionLoss(nn.Module):
    """Module form of :func:`rectified_pseudo_supervision`.

    Args:
        temperature: sharpening temperature T > 0.
        reduction: "mean", "sum" or "none".
        backend: "auto", "cpu", "triton", "cuda" or "reference".

    Raises:
        TypeError: temperature is not a real number.
        ValueError: temperature not finite or <= 0, or an unknown reduction.
    """

    def __init__(self, temperature: float = 0.5, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        v.check_loss_options(reduction, temperature=temperature)
        self.temperature = temperature
        self.reduction = reduction
        self.backend = backend

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return rectified_pseudo_supervision(
            student_logits, teacher_logits, temperature=self.temperature,
            reduction=self.reduction, backend=self.backend,
        )


class LogitCosineConsistencyLoss(nn.Module):
    """Module form of :func:`logit_cosine_consistency`.

    Args:
        eps: smallest norm, > 0.
        reduction: "mean", "sum" or "none".
        backend: "auto", "cpu", "triton", "cuda" or "reference".

    Raises:
        TypeError: eps is not a real number.
        ValueError: eps not finite or <= 0, or an unknown reduction.
    """

    def __init__(self, eps: float = 1e-8, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        v.check_loss_options(reduction, eps=eps)
        self.eps = eps
        self.reduction = reduction
        self.backend = backend

    def forward(self, logits_a: Tensor, logits_b: Tensor) -> Tensor:
        return logit_cosine_consistency(
            logits_a, logits_b, eps=self.eps, reduction=self.reduction, backend=self.backend
        )


__all__ = [
    "rectified_pseudo_supervision",
    "logit_cosine_consistency",
    "RectifiedPseudoSupervisionLoss",
    "LogitCosineConsistencyLoss",
]
