"""Does the Data layer slow training? One training step (forward + backward) of LeNet (batch 64)
and CIFAR10-quick (batch 100, with a mean file) fed by the Data layer from an LMDB, against the
same net fed by an Input layer. Prints the median ms of each, alternated A B A B.

    python bench/data_vs_input.py [--iters 40] [--nets lenet cifar10_quick]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402  (sets the BLAS environment before NumPy loads)

# isort: split
import numpy as np  # noqa: E402

from engine import io  # noqa: E402
from engine.data.datum import array_to_datum  # noqa: E402
from engine.data.lmdb_io import LMDBWriter  # noqa: E402

NETS = {
    "lenet": ("conf/lenet/lenet_train_test.prototxt", (1, 28, 28), 64),
    "cifar10_quick": ("conf/cifar10_quick/train_val.prototxt", (3, 32, 32), 100),
}


def make_lmdb(path, shape, n, seed):
    rs = np.random.RandomState(seed)
    with LMDBWriter(path) as db:
        for i in range(n):
            img = rs.randint(0, 256, size=shape).astype(np.uint8)
            db.put(f"{i:08d}", array_to_datum(img, int(rs.randint(10))).SerializeToString())


def net_params(prototxt, workdir, shape):
    """(Data-fed, Input-fed) TRAIN NetParameters of a conf/ net, sources in `workdir`."""
    param = io.read_prototxt(ROOT / prototxt)
    data = engine.caffe_pb2.NetParameter()
    data.CopyFrom(param)
    inp = engine.caffe_pb2.NetParameter()
    inp.CopyFrom(param)
    del inp.layer[:]
    for i, lp in enumerate(param.layer):
        if lp.type != "Data":
            inp.layer.add().CopyFrom(lp)
            continue
        dl = data.layer[i]
        dl.data_param.source = str(workdir / "lmdb")
        if dl.transform_param.HasField("mean_file"):
            dl.transform_param.mean_file = str(workdir / "mean.binaryproto")
        if any(r.phase == engine.TRAIN for r in lp.include):
            new = inp.layer.add()
            new.name, new.type = lp.name, "Input"
            new.top.extend(lp.top)
            batch = lp.data_param.batch_size
            new.input_param.shape.add().dim.extend((batch, *shape))
            new.input_param.shape.add().dim.extend((batch,))
    return data, inp


def step_ms(net):
    t = time.perf_counter()
    net.forward_backward()
    return (time.perf_counter() - t) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    args = ap.parse_args(argv)
    print(f"{os.cpu_count()} CPUs, numpy {np.__version__}")
    for name in args.nets:
        prototxt, shape, batch = NETS[name]
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            make_lmdb(work / "lmdb", shape, 2000, seed=1)
            rs = np.random.RandomState(2)
            io.write_binary(
                work / "mean.binaryproto",
                io.array_to_blobproto(rs.uniform(0, 255, (1, *shape)).astype(np.float32)),
            )
            data_param, input_param = net_params(prototxt, work, shape)
            engine.set_random_seed(1)
            with_data = engine.Net(data_param, engine.TRAIN)
            with_input = engine.Net(input_param, engine.TRAIN)
            with_input.blobs["data"].data[...] = rs.uniform(0, 1, (batch, *shape))
            with_input.blobs["label"].data[...] = rs.randint(0, 10, batch)
            for _ in range(3):
                step_ms(with_data), step_ms(with_input)
            a, b = [], []
            for _ in range(args.iters):
                a.append(step_ms(with_data))
                b.append(step_ms(with_input))
            ma, mb = statistics.median(a), statistics.median(b)
            print(
                f"{name:14s} batch {batch}: Data layer {ma:7.2f} ms, Input layer {mb:7.2f} ms, "
                f"ratio {ma / mb:.3f} (target <= 1.10)"
            )
            for layer in with_data.layers:
                close = getattr(layer, "close", None)
                if close:
                    close()


if __name__ == "__main__":
    main()
