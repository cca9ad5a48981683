"""``rcps-train prepare --recipe``: the official RCPS preparation of the two public benchmarks.

- ``la2018`` (2018 Atrial Segmentation Challenge): ``<input>/<ID>/lgemri.nrrd`` (LGE-MRI) and
  ``<input>/<ID>/laendo.nrrd`` (the left atrium, 0/255). Intensities clipped above the volume's 99.5th percentile,
  then min-max scaled to [0, 1]; cropped around the label's bounding box widened to at least 112 x 112 x 80 voxels
  plus 25 voxels on each side; written with an identity affine (the 0.625 mm spacing is dropped, as the official
  files do, so distances are in voxels as in the published LA results).
- ``pancreas-nih`` (NIH Pancreas-CT): ``<input>/data/PANCREAS_XXXX.nii.gz`` and
  ``<input>/TCIA_pancreas_labels-02-05-2017/labelXXXX.nii.gz``. Resampled to 1 x 1 x 1 mm with linear
  interpolation (the label: linear per class, then the larger class, the official >= 0.5 threshold), HU window
  [-125, 275] then min-max scaled to [0, 1]; the same ROI crop with at least 96^3 voxels; written with its 1 mm
  geometry.

The label-based ROI crop is a training-data step only: ``predict`` has no label and predicts the whole scan.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from . import geometry
from .layouts import DataError
from .raw_layouts import RawCase

RECIPES = ("la2018", "pancreas-nih")
PANCREAS_IMAGES = "data"
PANCREAS_LABELS = "TCIA_pancreas_labels-02-05-2017"


def _read_split(path: Path | None) -> dict[str, str] | None:
    """``{case name: "train" | "val"}`` from a CSV with columns ``filename`` and ``split`` (``val`` or ``test``
    is the test split); None without a file."""
    if path is None:
        return None
    try:
        with open(path, newline="") as f:
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(f)]
    except OSError as err:
        raise DataError(f"cannot read --split-csv {path}: {err}") from None
    if not rows or not {"filename", "split"} <= set(rows[0]):
        raise DataError(f"--split-csv {path} needs the columns filename and split")
    names = {}
    for row in rows:
        name = row["filename"].split(".nii")[0]
        names[name] = "train" if row["split"].lower() == "train" else "val"
    return names


def _la_cases(root: Path) -> list[tuple[str, Path, Path]]:
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        image, label = folder / "lgemri.nrrd", folder / "laendo.nrrd"
        if image.exists():
            if not label.exists():
                raise DataError(f"--recipe la2018: {label} is missing for {image}")
            found.append((folder.name, image, label))
    return found


def _pancreas_cases(root: Path) -> list[tuple[str, Path, Path]]:
    found = []
    for image in sorted((root / PANCREAS_IMAGES).glob("PANCREAS_*.nii.gz")):
        number = image.name[len("PANCREAS_") : -len(".nii.gz")]
        label = root / PANCREAS_LABELS / f"label{number}.nii.gz"
        if not label.exists():
            raise DataError(f"--recipe pancreas-nih: {label} is missing for {image}")
        found.append((image.name[: -len(".nii.gz")], image, label))
    return found


def recipe_cases(recipe: str, root: Path, split_csv: Path | None) -> list[RawCase]:
    """The source cases of a recipe; with ``split_csv`` only the listed ones, in their split, else all in train."""
    if recipe not in RECIPES:
        raise DataError(f"--recipe must be one of {RECIPES}, got {recipe!r}")
    if not root.is_dir():
        raise DataError(f"--input {root} is not a folder")
    found = _la_cases(root) if recipe == "la2018" else _pancreas_cases(root)
    if not found:
        layout = "<ID>/lgemri.nrrd" if recipe == "la2018" else f"{PANCREAS_IMAGES}/PANCREAS_XXXX.nii.gz"
        raise DataError(f"--recipe {recipe}: no cases under {root} (expected {layout})")
    split = _read_split(split_csv)
    if split is not None:
        unknown = sorted(set(split) - {name for name, _, _ in found})
        if unknown:
            raise DataError(f"--split-csv {split_csv} names cases not under {root}: {unknown[:5]}")
    return [
        RawCase(name, split[name] if split else "train", (image,), label)
        for name, image, label in found
        if split is None or name in split
    ]


def recipe_plan(recipe: str) -> dict:
    """The fixed plan of a recipe (the same keys as a fingerprinted plan)."""
    common = {
        "layout": "nifti",
        "recipe": recipe,
        "orientation": None,
        "crop": None,
        "label_interpolator": "linear per class, then argmax",
        "num_classes": 2,
    }
    if recipe == "la2018":
        return {
            **common,
            "target_spacing": None,
            "spacing_rule": "none: the scan's voxel grid, written with an identity affine",
            "image_interpolator": "linear",
            "channels": [{"modality": "mri", "scheme": "upper-percentile-minmax", "percentile": 99.5}],
            "label_scale": 1 / 255,
            "geometry": "identity",
            "label_roi": {"min_size": [112, 112, 80], "margin": 25},
        }
    return {
        **common,
        "target_spacing": [1.0, 1.0, 1.0],
        "spacing_rule": "1 mm isotropic (the official Pancreas-CT preparation)",
        "image_interpolator": "linear",
        "channels": [{"modality": "ct", "scheme": "window-minmax", "window": [-125.0, 275.0]}],
        "label_scale": 1.0,
        "geometry": "physical",
        "label_roi": {"min_size": [96, 96, 96], "margin": 25},
    }


def label_roi_box(label: np.ndarray, min_size, margin: int) -> list[list[int]]:
    """The recipes' ROI: the label's bounding box, widened symmetrically to ``min_size`` per axis, plus ``margin``
    voxels on each side, clamped to the volume."""
    box = geometry.nonzero_box([label])
    out = []
    for (start, stop), need, size in zip(box, min_size, label.shape):
        short = max(need - (stop - start), 0)
        start, stop = start - short // 2 - margin, stop + short - short // 2 + margin
        out.append([max(start, 0), min(stop, size)])
    return out
