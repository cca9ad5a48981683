"""Where the cases of a dataset lie on disk: the NIfTI, h5 and nnU-Net layouts, and a folder of unlabeled images.

Layouts (docs/trainer.md shows a tree of each, under "Data layouts"):
- ``nifti``: ``<root>/{train_images,train_labels,val_images,val_labels}/<name>.nii.gz`` (or ``.nii``), image
  and label sharing the file name (the official RCPS layout; ``val_*`` is the test split). A multi-channel image
  is one 4D file with the channels on its last axis.
- ``h5``: UA-MT / MC-Net: ``<root>/train.list`` and ``<root>/test.list`` (one ID a line) and per ID one h5 file
  with datasets ``image`` (``(D, H, W)``, or ``(C, D, H, W)`` for several channels) and ``label``, at
  ``<root>/2018LA_Seg_Training Set/<ID>/mri_norm2.h5`` (LA), ``<root>/Pancreas_h5/<ID>_norm.h5`` (Pancreas),
  ``<root>/<ID>/mri_norm2.h5`` or ``<root>/<ID>.h5``.
- ``nnunet``: an nnU-Net v2 raw dataset: ``<root>/dataset.json`` (its ``channel_names`` give the channel count),
  ``imagesTr/<case>_0000<ending>`` (one file per channel: ``_0000``, ``_0001``, ...), ``labelsTr/<case><ending>``
  and, when both exist, ``imagesTs``/``labelsTs`` as the test split; without ``labelsTs`` a fixed split of the
  training cases (:data:`NNUNET_HOLDOUT_FRACTION`, seed :data:`NNUNET_HOLDOUT_SEED`, the same for every run) is
  the test split.

Unlabeled images (``data.unlabeled_dir``) are named as the layout names images and have no label files:
``<case>.nii.gz`` (nifti), ``<case>_0000<ending>`` and its other channels (nnunet), ``<case>.h5`` with an
``image`` dataset (h5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

H5_PATTERNS = ("2018LA_Seg_Training Set/{id}/mri_norm2.h5", "Pancreas_h5/{id}_norm.h5", "{id}/mri_norm2.h5", "{id}.h5")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# nnU-Net datasets without labelsTs: this share of the training cases, drawn once with this seed, is the test split.
NNUNET_HOLDOUT_FRACTION = 0.2
NNUNET_HOLDOUT_SEED = 0


class DataError(ValueError):
    """A missing, unreadable or inconsistent data file; the message names it."""


@dataclass(frozen=True)
class Case:
    """One case on disk.

    Attributes:
        name: the case ID.
        image: the image file (the first channel's in the nnU-Net layout); geometry is read from it.
        label: the label file (the same h5 file as ``image`` in the h5 layout), or None for an unlabeled image.
        more_channels: the files of channels 1, 2, ... in the nnU-Net layout (other layouts keep every channel in
            ``image``).
    """

    name: str
    image: Path
    label: Path | None
    more_channels: tuple[Path, ...] = ()

    @property
    def image_files(self) -> tuple[Path, ...]:
        return (self.image, *self.more_channels)


def _nifti_name(path: Path, suffixes=NIFTI_SUFFIXES) -> str | None:
    """The file name without its NIfTI suffix, or None when it does not end in exactly one of them
    (``case.nii.gz.bak`` is not a case)."""
    return next((path.name[: -len(sfx)] for sfx in suffixes if path.name.endswith(sfx)), None)


def _labeled(image: Path, name: str, label: Path, more_channels: tuple[Path, ...] = ()) -> Case:
    if not label.exists():
        raise DataError(f"label file {label} for image {image} does not exist")
    return Case(name, image, label, more_channels)


def _nifti_cases(root: Path, split: str) -> list[Case]:
    image_dir, label_dir = root / f"{split}_images", root / f"{split}_labels"
    if not image_dir.is_dir():
        raise DataError(
            f"image folder {image_dir} does not exist (data.format = 'nifti' expects "
            f"<root>/{split}_images and <root>/{split}_labels)"
        )
    return [_labeled(image, name, label_dir / image.name) for image, name in _nifti_images(image_dir)]


def _nifti_images(folder: Path) -> list[tuple[Path, str]]:
    return [(path, name) for path in sorted(folder.iterdir()) if (name := _nifti_name(path)) is not None]


def read_id_list(path: Path, what: str) -> list[str]:
    """The IDs of a file with one ID a line (blank lines skipped), in file order.

    Raises:
        DataError: naming ``what`` and the file when it holds no ID or an ID twice.
    """
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{what}: ID file {path} is empty")
    twice = sorted({case_id for case_id in ids if ids.count(case_id) > 1})
    if twice:
        raise DataError(f"{what}: ID file {path} lists {twice[:5]} more than once")
    return ids


def _h5_cases(root: Path, split: str) -> list[Case]:
    list_file = root / ("train.list" if split == "train" else "test.list")
    if not list_file.exists():
        raise DataError(f"list file {list_file} does not exist (data.format = 'h5' expects train.list and test.list)")
    cases = []
    for case_id in sorted(read_id_list(list_file, "data.format = 'h5'")):
        candidates = [root / pattern.format(id=case_id) for pattern in H5_PATTERNS]
        found = next((path for path in candidates if path.exists()), None)
        if found is None:
            raise DataError(
                f"h5 file for ID {case_id!r} (listed in {list_file}) not found; looked at "
                + ", ".join(str(c) for c in candidates)
            )
        cases.append(Case(case_id, found, found))
    return cases


def read_nnunet_dataset_json(root: Path) -> dict:
    """Read and check ``<root>/dataset.json`` of an nnU-Net v2 raw dataset.

    Returns:
        The parsed file; ``num_classes`` (from ``labels``), ``num_channels`` (from ``channel_names``) and
        ``path`` (the file) are added.
    """
    path = root / "dataset.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(
            f"cannot read {path} (data.format = 'nnunet' needs an nnU-Net v2 dataset.json): {type(err).__name__}: {err}"
        ) from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} holds a JSON {type(meta).__name__}; expected an object (nnU-Net v2 dataset.json)")
    missing = [key for key in ("channel_names", "labels", "numTraining", "file_ending") if key not in meta]
    if missing:
        raise DataError(
            f"{path} lacks {missing} (an nnU-Net v2 dataset.json has channel_names, labels, "
            f"numTraining and file_ending)"
        )
    channels = meta["channel_names"]
    if not isinstance(channels, dict) or sorted(channels) != [str(i) for i in range(len(channels))] or not channels:
        raise DataError(
            f"{path}: channel_names {channels!r} must map the channel indices '0', '1', ... to names "
            f"(one entry per image file <case>_0000, <case>_0001, ...)"
        )
    if meta["file_ending"] not in NIFTI_SUFFIXES:
        raise DataError(
            f"{path}: file_ending {meta['file_ending']!r} is not supported; expected one of {NIFTI_SUFFIXES}"
        )
    values = list(meta["labels"].values()) if isinstance(meta["labels"], dict) else [None]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values) or sorted(values) != list(
        range(len(values))
    ):
        raise DataError(
            f"{path}: labels {meta['labels']} must map names to the integers 0..n-1 "
            f"(region-based and ignore labels are not supported)"
        )
    return {**meta, "num_classes": len(meta["labels"]), "num_channels": len(channels), "path": path}


def _nnunet_images(folder: Path, meta: dict) -> list[tuple[Path, str, tuple[Path, ...]]]:
    """``(first channel file, case, other channel files)`` for each ``<case>_0000<ending>`` in ``folder``."""
    ending, found = meta["file_ending"], []
    for image in sorted(folder.iterdir()):
        name = _nifti_name(image, ("_0000" + ending,))
        if name is None:
            continue
        more = tuple(folder / f"{name}_{index:04d}{ending}" for index in range(1, meta["num_channels"]))
        absent = [path for path in more if not path.exists()]
        if absent:
            last = f"{name}_{meta['num_channels'] - 1:04d}{ending}"
            raise DataError(
                f"channel file {absent[0]} of case {name!r} does not exist ({meta['path']} lists "
                f"{meta['num_channels']} channels: {name}_0000{ending} .. {last})"
            )
        found.append((image, name, more))
    return found


def _nnunet_folder(root: Path, images: str, labels: str, meta: dict) -> list[Case]:
    return [
        _labeled(image, name, root / labels / f"{name}{meta['file_ending']}", more)
        for image, name, more in _nnunet_images(root / images, meta)
    ]


def _nnunet_cases(root: Path, split: str) -> list[Case]:
    meta = read_nnunet_dataset_json(root)
    if not (root / "imagesTr").is_dir():
        raise DataError(f"image folder {root / 'imagesTr'} does not exist (data.format = 'nnunet')")
    training = _nnunet_folder(root, "imagesTr", "labelsTr", meta)
    if len(training) != meta["numTraining"]:
        raise DataError(
            f"{root / 'dataset.json'} says numTraining = {meta['numTraining']} but "
            f"{root / 'imagesTr'} holds {len(training)} cases named <case>_0000{meta['file_ending']}"
        )
    if (root / "imagesTs").is_dir() and (root / "labelsTs").is_dir():
        return training if split == "train" else _nnunet_folder(root, "imagesTs", "labelsTs", meta)
    order = np.random.default_rng(NNUNET_HOLDOUT_SEED).permutation(len(training))
    held_out = set(order[: max(round(NNUNET_HOLDOUT_FRACTION * len(training)), 1)].tolist())
    return [c for i, c in enumerate(training) if (i in held_out) == (split != "train")]


def _existing_root(root: str | Path) -> Path:
    if not str(root).strip():
        raise DataError("data.root is empty; set it to the dataset folder")
    if not Path(root).is_dir():
        raise DataError(f"data.root {str(root)!r} is not a folder")
    return Path(root)


def list_cases(root: str | Path, split: str, data_format: str) -> list[Case]:
    """Cases of ``split`` (``train``, or ``val`` for the test split), sorted by name; raises DataError when
    there are none."""
    root = _existing_root(root)
    read = {"nifti": _nifti_cases, "h5": _h5_cases, "nnunet": _nnunet_cases}[data_format]
    cases = read(root, split)
    if not cases:
        raise DataError(f"no {split} cases found under {root} (data.format = {data_format!r})")
    return cases


def unlabeled_folder(root: str | Path, unlabeled_dir: str) -> Path:
    """``data.unlabeled_dir`` resolved: an absolute path as it is, a relative one under ``data.root``."""
    folder = Path(unlabeled_dir).expanduser()
    return folder if folder.is_absolute() else Path(root) / folder


def list_unlabeled(root: str | Path, unlabeled_dir: str, data_format: str) -> list[Case]:
    """The images of ``data.unlabeled_dir`` (no labels), sorted by name.

    Raises:
        DataError: naming the folder when it does not exist or holds no image named as the layout expects.
    """
    root = _existing_root(root)
    folder = unlabeled_folder(root, unlabeled_dir)
    if not folder.is_dir():
        raise DataError(f"data.unlabeled_dir: folder {folder} does not exist")
    if data_format == "nifti":
        cases, expected = [Case(name, image, None) for image, name in _nifti_images(folder)], "<case>.nii.gz"
    elif data_format == "h5":
        cases, expected = [Case(p.stem, p, None) for p in sorted(folder.glob("*.h5"))], "<case>.h5"
    else:
        meta = read_nnunet_dataset_json(root)
        cases = [Case(name, image, None, more) for image, name, more in _nnunet_images(folder, meta)]
        expected = f"<case>_0000{meta['file_ending']}"
    if not cases:
        raise DataError(
            f"data.unlabeled_dir: folder {folder} holds no unlabeled images (data.format = {data_format!r} "
            f"expects files named {expected})"
        )
    return cases
