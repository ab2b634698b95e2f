# /// script
# requires-python = ">=3.11"
# dependencies = [
#   "torch==2.13.0",
#   "triton==3.7.1",
#   "kernels==0.17.2",
# ]
# ///
"""Train an SAE whose latents are split over processes (and replicated over more), with torchrun, on one
node or several.

    # one node, 4 GPUs: 4 latent shards, or 2 replicas x 2 shards
    torchrun --nproc-per-node 4 examples/train_sharded.py --n-features 1048576 --d-model 2048 --k 64
    torchrun --nproc-per-node 4 examples/train_sharded.py --data-parallel 2
    # 2 nodes x 8 GPUs (the same command on each node; HOST: one of them): 16 latent shards
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id run1 \\
        examples/train_sharded.py --n-features 4194304 --d-model 2048 --k 64
    # CPU (gloo), tiny sizes
    torchrun --nproc-per-node 3 examples/train_sharded.py --device cpu --n-features 200 --d-model 16 --k 4

``--arch topk|batchtopk|matryoshka|jumprelu|standard`` picks the sharded module. The processes form a
mesh of ``--data-parallel`` replicas x S = world / replicas latent shards. By default consecutive ranks
are one replica's shards (ranks 0..S-1 are replica 0's), so with ``--nproc-per-node`` a multiple of S
each replica sits on one node and only the replicas' gradient all-reduce crosses nodes;
``--replicas-inner`` makes consecutive ranks one shard's replicas, so the gradient all-reduce stays inside
a node and the latent group's activation-sized exchanges cross nodes. The gradient all-reduce carries the
whole dictionary's gradients (about 2 F D values per replica) every step, the latent group's exchanges
about B D values, so across nodes prefer latent shards alone (``--data-parallel 1``: no gradient
exchange), or ``--replicas-inner`` (docs/multi-gpu.md, "The layout").

On GPUs it uses NCCL (one GPU per process, ``LOCAL_RANK``); with ``--device cpu``, gloo and the package's
plain-torch path (``TRITON_INTERPRET=1`` runs the Triton kernels under the interpreter instead).
The activations are synthetic (sparse sums of a hidden dictionary's directions plus noise): step s's
batch of ``--batch`` rows is the same whatever the layout, and each replica trains on its own slice of it
(``--batch`` must be divisible by the replicas), so runs on different layouts follow the same curve (up to
rounding; BatchTopK's batch rule selects over each replica's slice, so its curve depends on the number of
replicas). Swap ``batch`` for your activation source. Each step: the sharded forward and backward, the
replicas' gradient average, the architecture's decoder steps and Adam.

Checkpoints (``torch.distributed.checkpoint``, ``save_checkpoint``; a folder every node must see) hold the
parameters, buffers and Adam's state and step count: ``--out`` is written at the end (and every
``--save-every`` steps), and ``--resume PATH`` continues one on any layout (2 nodes x 2 processes into 1
node x 3, a one-process module's checkpoint into shards), from the step it was written at, up to
``--steps``. ``--losses FILE`` (rank 0) writes one JSON line per step: the step and the global batch's loss
(the replicas' mean). At the end rank 0 loads the checkpoint into the one-process module of the same
architecture (when F * D <= 2^28) and prints its held-out loss beside the sharded module's.

Bad input fails on every rank before any training collective: a ``--data-parallel`` that does not divide
the world or the batch, or F smaller than the shards need (every shard holds at least one latent).

Inside a checkout it builds and loads the local package (``build_local``); elsewhere it downloads
``org/flash-sae`` from the hub.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("topk", "batchtopk", "matryoshka", "jumprelu", "standard")


def load_flash_sae(rank: int):
    from kernels import get_kernel

    if (ROOT / "build_local.py").exists() and (ROOT / "torch-ext" / "flash_sae").exists():
        sys.path.insert(0, str(ROOT))
        import build_local

        if rank == 0:  # one build (the checkout is shared by every node), then every rank loads it
            build_local.load_kernel()
        dist.barrier()
        os.environ["LOCAL_KERNELS"] = build_local.local_kernels_entry()
        return build_local.load_kernel()
    return get_kernel("org/flash-sae", version=1, trust_remote_code=True)


def batch(args, step, device, dtype, replica=0, replicas=1):
    """Step ``step``'s synthetic batch (``--batch`` rows, each the sum of ``--true-k`` directions of a hidden
    dictionary), the same for every layout; ``replica``'s slice of it."""
    g = torch.Generator().manual_seed(args.seed)
    truth = torch.randn(args.true_features, args.d_model, generator=g)
    truth /= truth.norm(dim=1, keepdim=True)
    g.manual_seed(args.seed * 1_000_003 + step * 1009)
    ids = torch.randint(0, args.true_features, (args.batch, args.true_k), generator=g)
    mags = torch.rand(args.batch, args.true_k, generator=g) * 2
    x = (mags.unsqueeze(2) * truth[ids]).sum(1) + 0.01 * torch.randn(args.batch, args.d_model, generator=g)
    rows = args.batch // replicas
    return x[replica * rows : (replica + 1) * rows].to(device=device, dtype=dtype)


