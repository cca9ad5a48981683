"""Random sampling of the voxel InfoNCE: the Philox draws of every backend against the
independent numpy Philox (known answers), eligibility and uniformity of the draws, and the
Triton kernels' anchor class order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rcps_kernels as rk
from rcps_kernels.backends import kernel_table
from rcps_kernels.ops.kernels import InfoNCEParams
from rcps_kernels.ops.selection import anchor_class_order, eligible_negatives, pseudo_labels
from rcps_kernels.reference.infonce import philox_randint, random_negative_draws_reference
from tests.kernels.op_template import CPU, CUDA, INFONCE_TARGETS, TORCH, TRITON, TRITON_GPU, infonce_case, targets


def test_philox_known_answer():
    # Philox4x32-10 with zero key and counter (Random123 test vector), first output word.
    assert philox_randint(0, np.array([0], dtype=np.uint64))[0] == 0x6627E8D5


def random_setup(threshold=0.0, seed=0, spatial=(6, 5, 4), pool_spatial=(5, 5, 4)):
    """Logits of 3 classes, the anchors' labels and the eligible tables."""
    _, logits = infonce_case(spatial, classes=3, pool_spatial=pool_spatial, seed=seed)
    labels, _ = pseudo_labels(logits[0])
    idx, counts = eligible_negatives(logits[1], threshold, 3)
    return logits, labels, idx, counts


def draws(target, labels, idx, counts, k, seed, offset):
    """The (N, K) draws of the target's kernel table, on the CPU."""
    params = InfoNCEParams(
        labels.to(target.device),
        idx.to(target.device),
        counts.to(target.device),
        temperature=1.0,
        num_negatives=k,
        random=True,
        seed=seed,
        offset=offset,
    )
    return kernel_table(target.backend).random_draws(params).cpu()


@pytest.mark.parametrize("target", targets(*INFONCE_TARGETS))
@pytest.mark.parametrize(
    "seed,offset",
    [(0, 0), (1, 12345), (123456789, 5), (2**40 + 3, 12345), (2**62 - 1, 2**32 - 7), (2**62 + 17, 2**33 + 3)],
)
def test_draws_equal_the_independent_numpy_philox(target, seed, offset):
    # Every backend draws the same negatives (the reference regenerates them in numpy).
    size = {"tiny": (5, 4, 2), "cpu": (6, 5, 4), "gpu": (12, 10, 6)}[target.size]
    _, labels, idx, counts = random_setup(0.3, seed=4, spatial=size, pool_spatial=size)
    k = {"tiny": 37, "cpu": 17, "gpu": 333}[target.size]
    kernel = draws(target, labels, idx, counts, k, seed, offset)
    reference = random_negative_draws_reference(labels, idx, counts, k, seed, offset)
    assert (kernel >= 0).any()
    assert torch.equal(kernel, reference)


def test_the_public_helper_returns_the_kernels_draws():
    logits, labels, idx, counts = random_setup(0.3, seed=4)
    public = rk.random_negative_draws(
        *logits, num_negatives=37, seed=2**62 + 17, confidence_threshold=0.3, offset=2**33 + 3
    )
    assert torch.equal(public, random_negative_draws_reference(labels, idx, counts, 37, 2**62 + 17, 2**33 + 3))


@pytest.mark.parametrize("target", targets(CPU, TRITON, TRITON_GPU, CUDA, TORCH))
def test_draws_differ_with_seed_and_offset(target):
    _, labels, idx, counts = random_setup(seed=4, spatial=(4, 3, 2), pool_spatial=(3, 3, 2))
    base = draws(target, labels, idx, counts, 16, 1, 0)
    assert not torch.equal(base, draws(target, labels, idx, counts, 16, 2, 0))
    assert not torch.equal(base, draws(target, labels, idx, counts, 16, 1, 1))


@pytest.mark.parametrize("target", targets(*INFONCE_TARGETS))
def test_philox_layout_matches_tl_randint_counter_words(target):
    # Counter 2^32 + 5 must use (lo, hi) = (5, 1): compare a draw whose hi word is non-zero.
    labels = torch.zeros(1, dtype=torch.int64)
    idx = torch.arange(2**20, dtype=torch.int64).reshape(1, -1).repeat(2, 1)
    counts = torch.full((2,), 2**20, dtype=torch.int64)
    got = draws(target, labels, idx, counts, 4, 99, 2**32 + 5)
    r = philox_randint(99, np.arange(4, dtype=np.uint64) + np.uint64(2**32 + 5)).astype(np.uint64)
    expected = torch.from_numpy(((r * np.uint64(2**20)) >> np.uint64(32)).astype(np.int64))
    assert torch.equal(got[0], expected)


