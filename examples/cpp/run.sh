#!/usr/bin/env bash
# Build the C++ runner (CMakeLists.txt) and run it on a held-out structure of a run whose
# model was packaged (tools/convert_checkpoint.py package RUN RUN/model.pt2):
#   bash examples/cpp/run.sh runs/quickstart
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${1:?usage: examples/cpp/run.sh RUN_FOLDER (holding model.pt2)}
PY=$(pwd)/.venv/bin/python
cmake -S . -B build/cpp -DPython3_EXECUTABLE="$PY" > /dev/null
cmake --build build/cpp -j2 > /dev/null
$PY - "$RUN" <<'PYTHON'
import sys

import ase.io

sys.path.insert(0, "examples")
from md import held_out_structure

ase.io.write(f"{sys.argv[1]}/structure.xyz", held_out_structure(sys.argv[1]), format="extxyz")
PYTHON
echo "megagnn_infer $RUN/model.pt2 $RUN/structure.xyz:"
build/cpp/megagnn_infer "$RUN/model.pt2" "$RUN/structure.xyz" | head -5
