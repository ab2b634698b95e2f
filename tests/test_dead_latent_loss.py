"""The dead-latent losses of the TopK and BatchTopK steps (AuxK, ghost grads): the loss, the auxiliary
loss and every gradient against fp64 under random upstream gradients of both, in every dtype, on drawn
shapes and dead sets (capacity below and above the number of dead latents); the AuxK selection bit for
bit (ties included); determinism, opcheck and bad input. The installed SAELens and sparsify trainers'
own AuxK losses and gradients are checked in ``test_dead_latent_peers.py``."""

import sys
from typing import NamedTuple

import pytest
import torch
from encoder_inputs import STEP_NAMES, make_sae, selected_preacts
from hypothesis import example, given
from hypothesis import strategies as st
from parity import DTYPES, assert_parity, fast_tier_keeps, grads, rel_err

STEPS = ("topk", "batchtopk")


@st.composite
def dead_problems(draw):
    """(B, D, F, k, k_aux, capacity, dead fraction, offset): B = 1, odd D, tiny F, k_aux above the dead
    count, capacities below it (the window from the offset on, wrapping around)."""
    B = draw(st.integers(1, 8))
    F = draw(st.one_of(st.integers(2, 12), st.integers(60, 300)))
    D = draw(st.one_of(st.integers(1, 40), st.integers(250, 300)))
    k = draw(st.integers(1, min(F, 8)))
    k_aux = draw(st.integers(1, min(F, 40)))
    capacity = draw(st.integers(k_aux, F))
    frac = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    offset = draw(st.integers(0, F - 1))
    return B, D, F, k, k_aux, capacity, frac, offset


def dead_mask_of(F, frac, seed, device):
    g = torch.Generator().manual_seed(seed + 3)
    return (torch.rand(F, generator=g) < frac).to(device)


def run_step(fs, step, params, k, rescale=False, dead_loss=None):
    if step == "topk":
        return fs.topk_sae_step(*params, k, dead_loss=dead_loss)
    return fs.batchtopk_sae_step(*params, k, rescale_acts_by_decoder_norm=rescale, dead_loss=dead_loss)


def op_outputs(fs, step, params, k, dead_loss, rescale=False):
    """The registered op's outputs by name, for the selection it made, and its dead slots' (A, gate, dE1,
    ids, valid)."""
    dead_mod = sys.modules[fs.__name__ + ".ops._dead"]
    x, W_enc, b_enc, W_dec, b_dec = (p.detach() for p in params)
    dead = dead_mod.dead_op_args(dead_loss, x, W_enc.shape[0])
    inputs = dict(x=x, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, target=None, prefix_sizes=[],
                  **dead._asdict())  # fmt: skip
    if step == "topk":
        op, inputs["k"] = sys.modules[fs.topk_sae_step.__module__]._topk_sae_step, k
    else:
        op = sys.modules[fs.batchtopk_sae_step.__module__]._batchtopk_sae_step
        inputs.update(
            n=int(k * params[0].shape[0]), rescale_acts_by_decoder_norm=rescale, decoder_norm_groups=1, l2_loss_groups=0
        )
    out = op.named(op(*(inputs[n] for n in op.inputs)))
    return out, (out.A, out.gate, out.dE1, out.ids, out.valid)


def full_mask(gate, ids, F):
    """The op's [B, C] gate on the dead slots as a [B, F] mask (empty slots hold id F)."""
    B = gate.shape[0]
    out = torch.zeros(B, F + 1, dtype=torch.bool, device=gate.device)
    out[:, ids] = gate
    return out[:, :F]


def reference_step(fs, step, params, k, selection, rescale, **forced):
    """The reference step at ``selection``; ``forced``: dead_loss, aux_mask, round_preacts."""
    ref = fs.testing.reference
    if step == "topk":
        return ref.topk_sae_step(*params, k, indices=selection, **forced)
    return ref.batchtopk_sae_step(*params, k, rescale, selection=selection, **forced)


class DeadOptions(NamedTuple):
    """The dead-latent loss's options and the draw of one check_dead_step."""

    mode: str  # "auxk" or "ghost"
    relu: bool
    eg: bool  # encoder_grad
    rescale: bool
    seed: int
    integer: bool = False


