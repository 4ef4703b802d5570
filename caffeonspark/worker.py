"""The per-rank training process: started by a barrier task under `mpiexec -n 1`, it joins
the MPI communicator, builds the engine Solver over its data shard and trains.

Caffe's multi-GPU rule: rank 0's weights (and solver state) are broadcast first; after every
backward the gradients of all ranks are summed in one all-reduce of a flat buffer and divided
by the number of ranks; every rank runs exactly max_iter iterations. Rank 0 writes snapshots
and the final model. The worker talks to its task over a local socket (progress, validation,
the result) and exits at once if the task goes away.

Usage (by caffeonspark.launch): python -m caffeonspark.worker JOB.json
"""

import base64
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from typing import NamedTuple

import numpy as np

log = logging.getLogger("caffeonspark.worker")

HEARTBEAT_S = 5.0
PROGRESS_EVERY_S = 10.0  # progress cadence when the solver's display is 0


class WorkerError(RuntimeError):
    """A failure inside a worker (the task reports it with the rank and host)."""


class RetryPoint(NamedTuple):
    """Where a stage retry goes on: this run's newest snapshot (the .solverstate's URI), its
    iteration, the iteration the run began at, and what each rank had at that snapshot
    beyond the solver state (see Worker.rank_state; None when the record has none)."""

    state: str
    iter: int
    start: int
    ranks: list | None = None


