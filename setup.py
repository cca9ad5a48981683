"""Build rcps_kernels' C++ (always) and CUDA (when possible) extensions.

setup.py imports torch, so install with ``pip install --no-build-isolation .`` (or ``-e .``).

Environment switches:
    RCPS_BUILD_CUDA=0|1   skip / force the CUDA extension (default: build it when nvcc and a CUDA
                          build of torch are both present)
    RCPS_CUDA_ARCHS       explicit arch list, default "7.5;8.0;8.6;8.9;9.0;10.0;12.0" (never a device query); PTX of the
                          highest one is embedded too
    RCPS_CPU_ARCH         build one CPU variant for this -march (e.g. "native") instead of the
                          portable x86-64-v2 / v3 / v4 variants
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
_spec = importlib.util.spec_from_file_location("build_config", ROOT / "rcps_kernels" / "build_config.py")
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
    switch = build_config.settings.build_cuda()
    if switch == "0":
        return False
    available = _CUDA_HOME is not None and bool(build_config.cuda_sources(CSRC))
    if switch == "1":
        if not available:
            raise RuntimeError("RCPS_BUILD_CUDA=1 but nvcc or csrc/cuda sources were not found")
        return True
    return available


_CUDA_HOME = _find_cuda_home()
if _CUDA_HOME:
    os.environ.setdefault("CUDA_HOME", _CUDA_HOME)  # must be set before cpp_extension is imported
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(build_config.cuda_archs()))

try:
    import torch  # noqa: E402
except ImportError:
    raise SystemExit(
        "rcps-kernels: building the C++/CUDA extensions needs torch, and this build environment has none "
        "(pip's default isolated build starts from an empty one). Install torch first, then build with "
        "`pip install --no-build-isolation .` (or `-e .`, or the sdist file); "
        "`python -m build` needs `--no-isolation`."
    ) from None


def _relative(paths: list[str]) -> list[str]:
    # setuptools refuses absolute source paths.
    return [os.path.relpath(p, ROOT) for p in paths]


from torch.utils.cpp_extension import BuildExtension, CppExtension  # noqa: E402

# One complete, self-contained CPU module per instruction-set variant (see rcps_kernels/build_config.py).
CPU_VARIANTS = build_config.cpu_variants()
ext_modules = [
    CppExtension(
        f"rcps_kernels._C_{variant}",
        _relative(build_config.cpu_sources(CSRC)),
        extra_compile_args={"cxx": build_config.cpu_compile_args(march)},
        extra_link_args=build_config.cpu_link_args(),
    )
    for variant, march in CPU_VARIANTS.items()
]


def _cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    return CUDAExtension(
        "rcps_kernels._C_cuda",
        _relative(build_config.cuda_sources(CSRC)),
        include_dirs=build_config.cuda_include_dirs(CSRC, Path(torch.__file__).resolve().parent),
        # -g0: Python's default -g gave the host objects ~10 MB of debug info (of 14 MB for two archs).
        extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": build_config.nvcc_flags(build_config.cuda_archs())},
    )


if _want_cuda():
    if torch.version.cuda is not None:
        ext_modules.append(_cuda_extension())
    elif build_config.settings.build_cuda() == "1":
        raise RuntimeError("RCPS_BUILD_CUDA=1 needs a CUDA build of torch; this one is CPU-only")
BUILDS_CUDA = any(ext.name == "rcps_kernels._C_cuda" for ext in ext_modules)


class BuildExtensions(BuildExtension.with_options(use_ninja=True)):
    """Ninja builds in a persistent folder per extension, plus the record of what they were built against."""

    def finalize_options(self):
        super().finalize_options()
        # pip's editable builds use a fresh temporary folder each time; a fixed one (per torch
        # release, whose headers the objects depend on) lets ninja recompile only what changed.
        self.build_temp = str(ROOT / "build" / f"temp-rcps-torch{torch.__version__.split('+')[0]}")

    def build_extension(self, ext):
        # The CPU variants compile the same sources with different flags: separate object folders,
        # or each variant's objects would overwrite the previous one's.
        shared_temp = self.build_temp
        self.build_temp = os.path.join(shared_temp, ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = shared_temp

    def run(self):
        super().run()
        in_source = self.inplace or getattr(self, "editable_mode", False)
        package_dir = ROOT / "rcps_kernels" if in_source else Path(self.build_lib) / "rcps_kernels"
        package_dir.mkdir(parents=True, exist_ok=True)
        (package_dir / "_build_info.py").write_text(
            '"""Written by setup.py: what the compiled extensions next to this file were built against."""\n'
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"CUDA_EXTENSION = {torch.version.cuda if BUILDS_CUDA else None!r}  # its CUDA version, None if not built\n"
            f"CUDA_ARCHS = {build_config.cuda_archs() if BUILDS_CUDA else None!r}  # SASS archs; PTX of the highest\n"
            f"CPU_VARIANTS = {CPU_VARIANTS!r}  # variant -> -march\n"
        )


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (rcps_kernels/_csrc), for the JIT build of an installed wheel."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):  # an editable install uses the checkout's csrc/
            shutil.copytree(CSRC, Path(self.build_lib) / "rcps_kernels" / "_csrc", dirs_exist_ok=True)


setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtensions, "build_py": BuildPyWithSources})
