"""BatchTopKSparseAutoencoder, JumpReLUSparseAutoencoder, StandardSparseAutoencoder and GatedSparseAutoencoder:
init conventions, state, training curves against their plain-torch twins, the inference threshold, the
variable-length codes' capacity recovery, and the standard and Gated SAEs' switch between their dense and
sparse steps."""

import pytest
import torch
from test_training import LR, D, N, sparse_dictionary_data

F, B, STEPS = 64, 8, 12


def twins(fs, name, device, **kwargs):
    flash = getattr(fs, name)(D, F, dtype=torch.float32, device=device, seed=1, **kwargs)
    ref = getattr(fs.testing.reference, name)(D, F, dtype=torch.float32, device=device, seed=1, **kwargs)
    for key, t in ref.state_dict().items():
        assert torch.equal(flash.state_dict()[key], t), f"the twins start from different {key}"
    return flash, ref


def train(sae, data):
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    log = []
    for step in range(STEPS):
        i = step % (N // B)
        out = sae.loss(data[i * B : (i + 1) * B])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        log.append(out)
    return log


@pytest.mark.kernels_ci
def test_batchtopk_init_and_state(fs, device):
    """SAELens's conventions: decoder rows of norm 0.1, W_enc = W_dec, zero biases, a float64 threshold at 0."""
    sae = fs.BatchTopKSparseAutoencoder(D, F, 3.5, device=device, seed=0)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((F,), 0.1, device=device))
    assert torch.equal(sae.W_enc, sae.W_dec) and not sae.b_enc.any() and not sae.b_dec.any()
    assert sae.rescale_acts_by_decoder_norm and sae.threshold_lr == 0.01
    assert sae.threshold.dtype == torch.float64 and "threshold" in sae.state_dict()
    assert "k=3.5" in repr(sae) and f"n_features={F}" in repr(sae)


@pytest.mark.kernels_ci
def test_jumprelu_init_and_state(fs, device):
    for param, key in (("direct", "threshold"), ("log", "log_threshold")):
        sae = fs.JumpReLUSparseAutoencoder(D, F, threshold_parameterization=param, device=device, seed=0)
        sae = sae.to(torch.bfloat16)
        assert sae.W_dec.dtype == torch.bfloat16
        assert getattr(sae, key).dtype == torch.float32, "the threshold stays fp32, as SAELens keeps it"
        torch.testing.assert_close(sae.current_threshold(), torch.full((F,), 0.01, device=device))
        assert key in sae.state_dict() and "bandwidth=0.05" in repr(sae)


