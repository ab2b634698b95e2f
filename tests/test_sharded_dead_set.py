"""The global dead set of the latent-sharded TopK SAE (``flash_sae.distributed``) on spawned ranks: AuxK over
every shard's dead latents, the dead counts over replicas, and ``resample_dead_``.

CPU: gloo, the kernels through the interpreter; GPUs: NCCL when every rank has one. Checked against the
one-process ``topk_sae_step`` with the same ``DeadLatentLoss`` (mask, k_aux, capacity, offset): the code
exactly; the AuxK loss, the total loss and every gradient against the fp64 reference
(``reference.topk_sae_step`` with the dead loss) by the parity rule, the same bits when run again, and the
same AuxK loss and replicated gradients on every rank. Cases: F divisible by neither 2 nor 3, shards holding
fewer latents than k_aux, a window that wraps (offset past the first dead latents, capacity below their
number), B = 1. Then: a 2 x 2 mesh (replicas x shards) whose dead set equals one process's over the
replicas' concatenated batches; ``resample_dead_`` giving the same weights on 1, 2 and 3 shards as one
process; Adam steps with AuxK that follow the one-process module.
"""

import pytest
import torch
import torch.distributed as dist
from distributed_harness import agreed, run_ranks, shard_of
from encoder_inputs import make_sae
from parity import DTYPES, assert_parity, fast_tier_keeps, grads

NAMES = ("x", "W_enc", "b_enc", "W_dec", "b_dec")
# (B, D, F, k, k_aux, capacity, offset, seed): F = 23 divides by neither 2 nor 3; F = 10 on 3 ranks gives
# shards of 4, 4, 2, fewer than k_aux = 5; capacity 4 below the dead count with offset 7 wraps the window
CASES = [(6, 17, 23, 3, 4, None, 0, 1), (1, 12, 10, 2, 5, None, 3, 2), (5, 9, 23, 2, 3, 4, 7, 3)]


def auxk_step_body(fs, rank, world, device, cases, dtypes):
    group = dist.group.WORLD
    for B, D, F, k, k_aux, capacity, offset, seed in cases:
        dead = torch.rand(F, generator=torch.Generator().manual_seed(seed)) < 0.6
        dead = dead.to(device)
        for dtype in dtypes:
            params = list(make_sae(B, D, F, k, dtype, device, seed=seed))
            up = torch.tensor(0.5 + seed / 7, device=device)
            loss = fs.DeadLatentLoss(dead, k_aux=k_aux, capacity=capacity, offset=offset, coef=0.5)
            single = fs.topk_sae_step(*params, k, dead_loss=loss)
            single_grads = grads(single.loss, params, up)
            mine = [params[0].detach().clone()] + [
                shard_of(t.detach(), fs, F, world, rank).clone() for t in params[1:4]
            ] + [params[4].detach().clone()]  # fmt: skip
            for t in mine:
                t.requires_grad_()
            out = fs.distributed.sharded_topk_sae_step(*mine, k, group=group, n_features=F, dead_loss=loss)
            ours = grads(out.loss, mine, up)
            what = f"B={B} D={D} F={F} k_aux={k_aux} {dtype} rank {rank}/{world}"
            assert torch.equal(out.code.indices, single.code.indices), what
            p64 = [p.detach().double().requires_grad_() for p in params]
            r = fs.testing.reference.topk_sae_step(*p64, k, indices=single.code.indices, dead_loss=loss)
            r_grads = grads(r.loss, p64, up.double())
            assert_parity(f"aux loss {what}", out.aux_loss, single.aux_loss, r.aux_loss, dtype)
            assert_parity(f"loss {what}", out.loss, single.loss, r.loss, dtype)
            for name, a, b, c in zip(NAMES, ours, single_grads, r_grads):
                if name in ("W_enc", "b_enc", "W_dec"):
                    b, c = shard_of(b, fs, F, world, rank), shard_of(c, fs, F, world, rank)
                assert_parity(f"d{name} {what}", a, b, c, dtype)
            for t in (out.aux_loss, out.loss, ours[0], ours[4]):
                assert agreed(t), what
            again = fs.distributed.sharded_topk_sae_step(*mine, k, group=group, n_features=F, dead_loss=loss)
            for a, b in zip(grads(again.loss, mine, up), ours):  # deterministic: the same bits again
                assert torch.equal(a, b), f"rerun {what}"


@pytest.mark.parametrize("world", fast_tier_keeps(1, [2, 3]))
def test_auxk_matches_one_process(world):
    run_ranks(auxk_step_body, world, CASES, DTYPES if world == 3 else DTYPES[:1])


def _copy_from(sae, ref):
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec"):
            getattr(sae, name).copy_(getattr(ref, name)[sae.f0 : sae.f0 + sae.n_local])
        sae.b_dec.copy_(ref.b_dec)


def _mesh(device, data_world, latent_world):
    from torch.distributed.device_mesh import init_device_mesh

    if data_world > 1:
        return init_device_mesh(device.split(":")[0], (data_world, latent_world), mesh_dim_names=("data", "latent"))
    return init_device_mesh(device.split(":")[0], (latent_world,), mesh_dim_names=("latent",))


