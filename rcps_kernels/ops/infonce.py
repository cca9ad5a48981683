"""The fused bidirectional voxel InfoNCE as torch ops: ops, fake implementations and autograd.

Two custom ops, with fake (meta) implementations so that ``torch.compile(fullgraph=True)``
traces through them (docs/design.md section 4):

- ``rcps::voxel_infonce_loss`` -> per-anchor loss l1 + l2 (N,), float64 for float64 features,
  else float32 (``_validation.accumulation_dtype``). Its backward is the op
  ``rcps::voxel_infonce_backward``, which recomputes the similarity tiles for per-anchor weights
  grad_loss (any reduction, any grad_output).
- ``rcps::voxel_infonce_mean`` -> (mean loss, grad_anchor, grad_positive, grad_pool): the
  training path. The gradient of a mean is one scalar times a fixed weight per anchor, so the
  kernel computes the gradients of mean_i l_i while the similarity tiles are still in cache (as
  fused linear-cross-entropy kernels do) and backward only scales them by grad_output.

The ops' ``backend`` argument picks the kernel from ``kernels.kernels(backend)``; their
``deterministic`` argument (True/False, or None to follow ``torch.use_deterministic_algorithms``)
is in effect while their bodies run, in forward and in backward. Outside torch.compile the same
bodies run as plain ``autograd.Function``s (:func:`per_anchor_loss`,
:func:`mean_loss_with_grads`): a custom op call binds its arguments to the schema and dispatches
twice in Python, about 0.1 ms per call, a sizeable part of the whole loss at small GPU shapes.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .._backend import deterministic_override
from .._validation import accumulation_dtype, refuse_double_backward
from .kernels import kernels


@dataclasses.dataclass(frozen=True)
class InfoNCEParams:
    """Everything an InfoNCE kernel takes besides the features.

    Attributes:
        anchor_labels: (N,) int64 pseudo-class of every anchor.
        neg_index: (num_classes, L) int64 pool voxels per class (-1: padding).
        neg_count: (num_classes,) int64 valid entries of each row of neg_index.
        temperature: tau.
        num_negatives: K, negatives per anchor.
        random: random sampling (K Philox draws per anchor from its class's row) instead of topk
            (the row's first K entries, shared by the class).
        seed, offset: key and counter offset of the Philox draws (random mode).
    """

    anchor_labels: Tensor
    neg_index: Tensor
    neg_count: Tensor
    temperature: float
    num_negatives: int
    random: bool
    seed: int = 0
    offset: int = 0

    def op_args(self) -> tuple:
        """The fields in the order of the ops' schemas (and the compiled kernels')."""
        return (
            self.anchor_labels,
            self.neg_index,
            self.neg_count,
            float(self.temperature),
            int(self.num_negatives),
            bool(self.random),
            int(self.seed),
            int(self.offset),
        )

    def tables(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.anchor_labels, self.neg_index, self.neg_count

    def scalars(self) -> tuple[float, int, bool, int, int]:
        return self.temperature, self.num_negatives, self.random, self.seed, self.offset


# --------------------------------------------------------------------------------------------
# Bodies shared by the custom ops and the eager Functions
# --------------------------------------------------------------------------------------------
def _loss(
    anchor: Tensor, positive: Tensor, pool: Tensor, params: InfoNCEParams, backend: str, deterministic: bool | None
) -> Tensor:
    with deterministic_override(deterministic):
        loss, _, _, _ = kernels(backend).voxel_infonce(anchor, positive, pool, params)
    return loss.to(accumulation_dtype(anchor.dtype))


def _loss_backward(
    grad_loss: Tensor,
    anchor: Tensor,
    positive: Tensor,
    pool: Tensor,
    params: InfoNCEParams,
    backend: str,
    deterministic: bool | None,
    pool_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    # d(sum_i g_i l_i)/dz: the kernel's weighted gradient with grad_weight = grad_loss.
    weights = grad_loss.to(accumulation_dtype(anchor.dtype)).contiguous()
    with deterministic_override(deterministic):
        _, grad_anchor, grad_positive, grad_pool = kernels(backend).voxel_infonce(
            anchor, positive, pool, params, grad_weight=weights, grad_scale=1.0, pool_grad=pool_grad
        )
    return grad_anchor, grad_positive, grad_pool


def _mean_with_grads(
    anchor: Tensor,
    positive: Tensor,
    pool: Tensor,
    params: InfoNCEParams,
    backend: str,
    deterministic: bool | None,
    pool_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # d(mean_i l_i)/dz = (1/N) sum_i dl_i/dz: the kernel's gradient with grad_scale = 1/N.
    num_anchors = params.anchor_labels.numel()
    with deterministic_override(deterministic):
        loss, grad_anchor, grad_positive, grad_pool = kernels(backend).voxel_infonce(
            anchor, positive, pool, params, grad_scale=1.0 / max(num_anchors, 1), pool_grad=pool_grad
        )
    return loss.to(accumulation_dtype(anchor.dtype)).mean(), grad_anchor, grad_positive, grad_pool


def _save_inputs(
    ctx, anchor: Tensor, positive: Tensor, pool: Tensor, params: InfoNCEParams, backend: str, deterministic: bool | None
) -> None:
    ctx.save_for_backward(anchor, positive, pool, *params.tables())
    ctx.scalars = params.scalars()
    ctx.backend, ctx.deterministic, ctx.pool_grad = backend, deterministic, pool.requires_grad


def _backward_from_saved(ctx, grad_loss: Tensor, backward=_loss_backward) -> tuple:
    refuse_double_backward("bidirectional_voxel_infonce")
    anchor, positive, pool, *tables = ctx.saved_tensors
    params = InfoNCEParams(*tables, *ctx.scalars)
    grad_anchor, grad_positive, grad_pool = backward(
        grad_loss, anchor, positive, pool, params, ctx.backend, ctx.deterministic, ctx.pool_grad
    )
    return grad_anchor, grad_positive, grad_pool if ctx.pool_grad else None


def _scale_saved_grads(ctx, grad_loss: Tensor) -> tuple:
    # d(mean)/dz was computed in forward; the chain rule only scales it by grad_output. The
    # buffers belong to this node alone, so they are scaled in place (no second copy of three
    # feature-sized gradients at the peak); a second backward through the same graph would see
    # them scaled already, hence the guard.
    refuse_double_backward("bidirectional_voxel_infonce")
    if ctx.used:
        raise RuntimeError(
            "rcps_kernels: backward ran twice through a bidirectional_voxel_infonce(reduction="
            "'mean') call; for retain_graph=True (and torch.autograd.gradcheck) use reduction="
            "'sum' or 'none' and take the mean yourself"
        )
    ctx.used = True
    grads = ctx.saved_tensors
    tracing = torch.compiler.is_compiling() or any(
        type(t) is not torch.Tensor
        for t in (grad_loss, *grads)  # fake/functional tensors
    )
    if tracing:
        scaled = [grad_loss * g for g in grads]
    else:
        scaled = list(grads)
        torch._foreach_mul_(scaled, grad_loss)  # one launch for the three on a GPU
    return scaled[0], scaled[1], scaled[2] if ctx.pool_grad else None


def _save_mean_grads(ctx, output: tuple, pool_grad: bool) -> None:
    _, grad_anchor, grad_positive, grad_pool = output
    ctx.save_for_backward(grad_anchor, grad_positive, grad_pool)
    ctx.pool_grad, ctx.used = pool_grad, False


# --------------------------------------------------------------------------------------------
# The custom ops (flat schemas: a custom op takes tensors and scalars, not a params object)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("rcps::voxel_infonce_loss", mutates_args=())
def voxel_infonce_loss(
    anchor: Tensor,
    positive: Tensor,
    pool: Tensor,
    anchor_labels: Tensor,
    neg_index: Tensor,
    neg_count: Tensor,
    temperature: float,
    num_negatives: int,
    random: bool,
    seed: int,
    offset: int,
    backend: str,
    deterministic: bool | None,
) -> Tensor:
    params = InfoNCEParams(anchor_labels, neg_index, neg_count, temperature, num_negatives, random, seed, offset)
    return _loss(anchor, positive, pool, params, backend, deterministic)


@voxel_infonce_loss.register_fake
def _(anchor, positive, pool, anchor_labels, *_scalars) -> Tensor:
    return anchor_labels.new_empty(anchor_labels.shape, dtype=accumulation_dtype(anchor.dtype))


@torch.library.custom_op("rcps::voxel_infonce_backward", mutates_args=())
def voxel_infonce_backward(
    grad_loss: Tensor,
    anchor: Tensor,
    positive: Tensor,
    pool: Tensor,
    anchor_labels: Tensor,
    neg_index: Tensor,
    neg_count: Tensor,
    temperature: float,
    num_negatives: int,
    random: bool,
    seed: int,
    offset: int,
    backend: str,
    deterministic: bool | None,
    pool_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    params = InfoNCEParams(anchor_labels, neg_index, neg_count, temperature, num_negatives, random, seed, offset)
    return _loss_backward(grad_loss, anchor, positive, pool, params, backend, deterministic, pool_grad)


@voxel_infonce_backward.register_fake
def _(grad_loss, anchor, positive, pool, *args):
    pool_grad = args[-1]
    return (
        anchor.new_empty(anchor.shape),
        positive.new_empty(positive.shape),
        pool.new_empty(pool.shape if pool_grad else (0,)),
    )


def _setup_loss_op(ctx, inputs, output) -> None:
    anchor, positive, pool = inputs[:3]
    backend, deterministic = inputs[11:13]
    _save_inputs(ctx, anchor, positive, pool, InfoNCEParams(*inputs[3:11]), backend, deterministic)


def _loss_op_backward(ctx, grad_loss):
    return (*_backward_from_saved(ctx, grad_loss, _op_form_of_backward), *[None] * 10)


def _op_form_of_backward(grad_loss, anchor, positive, pool, params, backend, deterministic, pool_grad):
    # Under torch.compile the backward must be the op too, so that it is traced through its fake.
    return voxel_infonce_backward(
        grad_loss, anchor, positive, pool, *params.op_args(), backend, deterministic, pool_grad
    )


voxel_infonce_loss.register_autograd(_loss_op_backward, setup_context=_setup_loss_op)


@torch.library.custom_op("rcps::voxel_infonce_mean", mutates_args=())
def voxel_infonce_mean(
    anchor: Tensor,
    positive: Tensor,
    pool: Tensor,
    anchor_labels: Tensor,
    neg_index: Tensor,
    neg_count: Tensor,
    temperature: float,
    num_negatives: int,
    random: bool,
    seed: int,
    offset: int,
    backend: str,
    deterministic: bool | None,
    pool_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    params = InfoNCEParams(anchor_labels, neg_index, neg_count, temperature, num_negatives, random, seed, offset)
    return _mean_with_grads(anchor, positive, pool, params, backend, deterministic, pool_grad)


@voxel_infonce_mean.register_fake
def _(anchor, positive, pool, anchor_labels, *args):
    pool_grad = args[-1]
    return (
        anchor_labels.new_empty((), dtype=accumulation_dtype(anchor.dtype)),
        anchor.new_empty(anchor.shape),
        positive.new_empty(positive.shape),
        pool.new_empty(pool.shape if pool_grad else (0,)),
    )


def _setup_mean_op(ctx, inputs, output) -> None:
    _save_mean_grads(ctx, output, pool_grad=inputs[13])


def _mean_op_backward(ctx, grad_loss, *_unused):
    return (*_scale_saved_grads(ctx, grad_loss), *[None] * 11)


voxel_infonce_mean.register_autograd(_mean_op_backward, setup_context=_setup_mean_op)


# --------------------------------------------------------------------------------------------
# Eager mode: the same bodies as autograd.Functions, taking the params object
# --------------------------------------------------------------------------------------------
class _EagerLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, positive, pool, params, backend, deterministic):
        _save_inputs(ctx, anchor, positive, pool, params, backend, deterministic)
        return _loss(anchor, positive, pool, params, backend, deterministic)

    @staticmethod
    def backward(ctx, grad_loss):
        return (*_backward_from_saved(ctx, grad_loss), None, None, None)


class _EagerMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, positive, pool, params, backend, deterministic, pool_grad):
        output = _mean_with_grads(anchor, positive, pool, params, backend, deterministic, pool_grad)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero-filled grads for the three gradient outputs
        _save_mean_grads(ctx, output, pool_grad)
        return output

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        return (*_scale_saved_grads(ctx, grad_loss), None, None, None, None)


def _use_op(anchor: Tensor) -> bool:
    # The op where its fake implementation is needed: while torch.compile traces, and for meta
    # tensors (shapes only); the eager Function otherwise.
    return torch.compiler.is_compiling() or anchor.device.type == "meta"


def per_anchor_loss(
    anchor: Tensor,
    positive: Tensor,
    pool: Tensor,
    params: InfoNCEParams,
    backend: str,
    deterministic: bool | None = None,
) -> Tensor:
    """l1 + l2 per anchor (N,), differentiable in the three feature tensors.

    Args:
        anchor, positive: (B, C, P) views; pool: (Bn, C, Pn).
        params: the tables and scalars of the call.
        backend: "cpu", "cuda" or "triton".
        deterministic: see :func:`rcps_kernels.bidirectional_voxel_infonce`.
    """
    if _use_op(anchor):
        return voxel_infonce_loss(anchor, positive, pool, *params.op_args(), backend, deterministic)
    return _EagerLoss.apply(anchor, positive, pool, params, backend, deterministic)


def mean_loss_with_grads(
    anchor: Tensor,
    positive: Tensor,
    pool: Tensor,
    params: InfoNCEParams,
    backend: str,
    deterministic: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean_i (l1_i + l2_i), and the gradients of that mean): the loss is differentiable, its
    backward only scales the gradients computed here. Arguments as :func:`per_anchor_loss`."""
    pool_grad = pool.requires_grad
    if _use_op(anchor):
        return voxel_infonce_mean(anchor, positive, pool, *params.op_args(), backend, deterministic, pool_grad)
    return _EagerMean.apply(anchor, positive, pool, params, backend, deterministic, pool_grad)


__all__ = [
    "InfoNCEParams",
    "voxel_infonce_loss",
    "voxel_infonce_backward",
    "voxel_infonce_mean",
    "per_anchor_loss",
    "mean_loss_with_grads",
]
