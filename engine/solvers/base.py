"""Solver: Caffe's training loop (solver.cpp + the shared part of sgd_solver.cpp): nets from a
SolverParameter, step/solve, testing, lr policies, clipping, regularisation, snapshots.

Subclasses (sgd.py, adam.py, ...) only supply `compute_update_value`, as in Caffe.
"""

import collections
import copy
import logging
import math
import os
import time

import numpy as np
from google.protobuf import text_format

from engine import backend, io, upgrade
from engine.proto import caffe_pb2

log = logging.getLogger("engine")

_SP = caffe_pb2.SolverParameter
_F32 = np.float32

# Caffe's SolverAction: what a signal (Ctrl-C, SIGHUP) asks the solver to do.
ACTION_NONE = "none"
ACTION_STOP = "stop"
ACTION_SNAPSHOT = "snapshot"

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")
_TRAIN_NET_FIELDS = ("net", "net_param", "train_net", "train_net_param")

_REGISTRY = {}


class SolverError(ValueError):
    """A solver configuration or state error, naming the solver file."""


def register_solver(type_name):
    """Class decorator: record a solver class under its SolverParameter `type` string."""

    def deco(cls):
        if type_name in _REGISTRY and _REGISTRY[type_name] is not cls:
            raise ValueError(f"solver type {type_name!r} registered twice")
        _REGISTRY[type_name] = cls
        cls.type_name = type_name
        return cls

    return deco


def registered_solvers():
    return sorted(_REGISTRY)


# --- reading a SolverParameter -------------------------------------------------------------


def upgrade_solver_param(param, source=None):
    """Caffe's UpgradeSolverAsNeeded (engine.upgrade) + UpgradeSnapshotPrefixProperty.

    When read from a file, a missing snapshot_prefix becomes the solver file's path without
    extension, and a prefix naming a directory gets the solver file's stem appended."""
    try:
        param = upgrade.upgrade_solver_param(param, source or "<SolverParameter>")
    except upgrade.UpgradeError as e:
        raise SolverError(str(e)) from None
    if source is not None:
        if not param.HasField("snapshot_prefix"):
            param.snapshot_prefix = os.path.splitext(source)[0]
            log.info("snapshot_prefix was not specified and is set to %s", param.snapshot_prefix)
        elif os.path.isdir(param.snapshot_prefix):
            stem = os.path.splitext(os.path.basename(source))[0]
            param.snapshot_prefix = os.path.join(param.snapshot_prefix, stem)
            log.info("snapshot_prefix is a directory and is set to %s", param.snapshot_prefix)
    return param


def read_solver_param(path):
    """A SolverParameter from a solver .prototxt, upgraded (errors name the file and line)."""
    path = os.fspath(path)
    param = io.read_prototxt(path, caffe_pb2.SolverParameter())
    return upgrade_solver_param(param, source=path)


def solver_class(type_name, where="<SolverParameter>"):
    import engine.solvers  # noqa: F401  (registers every solver type)

    try:
        return _REGISTRY[type_name]
    except KeyError:
        known = ", ".join(registered_solvers())
        raise SolverError(f"{where}: unknown solver type {type_name!r} (known: {known})") from None


def get_solver(solver):
    """pycaffe's caffe.get_solver: the solver of the file's (or message's) `type`."""
    if isinstance(solver, caffe_pb2.SolverParameter):
        param = upgrade_solver_param(solver)
        return solver_class(param.type)(param)
    path = os.fspath(solver)
    param = read_solver_param(path)
    return solver_class(param.type, path)(param, source=path)


def _fmt(x):
    """A number as C++'s ostream prints it by default (6 significant digits, like %g)."""
    return f"{float(x):g}"


