"""PyTorch's forward+backward ms per batch on this host, for LeNet (batch 64) and CIFAR10-quick
(batch 100): the yardstick issue #2 names beside its targets ("PyTorch 14 ms and 63 ms" on its
2-core machine), measured here so that engine_speed.py's figures can be read against the same
machine. Run it in the same hour as engine_speed.py: this host's speed drifts by 20% or more.

    <python with torch> bench/pytorch_reference.py [--iters 20] [--rounds 3] [--threads 2]

PyTorch is not a dependency of the project (a CPU build is several GB): install it in a
separate virtualenv, e.g. `python3.11 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install
torch`. The nets are the golden prototxts' layers written as PyTorch modules, on random input,
like `caffe time` and engine_speed.py: ceil-rounded pooling as Caffe's, no gradient into the
data, the loss on random labels.
"""

import argparse
import statistics
import time

NETS = {"lenet": ((64, 1, 28, 28), "LeNet"), "cifar10_quick": ((100, 3, 32, 32), "Cifar")}


def build(name):
    from torch import nn
    from torch.nn import functional as F

    class LeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
            self.ip1, self.ip2 = nn.Linear(800, 500), nn.Linear(500, 10)

        def forward(self, x):
            x = F.max_pool2d(self.conv1(x), 2, 2, ceil_mode=True)
            x = F.max_pool2d(self.conv2(x), 2, 2, ceil_mode=True)
            return self.ip2(F.relu(self.ip1(x.flatten(1))))

    class Cifar(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 32, 5, padding=2)
            self.conv2 = nn.Conv2d(32, 32, 5, padding=2)
            self.conv3 = nn.Conv2d(32, 64, 5, padding=2)
            self.ip1, self.ip2 = nn.Linear(64 * 4 * 4, 64), nn.Linear(64, 10)

        def forward(self, x):
            x = F.relu(F.max_pool2d(self.conv1(x), 3, 2, ceil_mode=True))
            x = F.avg_pool2d(F.relu(self.conv2(x)), 3, 2, ceil_mode=True)
            x = F.avg_pool2d(F.relu(self.conv3(x)), 3, 2, ceil_mode=True)
            return self.ip2(self.ip1(x.flatten(1)))

    return {"LeNet": LeNet, "Cifar": Cifar}[NETS[name][1]]()


def time_net(name, iters, warmup):
    import torch
    from torch.nn import functional as F

    shape = NETS[name][0]
    net = build(name)
    x = torch.randn(*shape)
    y = torch.randint(0, 10, (shape[0],))
    times = []
    for it in range(warmup + iters):
        t = time.perf_counter()
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        if it >= warmup:
            times.append(time.perf_counter() - t)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        raise SystemExit(
            "pytorch_reference.py needs torch: run it with a Python that has it (see --help)"
        ) from None
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in NETS:
        times = []
        for _ in range(args.rounds):
            times += time_net(name, args.iters, args.warmup)
        ms = sorted(1e3 * t for t in times)
        print(
            f"{name:<14} forward+backward: median {statistics.median(ms):.2f} ms, "
            f"min {ms[0]:.2f}, max {ms[-1]:.2f} ({len(ms)} iterations)"
        )


if __name__ == "__main__":
    main()
