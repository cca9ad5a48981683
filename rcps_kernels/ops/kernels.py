"""The kernel contract: :class:`InfoNCEParams`, the :class:`Kernels` table every backend fills, and
the table of each built-in backend (the only place that names compiled ops).

Every op file (``infonce.py``, ``pseudo_supervision.py``) calls its kernels through
``rcps_kernels.backends.kernel_table(backend)``, which builds a backend's table with the function
its registry record names (:func:`cpu_kernels`, :func:`cuda_kernels`, :func:`triton_kernels`,
:func:`torch_kernels` here). The contracts:

- ``voxel_infonce(anchor, positive, pool, params, *, grad_weight=None, grad_scale=0.0,
  pool_grad=False) -> (loss, grad_anchor, grad_positive, grad_pool)``: features are
  ``(B, C, P)`` / ``(Bn, C, Pn)`` views with any strides, ``params`` an :class:`InfoNCEParams`.
  Returns the per-anchor loss l1 + l2 (N,) in float32 (float64 where the kernel computes float64
  inputs in double) and, when ``grad_scale != 0``, the gradients of
  ``grad_scale * sum_i grad_weight[i] * l_i`` (``grad_weight=None``: all ones) in the inputs'
  dtypes; empty tensors for gradients not asked for (the pool's unless ``pool_grad``). A kernel
  with a faster nondeterministic path asks ``determinism.deterministic_algorithms()`` which to
  take.
- ``random_draws(params) -> (N, K)`` int64: the pool voxels random mode draws (-1: none).
- ``rectified_pseudo_supervision_forward(student, teacher, temperature, reduction_code)`` and
  ``logit_cosine_consistency_forward(a, b, eps, reduction_code)``: ``(B, num_classes, P)`` views
  with any strides; the loss as a (B, P) map (code 0) or 0-dim (1 = mean, 2 = sum), float32, or
  float64 for float64 inputs.
- ``rectified_pseudo_supervision_backward(grad_output, student, teacher, temperature,
  reduction_code) -> grad_student``; ``logit_cosine_consistency_backward(grad_output, a, b, eps,
  reduction_code, need_grad_a, need_grad_b) -> (grad_a, grad_b)`` (empty where not needed);
  gradients are (B, num_classes, P), which the ops lay out like their inputs where the strides
  differ.
- ``pseudo_supervision_losses_backward(grad_urp, grad_cr, view_a, view_b, teacher,
  temperature, eps, reduction_code) -> (grad_a, grad_b)``: one head's three losses in one
  pass, or None where the backend composes it from the two backwards above.

A table whose pseudo-supervision kernels are None (``torch``) runs the plain formulas of
``reference/`` for L_urp and L_cr (per-voxel, so already memory-linear in the logits).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import torch
from torch import Tensor

from ..determinism import deterministic_algorithms
from ..extension import require_cpu_extension, require_cuda_extension

#: Reduction names -> the integer the kernels take.
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}


@dataclasses.dataclass(frozen=True)
class InfoNCEParams:
    """Everything an InfoNCE kernel takes besides the features, in the order of the custom ops'
    schemas and the compiled kernels' arguments.

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

    @classmethod
    def count(cls) -> int:
        """How many arguments the params take in a flat argument list."""
        return len(dataclasses.fields(cls))

    @classmethod
    def from_args(cls, args) -> InfoNCEParams:
        """The params from the first :meth:`count` entries of a flat argument list (in field order)."""
        return cls(*args[: cls.count()])

    @classmethod
    def from_parts(cls, tensors, scalars) -> InfoNCEParams:
        """The params from :meth:`tensors` and :meth:`scalars` (what autograd saves apart)."""
        tensors, scalars = iter(tensors), iter(scalars)
        return cls(*(next(tensors) if _is_tensor(field) else next(scalars) for field in dataclasses.fields(cls)))

    def op_args(self) -> tuple:
        """The fields in order, scalars converted to the Python types the op schemas declare."""
        return tuple(
            _CONVERSIONS.get(field.type, _same)(getattr(self, field.name)) for field in dataclasses.fields(self)
        )

    def tensors(self) -> tuple[Tensor, ...]:
        """The tensor fields, in field order."""
        return tuple(getattr(self, field.name) for field in dataclasses.fields(self) if _is_tensor(field))

    def scalars(self) -> tuple:
        """The other fields, in field order."""
        return tuple(value for field, value in zip(dataclasses.fields(self), self.op_args()) if not _is_tensor(field))


