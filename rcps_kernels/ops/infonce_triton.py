"""Triton kernels of the fused bidirectional voxel InfoNCE (``impl="triton"``).

Kernel signature: see :mod:`rcps_kernels.ops.infonce`. Everything is computed in fp32 (every load
is cast to fp32 right away, so fp16/bf16/fp64 inputs work the same way); flat offsets that
multiply a voxel index by a channel count or a stride are int64.

topk mode (one bank N_c per class):
  1. ``_normalize_kernel``: fp32 normalised copies of the anchors and positives in class-sorted
     order (anchors are sorted by pseudo-label with a stable argsort), (N, C) each, plus their
     squared norms; the class banks (classes, L, C) likewise (padding rows are zero).
  2. ``_topk_lse_kernel``: one program per tile of same-class anchors (each program finds its
     class and rows from the class boundaries, ``_tile_rows``: no host sync, no tile map);
     S = U_tile @ N_c^T blocks with ``tl.dot`` and an online log-sum-exp per direction; stores
     one fp32 LSE per anchor and direction and the loss.
  3. ``_topk_anchor_grad_kernel``: recomputes the S tiles, turns them into softmax weights and
     accumulates dU = coef * u_other + P @ N_c, then chains through the normalisation and writes
     the input-dtype gradient straight into the (B, C, P) output.
  4. ``_topk_bank_grad_kernel``: its own pass over (class, bank block, anchor split): loops over
     that class's anchors and accumulates dN = P1^T U1 + P2^T U2 in registers; no atomics.
     ``_bank_scatter_kernel`` sums the splits in a fixed order and adds the class bank gradient
     into the pool gradient (one launch per class, rows of one bank are distinct), so the result
     is bitwise deterministic.
  5. ``_pool_chain_kernel``: chains the (M, C) pool gradient through the pool's normalisation into
     the (Bn, C, Pn) output (writes every element).

random mode: ``_random_kernel``, one program per anchor: normalises its anchor/positive rows,
regenerates its K Philox draws (``tl.randint(seed, anchor * K + k + offset)``, 64-bit counters,
the layout of csrc/rcps_math.h's philox_randint), gathers the normalised pool rows, online LSE;
with gradients a second pass over the same draws accumulates the anchor gradients and adds the
pool gradient with fp32 atomics, or, in deterministic mode, with int64 fixed-point atomics
(integer addition is associative: bitwise identical run to run). Deterministic mode is on when
``DETERMINISTIC`` below is true (env ``RCPS_DETERMINISTIC=1`` sets it at import) or when
``torch.are_deterministic_algorithms_enabled()``.

Fixed point: every contribution is bounded by |w_i| / tau * (p1 + p2) per channel, and the p of
one anchor sum to at most 1 per direction, so the whole pool gradient is bounded by
unit = 2 * sum_i |w_i| / tau. Contributions are stored as round-toward-zero(x * 2^61 / unit)
in int64: no overflow is possible, and the resolution is unit * 2^-61.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .infonce import register_kernel

#: Bitwise run-to-run identical pool gradients in random mode (int64 fixed-point atomics).
DETERMINISTIC = os.environ.get("RCPS_DETERMINISTIC", "0") == "1"

#: tl.dot precision of the fp32 similarity products: "tf32x3" (fp32-accurate on tensor cores),
#: "ieee" (plain fp32 FMA) or "tf32" (fast, ~1e-3 relative error: fails the accuracy rule).
DOT_PRECISION = os.environ.get("RCPS_TRITON_DOT_PRECISION", "tf32x3")

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_FIXED_POINT_BITS = 61
_NORM_EPS = 1e-12


def deterministic() -> bool:
    return DETERMINISTIC or torch.are_deterministic_algorithms_enabled()


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------
@triton.jit
def _chain_store(du, u, sq, g_ptr, voxel, rmask, cc, cmask, C, P):
    """dz = (du - u (u.du)) / max(||z||, eps) (du / eps where clamped) into (B, C, P) at voxel."""
    norm = tl.sqrt(sq)
    clamped = norm <= 1e-12
    inv = 1.0 / tl.maximum(norm, 1e-12)
    u_dot_du = tl.sum(u * du, 1)
    dz = tl.where(clamped[:, None], du, du - u * u_dot_du[:, None]) * inv[:, None]
    b = voxel // P
    p = voxel - b * P
    off = b[:, None] * C * P + cc[None, :].to(tl.int64) * P + p[:, None]
    tl.store(g_ptr + off, dz.to(g_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _normalize_kernel(z_ptr, rows_ptr, u_ptr, sq_ptr, R, C, P, s_b, s_c, s_p,
                      HAS_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """u[r] = z[voxel(r)] / max(||z||, eps) as fp32 rows (R, C); voxel(r) = rows[r] or r; -1 -> 0."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    if HAS_ROWS:
        v = tl.load(rows_ptr + r, mask=rmask, other=-1).to(tl.int64)
    else:
        v = r
    valid = rmask & (v >= 0)
    v = tl.where(valid, v, 0)
    b = v // P
    p = v - b * P
    cc = tl.arange(0, BLOCK_C)
    cmask = cc < C
    off = b[:, None] * s_b + p[:, None] * s_p + cc[None, :].to(tl.int64) * s_c
    z = tl.load(z_ptr + off, mask=valid[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    sq = tl.sum(z * z, 1)
    u = z / tl.maximum(tl.sqrt(sq), 1e-12)[:, None]  # divide, like F.normalize (rcps_math.h)
    tl.store(u_ptr + r[:, None] * C + cc[None, :], u, mask=rmask[:, None] & cmask[None, :])
    if sq_ptr is not None:
        tl.store(sq_ptr + r, sq, mask=rmask)


@triton.jit
def _pool_chain_kernel(z_ptr, pg_ptr, descale_ptr, g_ptr, M, C, P, s_b, s_c, s_p,
                       FIXED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad_negative (Bn, C, Pn) from the (M, C) gradient of the normalised pool."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < M
    cc = tl.arange(0, BLOCK_C)
    cmask = cc < C
    m2 = rmask[:, None] & cmask[None, :]
    b = r // P
    p = r - b * P
    z = tl.load(z_ptr + b[:, None] * s_b + p[:, None] * s_p + cc[None, :].to(tl.int64) * s_c,
                mask=m2, other=0.0).to(tl.float32)
    sq = tl.sum(z * z, 1)
    u = z / tl.maximum(tl.sqrt(sq), 1e-12)[:, None]
    g = tl.load(pg_ptr + r[:, None] * C + cc[None, :], mask=m2, other=0)
    if FIXED:
        du = (g.to(tl.float64) * tl.load(descale_ptr)).to(tl.float32)
    else:
        du = g.to(tl.float32)
    _chain_store(du, u, sq, g_ptr, r, rmask, cc, cmask, C, P)


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
def _load_tile(u1_ptr, u2_ptr, class_start_ptr, num_classes, neg_count_ptr, C,
               BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
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
def _bank_logits(u1, u2, bank_base, n0, kc, cc, cmask, C, inv_tau, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Bank rows [n0, n0 + BLOCK_N) of a class and the tile's logits against them, both directions."""
    ns = n0 + tl.arange(0, BLOCK_N)
    nmask = ns < kc
    bank = tl.load(bank_base + ns[:, None] * C + cc[None, :],
                   mask=nmask[:, None] & cmask[None, :], other=0.0)
    bank_t = tl.trans(bank)
    a1 = tl.dot(u1, bank_t, input_precision=PRECISION) * inv_tau
    a2 = tl.dot(u2, bank_t, input_precision=PRECISION) * inv_tau
    return bank, nmask, a1, a2


@triton.jit
def _positive_nll(neg_max, neg_sum, x):
    """(-log softmax of the positive logit x, log-normaliser lse) from the negatives' (max, sum),
    as rcps_math.h's positive_nll, which says why neither is formed from the other.
    log1p(y) is taken as log(1 + y) * y / ((1 + y) - 1), exact to a few ulp without libdevice."""
    log_sum = tl.log(neg_sum)
    t = (neg_max - x) + log_sum
    y = tl.exp(-tl.abs(t))
    one_plus = 1.0 + y
    tail = tl.where(one_plus == 1.0, y, tl.log(one_plus) * (y / (one_plus - 1.0)))
    return tl.maximum(t, 0.0) + tail, tl.where(t > 0.0, neg_max + log_sum, x) + tail


@triton.jit
def _topk_lse_kernel(u1_ptr, u2_ptr, bank_ptr, class_start_ptr, num_classes,
                     neg_count_ptr, order_ptr, lse1_ptr, lse2_ptr, loss_ptr, C, L, inv_tau,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                     PRECISION: tl.constexpr):
    cls, kc, rows, rmask, cc, cmask, u1, u2 = _load_tile(
        u1_ptr, u2_ptr, class_start_ptr, num_classes, neg_count_ptr, C,
        BLOCK_M, BLOCK_C)
    x = tl.sum(u1 * u2, 1) * inv_tau
    # The negatives' online state, anchored at the finite x (so no -inf - -inf): sum starts at 0.
    m1 = x
    m2 = x
    s1 = tl.zeros([BLOCK_M], tl.float32)
    s2 = tl.zeros([BLOCK_M], tl.float32)
    bank_base = bank_ptr + cls * L * C
    for n0 in range(0, kc, BLOCK_N):
        bank, nmask, a1, a2 = _bank_logits(u1, u2, bank_base, n0, kc, cc, cmask, C, inv_tau,
                                           BLOCK_N, PRECISION)
        a1 = tl.where(nmask[None, :], a1, float("-inf"))
        a2 = tl.where(nmask[None, :], a2, float("-inf"))
        new1 = tl.maximum(m1, tl.max(a1, 1))
        new2 = tl.maximum(m2, tl.max(a2, 1))
        s1 = s1 * tl.exp(m1 - new1) + tl.sum(tl.exp(a1 - new1[:, None]), 1)
        s2 = s2 * tl.exp(m2 - new2) + tl.sum(tl.exp(a2 - new2[:, None]), 1)
        m1 = new1
        m2 = new2
    nll1, l1 = _positive_nll(m1, s1, x)
    nll2, l2 = _positive_nll(m2, s2, x)
    tl.store(lse1_ptr + rows, l1, mask=rmask)
    tl.store(lse2_ptr + rows, l2, mask=rmask)
    anchor = tl.load(order_ptr + rows, mask=rmask, other=0)
    tl.store(loss_ptr + anchor, nll1 + nll2, mask=rmask)


@triton.jit
def _topk_anchor_grad_kernel(u1_ptr, u2_ptr, sq1_ptr, sq2_ptr, bank_ptr, class_start_ptr,
                             num_classes, neg_count_ptr, order_ptr, lse1_ptr,
                             lse2_ptr, w_ptr, grad_scale, g1_ptr, g2_ptr, C, P, L, inv_tau,
                             HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
    cls, kc, rows, rmask, cc, cmask, u1, u2 = _load_tile(
        u1_ptr, u2_ptr, class_start_ptr, num_classes, neg_count_ptr, C,
        BLOCK_M, BLOCK_C)
    anchor = tl.load(order_ptr + rows, mask=rmask, other=0)
    l1 = tl.load(lse1_ptr + rows, mask=rmask, other=0.0)
    l2 = tl.load(lse2_ptr + rows, mask=rmask, other=0.0)
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
        bank, nmask, a1, a2 = _bank_logits(u1, u2, bank_base, n0, kc, cc, cmask, C, inv_tau,
                                           BLOCK_N, PRECISION)
        p1 = tl.where(nmask[None, :], tl.exp(a1 - l1[:, None]) * wt[:, None], 0.0)
        p2 = tl.where(nmask[None, :], tl.exp(a2 - l2[:, None]) * wt[:, None], 0.0)
        mass += tl.sum(p1, 1) + tl.sum(p2, 1)
        du1 += tl.dot(p1, bank, input_precision=PRECISION)
        du2 += tl.dot(p2, bank, input_precision=PRECISION)
    du1 -= mass[:, None] * u2
    du2 -= mass[:, None] * u1
    sq1 = tl.load(sq1_ptr + rows, mask=rmask, other=1.0)
    sq2 = tl.load(sq2_ptr + rows, mask=rmask, other=1.0)
    _chain_store(du1, u1, sq1, g1_ptr, anchor, rmask, cc, cmask, C, P)
    _chain_store(du2, u2, sq2, g2_ptr, anchor, rmask, cc, cmask, C, P)


@triton.jit
def _topk_bank_grad_kernel(u1_ptr, u2_ptr, bank_ptr, class_start_ptr, neg_count_ptr, order_ptr,
                           lse1_ptr, lse2_ptr, w_ptr, grad_scale, part_ptr, C, L, num_classes,
                           inv_tau, HAS_W: tl.constexpr, SPLIT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                           PRECISION: tl.constexpr):
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
    bank = tl.load(bank_ptr + cls * L * C + ns[:, None] * C + cc[None, :],
                   mask=nmask[:, None] & cmask[None, :], other=0.0)
    bank_t = tl.trans(bank)
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for r0 in range(lo, hi, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < hi
        m2 = rmask[:, None] & cmask[None, :]
        u1 = tl.load(u1_ptr + rows[:, None] * C + cc[None, :], mask=m2, other=0.0)
        u2 = tl.load(u2_ptr + rows[:, None] * C + cc[None, :], mask=m2, other=0.0)
        l1 = tl.load(lse1_ptr + rows, mask=rmask, other=0.0)
        l2 = tl.load(lse2_ptr + rows, mask=rmask, other=0.0)
        w = tl.zeros([BLOCK_M], tl.float32) + grad_scale
        if HAS_W:
            anchor = tl.load(order_ptr + rows, mask=rmask, other=0)
            w = w * tl.load(w_ptr + anchor, mask=rmask, other=0.0)
        wt = tl.where(rmask, w * inv_tau, 0.0)
        a1 = tl.dot(u1, bank_t, input_precision=PRECISION) * inv_tau
        a2 = tl.dot(u2, bank_t, input_precision=PRECISION) * inv_tau
        p1 = tl.where(nmask[None, :], tl.exp(a1 - l1[:, None]) * wt[:, None], 0.0)
        p2 = tl.where(nmask[None, :], tl.exp(a2 - l2[:, None]) * wt[:, None], 0.0)
        acc += tl.dot(tl.trans(p1), u1, input_precision=PRECISION)
        acc += tl.dot(tl.trans(p2), u2, input_precision=PRECISION)
    out = part_ptr + ((sp * num_classes + cls) * L) * C
    tl.store(out + ns[:, None] * C + cc[None, :], acc, mask=(ns < L)[:, None] & cmask[None, :])


@triton.jit
def _bank_scatter_kernel(part_ptr, neg_index_ptr, neg_count_ptr, pool_grad_ptr, cls, C, L,
                         num_classes, SPLIT: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """pool_grad[neg_index[cls, k]] += sum_split partial[split, cls, k] (rows of one bank distinct)."""
    k = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    kc = tl.load(neg_count_ptr + cls).to(tl.int64)
    kmask = k < kc
    cc = tl.arange(0, BLOCK_C)
    cmask = cc < C
    m2 = kmask[:, None] & cmask[None, :]
    j = tl.load(neg_index_ptr + cls * L + k, mask=kmask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for sp in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + ((sp * num_classes + cls) * L + k[:, None]) * C + cc[None, :],
                       mask=m2, other=0.0)
    dst = pool_grad_ptr + j[:, None] * C + cc[None, :]
    tl.store(dst, tl.load(dst, mask=m2, other=0.0) + acc, mask=m2)


# ---------------------------------------------------------------------------------------------
# random mode
# ---------------------------------------------------------------------------------------------
@triton.jit
def _random_draw_positions(seed, anchor, ks, K, offset, n):
    """Position in the class's eligible list of draws ks of `anchor` (csrc/rcps_math.h)."""
    counter = anchor * K + ks + offset  # int64: the 64-bit counter of draw_counter()
    r = tl.randint(seed, counter)  # uint32, counter words (lo32, hi32, 0, 0)
    return ((r.to(tl.uint64) * n.to(tl.uint64)) >> 32).to(tl.int64)


@triton.jit
def _random_draws_kernel(labels_ptr, neg_index_ptr, neg_count_ptr, out_ptr, L, K, seed, offset,
                         BLOCK_K: tl.constexpr):
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
def _random_kernel(z1_ptr, z2_ptr, s1b, s1c, s1p, s2b, s2c, s2p, un_ptr, labels_ptr,
                   neg_index_ptr, neg_count_ptr, loss_ptr, w_ptr, grad_scale, g1_ptr, g2_ptr,
                   pool_grad_ptr, qscale_ptr, C, P, L, K, seed, offset, inv_tau,
                   HAS_W: tl.constexpr, WANT_GRAD: tl.constexpr, NEG_GRAD: tl.constexpr,
                   FIXED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    cls = tl.load(labels_ptr + i).to(tl.int64)
    n = tl.load(neg_count_ptr + cls).to(tl.int64)
    draws = tl.where(n > 0, K, 0)
    b = i // P
    p = i - b * P
    cc = tl.arange(0, BLOCK_C)
    cmask = cc < C
    z1 = tl.load(z1_ptr + b * s1b + p * s1p + cc.to(tl.int64) * s1c, mask=cmask,
                 other=0.0).to(tl.float32)
    z2 = tl.load(z2_ptr + b * s2b + p * s2p + cc.to(tl.int64) * s2c, mask=cmask,
                 other=0.0).to(tl.float32)
    sq1 = tl.sum(z1 * z1, 0)
    sq2 = tl.sum(z2 * z2, 0)
    u1 = z1 / tl.maximum(tl.sqrt(sq1), 1e-12)
    u2 = z2 / tl.maximum(tl.sqrt(sq2), 1e-12)
    x = tl.sum(u1 * u2, 0) * inv_tau
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
        un = tl.load(un_ptr + j[:, None] * C + cc[None, :], mask=kmask[:, None] & cmask[None, :],
                     other=0.0)
        d1 = tl.where(kmask, tl.sum(un * u1[None, :], 1) * inv_tau, float("-inf"))
        d2 = tl.where(kmask, tl.sum(un * u2[None, :], 1) * inv_tau, float("-inf"))
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
    nll1, l1 = _positive_nll(mx1, neg1, x)
    nll2, l2 = _positive_nll(mx2, neg2, x)
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
            d1 = tl.sum(un * u1[None, :], 1) * inv_tau
            d2 = tl.sum(un * u2[None, :], 1) * inv_tau
            p1 = tl.where(kmask, tl.exp(d1 - l1) * wt, 0.0)
            p2 = tl.where(kmask, tl.exp(d2 - l2) * wt, 0.0)
            mass += tl.sum(p1, 0) + tl.sum(p2, 0)
            du1 += tl.sum(p1[:, None] * un, 0)
            du2 += tl.sum(p2[:, None] * un, 0)
            if NEG_GRAD:
                contrib = p1[:, None] * u1[None, :] + p2[:, None] * u2[None, :]
                dst = pool_grad_ptr + j[:, None] * C + cc[None, :]
                if FIXED:
                    tl.atomic_add(dst, (contrib * qscale).to(tl.int64), mask=m2d)
                else:
                    tl.atomic_add(dst, contrib, mask=m2d)
        du1 -= mass * u2
        du2 -= mass * u1
        one = tl.full([1], 0, tl.int64) + i
        rm = tl.full([1], 1, tl.int1)
        _chain_store(du1[None, :], u1[None, :], tl.full([1], 0.0, tl.float32) + sq1, g1_ptr, one,
                     rm, cc, cmask, C, P)
        _chain_store(du2[None, :], u2[None, :], tl.full([1], 0.0, tl.float32) + sq2, g2_ptr, one,
                     rm, cc, cmask, C, P)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
def _block_c(C: int) -> int:
    return max(16, triton.next_power_of_2(C))


def _topk_blocks(C: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for the tl.dot kernels."""
    if _INTERPRET:
        return 16, 16, 4
    bc = _block_c(C)
    if bc <= 64:
        return 64, 64, 4
    if bc <= 128:
        return 64, 32, 4
    return 32, 32, 8


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _normalize(z: Tensor, rows: Tensor | None, R: int, want_sq: bool = True):
    C = z.shape[1]
    u = torch.empty((R, C), device=z.device, dtype=torch.float32)
    sq = torch.empty((R,), device=z.device, dtype=torch.float32) if want_sq else None
    if R > 0:
        block_r = 16 if _INTERPRET else 32
        _normalize_kernel[(triton.cdiv(R, block_r),)](
            z, rows, u, sq, R, C, z.shape[2], z.stride(0), z.stride(1), z.stride(2),
            HAS_ROWS=rows is not None, BLOCK_R=block_r, BLOCK_C=_block_c(C))
    return u, sq


def _pool_input_grad(zn: Tensor, pool_grad: Tensor, descale: Tensor | None) -> Tensor:
    Bn, C, Pn = zn.shape
    out = torch.empty((Bn, C, Pn), device=zn.device, dtype=zn.dtype)
    M = Bn * Pn
    if M > 0:
        block_r = 16 if _INTERPRET else 32
        _pool_chain_kernel[(triton.cdiv(M, block_r),)](
            zn, pool_grad, descale, out, M, C, Pn, zn.stride(0), zn.stride(1), zn.stride(2),
            FIXED=descale is not None, BLOCK_R=block_r, BLOCK_C=_block_c(C))
    return out


def _topk(z1, z2, zn, labels, neg_index, neg_count, inv_tau, w, grad_scale, want_grad,
          neg_grad):
    B, C, P = z1.shape
    N = B * P
    num_classes, L = neg_index.shape
    dev = z1.device
    bm, bn, warps = _topk_blocks(C)
    bc = _block_c(C)
    # Class-sorted anchor order. A narrow key: the radix sort then makes 1-2 passes, not 8.
    key_dtype = torch.int16 if num_classes <= 2**15 - 1 else torch.int32
    sorted_labels, order = torch.sort(labels.to(key_dtype), stable=True)
    bounds = torch.arange(num_classes + 1, device=dev, dtype=key_dtype)
    class_start = torch.searchsorted(sorted_labels, bounds)  # class_start[-1] == N
    num_tiles = triton.cdiv(N, bm) + num_classes  # >= sum_c ceil(n_c / bm); spares do nothing
    u1, sq1 = _normalize(z1, order, N)
    u2, sq2 = _normalize(z2, order, N)
    bank, _ = _normalize(zn, neg_index.reshape(-1), num_classes * L, want_sq=False)
    loss = torch.empty((N,), device=dev, dtype=torch.float32)
    lse1 = torch.empty((N,), device=dev, dtype=torch.float32)
    lse2 = torch.empty((N,), device=dev, dtype=torch.float32)
    _topk_lse_kernel[(num_tiles,)](
        u1, u2, bank, class_start, num_classes, neg_count, order, lse1, lse2, loss, C, L,
        inv_tau, BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc, PRECISION=DOT_PRECISION, num_warps=warps)
    if not want_grad:
        return loss, None, None, None
    g1 = torch.empty((B, C, P), device=dev, dtype=z1.dtype)
    g2 = torch.empty((B, C, P), device=dev, dtype=z2.dtype)
    _topk_anchor_grad_kernel[(num_tiles,)](
        u1, u2, sq1, sq2, bank, class_start, num_classes, neg_count, order, lse1, lse2, w,
        grad_scale, g1, g2, C, P, L, inv_tau, HAS_W=w is not None, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_C=bc, PRECISION=DOT_PRECISION, num_warps=warps)
    if not neg_grad:
        return loss, g1, g2, None
    M = zn.shape[0] * zn.shape[2]
    pool_grad = torch.zeros((M, C), device=dev, dtype=torch.float32)
    nblocks = triton.cdiv(L, bn)
    if _INTERPRET:
        split = 2
    else:
        split = max(1, min(32, (2 * _num_sms(dev)) // max(1, num_classes * nblocks),
                           triton.cdiv(N, 4 * bm * num_classes)))
    partial = torch.empty((split, num_classes, L, C), device=dev, dtype=torch.float32)
    _topk_bank_grad_kernel[(num_classes, nblocks, split)](
        u1, u2, bank, class_start, neg_count, order, lse1, lse2, w, grad_scale, partial, C, L,
        num_classes, inv_tau, HAS_W=w is not None, SPLIT=split, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_C=bc, PRECISION=DOT_PRECISION, num_warps=warps)
    block_r = 16 if _INTERPRET else 32
    for c in range(num_classes):  # in class order: deterministic where banks share voxels
        _bank_scatter_kernel[(triton.cdiv(L, block_r),)](
            partial, neg_index, neg_count, pool_grad, c, C, L, num_classes, SPLIT=split,
            BLOCK_R=block_r, BLOCK_C=bc)
    return loss, g1, g2, _pool_input_grad(zn, pool_grad, None)


def _random(z1, z2, zn, labels, neg_index, neg_count, inv_tau, K, seed, offset, w, grad_scale,
            want_grad, neg_grad):
    B, C, P = z1.shape
    N = B * P
    L = neg_index.shape[1]
    dev = z1.device
    M = zn.shape[0] * zn.shape[2]
    un, _ = _normalize(zn, None, M, want_sq=False)
    loss = torch.empty((N,), device=dev, dtype=torch.float32)
    g1 = g2 = pool_grad = qscale = descale = None
    fixed = False
    if want_grad:
        g1 = torch.empty((B, C, P), device=dev, dtype=z1.dtype)
        g2 = torch.empty((B, C, P), device=dev, dtype=z2.dtype)
    if neg_grad:
        fixed = deterministic()
        if fixed:
            pool_grad = torch.zeros((M, C), device=dev, dtype=torch.int64)
            wsum = (w.double().abs().sum() if w is not None
                    else torch.full((), float(N), device=dev, dtype=torch.float64))
            unit = (2.0 * abs(grad_scale) * inv_tau * wsum).clamp_min(1e-30)
            qscale = (float(2 ** _FIXED_POINT_BITS) / unit).clamp(max=1e38).float().reshape(1)
            descale = (1.0 / qscale.double()).reshape(1)
        else:
            pool_grad = torch.zeros((M, C), device=dev, dtype=torch.float32)
    block_k = 16 if _INTERPRET else 64
    _random_kernel[(N,)](
        z1, z2, z1.stride(0), z1.stride(1), z1.stride(2), z2.stride(0), z2.stride(1),
        z2.stride(2), un, labels, neg_index, neg_count, loss, w, grad_scale, g1, g2, pool_grad,
        qscale, C, P, L, K, seed, offset, inv_tau, HAS_W=w is not None, WANT_GRAD=want_grad,
        NEG_GRAD=neg_grad, FIXED=fixed, BLOCK_K=block_k, BLOCK_C=_block_c(C),
        num_warps=1 if _INTERPRET else 2)
    gn = _pool_input_grad(zn, pool_grad, descale) if neg_grad else None
    return loss, g1, g2, gn


def random_draws_triton(anchor_labels: Tensor, neg_index: Tensor, neg_count: Tensor,
                        num_negatives: int, seed: int, offset: int = 0) -> Tensor:
    """(N, K) pool voxels that the Triton random mode draws (-1: nothing eligible); for tests."""
    N, K = anchor_labels.numel(), num_negatives
    out = torch.empty((N, K), device=anchor_labels.device, dtype=torch.int64)
    if N and K:
        _random_draws_kernel[(N,)](
            anchor_labels.contiguous(), neg_index.contiguous(), neg_count.contiguous(), out,
            neg_index.shape[1], K, seed, offset, BLOCK_K=16 if _INTERPRET else 128)
    return out


def voxel_infonce_triton(anchor, positive, negative, anchor_labels, neg_index, neg_count,
                         temperature, num_negatives, random, seed, offset, grad_weight,
                         grad_scale, negative_grad):
    """The kernel signature of ops/infonce.py, on CUDA tensors (or CPU under TRITON_INTERPRET=1)."""
    if anchor.dim() != 3 or positive.shape != anchor.shape:
        raise ValueError(f"voxel_infonce_triton: anchor and positive must be equal (B, C, P), got "
                         f"{tuple(anchor.shape)} and {tuple(positive.shape)}")
    if negative.dim() != 3 or negative.shape[1] != anchor.shape[1]:
        raise ValueError(f"voxel_infonce_triton: negative must be (Bn, C, Pn) with C = "
                         f"{anchor.shape[1]}, got {tuple(negative.shape)}")
    B, C, P = anchor.shape
    N = B * P
    dev = anchor.device
    want_grad = grad_scale != 0.0
    neg_grad = want_grad and negative_grad
    labels = anchor_labels.to(device=dev, dtype=torch.int64).contiguous()
    neg_index = neg_index.to(device=dev, dtype=torch.int64).contiguous()
    neg_count = neg_count.to(device=dev, dtype=torch.int64).contiguous()
    w = None
    if want_grad and grad_weight is not None:
        w = grad_weight.to(device=dev, dtype=torch.float32).contiguous()
    inv_tau = 1.0 / float(temperature)
    empty_a = anchor.new_empty((0,))
    empty_n = negative.new_empty((0,))
    if N == 0 or neg_index.shape[0] == 0:
        loss = torch.zeros((N,), device=dev, dtype=torch.float32)
        g1 = torch.zeros_like(anchor, memory_format=torch.contiguous_format) if want_grad else empty_a
        g2 = torch.zeros_like(positive, memory_format=torch.contiguous_format) if want_grad else empty_a
        gn = (torch.zeros_like(negative, memory_format=torch.contiguous_format) if neg_grad
              else empty_n)
        return loss, g1, g2, gn
    with torch.cuda.device(dev) if dev.type == "cuda" else _nullcontext():
        if random:
            loss, g1, g2, gn = _random(anchor, positive, negative, labels, neg_index, neg_count,
                                       inv_tau, int(num_negatives), int(seed), int(offset), w,
                                       float(grad_scale), want_grad, neg_grad)
        else:
            loss, g1, g2, gn = _topk(anchor, positive, negative, labels, neg_index, neg_count,
                                     inv_tau, w, float(grad_scale), want_grad, neg_grad)
    return (loss, g1 if g1 is not None else empty_a, g2 if g2 is not None else empty_a,
            gn if gn is not None else empty_n)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


register_kernel("triton", voxel_infonce_triton)

__all__ = ["voxel_infonce_triton", "random_draws_triton", "deterministic", "DETERMINISTIC",
           "DOT_PRECISION"]
