"""The ``backend=`` switch: which implementation runs, and whether it can run here.

``auto`` picks, per device (:func:`auto_choice`):

- CPU tensors: the fused CPU kernels;
- NVIDIA GPUs: Triton where the installed Triton compiles for the GPU's compute capability, else
  the CUDA extension where its SASS or PTX covers the GPU (``RCPS_GPU_BACKEND=triton|cuda``,
  read per call, names the one to try);
- ROCm GPUs (torch reports them as ``cuda``): Triton, with a dot precision ROCm has;
- any other device (MPS, XPU, ...): ``torch``;

and wherever the fused choice is not usable, ``torch``: the plain PyTorch InfoNCE that tiles
over anchors and negatives (exact, memory-bounded, slower than the fused kernels), with one
warning on CPU and CUDA devices, where a fused backend was expected. ``reference``, which
materialises anchors x K x C, runs only when asked for by name.

Also here: :func:`deterministic_algorithms`, which kernels with a faster nondeterministic path
ask, when they run, whether to take their deterministic one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import re
import warnings

import torch

from . import settings
from ._extension import build_info, load_cpu_extension, load_cuda_extension

BACKENDS = ("auto", "cpu", "triton", "cuda", "torch", "reference")

#: Order of preference on CUDA tensors; first usable wins. Triton first until a GPU benchmark
#: (benchmarks/bench_infonce_gpu.py) says otherwise: its tiles use tensor cores, the CUDA
#: kernels plain FP32 FMAs.
GPU_PREFERENCE = ("triton", "cuda")

#: Triton on NVIDIA GPUs, per release: (first release, lowest compute capability, first one not
#: yet served or None). Triton 3.3 removed the pre-Ampere (Volta, Turing) code paths; 3.2 and
#: earlier stop before Blackwell.
TRITON_NVIDIA_SUPPORT = (((3, 3), (8, 0), None), ((0, 0), (7, 0), (10, 0)))


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton (imported once; only asked for GPU devices)."""
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


def _cuda_extension_reason(device: torch.device) -> str | None:
    if _is_rocm():
        return "the CUDA extension is not built for ROCm (HIP)"
    reason = load_cuda_extension()
    if reason is not None:
        return reason
    # A build that predates the record of its arches is trusted, as before the record existed.
    archs = getattr(build_info(), "CUDA_ARCHS", None)
    capability = _capability(device)
    if archs and not cuda_archs_cover(archs, capability):
        return (
            f"rcps_kernels._C_cuda carries SASS for {', '.join(archs)} and PTX for {max(archs, key=_parse_arch)}; "
            f"this GPU is {_format_capability(capability)} (rebuild with RCPS_CUDA_ARCHS)"
        )
    return None


def _triton_device_reason(device: torch.device) -> str | None:
    if not _triton_installed():
        return "triton is not installed"
    if device.type == "cpu":
        if settings.triton_interpreting():
            return None
        return "CPU tensors need TRITON_INTERPRET=1 (the interpreter: for tests, slow)"
    if device.type != "cuda":
        return f"Triton does not run on {device.type} tensors"
    if _is_rocm():
        return None  # with the ieee dot precision (settings.triton_dot_precision)
    return triton_capability_reason(_triton_version(), _capability(device))


