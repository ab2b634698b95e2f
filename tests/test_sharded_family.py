"""The latent-sharded BatchTopK and Matryoshka BatchTopK steps and modules (``flash_sae.distributed``) on
spawned ranks.

CPU: gloo, the kernels through the interpreter; GPUs: NCCL when every rank has one. Checked against the
one-process ``batchtopk_sae_step`` / ``matryoshka_batchtopk_sae_step``: the code (ids, row offsets and order
exactly, values bitwise where the pre-activations are), the fire counts exactly, ``min_act`` (the
inference threshold's input) and ``l0``; loss, FVU, level losses and every gradient against the fp64
reference by the parity rule (no worse than twice the one-process step's error); the same loss, code,
min_act and replicated gradients on every rank. Cases: F divisible by neither 2 nor 3, shards holding
fewer latents than the batch keeps, exact ties across shard boundaries (integer inputs), B = 1, float k,
prefix levels that end inside shards, the decoder-norm rescaling. Then a short Adam run of the sharded
modules that follows the one-process modules (threshold included), checkpoints W shards -> one process
-> W' shards, and bad input failing on every rank.
"""

import pytest
import torch
import torch.distributed as dist
from distributed_harness import agreed, run_ranks, shard_of
from encoder_inputs import make_sae
from parity import DTYPES, assert_parity, assert_same_across_shapes, fast_tier_keeps, grads, torch_baseline

NAMES = ("x", "W_enc", "b_enc", "W_dec", "b_dec")
SHARDED = ("W_enc", "b_enc", "W_dec", "tokens_since_fired")
# (B, D, F, k, seed, integer, prefix_sizes, rescale): F = 50 is not divisible by 3 and its levels end inside
# shards (9 and 25 on 3 ranks' shards of 17); F = 10 on 3 ranks gives shards of 4, 4, 2, fewer than the 7
# entries B = 1 keeps; integer inputs tie exactly across shards; k = 2.5 keeps int(k * B) = 12 of 5 rows
CASES = [
    (6, 37, 50, 7, 1, False, [9, 25, 50], True),
    (1, 16, 10, 7, 2, False, [3, 10], False),
    (5, 9, 23, 2.5, 3, True, [5, 12, 23], False),
]


def _check_step(fs, what, single, out, ref, dtype):
    """The sharded step's outputs against the one-process step's and the fp64 reference's."""
    assert torch.equal(out.code.indices, single.code.indices), what
    assert torch.equal(out.code.row_offsets, single.code.row_offsets), what
    assert_same_across_shapes(what, out.code.vals, single.code.vals)
    assert_same_across_shapes(what, out.min_act, single.min_act)
    assert torch.equal(out.l0, single.l0), what
    assert_parity(f"loss {what}", out.loss, single.loss, ref.loss, dtype)
    assert_parity(f"mse {what}", out.mse, single.mse, ref.mse, dtype)
    if out.code.row_offsets.numel() > 2:
        assert_parity(f"fvu {what}", out.fvu, single.fvu, ref.fvu, dtype)
    if hasattr(out, "level_losses"):
        assert_parity(f"level losses {what}", out.level_losses, single.level_losses, ref.level_losses, dtype)
    for t in (out.loss, out.min_act, out.code.vals, out.code.indices):
        assert agreed(t), what


