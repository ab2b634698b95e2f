"""The latent-sharded TopK step and module (``flash_sae.distributed``) on spawned ranks.

CPU: gloo, the kernels through the interpreter; GPUs: NCCL when every rank has one. Checked: the
sharded step's code equals the single-process step's bitwise (values, ids and order), with exact ties
across shard boundaries included; its loss, FVU and every gradient against the fp64 reference by the
parity rule (no worse than twice the single-process step's error); fire counts exactly; F not
divisible by the number of ranks and k larger than a shard; a training run (1-D and data x latent
meshes) that follows the single-process curve; checkpoints between layouts (W shards -> one
process -> W' shards, with Adam's moments); bad input.
"""

import pytest
import torch
import torch.distributed as dist
from distributed_harness import run_ranks
from encoder_inputs import make_sae
from parity import DTYPES, assert_parity, assert_same_across_shapes, fast_tier_keeps, grads, rel_err

NAMES = ("x", "W_enc", "b_enc", "W_dec", "b_dec")
# (B, D, F, k, seed, integer): F = 23 and 131 divide by neither 2 nor 3, 50 not by 3, 10 not by 3 (and
# k = 7 is above its shards of 4 on 3 ranks); integer inputs tie exactly (pre-activations are small
# integers, so equal values land in different shards); B = 1; odd D
CASES = [(6, 37, 50, 7, 1, False), (1, 16, 10, 7, 2, False), (5, 9, 23, 5, 3, True), (4, 64, 131, 12, 4, False)]


def _shard(t, fs, F, world, rank):
    lo, hi = fs.distributed.shard_bounds(F, world, rank)
    return t[lo:hi]


def sharded_step_body(fs, rank, world, device, cases, dtypes):
    group = dist.group.WORLD
    for B, D, F, k, seed, integer in cases:
        for dtype in dtypes:
            params = list(make_sae(B, D, F, k, dtype, device, seed=seed, integer=integer))
            x, W_enc, b_enc, W_dec, b_dec = params
            up = torch.tensor(0.5 + seed / 7, device=device)
            single = fs.topk_sae_step(*params, k)
            single_grads = grads(single.loss, params, up)
            # this rank's shard, as leaves of their own
            mine = [x.detach().clone()] + [
                _shard(t.detach(), fs, F, world, rank).clone() for t in (W_enc, b_enc, W_dec)
            ] + [b_dec.detach().clone()]  # fmt: skip
            for t in mine:
                t.requires_grad_()
            out = fs.distributed.sharded_topk_sae_step(*mine, k, group=group, n_features=F)
            ours = grads(out.loss, mine, up)
            what = f"B={B} D={D} F={F} k={k} seed={seed} {dtype} rank {rank}/{world}"
            assert torch.equal(out.code.indices, single.code.indices), what
            assert_same_across_shapes(what, out.code.vals, single.code.vals)
            assert torch.equal(out.fire_counts, _shard(single.fire_counts, fs, F, world, rank)), what
            p64 = [p.detach().double().requires_grad_() for p in params]
            r = fs.testing.reference.topk_sae_step(*p64, k, indices=single.code.indices)
            r_grads = grads(r.loss, p64, up.double())
            assert_parity(f"sharded loss {what}", out.loss, single.loss, r.loss, dtype)
            if B > 1:
                assert_parity(f"sharded fvu {what}", out.fvu, single.fvu, r.fvu, dtype)
            for name, a, b, c in zip(NAMES, ours, single_grads, r_grads):
                if name in ("W_enc", "b_enc", "W_dec"):
                    b, c = _shard(b, fs, F, world, rank), _shard(c, fs, F, world, rank)
                assert_parity(f"sharded d{name} {what}", a, b, c, dtype)
            # every rank holds the same loss, code and replicated gradients
            for t in (out.loss.detach().reshape(1), ours[0].float(), ours[4].float()):
                agreed = t.clone()
                dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
                assert torch.equal(agreed, t), what
            # x without a gradient: the backward all-reduces only the column sum that b_dec needs
            mine_nx = [mine[0].detach()] + [t.detach().clone().requires_grad_() for t in mine[1:]]
            out_nx = fs.distributed.sharded_topk_sae_step(*mine_nx, k, group=group, n_features=F)
            nx = grads(out_nx.loss, mine_nx[1:], up)
            assert_parity(f"sharded db_dec, x without grad, {what}", nx[3], single_grads[4], r_grads[4], dtype)
            for a, b in zip(nx[:3], ours[1:4]):
                assert torch.equal(a, b), what  # the shard's own gradients do not depend on x's
            # encode / decode agree with the step
            vals, ids = fs.distributed.sharded_topk_encode(*mine[:3], k, mine[4], group=group, n_features=F)
            assert torch.equal(ids, out.code.indices) and torch.equal(vals, out.code.vals)
            x_hat = fs.distributed.sharded_decode(vals, ids, mine[3], mine[4], group=group, n_features=F)
            ref_hat = fs.sparse_decode(single.code.vals, single.code.indices, W_dec.detach(), b_dec.detach())
            assert rel_err(x_hat, ref_hat) <= {torch.float32: 1e-6}.get(dtype, 1e-2), what


