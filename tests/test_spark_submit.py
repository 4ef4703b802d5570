"""The spark-submit entry point end to end (jobs/caffeonspark.py on local-cluster[2,1,1024]):
-train, then -features to JSON, then -test, as the README's main job runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from engine.data import LMDBWriter, array_to_datum
from engine.proto import caffe_pb2

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.xdist_group("spark")]

REPO = Path(__file__).resolve().parents[1]


def _lmdb(path, split, n):
    d = np.load(REPO / "data" / "digits.npz")
    with LMDBWriter(str(path)) as db:
        for i in range(n):
            img, lab = d[f"{split}_images"][i], d[f"{split}_labels"][i]
            db.put(f"{i:08d}", array_to_datum(img[None], int(lab)).SerializeToString())


def test_spark_submit_train_features_test(tmp_path):
    _lmdb(tmp_path / "train_lmdb", "train", 256)
    _lmdb(tmp_path / "test_lmdb", "test", 57)
    net = caffe_pb2.NetParameter()
    text_format.Parse((REPO / "conf/lenet/lenet_train_test.prototxt").read_text(), net)
    for lp in net.layer:
        if lp.type == "Data":
            train = lp.include[0].phase == caffe_pb2.TRAIN
            lp.data_param.source = "train_lmdb" if train else "test_lmdb"  # relative to cwd
            lp.data_param.batch_size = 32 if train else 10
    (tmp_path / "net.prototxt").write_text(text_format.MessageToString(net))
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 0.01 momentum: 0.9 lr_policy: "fixed" display: 5 '
        'max_iter: 20 snapshot_prefix: "lenet" type: "SGD" random_seed: 1'
    )
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "spark-submit"),
        "--master", "local-cluster[2,1,1024]",
        "--properties-file", str(REPO / "conf" / "spark-defaults.conf"),
        str(REPO / "jobs" / "caffeonspark.py"),
        "-train", "-features", "ip2", "-label", "label", "-test",
        "-conf", "solver.prototxt", "-model", "out/lenet.caffemodel",
        "-output", "out/features", "-outputFormat", "json", "-clusterSize", "2",
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trained 20 iterations on 2 rank(s)" in run.stdout
    assert "features of 57 records written" in run.stdout
    accuracy = [line for line in run.stdout.splitlines() if line.startswith("accuracy = ")]
    assert accuracy and 0.0 <= float(accuracy[0].split("=")[1]) <= 1.0
    # spark-submit merges the Python driver's stderr (the log) into its stdout.
    assert "Iteration 5/20, loss = " in run.stdout  # progress reached the driver while training
    rows = [
        json.loads(line)
        for part in (tmp_path / "out" / "features").glob("part-*.json")
        for line in part.read_text().splitlines()
    ]
    assert len(rows) == 57 and all(len(r["ip2"]) == 10 for r in rows)
    # -label's blob is one more feature column: a one-element array, as in CaffeOnSpark
    labels = np.load(REPO / "data" / "digits.npz")["test_labels"][:57]
    assert sorted(r["label"] for r in rows) == sorted([float(x)] for x in labels)
    assert (tmp_path / "out" / "lenet.caffemodel").is_file()
    assert (tmp_path / "out" / "lenet_iter_20.solverstate").is_file()


def test_spark_submit_bad_flags_exit_2(tmp_path):
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable)
    cmd = [sys.executable, str(REPO / "jobs" / "caffeonspark.py"), "-train", "-conf", "x"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "x: cannot read solver prototxt" in run.stderr