def sharded_step_body(fs, rank, world, device, cases, dtypes, matryoshka):
    group = dist.group.WORLD
    ref_mod = fs.testing.reference
    for B, D, F, k, seed, integer, sizes, rescale in cases:
        for dtype in dtypes:
            params = list(make_sae(B, D, F, 1, dtype, device, seed=seed, integer=integer))
            up = torch.tensor(0.5 + seed / 7, device=device)
            opts = dict(rescale_acts_by_decoder_norm=rescale)
            if matryoshka:
                single = fs.matryoshka_batchtopk_sae_step(*params, k, sizes, **opts)
            else:
                single = fs.batchtopk_sae_step(*params, k, **opts)
            single_grads = grads(single.loss, params, up)
            mine = [params[0].detach().clone()] + [
                shard_of(t.detach(), fs, F, world, rank).clone() for t in params[1:4]
            ] + [params[4].detach().clone()]  # fmt: skip
            for t in mine:
                t.requires_grad_()
            sharded = fs.distributed
            if matryoshka:
                out = sharded.sharded_matryoshka_batchtopk_sae_step(*mine, k, sizes, group=group, n_features=F, **opts)
            else:
                out = sharded.sharded_batchtopk_sae_step(*mine, k, group=group, n_features=F, **opts)
            ours = grads(out.loss, mine, up)
            what = f"B={B} D={D} F={F} k={k} seed={seed} {dtype} rank {rank}/{world} matryoshka={matryoshka}"
            assert torch.equal(out.fire_counts, shard_of(single.fire_counts, fs, F, world, rank)), what
            p64 = [p.detach().double().requires_grad_() for p in params]
            code = single.code
            rows = torch.repeat_interleave(torch.arange(B, device=device), code.row_offsets.diff())
            forced = dict(selection=(rows, code.indices), **opts)
            if matryoshka:
                r = ref_mod.matryoshka_batchtopk_sae_step(*p64, k, sizes, **forced)
            else:
                r = ref_mod.batchtopk_sae_step(*p64, k, **forced)
            r_grads = grads(r.loss, p64, up.double())
            _check_step(fs, what, single, out, r, dtype)
            for name, a, b, c in zip(NAMES, ours, single_grads, r_grads):
                if name in ("W_enc", "b_enc", "W_dec"):
                    b, c = shard_of(b, fs, F, world, rank), shard_of(c, fs, F, world, rank)
                assert_parity(f"d{name} {what}", a, b, c, dtype)
            assert agreed(ours[0]) and agreed(ours[4]), what
            # x without a gradient: the shard's own gradients do not change
            mine_nx = [mine[0].detach()] + [t.detach().clone().requires_grad_() for t in mine[1:]]
            if matryoshka:
                out_nx = sharded.sharded_matryoshka_batchtopk_sae_step(
                    *mine_nx, k, sizes, group=group, n_features=F, **opts
                )
            else:
                out_nx = sharded.sharded_batchtopk_sae_step(*mine_nx, k, group=group, n_features=F, **opts)
            nx = grads(out_nx.loss, mine_nx[1:], up)
            assert_parity(f"db_dec, x without grad, {what}", nx[3], single_grads[4], r_grads[4], dtype)
            for a, b in zip(nx[:3], ours[1:4]):
                assert torch.equal(a, b), what
            # the batch-rule encode and the variable-length decode agree with the step
            vals, ids, offsets = sharded.sharded_batchtopk_encode(*mine, k, group=group, n_features=F, **opts)
            assert torch.equal(ids, out.code.indices) and torch.equal(vals, out.code.vals), what
            assert torch.equal(offsets, out.code.row_offsets), what
            x_hat = sharded.sharded_decode(vals, ids, mine[3], mine[4], group=group, n_features=F, row_offsets=offsets)
            want = fs.primitives.gather.gather_rows(code.vals, code.indices, params[3].detach(), params[4].detach(),
                                                    row_offsets=code.row_offsets)  # fmt: skip
            tol = {torch.float32: 1e-5}.get(dtype, 2e-2)
            torch.testing.assert_close(x_hat.float(), want.float(), rtol=tol, atol=tol, msg=what)


def both_steps_body(fs, rank, world, device, cases, dtypes):
    for matryoshka in (False, True):
        sharded_step_body(fs, rank, world, device, cases, dtypes, matryoshka)


@pytest.mark.parametrize("world", fast_tier_keeps(1, [2, 3]))
def test_sharded_batchtopk_step_matches_single_process(world):
    """BatchTopK and Matryoshka BatchTopK; every dtype on 3 ranks (the full tier), fp32 on 2."""
    dtypes = DTYPES if world == 3 else (torch.float32,)
    run_ranks(both_steps_body, world, CASES, dtypes)


@pytest.mark.slow
@pytest.mark.parametrize("matryoshka", [False, True], ids=["batchtopk", "matryoshka"])
def test_sharded_batchtopk_step_in_every_dtype_on_two_ranks(matryoshka):
    run_ranks(sharded_step_body, 2, CASES, DTYPES, matryoshka)


@pytest.mark.slow
@pytest.mark.parametrize("matryoshka", [False, True], ids=["batchtopk", "matryoshka"])
def test_sharded_batchtopk_step_on_eight_ranks(matryoshka):
    """8 ranks: F = 45 (shards of 6, the last of 3), levels ending inside shards, exact ties; fp32."""
    cases = [(3, 11, 45, 7, 5, True, [4, 20, 45], False), (2, 9, 45, 4.5, 6, False, [13, 45], True)]
    run_ranks(sharded_step_body, 8, cases, (torch.float32,), matryoshka)


