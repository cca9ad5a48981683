"""Sources and compiler flags of the C++/CUDA extensions, shared by setup.py and the JIT loader.

Kept free of package imports (besides the standard-library ``settings``) so that setup.py can
load it by path before the package is built.

The CPU extension is built once per instruction-set level ("variant"), each a complete,
self-contained module ``rcps_kernels._C_<variant>``; the loader imports exactly one per process,
so code compiled for different levels never meets in one process.
"""

from __future__ import annotations

import importlib.util
import platform
import re
from pathlib import Path

try:
    from . import settings
except ImportError:  # loaded by path from setup.py, outside the package: load the sibling the same way
    _spec = importlib.util.spec_from_file_location("rcps_settings", Path(__file__).with_name("settings.py"))
    settings = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(settings)

PACKAGE_DIR = Path(__file__).resolve().parent
#: The C++/CUDA sources copied into an installed package (wheel), for the JIT fallback.
PACKAGED_CSRC = PACKAGE_DIR / "_csrc"
#: csrc/ of a source checkout or editable install, next to the package.
CHECKOUT_CSRC = PACKAGE_DIR.parent / "csrc"

#: Portable x86-64 variants, lowest first: variant name -> gcc's micro-architecture level.
X86_VARIANTS = {"baseline": "x86-64-v2", "avx2": "x86-64-v3", "avx512": "x86-64-v4"}

#: /proc/cpuinfo flags that each level adds to the one below (gcc's definition of the levels;
#: the kernel calls LZCNT "abm").
X86_LEVEL_FLAGS = {
    "baseline": ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"),
    "avx2": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),
    "avx512": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def find_csrc() -> Path | None:
    """The C++ sources the JIT build compiles: the installed package's copy, else the checkout's."""
    for folder in (PACKAGED_CSRC, CHECKOUT_CSRC):
        if (folder / "cpu").is_dir():
            return folder
    return None


def cpu_sources(csrc: Path) -> list[str]:
    """The CPU extension: its kernels (cpu/) and the composite ops that serve both devices (common/)."""
    return sorted(str(p) for folder in ("cpu", "common") for p in (csrc / folder).glob("*.cpp"))


def cuda_sources(csrc: Path) -> list[str]:
    folder = csrc / "cuda"
    return sorted(str(p) for p in list(folder.glob("*.cu")) + list(folder.glob("*.cpp")))


def cpu_variants() -> dict[str, str | None]:
    """Variants setup.py builds: name -> the -march value (None: the compiler's default).

    RCPS_CPU_ARCH=<arch> builds a single variant for that -march instead ("native" for
    ``-march=native``, "custom" for any other value); such a binary only runs on CPUs like the one
    it was built for, so it is for source installs, never for wheels.
    """
    arch = settings.cpu_arch()
    if arch:
        return {"native" if arch == "native" else "custom": arch}
    if is_x86_64():
        return dict(X86_VARIANTS)
    return {"default": None}


def cpu_compile_args(march: str | None) -> list[str]:
    # -fopenmp at compile AND link time, or at::parallel_for silently runs on one thread.
    # -g0 drops the debug info that Python's default flags ask for: the wheel carries three
    # variants, and debug info would make up most of each.
    return ["-O3", "-g0", "-fopenmp"] + ([f"-march={march}"] if march else [])


def jit_march() -> str | None:
    """-march of a JIT build, which runs only where it is built: the local CPU unless overridden."""
    return settings.cpu_arch() or ("native" if is_x86_64() else None)


def cpu_link_args() -> list[str]:
    return ["-fopenmp"]


def cuda_archs() -> list[str]:
    """RCPS_CUDA_ARCHS as a list (default ``settings.DEFAULT_CUDA_ARCHS``: Turing to Blackwell,
    7.5 to 12.0; nvcc 13 refuses 7.0, so Volta is served by backend="torch")."""
    archs = settings.cuda_archs()
    return [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]


def cuda_include_dirs(csrc: Path, torch_dir: Path) -> list[str]:
    """csrc/, and the cuBLAS/cuSPARSE headers that ATen/cuda includes, which ship in the nvidia-* wheels."""
    extra = [torch_dir.parent / "nvidia" / sub / "include" for sub in ("cu13", "cu12")]
    return [str(csrc)] + [str(folder) for folder in extra if folder.is_dir()]


def nvcc_flags(archs: list[str]) -> list[str]:
    return ["-O3", "--use_fast_math", *cuda_gencode_flags(archs)]


def cuda_gencode_flags(archs: list[str]) -> list[str]:
    """SASS for every arch, plus PTX of the highest one so that newer GPUs can JIT it."""
    nums = [arch.replace(".", "") for arch in archs]
    flags = []
    for num in nums:
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    top = max(nums, key=lambda num: int(re.sub(r"\D", "", num)))  # "90a" sorts as 90
    return flags + ["-gencode", f"arch=compute_{top},code=compute_{top}"]
