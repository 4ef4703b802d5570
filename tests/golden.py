"""The golden suite (../shared/golden, made by BVLC Caffe) as test helpers: find cases,
build our Net for one, run forward/backward and compare at the suite's tolerances."""

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


def available():
    return GOLDEN.is_dir()


def cases(group, names=None):
    """pytest params for golden case folders under `group` (all, or those `names`)."""
    root = GOLDEN / group
    if not root.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no golden suite at {root}"))]
    found = sorted(p.name for p in root.iterdir() if (p / "case.json").exists())
    if names is not None:
        missing = sorted(set(names) - set(found))
        if missing:
            raise ValueError(f"golden cases not found in {root}: {missing}")
        found = [n for n in found if n in names]
    return [pytest.param(root / n, id=n) for n in found]


@contextlib.contextmanager
def chdir(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def load_case(case_dir):
    case_dir = Path(case_dir)
    meta = json.loads((case_dir / "case.json").read_text())
    io_npz = np.load(case_dir / "io.npz")
    return meta, {k: io_npz[k] for k in io_npz.files}


def tolerance(meta, key):
    """(rtol, atol) for one io.npz array: per-array if the case lists it, else by phase."""
    per_array = meta.get("array_tolerance", {})
    if key in per_array:
        return per_array[key]["rtol"], per_array[key]["atol"]
    kind = "forward" if key.startswith(("output/", "param_after_forward/")) else "backward"
    tol = meta.get("tolerance", {}).get(kind, {"rtol": 1e-4, "atol": 1e-5})
    atol = tol["atol"] if isinstance(tol["atol"], (int, float)) else 1e-5
    return tol["rtol"], atol


def assert_close(actual, expected, rtol, atol, what):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        if actual.size == expected.size:
            actual = actual.reshape(expected.shape)
        else:
            raise AssertionError(f"{what}: shape {actual.shape} != expected {expected.shape}")
    err = np.abs(actual - expected)
    bad = err > atol + rtol * np.abs(expected)
    if bad.any():
        i = np.unravel_index(np.argmax(err - rtol * np.abs(expected)), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.size} elements off; worst at {i}: "
            f"got {actual[i]:.8g}, expected {expected[i]:.8g} (rtol {rtol}, atol {atol:.3g})"
        )


def split_key(key):
    """'param_diff/inception_3a/1x1/0' -> ('param_diff', 'inception_3a/1x1', 0)."""
    kind, rest = key.split("/", 1)
    if kind.startswith("param"):
        layer, idx = rest.rsplit("/", 1)
        return kind, layer, int(idx)
    return kind, rest, None


def recipe_weights(net, meta):
    """Set weights by the case's numpy recipe (nets without a shipped caffemodel)."""
    for spec in meta["weight_recipe"]["params"]:
        w = np.random.RandomState(spec["seed"]).standard_normal(spec["shape"]) * spec["scale"]
        net.params[spec["layer"]][spec["index"]].data[...] = w.astype(np.float32)


def build_net(case_dir, meta):
    import engine

    phase = engine.TRAIN if meta["phase"] == "TRAIN" else engine.TEST
    weights = meta.get("weights")
    net = engine.Net(str(case_dir / meta["net"]), phase, weights=weights or None)
    if "weight_recipe" in meta:
        recipe_weights(net, meta)
    return net


def run_net_case(case_dir, skip=()):
    """Run one golden net case end to end; raise AssertionError on the first mismatch.

    `skip` lists io.npz keys not to compare (e.g. random outputs checked by rule elsewhere).
    Returns the net for further checks.
    """
    case_dir = Path(case_dir)
    meta, arrays = load_case(case_dir)
    with chdir(case_dir):
        net = build_net(case_dir, meta)
        for key, value in arrays.items():
            if key.startswith("input/"):
                net.blobs[key[len("input/") :]].data[...] = value
        compare(net, meta, arrays, ("param",), skip)  # as loaded, before forward changes any
        net.forward()
        compare(net, meta, arrays, ("output", "param_after_forward"), skip)
        if not meta.get("backward_run", True):
            return net
        for key, value in arrays.items():
            if key.startswith("top_diff/"):
                net.blobs[key[len("top_diff/") :]].diff[...] = value
        for blobs in net.params.values():
            for b in blobs:
                b.diff[...] = 0
        net.backward()
        compare(net, meta, arrays, ("bottom_diff", "param_diff", "blob_diff"), skip)
    return net


def compare(net, meta, arrays, kinds, skip=()):
    for key in sorted(arrays):
        kind, name, idx = split_key(key)
        if kind not in kinds or key in skip:
            continue
        if kind == "output":
            actual = net.blobs[name].data
        elif kind in ("bottom_diff", "blob_diff"):
            actual = net.blobs[name].diff
        elif kind == "param_diff":
            actual = net.params[name][idx].diff
        else:  # param, param_after_forward
            actual = net.params[name][idx].data
        rtol, atol = tolerance(meta, key)
        assert_close(np.asarray(actual), arrays[key], rtol, atol, f"{key}")
