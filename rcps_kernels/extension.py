"""Loading the compiled kernels: one built CPU variant, else a JIT build with ninja.

Importing an extension registers its ops under ``torch.ops.rcps_cpu`` (CPU) and
``torch.ops.rcps_cuda`` (CUDA). The CPU extension is built once per instruction-set level
(``rcps_kernels._C_baseline`` / ``_C_avx2`` / ``_C_avx512`` on x86-64); exactly one is imported,
the best this CPU runs, or the one ``RCPS_CPU_VARIANT`` names. Binaries built against another
torch release are not imported (the C++ ABI of torch is not stable across releases): the CPU
kernels are then JIT-built from the shipped sources, after one warning. Failures are remembered,
not raised: the backend switch decides what to do when a backend is unusable.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import warnings

import torch

from . import build_config, settings

#: The module setup.py writes next to the binaries (generated at build time, not in the sources).
BUILD_INFO_MODULE = "rcps_kernels._build_info"
#: The compiled modules: ``COMPILED_PREFIX + variant`` for the CPU variants, ``COMPILED_PREFIX + "cuda"``.
COMPILED_PREFIX = "rcps_kernels._C_"

#: Preference among built variants: a build for this machine first, then the widest ISA.
VARIANT_PREFERENCE = ("native", "custom", "default", "avx512", "avx2", "baseline")


@dataclasses.dataclass(frozen=True)
class CpuExtension:
    """Which CPU extension this process uses: ``variant`` is set on success, else ``reason``."""

    variant: str | None
    built: tuple[str, ...]
    supported: tuple[str, ...]
    built_for_torch: str | None
    reason: str | None = None


def _release(version: str) -> str:
    return version.split("+")[0]


def build_info():
    """The module setup.py writes next to the binaries (torch/CUDA versions, variants), or None."""
    try:
        return importlib.import_module(BUILD_INFO_MODULE)
    except ImportError:
        return None


def cpuinfo_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or None where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def supported_x86_variants() -> tuple[str, ...]:
    """Portable x86-64 variants this CPU can run, lowest first.

    A level counts when /proc/cpuinfo lists all its flags AND torch's CPUID-based checks agree
    (under an emulator such as qemu-user, /proc/cpuinfo shows the host's flags, CPUID the guest's).
    """
    if not build_config.is_x86_64():
        return ()
    flags = cpuinfo_flags()
    cpuid_says = {"baseline": True, "avx2": torch.cpu._is_avx2_supported(), "avx512": torch.cpu._is_avx512_supported()}
    supported = []
    for name in build_config.X86_VARIANTS:  # lowest first: each level includes the ones below
        listed = flags is None or flags.issuperset(build_config.X86_LEVEL_FLAGS[name])
        if not (cpuid_says[name] and listed):
            break
        supported.append(name)
    return tuple(supported)


def _runnable(variant: str, supported: tuple[str, ...]) -> bool:
    # native/custom/default builds are only made for (and by) the machine that runs them.
    return variant not in build_config.X86_VARIANTS or variant in supported


def choose_cpu_variant(built: tuple[str, ...], supported: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(variant, None) for the variant to import, or (None, why none is usable).

    Raises:
        ValueError: RCPS_CPU_VARIANT names a variant that is not built or that this CPU cannot run.
    """
    requested = settings.cpu_variant()
    if requested:
        if requested not in built:
            raise ValueError(f"RCPS_CPU_VARIANT={requested}, but the built CPU variants are {list(built)}")
        if not _runnable(requested, supported):
            missing = sorted(set(build_config.X86_LEVEL_FLAGS[requested]) - (cpuinfo_flags() or set()))
            raise ValueError(
                f"RCPS_CPU_VARIANT={requested} needs {build_config.X86_VARIANTS[requested]}, which this CPU "
                f"does not support (it runs {list(supported) or 'none of the portable variants'}"
                + (f"; missing flags: {', '.join(missing)}" if missing else "")
                + ")"
            )
        return requested, None
    for name in VARIANT_PREFERENCE:
        if name in built and _runnable(name, supported):
            return name, None
    return None, f"this CPU runs none of the built variants {list(built)}"


