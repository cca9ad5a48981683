"""Augmentations: random grid distortion and crop-with-padding (numpy, run in DataLoader workers), and the
per-step intensity views (torch, run on the training device).

The RCPS views differ in intensity only, so the two views of an image stay voxel-aligned (the contrastive
positives are the same voxel in both views).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def _distorted_axis(size: int, num_cells: int, limit: float, rng: np.random.Generator) -> np.ndarray:
    """Source coordinate for every output index of one axis: piecewise linear through cell boundaries whose
    widths are scaled by ``1 + U(-limit, limit)`` (then rescaled to span the axis)."""
    widths = 1.0 + rng.uniform(-limit, limit, num_cells)
    knots_src = np.concatenate([[0.0], np.cumsum(widths)]) / widths.sum() * (size - 1)
    knots_out = np.linspace(0.0, size - 1, num_cells + 1)
    return np.interp(np.arange(size), knots_out, knots_src)


def random_grid_distortion(
    image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator, num_cells: int = 5, limit: float = 0.1
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply one random separable grid distortion to an image (linear) and its label (nearest).

    Args:
        image: ``(D, H, W)`` float array.
        label: ``(D, H, W)`` integer array or None.
        rng: the random source.
        num_cells: cells per axis.
        limit: each cell's width is scaled by a factor in ``[1 - limit, 1 + limit]``.

    Returns:
        The distorted image and label (border values beyond the edges).
    """
    axes = [_distorted_axis(n, num_cells, limit, rng) for n in image.shape]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    image = ndimage.map_coordinates(image, coords, order=1, mode="nearest").astype(np.float32, copy=False)
    if label is not None:
        label = ndimage.map_coordinates(label, coords, order=0, mode="nearest")
    return image, label


def random_crop(image: np.ndarray, label: np.ndarray | None, patch_size, rng: np.random.Generator):
    """Crop a random ``patch_size`` window, zero-padding (the z-scored mean) axes shorter than the patch.

    Args:
        image: ``(D, H, W)`` array; label: the same shape or None.
        patch_size: three ints.
        rng: the random source.

    Returns:
        ``(image_patch, label_patch)`` of shape ``patch_size``.
    """
    pad = [(0, max(p - n, 0)) for n, p in zip(image.shape, patch_size)]
    if any(after for _, after in pad):
        # Pad symmetrically so that small volumes stay centred.
        pad = [((after // 2), after - after // 2) for _, after in pad]
        image = np.pad(image, pad)
        label = None if label is None else np.pad(label, pad)
    starts = [int(rng.integers(0, n - p + 1)) for n, p in zip(image.shape, patch_size)]
    window = tuple(slice(s, s + p) for s, p in zip(starts, patch_size))
    return image[window], None if label is None else label[window]


def intensity_view(
    x: torch.Tensor, generator: torch.Generator | None = None, noise_prob: float = 0.5, noise_std_max: float = 0.1
) -> torch.Tensor:
    """One RCPS intensity view: ``a*x + b*mean(a*x)``, a ~ U(0.5, 1.5), b ~ U(-0.5, 0.5), then with
    probability ``noise_prob`` Gaussian noise of std ~ U(0, noise_std_max).

    One draw for the whole batch tensor, like the official augmentor (without its stale-noise bug).

    Args:
        x: images ``(B, C, D, H, W)``.
        generator: a CPU ``torch.Generator`` (draws are made on CPU so runs reproduce across devices).

    Returns:
        The augmented view, same shape and dtype.
    """
    a, b, coin, std = torch.rand(4, generator=generator).tolist()
    a, b, std = 0.5 + a, b - 0.5, std * noise_std_max
    scaled = a * x
    view = scaled + b * scaled.mean()
    if coin < noise_prob:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
        view = view + (std * noise).to(device=x.device, dtype=x.dtype)
    return view
