"""Fused vs plain PyTorch L_urp + L_cr, forward+backward, on a CUDA device (docs/design.md section 6).

    python -m benchmarks.bench_pseudo_supervision_gpu [--repeats 20] [--dtype float32]

The step of benchmarks/bench_pseudo_supervision.py (one head's L_urp(z_a1, z_o) + L_urp(z_a2,
z_o) + L_cr(z_a1, z_a2) through rk.pseudo_supervision_losses, then backward) at the LA
(2, 2, 112, 112, 80) and Pancreas (2, 17, 96, 96, 96) shapes, for the "triton" and "cuda" backends
and the plain-PyTorch "reference". (The H100 results of 2026-11-25 were taken with an earlier step,
L_urp(z_a1, z_o) + L_cr(z_a1, z_a2) through the two separate functions.) Time: CUDA events, median /
min / max over --repeats after warm-up; memory: peak torch.cuda.max_memory_allocated() growth
over the inputs (benchmarks/bench_infonce_gpu.time_phase). Writes
benchmarks/results/pseudo_supervision_gpu_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from benchmarks.bench_infonce_gpu import time_phase, write_results
from benchmarks.bench_pseudo_supervision import SHAPES, step

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="triton,cuda,reference")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_pseudo_supervision_gpu needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": [],
    }
    for shape_name, shape in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        z_a1, z_a2, z_o = (torch.randn(shape, generator=g).mul_(2).to("cuda", dtype) for _ in range(3))
        z_a1.requires_grad_()
        z_a2.requires_grad_()
        row = {"shape_name": shape_name, "shape": list(shape), "timings": {}}
        for backend in args.backends.split(","):
            try:
                row["timings"][backend] = time_phase(
                    lambda _, b=backend, views=(z_a1, z_a2, z_o): step(b, *views), args.repeats
                )
            except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
                torch.cuda.empty_cache()
                row["timings"][backend] = {"skipped": f"{type(exc).__name__}: {str(exc)[:120]}"}
        plain = row["timings"].get("reference", {})
        fused = {b: r for b, r in row["timings"].items() if b != "reference" and "median_ms" in r}
        if "median_ms" in plain and fused:
            best = min(fused, key=lambda b: fused[b]["median_ms"])
            row["fastest"] = best
            row["speedup"] = plain["median_ms"] / fused[best]["median_ms"]
            row["memory_ratio"] = fused[best]["peak_bytes"] / max(plain["peak_bytes"], 1)
        report["results"].append(row)
        print(json.dumps(row), flush=True)
        del z_a1, z_a2, z_o
        torch.cuda.empty_cache()
    lines = [
        f"# L_urp + L_cr forward+backward on {report['device']}",
        "",
        f"torch {report['torch']}, CUDA {report['cuda']}, {report['date']}, dtype {args.dtype}",
        "",
        "| shape | backend | median ms | min-max ms | peak MiB over inputs |",
        "|---|---|---|---|---|",
    ]
    for row in report["results"]:
        for backend, r in row["timings"].items():
            if "skipped" in r:
                lines.append(f"| {row['shape_name']} | {backend} | skipped: {r['skipped']} | | |")
            else:
                lines.append(
                    f"| {row['shape_name']} | {backend} | {r['median_ms']:.3f} | "
                    f"{r['min_ms']:.3f}-{r['max_ms']:.3f} | {r['peak_bytes'] / 2**20:.1f} |"
                )
        if "speedup" in row:
            lines.append(
                f"| {row['shape_name']} | {row['fastest']} vs reference | "
                f"{row['speedup']:.1f}x faster | | memory ratio {row['memory_ratio']:.3f} |"
            )
    write_results(args.out_dir, "pseudo_supervision_gpu", report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
