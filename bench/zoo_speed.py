"""Time one forward + backward of every conf/ model-zoo deploy net on the CPU (random input,
median of a few runs): `python bench/zoo_speed.py [--batch 8] [--runs 3] [--threads N] [NET ...]`.

Backward runs through every layer (force_backward, with a random diff on the outputs of nets
without a loss) and computes every parameter gradient, but, as `caffe time`, no gradient
for the input blobs.

LeNet has no deploy file: its train_test net is used with an Input layer for the Data layers.
A net whose estimated memory does not fit in the available RAM is skipped with a note.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _blas_threads(argv):
    """`--threads N` must reach the BLAS library before NumPy loads it."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--threads=") else None
        if arg == "--threads" and i + 1 < len(argv):
            value = argv[i + 1]
        if value:
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[var] = value


_blas_threads(sys.argv[1:])

import numpy as np  # noqa: E402

import engine  # noqa: E402
from engine import io  # noqa: E402
from engine.proto import caffe_pb2  # noqa: E402

CONF = ROOT / "conf"
VOCAB = 4000  # LRCN's vocabulary (conf/lrcn)
STEPS = 20  # LRCN's sequence length


def zoo_names():
    return sorted(p.name for p in CONF.iterdir() if p.is_dir() and any(p.glob("*.prototxt")))


def deploy_param(name, batch):
    """The deploy NetParameter of conf/<name> at `batch`, with force_backward on."""
    folder = CONF / name
    deploy = folder / "deploy.prototxt"
    if deploy.exists():
        param = io.read_prototxt(deploy)
    else:  # LeNet: Data layers -> one Input layer, phase-specific layers dropped
        train = io.read_prototxt(next(folder.glob("*train*.prototxt")))
        param = caffe_pb2.NetParameter(name=train.name)
        first = param.layer.add(name="input", type="Input", top=["data", "label"])
        first.input_param.shape.add(dim=[batch, 1, 28, 28])
        first.input_param.shape.add(dim=[batch])
        for lp in train.layer:
            if lp.type != "Data" and not lp.include and not lp.exclude:
                param.layer.add().CopyFrom(lp)
    for lp in param.layer:
        if lp.type == "Input":
            for top, shape in zip(lp.top, lp.input_param.shape):
                # Images: batch first; word sequences are T x N (time-major).
                axis = 1 if top in ("input_sentence", "cont_sentence") else 0
                shape.dim[axis] = batch
    param.force_backward = True
    return param


def fill_inputs(net, rng):
    for name in net.inputs:
        blob = net.blobs[name]
        if name == "input_sentence":
            blob.data[...] = rng.integers(0, VOCAB, blob.shape)
        elif name == "cont_sentence":
            blob.data[...] = 1
            blob.data[0] = 0
        elif name == "label":
            blob.data[...] = rng.integers(0, 10, blob.shape)
        else:
            blob.data[...] = rng.standard_normal(blob.shape)


def available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate_bytes(name, batch):
    """Memory a net needs at `batch`, from a batch-1 build: parameters and blobs with data and
    diff (float32), plus the largest im2col buffer, with 50% headroom for temporaries."""
    net = engine.Net(deploy_param(name, 1), engine.TEST)
    params = sum(b.count for layer in net.layers for b in layer.blobs)
    blobs = sum(b.count for b in net.blobs.values())
    col = 0
    for layer, bottom, top in zip(net.layers, net.bottom_vecs, net.top_vecs):
        if layer.param.type == "Convolution":
            cp = layer.param.convolution_param
            k = cp.kernel_h * cp.kernel_w if cp.HasField("kernel_h") else cp.kernel_size[0] ** 2
            col = max(col, bottom[0].shape[1] // cp.group * k * top[0].count_range(2))
    per_batch = 2 * blobs + col
    return int(1.5 * 4 * (2 * params + batch * per_batch)), params


def time_net(name, batch, runs, rng):
    net = engine.Net(deploy_param(name, batch), engine.TEST)
    fill_inputs(net, rng)
    for layer in net.layers:  # trained-looking BatchNorm statistics (fresh ones give inf / NaN)
        if layer.param.type == "BatchNorm":
            for blob, value in zip(layer.blobs, (0.0, 1.0, 1.0)):
                blob.data[...] = value
    # Like `caffe time`: gradients of every layer and parameter, none for the input blobs.
    inputs = set(net.inputs)
    for i, ids in enumerate(net.bottom_ids):
        for j, bid in enumerate(ids):
            if net.blob_names[bid] in inputs:
                net.bottom_need_backward[i][j] = False
    if not any(any(layer.loss_weights) for layer in net.layers):
        for out in net.outputs:  # no loss: back-propagate a random diff of the outputs
            net.blobs[out].diff[...] = rng.standard_normal(net.blobs[out].shape)
    fwd, bwd = [], []
    for i in range(runs + 1):  # the first run warms caches and is not counted
        net.clear_param_diffs()
        t0 = time.perf_counter()
        net.forward_from_to()
        t1 = time.perf_counter()
        net.backward_from_to()
        t2 = time.perf_counter()
        if i:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return statistics.median(fwd), statistics.median(bwd)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("nets", nargs="*", help="conf/ folders to time (default: all)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per net (median)")
    parser.add_argument(
        "--threads", type=int, help="BLAS threads (default: the library's, usually all cores)"
    )
    args = parser.parse_args(argv)
    engine.set_mode_cpu()
    engine.set_random_seed(1)
    rng = np.random.default_rng(0)
    names = args.nets or zoo_names()
    unknown = sorted(set(names) - set(zoo_names()))
    if unknown:
        parser.error(f"no such conf/ net: {', '.join(unknown)}")
    threads = os.environ.get("OMP_NUM_THREADS") or os.environ.get("OPENBLAS_NUM_THREADS")
    print(
        f"one forward + backward, batch {args.batch}, CPU ({os.cpu_count()} cores, "
        f"BLAS threads {threads or 'default'}), median of {args.runs} runs after 1 warm-up"
    )
    print(f"{'net':<15}{'params':>13}{'forward ms':>12}{'backward ms':>13}{'total ms':>11}"
          f"{'img/s':>9}")  # fmt: skip
    for name in names:
        need, params = estimate_bytes(name, args.batch)
        avail = available_bytes()
        if avail is not None and need > avail:
            print(
                f"{name:<15}{params:>13,}  skipped: needs ~{need / 2**30:.1f} GiB, "
                f"{avail / 2**30:.1f} GiB available"
            )
            continue
        try:
            fwd, bwd = time_net(name, args.batch, args.runs, rng)
        except MemoryError:
            print(f"{name:<15}{params:>13,}  skipped: out of memory at batch {args.batch}")
            continue
        total = fwd + bwd
        print(
            f"{name:<15}{params:>13,}{fwd * 1e3:>12.1f}{bwd * 1e3:>13.1f}{total * 1e3:>11.1f}"
            f"{args.batch / total:>9.1f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
