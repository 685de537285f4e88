#!/usr/bin/env bash
# Wheels for a GPU node without internet access whose CUDA PyTorch image already has torch,
# triton, numpy, scipy, matplotlib, pandas, h5py, tensorboard, torchmetrics, safetensors,
# psutil, e3nn, tqdm, pyyaml and pytest: what megagnn needs beyond those, for that node's
# Python. With --mace, also mace-torch and what it needs beyond those (into DIR/mace: it
# pins e3nn 0.4.4, so it gets a folder of its own), for gpu.sh's MACE comparison.
#
#   bash benchmarks/offline_wheels.sh [--mace] [DIR] [PYTHON_VERSION]   (default: .whl 3.12)
#
# Then, on the node, from the repository root:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#   export PYTHONPATH=/tmp/site
#   python3 -m pip install -q --no-deps --no-build-isolation -e .
#   # with --mace:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site-mace DIR/mace/*.whl
#   export MACE_SITE=/tmp/site-mace
#   bash benchmarks/gpu.sh
#
# The versions are the ones setup.py asks for (megatron-core pinned: 0.17 and later need
# Python 3.12 and changed the optimizer internals megagnn uses) and the MACE version of
# benchmarks/mace_baseline.py.
set -euo pipefail
cd "$(dirname "$0")/.."
mace=0
if [ "${1:-}" = "--mace" ]; then
    mace=1
    shift
fi
dir=${1:-.whl}
python_version=${2:-3.12}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
download() {  # DIR REQUIREMENT...
    local to=$1
    shift
    mkdir -p "$to"
    ${PIP:-python3 -m pip} download -q --no-deps --only-binary=:all: \
        --python-version "$python_version" --implementation cp "${platforms[@]}" -d "$to" "$@"
}
download "$dir" "megatron-core==0.16.1" "ase>=3.23" "vesin>=0.5.8"
# model.tensor_product=cueq: cuequivariance's Python packages (its CUDA kernels: CUEQ_OPS=1,
# 42 MB more, built for CUDA 12)
download "$dir" "cuequivariance==0.13.0" "cuequivariance-torch==0.13.0" opt-einsum
if [ "${CUEQ_OPS:-0}" = 1 ]; then
    download "$dir" "cuequivariance-ops-torch-cu12==0.13.0" "cuequivariance-ops-cu12==0.13.0"
fi
if [ $mace = 1 ]; then
    # mace-torch's imports; python-hostlist (only for SLURM runs) has no wheel and is not needed
    download "$dir/mace" "mace-torch==0.3.16" "e3nn==0.4.4" torch-ema prettytable wcwidth \
        matscipy configargparse GitPython gitdb smmap lmdb orjson "ase>=3.23"
fi
ls -lR "$dir"