def _read_net_file(path, solver_source):
    try:
        return io.read_prototxt(path, caffe_pb2.NetParameter())
    except io.CaffeFileError as e:
        hint = ""
        if not os.path.isabs(path) and not os.path.exists(path) and solver_source:
            beside = os.path.join(os.path.dirname(os.path.abspath(solver_source)), path)
            if os.path.exists(beside):
                hint = (
                    f" (relative net paths are resolved against the working directory "
                    f"{os.getcwd()}, like Caffe; the file exists beside the solver: run from "
                    f"{os.path.dirname(beside)})"
                )
        raise SolverError(f"{solver_source or '<SolverParameter>'}: {e}{hint}") from None


def _pow_double(base, exponent):
    """C's pow in double (inf/nan where Python would raise or go complex)."""
    with np.errstate(all="ignore"):
        return float(np.power(np.float64(base), np.float64(exponent)))


def _powf(base, exponent):
    """C's powf on float32 operands (NumPy's float32 power calls the C library's powf)."""
    with np.errstate(all="ignore"):
        return np.power(_F32(base), _F32(exponent))


def _expf(x):
    """C's expf on a float32 operand. NumPy's float32 exp reproduces Caffe's logged rates
    bit for bit on the golden sigmoid cases, where rounding exp in double does not."""
    with np.errstate(all="ignore"):
        return np.exp(_F32(x))


# --- the solver ------------------------------------------------------------------------------