def prefix_sizes(args) -> list[int]:
    if args.prefix_sizes:
        return [int(m) for m in args.prefix_sizes.split(",")]
    F = args.n_features
    return sorted({max(1, F // 4), max(1, F // 2), F})


def build_module(fs, args, *, sharded: bool, **place):
    """The ``--arch`` module: sharded over ``place["mesh"]``, or the one-process one."""
    D, F, k = args.d_model, args.n_features, args.k
    ns = fs.distributed if sharded else fs
    prefix = "Sharded" if sharded else ""
    if args.arch == "topk":
        return getattr(ns, f"{prefix}SparseAutoencoder")(D, F, k, **place)
    if args.arch == "batchtopk":
        return getattr(ns, f"{prefix}BatchTopKSparseAutoencoder")(D, F, k, **place)
    if args.arch == "matryoshka":
        cls = getattr(ns, f"{prefix}MatryoshkaBatchTopKSparseAutoencoder")
        return cls(D, F, k, prefix_sizes=prefix_sizes(args), **place)
    if args.arch == "jumprelu":
        return getattr(ns, f"{prefix}JumpReLUSparseAutoencoder")(D, F, **place)
    return getattr(ns, f"{prefix}StandardSparseAutoencoder")(D, F, **place)


def resumed_step(sae, opt) -> int:
    """The step a loaded checkpoint was written at: Adam's step count (0 without optimizer state)."""
    state = opt.state.get(sae.W_enc, {})
    return int(state["step"]) if "step" in state else 0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=ARCHS, default="topk")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-features", type=int, default=16384)
    ap.add_argument("--k", type=float, default=32, help="active latents per row (topk, batchtopk, matryoshka)")
    ap.add_argument("--prefix-sizes", default=None, help="matryoshka's levels, m1,m2,...,F (default F/4, F/2, F)")
    ap.add_argument("--batch", type=int, default=1024, help="rows per step, split over the replicas")
    ap.add_argument("--steps", type=int, default=200, help="train up to this step (a resumed run continues)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--data-parallel", type=int, default=1, help="replicas; each replica's processes shard latents")
    ap.add_argument(
        "--replicas-inner",
        action="store_true",
        help="lay ranks out replica-major (consecutive ranks: one shard's replicas) instead of shard-major",
    )
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--true-features", type=int, default=4096)
    ap.add_argument("--true-k", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--losses", default=None, help="rank 0 writes each step's loss here (JSON lines)")
    ap.add_argument("--out", default="sharded_sae_checkpoint")
    ap.add_argument("--save-every", type=int, default=0, help="also checkpoint to OUT/step_N every N steps")
    ap.add_argument("--resume", default=None, help="a save_checkpoint folder to continue from (any layout)")
    args = ap.parse_args(argv)
    if args.arch == "topk" or args.k == int(args.k):
        args.k = int(args.k)
    return args


def check_layout(args, world: int) -> None:
    """The layout's errors, raised the same on every rank (before any collective)."""
    R = args.data_parallel
    if R < 1 or world % R:
        raise ValueError(f"--data-parallel {R} must divide the number of processes ({world})")
    if args.batch % R:
        raise ValueError(f"--data-parallel {R} must divide --batch {args.batch} (each replica trains on a slice)")


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    try:
        train(args, device)
    finally:
        dist.destroy_process_group()


def train(args, device):
    rank, world = dist.get_rank(), dist.get_world_size()
    check_layout(args, world)
    fs = load_flash_sae(rank)
    from torch.distributed.device_mesh import init_device_mesh

    R = args.data_parallel
    if args.replicas_inner:  # ranks 0..R-1 are shard 0's replicas
        mesh = init_device_mesh(device.type, (world // R, R), mesh_dim_names=("latent", "data"))
    else:  # ranks 0..S-1 are replica 0's shards
        mesh = init_device_mesh(device.type, (R, world // R), mesh_dim_names=("data", "latent"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    sae = build_module(fs, args, sharded=True, mesh=mesh, dtype=dtype, device=device, seed=args.seed)
    replica = mesh.get_local_rank("data")
    data_group = mesh.get_group("data")
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    start = 0
    if args.resume:
        fs.distributed.load_checkpoint(sae, args.resume, opt)
        start = resumed_step(sae, opt)
    if rank == 0:
        print(sae, f"from step {start}" if start else "")
    log = open(args.losses, "a") if args.losses and rank == 0 else None
    t0 = time.perf_counter()
    for step in range(start, args.steps):
        out = sae.loss(batch(args, step, device, dtype, replica, R))
        out.loss.backward()
        sae.all_reduce_gradients()
        sae.before_optimizer_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.after_optimizer_step()
        last = step == args.steps - 1
        if log is not None or step % args.log_every == 0 or last:
            loss = out.loss.detach().float().clone()
            dist.all_reduce(loss, group=data_group)  # the global batch's loss: the replicas' mean
            loss /= R
            if step % args.log_every == 0 or last:
                dead = sae.dead_fraction()  # an all-reduce, on every rank
            if log is not None:
                log.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
                log.flush()
            if rank == 0 and (step % args.log_every == 0 or last):
                rows = (step + 1 - start) * args.batch
                print(
                    f"step {step:5d}  loss {loss.item():.5f}  dead {dead.item():.3f}  "
                    f"{rows / (time.perf_counter() - t0):,.0f} rows/s",
                    flush=True,
                )
        if args.save_every and (step + 1) % args.save_every == 0 and not last:
            fs.distributed.save_checkpoint(sae, Path(args.out) / f"step_{step + 1}", opt)
    if log is not None:
        log.close()

    fs.distributed.save_checkpoint(sae, args.out, opt)
    sae.eval()
    held_out = batch(args, args.steps + 1, device, dtype)
    sharded_loss = sae.loss(held_out).loss.item()
    dist.barrier()
    if rank == 0 and args.n_features * args.d_model <= 2**28:  # the single module's init draws [F, D] in fp64
        single = build_module(fs, args, sharded=False, dtype=dtype, device=device).eval()
        fs.distributed.load_checkpoint(single, args.out)
        single_loss = single.loss(held_out).loss.item()
        print(f"checkpoint {args.out}: held-out loss sharded {sharded_loss:.6f}, single-GPU module {single_loss:.6f}")
    dist.barrier()


if __name__ == "__main__":
    main()
