"""The training machinery without Spark: flat gradient buffers, the MPI rendezvous of
separate `mpiexec -n 1` workers, the worker process driven by a task-side WorkerProcess,
snapshot lookup / restore, and the driver's progress formatting."""

import base64
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from s3server import SECRET, local_s3
from test_spark_cluster import model_weights

from caffeonspark import launch, storage, worker
from caffeonspark.comm import FlatBuffer, flat_arrays
from caffeonspark.comm.mpi import transport_env
from engine.blob import Blob
from engine.data import LMDBWriter, array_to_datum
from engine.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]


def test_flat_buffer_gathers_and_scatters():
    blobs = [Blob((2, 3)), Blob((4,))]
    blobs[0].diff[...] = np.arange(6).reshape(2, 3)
    blobs[1].diff[...] = 10
    flat = FlatBuffer(blobs, extra=1)
    flat.gather_diff()
    assert flat.count == 10 and flat.buffer.shape == (11,) and flat.buffer.dtype == np.float32
    np.testing.assert_array_equal(flat.buffer[:10], [0, 1, 2, 3, 4, 5, 10, 10, 10, 10])
    flat.tail[0] = 7
    flat.buffer[:10] *= 2
    flat.scatter_diff(0.5)
    np.testing.assert_array_equal(blobs[0].diff, np.arange(6).reshape(2, 3))
    assert flat.tail[0] == 7  # extras are not scaled
    blobs[1].data[...] = 3
    flat.gather_data()
    blobs[1].data[...] = 0
    flat.scatter_data()
    np.testing.assert_array_equal(blobs[1].data, 3)
    buf, views = flat_arrays([np.ones((2, 2)), np.zeros(3)])
    views[0][...] = 5
    np.testing.assert_array_equal(buf, [5, 5, 5, 5, 0, 0, 0])


def test_flat_buffer_aliases_diffs_unless_shared():
    a, b, c = Blob((2, 2)), Blob((3,)), Blob((4,))
    a.diff[...] = 1
    view = Blob((4,))
    view.set_diff(a.diff.reshape(4))  # a shared parameter seen with another shape
    flat = FlatBuffer([a, b, c])
    assert flat.alias_diffs(others=[a, b, c, view]) == 2
    assert a.diff is not flat._slices[0] and b.diff is flat._slices[1]
    b.diff += 2  # backward accumulating in place lands in the buffer
    flat.gather_diff()
    np.testing.assert_array_equal(flat.buffer, [1, 1, 1, 1, 2, 2, 2, 0, 0, 0, 0])
    flat.buffer[:] = 4
    flat.scatter_diff(0.5)
    np.testing.assert_array_equal(a.diff, 2)
    np.testing.assert_array_equal(view.diff, 2)
    np.testing.assert_array_equal(b.diff, 2)


def test_transport_env():
    env, warning = transport_env("ethernet")
    assert env["UCX_TLS"] == "^ib" and warning is None
    env, warning = transport_env("infiniband", infiniband_present=False)
    assert env["UCX_TLS"] == "^ib" and "no InfiniBand device" in warning
    env, warning = transport_env("infiniband", infiniband_present=True)
    assert "UCX_TLS" not in env and warning is None


_RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    from caffeonspark.comm import mpi
    rank, size, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    path = os.path.join(folder, "ports.json")
    if rank == 0:
        ports = mpi.open_ports(size - 1)
        with open(path + ".tmp", "w") as f:
            json.dump(ports, f)
        os.replace(path + ".tmp", path)
    else:
        while not os.path.exists(path):
            time.sleep(0.02)
        ports = json.load(open(path))
    comm = mpi.join(rank, size, ports)
    buf = np.full(1000, rank + 1, dtype=np.float32)
    comm.allreduce_sum_(buf)
    w = np.arange(4, dtype=np.float32) * (rank == 0)
    comm.bcast_(w)
    print(json.dumps({"rank": comm.rank, "size": comm.size, "sum": float(buf[0]),
                      "bcast": w.tolist(), "mean": comm.allreduce_mean([rank]).tolist()}))
    comm.free()
    """
)


def _mpiexec():
    return os.path.join(os.path.dirname(sys.executable), "mpiexec")


def test_separate_mpiexec_workers_form_one_communicator(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), UCX_LOG_LEVEL="error", UCX_TLS="^ib")
    size = 3
    procs = [
        subprocess.Popen(
            [_mpiexec(), "-n", "1", sys.executable, str(script), str(r), str(size), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        for r in (2, 1, 0)  # start order does not decide the ranks
    ]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=120)
        finally:
            p.kill()
        assert p.returncode == 0, out
        outs.append(json.loads(out.strip().splitlines()[-1]))
    outs.sort(key=lambda o: o["rank"])
    assert [o["rank"] for o in outs] == [0, 1, 2] and all(o["size"] == 3 for o in outs)
    assert all(o["sum"] == 6.0 for o in outs)
    assert all(o["bcast"] == [0, 1, 2, 3] for o in outs)
    assert all(o["mean"] == [1.0] for o in outs)


# --- a worker driven as a task drives it ------------------------------------------------


def _job(tmp_path, max_iter=4, snapshot=0, weights=None, random=False):
    """A 1-rank LeNet job on 40 digits in batches of 8; `random` adds random crops, mirrors,
    a Dropout layer and a smoothed loss (average_loss 3)."""
    d = np.load(REPO / "data" / "digits.npz")
    lmdb = tmp_path / "lmdb"
    with LMDBWriter(str(lmdb)) as db:
        for i in range(40):
            img, lab = d["train_images"][i], d["train_labels"][i]
            db.put(f"{i:08d}", array_to_datum(img[None], int(lab)).SerializeToString())
    net = caffe_pb2.NetParameter()
    text_format.Parse((REPO / "conf/lenet/lenet_train_test.prototxt").read_text(), net)
    for lp in net.layer:
        if lp.type == "Data":
            lp.data_param.source = str(lmdb)
            lp.data_param.batch_size = 8
            if random:
                lp.transform_param.crop_size = 24
                lp.transform_param.mirror = True
    if random:
        at = [lp.name for lp in net.layer].index("relu1") + 1
        layers = list(net.layer)
        drop = caffe_pb2.LayerParameter(name="drop1", type="Dropout", bottom=["ip1"], top=["ip1"])
        del net.layer[:]
        net.layer.extend(layers[:at] + [drop] + layers[at:])
    sp = caffe_pb2.SolverParameter(
        base_lr=0.01,
        lr_policy="fixed",
        max_iter=max_iter,
        display=1,
        snapshot=snapshot,
        random_seed=1,
        type="SGD",
        average_loss=3 if random else 1,
    )
    sp.net_param.CopyFrom(net)
    model = tmp_path / "out" / "m.caffemodel"
    return {
        "size": 1,
        "solver": base64.b64encode(sp.SerializeToString()).decode(),
        "train_layer": "mnist",
        "train_top": "data",
        "validation_layer": None,
        "model": str(model),
        "snapshot_dir": str(model.parent),
        "snapshot_stem": "m",
        "snapshot": None,
        "weights": weights,
        "rendezvous_timeout": 60,
        "specs": {"0": {"kind": "lmdb", "path": str(lmdb), "name": "lmdb", "shard": 0, "num": 1}},
    }


def _env():
    env, _ = launch.worker_env(1, "ethernet")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env["PYTHONPATH"]
    return env


def _join_alone(w):
    """Take a 1-rank worker through hello, ports and placement until it has joined."""
    w.accept(60)
    for _ in range(2):
        w.recv(60, "starting")
    w.channel.send({"kind": "placement", "ports": [], "local_rank": 0, "local_size": 1})
    w.recv(60, "joining")


def _drive(job, workdir, local_rank=0):
    """Play the task's part for a 1-rank job; returns (message kinds, done message, log)."""
    w = launch.WorkerProcess(job, 0, str(workdir), _env())
    try:
        w.accept(60)
        assert w.recv(60, "starting")["kind"] == "hello"
        assert w.recv(60, "ports") == {"kind": "ports", "ports": []}
        w.channel.send(
            {"kind": "placement", "ports": [], "local_rank": local_rank, "local_size": 2}
        )
        assert w.recv(60, "joining")["kind"] == "joined"
        kinds, done = [], None
        while done is None:
            m = w.recv(120, "training")
            kinds.append(m["kind"])
            if m["kind"] == "done":
                done = m
    finally:
        w.stop()
    return kinds, done, Path(w.log_path).read_text()


