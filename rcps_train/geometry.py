"""Scan geometry with SimpleITK: reading a case's channels from NIfTI, NRRD, MHA and the other formats ITK reads,
a canonical orientation, physical-space resampling (and its inverse onto an input's grid), and arrays in the
trainer's axis order.

Axis order: the trainer sees a NIfTI file's array axes as nibabel returns them, ``(i, j, k)``. SimpleITK's
``GetArrayFromImage`` returns ``(k, j, i)``, so every array leaving or entering this module is transposed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .layouts import DataError

#: The orientation prepared data is written in: the array axes run toward the patient's Right, Anterior and
#: Superior (nibabel's ``as_closest_canonical`` and MONAI's default; an identity NIfTI affine).
CANONICAL_ORIENTATION = "RAS"

INTERPOLATORS = {"bspline": sitk.sitkBSpline, "linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}

# Two channels of one case may differ by this much in spacing, origin (mm) or direction cosines (rounding in
# headers written by different tools) and still share one grid.
GRID_TOLERANCE = 1e-4


class GeometryError(DataError):
    """An unreadable scan, or channels that do not share one grid; the message names the file."""


def read_scan(path: str | Path) -> list[sitk.Image]:
    """Read one file as a list of 3D float32 channels (a 4D or vector image gives one channel per volume).

    Raises:
        GeometryError: naming ``path`` when it cannot be read, is not 3D or 4D, or holds NaN or Inf.
    """
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise GeometryError(f"cannot read image {path}: {first_line}") from None
    if image.GetNumberOfComponentsPerPixel() > 1:
        channels = [
            sitk.VectorIndexSelectionCast(image, index, sitk.sitkFloat32)
            for index in range(image.GetNumberOfComponentsPerPixel())
        ]
    elif image.GetDimension() == 4:
        size = list(image.GetSize())
        channels = [
            sitk.Cast(sitk.Extract(image, size[:3] + [0], [0, 0, 0, t]), sitk.sitkFloat32) for t in range(size[3])
        ]
    else:
        channels = [sitk.Cast(image, sitk.sitkFloat32)]
    if channels[0].GetDimension() != 3:
        raise GeometryError(
            f"image {path} has {channels[0].GetDimension()} dimensions (size {image.GetSize()}); expected a 3D volume"
        )
    finite = all(np.isfinite(sitk.GetArrayViewFromImage(channel)).all() for channel in channels)
    if not finite or (str(path).endswith((".nii", ".nii.gz")) and not _nifti_voxels_finite(path)):
        raise GeometryError(f"image {path} contains NaN or Inf values")
    return channels


def _nifti_voxels_finite(path: str | Path) -> bool:
    """Whether a NIfTI file's voxels are all finite, as stored (ITK's NIfTI reader turns NaN into 0, so a scan
    with holes would otherwise pass for a valid one)."""
    import nibabel as nib

    return bool(np.isfinite(np.asanyarray(nib.load(path).dataobj)).all())


def read_case_channels(paths: list[Path]) -> list[sitk.Image]:
    """The channels of one case from one or more files (nnU-Net's ``_0000``, ``_0001``, ... files), checked to
    share one grid."""
    channels = [channel for path in paths for channel in read_scan(path)]
    for path, channel in zip(paths, channels[1:]):
        if not same_grid(channels[0], channel):
            raise GeometryError(
                f"channels of {paths[0]} and {path} do not share one grid (size {channels[0].GetSize()} vs "
                f"{channel.GetSize()}, spacing {channels[0].GetSpacing()} vs {channel.GetSpacing()})"
            )
    return channels


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Whether two images have the same size, spacing, origin and direction (within :data:`GRID_TOLERANCE`)."""
    return a.GetSize() == b.GetSize() and all(
        np.allclose(getter(a), getter(b), atol=GRID_TOLERANCE, rtol=GRID_TOLERANCE)
        for getter in (sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection)
    )


def to_array(image: sitk.Image) -> np.ndarray:
    """The voxels of a 3D image in the trainer's axis order ``(i, j, k)`` (a copy)."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def from_array(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """An image of ``array`` (axes ``(i, j, k)``) with the spacing, origin and direction of ``grid``."""
    if tuple(array.shape) != tuple(grid.GetSize()):
        raise GeometryError(f"array of shape {array.shape} does not fit a grid of size {grid.GetSize()}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.CopyInformation(grid)
    return image


def orientation_code(image: sitk.Image) -> str:
    """The directions the axes of ``image`` run toward, e.g. ``RAS`` (Right, Anterior, Superior), as both
    nibabel's ``aff2axcodes`` and ITK's DICOM orientation filter name them."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def reorient(image: sitk.Image, orientation: str) -> sitk.Image:
    """Permute and flip the axes of ``image`` (no interpolation) so that they run toward ``orientation`` (e.g.
    ``RAS``); directions that are not axis-aligned take their closest axes."""
    return sitk.DICOMOrient(image, orientation)


def nonzero_box(arrays: list[np.ndarray]) -> list[list[int]]:
    """The bounding box ``[[start, stop] per axis]`` of the voxels that are non-zero in any of ``arrays``; the whole
    volume when all are zero."""
    mask = np.any(np.stack([a != 0 for a in arrays]), axis=0)
    if not mask.any():
        return [[0, n] for n in mask.shape]
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append([int(hit[0]), int(hit[-1]) + 1])
    return box


def crop(image: sitk.Image, box: list[list[int]]) -> sitk.Image:
    """The region ``box`` (``[[start, stop]]`` along ``(i, j, k)``) of ``image``, keeping its place in space."""
    return image[tuple(slice(start, stop) for start, stop in box)]


def resample_to_spacing(image: sitk.Image, spacing, interpolator: str) -> sitk.Image:
    """Resample ``image`` to ``spacing`` (mm along ``(i, j, k)``) over the same field of view.

    The outer faces of the first and last voxels stay where they are (the extent is kept, the voxel count
    rounded), so the new grid covers the same box in space as the old one. An image already at ``spacing``
    comes back unchanged.
    """
    old_spacing, new_spacing = np.array(image.GetSpacing()), np.array(spacing, dtype=float)
    if np.allclose(old_spacing, new_spacing, rtol=GRID_TOLERANCE, atol=0):
        return image
    size = np.maximum(np.round(np.array(image.GetSize()) * old_spacing / new_spacing), 1).astype(int)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin()) + direction @ ((new_spacing - old_spacing) / 2)
    return sitk.Resample(
        image,
        [int(n) for n in size],
        sitk.Transform(),
        INTERPOLATORS[interpolator],
        origin.tolist(),
        new_spacing.tolist(),
        image.GetDirection(),
        0.0,
        sitk.sitkFloat32,
    )


