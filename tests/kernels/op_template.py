"""The test template shared by every op's tests (the InfoNCE and the pseudo-supervision losses).

A *target* is a backend on a device: "cpu" on CPU tensors, "triton" under the interpreter on
tiny CPU tensors (TRITON_INTERPRET=1, set by conftest.py), and, marked ``gpu``, "triton" and
"cuda" on CUDA tensors; the InfoNCE also runs "torch" (plain PyTorch) on both devices (its
L_urp and L_cr are the reference formulas themselves, so the pseudo-supervision tests leave it out).
:func:`grid` gives the (target, dtype) parameters of an op, and
:func:`check_against_reference` judges one evaluation of an op by the rule in numerics.py: each
named output against the float64 reference, with the reference run in the same dtype as the
yardstick. The case builders and ``*_run`` functions below give each op's evaluation.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch

import rcps_kernels as rk
from rcps_kernels.extension import load_cpu_extension
from rcps_kernels.settings import triton_interpreting
from tests.kernels.numerics import assert_close_to_reference

HAVE_CPU = load_cpu_extension() is None
HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETER = triton_interpreting()

needs_cpu = pytest.mark.skipif(not HAVE_CPU, reason="the CPU extension is not usable")
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")


class Target(NamedTuple):
    backend: str
    device: str

    @property
    def name(self) -> str:
        return f"{self.backend}-gpu" if self.device == "cuda" and self.backend != "cuda" else self.backend

    @property
    def size(self) -> str:
        """The case size: "tiny" under the interpreter (10-35 ms per program instance)."""
        if self.device == "cuda":
            return "gpu"
        return "tiny" if self.backend == "triton" else "cpu"


CPU = Target("cpu", "cpu")
TRITON = Target("triton", "cpu")
TRITON_GPU = Target("triton", "cuda")
CUDA = Target("cuda", "cuda")
TORCH = Target("torch", "cpu")
TORCH_GPU = Target("torch", "cuda")
#: The fused backends: every op's targets.
FUSED = (CPU, TRITON, TRITON_GPU, CUDA)
#: The InfoNCE's targets: the fused ones and the plain PyTorch backend.
INFONCE_TARGETS = (*FUSED, TORCH, TORCH_GPU)

_MARKS = {
    CPU: [needs_cpu],
    TRITON: [
        needs_triton,
        pytest.mark.skipif(not INTERPRETER, reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1"),
    ],
    TRITON_GPU: [
        pytest.mark.gpu,
        needs_triton,
        pytest.mark.skipif(INTERPRETER, reason="TRITON_INTERPRET=1 interprets Triton"),
    ],
    CUDA: [pytest.mark.gpu],
    TORCH: [],
    TORCH_GPU: [pytest.mark.gpu],
}


def targets(*chosen: Target) -> list:
    """pytest params of the chosen targets (default: the four fused ones), each with its marks."""
    return [pytest.param(t, marks=_MARKS[t], id=t.name) for t in chosen or FUSED]


def cpu_backends(*, reference: bool = False) -> list:
    """pytest params of the backend names that run on CPU tensors here ("cpu" and the
    interpreted "triton"), and "reference" if asked: for tests whose tensors stay on the CPU."""
    params = [pytest.param(t.backend, marks=_MARKS[t], id=t.name) for t in (CPU, TRITON)]
    return params + ["reference"] if reference else params


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[1]


def grid(supported: dict[Target, tuple[torch.dtype, ...]]) -> list:
    """pytest params ("target,dtype") of the dtypes each target supports."""
    return [
        pytest.param(t, d, marks=_MARKS[t], id=f"{t.name}-{dtype_name(d)}")
        for t, dtypes in supported.items()
        for d in dtypes
    ]


HALF = (torch.float16, torch.bfloat16)
# The Triton interpreter computes bf16 wrongly (bf16 runs on the GPU tier). The InfoNCE computes
# float64 in double on the CPU and in the torch backend; the GPU kernels take it in float32,
# which the rule refuses.
INFONCE_GRID = grid(
    {
        CPU: (torch.float32, *HALF, torch.float64),
        TRITON: (torch.float32, torch.float16),
        TRITON_GPU: (torch.float32, *HALF),
        CUDA: (torch.float32, *HALF),
        TORCH: (torch.float32, *HALF, torch.float64),
        TORCH_GPU: (torch.float32, *HALF, torch.float64),
    }
)
PSEUDO_SUPERVISION_GRID = grid(
    {
        CPU: (torch.float32, torch.float64, *HALF),
        TRITON: (torch.float32, torch.float64, torch.float16),
        TRITON_GPU: (torch.float32, torch.float64, *HALF),
        CUDA: (torch.float32, torch.float64, *HALF),
    }
)


def check_against_reference(
    evaluate: Callable, target: Target, inputs, dtype: torch.dtype, *, factor: float = 2.0, label: str = ""
) -> tuple[dict, dict]:
    """Runs ``evaluate(backend, inputs)`` (a dict of named outputs; gradients named "grad*")
    on `target` and checks every output against the float64 reference.

    Args:
        inputs: the floating tensors to round to `dtype` (float64 reference: the rounded values
            in float64; the same-dtype reference and the target: the rounded values).

    Returns:
        (the target's outputs, the float64 outputs).
    """
    rounded = [x.to(dtype) for x in inputs]
    exact = evaluate("reference", [x.double() for x in rounded])
    same = evaluate("reference", rounded)
    actual = evaluate(target.backend, [x.to(target.device) for x in rounded])
    result_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name, value in actual.items():
        assert value.device.type == target.device, name
        assert value.dtype == (dtype if name.startswith("grad") else result_dtype), name
        assert torch.isfinite(value).all(), f"{name} has non-finite values"
        assert_close_to_reference(
            value,
            same[name],
            exact[name],
            dtype=dtype,
            factor=factor,
            name=f"{target.name}/{dtype_name(dtype)}{label}/{name}",
        )
    return actual, exact


# --------------------------------------------------------------------------------------------
# The voxel InfoNCE
# --------------------------------------------------------------------------------------------
#: Per case size: spatial shapes, channels and K per sampling mode.
INFONCE_SIZES = {
    "tiny": {"spatial": (4, 3, 2), "pool_spatial": (3, 3, 2), "channels": 12, "k": (7, 20)},
    "cpu": {"spatial": (5, 6, 4), "pool_spatial": (5, 4, 4), "channels": 12, "k": (16, 20)},
    "gpu": {"spatial": (8, 6, 5), "pool_spatial": (7, 6, 5), "channels": 32, "k": (70, 70)},
}


def infonce_case(spatial, channels=8, classes=2, pool_spatial=None, batch=1, pool_batch=1, dtype=torch.float32, seed=0):
    """[anchor, positive, pool] features in `dtype` and [anchor_logits, pool_logits] in float32."""
    g = torch.Generator().manual_seed(seed)
    pool_spatial = pool_spatial or spatial
    feats = [
        torch.randn(b, channels, *sp, generator=g, dtype=torch.float64)
        for b, sp in ((batch, spatial), (batch, spatial), (pool_batch, pool_spatial))
    ]
    logits = [torch.randn(b, classes, *sp, generator=g) * 2 for b, sp in ((batch, spatial), (pool_batch, pool_spatial))]
    return [f.to(dtype) for f in feats], logits


def sized_infonce_case(target: Target, sampling: str = "topk", **kw):
    """infonce_case at the target's size; returns (feats, logits, K)."""
    size = dict(INFONCE_SIZES[target.size])
    k = size.pop("k")[sampling == "random"]
    size.update(kw)
    return (*infonce_case(**size), k)


def infonce_run(backend, feats, logits, *, grad_out=None, seed=1234, **kw) -> dict:
    """Loss and the three input gradients; random sampling seeded by `seed` on every backend.

    The features become leaves as they are (same dtype, layout and device), the logits move to
    their device; grad_out (default: ones) is the backward's grad_output.
    """
    leaves = [f.detach().requires_grad_() for f in feats]
    device = leaves[0].device
    logits = [x.to(device) for x in logits]
    if kw.get("sampling") == "random" and "generator" not in kw:
        kw["generator"] = torch.Generator().manual_seed(seed)
    loss = rk.bidirectional_voxel_infonce(*leaves, *logits, backend=backend, **kw)
    grad_out = torch.ones_like(loss) if grad_out is None else grad_out.to(loss)
    loss.backward(grad_out)
    return {
        "loss": loss.detach(),
        "grad_anchor": leaves[0].grad,
        "grad_positive": leaves[1].grad,
        "grad_pool": leaves[2].grad,
    }


def check_infonce(
    target: Target, feats, logits, *, dtype=torch.float32, grad_out=None, factor=2.0, **kw
) -> tuple[dict, dict]:
    """The InfoNCE's loss and gradients on `target` against the float64 reference."""

    def evaluate(backend, rounded):
        return infonce_run(backend, rounded, logits, grad_out=grad_out, **kw)

    return check_against_reference(
        evaluate, target, feats, dtype, factor=factor, label=f"/{kw.get('sampling', 'topk')}"
    )


def random_grad_out(loss_shape, seed=5) -> torch.Tensor:
    """A non-uniform grad_output in [0.5, 1.5) for a loss of this shape."""
    return torch.rand(loss_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5


# --------------------------------------------------------------------------------------------
# The pseudo-supervision losses: L_urp, L_cr and one head's three losses in one op
# --------------------------------------------------------------------------------------------
#: Per case size: the (B, num_classes, *S) logits shape.
PSEUDO_SUPERVISION_SHAPES = {"tiny": (2, 5, 4, 3, 2), "cpu": (2, 5, 4, 3, 2), "gpu": (2, 5, 24, 20, 16)}
LAYOUTS = ("contiguous", "channels_last", "strided", "transposed")
URP_TEMPERATURE = 0.5


def logits(shape, scale=3.0, seed=0, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def _leaf_shape(shape, layout):
    if layout == "channels_last":
        return (shape[0], *shape[2:], shape[1])
    if layout == "strided":
        return (*shape[:-1], 2 * shape[-1])
    if layout == "transposed":
        return (*shape[:-2], shape[-1], shape[-2])
    return tuple(shape)


def as_layout(leaf: torch.Tensor, layout: str) -> torch.Tensor:
    """The logical-shape view of a leaf made by :func:`layout_leaves`."""
    if layout == "contiguous":
        return leaf
    if layout == "channels_last":
        return leaf.movedim(-1, 1)
    if layout == "strided":
        return leaf[..., ::2]
    if layout == "transposed":
        return leaf.transpose(-1, -2)
    raise AssertionError(layout)


def layout_leaves(tensors, layout: str) -> list[torch.Tensor]:
    """Leaves (requiring grad) holding `tensors` so that as_layout(leaf) has their values."""
    leaves = []
    for x in tensors:
        leaf = torch.empty(_leaf_shape(x.shape, layout), dtype=x.dtype, device=x.device)
        with torch.no_grad():
            as_layout(leaf, layout).copy_(x)
        leaves.append(leaf.requires_grad_())
    if layout != "contiguous":
        assert not as_layout(leaves[0], layout).is_contiguous()
    return leaves


def _grad_outputs(*losses):
    return [logits(loss.shape, 1.0, seed=11 + i, dtype=loss.dtype).to(loss.device) for i, loss in enumerate(losses)]


def rectified_and_cosine_run(backend, inputs, reduction, layout="contiguous") -> dict:
    """L_urp(student, teacher) and L_cr(student, other) with their gradients, for fixed
    non-uniform grad_outputs; `layout` applies to the non-reference backends."""
    layout = "contiguous" if backend == "reference" else layout
    leaves = layout_leaves(inputs, layout)
    student, teacher, other = (as_layout(leaf, layout) for leaf in leaves)
    urp = rk.rectified_pseudo_supervision(
        student, teacher, temperature=URP_TEMPERATURE, reduction=reduction, backend=backend
    )
    cr = rk.logit_cosine_consistency(student, other, reduction=reduction, backend=backend)
    g_urp, g_cr = _grad_outputs(urp, cr)
    (grad_urp,) = torch.autograd.grad(urp, leaves[0], g_urp)
    grad_cr_a, grad_cr_b = torch.autograd.grad(cr, (leaves[0], leaves[2]), g_cr)
    return {
        "urp": urp,
        "cr": cr,
        "grad_urp": as_layout(grad_urp, layout),
        "grad_cr_a": as_layout(grad_cr_a, layout),
        "grad_cr_b": as_layout(grad_cr_b, layout),
    }


def pseudo_supervision_losses_run(backend, inputs, reduction, layout="contiguous") -> dict:
    """rk.pseudo_supervision_losses(view_a, view_b, teacher) and the views' gradients, for
    fixed non-uniform grad_outputs; `layout` applies to the non-reference backends."""
    layout = "contiguous" if backend == "reference" else layout
    view_a, view_b, teacher = inputs
    leaves = layout_leaves((view_a, view_b), layout)
    a, b = (as_layout(leaf, layout) for leaf in leaves)
    urp, cr = rk.pseudo_supervision_losses(a, b, teacher, reduction=reduction, backend=backend)
    grad_a, grad_b = torch.autograd.grad((urp, cr), leaves, _grad_outputs(urp, cr))
    return {"urp": urp, "cr": cr, "grad_a": as_layout(grad_a, layout), "grad_b": as_layout(grad_b, layout)}


def check_pseudo_supervision(run: Callable, target: Target, inputs, dtype, reduction, layout="contiguous"):
    """`run` (rectified_and_cosine_run or pseudo_supervision_losses_run) on `target` against the float64 reference."""

    def evaluate(backend, rounded):
        return run(backend, rounded, reduction, layout)

    actual, _ = check_against_reference(evaluate, target, inputs, dtype, label=f"/{reduction}/{layout}")
    return actual
