"""One deep-supervision head's L_urp and L_cr in one op (docs/design.md section 3.3).

An RCPS step computes, per head, ``L_urp(z_a1, z_o) + L_urp(z_a2, z_o)`` and
``L_cr(z_a1, z_a2)``: three losses on two views. As separate ops their backward holds three
logits-sized gradients at once while autograd adds up the two that reach z_a1 (autograd does not
reuse a gradient that came back from a Python backward in place). ``pseudo_supervision_losses``
is one ``torch.library`` op, ``rcps::pseudo_supervision_losses``, whose backward produces each
view's gradient once: the C++ kernel sums the three terms per block of voxels, so the gradients of
the two views are the only logits-sized tensors. The GPU backends run the per-loss kernels and
add in place (one extra pair of gradients at the peak).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _validation as v
from .pseudo_supervision import (
    _REDUCTION_CODES, _as_input_layout, _flat, _flat_grad_output,
    _kernels, _loss_shape, _resolve_impl, _unflatten_loss,
)
from .reference.pseudo_supervision import (
    logit_cosine_consistency_reference,
    rectified_pseudo_supervision_reference,
)


@torch.library.custom_op("rcps::pseudo_supervision_losses", mutates_args=())
def _losses_op(view_a: Tensor, view_b: Tensor, teacher: Tensor, temperature: float, eps: float,
               reduction: str, impl: str) -> tuple[Tensor, Tensor]:
    kernels, code = _kernels(impl), _REDUCTION_CODES[reduction]
    a, b, t = _flat(view_a), _flat(view_b), _flat(teacher)
    urp = kernels.urp_forward(a, t, temperature, code) + kernels.urp_forward(b, t, temperature, code)
    cr = kernels.cosine_forward(a, b, eps, code)
    return _unflatten_loss(urp, view_a, reduction), _unflatten_loss(cr, view_a, reduction)


@_losses_op.register_fake
def _(view_a, view_b, teacher, temperature, eps, reduction, impl):
    shape, dtype = _loss_shape(view_a, reduction), v.accumulation_dtype(view_a.dtype)
    return view_a.new_empty(shape, dtype=dtype), view_a.new_empty(shape, dtype=dtype)


@torch.library.custom_op("rcps::pseudo_supervision_losses_backward", mutates_args=())
def _losses_backward_op(grad_urp: Tensor, grad_cr: Tensor, view_a: Tensor, view_b: Tensor,
                        teacher: Tensor, temperature: float, eps: float, reduction: str,
                        impl: str) -> tuple[Tensor, Tensor]:
    kernels, code = _kernels(impl), _REDUCTION_CODES[reduction]
    a, b, t = _flat(view_a), _flat(view_b), _flat(teacher)
    g_urp = _flat_grad_output(grad_urp, view_a, reduction)
    g_cr = _flat_grad_output(grad_cr, view_a, reduction)
    if kernels.pseudo_supervision_losses_backward is not None:
        grad_a, grad_b = kernels.pseudo_supervision_losses_backward(
            g_urp, g_cr, a, b, t, temperature, eps, code)
    else:
        grad_a = kernels.urp_backward(g_urp, a, t, temperature, code)
        grad_b = kernels.urp_backward(g_urp, b, t, temperature, code)
        cr_a, cr_b = kernels.cosine_backward(g_cr, a, b, eps, code, True, True)
        grad_a += cr_a
        grad_b += cr_b
    return _as_input_layout(grad_a, view_a), _as_input_layout(grad_b, view_b)


@_losses_backward_op.register_fake
def _(grad_urp, grad_cr, view_a, view_b, teacher, temperature, eps, reduction, impl):
    return torch.empty_like(view_a), torch.empty_like(view_b)


def _setup_context(ctx, inputs, output) -> None:
    view_a, view_b, teacher, *options = inputs
    ctx.save_for_backward(view_a, view_b, teacher)
    ctx.options = options


def _backward(ctx, grad_urp, grad_cr):
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_a or need_b):
        return None, None, None, None, None, None, None
    grad_a, grad_b = _losses_backward_op(grad_urp, grad_cr, *ctx.saved_tensors, *ctx.options)
    return (grad_a if need_a else None, grad_b if need_b else None,
            None, None, None, None, None)  # the teacher never receives gradient


_losses_op.register_autograd(_backward, setup_context=_setup_context)


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
        view_a: (B, K, *S) logits of augmented view 1 (1-3 spatial dims, K >= 2).
        view_b: (B, K, *S) logits of augmented view 2.
        teacher_logits: (B, K, *S) logits of the original view; never receives gradient. Classes
            may be ruled out with -inf logits (at least one finite logit per voxel).
        temperature: sharpening temperature T > 0 of L_urp's cross-entropy target (1/T a finite
            normal float32, float64 for float64 inputs).
        eps: smallest norm in L_cr's cosine, > 0 (1/eps likewise).
        reduction: "mean" (over batch and voxels, per loss), "sum", or "none" ((B, *S) maps).
        backend: "auto", "cpu", "triton", "cuda" or "reference".

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
    impl = _resolve_impl(backend, view_a.device.type)
    if impl == "reference":
        urp = (rectified_pseudo_supervision_reference(view_a, teacher_logits, temperature, reduction)
               + rectified_pseudo_supervision_reference(view_b, teacher_logits, temperature,
                                                        reduction))
        cr = logit_cosine_consistency_reference(view_a, view_b, eps, reduction)
    else:
        # (B, K, P) views: under torch.compile a graph input then reaches the op as a new view,
        # never as the caller's object, which may be a tensor subclass (MONAI MetaTensor).
        urp, cr = _losses_op(_flat(view_a), _flat(view_b), _flat(teacher_logits), float(temperature),
                             float(eps), reduction, impl)
        urp, cr = _unflatten_loss(urp, view_a, reduction), _unflatten_loss(cr, view_a, reduction)
    v.check_result_finite(urp + cr, (("view_a", view_a, False), ("view_b", view_b, False),
                                     ("teacher_logits", teacher_logits, True)))
    return urp, cr
