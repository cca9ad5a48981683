"""Sliding-window inference with Gaussian blending, and the evaluation of a model on a set of cases."""
from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import Case, load_case
from .metrics import case_metrics, summarize


def _starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one axis: stride ``roi * (1 - overlap)``, the last window flush with the end."""
    if size <= roi:
        return [0]
    stride = max(int(roi * (1.0 - overlap)), 1)
    starts = list(range(0, size - roi + 1, stride))
    if starts[-1] != size - roi:
        starts.append(size - roi)
    return starts


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
def sliding_window_logits(predict, image: torch.Tensor, roi, overlap: float = 0.875, sw_batch_size: int = 4,
                          sigma_scale: float = 0.125) -> torch.Tensor:
    """Blend the logits of overlapping ``roi`` windows over a whole volume.

    Args:
        predict: ``(N, C_in, *roi) -> (N, K, *roi)`` logits.
        image: ``(1, C_in, D, H, W)``; axes shorter than the ROI are zero-padded (then cropped back).
        roi: the window, normally the training patch.
        overlap: fraction of a window shared with the next one (7/8 in RCPS).
        sw_batch_size: windows per forward.
        sigma_scale: Gaussian sigma per axis as a fraction of the ROI.

    Returns:
        Logits ``(1, K, D, H, W)``, float32.
    """
    spatial = image.shape[2:]
    pad = [max(r - s, 0) for s, r in zip(spatial, roi)]
    if any(pad):
        pad_arg = [p for axis in reversed(pad) for p in (axis // 2, axis - axis // 2)]
        image = F.pad(image, pad_arg)
    padded = image.shape[2:]
    corners = list(itertools.product(*[_starts(s, r, overlap) for s, r in zip(padded, roi)]))
    weight = gaussian_importance(roi, sigma_scale, image.device)
    total, norm = None, torch.zeros(padded, device=image.device)
    for first in range(0, len(corners), sw_batch_size):
        batch = corners[first:first + sw_batch_size]
        windows = [tuple(slice(c, c + r) for c, r in zip(corner, roi)) for corner in batch]
        logits = predict(torch.cat([image[(0, slice(None)) + w][None] for w in windows])).float()
        if total is None:
            total = torch.zeros((logits.shape[1], *padded), device=image.device)
        for window, window_logits in zip(windows, logits):
            total[(slice(None),) + window] += window_logits * weight
            norm[window] += weight
    total = total / norm
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial))
    return total[(slice(None),) + crop][None]


def evaluate_cases(model: torch.nn.Module, cases: list[Case], config: dict, device: torch.device,
                   progress: bool = True) -> tuple[list[dict], dict]:
    """Predict every case (sliding window, argmax) and compute per-case, per-class metrics.

    Returns:
        ``rows`` (one per case and foreground class) and the summary (means, undefined count).
    """
    was_training = model.training
    model.eval()
    rows = []
    eval_cfg, num_classes = config["eval"], config["data"]["num_classes"]
    layout = torch.channels_last_3d if config["model"]["channels_last"] else torch.contiguous_format
    for case in tqdm(cases, desc="eval", disable=not progress, leave=False):
        image, label = load_case(case, num_classes)
        volume = torch.from_numpy(image)[None, None].to(device)
        logits = sliding_window_logits(lambda x: model.segment(x.contiguous(memory_format=layout)), volume,
                                       config["data"]["patch_size"], eval_cfg["overlap"], eval_cfg["sw_batch_size"],
                                       eval_cfg["sigma_scale"])
        pred = logits.argmax(1)[0].cpu().numpy()
        rows += [{"case": case.name, **row} for row in case_metrics(pred, label, num_classes)]
    model.train(was_training)
    return rows, summarize(rows)


def write_metrics(rows: list[dict], summary: dict, out_dir: str | Path) -> None:
    """``metrics.csv`` (one row per case and foreground class) and ``metrics.json`` (means + per_case)."""
    out_dir = Path(out_dir)
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "class", "dice", "hd95", "asd", "empty"])
        writer.writeheader()
        writer.writerows(rows)
    clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # JSON has no nan
    payload = {key: clean(value) for key, value in summary.items()}
    payload["per_case"] = [{k: clean(v) for k, v in row.items()} for row in rows]
    (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2))


def format_table(rows: list[dict], summary: dict) -> str:
    """A plain-text table of per-case metrics and their means."""
    lines = [f"{'case':<16}{'class':>6}{'Dice':>9}{'HD95':>9}{'ASD':>9}  note"]
    for row in rows:
        lines.append(f"{row['case']:<16}{row['class']:>6}{row['dice']:>9.4f}{row['hd95']:>9.2f}"
                     f"{row['asd']:>9.2f}  {row['empty']}")
    lines.append(f"{'mean':<16}{'':>6}{summary['dice']:>9.4f}{summary['hd95']:>9.2f}{summary['asd']:>9.2f}"
                 + (f"  ({summary['num_undefined_distances']} undefined distances skipped)"
                    if summary["num_undefined_distances"] else ""))
    return "\n".join(lines)
