#!/usr/bin/env bash
# The main job: set up, generate the default EMT data, preprocess it to HDF5 shards,
# pretrain a small PaiNN, evaluate it on the held-out split, compile it into an inference
# package, run NVE MD with the package through ASE and one structure through the C++ runner.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup.sh
PY=.venv/bin/python
RUN=${RUN:-runs/quickstart}
if [ ! -f data/emt/raw.extxyz ]; then
  $PY tools/generate_emt_data.py -o data/emt/raw.extxyz -n 1500
fi
if [ ! -f data/emt/processed/dataset.json ]; then
  $PY tools/preprocess_data.py data/emt/raw.extxyz -o data/emt/processed --cutoff 5.0
fi
.venv/bin/torchrun --nproc_per_node=1 -m megagnn.pretrain --config configs/quickstart.yaml \
  --set "train.out_dir=$RUN" "$@"
$PY -m megagnn.evaluate --run "$RUN" --split test --json "$RUN/test_metrics.json"
$PY tools/convert_checkpoint.py package "$RUN" "$RUN/model.pt2"
$PY examples/md.py --run "$RUN" --model "$RUN/model.pt2" --steps 200 --dt 1.0
bash examples/cpp/run.sh "$RUN"
