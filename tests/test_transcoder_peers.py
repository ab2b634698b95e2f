"""The TopK step with a target against the installed sparsify's transcoder (``SparseCoderConfig(transcode=True)``,
its defaults otherwise): the same selection, FVU and gradients of its training loss (the FVU).

sparsify's transcoder encodes x without centring and reconstructs y, as ``target=`` does. Its loss is
sum (y - y_hat)^2 / total variance of y; flash-sae's step loss is the mean over B * D of the same squared
error, so the gradients agree after the factor B * D / total variance. Run on CPU tensors (sparsify's
forward autocasts CUDA tensors to bf16; see ``peers.sparsify_coder``).
"""

import pytest
import torch
from parity import rel_err
from peers import require, sparsify_coder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_transcoder_matches_sparsify(fs, dtype):
    B, D, F, k = 16, 24, 96, 5
    coder, _ = sparsify_coder(D, "cpu", dtype, num_latents=F, k=k, transcode=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        coder.encoder.weight.copy_(torch.randn(F, D, generator=g) / D**0.5)
        coder.encoder.bias.copy_(torch.randn(F, generator=g) * 0.1)
        coder.W_dec.copy_(torch.randn(F, D, generator=g) / D**0.5)  # its transcoder starts at 0; drawn here
        coder.b_dec.copy_(torch.randn(D, generator=g) * 0.1)
    x = torch.randn(B, D, generator=g).to(dtype)
    y = (torch.randn(B, D, generator=g) * 0.7).to(dtype)
    params = [coder.encoder.weight, coder.encoder.bias, coder.W_dec, coder.b_dec]

    theirs = coder(x, y)
    their_grads = torch.autograd.grad(theirs.fvu, params)

    ours_params = [p.detach().clone().requires_grad_() for p in params]
    ours = fs.topk_sae_step(x, *ours_params, k, target=y)
    total_variance = (y.float() - y.float().mean(0)).pow(2).sum()
    our_grads = torch.autograd.grad(ours.loss * (B * D) / total_variance, ours_params)

    theirs_sorted = theirs.latent_indices.sort(dim=1).values
    assert torch.equal(ours.code.indices.sort(dim=1).values, theirs_sorted), "a different selection"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.fvu, theirs.fvu.float(), rtol=tol, atol=0)
    for name, a, b in zip(("W_enc", "b_enc", "W_dec", "b_dec"), our_grads, their_grads):
        assert rel_err(a, b) <= tol, f"d{name}: {rel_err(a, b):.2e} from sparsify's"


def test_saelens_transcoders_load_but_do_not_train():
    """The README's architecture table: the installed SAELens has transcoder classes (to load and run them)
    and no training class for any of them."""
    import inspect

    transcoder = require("sae_lens.saes.transcoder")
    training_sae = require("sae_lens.saes.sae").TrainingSAE
    classes = [c for _, c in inspect.getmembers(transcoder, inspect.isclass) if c.__module__ == transcoder.__name__]
    assert any(c.__name__ == "Transcoder" for c in classes)
    assert not [c.__name__ for c in classes if issubclass(c, training_sae)]
