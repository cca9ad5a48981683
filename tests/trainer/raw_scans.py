"""Raw scans on anisotropic, rotated and flipped grids (SimpleITK), shared by the prepare and predict tests."""

import numpy as np
import SimpleITK as sitk

from rcps_train import geometry


def direction_matrix(angle_deg: float, flips=(1, 1, 1)) -> list[float]:
    """A rotation about the third axis by ``angle_deg`` composed with axis flips (row-major 3x3)."""
    a = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return (rotation @ np.diag(flips)).ravel().tolist()


# Anisotropic grids (about 3.5 mm slices, 1 mm in-plane), each case with its own spacing and axis directions:
# flipped axes, a rotation that is not a multiple of 90 degrees, a permuted frame.
RAW_GRIDS = [
    ((1.0, 1.0, 3.5), direction_matrix(0)),
    ((0.9, 1.1, 3.2), direction_matrix(0, (-1, -1, 1))),
    ((1.1, 0.95, 3.8), direction_matrix(25, (1, 1, -1))),
    ((1.0, 0.9, 3.5), direction_matrix(90, (1, -1, 1))),
    ((0.95, 1.05, 3.0), direction_matrix(-15)),
]
FIELD_OF_VIEW_MM = (44.0, 40.0, 42.0)


def raw_scan(spacing, direction, rng, ct: bool = False) -> tuple[sitk.Image, sitk.Image]:
    """An image and its label: an ellipsoid fixed in physical space (mm, centred at the origin) sampled on the
    given grid; MRI-like (zero margin on the first axis) or CT-like (air -1000 HU around a body)."""
    size = [int(round(f / s)) for f, s in zip(FIELD_OF_VIEW_MM, spacing)]
    matrix = np.array(direction).reshape(3, 3)
    origin = -matrix @ (np.array(spacing) * (np.array(size) - 1) / 2)
    index = np.indices(size).reshape(3, -1).astype(float)
    points = (origin[:, None] + matrix @ (np.array(spacing)[:, None] * index)).reshape(3, *size)
    inside = ((points / np.array([13.0, 10.0, 14.0])[:, None, None, None]) ** 2).sum(0) < 1.0
    noise = rng.normal(0.0, 1.0, size).astype(np.float32)
    if ct:
        body = ((points[:2] / 19.0) ** 2).sum(0) < 1.0
        values = np.where(body, 20.0 + 15.0 * noise, -1000.0 + 5.0 * noise) + 60.0 * inside
    else:
        values = 100.0 + 120.0 * inside + 15.0 * noise
        values[:3] = 0.0  # an empty margin for the non-zero crop
    image = geometry.from_array(values.astype(np.float32), grid_image(size, spacing, origin, direction))
    label = geometry.from_array(inside.astype(np.uint8), grid_image(size, spacing, origin, direction))
    return image, label


def grid_image(size, spacing, origin, direction) -> sitk.Image:
    grid = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetOrigin([float(o) for o in origin])
    grid.SetDirection(direction)
    return grid


def write_raw_dataset(root, ct: bool = False, val: int = 2, unlabeled: int = 0, seed: int = 0):
    """A raw nifti-layout dataset over :data:`RAW_GRIDS` (train cases first, then ``val``, then unlabeled ones
    in ``unlabeled_images``); returns the root."""
    rng = np.random.default_rng(seed)
    groups = ["train"] * (len(RAW_GRIDS) - val - unlabeled) + ["val"] * val + ["unlabeled"] * unlabeled
    for index, ((spacing, direction), group) in enumerate(zip(RAW_GRIDS, groups)):
        image, label = raw_scan(spacing, direction, rng, ct)
        folder = "unlabeled_images" if group == "unlabeled" else f"{group}_images"
        (root / folder).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(root / folder / f"case_{index}.nii.gz"))
        if group != "unlabeled":
            (root / f"{group}_labels").mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(label, str(root / f"{group}_labels" / f"case_{index}.nii.gz"))
    return root
