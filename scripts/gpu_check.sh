#!/usr/bin/env bash
# The GPU checks as one run, on a CUDA machine whose python has torch and triton: build the
# extensions in place, run the gpu test tier, then the GPU benchmarks. Every step has its own
# time limit so that a slow one leaves time for the rest. Everything printed goes to $OUT/log.txt;
# the benchmarks write their .json/.md into $OUT (copy them to benchmarks/results/ to keep them).
#
#   OUT=gpu_out bash scripts/gpu_check.sh
#
# BUILD=0 skips the build, for extensions already built in place for this python.
set -u
out=${OUT:-gpu_out}
mkdir -p "$out"
log="$out/log.txt"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 MAX_JOBS=${MAX_JOBS:-16}
export RCPS_CUDA_ARCHS=${RCPS_CUDA_ARCHS:-9.0}
step() {  # step NAME SECONDS COMMAND...: run with a limit, log it, report its status and time
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "=== $name (limit ${limit}s)" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$log"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2; } 2>&1 | tee -a "$log"

start=$SECONDS
if [ "${BUILD:-1}" = 0 ]; then
  echo "=== build skipped (BUILD=0)" | tee -a "$log"
elif ! timeout 240 "$py" setup.py build_ext --inplace >/tmp/build.log 2>&1; then
  tail -40 /tmp/build.log | tee -a "$log"
  echo "=== CUDA build failed: building the CPU extension alone" | tee -a "$log"
  RCPS_BUILD_CUDA=0 timeout 120 "$py" setup.py build_ext --inplace >/tmp/build.log 2>&1 \
    || { tail -40 /tmp/build.log | tee -a "$log"; exit 1; }
fi
echo "=== build: $((SECONDS - start)) s" | tee -a "$log"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$py" -m rcps_kernels.info --json 2>&1 | tee -a "$log"

step "gpu tests" "${TEST_LIMIT:-240}" "$py" -m pytest -m gpu tests/kernels -q -rfE \
  --tb=short -p no:cacheprovider -n 4
step "where the LA call's time goes" 60 "$py" scripts/profile_infonce_gpu.py --backend triton \
  --k 400 --rows 15
step "host time per piece of the LA call" 60 "$py" scripts/host_time_gpu.py --k 400
step "infonce benchmark" "${INFONCE_LIMIT:-240}" "$py" -m benchmarks.bench_infonce_gpu \
  --repeats "${REPEATS:-5}" --out-dir "$out"
step "L_urp + L_cr benchmark" 45 "$py" -m benchmarks.bench_pseudo_supervision_gpu \
  --repeats "${REPEATS:-5}" --out-dir "$out"
step "training step benchmark" 75 "$py" -m benchmarks.bench_train_step_gpu --steps 3 \
  --out-dir "$out"
