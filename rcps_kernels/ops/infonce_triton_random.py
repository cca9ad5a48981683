"""Random mode of the Triton voxel InfoNCE (infonce_triton.py dispatches here).

random mode: ``_random_kernel``, one program per anchor: normalises its anchor/positive rows,
regenerates its K Philox draws (``tl.randint(seed, anchor * K + k + offset)``, 64-bit counters,
the layout of csrc/common/rcps_math.h's philox_randint), gathers the normalised pool rows, online LSE;
with gradients a second pass over the same draws accumulates the anchor gradients and adds the
pool gradient with fp32 atomics, or, in deterministic mode, with int64 fixed-point atomics
(integer addition is associative: bitwise identical run to run). Deterministic mode is on when
``determinism.deterministic_algorithms()`` says so at call time (the ``deterministic=`` keyword, else
``torch.are_deterministic_algorithms_enabled()``).

Fixed point: every contribution is bounded by |w_i| / tau * (p1 + p2) per channel, and the p of
one anchor sum to at most 1 per direction, so the whole pool gradient is bounded by
unit = 2 * sum_i |w_i| / tau. Contributions are stored as round-toward-zero(x * 2^61 / unit)
in int64: no overflow is possible, and the resolution is unit * 2^-61.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..settings import triton_interpreting
from .infonce_triton_common import block_c, chain_store, normalise_rows, pool_input_grad, positive_nll, row_norms

_FIXED_POINT_BITS = 61


@triton.jit
def _random_draw_positions(seed, anchor, ks, K, offset, n):
    """Position in the class's eligible list of draws ks of `anchor` (csrc/common/rcps_math.h)."""
    counter = anchor * K + ks + offset  # int64: the 64-bit counter of draw_counter()
    r = tl.randint(seed, counter)  # uint32, counter words (lo32, hi32, 0, 0)
    return ((r.to(tl.uint64) * n.to(tl.uint64)) >> 32).to(tl.int64)


@triton.jit
def _random_draws_kernel(labels_ptr, neg_index_ptr, neg_count_ptr, out_ptr, L, K, seed, offset, BLOCK_K: tl.constexpr):
    """(N, K) flat pool voxels of every draw, exactly as _random_kernel picks them (tests)."""
    i = tl.program_id(0).to(tl.int64)
    cls = tl.load(labels_ptr + i).to(tl.int64)
    n = tl.load(neg_count_ptr + cls).to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        pos = _random_draw_positions(seed, i, ks, K, offset, n)
        j = tl.load(neg_index_ptr + cls * L + pos, mask=kmask & (n > 0), other=0)
        j = tl.where(n > 0, j, -1)
        tl.store(out_ptr + i * K + ks, j, mask=kmask)


