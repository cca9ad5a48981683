"""L_urp, L_cr and one head's three losses as torch ops: ops, fake implementations and autograd.

For ``(B, num_classes, *S)`` logits (docs/design.md section 3), per voxel v:

- ``L_urp``: with the teacher ``z_o`` detached, ``q~ = softmax(z_o / T)``,
  ``CE_v = -sum_c q~_c log softmax(z_a)_c`` and ``D_v = KL(softmax(z_o) || softmax(z_a))``,
  ``L_urp = mean_v(exp(-D_v) CE_v) + mean_v(D_v)``; the weight ``exp(-D_v)`` is not detached.
- ``L_cr = mean_v(1 - cos(z_a(v), z_b(v)))`` over the class axis of the raw logits.

The fused kernels read the logits once in forward and once in backward (the backward recomputes
the per-voxel softmax sums instead of storing them) and allocate no logits-sized tensor besides
the gradients. Each loss is a ``torch.library`` custom op (``rcps::rectified_pseudo_supervision``,
``rcps::logit_cosine_consistency``, ``rcps::pseudo_supervision_losses``) with a fake
implementation and a backward op, so ``torch.compile(fullgraph=True)`` traces through it; the
op's ``backend`` argument picks the kernels from ``backends.kernel_table(backend)``. The ops take
``(B, num_classes, P)`` views (the public functions flatten the spatial dims) and return the loss
as a ``(B, P)`` map or a 0-dim tensor, in float32 (float64 for float64 inputs).

``rcps::pseudo_supervision_losses`` is one head's ``L_urp(z_a1, z_o) + L_urp(z_a2, z_o)`` and
``L_cr(z_a1, z_a2)``. As separate ops their backward holds three logits-sized gradients at once
while autograd adds up the two that reach z_a1; this op's backward writes each view's gradient
once (the CPU kernel sums the three terms per block of voxels; the GPU backends run the per-loss
kernels and add in place).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import kernel_table
from ..validation import accumulation_dtype, refuse_double_backward
from .kernels import REDUCTION_CODES


def _loss_shape(logits: Tensor, reduction: str) -> tuple[int, ...]:
    return (logits.shape[0], logits.shape[2]) if reduction == "none" else ()


def _loss_like(logits: Tensor, reduction: str) -> Tensor:
    return logits.new_empty(_loss_shape(logits, reduction), dtype=accumulation_dtype(logits.dtype))


def _as_input_layout(grad: Tensor, logits: Tensor) -> Tensor:
    """The kernel's gradient, strided like torch.empty_like(logits) (as the fake is)."""
    if logits.is_contiguous() or grad.stride() == logits.stride():
        # empty_like keeps the strides of a dense tensor (the kernel's gradient is dense), so no
        # logits-sized template is needed to compare with: the Triton kernels already match them.
        return grad
    template = torch.empty_like(logits)
    if grad.stride() != template.stride():
        grad = template.copy_(grad)
    return grad


# --------------------------------------------------------------------------------------------
# rcps::rectified_pseudo_supervision and its backward
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("rcps::rectified_pseudo_supervision", mutates_args=())
def rectified_pseudo_supervision_op(
    student: Tensor, teacher: Tensor, temperature: float, reduction: str, backend: str
) -> Tensor:
    return kernel_table(backend).rectified_pseudo_supervision_forward(
        student, teacher, temperature, REDUCTION_CODES[reduction]
    )


@rectified_pseudo_supervision_op.register_fake
def _(student, teacher, temperature, reduction, backend):
    return _loss_like(student, reduction)


@torch.library.custom_op("rcps::rectified_pseudo_supervision_backward", mutates_args=())
def rectified_pseudo_supervision_backward(
    grad_output: Tensor, student: Tensor, teacher: Tensor, temperature: float, reduction: str, backend: str
) -> Tensor:
    grad = kernel_table(backend).rectified_pseudo_supervision_backward(
        grad_output, student, teacher, temperature, REDUCTION_CODES[reduction]
    )
    return _as_input_layout(grad, student)


@rectified_pseudo_supervision_backward.register_fake
def _(grad_output, student, teacher, temperature, reduction, backend):
    return torch.empty_like(student)


def _rectified_pseudo_supervision_setup_context(ctx, inputs, output) -> None:
    student, teacher, *options = inputs
    ctx.save_for_backward(student, teacher)
    ctx.options = options


def _rectified_pseudo_supervision_autograd(ctx, grad_output):
    refuse_double_backward("rectified_pseudo_supervision")
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    grad_student = rectified_pseudo_supervision_backward(grad_output, *ctx.saved_tensors, *ctx.options)
    return grad_student, None, None, None, None  # the teacher never receives gradient


rectified_pseudo_supervision_op.register_autograd(
    _rectified_pseudo_supervision_autograd, setup_context=_rectified_pseudo_supervision_setup_context
)


# --------------------------------------------------------------------------------------------
# rcps::logit_cosine_consistency and its backward
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("rcps::logit_cosine_consistency", mutates_args=())
def logit_cosine_consistency_op(logits_a: Tensor, logits_b: Tensor, eps: float, reduction: str, backend: str) -> Tensor:
    return kernel_table(backend).logit_cosine_consistency_forward(logits_a, logits_b, eps, REDUCTION_CODES[reduction])


