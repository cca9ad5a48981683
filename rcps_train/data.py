"""Datasets without MONAI: the splits of a run (labeled, unlabeled, validation, test), start-up checks of every
file, per-channel z-score normalisation, and deterministic per-step sampling (which makes ``--resume`` exact).

Where the files lie is :mod:`rcps_train.layouts`. Images are float32 ``(C, D, H, W)`` (C channels; D, H, W the
file's array axes), labels int64 ``(D, H, W)``.

Where the unlabeled pool and the validation split come from:
- ``data.labeled`` a count or an ID file (the benchmark protocol): the other training cases are unlabeled (their
  labels hidden); ``data.val_cases`` is taken from those hidden-label cases; the images of ``data.unlabeled_dir``,
  when set, join the unlabeled pool.
- ``data.labeled = "all"`` (a real semi-supervised dataset): every training case is labeled, the unlabeled pool is
  ``data.unlabeled_dir`` alone, and ``data.val_cases`` is held out of the labeled cases (scored, never trained on,
  not even as unlabeled data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import random_crop, random_grid_distortion
from .deprecation import deprecated_names
from .layouts import (
    Case,
    DataError,
    list_cases,
    list_unlabeled,
    read_id_list,
    read_nnunet_dataset_json,
    unlabeled_folder,
)


def _ids_from_file(path_text: str, key: str, cases: list[Case]) -> set[str]:
    """The IDs listed in a file (one a line) for config key ``key``; each must name one of ``cases``."""
    path = Path(path_text)
    if not path.is_file():
        raise DataError(f"{key}: ID file {path} does not exist")
    ids = set(read_id_list(path, key))
    unknown = ids - {c.name for c in cases}
    if unknown:
        raise DataError(f"{key}: IDs in {path} not in the training list: {sorted(unknown)[:5]}")
    return ids


def split_labeled(cases: list[Case], labeled: int | str) -> tuple[list[Case], list[Case]]:
    """Split training cases into (labeled, hidden-label) cases.

    Args:
        cases: training cases, sorted.
        labeled: a count (the first N of the sorted list), the path of a file of IDs, one a line, or ``"all"``.

    Returns:
        The labeled cases (at least 1) and the others, whose labels are hidden from training.
    """
    if labeled == "all":
        return list(cases), []
    if isinstance(labeled, str):
        ids = _ids_from_file(labeled, "data.labeled", cases)
        chosen = [c for c in cases if c.name in ids]
    else:
        if labeled > len(cases):
            raise DataError(f"data.labeled = {labeled} asks for more cases than the {len(cases)} training cases")
        chosen = cases[:labeled]
    if not chosen:
        raise DataError(f"data.labeled = {labeled!r} chooses none of the {len(cases)} training cases")
    return chosen, [c for c in cases if c not in chosen]


def split_validation(
    candidates: list[Case], trained_labeled: list[Case], val_cases: int | str, kind: str = "unlabeled"
) -> tuple[list[Case], list[Case]]:
    """Carve the validation split out of ``candidates``.

    The validation cases keep their labels for scoring, and neither their images nor their labels are trained
    on. With hidden-label cases the candidates are those (the scarce labeled cases stay in training); with
    ``data.labeled = "all"`` they are the labeled cases.

    Args:
        candidates: the cases validation may take, sorted.
        trained_labeled: labeled cases that stay in training (an ID file must not name them).
        val_cases: a count (the last N of ``candidates``; 0: no validation split) or a file of IDs.
        kind: what the candidates are, for messages.

    Returns:
        ``(candidates left for training, validation cases)``.
    """
    if isinstance(val_cases, str):
        ids = _ids_from_file(val_cases, "data.val_cases", candidates + trained_labeled)
        clash = sorted(ids & {c.name for c in trained_labeled})
        if clash:
            raise DataError(
                f"data.val_cases: {val_cases} names labeled training cases {clash[:5]} "
                f"(see data.labeled); validation cases must not be trained on"
            )
        chosen = [c for c in candidates if c.name in ids]
    else:
        if val_cases > len(candidates):
            raise DataError(
                f"data.val_cases = {val_cases} asks for more cases than the {len(candidates)} {kind} training cases"
            )
        chosen = candidates[len(candidates) - val_cases :] if val_cases else []
    return [c for c in candidates if c not in chosen], chosen


@dataclass(frozen=True)
class Splits:
    """The cases of a run: labeled and unlabeled training data, the validation split (may be empty), the test
    split (scored once, after training), and the image channel count they share."""

    labeled: list[Case]
    unlabeled: list[Case]
    validation: list[Case]
    test: list[Case]
    channels: int


SPLIT_NAMES = ("labeled", "unlabeled", "validation", "test")


def data_record(splits: Splits) -> dict:
    """What a checkpoint remembers of its data: the cases of every split and per case the byte size of its files,
    a cheap fingerprint (an edited or re-exported compressed file almost always changes size; modification times
    are left out so that a copied dataset still matches). The channel count is the checkpoint's ``in_channels``."""
    return {
        "splits": {name: [case.name for case in getattr(splits, name)] for name in SPLIT_NAMES},
        "sizes": {
            f"{name}/{case.name}": sum(path.stat().st_size for path in (*case.image_files, case.label) if path)
            for name in SPLIT_NAMES
            for case in getattr(splits, name)
        },
    }


