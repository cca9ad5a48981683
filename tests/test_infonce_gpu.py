"""GPU tier of the voxel InfoNCE: every backend on CUDA tensors against the float64 reference.

All tests but the first are ``@pytest.mark.gpu`` (skipped without a CUDA device). The first
checks, on any machine whose torch has a CUDA build, that the CUDA extension imports and
registers its ops.
"""
from __future__ import annotations

import pytest
import torch

import rcps_kernels as rk
from rcps_kernels._extension import load_cuda_extension
from rcps_kernels.ops import infonce as ops
from rcps_kernels.selection import eligible_negatives, pseudo_labels, select_confident_negatives

from numerics import assert_close_to_reference, assert_relative_error_below, confident_features


def test_cuda_extension_registers_ops():
    if torch.version.cuda is None:
        pytest.skip("this torch build has no CUDA")
    assert load_cuda_extension() is None, load_cuda_extension()
    assert hasattr(torch.ops.rcps_cuda, "voxel_infonce_cuda")
    assert hasattr(torch.ops.rcps_cuda, "random_draws_cuda")
    from rcps_kernels.ops import infonce_cuda  # noqa: F401  (registers the "cuda" kernel)

    assert "cuda" in ops._KERNELS


DEV = "cuda"
GPU_BACKENDS = ["cpu", "triton", "cuda", "reference"]