class Solver:
    """Caffe's Solver + SGDSolver machinery. Build with a solver .prototxt path or a
    SolverParameter; `get_solver` picks the subclass from `type`.

    Attributes: `param` (SolverParameter), `net` (train Net), `test_nets`, `iter`,
    `current_step`, `history` (arrays, Caffe's solverstate order), hook lists `on_start` and
    `on_gradients_ready` (callables taking the solver; the latter run after backward, before
    `apply_update`), `on_tested` (callables (solver, test_net_id, scores) run after each
    test; one may return other scores to use, e.g. averaged over ranks), `on_snapshot`
    (callables (solver, model_file, state_file) run after a snapshot is written; one may
    return other (model, state) paths, e.g. after moving the files), and `action_function`
    (returns "none", "stop" or "snapshot"; polled after every iteration and test batch, like
    Caffe's SetActionFunction).
    """

    type_name = None
    # AdaDelta and Adam keep a second history blob per parameter.
    num_history_sets = 1

    def __init__(self, solver, *, source=None):
        if type(self) is Solver:
            raise TypeError("Solver is abstract: use engine.get_solver(path) or SGDSolver(path)")
        if isinstance(solver, caffe_pb2.SolverParameter):
            param = copy.deepcopy(upgrade_solver_param(solver))
        else:
            source = os.fspath(solver)
            param = read_solver_param(source)
        self.source = source
        self.param = param
        self._where = source or "<SolverParameter>"
        log.info("Initializing solver from parameters: \n%s", text_format.MessageToString(param))
        self.check_param()
        self.on_start = []
        self.on_gradients_ready = []
        self.on_tested = []
        self.on_snapshot = []
        self.action_function = None
        self.requested_early_exit = False
        self.smoothed_loss = _F32(0)
        self._losses = collections.deque()
        self._window_to_resume = None
        self._iterations_last = 0
        if param.random_seed >= 0:
            from engine.rng import set_random_seed

            set_random_seed(param.random_seed)
        self.net = self._init_train_net()
        self.test_nets = self._init_test_nets()
        self._load_solver_weights()
        self.iter = 0
        self.current_step = 0
        self.history = []
        self._temp = []
        for _ in range(self.num_history_sets):
            for p in self.net.learnable_params:
                self.history.append(backend.get_array_module(p.data).zeros_like(p.data))
        log.info("Solver scaffolding done.")

    # --- configuration ---------------------------------------------------------------------
    def error(self, message):
        return SolverError(f"{self._where}: {message}")

    def check_param(self):
        """Caffe's CHECKs on the SolverParameter, done up front with the file named."""
        p = self.param
        if p.average_loss < 1:
            raise self.error(f"average_loss must be >= 1, got {p.average_loss}")
        if p.iter_size < 1:
            raise self.error(f"iter_size must be >= 1, got {p.iter_size}")
        policy = p.lr_policy
        if not policy:
            raise self.error(f"lr_policy is not set (one of: {', '.join(LR_POLICIES)})")
        if policy not in LR_POLICIES:
            raise self.error(
                f"unknown learning rate policy {policy!r} (one of: {', '.join(LR_POLICIES)})"
            )
        if policy in ("step", "sigmoid") and p.stepsize <= 0:
            raise self.error(f"lr_policy {policy!r} needs stepsize > 0, got {p.stepsize}")
        if policy in ("step", "exp", "inv", "sigmoid") and p.gamma < 0:
            raise self.error(f"lr_policy {policy!r} needs gamma >= 0, got {p.gamma}")
        if policy == "poly" and p.max_iter <= 0:
            raise self.error("lr_policy 'poly' needs max_iter > 0")
        if p.regularization_type not in ("L1", "L2"):
            raise self.error(f"unknown regularization_type {p.regularization_type!r} (L1 or L2)")
        writes = p.snapshot > 0 or p.snapshot_after_train
        if p.snapshot_format == _SP.HDF5 and writes:
            raise self.error(
                "snapshot_format HDF5 is not supported; use snapshot_format: BINARYPROTO"
            )
        if not p.snapshot_prefix and writes:
            log.warning(
                "snapshot_prefix is not set: snapshots go to _iter_<N>.caffemodel in the "
                "working directory"
            )
        if p.snapshot > 0:
            if not p.snapshot_prefix:
                raise self.error("snapshot is specified but snapshot_prefix is not")
            folder = os.path.dirname(p.snapshot_prefix) or "."
            if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
                raise self.error(
                    f"cannot write to snapshot prefix {p.snapshot_prefix!r}: make sure the "
                    f"directory {folder!r} exists and is writable"
                )

    # --- nets ------------------------------------------------------------------------------
    def _net_param(self, field):
        p = self.param
        if field in ("net_param", "train_net_param"):
            return copy.deepcopy(getattr(p, field))
        return _read_net_file(getattr(p, field), self.source)

    def _build_net(self, net_param, state_override, phase, what):
        from engine.net import Net

        state = caffe_pb2.NetState()
        state.phase = phase
        state.MergeFrom(net_param.state)
        if state_override is not None:
            state.MergeFrom(state_override)
        net_param.state.CopyFrom(state)
        return Net(net_param, phase=state.phase, name_hint=what)

    def _init_train_net(self):
        p = self.param
        given = [f for f in _TRAIN_NET_FIELDS if p.HasField(f)]
        if not given:
            raise self.error(
                "SolverParameter must specify a train net using one of these fields: "
                + ", ".join(_TRAIN_NET_FIELDS)
            )
        if len(given) > 1:
            raise self.error(
                "SolverParameter must not contain more than one of these fields specifying "
                f"a train net: {', '.join(_TRAIN_NET_FIELDS)} (got {', '.join(given)})"
            )
        field = given[0]
        what = f"{field} {getattr(p, field)}" if field in ("net", "train_net") else field
        log.info("Creating training net specified in %s", what)
        return self._build_net(self._net_param(field), p.train_state, caffe_pb2.TRAIN, what)

    def _init_test_nets(self):
        p = self.param
        if p.HasField("net") and p.HasField("net_param"):
            raise self.error("both net_param and net may not be specified")
        generic = p.HasField("net") or p.HasField("net_param")
        specific = len(p.test_net_param) + len(p.test_net)
        if (generic and len(p.test_iter) < specific) or (
            not generic and len(p.test_iter) != specific
        ):
            raise self.error(
                f"test_iter must be specified for each test network ({specific} test nets, "
                f"{len(p.test_iter)} test_iter)"
            )
        instances = len(p.test_iter)
        if p.test_state and len(p.test_state) != instances:
            raise self.error(
                f"test_state must be unspecified or specified once per test net ({instances})"
            )
        if instances and p.test_interval <= 0:
            raise self.error(
                f"{instances} test net(s) are defined (test_iter) but test_interval is "
                f"{p.test_interval}; set test_interval > 0"
            )
        sources = []
        for net_param in p.test_net_param:
            sources.append(("test_net_param", copy.deepcopy(net_param)))
        for path in p.test_net:
            sources.append((f"test_net file: {path}", _read_net_file(path, self.source)))
        for _ in range(instances - specific):
            if p.HasField("net_param"):
                sources.append(("net_param", copy.deepcopy(p.net_param)))
            else:
                sources.append((f"net file: {p.net}", _read_net_file(p.net, self.source)))
        nets = []
        for i, (what, net_param) in enumerate(sources):
            log.info("Creating test net (#%d) specified by %s", i, what)
            state = p.test_state[i] if p.test_state else None
            net = self._build_net(net_param, state, caffe_pb2.TEST, what)
            net.share_trained_layers_with(self.net)
            nets.append(net)
        return nets

    def _load_solver_weights(self):
        """SolverParameter.weights (what `caffe train --weights a,b` sets): copy into every net."""
        for entry in self.param.weights:
            for path in filter(None, (s.strip() for s in entry.split(","))):
                log.info("Finetuning from %s", path)
                weights = io.read_binary(path, caffe_pb2.NetParameter())
                for net in [self.net, *self.test_nets]:
                    net.copy_from(weights)

    # --- learning rate ---------------------------------------------------------------------
    def get_learning_rate(self):
        """The lr of the current iteration by `lr_policy`, in float32 exactly as Caffe computes
        it: `pow(float, int)` promotes to double (step, exp, multistep), while `pow(float,
        float)` and `exp(float)` are float functions (inv, poly, sigmoid)."""
        p = self.param
        policy, it = p.lr_policy, self.iter
        base = p.base_lr
        if policy == "fixed":
            return _F32(base)
        if policy == "step":
            self.current_step = it // p.stepsize
            return _F32(base * _pow_double(p.gamma, self.current_step))
        if policy == "exp":
            return _F32(base * _pow_double(p.gamma, it))
        if policy == "inv":
            inner = _F32(1) + _F32(p.gamma) * _F32(it)
            return _F32(base) * _powf(inner, -_F32(p.power))
        if policy == "multistep":
            if self.current_step < len(p.stepvalue) and it >= p.stepvalue[self.current_step]:
                self.current_step += 1
                log.info("MultiStep Status: Iteration %d, step = %d", it, self.current_step)
            return _F32(base * _pow_double(p.gamma, self.current_step))
        if policy == "poly":
            frac = _F32(1) - _F32(it) / _F32(p.max_iter)
            return _F32(base) * _powf(frac, _F32(p.power))
        if policy == "sigmoid":
            x = -_F32(p.gamma) * (_F32(it) - _F32(p.stepsize))
            return _F32(base) * (_F32(1) / (_F32(1) + _expf(x)))
        raise self.error(f"unknown learning rate policy {policy!r}")

    @property
    def lr(self):
        """The learning rate the next update will use (does not advance multistep state)."""
        saved = self.current_step
        try:
            return float(self.get_learning_rate())
        finally:
            self.current_step = saved

    # --- one update ------------------------------------------------------------------------
    def apply_update(self):
        """Caffe's SGDSolver::ApplyUpdate: lr, clip, then per parameter normalise,
        regularise, compute the update into the diff; finally data -= diff."""
        rate = self.get_learning_rate()
        if self._display_now():
            log.info("Iteration %d, lr = %s", self.iter, _fmt(rate))
        self.clip_gradients()
        for i in range(len(self.net.learnable_params)):
            self.normalize(i)
            self.regularize(i)
            self.compute_update_value(i, rate)
        for p in self.net.learnable_params:
            p.data -= p.diff

    def clip_gradients(self):
        clip = _F32(self.param.clip_gradients)
        if clip < 0:
            return
        params = self.net.learnable_params
        sumsq = _F32(0)
        for p in params:
            d = p.diff.ravel()
            sumsq += _F32(backend.to_numpy(d @ d))
        l2norm = _F32(math.sqrt(sumsq))
        if l2norm > clip:
            scale = clip / l2norm
            log.info(
                "Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale factor %s",
                _fmt(l2norm),
                _fmt(clip),
                _fmt(scale),
            )
            for p in params:
                p.diff *= scale

    def normalize(self, param_id):
        if self.param.iter_size == 1:
            return
        self.net.learnable_params[param_id].diff *= _F32(1) / _F32(self.param.iter_size)

    def regularize(self, param_id):
        p = self.net.learnable_params[param_id]
        decay = _F32(self.param.weight_decay) * _F32(self.net.params_weight_decay[param_id])
        if not decay:
            return
        tmp = self.temp(param_id)
        xp = backend.get_array_module(p.data)
        if self.param.regularization_type == "L2":
            xp.multiply(p.data, decay, out=tmp)
        else:
            xp.sign(p.data, out=tmp)
            tmp *= decay
        p.diff += tmp

    def temp(self, param_id):
        """A scratch array shaped like learnable param `param_id` (Caffe's temp_)."""
        while len(self._temp) <= param_id:
            p = self.net.learnable_params[len(self._temp)]
            self._temp.append(backend.get_array_module(p.data).empty_like(p.data))
        return self._temp[param_id]

    _f32 = staticmethod(_F32)

    @staticmethod
    def xp(blob):
        return backend.get_array_module(blob.data)

    def local_rate(self, param_id, rate):
        return _F32(rate) * _F32(self.net.params_lr[param_id])

    def compute_update_value(self, param_id, rate):
        """Turn learnable param `param_id`'s diff into the update to subtract (in place)."""
        raise NotImplementedError

    # --- the loop --------------------------------------------------------------------------
    def _display_now(self):
        d = self.param.display
        return bool(d) and self.iter % d == 0

    def _requested_action(self):
        if self.action_function is None:
            return ACTION_NONE
        return self.action_function()

    def _update_smoothed_loss(self, loss, average_loss):
        """Caffe's UpdateSmoothedLoss: the mean of the last average_loss losses, updated by
        replacing the oldest (Caffe's ring index (iter - start_iter) % average_loss is the
        oldest slot; the window here is a deque in age order, so it can be carried on)."""
        if len(self._losses) < average_loss:
            self._losses.append(loss)
            n = len(self._losses)
            self.smoothed_loss = _F32((self.smoothed_loss * (n - 1) + loss) / n)
        else:
            self.smoothed_loss = _F32(self.smoothed_loss + (loss - self._losses[0]) / average_loss)
            self._losses.append(loss)  # maxlen: drops the oldest

    def loss_window(self):
        """(the losses averaged into smoothed_loss, oldest first; smoothed_loss) as floats."""
        return [float(x) for x in self._losses], float(self.smoothed_loss)

    def resume_loss_window(self, losses, smoothed):
        """Have the next step() go on with a loss window from loss_window() instead of an
        empty one (Caffe's Step starts afresh; a stage retry of a run does not)."""
        self._window_to_resume = (list(losses), smoothed)

    def _log_outputs(self, kind, net, values):
        """Caffe's `    Train net output #k: name = v (* w = w*v loss)` lines."""
        weights = net.blob_loss_weights
        k = 0
        for name, value in values:
            w = _F32(weights.get(name, 0.0))
            for v in np.asarray(value, dtype=np.float32).ravel():
                extra = f" (* {_fmt(w)} = {_fmt(w * v)} loss)" if w else ""
                log.info("    %s net output #%d: %s = %s%s", kind, k, name, _fmt(v), extra)
                k += 1

    def step(self, iters):
        """Caffe's Solver::Step: run `iters` iterations (tests, display, snapshots)."""
        p = self.param
        stop_iter = self.iter + int(iters)
        self._losses = collections.deque(maxlen=max(1, int(p.average_loss)))
        self.smoothed_loss = _F32(0)
        if self._window_to_resume is not None:
            losses, smoothed = self._window_to_resume
            self._window_to_resume = None
            self._losses.extend(_F32(x) for x in losses)
            self.smoothed_loss = _F32(smoothed)
        self._iterations_last = self.iter
        timer = time.perf_counter()
        while self.iter < stop_iter:
            self.net.clear_param_diffs()
            if (
                p.test_interval
                and self.iter % p.test_interval == 0
                and (self.iter > 0 or p.test_initialization)
            ):
                self.test_all()
                if self.requested_early_exit:
                    break
            for callback in self.on_start:
                callback(self)
            display = self._display_now()
            loss = _F32(0)
            for _ in range(p.iter_size):
                loss += _F32(self.net.forward_backward())
            loss /= _F32(p.iter_size)
            self._update_smoothed_loss(loss, p.average_loss)
            if display:
                lapse = time.perf_counter() - timer
                per_s = (self.iter - self._iterations_last) / (lapse or 1.0)
                log.info(
                    "Iteration %d (%s iter/s, %ss/%d iters), loss = %s",
                    self.iter,
                    _fmt(per_s),
                    _fmt(lapse),
                    p.display,
                    _fmt(self.smoothed_loss),
                )
                timer = time.perf_counter()
                self._iterations_last = self.iter
                outputs = [(n, backend.to_numpy(self.net.blobs[n].data)) for n in self.net.outputs]
                self._log_outputs("Train", self.net, outputs)
            for callback in self.on_gradients_ready:
                callback(self)
            self.apply_update()
            self.iter += 1
            request = self._requested_action()
            if (p.snapshot and self.iter % p.snapshot == 0) or request == ACTION_SNAPSHOT:
                self.snapshot()
            if request == ACTION_STOP:
                self.requested_early_exit = True
                break

    def solve(self, resume_file=None):
        """Caffe's Solver::Solve: (restore,) train to max_iter, final snapshot and test."""
        p = self.param
        log.info("Solving %s", self.net.name)
        log.info("Learning Rate Policy: %s", p.lr_policy)
        self.requested_early_exit = False
        if resume_file:
            log.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file)
        self.step(p.max_iter - self.iter)
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.")
            return
        if p.display and self.iter % p.display == 0:
            loss = _F32(self.net.forward_from_to())
            self._update_smoothed_loss(loss, p.average_loss)
            log.info("Iteration %d, loss = %s", self.iter, _fmt(self.smoothed_loss))
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        log.info("Optimization Done.")

    # --- testing ---------------------------------------------------------------------------
    def test_all(self):
        results = []
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            results.append(self.test(i))
        return results

    def test(self, test_net_id=0):
        """Caffe's Solver::Test: `test_iter` forward passes of a test net; logs and returns
        {output name: mean} (a float for one-element outputs, else a float32 array)."""
        p = self.param
        log.info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        net = self.test_nets[test_net_id]
        net.share_trained_layers_with(self.net)
        n_iter = p.test_iter[test_net_id]
        scores = None
        loss = _F32(0)
        for _ in range(n_iter):
            request = self._requested_action()
            while request != ACTION_NONE:
                if request == ACTION_SNAPSHOT:
                    self.snapshot()
                elif request == ACTION_STOP:
                    self.requested_early_exit = True
                request = self._requested_action()
                if self.requested_early_exit:
                    break
            if self.requested_early_exit:
                break
            iter_loss = _F32(net.forward_from_to())
            if p.test_compute_loss:
                loss += iter_loss
            values = [backend.to_numpy(net.blobs[n].data).astype(np.float32) for n in net.outputs]
            if scores is None:
                scores = [v.copy() for v in values]
            else:
                for s, v in zip(scores, values):
                    s += v
        if self.requested_early_exit:
            log.info("Test interrupted.")
            return None
        if p.test_compute_loss:
            log.info("Test loss: %s", _fmt(loss / _F32(n_iter)))
        means = [(n, s / _F32(n_iter)) for n, s in zip(net.outputs, scores or [])]
        self._log_outputs("Test", net, means)
        result = {n: float(m.ravel()[0]) if m.size == 1 else m for n, m in means}
        for hook in self.on_tested:
            replaced = hook(self, test_net_id, result)
            if replaced is not None:
                result = replaced
        return result

    # --- snapshots -------------------------------------------------------------------------
    def snapshot_filename(self, extension):
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{extension}"

    def snapshot(self):
        """Write `<prefix>_iter_<N>.caffemodel` and `.solverstate` (atomically); returns both
        paths."""
        p = self.param
        if p.snapshot_format == _SP.HDF5:
            raise self.error("snapshot_format HDF5 is not supported; use BINARYPROTO")
        model_file = self.snapshot_filename(".caffemodel")
        log.info("Snapshotting to binary proto file %s", model_file)
        self.net.save(model_file, write_diff=p.snapshot_diff)
        state = caffe_pb2.SolverState()
        state.iter = self.iter
        state.learned_net = model_file
        state.current_step = self.current_step
        for h in self.history:
            state.history.add().CopyFrom(io.array_to_blobproto(backend.to_numpy(h)))
        state_file = self.snapshot_filename(".solverstate")
        log.info("Snapshotting solver state to binary proto file %s", state_file)
        io.write_binary(state_file, state)
        paths = (model_file, state_file)
        for hook in self.on_snapshot:
            replaced = hook(self, *paths)
            if replaced is not None:
                paths = replaced
        return paths

    def restore(self, state_file):
        """Resume from a .solverstate: iter, current_step, history and the weights of its
        `learned_net` (as given, else relative to the solverstate's folder)."""
        state_file = os.fspath(state_file)
        if state_file.endswith((".h5", ".hdf5")):
            raise io.CaffeFileError(
                f"{state_file}: HDF5 solver states are not supported; use a .solverstate"
            )
        state = io.read_binary(state_file, caffe_pb2.SolverState())
        if len(state.history) != len(self.history):
            raise io.CaffeFileError(
                f"{state_file}: incorrect length of history blobs: the file has "
                f"{len(state.history)}, a {self.type_name} solver for net {self.net.name!r} "
                f"needs {len(self.history)}"
            )
        arrays = []
        for i, (proto, h) in enumerate(zip(state.history, self.history)):
            arr = io.blobproto_to_array(proto)
            if arr.size != h.size:
                raise io.CaffeFileError(
                    f"{state_file}: history blob {i} has shape {arr.shape}, the solver's "
                    f"parameter has shape {h.shape}"
                )
            arrays.append(arr.reshape(h.shape))
        if state.HasField("learned_net") and state.learned_net:
            net_file = state.learned_net
            if not os.path.exists(net_file):
                beside = os.path.join(os.path.dirname(state_file), net_file)
                if os.path.exists(beside):
                    net_file = beside
            self.net.copy_from(net_file)
        self.iter = state.iter
        self.current_step = state.current_step
        log.info("%sSolver: restoring history", self.type_name)
        for h, arr in zip(self.history, arrays):
            h[...] = backend.get_array_module(h).asarray(arr)

    # --- pycaffe extras --------------------------------------------------------------------
    def add_callback(self, on_start=None, on_gradients_ready=None):
        """pycaffe's Solver.add_callback: `on_start()` runs at the start of every iteration,
        `on_gradients_ready()` after backward, before the update. pycaffe calls both with no
        arguments (unlike the `on_start` / `on_gradients_ready` lists, which pass the solver)."""
        if on_start is not None:
            self.on_start.append(lambda _solver: on_start())
        if on_gradients_ready is not None:
            self.on_gradients_ready.append(lambda _solver: on_gradients_ready())

    def share_weights(self, net):
        """pycaffe's Solver.share_weights: `net` reads the train net's parameter data (Caffe's
        ShareTrainedLayersWith; `net` keeps its own diffs)."""
        net.share_with(self.net)
