"""Sliding-window inference under a named protocol, post-processing, and the scoring of a model on a set of cases."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm.auto import tqdm

from .data import case_spacing, load_case
from .files import write_csv_atomic, write_text_atomic
from .layouts import Case, DataError
from .metrics import METRICS, case_metrics, summarize
from .model import segmenter


@dataclass(frozen=True)
class Protocol:
    """How a volume is predicted for scoring (the named presets are in :data:`PROTOCOLS`).

    Attributes:
        window: the sliding window; None: the training patch (``data.patch_size``).
        stride: the step between windows per axis; None: ``window * (1 - eval.overlap)``.
        blending: ``"gaussian"`` (Gaussian-weighted mean of the logits) or ``"mean"`` (plain mean of the softmax
            probabilities).
        largest_component: keep only the largest connected component of each foreground class by default.
    """

    window: tuple[int, int, int] | None
    stride: tuple[int, int, int] | None
    blending: str
    largest_component: bool


PROTOCOLS = {
    # The trainer's own (RCPS): the training patch as window, 7/8 overlap (eval.overlap), Gaussian blending.
    "rcps": Protocol(None, None, "gaussian", False),
    # UA-MT / MC-Net / BCP on LA: window 112x112x80, stride 18 in-plane and 4 through-plane, averaged softmax,
    # largest connected component kept.
    "ssl-la": Protocol((112, 112, 80), (18, 18, 4), "mean", True),
    # The same codebases on Pancreas-CT: window 96^3, stride 16, averaged softmax.
    "ssl-pancreas": Protocol((96, 96, 96), (16, 16, 16), "mean", False),
}


def eval_settings(config: dict) -> tuple[tuple[int, ...], tuple[int, ...], str, bool]:
    """Window, stride, blending and largest-component flag of the configured ``eval.protocol``."""
    eval_cfg = config["eval"]
    protocol = PROTOCOLS[eval_cfg["protocol"]]
    window = tuple(protocol.window or config["data"]["patch_size"])
    stride = protocol.stride or tuple(max(int(n * (1.0 - eval_cfg["overlap"])), 1) for n in window)
    keep = {"auto": protocol.largest_component, "on": True, "off": False}[eval_cfg["largest_component"]]
    return window, tuple(stride), protocol.blending, keep


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window starts along one axis of a volume at least ``window`` long.

    As UA-MT's ``test_single_case`` (and the codebases built on it) computes them: ``ceil((size - window) /
    stride) + 1`` windows at ``min(stride * i, size - window)``, so the last one is flush with the end.
    """
    steps = math.ceil((size - window) / stride) + 1
    return [min(stride * i, size - window) for i in range(steps)]


def gaussian_importance(roi, sigma_scale: float, device=None) -> torch.Tensor:
    """A separable Gaussian window ``(*roi)`` peaking at 1 in the centre, sigma = ``sigma_scale * roi``."""
    window = torch.ones((), device=device)
    for n in roi:
        x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        g = torch.exp(-0.5 * (x / max(sigma_scale * n, 1e-6)) ** 2)
        window = window[..., None] * g
    # The far corners get tiny weights; a floor keeps every voxel's total weight clearly positive.
    return window.clamp_min(1e-3)


@torch.no_grad()
def sliding_window_inference(
    predict,
    image: torch.Tensor,
    roi,
    stride,
    blending: str = "gaussian",
    sw_batch_size: int = 4,
    sigma_scale: float = 0.125,
) -> torch.Tensor:
    """Blend the predictions of overlapping ``roi`` windows over a whole volume.

    Axes shorter than the window are zero-padded (split evenly, the extra voxel after) and cropped back, as
    in UA-MT's ``test_single_case``.

    Args:
        predict: ``(N, C_in, *roi) -> (N, K, *roi)`` logits.
        image: ``(1, C_in, D, H, W)``.
        roi: the window.
        stride: the step between window starts per axis (see :func:`window_starts`).
        blending: ``"gaussian"``: Gaussian-weighted mean of the logits; ``"mean"``: plain mean of the softmax.
        sw_batch_size: windows per forward.
        sigma_scale: ``"gaussian"`` only, sigma per axis as a fraction of the window.

    Returns:
        Scores ``(1, K, D, H, W)`` float32 (logits or probabilities); their argmax over K is the prediction.
    """
    spatial = image.shape[2:]
    pad = [max(r - s, 0) for s, r in zip(spatial, roi)]
    if any(pad):
        pad_arg = [p for axis in reversed(pad) for p in (axis // 2, axis - axis // 2)]
        image = F.pad(image, pad_arg)
    padded = image.shape[2:]
    corners = list(itertools.product(*[window_starts(s, r, t) for s, r, t in zip(padded, roi, stride)]))
    weight = (
        gaussian_importance(roi, sigma_scale, image.device)
        if blending == "gaussian"
        else torch.ones(tuple(roi), device=image.device)
    )
    total, norm = None, torch.zeros(padded, device=image.device)
    for first in range(0, len(corners), sw_batch_size):
        batch = corners[first : first + sw_batch_size]
        windows = [tuple(slice(c, c + r) for c, r in zip(corner, roi)) for corner in batch]
        scores = predict(torch.cat([image[(0, slice(None)) + w][None] for w in windows])).float()
        if blending == "mean":
            scores = scores.softmax(1)
        if total is None:
            total = torch.zeros((scores.shape[1], *padded), device=image.device)
        for window, window_scores in zip(windows, scores):
            total[(slice(None),) + window] += window_scores * weight
            norm[window] += weight
    total = total / norm
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial))
    return total[(slice(None),) + crop][None]