@logit_cosine_consistency_op.register_fake
def _(logits_a, logits_b, eps, reduction, backend):
    return _loss_like(logits_a, reduction)


@torch.library.custom_op("rcps::logit_cosine_consistency_backward", mutates_args=())
def logit_cosine_consistency_backward(
    grad_output: Tensor,
    logits_a: Tensor,
    logits_b: Tensor,
    eps: float,
    reduction: str,
    backend: str,
    need_grad_a: bool,
    need_grad_b: bool,
) -> tuple[Tensor, Tensor]:
    grad_a, grad_b = kernel_table(backend).logit_cosine_consistency_backward(
        grad_output, logits_a, logits_b, eps, REDUCTION_CODES[reduction], need_grad_a, need_grad_b
    )
    return (
        _as_input_layout(grad_a, logits_a) if need_grad_a else grad_a,
        _as_input_layout(grad_b, logits_b) if need_grad_b else grad_b,
    )


@logit_cosine_consistency_backward.register_fake
def _(grad_output, logits_a, logits_b, eps, reduction, backend, need_grad_a, need_grad_b):
    return (
        torch.empty_like(logits_a) if need_grad_a else logits_a.new_empty((0,)),
        torch.empty_like(logits_b) if need_grad_b else logits_b.new_empty((0,)),
    )


def _logit_cosine_consistency_setup_context(ctx, inputs, output) -> None:
    logits_a, logits_b, *options = inputs
    ctx.save_for_backward(logits_a, logits_b)
    ctx.options = options


def _logit_cosine_consistency_autograd(ctx, grad_output):
    refuse_double_backward("logit_cosine_consistency")
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_a or need_b):
        return None, None, None, None, None
    grad_a, grad_b = logit_cosine_consistency_backward(grad_output, *ctx.saved_tensors, *ctx.options, need_a, need_b)
    return grad_a if need_a else None, grad_b if need_b else None, None, None, None


logit_cosine_consistency_op.register_autograd(
    _logit_cosine_consistency_autograd, setup_context=_logit_cosine_consistency_setup_context
)


# --------------------------------------------------------------------------------------------
# rcps::pseudo_supervision_losses (one head) and its backward
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("rcps::pseudo_supervision_losses", mutates_args=())
def pseudo_supervision_losses_op(
    view_a: Tensor, view_b: Tensor, teacher: Tensor, temperature: float, eps: float, reduction: str, backend: str
) -> tuple[Tensor, Tensor]:
    table, code = kernel_table(backend), REDUCTION_CODES[reduction]
    urp = table.rectified_pseudo_supervision_forward(
        view_a, teacher, temperature, code
    ) + table.rectified_pseudo_supervision_forward(view_b, teacher, temperature, code)
    return urp, table.logit_cosine_consistency_forward(view_a, view_b, eps, code)


@pseudo_supervision_losses_op.register_fake
def _(view_a, view_b, teacher, temperature, eps, reduction, backend):
    return _loss_like(view_a, reduction), _loss_like(view_a, reduction)


@torch.library.custom_op("rcps::pseudo_supervision_losses_backward", mutates_args=())
def pseudo_supervision_losses_backward(
    grad_urp: Tensor,
    grad_cr: Tensor,
    view_a: Tensor,
    view_b: Tensor,
    teacher: Tensor,
    temperature: float,
    eps: float,
    reduction: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    table, code = kernel_table(backend), REDUCTION_CODES[reduction]
    if table.pseudo_supervision_losses_backward is not None:
        grad_a, grad_b = table.pseudo_supervision_losses_backward(
            grad_urp, grad_cr, view_a, view_b, teacher, temperature, eps, code
        )
    else:
        grad_a = table.rectified_pseudo_supervision_backward(grad_urp, view_a, teacher, temperature, code)
        grad_b = table.rectified_pseudo_supervision_backward(grad_urp, view_b, teacher, temperature, code)
        cr_a, cr_b = table.logit_cosine_consistency_backward(grad_cr, view_a, view_b, eps, code, True, True)
        grad_a += cr_a
        grad_b += cr_b
    return _as_input_layout(grad_a, view_a), _as_input_layout(grad_b, view_b)


@pseudo_supervision_losses_backward.register_fake
def _(grad_urp, grad_cr, view_a, view_b, teacher, temperature, eps, reduction, backend):
    return torch.empty_like(view_a), torch.empty_like(view_b)


def _pseudo_supervision_losses_setup_context(ctx, inputs, output) -> None:
    view_a, view_b, teacher, *options = inputs
    ctx.save_for_backward(view_a, view_b, teacher)
    ctx.options = options


def _pseudo_supervision_losses_autograd(ctx, grad_urp, grad_cr):
    refuse_double_backward("pseudo_supervision_losses")
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_a or need_b):
        return None, None, None, None, None, None, None
    grad_a, grad_b = pseudo_supervision_losses_backward(grad_urp, grad_cr, *ctx.saved_tensors, *ctx.options)
    return (
        grad_a if need_a else None,
        grad_b if need_b else None,
        None,
        None,
        None,
        None,
        None,
    )  # the teacher never receives gradient


pseudo_supervision_losses_op.register_autograd(
    _pseudo_supervision_losses_autograd, setup_context=_pseudo_supervision_losses_setup_context
)

__all__ = ["rectified_pseudo_supervision_op", "logit_cosine_consistency_op", "pseudo_supervision_losses_op"]
