"""Switching trainers: flash-sae reproduces the TopK training step of the installed SAELens and sparsify.

Both packages are imported (tests/requirements.txt pins them) and run with their **default** TopK
training configurations:
- SAELens 6.54.12 ``TopKTrainingSAE(TopKTrainingSAEConfig(d_in, d_sae, k))``: ``apply_b_dec_to_input``,
  ``rescale_acts_by_decoder_norm=True`` (the top k of the pre-activations times each latent's decoder
  norm, decoded through the unit decoder rows), ``aux_loss_coefficient=1.0`` (AuxK, zero until a latent
  is dead: ``test_dead_latent_peers.py`` checks it), its loss the MSE summed over d_in, mean over the batch;
- sparsify 1.3.3 ``SparseCoder(d_in, SparseCoderConfig(num_latents, k))``: ReLU, then the top k,
  ``normalize_decoder=True`` (a training-loop step), its loss the FVU (AuxK off: ``auxk_alpha = 0``).
Each runs on CPU tensors in the dtype under test and again in fp64 (the ground truth); sparsify's
Triton decoder is switched off by its own ``SPARSIFY_DISABLE_TRITON`` (``peers.sparsify_coder``).

The helpers that map the trainer's parameters to flash-sae's arguments, and flash-sae's loss to the
trainer's, are taken from the code blocks of the migration guide, docs/migrating.md
(``migration_helpers``), so the guide shows exactly what is tested. What is checked, for fp32 and
bf16, under a random upstream scale: the trainer's loss,
the reconstruction, the code (dense, compared on its positive part: sparsify's zero-valued slots hold
arbitrary ids) and every gradient in the trainer's own layout, by tests/parity.py's rule against the
trainer in fp64; the selection equal to the trainer's own in fp32 and in fp64. The decoder rows are
drawn with norms from 0.5 to 2.5, so SAELens's rescaling changes the ranking.
"""

import ast
import re
from pathlib import Path

import pytest
import torch
from parity import assert_parity
from peers import saelens_step, saelens_training_sae, sparsify_coder

# The trainers, run as installed ------------------------------------------------------


def saelens_run(p, x, k):
    """SAELens's TopK training step on the tensors ``p`` (its names and layouts: W_enc [d_in, d_sae], b_enc,
    W_dec [d_sae, d_in], b_dec), default config. Returns (loss, x_hat, dense code, its parameters)."""
    D, F = p["W_enc"].shape
    dtype = str(x.dtype).replace("torch.", "")
    sae = saelens_training_sae("topk", d_in=D, d_sae=F, k=k, dtype=dtype, device=str(x.device))
    assert sae.cfg.rescale_acts_by_decoder_norm and sae.cfg.apply_b_dec_to_input
    with torch.no_grad():
        for name, t in p.items():
            getattr(sae, name).copy_(t)
    out = saelens_step(sae, x)
    return out.loss, out.sae_out, out.feature_acts, dict(sae.named_parameters())


def sparsify_run(p, x, k):
    """sparsify's SparseCoder forward on the tensors ``p`` (encoder.weight [F, D], encoder.bias, W_dec, b_dec),
    default config. Returns (fvu, x_hat, dense code, its parameters)."""
    F, D = p["encoder.weight"].shape
    coder, train_cfg = sparsify_coder(D, "cpu", x.dtype, num_latents=F, k=k)
    assert train_cfg.auxk_alpha == 0.0 and coder.cfg.normalize_decoder and not coder.cfg.multi_topk
    with torch.no_grad():
        params = dict(coder.named_parameters())
        for name, t in p.items():
            params[name].copy_(t)
    out = coder(x)
    code = torch.zeros(x.shape[0], F, dtype=out.latent_acts.dtype).scatter(1, out.latent_indices, out.latent_acts)
    run_ungated = dict(acts=out.latent_acts, ids=out.latent_indices, x_hat=out.sae_out)
    return out.fvu, out.sae_out, code, dict(coder.named_parameters(), _run=run_ungated)


