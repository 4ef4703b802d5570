#!/usr/bin/env bash
# The README's main job: LeNet on the bundled digits (data/digits.npz) on a local Spark
# cluster of 2 executors (1 core, 1 GB each): train, extract features, test.
#
#   jobs/demo.sh [extra flags for jobs/caffeonspark.py]
#
# Writes work/digits_{train,test}_lmdb (once, with data/prepare_digits.py), work/lenet.caffemodel
# (+ snapshots beside it) and work/lenet_features (JSON). Runs from the repository root.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# The project's virtualenv (scripts/env.sh makes it), else the python on PATH (Docker images).
PY="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
SPARK_SUBMIT="${SPARK_SUBMIT:-$(dirname "$PY")/spark-submit}"
[[ -x "$SPARK_SUBMIT" ]] || SPARK_SUBMIT="$(command -v spark-submit)"
export PYSPARK_PYTHON="$PY" PYSPARK_DRIVER_PYTHON="$PY"
mkdir -p work

# The LMDBs the Caffe way (IDX files, then convert_mnist_data); existing ones are kept.
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" data/prepare_digits.py work

exec "$SPARK_SUBMIT" \
  --master "${MASTER:-local-cluster[2,1,1024]}" \
  --driver-memory 1g \
  --properties-file conf/spark-defaults.conf \
  jobs/caffeonspark.py \
  -train -features ip2 -label label -test \
  -conf conf/lenet/lenet_solver.prototxt \
  -model work/lenet.caffemodel \
  -output work/lenet_features -outputFormat json \
  -clusterSize 2 -connection ethernet \
  "$@"
