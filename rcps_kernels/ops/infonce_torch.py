"""The voxel InfoNCE in plain PyTorch, memory-bounded: the kernels of ``backend="torch"``.

It fills the same kernel contract as the compiled backends (``kernels.py``), so the custom ops,
their fakes, the mean path and the backward by recomputation (``infonce.py``) are shared, and it
runs on any device torch runs on. Memory is O((anchors + pool) x C) for the normalised copies
and gradients, plus one tile of similarities: never anchors x K x C.

- topk: the anchors of one class share their bank, so a tile of them meets a block of the bank
  in one matrix product, ``(2, T, C) @ (C, Kt)`` for both directions.
- random: each anchor has its own draws; a tile gathers ``(T, Kt, C)`` normalised pool rows (the
  bounded budget below), the draws regenerated from the counter-based Philox of
  docs/design.md section 2.3 whenever a pass needs them.

Per anchor tile, pass 1 walks the negative blocks with an online log-sum-exp; with gradients,
pass 2 walks them again (the block of pass 1 is kept when there is only one) and forms the
softmax weights from the final log-normaliser. Per direction, with x the positive logit, m the
running maximum (starting at x) and s the sum of exp(d - m) over negatives::

    l = (m - x) + log1p((exp(x - m) - 1) + s)

which keeps tiny losses of confident anchors accurate (m = x makes the first term vanish and the
argument of log1p exactly s). Pool gradients are added with ``index_add_`` (serial on the CPU;
on a GPU a topk block's rows are distinct, and random mode's repeated rows go through
``index_put_(accumulate=True)``, sorted and reduced in a fixed order, when
``determinism.deterministic_algorithms()`` asks for it), so the CPU results are bitwise reproducible.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..determinism import deterministic_algorithms
from .selection import anchor_class_order

#: Budget of one tile in elements (4 MiB of float32): similarities (topk), gathered pool rows (random).
TILE_ELEMENTS = 2**20
#: Most negatives one block holds; larger K is walked in blocks by the online log-sum-exp.
BLOCK_NEGATIVES = 1024
_NORM_EPS = 1e-12


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass
class _Rows:
    """Normalised rows u = z / max(||z||, eps) of a (B, C, P) input, and their norms."""

    unit: Tensor  # (B * P, C)
    norm: Tensor  # (B * P, 1)

    @classmethod
    def of(cls, z: Tensor, dtype: torch.dtype) -> _Rows:
        rows = z.permute(0, 2, 1).reshape(-1, z.shape[1]).to(dtype)
        # ||z|| = s ||z / s|| with s the largest |z_c|: the squares of float32 rows overflow from 1.8e19.
        scale = rows.abs().amax(dim=1, keepdim=True)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        norm = torch.linalg.vector_norm(rows / scale, dim=1, keepdim=True) * scale
        return cls(rows / norm.clamp_min(_NORM_EPS), norm)

    def input_grad(self, grad_unit: Tensor, like: Tensor) -> Tensor:
        """dL/dz from dL/du (the chain rule of the clamped normalisation), shaped and typed like `like`."""
        radial = (self.unit * grad_unit).sum(dim=1, keepdim=True)
        clamped = self.norm < _NORM_EPS  # u = z / eps there: a constant divisor
        grad = torch.where(clamped, grad_unit / _NORM_EPS, (grad_unit - self.unit * radial) / self.norm)
        batch, channels, voxels = like.shape
        out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        out.copy_(grad.view(batch, voxels, channels).permute(0, 2, 1))
        return out


# --------------------------------------------------------------------------------------------
# Negatives of one anchor tile: a shared bank (topk) or per-anchor draws (random)
# --------------------------------------------------------------------------------------------
def _block_width(count: int, elements_per_pair: int) -> int:
    """Negatives per block: at most BLOCK_NEGATIVES, and one anchor's block within the tile budget."""
    return max(1, min(count, BLOCK_NEGATIVES, TILE_ELEMENTS // elements_per_pair))


def _anchors_per_tile(width: int, elements_per_pair: int) -> int:
    return max(1, TILE_ELEMENTS // (width * elements_per_pair))


class _Bank:
    """topk: the `count` bank rows of one class, shared by every anchor of the tile."""

    #: Elements per (anchor, negative) pair in a tile: the similarities of both directions.
    ELEMENTS_PER_PAIR = 2

    def __init__(self, pool: Tensor, index: Tensor):
        self.index = index
        self.rows = pool[index]  # (count, C)
        self.count = index.numel()
        self.width = _block_width(self.count, self.ELEMENTS_PER_PAIR)

    def logits(self, anchors: Tensor, start: int, stop: int) -> Tensor:
        """(2, T, C) scaled anchors -> (2, T, stop - start) similarities with block [start, stop)."""
        return anchors @ self.rows[start:stop].T

    def weighted_rows(self, weights: Tensor, start: int, stop: int) -> Tensor:
        """sum_n w_n u_n per direction and anchor: (2, T, Kt) -> (2, T, C)."""
        return weights @ self.rows[start:stop]

    def add_pool_grads(self, pool_grad: Tensor, weights: Tensor, anchors: Tensor, start: int, stop: int) -> None:
        """pool_grad[row n] += sum over directions and anchors of w_n * anchor (distinct rows)."""
        pool_grad.index_add_(0, self.index[start:stop], weights.flatten(0, 1).T @ anchors.flatten(0, 1))


def _add_rows(target: Tensor, index: Tensor, rows: Tensor) -> None:
    """target[index[i]] += rows[i], with repeated indices. index_add_ is serial (deterministic) on
    the CPU but uses float atomics on GPUs; there, when deterministic algorithms are asked for,
    index_put_(accumulate=True) sorts the indices and reduces in a fixed order."""
    if target.device.type != "cpu" and deterministic_algorithms():
        target.index_put_((index,), rows, accumulate=True)
    else:
        target.index_add_(0, index, rows)


class _Draws:
    """random: K Philox draws per anchor of the tile, from its class's eligible list."""

    def __init__(self, pool: Tensor, params, first: int, labels: Tensor):
        self.pool, self.params, self.labels = pool, params, labels
        self.first = first
        self.available = params.neg_count[labels]  # (T,) eligible voxels of each anchor's class
        self.count = params.num_negatives
        self.width = _block_width(self.count, self.elements_per_pair(pool.shape[1]))
        self._cached: tuple[int, int, Tensor, Tensor] | None = None

    @staticmethod
    def elements_per_pair(channels: int) -> int:
        """The gathered pool row of each (anchor, draw) pair, or the two similarities if larger."""
        return max(channels, 2)

    def _block(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        if self._cached is None or self._cached[:2] != (start, stop):
            voxel = draw_voxels(self.params, self.labels, self.available, self.first, start, stop)
            # index_select, not pool[voxel]: ~25x faster on the CPU for rows of this size.
            rows = self.pool.index_select(0, voxel.clamp_min(0).flatten()).view(*voxel.shape, -1)  # (T, Kt, C)
            drawn = voxel >= 0
            if not bool(drawn.all()):  # anchors of a class without eligible voxels
                rows = rows.masked_fill(~drawn.unsqueeze(-1), 0.0)
            self._cached = (start, stop, voxel, rows)
        return self._cached[2], self._cached[3]

    def logits(self, anchors: Tensor, start: int, stop: int) -> Tensor:
        voxel, rows = self._block(start, stop)
        sims = torch.einsum("dtc,tkc->dtk", anchors, rows)
        return sims.masked_fill((voxel < 0).unsqueeze(0), float("-inf"))

    def weighted_rows(self, weights: Tensor, start: int, stop: int) -> Tensor:
        _, rows = self._block(start, stop)
        return torch.bmm(weights.transpose(0, 1), rows).transpose(0, 1)  # batched over anchors

    def add_pool_grads(self, pool_grad: Tensor, weights: Tensor, anchors: Tensor, start: int, stop: int) -> None:
        voxel, _ = self._block(start, stop)
        # (T, Kt, 2) @ (T, 2, C): the sum over both directions as one batched product (3x faster
        # on the CPU than two broadcast outer products).
        contributions = torch.bmm(weights.permute(1, 2, 0), anchors.transpose(0, 1))
        _add_rows(pool_grad, voxel.clamp_min(0).flatten(), contributions.flatten(0, 1))


# --------------------------------------------------------------------------------------------
# Philox4x32-10, in int64 tensor arithmetic without overflow
# --------------------------------------------------------------------------------------------
_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mul_hi_lo(x: Tensor, constant: int) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of x * constant for 32-bit x: split into 16-bit halves, so that no
    product leaves int64's range (signed overflow is not defined on every device)."""
    high16, low16 = constant >> 16, constant & 0xFFFF
    upper = x * high16  # < 2^48
    middle = ((upper & 0xFFFF) << 16) + x * low16  # < 2^49
    return (upper >> 16) + (middle >> 32), middle & _MASK32


def philox_randint(seed: int, counters: Tensor) -> Tensor:
    """First output word of Philox4x32-10 at 64-bit `counters` (int64 >= 0) under a 64-bit key,
    counter words (lo32, hi32, 0, 0): the draws of Triton's ``tl.randint``, as int64 in [0, 2^32)."""
    c0, c1 = counters & _MASK32, counters >> 32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    seed &= 2**64 - 1
    k0, k1 = seed & _MASK32, seed >> 32
    for _ in range(10):
        hi_a, lo_a = _mul_hi_lo(c0, _PHILOX_M0)
        hi_b, lo_b = _mul_hi_lo(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
    return c0


def draw_voxels(params, labels: Tensor, available: Tensor, first: int, start: int, stop: int) -> Tensor:
    """Pool voxels of draws [start, stop) of anchors first, first + 1, ... (their `labels` and
    eligible counts `available`): (T, stop - start) int64, -1 where the class has none."""
    device = labels.device
    anchors = torch.arange(first, first + labels.numel(), device=device).unsqueeze(1)
    draws = torch.arange(start, stop, device=device)
    counters = anchors * params.num_negatives + draws + params.offset
    r = philox_randint(params.seed, counters)
    # position = (r * n) >> 32 with r < 2^32, n < 2^31, again in halves.
    n = available.unsqueeze(1)
    position = ((r >> 16) * n + (((r & 0xFFFF) * n) >> 16)) >> 16
    voxel = params.neg_index[labels.unsqueeze(1), position]
    return torch.where(n > 0, voxel, -1)


# --------------------------------------------------------------------------------------------
# One anchor tile: both directions, forward and (optionally) gradients
# --------------------------------------------------------------------------------------------
def _tile(
    negatives, anchors: Tensor, positive_logit: Tensor, inv_tau: float, coefficient: Tensor | None, pool_grad
) -> tuple[Tensor, Tensor | None]:
    """Loss of each anchor of the tile and, when `coefficient` (the weight of each anchor's loss
    in the differentiated sum) is given, dL/du of anchors and positives; the pool's dL/du goes
    into `pool_grad` (None: not wanted).

    Args:
        negatives: a _Bank or _Draws.
        anchors: (2, T, C): u1 / tau and u2 / tau.
        positive_logit: (T,) u1 . u2 / tau.

    Returns:
        loss (T,) l1 + l2; dL/du (2, T, C) for u1 and u2, or None.
    """
    width = negatives.width
    blocks = [(start, min(start + width, negatives.count)) for start in range(0, negatives.count, width)]
    top = positive_logit.expand(2, -1).clone()  # running maximum per direction, starting at x
    total = torch.zeros_like(top)  # sum of exp(d - top) over the negatives
    kept = None  # exp(d - m) of the only block, when there is one: pass 2 needs no recomputation
    for start, stop in blocks:
        sims = negatives.logits(anchors, start, stop)
        new_top = torch.maximum(top, sims.amax(dim=2))
        shifted = torch.exp(sims - new_top.unsqueeze(2))
        total = total * torch.exp(top - new_top) + shifted.sum(dim=2)
        top = new_top
        kept = shifted if len(blocks) == 1 else None
    shifted_positive = torch.exp(positive_logit - top)  # exp(x - m) <= 1
    loss = ((top - positive_logit) + torch.log1p((shifted_positive - 1) + total)).sum(dim=0)
    if coefficient is None:
        return loss, None
    normaliser = shifted_positive + total  # exp(lse - m)
    # dl/dx = p_positive - 1 = -(negative mass), in both directions; x = u1 . u2 / tau.
    negative_mass = (total / normaliser).sum(dim=0) * coefficient
    grad_units = -negative_mass.unsqueeze(1) * anchors.flip(0)
    for start, stop in blocks:
        shifted = kept if kept is not None else torch.exp(negatives.logits(anchors, start, stop) - top.unsqueeze(2))
        weights = shifted * (coefficient / normaliser).unsqueeze(2)
        grad_units = grad_units + inv_tau * negatives.weighted_rows(weights, start, stop)
        if pool_grad is not None:
            negatives.add_pool_grads(pool_grad, weights, anchors, start, stop)
    return loss, grad_units


# --------------------------------------------------------------------------------------------
# The kernel-table entries
# --------------------------------------------------------------------------------------------
def _anchor_tiles(params, num_anchors: int, channels: int, pool: Tensor):
    """(anchor indices, negatives) per tile: topk groups the anchors by class, random takes them in order."""
    labels = params.anchor_labels
    if params.random:
        per_pair = _Draws.elements_per_pair(channels)
        size = _anchors_per_tile(_block_width(params.num_negatives, per_pair), per_pair)
        for first in range(0, num_anchors, size):
            rows = torch.arange(first, min(first + size, num_anchors), device=labels.device)
            yield rows, _Draws(pool, params, first, labels[rows])
        return
    num_classes = params.neg_index.shape[0]
    order, class_start = anchor_class_order(labels, num_classes)
    bounds = class_start.tolist()
    counts = params.neg_count.clamp_max(params.num_negatives).tolist()
    for cls in range(num_classes):
        if counts[cls] == 0:
            continue  # no negatives: loss and gradients 0
        bank = _Bank(pool, params.neg_index[cls, : counts[cls]])
        size = _anchors_per_tile(bank.width, bank.ELEMENTS_PER_PAIR)
        for first in range(bounds[cls], bounds[cls + 1], size):
            yield order[first : min(first + size, bounds[cls + 1])], bank


def voxel_infonce(
    anchor: Tensor,
    positive: Tensor,
    pool: Tensor,
    params,
    *,
    grad_weight: Tensor | None = None,
    grad_scale: float = 0.0,
    pool_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The kernel contract of ``kernels.py``: per-anchor loss l1 + l2 and, for grad_scale != 0,
    the gradients of grad_scale * sum_i grad_weight[i] * l_i (empty tensors where not asked).

    Args:
        anchor, positive: (B, C, P) views, any strides; pool: (Bn, C, Pn).
        params: an InfoNCEParams.
        grad_weight: (N,) per-anchor weights (None: ones).
        grad_scale: the factor of the differentiated sum; 0 computes the loss only.
        pool_grad: also return the pool's gradient.

    Returns:
        (loss (N,) float32, or float64 for float64 inputs; grad_anchor; grad_positive; grad_pool),
        the gradients contiguous, in the inputs' dtype.
    """
    dtype = _compute_dtype(anchor.dtype)
    u1, u2, un = (_Rows.of(z, dtype) for z in (anchor, positive, pool))
    inv_tau = 1.0 / params.temperature
    scaled = torch.stack([u1.unit, u2.unit]) * inv_tau  # (2, N, C)
    positive_logit = (scaled[0] * u2.unit).sum(dim=1)
    num_anchors, channels = u1.unit.shape
    loss = torch.zeros(num_anchors, dtype=dtype, device=anchor.device)
    want_grad = grad_scale != 0
    grad_units = torch.zeros_like(scaled) if want_grad else None
    pool_units = torch.zeros_like(un.unit) if want_grad and pool_grad else None
    weight = None if grad_weight is None else grad_weight.to(dtype)
    for rows, negatives in _anchor_tiles(params, num_anchors, channels, un.unit):
        coefficient = None
        if want_grad:
            coefficient = (weight[rows] if weight is not None else torch.ones_like(positive_logit[rows])) * grad_scale
        tile_loss, tile_grads = _tile(
            negatives, scaled[:, rows], positive_logit[rows], inv_tau, coefficient, pool_units
        )
        loss[rows] = tile_loss
        if want_grad:
            grad_units[:, rows] = tile_grads
    if not want_grad:
        empty = anchor.new_empty(0)
        return loss, empty, empty, empty
    grad_pool = un.input_grad(pool_units, pool) if pool_units is not None else pool.new_empty(0)
    return loss, u1.input_grad(grad_units[0], anchor), u2.input_grad(grad_units[1], positive), grad_pool


def random_draws(params) -> Tensor:
    """(N, K) int64 pool voxels that random mode draws for every anchor (-1: none eligible)."""
    labels = params.anchor_labels
    return draw_voxels(params, labels, params.neg_count[labels], 0, 0, params.num_negatives)