def _modules(fs, arch, D, F, k):
    """(one-process module class, sharded class, constructor arguments after D and F) of ``arch``."""
    dist_ = fs.distributed
    table = {
        "batchtopk": (fs.BatchTopKSparseAutoencoder, dist_.ShardedBatchTopKSparseAutoencoder, ((k,), {})),
        "matryoshka": (
            fs.MatryoshkaBatchTopKSparseAutoencoder,
            dist_.ShardedMatryoshkaBatchTopKSparseAutoencoder,
            ((k,), {"prefix_sizes": [7, 20, F]}),
        ),
        "jumprelu": (
            fs.JumpReLUSparseAutoencoder,
            dist_.ShardedJumpReLUSparseAutoencoder,
            ((), {"init_threshold": 0.02}),
        ),
        "standard": (
            fs.StandardSparseAutoencoder,
            dist_.ShardedStandardSparseAutoencoder,
            ((), {"l1_coefficient": 0.3}),
        ),
    }
    return table[arch]


def _build(cls, D, F, args, **kwargs):
    pos, kw = args
    return cls(D, F, *pos, **kw, **kwargs)


def training_body(fs, rank, world, device, arch, steps):
    """Adam steps of the sharded module against the one-process module on the same batch, from the same
    weights: the same loss curve, weights, inference threshold and dead counts."""
    B, D, F, k = 8, 24, 45, 3.5
    Single, Sharded, args = _modules(fs, arch, D, F, k)
    window = B - 1  # a latent silent for one whole step counts dead, so the counts are exercised
    ref = _build(Single, D, F, args, seed=3, device=device, dead_window_tokens=window)
    sae = _build(Sharded, D, F, args, group=dist.group.WORLD, seed=11, device=device, dead_window_tokens=window)
    lo, hi = sae.f0, sae.f0 + sae.n_local
    own = ("W_enc", "b_enc", "W_dec") + (("threshold",) if arch == "jumprelu" else ())
    with torch.no_grad():
        for name in own:
            getattr(sae, name).copy_(getattr(ref, name)[lo:hi])
        sae.b_dec.copy_(ref.b_dec)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    for step in range(steps):
        x = torch.randn(B, D, generator=g).to(device)
        for module, optimizer in ((ref, opt_ref), (sae, opt)):
            out = module.loss(x)
            out.loss.backward()
            module.before_optimizer_step()
            optimizer.step()
            optimizer.zero_grad()
            module.after_optimizer_step()
            if module is ref:
                want = out.loss.detach()
        torch.testing.assert_close(out.loss.detach(), want, rtol=2e-5, atol=1e-7, msg=f"{arch} step {step}")
        assert agreed(out.loss) and agreed(sae.b_dec), f"{arch} step {step}"
    for name in own:
        torch.testing.assert_close(getattr(sae, name), getattr(ref, name)[lo:hi], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.b_dec, ref.b_dec, rtol=1e-4, atol=1e-5)
    assert torch.equal(sae.tokens_since_fired, ref.tokens_since_fired[lo:hi])
    torch.testing.assert_close(sae.dead_fraction(), ref.dead_fraction())
    if arch in ("batchtopk", "matryoshka"):  # the agreed inference threshold; encode and decode
        assert sae.threshold > 0 and agreed(sae.threshold)
        torch.testing.assert_close(sae.threshold, ref.threshold, rtol=1e-6, atol=0)
        x = torch.randn(B, D, generator=g).to(device)
        torch.testing.assert_close(sae(x), ref(x), rtol=1e-5, atol=1e-5)


def trainings_body(fs, rank, world, device, archs, steps):
    for arch in archs:
        training_body(fs, rank, world, device, arch, steps)


ALL_ARCHS = ("batchtopk", "matryoshka", "jumprelu", "standard")


@pytest.mark.parametrize(
    "world,archs", fast_tier_keeps(1, [(2, ("matryoshka", "standard")), (2, ALL_ARCHS), (3, ALL_ARCHS)], unpack=True)
)
def test_sharded_training_follows_single_process(world, archs):
    """A few Adam steps; the fast tier one selection family and one threshold family, the full tier all four."""
    run_ranks(trainings_body, world, archs, 3)


