"""Fault tolerance on a real local Spark cluster: a training worker killed mid-run fails the
barrier stage, Spark retries it, and the retry resumes from the run's newest snapshot. Its data
goes on from the records the failed attempt had read (the snapshots fall inside the shards'
epochs), with the random crops, mirrors and dropout masks it would have drawn, so the retry
sees what an uninterrupted run sees and must end with its weights."""

import json
import os
import re
import signal
import threading
import time

import numpy as np
import pytest
from google.protobuf import text_format
from test_spark_cluster import digits, model_weights, start_spark, write_lmdb, write_solver

from caffeonspark import CaffeOnSpark, Config, DataSource
from engine.proto import caffe_pb2

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.xdist_group("spark")]


@pytest.fixture(scope="module")
def spark():
    # Retries allowed, as conf/spark-defaults.conf has them.
    session = start_spark("caffeonspark-retry-tests", **{"spark.stage.maxConsecutiveAttempts": "2"})
    yield session
    session.stop()


def worker_pids(rank, folder):
    """Engine workers of `rank` of a run writing under `folder` (their command line names
    job-<rank>.json, whose model is the run's)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        specs = [a.decode() for a in args if a.endswith(f"job-{rank}.json".encode())]
        if b"caffeonspark.worker" not in args or not specs:
            continue
        try:
            with open(specs[0], encoding="utf-8") as f:
                model = json.load(f)["model"]
        except (OSError, ValueError, KeyError):
            continue
        if model.startswith(str(folder)):
            pids.append(int(entry))
    return pids


def add_randomness(net_path):
    """Random crops and mirrors in both data layers and a Dropout after relu1: the random
    streams a retry must go on with."""
    net = text_format.Parse(net_path.read_text(), caffe_pb2.NetParameter())
    layers = list(net.layer)
    for lp in layers:
        if lp.type == "Data":
            lp.transform_param.crop_size = 24
            lp.transform_param.mirror = True
    at = [lp.name for lp in layers].index("relu1") + 1
    drop = caffe_pb2.LayerParameter(name="drop1", type="Dropout", bottom=["ip1"], top=["ip1"])
    del net.layer[:]
    net.layer.extend(layers[:at] + [drop] + layers[at:])
    net_path.write_text(text_format.MessageToString(net))


def kill_when(path, rank, killed, stop):
    """SIGKILL rank's worker (a host lost mid-run) once `path` exists."""
    while not stop.is_set():
        if path.exists():
            pids = worker_pids(rank, path.parent.parent)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed.extend(pids)
            return
        time.sleep(0.005)


def test_killed_worker_stage_retry_resumes_from_the_newest_snapshot(spark, tmp_path, caplog):
    images, labels = digits(168)  # two shards of 84 = 5.25 batches of 16
    train = write_lmdb(tmp_path / "train_lmdb", images, labels)
    test = write_lmdb(tmp_path / "test_lmdb", *digits(26, "test"))  # 13 a rank, batches of 10
    runs = {}
    for name in ("whole", "killed"):
        folder = tmp_path / name
        folder.mkdir()
        solver = write_solver(
            folder,
            train,
            test,
            16,
            max_iter=300,
            snapshot=50,
            display=50,
            test_interval=50,
            test_iter=1,
        )
        add_randomness(folder / "net.prototxt")
        conf = Config(spark, conf=solver, model=str(folder / "model" / "lenet.caffemodel"))
        killed, stop = [], threading.Event()
        if name == "killed":
            snap = folder / "model" / "lenet_iter_100.solverstate"
            threading.Thread(target=kill_when, args=(snap, 1, killed, stop), daemon=True).start()
        cos = CaffeOnSpark(spark)
        try:
            frame = cos.trainWithValidation(
                DataSource.get(conf, is_train=True), DataSource.get(conf, is_train=False)
            )
            runs[name] = (cos.last_summary, frame.orderBy("iteration").collect())
        finally:
            stop.set()
        if name == "killed":
            assert killed, "rank 1's worker was not found to kill"
    (whole, whole_rows), (retried, retried_rows) = runs["whole"], runs["killed"]
    # Validation rows of both attempts, as many as an uninterrupted run gives.
    assert [r.iteration for r in retried_rows] == [r.iteration for r in whole_rows]
    assert [r.iteration for r in whole_rows] == list(range(0, 301, 50))
    for a, b in zip(retried_rows, whole_rows):
        assert a.accuracy == pytest.approx(b.accuracy, abs=1e-6)
        assert a.loss == pytest.approx(b.loss, rel=1e-4, abs=1e-6)
    assert whole.iterations == whole.final_iter == 300
    # The loss of every iteration, the failed attempt's included, as the uninterrupted run's.
    assert len(retried.losses) == len(whole.losses) == 300
    np.testing.assert_allclose(retried.losses, whole.losses, rtol=1e-4, atol=1e-6)
    log = caplog.text  # what the driver showed about the failure and the retry
    assert re.search(r"rank 1 failed: rank 1 on .*: worker exited \(status -9\)", log)
    assert "the train stage failed (attempt 1); Spark retries it" in log
    assert "retrying the train stage: attempt 2" in log
    m = re.search(
        r"stage retry: resuming from \S*lenet_iter_(\d+)\.solverstate at iteration (\d+)", log
    )
    assert m and m.group(1) == m.group(2) and int(m.group(1)) >= 100
    assert retried.final_iter == 300 and retried.iterations == 300 - int(m.group(1))
    assert f"trained {retried.iterations} iterations ({m.group(1)} to 300) on 2 rank(s)" in log
    metrics = tmp_path / "killed" / "model" / "lenet_metrics.jsonl"
    records = [json.loads(line) for line in metrics.open()]
    failed = [r for r in records if r["kind"] == "failed"]
    assert failed and failed[0]["attempt"] == 1 and "status -9" in failed[0]["message"]
    resumed = [r for r in records if r["kind"] == "resumed"]
    assert [(r["attempt"], r["iter"], r["retry"]) for r in resumed] == [(2, int(m.group(1)), True)]
    ref = model_weights(whole.model)
    for name, w in model_weights(retried.model).items():
        np.testing.assert_allclose(w, ref[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_the_jobs_own_error_is_not_retried(spark, tmp_path, caplog):
    """A bad -weights file fails the same way every time: the stage is cancelled with the
    worker's error instead of being retried."""
    from caffeonspark import LaunchError

    images, labels = digits(32)
    train = write_lmdb(tmp_path / "train_lmdb", images, labels)
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(b"not a model")
    solver = write_solver(tmp_path, train, train, 16)
    conf = Config(spark, conf=solver, model=str(tmp_path / "m.caffemodel"), weights=str(bad))
    with pytest.raises(LaunchError, match=r"rank 0 on .*bad\.caffemodel"):
        CaffeOnSpark(spark).train(DataSource.get(conf, is_train=True))
    assert "cancelling the train stage: the job's own error" in caplog.text
    assert "retrying the train stage" not in caplog.text
