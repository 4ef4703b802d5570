"""The `caffe` tool as `python -m engine`: train, test, time and device_query, with Caffe's
flags (`-solver x` or `--solver x`) and glog-style log lines on stderr."""

import argparse
import datetime
import logging
import signal
import sys
import threading
import time

from engine import backend, io

log = logging.getLogger("engine")

COMMANDS = ("train", "test", "time", "device_query")
_EFFECTS = ("stop", "snapshot", "none")


class CommandError(Exception):
    """A usage or configuration error: printed as one fatal log line, exit status 1."""


# --- logging -----------------------------------------------------------------------------------


class GlogFormatter(logging.Formatter):
    """`I0523 14:03:12.345678 12345 solver.py:231] message`, like Caffe's glog lines."""

    _LETTERS = {"DEBUG": "I", "INFO": "I", "WARNING": "W", "ERROR": "E", "CRITICAL": "F"}

    def format(self, record):
        t = datetime.datetime.fromtimestamp(record.created)
        letter = self._LETTERS.get(record.levelname, "I")
        prefix = (
            f"{letter}{t:%m%d %H:%M:%S}.{t.microsecond:06d} {record.process} "
            f"{record.filename}:{record.lineno}] "
        )
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return prefix + text


def setup_logging(stream=None, level=logging.INFO):
    """Send the engine's log records to stderr in glog format (once per process)."""
    logger = logging.getLogger("engine")
    for h in list(logger.handlers):
        if getattr(h, "_engine_cli", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(GlogFormatter())
    handler._engine_cli = True
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


# --- flags -------------------------------------------------------------------------------------


def _flag(parser, name, **kwargs):
    # gflags accepts -name and --name; so do we.
    parser.add_argument(f"-{name}", f"--{name}", dest=name, **kwargs)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m engine",
        allow_abbrev=False,
        description=(
            "command line brew (Caffe-compatible). commands: train (train or finetune a model), "
            "test (score a model), time (benchmark a model's execution time), "
            "device_query (show device details)"
        ),
    )
    p.add_argument("command", choices=COMMANDS, help="what to do")
    _flag(p, "solver", help="the solver definition protocol buffer text file")
    _flag(p, "model", help="the model definition protocol buffer text file")
    _flag(p, "weights", help="comma-separated .caffemodel files to initialise from")
    _flag(p, "snapshot", help="a .solverstate to resume training from")
    _flag(
        p,
        "iterations",
        type=int,
        help="test/time: number of iterations (default 50); train: overrides max_iter",
    )
    _flag(
        p,
        "gpu",
        help="GPU device id to use (one per process: for several, run caffeonspark); omit for CPU",
    )
    _flag(p, "phase", choices=("TRAIN", "TEST"), help="network phase for `time` (default TRAIN)")
    _flag(p, "level", type=int, default=0, help="network level (NetState.level)")
    _flag(p, "stage", default="", help="comma-separated network stages (NetState.stage)")
    _flag(
        p,
        "sigint_effect",
        choices=_EFFECTS,
        default="stop",
        help="what Ctrl-C does during training (default: stop, after a snapshot)",
    )
    _flag(p, "sighup_effect", choices=_EFFECTS, default="snapshot", help="what SIGHUP does")
    return p


def _stages(args):
    return [s for s in (x.strip() for x in args.stage.split(",")) if s]


def _weight_files(spec):
    return [w for w in (x.strip() for x in spec.split(",")) if w]


# --- devices -----------------------------------------------------------------------------------


def _gpu_ids(spec):
    if spec in (None, ""):
        return []
    if spec == "all":
        try:
            import cupy

            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # noqa: BLE001 - any CUDA failure means no usable GPU
            raise CommandError(f"--gpu all: no usable GPU ({type(e).__name__}: {e})") from None
        return list(range(n))
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise CommandError(f"--gpu {spec!r}: expected device ids like 0 or 0,1 or all") from None


def _use_gpu(ids, explicit=True):
    """Switch the engine to GPU `ids[0]`; False (CPU) when not possible and not explicit."""
    if len(ids) > 1:
        raise CommandError(
            f"--gpu {','.join(map(str, ids))}: one process drives one device; for several "
            "devices run caffeonspark (clusterSize x devices)"
        )
    try:
        backend.set_device(ids[0])
        backend.set_mode_gpu()
    except Exception as e:  # noqa: BLE001 - no CuPy, no driver, bad id: all end the same way
        if explicit:
            raise CommandError(f"cannot use GPU {ids[0]}: {e}") from None
        log.warning("solver_mode GPU requested but no GPU is usable (%s); using CPU", e)
        backend.set_mode_cpu()
        return False
    log.info("Using GPU %d", ids[0])
    return True


