#!/usr/bin/env bash
# Set up a fresh machine (idempotent): a virtual environment in .venv with torch, the package
# installed in editable mode with its C++ CPU extension (and the CUDA extension when nvcc and a
# CUDA build of torch are present), plus the test, trainer, tensorboard and nnU-Net extras.
#
#   RCPS_TORCH="torch==2.11.0"  install another torch (default: the CUDA build 2.14.1, so that the
#                               CUDA extension compiles and links even on a machine without a GPU)
#   RCPS_BUILD_CUDA=0           skip the CUDA extension (see setup.py)
#   RCPS_CPU_ARCH=native        one CPU variant for this machine instead of the portable three
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

"${pip[@]}" "${RCPS_TORCH:-torch==2.14.1}" "setuptools>=77" wheel ninja

# Rebuild only when the sources or build settings changed since the last successful install.
stamp=.venv/.rcps-build-stamp
digest=$(cat setup.py pyproject.toml rcps_kernels/build_config.py rcps_kernels/settings.py $(find csrc -type f | sort) \
         | sha256sum | cut -d' ' -f1)-${RCPS_BUILD_CUDA:-auto}-${RCPS_CPU_ARCH:-portable}
loads_built_kernels() {  # a compiled CPU variant imports (no JIT build as a stand-in)
  RCPS_NO_JIT=1 .venv/bin/python -c "from rcps_kernels.extension import cpu_extension as c; assert c().variant" 2>/dev/null
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ] || ! loads_built_kernels; then
  echo "building rcps_kernels (C++ CPU extension; CUDA extension when nvcc is present) ..."
  "${pip[@]}" --no-build-isolation -e ".[test,train,tensorboard,nnunet]"
  echo "$digest" > "$stamp"
fi
.venv/bin/python -m rcps_kernels.info
