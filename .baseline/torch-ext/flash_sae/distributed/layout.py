"""How the latents are laid out over ranks: contiguous blocks, DTensor's ``Shard(0)`` rule.

Rank r of a latent group of W ranks holds latents [r * c, min(F, (r + 1) * c)) with
c = ceil(F / W), the split ``torch.chunk`` and ``DTensor``'s ``Shard(0)`` make, so a shard is
a ``DTensor`` local tensor as it is and ``torch.distributed.checkpoint`` reshards it to any
other layout (one process included). F need not be divisible by W; every rank must hold at
least one latent (F > (W - 1) * c).

A ``LatentLayout`` names the process groups of a 1-D (latent) or 2-D (data x latent) layout:
the latent group shares one batch and splits F; the data group holds replicas that see
different batches and average their gradients.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

LATENT_DIM = "latent"  # a DeviceMesh's latent dimension's name
DATA_DIM = "data"  # and its data-parallel (replica) dimension's


def shard_bounds(n_features: int, world: int, rank: int) -> tuple[int, int]:
    """[lo, hi): the latents rank ``rank`` of ``world`` holds (``Shard(0)``'s rule)."""
    chunk = -(-n_features // world)
    lo = min(n_features, rank * chunk)
    return lo, min(n_features, lo + chunk)


def check_shardable(n_features: int, world: int) -> None:
    lo, hi = shard_bounds(n_features, world, world - 1)
    if hi - lo < 1:
        raise ValueError(
            f"n_features={n_features} over {world} latent shards leaves the last shard empty (shards hold "
            f"ceil(F / W) = {-(-n_features // world)} latents, DTensor's Shard(0) split): use another n_features "
            "(a multiple of the number of shards always works) or fewer shards"
        )


@dataclass(frozen=True)
class LatentLayout:
    """The process groups of a sharded SAE. ``mesh`` is a 1-D DeviceMesh (its one dimension is
    the latent one) or a 2-D one whose dimensions are named ``"data"`` and ``"latent"``."""

    mesh: DeviceMesh
    latent_group: dist.ProcessGroup
    data_group: dist.ProcessGroup | None
    latent_rank: int
    latent_world: int
    data_world: int

    @staticmethod
    def build(mesh: DeviceMesh | None = None, group: dist.ProcessGroup | None = None, device=None):
        if (mesh is None) == (group is None):
            raise ValueError("give exactly one of mesh (a DeviceMesh) or group (a ProcessGroup of latent shards)")
        if not dist.is_initialized():
            raise ValueError("torch.distributed is not initialised: call init_process_group (or torchrun) first")
        if group is not None:
            if not isinstance(group, dist.ProcessGroup):
                raise ValueError(f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
            if device is not None:
                dev_type = torch.device(device).type
            else:  # NCCL groups live on GPUs
                dev_type = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
            mesh = DeviceMesh.from_group(group, dev_type, mesh_dim_names=(LATENT_DIM,))
        if not isinstance(mesh, DeviceMesh):
            raise ValueError(f"mesh must be a torch.distributed DeviceMesh, got {type(mesh).__name__}")
        names = mesh.mesh_dim_names
        if mesh.ndim == 1:
            latent, data = mesh, None
        elif mesh.ndim == 2 and names is not None and set(names) == {DATA_DIM, LATENT_DIM}:
            latent, data = mesh[LATENT_DIM], mesh[DATA_DIM]
        else:
            raise ValueError(
                f"mesh must be 1-D (latent shards) or 2-D with dimensions named ('{DATA_DIM}', '{LATENT_DIM}'), "
                f"got {mesh.ndim}-D with names {names}"
            )
        return LatentLayout(
            mesh=mesh,
            latent_group=latent.get_group(),
            data_group=data.get_group() if data is not None else None,
            latent_rank=latent.get_local_rank(),
            latent_world=latent.size(),
            data_world=data.size() if data is not None else 1,
        )
