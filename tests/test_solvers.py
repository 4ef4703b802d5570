"""Tests for engine/solvers and the `python -m engine` tool against BVLC Caffe's golden runs.

update_rules/: exact updates from Caffe's gradients; solvers/: 30 LeNet iterations per case.
"""

import gc
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

import engine
from engine import io
from engine.layer import registered_types
from engine.proto import caffe_pb2
from engine.solvers import (
    AdaDeltaSolver,
    AdaGradSolver,
    AdamSolver,
    NesterovSolver,
    RMSPropSolver,
    SGDSolver,
    SolverError,
    get_solver,
)
from tests import golden

ROOT = Path(__file__).resolve().parents[1]
SOLVERS = golden.GOLDEN / "solvers"
UPDATE_RULES = SOLVERS / "update_rules"


def _case_names(folder):
    index = folder / "index.json"
    if not index.exists():
        return []
    return json.loads(index.read_text())["cases"]


def _needs(*types):
    missing = sorted(set(types) - set(registered_types()))
    return pytest.mark.skipif(bool(missing), reason=f"needs layer types {missing}")


needs_golden = pytest.mark.skipif(not SOLVERS.is_dir(), reason=f"no golden data at {SOLVERS}")
TINY_LAYERS = ("Input", "InnerProduct", "Sigmoid", "Scale", "SoftmaxWithLoss")
LENET_LAYERS = ("Convolution", "Pooling", "InnerProduct", "ReLU", "SoftmaxWithLoss", "Accuracy")
needs_data_layer = pytest.mark.skipif("Data" not in registered_types(), reason="needs Data layer")


class LogLines(logging.Handler):
    """Collects the engine logger's messages (formatted) while attached."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        logger = logging.getLogger("engine")
        self._old_level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        logger = logging.getLogger("engine")
        logger.removeHandler(self)
        logger.setLevel(self._old_level)
        return False


def rel_l2(actual, expected):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


# --- (1) update rules: Caffe's gradients in, Caffe's updates out ---------------------------------


@needs_golden
@_needs(*TINY_LAYERS)
@pytest.mark.parametrize("name", _case_names(UPDATE_RULES))
def test_update_rule(name):
    case = UPDATE_RULES / name
    meta = json.loads((case / "case.json").read_text())
    trace = np.load(case / "trace.npz")
    tol = meta["tolerance"]
    with golden.chdir(case):
        solver = get_solver("solver.prototxt")
        solver.net.copy_from("init.caffemodel")
    for t in range(meta["iterations"]):
        # Bit-exact on the reference machine; 1e-6 (the README's lr tolerance) allows a
        # last-bit difference in another C library's powf / expf.
        assert abs(solver.lr - meta["lr"][t]) <= 1e-6 * abs(meta["lr"][t]), f"lr at t={t}"
        for p in meta["params"]:
            key = f"{p['layer']}/{p['index']}"
            solver.net.params[p["layer"]][p["index"]].diff[...] = trace[f"grad/{key}"][t]
        solver.apply_update()
        for p in meta["params"]:
            key = f"{p['layer']}/{p['index']}"
            blob = solver.net.params[p["layer"]][p["index"]]
            golden.assert_close(
                blob.diff, trace[f"update/{key}"][t], **tol["update"], what=f"update {key} t={t}"
            )
            golden.assert_close(
                blob.data, trace[f"param/{key}"][t], **tol["param"], what=f"param {key} t={t}"
            )
        solver.iter += 1


@needs_golden
@_needs(*TINY_LAYERS)
@pytest.mark.parametrize("name", _case_names(UPDATE_RULES))
def test_update_rule_recomputed(name):
    """The same 12 iterations through step(): our forward/backward gives Caffe's gradients."""
    case = UPDATE_RULES / name
    meta = json.loads((case / "case.json").read_text())
    trace = np.load(case / "trace.npz")
    tol = meta["tolerance"]["loss_and_grad_if_recomputed"]
    with golden.chdir(case):
        solver = get_solver("solver.prototxt")
        solver.net.copy_from("init.caffemodel")

    def feed(s):
        s.net.blobs["data"].data[...] = trace["input/data"][s.iter]
        s.net.blobs["label"].data[...] = trace["input/label"][s.iter]

    def check_grad(s):
        for p in meta["params"]:
            key = f"{p['layer']}/{p['index']}"
            golden.assert_close(
                s.net.params[p["layer"]][p["index"]].diff,
                trace[f"grad/{key}"][s.iter],
                **tol,
                what=f"grad {key} t={s.iter}",
            )

    solver.on_start.append(feed)
    solver.on_gradients_ready.append(check_grad)
    for t in range(meta["iterations"]):
        solver.step(1)
        expected = meta["loss"][t]
        assert abs(solver.smoothed_loss - expected) <= tol["atol"] + tol["rtol"] * abs(expected)
    for p in meta["params"]:
        key = f"{p['layer']}/{p['index']}"
        golden.assert_close(
            solver.net.params[p["layer"]][p["index"]].data,
            trace[f"param/{key}"][-1],
            rtol=1e-4,
            atol=1e-6,
            what=f"final {key}",
        )


