"""Loading the compiled kernels: the built extension first, then a JIT build with ninja.

Importing an extension registers its ops under ``torch.ops.rcps_C`` (CPU) and
``torch.ops.rcps_cuda`` (CUDA). Failures are remembered, not raised: the backend switch decides
what to do when a backend is unusable.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

from . import _build_config


@functools.lru_cache(maxsize=None)
def load_cpu_extension() -> str | None:
    """Import (or JIT-build) the CPU extension. Returns None on success, else the reason it failed."""
    try:
        importlib.import_module("rcps_kernels._C")
        return None
    except ImportError as exc:
        built_error = f"rcps_kernels._C not importable ({exc})"
    if os.environ.get("RCPS_NO_JIT", "0") == "1":
        return built_error + "; JIT build disabled by RCPS_NO_JIT=1"
    sources = _build_config.cpu_sources()
    if not sources:
        return built_error + f"; no C++ sources under {_build_config.CSRC} for a JIT build"
    try:
        from torch.utils.cpp_extension import load

        warnings.warn(
            f"{built_error}; building the CPU kernels with ninja (first time ~20-60 s, cached after)",
            stacklevel=3,
        )
        load(
            name="rcps_kernels_C_jit",
            sources=sources,
            extra_cflags=_build_config.cpu_compile_args(),
            extra_ldflags=_build_config.cpu_link_args(),
            verbose=False,
        )
        return None
    except Exception as exc:  # a compiler or ninja problem: report it, do not crash the import
        return f"{built_error}; JIT build failed: {exc}"


@functools.lru_cache(maxsize=None)
def load_cuda_extension() -> str | None:
    """Import the CUDA extension. Returns None on success, else the reason it is unavailable."""
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    try:
        importlib.import_module("rcps_kernels._C_cuda")
        return None
    except ImportError as exc:
        return f"rcps_kernels._C_cuda not importable ({exc})"
