"""Triton pieces shared by the topk and random modes of the voxel InfoNCE (infonce_triton.py).

The positive's NLL from the negatives' log-sum-exp state; feature rows normalised into fp32
copies (u = z / max(||z||, eps), as F.normalize and csrc/common/rcps_math.h); and the chain rule that
takes gradients of those copies back through the normalisation into the input-dtype (B, C, P)
gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..settings import triton_interpreting


@triton.jit
def row_norms(z):
    """||z|| of each row of a 2-D block, scaled before squaring like csrc/common/rcps_math.h's
    scaled_norm: sum(z * z) overflows float32 from ||z|| ~ 1.8e19, sum((z / max|z|)^2) never."""
    amax = tl.max(tl.abs(z), 1)
    scaled = z / tl.where(amax > 0, amax, 1.0)[:, None]
    return amax * tl.sqrt(tl.sum(scaled * scaled, 1))


@triton.jit
def chain_store(du, u, norm, g_ptr, voxel, rmask, cc, cmask, C, P):
    """dz = (du - u (u.du)) / max(||z||, eps) (du / eps where clamped) into (B, C, P) at voxel."""
    clamped = norm <= 1e-12
    inv = 1.0 / tl.maximum(norm, 1e-12)
    u_dot_du = tl.sum(u * du, 1)
    dz = tl.where(clamped[:, None], du, du - u * u_dot_du[:, None]) * inv[:, None]
    b = voxel // P
    p = voxel - b * P
    off = b[:, None] * C * P + cc[None, :].to(tl.int64) * P + p[:, None]
    tl.store(g_ptr + off, dz.to(g_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def positive_nll(neg_max, neg_sum, x):
    """(-log softmax of the positive logit x, anchor, rel) from the negatives' (max, sum), as
    rcps_math.h's positive_nll, which says why the loss is not lse - x and why the log-normaliser
    is kept as lse = anchor + rel (softmax weight exp((logit - anchor) - rel)).
    log1p(y) is taken as log(1 + y) * y / ((1 + y) - 1), exact to a few ulp without libdevice."""
    log_sum = tl.log(neg_sum)
    t = (neg_max - x) + log_sum
    y = tl.exp(-tl.abs(t))
    one_plus = 1.0 + y
    tail = tl.where(one_plus == 1.0, y, tl.log(one_plus) * (y / (one_plus - 1.0)))
    negatives_dominate = t > 0.0
    return (
        tl.where(negatives_dominate, t, 0.0) + tail,
        tl.where(negatives_dominate, neg_max, x),
        tl.where(negatives_dominate, log_sum, 0.0) + tail,
    )


@triton.jit
def store_normaliser(ptr, rows, anchor, rel, rmask):
    """A row's log-normaliser (anchor, rel) at ptr + 2 row (see positive_nll)."""
    tl.store(ptr + 2 * rows, anchor, mask=rmask)
    tl.store(ptr + 2 * rows + 1, rel, mask=rmask)


@triton.jit
def softmax_weight(logit, ptr, rows, rmask):
    """exp(logit - lse) for (rows, bank) logits, lse = anchor + rel stored by store_normaliser."""
    anchor = tl.load(ptr + 2 * rows, mask=rmask, other=0.0)
    rel = tl.load(ptr + 2 * rows + 1, mask=rmask, other=0.0)
    return tl.exp((logit - anchor[:, None]) - rel[:, None])


