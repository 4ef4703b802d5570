"""Training-step speed of the engine on LeNet (batch 64) and CIFAR10-quick (batch 100):
ms per forward+backward, per-layer times, GFLOP/s of the conv/IP layers and the machine's SGEMM.

    python bench/engine_speed.py [--iters 20] [--warmup 3] [--rounds 1] [--nets lenet ...]
        [--force-backward] [--fourier-forward [test|all|none]] [--phase train|test]
        [--compare-forward] [--golden ../shared/golden] [--keep-blas-env]

Like `caffe time`: TRAIN phase, random input, no gradient into the data unless
--force-backward (the golden prototxts set force_backward; `caffe time` nets do not).
`--phase test` times forward passes of the TEST-phase net instead (what `test` and
`features` run). Convolutions that the cost model sends through the Fourier transform
(engine.fourier) show "dft" (gradients) or "dft+fwd" (forward too: TEST nets by default, TRAIN
nets with --fourier-forward / ENGINE_FOURIER_FORWARD=all) in the "path" column; their GFLOP
and GFLOP/s count im2col's multiply-adds, so they read as the rate an im2col convolution would
need for the same time.
`--compare-forward` times each net twice in one process, rounds alternating so that both see
the same load: with Caffe's TRAIN forward (the default, bit for bit Caffe's) and with the
Fourier one (ENGINE_FOURIER_FORWARD=all), and prints the two medians side by side.
OpenBLAS worker threads busy-wait ~0.1 s after each call by default and then compete with
the copies that follow; unless --keep-blas-env, this script sets OPENBLAS_THREAD_TIMEOUT=4
(before NumPy loads OpenBLAS), which made timings both faster and stable here.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if "--keep-blas-env" not in sys.argv:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402  (after the OpenBLAS environment is set)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402
from engine import fourier, io  # noqa: E402
from engine.im2col import num_threads  # noqa: E402

NETS = {"lenet": 64, "cifar10_quick": 100}
# Caffe 1.0 (OpenBLAS, 2 vCPU AMD EPYC) from golden/timing: forward+backward ms per batch.
CAFFE_MS = {"lenet": 14.7, "cifar10_quick": 128.5}
TARGET_MS = {"lenet": 12.0, "cifar10_quick": 55.0}


def build(golden, name, batch, force_backward, phase=engine.TRAIN):
    param = io.read_net_param(str(golden / "nets" / name / "net.prototxt"))
    param.force_backward = force_backward
    for lp in param.layer:
        if lp.type == "Input":
            for shape in lp.input_param.shape:
                shape.dim[0] = batch
    net = engine.Net(param, phase=phase)
    rs = np.random.RandomState(0)
    for name_ in net.inputs:
        blob = net.blobs[name_]
        if name_ == "label":
            blob.data[...] = rs.randint(0, 10, size=blob.shape)
        else:
            blob.data[...] = rs.standard_normal(blob.shape)
    return net


def macs(layer, bottom, top):
    """Multiply-adds of one forward pass of a conv / deconv / IP layer (else 0)."""
    kind = layer.type_name
    if kind == "Convolution":
        return layer.num * layer.num_output * layer.map_dim * layer.kernel_dim // layer.group
    if kind == "Deconvolution":
        return layer.num * layer.channels * layer.map_dim * layer.kernel_dim // layer.group
    if kind == "InnerProduct":
        return layer.m * layer.k * layer.num_output
    return 0


def time_net(net, iters, warmup, backward=True):
    n = len(net.layers)
    fwd = np.zeros((iters, n))
    bwd = np.zeros((iters, n))
    total = []
    for it in range(warmup + iters):
        t_start = time.perf_counter()
        row_f = np.zeros(n)
        row_b = np.zeros(n)
        for i in range(n):
            t0 = time.perf_counter()
            layer, bottom, top = net.layers[i], net.bottom_vecs[i], net.top_vecs[i]
            layer.reshape(bottom, top)
            layer.forward(bottom, top)
            row_f[i] = time.perf_counter() - t0
        for i in range(n - 1, -1, -1):
            if backward and net.layer_need_backward[i]:
                t0 = time.perf_counter()
                net.layers[i].backward(
                    net.top_vecs[i], net.bottom_need_backward[i], net.bottom_vecs[i]
                )
                row_b[i] = time.perf_counter() - t0
        elapsed = time.perf_counter() - t_start
        net.clear_param_diffs()
        if it >= warmup:
            fwd[it - warmup], bwd[it - warmup] = row_f, row_b
            total.append(elapsed)
    # Per-layer minimum over the timed iterations: the machine may be shared, and the
    # minimum is the least disturbed estimate of each layer (the total is reported both ways).
    return fwd.min(axis=0) * 1e3, bwd.min(axis=0) * 1e3, total


def sgemm_gflops(m, k, n, reps=10):
    rs = np.random.RandomState(0)
    a = rs.standard_normal((m, k)).astype(np.float32)
    b = rs.standard_normal((k, n)).astype(np.float32)
    out = np.empty((m, n), np.float32)
    for _ in range(3):
        np.matmul(a, b, out=out)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        ts.append(time.perf_counter() - t0)
    return 2.0 * m * k * n / min(ts) / 1e9


def report(name, net, result, rounds, backward=True):
    f_ms, b_ms, total = result
    ms = [t * 1e3 for t in total]
    med = statistics.median(ms)
    which = f", fastest of {rounds} rounds" if rounds > 1 else ""
    batch = net.blobs[net.inputs[0]].shape[0]
    print(f"\n== {name}  batch {batch}{which}")
    if backward:
        print(
            f"forward+backward: median {med:.2f} ms, min {min(ms):.2f}, max {max(ms):.2f}  "
            f"(sum of per-layer minima: forward {f_ms.sum():.2f}, backward {b_ms.sum():.2f})  "
            f" target {TARGET_MS[name]} ms, Caffe {CAFFE_MS[name]} ms"
        )
    else:
        print(
            f"TEST forward: median {med:.2f} ms ({batch / med * 1e3:.0f} images/s), min "
            f"{min(ms):.2f}, max {max(ms):.2f}  (sum of per-layer minima {f_ms.sum():.2f})"
        )
    print("per layer (minimum over iterations):")
    print(
        f"{'layer':<14}{'type':<16}{'path':<9}{'fwd ms':>9}{'bwd ms':>9}{'GFLOP':>9}{'GFLOP/s':>9}"
    )
    flop_total = 0.0
    gemm_ms = 0.0
    for i, layer in enumerate(net.layers):
        mac = macs(layer, net.bottom_vecs[i], net.top_vecs[i])
        flop = 0.0
        if mac:
            flop = 2.0 * mac
            if backward and net.layer_need_backward[i]:
                flop += 2.0 * mac * (1 + any(net.bottom_need_backward[i]))
            flop_total += flop
            gemm_ms += f_ms[i] + b_ms[i]
        rate = f"{flop / ((f_ms[i] + b_ms[i]) * 1e6):9.1f}" if mac else ""
        gf = f"{flop / 1e9:9.3f}" if mac else ""
        path = ""
        if getattr(layer, "fourier", None) is not None:
            path = "dft+fwd" if layer.fourier_forward else "dft"
        elif layer.type_name in ("Convolution", "Deconvolution"):
            path = "im2col"
        print(
            f"{net.layer_names[i]:<14}{layer.type_name:<16}{path:<9}{f_ms[i]:9.2f}{b_ms[i]:9.2f}"
            f"{gf}{rate}"
        )
    print(
        f"conv+IP: {flop_total / 1e9:.3f} GFLOP in {gemm_ms:.2f} ms = "
        f"{flop_total / (gemm_ms * 1e6):.1f} GFLOP/s (forward 2*MACs; backward 2*MACs per "
        f"gradient computed: weights, and the bottom where needed)"
    )
    return med


def compare_forward(args):
    """Each TRAIN net built twice, Caffe's forward ("test": the default) and the Fourier one
    ("all"); the forward mode is fixed when a layer first takes its shape, so both nets live
    side by side and their rounds alternate."""
    modes = {"test": "Caffe's forward (default)", "all": "Fourier forward (all)"}
    summary = []
    for name in args.nets:
        nets, runs = {}, {mode: [] for mode in modes}
        for mode in modes:
            os.environ[fourier.FORWARD_ENV] = mode
            nets[mode] = build(args.golden, name, NETS[name], args.force_backward)
        os.environ.pop(fourier.FORWARD_ENV, None)
        for _ in range(args.rounds):
            for mode in modes:
                runs[mode].append(time_net(nets[mode], args.iters, args.warmup))
        medians = {}
        for mode, label in modes.items():
            best = min(runs[mode], key=lambda r: statistics.median(r[2]))
            print(f"\n-- {label}")
            medians[mode] = report(name, nets[mode], best, args.rounds)
        summary.append((name, medians))
    print("\nforward+backward median ms, same rounds:")
    for name, medians in summary:
        cells = ", ".join(f"{modes[m]} {ms:.2f}" for m, ms in medians.items())
        print(f"  {name}: {cells}; target {TARGET_MS[name]}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    ap.add_argument("--rounds", type=int, default=1, help="repeat; report the fastest round")
    ap.add_argument("--force-backward", action="store_true")
    ap.add_argument("--keep-blas-env", action="store_true")
    ap.add_argument(
        "--fourier-forward",
        nargs="?",
        const="all",
        choices=fourier.FORWARD_MODES,
        help=f"which forward passes may take the Fourier transform (sets {fourier.FORWARD_ENV};"
        " alone: all, TRAIN nets too; default: test)",
    )
    ap.add_argument(
        "--phase",
        choices=["train", "test"],
        default="train",
        help="train: forward+backward of the TRAIN net; test: forward of the TEST net",
    )
    ap.add_argument(
        "--compare-forward",
        action="store_true",
        help="time each TRAIN net with Caffe's forward and with the Fourier one, alternating",
    )
    ap.add_argument("--golden", type=Path, default=ROOT.parent / "shared" / "golden")
    args = ap.parse_args(argv)
    if args.compare_forward and (args.fourier_forward or args.phase != "train"):
        ap.error("--compare-forward times TRAIN nets in both forward modes by itself")
    if args.fourier_forward:
        os.environ[fourier.FORWARD_ENV] = args.fourier_forward
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"numpy {np.__version__}, copy threads {num_threads()}, load average {load:.2f}, "
        f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT', 'unset')}, "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}, "
        f"{fourier.FORWARD_ENV}={os.environ.get(fourier.FORWARD_ENV, 'unset')}"
    )
    shapes = [(1024, 1024, 1024), (32, 800, 25600), (64, 800, 6400), (50, 500, 4096)]
    rates = ", ".join(f"{m}x{k}x{n}: {sgemm_gflops(m, k, n):.1f}" for m, k, n in shapes)
    print(f"SGEMM GFLOP/s (MxKxN; 1024^3, then conv-shaped): {rates}")
    if args.compare_forward:
        compare_forward(args)
        return
    train = args.phase == "train"
    phase = engine.TRAIN if train else engine.TEST
    for name in args.nets:
        net = build(args.golden, name, NETS[name], args.force_backward, phase)
        runs = [time_net(net, args.iters, args.warmup, train) for _ in range(args.rounds)]
        best = min(runs, key=lambda r: statistics.median(r[2]))
        report(name, net, best, args.rounds, train)


if __name__ == "__main__":
    main()
