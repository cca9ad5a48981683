"""The RCPS objective (docs/design.md section 1.3) on top of ``rcps_kernels``.

``L = L_seg + beta r(e) (L_bc^l + L_bc^u) + alpha r(e) (L_urp^l + L_urp^u + L_cr^l + L_cr^u)``

L_seg is plain PyTorch (Dice + class-weighted CE, 4 heads, un-augmented labeled view); L_urp, L_cr and L_bc
come from ``rcps_kernels`` with the configured backend (fused by default, ``reference`` for checking).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import rcps_kernels as rk

from .model import HEAD_NAMES

TERMS = ("seg", "bc_l", "bc_u", "urp_l", "urp_u", "cr_l", "cr_u")


def ramp_weight(epoch: int, rampup_epochs: int) -> float:
    """Laine-Aila ramp-up ``exp(-5 (1 - min(e, R)/R)^2)`` at the 0-based epoch ``e``."""
    progress = min(epoch, rampup_epochs) / rampup_epochs
    return math.exp(-5.0 * (1.0 - progress) ** 2)


def learning_rate(
    epoch: int, epochs: int, base_lr: float = 0.01, warmup_epochs: int = 5, warmup_lr: float = 1e-4, power: float = 0.9
) -> float:
    """Per-epoch schedule: linear warm-up from ``warmup_lr`` over ``warmup_epochs``, then poly decay."""
    if epoch <= warmup_epochs:
        return warmup_lr + (base_lr - warmup_lr) * epoch / max(warmup_epochs, 1)
    return base_lr * (1.0 - (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1)) ** power


def dice_ce_loss(
    logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor, ce_lambda: float, smooth: float = 1e-5
) -> torch.Tensor:
    """Soft Dice (every class, per sample, averaged) + ``ce_lambda`` x class-weighted cross-entropy.

    Args:
        logits: ``(B, K, *S)``.
        target: integer labels ``(B, 1, *S)``.
        class_weights: ``(K,)`` CE weights (they weight CE only, like the authors' MONAI version).
        ce_lambda: weight of the CE term.

    Returns:
        A scalar.
    """
    logits = logits.float()
    labels = target[:, 0].long()
    probs = logits.softmax(1)
    one_hot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = tuple(range(2, logits.dim()))
    intersection = (probs * one_hot).sum(dims)
    denominator = probs.sum(dims) + one_hot.sum(dims)
    dice = 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)
    ce = F.cross_entropy(logits, labels, weight=class_weights.to(logits.device))
    return dice.mean() + ce_lambda * ce


def segmentation_loss(
    outputs: dict[str, torch.Tensor], target: torch.Tensor, class_weights: torch.Tensor, ce_lambda: float
) -> torch.Tensor:
    """L_seg: :func:`dice_ce_loss` summed over the four deep-supervision heads."""
    return sum(dice_ce_loss(outputs[name], target, class_weights, ce_lambda) for name in HEAD_NAMES)


def _pseudo_supervision(views: tuple[dict, dict], teacher: torch.Tensor, loss_cfg: dict) -> tuple:
    """L_urp (2 views x 4 heads against the un-augmented final head) and L_cr (4 heads) of one image.

    One op per head (``rk.pseudo_supervision_losses``): its backward writes each view's gradient once.
    """
    urp = 0.0
    cr = 0.0
    for name in HEAD_NAMES:
        head_urp, head_cr = rk.pseudo_supervision_losses(
            views[0][name],
            views[1][name],
            teacher,
            temperature=loss_cfg["sharpen_temperature"],
            backend=loss_cfg["backend"],
        )
        urp = urp + head_urp
        cr = cr + head_cr
    return urp, cr


def rcps_loss_terms(
    outputs: dict[str, torch.Tensor],
    label: torch.Tensor,
    batch: int,
    loss_cfg: dict,
    class_weights: torch.Tensor,
    gather_negatives=None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Every loss term of one RCPS step.

    Args:
        outputs: the network outputs over ``[x_l, x_l^a1, x_l^a2, x_u, x_u^a1, x_u^a2]`` (batch ``6 * batch``),
            cast to float32.
        label: ground truth of ``x_l``, ``(batch, 1, *S)``.
        batch: patches per kind.
        loss_cfg: the ``[loss]`` config table.
        class_weights: CE weights of L_seg.
        gather_negatives: optional ``(features, logits) -> (features, logits)`` that pools the negatives of
            all ranks (DDP); identity when None.
        generator: random source for ``sampling = "random"``.

    Returns:
        ``seg, bc_l, bc_u, urp_l, urp_u, cr_l, cr_u`` scalars.
    """
    # split (one backward node per output) rather than slicing: slicing would allocate a zero-filled
    # full-size gradient for each of the 6 parts of every output in backward.
    chunks = {key: value.split(batch) for key, value in outputs.items()}
    parts = [{key: chunks[key][i] for key in outputs} for i in range(6)]
    orig_l, view_l1, view_l2, orig_u, view_u1, view_u2 = parts
    terms = {"seg": segmentation_loss(orig_l, label, class_weights, loss_cfg["ce_lambda"])}

    # Pseudo-labels come from the un-augmented views' final heads and carry no gradient.
    terms["urp_l"], terms["cr_l"] = _pseudo_supervision((view_l1, view_l2), orig_l["out"].detach(), loss_cfg)
    terms["urp_u"], terms["cr_u"] = _pseudo_supervision((view_u1, view_u2), orig_u["out"].detach(), loss_cfg)

    infonce = dict(
        num_negatives=loss_cfg["num_negatives"],
        temperature=loss_cfg["tau"],
        sampling=loss_cfg["sampling"],
        confidence_threshold=loss_cfg["confidence_threshold"],
        generator=generator,
        backend=loss_cfg["backend"],
    )
    pool = gather_negatives or (lambda features, logits: (features, logits))
    # Negatives keep their gradient: the other image's un-augmented projections are trained too.
    neg_u, neg_logits_u = pool(orig_u["project"], orig_u["project_map"].detach())
    neg_l, neg_logits_l = pool(orig_l["project"], orig_l["project_map"].detach())
    terms["bc_l"] = rk.bidirectional_voxel_infonce(
        view_l1["project"], view_l2["project"], neg_u, orig_l["project_map"].detach(), neg_logits_u, **infonce
    )
    terms["bc_u"] = rk.bidirectional_voxel_infonce(
        view_u1["project"], view_u2["project"], neg_l, orig_u["project_map"].detach(), neg_logits_l, **infonce
    )
    return terms


def total_loss(terms: dict[str, torch.Tensor], ramp: float, loss_cfg: dict) -> torch.Tensor:
    """Weighted sum of the terms; a supervised step has ``seg`` only."""
    total = terms["seg"]
    if "bc_l" in terms:
        total = total + loss_cfg["beta"] * ramp * (terms["bc_l"] + terms["bc_u"])
        total = total + loss_cfg["alpha"] * ramp * (terms["urp_l"] + terms["urp_u"] + terms["cr_l"] + terms["cr_u"])
    return total
