"""Triton backend of the voxel InfoNCE under TRITON_INTERPRET=1 (CPU tensors), against the
float64 reference (docs/design.md section 5) and the CPU kernel's random draws.

Shapes are tiny: every Triton program instance costs 10-35 ms in the interpreter.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import rcps_kernels as rk
from rcps_kernels._backend import deterministic_override
from rcps_kernels.ops import infonce as ops
from rcps_kernels.reference.infonce import philox_randint, random_negative_draws_reference
from rcps_kernels.selection import (anchor_class_order, eligible_negatives, pseudo_labels,
                                    select_confident_negatives)

from numerics import assert_close_to_reference, assert_relative_error_below, confident_features

pytest.importorskip("triton")
T = pytest.importorskip("rcps_kernels.ops.infonce_triton")

# The interpreter evaluates both branches of tl.where: (-inf) - (-inf) in masked lanes of the
# random kernel's online log-sum-exp warns in numpy, and is discarded.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def make_inputs(dtype, *, spatial=(4, 3, 2), pool=(3, 3, 2), channels=12, classes=2, seed=0,
                bn=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(1, channels, *spatial, generator=g)
    p = a + 0.5 * torch.randn(1, channels, *spatial, generator=g)
    n = torch.randn(bn, channels, *pool, generator=g)
    al = torch.randn(1, classes, *spatial, generator=g)
    nl = 2 * torch.randn(bn, classes, *pool, generator=g)
    return [t.to(dtype) for t in (a, p, n)], al, nl


def run(feats, al, nl, *, backend, reduction, grad_out, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in feats]
    gen = torch.Generator().manual_seed(1234)  # same Philox seed for every backend
    loss = rk.bidirectional_voxel_infonce(*leaves, al, nl, reduction=reduction, backend=backend,
                                          generator=gen, **kw)
    (loss * grad_out).sum().backward()
    return [loss.detach()] + [t.grad for t in leaves]


def check_against_reference(dtype, reduction, feats=None, **kw):
    made, al, nl = make_inputs(dtype)
    feats = made if feats is None else [f.to(dtype) for f in feats]
    shape = (1, 4, 3, 2) if reduction == "none" else ()
    grad_out = torch.rand(shape, generator=torch.Generator().manual_seed(5)) + 0.5
    actual = run(feats, al, nl, backend="triton", reduction=reduction, grad_out=grad_out, **kw)
    same = run(feats, al, nl, backend="reference", reduction=reduction, grad_out=grad_out, **kw)
    gt = run([f.double() for f in feats], al.double(), nl.double(), backend="reference",
             reduction=reduction, grad_out=grad_out.double(), **kw)
    for name, x, y, z in zip(("loss", "grad_anchor", "grad_positive", "grad_negative"),
                             actual, same, gt):
        assert x is not None, name
        if name != "loss":
            assert x.dtype == dtype, name
        assert_close_to_reference(x, y, z, dtype=dtype, name=f"{name} ({dtype}, {reduction})")
    return actual


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_topk_matches_reference(dtype, reduction):
    # K=7 of 18 pool voxels, 2 classes: banks of up to 7, several anchor tiles and bank blocks.
    check_against_reference(dtype, reduction, num_negatives=7, sampling="topk")


@pytest.mark.parametrize("sampling", ["topk", "random"])
def test_confident_anchors_keep_a_tiny_loss_accurate(sampling):
    # Per-anchor losses ~1e-3 under logits ~20: the kernel must not form them as lse - x.
    feats = confident_features(channels=12, spatial=(4, 3, 2), pool_spatial=(3, 3, 2))
    # The fp32 reference forms them that way itself, so the loss also gets a relative bound.
    kw = dict(sampling=sampling, num_negatives=4, temperature=0.05)
    loss = check_against_reference(torch.float32, "none", feats=feats, **kw)[0]
    _, al, nl = make_inputs(torch.float32)
    gt = rk.bidirectional_voxel_infonce(*feats, al.double(), nl.double(), backend="reference",
                                        generator=torch.Generator().manual_seed(1234),
                                        reduction="none", **kw)
    assert_relative_error_below(loss, gt, rtol=1e-5, name="loss")


@pytest.mark.parametrize("sampling", ["topk", "random"])
@pytest.mark.parametrize("temperature,scale", [(1e-8, 1.0), (1e-30, 1.0), (0.1, 1e19),
                                               (1e-6, 1e30)])
def test_small_temperatures_and_huge_norms(sampling, temperature, scale):
    # Logits ~1/tau, where a softmax weight formed as exp(logit - lse) is off by exp(+-ulp(lse)):
    # 16 draws from ~9 eligible voxels repeat negatives (exact ties) in random mode. And norms
    # whose square overflows float32 (such features were normalised as zero).
    feats, _, _ = make_inputs(torch.float32)
    check_against_reference(torch.float32, "none", feats=[f * scale for f in feats],
                            sampling=sampling, num_negatives=16, temperature=temperature)


def test_topk_bank_spans_blocks_three_classes():
    # K=20 > BLOCK_N=16 (two bank blocks), 3 classes whose banks overlap (scatter in class order).
    feats, al, nl = make_inputs(torch.float32, classes=3, pool=(4, 3, 3), seed=3)
    actual = run(feats, al, nl, backend="triton", reduction="sum", grad_out=torch.tensor(0.7),
                 num_negatives=20)
    same = run(feats, al, nl, backend="reference", reduction="sum", grad_out=torch.tensor(0.7),
               num_negatives=20)
    gt = run([f.double() for f in feats], al.double(), nl.double(), backend="reference",
             reduction="sum", grad_out=torch.tensor(0.7, dtype=torch.float64), num_negatives=20)
    for x, y, z in zip(actual, same, gt):
        assert_close_to_reference(x, y, z, dtype=torch.float32)


@pytest.mark.parametrize("dtype,reduction", [(torch.float32, "mean"), (torch.float32, "none"),
                                             (torch.float16, "mean")])
def test_random_matches_reference(dtype, reduction):
    # K=20 > BLOCK_K=16: two draw blocks per anchor; threshold leaves part of the pool eligible.
    check_against_reference(dtype, reduction, num_negatives=20, sampling="random",
                            confidence_threshold=0.6)


def _kernel_args(random, *, classes=3, K=9, seed=77, offset=0, weight=True):
    feats, al, nl = make_inputs(torch.float32, classes=classes, seed=11, bn=2)
    labels, _ = pseudo_labels(al)
    if random:
        idx, cnt = eligible_negatives(nl, 0.0, classes)
    else:
        idx, cnt = select_confident_negatives(nl, K, classes)
    z = [f.reshape(f.shape[0], f.shape[1], -1) for f in feats]
    w = torch.rand(labels.numel(), generator=torch.Generator().manual_seed(2)) if weight else None
    return (*z, labels, idx, cnt, 0.2, K, random, seed, offset, w, 0.37, True)


@pytest.mark.parametrize("random", [False, True])
def test_kernel_matches_cpu_kernel_with_weights(random):
    args = _kernel_args(random)
    actual = T.voxel_infonce_triton(*args)
    expected = ops._kernel("cpu")(*args)
    for x, y in zip(actual, expected):
        assert x.shape == y.shape and x.dtype == y.dtype
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_kernel_loss_only_returns_empty_grads():
    args = list(_kernel_args(False))
    args[-2] = 0.0  # grad_scale == 0: loss only
    loss, g1, g2, gn = T.voxel_infonce_triton(*args)
    assert g1.numel() == g2.numel() == gn.numel() == 0
    torch.testing.assert_close(loss, ops._kernel("cpu")(*args)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed,offset", [(0, 0), (123456789, 5), (2**62 + 17, 2**33 + 3)])
def test_random_draws_bit_identical_to_cpu(seed, offset):
    _, al, nl = make_inputs(torch.float32, classes=3, spatial=(5, 4, 2), seed=4)
    labels, _ = pseudo_labels(al)
    idx, cnt = eligible_negatives(nl, 0.3, 3)
    K = 37
    triton_draws = T.random_draws_triton(labels, idx, cnt, K, seed, offset)
    cpu_draws = ops.random_draws(labels, idx, cnt, K, seed, offset)
    numpy_draws = random_negative_draws_reference(labels, idx, cnt, K, seed, offset)
    assert torch.equal(triton_draws, cpu_draws)
    assert torch.equal(triton_draws, numpy_draws)
    assert (triton_draws >= 0).any()
    # The public helper (CPU kernel) agrees too.
    public = rk.random_negative_draws(al, nl, num_negatives=K, seed=seed,
                                      confidence_threshold=0.3, offset=offset)
    assert torch.equal(triton_draws, public)


def test_random_draws_differ_with_seed_and_offset():
    _, al, nl = make_inputs(torch.float32, seed=4)
    labels, _ = pseudo_labels(al)
    idx, cnt = eligible_negatives(nl, 0.0, 2)
    base = T.random_draws_triton(labels, idx, cnt, 16, 1, 0)
    assert not torch.equal(base, T.random_draws_triton(labels, idx, cnt, 16, 2, 0))
    assert not torch.equal(base, T.random_draws_triton(labels, idx, cnt, 16, 1, 1))


def test_philox_layout_matches_tl_randint_counter_words():
    # Counter 2^32 + 5 must use (lo, hi) = (5, 1): compare a draw whose hi word is non-zero.
    _, al, nl = make_inputs(torch.float32, seed=4)
    labels = torch.zeros(1, dtype=torch.int64)
    idx = torch.arange(2**20, dtype=torch.int64).reshape(1, -1).repeat(2, 1)
    cnt = torch.full((2,), 2**20, dtype=torch.int64)
    draws = T.random_draws_triton(labels, idx, cnt, 4, 99, 2**32 + 5)
    r = philox_randint(99, np.arange(4, dtype=np.uint64) + np.uint64(2**32 + 5)).astype(np.uint64)
    expected = torch.from_numpy(((r * np.uint64(2**20)) >> np.uint64(32)).astype(np.int64))
    assert torch.equal(draws[0], expected)


def test_random_deterministic_mode_is_bitwise_reproducible():
    args = _kernel_args(True, classes=2, K=24)
    with deterministic_override(True):
        first = T.voxel_infonce_triton(*args)
        second = T.voxel_infonce_triton(*args)
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    for x, y in zip(first, ops._kernel("cpu")(*args)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_topk_is_bitwise_reproducible():
    args = _kernel_args(False)
    first = T.voxel_infonce_triton(*args)
    second = T.voxel_infonce_triton(*args)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_edge_cases_single_class_zero_norm_layouts():
    feats, al, nl = make_inputs(torch.float32, seed=6)
    a, p, n = feats
    a = a.clone()
    a[:, :, 0, 0, 0] = 0.0  # a zero-norm anchor (u = 0)
    # channels_last_3d anchor and a non-contiguous (transposed-copy) positive.
    a_cl = a.contiguous(memory_format=torch.channels_last_3d)
    p_nc = p.transpose(2, 3).contiguous().transpose(2, 3)
    al1 = al.clone()
    al1[:, 0] += 100.0  # every anchor is class 0
    for kw in ({"num_negatives": 50},  # K larger than the pool
               {"num_negatives": 6, "sampling": "random"}):
        for logits in (al, al1):
            go = torch.tensor(1.3)
            actual = run([a_cl, p_nc, n], logits, nl, backend="triton", reduction="mean",
                         grad_out=go, **kw)
            gt = run([a.double(), p.double(), n.double()], logits.double(), nl.double(),
                     backend="reference", reduction="mean", grad_out=go.double(), **kw)
            same = run([a, p, n], logits, nl, backend="reference", reduction="mean",
                       grad_out=go, **kw)
            for x, y, z in zip(actual, same, gt):
                assert torch.isfinite(x).all()
                assert_close_to_reference(x, y, z, dtype=torch.float32)


def test_no_eligible_negatives_gives_zero_loss():
    feats, al, nl = make_inputs(torch.float32, seed=7)
    nl = nl.clone()
    al = al.clone()
    al[:, 0] += 100.0
    nl[:, 0] += 100.0  # the pool is all class 0 too: nothing eligible
    for sampling in ("topk", "random"):
        out = run(feats, al, nl, backend="triton", reduction="none", grad_out=1.0,
                  num_negatives=5, sampling=sampling)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        for g in out[1:]:
            assert torch.equal(g, torch.zeros_like(g))


def test_negative_without_grad_gets_none_and_no_grad_forward_agrees():
    feats, al, nl = make_inputs(torch.float32)
    a, p, n = (t.clone().requires_grad_(i < 2) for i, t in enumerate(feats))
    loss = rk.bidirectional_voxel_infonce(a, p, n, al, nl, num_negatives=5, backend="triton")
    loss.backward()
    assert n.grad is None and a.grad is not None and p.grad is not None
    with torch.no_grad():
        again = rk.bidirectional_voxel_infonce(a, p, n, al, nl, num_negatives=5,
                                               backend="triton")
    torch.testing.assert_close(again, loss.detach())


@pytest.mark.parametrize("classes", [1, 2, 3, 7, 31])
@pytest.mark.parametrize("num_anchors", [1, 16, 17, 301])
def test_one_program_class_order_equals_the_sort(classes, num_anchors):
    # The single-program stable partition against rcps_C::anchor_class_order (a stable sort),
    # with block-boundary sizes (BLOCK = 16 under the interpreter).
    g = torch.Generator().manual_seed(classes * 1000 + num_anchors)
    labels = torch.randint(0, classes, (num_anchors,), generator=g)
    got = T._class_order(labels, classes)
    expected = anchor_class_order(labels, classes)
    assert all(torch.equal(x, y) for x, y in zip(got, expected, strict=True))
