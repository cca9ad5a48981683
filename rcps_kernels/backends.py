"""The backend registry: one :class:`Backend` record per value of ``backend=``, read by every place
that names, checks, chooses or reports backends (:func:`resolve`, ``info``, the ops' kernel tables).

``auto`` tries, in registry order, the backends whose record lets it pick them for the device's
type, and takes the first usable one:

- CPU tensors: the fused CPU kernels;
- NVIDIA GPUs: Triton where the installed Triton compiles for the GPU's compute capability, else
  the CUDA extension where its SASS or PTX covers the GPU (``RCPS_GPU_BACKEND``, read per call,
  names the one to try: one of :data:`GPU_BACKENDS`);
- ROCm GPUs (torch reports them as ``cuda``): Triton, with a dot precision ROCm has;
- any device, last: ``torch``, the plain PyTorch InfoNCE that tiles over anchors and negatives
  (exact, memory-bounded, slower than the fused kernels), with one warning where a fused backend
  was tried and is not usable. ``reference``, which materialises anchors x K x C, runs only when
  asked for by name.

Adding a backend: its record in :data:`REGISTRY`, its kernel table (``ops/kernels.py``), its tests.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import re
import warnings
from typing import Callable

import torch

from . import extension, settings
from .ops import kernels as kernel_tables


@dataclasses.dataclass(frozen=True)
class Backend:
    """One value of ``backend=``.

    Attributes:
        name: the value.
        device_types: the device types whose tensors it takes (None: any), or a function giving
            them when they depend on the environment; a request for another is a ValueError.
        auto_device_types: the device types on which ``auto`` may pick it (None: any, (): never,
            only by name).
        unusable: why it cannot run on tensors on a device of one of its types here, or None.
        missing: why it is not installed or built here, or None.
        kernels: builds its kernel table (raising RuntimeError when it cannot be loaded); None for
            ``reference``, which runs the float64-exact formulas of ``reference/`` instead.
    """

    name: str
    device_types: tuple[str, ...] | Callable[[], tuple[str, ...]] | None
    auto_device_types: tuple[str, ...] | None
    unusable: Callable[[torch.device], str | None]
    missing: Callable[[], str | None]
    kernels: Callable[[], kernel_tables.Kernels] | None

    def accepted_device_types(self) -> tuple[str, ...] | None:
        """The device types whose tensors it takes now (None: any)."""
        return self.device_types() if callable(self.device_types) else self.device_types

    def takes(self, device: torch.device) -> bool:
        """Whether it takes tensors on `device` at all."""
        accepted = self.accepted_device_types()
        return accepted is None or device.type in accepted

    def auto_may_pick(self, device: torch.device) -> bool:
        """Whether ``auto`` tries it for tensors on `device`."""
        return self.auto_device_types is None or device.type in self.auto_device_types


# --------------------------------------------------------------------------------------------
# Whether each backend can run here
# --------------------------------------------------------------------------------------------
#: Triton on NVIDIA GPUs, per release: (first release, lowest compute capability, first one not
#: yet served or None). Triton 3.3 removed the pre-Ampere (Volta, Turing) code paths; 3.2 and
#: earlier stop before Blackwell.
TRITON_NVIDIA_SUPPORT = (((3, 3), (8, 0), None), ((0, 0), (7, 0), (10, 0)))


@functools.lru_cache(maxsize=None)
def triton_version() -> tuple[int, int] | None:
    """(major, minor) of the installed Triton, or None when it is not installed (imported once)."""
    if importlib.util.find_spec("triton") is None:
        return None
    version = importlib.import_module("triton").__version__
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def _is_rocm() -> bool:
    return torch.version.hip is not None


def _capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))


def _format_capability(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def triton_capability_reason(version: tuple[int, int], capability: tuple[int, int]) -> str | None:
    """None when Triton `version` compiles for NVIDIA compute capability `capability`, else why not."""
    for first_release, lowest, beyond in TRITON_NVIDIA_SUPPORT:
        if version >= first_release:
            if capability < lowest or (beyond is not None and capability >= beyond):
                served = f">= {_format_capability(lowest)}" + (f", < {_format_capability(beyond)}" if beyond else "")
                return (
                    f"Triton {version[0]}.{version[1]} compiles for compute capability {served}; "
                    f"this GPU is {_format_capability(capability)}"
                )
            return None
    raise AssertionError(version)


def _parse_arch(arch: str) -> tuple[tuple[int, int], bool]:
    """ "8.6" -> ((8, 6), False); "9.0a" -> ((9, 0), True): an arch-specific target, for that GPU only."""
    match = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)", arch.strip())
    if match is None:
        raise ValueError(f"CUDA arch {arch!r}: expected MAJOR.MINOR, e.g. 8.6")
    return (int(match[1]), int(match[2])), bool(match[3])


def cuda_archs_cover(archs: list[str], capability: tuple[int, int]) -> bool:
    """Whether an extension built for `archs` (SASS for each, PTX for the highest) runs on a GPU
    of `capability`: SASS runs on its own major version at the same or a higher minor; PTX is
    compiled by the driver for any GPU at or above its arch."""
    parsed = [_parse_arch(arch) for arch in archs]
    for (major, minor), specific in parsed:
        if (major == capability[0] and minor <= capability[1]) if not specific else (major, minor) == capability:
            return True
    ptx, specific = max(parsed)
    return ptx == capability if specific else ptx <= capability


def _cpu_unusable(device: torch.device) -> str | None:
    return extension.load_cpu_extension()


def _cuda_unusable(device: torch.device) -> str | None:
    if _is_rocm():
        return "the CUDA extension is not built for ROCm (HIP)"
    reason = extension.load_cuda_extension()
    if reason is not None:
        return reason
    # A build that predates the record of its arches is trusted, as before the record existed.
    archs = getattr(extension.build_info(), "CUDA_ARCHS", None)
    capability = _capability(device)
    if archs and not cuda_archs_cover(archs, capability):
        return (
            f"rcps_kernels._C_cuda carries SASS for {', '.join(archs)} and PTX for {max(archs, key=_parse_arch)}; "
            f"this GPU is {_format_capability(capability)} (rebuild with RCPS_CUDA_ARCHS)"
        )
    return None


def _triton_missing() -> str | None:
    return None if triton_version() is not None else "triton is not installed"


def _triton_device_types() -> tuple[str, ...]:
    # CPU tensors only through the interpreter (TRITON_INTERPRET=1: for tests, slow).
    return ("cuda", "cpu") if settings.triton_interpreting() else ("cuda",)


def _triton_unusable(device: torch.device) -> str | None:
    missing = _triton_missing()
    if missing is not None:
        return missing
    if device.type == "cpu":
        return None  # taken only under the interpreter (_triton_device_types)
    if _is_rocm():
        return None  # with the ieee dot precision (settings.triton_dot_precision)
    return triton_capability_reason(triton_version(), _capability(device))


def _cpu_missing() -> str | None:
    return extension.load_cpu_extension()


def _cuda_missing() -> str | None:
    return extension.load_cuda_extension()


def _always(*_args) -> None:
    return None


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------
#: Every backend but "auto", in the order ``auto`` tries them.
REGISTRY: tuple[Backend, ...] = (
    Backend("cpu", ("cpu",), ("cpu",), _cpu_unusable, _cpu_missing, kernel_tables.cpu_kernels),
    # Triton before CUDA until a GPU benchmark (benchmarks/bench_infonce_gpu.py) says otherwise: its
    # tiles use tensor cores, the CUDA kernels plain FP32 FMAs. CPU tensors only in the interpreter.
    Backend("triton", _triton_device_types, ("cuda",), _triton_unusable, _triton_missing, kernel_tables.triton_kernels),
    Backend("cuda", ("cuda",), ("cuda",), _cuda_unusable, _cuda_missing, kernel_tables.cuda_kernels),
    Backend("torch", None, None, _always, _always, kernel_tables.torch_kernels),
    Backend("reference", None, (), _always, _always, None),
)
BY_NAME: dict[str, Backend] = {record.name: record for record in REGISTRY}

#: Every value ``backend=`` takes, "auto" first.
NAMES: tuple[str, ...] = ("auto", *BY_NAME)
#: The backends ``RCPS_GPU_BACKEND`` may name: those ``auto`` picks on GPUs and nowhere else.
GPU_BACKENDS: tuple[str, ...] = tuple(r.name for r in REGISTRY if r.auto_device_types and "cuda" in r.auto_device_types)


@functools.lru_cache(maxsize=None)
def kernel_table(name: str) -> kernel_tables.Kernels:
    """The kernel table of backend `name` (cached once it loads).

    Raises:
        ValueError: a backend without kernels (``reference``) or an unknown one.
        RuntimeError: the backend's extension (or triton) cannot be loaded; not cached, so a
            later call tries again.
    """
    record = BY_NAME.get(name)
    if record is None or record.kernels is None:
        raise ValueError(f"backend {name!r} has no kernel table; these do: {_with_kernels()}")
    return record.kernels()


def check_name(backend: object) -> None:
    """Refuse a `backend` that is not one of :data:`NAMES` (whether it runs depends on the device).

    Raises:
        ValueError: naming the accepted values.
    """
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {backend!r}")


def _with_kernels() -> tuple[str, ...]:
    return tuple(record.name for record in REGISTRY if record.kernels is not None)


# --------------------------------------------------------------------------------------------
# Choosing
# --------------------------------------------------------------------------------------------
def _auto_candidates(device: torch.device) -> list[Backend]:
    """The backends `auto` tries on `device`, in order (the last one, ``torch``, takes any device)."""
    candidates = [record for record in REGISTRY if record.auto_may_pick(device)]
    override = settings.gpu_backend(GPU_BACKENDS) if device.type == "cuda" else None
    if override:
        candidates = [r for r in candidates if r.name == override or r.auto_device_types is None]
    return candidates


def _pick(device: torch.device) -> tuple[str, dict[str, str]]:
    """auto's choice on `device`, and why each candidate tried before it is not usable."""
    failed: dict[str, str] = {}
    for record in _auto_candidates(device):
        reason = record.unusable(device)
        if reason is None:
            return record.name, failed
        failed[record.name] = reason
    raise AssertionError(f"no backend takes {device.type} tensors")  # the catch-all's record says it takes any


