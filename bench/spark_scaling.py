"""Data-parallel scaling of CaffeOnSpark training on a local Spark cluster: images/s of one
executor vs two (one core each) on LeNet and CIFAR10-quick, the all-reduce time per
iteration, and the start-up time from train() to the first iteration.

    .venv/bin/python bench/spark_scaling.py [--lenet-iters 120] [--cifar-iters 40]

Each rank keeps the net's batch (LeNet 64, CIFAR10-quick 100), as Caffe's multi-GPU training
does, so two ranks process twice the images per iteration. LeNet reads the bundled digits;
CIFAR10-quick reads random 3x32x32 images (speed does not depend on the pixels). Workers are
pinned to their own core (-pinCpus), so one executor really computes on one core. Targets:
2 executors >= 1.85x the images/s of one; all-reduce <= 10% of a step; start-up <= 15 s.
"""

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from google.protobuf import text_format

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from caffeonspark import CaffeOnSpark, Config, DataSource  # noqa: E402
from engine.data import LMDBWriter, array_to_datum  # noqa: E402
from engine.proto import caffe_pb2  # noqa: E402

NETS = {
    "LeNet": (REPO / "conf/lenet/lenet_train_test.prototxt", 64, "lenet"),
    "CIFAR10-quick": (REPO / "conf/cifar10_quick/train_val.prototxt", 100, "cifar10_quick"),
}


def write_lmdb(path, images, labels):
    with LMDBWriter(str(path)) as db:
        for i, (img, lab) in enumerate(zip(images, labels)):
            db.put(f"{i:08d}", array_to_datum(img, int(lab)).SerializeToString())
    return str(path)


def make_data(folder):
    digits = np.load(REPO / "data/digits.npz")
    lenet = write_lmdb(
        folder / "digits_lmdb", digits["train_images"][:, None], digits["train_labels"]
    )
    rs = np.random.default_rng(0)
    images = rs.integers(0, 256, size=(2000, 3, 32, 32), dtype=np.uint8)
    cifar = write_lmdb(folder / "cifar_lmdb", images, rs.integers(0, 10, size=2000))
    return {"LeNet": lenet, "CIFAR10-quick": cifar}


def write_solver(folder, name, source, iters):
    net_file, batch, stem = NETS[name]
    net = caffe_pb2.NetParameter()
    text_format.Parse(net_file.read_text(), net)
    for lp in net.layer:
        if lp.type == "Data":
            lp.data_param.source = source
            lp.data_param.batch_size = batch
            lp.transform_param.ClearField("mean_file")  # random pixels: no mean image
            lp.transform_param.scale = 0.00390625
    net_path = folder / f"{stem}_net.prototxt"
    net_path.write_text(text_format.MessageToString(net))
    solver = folder / f"{stem}_solver.prototxt"
    solver.write_text(
        f'net: "{net_path}" base_lr: 0.001 momentum: 0.9 weight_decay: 0.004 '
        f'lr_policy: "fixed" display: {max(iters // 4, 1)} max_iter: {iters} '
        f'snapshot_after_train: false snapshot_prefix: "{folder}/{stem}" random_seed: 1 '
        'type: "SGD"'
    )
    return str(solver)


def solo(solver, cpu, iters):
    """Step time (s) of a plain engine solver pinned to one CPU, no Spark, no MPI."""
    from engine.solvers import get_solver

    os.sched_setaffinity(0, {cpu})
    param = Config(conf=solver).solver_param
    param.ClearField("snapshot_prefix")
    param.snapshot_after_train = False
    s = get_solver(param)
    s.step(3)
    t = time.perf_counter()
    s.step(iters)
    return (time.perf_counter() - t) / iters