def _usable(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run on tensors on `device`, else why not."""
    if name in ("torch", "reference"):
        return None
    if name == "cpu":
        return load_cpu_extension() if device.type == "cpu" else f"CPU tensors only, got {device.type}"
    if name == "triton":
        return _triton_device_reason(device)
    if name == "cuda":
        return _cuda_extension_reason(device) if device.type == "cuda" else f"CUDA tensors only, got {device.type}"
    raise AssertionError(name)


def _fused_candidates(device: torch.device) -> tuple[str, ...]:
    """The fused backends `auto` tries on `device`, in order."""
    if device.type == "cpu":
        return ("cpu",)
    if device.type != "cuda":
        return ()
    override = settings.gpu_backend()
    if override:
        return (override,)
    return ("triton",) if _is_rocm() else GPU_PREFERENCE


def _why_not_chosen(name: str, device: torch.device, chosen: str) -> str:
    """Why `auto` does not pick backend `name`, which it did not try (or which comes after `chosen`)."""
    if name == "reference":
        return "chosen only by name (it materialises anchors x K x C)"
    if name == "torch":
        return f"{chosen} is usable (fused, faster)"
    reason = _usable(name, device)
    if reason is not None:
        return reason
    if device.type == "cuda" and settings.gpu_backend():
        return f"RCPS_GPU_BACKEND={settings.gpu_backend()} names another backend"
    if device.type == "cpu":
        return "auto does not use the Triton interpreter (tests only)"
    return f"{chosen} comes first on {device.type}"


def _pick(device: torch.device, available: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """auto's choice on `device`, and why each fused candidate tried before it is not usable."""
    failed: dict[str, str] = {}
    for name in _fused_candidates(device):
        reason = _usable(name, device) if name in available else "not implemented for this op"
        if reason is None:
            return name, failed
        failed[name] = reason
    return "torch", failed


def auto_choice(device: torch.device, available: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """The backend `auto` picks for tensors on `device`, and why each other one of `available` is not used.

    Args:
        device: where the inputs live.
        available: the backends the op implements (besides "auto"); "torch" must be one.
    """
    chosen, not_used = _pick(device, available)
    for name in available:
        if name != chosen and name not in not_used:
            not_used[name] = _why_not_chosen(name, device, chosen)
    return chosen, not_used


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(device_type: str, reason: str) -> None:
    warnings.warn(
        f"rcps_kernels: no fused backend is usable for {device_type} tensors ({reason}); falling back to "
        "backend='torch' (plain PyTorch: exact and memory-bounded, slower than the fused kernels)",
        RuntimeWarning,
        stacklevel=4,
    )


# Evaluated eagerly while torch.compile traces (the answer is a constant for a given call site),
# so that loading the extension and reading the environment never enter the graph.
@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device, available: tuple[str, ...]) -> str:
    """The concrete backend for tensors on `device`.

    Args:
        backend: one of BACKENDS.
        device: where the inputs live.
        available: the backends this op implements (besides "auto").

    Raises:
        ValueError: unknown backend, or one that cannot take tensors on `device`.
        RuntimeError: an explicitly requested backend that is not usable here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu" and settings.cpu_variant():  # an explicit request is honoured or refused
            refused = load_cpu_extension()
            if refused is not None:
                raise ValueError(f"{refused} (unset RCPS_CPU_VARIANT to let rcps_kernels choose)")
        chosen, failed = _pick(device, available)
        if chosen == "torch" and failed and device.type in ("cpu", "cuda"):
            _warn_fallback_once(device.type, "; ".join(f"{name}: {reason}" for name, reason in failed.items()))
        return chosen
    if backend not in available:
        raise ValueError(f"backend={backend!r} is not implemented for this op (have {available})")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and not settings.triton_interpreting():
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {device}")
    reason = _usable(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is not usable here: {reason}")
    return backend


def device_report(device: torch.device, available: tuple[str, ...]) -> dict[str, object]:
    """What `auto` picks for an op implementing `available` on `device`, and why not the others
    (``python -m rcps_kernels.info``)."""
    chosen, not_used = auto_choice(device, available)
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
    """Per backend: whether it is built (importable) and why it cannot be used, if it cannot."""
    cpu = load_cpu_extension()
    cuda = load_cuda_extension()
    status: dict[str, dict[str, object]] = {
        "torch": {"built": True},
        "reference": {"built": True},
        "cpu": {"built": cpu is None, **({"reason": cpu} if cpu else {})},
        "triton": {
            "built": _triton_installed(),
            **({} if _triton_installed() else {"reason": "triton is not installed"}),
        },
        "cuda": {"built": cuda is None, **({"reason": cuda} if cuda else {})},
    }
    return status


# The deterministic= keyword of a public call, while that call's kernels run (forward and
# backward op bodies set it from their own argument; None: no per-call choice).
_DETERMINISTIC_OVERRIDE: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "rcps_deterministic_override", default=None
)


def deterministic_algorithms() -> bool:
    """Whether a kernel called now takes its deterministic path.

    A per-call ``deterministic=True/False`` (:func:`deterministic_override`) decides; otherwise
    torch's switch, ``torch.use_deterministic_algorithms``, read at this moment (as torch's own
    ops do), not at import.
    """
    override = _DETERMINISTIC_OVERRIDE.get()
    if override is not None:
        return override
    return torch.are_deterministic_algorithms_enabled() or _deprecated_environment_switch()


@contextlib.contextmanager
def deterministic_override(deterministic: bool | None):
    """Make :func:`deterministic_algorithms` answer `deterministic` inside (None: no override)."""
    token = _DETERMINISTIC_OVERRIDE.set(deterministic)
    try:
        yield
    finally:
        _DETERMINISTIC_OVERRIDE.reset(token)


def _deprecated_environment_switch() -> bool:
    # RCPS_DETERMINISTIC=1 was the switch before torch's was followed. It still works, with a
    # warning, so that runs which relied on it for bitwise reproducibility do not silently lose it.
    if not settings.deprecated_deterministic():
        return False
    _warn_deprecated_environment_switch()
    return True


@functools.lru_cache(maxsize=None)
def _warn_deprecated_environment_switch() -> None:
    warnings.warn(
        "rcps_kernels: RCPS_DETERMINISTIC=1 is deprecated; call "
        "torch.use_deterministic_algorithms(True), or pass deterministic=True to "
        "bidirectional_voxel_infonce / BidirectionalVoxelContrastiveLoss",
        FutureWarning,
        stacklevel=3,
    )
