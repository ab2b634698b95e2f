"""Switching trainers: flash-sae reproduces the TopK step of SAELens and of EleutherAI's sparsify.

Neither package is imported: each one's TopK forward and training loss is
restated below in plain torch, on that trainer's own parameter names and
layouts (the keys of its ``state_dict``). The helpers that map those
parameters to flash-sae's arguments, and flash-sae's loss to the trainer's,
are taken from the README's code blocks (``readme_helpers``), so the README
shows exactly what is tested.

What is checked, for fp32 and bf16, under a random upstream scale:
- the trainer's loss, rebuilt from ``topk_sae_step``'s mean squared error with
  the normalisation factor written out (SAELens: x D; sparsify: x B*D / total
  variance, which is its FVU);
- the reconstruction, the sparse code and every gradient, read in the
  trainer's own layout (autograd carries ``W_enc.T`` back to SAELens's
  [d_in, d_sae] matrix; ``fs.SparseAutoencoder``'s gradients are mapped back
  by hand), all under tests/parity.py's rule against the fp64 restatement;
- the selection: in fp32 (continuous random data, no ties) flash-sae picks the
  same latents as the restatement in fp32 and in fp64. In bf16 the
  restatement rounds its pre-activations differently (matmul, then the bias
  add), so near-ties may resolve differently: there every value is compared
  at flash-sae's own selection, and the selection is checked to be a top-k of
  the fp64 pre-activations up to bf16 rounding.
"""

import ast
import re
from pathlib import Path

import pytest
import torch
from parity import assert_parity

# SAELens: TopK SAE ------------------------------------------------------------------


def saelens_forward(p, x, k, indices=None):
    """SAELens's TopK SAE: top-k of ``(x - b_dec) @ W_enc + b_enc``, ReLU, dense decode, MSE summed over d_in.

    ``p`` holds SAELens's tensors: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
    Returns (loss, x_hat, dense feature activations [B, d_sae], pre-activations); ``indices`` forces the selection.
    """
    hidden_pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if indices is None:
        indices = hidden_pre.detach().topk(k, dim=-1).indices
    feature_acts = torch.zeros_like(hidden_pre).scatter(-1, indices, hidden_pre.gather(-1, indices).relu())
    x_hat = feature_acts @ p["W_dec"] + p["b_dec"]
    loss = (x_hat - x).pow(2).sum(-1).mean()
    return loss, x_hat, feature_acts, hidden_pre


# sparsify: SparseCoder --------------------------------------------------------------


def sparsify_forward(p, x, k, indices=None):
    """sparsify's SparseCoder: top-k of ``relu(encoder(x - b_dec))``, decode ``sum acts * W_dec[ids] + b_dec``.

    ``p`` holds sparsify's tensors: encoder.weight [F, D], encoder.bias [F], W_dec [F, D], b_dec [D].
    The training loss is the FVU, sum((x_hat - x)^2) / sum((x - mean_b x)^2).
    Returns (fvu, x_hat, dense activations [B, F], pre-activations); ``indices`` forces the selection.
    """
    pre = torch.nn.functional.linear(x - p["b_dec"], p["encoder.weight"], p["encoder.bias"])
    acts = torch.relu(pre)
    if indices is None:
        top_acts, indices = acts.topk(k, dim=-1, sorted=False)
    else:
        top_acts = acts.gather(-1, indices)
    x_hat = (top_acts.unsqueeze(-1) * p["W_dec"][indices]).sum(1) + p["b_dec"]
    fvu = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    return fvu, x_hat, torch.zeros_like(pre).scatter(-1, indices, top_acts), pre


# The README's helpers -----------------------------------------------------------------


