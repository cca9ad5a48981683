"""rk.pseudo_supervision_losses (one head's L_urp on two views and L_cr, in one op) against the
float64 reference by the rule of docs/design.md section 5, and against the two separate functions.

Triton runs under TRITON_INTERPRET=1 on CPU tensors; the CUDA tier is marked ``gpu``.
"""
from __future__ import annotations

import pytest
import torch

import rcps_kernels as rk
from numerics import assert_close_to_reference
from test_pseudo_supervision import CPU_BACKENDS, as_layout, leaf_shape, logits, needs_cpu

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter's masked lanes
NAMES = ("urp", "cr", "grad_a", "grad_b")


def evaluate(backend, view_a, view_b, teacher, reduction, layout="contiguous", device=None):
    """(l_urp, l_cr, grad of view_a, grad of view_b) for fixed non-uniform grad_outputs; inputs
    are cast into leaves laid out as `layout` on `device`."""
    device = device or view_a.device
    leaves = []
    for x in (view_a, view_b):
        leaf = torch.empty(leaf_shape(x.shape, layout), dtype=x.dtype, device=device)
        with torch.no_grad():
            as_layout(leaf, layout).copy_(x)
        leaves.append(leaf.requires_grad_())
    a, b = (as_layout(leaf, layout) for leaf in leaves)
    urp, cr = rk.pseudo_supervision_losses(a, b, teacher.to(device), reduction=reduction,
                                           backend=backend)
    g_urp = logits(urp.shape, 1.0, seed=11, dtype=urp.dtype).to(device)
    g_cr = logits(cr.shape, 1.0, seed=12, dtype=cr.dtype).to(device)
    grad_a, grad_b = torch.autograd.grad((urp, cr), leaves, (g_urp, g_cr))
    return urp, cr, as_layout(grad_a, layout), as_layout(grad_b, layout)


def check(backend, dtype, reduction, layout="contiguous", shape=(2, 3, 5, 4, 3), device=None):
    view_a, view_b, teacher = (logits(shape, seed=s).to(dtype) for s in (41, 42, 43))
    teacher[:, 0, :1] = float("-inf")  # a class ruled out by the teacher
    exact = evaluate("reference", view_a.double(), view_b.double(), teacher.double(), reduction)
    same = evaluate("reference", view_a, view_b, teacher, reduction)
    actual = evaluate(backend, view_a, view_b, teacher, reduction, layout, device)
    for name, x, y, z in zip(NAMES, actual, same, exact):
        assert torch.isfinite(x).all(), name
        assert_close_to_reference(x, y, z, dtype=dtype, name=f"{backend}/{layout}/{name}")
    return actual


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_reference_fp32(backend, reduction, layout):
    check(backend, torch.float32, reduction, layout)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[1])
def test_matches_reference_other_dtypes(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 wrongly; tested on a GPU")
    check(backend, dtype, "mean", shape=(1, 17, 4, 3))


@needs_cpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_equals_the_two_separate_functions(reduction):
    shape = (2, 4, 6, 5)
    view_a, view_b, teacher = (logits(shape, seed=s).float() for s in (44, 45, 46))
    one_op = evaluate("cpu", view_a, view_b, teacher, reduction)

    a, b = view_a.clone().requires_grad_(), view_b.clone().requires_grad_()
    urp = (rk.rectified_pseudo_supervision(a, teacher, reduction=reduction, backend="cpu")
           + rk.rectified_pseudo_supervision(b, teacher, reduction=reduction, backend="cpu"))
    cr = rk.logit_cosine_consistency(a, b, reduction=reduction, backend="cpu")
    g_urp = logits(urp.shape, 1.0, seed=11, dtype=urp.dtype)
    g_cr = logits(cr.shape, 1.0, seed=12, dtype=cr.dtype)
    separate = (urp, cr, *torch.autograd.grad((urp, cr), (a, b), (g_urp, g_cr)))
    for name, x, y in zip(NAMES, one_op, separate):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
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
def test_torch_compile_fullgraph_and_opcheck():
    torch._dynamo.reset()
    shape = (2, 3, 4, 5)
    view_a, view_b, teacher = (logits(shape, seed=s).float() for s in (50, 51, 52))

    def head(a, b, t):
        urp, cr = rk.pseudo_supervision_losses(a, b, t, backend="cpu")
        return urp + 2 * cr

    a, b = view_a.clone().requires_grad_(), view_b.clone().requires_grad_()
    eager = (head(a, b, teacher), *torch.autograd.grad(head(a, b, teacher), (a, b)))
    a2, b2 = view_a.clone().requires_grad_(), view_b.clone().requires_grad_()
    compiled_fn = torch.compile(head, fullgraph=True)
    loss = compiled_fn(a2, b2, teacher)
    compiled = (loss, *torch.autograd.grad(loss, (a2, b2)))
    for x, y in zip(compiled, eager):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)

    ops = torch.ops.rcps
    torch.library.opcheck(ops.pseudo_supervision_losses.default,
                          (a, b, teacher, 0.5, 1e-8, "mean", "cpu"))
    torch.library.opcheck(ops.pseudo_supervision_losses_backward.default,
                          (torch.ones(()), torch.ones(()), view_a, view_b, teacher, 0.5, 1e-8,
                           "mean", "cpu"))


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


@pytest.mark.parametrize("mutate,kwargs,match", [
    (lambda a, b, t: (a, b[:, :, :-1], t), {}, "view_a and view_b must have the same shape"),
    (lambda a, b, t: (a, b, t[:, :2]), {}, "view_a and teacher_logits must have the same shape"),
    (lambda a, b, t: (a[:, :1], b[:, :1], t[:, :1]), {}, "view_a needs at least 2 classes"),
    (lambda a, b, t: (a, b, t), {"temperature": 0.0}, "temperature must be > 0"),
    (lambda a, b, t: (a, b, t), {"eps": -1.0}, "eps must be > 0"),
    (lambda a, b, t: (a, b.index_fill(1, torch.tensor([0]), float("nan")), t), {},
     "view_b contains NaN"),
])
def test_bad_inputs_raise_value_errors_naming_the_argument(mutate, kwargs, match):
    shape = (1, 3, 4, 4)
    inputs = mutate(*(logits(shape, seed=s).float() for s in (53, 54, 55)))
    with pytest.raises(ValueError, match=match):
        rk.pseudo_supervision_losses(*inputs, backend="reference" if "NaN" in match else "auto",
                                     **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_backends_match_reference(backend, dtype, reduction):
    actual = check(backend, dtype, reduction, device="cuda")
    assert all(x.is_cuda for x in actual)