def replicas_body(fs, rank, world, device, arch):
    """2 replicas x 2 shards on different batches: the inference threshold and b_dec stay the same on every
    rank (the replicas take the smallest min_act and average their gradients)."""
    from torch.distributed.device_mesh import init_device_mesh

    _, Sharded, args = _modules(fs, arch, 20, 30, 3)
    mesh = init_device_mesh(device.split(":")[0], (2, 2), mesh_dim_names=("data", "latent"))
    sae = _build(Sharded, 20, 30, args, mesh=mesh, seed=2, device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    replica = mesh.get_local_rank("data")
    g = torch.Generator().manual_seed(10 + replica)
    for _ in range(3):
        sae.loss(torch.randn(6, 20, generator=g).to(device)).loss.backward()
        sae.all_reduce_gradients()
        opt.step()
        opt.zero_grad()
    assert agreed(sae.b_dec)
    if arch in ("batchtopk", "matryoshka"):
        assert sae.threshold > 0 and agreed(sae.threshold)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka", "jumprelu", "standard"])
def test_sharded_replicas_agree_on_the_threshold(arch):
    run_ranks(replicas_body, 4, arch)


def save_body(fs, rank, world, device, path, arch):
    _, Sharded, args = _modules(fs, arch, 20, 25, 4)
    sae = _build(Sharded, 20, 25, args, group=dist.group.WORLD, seed=2, device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    sae.loss(torch.randn(6, 20, generator=torch.Generator().manual_seed(1)).to(device)).loss.backward()
    opt.step()
    fs.distributed.save_checkpoint(sae, path, opt)
    moments = {n: opt.state[p]["exp_avg_sq"].cpu() for n, p in sae.named_parameters()}
    torch.save({"state": {k: v.cpu() for k, v in sae.state_dict().items()}, "moments": moments}, f"{path}.r{rank}.pt")


def load_body(fs, rank, world, device, path, arch, expect):
    _, Sharded, args = _modules(fs, arch, 20, 25, 4)
    sae = _build(Sharded, 20, 25, args, group=dist.group.WORLD, seed=99, device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    fs.distributed.load_checkpoint(sae, path, opt)
    lo, hi = sae.f0, sae.f0 + sae.n_local
    split = _split(arch)
    for name, full in expect["state"].items():
        assert torch.equal(getattr(sae, name).detach().cpu(), full[lo:hi] if name in split else full), name
    for name, p in sae.named_parameters():
        full = expect["moments"][name]
        assert torch.equal(opt.state[p]["exp_avg_sq"].cpu(), full[lo:hi] if name != "b_dec" else full), name


def _split(arch):
    return SHARDED + (("threshold",) if arch == "jumprelu" else ())


def _assemble(parts: list[dict], arch) -> dict:
    split = _split(arch)
    return {
        kind: {k: torch.cat([p[kind][k] for p in parts]) if k in split else parts[0][kind][k] for k in parts[0][kind]}
        for kind in ("state", "moments")
    }


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka", "jumprelu", "standard"])
def test_sharded_checkpoints_move_between_layouts(fs, tmp_path, arch):
    """2 shards -> the one-process module (with Adam) -> 3 shards: the same tensors, the thresholds included
    (BatchTopK's replicated, JumpReLU's split by latent)."""
    two = tmp_path / "two"
    run_ranks(save_body, 2, str(two), arch)
    full = _assemble([torch.load(f"{two}.r{r}.pt") for r in range(2)], arch)
    if arch in ("batchtopk", "matryoshka"):
        assert full["state"]["threshold"] > 0
    Single, _, args = _modules(fs, arch, 20, 25, 4)
    single = _build(Single, 20, 25, args, seed=0)
    opt = torch.optim.Adam(single.parameters(), lr=1e-2)
    fs.distributed.load_checkpoint(single, two, opt)
    for name, want in full["state"].items():
        assert torch.equal(getattr(single, name).detach(), want), name
    for name, p in single.named_parameters():
        assert torch.equal(opt.state[p]["exp_avg_sq"], full["moments"][name]), name
    one = tmp_path / "one"
    fs.distributed.save_checkpoint(single, one, opt)
    run_ranks(load_body, 3, str(one), arch, full)


def bad_input_body(fs, rank, world, device):
    group = dist.group.WORLD
    x, W_enc, b_enc, W_dec, b_dec = make_sae(4, 8, 10, 1, torch.float32, device, seed=0)
    step = fs.distributed.sharded_batchtopk_sae_step
    mstep = fs.distributed.sharded_matryoshka_batchtopk_sae_step
    with pytest.raises(ValueError, match="W_enc must hold this rank's 5 latents"):
        step(x, W_enc, b_enc, W_dec, b_dec, 3, group=group, n_features=10)
    lo, hi = fs.distributed.shard_bounds(10, world, rank)
    mine = (x, W_enc[lo:hi], b_enc[lo:hi], W_dec[lo:hi], b_dec)
    with pytest.raises(ValueError, match="k must give"):
        step(*mine, 11, group=group, n_features=10)
    with pytest.raises(ValueError, match="group must be"):
        step(*mine, 3, group=None, n_features=10)
    with pytest.raises(ValueError, match="b_dec must have shape"):
        step(*mine[:4], b_dec[:3], 3, group=group, n_features=10)
    with pytest.raises(ValueError, match="W_dec"):
        step(*mine[:3], mine[3].to(torch.bfloat16), b_dec, 3, group=group, n_features=10)
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm"):
        step(*mine, 3, group=group, n_features=10, rescale_acts_by_decoder_norm=1)
    with pytest.raises(ValueError, match="prefix_sizes must end"):
        mstep(*mine, 3, [4, 8], group=group, n_features=10)
    with pytest.raises(ValueError, match="row_offsets"):
        fs.distributed.sharded_decode(
            torch.rand(6), torch.zeros(6, dtype=torch.int64), mine[3], b_dec, group=group, n_features=10,
            row_offsets=torch.zeros(5, dtype=torch.int32),
        )  # fmt: skip
    with pytest.raises(ValueError, match="k must be a number"):
        fs.distributed.ShardedBatchTopKSparseAutoencoder(8, 10, 11, group=group)
    with pytest.raises(ValueError, match="dead_loss"):
        fs.distributed.ShardedBatchTopKSparseAutoencoder(8, 10, 2, group=group, dead_loss="auxk")
    with pytest.raises(ValueError, match="prefix_sizes"):
        fs.distributed.ShardedMatryoshkaBatchTopKSparseAutoencoder(8, 10, 2, group=group, prefix_sizes=[5])


def test_sharded_bad_input():
    run_ranks(bad_input_body, 2)


def one_bad_rank_body(fs, rank, world, device):
    """Rank 0 passes a shard of the wrong size, the others good input: rank 0 raises before any collective."""
    x, W_enc, b_enc, W_dec, b_dec = make_sae(4, 8, 10, 1, torch.float32, device, seed=0)
    lo, hi = fs.distributed.shard_bounds(10, world, rank)
    if rank != 0:
        W_enc, b_enc, W_dec = W_enc[lo:hi], b_enc[lo:hi], W_dec[lo:hi]
    fs.distributed.sharded_batchtopk_sae_step(x, W_enc, b_enc, W_dec, b_dec, 3, group=dist.group.WORLD, n_features=10)


@pytest.mark.slow
def test_one_bad_rank_fails_the_run_without_a_hang():
    """Rank 0 raises its ValueError before any collective; the others' all-gather then fails (gloo: the
    connection closed), so the run ends with one of the two errors, well within two minutes."""
    import time

    t0 = time.monotonic()
    with pytest.raises(Exception, match="W_enc must hold this rank's 5 latents|Connection closed by peer"):
        run_ranks(one_bad_rank_body, 2)
    assert time.monotonic() - t0 < 120


def _dense(code, B, lo, hi, device):
    """A variable-length code's entries of latents [lo, hi) as a dense [B, hi - lo] fp32 matrix (tests only)."""
    n = int(code.row_offsets[-1])
    rows = torch.repeat_interleave(torch.arange(B, device=device), code.row_offsets.diff())[:n]
    ids, vals = code.indices[:n], code.vals[:n].float()
    keep = (ids >= lo) & (ids < hi)
    out = torch.zeros(B, hi - lo, device=device)
    out[rows[keep], ids[keep] - lo] = vals[keep]
    return out


def threshold_step_body(fs, rank, world, device, cases, dtypes, arch):
    """The sharded JumpReLU / standard step against the one-process step and the fp64 reference."""
    shards = fs.distributed.LatentShards(dist.group.WORLD, None)
    ref_mod = fs.testing.reference
    for B, D, F, seed in cases:
        shards = shards._replace(n_features=F)
        lo, hi = fs.distributed.shard_bounds(F, world, rank)
        for dtype in dtypes:
            params = list(make_sae(B, D, F, 1, dtype, device, seed=seed))
            g = torch.Generator().manual_seed(seed + 100)
            if arch == "jumprelu":
                params.append((torch.rand(F, generator=g) * 0.4).to(device).requires_grad_())
            names = NAMES + (("threshold",) if arch == "jumprelu" else ())
            up = torch.tensor(0.5 + seed / 7, device=device)
            opts = dict(l0_coefficient=0.3, bandwidth=0.2) if arch == "jumprelu" else dict(l1_coefficient=0.7)
            one = fs.jumprelu_sae_step if arch == "jumprelu" else fs.standard_sae_step
            single = one(*params, capacity=B * F, **opts)
            single_grads = grads(single.loss, params, up)
            mine = [p.detach().clone() for p in params]
            for i in (1, 2, 3) + ((5,) if arch == "jumprelu" else ()):
                mine[i] = mine[i][lo:hi].clone()
            for t in mine:
                t.requires_grad_()
            sharded = (
                fs.distributed.sharded_jumprelu_sae_step
                if arch == "jumprelu"
                else fs.distributed.sharded_standard_sae_step
            )
            out = sharded(*mine, capacity=B * (hi - lo), shards=shards, **opts)
            ours = grads(out.loss, mine, up)
            what = f"{arch} B={B} D={D} F={F} seed={seed} {dtype} rank {rank}/{world}"
            p64 = [p.detach().double().requires_grad_() for p in params]
            ref_opts = {k: v for k, v in opts.items() if k != "bandwidth"} if arch == "standard" else opts
            r = (ref_mod.jumprelu_sae_step if arch == "jumprelu" else ref_mod.standard_sae_step)(
                *p64, **ref_opts, round_preacts=dtype
            )
            r_grads = grads(r.loss, p64, up.double())
            # torch's own error in the dtype: the plain-torch step on the same inputs (the sharded step rounds
            # x - others to the dtype once more than the one-process step; the rule allows torch's error)
            same_params = [p.detach().clone().requires_grad_() for p in params]
            same = (ref_mod.jumprelu_sae_step if arch == "jumprelu" else ref_mod.standard_sae_step)(
                *same_params, **ref_opts
            )
            same_grads = grads(same.loss, same_params, up)
            assert_same_across_shapes(what, _dense(out.code, B, lo, hi, device), _dense(single.code, B, lo, hi, device))
            assert torch.equal(out.fire_counts, single.fire_counts[lo:hi]), what
            count = out.count.clone()
            dist.all_reduce(count)
            assert torch.equal(count, single.count), what
            assert_same_across_shapes(what, out.l0, single.l0)
            assert_parity(f"loss {what}", out.loss, single.loss, r.loss, dtype)
            assert_parity(f"mse {what}", out.mse, single.mse, r.mse, dtype)
            if B > 1:
                assert_parity(f"fvu {what}", out.fvu, single.fvu, r.fvu, dtype)
            if arch == "standard":
                assert_parity(f"l1 {what}", out.l1, single.l1, r.l1, dtype)
            for name, a, b, c, d in zip(names, ours, single_grads, r_grads, same_grads):
                if name in ("W_enc", "b_enc", "W_dec", "threshold"):
                    b, c, d = b[lo:hi], c[lo:hi], d[lo:hi]
                assert_parity(f"d{name} {what}", a, torch_baseline(d, c, b), c, dtype)
            for t in (out.loss, out.mse, ours[0], ours[4]):
                assert agreed(t), what


THRESHOLD_CASES = [(6, 37, 50, 1), (1, 16, 10, 2), (4, 9, 23, 3)]


def both_threshold_steps_body(fs, rank, world, device, cases, dtypes):
    for arch in ("jumprelu", "standard"):
        threshold_step_body(fs, rank, world, device, cases, dtypes, arch)


@pytest.mark.parametrize("world", fast_tier_keeps(1, [2, 3]))
def test_sharded_threshold_step_matches_single_process(world):
    """JumpReLU and standard; every dtype on 3 ranks (the full tier), fp32 on 2."""
    dtypes = DTYPES if world == 3 else (torch.float32,)
    run_ranks(both_threshold_steps_body, world, THRESHOLD_CASES, dtypes)
