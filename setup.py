"""Build rcps_kernels' C++ (always) and CUDA (when possible) extensions.

setup.py imports torch, so install with ``pip install --no-build-isolation -e .``.

Environment switches:
    RCPS_BUILD_CUDA=0|1   skip / force the CUDA extension (default: build it when nvcc and a CUDA
                          build of torch are both present)
    RCPS_CUDA_ARCHS       explicit arch list, default "8.0;9.0" (never a device query)
    RCPS_CPU_ARCH         -march for the CPU extension, default "native"
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_build_config", ROOT / "rcps_kernels" / "_build_config.py")
build_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_config)


def _find_cuda_home() -> str | None:
    # The nvcc on PATH may be a wrapper script; torch would then guess CUDA_HOME=/usr/local and
    # fail to link cudart. Prefer an explicit CUDA_HOME, then the standard location.
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def _want_cuda() -> bool:
    switch = os.environ.get("RCPS_BUILD_CUDA", "auto").lower()
    if switch in ("0", "false", "no", "off"):
        return False
    available = _CUDA_HOME is not None and bool(build_config.cuda_sources())
    if switch in ("1", "true", "yes", "on", "force"):
        if not available:
            raise RuntimeError("RCPS_BUILD_CUDA=1 but nvcc or csrc/cuda sources were not found")
        return True
    return available


_CUDA_HOME = _find_cuda_home()
if _CUDA_HOME:
    os.environ.setdefault("CUDA_HOME", _CUDA_HOME)  # must be set before cpp_extension is imported
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(build_config.cuda_archs()))

import torch  # noqa: E402


def _relative(paths: list[str]) -> list[str]:
    # setuptools refuses absolute source paths.
    return [os.path.relpath(p, ROOT) for p in paths]


from torch.utils.cpp_extension import BuildExtension, CppExtension  # noqa: E402

ext_modules = [
    CppExtension(
        "rcps_kernels._C",
        _relative(build_config.cpu_sources()),
        extra_compile_args={"cxx": build_config.cpu_compile_args()},
        extra_link_args=build_config.cpu_link_args(),
    )
]

if _want_cuda():
    if torch.version.cuda is None:
        if os.environ.get("RCPS_BUILD_CUDA", "auto").lower() in ("1", "true", "yes", "on", "force"):
            raise RuntimeError("RCPS_BUILD_CUDA=1 needs a CUDA build of torch; this one is CPU-only")
    else:
        from torch.utils.cpp_extension import CUDAExtension

        # cuBLAS/cuSPARSE headers that ATen/cuda includes ship in the nvidia-* wheels.
        include_dirs = [str(ROOT / "csrc")]
        for sub in ("cu13", "cu12"):
            extra = Path(torch.__file__).resolve().parent.parent / "nvidia" / sub / "include"
            if extra.is_dir():
                include_dirs.append(str(extra))
        nvcc_flags = ["-O3", "--use_fast_math"]
        for arch in build_config.cuda_archs():
            num = arch.replace(".", "")
            nvcc_flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        ext_modules.append(
            CUDAExtension(
                "rcps_kernels._C_cuda",
                _relative(build_config.cuda_sources()),
                include_dirs=include_dirs,
                extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
            )
        )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
