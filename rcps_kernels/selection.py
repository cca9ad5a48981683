"""Pseudo-labels and confident negative selection, shared by every backend.

Selection is a per-class operation on 1-D vectors over the pool (at most num_classes sorts of the
pool's confidences), so it runs in plain PyTorch on whatever device the logits live; the fused
kernels consume its (num_classes, L) index tables.
"""
from __future__ import annotations

import torch


def pseudo_labels(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax class and max softmax probability of every voxel, flattened over (B, *S).

    Args:
        logits: (B, K_cls, *S).

    Returns:
        labels (B * prod(S),) int64 and confidence (B * prod(S),) in float32 (float64 for float64
        logits). No gradient flows through either.
    """
    logits = logits.detach()
    flat = logits.movedim(1, -1).reshape(-1, logits.shape[1])
    flat = flat.double() if flat.dtype == torch.float64 else flat.float()
    confidence, labels = torch.softmax(flat, dim=1).max(dim=1)
    return labels, confidence


def _check_logits(negative_logits: torch.Tensor, num_classes: int | None) -> int:
    if negative_logits.dim() < 3:
        raise ValueError(
            "negative_logits must be (Bn, K_cls, *S) with 1-3 spatial dims, "
            f"got shape {tuple(negative_logits.shape)}"
        )
    classes = negative_logits.shape[1]
    if num_classes is None:
        return classes
    if num_classes < classes:
        raise ValueError(
            f"num_classes={num_classes} is smaller than negative_logits' class axis ({classes})"
        )
    return num_classes


def select_confident_negatives(
    negative_logits: torch.Tensor, num_negatives: int, num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class c, the K most confident pool voxels whose pseudo-class is not c.

    This is the official RCPS selection (top-K over p_j * [c_j != c]) with one deliberate
    difference: when fewer than K voxels have another class, only those are used (the official
    code pads with same-class voxels, i.e. false negatives). Ties in confidence go to the lower
    voxel index.

    Args:
        negative_logits: (Bn, K_cls, *S) logits of the negative pool.
        num_negatives: K >= 1.
        num_classes: number of classes (default: K_cls).

    Returns:
        idx (num_classes, K) int64 into the flattened pool (Bn * prod(S)), most confident first,
        -1 where fewer than K are eligible; counts (num_classes,) int64, the valid entries per row.
    """
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    num_classes = _check_logits(negative_logits, num_classes)
    labels, confidence = pseudo_labels(negative_logits)
    classes = torch.arange(num_classes, device=labels.device)
    other_class = labels.unsqueeze(0) != classes.unsqueeze(1)  # (classes, M)
    # Eligible voxels keep their confidence (> 0); the others sort last at -1.
    key = torch.where(other_class, confidence.unsqueeze(0), torch.full_like(confidence, -1.0))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    take = min(num_negatives, order.shape[1])
    idx = order[:, :take]
    if take < num_negatives:
        idx = torch.cat([idx, idx.new_full((num_classes, num_negatives - take), -1)], dim=1)
    counts = other_class.sum(dim=1).clamp(max=num_negatives)
    valid = torch.arange(num_negatives, device=idx.device).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(valid, idx, torch.full_like(idx, -1)), counts


def eligible_negatives(
    negative_logits: torch.Tensor, confidence_threshold: float, num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class c, every pool voxel of another class with confidence >= threshold ("random" mode).

    Returns:
        idx (num_classes, M) int64, eligible voxels in increasing order first, then -1;
        counts (num_classes,) int64.
    """
    num_classes = _check_logits(negative_logits, num_classes)
    labels, confidence = pseudo_labels(negative_logits)
    classes = torch.arange(num_classes, device=labels.device)
    eligible = (labels.unsqueeze(0) != classes.unsqueeze(1)) & (
        confidence.unsqueeze(0) >= confidence_threshold
    )
    # A stable sort of "not eligible" puts the eligible voxels first, in increasing index order.
    order = torch.sort((~eligible).to(torch.uint8), dim=1, stable=True).indices
    counts = eligible.sum(dim=1)
    valid = torch.arange(order.shape[1], device=order.device).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(valid, order, torch.full_like(order, -1)), counts