@triton.jit
def _normalise_kernel(
    z_ptr,
    z2_ptr,
    rows_ptr,
    u_ptr,
    norm_ptr,
    R,
    C,
    P,
    s_b,
    s_c,
    s_p,
    s2_b,
    s2_c,
    s2_p,
    HAS_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """u[r] = z[voxel(r)] / max(||z||, eps) as fp32 rows (R, C); voxel(r) = rows[r] or r; -1 -> 0.

    Grid axis 1 picks the input: z, or z2 into rows R.. 2R of u and norm (both views in one
    launch: at small shapes the launch costs more than the work).
    """
    second = tl.program_id(1) == 1
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
    zmask = valid[:, None] & cmask[None, :]
    if second:
        off = b[:, None] * s2_b + p[:, None] * s2_p + cc[None, :].to(tl.int64) * s2_c
        z = tl.load(z2_ptr + off, mask=zmask, other=0.0).to(tl.float32)
    else:
        off = b[:, None] * s_b + p[:, None] * s_p + cc[None, :].to(tl.int64) * s_c
        z = tl.load(z_ptr + off, mask=zmask, other=0.0).to(tl.float32)
    norm = row_norms(z)
    u = z / tl.maximum(norm, 1e-12)[:, None]  # divide, like F.normalize (rcps_math.h)
    out = tl.where(second, R, 0) + r
    tl.store(u_ptr + out[:, None] * C + cc[None, :], u, mask=rmask[:, None] & cmask[None, :])
    if norm_ptr is not None:
        tl.store(norm_ptr + out, norm, mask=rmask)


@triton.jit
def _pool_chain_kernel(
    z_ptr,
    pg_ptr,
    descale_ptr,
    g_ptr,
    M,
    C,
    P,
    s_b,
    s_c,
    s_p,
    FIXED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """grad_negative (Bn, C, Pn) from the (M, C) gradient of the normalised pool."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < M
    cc = tl.arange(0, BLOCK_C)
    cmask = cc < C
    m2 = rmask[:, None] & cmask[None, :]
    b = r // P
    p = r - b * P
    z = tl.load(z_ptr + b[:, None] * s_b + p[:, None] * s_p + cc[None, :].to(tl.int64) * s_c, mask=m2, other=0.0).to(
        tl.float32
    )
    norm = row_norms(z)
    u = z / tl.maximum(norm, 1e-12)[:, None]
    g = tl.load(pg_ptr + r[:, None] * C + cc[None, :], mask=m2, other=0)
    if FIXED:
        du = (g.to(tl.float64) * tl.load(descale_ptr)).to(tl.float32)
    else:
        du = g.to(tl.float32)
    chain_store(du, u, norm, g_ptr, r, rmask, cc, cmask, C, P)


def block_c(C: int) -> int:
    return max(16, triton.next_power_of_2(C))


def normalise_rows(z: Tensor, rows: Tensor | None, R: int, want_norm: bool = True, z2: Tensor | None = None):
    """Rows of z (R, C) normalised in fp32, and their norms; with z2 (z's shape), both in one
    launch as (2, R, C) and (2, R)."""
    C = z.shape[1]
    views = 1 if z2 is None else 2
    u = torch.empty((views, R, C), device=z.device, dtype=torch.float32)
    norm = torch.empty((views, R), device=z.device, dtype=torch.float32) if want_norm else None
    if R > 0:
        block_r = 16 if triton_interpreting() else 32
        other = z if z2 is None else z2
        _normalise_kernel[(triton.cdiv(R, block_r), views)](
            z,
            other,
            rows,
            u,
            norm,
            R,
            C,
            z.shape[2],
            z.stride(0),
            z.stride(1),
            z.stride(2),
            other.stride(0),
            other.stride(1),
            other.stride(2),
            HAS_ROWS=rows is not None,
            BLOCK_R=block_r,
            BLOCK_C=block_c(C),
        )
    return (u[0], norm[0] if want_norm else None) if z2 is None else (u, norm)


def pool_input_grad(zn: Tensor, pool_grad: Tensor, descale: Tensor | None) -> Tensor:
    Bn, C, Pn = zn.shape
    out = torch.empty((Bn, C, Pn), device=zn.device, dtype=zn.dtype)
    M = Bn * Pn
    if M > 0:
        block_r = 16 if triton_interpreting() else 32
        _pool_chain_kernel[(triton.cdiv(M, block_r),)](
            zn,
            pool_grad,
            descale,
            out,
            M,
            C,
            Pn,
            zn.stride(0),
            zn.stride(1),
            zn.stride(2),
            FIXED=descale is not None,
            BLOCK_R=block_r,
            BLOCK_C=block_c(C),
        )
    return out
