"""MPI transport for CPU training: one communicator grown from workers that each started
under their own `mpiexec -n 1`, and in-place collectives on flat float32 buffers.

MPI singletons cannot find each other, but separate `mpiexec -n 1` jobs can: rank 0 opens one
port per joining rank, the ports reach every task through Spark's allGather, and rank k
connects to port k-1 while ranks 0..k-1 accept it together; each step merges the
intercommunicator, so the communicator grows in partition order.
"""

import os
import time

import numpy as np


def _mpi():
    from mpi4py import MPI

    return MPI


def transport_env(connection, infiniband_present=None):
    """Environment for UCX (MPICH's ch4:ucx netmod) for -connection ethernet|infiniband.

    Returns (env dict, warning or None). Ethernet keeps UCX off InfiniBand verbs (shared
    memory on one host, TCP between hosts); infiniband leaves UCX free to pick RC/UD/DC
    verbs, and falls back to ethernet with a warning when the host has no IB device.
    """
    env = {"UCX_LOG_LEVEL": "error", "UCX_WARN_UNUSED_ENV_VARS": "n"}
    warning = None
    if connection == "infiniband":
        if infiniband_present is None:
            infiniband_present = os.path.isdir("/sys/class/infiniband") and bool(
                os.listdir("/sys/class/infiniband")
            )
        if infiniband_present:
            return env, None
        warning = "-connection infiniband: this host has no InfiniBand device; using ethernet"
    env["UCX_TLS"] = "^ib"
    return env, warning


def open_ports(count):
    """Rank 0: `count` fresh MPI port names, one per rank that will join."""
    MPI = _mpi()
    return [MPI.Open_port() for _ in range(count)]


def close_ports(ports):
    MPI = _mpi()
    for port in ports:
        try:
            MPI.Close_port(port)
        except MPI.Exception:
            pass


def join(rank, size, ports):
    """Form the communicator of `size` ranks; rank 0 gives the ports it opened, every other
    rank the list it received. Returns an MPIComm whose rank equals `rank`."""
    MPI = _mpi()
    if len(ports) != size - 1:
        raise ValueError(f"rank {rank}: {len(ports)} ports for {size} ranks (need {size - 1})")
    if rank == 0:
        comm = MPI.COMM_SELF.Dup()
    else:
        inter = MPI.COMM_SELF.Connect(ports[rank - 1])
        comm = inter.Merge(high=True)
        inter.Disconnect()
    for k in range(comm.Get_size(), size):
        inter = comm.Accept(ports[k - 1], root=0)
        merged = inter.Merge(high=False)
        inter.Disconnect()
        comm.Free()
        comm = merged
    ordered = comm.Split(0, rank)
    comm.Free()
    if ordered.Get_rank() != rank or ordered.Get_size() != size:
        raise RuntimeError(
            f"MPI rendezvous gave rank {ordered.Get_rank()} of {ordered.Get_size()}, "
            f"expected {rank} of {size}"
        )
    return MPIComm(ordered)


class MPIComm:
    """A communicator with the few collectives training needs, timing the all-reduces."""

    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.allreduce_seconds = 0.0
        self.allreduce_calls = 0

    def allreduce_sum_(self, buffer):
        """Sum `buffer` (contiguous float32) over every rank, in place."""
        MPI = _mpi()
        t = time.perf_counter()
        self.comm.Allreduce(MPI.IN_PLACE, [buffer, MPI.FLOAT], op=MPI.SUM)
        self.allreduce_seconds += time.perf_counter() - t
        self.allreduce_calls += 1
        return buffer

    def bcast_(self, buffer, root=0):
        """Overwrite `buffer` on every rank with root's (contiguous numeric array)."""
        self.comm.Bcast(buffer, root=root)
        return buffer

    def bcast_object(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def gather_object(self, obj, root=0):
        """Every rank's `obj`, in rank order, on `root` (None elsewhere)."""
        return self.comm.gather(obj, root=root)

    def allreduce_mean(self, values):
        """Mean over ranks of a float64 array (validation scores, counters)."""
        MPI = _mpi()
        arr = np.ascontiguousarray(values, dtype=np.float64)
        out = np.empty_like(arr)
        self.comm.Allreduce(arr, out, op=MPI.SUM)
        return out / self.size

    def barrier(self):
        self.comm.Barrier()

    def free(self):
        if self.comm is not None:
            self.comm.Free()
            self.comm = None
