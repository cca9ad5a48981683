"""Datasets without MONAI: case discovery for the NIfTI and h5 layouts, start-up checks, z-score
normalisation, the labeled subset, and deterministic per-step sampling (which makes ``--resume`` exact).

Layouts (arrays are used in file order as ``(D, H, W)``):
- ``nifti``: ``<root>/{train_images,train_labels,val_images,val_labels}/<name>.nii.gz``, image and label
  sharing the file name (the official RCPS layout).
- ``h5``: UA-MT / MC-Net: ``<root>/train.list`` and ``<root>/test.list`` (one ID a line) and per ID one h5 file
  with datasets ``image`` and ``label``, at ``<root>/2018LA_Seg_Training Set/<ID>/mri_norm2.h5`` (LA),
  ``<root>/Pancreas_h5/<ID>_norm.h5`` (Pancreas), ``<root>/<ID>/mri_norm2.h5`` or ``<root>/<ID>.h5``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import random_crop, random_grid_distortion

H5_PATTERNS = ("2018LA_Seg_Training Set/{id}/mri_norm2.h5", "Pancreas_h5/{id}_norm.h5", "{id}/mri_norm2.h5", "{id}.h5")


class DataError(ValueError):
    """A missing, unreadable or inconsistent data file; the message names it."""


@dataclass(frozen=True)
class Case:
    """One image/label pair on disk (``label`` is the same h5 file as ``image`` in the h5 layout)."""
    name: str
    image: Path
    label: Path


def _nifti_cases(root: Path, split: str) -> list[Case]:
    image_dir, label_dir = root / f"{split}_images", root / f"{split}_labels"
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} does not exist (data.format = 'nifti' expects "
                        f"<root>/{split}_images and <root>/{split}_labels)")
    cases = []
    for image in sorted(image_dir.glob("*.nii*")):
        name = image.name.split(".nii")[0]
        label = label_dir / image.name
        if not label.exists():
            raise DataError(f"label file {label} for image {image} does not exist")
        cases.append(Case(name, image, label))
    return cases


def _h5_cases(root: Path, split: str) -> list[Case]:
    list_file = root / ("train.list" if split == "train" else "test.list")
    if not list_file.exists():
        raise DataError(f"list file {list_file} does not exist (data.format = 'h5' expects train.list and test.list)")
    cases = []
    for case_id in sorted(line.strip() for line in list_file.read_text().splitlines() if line.strip()):
        candidates = [root / pattern.format(id=case_id) for pattern in H5_PATTERNS]
        found = next((path for path in candidates if path.exists()), None)
        if found is None:
            raise DataError(f"h5 file for ID {case_id!r} (listed in {list_file}) not found; looked at "
                            + ", ".join(str(c) for c in candidates))
        cases.append(Case(case_id, found, found))
    return cases


def list_cases(root: str | Path, split: str, data_format: str) -> list[Case]:
    """Cases of ``split`` (``train`` or ``val``), sorted by name; raises DataError when there are none."""
    root = Path(root)
    if not str(root) or not root.is_dir():
        raise DataError(f"data.root {str(root)!r} is not a folder")
    cases = _nifti_cases(root, split) if data_format == "nifti" else _h5_cases(root, split)
    if not cases:
        raise DataError(f"no {split} cases found under {root} (data.format = {data_format!r})")
    return cases


def split_labeled(cases: list[Case], labeled: int | str) -> tuple[list[Case], list[Case]]:
    """Split training cases into (labeled, unlabeled).

    Args:
        cases: training cases, sorted.
        labeled: a count (the first N of the sorted list) or the path of a file of IDs, one a line.

    Returns:
        The labeled and the unlabeled cases; both must be non-empty.
    """
    if isinstance(labeled, str):
        path = Path(labeled)
        if not path.exists():
            raise DataError(f"data.labeled: ID file {path} does not exist")
        ids = {line.strip() for line in path.read_text().splitlines() if line.strip()}
        unknown = ids - {c.name for c in cases}
        if unknown:
            raise DataError(f"data.labeled: IDs in {path} not in the training list: {sorted(unknown)[:5]}")
        chosen = [c for c in cases if c.name in ids]
    else:
        chosen = cases[:labeled]
    rest = [c for c in cases if c not in chosen]
    if not chosen or not rest:
        raise DataError(f"data.labeled = {labeled!r} leaves {len(chosen)} labeled and {len(rest)} unlabeled "
                        f"of {len(cases)} training cases; both must be at least 1")
    return chosen, rest


def load_case(case: Case, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read, check and z-score one case.

    Returns:
        ``image`` float32 ``(D, H, W)`` normalised to zero mean and unit std over the whole volume, and
        ``label`` int64 of the same shape with values in ``[0, num_classes)``.
    """
    image, label = _read(case)
    if image.ndim != 3:
        raise DataError(f"image {case.image} has shape {image.shape}; expected a 3D volume")
    if image.shape != label.shape:
        raise DataError(f"image {case.image} has shape {image.shape} but label {case.label} has {label.shape}")
    if not np.isfinite(image).all():
        raise DataError(f"image {case.image} contains NaN or Inf values")
    rounded = np.rint(label)
    if not np.array_equal(rounded, label) or rounded.min() < 0 or rounded.max() >= num_classes:
        values = np.unique(label)[:10]
        raise DataError(f"label {case.label} has values {values.tolist()} outside the classes 0..{num_classes - 1}")
    image = ((image - image.mean()) / max(float(image.std()), 1e-8)).astype(np.float32)
    return image, rounded.astype(np.int64)


