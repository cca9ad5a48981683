"""Reference bidirectional voxel InfoNCE: the formula of docs/design.md section 2, materialised.

It gathers an (anchors, K, C) tensor of negatives and lets autograd differentiate, so it is
simple to read and exact in float64, but needs O(anchors * K * C) memory: use it as the oracle
and on small inputs, not at training sizes.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..ops.selection import eligible_negatives, pseudo_labels, topk_negatives

_MASK32 = np.uint64(0xFFFFFFFF)


def philox_randint(seed: int, counters: np.ndarray) -> np.ndarray:
    """Philox4x32-10 draws laid out like Triton's ``tl.randint(seed, offset)`` (64-bit offsets).

    Counter words (lo32(offset), hi32(offset), 0, 0), key (lo32(seed), hi32(seed)); returns the
    first output word as uint32. Written independently of the C++ version (csrc/common/rcps_math.h) so
    that each checks the other.
    """
    counters = np.asarray(counters, dtype=np.uint64)
    c0, c1 = counters & _MASK32, counters >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    mul_a, mul_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    with np.errstate(over="ignore"):
        for _ in range(10):
            prod_a, prod_b = mul_a * c0, mul_b * c2  # exact: both factors < 2^32
            c0, c1, c2, c3 = (
                (prod_b >> np.uint64(32)) ^ c1 ^ k0,
                prod_b & _MASK32,
                (prod_a >> np.uint64(32)) ^ c3 ^ k1,
                prod_a & _MASK32,
            )
            k0 = (k0 + np.uint64(0x9E3779B9)) & _MASK32
            k1 = (k1 + np.uint64(0xBB67AE85)) & _MASK32
    return c0.astype(np.uint32)


def random_negative_draws_reference(
    anchor_labels: torch.Tensor,
    eligible_idx: torch.Tensor,
    eligible_counts: torch.Tensor,
    num_negatives: int,
    seed: int,
    offset: int = 0,
) -> torch.Tensor:
    """(N, K) flat pool voxels drawn for each anchor in "random" mode, -1 where none is eligible.

    Draw k of anchor i uses counter i * K + k + offset; a 32-bit draw r maps to position
    (r * n) >> 32 of the anchor class's eligible list of length n.
    """
    labels = anchor_labels.cpu().numpy().astype(np.int64)
    n = eligible_counts.cpu().numpy().astype(np.uint64)[labels]  # (N,)
    counters = (
        np.arange(labels.size, dtype=np.uint64)[:, None] * np.uint64(num_negatives)
        + np.arange(num_negatives, dtype=np.uint64)[None, :]
        + np.uint64(offset)
    )
    r = philox_randint(seed, counters).astype(np.uint64)
    position = ((r * n[:, None]) >> np.uint64(32)).astype(np.int64)
    table = eligible_idx.cpu().numpy()
    draws = table[labels[:, None], position]
    draws[n == 0] = -1
    return torch.from_numpy(draws).to(anchor_labels.device)


def _rows(z: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (B * prod(S), C), voxel-major like the kernels."""
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def normalise(rows: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """F.normalize(rows, dim=1, eps=eps) with the norm scaled before squaring: in float32 the
    squared norm overflows from ||z|| ~ 1.8e19, and torch's norm does not scale on every device.
    The scale (each row's largest |z_c|) is a constant for autograd: ||z|| = s ||z / s||."""
    scale = rows.detach().abs().amax(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    norm = torch.linalg.vector_norm(rows / scale, dim=1, keepdim=True) * scale
    return rows / norm.clamp_min(eps)


def normalize(rows: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Deprecated name of :func:`normalise` (the project spells it with an s); warns, then calls it."""
    warnings.warn(
        "rcps_kernels.reference.infonce.normalize is deprecated, use normalise", DeprecationWarning, stacklevel=2
    )
    return normalise(rows, eps)


def negatives_per_anchor(
    anchor_logits: torch.Tensor,
    pool_logits: torch.Tensor,
    *,
    num_negatives: int,
    sampling: str,
    confidence_threshold: float = 0.0,
    seed: int = 0,
    offset: int = 0,
) -> torch.Tensor:
    """(N, K) flat pool index of every anchor's negatives, -1 for unused slots."""
    num_classes = max(anchor_logits.shape[1], pool_logits.shape[1])
    labels, _ = pseudo_labels(anchor_logits)
    if sampling == "topk":
        idx, _ = topk_negatives(pool_logits, num_negatives, num_classes)
        return idx[labels]
    idx, counts = eligible_negatives(pool_logits, confidence_threshold, num_classes)
    return random_negative_draws_reference(labels, idx, counts, num_negatives, seed, offset)


def bidirectional_voxel_infonce_reference(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    pool: torch.Tensor,
    anchor_logits: torch.Tensor,
    pool_logits: torch.Tensor,
    *,
    num_negatives: int = 400,
    temperature: float = 0.1,
    sampling: str = "topk",
    confidence_threshold: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per anchor i of class c with negatives N_c (u = z / max(||z||, 1e-12), s_i = u1_i . u2_i):

        l1_i = -s_i/tau + log(exp(s_i/tau) + sum_n exp(u1_i . u_n / tau))
        l2_i = -s_i/tau + log(exp(s_i/tau) + sum_n exp(u2_i . u_n / tau))

    Returns mean_i l1_i + mean_i l2_i ("mean"), sum_i (l1_i + l2_i) ("sum"), or l1 + l2 with
    shape (B, *S) ("none"). Arguments as in :func:`rcps_kernels.bidirectional_voxel_infonce`;
    ``seed``/``offset`` key the random draws.
    """
    u1, u2, un = normalise(_rows(anchor)), normalise(_rows(positive)), normalise(_rows(pool))
    neg = negatives_per_anchor(
        anchor_logits,
        pool_logits,
        num_negatives=num_negatives,
        sampling=sampling,
        confidence_threshold=confidence_threshold,
        seed=seed,
        offset=offset,
    )
    valid = neg >= 0  # (N, K)
    gathered = un[neg.clamp(min=0)]  # (N, K, C): the materialised negatives
    positive_logit = (u1 * u2).sum(dim=1, keepdim=True) / temperature  # (N, 1)

    def direction(u: torch.Tensor) -> torch.Tensor:
        negative_logit = torch.einsum("nc,nkc->nk", u, gathered) / temperature
        negative_logit = negative_logit.masked_fill(~valid, float("-inf"))
        logits = torch.cat([positive_logit, negative_logit], dim=1)
        # Shifted by the row's max (a constant for autograd): the softmax weights that autograd
        # forms, exp(logit - lse), then keep their digits when lse ~ 1/tau has an ulp above 1
        # (small temperatures), and a positive that dominates gives no lse - x cancellation.
        top = logits.detach().amax(dim=1, keepdim=True)
        return torch.logsumexp(logits - top, dim=1) + (top - positive_logit).squeeze(1)

    per_anchor = direction(u1) + direction(u2)
    if reduction == "mean":
        return per_anchor.mean()
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor.reshape(anchor.shape[0], *anchor.shape[2:])