# --- (2) LeNet traces ---------------------------------------------------------------------------


def _run_lenet(case_dir, iterations, *, restore=None, solver_file="solver.prototxt"):
    """get_solver + copy_from(init) (+ restore) + step(1) x iterations in `case_dir`; returns
    the solver and the per-iteration record (loss, lr, tests, clipping)."""
    record = {"loss": [], "lr": [], "test": {}, "clip": []}
    with golden.chdir(case_dir), LogLines() as logs:
        solver = get_solver(solver_file)
        solver.net.copy_from(str(SOLVERS / "_data" / "lenet_init.caffemodel"))
        if restore is not None:
            solver.restore(restore)
        test = solver.test

        def recording_test(test_net_id=0):
            result = test(test_net_id)
            record["test"][solver.iter] = result
            return result

        solver.test = recording_test
        try:
            for _ in range(iterations):
                record["lr"].append(solver.lr)
                solver.step(1)
                record["loss"].append(float(solver.smoothed_loss))
        finally:
            del solver.test  # no solver -> closure -> solver cycle keeping its LMDBs open
    pattern = re.compile(r"L2 norm (\S+) > (\S+)\) by scale factor (\S+)")
    for line in logs.lines:
        m = pattern.search(line)
        if m:
            record["clip"].append(tuple(float(x) for x in m.groups()))
    record["log"] = logs.lines
    return solver, record


def _check_trace(record, trace, tol, first_iter=0):
    errors = {}
    n = len(trace["loss"])
    assert len(record["loss"]) == n
    for i in range(n):
        exp, got = trace["loss"][i], record["loss"][i]
        rel = abs(got - exp) / abs(exp)
        errors[i] = rel
        assert rel <= tol["loss_rtol_per_iteration"][i], (
            f"loss at iteration {first_iter + i}: {got:.6g} vs Caffe {exp:.6g} (rel {rel:.3g}). "
            "The update rules are checked exactly by test_update_rule; a drift that starts "
            "late usually means a layer sums in another float32 order than Caffe (e.g. a "
            "bias gradient), which flips a max-pool / ReLU near-tie"
        )
        lr_exp = trace["lr"][i]
        assert abs(record["lr"][i] - lr_exp) <= tol["lr"]["rtol"] * abs(lr_exp), (
            f"lr at iteration {first_iter + i}: {record['lr'][i]!r} vs {lr_exp!r}"
        )
    return max(errors.values())


def _check_final_weights(net, npz_path, meta_trace, tol):
    ref = np.load(npz_path)
    worst = 0.0
    for key in ref.files:
        kind, rest = key.split("/", 1)
        layer, idx = rest.rsplit("/", 1)
        data = engine.backend.to_numpy(net.params[layer][int(idx)].data)
        if kind == "param_rows":
            rows = list(range(0, data.shape[0], 25))
            data = data[rows]
            stats = meta_trace["ip1_stats"][f"param/{rest}"]
            full = engine.backend.to_numpy(net.params[layer][int(idx)].data).astype(np.float64)
            limit = tol["final_weights_rel_l2"][f"param/{rest}"]
            assert abs(full.sum() - stats["sum"]) <= 10 * limit * stats["abs_sum"]
            sumsq_rel = abs((full**2).sum() - stats["sumsq"]) / stats["sumsq"]
            assert sumsq_rel <= 10 * limit, f"{rest} sumsq off by {sumsq_rel:.3g}"
        err = rel_l2(data, ref[key])
        limit = tol["final_weights_rel_l2"][f"param/{rest}"]
        assert err <= limit, f"final {key}: rel L2 {err:.3g} > {limit:.3g}"
        worst = max(worst, err)
    return worst


