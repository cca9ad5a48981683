"""The ``backend=`` switch: which implementation runs, and whether it can run here.

``auto`` picks the fused CPU kernel for CPU tensors and the faster GPU backend for CUDA tensors
(``RCPS_GPU_BACKEND=triton|cuda``, read per call, overrides the choice), and falls back to the plain PyTorch
reference, with one warning, when nothing compiled is usable.

Also here: :func:`deterministic_algorithms`, which kernels with a faster nondeterministic path
ask, when they run, whether to take their deterministic one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import warnings

import torch

from . import settings
from ._extension import load_cpu_extension, load_cuda_extension

BACKENDS = ("auto", "cpu", "triton", "cuda", "reference")

#: Order of preference on CUDA tensors; first usable wins. Triton first until a GPU benchmark
#: (benchmarks/bench_infonce_gpu.py) says otherwise: its tiles use tensor cores, the CUDA
#: kernels plain FP32 FMAs.
GPU_PREFERENCE = ("triton", "cuda")


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_reason() -> str | None:
    if not _triton_installed():
        return "triton is not installed"
    if not (torch.cuda.is_available() or settings.triton_interpreting()):
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton on CPU tensors)"
    return None


def backend_status() -> dict[str, dict[str, object]]:
    """Per backend: whether it is built (importable) and usable on this machine, and why not."""
    cpu = load_cpu_extension()
    cuda = load_cuda_extension()
    triton = _triton_reason()
    return {
        "reference": {"built": True, "usable": True},
        "cpu": {"built": cpu is None, "usable": cpu is None, **({"reason": cpu} if cpu else {})},
        "triton": {"built": _triton_installed(), "usable": triton is None, **({"reason": triton} if triton else {})},
        "cuda": {
            "built": cuda is None,
            "usable": cuda is None and torch.cuda.is_available(),
            **({"reason": cuda} if cuda else {} if torch.cuda.is_available() else {"reason": "no CUDA device"}),
        },
    }


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(device_type: str, reason: str) -> None:
    warnings.warn(
        f"rcps_kernels: no fused backend is usable for {device_type} tensors ({reason}); "
        "falling back to the plain PyTorch reference (exact, but it materialises large tensors)",
        RuntimeWarning,
        stacklevel=4,
    )


def _usable(name: str) -> str | None:
    """None when backend `name` can run here, else why not."""
    if name == "reference":
        return None
    if name == "cpu":
        return load_cpu_extension()
    if name == "triton":
        return _triton_reason()
    if name == "cuda":
        reason = load_cuda_extension()
        return reason or (None if torch.cuda.is_available() else "no CUDA device")
    raise AssertionError(name)


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
        if device.type == "cuda":
            override = settings.gpu_backend()
            order = (override,) if override else GPU_PREFERENCE
        else:
            order = ("cpu",)
        reasons = []
        for name in order:
            if name in available and (reason := _usable(name)) is None:
                return name
            reasons.append(f"{name}: {_usable(name) if name in available else 'not implemented'}")
        _warn_fallback_once(device.type, "; ".join(reasons))
        return "reference"
    if backend not in available:
        raise ValueError(f"backend={backend!r} is not implemented for this op (have {available})")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and not settings.triton_interpreting():
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {device}")
    reason = _usable(backend)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is not usable here: {reason}")
    return backend


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
