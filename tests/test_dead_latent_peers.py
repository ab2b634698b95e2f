"""flash-sae's AuxK against the installed trainers' own: SAELens's TopK and BatchTopK training SAEs and
EleutherAI sparsify's SparseCoder, each with its default configuration, the same parameters, inputs and
dead mask. Loss, auxiliary loss and every gradient by the parity rule, the trainer in fp64 being the
ground truth and the trainer in the same dtype torch's own error.

The mappings (the README states them), with ``dead_capacity`` at least the number of dead latents
(the trainers take all of them; flash-sae's default window, 2 * k_aux slots, may hold fewer):
- SAELens: ``aux_relu=False`` (it ranks and uses the raw dead pre-activations), ``aux_coef`` = its
  ``aux_loss_coefficient`` (1.0); its losses are D x flash-sae's (a sum over d_in, not a mean).
- sparsify: ``aux_relu=True``, ``aux_encoder_grad=False`` (its encoder's backward drops the gradient of
  the pre-activations the AuxK loss reads, so only W_dec learns from it), ``aux_coef`` = its trainer's
  ``auxk_alpha`` (0.0 by default: AuxK off; checked here at 1/32, the paper's); its losses are
  B * D / total variance x flash-sae's (its FVU normalisation).
"""

import pytest
import torch
from parity import assert_parity, rel_err
from peers import saelens_step, saelens_training_sae, sparsify_coder

NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


def _dead(F, n_dead, device):
    g = torch.Generator().manual_seed(n_dead)
    mask = torch.zeros(F, dtype=torch.bool)
    mask[torch.randperm(F, generator=g)[:n_dead]] = True
    return mask.to(device)


def _saelens(architecture, dtype, device, B, D, F, k, seed):
    sae = saelens_training_sae(architecture, dtype="float32", device=device, d_in=D, d_sae=F, k=k)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if architecture == "batchtopk":  # decoder rows of varied norm, so the rescaling matters
            sae.W_dec.mul_(torch.rand(F, 1, generator=g).to(device) * 2 + 0.5)
        # TopK keeps SAELens's init norms (all 0.1): its rescaled ranking then equals the plain one
        sae.W_enc.copy_(torch.randn(D, F, generator=g).to(device) / D**0.5)
        sae.b_enc.copy_(torch.randn(F, generator=g).to(device) * 0.1)
        sae.b_dec.copy_(torch.randn(D, generator=g).to(device) * 0.1)
    x = (torch.randn(B, D, generator=g) * 0.8).to(device=device, dtype=dtype)
    return sae.to(dtype), x


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_dead", [5, 40], ids=["few_dead", "many_dead"])
def test_auxk_matches_saelens(fs, device, architecture, dtype, n_dead):
    """k_aux = d_in // 2 = 12; 5 dead latents scale the loss by 5/12, 40 by 1."""
    B, D, F = 8, 24, 96
    k = 5 if architecture == "topk" else 5.5
    sae, x = _saelens(architecture, dtype, device, B, D, F, k, seed=n_dead)
    assert sae.cfg.rescale_acts_by_decoder_norm and sae.cfg.aux_loss_coefficient == 1.0
    dead = _dead(F, n_dead, device)
    theirs = saelens_step(sae, x, dead_neuron_mask=dead)
    their_aux = theirs.losses["auxiliary_reconstruction_loss"]
    assert float(their_aux) > 0
    their_grads = torch.autograd.grad(theirs.loss, [getattr(sae, n) for n in NAMES])

    sae64 = saelens_training_sae(architecture, d_in=D, d_sae=F, k=k, dtype="float64", device=device)
    with torch.no_grad():
        for n in NAMES:
            getattr(sae64, n).copy_(getattr(sae, n).double())
    ref = saelens_step(sae64, x.double(), dead_neuron_mask=dead)
    ref_grads = torch.autograd.grad(ref.loss, [getattr(sae64, n) for n in NAMES])

    params = [getattr(sae, n).detach().clone().requires_grad_() for n in NAMES]
    W_enc_t, b_enc, W_dec, b_dec = params
    # every dead latent in the dead set (its default, 2 * k_aux = 24 slots, holds fewer than 40)
    opts = dict(dead_loss=fs.DeadLatentLoss(dead, relu=False, coef=sae.cfg.aux_loss_coefficient, capacity=F))
    if architecture == "topk":
        out = fs.topk_sae_step(x, W_enc_t.T, b_enc, W_dec, b_dec, k, **opts)
    else:
        out = fs.batchtopk_sae_step(x, W_enc_t.T, b_enc, W_dec, b_dec, k, rescale_acts_by_decoder_norm=True, **opts)
    our_grads = torch.autograd.grad(D * out.loss, params)
    what = f"saelens {architecture} auxk"
    assert_parity(f"{what} aux loss", D * out.aux_loss, their_aux, ref.losses["auxiliary_reconstruction_loss"], dtype)
    assert_parity(f"{what} loss", D * out.loss, theirs.loss, ref.loss, dtype)
    for n, a, b, c in zip(NAMES, our_grads, their_grads, ref_grads):
        assert a.shape == b.shape, f"d{n} has the wrong layout"
        assert_parity(f"{what} d{n}", a, b, c, dtype)