def _why_not_chosen(record: Backend, device: torch.device, chosen: str) -> str:
    """Why `auto` does not pick `record`, which it did not try (or which comes after `chosen`)."""
    if record.auto_device_types == ():
        return "chosen only by name"
    reason = record.unusable(device) if record.takes(device) else f"takes no {device.type} tensors"
    if reason is not None:
        return reason
    if not record.auto_may_pick(device):
        return f"auto does not pick it for {device.type} tensors"
    if device.type == "cuda" and settings.gpu_backend(GPU_BACKENDS):
        return f"RCPS_GPU_BACKEND={settings.gpu_backend(GPU_BACKENDS)} names another backend"
    return f"{chosen} comes first on {device.type}"


def auto_choice(device: torch.device) -> tuple[str, dict[str, str]]:
    """The backend `auto` picks for tensors on `device`, and why each other one is not used.

    Args:
        device: where the inputs live.

    Returns:
        (the backend's name, {every other backend: why auto does not use it}).
    """
    chosen, not_used = _pick(device)
    for record in REGISTRY:
        if record.name != chosen and record.name not in not_used:
            not_used[record.name] = _why_not_chosen(record, device, chosen)
    return chosen, not_used


@functools.lru_cache(maxsize=None)
def warn_fallback_once(device_type: str, reason: str, fallback: str) -> None:
    """Warn, once per device type, reason and fallback (``cache_clear()`` re-arms it), that auto fell back."""
    warnings.warn(
        f"rcps_kernels: no fused backend is usable for {device_type} tensors ({reason}); falling back to "
        f"backend={fallback!r} (exact and memory-bounded, slower than the fused kernels)",
        RuntimeWarning,
        stacklevel=4,
    )