@triton.jit
def _random_kernel(
    z1_ptr,
    z2_ptr,
    s1b,
    s1c,
    s1p,
    s2b,
    s2c,
    s2p,
    un_ptr,
    labels_ptr,
    neg_index_ptr,
    neg_count_ptr,
    loss_ptr,
    w_ptr,
    grad_scale,
    g1_ptr,
    g2_ptr,
    pool_grad_sum_ptr,
    qscale_ptr,
    C,
    P,
    L,
    K,
    seed,
    offset,
    inv_tau,
    HAS_W: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    POOL_GRAD: tl.constexpr,
    FIXED: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    cls = tl.load(labels_ptr + i).to(tl.int64)
    n = tl.load(neg_count_ptr + cls).to(tl.int64)
    draws = tl.where(n > 0, K, 0)
    b = i // P
    p = i - b * P
    cc = tl.arange(0, BLOCK_C)
    cmask = cc < C
    z1 = tl.load(z1_ptr + b * s1b + p * s1p + cc.to(tl.int64) * s1c, mask=cmask, other=0.0).to(tl.float32)
    z2 = tl.load(z2_ptr + b * s2b + p * s2p + cc.to(tl.int64) * s2c, mask=cmask, other=0.0).to(tl.float32)
    norm1 = row_norms(z1[None, :])  # (1,): the chain rule's row layout
    norm2 = row_norms(z2[None, :])
    u1 = z1 / tl.maximum(tl.sum(norm1, 0), 1e-12)
    u2 = z2 / tl.maximum(tl.sum(norm2, 0), 1e-12)
    # Logits from anchors scaled by 1/tau (see infonce_triton._bank_logits: no product of a
    # logit and 1/tau is left to be fused into the FMA of exp(logit - lse)).
    u1s = u1 * inv_tau
    u2s = u2 * inv_tau
    x = tl.sum(u1s * u2, 0)
    eligible = neg_index_ptr + cls * L
    # Online LSE in a vector of BLOCK_K lanes (merged at the end): lane states start empty.
    m1 = tl.full([BLOCK_K], float("-inf"), tl.float32)
    m2 = tl.full([BLOCK_K], float("-inf"), tl.float32)
    s1 = tl.zeros([BLOCK_K], tl.float32)
    s2 = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, draws, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < draws
        pos = _random_draw_positions(seed, i, ks, K, offset, n)
        j = tl.load(eligible + pos, mask=kmask, other=0).to(tl.int64)
        un = tl.load(un_ptr + j[:, None] * C + cc[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        d1 = tl.where(kmask, tl.sum(un * u1s[None, :], 1), float("-inf"))
        d2 = tl.where(kmask, tl.sum(un * u2s[None, :], 1), float("-inf"))
        new1 = tl.maximum(m1, d1)
        new2 = tl.maximum(m2, d2)
        s1 = tl.where(new1 == float("-inf"), 0.0, s1 * tl.exp(m1 - new1) + tl.exp(d1 - new1))
        s2 = tl.where(new2 == float("-inf"), 0.0, s2 * tl.exp(m2 - new2) + tl.exp(d2 - new2))
        m1 = new1
        m2 = new2
    mx1 = tl.maximum(tl.max(m1, 0), x)
    mx2 = tl.maximum(tl.max(m2, 0), x)
    neg1 = tl.sum(tl.where(m1 == float("-inf"), 0.0, s1 * tl.exp(m1 - mx1)), 0)
    neg2 = tl.sum(tl.where(m2 == float("-inf"), 0.0, s2 * tl.exp(m2 - mx2)), 0)
    nll1, anchor1, rel1 = positive_nll(mx1, neg1, x)
    nll2, anchor2, rel2 = positive_nll(mx2, neg2, x)
    tl.store(loss_ptr + i, nll1 + nll2)
    if WANT_GRAD:
        w = grad_scale
        if HAS_W:
            w = w * tl.load(w_ptr + i)
        wt = w * inv_tau
        du1 = tl.zeros([BLOCK_C], tl.float32)
        du2 = tl.zeros([BLOCK_C], tl.float32)
        mass = tl.zeros_like(x)  # w/tau times both directions' negative softmax mass, 1 - p_pos
        if FIXED:
            qscale = tl.load(qscale_ptr)
        for k0 in range(0, draws, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < draws
            pos = _random_draw_positions(seed, i, ks, K, offset, n)
            j = tl.load(eligible + pos, mask=kmask, other=0).to(tl.int64)
            m2d = kmask[:, None] & cmask[None, :]
            un = tl.load(un_ptr + j[:, None] * C + cc[None, :], mask=m2d, other=0.0)
            d1 = tl.sum(un * u1s[None, :], 1)
            d2 = tl.sum(un * u2s[None, :], 1)
            p1 = tl.where(kmask, tl.exp((d1 - anchor1) - rel1) * wt, 0.0)
            p2 = tl.where(kmask, tl.exp((d2 - anchor2) - rel2) * wt, 0.0)
            mass += tl.sum(p1, 0) + tl.sum(p2, 0)
            du1 += tl.sum(p1[:, None] * un, 0)
            du2 += tl.sum(p2[:, None] * un, 0)
            if POOL_GRAD:
                contrib = p1[:, None] * u1[None, :] + p2[:, None] * u2[None, :]
                dst = pool_grad_sum_ptr + j[:, None] * C + cc[None, :]
                if FIXED:
                    tl.atomic_add(dst, (contrib * qscale).to(tl.int64), mask=m2d)
                else:
                    tl.atomic_add(dst, contrib, mask=m2d)
        du1 -= mass * u2
        du2 -= mass * u1
        one = tl.full([1], 0, tl.int64) + i
        rm = tl.full([1], 1, tl.int1)
        chain_store(du1[None, :], u1[None, :], norm1, g1_ptr, one, rm, cc, cmask, C, P)
        chain_store(du2[None, :], u2[None, :], norm2, g2_ptr, one, rm, cc, cmask, C, P)


def random_mode(
    z1,
    z2,
    zn,
    labels,
    neg_index,
    neg_count,
    inv_tau,
    K,
    seed,
    offset,
    w,
    grad_scale,
    want_grad,
    pool_grad,
    deterministic,
):
    B, C, P = z1.shape
    N = B * P
    L = neg_index.shape[1]
    dev = z1.device
    M = zn.shape[0] * zn.shape[2]
    un, _ = normalise_rows(zn, None, M, want_norm=False)
    loss = torch.empty((N,), device=dev, dtype=torch.float32)
    g1 = g2 = pool_grad_sum = qscale = descale = None
    fixed = False
    if want_grad:
        g1 = torch.empty((B, C, P), device=dev, dtype=z1.dtype)
        g2 = torch.empty((B, C, P), device=dev, dtype=z2.dtype)
    if pool_grad:
        fixed = deterministic
        if fixed:
            pool_grad_sum = torch.zeros((M, C), device=dev, dtype=torch.int64)
            wsum = (
                w.double().abs().sum() if w is not None else torch.full((), float(N), device=dev, dtype=torch.float64)
            )
            unit = (2.0 * abs(grad_scale) * inv_tau * wsum).clamp_min(1e-30)
            qscale = (float(2**_FIXED_POINT_BITS) / unit).clamp(max=1e38).float().reshape(1)
            descale = (1.0 / qscale.double()).reshape(1)
        else:
            pool_grad_sum = torch.zeros((M, C), device=dev, dtype=torch.float32)
    block_k = 16 if triton_interpreting() else 64
    _random_kernel[(N,)](
        z1,
        z2,
        z1.stride(0),
        z1.stride(1),
        z1.stride(2),
        z2.stride(0),
        z2.stride(1),
        z2.stride(2),
        un,
        labels,
        neg_index,
        neg_count,
        loss,
        w,
        grad_scale,
        g1,
        g2,
        pool_grad_sum,
        qscale,
        C,
        P,
        L,
        K,
        seed,
        offset,
        inv_tau,
        HAS_W=w is not None,
        WANT_GRAD=want_grad,
        POOL_GRAD=pool_grad,
        FIXED=fixed,
        BLOCK_K=block_k,
        BLOCK_C=block_c(C),
        num_warps=1 if triton_interpreting() else 2,
    )
    gn = pool_input_grad(zn, pool_grad_sum, descale) if pool_grad else None
    return loss, g1, g2, gn


def random_draws(params) -> Tensor:
    """(N, K) pool voxels that the Triton random mode draws (-1: nothing eligible); for tests."""
    labels, neg_index, neg_count = params.anchor_labels, params.neg_index, params.neg_count
    N, K = labels.numel(), params.num_negatives
    out = torch.empty((N, K), device=labels.device, dtype=torch.int64)
    if N and K:
        _random_draws_kernel[(N,)](
            labels.contiguous(),
            neg_index.contiguous(),
            neg_count.contiguous(),
            out,
            neg_index.shape[1],
            K,
            params.seed,
            params.offset,
            BLOCK_K=16 if triton_interpreting() else 128,
        )
    return out