def check_dead_step(fs, step, problem, dtype, device, options: DeadOptions):
    B, D, F, k, k_aux, capacity, frac, offset = problem
    mode, relu, eg, rescale, seed, integer = options
    params = list(make_sae(B, D, F, 1, dtype, device, seed=seed, integer=integer))
    dead_mask = dead_mask_of(F, frac, seed, device)
    coef = 0.3 if seed % 2 else 1 / 32
    dead_loss = fs.DeadLatentLoss(
        dead_mask, kind=mode, k_aux=k_aux, coef=coef, relu=relu, encoder_grad=eg, capacity=capacity, offset=offset
    )
    kk = k
    out = run_step(fs, step, params, kk, rescale=rescale, dead_loss=dead_loss)
    assert out.loss.shape == () and out.aux_loss.shape == () and out.aux_loss.dtype == torch.float32

    # The AuxK selection is exactly the reference's stable-sort rule on the same-dtype pre-activations.
    raw, (A, gate, dE1, ids, valid) = op_outputs(fs, step, params, kk, dead_loss, rescale)
    ref = fs.testing.reference
    dead_set = ref.dead_set(dead_mask, capacity, offset)
    assert torch.equal(full_mask(valid.unsqueeze(0), ids, F)[0], dead_set), "dead slots are not the window's"
    assert torch.equal(ids[valid], ids[valid].sort().values), "dead slots out of id order"
    aux_mask = None
    if mode == "auxk":
        with torch.no_grad():
            x, W_enc, b_enc, b_dec = (params[i] for i in (0, 1, 2, 4))
            # the TopK step copies the dead columns out of the chunks it selects from (its own GEMM's)
            pre = (
                selected_preacts(fs, x, W_enc, b_enc, kk, b_dec)
                if step == "topk"
                else ref.encoder_preacts(x, W_enc, b_enc, b_dec)
            )
            scale = params[3].detach().norm(dim=1) if rescale else None
            expect = ref.auxk_select(pre, dead_set, k_aux, scale)
            if relu:
                expect &= pre > 0
        aux_mask = full_mask(gate, ids, F)
        assert torch.equal(aux_mask, expect), "AuxK selection differs from the reference tie rule"
        if not relu:
            assert torch.equal(aux_mask.sum(1), torch.full_like(aux_mask.sum(1), min(k_aux, int(dead_set.sum()))))

    if step == "topk":
        selection = out.code.indices
    else:
        selection = (
            torch.repeat_interleave(torch.arange(B, device=device), out.code.row_offsets.diff()),
            out.code.indices,
        )
    g = torch.Generator().manual_seed(seed + 9)
    up, up_aux = ((torch.rand((), generator=g) + 0.5) * s for s in (1, -1))
    ours = grads(out.loss * up.to(device) + out.aux_loss * up_aux.to(device), params, torch.tensor(1.0, device=device))

    dead = dict(dead_loss=dead_loss, aux_mask=aux_mask)
    same = reference_step(fs, step, params, kk, selection, rescale, **dead)
    p64 = [p.detach().double().requires_grad_() for p in params]
    r = reference_step(fs, step, p64, kk, selection, rescale, **dead)
    p_sh = [p.detach().double().requires_grad_() for p in params]
    sh = reference_step(fs, step, p_sh, kk, selection, rescale, round_preacts=dtype, **dead)

    def total(o, like):
        return o.loss * up.to(like) + o.aux_loss * up_aux.to(like)

    one = torch.tensor(1.0, device=device)
    same_g = grads(total(same, same.loss.dtype), params, one.to(same.loss.dtype))
    r_g = grads(total(r, torch.float64), p64, one.double())
    sh_g = grads(total(sh, torch.float64), p_sh, one.double())
    for what, a, b, c, d in (
        ("loss", out.loss, same.loss, r.loss, sh.loss),
        ("aux", out.aux_loss, same.aux_loss, r.aux_loss, sh.aux_loss),
    ):
        assert_parity(f"{step} {mode} {what}", a, b if rel_err(b, c) >= rel_err(d, c) else d, c, dtype)
    for name, a, b, c, d, p in zip(STEP_NAMES, ours, same_g, r_g, sh_g, params):
        assert a.dtype == p.dtype and a.shape == p.shape
        assert_parity(f"{step} {mode} d{name}", a, b if rel_err(b, c) >= rel_err(d, c) else d, c, dtype)
    return out