def _is_tensor(field: dataclasses.Field) -> bool:
    return field.type == "Tensor"  # annotations are strings here (from __future__ import annotations)


def _same(value):
    return value


# The annotation of each scalar field -> the conversion to the type the op schemas declare.
_CONVERSIONS = {"float": float, "int": int, "bool": bool}


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One backend's kernels (contracts in the module docstring). The pseudo-supervision kernels are
    None where the backend runs the plain formulas of ``reference/`` for L_urp and L_cr."""

    voxel_infonce: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]
    random_draws: Callable[[InfoNCEParams], Tensor]
    rectified_pseudo_supervision_forward: Callable[..., Tensor] | None = None
    rectified_pseudo_supervision_backward: Callable[..., Tensor] | None = None
    logit_cosine_consistency_forward: Callable[..., Tensor] | None = None
    logit_cosine_consistency_backward: Callable[..., tuple[Tensor, Tensor]] | None = None
    pseudo_supervision_losses_backward: Callable[..., tuple[Tensor, Tensor]] | None = None

    @property
    def fuses_pseudo_supervision(self) -> bool:
        """Whether L_urp and L_cr run as this backend's kernels (else as the plain formulas)."""
        return self.rectified_pseudo_supervision_forward is not None


def cpu_kernels() -> Kernels:
    """The C++ CPU extension's table (``torch.ops.rcps_cpu``).

    Raises:
        RuntimeError: the extension cannot be loaded.
    """
    require_cpu_extension()
    return _compiled_table(torch.ops.rcps_cpu, cuda=False)


def cuda_kernels() -> Kernels:
    """The CUDA extension's table (``torch.ops.rcps_cuda``).

    Raises:
        RuntimeError: the extension cannot be loaded.
    """
    require_cuda_extension()
    return _compiled_table(torch.ops.rcps_cuda, cuda=True)


def triton_kernels() -> Kernels:
    """The Triton kernels' table (imported on demand: triton is needed only when asked for).

    Raises:
        RuntimeError: triton or the kernels cannot be imported.
    """
    try:
        infonce = importlib.import_module(f"{__package__}.infonce_triton")
        pseudo_supervision = importlib.import_module(f"{__package__}.pseudo_supervision_triton")
    except ImportError as exc:
        raise RuntimeError(f"the rcps_kernels Triton kernels are not usable: {exc}") from exc
    return Kernels(
        voxel_infonce=infonce.voxel_infonce,
        random_draws=infonce.random_draws,
        rectified_pseudo_supervision_forward=pseudo_supervision.rectified_pseudo_supervision_forward,
        rectified_pseudo_supervision_backward=pseudo_supervision.rectified_pseudo_supervision_backward,
        logit_cosine_consistency_forward=pseudo_supervision.logit_cosine_consistency_forward,
        logit_cosine_consistency_backward=pseudo_supervision.logit_cosine_consistency_backward,
    )


def torch_kernels() -> Kernels:
    """The plain-PyTorch table: the tiled InfoNCE of ``infonce_torch.py``; L_urp and L_cr as the plain formulas."""
    from . import infonce_torch

    return Kernels(voxel_infonce=infonce_torch.voxel_infonce, random_draws=infonce_torch.random_draws)


def _compiled_table(ops, cuda: bool) -> Kernels:
    """The table of the CPU or the CUDA extension: their ops share names and schemas, except
    that only the CUDA InfoNCE takes a deterministic flag (the CPU kernels always are) and only
    the CPU extension has the fused backward of one head's losses."""

    def voxel_infonce(anchor, positive, pool, params, *, grad_weight=None, grad_scale=0.0, pool_grad=False):
        flags = (deterministic_algorithms(),) if cuda else ()
        return ops.voxel_infonce(
            anchor, positive, pool, *params.op_args(), grad_weight, float(grad_scale), bool(pool_grad), *flags
        )

    def random_draws(params):
        return ops.random_draws(
            params.anchor_labels, params.neg_index, params.neg_count, params.num_negatives, params.seed, params.offset
        )

    return Kernels(
        voxel_infonce=voxel_infonce,
        random_draws=random_draws,
        rectified_pseudo_supervision_forward=ops.rectified_pseudo_supervision_forward,
        rectified_pseudo_supervision_backward=ops.rectified_pseudo_supervision_backward,
        logit_cosine_consistency_forward=ops.logit_cosine_consistency_forward,
        logit_cosine_consistency_backward=ops.logit_cosine_consistency_backward,
        pseudo_supervision_losses_backward=None if cuda else ops.pseudo_supervision_losses_backward,
    )