def _select_mode(args, solver_param=None):
    ids = _gpu_ids(args.gpu)
    if ids:
        return _use_gpu(ids)
    if (
        solver_param is not None
        and solver_param.HasField("solver_mode")
        and solver_param.solver_mode == solver_param.GPU
    ):
        return _use_gpu([solver_param.device_id], explicit=False)
    log.info("Use CPU.")
    backend.set_mode_cpu()
    return False


def _sync():
    if backend.mode() == "gpu":
        import cupy

        cupy.cuda.Device().synchronize()


# --- signals -----------------------------------------------------------------------------------


class SignalHandler:
    """Caffe's SignalHandler: SIGINT / SIGHUP become solver actions, polled between
    iterations. A second Ctrl-C while one is pending aborts at once."""

    def __init__(self, sigint_effect, sighup_effect):
        self.effects = {signal.SIGINT: sigint_effect}
        if hasattr(signal, "SIGHUP"):
            self.effects[signal.SIGHUP] = sighup_effect
        self.pending = "none"
        self._saved = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.pending != "none":
            raise KeyboardInterrupt
        effect = self.effects[signum]
        if signum == signal.SIGINT:
            log.info(
                "Interrupt: %s requested; it happens after this iteration (Ctrl-C again aborts)",
                effect,
            )
        self.pending = effect

    def action(self):
        current, self.pending = self.pending, "none"
        return current

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.effects:
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, old in self._saved.items():
            signal.signal(signum, old)
        return False


# --- commands ----------------------------------------------------------------------------------


def train(args):
    from engine.solvers.base import read_solver_param, solver_class

    if not args.solver:
        raise CommandError("Need a solver definition to train (--solver).")
    if args.snapshot and args.weights:
        raise CommandError(
            "Give a snapshot to resume training or weights to finetune but not both."
        )
    param = read_solver_param(args.solver)
    param.train_state.level = args.level
    param.train_state.stage.extend(_stages(args))
    if args.iterations is not None:
        param.max_iter = args.iterations
    _select_mode(args, param)
    if args.snapshot:
        param.ClearField("weights")
    elif args.weights:
        param.ClearField("weights")
        param.weights.append(args.weights)
    solver = solver_class(param.type, args.solver)(param, source=args.solver)
    with SignalHandler(args.sigint_effect, args.sighup_effect) as handler:
        solver.action_function = handler.action
        if args.snapshot:
            log.info("Resuming from %s", args.snapshot)
            solver.restore(args.snapshot)
        log.info("Starting Optimization")
        solver.solve()
    log.info("Optimization Done.")
    return 0


def _net(args, phase):
    from engine.net import Net

    return Net(args.model, phase=phase, level=args.level, stages=tuple(_stages(args)))


def test(args):
    import numpy as np

    from engine.net import TEST
    from engine.solvers.base import _fmt

    if not args.model:
        raise CommandError("Need a model definition to score (--model).")
    if not args.weights:
        raise CommandError("Need model weights to score (--weights).")
    iterations = 50 if args.iterations is None else args.iterations
    _select_mode(args)
    net = _net(args, TEST)
    for w in _weight_files(args.weights):
        net.copy_from(w)
    log.info("Running for %d iterations.", iterations)
    weights = net.blob_loss_weights
    scores = None
    loss = 0.0
    for i in range(iterations):
        loss += net.forward_from_to()
        values = [
            (n, backend.to_numpy(net.blobs[n].data).astype(np.float32).ravel()) for n in net.outputs
        ]
        for name, v in values:
            for x in v:
                log.info("Batch %d, %s = %s", i, name, _fmt(x))
        if scores is None:
            scores = [v.copy() for _, v in values]
        else:
            for s, (_, v) in zip(scores, values):
                s += v
    loss /= max(iterations, 1)
    log.info("Loss: %s", _fmt(loss))
    for name, s in zip(net.outputs, scores or []):
        w = np.float32(weights.get(name, 0.0))
        for x in s / np.float32(iterations):
            extra = f" (* {_fmt(w)} = {_fmt(w * x)} loss)" if w else ""
            log.info("%s = %s%s", name, _fmt(x), extra)
    return 0


