"""A synthetic 3D segmentation dataset in any layout the trainer reads (official NIfTI, nnU-Net v2 raw, h5),
so the trainer runs with no download.

Each volume holds one or two smoothly deformed ellipsoids (the foreground) and a few unlabeled distractor
blobs of similar brightness, on a textured background, under a multiplicative bias field and Gaussian noise.
The foreground differs from the distractors by a weak texture and shape cue and from the background by a
contrast of about one noise std, so a few labeled cases do not solve it outright.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .checkpoint import check_output_folder
from .config import ConfigError


def _smooth_noise(shape, sigma: float, rng: np.random.Generator) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-8)


def _ellipsoid(shape, rng: np.random.Generator, radius_range) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    centre = np.array([rng.uniform(0.3 * n, 0.7 * n) for n in shape])[:, None, None, None]
    radii = rng.uniform(*radius_range, size=3)[:, None, None, None] * np.array(shape)[:, None, None, None]
    rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    offsets = np.einsum("ij,j...->i...", rotation, grid - centre)
    return ((offsets / radii) ** 2).sum(0)  # < 1 inside


def synthetic_case(
    shape=(64, 64, 48), rng: np.random.Generator | None = None, channels: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """One image/label pair.

    Args:
        shape: volume shape ``(D, H, W)``.
        rng: the random source.
        channels: image channels; channel 0 is the same whatever the count, and each further channel is another
            "modality" in which the distractors are dark, so the channels together separate them better.

    Returns:
        ``image`` float32 (``shape``, or ``(channels, *shape)`` for several) and ``label`` uint8 (0 background,
        1 foreground) of ``shape``.
    """
    rng = rng or np.random.default_rng()
    # A smooth random field deforms the surfaces so that shapes are not perfect ellipsoids.
    deform = 0.25 * _smooth_noise(shape, 4.0, rng)
    label = np.zeros(shape, bool)
    for _ in range(rng.integers(1, 3)):
        label |= _ellipsoid(shape, rng, (0.12, 0.25)) + deform < 1.0
    distractors = np.zeros(shape, bool)
    for _ in range(rng.integers(2, 4)):
        distractors |= _ellipsoid(shape, rng, (0.06, 0.12)) < 1.0
    distractors &= ~ndimage.binary_dilation(label, iterations=2)
    background_texture = 0.5 * _smooth_noise(shape, 1.5, rng)
    foreground_texture = 0.4 * _smooth_noise(shape, 0.7, rng)
    image = background_texture + 0.9 * distractors + label * (1.0 + foreground_texture)
    bias = np.exp(0.3 * _smooth_noise(shape, 12.0, rng))
    image = image * bias + 0.6 * rng.standard_normal(shape)
    if channels > 1:
        others = [
            (0.5 * _smooth_noise(shape, 1.5, rng) - 0.8 * distractors + 0.8 * label) * bias
            + 0.6 * rng.standard_normal(shape)
            for _ in range(channels - 1)
        ]
        image = np.stack([image, *others])
    return image.astype(np.float32), label.astype(np.uint8)


LAYOUTS = ("nifti", "nnunet", "h5")
#: Where make_synthetic_dataset writes unlabeled images (data.unlabeled_dir), per layout.
UNLABELED_FOLDERS = {"nifti": "unlabeled_images", "nnunet": "imagesUnlabeled", "h5": "unlabeled"}


def _write_nifti(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def _write_image(root: Path, layout: str, folder: str, name: str, image: np.ndarray) -> None:
    """One image as the layout stores it: a 3D or 4D (channels last) NIfTI file, one NIfTI file per channel
    (nnU-Net), or an h5 ``image`` dataset ``(D, H, W)`` / ``(C, D, H, W)``."""
    if layout == "nifti":
        _write_nifti(np.moveaxis(image, 0, -1) if image.ndim == 4 else image, root / folder / f"{name}.nii.gz")
    elif layout == "nnunet":
        for index, channel in enumerate(image if image.ndim == 4 else image[None]):
            _write_nifti(channel, root / folder / f"{name}_{index:04d}.nii.gz")
    else:
        import h5py

        (root / folder).mkdir(parents=True, exist_ok=True)
        with h5py.File(root / folder / f"{name}.h5", "w") as f:
            f["image"] = image


def _write_case(root: Path, layout: str, split: str, name: str, image: np.ndarray, label: np.ndarray) -> None:
    if layout == "nifti":
        _write_image(root, layout, f"{split}_images", name, image)
        _write_nifti(label, root / f"{split}_labels" / f"{name}.nii.gz")
    elif layout == "nnunet":
        tag = "Tr" if split == "train" else "Ts"
        _write_image(root, layout, f"images{tag}", name, image)
        _write_nifti(label, root / f"labels{tag}" / f"{name}.nii.gz")
    else:
        import h5py

        _write_image(root, layout, ".", name, image)
        with h5py.File(root / f"{name}.h5", "a") as f:
            f["label"] = label


def make_synthetic_dataset(
    out_dir: str | Path,
    num_train: int = 40,
    num_val: int = 10,
    shape=(64, 64, 48),
    seed: int = 0,
    layout: str = "nifti",
    channels: int = 1,
    num_unlabeled: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic dataset of ``case_XXX`` training and ``test_XXX`` test volumes (the same volumes whatever
    the layout).

    Args:
        out_dir: the dataset root (created).
        num_train: training cases (labeled, unlabeled and validation are chosen later by the config).
        num_val: held-out test cases (``val_*`` folders, ``imagesTs``/``labelsTs`` or ``test.list``); for
            ``nnunet``, 0 leaves the test split to the trainer's fixed split of the training cases.
        shape: volume shape.
        seed: makes the dataset reproducible.
        layout: ``"nifti"`` (``{train,val}_{images,labels}/case_XXX.nii.gz``), ``"nnunet"`` (nnU-Net v2 raw with
            ``dataset.json``) or ``"h5"`` (``case_XXX.h5`` with ``train.list`` / ``test.list``).
        channels: image channels (see :func:`synthetic_case`).
        num_unlabeled: images without labels, ``unl_XXX``, in the layout's :data:`UNLABELED_FOLDERS` entry (set
            ``data.unlabeled_dir`` to it).
        overwrite: clear a non-empty ``out_dir`` first; without it such a folder is refused (two datasets mixed in
            one folder would read as one).

    Returns:
        The dataset root.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    root = Path(out_dir)
    check_output_folder(root, "--out")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out {root} is not empty; choose an empty folder or pass --overwrite to clear it")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = {}
    for split, count in (("train", num_train), ("val", num_val)):
        # Test cases get their own prefix: a name in both splits would read as train/test leakage.
        prefix = "test" if split == "val" else "case"
        names[split] = [f"{prefix}_{index:03d}" for index in range(count)]
        for name in names[split]:
            _write_case(root, layout, split, name, *synthetic_case(shape, rng, channels))
    for index in range(num_unlabeled):
        image, _ = synthetic_case(shape, rng, channels)
        _write_image(root, layout, UNLABELED_FOLDERS[layout], f"unl_{index:03d}", image)
    if layout == "h5":
        (root / "train.list").write_text("".join(f"{n}\n" for n in names["train"]))
        (root / "test.list").write_text("".join(f"{n}\n" for n in names["val"]))
    if layout == "nnunet":
        meta = {
            "name": "synthetic",
            "channel_names": {str(index): f"synthetic{index}" for index in range(channels)},
            "labels": {"background": 0, "foreground": 1},
            "numTraining": num_train,
            "file_ending": ".nii.gz",
        }
        (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root