def sparsify_ungated_share(p, x, run, upstream):
    """What sparsify's encoder backward adds beyond the ReLU's gradient: its ``FusedEncoder.backward`` does not
    mask the slots whose ReLU'd value is 0 (a row with fewer than k positive pre-activations, where
    torch.topk picks among the zeros), so the value's gradient there, <dL/dx_hat[b], W_dec[f]>, reaches
    encoder.weight[f], encoder.bias[f], x and (through x - b_dec) b_dec. Returns those shares by name."""
    F, D = p["encoder.weight"].shape
    acts, ids = run["acts"].detach(), run["ids"]
    xd, W_enc, W_dec, b_dec = x.detach(), *(p[n].detach() for n in ("encoder.weight", "W_dec", "b_dec"))
    g_hat = 2 * upstream * (run["x_hat"].detach() - xd) / (xd - xd.mean(0)).pow(2).sum()
    da = torch.where(acts == 0, (g_hat.unsqueeze(1) * W_dec[ids]).sum(-1), 0.0)  # [B, k], zero slots only
    xc = xd - b_dec
    dW = torch.zeros_like(W_enc).index_add_(0, ids.reshape(-1), (da.unsqueeze(2) * xc.unsqueeze(1)).reshape(-1, D))
    db = torch.zeros(F, dtype=da.dtype).index_add_(0, ids.reshape(-1), da.reshape(-1))
    dx = (da.unsqueeze(2) * W_enc[ids]).sum(1)
    return {"encoder.weight": dW, "encoder.bias": db, "W_dec": torch.zeros_like(W_dec), "b_dec": -dx.sum(0)}, dx


# The migration guide's helpers --------------------------------------------------------