def time_(args):
    from engine.net import TEST, TRAIN
    from engine.solvers.base import _fmt

    if not args.model:
        raise CommandError("Need a model definition to time (--model).")
    iterations = 50 if args.iterations is None else args.iterations
    if iterations < 1:
        raise CommandError(f"--iterations must be >= 1, got {iterations}")
    _select_mode(args)
    net = _net(args, TEST if args.phase == "TEST" else TRAIN)
    log.info("Performing Forward")
    initial_loss = net.forward_from_to()
    log.info("Initial loss: %s", _fmt(initial_loss))
    log.info("Performing Backward")
    net.backward_from_to()
    n = len(net.layers)
    fwd = [0.0] * n
    bwd = [0.0] * n
    forward_time = backward_time = 0.0
    log.info("*** Benchmark begins ***")
    log.info("Testing for %d iterations.", iterations)
    total_start = time.perf_counter()
    for j in range(iterations):
        iter_start = time.perf_counter()
        for i, layer in enumerate(net.layers):
            t = time.perf_counter()
            layer.reshape(net.bottom_vecs[i], net.top_vecs[i])
            layer.forward(net.bottom_vecs[i], net.top_vecs[i])
            _sync()
            fwd[i] += time.perf_counter() - t
        forward_time += time.perf_counter() - iter_start
        back_start = time.perf_counter()
        for i in range(n - 1, -1, -1):
            # Caffe calls Backward on every layer; layers the net never back-propagates
            # (data, accuracy) do nothing there, so they are skipped here.
            if not net.layer_need_backward[i]:
                continue
            t = time.perf_counter()
            net.layers[i].backward(net.top_vecs[i], net.bottom_need_backward[i], net.bottom_vecs[i])
            _sync()
            bwd[i] += time.perf_counter() - t
        backward_time += time.perf_counter() - back_start
        log.info(
            "Iteration: %d forward-backward time: %s ms.",
            j + 1,
            _fmt((time.perf_counter() - iter_start) * 1e3),
        )
    total = time.perf_counter() - total_start
    log.info("Average time per layer: ")
    for i, name in enumerate(net.layer_names):
        log.info("%10s\tforward: %s ms.", name, _fmt(fwd[i] * 1e3 / iterations))
        log.info("%10s\tbackward: %s ms.", name, _fmt(bwd[i] * 1e3 / iterations))
    log.info("Average Forward pass: %s ms.", _fmt(forward_time * 1e3 / iterations))
    log.info("Average Backward pass: %s ms.", _fmt(backward_time * 1e3 / iterations))
    log.info("Average Forward-Backward: %s ms.", _fmt(total * 1e3 / iterations))
    log.info("Total Time: %s ms.", _fmt(total * 1e3))
    log.info("*** Benchmark ends ***")
    return 0


def device_query(args):
    try:
        import cupy
    except ImportError:
        log.info("Device: CPU (NumPy). No GPU support: CuPy is not installed")
        return 0
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - driver missing or broken
        log.info("Device: CPU (NumPy). CuPy is installed but no GPU is usable: %s", e)
        return 0
    ids = _gpu_ids(args.gpu) or list(range(count))
    for dev in ids:
        if not 0 <= dev < count:
            raise CommandError(f"--gpu {dev}: there are {count} GPU(s)")
        props = cupy.cuda.runtime.getDeviceProperties(dev)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        log.info("Querying GPUs %d", dev)
        log.info("Device id:                     %d", dev)
        log.info("Major revision number:         %d", props["major"])
        log.info("Minor revision number:         %d", props["minor"])
        log.info("Name:                          %s", name)
        log.info("Total global memory:           %d", props["totalGlobalMem"])
        log.info("Total shared memory per block: %d", props["sharedMemPerBlock"])
        log.info("Warp size:                     %d", props["warpSize"])
        log.info("Maximum threads per block:     %d", props["maxThreadsPerBlock"])
        log.info("Clock rate:                    %d", props["clockRate"])
        log.info("Number of multiprocessors:     %d", props["multiProcessorCount"])
    return 0


_HANDLERS = {"train": train, "test": test, "time": time_, "device_query": device_query}


def main(argv=None):
    from engine.layer import LayerError
    from engine.solvers.base import SolverError

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    try:
        return _HANDLERS[args.command](args)
    except (CommandError, io.CaffeFileError, LayerError, SolverError) as e:
        # Configuration errors name their file / layer: one fatal line is enough.
        log.critical("%s", e)
        return 1
    except KeyboardInterrupt:
        log.critical("Interrupted.")
        return 130
    except Exception as e:  # noqa: BLE001 - anything else is a bug: keep its traceback
        log.critical("%s: %s", type(e).__name__, e, exc_info=True)
        return 1