# What a 1-rank job with max_iter 4 and snapshot 2 leaves in its model folder (stem "m").
FOUR_ITERATIONS_SNAPSHOT_EVERY_2 = [
    "m.caffemodel",
    "m_iter_2.caffemodel",
    "m_iter_2.solverstate",
    "m_iter_4.caffemodel",
    "m_iter_4.solverstate",
    "m_snapshots.json",
]


def _with_max_iter(job, max_iter):
    """The same job (same run) with another max_iter: a stage retry that trains further."""
    sp = caffe_pb2.SolverParameter.FromString(base64.b64decode(job["solver"]))
    sp.max_iter = max_iter
    return dict(job, solver=base64.b64encode(sp.SerializeToString()).decode())


def test_worker_trains_and_reports(tmp_path):
    job = dict(_job(tmp_path, max_iter=4, snapshot=2), pin_cpus=True, threads=1)
    kinds, done, log = _drive(job, tmp_path, local_rank=1)
    cpus = sorted(os.sched_getaffinity(0))
    assert f"pinned to CPU(s) [{cpus[1 % len(cpus)]}]" in log
    assert kinds.count("progress") == 4 and kinds.count("snapshot") == 2
    assert done["iterations"] == 4 and len(done["losses"]) == 4
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == FOUR_ITERATIONS_SNAPSHOT_EVERY_2
    assert worker.latest_snapshot(str(out), "m") == str(out / "m_iter_4.solverstate")


@pytest.mark.parametrize("random", [False, True], ids=["plain", "crop-mirror-dropout"])
def test_stage_retry_resumes_from_the_runs_newest_snapshot(tmp_path, random):
    first = dict(_job(tmp_path, max_iter=4, snapshot=2, random=random), run_id="run-a")
    _drive(first, tmp_path)
    again = _with_max_iter(first, 6)
    _, done, log = _drive(again, tmp_path)  # a retry of run-a: continues at iteration 4
    assert (done["start_iter"], done["iterations"]) == (4, 2)
    assert "stage retry: resuming" in log
    # 4 batches of 8 of the 40 records were read before the snapshot: the retry reads on
    # from there, with the random crops, mirrors and dropout masks the failed attempt would
    # have drawn and its loss window, so it ends where an uninterrupted 6-iteration run ends.
    assert "mnist goes on at record 32 of its shard" in log
    retried = model_weights(again["model"])
    whole_dir = tmp_path / "whole"
    whole_dir.mkdir()
    whole = dict(_job(whole_dir, max_iter=6, random=random), run_id="run-w")
    _, whole_done, _ = _drive(whole, whole_dir)
    assert done["losses"] == whole_done["losses"][4:]
    for name, w in model_weights(whole["model"]).items():
        np.testing.assert_array_equal(retried[name], w, err_msg=name)
    _, done, log = _drive(dict(again, run_id="run-b"), tmp_path)  # another run starts afresh
    assert (done["start_iter"], done["iterations"]) == (0, 6)
    assert "goes on at record" not in log


def _counting_solver(**fields):
    sp = caffe_pb2.SolverParameter(**fields)
    text_format.Parse((REPO / "conf/lenet/lenet_train_test.prototxt").read_text(), sp.net_param)
    for lp in sp.net_param.layer:
        if lp.type == "Data":
            train = lp.include[0].phase == caffe_pb2.TRAIN
            lp.data_param.batch_size = 8 if train else 5
    return sp


