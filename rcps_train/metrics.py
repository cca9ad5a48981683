"""Dice, Jaccard, HD95 and ASD per foreground class with medpy, guarded against empty masks.

medpy raises on an empty mask in hd95/asd and returns nan from dc/jc for two empty masks (NumPy 2), so the
empty cases are decided here and flagged:
- both empty: Dice 1, Jaccard 1, HD95 0, ASD 0 (a correct "nothing there");
- exactly one empty: Dice 0, Jaccard 0, HD95 and ASD nan (undefined), flagged ``pred_empty`` or ``gt_empty``.
Means skip nan values and the number of undefined distances is reported next to them.
Distances are in mm when the case's voxel spacing is known (medpy's ``voxelspacing``), in voxels otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

METRICS = ("dice", "jaccard", "hd95", "asd")


def binary_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> dict[str, float | str]:
    """Dice, Jaccard, HD95 and ASD (medpy's directed ``asd``, prediction to ground truth) of two boolean masks.

    Args:
        pred, gt: masks of one shape.
        spacing: voxel size per axis (distances in its unit, normally mm); None: distances in voxels.

    Returns:
        ``dice``, ``jaccard``, ``hd95``, ``asd`` and ``empty`` (``""``, ``"both"``, ``"pred_empty"`` or
        ``"gt_empty"``).
    """
    from medpy import metric  # evaluation-only dependency: training imports this module without it

    pred, gt = pred.astype(bool), gt.astype(bool)
    if not pred.any() and not gt.any():
        return {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "empty": "both"}
    if not pred.any() or not gt.any():
        return {
            "dice": 0.0,
            "jaccard": 0.0,
            "hd95": math.nan,
            "asd": math.nan,
            "empty": "pred_empty" if gt.any() else "gt_empty",
        }
    return {
        "dice": float(metric.binary.dc(pred, gt)),
        "jaccard": float(metric.binary.jc(pred, gt)),
        "hd95": float(metric.binary.hd95(pred, gt, voxelspacing=spacing)),
        "asd": float(metric.binary.asd(pred, gt, voxelspacing=spacing)),
        "empty": "",
    }


def case_metrics(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, spacing: Sequence[float] | None = None
) -> list[dict]:
    """:func:`binary_metrics` for every foreground class ``1..num_classes-1`` of integer label maps."""
    return [{"class": c, **binary_metrics(pred == c, gt == c, spacing)} for c in range(1, num_classes)]


def summarize(rows: list[dict]) -> dict[str, float]:
    """Means over cases and foreground classes (nan-skipping), plus how many distances were undefined."""
    summary = {}
    for key in METRICS:
        values = np.array([row[key] for row in rows], dtype=float)
        finite = values[~np.isnan(values)]
        summary[key] = float(finite.mean()) if finite.size else math.nan
    summary["num_undefined_distances"] = int(sum(math.isnan(row["hd95"]) for row in rows))
    return summary
