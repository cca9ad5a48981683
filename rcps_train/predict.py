"""``rcps-train predict``: segment raw scans with one or more checkpoints.

Each case is prepared as its training data was (the plan of ``preprocessing.json`` stored in the checkpoint:
reorientation, non-zero crop, resampling, normalisation, then the trainer's per-channel z-score), predicted with the
sliding window of the evaluation protocol, the softmax averaged over the checkpoints and (``--tta``) the 8 axis
flips, the preparation inverted (the probabilities resampled in physical space onto the input's grid; outside the
crop is background), the protocol's largest-component rule applied, and a ``uint8`` label map written on the
input's exact grid. A NIfTI input's header (affine, qform and sform with their codes) is kept as it was.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from tqdm.auto import tqdm

from . import geometry
from .checkpoint import load_trained_model
from .config import ConfigError
from .data import normalise_image
from .evaluate import eval_settings, keep_largest_component, sliding_window_inference
from .layouts import DataError
from .model import segmenter
from .prepare import apply_preparation, read_preprocessing
from .raw_layouts import RAW_SUFFIXES

# nnU-Net's channel files: <case>_0000.nii.gz, <case>_0001.nii.gz, ... form one case.
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class InputCase:
    """One case to predict: its name (the output is ``<name>.nii.gz``) and its channel files in order."""

    name: str
    files: tuple[Path, ...]


@dataclass
class LoadedModel:
    """A checkpoint ready to predict: the model (eval mode, on its device), its resolved config and its plan."""

    path: Path
    model: torch.nn.Module
    config: dict
    plan: dict


def _scan_name(path: Path) -> str | None:
    return next((path.name[: -len(s)] for s in RAW_SUFFIXES if path.name.endswith(s)), None)


def collect_inputs(inputs: list[str | Path]) -> list[InputCase]:
    """The cases named by ``--input`` (files and folders of scans); ``<case>_0000``, ``<case>_0001``, ... files are
    the channels of one case when a ``_0000`` file exists, any other file is a case of its own.

    Raises:
        DataError: naming an input that does not exist or a folder without scans, before any prediction.
    """
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and _scan_name(p) is not None)
            if not found:
                raise DataError(f"--input folder {item} holds no scans ({', '.join(RAW_SUFFIXES)})")
            files += found
        elif item.exists():
            files.append(item)
        else:
            raise DataError(f"--input {item} does not exist")
    stems = {path: _scan_name(path) or path.name for path in files}
    groups: dict[str, list[tuple[int, Path]]] = {}
    for path, stem in stems.items():
        match = CHANNEL_FILE.match(stem)
        first = match and any(other == f"{match['case']}_0000" for other in stems.values())
        name, channel = (match["case"], int(match["channel"])) if first else (stem, 0)
        groups.setdefault(name, []).append((channel, path))
    return [InputCase(name, tuple(p for _, p in sorted(members))) for name, members in sorted(groups.items())]


def checkpoint_plan(state: dict, path: Path, channels: int) -> dict:
    """The preparation plan a checkpoint was trained with: its ``preprocessing`` entry, else the
    ``preprocessing.json`` of its data root, else (with a warning) a plan that uses the scan as it is."""
    record = state.get("preprocessing") or read_preprocessing(state["config"]["data"]["root"])
    if record is not None:
        return record["plan"]
    print(
        f"rcps-train predict: {path} carries no preparation (its data was not written by rcps-train prepare); "
        f"scans are used on their own grid with only the trainer's z-score"
    )
    return {"orientation": None, "crop": None, "target_spacing": None, "channels": [{"scheme": "none"}] * channels}


def load_models(paths: list[str | Path], protocol: str | None, device: torch.device) -> list[LoadedModel]:
    """Load every checkpoint of the ensemble and check that they agree on preparation, classes and channels."""
    models = []
    for path in map(Path, paths):
        model, config, state = load_trained_model(path, [f'eval.protocol="{protocol}"'] if protocol else [])
        model.to(device).eval()
        models.append(LoadedModel(path, model, config, checkpoint_plan(state, path, model.in_channels)))
    first = models[0]
    for other in models[1:]:
        if other.plan != first.plan:
            raise ConfigError(f"checkpoints {first.path} and {other.path} were trained on differently prepared data")
        if other.config["data"]["num_classes"] != first.config["data"]["num_classes"]:
            raise ConfigError(f"checkpoints {first.path} and {other.path} predict different numbers of classes")
    return models


@torch.no_grad()
def predict_probabilities(models: list[LoadedModel], image: np.ndarray, device: torch.device, tta: bool) -> np.ndarray:
    """The softmax ``(K, i, j, k)`` of a prepared, normalised image, averaged over the models and (``tta``) the
    8 flips of the spatial axes; fp16 autocast on CUDA."""
    volume = torch.from_numpy(image)[None].to(device)
    flips = [axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)] if tta else [()]
    total = None
    for loaded in models:
        window, stride, blending, _ = eval_settings(loaded.config)
        eval_cfg = loaded.config["eval"]
        segment = segmenter(loaded.model, loaded.config)
        for axes in flips:
            flipped = volume.flip(axes) if axes else volume
            with torch.autocast("cuda", torch.float16, enabled=device.type == "cuda"):
                scores = sliding_window_inference(
                    segment,
                    flipped,
                    window,
                    stride,
                    blending,
                    eval_cfg["sw_batch_size"],
                    eval_cfg["sigma_scale"],
                )
            probabilities = scores.float() if blending == "mean" else scores.float().softmax(1)
            probabilities = probabilities.flip(axes) if axes else probabilities
            total = probabilities if total is None else total + probabilities
    return (total[0] / (len(models) * len(flips))).cpu().numpy()


def _partial(path: Path) -> Path:
    """A sibling name for a file being written (renamed over ``path`` once complete); keeps the NIfTI suffix."""
    return path.with_name(f".{path.name[: -len('.nii.gz')]}.partial.nii.gz")


def write_like_input(array: np.ndarray, source: Path, reference: sitk.Image, path: Path) -> None:
    """Write ``array`` (``(i, j, k)`` or ``(i, j, k, K)``) on the grid of ``source`` to ``path`` atomically.

    A NIfTI source lends its own header (affine, qform/sform and their codes, units); other formats get the
    geometry SimpleITK read (``reference``) in a NIfTI file.
    """
    partial = _partial(path)
    if _scan_name(source) is not None and source.name.endswith((".nii", ".nii.gz")):
        header = nib.load(source).header.copy()
        header.set_data_dtype(array.dtype)
        header.set_slope_inter(1.0, 0.0)
        # No affine argument: the header's qform and sform (and their codes) are taken as they are.
        nib.save(nib.Nifti1Image(array, None, header=header), partial)
    else:
        channels = [array] if array.ndim == 3 else [array[..., k] for k in range(array.shape[-1])]
        images = [geometry.from_array(channel, reference) for channel in channels]
        sitk.WriteImage(images[0] if array.ndim == 3 else sitk.JoinSeries(images), str(partial), useCompression=True)
    os.replace(partial, path)


def predict_case(
    case: InputCase, models: list[LoadedModel], device: torch.device, tta: bool
) -> tuple[np.ndarray, np.ndarray, sitk.Image]:
    """Prepare, predict and invert one case.

    Returns:
        The label map (uint8 ``(i, j, k)`` on the input's grid), the probabilities ``(K, i, j, k)`` on that grid and
        the input's first channel (its geometry).

    Raises:
        DataError: naming the file for an unreadable scan, a wrong channel count, a 2D scan or NaN values.
    """
    channels = geometry.read_case_channels(list(case.files))
    plan = models[0].plan
    if len(channels) != len(plan["channels"]):
        raise DataError(
            f"{', '.join(map(str, case.files))}: {len(channels)} channels, but the model takes {len(plan['channels'])}"
        )
    prepared = apply_preparation(channels, plan)
    probabilities = predict_probabilities(models, normalise_image(prepared.array), device, tta)
    if not geometry.same_grid(prepared.grid, channels[0]):
        probabilities = geometry.resample_scores(probabilities, prepared.grid, channels[0])
    label = probabilities.argmax(0).astype(np.uint8)
    _, _, _, keep_largest = eval_settings(models[0].config)
    if keep_largest:
        label = keep_largest_component(label, probabilities.shape[0]).astype(np.uint8)
    return label, probabilities, channels[0]


def run_predict(
    checkpoints: list[str | Path],
    inputs: list[str | Path],
    out: str | Path,
    protocol: str | None = None,
    tta: bool = False,
    probabilities: bool = False,
    skip_existing: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Predict every input case and write ``<out>/<case>.nii.gz`` (and ``<case>_probabilities.nii.gz``: float32,
    4D ``(i, j, k, K)``, the per-class softmax on the input's grid).

    Returns:
        ``{"written": [...], "skipped": [...], "failed": {case: message}}``; a failed case does not stop the others.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    torch_device = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    cases = collect_inputs(inputs)
    models = load_models(checkpoints, protocol, torch_device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"written": [], "skipped": [], "failed": {}}
    for case in tqdm(cases, desc="predict", unit="case", disable=not progress):
        targets = [out / f"{case.name}.nii.gz"] + ([out / f"{case.name}_probabilities.nii.gz"] if probabilities else [])
        if skip_existing and all(path.exists() for path in targets):
            summary["skipped"].append(case.name)
            continue
        try:
            label, scores, grid = predict_case(case, models, torch_device, tta)
            if probabilities:
                write_like_input(np.ascontiguousarray(scores.transpose(1, 2, 3, 0)), case.files[0], grid, targets[1])
            write_like_input(label, case.files[0], grid, targets[0])
        except DataError as err:
            summary["failed"][case.name] = str(err)
            continue
        except (RuntimeError, OSError) as err:  # out of memory, a full disk: this case only
            summary["failed"][case.name] = f"{', '.join(map(str, case.files))}: {type(err).__name__}: {err}"
            continue
        summary["written"].append(case.name)
    return summary
