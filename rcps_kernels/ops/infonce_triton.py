"""Triton kernels of the fused bidirectional voxel InfoNCE (``backend="triton"``).

Kernel contract: ``voxel_infonce`` in :mod:`rcps_kernels.ops.kernels`. Everything is computed in fp32 (every load
is cast to fp32 right away, so fp16/bf16/fp64 inputs work the same way); flat offsets that
multiply a voxel index by a channel count or a stride are int64.

topk mode (one bank N_c per class):
  1. ``normalise_rows`` (infonce_triton_common.py): fp32 normalised copies of the anchors and positives
     in class-sorted order (a stable partition by pseudo-label: ``_class_order_kernel`` up to
     64Ki anchors, the op ``anchor_class_order`` past that), both in one launch, (N, C) each,
     plus their norms; the class banks (classes, L, C) likewise (padding rows are zero).
  2. ``_topk_lse_kernel``: one program per tile of same-class anchors (each program finds its
     class and rows from the class boundaries, ``_tile_rows``: no host sync, no tile map);
     S = U_tile @ N_c^T blocks with ``tl.dot`` and an online log-sum-exp per direction; stores
     its log-normaliser per anchor and direction (as anchor + rel, see
     ``positive_nll``) and the loss.
  3. ``_topk_anchor_grad_kernel``: recomputes the S tiles, turns them into softmax weights and
     accumulates dU = coef * u_other + P @ N_c, then chains through the normalisation and writes
     the input-dtype gradient straight into the (B, C, P) output.
  4. ``_topk_bank_grad_kernel``: its own pass over (class, bank block, anchor split): loops over
     that class's anchors and accumulates dN = P1^T U1 + P2^T U2 in registers; no atomics.
     ``_bank_scatter_kernel`` sums the splits in a fixed order and adds the class bank gradient
     into the pool gradient (rows of one bank are distinct; one launch per class in class order,
     or one for both classes of a binary task, whose banks are disjoint), so the result is
     bitwise deterministic.
  5. ``pool_input_grad`` (infonce_triton_common.py): chains the (M, C) pool gradient through the
     pool's normalisation into the (Bn, C, Pn) output (writes every element).

random mode: infonce_triton_random.py. Deterministic mode (int64 fixed-point atomics for the
pool gradient) follows ``determinism.deterministic_algorithms()``, asked when the kernel runs: the call's
``deterministic=`` keyword, else ``torch.are_deterministic_algorithms_enabled()``.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ..determinism import deterministic_algorithms
from ..settings import triton_dot_precision, triton_interpreting
from .infonce_triton_common import (
    block_c,
    chain_store,
    normalise_rows,
    pool_input_grad,
    positive_nll,
    softmax_weight,
    store_normaliser,
)
from .infonce_triton_random import random_draws, random_mode
from .selection import anchor_class_order


# ---------------------------------------------------------------------------------------------
# topk mode
# ---------------------------------------------------------------------------------------------
@triton.jit
def _tile_rows(class_start_ptr, num_classes, BLOCK_M: tl.constexpr):
    """Class, first row and end row of this program's tile. Tiles are numbered class by class,
    ceil(n_c / BLOCK_M) per class (rows are class-sorted); the grid's spare programs, past the
    last tile, get an empty range. A scalar walk over the classes: a handful of loads."""
    t = tl.program_id(0).to(tl.int64)
    cls = t * 0
    row0 = t * 0
    end = t * 0
    first_tile = t * 0
    start = tl.load(class_start_ptr).to(tl.int64)
    for c in range(num_classes):
        stop = tl.load(class_start_ptr + c + 1).to(tl.int64)
        num_tiles = (stop - start + BLOCK_M - 1) // BLOCK_M
        inside = (t >= first_tile) & (t < first_tile + num_tiles)
        cls = tl.where(inside, c, cls)
        row0 = tl.where(inside, start + (t - first_tile) * BLOCK_M, row0)
        end = tl.where(inside, stop, end)
        first_tile += num_tiles
        start = stop
    return cls, row0, end


@triton.jit
def _load_tile(
    u1_ptr, u2_ptr, class_start_ptr, num_classes, neg_count_ptr, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr
):
    cls, row0, end = _tile_rows(class_start_ptr, num_classes, BLOCK_M)
    kc = tl.load(neg_count_ptr + cls).to(tl.int64)
    kc = tl.where(row0 < end, kc, 0)  # padding tiles do no work
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < end
    cc = tl.arange(0, BLOCK_C)
    cmask = cc < C
    offs = rows[:, None] * C + cc[None, :]
    m2 = rmask[:, None] & cmask[None, :]
    u1 = tl.load(u1_ptr + offs, mask=m2, other=0.0)
    u2 = tl.load(u2_ptr + offs, mask=m2, other=0.0)
    return cls, kc, rows, rmask, cc, cmask, u1, u2


@triton.jit
def _bank_logits(u1, u2, bank_base, n0, kc, cc, cmask, C, inv_tau, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Bank rows [n0, n0 + BLOCK_N) of a class and the tile's logits against them, both directions.

    The logits are dot products of the anchors scaled by 1/tau, not dot products times 1/tau:
    a product would be fused into the FMA of the later exp(logit - max), whose unrounded value
    differs from the rounded logit that the max was taken of by up to half an ulp of 1/tau
    (exp(+-4) at tau = 1e-8). A dot's output is no FMA operand."""
    ns = n0 + tl.arange(0, BLOCK_N)
    nmask = ns < kc
    bank = tl.load(bank_base + ns[:, None] * C + cc[None, :], mask=nmask[:, None] & cmask[None, :], other=0.0)
    bank_t = tl.trans(bank)
    a1 = tl.dot(u1 * inv_tau, bank_t, input_precision=PRECISION)
    a2 = tl.dot(u2 * inv_tau, bank_t, input_precision=PRECISION)
    return bank, nmask, a1, a2


