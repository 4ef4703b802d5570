"""One finite-difference gradient checker for every layer test (after Caffe's
test_gradient_check_util.hpp): central differences of a random linear objective."""

import numpy as np

from engine import rng
from engine.blob import Blob


def make_blobs(*arrays):
    """Blobs holding copies of the given arrays (float32)."""
    blobs = []
    for a in arrays:
        a = np.asarray(a, dtype=np.float32)
        b = Blob(a.shape)
        b.data[...] = a
        blobs.append(b)
    return blobs


def _objective(layer, bottom, top, weights, seed):
    rng.set_random_seed(seed)  # stochastic layers (Dropout) draw the same mask every time
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return sum(float(np.sum(t.data.astype(np.float64) * w)) for t, w in zip(top, weights))


def check_gradient(
    layer,
    bottom,
    top,
    *,
    check_bottom=None,
    check_params=True,
    step=1e-2,
    threshold=1e-3,
    kink=0.0,
    kink_range=-1.0,
    seed=1701,
    top_weights=None,
):
    """Compare `layer.backward` with numerical derivatives of sum(w_k * top_k).

    `check_bottom`: indices of bottoms to check (default: all). Parameters are checked when
    `check_params`. Elements whose value lies within `kink_range` of `kink` are skipped
    (non-smooth points such as ReLU's 0). Raises AssertionError listing the worst mismatch.
    """
    layer.setup(bottom, top)
    if check_bottom is None:
        check_bottom = list(range(len(bottom)))
    rs = np.random.RandomState(seed)
    if top_weights is None:
        top_weights = [rs.standard_normal(t.shape) for t in top]
    _objective(layer, bottom, top, top_weights, seed)
    for t, w in zip(top, top_weights):
        t.diff[...] = w
    for p in layer.blobs:
        p.diff[...] = 0
    for b in bottom:
        b.diff[...] = 0
    propagate = [i in check_bottom for i in range(len(bottom))]
    layer.backward(top, propagate, bottom)

    targets = [(f"bottom[{i}]", bottom[i]) for i in check_bottom]
    if check_params:
        targets += [(f"param[{j}]", p) for j, p in enumerate(layer.blobs)]
    analytic = [b.diff.astype(np.float64).copy() for _, b in targets]
    failures = []
    for (label, blob), grad in zip(targets, analytic):
        flat = blob.data.reshape(-1)
        gflat = grad.reshape(-1)
        for i in range(flat.size):
            orig = float(flat[i])
            if kink_range > 0 and abs(orig - kink) < kink_range:
                continue
            flat[i] = orig + step
            fp = _objective(layer, bottom, top, top_weights, seed)
            flat[i] = orig - step
            fm = _objective(layer, bottom, top, top_weights, seed)
            flat[i] = orig
            est = (fp - fm) / (2 * step)
            scale = max(abs(gflat[i]), abs(est), 1.0)
            err = abs(gflat[i] - est)
            if err > threshold * scale:
                failures.append((err / scale, label, i, gflat[i], est))
    _objective(layer, bottom, top, top_weights, seed)
    if failures:
        failures.sort(reverse=True)
        worst = "; ".join(
            f"{lab} elem {i}: analytic {a:.6g} numeric {n:.6g}" for _, lab, i, a, n in failures[:5]
        )
        raise AssertionError(f"{len(failures)} gradient mismatches in {layer.name!r}: {worst}")