def ceiling(solver, iters, repeat):
    """The speed-up this host allows two ranks: one solver alone on a core vs two
    independent solvers at once, one per core (shared caches and memory, other load)."""
    import subprocess

    def run(cpus):
        cmd = [sys.executable, __file__, "--solo", solver, "--iters", str(iters), "--cpu"]
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        procs = [subprocess.Popen([*cmd, str(c)], stdout=subprocess.PIPE, env=env) for c in cpus]
        return [float(p.communicate()[0].decode().split()[-1]) for p in procs]

    cpus = sorted(os.sched_getaffinity(0))[:2]
    alone = min(run([c])[0] for c in cpus for _ in range(repeat))
    pair = min(max(run(cpus)) for _ in range(repeat))
    return 2 * alone / pair


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lenet-iters", type=int, default=120)
    ap.add_argument("--cifar-iters", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=2, help="runs per setting (the best is kept)")
    ap.add_argument("--master", default="local-cluster[2,1,1024]")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the host's ceiling check")
    ap.add_argument("--solo", help=argparse.SUPPRESS)
    ap.add_argument("--cpu", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--iters", type=int, default=20, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.solo:
        print(solo(args.solo, args.cpu, args.iters))
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s] %(message)s")

    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    from pyspark.sql import SparkSession

    t = time.monotonic()
    spark = (
        SparkSession.builder.master(args.master)
        .appName("caffeonspark-scaling")
        .config("spark.executorEnv.PYTHONPATH", str(REPO))
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    session_s = time.monotonic() - t
    folder = Path(tempfile.mkdtemp(prefix="caffeonspark-bench-"))
    sources = make_data(folder)
    cos = CaffeOnSpark(spark)
    iters = {"LeNet": args.lenet_iters, "CIFAR10-quick": args.cifar_iters}
    rows = []
    for name in NETS:
        solver = write_solver(folder, name, sources[name], iters[name])
        runs = {1: [], 2: []}
        for _ in range(args.repeat):  # alternate the settings so slow spells hit both
            for executors in (1, 2):
                model = folder / f"{NETS[name][2]}_{executors}.caffemodel"
                conf = Config(
                    spark, conf=solver, model=str(model), clusterSize=executors, pinCpus=True
                )
                runs[executors].append(cos.train(DataSource.get(conf, is_train=True)))
        results = {k: max(v, key=lambda s: s.images_per_s_median) for k, v in runs.items()}
        startup = max(s.startup_s for v in runs.values() for s in v)
        bound = None if args.no_ceiling else ceiling(solver, iters[name], args.repeat)
        rows.append((name, results, startup, bound))
    spark.stop()

    print(f"\nSpark session start-up (local-cluster JVMs): {session_s:.1f} s (not counted below)")
    header = (
        f"{'net':<14} {'ranks':>5} {'batch':>5} {'images/s':>9} {'(mean)':>7} {'speed-up':>8} "
        f"{'step ms':>8} {'all-reduce ms':>13} {'% of step':>9} {'wait ms':>8} {'start-up s':>10}"
    )
    print(header)
    print("-" * len(header))
    for name, results, _, _ in rows:
        base = results[1].images_per_s_median
        for executors, s in results.items():
            print(
                f"{name:<14} {executors:>5} {s.batch_per_rank:>5} {s.images_per_s_median:>9.0f} "
                f"{s.images_per_s:>7.0f} {s.images_per_s_median / base:>7.2f}x "
                f"{1e3 * s.step_median_s:>8.1f} {1e3 * s.allreduce_s:>13.2f} "
                f"{100 * s.allreduce_s / s.step_median_s:>8.1f}% {1e3 * s.wait_s:>8.2f} "
                f"{s.startup_s:>10.1f}"
            )
    print()
    for name, results, startup, bound in rows:
        two = results[2]
        host = "" if bound is None else f" (this host allows {bound:.2f}x)"
        print(
            f"{name}: speed-up {two.images_per_s_median / results[1].images_per_s_median:.2f}x"
            f"{host} (target >= 1.85), all-reduce "
            f"{100 * two.allreduce_s / two.step_median_s:.1f}% of a step (target <= 10%), "
            f"start-up <= {startup:.1f} s (target <= 15 s)"
        )
    print(
        f"\nbest of {args.repeat} runs per setting. images/s: ranks x batch / median iteration "
        "time after warm-up ((mean): from the mean time); all-reduce: MPI_Allreduce of all "
        "gradients in one float32 buffer; wait: time at the barrier before it, waiting for the "
        "slowest rank (load imbalance, other processes on the cores); start-up: train() to the "
        "first iteration on the driver, worst run."
    )
    if not args.no_ceiling:
        print(
            "host allows: 2 x (step time of one plain engine solver alone on a core) / (step "
            "time of two independent solvers running at once, one per core), without Spark or "
            "MPI: the best two ranks on this machine can do, whatever the launcher."
        )


if __name__ == "__main__":
    main()
