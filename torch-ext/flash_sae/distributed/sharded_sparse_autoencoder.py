"""``ShardedSparseAutoencoder``: the TopK SAE with its latents split over ranks, replicas on top.

Layout (``layout.py``): a 1-D DeviceMesh (or a ProcessGroup) of latent shards, or a 2-D mesh
("data", "latent"): each replica holds the whole dictionary split over its latent group and
trains on its own batch; the replicas average their gradients (``all_reduce_gradients``).

Checkpoints go through ``torch.distributed.checkpoint`` (``save_checkpoint`` /
``load_checkpoint``), which reshards: a checkpoint written by W shards loads into W' shards, or
into the single-GPU ``SparseAutoencoder`` (and back), with the Adam moments when an optimizer is
given.
"""

import contextlib
import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Replicate, Shard

from .._validation import check_int
from ..dead_latent_loss import DeadLatentLoss
from ..modules._geometry import FusedDecoderGeometry
from ..modules.base import DeadLossOptions, SAEBase, UnitNormDecoder
from ..results import TopKSAEStep
from .layout import LatentLayout, check_shardable, shard_bounds
from .sharded_auxk import gather_latents
from .sharded_topk_sae_step import sharded_decode, sharded_topk_encode, sharded_topk_sae_step

SHARDED = ("W_enc", "b_enc", "W_dec", "tokens_since_fired")  # [F, ...] tensors, split by latent
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # optimizer state shaped as its parameter


class ShardSetup(NamedTuple):
    """A sharded module's place in its layout: the ``LatentLayout``, its first latent ``f0``, its latents
    ``n_local`` and the seed its shard draws from."""

    layout: LatentLayout
    f0: int
    n_local: int
    seed: int


def shard_setup(n_features, mesh, group, device, seed) -> ShardSetup:
    """Checks the layout and n_features; the shard's bounds and seed. ``seed`` None: the first rank draws
    one and broadcasts it (a collective)."""
    layout = LatentLayout.build(mesh, group, device)
    check_int("n_features", n_features, 1, 2**31 - 1)
    check_shardable(n_features, layout.latent_world)
    f0, f1 = shard_bounds(n_features, layout.latent_world, layout.latent_rank)
    if seed is None:  # one draw, shared by every rank: shards differ by f0, replicas agree
        seed = int(shared_random_seed(layout, device))
    return ShardSetup(layout, f0, f1 - f0, (seed * 1_000_003 + f0) % 2**63)