def data_changes(stored: dict, current: dict) -> list[str]:
    """How ``current`` (a :func:`data_record`) differs from ``stored``, one phrase per difference."""
    changes = []
    for name in SPLIT_NAMES:
        before, after = stored["splits"].get(name, []), current["splits"][name]
        added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
        if added or removed:
            changes.append(f"{name} cases: added {added[:5]}, removed {removed[:5]}")
    resized = sorted(key for key, size in current["sizes"].items() if stored["sizes"].get(key, size) != size)
    if resized:
        changes.append(f"files changed size: {resized[:5]}")
    return changes


def _training_splits(train_cases: list[Case], data_cfg: dict) -> tuple[list[Case], list[Case], list[Case]]:
    """``(labeled, hidden-label unlabeled, validation)`` of the training cases (module docstring)."""
    labeled, hidden = split_labeled(train_cases, data_cfg["labeled"])
    if data_cfg["labeled"] == "all":
        labeled, validation = split_validation(labeled, [], data_cfg["val_cases"], "labeled")
        if not labeled:
            raise DataError(
                f"data.val_cases = {data_cfg['val_cases']!r} holds out all {len(train_cases)} labeled training "
                f"cases (data.labeled = 'all'); at least 1 must stay for training"
            )
        return labeled, [], validation
    hidden, validation = split_validation(hidden, labeled, data_cfg["val_cases"])
    return labeled, hidden, validation


def _check_case_names(train: list[Case], test: list[Case], added: list[Case], folder: Path) -> None:
    """Every case in one place only: a test case that is also trained on leaks the test split into training, an
    unlabeled image that is also a case is trained on twice, and names that differ only in letter case collide
    on case-insensitive file systems and in ID files."""
    leaked = sorted({c.name for c in train} & {c.name for c in test})
    if leaked:
        raise DataError(
            f"cases {leaked[:5]} are both training and test cases under data.root (train/test leakage); "
            f"a case must be in one split only"
        )
    clash = sorted({c.name for c in train + test} & {c.name for c in added})
    if clash:
        raise DataError(
            f"data.unlabeled_dir: {folder} holds images of cases that are also training or test cases of "
            f"data.root: {clash[:5]}; an image must be in one place only"
        )
    by_folded = {}
    for case in train + test + added:
        by_folded.setdefault(case.name.casefold(), []).append(case.name)
    folded = [names for names in by_folded.values() if len(set(names)) > 1]
    if folded:
        raise DataError(f"case names {folded[0]} differ only in letter case; rename one of them")


