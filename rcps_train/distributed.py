"""torchrun / DDP plumbing: process-group set-up from the environment and an all-gather that keeps gradients."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def _launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's device index on its node: torchrun's ``LOCAL_RANK`` in a multi-process run, else 0."""
    return int(os.environ.get("LOCAL_RANK", "0")) if _launched_world_size() > 1 else 0


def init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); a no-op for a single process.

    Args:
        device: this process's device (index :func:`local_rank` on CUDA): NCCL on CUDA, gloo on CPU.

    Returns:
        ``(rank, world_size, created)``: ``created`` is True when this call initialised the process group,
        which its caller then ends with :func:`cleanup`; a group the caller set up is joined and left alone.
    """
    if _launched_world_size() == 1:
        return 0, 1, False
    created = not dist.is_initialized()
    if created:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), created


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward returns this rank's slice of the summed gradient.

    Each rank's loss depends on every rank's tensor, so the gradient of rank r's tensor is the sum over ranks
    of their gradients with respect to slice r (all-reduce, then slice).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.size = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' ``tensor`` concatenated on dim 0, differentiable; the tensor itself without DDP."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' ``tensor`` concatenated on dim 0, for values that need no gradient (pseudo-label logits)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, 0)


def gather_negative_pool(features: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-rank negative pool: every rank's projections (with gradient) and pseudo-label logits."""
    return all_gather_with_grad(features), all_gather_no_grad(logits)