def _read(case: Case) -> tuple[np.ndarray, np.ndarray]:
    if case.image.suffix == ".h5":
        import h5py
        try:
            with h5py.File(case.image, "r") as f:
                return np.asarray(f["image"], np.float32), np.asarray(f["label"], np.float32)
        except (OSError, KeyError) as err:
            raise DataError(f"cannot read h5 file {case.image} (needs datasets 'image' and 'label'): {err}") from None
    import nibabel as nib
    arrays = []
    for path in (case.image, case.label):
        try:
            arrays.append(np.asarray(nib.load(path).get_fdata(dtype=np.float32)))
        except Exception as err:  # nibabel raises many types for truncated or foreign files
            raise DataError(f"cannot read NIfTI file {path}: {type(err).__name__}: {err}") from None
    return arrays[0], arrays[1]


# Factors from the NIfTI header's spatial unit to mm; "unknown" is read as mm, as most tools do.
_NIFTI_UNIT_TO_MM = {"mm": 1.0, "unknown": 1.0, "meter": 1000.0, "micron": 1e-3}


def case_spacing(case: Case) -> tuple[float, float, float] | None:
    """The voxel spacing of a case in mm along the array axes ``(D, H, W)``, or None when the file has none.

    NIfTI: the image header's first three zooms, converted to mm from the header's spatial unit. h5: the file's
    root attribute ``spacing`` when present (read as mm), None otherwise.
    """
    if case.image.suffix == ".h5":
        import h5py
        with h5py.File(case.image, "r") as f:
            spacing = f.attrs.get("spacing")
        if spacing is None:
            return None
        values = np.asarray(spacing, dtype=float).ravel()
        if values.shape != (3,) or not (values > 0).all():
            raise DataError(f"h5 file {case.image}: attribute 'spacing' must be 3 positive numbers, got {spacing!r}")
        return tuple(float(v) for v in values)
    import nibabel as nib
    try:
        header = nib.load(case.image).header
    except Exception as err:  # nibabel raises many types for truncated or foreign files
        raise DataError(f"cannot read NIfTI file {case.image}: {type(err).__name__}: {err}") from None
    zooms = header.get_zooms()[:3]
    if len(zooms) != 3 or not all(z > 0 for z in zooms):
        raise DataError(f"NIfTI file {case.image}: header voxel sizes {zooms} are not 3 positive numbers")
    unit = header.get_xyzt_units()[0]
    if unit not in _NIFTI_UNIT_TO_MM:
        raise DataError(f"NIfTI file {case.image}: spatial unit {unit!r} is not one of {sorted(_NIFTI_UNIT_TO_MM)}")
    return tuple(float(z) * _NIFTI_UNIT_TO_MM[unit] for z in zooms)


