"""Sliding-window inference and the metrics (against medpy, empty masks included)."""

import math

import numpy as np
import pytest
import torch
from medpy import metric

from rcps_train.evaluate import gaussian_importance, sliding_window_inference, window_starts
from rcps_train.metrics import binary_metrics, case_metrics, summarize
from rcps_train.model import ProjectorUNet


@pytest.fixture
def model():
    torch.manual_seed(0)
    net = ProjectorUNet(1, 2, (4, 8, 8, 16, 16), 16)
    net.train()
    net(torch.randn(2, 1, 32, 32, 24))  # non-trivial BatchNorm running statistics
    return net.eval()


def test_window_covering_the_volume_equals_a_direct_forward(model):
    image = torch.randn(1, 1, 32, 32, 24)
    with torch.no_grad():
        direct = model.segment(image)
    blended = sliding_window_inference(model.segment, image, roi=(32, 32, 24), stride=(4, 4, 3))
    torch.testing.assert_close(blended, direct, rtol=1e-5, atol=1e-5)


def test_overlapping_windows_blend_to_the_same_constant_prediction():
    # A predictor that returns the same logits everywhere must come back unchanged whatever the blending.
    def constant(x):
        return torch.ones(x.shape[0], 3, *x.shape[2:]) * torch.tensor([1.0, -2.0, 0.5])[:, None, None, None]

    out = sliding_window_inference(
        constant, torch.randn(1, 1, 40, 33, 20), roi=(16, 16, 16), stride=(2, 2, 2), sw_batch_size=3
    )
    assert out.shape == (1, 3, 40, 33, 20)
    torch.testing.assert_close(out[0, :, 7, 9, 3], torch.tensor([1.0, -2.0, 0.5]))
    torch.testing.assert_close(out.std(dim=(2, 3, 4)), torch.zeros(1, 3), atol=1e-5, rtol=0)


def test_small_volume_is_padded_and_cropped_back(model):
    out = sliding_window_inference(model.segment, torch.randn(1, 1, 20, 36, 24), roi=(32, 32, 24), stride=(16, 16, 12))
    assert out.shape == (1, 2, 20, 36, 24) and torch.isfinite(out).all()


def test_window_starts_and_gaussian():
    assert window_starts(112, 112, 14) == [0]
    assert window_starts(140, 112, 14) == [0, 14, 28]
    assert window_starts(130, 112, 14) == [0, 14, 18]
    w = gaussian_importance((16, 12, 8), 0.125)
    assert w.shape == (16, 12, 8) and w.max() <= 1.0 and w.min() >= 1e-3
    centre = math.exp(-0.5 * sum((0.5 / (0.125 * n)) ** 2 for n in (16, 12, 8)))  # half a voxel off centre
    torch.testing.assert_close(w[7:9, 5:7, 3:5], torch.full((2, 2, 2), centre))
    assert w[0, 0, 0] == pytest.approx(1e-3)  # the floor


def _blobs(seed, shape=(24, 24, 16)):
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    centre = np.array([rng.uniform(6, n - 6) for n in shape])[:, None, None, None]
    return ((grid - centre) ** 2).sum(0) < rng.uniform(9, 30)


def test_metrics_agree_with_medpy():
    pred = _blobs(1)
    gt = np.roll(pred, 3, axis=0) | _blobs(2)
    assert pred.any() and gt.any() and (pred & gt).any()
    result = binary_metrics(pred, gt)
    assert result["dice"] == pytest.approx(metric.binary.dc(pred, gt))
    assert result["jaccard"] == pytest.approx(metric.binary.jc(pred, gt))
    assert result["hd95"] == pytest.approx(metric.binary.hd95(pred, gt))
    assert result["asd"] == pytest.approx(metric.binary.asd(pred, gt))
    inter, union = (pred & gt).sum(), (pred | gt).sum()
    assert result["dice"] == pytest.approx(2 * inter / (pred.sum() + gt.sum()))
    assert result["jaccard"] == pytest.approx(inter / union)
    assert result["empty"] == ""


def test_empty_masks_are_flagged_not_crashing():
    gt = _blobs(3)
    empty = np.zeros_like(gt)
    assert binary_metrics(empty, empty) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "empty": "both"}
    missed = binary_metrics(empty, gt, spacing=(0.5, 1.0, 2.0))
    assert missed["dice"] == missed["jaccard"] == 0.0 and missed["empty"] == "pred_empty"
    assert math.isnan(missed["hd95"]) and math.isnan(missed["asd"])
    assert binary_metrics(gt, empty)["empty"] == "gt_empty"


def test_case_metrics_and_summary_skip_undefined_distances():
    gt = np.zeros((24, 24, 16), np.int64)
    gt[_blobs(4)] = 1
    gt[_blobs(5) & (gt == 0)] = 2
    pred = gt.copy()
    pred[pred == 2] = 0  # class 2 missed entirely
    rows = case_metrics(pred, gt, 3)
    assert [r["class"] for r in rows] == [1, 2]
    assert rows[0]["dice"] == 1.0 and rows[1]["empty"] == "pred_empty"
    summary = summarize(rows)
    assert summary["dice"] == pytest.approx(0.5)
    assert summary["hd95"] == pytest.approx(0.0) and summary["num_undefined_distances"] == 1


def test_distances_in_mm_with_anisotropic_spacing():
    # Single voxels: the distance is the offset times the spacing of its axis, by hand.
    spacing = (0.5, 1.0, 3.0)
    gt = np.zeros((6, 6, 6), bool)
    gt[1, 1, 1] = True
    for offset, expected in (((2, 0, 0), 1.0), ((0, 0, 1), 3.0), ((2, 0, 1), math.hypot(1.0, 3.0))):
        pred = np.roll(gt, offset, axis=(0, 1, 2))
        result = binary_metrics(pred, gt, spacing)
        assert result["hd95"] == pytest.approx(expected) and result["asd"] == pytest.approx(expected)
        assert result["dice"] == result["jaccard"] == 0.0
    # Blobs: medpy with the same voxelspacing; distances differ from the voxel ones.
    pred = _blobs(6)
    gt = np.roll(pred, (2, 1), axis=(0, 2)) | _blobs(7)
    result = binary_metrics(pred, gt, spacing)
    assert result["hd95"] == pytest.approx(metric.binary.hd95(pred, gt, voxelspacing=spacing))
    assert result["asd"] == pytest.approx(metric.binary.asd(pred, gt, voxelspacing=spacing))
    assert result["jaccard"] == pytest.approx((pred & gt).sum() / (pred | gt).sum())
    assert result["hd95"] != pytest.approx(binary_metrics(pred, gt)["hd95"])
    rows = case_metrics(pred.astype(np.int64), gt.astype(np.int64), 2, spacing)
    assert rows[0]["hd95"] == result["hd95"] and set(summarize(rows)) >= {"dice", "jaccard", "hd95", "asd"}