LENET_CASES = [n for n in _case_names(SOLVERS) if n != "snapshot_restore"]


@needs_golden
@needs_data_layer
@_needs(*LENET_LAYERS)
@pytest.mark.parametrize("name", LENET_CASES)
def test_lenet_trace(name):
    case = SOLVERS / name
    meta = json.loads((case / "case.json").read_text())
    trace, tol = meta["trace"], meta["tolerance"]
    solver, record = _run_lenet(case, meta["iterations_run"])
    worst_loss = _check_trace(record, trace, tol)
    # Tests run at the start of iterations 0, 10, 20 (sgd_test_interval only).
    assert sorted(record["test"]) == sorted(int(k) for k in trace["test"])
    for it, outputs in trace["test"].items():
        for out, expected in outputs.items():
            got = record["test"][int(it)][out]
            atol = tol["test_outputs_atol"][f"{it}/{out}"]
            assert abs(got - expected) <= atol + 5e-6 * abs(expected), (
                f"test output {out} at iteration {it}: {got} vs {expected}"
            )
    assert len(record["clip"]) == len(trace["gradient_clipping"])
    for i, (got, exp) in enumerate(zip(record["clip"], trace["gradient_clipping"])):
        rtol = max(1e-4, tol["loss_rtol_per_iteration"][exp["iter"]])
        assert abs(got[0] - exp["l2norm"]) <= rtol * exp["l2norm"], f"clip norm {i}"
        assert got[1] == exp["clip"]
        assert abs(got[2] - exp["scale"]) <= rtol * exp["scale"], f"clip scale {i}"
    worst_w = _check_final_weights(solver.net, case / trace["final_weights"], trace, tol)
    print(f"{name}: worst loss rel err {worst_loss:.3g}, worst weight rel L2 {worst_w:.3g}")


def _snapshot_case_copy(tmp_path):
    """The snapshot_restore case (solver + net) in tmp_path/case, with ../_data linked, so that
    snapshots never land in the shared golden folder."""
    case = tmp_path / "case"
    case.mkdir()
    for f in ("solver.prototxt", "train_test.prototxt"):
        shutil.copy(SOLVERS / "snapshot_restore" / f, case / f)
    (tmp_path / "_data").symlink_to(SOLVERS / "_data")
    return case


@needs_golden
@needs_data_layer
@_needs(*LENET_LAYERS)
def test_lenet_snapshot_restore(tmp_path):
    golden_case = SOLVERS / "snapshot_restore"
    meta = json.loads((golden_case / "case.json").read_text())
    case = _snapshot_case_copy(tmp_path)

    # Uninterrupted run: 30 steps, snapshots at 15 and 30.
    solver, record = _run_lenet(case, 30)
    _check_trace(
        record, meta["traces"]["uninterrupted"], meta["tolerance_per_trace"]["uninterrupted"]
    )
    fields = meta["solverstate_fields"]
    for f in meta["snapshot_files"]:
        assert (case / f).is_file(), f"missing snapshot file {f}"
    ours = io.read_binary(case / "lenet_iter_15.solverstate", caffe_pb2.SolverState())
    theirs = io.read_binary(golden_case / "lenet_iter_15.solverstate", caffe_pb2.SolverState())
    assert ours.iter == fields["iter"] == theirs.iter
    assert ours.learned_net == fields["learned_net"]
    assert ours.current_step == fields["current_step"]
    assert len(ours.history) == fields["history_blobs"]
    for i, (a, b) in enumerate(zip(ours.history, theirs.history)):
        assert list(a.shape.dim) == fields["history_shapes"][i]
        err = rel_l2(io.blobproto_to_array(a), io.blobproto_to_array(b))
        assert err < 1e-3, f"history blob {i}: rel L2 {err:.3g} vs Caffe's solverstate"
    our_model = io.read_binary(case / "lenet_iter_15.caffemodel", caffe_pb2.NetParameter())
    their_model = io.read_binary(golden_case / "lenet_iter_15.caffemodel", caffe_pb2.NetParameter())
    assert [(lp.name, lp.type, len(lp.blobs)) for lp in our_model.layer] == [
        (lp.name, lp.type, len(lp.blobs)) for lp in their_model.layer
    ]
    for a, b in zip(our_model.layer, their_model.layer):
        for j, (x, y) in enumerate(zip(a.blobs, b.blobs)):
            assert list(x.shape.dim) == list(y.shape.dim)
            err = rel_l2(io.blobproto_to_array(x), io.blobproto_to_array(y))
            assert err < 1e-4, f"snapshot {a.name}/{j}: rel L2 {err:.3g} vs Caffe's caffemodel"
    assert (case / "lenet_iter_30.solverstate").is_file()
    del solver
    gc.collect()  # a finished solver's Data layers release their LMDB environments

    # Restore from Caffe's own snapshot (its learned_net is found beside the solverstate).
    restored_trace = meta["traces"]["restored"]
    restored_tol = meta["tolerance_per_trace"]["restored"]
    solver, record = _run_lenet(case, 15, restore=str(golden_case / "lenet_iter_15.solverstate"))
    assert solver.iter == 30
    _check_trace(record, restored_trace, restored_tol, first_iter=15)
    _check_final_weights(
        solver.net, golden_case / restored_trace["final_weights"], restored_trace, restored_tol
    )

    # Our own snapshot round-trips the same way.
    del solver
    gc.collect()
    solver, record = _run_lenet(case, 15, restore=str(case / "lenet_iter_15.solverstate"))
    _check_trace(record, restored_trace, restored_tol, first_iter=15)