def migration_helpers(names=("saelens_to_flash", "saelens_loss", "sparsify_to_flash", "sparsify_loss")):
    """The helper functions as docs/migrating.md writes them: every ``def`` of its python code blocks, run."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "migrating.md").read_text()
    found = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        defs = [node for node in ast.parse(block).body if isinstance(node, ast.FunctionDef) and node.name in names]
        if defs:
            exec(compile(ast.Module(body=defs, type_ignores=[]), "docs/migrating.md", "exec"), {"torch": torch}, found)
    missing = set(names) - set(found)
    assert not missing, f"docs/migrating.md no longer defines {sorted(missing)}"
    return [found[n] for n in names]


saelens_to_flash, saelens_loss, sparsify_to_flash, sparsify_loss = migration_helpers()

TRAINERS = {
    "saelens": (saelens_run, saelens_to_flash, saelens_loss),
    "sparsify": (sparsify_run, sparsify_to_flash, sparsify_loss),
}


def flash_grads_to_trainer(to_flash, p, grads):
    """Gradients of flash-sae's parameters [W_enc, b_enc, W_dec, b_dec] carried back through the mapping
    ``to_flash`` (a transpose, and SAELens's decoder-norm rescaling) to the trainer's tensors ``p``."""
    mapped = to_flash(p)
    back = torch.autograd.grad(list(mapped.values()), list(p.values()), grads)
    return dict(zip(p, back))


# Drawing a problem ------------------------------------------------------------------


def draw(trainer, B, D, F, dtype, device, *, seed, b_enc_shift=0.0):
    """x [B, D] and the trainer's parameters, continuous random values (ties have probability ~0 in fp32);
    decoder rows of norms from 0.5 to 2.5."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g) * 0.8 + 0.3 * torch.randn(D, generator=g)
    W_enc = torch.randn(F, D, generator=g) / D**0.5
    b_enc = torch.randn(F, generator=g) * 0.1 + b_enc_shift
    W_dec = torch.randn(F, D, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * (0.5 + 2 * torch.rand(F, 1, generator=g))
    b_dec = torch.randn(D, generator=g) * 0.2
    if trainer == "saelens":
        p = {"W_enc": W_enc.T.contiguous(), "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    else:
        p = {"encoder.weight": W_enc, "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    upstream = (torch.rand((), generator=g).item() + 0.5) * (1 if seed % 2 else -1)
    cast = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return cast(x), {name: cast(t) for name, t in p.items()}, upstream


def fp64(x, p):
    return x.detach().double().requires_grad_(), {n: t.detach().double().requires_grad_() for n, t in p.items()}


def dense(vals, indices, F):
    return torch.zeros(vals.shape[0], F, dtype=vals.dtype, device=vals.device).scatter(1, indices, vals)


def their_results(trainer, x, p, k, upstream, ungated=False):
    """The installed trainer's (loss, x_hat, dense code, gradients by name, dx). ``ungated``: less sparsify's
    gradient at its zero-valued slots (``sparsify_ungated_share``)."""
    loss, x_hat, code, params = TRAINERS[trainer][0](p, x, k)
    g = torch.autograd.grad(loss * upstream, [x, *(params[n] for n in p)])
    grads, dx = dict(zip(p, g[1:])), g[0]
    if ungated:
        share, share_dx = sparsify_ungated_share(p, x, params["_run"], upstream)
        grads = {n: grads[n] - share[n] for n in grads}
        dx = dx - share_dx
    return loss, x_hat, code.detach(), grads, dx


def check_against_trainer(trainer, ours, x, p, k, upstream, dtype, ungated=False):
    """``ours`` = (loss, x_hat, vals, indices, grads by name, dx), in the trainer's terms: the trainer in
    ``dtype`` is torch's error, the trainer in fp64 the truth (tests/parity.py's rule)."""
    loss, x_hat, vals, indices, grads, dx = ours
    F = p["W_dec"].shape[0]
    same = their_results(trainer, x.cpu(), {n: t.cpu() for n, t in p.items()}, k, upstream, ungated)
    ref = their_results(trainer, *fp64(x.cpu(), {n: t.cpu() for n, t in p.items()}), k, upstream, ungated)
    # The positive part of the code: sparsify's zero-valued slots hold arbitrary ids.
    support = (dense(vals, indices, F) != 0).cpu()
    assert torch.equal(support, ref[2] != 0), f"flash-sae picked other latents than {trainer} in fp64"
    assert torch.equal(support, same[2] != 0), f"flash-sae picked other latents than {trainer} in {dtype}"
    assert_parity(f"{trainer} loss", loss, same[0], ref[0], dtype)
    assert_parity(f"{trainer} x_hat", x_hat, same[1], ref[1], dtype)
    # SAELens's code holds its rescaled values (pre-activation x decoder norm), as flash-sae's does
    # under the mapping; sparsify's the plain ReLU values.
    assert_parity(f"{trainer} code", dense(vals, indices, F), same[2], ref[2], dtype)
    assert_parity(f"{trainer} dx", dx, same[4], ref[4], dtype)
    for name in p:
        assert grads[name].shape == p[name].shape, f"{trainer} d{name} has the wrong layout"
        assert_parity(f"{trainer} d{name}", grads[name], same[3][name], ref[3][name], dtype)
    return same, ref


DTYPES = (torch.float32, torch.bfloat16)


# Tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_sae_step_reproduces_trainer(fs, device, trainer, dtype):
    """The functional swap: ``topk_sae_step(x, **to_flash(params), k=k)`` with the trainer's loss factor."""
    B, D, F, k = 8, 40, 96, 6
    _, to_flash, trainer_loss = TRAINERS[trainer]
    x, p, upstream = draw(trainer, B, D, F, dtype, device, seed=3 if dtype == torch.float32 else 4)
    step = fs.topk_sae_step(x, **to_flash(p), k=k)
    assert (step.code.vals > 0).all(), "the draw should give k positive pre-activations per row"
    loss = trainer_loss(step, x)
    # Autograd carries the gradients through the mapping into the trainer's own tensors.
    g = torch.autograd.grad(loss * upstream, [x, *p.values()])
    mapped = to_flash(p)
    x_hat = fs.sparse_decode(step.code.vals, step.code.indices, mapped["W_dec"], mapped["b_dec"])
    ours = (loss, x_hat, step.code.vals, step.code.indices, dict(zip(p, g[1:])), g[0])
    same, ref = check_against_trainer(trainer, ours, x, p, k, upstream, dtype)
    if trainer == "sparsify":
        # step.fvu is sparsify's loss value (computed without a host sync, not differentiable).
        assert_parity("sparsify fvu", step.fvu, same[0], ref[0], dtype)
    counts = torch.bincount(
        step.code.indices.reshape(-1), weights=(step.code.vals > 0).reshape(-1).double(), minlength=F
    )
    assert torch.equal(step.fire_counts, counts.long())


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_autoencoder_loads_trainer_checkpoint(fs, device, trainer, dtype):
    """The module swap: ``fs.SparseAutoencoder.load_state_dict(to_flash(state_dict))``; its gradients carried
    back through the mapping."""
    B, D, F, k = 7, 33, 70, 5
    _, to_flash, trainer_loss = TRAINERS[trainer]
    x, p, upstream = draw(trainer, B, D, F, dtype, device, seed=5 if dtype == torch.float32 else 6)
    sae = fs.SparseAutoencoder(D, F, k, dtype=dtype, device=device, seed=0)
    sae.load_state_dict({name: t.detach() for name, t in to_flash(p).items()})
    for name, t in to_flash(p).items():
        assert torch.equal(getattr(sae, name), t), f"load_state_dict changed {name}"
    if trainer == "saelens":  # the mapping folds the decoder norms: unit rows, flash-sae's convention
        torch.testing.assert_close(sae.W_dec.float().norm(dim=1), torch.ones(F, device=device), atol=1e-2, rtol=0)

    step = sae.loss(x)
    assert (step.code.vals > 0).all()
    (trainer_loss(step, x) * upstream).backward()
    dx = x.grad
    grads = flash_grads_to_trainer(to_flash, p, [sae.W_enc.grad, sae.b_enc.grad, sae.W_dec.grad, sae.b_dec.grad])
    with torch.no_grad():
        x_hat = sae(x)
        vals, indices = sae.encode(x)
    assert torch.equal(indices, step.code.indices) and torch.equal(vals, step.code.vals), (
        "encode and loss chose other codes"
    )
    ours = (trainer_loss(step, x), x_hat, vals, indices, grads, dx)
    check_against_trainer(trainer, ours, x, p, k, upstream, dtype)


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_rows_with_fewer_than_k_positive_preactivations(fs, device, trainer):
    """A negative encoder bias leaves rows with fewer than k positive pre-activations.

    flash-sae and SAELens take the top-k first and then the ReLU, so the extra
    slots hold negative pre-activations at value 0; sparsify applies the ReLU
    first, so its extra slots are arbitrary zeros. The positive part of the
    code, the reconstruction, the loss and every SAELens gradient agree; the ids of
    zero-valued slots need not (``fire_counts`` counts only slots with a value > 0).
    sparsify's encoder backward passes gradient through those zero-valued slots (no ReLU mask):
    its gradients are flash-sae's plus exactly that share (``sparsify_ungated_share``), which is
    checked here, and that the share is not zero in this draw.
    """
    B, D, F, k = 8, 24, 64, 8
    _, to_flash, trainer_loss = TRAINERS[trainer]
    x, p, upstream = draw(trainer, B, D, F, torch.float32, device, seed=7, b_enc_shift=-0.9)
    step = fs.topk_sae_step(x, **to_flash(p), k=k)
    zeros = (step.code.vals == 0).sum(1)
    assert (zeros > 0).any() and (zeros < k).any(), "the draw should give rows with some, not all, slots at zero"
    g = torch.autograd.grad(trainer_loss(step, x) * upstream, [x, *p.values()])
    mapped = to_flash(p)
    x_hat = fs.sparse_decode(step.code.vals, step.code.indices, mapped["W_dec"], mapped["b_dec"])
    ours = (trainer_loss(step, x), x_hat, step.code.vals, step.code.indices, dict(zip(p, g[1:])), g[0])
    check_against_trainer(trainer, ours, x, p, k, upstream, torch.float32, ungated=trainer == "sparsify")
    if trainer == "sparsify":
        xc, pc = x.cpu(), {n: t.cpu() for n, t in p.items()}  # the tests run sparsify on CPU tensors
        up = upstream.cpu() if torch.is_tensor(upstream) else upstream
        share = sparsify_ungated_share(pc, xc, TRAINERS[trainer][0](pc, xc, k)[3]["_run"], up)[0]
        assert share["encoder.weight"].abs().max() > 1e-3, "the draw should exercise sparsify's ungated slots"
    # fire_counts counts a latent only where it fired (value > 0), not the zero-valued slots.
    fired = torch.bincount(
        step.code.indices.reshape(-1), weights=(step.code.vals > 0).reshape(-1).double(), minlength=F
    ).long()
    assert torch.equal(step.fire_counts, fired)
    assert int(step.fire_counts.sum()) < B * k


@pytest.mark.kernels_ci
def test_mapping_helpers():
    """sparsify's helper only renames; SAELens's transposes W_enc and, by default, folds the decoder norms
    (W_enc and b_enc scaled by them, W_dec divided: the same reconstruction, the rescaled ranking);
    with ``rescale_acts_by_decoder_norm=False`` it only renames and transposes."""
    _, p, _ = draw("sparsify", 2, 5, 9, torch.float32, "cpu", seed=1)
    m = sparsify_to_flash(p)
    assert list(m) == ["W_enc", "b_enc", "W_dec", "b_dec"] and all(m[a] is p[b] for a, b in zip(m, p))
    _, p, _ = draw("saelens", 2, 5, 9, torch.float32, "cpu", seed=1)
    m = saelens_to_flash(p)
    n = p["W_dec"].norm(dim=1)
    torch.testing.assert_close(m["W_enc"], p["W_enc"].T * n[:, None])
    torch.testing.assert_close(m["b_enc"], p["b_enc"] * n)
    torch.testing.assert_close(m["W_dec"], p["W_dec"] / n[:, None])
    plain = saelens_to_flash(p, rescale_acts_by_decoder_norm=False)
    assert torch.equal(plain["W_enc"], p["W_enc"].T) and plain["W_dec"] is p["W_dec"] and plain["b_enc"] is p["b_enc"]