class VolumeStore:
    """Loaded and checked volumes; either all in memory (``cache``) or re-read on access.

    Every case is read once at construction so that a bad file fails the run before training starts.
    """

    def __init__(self, cases: list[Case], num_classes: int, cache: bool = True):
        self.cases, self.num_classes = cases, num_classes
        self._cache = [load_case(c, num_classes) for c in cases] if cache else None
        if self._cache is None:
            for case in cases:
                load_case(case, num_classes)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self._cache[index] if self._cache is not None else load_case(self.cases[index], self.num_classes)


class PairedPatchDataset(Dataset):
    """Training items: one labeled and one unlabeled random patch, keyed by ``(lab, lab_seed, unl, unl_seed)``.

    The random crop and grid distortion are drawn from the item's seeds, so an item is the same whatever
    worker builds it, and a resumed run sees the same patches as an uninterrupted one.
    """

    def __init__(self, labeled: VolumeStore, unlabeled: VolumeStore, patch_size, distortion_prob: float = 0.1,
                 distortion_limit: float = 0.1, distortion_cells: int = 5):
        self.labeled, self.unlabeled, self.patch_size = labeled, unlabeled, tuple(patch_size)
        self.distortion = (distortion_prob, distortion_limit, distortion_cells)

    def _patch(self, store: VolumeStore, index: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(seed)
        image, label = store[index]
        prob, limit, cells = self.distortion
        if rng.random() < prob:
            image, label = random_grid_distortion(image, label, rng, cells, limit)
        image, label = random_crop(image, label, self.patch_size, rng)
        return torch.from_numpy(np.ascontiguousarray(image))[None], torch.from_numpy(np.ascontiguousarray(label))[None]

    def __getitem__(self, key: tuple[int, int, int, int]) -> dict[str, torch.Tensor]:
        lab, lab_seed, unl, unl_seed = key
        image_l, label_l = self._patch(self.labeled, lab, lab_seed)
        image_u, _ = self._patch(self.unlabeled, unl, unl_seed)
        return {"image_l": image_l, "label_l": label_l, "image_u": image_u}

    def __len__(self) -> int:
        return len(self.unlabeled)


def epoch_plan(num_labeled: int, num_unlabeled: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1,
               max_steps: int = 0, batch_size: int = 1) -> list[tuple[int, int, int, int]]:
    """The items of one epoch on one rank: a shuffled pass over this rank's share of the unlabeled cases,
    each paired with the next labeled case of a cycle of shuffled passes (fresh crops every time).

    Args:
        num_labeled, num_unlabeled: dataset sizes.
        epoch: 0-based epoch.
        seed: the run seed.
        rank, world_size: this process's share under DDP (every rank gets the same number of steps).
        max_steps: cap on steps (0: none).
        batch_size: patches of each kind per step.

    Returns:
        ``steps * batch_size`` keys for :class:`PairedPatchDataset`.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_unlabeled)
    per_rank = max(num_unlabeled // world_size, 1)
    mine = np.resize(order, per_rank * world_size)[rank::world_size]
    steps = max(len(mine) // batch_size, 1)
    if max_steps:
        steps = min(steps, max_steps)
    count = steps * batch_size
    mine = np.resize(mine, count)
    rank_rng = np.random.default_rng([seed, epoch, rank])
    labeled = np.concatenate([rank_rng.permutation(num_labeled) for _ in range(-(-count // num_labeled))])[:count]
    seeds = rank_rng.integers(0, 2**62, size=(count, 2))
    return [(int(l), int(s1), int(u), int(s2)) for l, u, (s1, s2) in zip(labeled, mine, seeds)]


def seed_worker(worker_id: int) -> None:
    """DataLoader workers only run numpy/scipy; one thread each keeps them from starving the main process."""
    torch.set_num_threads(1)