# --- solver machinery on a tiny net (no golden data needed) ---------------------------------------

TINY_NET = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param {
    shape { dim: 4 dim: 3 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 }
  }
}
layer { name: "scale" type: "Scale" bottom: "data" top: "scaled"
  param { lr_mult: 1 decay_mult: 1 }
  scale_param { axis: 1 filler { type: "uniform" min: 0.5 max: 1.5 } }
}
layer { name: "bias" type: "Bias" bottom: "scaled" top: "scores"
  param { lr_mult: 2 decay_mult: 0 } bias_param { axis: 1 }
}
layer { name: "acc" type: "Accuracy" bottom: "scores" bottom: "label" top: "accuracy"
  include { phase: TEST }
}
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "scores" bottom: "label" top: "loss" }
"""

TINY_LAYERS_2 = ("DummyData", "Scale", "Bias", "Accuracy", "SoftmaxWithLoss")


def _tiny_solver_text(**fields):
    base = {
        "net": '"net.prototxt"',
        "base_lr": "0.1",
        "lr_policy": '"fixed"',
        "momentum": "0.9",
        "weight_decay": "0.001",
        "max_iter": "10",
        "display": "1",
        "snapshot_prefix": '"snap/tiny"',
        "random_seed": "7",
        "solver_mode": "CPU",
    }
    base.update(fields)
    return "".join(f"{k}: {v}\n" for k, v in base.items() if v is not None)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    (tmp_path / "net.prototxt").write_text(TINY_NET)
    (tmp_path / "snap").mkdir()
    monkeypatch.chdir(tmp_path)

    def make(**fields):
        text = _tiny_solver_text(**fields)
        (tmp_path / "solver.prototxt").write_text(text)
        return tmp_path / "solver.prototxt"

    return make


pytestmark_tiny = _needs(*TINY_LAYERS_2)


@pytestmark_tiny
@pytest.mark.parametrize(
    "type_name, cls, extra",
    [
        ("SGD", SGDSolver, {}),
        ("Nesterov", NesterovSolver, {}),
        ("AdaGrad", AdaGradSolver, {"momentum": 0}),
        ("RMSProp", RMSPropSolver, {"momentum": 0}),
        ("AdaDelta", AdaDeltaSolver, {"momentum": 0.95}),
        ("Adam", AdamSolver, {}),
    ],
)
def test_solver_types_and_history(tiny, type_name, cls, extra):
    path = tiny(type=f'"{type_name}"', **extra)
    solver = get_solver(str(path))
    assert type(solver) is cls
    n = len(solver.net.learnable_params)
    assert len(solver.history) == n * cls.num_history_sets
    before = [p.data.copy() for p in solver.net.learnable_params]
    solver.step(3)
    assert solver.iter == 3
    assert any(not np.array_equal(b, p.data) for b, p in zip(before, solver.net.learnable_params))
    # snapshot -> restore into a fresh solver reproduces iter, history and weights
    model_file, state_file = solver.snapshot()
    assert model_file == "snap/tiny_iter_3.caffemodel"
    assert state_file == "snap/tiny_iter_3.solverstate"
    fresh = get_solver(str(path))
    fresh.restore(state_file)
    assert fresh.iter == 3
    for a, b in zip(fresh.history, solver.history):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(fresh.net.learnable_params, solver.net.learnable_params):
        np.testing.assert_array_equal(a.data, b.data)


@pytestmark_tiny
def test_legacy_solver_type_enum(tiny):
    path = tiny(solver_type="ADAM")
    solver = get_solver(str(path))
    assert isinstance(solver, AdamSolver)
    assert solver.param.type == "Adam"
    assert not solver.param.HasField("solver_type")
    param = text_format.Parse(path.read_text(), caffe_pb2.SolverParameter())
    assert isinstance(get_solver(param), AdamSolver)


@pytestmark_tiny
def test_solver_config_errors(tiny, tmp_path):
    with pytest.raises(SolverError, match="momentum cannot be used with AdaGrad"):
        get_solver(str(tiny(type='"AdaGrad"')))
    with pytest.raises(SolverError, match="unknown learning rate policy 'foo'"):
        get_solver(str(tiny(lr_policy='"foo"')))
    with pytest.raises(SolverError, match="unknown solver type 'Sgd'"):
        get_solver(str(tiny(type='"Sgd"')))
    with pytest.raises(SolverError, match="HDF5"):
        get_solver(str(tiny(snapshot_format="HDF5")))
    with pytest.raises(SolverError, match="must specify a train net"):
        get_solver(str(tiny(net=None)))
    with pytest.raises(SolverError, match="test_interval"):
        get_solver(str(tiny(test_iter=1)))
    with pytest.raises(SolverError, match="nowhere.prototxt"):
        get_solver(str(tiny(net='"nowhere.prototxt"')))


def test_bad_solver_file_names_file_and_line(tmp_path):
    path = tmp_path / "bad_solver.prototxt"
    path.write_text('net: "net.prototxt"\nbase_lr: 0.01\nlr_polcy: "fixed"\n')
    with pytest.raises(io.CaffeFileError) as e:
        get_solver(str(path))
    assert f"{path}:3" in str(e.value)
    assert "lr_polcy" in str(e.value)


@pytestmark_tiny
def test_smoothed_loss_is_the_mean_of_the_last_average_loss_and_can_carry_on(tiny):
    def losses(solver, steps):
        seen = []
        solver.on_gradients_ready[:] = [lambda s: seen.append(float(s.smoothed_loss))]
        for n in steps:
            solver.step(n)
        return seen

    raw = losses(get_solver(str(tiny(average_loss=1))), [8])  # DummyData: new data each time
    smoothed = losses(get_solver(str(tiny(average_loss=3))), [7])
    expected = [np.mean(raw[max(0, i - 2) : i + 1]) for i in range(7)]
    np.testing.assert_allclose(smoothed, expected, rtol=1e-6)
    # The window carried from one step() into the next (a stage retry's resume) gives the
    # uninterrupted run's smoothed losses; a plain step() starts afresh, as Caffe's Step does.
    solver = get_solver(str(tiny(average_loss=3)))
    first = losses(solver, [4])
    window, value = solver.loss_window()
    assert window == raw[1:4] and value == smoothed[3]
    solver.resume_loss_window(window, value)
    carried = losses(solver, [3])
    assert first + carried == smoothed
    assert losses(solver, [1]) == [raw[7]]


@pytestmark_tiny
def test_hooks_order_and_iter_size(tiny):
    path = tiny(iter_size=2, display=0)
    solver = get_solver(str(path))
    seen = []

    def ready(s):
        seen.append(
            ("ready", s.iter, [float(np.abs(p.diff).sum()) for p in s.net.learnable_params])
        )

    solver.on_start.append(lambda s: seen.append(("start", s.iter)))
    solver.on_gradients_ready.append(ready)
    solver.step(2)
    assert [e[:2] for e in seen] == [("start", 0), ("ready", 0), ("start", 1), ("ready", 1)]
    assert all(sum(e[2]) > 0 for e in seen if e[0] == "ready")


@pytestmark_tiny
def test_test_nets_share_params_and_log(tiny):
    path = tiny(test_iter=3, test_interval=2, display=1)
    solver = get_solver(str(path))
    assert len(solver.test_nets) == 1
    tnet = solver.test_nets[0]
    assert tnet.params["scale"][0] is solver.net.params["scale"][0]
    with LogLines() as logs:
        solver.step(3)
    tests = [line for line in logs.lines if "Testing net" in line]
    assert tests == ["Iteration 0, Testing net (#0)", "Iteration 2, Testing net (#0)"]
    assert any(re.fullmatch(r"    Test net output #0: accuracy = \S+", x) for x in logs.lines)
    assert any(
        re.fullmatch(r"    Test net output #1: loss = (\S+) \(\* 1 = \1 loss\)", x)
        for x in logs.lines
    )
    assert any(
        re.fullmatch(r"Iteration 1 \(\S+ iter/s, \S+s/1 iters\), loss = \S+", x) for x in logs.lines
    )
    assert "Iteration 1, lr = 0.1" in logs.lines
    result = solver.test(0)
    assert set(result) == {"accuracy", "loss"}


@pytestmark_tiny
def test_solve_snapshots_and_final_test(tiny):
    path = tiny(snapshot=4, test_iter=1, test_interval=5, max_iter=10)
    solver = get_solver(str(path))
    with LogLines() as logs:
        solver.solve()
    assert solver.iter == 10
    names = sorted(os.listdir("snap"))
    assert names == [
        "tiny_iter_10.caffemodel",
        "tiny_iter_10.solverstate",
        "tiny_iter_4.caffemodel",
        "tiny_iter_4.solverstate",
        "tiny_iter_8.caffemodel",
        "tiny_iter_8.solverstate",
    ]
    assert logs.lines[-1] == "Optimization Done."
    assert "Iteration 10, Testing net (#0)" in logs.lines


@pytestmark_tiny
def test_tested_and_snapshot_hooks_replace_results(tiny, tmp_path):
    path = tiny(snapshot=2, test_iter=1, test_interval=2, max_iter=4)
    solver = get_solver(str(path))
    seen = []

    def tested(s, net_id, scores):
        seen.append(("tested", s.iter, net_id, sorted(scores)))
        return {"accuracy": 0.5}

    moved = tmp_path / "moved"
    moved.mkdir()

    def snapshotted(s, model_file, state_file):
        seen.append(("snapshot", s.iter, os.path.exists(model_file), os.path.exists(state_file)))
        return tuple(
            str(shutil.move(f, moved / os.path.basename(f))) for f in (model_file, state_file)
        )

    solver.on_tested.append(tested)
    solver.on_tested.append(lambda s, net_id, scores: None)  # None keeps the scores
    solver.on_snapshot.append(snapshotted)
    solver.step(3)
    assert seen == [
        ("tested", 0, 0, ["accuracy", "loss"]),
        ("snapshot", 2, True, True),
        ("tested", 2, 0, ["accuracy", "loss"]),
    ]
    assert solver.test(0) == {"accuracy": 0.5}
    model, state = solver.snapshot()
    assert (model, state) == (
        str(moved / "tiny_iter_3.caffemodel"),
        str(moved / "tiny_iter_3.solverstate"),
    )
    assert sorted(os.listdir(moved))[-2:] == ["tiny_iter_3.caffemodel", "tiny_iter_3.solverstate"]
    assert not any(name.startswith("tiny_iter_3") for name in os.listdir("snap"))


@pytestmark_tiny
def test_action_function_stop_snapshots(tiny):
    path = tiny(max_iter=100)
    solver = get_solver(str(path))
    calls = iter(["none", "none", "stop"])
    solver.action_function = lambda: next(calls, "none")
    solver.solve()
    assert solver.iter == 3
    assert os.path.exists("snap/tiny_iter_3.caffemodel")


@pytestmark_tiny
def test_restore_errors(tiny, tmp_path):
    solver = get_solver(str(tiny(type='"Adam"')))
    solver.step(1)
    _, state_file = solver.snapshot()
    sgd = get_solver(str(tiny()))
    with pytest.raises(io.CaffeFileError, match="incorrect length of history blobs"):
        sgd.restore(state_file)
    with pytest.raises(io.CaffeFileError, match="HDF5"):
        sgd.restore("x.h5")


# --- (3) the command line ---------------------------------------------------------------------


def _cli(*args, cwd, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} \d+ \S+:\d+\] ", re.MULTILINE)


@pytestmark_tiny
def test_cli_train_and_resume(tiny, tmp_path):
    tiny(max_iter=6, snapshot=3)
    r = _cli("train", "-solver", "solver.prototxt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert GLOG.search(r.stderr)
    assert "Iteration 5, lr = 0.1" in r.stderr
    assert re.search(r"Train net output #0: loss = \S+ \(\* 1 = \S+ loss\)", r.stderr)
    assert "Optimization Done." in r.stderr
    assert (tmp_path / "snap" / "tiny_iter_6.solverstate").is_file()
    r = _cli(
        "train", "--solver=solver.prototxt", "--snapshot", "snap/tiny_iter_3.solverstate",
        "--iterations", "8", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Resuming from snap/tiny_iter_3.solverstate" in r.stderr
    assert "Iteration 3, lr" in r.stderr and "Iteration 2, lr" not in r.stderr
    assert (tmp_path / "snap" / "tiny_iter_8.caffemodel").is_file()
    r = _cli(
        "train", "-solver", "solver.prototxt", "-weights", "snap/tiny_iter_3.caffemodel",
        "-snapshot", "snap/tiny_iter_3.solverstate", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 1
    assert "but not both" in r.stderr


@pytestmark_tiny
def test_cli_weights_test_and_time(tiny, tmp_path):
    tiny(max_iter=2)
    assert _cli("train", "-solver", "solver.prototxt", cwd=tmp_path).returncode == 0
    r = _cli(
        "train", "-solver", "solver.prototxt", "-weights", "snap/tiny_iter_2.caffemodel",
        "-iterations", "1", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Finetuning from snap/tiny_iter_2.caffemodel" in r.stderr
    r = _cli(
        "test", "-model", "net.prototxt", "-weights", "snap/tiny_iter_2.caffemodel",
        "-iterations", "3", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Batch 2, accuracy = " in r.stderr
    assert re.search(r"\] Loss: \S+", r.stderr)
    assert re.search(r"\] loss = (\S+) \(\* 1 = \1 loss\)", r.stderr)
    r = _cli("time", "-model", "net.prototxt", "-iterations", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for what in ("Average Forward pass", "Average Backward pass", "Average Forward-Backward"):
        assert re.search(rf"{what}: \S+ ms\.", r.stderr), what
    assert re.search(r"     scale\tforward: \S+ ms\.", r.stderr)
    assert re.search(r"      loss\tbackward: \S+ ms\.", r.stderr)


def test_cli_errors_and_device_query(tmp_path):
    bad = tmp_path / "bad.prototxt"
    bad.write_text('net: "x.prototxt"\nbase_lr: oops\n')
    r = _cli("train", "--solver", str(bad), cwd=tmp_path)
    assert r.returncode == 1
    assert f"{bad}:2" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("train", cwd=tmp_path)
    assert r.returncode == 1 and "Need a solver definition" in r.stderr
    r = _cli("device_query", cwd=tmp_path)
    assert r.returncode == 0
    assert "CPU" in r.stderr or "Querying GPUs" in r.stderr
    try:
        import cupy  # noqa: F401

        has_cupy = True
    except ImportError:
        has_cupy = False
    if not has_cupy:
        r = _cli("time", "-model", "m.prototxt", "-gpu", "0", cwd=tmp_path)
        assert r.returncode == 1
        assert "cannot use GPU 0" in r.stderr and "CuPy" in r.stderr


@pytestmark_tiny
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_cli_ctrl_c_snapshots_then_stops(tiny, tmp_path):
    tiny(max_iter=10_000_000, display=100)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "train", "-solver", "solver.prototxt"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        for line in proc.stderr:
            if "Iteration 200," in line or time.time() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    assert "Optimization stopped early." in rest
    states = list((tmp_path / "snap").glob("tiny_iter_*.solverstate"))
    assert len(states) == 1
    it = int(re.search(r"_iter_(\d+)", states[0].name).group(1))
    assert it >= 200