def test_batchtopk_training_follows_twin_and_threshold(fs, device):
    """fp32: the same code at every step, loss within 1e-4, and the same threshold estimate; then eval
    mode encodes with the threshold rule."""
    data = sparse_dictionary_data(device)
    flash, ref = twins(fs, "BatchTopKSparseAutoencoder", device, k=4)
    log_f, log_r = train(flash, data), train(ref, data)
    for step, (a, b) in enumerate(zip(log_f, log_r)):
        assert torch.equal(a.code.indices, b.code.indices) and torch.equal(a.code.row_offsets, b.code.row_offsets), (
            f"step {step}"
        )
        assert abs(a.loss.item() - b.loss.item()) <= 1e-4 * b.loss.item(), f"step {step}: {a.loss} vs {b.loss}"
    torch.testing.assert_close(flash.threshold, ref.threshold, rtol=1e-6, atol=0)
    assert flash.threshold > 0
    first, last = log_f[0].loss.item(), log_f[-1].loss.item()
    assert last < 0.8 * first, f"loss went from {first:.4g} to {last:.4g}"

    flash.eval()
    x = data[:B]
    vals, indices, row_offsets = flash.encode(x)
    with torch.no_grad():
        pre = fs.testing.reference.encoder_preacts(x, flash.W_enc, flash.b_enc, flash.b_dec)
        active = pre * flash.W_dec.norm(dim=1) > flash.threshold.to(pre.dtype)
    rows = torch.repeat_interleave(torch.arange(B, device=device), row_offsets.diff())
    code = torch.zeros_like(pre)
    code[rows, indices[: len(rows)]] = vals[: len(rows)]
    assert torch.equal(code != 0, active) and torch.equal(code[active], pre[active])
    x_hat = flash(x)
    torch.testing.assert_close(x_hat, code @ flash.W_dec + flash.b_dec, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # a training curve: the full tier runs it
def test_matryoshka_training_follows_twin(fs, device):
    """fp32: the same code at every step, every level's loss within 1e-4, the same threshold estimate."""
    data = sparse_dictionary_data(device)
    flash, ref = twins(fs, "MatryoshkaBatchTopKSparseAutoencoder", device, k=4, prefix_sizes=[8, 32, F])
    log_f, log_r = train(flash, data), train(ref, data)
    for step, (a, b) in enumerate(zip(log_f, log_r)):
        assert torch.equal(a.code.indices, b.code.indices) and torch.equal(a.code.row_offsets, b.code.row_offsets), (
            f"step {step}"
        )
        torch.testing.assert_close(a.level_losses, b.level_losses.float(), rtol=1e-4, atol=0)
    torch.testing.assert_close(flash.threshold, ref.threshold, rtol=1e-6, atol=0)
    assert log_f[-1].loss < 0.8 * log_f[0].loss
    assert "prefix_sizes=[8, 32, 64]" in repr(flash)


@pytest.mark.slow  # a training curve: the full tier runs it
@pytest.mark.parametrize("parameterization", ["direct", "log"])
def test_jumprelu_training_follows_twin(fs, device, parameterization):
    data = sparse_dictionary_data(device)
    kw = dict(threshold_parameterization=parameterization, init_threshold=0.05, bandwidth=0.1, l0_coefficient=0.01)
    flash, ref = twins(fs, "JumpReLUSparseAutoencoder", device, **kw)
    log_f, log_r = train(flash, data), train(ref, data)
    for step, (a, b) in enumerate(zip(log_f, log_r)):
        assert not bool(a.overflow), f"step {step} overflowed"
        assert torch.equal(a.fire_counts, b.fire_counts), f"step {step}: other active latents"
        assert abs(a.loss.item() - b.loss.item()) <= 1e-4 * b.loss.item(), f"step {step}: {a.loss} vs {b.loss}"
    for key, t in ref.state_dict().items():
        err = (flash.state_dict()[key].double() - t.double()).norm() / t.double().norm().clamp_min(1e-30)
        assert err < 1e-4, f"after {STEPS} steps {key} differs by {err:.2e}"
    assert log_f[-1].loss < log_f[0].loss


@pytest.mark.kernels_ci
def test_jumprelu_capacity_recovers_from_overflow(fs, device):
    """A capacity too small overflows and says so; the module reads the count it saw and the next step is exact."""
    data = sparse_dictionary_data(device)
    sae = fs.JumpReLUSparseAutoencoder(D, F, capacity_per_row=1, init_threshold=0.001, device=device, seed=0)
    first = sae.loss(data[:B])
    assert bool(first.overflow) and int(first.count) > B
    second = sae.loss(data[:B])
    assert not bool(second.overflow), "the capacity did not grow from the overflowing step's count"
    assert sae.capacity_per_row >= int(first.count) / B
    torch.testing.assert_close(second.loss, fs.testing.reference.JumpReLUSparseAutoencoder.loss(sae, data[:B]).loss)


@pytest.mark.kernels_ci
@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        ("BatchTopKSparseAutoencoder", dict(k=0), "k must be a number"),
        ("BatchTopKSparseAutoencoder", dict(k=F + 1), "k must be a number"),
        ("BatchTopKSparseAutoencoder", dict(k=2, threshold_lr=0), "threshold_lr"),
        ("BatchTopKSparseAutoencoder", dict(k=2, rescale_acts_by_decoder_norm=1), "rescale_acts_by_decoder_norm"),
        ("BatchTopKSparseAutoencoder", dict(k=2, decoder_init_norm=0), "decoder_init_norm"),
        ("MatryoshkaBatchTopKSparseAutoencoder", dict(k=2, prefix_sizes=[8, 32]), "prefix_sizes"),
        ("MatryoshkaBatchTopKSparseAutoencoder", dict(k=2, prefix_sizes=[32, 8, F]), "prefix_sizes"),
        ("JumpReLUSparseAutoencoder", dict(bandwidth=0), "bandwidth"),
        ("JumpReLUSparseAutoencoder", dict(init_threshold=-1), "init_threshold"),
        ("JumpReLUSparseAutoencoder", dict(l0_coefficient=-1), "l0_coefficient"),
        ("JumpReLUSparseAutoencoder", dict(threshold_parameterization="exp"), "threshold_parameterization"),
        ("JumpReLUSparseAutoencoder", dict(capacity_per_row=0), "capacity_per_row"),
        ("StandardSparseAutoencoder", dict(l1_coefficient=-1), "l1_coefficient"),
        ("StandardSparseAutoencoder", dict(dense_above=1.5), "dense_above"),
        ("StandardSparseAutoencoder", dict(dense_above=True), "dense_above"),
        ("StandardSparseAutoencoder", dict(capacity_per_row=0), "capacity_per_row"),
        ("GatedSparseAutoencoder", dict(l1_coefficient=-1), "l1_coefficient"),
        ("GatedSparseAutoencoder", dict(freeze_aux_decoder=None), "freeze_aux_decoder"),
        ("GatedSparseAutoencoder", dict(dense_above=-0.1), "dense_above"),
        ("GatedSparseAutoencoder", dict(capacity_per_row=1.5), "capacity_per_row"),
    ],
)
def test_family_modules_reject(fs, cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(fs, cls)(D, F, **kwargs)


@pytest.mark.kernels_ci
def test_jumprelu_threshold_projection_keeps_autograd_intact(fs, device):
    """Reading the threshold again between a step's forward and backward (a logging hook, say) must not
    invalidate the saved threshold: the projection works on .data, as SAELens's does."""
    sae = fs.JumpReLUSparseAutoencoder(D, F, device=device, seed=0)
    step = sae.loss(sparse_dictionary_data(device)[:B])
    sae.current_threshold()
    step.loss.backward()
    assert sae.threshold.grad is not None and torch.isfinite(sae.threshold.grad).all()


# The standard (ReLU + L1) SAE -------------------------------------------------------------------


@pytest.mark.kernels_ci
def test_standard_init_and_state(fs, device):
    """SAELens's conventions: decoder rows of norm 0.1, W_enc = W_dec, zero biases; l1_coefficient 1.0."""
    sae = fs.StandardSparseAutoencoder(D, F, device=device, seed=0)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((F,), 0.1, device=device))
    assert torch.equal(sae.W_enc, sae.W_dec) and not sae.b_enc.any() and not sae.b_dec.any()
    assert sae.l1_coefficient == 1.0 and "l1_coefficient=1.0" in repr(sae)
    assert sae.dense_above == fs.modules.standard.DENSE_ABOVE


