"""rk.pseudo_supervision_losses (one head's L_urp on two views and L_cr, in one op) against the
float64 reference by the rule of docs/design.md section 5, and against the two separate functions.

The op template (tests/kernels/op_template.py) runs every target: "cpu", "triton" under
TRITON_INTERPRET=1 on CPU tensors, and "triton"/"cuda" on CUDA tensors, marked ``gpu``.
"""

from __future__ import annotations

import pytest
import torch

import rcps_kernels as rk
from tests.kernels.op_template import (
    PSEUDO_SUPERVISION_GRID,
    PSEUDO_SUPERVISION_SHAPES,
    check_pseudo_supervision,
    cpu_backends,
    logits,
    needs_cpu,
    pseudo_supervision_losses_run,
    targets,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter's masked lanes
NAMES = ("urp", "cr", "grad_a", "grad_b")


def pseudo_supervision_inputs(shape, dtype=torch.float64):
    view_a, view_b, teacher = (logits(shape, seed=s, dtype=dtype) for s in (41, 42, 43))
    teacher[:, 0, :1] = float("-inf")  # a class ruled out by the teacher
    return view_a, view_b, teacher


@pytest.mark.parametrize("target,dtype", PSEUDO_SUPERVISION_GRID)
@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_reference(target, dtype, reduction, layout):
    check_pseudo_supervision(
        pseudo_supervision_losses_run,
        target,
        pseudo_supervision_inputs(PSEUDO_SUPERVISION_SHAPES[target.size]),
        dtype,
        reduction,
        layout,
    )


@pytest.mark.parametrize("target,dtype", PSEUDO_SUPERVISION_GRID)
def test_many_classes(target, dtype):
    check_pseudo_supervision(
        pseudo_supervision_losses_run, target, pseudo_supervision_inputs((1, 17, 4, 3)), dtype, "mean"
    )


@needs_cpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_equals_the_two_separate_functions(reduction):
    shape = (2, 4, 6, 5)
    view_a, view_b, teacher = (logits(shape, seed=s).float() for s in (44, 45, 46))
    one_op = pseudo_supervision_losses_run("cpu", (view_a, view_b, teacher), reduction)

    a, b = view_a.clone().requires_grad_(), view_b.clone().requires_grad_()
    urp = rk.rectified_pseudo_supervision(
        a, teacher, reduction=reduction, backend="cpu"
    ) + rk.rectified_pseudo_supervision(b, teacher, reduction=reduction, backend="cpu")
    cr = rk.logit_cosine_consistency(a, b, reduction=reduction, backend="cpu")
    g_urp = logits(urp.shape, 1.0, seed=11, dtype=urp.dtype)
    g_cr = logits(cr.shape, 1.0, seed=12, dtype=cr.dtype)
    separate = (urp, cr, *torch.autograd.grad((urp, cr), (a, b), (g_urp, g_cr)))
    for name, y in zip(NAMES, separate, strict=True):
        x = one_op[name]
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", cpu_backends(reference=True))
def test_only_the_views_that_ask_get_gradient(backend):
    shape = (1, 3, 4)
    view_a = logits(shape, seed=47).float().requires_grad_()
    view_b = logits(shape, seed=48).float()
    teacher = logits(shape, seed=49).float().requires_grad_()
    urp, cr = rk.pseudo_supervision_losses(view_a, view_b, teacher, backend=backend)
    (urp + cr).backward()
    assert view_a.grad is not None and view_a.grad.abs().sum() > 0
    assert view_b.grad is None and teacher.grad is None


@needs_cpu
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    shape = (2, 3, 4, 5)
    view_a, view_b, teacher = (logits(shape, seed=s).float() for s in (50, 51, 52))

    def losses(a, b, t):
        urp, cr = rk.pseudo_supervision_losses(a, b, t, backend="cpu")
        return urp + 2 * cr

    a, b = view_a.clone().requires_grad_(), view_b.clone().requires_grad_()
    eager = (losses(a, b, teacher), *torch.autograd.grad(losses(a, b, teacher), (a, b)))
    a2, b2 = view_a.clone().requires_grad_(), view_b.clone().requires_grad_()
    compiled_fn = torch.compile(losses, fullgraph=True)
    loss = compiled_fn(a2, b2, teacher)
    compiled = (loss, *torch.autograd.grad(loss, (a2, b2)))
    for x, y in zip(compiled, eager):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", targets())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(target, reduction):
    # The ops take the (B, num_classes, P) views the public function makes.
    view_a, view_b, teacher = (logits((2, 3, 20), seed=s).float().to(target.device) for s in (50, 51, 52))
    a, b = view_a.clone().requires_grad_(), view_b.clone().requires_grad_()
    grad = (torch.ones(()) if reduction != "none" else torch.randn(2, 20)).to(target.device)
    ops = torch.ops.rcps
    torch.library.opcheck(ops.pseudo_supervision_losses.default, (a, b, teacher, 0.5, 1e-8, reduction, target.backend))
    torch.library.opcheck(
        ops.pseudo_supervision_losses_backward.default,
        (grad, 2 * grad, view_a, view_b, teacher, 0.5, 1e-8, reduction, target.backend),
    )


@needs_cpu
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_double_precision_gradcheck(reduction):
    # float64 is computed in float64 by the fused kernels, and the one-op backward recomputes
    # from the saved logits, so any reduction takes gradcheck's repeated backward passes.
    shape = (1, 3, 2, 3)
    view_a, view_b = (logits(shape, seed=s).requires_grad_() for s in (56, 57))
    teacher = logits(shape, seed=58)
    teacher[0, 1, 0, 0] = float("-inf")

    def both(a, b):
        return rk.pseudo_supervision_losses(a, b, teacher, reduction=reduction, backend="cpu")

    assert torch.autograd.gradcheck(both, (view_a, view_b))