def dataset_splits(data_cfg: dict) -> Splits:
    """List, split and check a run's cases (the ``[data]`` section of a config).

    Raises:
        DataError: naming the file or key, for a missing or inconsistent layout or split.
    """
    root, data_format = data_cfg["root"], data_cfg["format"]
    train_cases = list_cases(root, "train", data_format)
    test_cases = list_cases(root, "val", data_format)
    if data_format == "nnunet":
        classes = read_nnunet_dataset_json(Path(root))["num_classes"]
        if classes != data_cfg["num_classes"]:
            raise DataError(
                f"{Path(root) / 'dataset.json'} defines {classes} labels but data.num_classes is "
                f"{data_cfg['num_classes']}; set data.num_classes = {classes} (and loss.class_weights)"
            )
    labeled, hidden, validation = _training_splits(train_cases, data_cfg)
    added = list_unlabeled(root, data_cfg["unlabeled_dir"], data_format) if data_cfg["unlabeled_dir"] else []
    _check_case_names(train_cases, test_cases, added, unlabeled_folder(root, data_cfg["unlabeled_dir"]))
    if not hidden + added:
        raise DataError(
            f"data.labeled = {data_cfg['labeled']!r} leaves no unlabeled images: "
            + (
                "set data.unlabeled_dir to a folder of unlabeled images"
                if data_cfg["labeled"] == "all"
                else f"with data.val_cases = {data_cfg['val_cases']!r} all {len(train_cases)} training cases are "
                "labeled or validation cases; label or validate fewer, or set data.unlabeled_dir"
            )
        )
    channels = dataset_channels(labeled + hidden + added + validation + test_cases)
    return Splits(labeled, hidden + added, validation, test_cases, channels)


def image_channels(case: Case) -> int:
    """The channel count of a case's image, read from the file headers (cheap: no voxel data is read)."""
    if case.more_channels:
        return 1 + len(case.more_channels)
    if case.image.suffix == ".h5":
        import h5py

        try:
            with h5py.File(case.image, "r") as f:
                shape = f["image"].shape
        except (OSError, KeyError) as err:
            raise DataError(f"cannot read h5 file {case.image} (needs a dataset 'image'): {err}") from None
        return shape[0] if len(shape) == 4 else 1
    shape = _nifti(case.image).shape
    return shape[3] if len(shape) == 4 else 1


def dataset_channels(cases: list[Case]) -> int:
    """The channel count every case's image has.

    Raises:
        DataError: naming the first case whose count differs from the first case's.
    """
    counts = [image_channels(case) for case in cases]
    for case, count in zip(cases, counts):
        if count != counts[0]:
            raise DataError(
                f"image {case.image} (case {case.name!r}) has {count} channel(s) but {cases[0].image} "
                f"(case {cases[0].name!r}) has {counts[0]}; every image of a run must have the same channels"
            )
    return counts[0]


def check_cases(cases: list[Case], num_classes: int, channels: int) -> None:
    """Read and check every case (as :func:`load_case` does) without keeping it: a bad validation or test
    file then stops the run before the first training step, not after the last."""
    for case in cases:
        load_case(case, num_classes, channels)