def keep_largest_component(label_map: np.ndarray, num_classes: int) -> np.ndarray:
    """Keep the largest connected component of each foreground class; other voxels of it become background.

    Components are 26-connected (voxels touching by a face, an edge or a corner), as ``skimage.measure.label``
    with its default full connectivity, which the UA-MT/MC-Net ``getLargestCC`` uses. Ties go to the
    component met first in C order, as there.
    """
    out = label_map.copy()
    structure = np.ones((3,) * label_map.ndim, dtype=bool)
    for c in range(1, num_classes):
        components, count = ndimage.label(label_map == c, structure=structure)
        if count > 1:
            largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
            out[(components > 0) & (components != largest)] = 0
    return out


def distance_unit(cases: list[Case], spacings: list) -> str:
    """``"mm"`` when every case has a voxel spacing, ``"voxel"`` when none has; a mixture is an error."""
    missing = [case.name for case, spacing in zip(cases, spacings) if spacing is None]
    if missing and len(missing) < len(cases):
        raise DataError(
            f"cases {missing[:5]} have no voxel spacing while others have one: distances would mix voxels and mm"
        )
    return "voxel" if missing else "mm"


def evaluate_cases(
    model: torch.nn.Module,
    cases: list[Case],
    config: dict,
    device: torch.device,
    progress: bool = True,
    on_prediction: Callable | None = None,
) -> tuple[list[dict], dict]:
    """Predict every case under ``eval.protocol`` and compute per-case, per-class metrics.

    Args:
        model: a ProjectorUNet; each image must have its ``in_channels``.
        cases: labeled cases.
        config: the run config (``eval``, ``data.num_classes``, ``model.channels_last``).
        device: where to predict.
        progress: a progress bar over cases.
        on_prediction: called as ``on_prediction(case, image, label, prediction)`` with the normalised image
            ``(C, D, H, W)``, the label and the post-processed prediction ``(D, H, W)`` of every case.

    Returns:
        ``rows`` (one per case and foreground class) and the summary: the means, the undefined-distance count,
        ``distance_unit`` (``"mm"`` from each case's voxel spacing, else ``"voxel"``), the protocol's name and
        whether the largest-component filter ran.
    """
    window, stride, blending, keep_largest = eval_settings(config)
    spacings = [case_spacing(case) for case in cases]
    unit = distance_unit(cases, spacings)
    was_training = model.training
    model.eval()
    rows = []
    eval_cfg, num_classes = config["eval"], config["data"]["num_classes"]
    segment = segmenter(model, config)
    for case, spacing in tqdm(list(zip(cases, spacings)), desc="eval", disable=not progress, leave=False):
        image, label = load_case(case, num_classes, model.in_channels)
        volume = torch.from_numpy(image)[None].to(device)
        scores = sliding_window_inference(
            segment,
            volume,
            window,
            stride,
            blending,
            eval_cfg["sw_batch_size"],
            eval_cfg["sigma_scale"],
        )
        pred = scores.argmax(1)[0].cpu().numpy()
        if keep_largest:
            pred = keep_largest_component(pred, num_classes)
        if on_prediction is not None:
            on_prediction(case, image, label, pred)
        rows += [{"case": case.name, **row} for row in case_metrics(pred, label, num_classes, spacing)]
    model.train(was_training)
    summary = {
        **summarize(rows),
        "distance_unit": unit,
        "protocol": eval_cfg["protocol"],
        "largest_component": keep_largest,
    }
    return rows, summary


def metrics_record(rows: list[dict], summary: dict) -> dict:
    """The summary and the per-case rows as ``metrics.json`` holds them (NaN as null: JSON has no NaN)."""

    def clean(value):
        return None if isinstance(value, float) and math.isnan(value) else value

    record = {key: clean(value) for key, value in summary.items()}
    record["per_case"] = [{k: clean(v) for k, v in row.items()} for row in rows]
    return record


def write_metrics_csv(rows: list[dict], path: str | Path) -> None:
    """One row per case and foreground class (written atomically)."""
    write_csv_atomic(Path(path), ["case", "class", *METRICS, "empty"], rows)


def write_metrics(rows: list[dict], summary: dict, out_dir: str | Path, scored: dict) -> None:
    """``metrics.csv`` (one row per case and foreground class) and ``metrics.json`` (``scored``: what was scored,
    then the summary and per_case), both written atomically."""
    out_dir = Path(out_dir)
    write_metrics_csv(rows, out_dir / "metrics.csv")
    write_text_atomic(out_dir / "metrics.json", json.dumps({**scored, **metrics_record(rows, summary)}, indent=2))


def format_table(rows: list[dict], summary: dict) -> str:
    """A plain-text table of per-case metrics and their means (distances in ``summary["distance_unit"]``)."""
    unit = summary["distance_unit"]
    lines = [f"{'case':<16}{'class':>6}{'Dice':>9}{'Jaccard':>9}{'HD95':>9}{'ASD':>9}  note (distances in {unit})"]

    def cells(r):
        return f"{r['dice']:>9.4f}{r['jaccard']:>9.4f}{r['hd95']:>9.2f}{r['asd']:>9.2f}"

    lines += [f"{row['case']:<16}{row['class']:>6}{cells(row)}  {row['empty']}" for row in rows]
    lines.append(
        f"{'mean':<16}{'':>6}{cells(summary)}"
        + (
            f"  ({summary['num_undefined_distances']} undefined distances skipped)"
            if summary["num_undefined_distances"]
            else ""
        )
    )
    return "\n".join(lines)
