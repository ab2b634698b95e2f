"""Runs a test body on W spawned ranks (torch.distributed: gloo on CPU, NCCL when every rank has a GPU).

``run_ranks(body, W, *args)`` spawns W processes; each loads flash-sae through the kernel hub as
the tests do, joins a process group through a file store, and calls ``body(fs, rank, W, device,
*args)``. A failed assertion in any rank fails the test with that rank's traceback. The bodies
live here (importable by the spawned processes).
"""

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent


def _child(rank, world, init_file, body, args):
    use_gpu = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(ROOT))
    import build_local

    fs = build_local.load_kernel()
    if use_gpu:
        torch.cuda.set_device(rank)
    device = f"cuda:{rank}" if use_gpu else "cpu"
    backend = "nccl" if use_gpu else "gloo"
    kwargs = {"device_id": torch.device(device)} if use_gpu else {}
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world, **kwargs)
    try:
        body(fs, rank, world, device, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(body, world: int, *args) -> None:
    sys.path.insert(0, str(ROOT))
    import build_local

    build_local.load_kernel()  # builds once and sets LOCAL_KERNELS, which the ranks inherit
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _child, args=(world, os.path.join(tmp, "store"), body, args), nprocs=world, join=True, start_method="spawn"
        )


def shard_of(t, fs, F, world, rank):
    """Rank ``rank``'s rows of a [F, ...] tensor, as ``fs.distributed.shard_bounds`` splits F over ``world``."""
    lo, hi = fs.distributed.shard_bounds(F, world, rank)
    return t[lo:hi]


def agreed(t) -> bool:
    """Whether every rank holds the same ``t`` (a collective: call it on every rank)."""
    t = t.detach().float().reshape(-1).clone()
    hi, lo = t.clone(), t.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return torch.equal(hi, t) and torch.equal(lo, t)
