"""Peak memory of one call, measured in a fresh process.

CPU: peak resident set growth over the inputs (VmHWM after the call minus VmRSS before it,
with the high-water mark reset through /proc/self/clear_refs after a warm-up call), so the
figure contains everything the op allocated: saved tensors, temporaries and the gradients.
CUDA: torch.cuda.max_memory_allocated() growth over the inputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def reset_peak() -> int:
    """Reset the RSS high-water mark; returns the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_growth(rss_before: int) -> int:
    return _status_kib("VmHWM") * 1024 - rss_before


def measure_in_subprocess(module: str, args: list[str], timeout: float = 1800) -> dict:
    """Run ``python -m module *args``; it must print one JSON object as its last line."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
