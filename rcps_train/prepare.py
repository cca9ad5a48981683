"""``rcps-train prepare``: turn a raw dataset into the trainer's input, and the preparation ``predict`` repeats.

A raw dataset (``nifti`` or ``nnunet`` layout, scans in any format SimpleITK reads) is fingerprinted (spacings,
shapes, foreground intensities of the labeled training cases), a plan is derived from it (orientation, target
spacing, per-channel normalisation), and every case is reoriented, cropped to its non-zero region, resampled in
physical space and normalised, then written in the same layout as NIfTI. ``preprocessing.json`` at the prepared
root holds the plan, the fingerprint and each case's record; ``predict`` applies the plan to new scans and inverts it.

A run can be repeated: finished cases are kept (their records live in ``<out>/.prepare/``), so a killed run goes on
where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm.auto import tqdm

from . import geometry
from .deprecation import deprecated_names
from .files import write_text_atomic
from .layouts import DataError
from .raw_layouts import OUTPUT_FOLDERS, RawCase, discover_cases, read_dataset_json

PREPROCESSING_FILE = "preprocessing.json"
FORMAT_VERSION = 1
STATE_DIR = ".prepare"
# CT detection for --modality auto without channel names: air is about -1000 HU, so every CT scan has voxels far
# below zero, while MRI intensities are not negative.
CT_MINIMUM_BELOW = -500.0
# At most this many foreground voxels per case and channel enter the CT statistics (a fixed-seed sample beyond).
FOREGROUND_SAMPLES_PER_CASE = 2_000_000
# An axis whose median spacing exceeds this multiple of the others', with as many times fewer voxels, is
# "strongly anisotropic" (nnU-Net's rule and threshold).
ANISOTROPY_RATIO = 3.0
ANISOTROPIC_PERCENTILE = 10


def read_label(path: Path, grid: sitk.Image, scale: float = 1.0) -> sitk.Image:
    """A label file as an integer image on ``grid`` (checked to share it); values are multiplied by ``scale``."""
    (label,) = geometry.read_scan(path)
    if not geometry.same_grid(label, grid):
        raise DataError(
            f"label {path} does not share its image's grid (size {label.GetSize()} vs {grid.GetSize()}, spacing "
            f"{label.GetSpacing()} vs {grid.GetSpacing()}, origin {label.GetOrigin()} vs {grid.GetOrigin()})"
        )
    values = sitk.GetArrayViewFromImage(label) * scale
    if not np.array_equal(np.rint(values), values) or values.min() < 0:
        raise DataError(f"label {path} holds values {np.unique(values)[:10].tolist()}; expected integers >= 0")
    image = sitk.GetImageFromArray(np.rint(values).astype(np.uint8))
    image.CopyInformation(grid)
    return image


def fingerprint_case(case: RawCase, orientation: str | None, label_scale: float) -> dict:
    """What the plan needs of one labeled training case: spacing and shape (after reorientation), each channel's
    minimum and foreground voxels (a fixed-seed sample beyond :data:`FOREGROUND_SAMPLES_PER_CASE`), the top label."""
    channels = geometry.read_case_channels(list(case.images))
    label = read_label(case.label, channels[0], label_scale)
    if orientation:
        channels = [geometry.reorient(c, orientation) for c in channels]
        label = geometry.reorient(label, orientation)
    mask = geometry.to_array(label) > 0
    rng = np.random.default_rng(0)
    foreground = []
    for channel in channels:
        voxels = geometry.to_array(channel)[mask]
        if voxels.size > FOREGROUND_SAMPLES_PER_CASE:
            voxels = rng.choice(voxels, FOREGROUND_SAMPLES_PER_CASE, replace=False)
        foreground.append(voxels.astype(np.float32))
    return {
        "spacing": list(channels[0].GetSpacing()),
        "shape": list(channels[0].GetSize()),
        "minimum": [float(sitk.GetArrayViewFromImage(c).min()) for c in channels],
        "foreground": foreground,
        "max_label": int(sitk.GetArrayViewFromImage(label).max()),
    }


def choose_target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[list[float], str]:
    """The target spacing for ``--spacing auto`` and the rule that chose it.

    The median spacing per axis; but when one axis is strongly anisotropic (median spacing more than
    :data:`ANISOTROPY_RATIO` times the others' and that many times fewer voxels), its median would discard slices
    of the finer half of the cases, so that axis takes the :data:`ANISOTROPIC_PERCENTILE`-th percentile of its
    spacings instead, never finer than the coarsest other axis (nnU-Net's rule).
    """
    target = np.median(spacings, axis=0)
    median_shape = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [axis for axis in range(3) if axis != worst]
    anisotropic = target[worst] > ANISOTROPY_RATIO * target[others].max() and (
        median_shape[worst] * ANISOTROPY_RATIO < median_shape[others].min()
    )
    if not anisotropic:
        return target.tolist(), "median spacing of the labeled training cases"
    low = max(float(np.percentile(spacings[:, worst], ANISOTROPIC_PERCENTILE)), float(target[others].max()))
    target[worst] = low
    return target.tolist(), (
        f"median spacing, except the strongly anisotropic axis {worst}: {ANISOTROPIC_PERCENTILE}th percentile of "
        f"its spacings, at least the coarsest other axis"
    )


def channel_normalisation(modality: str, foreground: np.ndarray) -> dict:
    """The normalisation record of one channel: CT gets the training foreground's 0.5/99.5 percentiles (clip)
    and mean/std (z-score); MRI a z-score of each volume."""
    if modality == "mri":
        return {"modality": "mri", "scheme": "zscore"}
    if foreground.size == 0:
        raise DataError("CT normalisation needs foreground voxels, but the labeled training cases have none")
    low, high = np.percentile(foreground.astype(np.float64), [0.5, 99.5])
    return {
        "modality": "ct",
        "scheme": "ct",
        "clip": [float(low), float(high)],
        "mean": float(foreground.mean(dtype=np.float64)),
        "std": float(foreground.std(dtype=np.float64)),
    }


def resolve_modalities(modality: str, channel_names: list[str] | None, minima: np.ndarray) -> list[str]:
    """``ct`` or ``mri`` per channel: the flag, or for ``auto`` nnU-Net's channel name (``CT`` or not), or without
    names CT when every training scan goes below :data:`CT_MINIMUM_BELOW` (air in HU)."""
    count = minima.shape[1]
    if modality != "auto":
        return [modality] * count
    if channel_names:
        return ["ct" if name.strip().upper() == "CT" else "mri" for name in channel_names]
    return ["ct" if (minima[:, c] <= CT_MINIMUM_BELOW).all() else "mri" for c in range(count)]


def normalise(array: np.ndarray, spec: dict) -> np.ndarray:
    """Normalise one channel as its plan record says (float32)."""
    array = array.astype(np.float32)
    scheme = spec["scheme"]
    if scheme == "none":  # data prepared elsewhere: only the trainer's own z-score follows
        return array
    if scheme == "ct":
        low, high = spec["clip"]
        return ((np.clip(array, low, high) - spec["mean"]) / max(spec["std"], 1e-8)).astype(np.float32)
    if scheme == "zscore":
        return ((array - array.mean()) / max(float(array.std()), 1e-8)).astype(np.float32)
    if scheme == "upper-percentile-minmax":
        array = np.minimum(array, np.percentile(array, spec["percentile"]))
    elif scheme == "window-minmax":
        array = np.clip(array, *spec["window"])
    else:
        raise DataError(f"{PREPROCESSING_FILE}: unknown normalisation scheme {scheme!r}")
    low, high = float(array.min()), float(array.max())
    return ((array - low) / max(high - low, 1e-8)).astype(np.float32)


@dataclass
class PreparedImage:
    """A scan after the plan's steps: ``array`` ``(C, i, j, k)`` float32 on ``grid`` (a one-channel image whose
    geometry places the array in space) and the record of what was done (``nonzero_box`` in the reoriented scan's
    voxels)."""

    array: np.ndarray
    grid: sitk.Image
    record: dict


def apply_preparation(channels: list[sitk.Image], plan: dict) -> PreparedImage:
    """Reorient, crop to the non-zero region, resample and normalise one scan's channels as ``plan`` says.

    The label-based ROI crop of the recipes is not part of this (a new scan has no label): see
    :func:`prepare_case`.
    """
    if len(channels) != len(plan["channels"]):
        raise DataError(f"the scan has {len(channels)} channels; the preparation expects {len(plan['channels'])}")
    record = {
        "raw_shape": list(channels[0].GetSize()),
        "raw_spacing": list(channels[0].GetSpacing()),
        "raw_orientation": geometry.orientation_code(channels[0]),
    }
    if plan["orientation"]:
        channels = [geometry.reorient(c, plan["orientation"]) for c in channels]
    if plan["crop"] == "nonzero":
        box = geometry.nonzero_box([sitk.GetArrayViewFromImage(c).transpose(2, 1, 0) for c in channels])
        channels = [geometry.crop(c, box) for c in channels]
        record["nonzero_box"] = box
    if plan["target_spacing"]:
        channels = [
            geometry.resample_to_spacing(c, plan["target_spacing"], plan["image_interpolator"]) for c in channels
        ]
    array = np.stack([normalise(geometry.to_array(c), spec) for c, spec in zip(channels, plan["channels"])])
    record["prepared_shape"] = list(array.shape[1:])
    return PreparedImage(array, channels[0], record)


def prepare_label(label: sitk.Image, prepared: PreparedImage, plan: dict) -> np.ndarray:
    """The label map of a case on its prepared grid (the same reorientation and crop, then resampled onto the
    prepared image's grid without inventing classes)."""
    if plan["orientation"]:
        label = geometry.reorient(label, plan["orientation"])
    if "nonzero_box" in prepared.record:
        label = geometry.crop(label, prepared.record["nonzero_box"])
    if geometry.same_grid(label, prepared.grid):
        return geometry.to_array(label)
    return geometry.resample_label(label, prepared.grid, plan["num_classes"])


def _write_image(array: np.ndarray, grid: sitk.Image, path: Path, identity: bool) -> None:
    """Write ``(i, j, k)`` or ``(C, i, j, k)`` (a 4D file, channels last in nibabel's view) atomically."""
    if array.ndim == 4:
        image = sitk.JoinSeries([geometry.from_array(channel, grid) for channel in array])
    else:
        image = geometry.from_array(array, grid)
    if identity:  # an identity NIfTI affine: 1 mm voxels, RAS axes (ITK's LPS direction diag(-1, -1, 1))
        dims = image.GetDimension()
        image.SetSpacing([1.0] * dims)
        image.SetOrigin([0.0] * dims)
        direction = np.eye(dims)
        direction[0, 0] = direction[1, 1] = -1.0
        image.SetDirection(direction.ravel().tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name[: -len('.nii.gz')]}.partial.nii.gz")
    sitk.WriteImage(image, str(partial), useCompression=True)
    os.replace(partial, path)


def output_paths(case: RawCase, layout: str, out: Path, channels: int) -> tuple[list[Path], Path | None]:
    """Where a prepared case's image file(s) and label go (NIfTI in the input's layout)."""
    image_dir, label_dir = OUTPUT_FOLDERS[layout][case.group]
    if layout == "nifti":
        images = [out / image_dir / f"{case.name}.nii.gz"]
    else:
        images = [out / image_dir / f"{case.name}_{c:04d}.nii.gz" for c in range(channels)]
    label = out / label_dir / f"{case.name}.nii.gz" if label_dir and case.label else None
    return images, label


def prepare_case(case: RawCase, plan: dict, out: str) -> dict:
    """Prepare one case and write it; returns its record (also written to the state folder, which marks it done)."""
    out = Path(out)
    channels = geometry.read_case_channels(list(case.images))
    prepared = apply_preparation(channels, plan)
    array, grid, label_array = prepared.array, prepared.grid, None
    if case.label is not None:
        label_array = prepare_label(read_label(case.label, channels[0], plan["label_scale"]), prepared, plan)
        if label_array.max() >= plan["num_classes"]:
            raise DataError(f"label {case.label} has class {label_array.max()}; expected < {plan['num_classes']}")
    roi = plan.get("label_roi")
    if roi and label_array is not None:
        from .recipes import label_roi_box

        box = label_roi_box(label_array, roi["min_size"], roi["margin"])
        window = tuple(slice(start, stop) for start, stop in box)
        array, label_array, grid = array[(slice(None),) + window], label_array[window], geometry.crop(grid, box)
        prepared.record["label_roi_box"] = box
    image_paths, label_path = output_paths(case, plan["layout"], out, array.shape[0])
    identity = plan["geometry"] == "identity"
    if len(image_paths) == 1:
        _write_image(array if array.shape[0] > 1 else array[0], grid, image_paths[0], identity)
    else:
        for channel, path in zip(array, image_paths):
            _write_image(channel, grid, path, identity)
    if label_path is not None:
        _write_image(label_array.astype(np.uint8), grid, label_path, identity)
    record = {
        **prepared.record,
        "group": case.group,
        "sources": [str(p) for p in case.images] + ([str(case.label)] if case.label else []),
        "prepared_shape": list(array.shape[1:]),
        "prepared_spacing": list(grid.GetSpacing()) if not identity else [1.0, 1.0, 1.0],
    }
    _write_json_atomic(record, _record_path(out, case))
    return record


def _record_path(out: Path, case: RawCase) -> Path:
    return out / STATE_DIR / "cases" / f"{case.group}__{case.name}.json"


def _write_json_atomic(payload: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(payload, indent=2))


def read_preprocessing(root: str | Path) -> dict | None:
    """The ``preprocessing.json`` of a prepared data root, or None when it has none (data prepared elsewhere).

    Raises:
        DataError: naming the file when it exists but is not a preparation record.
    """
    path = Path(root) / PREPROCESSING_FILE
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path}: {type(err).__name__}: {err}") from None
    missing = [k for k in ("format_version", "plan") if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise DataError(f"{path} lacks {missing}; it was not written by rcps-train prepare")
    return payload


def _set_single_thread() -> None:
    """Pool workers: one ITK thread each, so N workers do not start N x cores threads."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def process_pool(workers: int):
    """A pool of ``workers`` processes for :func:`run_cases`, or a stand-in for none (``workers`` <= 1: in this
    process). Spawned, not forked: ITK's thread pool does not survive a fork."""
    if workers <= 1:
        return contextlib.nullcontext()
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_set_single_thread)


def run_cases(func, cases: list[RawCase], args: tuple, pool, desc: str, progress: bool):
    """Yield ``(case, result, error)`` for ``func(case, *args)`` over ``cases`` in ``pool`` (None: in this process),
    with a progress bar. A case's DataError is yielded, not raised, so the others still run."""
    bar = tqdm(total=len(cases), desc=desc, disable=not progress, unit="case")
    if pool is None:
        for case in cases:
            try:
                yield case, func(case, *args), None
            except DataError as err:
                yield case, None, err
            bar.update()
    else:
        futures = {pool.submit(func, case, *args): case for case in cases}
        for future in as_completed(futures):
            error = future.exception()
            if error is not None and not isinstance(error, DataError):
                raise error
            yield futures[future], None if error else future.result(), error
            bar.update()
    bar.close()


def _fingerprint_summary(stats: list[dict]) -> tuple[dict, list[np.ndarray]]:
    channels = len(stats[0]["foreground"])
    foreground = [np.concatenate([s["foreground"][c] for s in stats]) for c in range(channels)]
    summary = {
        "cases": len(stats),
        "spacings": [s["spacing"] for s in stats],
        "shapes": [s["shape"] for s in stats],
        "median_spacing": np.median([s["spacing"] for s in stats], axis=0).tolist(),
        "median_shape": np.median([s["shape"] for s in stats], axis=0).tolist(),
        "foreground_intensities": [
            {
                "voxels": int(fg.size),
                **dict(zip(("p00_5", "p50", "p99_5"), np.percentile(fg, [0.5, 50, 99.5]).tolist() if fg.size else [])),
            }
            for fg in foreground
        ],
    }
    return summary, foreground


def make_plan(cases: list[RawCase], options: dict, pool, progress: bool) -> tuple[dict, dict]:
    """Fingerprint the labeled training cases and derive the plan: ``(plan, fingerprint)``."""
    train = [case for case in cases if case.group == "train"]
    stats, failures = [], []
    for case, result, error in run_cases(
        fingerprint_case, train, (geometry.CANONICAL_ORIENTATION, 1.0), pool, "fingerprint", progress
    ):
        stats.append(result) if error is None else failures.append(f"{case.name}: {error}")
    if failures:
        raise DataError(f"cannot fingerprint {len(failures)} training cases: " + "; ".join(failures[:5]))
    fingerprint, foreground = _fingerprint_summary(stats)
    channel_names = None
    num_classes = max(s["max_label"] for s in stats) + 1
    if options["layout"] == "nnunet":
        meta = read_dataset_json(Path(options["input"]))
        channel_names = [meta["channel_names"][key] for key in sorted(meta["channel_names"], key=int)]
        num_classes = max(num_classes, len(meta["labels"]))
    modalities = resolve_modalities(options["modality"], channel_names, np.array([s["minimum"] for s in stats]))
    if options["spacing"] == "auto":
        target, rule = choose_target_spacing(np.array(fingerprint["spacings"]), np.array(fingerprint["shapes"]))
    else:
        target, rule = [float(v) for v in options["spacing"]], "given by --spacing"
    plan = {
        "layout": options["layout"],
        "recipe": None,
        "orientation": geometry.CANONICAL_ORIENTATION,
        "crop": "nonzero",
        "target_spacing": target,
        "spacing_rule": rule,
        "image_interpolator": "bspline",
        "label_interpolator": "linear per class, then argmax",
        "channels": [channel_normalisation(m, fg) for m, fg in zip(modalities, foreground)],
        "num_classes": num_classes,
        "label_scale": 1.0,
        "geometry": "physical",
        "label_roi": None,
    }
    return plan, fingerprint


def _load_or_make_plan(cases: list[RawCase], options: dict, out: Path, pool, progress: bool):
    """The saved plan of an earlier run into ``out`` (same options), or a new one."""
    path = out / STATE_DIR / "plan.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["options"] != options:
            changed = sorted(k for k in options if saved["options"].get(k) != options[k])
            raise DataError(
                f"{out} holds a preparation made with other options ({', '.join(changed)}); "
                f"choose another --out or remove {out}"
            )
        return saved["plan"], saved["fingerprint"]
    if options["recipe"]:
        from .recipes import recipe_plan

        plan, fingerprint = recipe_plan(options["recipe"]), {"cases": sum(c.group == "train" for c in cases)}
    else:
        plan, fingerprint = make_plan(cases, options, pool, progress)
    _write_json_atomic({"options": options, "plan": plan, "fingerprint": fingerprint}, path)
    return plan, fingerprint


def run_prepare(
    input_root: str | Path,
    out: str | Path,
    layout: str = "nifti",
    modality: str = "auto",
    spacing="auto",
    recipe: str | None = None,
    unlabeled: str | Path | None = None,
    split_csv: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Prepare a raw dataset into ``out`` and write ``preprocessing.json`` (see the module docstring).

    Args:
        input_root: the raw dataset (``nifti`` or ``nnunet`` layout; a recipe's source folder with ``recipe``).
        out: the prepared root (created; a re-run keeps its finished cases).
        layout: ``nifti`` or ``nnunet`` (input and output).
        modality: ``ct``, ``mri`` or ``auto`` (per channel, see :func:`resolve_modalities`).
        spacing: ``"auto"`` or 3 floats (mm along the reoriented axes).
        recipe: ``la2018`` or ``pancreas-nih`` for the official RCPS preparation (``layout`` must be ``nifti``).
        unlabeled: a folder of images without labels to carry over.
        split_csv: recipes only: a CSV of ``filename,split`` (the official ``data/la.csv``, ``data/pancreas.csv``).
        workers: processes.
        progress: show progress bars.

    Returns:
        The content of ``preprocessing.json``.

    Raises:
        DataError: naming the file or option at fault; cases that fail are listed after the others are written.
    """
    input_root, out = Path(input_root), Path(out)
    if spacing != "auto" and (len(spacing) != 3 or not all(float(v) > 0 for v in spacing)):
        raise DataError(f"--spacing must be 'auto' or 3 positive numbers, got {spacing}")
    if recipe:
        from .recipes import recipe_cases

        if layout != "nifti":
            raise DataError(f"--recipe {recipe} writes the official RCPS nifti layout; drop --format {layout}")
        cases = recipe_cases(recipe, input_root, Path(split_csv) if split_csv else None)
    else:
        cases = discover_cases(input_root, layout, Path(unlabeled) if unlabeled else None)
    options = {
        "input": str(input_root.resolve()),
        "layout": layout,
        "modality": modality,
        "spacing": spacing if spacing == "auto" else [float(v) for v in spacing],
        "recipe": recipe,
        "unlabeled": str(Path(unlabeled).resolve()) if unlabeled else None,
    }
    with process_pool(workers) as pool:
        plan, fingerprint = _load_or_make_plan(cases, options, out, pool, progress)
        todo = [case for case in cases if not _record_path(out, case).exists()]
        failures = [
            f"{case.group}/{case.name}: {error}"
            for case, _, error in run_cases(prepare_case, todo, (plan, str(out)), pool, "prepare", progress)
            if error is not None
        ]
    if failures:
        raise DataError(f"{len(failures)} of {len(cases)} cases failed (re-run to retry): " + "; ".join(failures))
    return _write_summary(cases, options, plan, fingerprint, out)


def _write_summary(cases: list[RawCase], options: dict, plan: dict, fingerprint: dict, out: Path) -> dict:
    """``preprocessing.json`` (and, for nnunet, the prepared ``dataset.json``) from the plan and the case records."""
    records = {f"{case.group}/{case.name}": json.loads(_record_path(out, case).read_text()) for case in cases}
    payload = {
        "format_version": FORMAT_VERSION,
        "options": options,
        "plan": plan,
        "fingerprint": fingerprint,
        "cases": records,
    }
    if plan["layout"] == "nnunet":
        meta = read_dataset_json(Path(options["input"]))
        meta.update(file_ending=".nii.gz", numTraining=sum(case.group == "train" for case in cases))
        _write_json_atomic(meta, out / "dataset.json")
    _write_json_atomic(payload, out / PREPROCESSING_FILE)
    return payload


__getattr__ = deprecated_names(
    __name__,
    {"normalize": "rcps_train.prepare.normalise", "channel_normalization": "rcps_train.prepare.channel_normalisation"},
)
