#!/usr/bin/env bash
# The one prepared call for a GPU machine (bench/RESULTS.md): build from the working tree, run the
# GPU tests, compute-sanitizer (memcheck, racecheck) over one small launch of every CUDA and
# Triton kernel, a 2-process NCCL training check when two GPUs are visible, then the GPU
# benchmark; a short table of the steps last. Every step runs even when one before it failed.
#
#   bash bench/gpu_check.sh "$OUT"        # about 8 minutes on one H200, autotune compiles included
set -uo pipefail
out=${1:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
rows=()
step() {  # step NAME CMD...: its output in $out/NAME.log, its tail on the terminal
  local name=$1 start=$SECONDS rc
  shift
  echo "== $name: $*"
  "$@" >"$out/$name.log" 2>&1
  rc=$?
  tail -n 4 "$out/$name.log"
  rows+=("$name $rc $((SECONDS - start))s")
}
sanitizer=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")

{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$out/versions.txt"
step build env SPARSE_SAE_FORCE_CUDA=1 python setup.py build_ext --inplace
step gpu_tests python -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py tests/test_cuda_path.py \
  tests/test_triton_kernels.py tests/test_modules.py
step memcheck "$sanitizer" --tool memcheck --error-exitcode 1 python bench/sanitize_kernels.py
step racecheck "$sanitizer" --tool racecheck --error-exitcode 1 python bench/sanitize_kernels.py
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  step nccl_two_gpus python bench/sanitize_kernels.py --two-gpus "$out/two_gpus"
fi
step gpu_suite python bench/gpu_suite.py "$out"
echo
echo "step exit time"
printf '%s\n' "${rows[@]}"