def make_inputs(dtype, *, spatial=(8, 6, 5), pool=(7, 6, 5), channels=32, classes=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(1, channels, *spatial, generator=g)
    p = a + 0.5 * torch.randn(1, channels, *spatial, generator=g)
    n = torch.randn(1, channels, *pool, generator=g)
    al = torch.randn(1, classes, *spatial, generator=g)
    nl = 2 * torch.randn(1, classes, *pool, generator=g)
    return [t.to(dtype) for t in (a, p, n)], al, nl


def run(feats, al, nl, *, backend, reduction="mean", grad_out=1.0, device=DEV, **kw):
    if backend == "cpu":
        device = "cpu"
    leaves = [t.detach().to(device).clone().requires_grad_() for t in feats]
    al, nl = al.to(device), nl.to(device)
    gen = torch.Generator().manual_seed(4321)
    loss = rk.bidirectional_voxel_infonce(*leaves, al, nl, reduction=reduction, backend=backend,
                                          generator=gen, **kw)
    go = grad_out.to(device) if isinstance(grad_out, torch.Tensor) else grad_out
    (loss * go).sum().backward()
    return [loss.detach().cpu()] + [t.grad.cpu() for t in leaves]


def check_against_reference(feats, al, nl, backend, dtype, *, grad_out, **kw):
    """Loss and the three gradients of `backend` on CUDA against the float64 reference (the rule
    of docs/design.md section 5); returns (actual, float64) for further checks."""
    actual = run(feats, al, nl, backend=backend, grad_out=grad_out, **kw)
    same = run(feats, al, nl, backend="reference", grad_out=grad_out, **kw)
    gt = run([f.double() for f in feats], al.double(), nl.double(), backend="reference",
             device="cpu", grad_out=grad_out.double(), **kw)
    for name, x, y, z in zip(("loss", "grad_anchor", "grad_positive", "grad_negative"),
                             actual, same, gt):
        assert torch.isfinite(x).all(), name
        assert_close_to_reference(x, y, z, dtype=dtype, name=f"{backend} {name}")
    return actual, gt


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sampling", ["topk", "random"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backend_matches_reference(backend, dtype, sampling, reduction):
    feats, al, nl = make_inputs(dtype)
    go = (torch.rand((1, 8, 6, 5) if reduction == "none" else ()) + 0.5)
    kw = dict(num_negatives=70, sampling=sampling, reduction=reduction, grad_out=go)
    if sampling == "random":
        kw["confidence_threshold"] = 0.6
    check_against_reference(feats, al, nl, backend, dtype, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("sampling", ["topk", "random"])
def test_confident_anchors_keep_a_tiny_loss_accurate(backend, sampling):
    # Per-anchor losses ~1e-3 under logits ~20: the kernel must not form them as lse - x.
    feats = [f.float() for f in confident_features(channels=32, spatial=(8, 6, 5),
                                                   pool_spatial=(7, 6, 5))]
    _, al, nl = make_inputs(torch.float32)
    go = torch.rand((1, 8, 6, 5)) + 0.5
    kw = dict(num_negatives=70, sampling=sampling, temperature=0.05, reduction="none",
              grad_out=go)
    actual, gt = check_against_reference(feats, al, nl, backend, torch.float32, **kw)
    # The fp32 reference forms them as lse - x itself, so the loss also gets a relative bound.
    assert_relative_error_below(actual[0], gt[0], rtol=1e-5, name=f"{backend} loss")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("sampling", ["topk", "random"])
def test_gpu_backend_matches_cpu_kernel(backend, sampling):
    feats, al, nl = make_inputs(torch.float32, classes=3, channels=64, seed=2)
    kw = dict(num_negatives=100, sampling=sampling)
    actual = run(feats, al, nl, backend=backend, **kw)
    expected = run(feats, al, nl, backend="cpu", **kw)
    for x, y in zip(actual, expected):
        torch.testing.assert_close(x, y, rtol=2e-4, atol=2e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("sampling", ["topk", "random"])
def test_deterministic_bitwise(backend, sampling):
    feats, al, nl = make_inputs(torch.float32, spatial=(16, 16, 8), pool=(16, 16, 8),
                                channels=64)
    kw = dict(num_negatives=200, sampling=sampling, deterministic=True)
    first = run(feats, al, nl, backend=backend, **kw)
    for _ in range(3):
        again = run(feats, al, nl, backend=backend, **kw)
        for x, y in zip(first, again):
            assert torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.parametrize("seed,offset", [(0, 0), (987654321, 11), (2**62 + 5, 2**33 + 1)])
def test_random_draws_identical_across_backends(seed, offset):
    from rcps_kernels.ops.infonce_cuda import random_draws_cuda
    from rcps_kernels.ops.infonce_triton import random_draws_triton
    from rcps_kernels.reference.infonce import random_negative_draws_reference

    _, al, nl = make_inputs(torch.float32, classes=3, spatial=(12, 10, 6), pool=(12, 10, 6))
    labels, _ = pseudo_labels(al)
    idx, cnt = eligible_negatives(nl, 0.4, 3)
    K = 333
    cpu = ops.random_draws(labels, idx, cnt, K, seed, offset)
    ref = random_negative_draws_reference(labels, idx, cnt, K, seed, offset)
    tri = random_draws_triton(labels.to(DEV), idx.to(DEV), cnt.to(DEV), K, seed, offset).cpu()
    cu = random_draws_cuda(labels.to(DEV), idx.to(DEV), cnt.to(DEV), K, seed, offset).cpu()
    assert torch.equal(cpu, ref) and torch.equal(tri, cpu) and torch.equal(cu, cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_torch_compile_fullgraph(backend):
    feats, al, nl = make_inputs(torch.float32)
    a, p, n = (t.to(DEV).requires_grad_() for t in feats)
    al, nl = al.to(DEV), nl.to(DEV)

    def f(a, p, n, al, nl):
        return rk.bidirectional_voxel_infonce(a, p, n, al, nl, num_negatives=50, backend=backend)

    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(a, p, n, al, nl)
    loss.backward()
    grads = [t.grad.clone() for t in (a, p, n)]
    for t in (a, p, n):
        t.grad = None
    eager = f(a, p, n, al, nl)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for x, t in zip(grads, (a, p, n)):
        torch.testing.assert_close(x, t.grad)


@pytest.mark.gpu
def test_torch_compile_cuda_graphs_follow_new_inputs():
    """mode="reduce-overhead" replays the call as CUDA graphs: every step with new values (same
    shapes) must give the eager loss and gradients, not the recorded step's."""

    def f(a, p, n, al, nl):
        return rk.bidirectional_voxel_infonce(a, p, n, al, nl, num_negatives=50,
                                              backend="triton")

    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for step in range(4):  # warm-up, recording, then replays
        feats, al, nl = make_inputs(torch.float32, seed=step)
        al, nl = al.to(DEV), nl.to(DEV)
        results = []
        for fn in (compiled, f):
            leaves = [t.to(DEV).requires_grad_() for t in feats]
            torch.compiler.cudagraph_mark_step_begin()
            loss = fn(*leaves, al, nl)
            loss.backward()
            results.append([loss.detach().clone()] + [t.grad for t in leaves])
        for got, want in zip(*results):
            torch.testing.assert_close(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("random", [False, True])
def test_opcheck(impl, random):
    feats, al, nl = make_inputs(torch.float32, spatial=(4, 4, 3), pool=(4, 4, 3), channels=16)
    a, p, n = (f.reshape(1, 16, -1).to(DEV).requires_grad_() for f in feats)
    labels, _ = pseudo_labels(al.to(DEV))
    if random:
        idx, cnt = eligible_negatives(nl.to(DEV), 0.0, 2)
    else:
        idx, cnt = select_confident_negatives(nl.to(DEV), 10, 2)
    args = (a, p, n, labels, idx, cnt, 0.1, 10, random, 7, 0, impl)
    torch.library.opcheck(torch.ops.rcps.voxel_infonce_loss.default, args)
    torch.library.opcheck(torch.ops.rcps.voxel_infonce_mean.default, (*args, True))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_large_index_offsets(backend):
    """More than 2^31 elements in the anchor map: offsets voxel * C must be 64-bit."""
    free, _ = torch.cuda.mem_get_info()
    N, C = 2**25 + 1000, 64  # 2^31 + 64000 elements per feature map
    need = N * C * 2 * 2 * 3 + N * C * 4 * 4  # fp16 inputs + grads + fp32 normalised copies
    if free < need * 1.3:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB of free GPU memory")
    g = torch.Generator(device=DEV).manual_seed(0)
    a = torch.randn(1, C, N, device=DEV, dtype=torch.float16, generator=g).requires_grad_()
    p = torch.randn(1, C, N, device=DEV, dtype=torch.float16, generator=g).requires_grad_()
    n = torch.randn(1, C, 4096, device=DEV, dtype=torch.float16, generator=g).requires_grad_()
    al = torch.randn(1, 2, N, device=DEV, generator=g)
    nl = torch.randn(1, 2, 4096, device=DEV, generator=g)
    loss = rk.bidirectional_voxel_infonce(a, p, n, al, nl, num_negatives=16, backend=backend)
    loss.backward()
    assert torch.isfinite(loss)
    # The last anchors (beyond 2^31 / C voxels) are checked against the reference on a slice.
    tail = slice(N - 256, N)
    sub = [t.detach()[:, :, tail].float().clone().requires_grad_() for t in (a, p)]
    labels, _ = pseudo_labels(al)
    idx, cnt = select_confident_negatives(nl, 16, 2)
    per_anchor = ops._kernel(backend)(a.detach(), p.detach(), n.detach(), labels, idx, cnt, 0.1,
                                      16, False, 0, 0, None, 0.0, False)[0]
    ref = rk.bidirectional_voxel_infonce(sub[0], sub[1], n.detach().float(), al[:, :, tail], nl,
                                         num_negatives=16, backend="reference", reduction="none")
    torch.testing.assert_close(per_anchor[tail].cpu(), ref.flatten().float().cpu(), rtol=2e-3,
                               atol=2e-3)
    assert torch.isfinite(a.grad[:, :, tail]).all() and a.grad[:, :, tail].abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("classes", [2, 5])
@pytest.mark.parametrize("num_anchors", [1, 1023, 15680, 2**16 + 1])
def test_triton_class_order_equals_the_sort(classes, num_anchors):
    # The single-program kernel up to 2^16 anchors, the sort past it: both a stable partition.
    from rcps_kernels.ops.infonce_triton import _class_order
    from rcps_kernels.selection import anchor_class_order

    g = torch.Generator().manual_seed(num_anchors)
    labels = torch.randint(0, classes, (num_anchors,), generator=g).to(DEV)
    got = _class_order(labels, classes)
    expected = anchor_class_order(labels, classes, use_extension=False)
    assert all(torch.equal(x, y) for x, y in zip(got, expected, strict=True))
