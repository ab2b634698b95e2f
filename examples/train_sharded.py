# /// script
# requires-python = ">=3.11"
# dependencies = [
#   "torch==2.13.0",
#   "triton==3.7.1",
#   "kernels==0.17.2",
# ]
# ///
"""Train a TopK SAE whose latents are split over GPUs (and replicated over more), with torchrun.

    torchrun --nproc-per-node 4 examples/train_sharded.py --n-features 1048576 --d-model 2048 --k 64
    torchrun --nproc-per-node 4 examples/train_sharded.py --data-parallel 2      # 2 replicas x 2 shards
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 examples/train_sharded.py ...

On GPUs it uses NCCL (one GPU per process, ``LOCAL_RANK``); without GPUs, gloo on the CPU and the
package's plain-torch path (``TRITON_INTERPRET=1`` runs the Triton kernels under the interpreter
instead; small sizes: ``--device cpu --n-features 200 --d-model 16``).
The activations are synthetic (sparse sums of a hidden dictionary's directions plus noise, the same
on every rank of a latent group, different per replica), so the script runs anywhere; swap
``batch`` for your activation source. Each step: the sharded forward and backward, the replicas'
gradient average, the decoder-norm steps and Adam. At the end it writes a
``torch.distributed.checkpoint`` folder and rank 0 loads it into the single-GPU
``SparseAutoencoder`` (when F * D <= 2^28), whose loss on a held-out batch it prints beside the
sharded module's.

Inside a checkout it builds and loads the local package (``build_local``); elsewhere it downloads
``org/flash-sae`` from the hub.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent


def load_flash_sae(rank: int):
    from kernels import get_kernel

    if (ROOT / "build_local.py").exists() and (ROOT / "torch-ext" / "flash_sae").exists():
        sys.path.insert(0, str(ROOT))
        import build_local

        if rank == 0:  # one build, then every rank loads it
            build_local.load_kernel()
        dist.barrier()
        os.environ["LOCAL_KERNELS"] = build_local.local_kernels_entry()
        return build_local.load_kernel()
    return get_kernel("org/flash-sae", version=1, trust_remote_code=True)


def batch(args, step, replica, device, dtype):
    """Synthetic activations: each row sums ``--true-k`` directions of a hidden dictionary."""
    g = torch.Generator().manual_seed(args.seed)
    truth = torch.randn(args.true_features, args.d_model, generator=g)
    truth /= truth.norm(dim=1, keepdim=True)
    g.manual_seed(args.seed * 1_000_003 + step * 1009 + replica)
    ids = torch.randint(0, args.true_features, (args.batch, args.true_k), generator=g)
    mags = torch.rand(args.batch, args.true_k, generator=g) * 2
    x = (mags.unsqueeze(2) * truth[ids]).sum(1) + 0.01 * torch.randn(args.batch, args.d_model, generator=g)
    return x.to(device=device, dtype=dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-features", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024, help="rows per replica per step")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--data-parallel", type=int, default=1, help="replicas; the rest of the world shards latents")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--true-features", type=int, default=4096)
    ap.add_argument("--true-k", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--out", default="sharded_sae_checkpoint")
    args = ap.parse_args()

    if args.device == "cpu":
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    fs = load_flash_sae(rank)
    from torch.distributed.device_mesh import init_device_mesh

    R = args.data_parallel
    if R < 1 or world % R:
        raise SystemExit(f"--data-parallel {R} must divide the number of processes ({world})")
    mesh = init_device_mesh(device.type, (R, world // R), mesh_dim_names=("data", "latent"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    sae = fs.distributed.ShardedSparseAutoencoder(
        args.d_model, args.n_features, args.k, mesh=mesh, dtype=dtype, device=device, seed=args.seed
    )
    replica = sae.layout.mesh.get_local_rank("data")
    if rank == 0:
        print(sae)
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    for step in range(args.steps):
        out = sae.loss(batch(args, step, replica, device, dtype))
        out.loss.backward()
        sae.all_reduce_gradients()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
        if step % args.log_every == 0 or step == args.steps - 1:
            dead = sae.dead_fraction()  # an all-reduce, on every rank
            if rank == 0:
                rows = (step + 1) * args.batch * R
                print(
                    f"step {step:5d}  loss {out.loss.item():.5f}  fvu {out.fvu.item():.4f}  "
                    f"dead {dead.item():.3f}  {rows / (time.perf_counter() - t0):,.0f} rows/s"
                )

    fs.distributed.save_checkpoint(sae, args.out, opt)
    sae.eval()
    held_out = batch(args, args.steps + 1, 0, device, dtype)
    sharded_loss = sae.loss(held_out).loss.item()
    dist.barrier()
    if rank == 0 and args.n_features * args.d_model <= 2**28:  # the single module's init draws [F, D] in fp64
        single = fs.SparseAutoencoder(args.d_model, args.n_features, args.k, dtype=dtype, device=device).eval()
        fs.distributed.load_checkpoint(single, args.out)
        single_loss = single.loss(held_out).loss.item()
        print(f"checkpoint {args.out}: held-out loss sharded {sharded_loss:.6f}, single-GPU module {single_loss:.6f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