class Worker:
    """One rank of a training job described by the task's job dict."""

    def __init__(self, job):
        self.job = job
        self.rank = int(job["rank"])
        self.size = int(job["size"])
        self.workdir = job["workdir"]
        self.started = time.time()
        self.finished = False
        self.channel = None
        self.local_rank, self.local_size = 0, 1
        self.validation_rows = []
        self.snapshots = []
        self.retry = None
        self.run_start = 0
        self.snapshot_every = 0
        self._rank_states = None
        self.start_iter, self._losses_sent = 0, 0
        self.losses = []
        # True while the solver is built from the job's own files (prototxt, sources, -weights,
        # -snapshot): a failure then is the job's, and a stage retry would fail the same way.
        self.setting_up = False
        self._last_beat = 0.0

    # --- the control channel -------------------------------------------------------------------
    def _task_gone(self):
        if not self.finished:
            # The task (and with it the stage) is gone: nobody will read our results.
            os._exit(3)

    def send(self, kind, **fields):
        self.channel.send(dict(fields, kind=kind))

    def beat(self, iteration):
        now = time.monotonic()
        if now - self._last_beat >= HEARTBEAT_S:
            self._last_beat = now
            self.send("heartbeat", iter=int(iteration))

    # --- the whole run -----------------------------------------------------------------------
    def run(self):
        from caffeonspark.launch import Channel

        self.channel = Channel.connect(self.job["control"], on_close=self._task_gone)
        self.send("hello", pid=os.getpid())
        comm = self.join(float(self.job["rendezvous_timeout"]))
        self.send("joined")
        self.setting_up = True
        self.retry = self.find_retry(comm)
        solver = self.build_solver()
        self.initial_state(solver, comm)
        self.resume_rank_state(solver)
        summary = self.train(solver, comm)
        self.finished = True
        self.send("done", **summary)
        comm.free()

    def _rendezvous_expired(self, timeout):
        log.error("rank %d: no MPI communicator after %g s; exiting", self.rank, timeout)
        try:
            self.send("error", message=f"could not join the MPI communicator in {timeout:g} s")
        finally:
            os._exit(4)

    def join(self, timeout):
        """Open (rank 0) or receive the ports, then grow the communicator; the MPI calls
        block without a timeout of their own, so a timer ends the process if they take longer
        than `timeout` s."""
        from caffeonspark.comm import mpi

        if self.rank == 0:
            ports = mpi.open_ports(self.size - 1)
            self.send("ports", ports=ports)
        # The placement comes once every task has spilled its data (allGather): no timeout
        # here; if the task goes away instead, the channel closes and the worker exits.
        m = self.channel.recv()
        if m is None or m.get("kind") != "placement":
            raise WorkerError(f"expected the placement from the task, got {m!r}")
        if self.rank != 0:
            ports = m["ports"]
        self.local_rank, self.local_size = int(m["local_rank"]), int(m["local_size"])
        if self.job.get("pin_cpus"):
            self.pin_cpus()
        timer = threading.Timer(timeout, self._rendezvous_expired, args=(timeout,))
        timer.daemon = True
        timer.start()
        t = time.perf_counter()
        comm = mpi.join(self.rank, self.size, ports)
        timer.cancel()
        if self.rank == 0:
            mpi.close_ports(ports)
        log.info("rank %d of %d joined in %.3f s", self.rank, self.size, time.perf_counter() - t)
        return comm

    def pin_cpus(self):
        """Bind this worker to its own `threads` CPUs of the host (-pinCpus): local rank k
        gets CPUs [k * threads, (k + 1) * threads) of those the process may use."""
        cpus = sorted(os.sched_getaffinity(0))
        threads = max(1, int(self.job.get("threads", 1)))
        start = (self.local_rank * threads) % len(cpus)
        mine = {cpus[(start + i) % len(cpus)] for i in range(min(threads, len(cpus)))}
        os.sched_setaffinity(0, mine)
        log.info(
            "rank %d (local rank %d): pinned to CPU(s) %s", self.rank, self.local_rank, sorted(mine)
        )

    # --- the solver ----------------------------------------------------------------------------
    def solver_param(self):
        """The job's SolverParameter adapted to this rank (data layers fed from the shards,
        snapshots on rank 0 only, seed + rank as Caffe's multi-GPU solvers)."""
        from caffeonspark.config import solver_test_net, solver_train_net
        from caffeonspark.sources import rewrite_net
        from engine.proto import caffe_pb2

        job = self.job
        param = caffe_pb2.SolverParameter.FromString(base64.b64decode(job["solver"]))
        validation = job.get("validation_layer")
        if validation is None:
            del param.test_iter[:]
            del param.test_net_param[:]
            del param.test_state[:]
            param.test_interval = 0
        else:
            del param.test_iter[1:]
            del param.test_net_param[1:]
            del param.test_state[1:]
        train_net = solver_train_net(param)
        train_net.CopyFrom(rewrite_net(train_net, job["train_layer"], caffe_pb2.TRAIN))
        if validation is not None:
            test_net = solver_test_net(param)
            test_net.CopyFrom(rewrite_net(test_net, validation, caffe_pb2.TEST))
        self.snapshot_every = int(param.snapshot)
        if self.rank == 0:
            folder = os.path.join(self.workdir, "snapshots")
            os.makedirs(folder, exist_ok=True)
            param.snapshot_prefix = os.path.join(folder, job["snapshot_stem"])
        else:
            param.snapshot = 0
            param.snapshot_after_train = False
        if param.random_seed >= 0:
            param.random_seed += self.rank
        return param

    def build_solver(self):
        from caffeonspark.sources import SourceFactory, open_spec
        from engine.proto import caffe_pb2
        from engine.solvers import get_solver

        job = self.job
        param = self.solver_param()
        retry = self.retry
        consumed = records_consumed(param, job, *((retry.iter, retry.start) if retry else (0, 0)))
        factory = SourceFactory()
        opened = [(job["train_layer"], caffe_pb2.TRAIN, job["specs"]["0"])]
        if job.get("validation_layer") is not None:
            opened.append((job["validation_layer"], caffe_pb2.TEST, job["specs"]["1"]))
        for layer, phase, spec in opened:
            source = open_spec(spec)
            if len(source) == 0:
                raise WorkerError(
                    f"rank {self.rank}: its shard of {spec['name']} is empty (the source has "
                    f"fewer records than the {self.size} ranks)"
                )
            if consumed[phase]:
                # A stage retry goes on where the failed attempt's data stood at its snapshot
                # (and draws the random crops and mirrors it drew from there).
                skip = consumed[phase] % len(source)
                log.info("rank %d: %s goes on at record %d of its shard", self.rank, layer, skip)
                source.go_on_at(consumed[phase])
            factory.add(layer, phase, source)
        factory.install()
        return get_solver(param)

    def find_retry(self, comm):
        """This run's RetryPoint when Spark retries the stage, else None: rank 0 reads the
        run's record and tells the other ranks."""
        found = retry_snapshot(self.job) if self.rank == 0 else None
        return comm.bcast_object(found)

    def initial_state(self, solver, comm):
        """Rank 0 resumes / fine-tunes; then weights, history and iteration are broadcast."""
        from caffeonspark.comm import FlatBuffer, flat_arrays

        if self.rank == 0:
            self.load_start_point(solver)
        self.setting_up = False  # from here on a failure may be the cluster's: Spark retries
        solver.iter, solver.current_step = comm.bcast_object(
            (solver.iter, solver.current_step) if self.rank == 0 else None
        )
        # The iteration this run began at (kept through retries): where its data started.
        self.run_start = self.retry.start if self.retry else int(solver.iter)
        weights = FlatBuffer(solver.net.learnable_params)
        if self.rank == 0:
            weights.gather_data()
        comm.bcast_(weights.buffer)
        weights.scatter_data()
        history, views = flat_arrays(solver.history)
        if self.rank == 0:
            for view, h in zip(views, solver.history):
                view[...] = h
        comm.bcast_(history)
        for view, h in zip(views, solver.history):
            h[...] = view

    @staticmethod
    def rank_state(solver):
        """What a rank has beyond the solver state that a retry needs to go on as the failed
        attempt did: the engine's random stream (Dropout and the like) and the window of
        losses behind the smoothed loss (average_loss)."""
        from engine import rng

        losses, smoothed = solver.loss_window()
        return {"rng": rng.get_state(), "losses": losses, "smoothed_loss": smoothed}

    def resume_rank_state(self, solver):
        """On a stage retry, go on with this rank's rank_state at the snapshot."""
        from engine import rng

        states = self.retry.ranks if self.retry else None
        if not states:
            return
        if len(states) != self.size:
            log.warning(
                "rank %d: the snapshot holds the state of %d ranks, not %d: random streams "
                "and the smoothed loss start afresh",
                self.rank,
                len(states),
                self.size,
            )
            return
        mine = states[self.rank]
        rng.set_state(mine["rng"])
        solver.resume_loss_window(mine["losses"], mine["smoothed_loss"])

    def load_start_point(self, solver):
        from caffeonspark import storage

        job = self.job
        state = job.get("snapshot")
        retry = self.retry.state if self.retry else None
        if retry:
            log.info(
                "stage retry: resuming from this run's newest snapshot %s", storage.shown(retry)
            )
            state = retry
        if state:
            # CaffeOnSpark's `-snapshot S -weights M` resumes S with M's weights; a retry's
            # snapshot carries this run's own weights.
            model = job.get("weights") if not retry else None
            restore(solver, state, os.path.join(self.workdir, "resume"), model)
            log.info("resumed from %s at iteration %d", storage.shown(state), solver.iter)
            self.send(
                "resumed", path=storage.shown(state), iter=int(solver.iter), retry=bool(retry)
            )
        elif job.get("weights"):
            for uri in job["weights"].split(","):
                local = storage.fetch(uri, self.workdir)
                solver.net.copy_from(local)
                log.info("fine-tuning from %s", storage.shown(uri))

    # --- training ------------------------------------------------------------------------------
    def train(self, solver, comm):
        from caffeonspark import storage
        from caffeonspark.comm import FlatBuffer

        job = self.job
        size = self.size
        max_iter = int(solver.param.max_iter)
        start_iter = solver.iter
        top = job["train_top"]
        per_rank = int(solver.net.blobs[top].shape[0]) * int(solver.param.iter_size)
        grads = FlatBuffer(solver.net.learnable_params, extra=1)
        aliased = grads.alias_diffs(solver.net.net_params)
        scale = 1.0 / size
        stamps, reduce_times, wait_times = [], [], []
        last = {"t": time.perf_counter(), "iter": start_iter, "reduce": 0.0}
        display = int(solver.param.display)
        self.loss = float("nan")
        self.losses = []
        self.start_iter, self._losses_sent = start_iter, 0
        log.info(
            "rank %d: %d parameters in %d blobs (%.1f MB all-reduced per iteration, %d blobs "
            "computed in place in the buffer), batch %d per rank",
            self.rank,
            grads.count,
            len(grads.blobs),
            grads.nbytes / 1e6,
            aliased,
            per_rank,
        )

        def on_gradients_ready(s):
            grads.gather_diff()
            grads.tail[0] = s.smoothed_loss
            # The barrier splits the time lost waiting for the slowest rank (load imbalance)
            # from the all-reduce itself; it costs one small message round.
            t = time.perf_counter()
            comm.barrier()
            t1 = time.perf_counter()
            comm.allreduce_sum_(grads.buffer)
            now = time.perf_counter()
            wait_times.append(t1 - t)
            reduce_times.append(now - t1)
            grads.scatter_diff(scale)
            self.loss = float(grads.tail[0]) * scale
            self.losses.append(self.loss)
            stamps.append(now)
            self.beat(s.iter)
            if self.snapshot_every and (s.iter + 1) % self.snapshot_every == 0:
                # Rank 0 snapshots after this update: its record keeps every rank's state
                # as it stands now (nothing draws or adds a loss in between), for a retry.
                self._rank_states = (s.iter + 1, comm.gather_object(self.rank_state(s)))
            if self.rank != 0:
                return
            last_iter = s.iter == max_iter - 1
            due = (display and s.iter % display == 0) or (
                not display and now - last["t"] >= PROGRESS_EVERY_S
            )
            if s.iter == start_iter or due or last_iter:
                self.progress(s, now, last, per_rank, max_iter, reduce_times, wait_times)

        solver.on_gradients_ready.append(on_gradients_ready)
        if job.get("validation_layer") is not None:
            solver.on_tested.append(lambda s, net_id, scores: self._average_scores(s, comm, scores))
        if self.rank == 0:
            solver.on_snapshot.append(self._upload_snapshot)
        solver.step(max_iter - solver.iter)
        interval = solver.param.test_interval
        if job.get("validation_layer") is not None and interval and solver.iter % interval == 0:
            solver.test_all()  # Caffe's Solve() tests once more after the last iteration
        if self.rank == 0:
            if solver.param.snapshot_after_train and (
                not solver.param.snapshot or solver.iter % solver.param.snapshot != 0
            ):
                solver.snapshot()
            storage.write_bytes(job["model"], solver.net.to_proto().SerializeToString())
            log.info("wrote the trained model to %s", storage.shown(job["model"]))
        return self.summary(start_iter, solver.iter, stamps, reduce_times, wait_times, per_rank)

    def progress(self, s, now, last, per_rank, max_iter, reduce_times, wait_times):
        n = s.iter - last["iter"]
        message = {
            "iter": int(s.iter),
            "max_iter": max_iter,
            "loss": self.loss,
            "lr": float(s.lr),
            "elapsed_s": time.time() - self.started,
        }
        if n > 0:
            dt = now - last["t"]
            message.update(
                images_per_s=n * per_rank * self.size / dt,
                step_ms=1e3 * dt / n,
                allreduce_ms=1e3 * sum(reduce_times[-n:]) / n,
                wait_ms=1e3 * sum(wait_times[-n:]) / n,
            )
        last.update(t=now, iter=s.iter)
        self.send("progress", **message, **self._new_losses())

    def _new_losses(self):
        """The losses not yet sent to the driver (rank 0's progress and snapshot messages
        carry them, so that the run's loss curve outlives a failed attempt)."""
        sent, self._losses_sent = self._losses_sent, len(self.losses)
        return {"losses_from": self.start_iter + sent, "losses": self.losses[sent:]}

    def summary(self, start_iter, end_iter, stamps, reduce_times, wait_times, per_rank):
        n = len(stamps)
        warm = min(5, n // 4)
        steady = np.diff(stamps[warm:]) if n - warm > 1 else np.array([])
        cut = warm + 1 if n - warm > 1 else 0
        reduce = np.asarray(reduce_times[cut:])
        wait = np.asarray(wait_times[cut:])
        step_s = float(steady.mean()) if steady.size else float("nan")
        median = float(np.median(steady)) if steady.size else float("nan")
        return {
            "rank": self.rank,
            "ranks": self.size,
            "start_iter": int(start_iter),
            "iterations": int(end_iter - start_iter),
            "final_iter": int(end_iter),
            "loss": self.loss,
            "batch_per_rank": per_rank,
            "step_s": step_s,
            "allreduce_s": float(reduce.mean()) if reduce.size else 0.0,
            "wait_s": float(wait.mean()) if wait.size else 0.0,
            "losses": self.losses,
            "images_per_s": per_rank * self.size / step_s if steady.size else float("nan"),
            "step_median_s": median,
            "worker_start_to_first_iter_s": (stamps[0] - self._perf0()) if stamps else None,
            "model": self.job["model"],
            "snapshots": self.snapshots,
            "validation": self.validation_rows,
        }

    def _perf0(self):
        # perf_counter value at process start, from the wall-clock start time.
        return time.perf_counter() - (time.time() - self.started)

    def _average_scores(self, solver, comm, scores):
        """Validation: each rank tests its own shard; the scores are averaged over ranks
        (every rank tests at the same iteration, so all of them join this all-reduce)."""
        names = list(scores)
        flat = [np.atleast_1d(np.asarray(scores[n], dtype=np.float64)).ravel() for n in names]
        sizes = [f.size for f in flat]
        mean = comm.allreduce_mean(np.concatenate(flat))
        out, pos = {}, 0
        for name, k in zip(names, sizes):
            v = mean[pos : pos + k]
            out[name] = float(v[0]) if k == 1 and np.ndim(scores[name]) == 0 else v.tolist()
            pos += k
        self.beat(solver.iter)
        if self.rank == 0:
            row = {"iteration": int(solver.iter), "outputs": out}
            self.validation_rows.append(row)
            self.send("validation", **row)
        return out

    def _upload_snapshot(self, solver, model_file, state_file):
        """Rank 0's snapshots go to the model's folder (atomically), named like Caffe's."""
        from caffeonspark import storage
        from engine.proto import caffe_pb2

        folder = self.job["snapshot_dir"]
        model_uri = storage.join(folder, os.path.basename(model_file))
        state_uri = storage.join(folder, os.path.basename(state_file))
        storage.put_file(model_file, model_uri)
        with open(state_file, "rb") as f:
            state = caffe_pb2.SolverState.FromString(f.read())
        state.learned_net = os.path.basename(model_file)
        storage.write_bytes(state_uri, state.SerializeToString())
        os.unlink(model_file)
        os.unlink(state_file)
        self.snapshots.append(state_uri)
        # The name only: the folder's URI may carry credentials, which stay out of files.
        name = os.path.basename(state_file)
        record = {
            "run": self.job.get("run_id"),
            "iter": int(solver.iter),
            "state": name,
            "start": self.run_start,
        }
        if self._rank_states is not None and self._rank_states[0] == solver.iter:
            record["ranks"] = self._rank_states[1]
        storage.write_bytes(snapshot_record(self.job), json.dumps(record).encode("utf-8"))
        self.send(
            "snapshot", path=storage.shown(state_uri), iter=int(solver.iter), **self._new_losses()
        )
        return model_uri, state_uri


# --- snapshots ---------------------------------------------------------------------------------


def snapshot_record(job):
    """`<stem>_snapshots.json` beside the model: the run that wrote the newest snapshot."""
    from caffeonspark import storage

    return storage.join(job["snapshot_dir"], f"{job['snapshot_stem']}_snapshots.json")


def metrics_file(job):
    """`<stem>_metrics.jsonl` beside the model: the driver's record of the run's events."""
    from caffeonspark import storage

    return storage.join(job["snapshot_dir"], f"{job['snapshot_stem']}_metrics.jsonl")


def retry_snapshot(job):
    """The RetryPoint of the newest snapshot written by this very run (same run_id), when
    Spark retries the stage after a failure; None on a first attempt."""
    from caffeonspark import storage

    if not job.get("run_id"):
        return None
    uri = snapshot_record(job)
    try:
        record = json.loads(storage.read_bytes(uri))
    except (storage.StorageError, ValueError):
        return None
    name = record.get("state")
    if record.get("run") != job["run_id"] or not name:
        return None
    state = storage.join(job["snapshot_dir"], name)
    if not storage.exists(state):
        return None
    return RetryPoint(
        state, int(record.get("iter", 0)), int(record.get("start", 0)), record.get("ranks")
    )


def records_consumed(param, job, iteration, start):
    """Records each rank's train and validation data layers have read when a run that began
    at iteration `start` stands at `iteration` ({phase: count}): iter_size batches per
    iteration, test_iter batches per test run (at every test_interval from `start` on, but
    iteration 0 only with test_initialization; Caffe tests at once after a restore).
    A stage retry skips that many (modulo its shard) to read what the failed attempt would
    have read next; Caffe's own restore (and -snapshot) starts its data afresh instead."""
    from caffeonspark.config import solver_test_net, solver_train_net
    from caffeonspark.sources import fed_layer, layer_batch_size
    from engine.proto import caffe_pb2

    train_layer = fed_layer(solver_train_net(param), job["train_layer"], caffe_pb2.TRAIN)
    batch = layer_batch_size(train_layer)
    steps = iteration - start
    out = {caffe_pb2.TRAIN: steps * max(1, param.iter_size) * batch, caffe_pb2.TEST: 0}
    interval = param.test_interval
    if job.get("validation_layer") is not None and interval > 0 and steps > 0:
        # test runs at the multiples of interval in [start, iteration)
        runs = -(-iteration // interval) - -(-start // interval)
        if start == 0 and not param.test_initialization:
            runs -= 1
        layer = fed_layer(solver_test_net(param), job["validation_layer"], caffe_pb2.TEST)
        out[caffe_pb2.TEST] = runs * param.test_iter[0] * layer_batch_size(layer)
    return out


def latest_snapshot(folder, stem):
    """The .solverstate with the highest iteration for `stem` in `folder`, or None."""
    from caffeonspark import storage

    pattern = re.compile(re.escape(stem) + r"_iter_(\d+)\.solverstate$")
    best = None
    for name in storage.list_names(folder):
        m = pattern.match(name)
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), storage.join(folder, name))
    return best[1] if best else None


