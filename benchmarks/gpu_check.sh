#!/usr/bin/env bash
# The GPU checks, as one short run on a lent GPU machine (the `device` tool) or any CUDA machine with torch, nvcc
# and pytest installed (nothing is fetched; the project runs from this checkout):
#   - the CUDA kernel builds (JIT, nvcc) and is the active backend;
#   - it matches the torch reference (random, extreme and degenerate rows, fp32/fp16/bf16, aligned and not);
#   - the engine runs every mode on the GPU, lossless equal to full depth;
#   - the kernel benchmark on the GPU: the target is >= 3x the torch reference at V = 151,936.
# Writes log.txt and kernels.json to $OUT (default ./gpu-check). About 3-5 minutes, most of it the two builds.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/sedac-gpu-cache}
# the CPU matmul kernel is not what this checks (the engine on a GPU uses torch's matmuls): skip its build
export SEDAC_MATMUL_TORCH=1
PY=${PYTHON:-python3}
{
  echo "== machine"
  nvidia-smi -L 2>&1 | head -4
  nvcc --version 2>&1 | tail -1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  "$PY" -c "from sedac_core import kernels; [print(' ', r) for _, _, r in kernels.kernel_status()]"
  SECONDS=0
  "$PY" -c "
from sedac_core import kernels
r = kernels.MANAGER.cuda()
print('cuda build:', r.ok, r.reason, r.log_path)
if not r.ok and r.log_path and r.log_path.exists():
    print(r.log_path.read_text()[-4000:])"
  echo "build took ${SECONDS}s"
  echo "== tests"
  # (the nvcc compile-only checks are CI's; here the JIT build compiles the same sources for this GPU)
  "$PY" -m pytest -q -rs -p no:cacheprovider -o addopts= -k "not compiles" tests/ext/test_cuda_kernel.py \
    tests/ext/test_kernel_backends.py tests/core/test_cuda_engine.py
  echo "tests rc=$?"
  echo "== kernel benchmark (cuda)"
  "$PY" benchmarks/bench_kernels.py --device cuda --json "$OUT/kernels.json"
  echo "bench rc=$?"
} 2>&1 | tee "$OUT/log.txt"
