#!/usr/bin/env bash
# Everything a GPU run should check and measure, in one go:
#   1. the CUDA tests (tests/gpu: kernels at realistic sizes, megatron-core DDP and its
#      DistributedOptimizer on NCCL against the flat path) and the kernel parity tests;
#   2. benchmarks/kernels.py: every kernel against its reference, training steps with kernels
#      on and off;
#   3. tools/profile_throughput.py --compare pyg, when torch_geometric is importable;
#   4. a MACE of about 1M parameters (mace-torch, 184 channels) against megagnn's 1M models,
#      training steps on the same 4000-atom cell, when MACE_SITE names a folder holding
#      mace-torch and its e3nn 0.4.4 (benchmarks/offline_wheels.sh --mace);
#   5. benchmarks/compile_step.py: compiled (train.compile) against eager training steps per
#      family on EMT batches of about 4000 atoms.
#
#   bash benchmarks/gpu.sh [RESULTS_DIR]          (default: benchmarks/results)
#
# PYTHON picks the interpreter (default python3). Needs CUDA, triton and megagnn installed
# (pip install -e ".[test]", or with --no-deps when the dependencies come as wheels: on a
# node without internet access, benchmarks/offline_wheels.sh says how).
# Results are named after the GPU (e.g. kernels-h100.json).
set -euo pipefail
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
"$py" -c "import torch, triton, megagnn.kernels; assert torch.cuda.is_available(), 'no CUDA'" || {
    echo "needs a CUDA device, triton and megagnn (pip install -e '.[test]')" >&2
    exit 2
}
gpu=$("$py" -c "import re, torch; m = re.search(r'[A-Z]\d{2,3}', torch.cuda.get_device_name()); print(m.group(0).lower() if m else 'gpu')")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu-$gpu.txt" || true

status=0
# -o addopts=: one process, without pytest-xdist (a GPU image may not have it)
"$py" -m pytest -q -p no:cacheprovider -o addopts= -m "not slow" tests/gpu tests/test_kernels.py 2>&1 | tee "$out/gpu-tests-$gpu.log" || status=1
"$py" benchmarks/kernels.py --out "$out/kernels-$gpu.json" || status=1
if "$py" -c "import torch_geometric" 2>/dev/null; then
    "$py" tools/profile_throughput.py --model schnet-1m schnet-10m --atoms 4000 --steps 10 \
        --layouts 1x1 --compare pyg --set model.rbf=gaussian model.stress=false \
        --out "$out/throughput-$gpu-pyg-schnet.json" || status=1
fi
if [ -n "${MACE_SITE:-}" ]; then
    PYTHONPATH="$MACE_SITE:${PYTHONPATH:-}" "$py" benchmarks/mace_baseline.py --throughput 4000 \
        --channels 184 --device cuda --steps 10 --out "$out/throughput-$gpu-mace.json" || status=1
    "$py" tools/profile_throughput.py --model mgnn-1m irrep-1m --atoms 4000 --steps 10 \
        --layouts 1x1 --set model.stress=false --out "$out/throughput-$gpu-1m.json" || status=1
fi
# generates its EMT data under runs/compile-bench (ASE's EMT: about a minute on one core)
"$py" benchmarks/compile_step.py --data emt --structures 2000 --max-atoms 4000 --steps 20 \
    --out "$out/compile-$gpu" || status=1
exit $status
