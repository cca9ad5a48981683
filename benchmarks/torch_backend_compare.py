"""backend="torch" (plain PyTorch, tiled) beside the reference and the fused CPU kernel at the LA
shape: time and peak memory of forward+backward, fp32, topk sampling, on the CPU.

    OMP_NUM_THREADS=1 python -m benchmarks.torch_backend_compare   # ~1.5 minutes (the reference: ~7 s a round)

One thread: on a machine whose cores other jobs also use, two-thread runs were erratic (idle
OpenMP threads spin at barriers while a core is taken).

One run: torch, reference and fused (backend="cpu") at K=400, then torch at K=100 and K=4096.
Each case runs in a fresh process (benchmarks/infonce_case.py) with glibc's default allocator
settings (time and peak RSS), then in another one under MALLOC_MMAP_THRESHOLD_=65536 (peak RSS
only, "tight"), under which RSS follows the live tensors instead of what glibc keeps after its mmap
threshold has grown (a 4 MiB tile freed and reallocated many times raises it). Goals: torch's
peak memory flat in K and at most 1/20 of the reference's at K=400, and torch no slower than the
reference. Results go to benchmarks/results/infonce_torch_backend_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks.la_compare import RESULTS, machine, run

#: (impl, shape, K, rounds)
CASES = [
    ("torch", "la", 400, 5),
    ("reference", "la", 400, 2),
    ("fused", "la", 400, 5),
    ("torch", "la", 100, 5),
    ("torch", "la", 4096, 3),
]


def _mib(row: dict, key: str = "peak_bytes") -> float:
    return row[key] / 2**20


def tight_peaks(rows: list[dict]) -> None:
    """Adds "tight_peak_bytes" to every row: one more round under MALLOC_MMAP_THRESHOLD_=65536."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the child processes' glibc at start
    try:
        tight = run([(r["impl"], r["shape"], r["k"], 1) for r in rows])
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    for row, again in zip(rows, tight, strict=True):
        row["tight_peak_bytes"] = again["peak_bytes"]


def table(rows: list[dict]) -> str:
    reference = next(r for r in rows if r["impl"] == "reference")
    lines = [
        "| K | impl | time (median) | peak memory (default malloc) | peak memory (tight) | time vs reference | "
        "memory vs reference (tight) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same_k = r["k"] == reference["k"] and r is not reference
        speed = f"{reference['median_s'] / r['median_s']:.1f}x faster" if same_k else "-"
        memory = f"1/{reference['tight_peak_bytes'] / r['tight_peak_bytes']:.0f}" if same_k else "-"
        lines.append(
            f"| {r['k']} | {r['impl']} | {r['median_s'] * 1e3:.1f} ms | {_mib(r):.1f} MiB | "
            f"{_mib(r, 'tight_peak_bytes'):.1f} MiB | {speed} | {memory} |"
        )
    return "\n".join(lines)


def goals(rows: list[dict]) -> str:
    torch_rows = {r["k"]: r for r in rows if r["impl"] == "torch"}
    reference = next(r for r in rows if r["impl"] == "reference")
    at_400 = torch_rows[reference["k"]]
    tight = [_mib(torch_rows[k], "tight_peak_bytes") for k in sorted(torch_rows)]
    flat = max(tight) / min(tight)
    fraction = reference["tight_peak_bytes"] / at_400["tight_peak_bytes"]
    default_fraction = reference["peak_bytes"] / at_400["peak_bytes"]
    checks = [
        (
            f"torch peak memory (tight) over K = {', '.join(map(str, sorted(torch_rows)))}: "
            + ", ".join(f"{mib:.1f}" for mib in tight)
            + f" MiB (largest / smallest {flat:.2f}; goal: flat, <= 1.25)",
            flat <= 1.25,
        ),
        (
            f"torch memory at K={reference['k']}: 1/{fraction:.0f} of the reference's (tight; default malloc "
            f"1/{default_fraction:.0f}; goal <= 1/20)",
            min(fraction, default_fraction) >= 20,
        ),
        (
            f"torch time at K={reference['k']}: {at_400['median_s'] * 1e3:.0f} ms vs the reference's "
            f"{reference['median_s'] * 1e3:.0f} ms (goal: no slower)",
            at_400["median_s"] <= reference["median_s"],
        ),
    ]
    return "\n".join(f"- {'met' if ok else 'MISSED'}: {text}" for text, ok in checks)


def _command() -> str:
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"OMP_NUM_THREADS={threads} " if threads else "") + "python -m benchmarks.torch_backend_compare"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS / "infonce_torch_backend_cpu"), help="results path stem")
    args = parser.parse_args()
    info = machine()
    print(f"voxel InfoNCE, forward+backward, fp32, topk, {info['cpu']}, {info['threads']} threads")
    rows = run(CASES)
    print("peak memory again, MALLOC_MMAP_THRESHOLD_=65536:")
    tight_peaks(rows)
    report = table(rows) + "\n\n" + goals(rows)
    print()
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "cases": rows}, indent=1))
    header = (
        f"# backend='torch' on the CPU\n\n{info['date']}, {info['cpu']}, {info['threads']} threads, torch "
        f"{info['torch']}, Python {info['python']}. Forward+backward of one loss call at the LA shape "
        "(1 x 64 x 28 x 28 x 20 anchors and pool, 15,680 anchors, 2 classes), fp32, topk; each case in a "
        "fresh process; peak memory is the RSS growth over the inputs (tight: under MALLOC_MMAP_THRESHOLD_=65536). "
        f"`{_command()}`.\n\n"
    )
    out.with_suffix(".md").write_text(header + report + "\n")
    print(f"\nwritten: {out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
