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
    """Apply one random separable grid distortion to an image (linear, every channel alike) and its label (nearest).

    Args:
        image: ``(C, D, H, W)`` float array.
        label: ``(D, H, W)`` integer array or None.
        rng: the random source.
        num_cells: cells per axis.
        limit: each cell's width is scaled by a factor in ``[1 - limit, 1 + limit]``.

    Returns:
        The distorted image and label (border values beyond the edges).
    """
    axes = [_distorted_axis(n, num_cells, limit, rng) for n in image.shape[1:]]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    image = np.stack(
        [ndimage.map_coordinates(channel, coords, order=1, mode="nearest").astype(np.float32) for channel in image]
    )
    if label is not None:
        label = ndimage.map_coordinates(label, coords, order=0, mode="nearest")
    return image, label


def random_crop(image: np.ndarray, label: np.ndarray | None, patch_size, rng: np.random.Generator):
    """Crop a random ``patch_size`` window, zero-padding (the z-scored mean) axes shorter than the patch.

    Args:
        image: ``(C, D, H, W)`` array; label: ``(D, H, W)`` or None.
        patch_size: three ints.
        rng: the random source.

    Returns:
        ``(image_patch, label_patch)`` of spatial shape ``patch_size``.
    """
    pad = [(0, max(p - n, 0)) for n, p in zip(image.shape[1:], patch_size)]
    if any(after for _, after in pad):
        # Pad symmetrically so that small volumes stay centred.
        pad = [((after // 2), after - after // 2) for _, after in pad]
        image = np.pad(image, [(0, 0), *pad])
        label = None if label is None else np.pad(label, pad)
    starts = [int(rng.integers(0, n - p + 1)) for n, p in zip(image.shape[1:], patch_size)]
    window = tuple(slice(s, s + p) for s, p in zip(starts, patch_size))
    return image[(slice(None), *window)], None if label is None else label[window]


def intensity_view(
    x: torch.Tensor, generator: torch.Generator | None = None, noise_prob: float = 0.5, noise_std_max: float = 0.1
) -> torch.Tensor:
    """One RCPS intensity view: ``a*x + b*mean(a*x)``, a ~ U(0.5, 1.5), b ~ U(-0.5, 0.5), then with
    probability ``noise_prob`` Gaussian noise of std ~ U(0, noise_std_max).

    One draw for the whole batch tensor, like the official augmentor (without its stale-noise bug); with several
    channels, ``a``, ``b`` and the mean are per channel.

    Args:
        x: images ``(B, C, D, H, W)`` (or ``(B, C, H, W)``: nnU-Net's 2D configuration).
        generator: a CPU ``torch.Generator`` (draws are made on CPU so runs reproduce across devices).

    Returns:
        The augmented view, same shape and dtype.
    """
    channels = x.shape[1]
    # Row c holds channel c's (a, b): each modality keeps its own scale. The coin and the noise std come from row 0.
    draws = torch.rand(channels, 4, generator=generator)
    coin, std = draws[0, 2].item(), draws[0, 3].item() * noise_std_max
    per_channel = (1, channels) + (1,) * (x.ndim - 2)
    a = (draws[:, 0] + 0.5).view(per_channel).to(device=x.device, dtype=x.dtype)
    b = (draws[:, 1] - 0.5).view(per_channel).to(device=x.device, dtype=x.dtype)
    scaled = a * x
    view = scaled + b * scaled.mean(dim=[d for d in range(x.ndim) if d != 1], keepdim=True)
    if coin < noise_prob:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
        view = view + (std * noise).to(device=x.device, dtype=x.dtype)
    return view