def test_same_seed_same_draws_new_seed_new_draws():
    logits, _, _, _ = random_setup()
    a = rk.random_negative_draws(*logits, num_negatives=32, seed=5)
    b = rk.random_negative_draws(*logits, num_negatives=32, seed=5)
    c = rk.random_negative_draws(*logits, num_negatives=32, seed=6)
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.5


def test_random_loss_depends_on_the_generator_only():
    feats, logits = infonce_case((5, 5, 4), classes=3)
    kw = dict(num_negatives=8, sampling="random", backend="cpu")

    def loss(seed):
        return rk.bidirectional_voxel_infonce(*feats, *logits, **kw, generator=torch.Generator().manual_seed(seed))

    assert loss(4).item() == loss(4).item() and loss(4).item() != loss(9).item()


@pytest.mark.parametrize("threshold", [0.0, 0.6])
def test_every_draw_is_eligible(threshold):
    logits, labels, _, counts = random_setup(threshold)
    drawn = rk.random_negative_draws(*logits, num_negatives=50, seed=3, confidence_threshold=threshold)
    n_labels, conf = pseudo_labels(logits[1])
    used = drawn >= 0
    assert used.any()
    pool = drawn.clamp(min=0)
    assert (n_labels[pool] != labels[:, None])[used].all()
    assert (conf[pool] >= threshold)[used].all()
    # Rows without a draw are exactly the anchors whose class has no eligible voxel.
    assert torch.equal(~used.all(dim=1), counts[labels] == 0)


def test_draws_are_uniform_over_the_eligible_pool():
    logits, labels, idx, counts = random_setup(seed=11)
    drawn = rk.random_negative_draws(*logits, num_negatives=4000, seed=2024)
    for c in range(3):
        rows = drawn[labels == c]
        n = int(counts[c])
        if rows.numel() == 0 or n < 2:
            continue
        observed = torch.bincount(torch.searchsorted(idx[c, :n], rows.flatten()), minlength=n).double()
        assert observed.sum() == rows.numel() and observed.numel() == n
        expected = rows.numel() / n
        chi2 = float(((observed - expected) ** 2 / expected).sum())
        df = n - 1
        # Wilson-Hilferty: the 1e-6 upper quantile of chi-square(df) is about df*(1-2/(9df)+4.75*sqrt(2/(9df)))^3.
        bound = df * (1 - 2 / (9 * df) + 4.75 * math.sqrt(2 / (9 * df))) ** 3
        assert chi2 < bound, f"class {c}: chi2 {chi2:.1f} >= {bound:.1f} (df {df})"


# --- the Triton kernels' anchor class order ---------------------------------------------------


def _class_order_matches_the_sort(device, classes, num_anchors):
    from rcps_kernels.ops.infonce_triton import class_order

    g = torch.Generator().manual_seed(classes * 1000 + num_anchors)
    labels = torch.randint(0, classes, (num_anchors,), generator=g).to(device)
    got = class_order(labels, classes)
    expected = anchor_class_order(labels, classes, use_extension=device == "cpu")
    assert all(torch.equal(x, y) for x, y in zip(got, expected, strict=True))


@pytest.mark.parametrize("target", targets(TRITON))
@pytest.mark.parametrize("classes", [1, 2, 3, 7, 31])
@pytest.mark.parametrize("num_anchors", [1, 16, 17, 301])
def test_one_program_class_order_equals_the_sort(target, classes, num_anchors):
    # The single-program stable partition against the extension's anchor_class_order (a stable
    # sort), with block-boundary sizes (BLOCK = 16 under the interpreter).
    _class_order_matches_the_sort(target.device, classes, num_anchors)


@pytest.mark.parametrize("target", targets(TRITON_GPU))
@pytest.mark.parametrize("classes", [2, 5])
@pytest.mark.parametrize("num_anchors", [1, 1023, 15680, 2**16 + 1])
def test_gpu_class_order_equals_the_sort(target, classes, num_anchors):
    # The single-program kernel up to 2^16 anchors, the sort past it: both a stable partition.
    _class_order_matches_the_sort(target.device, classes, num_anchors)
