"""Plain PyTorch forms of the RCPS rectified pseudo supervision (L_urp) and logit consistency (L_cr).

Readable and materialising: every intermediate (softmaxes, log-softmaxes, KL terms) is a full
logits-sized tensor. They are the float64 oracle of the tests and the ``backend="reference"``
path; the fused kernels compute the same values in one pass (DESIGN.md section 1.3).
"""
from __future__ import annotations

import torch


def reduce_per_voxel(per_voxel: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``reduction`` ("mean", "sum" or "none") to a per-voxel loss map."""
    if reduction == "mean":
        return per_voxel.mean()
    if reduction == "sum":
        return per_voxel.sum()
    return per_voxel


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rectified_pseudo_supervision_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 0.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """L_urp = mean_v(exp(-D_v) * CE_v) + mean_v(D_v) over (B, K, *S) logits.

    CE_v uses the sharpened teacher softmax(z_o / T), D_v = KL(softmax(z_o) || softmax(z_a)); the
    teacher is detached, the weight exp(-D_v) is not. Half inputs are computed in float32.
    """
    acc = _accumulation_dtype(student_logits.dtype)
    student = student_logits.to(acc)
    teacher = teacher_logits.detach().to(acc)
    log_p = torch.log_softmax(student, dim=1)
    sharpened = torch.softmax(teacher / temperature, dim=1)
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
    """L_cr = mean_v(1 - cos(z_a(v), z_b(v))) over the class axis of raw (B, K, *S) logits.

    Each norm is clamped to at least ``eps`` (as in torch.nn.functional.cosine_similarity); a
    clamped norm is treated as a constant by the gradient.
    """
    acc = _accumulation_dtype(logits_a.dtype)
    a = logits_a.to(acc)
    b = logits_b.to(acc)
    a_unit = a / a.norm(dim=1, keepdim=True).clamp_min(eps)
    b_unit = b / b.norm(dim=1, keepdim=True).clamp_min(eps)
    per_voxel = 1.0 - (a_unit * b_unit).sum(dim=1)
    return reduce_per_voxel(per_voxel, reduction)