SWITCHING = {
    "StandardSparseAutoencoder": dict(l1_coefficient=0.02),
    "GatedSparseAutoencoder": dict(l1_coefficient=0.02),
    "GatedSparseAutoencoder-shared": dict(l1_coefficient=0.02, freeze_aux_decoder=False),
}


def train_switching(fs, device, name, dense_above):
    """Trains the module and its twin side by side; returns (module, twin, each step's path and loss)."""
    data = sparse_dictionary_data(device)
    flash, ref = twins(fs, name.split("-")[0], device, **SWITCHING[name])
    flash.dense_above = dense_above
    log = []
    opt_f, opt_r = (torch.optim.Adam(m.parameters(), lr=LR) for m in (flash, ref))
    for step in range(STEPS):
        i = step % (N // B)
        x = data[i * B : (i + 1) * B]
        a, b = flash.loss(x), ref.loss(x)
        log.append((flash.last_path, a.loss.detach()))
        assert not bool(a.overflow), f"step {step} overflowed"
        assert torch.equal(a.fire_counts, b.fire_counts), f"step {step}: other active latents"
        assert abs(a.loss.item() - b.loss.item()) <= 1e-4 * b.loss.item(), f"step {step}: {a.loss} vs {b.loss}"
        for opt, out in ((opt_f, a), (opt_r, b)):
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    for key, t in ref.state_dict().items():
        err = (flash.state_dict()[key].double() - t.double()).norm() / t.double().norm().clamp_min(1e-30)
        assert err < 1e-4, f"after {STEPS} steps {key} differs by {err:.2e}"
    return flash, ref, log


MODES = [0.0, 1.0, 0.65]
MODE_IDS = ["always_dense", "always_sparse", "switching"]
# each module in each mode; SAELens's shared auxiliary decoder in the switching mode only (CI's time)
CASES = [
    pytest.param(name, mode, id=f"{name}-{mid}")
    for name in SWITCHING
    for mode, mid in zip(MODES, MODE_IDS)
    if not name.endswith("shared") or mode == 0.65
]


@pytest.mark.slow  # a training curve: the full tier runs it
@pytest.mark.parametrize("name,dense_above", CASES)
def test_switching_training_follows_twin(fs, device, name, dense_above):
    """Dense steps, sparse steps, or switches between them (on this data the code's density moves
    between 0.48 and 0.77 of F, across 0.65): each curve follows the plain-torch twin step by step."""
    _, _, log = train_switching(fs, device, name, dense_above)
    paths = [p for p, _ in log]
    if dense_above == 0.0:
        assert set(paths) == {"dense"}
    elif dense_above == 1.0:
        assert set(paths) == {"sparse"}
    else:
        assert paths[0] == "dense" and "sparse" in paths and "dense" in paths[1:], paths


@pytest.mark.slow  # a training curve: the full tier runs it
@pytest.mark.parametrize("name", ["StandardSparseAutoencoder", "GatedSparseAutoencoder"])
def test_switching_curve_equals_dense_only_curve(fs, device, name):
    """The run that crosses the switch both ways and the dense-only run give the same curve and the same
    weights (fp32; by 1e-5 relative at each step: the two formulations differ only in summation order)."""
    switching, _, log_s = train_switching(fs, device, name, 0.65)
    dense, _, log_d = train_switching(fs, device, name, 0.0)
    assert {p for p, _ in log_s} == {"dense", "sparse"}
    for step, ((_, a), (_, b)) in enumerate(zip(log_s, log_d)):
        assert abs(a.item() - b.item()) <= 1e-5 * b.item(), f"step {step}: switching {a} vs dense-only {b}"
    for key, t in dense.state_dict().items():
        err = (switching.state_dict()[key].double() - t.double()).norm() / t.double().norm().clamp_min(1e-30)
        assert err < 1e-5, f"after {STEPS} steps {key} differs by {err:.2e}"


@pytest.mark.kernels_ci
def test_standard_capacity_recovers_from_overflow(fs, device):
    """A starting capacity too small overflows and says so; the next step sizes from that count and is exact."""
    data = sparse_dictionary_data(device)
    sae = fs.StandardSparseAutoencoder(D, F, capacity_per_row=1, dense_above=1.0, device=device, seed=0)
    first = sae.loss(data[:B])
    assert sae.last_path == "sparse" and bool(first.overflow) and int(first.count) > B
    second = sae.loss(data[:B])
    assert not bool(second.overflow), "the capacity did not grow from the overflowing step's count"
    assert sae.capacity_per_row >= int(first.count) / B
    torch.testing.assert_close(second.loss, fs.testing.reference.StandardSparseAutoencoder.loss(sae, data[:B]).loss)


@pytest.mark.kernels_ci
def test_seen_count_keeps_the_oldest_copy_in_flight(fs):
    """In a loop far ahead of the GPU no copy completes before the next step records: the first copy
    in flight is kept (not replaced), so a count still arrives once it completes."""
    from importlib import import_module

    SeenCount = import_module(fs.__name__ + ".modules._capacity").SeenCount

    class Event:
        done = False

        def query(self):
            return self.done

    seen, event = SeenCount(), Event()
    seen._pending = (torch.tensor(40), event, 8)  # a copy in flight, as record() leaves it on a GPU
    seen.record(torch.tensor(80), 8)  # a later step: the copy in flight stays
    assert seen.poll() is None and seen._pending[0].item() == 40
    event.done = True
    assert seen.poll() == 5.0  # the oldest count arrives
    seen.record(torch.tensor(16), 8)  # nothing in flight: a new copy (CPU: complete at once)
    assert seen.poll() == 2.0


# The Gated SAE ----------------------------------------------------------------------------------


@pytest.mark.kernels_ci
def test_gated_init_matches_saelens(fs, device):
    """SAELens's gated training SAE's conventions: decoder rows of norm 0.1, W_enc = W_dec, b_gate, r_mag,
    b_mag and b_dec zero, no b_enc; l1_coefficient 1.0; the paper's frozen auxiliary decoder by default."""
    from peers import saelens_training_sae

    sae = fs.GatedSparseAutoencoder(D, F, device=device, seed=0)
    theirs = saelens_training_sae("gated", d_in=D, d_sae=F, device=device)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), theirs.W_dec.norm(dim=1))
    assert torch.equal(sae.W_enc, sae.W_dec) and torch.equal(theirs.W_enc.T, theirs.W_dec)
    for name in ("b_gate", "r_mag", "b_mag", "b_dec"):
        assert not getattr(sae, name).any() and not getattr(theirs, name).any()
    assert "b_enc" not in sae.state_dict() and {"b_gate", "r_mag", "b_mag"} <= set(sae.state_dict())
    assert sae.l1_coefficient == theirs.cfg.l1_coefficient == 1.0 and sae.freeze_aux_decoder
    assert "freeze_aux_decoder=True" in repr(sae)
    assert sae.dense_above == fs.modules.gated.DENSE_ABOVE


