"""Build the CUDA extension alone for one or more arch lists: does nvcc accept every arch, how long
does the build take and how large is the module. No GPU needed.

    CUDA_HOME=/usr/local/cuda python -m benchmarks.cuda_arch_build --archs "8.0;9.0" --archs default

Each list is built from scratch in a fresh process and a fresh folder, with the flags setup.py
uses (``build_config.nvcc_flags``); ``default`` is ``settings.DEFAULT_CUDA_ARCHS``. Writes
``benchmarks/results/cuda_arch_build.{json,md}`` (``--out`` for another stem).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.la_compare import RESULTS, machine
from rcps_kernels import build_config, settings

_BUILD = """
import sys
from pathlib import Path
import torch
from torch.utils.cpp_extension import load
from rcps_kernels import build_config as config
archs, folder = sys.argv[1].split(";"), sys.argv[2]
csrc = config.CHECKOUT_CSRC
load(name="rcps_cuda_arch_build", sources=config.cuda_sources(csrc), build_directory=folder,
     extra_include_paths=config.cuda_include_dirs(csrc, Path(torch.__file__).resolve().parent),
     extra_cflags=["-O3", "-g0"], extra_cuda_cflags=config.nvcc_flags(archs), is_python_module=False, verbose=False)
"""


def build(archs: str) -> dict:
    """Compile and link the CUDA extension for `archs` (';'-separated) in a new folder."""
    env = dict(os.environ, CUDA_HOME=os.environ.get("CUDA_HOME", "/usr/local/cuda"), TORCH_CUDA_ARCH_LIST=archs)
    with tempfile.TemporaryDirectory(prefix="rcps-cuda-archs-") as folder:
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", _BUILD, archs, folder],
            capture_output=True,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )
        seconds = time.perf_counter() - start
        modules = list(Path(folder).glob("*.so"))
        row = {"archs": archs, "ok": proc.returncode == 0 and bool(modules), "build_s": round(seconds, 1)}
        row["so_bytes"] = modules[0].stat().st_size if modules else None
        if not row["ok"]:
            row["error"] = proc.stderr[-3000:]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| archs (SASS; PTX of the highest) | nvcc | build time | module size |", "|---|---|---|---|"]
    for row in rows:
        size = f"{row['so_bytes'] / 2**20:.1f} MiB" if row["so_bytes"] else "-"
        lines.append(f"| {row['archs']} | {'ok' if row['ok'] else 'failed'} | {row['build_s']:.0f} s | {size} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", action="append", required=True, help='";"-separated list, or "default"')
    parser.add_argument("--out", default=str(RESULTS / "cuda_arch_build"), help="results path stem")
    args = parser.parse_args()
    rows = []
    for archs in args.archs:
        archs = settings.DEFAULT_CUDA_ARCHS if archs == "default" else archs
        print(f"building for {archs} ({' '.join(build_config.nvcc_flags(archs.split(';')))}) ...", flush=True)
        rows.append(build(archs))
        print(json.dumps({key: value for key, value in rows[-1].items() if key != "error"}), flush=True)
        if not rows[-1]["ok"]:
            print(rows[-1]["error"], file=sys.stderr)
    info = machine()
    info["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    info["max_jobs"] = os.environ.get("MAX_JOBS", "ninja default")
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "builds": rows}, indent=1))
    header = (
        f"# CUDA extension build per arch list\n\n{info['date']}, {info['cpu']}, torch {info['torch']}, "
        f"{info['nvcc']}, MAX_JOBS={info['max_jobs']}. `python -m benchmarks.cuda_arch_build "
        + " ".join(f'--archs "{a}"' for a in args.archs)
        + "`: each list built from scratch in a fresh folder (compile + link of csrc/cuda, flags of setup.py).\n\n"
    )
    out.with_suffix(".md").write_text(header + table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
