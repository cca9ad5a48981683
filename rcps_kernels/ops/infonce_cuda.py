"""CUDA kernels of the fused bidirectional voxel InfoNCE (``impl="cuda"``), csrc/cuda/infonce.cu.

Registers ``torch.ops.rcps_cuda.voxel_infonce_cuda`` (the kernel signature of ops/infonce.py plus
a trailing ``deterministic`` flag) as the "cuda" kernel of the rcps::voxel_infonce_* ops.

Random mode adds the pool gradient with fp32 atomics by default; it is bitwise reproducible
(int64 fixed-point atomics) when ``rcps_kernels._backend.deterministic_algorithms()`` says so at
call time (the public ``deterministic=`` keyword, else ``torch.use_deterministic_algorithms``).
topk mode is always deterministic.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._backend import deterministic_algorithms
from .._extension import load_cuda_extension
from .infonce import register_kernel


def _ops():
    reason = load_cuda_extension()
    if reason is not None:
        raise RuntimeError(f"the rcps_kernels CUDA extension is not usable: {reason}")
    return torch.ops.rcps_cuda


def voxel_infonce_cuda(anchor, positive, negative, anchor_labels, neg_index, neg_count,
                       temperature, num_negatives, random, seed, offset, grad_weight, grad_scale,
                       negative_grad):
    """The kernel signature of ops/infonce.py, on CUDA tensors."""
    return _ops().voxel_infonce_cuda(
        anchor, positive, negative, anchor_labels, neg_index, neg_count, float(temperature),
        int(num_negatives), bool(random), int(seed), int(offset), grad_weight, float(grad_scale),
        bool(negative_grad), deterministic_algorithms(),
    )


def random_draws_cuda(anchor_labels: Tensor, neg_index: Tensor, neg_count: Tensor,
                      num_negatives: int, seed: int, offset: int = 0) -> Tensor:
    """(N, K) pool voxels that the CUDA random mode draws (-1: nothing eligible); for tests."""
    return _ops().random_draws_cuda(anchor_labels, neg_index, neg_count, num_negatives, seed,
                                    offset)


register_kernel("cuda", voxel_infonce_cuda)

__all__ = ["voxel_infonce_cuda", "random_draws_cuda"]