@pytest.mark.kernels_ci
def test_gated_capacity_recovers_from_overflow(fs, device):
    """A starting capacity too small overflows and says so; the next step sizes from that count and is exact;
    encode/decode give the step's code and reconstruction."""
    data = sparse_dictionary_data(device)
    sae = fs.GatedSparseAutoencoder(D, F, capacity_per_row=1, dense_above=1.0, device=device, seed=0)
    first = sae.loss(data[:B])
    assert sae.last_path == "sparse" and bool(first.overflow) and int(first.count) > B
    second = sae.loss(data[:B])
    assert not bool(second.overflow), "the capacity did not grow from the overflowing step's count"
    torch.testing.assert_close(second.loss, fs.testing.reference.GatedSparseAutoencoder.loss(sae, data[:B]).loss)
    vals, indices, row_offsets = sae.encode(data[:B])
    n = int(row_offsets[-1])
    assert torch.equal(indices[:n], second.code.indices[:n]) and torch.equal(vals[:n], second.code.vals[:n])
    x_hat = sae.decode(vals, indices, row_offsets)
    mse = (x_hat.float() - data[:B].float()).pow(2).mean()
    torch.testing.assert_close(mse, second.mse, rtol=1e-5, atol=1e-7)


@pytest.mark.kernels_ci
def test_gated_resample_resets_its_vectors(fs, device):
    """Resampling a dead latent zeroes its b_gate, r_mag and b_mag (and their Adam moments)."""
    data = sparse_dictionary_data(device)
    sae = fs.GatedSparseAutoencoder(D, F, device=device, seed=0, dead_window_tokens=1)
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    sae.loss(data[:B]).loss.backward()
    opt.step()
    with torch.no_grad():
        for p in (sae.b_gate, sae.r_mag, sae.b_mag):
            p.fill_(0.5)
        sae.tokens_since_fired.zero_()
        sae.tokens_since_fired[:3] = 5
    assert int(sae.resample_dead_(data, opt)) == 3
    for p in (sae.b_gate, sae.r_mag, sae.b_mag):
        assert not p[:3].any() and (p[3:] == 0.5).all()
        assert not opt.state[p]["exp_avg"][:3].any()
