"""Triton kernels of the rectified pseudo supervision (L_urp) and logit cosine consistency (L_cr).

Same contract as the C++ kernels (ops/kernels.py; csrc/cpu/pseudo_supervision.cpp): inputs are (B, num_classes, P) views
with any strides; forward returns a (B, P) loss map (reduction code 0) or a 0-dim mean/sum
(codes 1/2) in float32 (float64 for float64 inputs); backward returns gradients shaped and strided
like torch.empty_like of the inputs. One program handles BLOCK_V voxels with all their classes in
registers (a BLOCK_C x BLOCK_V tile), so each kernel reads the logits exactly once. Reductions
write one float64 partial sum per program, added by torch in program order (deterministic).

Loads are cast to the accumulation type right away (bf16 arithmetic is broken in the Triton
interpreter, and fp16/bf16 inputs accumulate in fp32 anyway). Under TRITON_INTERPRET=1 these run
on CPU tensors. The per-voxel formulas and their derivations are in csrc/common/pseudo_supervision_math.h.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..settings import triton_interpreting
from ..validation import accumulation_dtype


@triton.jit
def _load_tile(
    ptr,
    stride_b,
    stride_c,
    stride_p,
    item,
    position,
    classes,
    voxel_mask,
    padding,
    IS_FP64: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """(BLOCK_C, BLOCK_V) logits in the accumulation type; `padding` outside the classes."""
    cls = tl.arange(0, BLOCK_C)
    class_mask = cls < classes
    offsets = item[None, :] * stride_b + cls[:, None] * stride_c + position[None, :] * stride_p
    mask = class_mask[:, None] & voxel_mask[None, :]
    x = tl.load(ptr + offsets, mask=mask, other=0.0)
    if IS_FP64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    return tl.where(class_mask[:, None], x, padding)


@triton.jit
def _rectified_pseudo_supervision_tile(student, teacher, inv_temperature):
    """Per-voxel loss and softmax statistics of a (BLOCK_C, BLOCK_V) tile (padded with -inf).

    The shifted student logits are carried in halves (z/2 - max/2), which cannot overflow where
    z - max would (logits of opposite signs near the largest finite value); halving is exact.
    """
    half_student = 0.5 * student - 0.5 * tl.max(student, axis=0)[None, :]
    shifted_teacher = teacher - tl.max(teacher, axis=0)[None, :]
    exp_student = tl.exp(half_student + half_student)
    exp_teacher = tl.exp(shifted_teacher)
    exp_sharpened = tl.exp(shifted_teacher * inv_temperature)
    # 0 * log 0 := 0 for classes the teacher rules out (and for the padding).
    sharpened_dot_half = tl.sum(tl.where(exp_sharpened > 0, exp_sharpened * half_student, 0.0), axis=0)
    teacher_gap_half = tl.sum(
        tl.where(exp_teacher > 0, exp_teacher * (0.5 * shifted_teacher - half_student), 0.0),
        axis=0,
    )
    inv_sum_student = 1.0 / tl.sum(exp_student, axis=0)
    inv_sum_teacher = 1.0 / tl.sum(exp_teacher, axis=0)
    inv_sum_sharpened = 1.0 / tl.sum(exp_sharpened, axis=0)
    log_sum_student = -tl.log(inv_sum_student)
    cross_entropy = log_sum_student - 2.0 * (sharpened_dot_half * inv_sum_sharpened)
    kl = 2.0 * (teacher_gap_half * inv_sum_teacher) + tl.log(inv_sum_teacher) + log_sum_student
    weight = tl.exp(-kl)
    loss = weight * cross_entropy + kl
    return (
        loss,
        exp_student * inv_sum_student[None, :],
        exp_teacher * inv_sum_teacher[None, :],
        exp_sharpened * inv_sum_sharpened[None, :],
        weight,
        1.0 - weight * cross_entropy,
    )


@triton.jit
def _power_of_two_scale(max_abs, IS_FP64: tl.constexpr):
    """A power of two that brings max_abs (>= 0) near 1, kept a normal number of the tile's
    dtype. Any power of two is exact, so a log2 that rounds across one only changes which."""
    limit = 1022.0 if IS_FP64 else 126.0
    exponent = tl.floor(tl.log2(tl.where(max_abs > 0, max_abs, 1.0)))
    return tl.exp2(tl.minimum(tl.maximum(-exponent, -limit), limit))


@triton.jit
def _logit_cosine_consistency_tile(a, b, eps, IS_FP64: tl.constexpr):
    """Per-voxel 1 - cos and what the gradient needs, from two (BLOCK_C, BLOCK_V) tiles.

    Each voxel's logits are scaled by a power of two before squaring (|a| >= 2e19 would overflow
    a^2 in fp32); unit_a turns the scaled logits into a / max(||a||, eps)."""
    scale_a = _power_of_two_scale(tl.max(tl.abs(a), axis=0), IS_FP64)
    scale_b = _power_of_two_scale(tl.max(tl.abs(b), axis=0), IS_FP64)
    a = a * scale_a[None, :]
    b = b * scale_b[None, :]
    eps_a = eps * scale_a
    eps_b = eps * scale_b
    norm_a = tl.sqrt(tl.sum(a * a, axis=0))
    norm_b = tl.sqrt(tl.sum(b * b, axis=0))
    clamped_a = norm_a <= eps_a
    clamped_b = norm_b <= eps_b
    unit_a = 1.0 / tl.where(clamped_a, eps_a, norm_a)
    unit_b = 1.0 / tl.where(clamped_b, eps_b, norm_b)
    inv_norm_a = tl.where(clamped_a, 1.0 / eps, scale_a * unit_a)
    inv_norm_b = tl.where(clamped_b, 1.0 / eps, scale_b * unit_b)
    cosine = tl.sum(a * b, axis=0) * unit_a * unit_b
    a_hat = a * unit_a[None, :]
    b_hat = b * unit_b[None, :]
    return 1.0 - cosine, cosine, a_hat, b_hat, inv_norm_a, inv_norm_b, clamped_a, clamped_b


@triton.jit
def _store_loss(loss_ptr, loss, voxels, voxel_mask, REDUCE: tl.constexpr):
    loss = tl.where(voxel_mask, loss, 0.0)
    if REDUCE:
        # Partial sums in float64: per-voxel losses near the float32 maximum must not overflow
        # a sum whose mean is representable.
        tl.store(loss_ptr + tl.program_id(0), tl.sum(loss.to(tl.float64), axis=0))
    else:
        tl.store(loss_ptr + voxels, loss, mask=voxel_mask)


@triton.jit
def _grad_scale(grad_output_ptr, voxels, voxel_mask, PER_VOXEL: tl.constexpr):
    if PER_VOXEL:
        scale = tl.load(grad_output_ptr + voxels, mask=voxel_mask, other=0.0)
    else:
        scale = tl.load(grad_output_ptr)  # already divided by the voxel count for a mean
    return scale


@triton.jit
def _store_tile(ptr, value, stride_b, stride_c, stride_p, item, position, classes, voxel_mask, BLOCK_C: tl.constexpr):
    cls = tl.arange(0, BLOCK_C)
    offsets = item[None, :] * stride_b + cls[:, None] * stride_c + position[None, :] * stride_p
    mask = (cls < classes)[:, None] & voxel_mask[None, :]
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rectified_pseudo_supervision_kernel(
    student_ptr,
    teacher_ptr,
    loss_ptr,
    grad_output_ptr,
    grad_ptr,
    num_voxels,
    voxels_per_item,
    classes,
    s_sb,
    s_sc,
    s_sp,
    t_sb,
    t_sc,
    t_sp,
    g_sb,
    g_sc,
    g_sp,
    inv_temperature,
    BACKWARD: tl.constexpr,
    REDUCE: tl.constexpr,
    PER_VOXEL_GRAD: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    voxels = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    voxel_mask = voxels < num_voxels
    item = voxels // voxels_per_item
    position = voxels % voxels_per_item
    student = _load_tile(
        student_ptr, s_sb, s_sc, s_sp, item, position, classes, voxel_mask, float("-inf"), IS_FP64, BLOCK_C
    )
    teacher = _load_tile(
        teacher_ptr, t_sb, t_sc, t_sp, item, position, classes, voxel_mask, float("-inf"), IS_FP64, BLOCK_C
    )
    loss, p, q, q_sharpened, weight, kl_coefficient = _rectified_pseudo_supervision_tile(
        student, teacher, inv_temperature
    )
    if BACKWARD:
        # d/dz [w CE + D] = w (p - q~) + (1 - w CE)(p - q), since dw/dz = -w (p - q).
        scale = _grad_scale(grad_output_ptr, voxels, voxel_mask, PER_VOXEL_GRAD)
        grad = scale[None, :] * (weight[None, :] * (p - q_sharpened) + kl_coefficient[None, :] * (p - q))
        _store_tile(grad_ptr, grad, g_sb, g_sc, g_sp, item, position, classes, voxel_mask, BLOCK_C)
    else:
        _store_loss(loss_ptr, loss, voxels, voxel_mask, REDUCE)


@triton.jit
def _logit_cosine_consistency_kernel(
    a_ptr,
    b_ptr,
    loss_ptr,
    grad_output_ptr,
    grad_a_ptr,
    grad_b_ptr,
    num_voxels,
    voxels_per_item,
    classes,
    a_sb,
    a_sc,
    a_sp,
    b_sb,
    b_sc,
    b_sp,
    ga_sb,
    ga_sc,
    ga_sp,
    gb_sb,
    gb_sc,
    gb_sp,
    eps,
    BACKWARD: tl.constexpr,
    REDUCE: tl.constexpr,
    PER_VOXEL_GRAD: tl.constexpr,
    NEED_GRAD_A: tl.constexpr,
    NEED_GRAD_B: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    voxels = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    voxel_mask = voxels < num_voxels
    item = voxels // voxels_per_item
    position = voxels % voxels_per_item
    a = _load_tile(a_ptr, a_sb, a_sc, a_sp, item, position, classes, voxel_mask, 0.0, IS_FP64, BLOCK_C)
    b = _load_tile(b_ptr, b_sb, b_sc, b_sp, item, position, classes, voxel_mask, 0.0, IS_FP64, BLOCK_C)
    loss, cosine, a_hat, b_hat, inv_norm_a, inv_norm_b, clamped_a, clamped_b = _logit_cosine_consistency_tile(
        a, b, eps, IS_FP64
    )
    if BACKWARD:
        # d(1 - cos)/da = -(b^ - cos a^) / |a| with unit vectors a^, b^; a clamped norm is a
        # constant (no radial term).
        scale = _grad_scale(grad_output_ptr, voxels, voxel_mask, PER_VOXEL_GRAD)
        if NEED_GRAD_A:
            radial_a = tl.where(clamped_a[None, :], 0.0, cosine[None, :] * a_hat)
            grad_a = -(scale * inv_norm_a)[None, :] * (b_hat - radial_a)
            _store_tile(grad_a_ptr, grad_a, ga_sb, ga_sc, ga_sp, item, position, classes, voxel_mask, BLOCK_C)
        if NEED_GRAD_B:
            radial_b = tl.where(clamped_b[None, :], 0.0, cosine[None, :] * b_hat)
            grad_b = -(scale * inv_norm_b)[None, :] * (a_hat - radial_b)
            _store_tile(grad_b_ptr, grad_b, gb_sb, gb_sc, gb_sp, item, position, classes, voxel_mask, BLOCK_C)
    else:
        _store_loss(loss_ptr, loss, voxels, voxel_mask, REDUCE)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _tile_sizes(classes: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(classes)
    block_v = max(16, min(256, 4096 // block_c))
    if triton_interpreting():  # each program instance costs milliseconds in the interpreter
        block_v = max(block_v, min(1024, 16384 // block_c))
    return block_c, block_v


def _launch_geometry(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    batch, classes, voxels_per_item = x.shape
    block_c, block_v = _tile_sizes(classes)
    num_voxels = batch * voxels_per_item
    return num_voxels, voxels_per_item, block_c, block_v, triton.cdiv(num_voxels, block_v)


def _forward_output(x: torch.Tensor, reduction: int, programs: int) -> torch.Tensor:
    """The (B, P) loss map, or float64 partial sums, one per program."""
    if reduction == 0:
        return torch.empty((x.shape[0], x.shape[2]), dtype=accumulation_dtype(x.dtype), device=x.device)
    return torch.empty((programs,), dtype=torch.float64, device=x.device)


def _reduce(loss: torch.Tensor, reduction: int, num_voxels: int, dtype: torch.dtype) -> torch.Tensor:
    if reduction == 0:
        return loss
    total = loss.sum()
    return (total / num_voxels if reduction == 1 else total).to(accumulation_dtype(dtype))


def _grad_output_arguments(grad_output: torch.Tensor, x: torch.Tensor, reduction: int):
    """(tensor, per-voxel flag) for the gradient scale of each voxel. The 1/N of a mean is
    applied here, in the accumulation dtype: a float scalar argument would reach the kernel as
    fp32 and cost float64 inputs their precision."""
    accumulate = accumulation_dtype(x.dtype)
    if reduction == 0:
        return grad_output.to(accumulate).contiguous(), True
    num_voxels = x.shape[0] * x.shape[2]
    scale = grad_output.to(accumulate)
    return (scale / num_voxels if reduction == 1 else scale), False


def rectified_pseudo_supervision_forward(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, reduction: int
) -> torch.Tensor:
    num_voxels, voxels_per_item, block_c, block_v, programs = _launch_geometry(student)
    loss = _forward_output(student, reduction, programs)
    _rectified_pseudo_supervision_kernel[(programs,)](
        student,
        teacher,
        loss,
        loss,
        loss,
        num_voxels,
        voxels_per_item,
        student.shape[1],
        *student.stride(),
        *teacher.stride(),
        0,
        0,
        0,
        1.0 / temperature,
        BACKWARD=False,
        REDUCE=reduction != 0,
        PER_VOXEL_GRAD=False,
        IS_FP64=student.dtype == torch.float64,
        BLOCK_C=block_c,
        BLOCK_V=block_v,
    )
    return _reduce(loss, reduction, num_voxels, student.dtype)


def rectified_pseudo_supervision_backward(
    grad_output: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, temperature: float, reduction: int
) -> torch.Tensor:
    num_voxels, voxels_per_item, block_c, block_v, programs = _launch_geometry(student)
    scale, per_voxel = _grad_output_arguments(grad_output, student, reduction)
    grad = torch.empty_like(student)
    _rectified_pseudo_supervision_kernel[(programs,)](
        student,
        teacher,
        scale,
        scale,
        grad,
        num_voxels,
        voxels_per_item,
        student.shape[1],
        *student.stride(),
        *teacher.stride(),
        *grad.stride(),
        1.0 / temperature,
        BACKWARD=True,
        REDUCE=False,
        PER_VOXEL_GRAD=per_voxel,
        IS_FP64=student.dtype == torch.float64,
        BLOCK_C=block_c,
        BLOCK_V=block_v,
    )
    return grad


def logit_cosine_consistency_forward(
    logits_a: torch.Tensor, logits_b: torch.Tensor, eps: float, reduction: int
) -> torch.Tensor:
    num_voxels, voxels_per_item, block_c, block_v, programs = _launch_geometry(logits_a)
    loss = _forward_output(logits_a, reduction, programs)
    _logit_cosine_consistency_kernel[(programs,)](
        logits_a,
        logits_b,
        loss,
        loss,
        loss,
        loss,
        num_voxels,
        voxels_per_item,
        logits_a.shape[1],
        *logits_a.stride(),
        *logits_b.stride(),
        0,
        0,
        0,
        0,
        0,
        0,
        eps,
        BACKWARD=False,
        REDUCE=reduction != 0,
        PER_VOXEL_GRAD=False,
        NEED_GRAD_A=False,
        NEED_GRAD_B=False,
        IS_FP64=logits_a.dtype == torch.float64,
        BLOCK_C=block_c,
        BLOCK_V=block_v,
    )
    return _reduce(loss, reduction, num_voxels, logits_a.dtype)


def logit_cosine_consistency_backward(
    grad_output: torch.Tensor,
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    eps: float,
    reduction: int,
    need_grad_a: bool,
    need_grad_b: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_voxels, voxels_per_item, block_c, block_v, programs = _launch_geometry(logits_a)
    scale, per_voxel = _grad_output_arguments(grad_output, logits_a, reduction)
    grad_a = torch.empty_like(logits_a) if need_grad_a else logits_a.new_empty((0,))
    grad_b = torch.empty_like(logits_b) if need_grad_b else logits_b.new_empty((0,))
    if need_grad_a or need_grad_b:
        grad_a_strides = grad_a.stride() if need_grad_a else (0, 0, 0)
        grad_b_strides = grad_b.stride() if need_grad_b else (0, 0, 0)
        _logit_cosine_consistency_kernel[(programs,)](
            logits_a,
            logits_b,
            scale,
            scale,
            grad_a if need_grad_a else scale,
            grad_b if need_grad_b else scale,
            num_voxels,
            voxels_per_item,
            logits_a.shape[1],
            *logits_a.stride(),
            *logits_b.stride(),
            *grad_a_strides,
            *grad_b_strides,
            eps,
            BACKWARD=True,
            REDUCE=False,
            PER_VOXEL_GRAD=per_voxel,
            NEED_GRAD_A=need_grad_a,
            NEED_GRAD_B=need_grad_b,
            IS_FP64=logits_a.dtype == torch.float64,
            BLOCK_C=block_c,
            BLOCK_V=block_v,
        )
    return grad_a, grad_b
