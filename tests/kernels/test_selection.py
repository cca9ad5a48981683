"""The one-call selection ops (csrc/common/selection.cpp) against rcps_kernels/ops/selection.py and a
brute force over Python lists.

``rcps_cpu::negative_tables`` and ``rcps_cpu::anchor_class_order`` issue the op sequence of the
Python functions from C++; their results must be identical, element for element, on CPU tensors
here and on CUDA tensors in the gpu tier.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from rcps_kernels.extension import load_cpu_extension
from rcps_kernels.ops.selection import anchor_class_order, negative_tables, pseudo_labels

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def _extension():
    assert load_cpu_extension() is None, load_cpu_extension()


def make_logits(classes, dtype, device, spatial=(4, 5, 3), pool=(5, 4, 3), batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    anchor = torch.randn(batch, classes, *spatial, generator=g)
    pool_logits = torch.randn(1, classes, *pool, generator=g)
    # Saturated voxels: confidence rounds to exactly 1.0, so many pool voxels tie.
    pool_logits[:, 0, :2] = 40.0
    pool_logits[:, 1:, :2] = 0.0
    return anchor.to(device, dtype), pool_logits.to(device, dtype)


def assert_identical(got, expected):
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape and g.device == e.device
        assert torch.equal(g, e), (g, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_negative_tables_op_equals_the_python_sequence(device, dtype):
    for classes, random, k, threshold in itertools.product([2, 3, 5], [False, True], [1, 7, 500], [0.0, 0.45, 1.0]):
        if not random and threshold:
            continue
        anchor, pool = make_logits(classes, dtype, device, seed=classes + k)
        got = negative_tables(anchor, pool, k, random, threshold)
        expected = negative_tables(anchor, pool, k, random, threshold, use_extension=False)
        assert_identical(got, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial", [(7,), (5, 6), (3, 4, 5)])
def test_negative_tables_one_to_three_spatial_dims(device, spatial):
    anchor, pool = make_logits(3, torch.float32, device, spatial=spatial, pool=spatial)
    for random in (False, True):
        got = negative_tables(anchor, pool, 6, random, 0.3)
        assert_identical(got, negative_tables(anchor, pool, 6, random, 0.3, use_extension=False))


def brute_force_topk(labels, confidence, k, classes):
    """Per class: voxels of another class by (confidence descending, index ascending)."""
    rows, counts = [], []
    for c in range(classes):
        eligible = [m for m in range(len(labels)) if labels[m] != c]
        eligible.sort(key=lambda m: (-confidence[m], m))
        chosen = eligible[:k]
        rows.append(chosen + [-1] * (k - len(chosen)))
        counts.append(len(chosen))
    return torch.tensor(rows), torch.tensor(counts)


def brute_force_eligible(labels, confidence, threshold, classes):
    rows, counts = [], []
    for c in range(classes):
        eligible = [m for m in range(len(labels)) if labels[m] != c and confidence[m] >= threshold]
        rows.append(eligible + [-1] * (len(labels) - len(eligible)))
        counts.append(len(eligible))
    return torch.tensor(rows), torch.tensor(counts)


@pytest.mark.parametrize("k", [3, 25, 200])
def test_topk_tables_brute_force_with_ties(k):
    anchor, pool = make_logits(3, torch.float32, "cpu")
    labels, confidence = (t.tolist() for t in pseudo_labels(pool))
    assert confidence.count(1.0) > 3  # the saturated voxels do tie
    _, index, counts, _ = negative_tables(anchor, pool, k, False, 0.0)
    expected_index, expected_counts = brute_force_topk(labels, confidence, k, 3)
    assert torch.equal(index, expected_index) and torch.equal(counts, expected_counts)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.99, 1.0])
def test_eligible_tables_brute_force(threshold):
    anchor, pool = make_logits(3, torch.float32, "cpu")
    labels, confidence = (t.tolist() for t in pseudo_labels(pool))
    _, index, counts, _ = negative_tables(anchor, pool, 4, True, threshold)
    expected_index, expected_counts = brute_force_eligible(labels, confidence, threshold, 3)
    assert torch.equal(index, expected_index) and torch.equal(counts, expected_counts)


def test_anchor_labels_and_logits_sum():
    anchor, pool = make_logits(4, torch.float32, "cpu")
    anchor_labels, _, _, logits_sum = negative_tables(anchor, pool, 5, False, 0.0)
    assert torch.equal(anchor_labels, anchor.argmax(dim=1).reshape(-1))
    torch.testing.assert_close(logits_sum, anchor.sum() + pool.sum())
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = pool.clone()
        broken[0, 1, 2, 1, 0] = bad
        assert not torch.isfinite(negative_tables(anchor, broken, 5, False, 0.0)[3])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("classes", [1, 2, 7])
def test_anchor_class_order(device, classes):
    labels = torch.randint(0, classes, (301,), generator=torch.Generator().manual_seed(classes))
    labels = labels.to(device)
    order, class_start = anchor_class_order(labels, classes)
    assert_identical((order, class_start), anchor_class_order(labels, classes, use_extension=False))
    expected_order = [i for c in range(classes) for i in range(301) if labels[i] == c]
    expected_start = [int((labels < c).sum()) for c in range(classes + 1)]
    assert order.tolist() == expected_order
    assert class_start.tolist() == expected_start
