"""Sources and compiler flags of the C++/CUDA extensions, shared by setup.py and the JIT loader.

Kept free of package imports so that setup.py can load it by path before the package is built.
"""
from __future__ import annotations

import os
from pathlib import Path

#: Repository root: csrc/ lives next to the package in a source checkout or editable install.
SOURCE_ROOT = Path(__file__).resolve().parent.parent
CSRC = SOURCE_ROOT / "csrc"

#: Default CUDA architectures: Ampere and Hopper. Override with RCPS_CUDA_ARCHS="8.0;8.6;9.0".
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def cpu_sources() -> list[str]:
    return sorted(str(p) for p in (CSRC / "cpu").glob("*.cpp"))


def cuda_sources() -> list[str]:
    folder = CSRC / "cuda"
    return sorted(str(p) for p in list(folder.glob("*.cu")) + list(folder.glob("*.cpp")))


def cpu_compile_args() -> list[str]:
    # -fopenmp at compile AND link time, or at::parallel_for silently runs on one thread.
    # The extension is built on the machine that runs it (source install or JIT), so it targets
    # that CPU by default; RCPS_CPU_ARCH=x86-64-v2 (say) builds a portable binary instead.
    arch = os.environ.get("RCPS_CPU_ARCH", "native")
    return ["-O3", "-fopenmp", f"-march={arch}"]


def cpu_link_args() -> list[str]:
    return ["-fopenmp"]


def cuda_archs() -> list[str]:
    archs = os.environ.get("RCPS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    return [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