@pytest.mark.parametrize(
    ("fields", "iteration", "start", "train", "test"),
    [
        ({}, 7, 0, 56, 0),  # no validation layer: test runs do not count
        ({"test_interval": 3, "test_iter": [2]}, 7, 0, 56, 30),  # tests at 0, 3, 6
        ({"test_interval": 3, "test_iter": [2], "test_initialization": False}, 7, 0, 56, 20),
        ({"test_interval": 3, "test_iter": [2], "iter_size": 2}, 6, 0, 96, 20),  # at 0, 3
        ({"test_interval": 3, "test_iter": [2]}, 10, 5, 40, 20),  # resumed at 5: tests at 6, 9
        ({"test_interval": 3, "test_iter": [2]}, 10, 6, 32, 20),  # at 6 (after a restore), 9
    ],
)
def test_records_a_retry_skips(fields, iteration, start, train, test):
    validation = "mnist" if "test_iter" in fields else None
    job = {"train_layer": "mnist", "validation_layer": validation}
    sp = _counting_solver(**fields)
    got = worker.records_consumed(sp, job, iteration, start)
    assert got == {caffe_pb2.TRAIN: train, caffe_pb2.TEST: test}


def test_snapshots_and_model_on_s3_and_a_retry_resumes_from_there(tmp_path):
    with local_s3() as s3:
        first = dict(
            _job(tmp_path, max_iter=4, snapshot=2),
            run_id="run-s3",
            model=s3.uri("runs/m.caffemodel"),
            snapshot_dir=s3.uri("runs"),
        )
        kinds, done, log = _drive(first, tmp_path)
        assert kinds.count("snapshot") == 2 and done["iterations"] == 4
        assert s3.names("runs") == FOUR_ITERATIONS_SNAPSHOT_EVERY_2
        record = json.loads(storage.read_bytes(s3.uri("runs/m_snapshots.json")))
        (rank0,) = record.pop("ranks")  # what each rank (one here) had at iteration 4
        assert rank0["rng"]["bit_generator"] == "PCG64" and len(rank0["losses"]) == 1
        assert record == {"run": "run-s3", "iter": 4, "state": "m_iter_4.solverstate", "start": 0}
        assert done["snapshots"][-1] == s3.uri("runs/m_iter_4.solverstate")
        assert SECRET not in log
        state = caffe_pb2.SolverState.FromString(
            storage.read_bytes(s3.uri("runs/m_iter_4.solverstate"))
        )
        assert state.learned_net == "m_iter_4.caffemodel"  # found beside the state
        _, done, log = _drive(_with_max_iter(first, 6), tmp_path)  # a retry of run-s3
        assert (done["start_iter"], done["iterations"]) == (4, 2)
        assert "stage retry: resuming" in log and SECRET not in log


def test_worker_error_reaches_the_task_with_its_cause(tmp_path):
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(b"garbage")
    job = _job(tmp_path, weights=str(bad))
    w = launch.WorkerProcess(job, 0, str(tmp_path), _env())
    try:
        _join_alone(w)
        with pytest.raises(launch.LaunchError, match=r"rank 0 on .*bad\.caffemodel"):
            w.recv(120, "training")
    finally:
        w.stop()


def test_rendezvous_times_out_instead_of_hanging(tmp_path):
    job = dict(_job(tmp_path), size=2, rendezvous_timeout=2)  # nobody will connect to rank 0
    w = launch.WorkerProcess(job, 0, str(tmp_path), _env())
    t = time.monotonic()
    try:
        w.accept(60)
        w.recv(60, "starting")
        ports = w.recv(60, "ports")["ports"]
        assert len(ports) == 1
        w.channel.send({"kind": "placement", "ports": ports, "local_rank": 0, "local_size": 1})
        with pytest.raises(launch.LaunchError, match="could not join the MPI communicator in 2 s"):
            w.recv(60, "joining")
        w.proc.wait(timeout=30)
    finally:
        w.stop(grace=0)
    assert time.monotonic() - t < 30


def test_worker_exits_when_its_task_goes_away(tmp_path):
    job = _job(tmp_path, max_iter=100000)
    w = launch.WorkerProcess(job, 0, str(tmp_path), _env())
    try:
        _join_alone(w)
        w.channel.close()  # the task died
        w.proc.wait(timeout=30)
    finally:
        w.stop(grace=0)
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert w.proc.returncode != 0  # it stopped by itself, not by finishing 100000 iterations
    assert str(tmp_path / "job-0.json") not in out, "worker left running"


def test_restore_finds_the_model_beside_the_state(tmp_path):
    from engine.solvers import get_solver

    job = _job(tmp_path)
    sp = caffe_pb2.SolverParameter.FromString(base64.b64decode(job["solver"]))
    sp.snapshot_prefix = str(tmp_path / "a" / "snap")
    (tmp_path / "a").mkdir()
    solver = get_solver(sp)
    solver.step(2)
    model, state = solver.snapshot()
    moved = tmp_path / "moved"
    moved.mkdir()
    os.rename(model, moved / os.path.basename(model))
    os.rename(state, moved / os.path.basename(state))
    fresh = get_solver(sp)
    worker.restore(fresh, f"file://{moved}/snap_iter_2.solverstate", str(tmp_path / "local"))
    assert fresh.iter == 2
    for a, b in zip(fresh.net.learnable_params, solver.net.learnable_params):
        np.testing.assert_array_equal(a.data, b.data)
    os.unlink(moved / "snap_iter_2.caffemodel")
    with pytest.raises(worker.WorkerError, match="snap_iter_2.caffemodel' is missing"):
        worker.restore(get_solver(sp), str(moved / "snap_iter_2.solverstate"), str(tmp_path))


# --- driver-side helpers -----------------------------------------------------------------


def test_channel_round_trip():
    a, b = socket.socketpair()
    closed = []
    ca, cb = launch.Channel(a), launch.Channel(b, on_close=lambda: closed.append(1))
    ca.send({"kind": "x", "n": 1})
    assert cb.recv(5) == {"kind": "x", "n": 1}
    with pytest.raises(TimeoutError):
        cb.recv(0.05)
    ca.close()
    assert cb.recv(5) is None
    time.sleep(0.05)
    assert closed == [1]


def test_format_progress_is_caffe_like():
    line = launch.format_progress(
        {
            "iter": 20,
            "max_iter": 300,
            "loss": 0.5,
            "lr": 0.01,
            "images_per_s": 2000.4,
            "step_ms": 50.0,
            "allreduce_ms": 2.5,
            "wait_ms": 1.0,
        }
    )
    assert line.startswith("Iteration 20/300, loss = 0.5, lr = 0.01, 2000 images/s")
    assert "all-reduce 2.50 ms (5%)" in line and "slowest rank 1.00 ms" in line


def test_spark_failure_message_is_the_tasks_own():
    text = (
        "An error occurred ... org.apache.spark.api.python.PythonException: Traceback ...\n"
        "caffeonspark.launch.LaunchError: rank 1 on host: worker exited (status 1)\n"
        "\tat org.apache.spark..."
    )
    assert launch._spark_failure(Exception(text)) == "rank 1 on host: worker exited (status 1)"


class _FakeSparkContext:
    def __init__(self, **conf):
        self.cancelled = []
        self.conf = {"spark.driver.host": "127.0.0.1", **conf}

    def getConf(self):
        return self.conf

    def cancelJobGroup(self, group):
        self.cancelled.append(group)


def test_monitor_cancels_when_a_rank_does_not_join(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="caffeonspark")
    sc = _FakeSparkContext()
    with launch.Monitor(sc, ranks=2, rendezvous_timeout=0.5, idle_timeout=100) as monitor:
        with socket.create_connection(monitor.address) as s:
            for m in (
                {"kind": "barrier", "rank": 0},
                {"kind": "barrier", "rank": 1},
                {"kind": "joined", "rank": 0},
                {"kind": "progress", "rank": 0, "iter": 0, "max_iter": 5, "loss": 2.3, "lr": 0.01},
            ):
                s.sendall((json.dumps(m) + "\n").encode())
            deadline = time.monotonic() + 10
            while not sc.cancelled and time.monotonic() < deadline:
                time.sleep(0.05)
    assert sc.cancelled == [monitor.group]
    assert "rank(s) [1] did not join the MPI communicator within 0.5 s" in monitor.failure
    assert monitor.first_iteration_at is not None
    assert "Iteration 0/5, loss = 2.3, lr = 0.01" in caplog.text


def test_monitor_cancels_a_silent_stage():
    sc = _FakeSparkContext()
    with launch.Monitor(sc, ranks=1, rendezvous_timeout=100, idle_timeout=0.5) as monitor:
        monitor.receive({"kind": "barrier", "rank": 0})
        monitor.receive({"kind": "joined", "rank": 0})
        deadline = time.monotonic() + 10
        while not sc.cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "no progress from the train stage" in monitor.failure


def test_monitor_follows_a_stage_retry(caplog):
    """After a rank fails, Spark retries the stage: the monitor counts the attempt and does not
    hold the retry to the failed attempt's rendezvous clock."""
    import logging

    caplog.set_level(logging.INFO, logger="caffeonspark")
    sc = _FakeSparkContext(**{"spark.stage.maxConsecutiveAttempts": "3"})
    with launch.Monitor(sc, ranks=2, rendezvous_timeout=0.2, idle_timeout=100) as monitor:
        with socket.create_connection(monitor.address) as s:

            def send(*messages):
                for m in messages:
                    s.sendall((json.dumps(m) + "\n").encode())

            send({"kind": "barrier", "rank": 0}, {"kind": "barrier", "rank": 1})
            send({"kind": "joined", "rank": 0}, {"kind": "joined", "rank": 1})
            line = {"kind": "progress", "rank": 0, "max_iter": 9, "loss": 2.0, "lr": 0.1}
            send(dict(line, iter=3, losses_from=0, losses=[4.0, 3.0, 2.5, 2.0]))
            snap = {"kind": "snapshot", "rank": 0, "path": "/m/x_iter_5.solverstate", "iter": 5}
            send(dict(snap, losses_from=4, losses=[1.9]))
            send(dict(line, iter=6, losses_from=5, losses=[1.8, 1.7]))  # lost with attempt 1
            send({"kind": "failed", "rank": 1, "message": "rank 1 on h: worker exited (status -9)"})
            send({"kind": "failed", "rank": 0, "message": "rank 0 on h: MPI error"})
            send({"kind": "barrier", "rank": 0})  # attempt 2: rank 1 is slow to come back
            time.sleep(1.2)  # a watchdog tick past the first attempt's rendezvous deadline
            send({"kind": "barrier", "rank": 1})
            send({"kind": "joined", "rank": 0}, {"kind": "joined", "rank": 1})
            send(
                {
                    "kind": "resumed",
                    "rank": 0,
                    "path": "/m/x_iter_5.solverstate",
                    "iter": 5,
                    "retry": True,
                }
            )
            send({"kind": "validation", "rank": 0, "iteration": 0, "outputs": {"accuracy": 0.5}})
            send(dict(line, iter=5, losses_from=5, losses=[1.85]))  # attempt 2 from iteration 5
            time.sleep(0.3)
        assert monitor.attempt == 2 and not sc.cancelled
        assert monitor.validation == {0: {"iteration": 0, "outputs": {"accuracy": 0.5}}}
        # The run's losses: attempt 1's up to the retry's snapshot, then attempt 2's.
        assert monitor.losses == {0: 4.0, 1: 3.0, 2: 2.5, 3: 2.0, 4: 1.9, 5: 1.85, 6: 1.7}
        assert not any("losses" in r for r in monitor.metrics)  # the displayed loss only
    log = caplog.text
    assert "rank 1 failed: rank 1 on h: worker exited (status -9)" in log
    assert log.count("the train stage failed (attempt 1)") == 1  # once, for the first failure
    assert "maxConsecutiveAttempts = 3" in log
    assert "retrying the train stage: attempt 2" in log
    assert "stage retry: resuming from /m/x_iter_5.solverstate at iteration 5" in log


def test_a_long_spill_is_reported_while_it_runs():
    reports = []
    items = launch._counting(iter(range(5)), reports.append, every_s=0.0)
    assert list(items) == [0, 1, 2, 3, 4]  # passed through whole
    assert [r["items"] for r in reports] == [1, 2, 3, 4, 5]
    assert all(r["kind"] == "spilling" and r["seconds"] >= 0 for r in reports)
    reports.clear()
    assert list(launch._counting(iter(range(5)), reports.append, every_s=60.0)) == [0, 1, 2, 3, 4]
    assert reports == []  # a quick spill says nothing until it is done


def test_monitor_shows_the_tasks_spill(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="caffeonspark")
    with launch.Monitor(_FakeSparkContext(), 2, 100, 100) as monitor:
        with socket.create_connection(monitor.address) as s:
            for m in (
                {"kind": "spilling", "rank": 1, "items": 250000, "seconds": 10.0},
                {
                    "kind": "spilled",
                    "rank": 1,
                    "host": "h1",
                    "seconds": 12.5,
                    "records": {"0": 300000, "1": 2000},
                },
                {
                    "kind": "spilled",
                    "rank": 0,
                    "host": "h0",
                    "seconds": 0.2,
                    "records": {"0": None},
                },
            ):
                s.sendall((json.dumps(m) + "\n").encode())
            time.sleep(0.3)
    log = caplog.text
    assert "rank 1: 250000 rows of its data read so far (25000/s, 10 s), still spilling" in log
    assert (
        "rank 1 on h1: its data is ready (300000 training records, 2000 validation records) "
        "after 12.5 s" in log
    )
    assert "rank 0 on h0: its data is ready after 0.2 s" in log


@pytest.mark.parametrize("master", ["yarn", "spark://h:7077", "local-cluster[2,1,1024]"])
def test_dynamic_allocation_is_refused_before_anything_starts(master):
    from caffeonspark import Config

    sc = _FakeSparkContext(**{"spark.master": master, "spark.dynamicAllocation.enabled": "true"})
    with pytest.raises(launch.LaunchError, match="spark.dynamicAllocation.enabled=false"):
        launch.cluster_size(sc, Config())


def test_progress_board_lines_for_test_and_features_passes(caplog, monkeypatch):
    import logging

    caplog.set_level(logging.INFO, logger="caffeonspark")
    monkeypatch.setattr(launch, "PROGRESS_EVERY_S", 0.0)  # a line for every report
    board = launch.ProgressBoard(_FakeSparkContext())
    try:
        pid = board.add("features of layer 'd'", partitions=2)
        other = board.add("test of layer 'd'", partitions=1)
        for m in (
            {"kind": "records", "pass": pid, "rank": 0, "done": 0},  # the tasks start
            {"kind": "records", "pass": pid, "rank": 1, "done": 0},
            {"kind": "records", "pass": pid, "rank": 0, "done": 20},
            {"kind": "records", "pass": pid, "rank": 1, "done": 30},
            {"kind": "records", "pass": pid, "rank": 1, "done": 10},  # a retried task
            {"kind": "records", "pass": pid, "rank": 0, "done": 52, "final": True},
            {"kind": "records", "pass": "unknown", "rank": 0, "done": 99, "final": True},
            {"kind": "records", "pass": other, "rank": 0, "done": 7, "final": True},
        ):
            board.receive(m)
        assert "features of layer 'd': 50 records" in caplog.text
        assert "features of layer 'd': 30 records" in caplog.text  # rank 1 starts again
        assert "features of layer 'd': 62 records, " in caplog.text
        assert "1 of 2 partitions finished" in caplog.text
        assert "test of layer 'd': 7 records in" in caplog.text
        assert ": 99 records" not in caplog.text  # the unknown pass is ignored
        board.receive({"kind": "records", "pass": pid, "rank": 1, "done": 51, "final": True})
        assert "features of layer 'd': 103 records in" in caplog.text
        # Evaluated again (a lazy DataFrame): counted afresh.
        board.receive({"kind": "records", "pass": pid, "rank": 0, "done": 5})
        assert "features of layer 'd': 5 records, " in caplog.text
    finally:
        board.close()


