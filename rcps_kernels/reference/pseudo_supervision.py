"""Plain PyTorch forms of the RCPS rectified pseudo supervision (L_urp) and logit consistency (L_cr).

Readable and materialising: every intermediate (softmaxes, log-softmaxes, KL terms) is a full
logits-sized tensor. They are the float64 oracle of the tests and the ``backend="reference"``
path; the fused kernels compute the same values in one pass (docs/design.md sections 3 and 4.4).
"""

from __future__ import annotations

import math

import torch

from ..validation import accumulation_dtype


def reduce_per_voxel(per_voxel: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``reduction`` ("mean", "sum" or "none") to a per-voxel loss map."""
    if reduction == "mean":
        return per_voxel.mean()
    if reduction == "sum":
        return per_voxel.sum()
    return per_voxel


def rectified_pseudo_supervision_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 0.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """L_urp = mean_v(exp(-D_v) * CE_v) + mean_v(D_v) over (B, num_classes, *S) logits.

    CE_v uses the sharpened teacher softmax(z_o / T), D_v = KL(softmax(z_o) || softmax(z_a)); the
    teacher is detached, the weight exp(-D_v) is not. Half inputs are computed in float32.
    """
    acc = accumulation_dtype(student_logits.dtype)
    student = student_logits.to(acc)
    teacher = teacher_logits.detach().to(acc)
    log_p = torch.log_softmax(student, dim=1)
    # Shifted before the division: teacher / T overflows for small T where (teacher - max) / T
    # only goes to -inf (a zero probability).
    sharpened = torch.softmax((teacher - teacher.amax(dim=1, keepdim=True)) / temperature, dim=1)
    cross_entropy = -(sharpened * log_p).sum(dim=1)
    q = torch.softmax(teacher, dim=1)
    log_q = torch.log_softmax(teacher, dim=1)
    # 0 * log 0 := 0 where the teacher gives a class zero probability (-inf logits).
    kl = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(dim=1)
    per_voxel = torch.exp(-kl) * cross_entropy + kl
    return reduce_per_voxel(per_voxel, reduction)


def logit_cosine_consistency_reference(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    eps: float = 1e-8,
    reduction: str = "mean",
) -> torch.Tensor:
    """L_cr = mean_v(1 - cos(z_a(v), z_b(v))) over the class axis of raw (B, num_classes, *S) logits.

    Each norm is clamped to at least ``eps`` (as in torch.nn.functional.cosine_similarity); a
    clamped norm is treated as a constant by the gradient.
    """
    acc = accumulation_dtype(logits_a.dtype)
    a_unit = _unit_vectors(logits_a.to(acc), eps)
    b_unit = _unit_vectors(logits_b.to(acc), eps)
    per_voxel = 1.0 - (a_unit * b_unit).sum(dim=1)
    return reduce_per_voxel(per_voxel, reduction)


def _unit_vectors(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / max(||x||, eps) along dim 1.

    x is scaled by a power of two per voxel first, which brings its largest |x_c| near 1: the
    squared norm of float32 logits overflows from |x| ~ 2e19 (and underflows below 1e-19). The
    scale is exact and a constant for autograd, so values and gradients are those of the
    unscaled formula.
    """
    largest = x.detach().abs().amax(dim=1, keepdim=True)
    _, exponent = torch.frexp(largest)  # largest = m * 2^exponent, m in [0.5, 1)
    info = torch.finfo(x.dtype)
    limit = int(math.log2(info.max)) - 1  # keeps the scale and its inverse normal and finite
    scale = torch.ldexp(torch.ones_like(largest), (-exponent).clamp(-limit, limit))
    scaled = x * scale
    return scaled / scaled.norm(dim=1, keepdim=True).clamp_min(eps * scale)
