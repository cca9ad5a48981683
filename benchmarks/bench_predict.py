"""``rcps-train predict`` time per LA-sized scan: reading, preparation (reorientation, crop, normalisation), the
sliding window of the LA model (``la`` config widths, random weights: the time does not depend on them), the
inverse onto the input's grid and the NIfTI write, with and without ``--tta``, on CPU and (when present) CUDA.

The scan: ``--shape`` voxels (default 160 x 160 x 80, about the size of an official LA crop) at 0.625 mm in LPS axes, so
that the RAS preparation reorients it and the inverse resamples back.

    python -m benchmarks.bench_predict [--shape 160 160 80] [--overlap 0.5] [--repeats 1] [--devices cpu cuda]

Writes benchmarks/results/predict_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from rcps_train.config import load_config
from rcps_train.model import build_model
from rcps_train.predict import run_predict

RESULTS = Path(__file__).resolve().parent / "results"
SPACING_MM = 0.625


def write_inputs(folder: Path, shape, overlap: float) -> tuple[Path, Path]:
    """An LA-sized scan (a bright blob on noise) and a checkpoint of the LA model with a RAS preparation plan."""
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 20.0, shape[::-1]).astype(np.float32)
    image[20:60, 50:120, 50:120] += 200.0
    scan = sitk.GetImageFromArray(image)
    scan.SetSpacing([SPACING_MM] * 3)
    sitk.WriteImage(scan, str(folder / "la_scan.nii.gz"))
    config = load_config("la", [f"eval.overlap={overlap}"])
    plan = {
        "orientation": "RAS",
        "crop": "nonzero",
        "target_spacing": [SPACING_MM] * 3,
        "image_interpolator": "bspline",
        "channels": [{"modality": "mri", "scheme": "zscore"}],
        "num_classes": 2,
    }
    torch.manual_seed(0)
    state = {"model": build_model(config, 1).state_dict(), "config": config, "preprocessing": {"plan": plan}}
    torch.save(state, folder / "la.pt")
    return folder / "la_scan.nii.gz", folder / "la.pt"


def time_predict(scan: Path, checkpoint: Path, out: Path, device: str, tta: bool, repeats: int) -> list[float]:
    """Seconds per ``run_predict`` call (one case); on CUDA after one untimed warm-up call (kernel selection)."""
    if device == "cuda":
        run_predict([checkpoint], [scan], out, tta=tta, device=device, progress=False)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        summary = run_predict([checkpoint], [scan], out, tta=tta, device=device, progress=False)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        assert summary["failed"] == {}, summary["failed"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 160, 80])
    parser.add_argument("--overlap", type=float, default=0.5, help="eval.overlap (the paper's LA runs use 0.875)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    args = parser.parse_args()
    devices = [d for d in args.devices if d == "cpu" or torch.cuda.is_available()]
    with tempfile.TemporaryDirectory() as tmp:
        scan, checkpoint = write_inputs(Path(tmp), args.shape, args.overlap)
        for device in devices:
            rows = []
            for tta in (False, True):
                times = time_predict(scan, checkpoint, Path(tmp) / "out", device, tta, args.repeats)
                rows.append({"tta": tta, "seconds": times, "median_s": float(np.median(times))})
                print(f"{device} tta={tta}: {np.median(times):.1f} s per scan")
            record = {
                "benchmark": "rcps-train predict, one LA-sized scan",
                "shape": args.shape,
                "spacing_mm": SPACING_MM,
                "model": "la config (widths 16..256), protocol rcps (window 112x112x80, Gaussian blending)",
                "overlap": args.overlap,
                "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "simpleitk": sitk.Version.VersionString(),
                "python": platform.python_version(),
                "date": datetime.date.today().isoformat(),
                "rows": rows,
            }
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"predict_{device}.json").write_text(json.dumps(record, indent=2))
            lines = [
                f"# predict, one {'x'.join(map(str, args.shape))} scan at {SPACING_MM} mm ({device})",
                "",
                f"{record['model']}, eval.overlap {args.overlap}; {record['device']}, {record['threads']} threads, "
                f"torch {record['torch']}, SimpleITK {record['simpleitk']}, {record['date']}.",
                "",
                "| --tta | seconds per scan (median) |",
                "|---|---|",
                *[f"| {'yes' if r['tta'] else 'no'} | {r['median_s']:.1f} |" for r in rows],
            ]
            (RESULTS / f"predict_{device}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