def readme_helpers(names=("saelens_to_flash", "saelens_loss", "sparsify_to_flash", "sparsify_loss")):
    """The helper functions as the README writes them: every ``def`` of its python code blocks, run."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    found = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        defs = [node for node in ast.parse(block).body if isinstance(node, ast.FunctionDef) and node.name in names]
        if defs:
            exec(compile(ast.Module(body=defs, type_ignores=[]), "README.md", "exec"), {"torch": torch}, found)
    missing = set(names) - set(found)
    assert not missing, f"README.md no longer defines {sorted(missing)}"
    return [found[n] for n in names]


saelens_to_flash, saelens_loss, sparsify_to_flash, sparsify_loss = readme_helpers()

TRAINERS = {
    "saelens": (saelens_forward, saelens_to_flash, saelens_loss),
    "sparsify": (sparsify_forward, sparsify_to_flash, sparsify_loss),
}


def flash_grads_to_trainer(trainer, grads):
    """Gradients of flash-sae's parameters [W_enc, b_enc, W_dec, b_dec] in the trainer's layout, by its names."""
    dW_enc, db_enc, dW_dec, db_dec = grads
    if trainer == "saelens":
        return {"W_enc": dW_enc.T, "b_enc": db_enc, "W_dec": dW_dec, "b_dec": db_dec}
    return {"encoder.weight": dW_enc, "encoder.bias": db_enc, "W_dec": dW_dec, "b_dec": db_dec}


# Drawing a problem ------------------------------------------------------------------


def draw(trainer, B, D, F, dtype, device, *, seed, b_enc_shift=0.0):
    """x [B, D] and the trainer's parameters, continuous random values (ties have probability ~0 in fp32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g) * 0.8 + 0.3 * torch.randn(D, generator=g)
    W_enc = torch.randn(F, D, generator=g) / D**0.5
    b_enc = torch.randn(F, generator=g) * 0.1 + b_enc_shift
    W_dec = torch.randn(F, D, generator=g) / D**0.5
    b_dec = torch.randn(D, generator=g) * 0.2
    if trainer == "saelens":
        p = {"W_enc": W_enc.T.contiguous(), "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    else:
        p = {"encoder.weight": W_enc, "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    upstream = (torch.rand((), generator=g).item() + 0.5) * (1 if seed % 2 else -1)
    cast = lambda t: t.to(device=device, dtype=dtype).requires_grad_()
    return cast(x), {name: cast(t) for name, t in p.items()}, upstream


def fp64(x, p):
    return x.detach().double().requires_grad_(), {n: t.detach().double().requires_grad_() for n, t in p.items()}


def dense(vals, indices, F):
    return torch.zeros(vals.shape[0], F, dtype=vals.dtype, device=vals.device).scatter(1, indices, vals)


def check_selection(indices, pre64, dtype, k):
    """``indices`` is a top-k of every row of the fp64 pre-activations, up to the dtype's rounding of them."""
    picked = torch.zeros_like(pre64, dtype=torch.bool).scatter(1, indices.long(), True)
    lowest_picked = pre64.masked_fill(~picked, float("inf")).min(1).values
    highest_left = pre64.masked_fill(picked, float("-inf")).max(1).values
    # flash-sae selects on pre-activations computed in ``dtype``: x - b_dec and the GEMM's output are each
    # rounded once (half an eps, relative). Two eps of the row's largest |pre| bounds both with room to spare.
    slack = 2 * torch.finfo(dtype).eps * pre64.abs().max(1).values
    assert (lowest_picked >= highest_left - slack).all(), "flash-sae's selection is not a top-k of the pre-activations"
    assert indices.shape[1] == k and (picked.sum(1) == k).all(), "a row picked the same latent twice"


def their_results(trainer, x, p, k, upstream, indices=None):
    """The restatement's (loss, x_hat, dense code, pre, gradients by name, d x) at ``indices`` or its own choice."""
    forward = TRAINERS[trainer][0]
    loss, x_hat, code, pre = forward(p, x, k, indices)
    names = list(p)
    g = torch.autograd.grad(loss * upstream, [x, *p.values()])
    return loss, x_hat, code, pre, dict(zip(names, g[1:])), g[0]


def check_against_restatement(trainer, ours, x, p, k, upstream, dtype):
    """``ours`` = (loss, x_hat, vals, indices, grads by name, dx), in the trainer's terms, by the parity rule."""
    loss, x_hat, vals, indices, grads, dx = ours
    F = p["W_dec"].shape[0]
    x64, p64 = fp64(x, p)
    if dtype == torch.float32:
        # No ties in continuous fp32 data: the restatement's own selection, in fp32 and in fp64, is flash-sae's.
        same = their_results(trainer, x, p, k, upstream)
        ref = their_results(trainer, x64, p64, k, upstream)
        # Compared on the positive part of the code: sparsify's zero-valued slots hold arbitrary ids.
        ours_support = dense(vals, indices, F) != 0
        assert torch.equal(ours_support, same[2] != 0), "flash-sae picked other latents than the fp32 restatement"
        assert torch.equal(ours_support, ref[2] != 0), "flash-sae picked other latents than the fp64 restatement"
    else:
        same = their_results(trainer, x, p, k, upstream, indices)
        ref = their_results(trainer, x64, p64, k, upstream, indices)
        check_selection(indices, ref[3].detach(), dtype, k)
    assert_parity(f"{trainer} loss", loss, same[0], ref[0], dtype)
    assert_parity(f"{trainer} x_hat", x_hat, same[1], ref[1], dtype)
    assert_parity(f"{trainer} code", dense(vals, indices, F), same[2], ref[2], dtype)
    assert_parity(f"{trainer} dx", dx, same[5], ref[5], dtype)
    for name in p:
        assert grads[name].shape == p[name].shape, f"{trainer} d{name} has the wrong layout"
        assert_parity(f"{trainer} d{name}", grads[name], same[4][name], ref[4][name], dtype)
    return same, ref


DTYPES = (torch.float32, torch.bfloat16)


# Tests ------------------------------------------------------------------------------


@pytest.mark.kernels_ci
@pytest.mark.parametrize("trainer", sorted(TRAINERS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_sae_step_reproduces_trainer(fs, device, trainer, dtype):
    """The functional swap: ``topk_sae_step(x, **to_flash(params), k=k)`` with the trainer's loss factor."""
    B, D, F, k = 8, 40, 96, 6
    _, to_flash, trainer_loss = TRAINERS[trainer]
    x, p, upstream = draw(trainer, B, D, F, dtype, device, seed=3 if dtype == torch.float32 else 4)
    step = fs.topk_sae_step(x, **to_flash(p), k=k)
    assert (step.vals > 0).all(), "the draw should give k positive pre-activations per row"
    loss = trainer_loss(step, x)
    # Autograd carries the gradients through the mapping (W_enc.T) into the trainer's own tensors.
    g = torch.autograd.grad(loss * upstream, [x, *p.values()])
    x_hat = fs.sparse_decode(step.vals, step.indices, p["W_dec"], p["b_dec"])
    ours = (loss, x_hat, step.vals, step.indices, dict(zip(p, g[1:])), g[0])
    same, ref = check_against_restatement(trainer, ours, x, p, k, upstream, dtype)
    if trainer == "sparsify":
        # step.fvu is sparsify's loss value (computed without a host sync, not differentiable).
        assert_parity("sparsify fvu", step.fvu, same[0], ref[0], dtype)
    counts = torch.bincount(step.indices.reshape(-1), weights=(step.vals > 0).reshape(-1).double(), minlength=F)
    assert torch.equal(step.fire_counts, counts.long())


@pytest.mark.kernels_ci
@pytest.mark.parametrize("trainer", sorted(TRAINERS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_autoencoder_loads_trainer_checkpoint(fs, device, trainer, dtype):
    """The module swap: ``fs.SparseAutoencoder.load_state_dict(to_flash(state_dict))``; grads mapped back by hand."""
    B, D, F, k = 7, 33, 70, 5
    _, to_flash, trainer_loss = TRAINERS[trainer]
    x, p, upstream = draw(trainer, B, D, F, dtype, device, seed=5 if dtype == torch.float32 else 6)
    sae = fs.SparseAutoencoder(D, F, k, dtype=dtype, device=device, seed=0)
    sae.load_state_dict({name: t.detach() for name, t in to_flash(p).items()})
    for name, t in to_flash(p).items():
        assert torch.equal(getattr(sae, name), t), f"load_state_dict changed {name}"

    step = sae.loss(x)
    assert (step.vals > 0).all()
    (trainer_loss(step, x) * upstream).backward()
    dx = x.grad
    grads = flash_grads_to_trainer(trainer, [sae.W_enc.grad, sae.b_enc.grad, sae.W_dec.grad, sae.b_dec.grad])
    with torch.no_grad():
        x_hat = sae(x)
        vals, indices = sae.encode(x)
    assert torch.equal(indices, step.indices) and torch.equal(vals, step.vals), "encode and loss chose other codes"
    ours = (trainer_loss(step, x), x_hat, vals, indices, grads, dx)
    check_against_restatement(trainer, ours, x, p, k, upstream, dtype)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_rows_with_fewer_than_k_positive_preactivations(fs, device, trainer):
    """A negative encoder bias leaves rows with fewer than k positive pre-activations.

    flash-sae and SAELens take the top-k first and then the ReLU, so the extra
    slots hold negative pre-activations at value 0; sparsify applies the ReLU
    first, so its extra slots are arbitrary zeros. The positive part of the
    code, the reconstruction, the loss and every gradient agree; the ids of
    zero-valued slots need not (``fire_counts`` counts only slots with a value > 0).
    """
    B, D, F, k = 8, 24, 64, 8
    _, to_flash, trainer_loss = TRAINERS[trainer]
    x, p, upstream = draw(trainer, B, D, F, torch.float32, device, seed=7, b_enc_shift=-0.9)
    step = fs.topk_sae_step(x, **to_flash(p), k=k)
    zeros = (step.vals == 0).sum(1)
    assert (zeros > 0).any() and (zeros < k).any(), "the draw should give rows with some, not all, slots at zero"
    g = torch.autograd.grad(trainer_loss(step, x) * upstream, [x, *p.values()])
    x_hat = fs.sparse_decode(step.vals, step.indices, p["W_dec"], p["b_dec"])
    ours = (trainer_loss(step, x), x_hat, step.vals, step.indices, dict(zip(p, g[1:])), g[0])
    check_against_restatement(trainer, ours, x, p, k, upstream, torch.float32)
    # fire_counts counts a latent only where it fired (value > 0), not the zero-valued slots.
    fired = torch.bincount(step.indices.reshape(-1), weights=(step.vals > 0).reshape(-1).double(), minlength=F).long()
    assert torch.equal(step.fire_counts, fired)
    assert int(step.fire_counts.sum()) < B * k
    if trainer == "saelens":
        # Same selection rule: the zero-valued slots are the same latents too.
        pre = saelens_forward(p, x, k)[3].detach()
        assert torch.equal(step.indices, torch.sort(pre, dim=1, descending=True, stable=True).indices[:, :k])


@pytest.mark.kernels_ci
def test_mapping_helpers_round_trip():
    """The helpers only rename and transpose: mapping back with the gradient helper restores every tensor."""
    for trainer in TRAINERS:
        _, p, _ = draw(trainer, 2, 5, 9, torch.float32, "cpu", seed=1)
        m = TRAINERS[trainer][1](p)
        assert list(m) == ["W_enc", "b_enc", "W_dec", "b_dec"]
        assert tuple(m["W_enc"].shape) == (9, 5) and tuple(m["W_dec"].shape) == (9, 5)
        back = flash_grads_to_trainer(trainer, list(m.values()))
        assert set(back) == set(p) and all(torch.equal(back[n], p[n]) for n in p)
