"""The kernel table: one :class:`Kernels` per backend, the only place that names compiled ops.

Every op file (``infonce.py``, ``pseudo_supervision.py``) calls its kernels through
``kernels(backend)``, so adding a backend means filling one table. The contracts:

- ``voxel_infonce(anchor, positive, pool, params, *, grad_weight=None, grad_scale=0.0,
  pool_grad=False) -> (loss, grad_anchor, grad_positive, grad_pool)``: features are
  ``(B, C, P)`` / ``(Bn, C, Pn)`` views with any strides, ``params`` an
  :class:`~rcps_kernels.ops.infonce.InfoNCEParams`. Returns the per-anchor loss l1 + l2 (N,) in
  float32 (float64 where the kernel computes float64 inputs in double) and, when
  ``grad_scale != 0``, the gradients of ``grad_scale * sum_i grad_weight[i] * l_i``
  (``grad_weight=None``: all ones) in the inputs' dtypes; empty tensors for gradients not asked
  for (the pool's unless ``pool_grad``). A kernel with a faster nondeterministic path asks
  ``_backend.deterministic_algorithms()`` which to take.
- ``random_draws(params) -> (N, K)`` int64: the pool voxels random mode draws (-1: none).
- ``urp_forward(student, teacher, temperature, reduction_code)`` and
  ``cosine_forward(a, b, eps, reduction_code)``: ``(B, num_classes, P)`` views with any
  strides; the loss as a (B, P) map (code 0) or 0-dim (1 = mean, 2 = sum), float32, or float64
  for float64 inputs.
- ``urp_backward(grad_output, student, teacher, temperature, reduction_code) -> grad_student``;
  ``cosine_backward(grad_output, a, b, eps, reduction_code, need_grad_a, need_grad_b) ->
  (grad_a, grad_b)`` (empty where not needed); gradients are (B, num_classes, P), which the ops
  lay out like their inputs where the strides differ.
- ``pseudo_supervision_losses_backward(grad_urp, grad_cr, view_a, view_b, teacher,
  temperature, eps, reduction_code) -> (grad_a, grad_b)``: one head's three losses in one
  pass, or None where the backend composes it from the two backwards above.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from .._backend import deterministic_algorithms
from .._extension import require_cpu_extension, require_cuda_extension

if TYPE_CHECKING:
    from .infonce import InfoNCEParams

#: Reduction names -> the integer the kernels take.
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One backend's kernels (contracts in the module docstring). The head-loss kernels are None
    for "torch": its L_urp and L_cr are the plain formulas of ``reference/`` (functional.py)."""

    voxel_infonce: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]
    random_draws: Callable[[InfoNCEParams], Tensor]
    urp_forward: Callable[..., Tensor] | None = None
    urp_backward: Callable[..., Tensor] | None = None
    cosine_forward: Callable[..., Tensor] | None = None
    cosine_backward: Callable[..., tuple[Tensor, Tensor]] | None = None
    pseudo_supervision_losses_backward: Callable[..., tuple[Tensor, Tensor]] | None = None


@functools.lru_cache(maxsize=None)
def kernels(backend: str) -> Kernels:
    """The kernel table of a backend ("cpu", "cuda", "triton" or "torch").

    Raises:
        RuntimeError: the backend's extension (or triton) cannot be loaded; not cached, so a
            later call tries again.
        ValueError: an unknown backend.
    """
    if backend == "cpu":
        require_cpu_extension()
        return _compiled_table(torch.ops.rcps_cpu, cuda=False)
    if backend == "cuda":
        require_cuda_extension()
        return _compiled_table(torch.ops.rcps_cuda, cuda=True)
    if backend == "torch":
        from . import infonce_torch

        return Kernels(voxel_infonce=infonce_torch.voxel_infonce, random_draws=infonce_torch.random_draws)
    if backend == "triton":
        try:  # imported on demand: triton is needed only when it is asked for
            infonce = importlib.import_module(f"{__package__}.infonce_triton")
            heads = importlib.import_module(f"{__package__}.pseudo_supervision_triton")
        except ImportError as exc:
            raise RuntimeError(f"the rcps_kernels Triton kernels are not usable: {exc}") from exc
        return Kernels(
            voxel_infonce=infonce.voxel_infonce,
            random_draws=infonce.random_draws,
            urp_forward=heads.urp_forward,
            urp_backward=heads.urp_backward,
            cosine_forward=heads.cosine_forward,
            cosine_backward=heads.cosine_backward,
        )
    raise ValueError(f"backend must be 'cpu', 'cuda', 'triton' or 'torch', got {backend!r}")


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
        urp_forward=ops.urp_forward,
        urp_backward=ops.urp_backward,
        cosine_forward=ops.cosine_consistency_forward,
        cosine_backward=ops.cosine_consistency_backward,
        pseudo_supervision_losses_backward=None if cuda else ops.pseudo_supervision_losses_backward,
    )
