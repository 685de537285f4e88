#!/usr/bin/env bash
# Wheels for a GPU node without internet access whose CUDA PyTorch image already has torch,
# triton, numpy, scipy, matplotlib, h5py, tensorboard, safetensors, psutil, e3nn, tqdm,
# pyyaml and pytest: what megagnn needs beyond those, for that node's Python.
#
#   bash benchmarks/offline_wheels.sh [DIR] [PYTHON_VERSION]     (default: .whl 3.12)
#
# Then, on the node, from the repository root:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#   export PYTHONPATH=/tmp/site
#   python3 -m pip install -q --no-deps --no-build-isolation -e .
#   bash benchmarks/gpu.sh
#
# The versions are the ones setup.py asks for (megatron-core pinned: 0.17 and later need
# Python 3.12 and changed the optimizer internals megagnn uses).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
python_version=${2:-3.12}
mkdir -p "$dir"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
${PIP:-python3 -m pip} download -q --no-deps --only-binary=:all: \
    --python-version "$python_version" --implementation cp "${platforms[@]}" -d "$dir" \
    "megatron-core==0.16.1" "ase>=3.23" "vesin>=0.5.8"
ls -l "$dir"
