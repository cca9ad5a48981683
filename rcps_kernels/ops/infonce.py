"""The fused bidirectional voxel InfoNCE as torch ops: ops, fake implementations and autograd.

Two custom ops, with fake (meta) implementations so that ``torch.compile(fullgraph=True)``
traces through them (docs/design.md section 4):

- ``rcps::voxel_infonce_loss`` -> per-anchor loss l1 + l2 (N,), float64 for float64 features,
  else float32 (``validation.accumulation_dtype``). Its backward is the op
  ``rcps::voxel_infonce_backward``, which recomputes the similarity tiles for per-anchor weights
  grad_loss (any reduction, any grad_output).
- ``rcps::voxel_infonce_mean`` -> (mean loss, grad_anchor, grad_positive, grad_pool): the
  training path. The gradient of a mean is one scalar times a fixed weight per anchor, so the
  kernel computes the gradients of mean_i l_i while the similarity tiles are still in cache (as
  fused linear-cross-entropy kernels do) and backward only scales them by grad_output.

The ops' ``backend`` argument picks the kernel from ``backends.kernel_table(backend)``; their
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

from ..backends import kernel_table
from ..determinism import deterministic_override
from ..validation import accumulation_dtype, refuse_double_backward
from .kernels import InfoNCEParams


# --------------------------------------------------------------------------------------------
# Bodies shared by the custom ops and the eager Functions
# --------------------------------------------------------------------------------------------
def _loss(
    anchor: Tensor, positive: Tensor, pool: Tensor, params: InfoNCEParams, backend: str, deterministic: bool | None
) -> Tensor:
    with deterministic_override(deterministic):
        loss, _, _, _ = kernel_table(backend).voxel_infonce(anchor, positive, pool, params)
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
        _, grad_anchor, grad_positive, grad_pool = kernel_table(backend).voxel_infonce(
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
        loss, grad_anchor, grad_positive, grad_pool = kernel_table(backend).voxel_infonce(
            anchor, positive, pool, params, grad_scale=1.0 / max(num_anchors, 1), pool_grad=pool_grad
        )
    return loss.to(accumulation_dtype(anchor.dtype)).mean(), grad_anchor, grad_positive, grad_pool


def _save_inputs(
    ctx, anchor: Tensor, positive: Tensor, pool: Tensor, params: InfoNCEParams, backend: str, deterministic: bool | None
) -> None:
    ctx.save_for_backward(anchor, positive, pool, *params.tensors())
    ctx.scalars = params.scalars()
    ctx.backend, ctx.deterministic, ctx.pool_grad = backend, deterministic, pool.requires_grad


def _backward_from_saved(ctx, grad_loss: Tensor, backward=_loss_backward) -> tuple:
    refuse_double_backward("bidirectional_voxel_infonce")
    anchor, positive, pool, *param_tensors = ctx.saved_tensors
    params = InfoNCEParams.from_parts(param_tensors, ctx.scalars)
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
# The custom ops. A custom op takes tensors and scalars, not a params object, so each schema
# spells the InfoNCEParams fields out (from the dataclass) and each body unpacks them by name.
# --------------------------------------------------------------------------------------------
# The schema type of each InfoNCEParams field's annotation.
_SCHEMA_TYPES = {"Tensor": "Tensor", "float": "float", "int": "int", "bool": "bool"}
_FEATURES = "Tensor anchor, Tensor positive, Tensor pool"
_PARAMS = ", ".join(f"{_SCHEMA_TYPES[field.type]} {field.name}" for field in dataclasses.fields(InfoNCEParams))
# The options after the params (name -> schema type): the loss op's, and the gradient ops'.
_LOSS_OPTIONS = {"backend": "str", "deterministic": "bool?"}
_GRAD_OPTIONS = {**_LOSS_OPTIONS, "pool_grad": "bool"}


def _schema(leading: str, options: dict[str, str], returns: str) -> str:
    spelled = ", ".join(f"{kind} {name}" for name, kind in options.items())
    return f"({leading}, {_PARAMS}, {spelled}) -> {returns}"


def _unpack(args: tuple, options: dict[str, str]) -> tuple[InfoNCEParams, dict]:
    """(the params, the options by name) from an op's flat arguments after its feature tensors."""
    count = InfoNCEParams.count()
    if len(args) != count + len(options):
        raise AssertionError(f"expected the InfoNCE params and {tuple(options)}, got {len(args)} arguments")
    return InfoNCEParams.from_args(args), dict(zip(options, args[count:]))


