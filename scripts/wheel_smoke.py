"""Smoke test of an installed rcps-kernels (run it from outside the source tree).

    python wheel_smoke.py --expect-variant avx2          # ops only: one process (fits qemu)
    python wheel_smoke.py --expect-variant built --cli   # + info CLI, rcps-train --help and a 1-step run

--expect-variant names the CPU variant that must be in use: a variant name, "jit" (a build from
the shipped sources at import, after exactly one warning), or "built" (any compiled variant, no
JIT). Exits non-zero with the reason on the first failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


def check_installed_package() -> None:
    import rcps_kernels

    location = Path(rcps_kernels.__file__).resolve()
    if (location.parent.parent / "setup.py").exists():
        sys.exit(f"imported rcps_kernels from a source checkout ({location}), not from the installed wheel")
    print(f"rcps_kernels from {location.parent}")


def check_ops(expect_variant: str) -> None:
    import torch

    from rcps_kernels import extension, selfcheck

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = extension.load_cpu_extension()
    if reason is not None:
        sys.exit(f"CPU kernels unusable: {reason}")
    variant = extension.cpu_extension().variant
    messages = [str(w.message) for w in caught]
    if expect_variant == "built":
        if variant == "jit" or messages:
            sys.exit(f"expected a compiled variant without warnings, got {variant!r}: {messages}")
    elif variant != expect_variant:
        sys.exit(f"expected CPU variant {expect_variant!r}, got {variant!r}")
    elif variant == "jit" and len(messages) != 1:
        sys.exit(f"expected exactly one warning before the JIT build, got {messages}")
    started = time.perf_counter()
    ops = selfcheck.check_backend("cpu")
    print(
        f"torch {torch.__version__}, CPU variant {variant}: {len(ops)} ops match the reference "
        f"({time.perf_counter() - started:.1f} s){': ' + messages[0] if messages else ''}"
    )


def run(*command: str, expect_rc: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    if proc.returncode != expect_rc:
        sys.exit(
            f"{' '.join(command)} exited {proc.returncode} (expected {expect_rc}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def check_cli(expect_variant: str) -> None:
    info = json.loads(run(sys.executable, "-m", "rcps_kernels.info", "--json").stdout)
    cpu = info["cpu_kernels"]
    if expect_variant == "built" and cpu["variant"] not in cpu["built"]:
        sys.exit(f"info reports CPU variant {cpu['variant']!r}, not one of the built {cpu['built']}")
    print(f"info: variant {cpu['variant']}, built {cpu['built']}, torch {info['torch']}")
    trainer = shutil.which("rcps-train", path=str(Path(sys.executable).parent))
    if trainer is None:
        sys.exit(f"no rcps-train console script next to {sys.executable}")
    run(trainer, "--help")
    with tempfile.TemporaryDirectory() as tmp:
        data, runs = os.path.join(tmp, "data"), os.path.join(tmp, "runs")
        run(trainer, "make-synthetic", "--out", data, "--train", "5", "--val", "1", "--shape", "32", "32", "32")
        started = time.perf_counter()
        run(
            trainer,
            "train",
            "--config",
            "demo",
            "--set",
            f"data.root={data}",
            "--set",
            f"run.out_dir={runs}",
            "--set",
            "train.stop_after_steps=1",
            "--set",
            "train.progress=false",
            "--set",
            "loss.backend=cpu",
        )
        written = sorted(p.name for p in Path(runs).glob("*/*"))
        if "checkpoint.pt" not in written:
            sys.exit(f"rcps-train train --config demo wrote no checkpoint: {written}")
    print(f"rcps-train --help, make-synthetic and a 1-step demo run ok ({time.perf_counter() - started:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expect-variant", required=True, help='a variant name, "jit" or "built"')
    parser.add_argument("--cli", action="store_true", help="also the info CLI and the trainer")
    args = parser.parse_args()
    check_installed_package()
    check_ops(args.expect_variant)
    if args.cli:
        check_cli(args.expect_variant)
    print("smoke ok")


if __name__ == "__main__":
    main()