@given(
    problem=dead_problems(),
    dtype=st.sampled_from(DTYPES),
    step=st.sampled_from(STEPS),
    mode=st.sampled_from(["auxk", "ghost"]),
    relu=st.booleans(),
    eg=st.booleans(),
    rescale=st.booleans(),
    seed=st.integers(0, 2**16),
)
# pinned: each dtype runs in every tier, whatever the draw
@example(problem=(4, 24, 30, 3, 6, 10, 0.5, 7), dtype=torch.float32, step="topk", mode="auxk",
         relu=True, eg=False, rescale=False, seed=1)  # fmt: skip
@example(problem=(3, 33, 80, 5, 12, 20, 0.1, 70), dtype=torch.bfloat16, step="batchtopk", mode="auxk",
         relu=False, eg=True, rescale=True, seed=2)  # fmt: skip
@example(problem=(2, 17, 12, 2, 4, 12, 1.0, 0), dtype=torch.float16, step="topk", mode="ghost",
         relu=True, eg=True, rescale=False, seed=3)  # fmt: skip
def test_dead_latent_loss_parity(fs, device, problem, dtype, step, mode, relu, eg, rescale, seed):
    check_dead_step(
        fs, step, problem, dtype, device, DeadOptions(mode, relu, eg, rescale and step == "batchtopk", seed)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("relu", [True, False])
def test_auxk_ties(fs, device, dtype, step, relu):
    """Small-integer pre-activations tie exactly: among equal dead values the lower latent id wins."""
    problem = (5, 4, 90, 3, 7, 60, 0.5, 0)
    check_dead_step(fs, step, problem, dtype, device, DeadOptions("auxk", relu, True, False, seed=4, integer=True))


@given(
    F=st.one_of(st.integers(1, 40), st.integers(1000, 3000)),
    capacity=st.integers(1, 3000),
    frac=st.sampled_from([0.0, 0.02, 0.3, 1.0]),
    offset=st.integers(0, 2999),
)
def test_dead_window(fs, device, F, capacity, frac, offset):
    """The dead set: the first ``capacity`` dead latents from the offset on (cyclically), in id order,
    empty slots holding F; the count of all dead latents; and the next window's offset, one past the
    last latent taken (or the same offset when all fit)."""
    from parity import package_module

    dead_slots = package_module(fs, "primitives.dead_set").dead_slots
    capacity, offset = min(capacity, F), offset % F
    dead = dead_mask_of(F, frac, F + offset, device)
    ids, valid, n_dead, nxt = dead_slots(dead, capacity, torch.tensor(offset, device=device))
    expect = fs.testing.reference.dead_set(dead.cpu(), capacity, offset)
    assert torch.equal(full_mask(valid.unsqueeze(0), ids, F)[0].cpu(), expect)
    assert torch.equal(ids[valid], ids[valid].sort().values) and bool((ids[~valid] == F).all())
    assert int(n_dead) == int(dead.sum())
    if int(dead.sum()) > capacity:
        last = int(((torch.nonzero(expect).squeeze(1) - offset) % F).max())
        assert int(nxt) == (offset + last + 1) % F
    else:
        assert int(nxt) == offset


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("relu", [True, False])
def test_fewer_dead_than_k_aux(fs, device, dtype, step, relu):
    """Every dead latent is taken, the ReLU zeroing the negative ones (a 16-bit comparison the CPU
    interpreter once got wrong: it let negative bf16 values through)."""
    problem = (7, 9, 96, 4, 12, 96, 0.05, 30)
    check_dead_step(fs, step, problem, dtype, device, DeadOptions("auxk", relu, True, False, seed=5))


@pytest.mark.parametrize("step", fast_tier_keeps(1, ("batchtopk", "topk")))
@pytest.mark.parametrize("mode", fast_tier_keeps(1, ["auxk", "ghost"]))
def test_chunks_and_capacity(fs, device, step, mode, monkeypatch):
    """Many F chunks (the dead columns are copied chunk by chunk) and a capacity below the dead count."""
    from encoder_inputs import tuning

    monkeypatch.setitem(tuning(fs), "chunk_bytes", 600)
    for capacity, offset in ((9, 0), (40, 150), (200, 7)):
        problem = (6, 7, 200, 4, 9, capacity, 0.5, offset)
        check_dead_step(fs, step, problem, torch.float32, device, DeadOptions(mode, True, True, False, 11))


@pytest.mark.kernels_ci
@pytest.mark.parametrize("step", STEPS)
def test_no_dead_latents(fs, device, step):
    """No dead latent: the auxiliary loss and its gradients are zero; the step is the plain one."""
    params = list(make_sae(5, 9, 30, 1, torch.float32, device, seed=1))
    plain = run_step(fs, step, params, 3)
    none = torch.zeros(30, dtype=torch.bool, device=device)
    one = torch.tensor(1.0, device=device)
    plain_grads = grads(plain.loss, params, one)
    for mode in ("auxk", "ghost"):
        out = run_step(fs, step, params, 3, dead_loss=fs.DeadLatentLoss(none, kind=mode))
        assert float(out.aux_loss.detach()) == 0.0
        torch.testing.assert_close(out.loss, plain.loss, rtol=0, atol=0)
        for a, b in zip(grads(out.loss + out.aux_loss, params, one), plain_grads):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_defaults(fs, device):
    """k_aux = D // 2, dead_capacity = 2 * k_aux, offset 0, aux_coef = 1/32 (AuxK) or 1 (ghost), relu'd,
    encoder gradients on."""
    params = list(make_sae(6, 12, 50, 1, torch.float32, device, seed=8))
    dead = dead_mask_of(50, 0.5, 8, device)
    for mode, coef in (("auxk", 1 / 32), ("ghost", 1.0)):
        a = fs.topk_sae_step(*params, 3, dead_loss=fs.DeadLatentLoss(dead, kind=mode))
        full = fs.DeadLatentLoss(dead, kind=mode, k_aux=6, coef=coef, relu=True, capacity=12, offset=0)
        b = fs.topk_sae_step(*params, 3, dead_loss=full)
        assert torch.equal(a.loss, b.loss) and torch.equal(a.aux_loss, b.aux_loss)
        plain = fs.topk_sae_step(*params, 3)
        torch.testing.assert_close(a.loss, plain.loss + coef * a.aux_loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("step", STEPS)
def test_deterministic(fs, device, step):
    params = list(make_sae(40, 33, 120, 1, torch.float32, device, seed=2))
    dead = dead_mask_of(120, 0.5, 2, device)
    runs = []
    for _ in range(2):
        out = run_step(fs, step, params, 5, dead_loss=fs.DeadLatentLoss(dead, k_aux=9))
        runs.append((out.loss, out.aux_loss, grads(out.loss + out.aux_loss, params, torch.tensor(1.3, device=device))))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    for a, b in zip(runs[0][2], runs[1][2]):
        assert torch.equal(a, b)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("step", STEPS)
def test_bad_input(fs, device, step):
    params = list(make_sae(4, 6, 20, 1, torch.float32, device, seed=0))
    dead = torch.zeros(20, dtype=torch.bool, device=device)
    bad = [
        ("mask", dict(mask=None)),
        ("mask", dict(mask=dead.float())),
        ("mask", dict(mask=dead[:10])),
        ("kind", dict(mask=dead, kind="ghosts")),
        ("k_aux", dict(mask=dead, k_aux=0)),
        ("k_aux", dict(mask=dead, k_aux=21)),
        ("k_aux", dict(mask=dead, k_aux=2.0)),
        ("coef", dict(mask=dead, coef=-1.0)),
        ("relu", dict(mask=dead, relu=1)),
        ("encoder_grad", dict(mask=dead, encoder_grad=None)),
        ("capacity", dict(mask=dead, k_aux=5, capacity=4)),
        ("capacity", dict(mask=dead, capacity=21)),
        ("offset", dict(mask=dead, offset=20)),
        ("offset", dict(mask=dead, offset=torch.tensor(1.0))),
        ("offset", dict(mask=dead, offset=torch.tensor([1]))),
    ]
    for name, kwargs in bad:
        with pytest.raises(ValueError, match=rf"dead_loss\.{name}"):
            run_step(fs, step, params, 2, dead_loss=fs.DeadLatentLoss(**kwargs))
    with pytest.raises(ValueError, match="dead_loss"):
        run_step(fs, step, params, 2, dead_loss="auxk")
    if device == "cuda":
        with pytest.raises(ValueError, match=r"dead_loss\.mask"):
            run_step(fs, step, params, 2, dead_loss=fs.DeadLatentLoss(dead.cpu()))
