"""A synthetic 3D segmentation dataset in the official NIfTI layout, so the trainer runs with no download.

Each volume holds one or two smoothly deformed ellipsoids (the foreground) and a few unlabeled distractor
blobs of similar brightness, on a textured background, under a multiplicative bias field and Gaussian noise.
The foreground differs from the distractors by a weak texture and shape cue and from the background by a
contrast of about one noise std, so a few labeled cases do not solve it outright.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


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


def synthetic_case(shape=(64, 64, 48), rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One image/label pair.

    Args:
        shape: volume shape ``(D, H, W)``.
        rng: the random source.

    Returns:
        ``image`` float32 and ``label`` uint8 (0 background, 1 foreground), both of ``shape``.
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
    return image.astype(np.float32), label.astype(np.uint8)


def make_synthetic_dataset(out_dir: str | Path, num_train: int = 40, num_val: int = 10, shape=(64, 64, 48),
                           seed: int = 0) -> Path:
    """Write ``<out>/{train,val}_{images,labels}/case_XXX.nii.gz``.

    Args:
        out_dir: the dataset root (created).
        num_train: training cases (labeled and unlabeled are chosen later by the config).
        num_val: validation cases.
        shape: volume shape.
        seed: makes the dataset reproducible.

    Returns:
        The dataset root.
    """
    root = Path(out_dir)
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("val", num_val)):
        (root / f"{split}_images").mkdir(parents=True, exist_ok=True)
        (root / f"{split}_labels").mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, label = synthetic_case(shape, rng)
            name = f"case_{index:03d}.nii.gz"
            nib.save(nib.Nifti1Image(image, np.eye(4)), root / f"{split}_images" / name)
            nib.save(nib.Nifti1Image(label, np.eye(4)), root / f"{split}_labels" / name)
    return root
