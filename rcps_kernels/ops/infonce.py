"""torch ops of the fused bidirectional voxel InfoNCE, shared by the cpu, triton and cuda kernels.

Two custom ops, both with fake (meta) implementations so that ``torch.compile(fullgraph=True)``
traces through them:

- ``rcps::voxel_infonce_loss`` -> per-anchor loss l1 + l2 (N,), float64 for float64 features,
  else float32 (``_validation.accumulation_dtype``). Its backward is the op
  ``rcps::voxel_infonce_backward``, which recomputes the similarity tiles for per-anchor weights
  grad_loss (any reduction, any grad_output).
- ``rcps::voxel_infonce_mean`` -> (mean loss, grad_anchor, grad_positive, grad_negative): the
  training path. Because the mean's gradient is a single scalar times a fixed weight per anchor,
  the kernel computes the gradients of mean_i l_i while the similarity tiles are still in cache
  (as fused linear-cross-entropy kernels do) and backward only scales them by grad_output.

Every kernel has the signature of ``torch.ops.rcps_C.voxel_infonce_cpu`` (csrc/cpu/infonce.cpp):

    kernel(anchor (B, C, P), positive (B, C, P), negative (Bn, C, Pn), anchor_labels (N,),
           neg_index (classes, L), neg_count (classes,), temperature, num_negatives, random,
           seed, offset, grad_weight (N,) | None, grad_scale, negative_grad)
        -> (loss (N,), grad_anchor, grad_positive, grad_negative)

with the loss in float32, or in float64 for float64 features where the kernel computes in double
(the CPU kernel; the ops cast the others' float32 loss),

computing gradients of grad_scale * sum_i grad_weight[i] * l_i when grad_scale != 0 (empty
tensors otherwise, and for the pool unless negative_grad). GPU backends add theirs with
:func:`register_kernel`; the op's ``impl`` argument selects one. A kernel with a faster
nondeterministic path asks ``rcps_kernels._backend.deterministic_algorithms()`` which to take:
the ops' last argument, ``deterministic`` (True/False, or None to follow
``torch.use_deterministic_algorithms``), is in effect while their bodies run, in forward and
in backward.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import Tensor

from .._backend import deterministic_override
from .._extension import load_cpu_extension
from .._validation import accumulation_dtype

Kernel = Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]
_KERNELS: dict[str, Kernel] = {}


def register_kernel(impl: str, kernel: Kernel) -> None:
    """Make `kernel` (signature above) available to the ops as ``impl``."""
    _KERNELS[impl] = kernel


def _cpu_kernel(*args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    reason = load_cpu_extension()
    if reason is not None:
        raise RuntimeError(f"the rcps_kernels CPU extension is not usable: {reason}")
    return torch.ops.rcps_C.voxel_infonce_cpu(*args)


register_kernel("cpu", _cpu_kernel)


def _kernel(impl: str) -> Kernel:
    if impl not in _KERNELS:
        # GPU backends live in ops/infonce_<impl>.py and register themselves on import, so that
        # triton is imported only when it is asked for.
        try:
            importlib.import_module(f"{__package__}.infonce_{impl}")
        except ImportError as exc:
            raise RuntimeError(f"no voxel InfoNCE kernel for impl={impl!r}: {exc}") from exc
    return _KERNELS[impl]


# --------------------------------------------------------------------------------------------
# rcps::voxel_infonce_loss and its backward
# --------------------------------------------------------------------------------------------
def _loss_body(
    anchor: Tensor, positive: Tensor, negative: Tensor, anchor_labels: Tensor,
    neg_index: Tensor, neg_count: Tensor, temperature: float, num_negatives: int,
    random: bool, seed: int, offset: int, impl: str, deterministic: bool | None = None,
) -> Tensor:
    with deterministic_override(deterministic):
        loss, _, _, _ = _kernel(impl)(
            anchor, positive, negative, anchor_labels, neg_index, neg_count, temperature,
            num_negatives, random, seed, offset, None, 0.0, False,
        )
    return loss.to(accumulation_dtype(anchor.dtype))


voxel_infonce_loss = torch.library.custom_op("rcps::voxel_infonce_loss", _loss_body,
                                             mutates_args=())


@voxel_infonce_loss.register_fake
def _(anchor, positive, negative, anchor_labels, *_args) -> Tensor:
    return anchor_labels.new_empty(anchor_labels.shape, dtype=accumulation_dtype(anchor.dtype))


def _backward_body(
    grad_loss: Tensor, anchor: Tensor, positive: Tensor, negative: Tensor,
    anchor_labels: Tensor, neg_index: Tensor, neg_count: Tensor, temperature: float,
    num_negatives: int, random: bool, seed: int, offset: int, impl: str,
    deterministic: bool | None, negative_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    with deterministic_override(deterministic):
        _, grad_anchor, grad_positive, grad_negative = _kernel(impl)(
            anchor, positive, negative, anchor_labels, neg_index, neg_count, temperature,
            num_negatives, random, seed, offset, grad_loss.to(accumulation_dtype(anchor.dtype)).contiguous(), 1.0,
            negative_grad,
        )
    return grad_anchor, grad_positive, grad_negative


voxel_infonce_backward = torch.library.custom_op("rcps::voxel_infonce_backward", _backward_body,
                                                 mutates_args=())


@voxel_infonce_backward.register_fake
def _(grad_loss, anchor, positive, negative, *args):
    negative_grad = args[-1]
    return (
        anchor.new_empty(anchor.shape),
        positive.new_empty(positive.shape),
        negative.new_empty(negative.shape if negative_grad else (0,)),
    )


def _setup_loss(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:6])
    ctx.options = inputs[6:12]
    ctx.deterministic = inputs[12] if len(inputs) > 12 else None  # the argument has a default
    ctx.negative_grad = inputs[2].requires_grad
    ctx.num_inputs = len(inputs)


def _backward_loss(ctx, grad_loss, backward_op=None):
    tensors = ctx.saved_tensors
    grad_anchor, grad_positive, grad_negative = (backward_op or voxel_infonce_backward)(
        grad_loss, *tensors, *ctx.options, ctx.deterministic, ctx.negative_grad
    )
    return (grad_anchor, grad_positive, grad_negative if ctx.negative_grad else None,
            *[None] * (ctx.num_inputs - 3))


voxel_infonce_loss.register_autograd(_backward_loss, setup_context=_setup_loss)


# --------------------------------------------------------------------------------------------
# rcps::voxel_infonce_mean: forward computes the gradients of the mean as well
# --------------------------------------------------------------------------------------------
def _mean_body(
    anchor: Tensor, positive: Tensor, negative: Tensor, anchor_labels: Tensor,
    neg_index: Tensor, neg_count: Tensor, temperature: float, num_negatives: int,
    random: bool, seed: int, offset: int, impl: str, negative_grad: bool,
    deterministic: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    num_anchors = anchor_labels.numel()
    with deterministic_override(deterministic):
        loss, grad_anchor, grad_positive, grad_negative = _kernel(impl)(
            anchor, positive, negative, anchor_labels, neg_index, neg_count, temperature,
            num_negatives, random, seed, offset, None, 1.0 / max(num_anchors, 1), negative_grad,
        )
    return loss.to(accumulation_dtype(anchor.dtype)).mean(), grad_anchor, grad_positive, grad_negative


voxel_infonce_mean = torch.library.custom_op("rcps::voxel_infonce_mean", _mean_body,
                                             mutates_args=())


@voxel_infonce_mean.register_fake
def _(anchor, positive, negative, anchor_labels, *args):
    negative_grad = args[8]
    return (
        anchor_labels.new_empty((), dtype=accumulation_dtype(anchor.dtype)),
        anchor.new_empty(anchor.shape),
        positive.new_empty(positive.shape),
        negative.new_empty(negative.shape if negative_grad else (0,)),
    )


def _setup_mean(ctx, inputs, output) -> None:
    _, grad_anchor, grad_positive, grad_negative = output
    ctx.save_for_backward(grad_anchor, grad_positive, grad_negative)
    ctx.negative_grad = inputs[12]
    ctx.num_inputs = len(inputs)
    ctx.used = False


def _backward_mean(ctx, grad_loss, *_unused):
    # d(mean)/dz was computed in forward; the chain rule only scales it by grad_output. The
    # buffers belong to this node alone, so they are scaled in place (no second copy of three
    # feature-sized gradients at the peak); a second backward through the same graph would see
    # them scaled already, hence the guard.
    if ctx.used:
        raise RuntimeError(
            "rcps_kernels: backward ran twice through a bidirectional_voxel_infonce(reduction="
            "'mean') call; for retain_graph=True (and torch.autograd.gradcheck) use reduction="
            "'sum' or 'none' and take the mean yourself"
        )
    ctx.used = True
    grads = ctx.saved_tensors
    tracing = torch.compiler.is_compiling() or any(
        type(t) is not torch.Tensor for t in (grad_loss, *grads)  # fake/functional tensors
    )
    if tracing:
        scaled = [grad_loss * g for g in grads]
    else:
        scaled = list(grads)
        torch._foreach_mul_(scaled, grad_loss)  # one launch for the three on a GPU
    return (scaled[0], scaled[1], scaled[2] if ctx.negative_grad else None,
            *[None] * (ctx.num_inputs - 3))


voxel_infonce_mean.register_autograd(_backward_mean, setup_context=_setup_mean)


# --------------------------------------------------------------------------------------------
# Eager mode: the same two ops as plain autograd.Functions
# --------------------------------------------------------------------------------------------
# A custom op call binds its 13 arguments to the schema and dispatches twice in Python on every
# call, about 0.1 ms: at small shapes on a GPU, a sizeable part of the whole loss. Outside
# torch.compile the ops run as autograd.Functions over the same bodies (the ops' Python
# function bodies), setup and backward, so both paths compute the same thing.
class _EagerLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        loss = _loss_body(*inputs)
        _setup_loss(ctx, inputs, loss)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return _backward_loss(ctx, grad_loss, _backward_body)


class _EagerMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        output = _mean_body(*inputs)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero-filled grads for the three gradient outputs
        _setup_mean(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        return _backward_mean(ctx, grad_loss)


def _use_op(anchor: Tensor) -> bool:
    # The op where its fake implementation is needed: while torch.compile traces, and for meta
    # tensors (shapes only); the eager Function otherwise.
    return torch.compiler.is_compiling() or anchor.device.type == "meta"


def per_anchor_loss(*args) -> Tensor:
    """rcps::voxel_infonce_loss, as the op under torch.compile (or on meta tensors), else as its
    eager Function."""
    if _use_op(args[0]):
        return voxel_infonce_loss(*args)
    return _EagerLoss.apply(*args)


def mean_loss_with_grads(*args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """rcps::voxel_infonce_mean, as the op under torch.compile (or on meta tensors), else as its
    eager Function."""
    if _use_op(args[0]):
        return voxel_infonce_mean(*args)
    return _EagerMean.apply(*args)


def random_draws(
    anchor_labels: Tensor, neg_index: Tensor, neg_count: Tensor, num_negatives: int, seed: int,
    offset: int = 0,
) -> Tensor:
    """(N, K) pool voxels that the CPU kernel's random mode draws (-1: nothing eligible)."""
    reason = load_cpu_extension()
    if reason is not None:
        raise RuntimeError(f"the rcps_kernels CPU extension is not usable: {reason}")
    return torch.ops.rcps_C.random_draws_cpu(
        anchor_labels.cpu(), neg_index.cpu(), neg_count.cpu(), num_negatives, seed, offset
    ).to(anchor_labels.device)


__all__ = ["register_kernel", "voxel_infonce_loss", "voxel_infonce_backward",
           "voxel_infonce_mean", "per_anchor_loss", "mean_loss_with_grads", "random_draws"]