def _sparsify(dtype, D, F, k, seed):
    """sparsify's coder with drawn values (CPU; see peers.sparsify_coder), and x."""
    coder, train_cfg = sparsify_coder(D, "cpu", dtype, num_latents=F, k=k)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        coder.encoder.weight.copy_(torch.randn(F, D, generator=g) / D**0.5)
        coder.encoder.bias.copy_(torch.randn(F, generator=g) * 0.1)
        w = torch.randn(F, D, generator=g)
        coder.W_dec.copy_(w / w.norm(dim=1, keepdim=True))  # unit rows, as its normalize_decoder keeps them
        coder.b_dec.copy_(torch.randn(D, generator=g) * 0.1)
    return coder, train_cfg


def _sparsify_params(coder):
    return [coder.encoder.weight, coder.encoder.bias, coder.W_dec, coder.b_dec]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_dead", [5, 40], ids=["few_dead", "many_dead"])
def test_auxk_matches_sparsify(fs, dtype, n_dead):
    """On CPU tensors (sparsify's forward autocasts CUDA tensors to bf16, so a CUDA fp64 run would not
    be a ground truth): sparsify's auxk_loss and the gradients of fvu + alpha * auxk_loss."""
    B, D, F, k = 16, 24, 96, 4
    coder, train_cfg = _sparsify(dtype, D, F, k, seed=n_dead)
    assert train_cfg.auxk_alpha == 0.0 and train_cfg.dead_feature_threshold == 10_000_000
    alpha = 1 / 32
    dead = _dead(F, n_dead, "cpu")
    x = (torch.randn(B, D, generator=torch.Generator().manual_seed(7)) * 0.8).to(dtype)

    def theirs_of(c, xx):
        out = c(xx, dead_mask=dead)
        total = out.fvu + alpha * out.auxk_loss
        return out, total, torch.autograd.grad(total, _sparsify_params(c))

    out, total, their_grads = theirs_of(coder, x)
    assert float(out.auxk_loss) > 0
    coder64, _ = _sparsify(torch.float64, D, F, k, seed=n_dead)
    with torch.no_grad():
        for a, b in zip(_sparsify_params(coder64), _sparsify_params(coder)):
            a.copy_(b.double())
    ref, ref_total, ref_grads = theirs_of(coder64, x.double())

    params = [p.detach().clone().requires_grad_() for p in _sparsify_params(coder)]
    dead_loss = fs.DeadLatentLoss(dead, relu=True, encoder_grad=False, coef=alpha, capacity=F)
    ours = fs.topk_sae_step(x, *params, k, dead_loss=dead_loss)
    x64 = x.double()
    factor = B * D / (x64 - x64.mean(0)).pow(2).sum()
    names = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
    assert_parity("sparsify auxk_loss", factor * ours.aux_loss, out.auxk_loss, ref.auxk_loss, dtype)
    assert_parity("sparsify fvu + alpha * auxk", factor * ours.loss, total, ref_total, dtype)
    our_grads = torch.autograd.grad(ours.loss, params)
    for n, a, b, c in zip(names, our_grads, their_grads, ref_grads):
        assert_parity(f"sparsify auxk d{n}", factor * a.double(), b, c, dtype)
    # What aux_encoder_grad=False reproduces: sparsify's AuxK leaves the encoder's gradients alone.
    plain = torch.autograd.grad(coder64(x.double()).fvu, _sparsify_params(coder64))
    assert rel_err(ref_grads[0], plain[0]) < 1e-12 and rel_err(ref_grads[2], plain[2]) > 1e-6