def _check_cpu_variant_request(device: torch.device) -> None:
    # An explicit RCPS_CPU_VARIANT is honoured or refused, never replaced by a fallback.
    if device.type == "cpu" and settings.cpu_variant():
        refused = extension.load_cpu_extension()
        if refused is not None:
            raise ValueError(f"{refused} (unset RCPS_CPU_VARIANT to let rcps_kernels choose)")


# Evaluated eagerly while torch.compile traces (the answer is a constant for a given call site),
# so that loading the extension and reading the environment never enter the graph.
@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on `device`.

    Args:
        backend: one of :data:`NAMES`.
        device: where the inputs live.

    Returns:
        The backend's name ("auto" resolved).

    Raises:
        ValueError: unknown backend, or one that cannot take tensors on `device`.
        RuntimeError: an explicitly requested backend that is not usable here.
    """
    check_name(backend)
    if backend == "auto":
        _check_cpu_variant_request(device)
        chosen, failed = _pick(device)
        if failed and BY_NAME[chosen].auto_device_types is None:  # the catch-all, after a fused one failed
            reasons = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
            warn_fallback_once(device.type, reasons, chosen)
        return chosen
    record = BY_NAME[backend]
    if not record.takes(device):
        kinds = " or ".join(kind.upper() for kind in record.accepted_device_types())
        raise ValueError(f"backend={backend!r} needs {kinds} tensors, got tensors on {device}")
    reason = record.unusable(device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is not usable here: {reason}")
    return backend


def resolve(backend: str, device: torch.device | str) -> str:
    """The concrete backend that ``backend=backend`` runs for tensors on `device`.

    Args:
        backend: one of :data:`NAMES`.
        device: where the inputs will live.

    Returns:
        The backend's name ("auto" resolved).

    Raises:
        ValueError: an unknown backend, or one that cannot take tensors on `device`.
        RuntimeError: a backend that is not usable here (its extension is not built, ...).
    """
    return resolve_backend(backend, torch.device(device))


# --------------------------------------------------------------------------------------------
# Reporting (python -m rcps_kernels.info)
# --------------------------------------------------------------------------------------------
def device_report(device: torch.device) -> dict[str, object]:
    """What `auto` picks on `device`, and why not the others.

    Returns:
        {"device", ("name", "capability", "rocm" on CUDA devices), "auto", "not_used": {name: why}}.
    """
    chosen, not_used = auto_choice(device)
    report: dict[str, object] = {"device": str(device)}
    if device.type == "cuda":
        report["name"] = torch.cuda.get_device_name(device)
        report["capability"] = _format_capability(_capability(device))
        report["rocm"] = _is_rocm()
    report.update(auto=chosen, not_used=not_used)
    return report


def visible_devices() -> list[torch.device]:
    """The CPU and every device torch sees (CUDA/ROCm, MPS, XPU)."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append(torch.device("mps"))
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        devices += [torch.device("xpu", index) for index in range(xpu.device_count())]
    return devices


def backend_status() -> dict[str, dict[str, object]]:
    """Per backend: whether it is built (importable) and, if not, why.

    Returns:
        {name: {"built": bool, ("reason": str where not built)}} in registry order.
    """
    status: dict[str, dict[str, object]] = {}
    for record in REGISTRY:
        reason = record.missing()
        status[record.name] = {"built": reason is None, **({"reason": reason} if reason else {})}
    return status
