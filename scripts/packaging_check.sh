#!/usr/bin/env bash
# Packaging check, as a new user would install: build the sdist, a CPU wheel from the sdist, check
# what both contain, install the wheel into a fresh virtual environment outside the source tree and
# smoke-test it (scripts/wheel_smoke.py): natively, under qemu-user as a Haswell (AVX2, no AVX-512)
# and a Nehalem (x86-64-v2) CPU, and under another torch release than the one it was built against
# (it must warn once and JIT-build the CPU kernels from the sources it ships).
#
#   RCPS_PACK_WORK=DIR         work folder (default: a new folder under /tmp; kept for inspection)
#   RCPS_PACK_TORCH            torch the wheel is built against and installed with (default torch==2.13.0)
#   RCPS_PACK_OTHER_PYTHON     a python with another torch release, for the mismatch check
#                              (default: .venv/bin/python, which scripts/setup.sh gives torch 2.14.1)
#   RCPS_PACK_QEMU=0           skip the qemu runs (x86-64 only; they install qemu-user with apt-get)
#
# Prints the time of each step: ~8 min on 2 cores, 4 of them the wheel build (the qemu runs ~15 s each).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${RCPS_PACK_WORK:-$(mktemp -d /tmp/rcps-packaging.XXXXXX)}
build_torch=${RCPS_PACK_TORCH:-torch==2.13.0}
other_python=${RCPS_PACK_OTHER_PYTHON:-$repo/.venv/bin/python}
smoke=$repo/scripts/wheel_smoke.py
[ -x "$other_python" ] || { echo "no python with another torch at $other_python (run scripts/setup.sh, or set RCPS_PACK_OTHER_PYTHON)"; exit 1; }
mkdir -p "$work" && cd "$work"
pip_install=(-m pip install --quiet --disable-pip-version-check)
# One compile job per core (ninja's default is cores + 2): each cc1plus on torch's headers takes ~1 GB.
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

step_started=$SECONDS
step() { echo "=== [$(date +%T)] $1"; }
done_step() { echo "--- $1: $((SECONDS - step_started)) s"; step_started=$SECONDS; }  # the time since the last

step "build environment ($build_torch) in $work/build-venv"
python3 -m venv build-venv
build-venv/bin/python "${pip_install[@]}" "$build_torch" numpy "setuptools>=77" wheel build ninja
done_step "build environment"

step "sdist (python -m build --sdist --no-isolation)"
rm -rf dist && mkdir dist
(cd "$repo" && RCPS_BUILD_CUDA=0 "$work/build-venv/bin/python" -m build --sdist --no-isolation --outdir "$work/dist" >/dev/null)
sdist=$(ls dist/rcps_kernels-*.tar.gz)
tar tzf "$sdist" > sdist.txt
for needed in csrc/common/rcps_math.h csrc/common/pseudo_supervision_math.h csrc/common/selection.cpp csrc/cpu/fast_math.h csrc/cpu/infonce.cpp \
              csrc/cuda/infonce.cu csrc/cuda/infonce_kernels.cuh LICENSE MANIFEST.in setup.py \
              rcps_kernels/build_config.py rcps_train/configs/demo.toml; do
  grep -q "^rcps_kernels-[^/]*/$needed\$" sdist.txt || { echo "sdist lacks $needed"; exit 1; }
done
if grep -E '\.so$|/_csrc/|_build_info\.py$' sdist.txt; then echo "sdist holds build products (above)"; exit 1; fi
done_step "sdist"

step "an isolated build (plain pip wheel) must stop with advice"
out=$(build-venv/bin/python -m pip wheel --disable-pip-version-check --no-deps "$sdist" -w isolated 2>&1) \
  && { echo "an isolated build succeeded unexpectedly"; exit 1; }
grep -q -- "--no-build-isolation" <<< "$out" || { echo "an isolated build failed without advice: $out"; exit 1; }
done_step "isolated build refused"

step "CPU wheel from the sdist (pip wheel --no-build-isolation --no-deps)"
RCPS_BUILD_CUDA=0 build-venv/bin/python -m pip wheel --quiet --disable-pip-version-check \
  --no-build-isolation --no-deps "$sdist" -w dist
