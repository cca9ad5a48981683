"""Every environment variable rcps_kernels reads, in one place.

Each is read when it is needed, not at import, so a change between calls takes effect on the
next call; the exceptions say so (the compiled CPU variant is chosen once per process, and
build-time variables matter only while setup.py or a JIT build runs). This module needs only
the standard library: setup.py loads it before torch is importable.

Switches (``RCPS_DETERMINISTIC``, ``RCPS_NO_JIT``, ``RCPS_BUILD_CUDA``) take ``1``/``true``/``yes``/``on``
or ``0``/``false``/``no``/``off`` in any case, ``TRITON_INTERPRET`` what Triton itself takes (``1``/``true``/``on``,
``0``/``false``/``off``); any other value is a ValueError naming the variable, never a silent "off".

Run time:

- ``RCPS_GPU_BACKEND``: the one GPU backend ``backend="auto"`` tries for CUDA tensors, one of
  ``rcps_kernels.backends.GPU_BACKENDS`` (it still falls back to ``torch`` where that one cannot
  serve the device).
- ``RCPS_TRITON_DOT_PRECISION=tf32x3|ieee|tf32``: ``tl.dot`` precision of the Triton InfoNCE's
  fp32 similarity products (default ``tf32x3``, fp32-accurate on NVIDIA tensor cores; ``tf32`` is
  faster but misses the accuracy rule). ``tf32x3`` is NVIDIA-only: on ROCm the default is ``ieee``.
- ``TRITON_INTERPRET=1``: Triton's own switch. Triton reads it when a kernel is defined (at
  import); rcps_kernels reads it per call to accept CPU tensors on ``backend="triton"`` and to
  pick small blocks for the interpreter.
- ``RCPS_DETERMINISTIC=1``: deprecated; use ``torch.use_deterministic_algorithms(True)``.
- ``RCPS_CPU_VARIANT=baseline|avx2|avx512|...``: force one compiled CPU variant (read once,
  when the CPU extension is first loaded).
- ``RCPS_NO_JIT=1``: never JIT-build the CPU kernels when no compiled variant is usable.

Build time (setup.py, and the JIT build of the CPU kernels):

- ``RCPS_BUILD_CUDA=auto|0|1``: build the CUDA extension (``1`` fails when it cannot).
- ``RCPS_CPU_ARCH=native|<-march value>``: one CPU variant for that architecture instead of
  the portable three.
- ``RCPS_CUDA_ARCHS="7.5;8.0;..."``: the CUDA architectures compiled for (default below).
"""

from __future__ import annotations

import os

DOT_PRECISIONS = ("tf32x3", "ieee", "tf32")
#: SASS for Turing (T4, RTX 20xx), Ampere (A100; A10, RTX 30xx), Ada (L4, L40, RTX 40xx), Hopper,
#: Blackwell (B200; RTX 50xx), PTX of the highest. nvcc 13, the toolkit torch's CUDA 13 builds
#: need, no longer compiles for Volta (7.0): V100s run backend="torch".
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0;12.0"


def _read(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def _choice(name: str, choices: tuple[str, ...], default: str | None) -> str | None:
    value = _read(name)
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"environment variable {name}={value!r}: expected one of {choices}")
    return value


# The usual spellings of a switch, compared without case; any other value is refused, naming the variable.
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")
# Triton reads TRITON_INTERPRET itself and takes only these as true, so "yes" would mean two things.
TRITON_TRUE_WORDS = ("1", "true", "on")
TRITON_FALSE_WORDS = ("0", "false", "off", "")


def _flag(name: str, true_words: tuple[str, ...] = TRUE_WORDS, false_words: tuple[str, ...] = FALSE_WORDS) -> bool:
    value = _read(name).lower()
    if value in true_words:
        return True
    if value in false_words:
        return False
    raise ValueError(
        f"environment variable {name}={os.environ[name]!r}: expected a switch, one of "
        f"{true_words} (on) or {tuple(w for w in false_words if w)} (off)"
    )


def gpu_backend(choices: tuple[str, ...]) -> str | None:
    """RCPS_GPU_BACKEND: the backend "auto" must use for CUDA tensors.

    Args:
        choices: the names it may take (the backend registry's GPU backends).

    Returns:
        The name, or None for the registry's order.
    """
    return _choice("RCPS_GPU_BACKEND", choices, None)


def triton_dot_precision(rocm: bool = False) -> str:
    """RCPS_TRITON_DOT_PRECISION: tl.dot precision of the Triton InfoNCE (default tf32x3; ieee on ROCm).

    Raises:
        ValueError: an unknown value, or tf32x3 on ROCm (an NVIDIA-only precision).
    """
    if not rocm:
        return _choice("RCPS_TRITON_DOT_PRECISION", DOT_PRECISIONS, "tf32x3")
    precision = _choice("RCPS_TRITON_DOT_PRECISION", DOT_PRECISIONS, "ieee")
    if precision == "tf32x3":
        raise ValueError(
            "environment variable RCPS_TRITON_DOT_PRECISION=tf32x3 is NVIDIA-only; on ROCm use ieee or tf32"
        )
    return precision


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run in its interpreter, on CPU tensors."""
    return _flag("TRITON_INTERPRET", TRITON_TRUE_WORDS, TRITON_FALSE_WORDS)


def deprecated_deterministic() -> bool:
    """RCPS_DETERMINISTIC=1, the deterministic switch of earlier versions."""
    return _flag("RCPS_DETERMINISTIC")


def cpu_variant() -> str:
    """RCPS_CPU_VARIANT: the compiled CPU variant to load ("" lets the loader choose)."""
    return _read("RCPS_CPU_VARIANT")


def jit_disabled() -> bool:
    """RCPS_NO_JIT=1: no JIT build of the CPU kernels."""
    return _flag("RCPS_NO_JIT")


def build_cuda() -> str:
    """RCPS_BUILD_CUDA: "auto" (the default: when nvcc and a CUDA torch are there), "1" (force) or "0" (skip);
    the usual switch spellings and "force" are accepted, anything else is refused."""
    value = _read("RCPS_BUILD_CUDA").lower()
    if value in ("", "auto"):
        return "auto"
    return "1" if value == "force" or _flag("RCPS_BUILD_CUDA", TRUE_WORDS, FALSE_WORDS[:-1]) else "0"


def cpu_arch() -> str:
    """RCPS_CPU_ARCH: -march of a single-variant build ("": the portable variants)."""
    return _read("RCPS_CPU_ARCH")


def cuda_archs() -> str:
    """RCPS_CUDA_ARCHS: the CUDA architectures to compile, ';'-separated."""
    return _read("RCPS_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS
