"""Launching distributed training: one Spark barrier stage of one task per rank; each task
spills its data shard, starts its engine worker under `mpiexec -n 1`, and the ranks meet
through `BarrierTaskContext.allGather` (rank 0's MPI ports) to form one communicator.

The driver checks the cluster has the slots first (a clear error, not a hang), runs a small
TCP server that prints the workers' progress while they train, and cancels the stage when a
rank does not join in time or the job stops reporting. Tasks kill their workers on any exit.
"""

import json
import logging
import os
import queue
import re
import select
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile

log = logging.getLogger("caffeonspark")

WORKER_MODULE = "caffeonspark.worker"
_LOG_TAIL_LINES = 40


class LaunchError(RuntimeError):
    """Distributed training could not start or a rank failed (names rank, host and cause).
    `fatal`: the job's own error (e.g. a bad prototxt or weights file), which a stage retry
    would only repeat."""

    fatal = False


# --- a JSON-lines channel over a socket (task <-> worker, anyone -> driver) --------------------


class Channel:
    """JSON messages, one per line, over a connected socket. A reader thread queues incoming
    messages; `recv(timeout)` returns the next one, None once the peer has closed."""

    def __init__(self, sock, on_close=None):
        self.sock = sock
        self._send_lock = threading.Lock()
        self._queue = queue.Queue()
        self._on_close = on_close
        self._reader = threading.Thread(target=self._read, name="channel reader", daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, address, timeout=30.0, on_close=None):
        sock = socket.create_connection(tuple(address), timeout=timeout)
        sock.settimeout(None)
        return cls(sock, on_close)

    def _read(self):
        try:
            with self.sock.makefile("r", encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        self._queue.put(json.loads(line))
        except (OSError, ValueError):
            pass
        self._queue.put(None)
        if self._on_close is not None:
            self._on_close()

    def send(self, message):
        data = (json.dumps(message) + "\n").encode("utf-8")
        with self._send_lock:
            self.sock.sendall(data)

    def recv(self, timeout=None):
        """The next message; raises TimeoutError after `timeout` seconds; None on close."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message within {timeout:.0f} s") from None

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# --- the driver side ------------------------------------------------------------------------


def spark_master(sc):
    return sc.getConf().get("spark.master", "")


def _expected_executors(sc):
    conf = sc.getConf()
    m = re.match(r"local-cluster\[\s*(\d+)\s*,", spark_master(sc))
    if m:
        return int(m.group(1))
    if spark_master(sc).startswith("local"):
        return 1
    n = conf.get("spark.executor.instances", None)
    return int(n) if n else None


def executor_count(sc):
    """Executors registered with the driver (the driver itself in local mode)."""
    if spark_master(sc).startswith("local") and not spark_master(sc).startswith("local-cluster"):
        return 1
    try:
        return max(0, sc._jsc.sc().getExecutorMemoryStatus().size() - 1)
    except Exception:  # noqa: BLE001 - py4j internals; fall back to the status tracker
        return max(0, len(sc.statusTracker().getExecutorInfos()) - 1)


def task_slots(sc):
    """Tasks the cluster can run at once (what a barrier stage needs)."""
    try:
        jsc = sc._jsc.sc()
        profile = jsc.resourceProfileManager().defaultResourceProfile()
        return int(jsc.maxNumConcurrentTasks(profile))
    except Exception:  # noqa: BLE001 - private JVM API; estimate from the configuration
        conf = sc.getConf()
        cores = int(conf.get("spark.executor.cores", "1"))
        cpus = int(conf.get("spark.task.cpus", "1"))
        return executor_count(sc) * max(1, cores // cpus)


def wait_for_executors(sc, timeout):
    """Wait (up to `timeout` s) until the executors the cluster is configured with have
    registered; returns how many there are."""
    expected = _expected_executors(sc)
    deadline = time.monotonic() + timeout
    while True:
        have = executor_count(sc)
        if (expected is None and have > 0) or (expected is not None and have >= expected):
            return have
        if time.monotonic() >= deadline:
            return have
        # Executor registration has no Python-side event to wait on: poll the JVM.
        time.sleep(0.25)


def cluster_size(sc, conf):
    """The number of executors to train on: -clusterSize, or every executor the cluster
    has; fails fast when the cluster cannot run that many tasks at once."""
    master = spark_master(sc)
    dynamic = sc.getConf().get("spark.dynamicAllocation.enabled", "false").lower() == "true"
    if dynamic and not (master == "local" or master.startswith("local[")):
        raise LaunchError(
            "training runs as a Spark barrier stage, which does not work with dynamic "
            "allocation (spark.dynamicAllocation.enabled=true here): submit with "
            "--conf spark.dynamicAllocation.enabled=false and a fixed --num-executors"
        )
    have = wait_for_executors(sc, conf.executorWaitTimeout)
    size = conf.clusterSize or have
    if size < 1:
        raise LaunchError(
            f"the cluster has no executors (master {spark_master(sc)}) after waiting "
            f"{conf.executorWaitTimeout:.0f} s"
        )
    tasks = size * conf.devices
    slots = task_slots(sc)
    if slots < tasks:
        cpus = sc.getConf().get("spark.task.cpus", "1")
        raise LaunchError(
            f"-clusterSize {size} x -devices {conf.devices} needs {tasks} concurrent tasks, but "
            f"the cluster has {have} executor(s) with {slots} task slot(s) in all "
            f"(spark.task.cpus={cpus}, master {spark_master(sc)}); lower -clusterSize or add "
            "executors"
        )
    return size


class _Handler(socketserver.StreamRequestHandler):
    def handle(self):
        for raw in self.rfile:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                message = json.loads(line)
            except ValueError:
                continue
            self.server.monitor.receive(message)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


DRIVER_PORTS_CONF = "spark.caffeonspark.driverPorts"


def _driver_ports(sc):
    """The ports the driver's listeners may take: spark.caffeonspark.driverPorts (e.g.
    "40100-40120" or "40100,40105", for a firewall that opens only those), else any."""
    spec = sc.getConf().get(DRIVER_PORTS_CONF, None)
    if not spec:
        return [0]
    ports = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            ports.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        ports = []
    if not ports or not all(0 < port < 65536 for port in ports):
        raise LaunchError(
            f"{DRIVER_PORTS_CONF}={spec!r}: expected ports such as 40100-40120 or 40100,40105"
        )
    return ports


def _listen(sc, monitor):
    """A TCP server on the driver whose messages go to monitor.receive, and its address as
    the executors reach it."""
    ports = _driver_ports(sc)
    for port in ports:
        try:
            server = _Server(("0.0.0.0", port), _Handler)
            break
        except OSError:
            continue
    else:
        raise LaunchError(
            f"every port of {DRIVER_PORTS_CONF} ({ports[0]}-{ports[-1]}, {len(ports)} in all) "
            "is in use: the driver needs one per training run and one per CaffeOnSpark object"
        )
    server.monitor = monitor
    host = sc.getConf().get("spark.driver.host", None) or socket.gethostname()
    return server, (host, server.server_address[1])


class Monitor:
    """The driver's view of a running stage: a TCP server the tasks and workers report to,
    progress printed as it arrives, and a watchdog that cancels the stage (through its job
    group) when ranks do not join in time or nothing is reported for too long."""

    # What goes into the metrics file (JSON lines): one record per event, with time and attempt.
    METRIC_KINDS = ("progress", "validation", "snapshot", "resumed", "failed")

    def __init__(self, sc, ranks, rendezvous_timeout, idle_timeout, label="train", metrics=None):
        self.sc = sc
        self.metrics_uri = metrics
        self.metrics = []  # the events of METRIC_KINDS as received, + time and attempt
        self._losses = {}  # iteration -> rank 0's loss, from progress and snapshot messages
        self.ranks = ranks
        self.rendezvous_timeout = rendezvous_timeout
        self.idle_timeout = idle_timeout
        self.label = label
        self.group = f"caffeonspark-{label}-{uuid.uuid4().hex[:8]}"
        self.started = time.monotonic()
        self.first_iteration_at = None
        self.joined = set()
        self.waiting = set()
        self.at_barrier = None
        self.failure = None
        self.attempt = 1
        self.attempt_failed = False
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server, self.address = _listen(sc, self)

    def __enter__(self):
        threading.Thread(
            target=self._server.serve_forever, name="caffeonspark monitor", daemon=True
        ).start()
        threading.Thread(target=self._watch, name="caffeonspark watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self.write_metrics()

    def add_summary(self, record):
        """End the metrics file with the run's summary."""
        with self._lock:
            self.metrics.append(dict(record, kind="summary", time=round(time.time(), 3)))
        self.write_metrics()

    def write_metrics(self):
        """(Re)write the metrics file, atomically like the snapshots: at every snapshot and
        at the end, so that it also works where files cannot be appended to (HDFS, S3)."""
        if not self.metrics_uri:
            return
        from caffeonspark import storage

        with self._lock:
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.metrics)
        try:
            storage.write_bytes(self.metrics_uri, text.encode("utf-8"))
        except storage.StorageError as e:
            log.warning("metrics file not written: %s", e)

    def receive(self, m):
        with self._lock:
            self._last = time.monotonic()
            kind = m.get("kind")
            retrying = kind == "barrier" and self.attempt_failed
            if retrying:
                self.attempt += 1
                self.attempt_failed = False
            first_failure = kind == "failed" and not self.attempt_failed
            fatal = kind == "failed" and m.get("fatal") and self.failure is None
            if fatal:
                self.failure = m.get("message")
            if kind == "failed":
                # Spark retries the stage: its ranks start, meet and join again.
                self.attempt_failed = True
                self.joined.clear()
                self.waiting.clear()
                self.at_barrier = None
            elif kind == "barrier":
                self.waiting.add(m.get("rank"))
                if len(self.waiting) == self.ranks and self.at_barrier is None:
                    self.at_barrier = time.monotonic()  # every rank has spilled its data
            elif kind == "joined":
                self.joined.add(m.get("rank"))
            elif kind == "progress" and self.first_iteration_at is None:
                self.first_iteration_at = time.monotonic()
            if "losses" in m:  # kept apart: the metrics file has the displayed losses only
                m = dict(m)
                first, values = int(m.pop("losses_from")), m.pop("losses")
                self._losses.update(zip(range(first, first + len(values)), values))
            if kind in self.METRIC_KINDS:
                self.metrics.append(dict(m, time=round(time.time(), 3), attempt=self.attempt))
        if retrying:
            log.warning("retrying the %s stage: attempt %d", self.label, self.attempt)
        if kind == "progress":
            log.info("%s", format_progress(m))
        elif kind == "failed":
            log.error("rank %s failed: %s", m.get("rank"), str(m.get("message")).splitlines()[0])
            if fatal:
                log.error(
                    "cancelling the %s stage: the job's own error, a retry would repeat it",
                    self.label,
                )
                self.sc.cancelJobGroup(self.group)
            elif first_failure and self.failure is None:
                attempts = self.sc.getConf().get("spark.stage.maxConsecutiveAttempts", "4")
                log.warning(
                    "the %s stage failed (attempt %d); Spark retries it while attempts are "
                    "left (spark.stage.maxConsecutiveAttempts = %s), resuming from the run's "
                    "newest snapshot",
                    self.label,
                    self.attempt,
                    attempts,
                )
        elif kind == "spilling":
            rate = m["items"] / m["seconds"] if m["seconds"] > 0 else 0.0
            log.info(
                "rank %s: %d rows of its data read so far (%.0f/s, %.0f s), still spilling",
                m.get("rank"),
                m["items"],
                rate,
                m["seconds"],
            )
        elif kind == "spilled":
            log.info("rank %s on %s: %s", m.get("rank"), m.get("host"), format_spilled(m))
        elif kind == "resumed":
            how = "stage retry: resuming" if m.get("retry") else "resuming"
            log.info("%s from %s at iteration %d", how, m["path"], m["iter"])
        elif kind == "validation":
            values = ", ".join(f"{k} = {_fmt(v)}" for k, v in m["outputs"].items())
            log.info("Iteration %d, validation: %s", m["iteration"], values)
        elif kind == "snapshot":
            log.info("Snapshot written: %s", m["path"])
            self.write_metrics()
        elif kind == "joined" and len(self.joined) == self.ranks:
            log.info("All %d ranks joined the MPI communicator", self.ranks)
        elif kind == "warning":
            log.warning("rank %s: %s", m.get("rank"), m.get("message"))

    @property
    def losses(self):
        """iteration -> loss over every attempt of the stage (the latest wins)."""
        with self._lock:
            return dict(self._losses)

    @property
    def validation(self):
        """iteration -> validation row, over every attempt of the stage (the latest wins)."""
        with self._lock:
            rows = [m for m in self.metrics if m["kind"] == "validation"]
        return {
            m["iteration"]: {"iteration": m["iteration"], "outputs": m["outputs"]} for m in rows
        }

    def _watch(self):
        while not self._stop.wait(1.0):
            now = time.monotonic()
            with self._lock:
                reason = None
                if (
                    self.at_barrier is not None
                    and len(self.joined) < self.ranks
                    and now - self.at_barrier > self.rendezvous_timeout
                ):
                    missing = sorted(set(range(self.ranks)) - self.joined)
                    reason = (
                        f"rank(s) {missing} did not join the MPI communicator within "
                        f"{self.rendezvous_timeout:g} s of every rank reaching the barrier"
                    )
                elif len(self.joined) == self.ranks and now - self._last > self.idle_timeout:
                    reason = (
                        f"no progress from the {self.label} stage for {self.idle_timeout:g} s "
                        "(-idleTimeout)"
                    )
            if reason:
                self.failure = reason
                log.error("cancelling the %s stage: %s", self.label, reason)
                self.sc.cancelJobGroup(self.group)
                return


PROGRESS_EVERY_S = 10.0  # a driver line per pass at most this often (and one at the end)
SPILL_REPORT_EVERY_S = 10.0  # a training task reports its data spill at most this often
TASK_REPORT_EVERY_S = 2.0  # a task reports its record count at most this often


class ProgressBoard:
    """The driver's view of test / features passes: each partition reports how many records it
    has run; a line every PROGRESS_EVERY_S and one when every partition has finished. One per
    Spark application (progress_board)."""

    def __init__(self, sc):
        self.passes = {}
        self._lock = threading.Lock()
        self._server, self.address = _listen(sc, self)
        threading.Thread(
            target=self._server.serve_forever, name="caffeonspark progress", daemon=True
        ).start()

    def add(self, label, partitions):
        """Register a pass; returns its id for the tasks' reports."""
        pass_id = uuid.uuid4().hex[:12]
        self.passes[pass_id] = _PassProgress(label, partitions)
        return pass_id

    def receive(self, m):
        progress = self.passes.get(m.get("pass"))
        if m.get("kind") == "records" and progress is not None:
            with self._lock:
                progress.update(m.get("rank"), m["done"], m.get("final", False))

    def close(self):
        self._server.shutdown()
        self._server.server_close()


_board = {"app": None, "board": None}
_board_lock = threading.Lock()


def progress_board(sc):
    """The driver's one ProgressBoard, shared by every CaffeOnSpark object of the Spark
    application (a features DataFrame is lazy: it may run long after the object that made it
    is gone); a new application (a new SparkContext) gets a new one, the old one closed."""
    app = sc.applicationId
    with _board_lock:
        if _board["board"] is None or _board["app"] != app:
            if _board["board"] is not None:
                _board["board"].close()
            _board.update(app=app, board=ProgressBoard(sc))
        return _board["board"]


class _PassProgress:
    def __init__(self, label, partitions):
        self.label = label
        self.partitions = partitions
        self._reset()

    def _reset(self):
        self.done = {}  # partition -> records run (a retried task starts its count again)
        self.finished = set()
        self.started = None
        self.last_line = None

    def update(self, partition, done, final):
        now = time.monotonic()
        if self.started is None:
            self.started = self.last_line = now
        self.done[partition] = done
        if final:
            self.finished.add(partition)
        records = sum(self.done.values())
        rate = records / max(now - self.started, 1e-9)
        if len(self.finished) == self.partitions:
            log.info(
                "%s: %d records in %.1f s, %.0f records/s",
                self.label,
                records,
                now - self.started,
                rate,
            )
            self._reset()  # the same lazy DataFrame may be evaluated again
        elif now - self.last_line >= PROGRESS_EVERY_S:
            self.last_line = now
            log.info(
                "%s: %d records, %.0f records/s, %d of %d partitions finished",
                self.label,
                records,
                rate,
                len(self.finished),
                self.partitions,
            )


def record_reporter(address, pass_id, partition):
    """progress(done, final=False) for a task of a pass: reports the first call (the task's
    start, for the driver's records/s), then at most every TASK_REPORT_EVERY_S, and always
    the final count; progress(None) closes."""
    send = _reporter(address, partition)
    last = [None]

    def progress(done, final=False):
        if done is None:
            send(None)
            return
        now = time.monotonic()
        if final or last[0] is None or now - last[0] >= TASK_REPORT_EVERY_S:
            last[0] = now
            send({"kind": "records", "pass": pass_id, "done": int(done), "final": final})

    return progress


def _fmt(v):
    if isinstance(v, list):
        return "[" + ", ".join(f"{x:.6g}" for x in v) + "]"
    return f"{v:.6g}"


def format_spilled(m):
    """What a training task's data came to: records per shard (when known) and the time."""
    names = {"0": "training", "1": "validation"}
    parts = [
        f"{count} {names.get(tag, tag)} records"
        for tag, count in sorted(m.get("records", {}).items())
        if count is not None
    ]
    counted = f" ({', '.join(parts)})" if parts else ""
    return f"its data is ready{counted} after {m['seconds']:.1f} s"


def format_progress(m):
    """A Caffe-style progress line for the driver's log."""
    parts = [
        f"Iteration {m['iter']}/{m['max_iter']}",
        f"loss = {m['loss']:.6g}",
        f"lr = {m['lr']:.6g}",
    ]
    if m.get("images_per_s"):
        parts.append(f"{m['images_per_s']:.0f} images/s")
    if m.get("step_ms"):
        share = 100.0 * m["allreduce_ms"] / m["step_ms"]
        parts.append(
            f"{m['step_ms']:.1f} ms/iter: all-reduce {m['allreduce_ms']:.2f} ms ({share:.0f}%), "
            f"waiting for the slowest rank {m.get('wait_ms', 0.0):.2f} ms"
        )
    return ", ".join(parts)


def run_stage(spark, rdd, task, monitor):
    """Run the barrier stage `rdd.barrier().mapPartitions(task)` under the monitor's job group;
    returns the collected results or raises LaunchError with the cause.

    The results go through a shuffle (`repartition(1)`) so that the barrier stage is a
    shuffle-map stage: Spark retries a failed one (up to spark.stage.maxConsecutiveAttempts),
    and the retry resumes from the run's newest snapshot. A failed barrier *result* stage is
    never retried ("Could not recover from a failed barrier ResultStage")."""
    sc = spark.sparkContext
    sc.setJobGroup(monitor.group, f"CaffeOnSpark {monitor.label}", interruptOnCancel=True)
    try:
        return rdd.barrier().mapPartitions(task).repartition(1).collect()
    except Exception as e:  # noqa: BLE001 - Py4JJavaError / PythonException from Spark
        if monitor.failure:
            raise LaunchError(monitor.failure) from None
        raise LaunchError(_spark_failure(e)) from None
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
        sc.setLocalProperty("spark.job.description", None)


def _spark_failure(exc):
    """The useful part of a Spark job failure: the task's own error message if present."""
    text = str(exc)
    m = re.search(r"caffeonspark\.launch\.LaunchError: (.*?)(?:\n\tat |\Z)", text, re.S)
    if m:
        return m.group(1).strip()
    m = re.search(r"(\w+(?:Error|Exception): .*?)(?:\n\tat |\Z)", text, re.S)
    return (m.group(1) if m else text).strip()[:4000]


# --- the task side (runs in an executor) ----------------------------------------------------


def _local_dir():
    for var in ("SPARK_LOCAL_DIRS", "LOCAL_DIRS"):
        first = os.environ.get(var, "").split(",")[0]
        if first and os.path.isdir(first):
            return first
    return tempfile.gettempdir()


def mpiexec_path():
    """pip's mpich installs mpiexec beside the interpreter; else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("mpiexec")
    if not found:
        raise LaunchError(
            f"mpiexec not found beside {sys.executable} nor on PATH: pip install mpich"
        )
    return found


def worker_env(threads, connection):
    """The worker's environment: import path of this task, BLAS threads, MPI transport."""
    from caffeonspark.comm.mpi import transport_env
    from engine import BLAS_ENV_DEFAULTS

    env = dict(os.environ)
    paths = [p for p in sys.path if p]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    for var, value in BLAS_ENV_DEFAULTS.items():
        env.setdefault(var, value)
    transport, warning = transport_env(connection)
    env.update(transport)
    return env, warning


def _tail(path, lines=_LOG_TAIL_LINES):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


class WorkerProcess:
    """One engine worker under `mpiexec -n 1`, its log file and its control channel."""

    def __init__(self, job, rank, workdir, env):
        self.rank = rank
        self.workdir = workdir
        self.log_path = os.path.join(workdir, f"worker-{rank}.log")
        self.listener = socket.create_server(("127.0.0.1", 0))
        job = dict(
            job,
            rank=rank,
            control=["127.0.0.1", self.listener.getsockname()[1]],
            task_pid=os.getpid(),
            workdir=workdir,
        )
        spec_path = os.path.join(workdir, f"job-{rank}.json")
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(job, f)
        cmd = [mpiexec_path(), "-n", "1", sys.executable, "-m", WORKER_MODULE, spec_path]
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
            start_new_session=True,
        )
        self.channel = None

    def accept(self, timeout):
        """Wait for the worker to connect its control channel (or die)."""
        deadline = time.monotonic() + timeout
        while self.channel is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.error(f"worker did not start within {timeout:.0f} s")
            ready, _, _ = select.select([self.listener], [], [], min(left, 0.5))
            if ready:
                sock, _ = self.listener.accept()
                self.channel = Channel(sock)
            elif self.proc.poll() is not None:
                raise self.error(f"worker exited with status {self.proc.returncode} at start")
        return self.channel

    def recv(self, timeout, waiting_for):
        """The next message from the worker; LaunchError if it dies, errs or stays silent."""
        try:
            m = self.channel.recv(timeout)
        except TimeoutError:
            raise self.error(
                f"no message from the worker for {timeout:.0f} s while {waiting_for}"
            ) from None
        if m is None:
            self.proc.wait(timeout=10)
            raise self.error(f"worker exited (status {self.proc.returncode}) while {waiting_for}")
        if m.get("kind") == "error":
            error = self.error(m["message"], tail=False)
            error.fatal = bool(m.get("fatal"))
            raise error
        return m

    def error(self, message, tail=True):
        text = f"rank {self.rank} on {socket.gethostname()}: {message}"
        lines = _tail(self.log_path) if tail else ""
        if lines.strip():
            text += f"\n--- last lines of the worker log ({self.log_path}) ---\n{lines}"
        return LaunchError(text)

    def stop(self, grace=10.0):
        if self.channel is not None:
            self.channel.close()
        self.listener.close()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                continue
        self.log_file.close()


def make_barrier_task(job, localizers, timeouts, monitor_address, connection, threads):
    """The barrier task: a closure over plain values (the job dict, localizers, numbers).

    `localizers` maps a tag (0: training shard, 1: validation shard) to a localizer; the
    partition's items arrive as ((partition, tag, seq), item) pairs when there are several
    tags, plain items otherwise.
    """
    rendezvous_timeout, idle_timeout = timeouts

    def task(items):
        from pyspark import BarrierTaskContext

        ctx = BarrierTaskContext.get()
        rank = ctx.partitionId()
        host = socket.gethostname()
        workdir = tempfile.mkdtemp(prefix=f"caffeonspark-rank{rank}-", dir=_local_dir())
        report = _reporter(monitor_address, rank)
        worker = None
        try:
            spill_started = time.monotonic()
            counted = _counting(items, report, SPILL_REPORT_EVERY_S)
            specs = _localize(counted, localizers, workdir, rank, job["size"])
            report(
                {
                    "kind": "spilled",
                    "host": host,
                    "seconds": time.monotonic() - spill_started,
                    "records": {tag: spec.get("count") for tag, spec in specs.items()},
                }
            )
            env, warning = worker_env(threads, connection)
            if warning:
                report({"kind": "warning", "message": warning})
            worker_job = dict(job, specs=specs)
            worker = WorkerProcess(worker_job, rank, workdir, env)
            worker.accept(rendezvous_timeout)
            worker.recv(rendezvous_timeout, "starting")  # hello
            ports = None
            if rank == 0:
                ports = worker.recv(rendezvous_timeout, "opening MPI ports")["ports"]
            report({"kind": "barrier", "host": host})
            gathered = ctx.allGather(json.dumps({"rank": rank, "host": host, "ports": ports}))
            peers = [json.loads(g) for g in gathered]
            local = [p["rank"] for p in peers if p["host"] == host]
            worker.channel.send(
                {
                    "kind": "placement",
                    "ports": peers[0]["ports"],
                    "local_rank": local.index(rank),
                    "local_size": len(local),
                    "hosts": sorted({p["host"] for p in peers}),
                }
            )
            m = worker.recv(rendezvous_timeout, "joining the MPI communicator")
            if m.get("kind") != "joined":
                raise worker.error(f"unexpected message {m} while joining")
            report({"kind": "joined", "host": host})
            result = None
            while result is None:
                m = worker.recv(idle_timeout, "training")
                if m.get("kind") == "done":
                    result = m
                else:
                    report(m)
            yield json.dumps(dict(result, host=host))
        except Exception as e:  # noqa: BLE001 - anything else: name the rank and host
            if isinstance(e, LaunchError):
                error = e
            elif worker is not None:
                error = worker.error(f"{type(e).__name__}: {e}")
            else:
                error = LaunchError(f"rank {rank} on {host}: {type(e).__name__}: {e}")
            # A fatal error goes to the driver whole: it cancels the stage with it.
            message = str(error) if error.fatal else str(error).splitlines()[0]
            report({"kind": "failed", "message": message, "fatal": error.fatal})
            raise error from None
        finally:
            if worker is not None:
                worker.stop()
            report(None)
            shutil.rmtree(workdir, ignore_errors=True)

    return task


def _counting(items, report, every_s):
    """`items`, passed through, reporting {"kind": "spilling", "items": n, "seconds": t} at
    most every `every_s` s: a large DataFrame shard takes minutes to spill before training
    can start, and the driver should say so meanwhile."""
    started = last = time.monotonic()
    n = 0
    for n, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            report({"kind": "spilling", "items": n, "seconds": now - started})


def _localize(items, localizers, workdir, rank, size):
    """Run each tag's localizer over its share of the partition; returns {tag: spec}."""
    if len(localizers) == 1:
        return {"0": localizers[0](items, workdir, rank, size)}
    import itertools

    specs = {}
    groups = itertools.groupby(items, key=lambda kv: kv[0][1])
    for tag, group in groups:
        specs[str(tag)] = localizers[tag]((item for _, item in group), workdir, rank, size)
    for tag, localizer in localizers.items():
        if str(tag) not in specs:
            specs[str(tag)] = localizer(iter(()), workdir, rank, size)
    return specs


def tag_partitions(rdds, num):
    """One RDD of `num` partitions holding partition i of every RDD in `rdds` (tagged by the
    RDD's index, in order), for a barrier stage that needs a training and a validation shard."""
    tagged = None
    for tag, rdd in enumerate(rdds):

        def add_keys(index, it, tag=tag):
            for seq, item in enumerate(it):
                yield (index, tag, seq), item

        part = rdd.mapPartitionsWithIndex(add_keys)
        tagged = part if tagged is None else tagged.union(part)
    return tagged.repartitionAndSortWithinPartitions(num, lambda key: key[0])


def _reporter(address, rank):
    """send(message) to the driver's monitor (best effort); send(None) closes."""
    state = {"sock": None, "broken": address is None}

    def send(message):
        if message is None:
            if state["sock"] is not None:
                state["sock"].close()
            return
        if state["broken"]:
            return
        try:
            if state["sock"] is None:
                state["sock"] = socket.create_connection(tuple(address), timeout=10)
            payload = dict(message, rank=rank)
            state["sock"].sendall((json.dumps(payload) + "\n").encode("utf-8"))
        except OSError:
            state["broken"] = True

    return send


def ship_packages(spark):
    """Send the engine and caffeonspark packages to the executors (sc.addPyFile), so a
    cluster needs only the dependencies installed, not this project. CAFFEONSPARK_SHIP_CODE=0
    skips it (the executors have the packages installed)."""
    import caffeonspark
    import engine

    if os.environ.get("CAFFEONSPARK_SHIP_CODE", "1") == "0":
        return
    path = os.path.join(tempfile.mkdtemp(prefix="caffeonspark-code-"), "caffeonspark_code.zip")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for package in (engine, caffeonspark):
            root = os.path.dirname(os.path.dirname(os.path.abspath(package.__file__)))
            top = os.path.dirname(os.path.abspath(package.__file__))
            for folder, dirs, files in os.walk(top):
                dirs[:] = [d for d in dirs if d != "__pycache__"]
                for name in files:
                    if name.endswith((".py", ".proto")):
                        full = os.path.join(folder, name)
                        z.write(full, os.path.relpath(full, root))
    spark.sparkContext.addPyFile(path)


def run_job(name, run):
    """A spark-submit job's body: logging set up, a SparkSession named `name`, the code
    shipped, run(spark) -> exit status; the project's own errors (bad flags, sources,
    launch) print as one line `name: message` and exit 1. Spark stops at the end."""
    from caffeonspark.config import ConfigError
    from caffeonspark.sources import SourceError

    job_logging()
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.appName(name).getOrCreate()
    try:
        ship_packages(spark)
        return run(spark)
    except (ConfigError, SourceError, LaunchError) as e:
        print(f"{name.lower()}: {e}", file=sys.stderr)
        return 1
    finally:
        spark.stop()


def job_logging():
    """INFO lines on stderr for a job's driver (py4j's chatter left out)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s] %(message)s", stream=sys.stderr
    )
    logging.getLogger("py4j").setLevel(logging.WARNING)