@torch.library.custom_op(
    "rcps::voxel_infonce_loss", mutates_args=(), schema=_schema(_FEATURES, _LOSS_OPTIONS, "Tensor")
)
def voxel_infonce_loss(anchor: Tensor, positive: Tensor, pool: Tensor, *args) -> Tensor:
    params, options = _unpack(args, _LOSS_OPTIONS)
    return _loss(anchor, positive, pool, params, **options)


@voxel_infonce_loss.register_fake
def _(anchor, positive, pool, *args) -> Tensor:
    params, _ = _unpack(args, _LOSS_OPTIONS)
    labels = params.anchor_labels
    return labels.new_empty(labels.shape, dtype=accumulation_dtype(anchor.dtype))


@torch.library.custom_op(
    "rcps::voxel_infonce_backward",
    mutates_args=(),
    schema=_schema(f"Tensor grad_loss, {_FEATURES}", _GRAD_OPTIONS, "(Tensor, Tensor, Tensor)"),
)
def voxel_infonce_backward(
    grad_loss: Tensor, anchor: Tensor, positive: Tensor, pool: Tensor, *args
) -> tuple[Tensor, Tensor, Tensor]:
    params, options = _unpack(args, _GRAD_OPTIONS)
    return _loss_backward(grad_loss, anchor, positive, pool, params, **options)


@voxel_infonce_backward.register_fake
def _(grad_loss, anchor, positive, pool, *args):
    _, options = _unpack(args, _GRAD_OPTIONS)
    return (
        anchor.new_empty(anchor.shape),
        positive.new_empty(positive.shape),
        pool.new_empty(pool.shape if options["pool_grad"] else (0,)),
    )


def _setup_loss_op(ctx, inputs, output) -> None:
    anchor, positive, pool, *args = inputs
    params, options = _unpack(args, _LOSS_OPTIONS)
    _save_inputs(ctx, anchor, positive, pool, params, **options)
    ctx.num_options = len(args)  # the params and options take no gradient


def _loss_op_backward(ctx, grad_loss):
    return (*_backward_from_saved(ctx, grad_loss, _op_form_of_backward), *(None,) * ctx.num_options)


def _op_form_of_backward(grad_loss, anchor, positive, pool, params, backend, deterministic, pool_grad):
    # Under torch.compile the backward must be the op too, so that it is traced through its fake.
    return voxel_infonce_backward(
        grad_loss, anchor, positive, pool, *params.op_args(), backend, deterministic, pool_grad
    )


voxel_infonce_loss.register_autograd(_loss_op_backward, setup_context=_setup_loss_op)


@torch.library.custom_op(
    "rcps::voxel_infonce_mean",
    mutates_args=(),
    schema=_schema(_FEATURES, _GRAD_OPTIONS, "(Tensor, Tensor, Tensor, Tensor)"),
)
def voxel_infonce_mean(anchor: Tensor, positive: Tensor, pool: Tensor, *args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    params, options = _unpack(args, _GRAD_OPTIONS)
    return _mean_with_grads(anchor, positive, pool, params, **options)


@voxel_infonce_mean.register_fake
def _(anchor, positive, pool, *args):
    params, options = _unpack(args, _GRAD_OPTIONS)
    return (
        params.anchor_labels.new_empty((), dtype=accumulation_dtype(anchor.dtype)),
        anchor.new_empty(anchor.shape),
        positive.new_empty(positive.shape),
        pool.new_empty(pool.shape if options["pool_grad"] else (0,)),
    )


def _setup_mean_op(ctx, inputs, output) -> None:
    _anchor, _positive, _pool, *args = inputs
    _, options = _unpack(args, _GRAD_OPTIONS)
    _save_mean_grads(ctx, output, options["pool_grad"])
    ctx.num_options = len(args)  # the params and options take no gradient


def _mean_op_backward(ctx, grad_loss, *_unused):
    return (*_scale_saved_grads(ctx, grad_loss), *(None,) * ctx.num_options)


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
    "voxel_infonce_loss",
    "voxel_infonce_backward",
    "voxel_infonce_mean",
    "per_anchor_loss",
    "mean_loss_with_grads",
]
