"""Raw datasets as ``rcps-train prepare`` and ``predict`` read them: the ``nifti`` and ``nnunet`` layouts with scans in
any format SimpleITK reads, and where each group of cases goes in a prepared dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .layouts import DataError

RAW_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Where each group of cases goes, per layout: (image folder, label folder or None).
OUTPUT_FOLDERS = {
    "nifti": {
        "train": ("train_images", "train_labels"),
        "val": ("val_images", "val_labels"),
        "unlabeled": ("unlabeled_images", None),
    },
    "nnunet": {
        "train": ("imagesTr", "labelsTr"),
        "val": ("imagesTs", "labelsTs"),
        "test": ("imagesTs", None),
        "unlabeled": ("imagesUnlabeled", None),
    },
}


@dataclass(frozen=True)
class RawCase:
    """One case of a raw dataset: its channel files, its label (None for images without one) and its group
    (``train``, ``val`` = the labeled test split, ``test`` = test images without labels, ``unlabeled``)."""

    name: str
    group: str
    images: tuple[Path, ...]
    label: Path | None


def _strip_suffix(path: Path, suffixes=RAW_SUFFIXES) -> str | None:
    return next((path.name[: -len(s)] for s in suffixes if path.name.endswith(s)), None)


def _nifti_folder(image_dir: Path, label_dir: Path | None, group: str) -> list[RawCase]:
    cases = []
    for image in sorted(image_dir.iterdir()) if image_dir.is_dir() else []:
        name = _strip_suffix(image)
        if name is None:
            continue
        label = None
        if label_dir is not None:
            label = next((label_dir / f"{name}{s}" for s in RAW_SUFFIXES if (label_dir / f"{name}{s}").exists()), None)
            if label is None:
                raise DataError(f"no label file {label_dir / name}.* for image {image}")
        cases.append(RawCase(name, group, (image,), label))
    return cases


def _nnunet_folder(image_dir: Path, label_dir: Path | None, group: str, channels: int, ending: str) -> list[RawCase]:
    cases = []
    for first in sorted(image_dir.iterdir()) if image_dir.is_dir() else []:
        name = _strip_suffix(first, ("_0000" + ending,))
        if name is None:
            continue
        images = tuple(image_dir / f"{name}_{c:04d}{ending}" for c in range(channels))
        missing = [str(p) for p in images if not p.exists()]
        if missing:
            raise DataError(f"case {name} in {image_dir} lacks channel files {missing}")
        label = label_dir / f"{name}{ending}" if label_dir is not None else None
        if label is not None and not label.exists():
            raise DataError(f"label file {label} for image {first} does not exist")
        cases.append(RawCase(name, group, images, label))
    return cases


def read_dataset_json(root: Path) -> dict:
    """``<root>/dataset.json`` of an nnU-Net v2 raw dataset, checked for the keys prepare uses."""
    path = root / "dataset.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path} (the nnunet layout needs dataset.json): {err}") from None
    missing = [key for key in ("channel_names", "labels", "file_ending") if key not in meta]
    if missing:
        raise DataError(f"{path} lacks {missing} (nnU-Net v2 dataset.json has channel_names, labels, file_ending)")
    return meta


def discover_cases(root: Path, layout: str, unlabeled: Path | None) -> list[RawCase]:
    """Every case of a raw dataset in ``layout`` (``nifti`` or ``nnunet``), plus images without labels from
    ``unlabeled`` (default: ``unlabeled_images`` or ``imagesUnlabeled`` under ``root`` when present)."""
    if not root.is_dir():
        raise DataError(f"--input {root} is not a folder")
    unlabeled_default = root / OUTPUT_FOLDERS[layout]["unlabeled"][0]
    unlabeled = unlabeled or (unlabeled_default if unlabeled_default.is_dir() else None)
    if unlabeled is not None and not unlabeled.is_dir():
        raise DataError(f"--unlabeled {unlabeled} is not a folder")
    if layout == "nifti":
        cases = _nifti_folder(root / "train_images", root / "train_labels", "train")
        cases += _nifti_folder(root / "val_images", root / "val_labels", "val")
        cases += _nifti_folder(unlabeled, None, "unlabeled") if unlabeled else []
    else:
        meta = read_dataset_json(root)
        channels, ending = len(meta["channel_names"]), meta["file_ending"]
        cases = _nnunet_folder(root / "imagesTr", root / "labelsTr", "train", channels, ending)
        test_labels = root / "labelsTs" if (root / "labelsTs").is_dir() else None
        cases += _nnunet_folder(root / "imagesTs", test_labels, "val" if test_labels else "test", channels, ending)
        cases += _nnunet_folder(unlabeled, None, "unlabeled", channels, ending) if unlabeled else []
    if not any(case.group == "train" for case in cases):
        expected = "train_images/ + train_labels/" if layout == "nifti" else "imagesTr/ + labelsTr/"
        raise DataError(f"no labeled training cases under {root} (the {layout} layout expects {expected})")
    return cases
