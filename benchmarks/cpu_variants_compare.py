"""Portable CPU variants against a -march=native build: the fused InfoNCE at the LA shape.

    RCPS_CPU_ARCH=native python setup.py build --build-base /tmp/native   # the native build
    python -m benchmarks.cpu_variants_compare --native-lib /tmp/native/lib.linux-x86_64-cpython-311

Each round runs every candidate once, in turn, as a fresh process (benchmarks/infonce_case.py:
forward + backward, fp32, the median of its repeats); the table gives the median over rounds, so
that load from other processes hits every candidate alike. Candidates: the checkout's portable
build with the variant chosen automatically, each portable variant forced with RCPS_CPU_VARIANT,
and the package built with RCPS_CPU_ARCH=native. Writes
benchmarks/results/cpu_variants_la_k<K>_<threads>t.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.la_compare import RESULTS, machine

REPO = Path(__file__).resolve().parent.parent


def run_case(package_dir: Path, variant: str | None, k: int, repeats: int, threads: int) -> dict:
    # The case runs from the folder that holds the rcps_kernels to measure (sys.path[0]), and
    # finds the benchmarks package through PYTHONPATH.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RCPS_NO_JIT": "1", "OMP_NUM_THREADS": str(threads)}
    env.pop("RCPS_CPU_VARIANT", None)
    if variant:
        env["RCPS_CPU_VARIANT"] = variant
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.infonce_case",
            "--impl",
            "fused",
            "--shape",
            "la",
            "--k",
            str(k),
            "--repeats",
            str(repeats),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=package_dir,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"case in {package_dir} (variant {variant}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--native-lib",
        type=Path,
        required=True,
        help="build_lib of an RCPS_CPU_ARCH=native build (holds rcps_kernels/)",
    )
    parser.add_argument("--k", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=2, help="OMP_NUM_THREADS of the cases (1: CPU time without OpenMP's spin-waits)"
    )
    args = parser.parse_args()
    candidates = {"portable, auto": (REPO, None)}
    candidates.update({f"portable, {v}": (REPO, v) for v in ("avx512", "avx2", "baseline")})
    candidates["-march=native"] = (args.native_lib.resolve(), None)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    cpu_times: dict[str, list[float]] = {name: [] for name in candidates}
    loaded: dict[str, str] = {}
    for round_index in range(args.rounds):
        for name, (package_dir, variant) in candidates.items():
            row = run_case(package_dir, variant, args.k, args.repeats, args.threads)
            times[name].append(row["median_s"])
            cpu_times[name].append(row["median_cpu_s"])
            loaded[name] = row["cpu_variant"]
        print(
            f"round {round_index + 1}: " + ", ".join(f"{n} {t[-1] * 1e3:.1f} ms" for n, t in times.items()), flush=True
        )
    native = statistics.median(times["-march=native"])
    native_cpu = statistics.median(cpu_times["-march=native"])
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    wanted = ("Model name", "CPU(s):", "Thread(s) per core", "L2 cache", "L3 cache")
    cpu_lines = [f"- {line.strip()}" for line in lscpu if line.strip().startswith(wanted)]
    lines = [
        f"# Fused InfoNCE, LA shape, K={args.k}, fp32, forward + backward, CPU: portable variants vs -march=native",
        "",
        "; ".join(f"{key}: {value}" for key, value in machine().items()),
        "",
        *cpu_lines,
        "",
        f"`python -m benchmarks.cpu_variants_compare --rounds {args.rounds} --threads {args.threads}`: each round "
        f"runs each candidate once in a fresh process ({args.threads} thread(s); median of {args.repeats - 1} "
        "calls after a warm-up call); the table gives medians over rounds. Wall time is what a user sees; "
        "process CPU time is less sensitive to other load on the machine.",
        "",
        "| build | variant loaded | wall, median over rounds | min / max round | vs native | "
        "CPU time, median | vs native |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, values in times.items():
        median, cpu = statistics.median(values), statistics.median(cpu_times[name])
        lines.append(
            f"| {name} | {loaded[name]} | {median * 1e3:.1f} ms | {min(values) * 1e3:.1f} / "
            f"{max(values) * 1e3:.1f} ms | {median / native:.3f} | {cpu * 1e3:.1f} ms | "
            f"{cpu / native_cpu:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = RESULTS / f"cpu_variants_la_k{args.k}_{args.threads}t.md"
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