wheel=$(ls dist/rcps_kernels-*.whl)
build-venv/bin/python -m zipfile -l "$wheel" | awk 'NR > 1 {print $1}' > wheel.txt
variants=default
if [ "$(uname -m)" = x86_64 ]; then variants="baseline avx2 avx512"; fi
for variant in $variants; do
  grep -q "^rcps_kernels/_C_${variant}\..*\.so\$" wheel.txt || { echo "wheel lacks the $variant variant"; exit 1; }
done
for needed in rcps_kernels/_build_info.py rcps_kernels/_csrc/common/rcps_math.h rcps_kernels/_csrc/cpu/fast_math.h \
              rcps_kernels/_csrc/cuda/infonce.cu rcps_train/configs/demo.toml; do
  grep -qx "$needed" wheel.txt || { echo "wheel lacks $needed"; exit 1; }
done
grep -q 'dist-info/licenses/LICENSE$' wheel.txt || { echo "wheel lacks the LICENSE"; exit 1; }
if grep -E '^(tests|benchmarks)/|/results/' wheel.txt; then echo "wheel holds tests or results (above)"; exit 1; fi
if [ "$(uname -m)" = x86_64 ]; then  # no instruction above each variant's level (-march=native would leak)
  rm -rf unpacked && build-venv/bin/python -m zipfile -e "$wheel" unpacked
  for pair in baseline:ymm avx2:zmm; do
    so=$(ls unpacked/rcps_kernels/_C_${pair%%:*}.*.so)
    count=$(objdump -d --no-show-raw-insn "$so" | grep -c "%${pair##*:}" || true)
    [ "$count" = 0 ] || { echo "$so uses $count ${pair##*:} registers"; exit 1; }
  done
fi
ls -la "$wheel"
done_step "wheel"

step "fresh environment with the wheel ($build_torch), outside the source tree"
python3 -m venv venv
venv/bin/python "${pip_install[@]}" "$build_torch" "$wheel"
out=$(cd / && "$work/venv/bin/rcps-train" --help 2>&1) && { echo "rcps-train ran without the train extra"; exit 1; }
grep -q 'pip install "rcps-kernels\[train\]"' <<< "$out" || { echo "no advice without the train extra: $out"; exit 1; }
venv/bin/python "${pip_install[@]}" "${wheel}[train]"
done_step "install"

step "smoke test, native"
venv/bin/python "$smoke" --expect-variant built --cli
done_step "native smoke"

if [ "${RCPS_PACK_QEMU:-1}" != 0 ] && [ "$(uname -m)" = x86_64 ]; then
  if ! command -v qemu-x86_64 >/dev/null; then
    step "installing qemu-user"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null
    done_step "qemu-user install"
  fi
  for cpu_variant in Haswell:avx2 Nehalem:baseline; do
    step "smoke test under qemu-x86_64 -cpu ${cpu_variant%%:*} (expects the ${cpu_variant##*:} variant)"
    # qemu warns about CPU features TCG cannot emulate; those lines are noise. OpenBLAS (numpy's)
    # detects a Haswell under qemu's Nehalem and dies in numpy's import: name its core instead.
    OPENBLAS_CORETYPE=${cpu_variant%%:*} timeout 1500 qemu-x86_64 -cpu "${cpu_variant%%:*}" venv/bin/python "$smoke" \
      --expect-variant "${cpu_variant##*:}" 2> >(grep -v "TCG doesn't support requested feature" >&2)
    done_step "qemu ${cpu_variant%%:*}"
  done
fi

other_torch=$("$other_python" -c 'import torch; print(torch.__version__.split("+")[0])')
built_torch=$(venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')
step "another torch: the wheel (built against torch $built_torch) under torch $other_torch"
[ "$other_torch" != "$built_torch" ] || { echo "$other_python has the wheel's own torch $built_torch"; exit 1; }
rm -rf other-site && "$other_python" "${pip_install[@]}" --no-deps --target other-site "$wheel"
# PYTHONPATH puts the wheel's files ahead of anything installed in that environment.
PYTHONPATH="$work/other-site" TORCH_EXTENSIONS_DIR="$work/torch-extensions" "$other_python" "$smoke" --expect-variant jit
done_step "torch mismatch"
echo "packaging check passed (work folder: $work)"