def _jit_build(why: str) -> str | None:
    """JIT-compile the CPU kernels for this CPU. Returns None on success, else the reason it failed."""
    if settings.jit_disabled():
        return why + "; JIT build disabled by RCPS_NO_JIT=1"
    csrc = build_config.find_csrc()
    if csrc is None:
        return why + f"; no C++ sources under {build_config.PACKAGED_CSRC} or {build_config.CHECKOUT_CSRC}"
    try:
        from torch.utils.cpp_extension import load

        warnings.warn(
            f"rcps_kernels: {why}; building the CPU kernels with ninja from {csrc} (first time ~20-60 s, cached after)",
            stacklevel=4,
        )
        # The torch release is part of the name: torch's JIT cache does not key on it.
        load(
            name="rcps_kernels_C_jit_torch" + _release(torch.__version__).replace(".", "_"),
            sources=build_config.cpu_sources(csrc),
            extra_cflags=build_config.cpu_compile_args(build_config.jit_march()),
            extra_ldflags=build_config.cpu_link_args(),
            verbose=False,
        )
        return None
    except Exception as exc:  # a compiler or ninja problem: report it, do not crash the import
        return f"{why}; JIT build failed: {exc}"


@functools.lru_cache(maxsize=None)
def cpu_extension() -> CpuExtension:
    """Import the best built CPU variant, or JIT-build the kernels when none can be used."""
    info = build_info()
    built = tuple(info.CPU_VARIANTS) if info else ()
    supported = supported_x86_variants()
    state = functools.partial(
        CpuExtension, built=built, supported=supported, built_for_torch=info.TORCH_VERSION if info else None
    )
    if info is None:
        why = "no compiled CPU kernels in this install"
    elif _release(info.TORCH_VERSION) != _release(torch.__version__):
        why = (
            f"the compiled CPU kernels were built for torch {info.TORCH_VERSION} and this is torch "
            f"{torch.__version__}, so they are not loaded"
        )
    else:
        try:
            variant, why = choose_cpu_variant(built, supported)
        except ValueError as exc:  # an explicit request is refused, not replaced by a JIT build
            return state(variant=None, reason=str(exc))
        if variant is not None:
            try:
                importlib.import_module(COMPILED_PREFIX + variant)
                return state(variant=variant)
            except ImportError as exc:
                why = f"rcps_kernels._C_{variant} not importable ({exc})"
    reason = _jit_build(why)
    return state(variant=None if reason else "jit", reason=reason)


def load_cpu_extension() -> str | None:
    """Load the CPU kernels (see :func:`cpu_extension`). Returns None on success, else the reason it failed."""
    return cpu_extension().reason


def require_cpu_extension() -> None:
    """Load the CPU kernels, or raise the one error that says why they cannot be used.

    Raises:
        RuntimeError: no compiled variant is usable and the JIT build failed or is disabled.
    """
    _require("CPU", load_cpu_extension())


def require_cuda_extension() -> None:
    """Load the CUDA kernels, or raise the one error that says why they cannot be used.

    Raises:
        RuntimeError: the CUDA extension is not built, built for another torch/CUDA, or fails to import.
    """
    _require("CUDA", load_cuda_extension())


def _require(kind: str, reason: str | None) -> None:
    if reason is not None:
        raise RuntimeError(f"the rcps_kernels {kind} extension is not usable: {reason}")


@functools.lru_cache(maxsize=None)
def load_cuda_extension() -> str | None:
    """Import the CUDA extension. Returns None on success, else the reason it is unavailable."""
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    info = build_info()
    if info is not None and info.CUDA_EXTENSION is None:
        return "the CUDA extension was not built (no nvcc, a CPU-only torch or RCPS_BUILD_CUDA=0 at build time)"
    if info is not None and (_release(info.TORCH_VERSION), info.CUDA_EXTENSION) != (
        _release(torch.__version__),
        torch.version.cuda,
    ):
        return (
            f"rcps_kernels._C_cuda was built for torch {info.TORCH_VERSION} with CUDA {info.CUDA_EXTENSION}, "
            f"this is torch {torch.__version__} with CUDA {torch.version.cuda}, so it is not loaded; "
            "rebuild from source (pip install --no-build-isolation ...)"
        )
    try:
        importlib.import_module(COMPILED_PREFIX + "cuda")
        return None
    except ImportError as exc:
        return f"rcps_kernels._C_cuda not importable ({exc})"