@pytest.mark.parametrize("world", fast_tier_keeps(1, [2, 3]))
def test_sharded_step_matches_single_process(world):
    run_ranks(sharded_step_body, world, CASES, DTYPES)


def training_body(fs, rank, world, device, data_world, steps, fused=False):
    """Adam steps of the sharded module (latent x data mesh) against the single-process module on the
    whole batch: the same loss curve and weights. ``fused``: both train with ``FusedAdam`` (each rank
    updates its own rows inside its backward)."""
    from torch.distributed.device_mesh import init_device_mesh

    B, D, F, k = 8, 24, 45, 5
    latent_world = world // data_world
    if data_world > 1:
        mesh = init_device_mesh(device.split(":")[0], (data_world, latent_world), mesh_dim_names=("data", "latent"))
    else:
        mesh = init_device_mesh(device.split(":")[0], (world,), mesh_dim_names=("latent",))
    # rows: a latent silent for one whole step counts dead (the rule is tokens_since_fired > window), so the
    # counts are exercised
    window = B * data_world - 1
    ref = fs.SparseAutoencoder(D, F, k, seed=3, device=device, dead_window_tokens=window)
    sae = fs.distributed.ShardedSparseAutoencoder(
        D, F, k, mesh=mesh, seed=11, device=device, dead_window_tokens=window
    )  # fmt: skip
    data_rank = rank // latent_world
    lo, hi = sae.f0, sae.f0 + sae.n_local
    with torch.no_grad():  # start from the single-process module's weights
        for name in ("W_enc", "b_enc", "W_dec"):
            getattr(sae, name).copy_(getattr(ref, name)[lo:hi])
        sae.b_dec.copy_(ref.b_dec)
    Opt = fs.FusedAdam if fused else torch.optim.Adam
    opt_ref = Opt(ref, lr=1e-2) if fused else Opt(ref.parameters(), lr=1e-2)
    opt = Opt(sae, lr=1e-2) if fused else Opt(sae.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    for step in range(steps):
        xs = torch.randn(B * data_world, D, generator=g).to(device)
        out_ref = ref.loss(xs)
        out_ref.loss.backward()
        if not fused:
            ref.remove_gradient_parallel_to_decoder_directions()
        opt_ref.step()
        opt_ref.zero_grad()
        if not fused:
            ref.set_decoder_norm_to_unit_norm()

        out = sae.loss(xs[data_rank * B : (data_rank + 1) * B])
        out.loss.backward()
        assert not fused or sae.W_dec.grad is None  # FusedAdam's update ran in this rank's backward
        if not fused:
            sae.all_reduce_gradients()
            sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        if not fused:
            sae.set_decoder_norm_to_unit_norm()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        loss /= world
        torch.testing.assert_close(loss, out_ref.loss.detach(), rtol=2e-5, atol=1e-7, msg=f"step {step}")
    for name in ("W_enc", "b_enc", "W_dec"):
        torch.testing.assert_close(getattr(sae, name), getattr(ref, name)[lo:hi], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.b_dec, ref.b_dec, rtol=1e-4, atol=1e-5)
    assert torch.equal(sae.tokens_since_fired, ref.tokens_since_fired[lo:hi])
    assert ref.dead_fraction() > 0, "the run should leave some latents dead"
    torch.testing.assert_close(sae.dead_fraction(), ref.dead_fraction())


@pytest.mark.parametrize("world,data_world", fast_tier_keeps(1, [(2, 1), (3, 1), (4, 2)], unpack=True))
def test_sharded_training_follows_single_process(world, data_world):
    run_ranks(training_body, world, data_world, 4)


@pytest.mark.parametrize("world", fast_tier_keeps(1, [2, 3]))
def test_sharded_training_with_fused_adam(world):
    """FusedAdam on each rank's shard follows FusedAdam on the single-process module."""
    run_ranks(training_body, world, 1, 4, True)


def fused_replicas_body(fs, rank, world, device):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.split(":")[0], (2, world // 2), mesh_dim_names=("data", "latent"))
    sae = fs.distributed.ShardedSparseAutoencoder(20, 16, 4, mesh=mesh, seed=2, device=device)
    try:
        fs.FusedAdam(sae)
    except ValueError as err:
        assert "module" in str(err)
    else:
        raise AssertionError("FusedAdam accepted a module with data-parallel replicas")


def test_fused_adam_refuses_data_parallel_replicas():
    run_ranks(fused_replicas_body, 2)


def save_body(fs, rank, world, device, path, F):
    sae = fs.distributed.ShardedSparseAutoencoder(20, F, 4, group=dist.group.WORLD, seed=2, device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    out = sae.loss(torch.randn(6, 20, generator=torch.Generator().manual_seed(1)).to(device))
    out.loss.backward()
    opt.step()
    fs.distributed.save_checkpoint(sae, path, opt)
    torch.save(
        {"state": {k: v.cpu() for k, v in sae.state_dict().items()},
         "moments": {n: opt.state[p]["exp_avg_sq"].cpu() for n, p in sae.named_parameters()},
         "first": {n: opt.state[p]["exp_avg"].cpu() for n, p in sae.named_parameters()}},
        f"{path}.rank{rank}.pt",
    )  # fmt: skip


def save_mesh_body(fs, rank, world, device, path, F):
    """2 replicas x 2 shards: a step on each replica's own batch, gradients averaged, then the checkpoint."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.split(":")[0], (2, 2), mesh_dim_names=("data", "latent"))
    sae = fs.distributed.ShardedSparseAutoencoder(20, F, 4, mesh=mesh, seed=2, device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    replica = mesh.get_local_rank("data")
    out = sae.loss(torch.randn(6, 20, generator=torch.Generator().manual_seed(10 + replica)).to(device))
    out.loss.backward()
    sae.all_reduce_gradients()
    opt.step()
    fs.distributed.save_checkpoint(sae, path, opt)
    torch.save({k: v.cpu() for k, v in sae.state_dict().items()}, f"{path}.rank{rank}.pt")


def load_body(fs, rank, world, device, path, F, expect):
    sae = fs.distributed.ShardedSparseAutoencoder(20, F, 4, group=dist.group.WORLD, seed=99, device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    fs.distributed.load_checkpoint(sae, path, opt)
    lo, hi = sae.f0, sae.f0 + sae.n_local
    for name, full in expect["state"].items():
        want = full[lo:hi] if name in ("W_enc", "b_enc", "W_dec", "tokens_since_fired") else full
        assert torch.equal(getattr(sae, name).detach().cpu(), want), name
    for name, p in sae.named_parameters():
        full = expect["moments"][name]
        want = full[lo:hi] if name != "b_dec" else full
        assert torch.equal(opt.state[p]["exp_avg_sq"].cpu(), want), name
        full = expect["first"][name]
        assert torch.equal(opt.state[p]["exp_avg"].cpu(), full[lo:hi] if name != "b_dec" else full), name
        assert int(opt.state[p]["step"]) == 1, name


@pytest.mark.slow
def test_sharded_checkpoints_move_between_layouts(fs, tmp_path):
    """2 shards -> one process (SparseAutoencoder + Adam) -> 3 shards, and the 2-shard checkpoint straight
    into 3 shards: the same tensors everywhere."""
    F = 25
    two = tmp_path / "two"
    run_ranks(save_body, 2, str(two), F)
    parts = [torch.load(f"{two}.rank{r}.pt") for r in range(2)]
    split = fs.distributed.ShardedSparseAutoencoder.sharded_state  # by latent; the rest (b_dec, dead_offset) replicated

    def whole(kind):
        first = parts[0][kind]
        return {k: torch.cat([p[kind][k] for p in parts]) if k in split else first[k] for k in first}

    full = {kind: whole(kind) for kind in ("state", "moments", "first")}
    single = fs.SparseAutoencoder(20, F, 4, seed=0)
    opt = torch.optim.Adam(single.parameters(), lr=1e-2)
    fs.distributed.load_checkpoint(single, two, opt)
    for name, want in full["state"].items():
        assert torch.equal(getattr(single, name).detach(), want), name
    for name, p in single.named_parameters():
        assert torch.equal(opt.state[p]["exp_avg_sq"], full["moments"][name]), name
        assert torch.equal(opt.state[p]["exp_avg"], full["first"][name]), name
    one = tmp_path / "one"
    fs.distributed.save_checkpoint(single, one, opt)
    run_ranks(load_body, 3, str(one), F, full)
    run_ranks(load_body, 3, str(two), F, full)


@pytest.mark.slow
def test_sharded_checkpoint_from_a_two_dimensional_mesh(fs, tmp_path):
    """A (data, latent) = (2, 2) mesh's checkpoint (the [F, ...] tensors sharded on the latent dimension,
    replicated on the data one) loads into one process: the replicas agree, and the shards assemble."""
    F, path = 25, tmp_path / "mesh"
    run_ranks(save_mesh_body, 4, str(path), F)
    parts = [torch.load(f"{path}.rank{r}.pt") for r in range(4)]  # rank = replica * 2 + shard
    for r in (2, 3):
        assert all(torch.equal(parts[r][k], parts[r - 2][k]) for k in parts[r]), "the replicas diverged"
    single = fs.SparseAutoencoder(20, F, 4, seed=0)
    fs.distributed.load_checkpoint(single, path)
    for name in ("W_enc", "b_enc", "W_dec", "tokens_since_fired"):
        assert torch.equal(getattr(single, name).detach(), torch.cat([parts[0][name], parts[1][name]])), name
    assert torch.equal(single.b_dec.detach(), parts[0]["b_dec"])


def bad_input_body(fs, rank, world, device):
    group = dist.group.WORLD
    x, W_enc, b_enc, W_dec, b_dec = make_sae(4, 8, 10, 3, torch.float32, device, seed=0)
    step = fs.distributed.sharded_topk_sae_step
    with pytest.raises(ValueError, match="W_enc must hold this rank's 5 latents"):
        step(x, W_enc, b_enc, W_dec, b_dec, 3, group=group, n_features=10)
    lo, hi = fs.distributed.shard_bounds(10, world, rank)
    mine = (x, W_enc[lo:hi], b_enc[lo:hi], W_dec[lo:hi], b_dec)
    with pytest.raises(ValueError, match="k must lie in"):
        step(*mine, 11, group=group, n_features=10)
    with pytest.raises(ValueError, match="group must be"):
        step(*mine, 3, group=None, n_features=10)
    with pytest.raises(ValueError, match="b_dec must have shape"):
        step(*mine[:4], b_dec[:3], 3, group=group, n_features=10)
    with pytest.raises(ValueError, match="leaves the last shard empty"):
        fs.distributed.ShardedSparseAutoencoder(8, 1, 1, group=group)
    with pytest.raises(ValueError, match="exactly one of mesh"):
        fs.distributed.ShardedSparseAutoencoder(8, 10, 2)
    vals, ids = torch.rand(4, 3, device=device), torch.randint(0, 10, (4, 3), device=device)
    decode = fs.distributed.sharded_decode
    with pytest.raises(ValueError, match="indices must have vals' shape"):
        decode(vals, ids[:, :2], mine[3], b_dec, group=group, n_features=10)
    with pytest.raises(ValueError, match="W_dec must hold this rank's 5 latents"):
        decode(vals, ids, W_dec, b_dec, group=group, n_features=10)
    with pytest.raises(ValueError, match="indices must have dtype"):
        decode(vals, ids.float(), mine[3], b_dec, group=group, n_features=10)


def test_sharded_bad_input(fs):
    run_ranks(bad_input_body, 2)
    x, W_enc, b_enc, W_dec, b_dec = make_sae(4, 8, 10, 3, torch.float32, "cpu", seed=0)
    with pytest.raises(ValueError, match="not initialised"):
        fs.distributed.sharded_topk_sae_step(x, W_enc, b_enc, W_dec, b_dec, 3, group=None, n_features=10)


@pytest.mark.slow
def test_sharded_step_on_eight_ranks():
    """The 8-GPU layout on 8 gloo ranks: F = 45 (shards of 6, the last of 3), k = 7 above a
    shard, exact ties; the same checks as on 2 and 3 ranks, fp32."""
    run_ranks(sharded_step_body, 8, [(3, 11, 45, 7, 5, True), (2, 9, 45, 7, 6, False)], (torch.float32,))


@pytest.mark.slow
def test_train_sharded_example_runs(tmp_path):
    """examples/train_sharded.py under torchrun on 2 CPU ranks (1 replica x 2 shards, then 2 x 1): it trains,
    checkpoints, and the single-process module loaded from the checkpoint gives the sharded held-out loss."""
    import os
    import re
    import subprocess
    import sys

    from distributed_harness import ROOT

    for dp in ("1", "2"):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(ROOT / "examples" / "train_sharded.py"), "--device", "cpu", "--data-parallel", dp,
            "--n-features", "41", "--d-model", "12", "--k", "3", "--batch", "16", "--steps", "3",
            "--true-features", "20", "--true-k", "2", "--out", str(tmp_path / f"ckpt{dp}"),
        ]  # fmt: skip
        env = dict(os.environ)
        if not torch.cuda.is_available():  # the kernels through the interpreter, as the other CPU tests run them
            env["TRITON_INTERPRET"] = "1"
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
        assert re.search(r"step +2 +loss \d", run.stdout), run.stdout
        m = re.search(r"held-out loss sharded ([\d.]+), single-GPU module ([\d.]+)", run.stdout)
        assert m, run.stdout
        assert abs(float(m.group(1)) - float(m.group(2))) <= 1e-5 * float(m.group(2)), m.group(0)