@triton.jit
def _topk_lse_kernel(
    u1_ptr,
    u2_ptr,
    bank_ptr,
    class_start_ptr,
    num_classes,
    neg_count_ptr,
    order_ptr,
    lse1_ptr,
    lse2_ptr,
    loss_ptr,
    C,
    L,
    inv_tau,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    cls, kc, rows, rmask, cc, cmask, u1, u2 = _load_tile(
        u1_ptr, u2_ptr, class_start_ptr, num_classes, neg_count_ptr, C, BLOCK_M, BLOCK_C
    )
    x = tl.sum(u1 * u2, 1) * inv_tau
    # The negatives' online state, anchored at the finite x (so no -inf - -inf): sum starts at 0.
    m1 = x
    m2 = x
    s1 = tl.zeros([BLOCK_M], tl.float32)
    s2 = tl.zeros([BLOCK_M], tl.float32)
    bank_base = bank_ptr + cls * L * C
    for n0 in range(0, kc, BLOCK_N):
        bank, nmask, a1, a2 = _bank_logits(u1, u2, bank_base, n0, kc, cc, cmask, C, inv_tau, BLOCK_N, PRECISION)
        a1 = tl.where(nmask[None, :], a1, float("-inf"))
        a2 = tl.where(nmask[None, :], a2, float("-inf"))
        new1 = tl.maximum(m1, tl.max(a1, 1))
        new2 = tl.maximum(m2, tl.max(a2, 1))
        s1 = s1 * tl.exp(m1 - new1) + tl.sum(tl.exp(a1 - new1[:, None]), 1)
        s2 = s2 * tl.exp(m2 - new2) + tl.sum(tl.exp(a2 - new2[:, None]), 1)
        m1 = new1
        m2 = new2
    nll1, anchor1, rel1 = positive_nll(m1, s1, x)
    nll2, anchor2, rel2 = positive_nll(m2, s2, x)
    store_normaliser(lse1_ptr, rows, anchor1, rel1, rmask)
    store_normaliser(lse2_ptr, rows, anchor2, rel2, rmask)
    anchor = tl.load(order_ptr + rows, mask=rmask, other=0)
    tl.store(loss_ptr + anchor, nll1 + nll2, mask=rmask)


@triton.jit
def _topk_anchor_grad_kernel(
    u1_ptr,
    u2_ptr,
    norm1_ptr,
    norm2_ptr,
    bank_ptr,
    class_start_ptr,
    num_classes,
    neg_count_ptr,
    order_ptr,
    lse1_ptr,
    lse2_ptr,
    w_ptr,
    grad_scale,
    g1_ptr,
    g2_ptr,
    C,
    P,
    L,
    inv_tau,
    HAS_W: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    cls, kc, rows, rmask, cc, cmask, u1, u2 = _load_tile(
        u1_ptr, u2_ptr, class_start_ptr, num_classes, neg_count_ptr, C, BLOCK_M, BLOCK_C
    )
    anchor = tl.load(order_ptr + rows, mask=rmask, other=0)
    w = tl.zeros([BLOCK_M], tl.float32) + grad_scale
    if HAS_W:
        w = w * tl.load(w_ptr + anchor, mask=rmask, other=0.0)
    wt = tl.where(rmask, w * inv_tau, 0.0)
    du1 = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    du2 = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    # mass: w/tau times both directions' negative softmax mass, 1 - p_pos, summed over the bank
    # in relative precision (1 - exp(x - lse) would cancel for a confident anchor).
    mass = tl.zeros([BLOCK_M], tl.float32)
    bank_base = bank_ptr + cls * L * C
    for n0 in range(0, kc, BLOCK_N):
        bank, nmask, a1, a2 = _bank_logits(u1, u2, bank_base, n0, kc, cc, cmask, C, inv_tau, BLOCK_N, PRECISION)
        p1 = tl.where(nmask[None, :], softmax_weight(a1, lse1_ptr, rows, rmask) * wt[:, None], 0.0)
        p2 = tl.where(nmask[None, :], softmax_weight(a2, lse2_ptr, rows, rmask) * wt[:, None], 0.0)
        mass += tl.sum(p1, 1) + tl.sum(p2, 1)
        du1 += tl.dot(p1, bank, input_precision=PRECISION)
        du2 += tl.dot(p2, bank, input_precision=PRECISION)
    du1 -= mass[:, None] * u2
    du2 -= mass[:, None] * u1
    norm1 = tl.load(norm1_ptr + rows, mask=rmask, other=1.0)
    norm2 = tl.load(norm2_ptr + rows, mask=rmask, other=1.0)
    chain_store(du1, u1, norm1, g1_ptr, anchor, rmask, cc, cmask, C, P)
    chain_store(du2, u2, norm2, g2_ptr, anchor, rmask, cc, cmask, C, P)


@triton.jit
def _topk_bank_grad_kernel(
    u1_ptr,
    u2_ptr,
    bank_ptr,
    class_start_ptr,
    neg_count_ptr,
    order_ptr,
    lse1_ptr,
    lse2_ptr,
    w_ptr,
    grad_scale,
    part_ptr,
    C,
    L,
    num_classes,
    inv_tau,
    HAS_W: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """partial[split, c, n] = sum over this split's anchors i of class c of (P1 U1 + P2 U2)[i, n]."""
    cls = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1)
    sp = tl.program_id(2)
    kc = tl.load(neg_count_ptr + cls).to(tl.int64)
    start = tl.load(class_start_ptr + cls).to(tl.int64)
    end = tl.load(class_start_ptr + cls + 1).to(tl.int64)
    chunk = ((end - start + SPLIT - 1) // SPLIT + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    lo = start + sp * chunk
    hi = tl.minimum(lo + chunk, end)
    hi = tl.where(nb * BLOCK_N < kc, hi, lo)  # bank blocks past the class's bank: nothing to do
    ns = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < kc
    cc = tl.arange(0, BLOCK_C)
    cmask = cc < C
    bank = tl.load(
        bank_ptr + cls * L * C + ns[:, None] * C + cc[None, :], mask=nmask[:, None] & cmask[None, :], other=0.0
    )
    bank_t = tl.trans(bank)
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for r0 in range(lo, hi, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < hi
        m2 = rmask[:, None] & cmask[None, :]
        u1 = tl.load(u1_ptr + rows[:, None] * C + cc[None, :], mask=m2, other=0.0)
        u2 = tl.load(u2_ptr + rows[:, None] * C + cc[None, :], mask=m2, other=0.0)
        w = tl.zeros([BLOCK_M], tl.float32) + grad_scale
        if HAS_W:
            anchor = tl.load(order_ptr + rows, mask=rmask, other=0)
            w = w * tl.load(w_ptr + anchor, mask=rmask, other=0.0)
        wt = tl.where(rmask, w * inv_tau, 0.0)
        a1 = tl.dot(u1 * inv_tau, bank_t, input_precision=PRECISION)  # as _bank_logits
        a2 = tl.dot(u2 * inv_tau, bank_t, input_precision=PRECISION)
        p1 = tl.where(nmask[None, :], softmax_weight(a1, lse1_ptr, rows, rmask) * wt[:, None], 0.0)
        p2 = tl.where(nmask[None, :], softmax_weight(a2, lse2_ptr, rows, rmask) * wt[:, None], 0.0)
        acc += tl.dot(tl.trans(p1), u1, input_precision=PRECISION)
        acc += tl.dot(tl.trans(p2), u2, input_precision=PRECISION)
    out = part_ptr + ((sp * num_classes + cls) * L) * C
    tl.store(out + ns[:, None] * C + cc[None, :], acc, mask=(ns < L)[:, None] & cmask[None, :])


@triton.jit
def _bank_scatter_kernel(
    part_ptr,
    neg_index_ptr,
    neg_count_ptr,
    pool_grad_sum_ptr,
    first_cls,
    C,
    L,
    num_classes,
    SPLIT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """pool_grad_sum[neg_index[cls, k]] += sum_split partial[split, cls, k], cls = first_cls +
    program_id(1). Rows of one bank are distinct voxels; banks launched together must be too."""
    cls = first_cls + tl.program_id(1)
    k = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    kc = tl.load(neg_count_ptr + cls).to(tl.int64)
    kmask = k < kc
    cc = tl.arange(0, BLOCK_C)
    cmask = cc < C
    m2 = kmask[:, None] & cmask[None, :]
    j = tl.load(neg_index_ptr + cls * L + k, mask=kmask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for sp in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + ((sp * num_classes + cls) * L + k[:, None]) * C + cc[None, :], mask=m2, other=0.0)
    dst = pool_grad_sum_ptr + j[:, None] * C + cc[None, :]
    tl.store(dst, tl.load(dst, mask=m2, other=0.0) + acc, mask=m2)


@triton.jit
def _class_order_kernel(
    labels_ptr, order_ptr, class_start_ptr, N, num_classes, BLOCK: tl.constexpr, BLOCK_CLS: tl.constexpr
):
    """Stable partition of the anchors by class, in one program: order (N,) and class_start
    (classes + 1,), as the op anchor_class_order. Pass 1 counts each class; pass 2 places each
    anchor at its class's start plus the number of earlier anchors of its class."""
    cls = tl.arange(0, BLOCK_CLS)
    counts = tl.zeros([BLOCK_CLS], tl.int32)
    for n0 in range(0, N, BLOCK):
        idx = n0 + tl.arange(0, BLOCK)
        label = tl.load(labels_ptr + idx, mask=idx < N, other=-1)
        counts += tl.sum((label[:, None] == cls[None, :]).to(tl.int32), 0)
    # Exclusive prefix sum; classes >= num_classes are empty, so start[num_classes] == N.
    start = tl.cumsum(counts, 0) - counts
    tl.store(class_start_ptr + cls, start.to(tl.int64), mask=cls <= num_classes)
    for n0 in range(0, N, BLOCK):
        idx = n0 + tl.arange(0, BLOCK)
        label = tl.load(labels_ptr + idx, mask=idx < N, other=-1)
        hit = (label[:, None] == cls[None, :]).to(tl.int32)  # (BLOCK, BLOCK_CLS) one-hot
        earlier = tl.cumsum(hit, 0) - hit
        position = tl.sum(hit * (start[None, :] + earlier), 1)
        tl.store(order_ptr + position, idx.to(tl.int64), mask=idx < N)
        start += tl.sum(hit, 0)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
def _topk_blocks(C: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for the tl.dot kernels."""
    if triton_interpreting():
        return 16, 16, 4
    bc = block_c(C)
    if bc <= 64:
        return 64, 64, 4
    if bc <= 128:
        return 64, 32, 4
    return 32, 32, 8


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


#: Up to this many anchors (and classes) the class order is one single-program launch: on a GPU
#: the general path (a cast, a radix sort, an arange and a searchsorted) is about eight launches,
#: which at such sizes cost more host time than the work. Past it, the sort's parallelism wins.
_ONE_PROGRAM_ORDER_ANCHORS = 1 << 16
_ONE_PROGRAM_ORDER_CLASSES = 31


def class_order(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rcps_kernels.ops.selection.anchor_class_order`, as one Triton program up to
    64Ki anchors and 31 classes."""
    N = labels.numel()
    if N > _ONE_PROGRAM_ORDER_ANCHORS or num_classes > _ONE_PROGRAM_ORDER_CLASSES:
        return anchor_class_order(labels, num_classes)
    order = torch.empty((N,), device=labels.device, dtype=torch.int64)
    class_start = torch.empty((num_classes + 1,), device=labels.device, dtype=torch.int64)
    _class_order_kernel[(1,)](
        labels,
        order,
        class_start,
        N,
        num_classes,
        BLOCK=16 if triton_interpreting() else 1024,
        BLOCK_CLS=triton.next_power_of_2(num_classes + 1),
        num_warps=1 if triton_interpreting() else 8,
    )
    return order, class_start


def _topk(z1, z2, zn, labels, neg_index, neg_count, inv_tau, w, grad_scale, want_grad, pool_grad):
    B, C, P = z1.shape
    N = B * P
    num_classes, L = neg_index.shape
    dev = z1.device
    bm, bn, warps = _topk_blocks(C)
    bc = block_c(C)
    # Tile sizes and tl.dot precision of the three tl.dot kernels.
    tiles = dict(
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_C=bc,
        PRECISION=triton_dot_precision(rocm=torch.version.hip is not None),
        num_warps=warps,
    )
    order, class_start = class_order(labels, num_classes)
    num_tiles = triton.cdiv(N, bm) + num_classes  # >= sum_c ceil(n_c / bm); spares do nothing
    (u1, u2), (norm1, norm2) = normalise_rows(z1, order, N, z2=z2)
    bank, _ = normalise_rows(zn, neg_index.reshape(-1), num_classes * L, want_norm=False)
    loss = torch.empty((N,), device=dev, dtype=torch.float32)
    lse1, lse2 = torch.empty((2, N, 2), device=dev, dtype=torch.float32)  # (anchor, rel) per row
    _topk_lse_kernel[(num_tiles,)](
        u1,
        u2,
        bank,
        class_start,
        num_classes,
        neg_count,
        order,
        lse1,
        lse2,
        loss,
        C,
        L,
        inv_tau,
        **tiles,
    )
    if not want_grad:
        return loss, None, None, None
    g1 = torch.empty((B, C, P), device=dev, dtype=z1.dtype)
    g2 = torch.empty((B, C, P), device=dev, dtype=z2.dtype)
    _topk_anchor_grad_kernel[(num_tiles,)](
        u1,
        u2,
        norm1,
        norm2,
        bank,
        class_start,
        num_classes,
        neg_count,
        order,
        lse1,
        lse2,
        w,
        grad_scale,
        g1,
        g2,
        C,
        P,
        L,
        inv_tau,
        HAS_W=w is not None,
        **tiles,
    )
    if not pool_grad:
        return loss, g1, g2, None
    M = zn.shape[0] * zn.shape[2]
    pool_grad_sum = torch.zeros((M, C), device=dev, dtype=torch.float32)
    nblocks = triton.cdiv(L, bn)
    if triton_interpreting():
        split = 2
    else:
        split = max(
            1, min(32, (2 * _num_sms(dev)) // max(1, num_classes * nblocks), triton.cdiv(N, 4 * bm * num_classes))
        )
    partial = torch.empty((split, num_classes, L, C), device=dev, dtype=torch.float32)
    _topk_bank_grad_kernel[(num_classes, nblocks, split)](
        u1,
        u2,
        bank,
        class_start,
        neg_count,
        order,
        lse1,
        lse2,
        w,
        grad_scale,
        partial,
        C,
        L,
        num_classes,
        inv_tau,
        HAS_W=w is not None,
        SPLIT=split,
        **tiles,
    )
    block_r = 16 if triton_interpreting() else 32
    # With two classes the banks are disjoint (the other class's voxels each): one launch.
    # Otherwise banks can share voxels: one launch per class, in class order (deterministic).
    together = num_classes if num_classes == 2 else 1
    for c in range(0, num_classes, together):
        _bank_scatter_kernel[(triton.cdiv(L, block_r), together)](
            partial, neg_index, neg_count, pool_grad_sum, c, C, L, num_classes, SPLIT=split, BLOCK_R=block_r, BLOCK_C=bc
        )
    return loss, g1, g2, pool_input_grad(zn, pool_grad_sum, None)


def voxel_infonce(anchor, positive, pool, params, *, grad_weight=None, grad_scale=0.0, pool_grad=False):
    """The voxel_infonce kernel of ops/kernels.py, on CUDA tensors (or CPU ones under
    TRITON_INTERPRET=1)."""
    if anchor.dim() != 3 or positive.shape != anchor.shape:
        raise ValueError(
            f"voxel_infonce (triton): anchor and positive must be equal (B, C, P), "
            f"got {tuple(anchor.shape)} and {tuple(positive.shape)}"
        )
    if pool.dim() != 3 or pool.shape[1] != anchor.shape[1]:
        raise ValueError(
            f"voxel_infonce (triton): pool must be (Bn, C, Pn) with C = {anchor.shape[1]}, got {tuple(pool.shape)}"
        )
    B, C, P = anchor.shape
    N = B * P
    dev = anchor.device
    want_grad = grad_scale != 0.0
    pool_grad = want_grad and pool_grad
    labels, neg_index, neg_count = (
        t.to(device=dev, dtype=torch.int64).contiguous()
        for t in (params.anchor_labels, params.neg_index, params.neg_count)
    )
    w = None
    if want_grad and grad_weight is not None:
        w = grad_weight.to(device=dev, dtype=torch.float32).contiguous()
    inv_tau = 1.0 / float(params.temperature)
    if N == 0 or neg_index.shape[0] == 0:
        loss = torch.zeros((N,), device=dev, dtype=torch.float32)
        g1 = torch.zeros_like(anchor, memory_format=torch.contiguous_format) if want_grad else None
        g2 = torch.zeros_like(positive, memory_format=torch.contiguous_format) if want_grad else None
        gn = torch.zeros_like(pool, memory_format=torch.contiguous_format) if pool_grad else None
        return _with_empty_grads(loss, g1, g2, gn, anchor, pool)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        if params.random:
            loss, g1, g2, gn = random_mode(
                anchor,
                positive,
                pool,
                labels,
                neg_index,
                neg_count,
                inv_tau,
                int(params.num_negatives),
                int(params.seed),
                int(params.offset),
                w,
                float(grad_scale),
                want_grad,
                pool_grad,
                deterministic_algorithms(),
            )
        else:
            loss, g1, g2, gn = _topk(
                anchor,
                positive,
                pool,
                labels,
                neg_index,
                neg_count,
                inv_tau,
                w,
                float(grad_scale),
                want_grad,
                pool_grad,
            )
    return _with_empty_grads(loss, g1, g2, gn, anchor, pool)


def _with_empty_grads(loss, g1, g2, gn, anchor, pool):
    """The kernel's outputs, with empty tensors for the gradients it did not compute."""

    def given(grad, like):
        return grad if grad is not None else like.new_empty((0,))

    return loss, given(g1, anchor), given(g2, anchor), given(gn, pool)


__all__ = ["voxel_infonce", "random_draws"]