def training_body(fs, rank, world, device, data_world, steps):
    """Adam steps with AuxK of the sharded module (latent x data mesh) beside the one-process module on the
    replicas' concatenated batches: the same dead set at every step, the same losses, weights and dead fraction."""
    B, D, F, k = 6, 16, 23, 2
    latent_world = world // data_world
    mesh = _mesh(device, data_world, latent_world)
    window = B * data_world - 1  # a latent silent for one step counts dead
    opts = dict(dead_window_tokens=window, dead_loss=fs.DeadLatentLoss(k_aux=3, capacity=4), device=device)
    ref = fs.SparseAutoencoder(D, F, k, seed=3, **opts)
    sae = fs.distributed.ShardedSparseAutoencoder(D, F, k, mesh=mesh, seed=11, **opts)
    _copy_from(sae, ref)
    data_rank = rank // latent_world
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    for step in range(steps):
        xs = torch.randn(B * data_world, D, generator=g).to(device)
        out_ref = ref.loss(xs)
        out_ref.loss.backward()
        out = sae.loss(xs[data_rank * B : (data_rank + 1) * B])
        out.loss.backward()
        sae.all_reduce_gradients()
        for o, m in ((opt_ref, ref), (opt, sae)):
            m.before_optimizer_step()
            o.step()
            o.zero_grad()
            m.after_optimizer_step()
        what = f"step {step} rank {rank}"
        lo, hi = sae.f0, sae.f0 + sae.n_local
        assert torch.equal(sae.tokens_since_fired, ref.tokens_since_fired[lo:hi]), what
        assert torch.equal(sae.dead_offset, ref.dead_offset), what
        assert torch.equal(sae.dead_fraction(), ref.dead_fraction()), what
        if data_world == 1:
            assert torch.allclose(out.aux_loss, out_ref.aux_loss, rtol=1e-4, atol=1e-6), what
        for name in ("W_enc", "b_enc", "W_dec"):
            assert torch.allclose(getattr(sae, name), getattr(ref, name)[lo:hi], rtol=1e-3, atol=1e-5), what
    assert ref.dead_mask().any(), "the run should exercise AuxK"


@pytest.mark.parametrize("world,data_world", fast_tier_keeps(1, [(2, 1), (4, 2)], unpack=True))
def test_auxk_training_follows_one_process(world, data_world):
    run_ranks(training_body, world, data_world, 4)


def resample_body(fs, rank, world, device):
    """``resample_dead_`` on W shards writes the one-process module's rows (same draw, same norms) and resets
    the Adam moments of the resampled rows."""
    N, D, F, k = 12, 16, 23, 3
    ref = fs.SparseAutoencoder(D, F, k, seed=4, device=device, dead_window_tokens=5)
    sae = fs.distributed.ShardedSparseAutoencoder(
        D, F, k, group=dist.group.WORLD, seed=1, device=device, dead_window_tokens=5
    )  # fmt: skip
    _copy_from(sae, ref)
    lo, hi = sae.f0, sae.f0 + sae.n_local
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(8)).to(device)
    opt_ref, opt = torch.optim.Adam(ref.parameters(), lr=1e-2), torch.optim.Adam(sae.parameters(), lr=1e-2)
    for m, o in ((ref, opt_ref), (sae, opt)):  # some moments to reset
        m.loss(x[:6]).loss.backward()
        o.step()
        o.zero_grad()
    _copy_from(sae, ref)
    counts = torch.randint(0, 12, (F,), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        ref.tokens_since_fired.copy_(counts)
        sae.tokens_since_fired.copy_(counts[lo:hi])
    before = {(name, key): opt.state[getattr(sae, name)][key].clone() for name in ("W_enc", "W_dec")
              for key in ("exp_avg", "exp_avg_sq")}  # fmt: skip
    n_ref = ref.resample_dead_(x, opt_ref, generator=torch.Generator(device=device).manual_seed(9))
    n = sae.resample_dead_(x, opt, generator=torch.Generator(device=device).manual_seed(9))
    what = f"rank {rank}/{world}"
    assert torch.equal(n, n_ref) and n_ref > 0, what
    for name in ("W_enc", "b_enc", "W_dec"):
        assert torch.equal(getattr(sae, name), getattr(ref, name)[lo:hi]), f"{name} {what}"
    assert torch.equal(sae.tokens_since_fired, ref.tokens_since_fired[lo:hi]), what
    dead = (counts[lo:hi] > 5).unsqueeze(1)
    for (name, key), old in before.items():  # the resampled rows' moments are 0, the others untouched
        assert torch.equal(opt.state[getattr(sae, name)][key], torch.where(dead, 0, old)), f"{name} {key} {what}"
    # no generator: a shared seed, the same rows on every replica of a latent
    sae.resample_dead_(x)
    assert agreed(sae.b_dec)


@pytest.mark.parametrize("world", fast_tier_keeps(2, [1, 2, 3]))
def test_resample_matches_one_process(world):
    run_ranks(resample_body, world)


def bad_input_body(fs, rank, world, device):
    group = dist.group.WORLD
    with pytest.raises(ValueError, match="dead_loss"):
        fs.distributed.ShardedSparseAutoencoder(8, 10, 2, group=group, dead_loss="ghost")
    x, W_enc, b_enc, W_dec, b_dec = make_sae(2, 8, 10, 2, torch.float32, device, seed=1)
    mine = [x] + [shard_of(t, fs, 10, world, rank) for t in (W_enc, b_enc, W_dec)] + [b_dec]
    with pytest.raises(ValueError, match="dead_loss"):
        fs.distributed.sharded_topk_sae_step(*mine, 2, group=group, n_features=10, dead_loss="auxk")
    with pytest.raises(ValueError, match="dead_loss.mask"):
        short = fs.DeadLatentLoss(torch.zeros(9, dtype=torch.bool))
        fs.distributed.sharded_topk_sae_step(*mine, 2, group=group, n_features=10, dead_loss=short)
    with pytest.raises(ValueError, match="dead_loss.kind"):
        ghost = fs.DeadLatentLoss(torch.zeros(10, dtype=torch.bool), kind="ghost")
        fs.distributed.sharded_topk_sae_step(*mine, 2, group=group, n_features=10, dead_loss=ghost)


def test_bad_input():
    run_ranks(bad_input_body, 2)
