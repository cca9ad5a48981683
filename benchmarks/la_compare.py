"""The fused voxel InfoNCE against the authors' algorithm at the LA shape: time and peak memory.

    python -m benchmarks.la_compare                  # K=100: a few minutes, ~5 GB for the official run
    python -m benchmarks.la_compare --k 100 400 --large   # the recorded table (K=400 official: ~14 GB)

Each case runs in a fresh process (benchmarks/infonce_case.py): forward+backward of one loss
call, fp32, 1 x 64 x 28 x 28 x 20 anchors and pool, 2 classes. Reported: median time, peak memory
growth over the inputs, and ratios against the official algorithm and the matmul floor (the six
N x C x K torch.mm products the loss needs) measured in the same run. ``--large`` adds K=4096 at
the LA shape and full-resolution anchors (1 x 64 x 112 x 112 x 80, pool the same) with K=4096,
fused only. Results go to benchmarks/results/infonce_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

from benchmarks.memory import measure_in_subprocess

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def run(cases: list[tuple[str, str, int, int]]) -> list[dict]:
    rows = []
    for impl, shape, k, repeats in cases:
        print(f"  {impl:>9} {shape:>4} K={k:<5} ...", end="", flush=True)
        row = measure_in_subprocess(
            "benchmarks.infonce_case",
            ["--impl", impl, "--shape", shape, "--k", str(k), "--repeats", str(repeats)],
        )
        print(f" {row['median_s'] * 1e3:10.1f} ms  {row['peak_bytes'] / 2**20:9.1f} MiB")
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    by = {(r["impl"], r["shape"], r["k"]): r for r in rows}
    lines = [
        "| shape | K | impl | time (median) | peak memory over inputs | speed-up vs official | "
        "time / matmul floor | memory vs official |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["impl"] == "floor":
            continue
        official = by.get(("official", r["shape"], r["k"]))
        floor = by.get(("floor", r["shape"], r["k"]))
        speedup = f"{official['median_s'] / r['median_s']:.0f}x" if official else "-"
        vs_floor = f"{r['median_s'] / floor['median_s']:.2f}" if floor else "-"
        mem = f"1/{official['peak_bytes'] / r['peak_bytes']:.0f}" if official and r is not official else "-"
        lines.append(
            f"| {r['shape']} | {r['k']} | {r['impl']} | {r['median_s'] * 1e3:.1f} ms | "
            f"{r['peak_bytes'] / 2**20:.1f} MiB | {speedup} | {vs_floor} | {mem} |"
        )
    floors = [r for r in rows if r["impl"] == "floor"]
    if floors:
        lines.append("")
        lines.append(
            "Matmul floor (six N x C x K torch.mm products): "
            + ", ".join(f"{r['shape']} K={r['k']}: {r['median_s'] * 1e3:.1f} ms" for r in floors)
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[100])
    parser.add_argument("--large", action="store_true", help="also K=4096 and full-resolution anchors")
    parser.add_argument("--no-official", action="store_true", help="skip the official algorithm")
    parser.add_argument("--out", default=str(RESULTS / "infonce_cpu"), help="results path stem")
    args = parser.parse_args()

    cases = []
    for k in args.k:
        cases += [("floor", "la", k, 7), ("fused", "la", k, 7), ("reference", "la", k, 2)]
        if not args.no_official:
            cases.append(("official", "la", k, 1))
    if args.large:
        cases += [("fused", "la", 4096, 3), ("fused", "full", 4096, 1)]
    info = machine()
    print(f"voxel InfoNCE, forward+backward, fp32, {info['cpu']}, {info['threads']} threads")
    rows = run(cases)
    md = table(rows)
    print()
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "cases": rows}, indent=1))
    header = (
        f"# Voxel InfoNCE on the CPU\n\n{info['date']}, {info['cpu']}, {info['threads']} "
        f"threads, torch {info['torch']}, Python {info['python']}. Forward+backward of one "
        "loss call, fp32; `python -m benchmarks.la_compare "
        + " ".join([f"--k {' '.join(map(str, args.k))}"] + (["--large"] if args.large else []))
        + "`.\n\n"
    )
    out.with_suffix(".md").write_text(header + md + "\n")
    print(f"\nwritten: {out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
