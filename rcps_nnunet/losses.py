"""The unlabeled RCPS terms on nnU-Net's outputs (docs/nnunet.md, "What a step computes").

nnU-Net's network returns one logit map per deep-supervision level, full resolution first. The forward runs on
``[x_l, x_l^a1, x_l^a2, x_u, x_u^a1, x_u^a2]``; each level is split into those six parts. Per level, L_urp of both
augmented views and L_cr come from one ``rcps_kernels.pseudo_supervision_losses`` call, against the un-augmented
view's full-resolution prediction resized to the level (detached), and the levels are weighted like nnU-Net's
deep-supervision loss. The voxel InfoNCE takes the projections of the decoder stage at 1/4 resolution, with
pseudo-labels from the final prediction resized to that grid, and negatives from the other image's plain view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import rcps_kernels as rk

from .settings import RCPSSettings

#: Linear interpolation per number of spatial dims (the 2D configuration has 2).
_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def resize_logits(logits: torch.Tensor, shape) -> torch.Tensor:
    """``logits`` ``(B, K, *S)`` linearly resized to ``shape`` (itself when it already has that shape)."""
    if tuple(logits.shape[2:]) == tuple(shape):
        return logits
    return F.interpolate(logits, size=tuple(shape), mode=_LINEAR_MODES[len(shape)], align_corners=False)


def split_parts(tensor: torch.Tensor, batch_labeled: int, batch_unlabeled: int) -> tuple[torch.Tensor, ...]:
    """The six parts ``x_l, x_l^a1, x_l^a2, x_u, x_u^a1, x_u^a2`` of a batch-concatenated tensor.

    ``split`` gives one backward node per tensor; slicing would allocate a zero-filled full-size gradient per part.
    """
    return tensor.split([batch_labeled] * 3 + [batch_unlabeled] * 3)


def pseudo_supervision_terms(
    levels: list[tuple[torch.Tensor, ...]], weights, offset: int, settings: RCPSSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_urp (both augmented views) and L_cr of one image over the deep-supervision levels.

    Args:
        levels: per level, the six float32 parts of :func:`split_parts`, full resolution first.
        weights: nnU-Net's deep-supervision weight of each level (levels weighted 0 are skipped).
        offset: 0 for the labeled image, 3 for the unlabeled one.
        settings: the RCPS settings.

    Returns:
        ``(urp, cr)`` scalars.
    """
    teacher = levels[0][offset].detach()
    urp = cr = 0.0
    for parts, weight in zip(levels, weights):
        if weight == 0:
            continue
        view1, view2 = parts[offset + 1], parts[offset + 2]
        level_urp, level_cr = rk.pseudo_supervision_losses(
            view1,
            view2,
            resize_logits(teacher, view1.shape[2:]),
            temperature=settings.sharpen_temperature,
            backend=settings.backend,
        )
        urp = urp + weight * level_urp
        cr = cr + weight * level_cr
    return urp, cr


def contrastive_terms(
    projections: tuple[torch.Tensor, ...],
    final_logits: tuple[torch.Tensor, ...],
    settings: RCPSSettings,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_bc of the labeled and of the unlabeled image.

    Args:
        projections: the six float32 parts of the projection head's output.
        final_logits: the six float32 parts of the full-resolution prediction.
        settings: the RCPS settings.
        generator: random source of ``sampling = "random"``.

    Returns:
        ``(bc_l, bc_u)`` scalars.
    """
    grid = projections[0].shape[2:]
    plain_l = resize_logits(final_logits[0].detach(), grid)
    plain_u = resize_logits(final_logits[3].detach(), grid)
    options = dict(
        num_negatives=settings.num_negatives,
        temperature=settings.tau,
        sampling=settings.sampling,
        confidence_threshold=settings.confidence_threshold,
        generator=generator,
        backend=settings.backend,
    )
    # Negatives keep their gradient: the other image's plain projections are trained too.
    bc_l = rk.bidirectional_voxel_infonce(projections[1], projections[2], projections[3], plain_l, plain_u, **options)
    bc_u = rk.bidirectional_voxel_infonce(projections[4], projections[5], projections[0], plain_u, plain_l, **options)
    return bc_l, bc_u


def unlabeled_terms(
    levels: list[tuple[torch.Tensor, ...]],
    projections: tuple[torch.Tensor, ...],
    weights,
    settings: RCPSSettings,
    generator: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    """Every RCPS term besides L_seg: ``urp_l, urp_u, cr_l, cr_u, bc_l, bc_u``.

    Args:
        levels: per deep-supervision level the six parts (:func:`split_parts`), full resolution first, float32.
        projections: the six parts of the projection head's output, float32.
        weights: nnU-Net's deep-supervision weight per level.
        settings: the RCPS settings.
        generator: random source of ``sampling = "random"``.

    Returns:
        The six scalars by name (the names of ``rcps_train.losses.TERMS``).
    """
    terms = {}
    terms["urp_l"], terms["cr_l"] = pseudo_supervision_terms(levels, weights, 0, settings)
    terms["urp_u"], terms["cr_u"] = pseudo_supervision_terms(levels, weights, 3, settings)
    terms["bc_l"], terms["bc_u"] = contrastive_terms(projections, levels[0], settings, generator)
    return terms
