#!/usr/bin/env bash
# Everything that needs a GPU, in one command, on a GPU machine whose python3 already holds a CUDA
# build of torch (and triton): build spidr._C with its CUDA kernels, run the GPU tests, and print the
# ops table (torch, release, cuda, triton and floor rows, and this GPU's measured roofline).
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # writes OUT_DIR/ops_cuda.{md,json} and the test log
#
# Nothing is downloaded: the machine needs no network (pip installs this checkout only).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/out}
mkdir -p "$out"
python=${PYTHON:-python3}

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name())"

echo "== build spidr._C with CUDA kernels"
SPIDR_BUILD_CUDA=1 "$python" -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -n 20
"$python" -c "import spidr, spidr.ops as ops; print(spidr.build_info()); print('cuda backends:', ops.backends('cuda'))"

echo "== GPU tests"
"$python" -m pytest -q -m gpu tests/ 2>&1 | tee "$out/gpu_tests.log" | tail -n 15

echo "== ops benchmark"
"$python" benchmarks/bench_ops.py --device cuda --json "$out/ops_cuda.json" | tee "$out/ops_cuda.md"
