"""Benchmark problem sizes and inputs, shared by the pytest-benchmark suite and the scripts."""

from __future__ import annotations

import os

import torch

#: (anchors' spatial shape, channels). LA: the 1/4 grid of a 112x112x80 patch.
SHAPES = {
    "la": ((28, 28, 20), 64),
    "full": ((112, 112, 80), 64),
    "small": ((8, 8, 8), 16),  # CI smoke size (RCPS_BENCH_SMALL=1); pool >= K=400
}


def bench_small() -> bool:
    return os.environ.get("RCPS_BENCH_SMALL", "0") == "1"


def make_inputs(
    shape: str, *, num_classes: int = 2, dtype=torch.float32, device="cpu", pool_shape: str | None = None, seed: int = 0
):
    """anchor, positive, pool (leaf tensors requiring grad), anchor_logits, pool_logits.

    The pool has the anchors' shape unless `pool_shape` names another one (full-resolution
    anchors may use any pool). Logits are random, so classes are roughly balanced.
    """
    g = torch.Generator().manual_seed(seed)
    spatial, channels = SHAPES[shape]
    pool_spatial, _ = SHAPES[pool_shape or shape]

    def features(sp):
        return torch.randn(1, channels, *sp, generator=g).to(device=device, dtype=dtype).requires_grad_()

    anchor, positive, pool = features(spatial), features(spatial), features(pool_spatial)
    anchor_logits = torch.randn(1, num_classes, *spatial, generator=g).to(device)
    pool_logits = torch.randn(1, num_classes, *pool_spatial, generator=g).to(device)
    return anchor, positive, pool, anchor_logits, pool_logits