def resample_scores(scores: np.ndarray, grid: sitk.Image, target: sitk.Image) -> np.ndarray:
    """Resample per-class scores from ``grid`` onto the grid of ``target`` in physical space.

    Foreground classes are interpolated linearly (one vector image, one pass) with 0 outside ``grid``'s field of
    view; the background is 1 minus their sum, so one-hot labels and probabilities stay a partition of unity and
    voxels outside the field of view become background.

    Args:
        scores: ``(K, i, j, k)`` float32 on ``grid`` (probabilities or a one-hot label map), K >= 2.
        grid: the geometry of ``scores``.
        target: the grid to resample onto.

    Returns:
        ``(K, *target.GetSize())`` float32.
    """
    foreground = scores[1:].astype(np.float32)
    vector = sitk.GetImageFromArray(np.ascontiguousarray(foreground.transpose(3, 2, 1, 0)), isVector=True)
    vector.CopyInformation(grid)
    resampled = sitk.Resample(vector, target, sitk.Transform(), sitk.sitkLinear, 0.0, vector.GetPixelID())
    moved = sitk.GetArrayFromImage(resampled).reshape(*target.GetSize()[::-1], -1).transpose(3, 2, 1, 0)
    background = 1.0 - moved.sum(0, keepdims=True)
    return np.ascontiguousarray(np.concatenate([background, moved]), dtype=np.float32)


def resample_label(label: sitk.Image, target: sitk.Image, num_classes: int) -> np.ndarray:
    """A label map resampled onto ``target``'s grid without inventing classes: each class's mask is interpolated
    linearly and every voxel takes the class of highest value.

    Returns:
        uint8 ``(i, j, k)`` on ``target``'s grid.
    """
    values = to_array(label)
    one_hot = np.stack([values == c for c in range(num_classes)]).astype(np.float32)
    return resample_scores(one_hot, label, target).argmax(0).astype(np.uint8)
