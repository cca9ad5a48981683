"""Pseudo-labels and confident negative selection, shared by every backend.

Selection is a per-class operation on 1-D vectors over the pool (at most num_classes sorts of the
pool's confidences), so it runs as plain tensor ops on whatever device the logits live; the fused
kernels consume its (num_classes, L) index tables. The functions here are the readable version;
:func:`negative_tables` issues the same op sequence from C++ (csrc/common/selection.cpp, compiled
into the CPU extension, running on CPU and CUDA tensors alike), because at small shapes on a GPU
each torch call made from Python costs more host time than its kernel.
"""

from __future__ import annotations

import torch

from .. import validation as v
from ..extension import load_cpu_extension


def pseudo_labels(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax class and max softmax probability of every voxel, flattened over (B, *S).

    Args:
        logits: (B, num_classes, *S).

    Returns:
        labels (B * prod(S),) int64 and confidence (B * prod(S),) in float32 (float64 for float64
        logits). No gradient flows through either.
    """
    logits = logits.detach()
    confidence, labels = torch.softmax(logits, dim=1, dtype=v.accumulation_dtype(logits.dtype)).max(dim=1)
    return labels.reshape(-1), confidence.reshape(-1)


def _topk_tables(labels, confidence, num_negatives: int, num_classes: int):
    classes = torch.arange(num_classes, device=labels.device).unsqueeze(1)
    # Eligible voxels keep their confidence (> 0); the others sort last at -1.
    key = torch.where(labels.unsqueeze(0) != classes, confidence.unsqueeze(0), -1.0)
    sorted_key, order = torch.sort(key, dim=1, descending=True, stable=True)
    take = min(num_negatives, key.shape[1])
    eligible = sorted_key[:, :take] >= 0
    idx = torch.where(eligible, order[:, :take], -1)
    if take < num_negatives:
        idx = torch.nn.functional.pad(idx, (0, num_negatives - take), value=-1)
    return idx, eligible.sum(dim=1)


def _eligible_tables(labels, confidence, threshold: float, num_classes: int):
    classes = torch.arange(num_classes, device=labels.device).unsqueeze(1)
    eligible = (labels.unsqueeze(0) != classes) & (confidence >= threshold)
    # A stable descending sort of the 0/1 flags puts the eligible voxels first, in index order.
    sorted_flag, order = torch.sort(eligible.to(torch.uint8), dim=1, descending=True, stable=True)
    return order.masked_fill_(sorted_flag == 0, -1), eligible.sum(dim=1)


def topk_negatives(
    pool_logits: torch.Tensor, num_negatives: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class c, the K most confident pool voxels of another class ("topk" mode; the public
    :func:`rcps_kernels.select_confident_negatives`, without its checks)."""
    labels, confidence = pseudo_labels(pool_logits)
    return _topk_tables(labels, confidence, num_negatives, num_classes)


def eligible_negatives(
    pool_logits: torch.Tensor, confidence_threshold: float, num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class c, every pool voxel of another class with confidence >= threshold ("random" mode).

    Returns:
        idx (num_classes, M) int64, eligible voxels in increasing order first, then -1;
        counts (num_classes,) int64.
    """
    num_classes = v.check_pool_logits(pool_logits, num_classes)
    labels, confidence = pseudo_labels(pool_logits)
    return _eligible_tables(labels, confidence, confidence_threshold, num_classes)


def _use_extension(requested: bool) -> bool:
    # Under torch.compile the Python version is traced instead: the compiler fuses it anyway.
    return requested and not torch.compiler.is_compiling() and load_cpu_extension() is None


def negative_tables(
    anchor_logits: torch.Tensor,
    pool_logits: torch.Tensor,
    num_negatives: int,
    random: bool,
    confidence_threshold: float,
    use_extension: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All the fused kernels need from the logits, as one op (``negative_tables`` of the CPU extension).

    Args:
        anchor_logits, pool_logits: (B, num_classes, *S) and (Bn, num_classes, *Sn), same num_classes.
        num_negatives: K of "topk" sampling.
        random: "random" sampling (eligible tables) instead of "topk".
        confidence_threshold: "random" only.
        use_extension: False computes it here in Python: what the op is tested against, and
            what runs under torch.compile or when the CPU extension cannot be loaded.

    Returns:
        anchor labels (N,) int64; negative index table and counts per class (as
        :func:`select_confident_negatives` or :func:`eligible_negatives`); and the float32 sum
        of all logits, 0-d, which is finite exactly when the logits are (barring overflow).
    """
    if _use_extension(use_extension):
        return torch.ops.rcps_cpu.negative_tables(
            anchor_logits, pool_logits, num_negatives, random, confidence_threshold
        )
    num_classes = anchor_logits.shape[1]
    anchor_labels, _ = pseudo_labels(anchor_logits)
    labels, confidence = pseudo_labels(pool_logits)
    if random:
        index, counts = _eligible_tables(labels, confidence, confidence_threshold, num_classes)
    else:
        index, counts = _topk_tables(labels, confidence, num_negatives, num_classes)
    return anchor_labels, index, counts, logits_sum(anchor_logits, pool_logits)


def logits_sum(anchor_logits: torch.Tensor, pool_logits: torch.Tensor) -> torch.Tensor:
    """0-d float32 sum of both logits: finite exactly when they are (barring overflow)."""
    return anchor_logits.detach().sum(dtype=torch.float32) + pool_logits.detach().sum(dtype=torch.float32)


def anchor_class_order(
    labels: torch.Tensor, num_classes: int, use_extension: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors sorted by class (stable) and where each class starts: the fused kernels' tiles.

    One op, ``anchor_class_order`` of the CPU extension; use_extension=False computes it here in Python.

    Returns:
        order (N,) int64, anchor indices grouped by class in increasing index order;
        class_start (num_classes + 1,) int64, class c's anchors are order[class_start[c]:
        class_start[c + 1]].
    """
    if _use_extension(use_extension):
        return torch.ops.rcps_cpu.anchor_class_order(labels, num_classes)
    # A narrow key: the GPU radix sort then makes 1-2 passes, not 8.
    key_dtype = torch.int16 if num_classes < 2**15 else torch.int32
    sorted_labels, order = torch.sort(labels.to(key_dtype), stable=True)
    bounds = torch.arange(num_classes + 1, device=labels.device, dtype=key_dtype)
    return order, torch.searchsorted(sorted_labels, bounds)