def restore(solver, state_uri, local_dir, model_uri=None):
    """solver.restore from a (possibly remote) .solverstate and its weights: `model_uri` when
    given, else the model the state names, looked up as written or beside the .solverstate."""
    from caffeonspark import storage
    from engine.proto import caffe_pb2

    os.makedirs(local_dir, exist_ok=True)
    state = caffe_pb2.SolverState.FromString(storage.read_bytes(state_uri, "solver state"))
    if model_uri:
        state.learned_net = storage.fetch(model_uri, local_dir)
    elif state.learned_net:
        candidates = [storage.join(storage.dirname(state_uri), storage.basename(state.learned_net))]
        if os.path.isabs(state.learned_net) or storage.has_scheme(state.learned_net):
            candidates.insert(0, state.learned_net)
        found = next((c for c in candidates if storage.exists(c)), None)
        if found is None:
            raise WorkerError(
                f"{storage.shown(state_uri)}: its model {state.learned_net!r} is missing "
                f"(looked at {', '.join(map(storage.shown, candidates))})"
            )
        state.learned_net = storage.fetch(found, local_dir)
    local_state = os.path.join(local_dir, storage.basename(state_uri))
    with open(local_state, "wb") as f:
        f.write(state.SerializeToString())
    solver.restore(local_state)


# --- entry point -------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m caffeonspark.worker JOB.json", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        job = json.load(f)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s rank {job['rank']} %(name)s] %(message)s",
    )
    worker = Worker(job)
    try:
        worker.run()
    except BaseException as e:  # noqa: BLE001 - report every failure to the task
        detail = "".join(traceback.format_exception(e)[-6:])
        log.error("worker failed:\n%s", detail)
        if worker.channel is not None:
            try:
                worker.send(
                    "error", message=f"{type(e).__name__}: {e}\n{detail}", fatal=worker.setting_up
                )
            except OSError:
                pass
        sys.stderr.flush()
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