def _refused(address):
    try:
        socket.create_connection(tuple(address), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_one_progress_listener_per_application():
    # Shared by every CaffeOnSpark object (a lazy features DataFrame may run after its object
    # is gone); a new SparkContext's application gets a new one and the old port closes.
    sc = _FakeSparkContext()
    sc.applicationId = "app-1"
    board = launch.progress_board(sc)
    try:
        assert launch.progress_board(sc) is board and not _refused(board.address)
        sc.applicationId = "app-2"
        again = launch.progress_board(sc)
        assert again is not board and _refused(board.address)
    finally:
        launch.progress_board(sc).close()
        launch._board.update(app=None, board=None)


def test_record_reporter_throttles_but_always_sends_the_final_count(monkeypatch):
    got = []
    monkeypatch.setattr(launch, "_reporter", lambda address, rank: got.append)
    progress = launch.record_reporter(("h", 1), "p1", 3)
    progress(0)  # the start: sent
    for done in range(10, 100, 10):
        progress(done)  # within TASK_REPORT_EVERY_S of the start: not sent
    progress(95, final=True)
    progress(None)
    assert got == [
        {"kind": "records", "pass": "p1", "done": 0, "final": False},
        {"kind": "records", "pass": "p1", "done": 95, "final": True},
        None,
    ]


def _free_port():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def test_driver_listeners_take_ports_from_the_configured_list():
    port = _free_port()
    sc = _FakeSparkContext(**{launch.DRIVER_PORTS_CONF: f"{port}-{port + 1}"})
    board = launch.ProgressBoard(sc)
    try:
        with launch.Monitor(sc, ranks=1, rendezvous_timeout=10, idle_timeout=10) as monitor:
            taken = {board.address[1], monitor.address[1]}
            assert taken == {port, port + 1}
            with pytest.raises(launch.LaunchError, match=r"every port of spark\.caffeonspark"):
                launch.ProgressBoard(sc)  # a third listener: the list is used up
    finally:
        board.close()


@pytest.mark.parametrize("spec", ["abc", "40100-x", "0", "70000", ""])
def test_driver_ports_setting_is_checked(spec):
    sc = _FakeSparkContext(**{launch.DRIVER_PORTS_CONF: spec})
    if not spec:  # unset / empty: any free port
        assert launch._driver_ports(sc) == [0]
        return
    with pytest.raises(launch.LaunchError, match="expected ports such as 40100-40120"):
        launch._driver_ports(sc)


def test_a_local_model_path_on_a_cluster_is_flagged(tmp_path, caplog):
    import logging

    from caffeonspark import Config, api

    caplog.set_level(logging.WARNING, logger="caffeonspark")
    local = Config(model=str(tmp_path / "m.caffemodel"))
    api._note_local_model(_FakeSparkContext(**{"spark.master": "local-cluster[2,1,1024]"}), local)
    api._note_local_model(_FakeSparkContext(**{"spark.master": "yarn"}), Config(model="hdfs:///m"))
    assert not caplog.text
    api._note_local_model(_FakeSparkContext(**{"spark.master": "yarn"}), local)
    assert "m.caffemodel is a local path and the master is yarn" in caplog.text
    caplog.clear()
    # After training: rank 0's host wrote it where this driver cannot see it.
    api._check_model_seen(local.model_uri, "node7")
    assert "rank 0 wrote the model on host node7 at " in caplog.text
    caplog.clear()
    (tmp_path / "m.caffemodel").write_bytes(b"")
    api._check_model_seen(local.model_uri, "node7")
    api._check_model_seen("hdfs:///m/m.caffemodel", "node7")
    assert not caplog.text