class ShardedLatents:
    """Mixin for a latent-sharded module (listed before the one-process bases, which hold this rank's
    F_r latents): the layout, the shard's bounds, the replicas' gradient average, the dead fraction over
    every shard, the bookkeeping after a step, and the state as global tensors for checkpoints."""

    sharded_state = SHARDED  # the state_dict's [F, ...] entries, split by latent; the others are replicated

    def _set_shards(self, setup: ShardSetup, n_features: int) -> None:
        self.layout = setup.layout
        self.n_features, self.n_local, self.f0 = n_features, setup.n_local, setup.f0

    @property
    def supports_fused_optimizer(self) -> bool:
        """``flash_sae.FusedAdam`` updates each rank's own rows in its backward (nothing to exchange); with
        data-parallel replicas the gradients must be averaged first (``all_reduce_gradients``), so it does not."""
        return self.layout.data_group is None

    def _shards_repr(self) -> str:
        lay = self.layout
        shards = f"{lay.latent_world} shards x {lay.data_world} replicas"
        return f"latents [{self.f0}, {self.f0 + self.n_local}) of {shards}"

    @torch.no_grad()
    def _after_step(self, step, rows: int) -> None:
        """The one-process bookkeeping with the replicas' statistics: fire counts summed over the data
        group (so the replicas' dead counts agree), and a BatchTopK step's ``min_act`` its minimum over the
        replicas (so their inference thresholds agree; the latent group's ranks already share one)."""
        group = self.layout.data_group
        if self.training and group is not None:
            counts = step.fire_counts.clone()
            dist.all_reduce(counts, group=group)
            step, rows = step._replace(fire_counts=counts), rows * self.layout.data_world
            if getattr(step, "min_act", None) is not None:
                low = step.min_act.clone()
                dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
                step = step._replace(min_act=low)
        super()._after_step(step, rows)

    @torch.no_grad()
    def all_reduce_gradients(self) -> None:
        """Averages every parameter's gradient over the replicas (one all-reduce of the gradients
        concatenated; a no-op without a data dimension). Call it after ``backward`` and before the
        optimiser step."""
        group = self.layout.data_group
        if group is None:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(self.layout.data_world)
        i = 0
        for g in grads:
            g.copy_(flat[i : i + g.numel()].view_as(g))
            i += g.numel()

    def dead_fraction(self) -> torch.Tensor:
        """0-d fp32: the share of dead latents over all shards (an all-reduce; a device tensor)."""
        n = self.dead_mask().sum().float()
        dist.all_reduce(n, group=self.layout.latent_group)
        return n / self.n_features

    def _all_latents(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's per-latent [F_r] ``t`` gathered over the latent group into the global [F] (one
        all-gather): the dead set AuxK windows, the live norms ``resample_dead_`` averages."""
        return gather_latents(t, self.layout.latent_group, self.n_features)

    def _resample_picks(self, weight: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Every rank draws the one-process module's F picks from the shared generator; this shard keeps its own."""
        return super()._resample_picks(weight, generator)[self.f0 : self.f0 + self.n_local]

    def resample_dead_(self, x, optimizer=None, *, encoder_norm_scale=None, generator=None) -> torch.Tensor:
        """``SAEBase.resample_dead_`` over the global dead set (every rank of the mesh calls it, with the
        same ``x`` [N, D] and a ``generator`` in the same state, e.g. seeded identically): every rank draws
        the F picks one process would draw and writes the rows of its own dead latents; the live rows' mean
        norms are over all shards. So the new weights do not depend on the layout (W shards, W' shards, one
        process with the same weights and generator state). ``generator`` None: the mesh's first rank draws
        a seed and broadcasts it (a collective). ``optimizer`` resets the moments of this rank's resampled
        rows. Returns the number of dead latents over all shards (a 0-d device tensor)."""
        if generator is None:
            dev = self.W_dec.device
            generator = torch.Generator(device=dev).manual_seed(shared_random_seed(self.layout, dev))
        return super().resample_dead_(x, optimizer, encoder_norm_scale=encoder_norm_scale, generator=generator)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The state as global tensors for ``torch.distributed.checkpoint``: the [F, ...] ones as
        ``DTensor``s sharded over the latent mesh dimension, the others (b_dec, a threshold) replicated."""
        return {name: self.as_global(t, name in self.sharded_state) for name, t in self.state_dict().items()}

    def as_global(self, t: torch.Tensor, sharded: bool) -> DTensor:
        """This rank's ``t`` as a DTensor: rows [f0, f0 + F_r) of an [F, ...] tensor (``sharded``), or
        the same on every rank."""
        mesh = self.layout.mesh
        if t.device.type != mesh.device_type:
            raise ValueError(
                f"the module's tensors are on {t.device.type} but its mesh is a {mesh.device_type} mesh: build the "
                "mesh (or pass device=) on the device the module lives on"
            )
        latent_dim = 0 if mesh.ndim == 1 else mesh.mesh_dim_names.index("latent")
        placements = [Replicate()] * mesh.ndim
        if sharded:
            placements[latent_dim] = Shard(0)
        shape = (self.n_features, *t.shape[1:]) if sharded else t.shape
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(t, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


class ShardedSparseAutoencoder(ShardedLatents, UnitNormDecoder, DeadLossOptions, FusedDecoderGeometry, SAEBase):
    """A TopK SAE (``SparseAutoencoder``'s parameters and math) whose F latents are split over ranks.

    Args:
        d_model, n_features, k: D, F (over all shards) and the active latents per row.
        mesh: a 1-D DeviceMesh of latent shards, or a 2-D one with dimensions named ``"data"``
            and ``"latent"`` (replicas x shards). Or ``group``: a ProcessGroup of latent shards.
        dtype, device: of the parameters (the device is this rank's GPU, or the CPU with gloo).
        seed: each shard draws its rows from its own generator seeded by (seed, first latent), so
            the dictionary does not depend on the number of replicas; it differs from the
            single-GPU module's draw for the same seed (same distribution). To start from a
            given single-GPU module, load its checkpoint (``load_checkpoint``). Without a seed,
            the first rank draws one and broadcasts it (a collective in the constructor).
        dead_window_tokens: as ``SparseAutoencoder``'s. Each rank counts its own latents from the fire
            counts summed over the replicas (exact integers), so the dead set over all shards is the one
            one process would track over the replicas' concatenated batches, the same on every replica.
        dead_loss: None or ``"auxk"`` (or a ``DeadLatentLoss`` of kind ``"auxk"`` without a mask):
            ``SparseAutoencoder``'s AuxK over the global dead set (its k_aux, coef, capacity and window
            offset; ``sharded_auxk.py``). Ghost grads are not offered sharded.

    Parameters (this rank's): ``W_enc`` [F_r, D], ``b_enc`` [F_r], ``W_dec`` [F_r, D], the
    latents ``[f0, f0 + F_r)`` (``self.f0``, ``self.n_local``); ``b_dec`` [D] on every rank.
    Every rank of a latent group must be given the same batch; replicas are given different ones.
    """

    def __init__(
        self,
        d_model,
        n_features,
        k,
        *,
        mesh=None,
        group=None,
        dtype=None,
        device=None,
        seed=None,
        dead_window_tokens=10_000_000,
        dead_loss=None,
    ):
        setup = shard_setup(n_features, mesh, group, device, seed)
        check_int("k", k, 1, n_features)
        super().__init__(
            d_model, setup.n_local, dtype=dtype, device=device, seed=setup.seed, dead_window_tokens=dead_window_tokens
        )
        self._set_shards(setup, n_features)
        self.k = k
        loss = DeadLatentLoss.of(dead_loss)
        if loss is not None and loss.kind != "auxk":
            raise ValueError(f"dead_loss: the sharded TopK SAE offers AuxK only, got kind {loss.kind!r}")
        self._set_dead_loss(loss)

    def _sparsity_repr(self) -> str:
        return f"k={self.k}, {self._shards_repr()}"

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole code (vals [B, k], global ids [B, k]), descending; the same on every shard."""
        return sharded_topk_encode(
            x, self.W_enc, self.b_enc, self.k, self.b_dec, group=self.layout.latent_group, n_features=self.n_features
        )

    def decode(self, vals: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x_hat [B, D] from a whole code with global ids."""
        return sharded_decode(
            vals, indices, self.W_dec, self.b_dec, group=self.layout.latent_group, n_features=self.n_features
        )

    def _step(self, x: torch.Tensor) -> TopKSAEStep:
        """The sharded step (``sharded_topk_sae_step``): a ``TopKSAEStep`` whose ``fire_counts`` are this
        shard's latents' in this replica's batch. ``loss`` then updates the dead-latent counts (in
        training mode) with the fire counts summed over the replicas."""
        return sharded_topk_sae_step(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k,
            group=self.layout.latent_group, n_features=self.n_features, dead_loss=self.step_dead_loss(),
        )  # fmt: skip


def shared_random_seed(layout, device) -> int:
    """A seed drawn by the mesh's first rank and broadcast to every rank of the mesh."""
    dev = torch.device(layout.mesh.device_type) if device is None else torch.device(device)
    t = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(dev)
    dist.broadcast(t, group=layout.latent_group, group_src=0)
    if layout.data_group is not None:
        dist.broadcast(t, group=layout.data_group, group_src=0)
    return int(t.item())


def _state(module) -> dict[str, torch.Tensor]:
    if isinstance(module, ShardedLatents):
        return module.checkpoint_state()
    return dict(module.state_dict())


def _optimizer_state(module, optimizer, create: bool) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state under ``optim.<param>.<key>`` (moments as the parameter
    is laid out, the step count as a 0-d tensor); ``create`` fills in an empty state with zeros."""
    out = {}
    for name, p in module.named_parameters():
        state = optimizer.state[p]
        if create and not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            moments = MOMENTS if optimizer.defaults.get("amsgrad") else MOMENTS[:2]
            for key in moments:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            if key in MOMENTS and value.shape == p.shape and isinstance(module, ShardedLatents):
                value = module.as_global(value, name in module.sharded_state)
            out[f"optim.{name}.{key}"] = value
    return out


@contextlib.contextmanager
def _quiet_single_process(module):
    """DCP warns that it assumes one process when ``no_dist`` is set: the intent for a single module."""
    with warnings.catch_warnings():
        if not isinstance(module, ShardedLatents):
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(module, path, optimizer=None) -> None:
    """Writes ``module``'s state (and ``optimizer``'s, an Adam-like one) to the folder ``path`` with
    ``torch.distributed.checkpoint``: every rank calls it for a sharded module (``ShardedLatents``); one
    process for a one-process module (``SparseAutoencoder``, ``BatchTopKSparseAutoencoder``, ..., with or
    without a process group)."""
    state = _state(module)
    if optimizer is not None:
        state.update(_optimizer_state(module, optimizer, create=False))
    with _quiet_single_process(module):
        dcp.save(state, checkpoint_id=str(path), no_dist=not isinstance(module, ShardedLatents))


def load_checkpoint(module, path, optimizer=None) -> None:
    """Reads a ``save_checkpoint`` folder into ``module`` (and ``optimizer``), whatever the layout it
    was written with: W shards into W' shards, sharded into single-GPU, single-GPU into sharded.
    Keys the checkpoint lacks (a single-GPU module's ``dead_offset``) keep their values. Every rank
    calls it for a sharded module; any one process for a one-process module of the same architecture."""
    stored = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    state = {k: v for k, v in _state(module).items() if k in stored}
    if optimizer is not None:
        state.update({k: v for k, v in _optimizer_state(module, optimizer, create=True).items() if k in stored})
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in state]
    if missing:
        raise ValueError(f"checkpoint at {path} lacks {missing}: not an SAE written by save_checkpoint")
    with _quiet_single_process(module):
        dcp.load(state, checkpoint_id=str(path), no_dist=not isinstance(module, ShardedLatents))
    if not isinstance(module, ShardedLatents):
        module.load_state_dict({k: v for k, v in state.items() if not k.startswith("optim.")}, strict=False)