def load_case(case: Case, num_classes: int, channels: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read, check and normalise one case.

    Args:
        case: the files.
        num_classes: labels must lie in ``[0, num_classes)``.
        channels: the channel count the image must have (None: any).

    Returns:
        ``image`` float32 ``(C, D, H, W)`` (see :func:`normalise_image`), and ``label`` int64 ``(D, H, W)``, or
        None for an unlabeled case.
    """
    image = _read_image(case)
    if channels is not None and image.shape[0] != channels:
        raise DataError(
            f"image {case.image} has {image.shape[0]} channel(s); expected {channels} (the channels of the run's "
            f"data and checkpoint)"
        )
    if not np.isfinite(image).all():
        raise DataError(f"image {case.image} contains NaN or Inf values")
    label = None
    if case.label is not None:
        label = _read_label(case)
        if label.shape != image.shape[1:]:
            raise DataError(f"image {case.image} has shape {image.shape[1:]} but label {case.label} has {label.shape}")
        rounded = np.rint(label)
        if not np.array_equal(rounded, label) or rounded.min() < 0 or rounded.max() >= num_classes:
            values = np.unique(label)[:10]
            raise DataError(f"label {case.label} has values {values.tolist()} outside the classes 0..{num_classes - 1}")
        label = rounded.astype(np.int64)
    check_grid(case)
    return normalise_image(image), label


def normalise_image(image: np.ndarray) -> np.ndarray:
    """Z-score each channel of a ``(C, D, H, W)`` image over its volume (float32)."""
    return np.stack([((ch - ch.mean()) / max(float(ch.std()), 1e-8)).astype(np.float32) for ch in image])


def _nifti(path: Path):
    import nibabel as nib

    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises many types for truncated or foreign files
        raise DataError(f"cannot read NIfTI file {path}: {type(err).__name__}: {err}") from None


def _nifti_array(path: Path) -> np.ndarray:
    image = _nifti(path)
    try:
        return np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as err:  # a truncated file can fail only when its voxels are read
        raise DataError(f"cannot read NIfTI file {path}: {type(err).__name__}: {err}") from None


def _h5_dataset(path: Path, name: str) -> np.ndarray:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return np.asarray(f[name], np.float32)
    except (OSError, KeyError) as err:
        raise DataError(f"cannot read h5 file {path} (needs a dataset {name!r}): {err}") from None


def _read_image(case: Case) -> np.ndarray:
    """The image as float32 ``(C, D, H, W)``: an h5 ``image`` of 3 or 4 (channels first) axes, a 3D NIfTI file
    per channel, or one 4D NIfTI file with the channels last."""
    if case.image.suffix == ".h5":
        image = _h5_dataset(case.image, "image")
        layout = "(D, H, W) or (C, D, H, W)"
    elif case.more_channels:
        volumes = [_nifti_array(path) for path in case.image_files]
        for path, volume in zip(case.image_files, volumes):
            if volume.ndim != 3 or volume.shape != volumes[0].shape:
                raise DataError(
                    f"image {path} has shape {volume.shape}; expected a 3D volume of the shape of {case.image} "
                    f"{volumes[0].shape} (one file per channel)"
                )
        return np.stack(volumes)
    else:
        image = _nifti_array(case.image)
        image = np.moveaxis(image, -1, 0) if image.ndim == 4 else image
        layout = "(D, H, W), or (D, H, W, C) for C channels"
    if image.ndim not in (3, 4) or 0 in image.shape:
        raise DataError(f"image {case.image} has shape {image.shape}; expected a 3D volume {layout}")
    return image[None] if image.ndim == 3 else image


def _read_label(case: Case) -> np.ndarray:
    return _h5_dataset(case.label, "label") if case.label.suffix == ".h5" else _nifti_array(case.label)


# The files of a case must lie on one grid: voxel sizes equal within SPACING_RTOL (converters round them to float32
# and a few digits) and direction cosines within DIRECTION_ATOL (about 0.06 degrees). The origin is not compared.
SPACING_RTOL = 1e-3
DIRECTION_ATOL = 1e-3


def _spacing_and_directions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxel sizes and direction cosines (columns) of a NIfTI file's affine."""
    rotation_zoom = _nifti(path).affine[:3, :3]
    spacing = np.linalg.norm(rotation_zoom, axis=0)
    return spacing, rotation_zoom / np.maximum(spacing, 1e-12)


def check_grid(case: Case) -> None:
    """Check a case's voxel spacing (:func:`case_spacing`) and that its other files (channels, label) share the
    image's spacing and orientation; an h5 case keeps image and label in one file, so only its spacing is read.

    Raises:
        DataError: naming both files and their values.
    """
    case_spacing(case)
    others = [*case.more_channels, *([case.label] if case.label is not None else [])]
    if case.image.suffix == ".h5" or not others:
        return
    spacing, directions = _spacing_and_directions(case.image)
    for path in others:
        other_spacing, other_directions = _spacing_and_directions(path)
        if not np.allclose(other_spacing, spacing, rtol=SPACING_RTOL, atol=0):
            raise DataError(
                f"{path} has voxel spacing {np.round(other_spacing, 5).tolist()} but image {case.image} has "
                f"{np.round(spacing, 5).tolist()} (they must agree within {SPACING_RTOL:.1%})"
            )
        if not np.allclose(other_directions, directions, rtol=0, atol=DIRECTION_ATOL):
            raise DataError(
                f"{path} has orientation (direction cosines) {np.round(other_directions, 4).tolist()} but image "
                f"{case.image} has {np.round(directions, 4).tolist()}; resample or reorient it onto the image's grid"
            )


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
    header = _nifti(case.image).header
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

    def __init__(self, cases: list[Case], num_classes: int, channels: int, cache: bool = True):
        self.cases, self.num_classes, self.channels = cases, num_classes, channels
        self._cache = [load_case(c, num_classes, channels) for c in cases] if cache else None
        if self._cache is None:
            check_cases(cases, num_classes, channels)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self._cache is not None:
            return self._cache[index]
        return load_case(self.cases[index], self.num_classes, self.channels)


class PairedPatchDataset(Dataset):
    """Training items: one labeled and one unlabeled random patch, keyed by ``(lab, lab_seed, unl, unl_seed)``.

    The random crop and grid distortion are drawn from the item's seeds, so an item is the same whatever
    worker builds it, and a resumed run sees the same patches as an uninterrupted one.
    """

    def __init__(
        self,
        labeled: VolumeStore,
        unlabeled: VolumeStore,
        patch_size,
        distortion_prob: float = 0.1,
        distortion_limit: float = 0.1,
        distortion_cells: int = 5,
    ):
        self.labeled, self.unlabeled, self.patch_size = labeled, unlabeled, tuple(patch_size)
        self.distortion = (distortion_prob, distortion_limit, distortion_cells)

    def _patch(self, store: VolumeStore, index: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        rng = np.random.default_rng(seed)
        image, label = store[index]
        prob, limit, cells = self.distortion
        if rng.random() < prob:
            image, label = random_grid_distortion(image, label, rng, cells, limit)
        image, label = random_crop(image, label, self.patch_size, rng)
        image = torch.from_numpy(np.ascontiguousarray(image))
        return image, None if label is None else torch.from_numpy(np.ascontiguousarray(label))[None]

    def __getitem__(self, key: tuple[int, int, int, int]) -> dict[str, torch.Tensor]:
        lab, lab_seed, unl, unl_seed = key
        image_l, label_l = self._patch(self.labeled, lab, lab_seed)
        image_u, _ = self._patch(self.unlabeled, unl, unl_seed)
        return {"image_l": image_l, "label_l": label_l, "image_u": image_u}

    def __len__(self) -> int:
        return len(self.unlabeled)


def epoch_plan(
    num_labeled: int,
    num_unlabeled: int,
    epoch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    max_steps: int = 0,
    batch_size: int = 1,
) -> list[tuple[int, int, int, int]]:
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
    return [(int(lab), int(s1), int(unl), int(s2)) for lab, unl, (s1, s2) in zip(labeled, mine, seeds)]


def seed_worker(worker_id: int) -> None:
    """DataLoader workers only run numpy/scipy; one thread each keeps them from starving the main process."""
    torch.set_num_threads(1)


__getattr__ = deprecated_names(__name__, {"normalize_image": "rcps_train.data.normalise_image"})
