"""varlen_sae_loss: the fused loss over a variable-length code, the loss and every gradient vs fp64 (rows
of different lengths, empty rows, repeats, padding past the end); the steps' own codes; bad codes (the
contract checks: test_op_contract.py)."""

import pytest
import torch
from encoder_inputs import make_sae
from parity import DTYPES, assert_parity, grads
from test_varlen_sparse_decode import BAD_CODES, NAMES, bad_code, make_code


def check_varlen_loss(fs, problem, dtype, device, seed):
    counts, F, D, pad = problem
    vals, indices, offsets, weight, bias, target = make_code(counts, F, D, pad, dtype, device, seed=seed)
    ref = fs.testing.reference
    params = [vals, weight, bias, target]
    p64 = [t.detach().double().requires_grad_() for t in params]
    loss = fs.varlen_sae_loss(vals, indices, offsets, weight, bias, target)
    assert loss.dtype == torch.float32 and loss.shape == ()
    same = ref.varlen_sae_loss(vals, indices, offsets, weight, bias, target)
    r = ref.varlen_sae_loss(p64[0], indices, offsets, *p64[1:])
    assert_parity("varlen_sae_loss", loss, same, r, dtype)
    s = torch.tensor(-1.7 if seed % 2 else 0.6, device=device)
    ours = grads(loss, params, s)
    for name, a, b, c, p in zip(NAMES, ours, grads(same, params, s.to(dtype)), grads(r, p64, s.double()), params):
        assert a.dtype == p.dtype and a.shape == p.shape
        assert_parity(f"varlen_sae_loss d{name}", a, b, c, dtype)
    assert (ours[0][sum(counts) :] == 0).all(), "padding entries must get no gradient"


@pytest.mark.kernels_ci
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_sae_loss_edge_codes(fs, device, dtype):
    """All rows empty; one row holding everything with repeats."""
    check_varlen_loss(fs, ([0, 0, 0], 7, 5, 2), dtype, device, 1)
    check_varlen_loss(fs, ([0, 30, 0], 4, 33, 0), dtype, device, 2)


def test_varlen_sae_loss_on_the_steps_codes(fs, device):
    """The BatchTopK and JumpReLU steps' codes (padding with id -1 included) decode to the steps' own
    reconstruction: the loss equals the BatchTopK step's loss and the JumpReLU step's MSE bitwise."""
    params = list(make_sae(6, 33, 120, 1, torch.float32, device, seed=4))
    x, _, _, W_dec, b_dec = params
    step = fs.batchtopk_sae_step(*params, 5.5)
    loss = fs.varlen_sae_loss(step.code.vals, step.code.indices, step.code.row_offsets, W_dec, b_dec, x)
    assert torch.equal(loss, step.loss)
    threshold = torch.full((120,), 0.2, device=device)
    jump = fs.jumprelu_sae_step(*params, threshold, capacity=6 * 120)
    assert int(jump.code.row_offsets[-1]) < 6 * 120  # the code is padded
    loss = fs.varlen_sae_loss(jump.code.vals, jump.code.indices, jump.code.row_offsets, W_dec, b_dec, x)
    assert torch.equal(loss, jump.mse)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("change,match", BAD_CODES)
def test_varlen_sae_loss_rejects(fs, change, match):
    with pytest.raises(ValueError, match=match):
        fs.varlen_sae_loss(*bad_code(change))


@pytest.mark.kernels_ci
def test_varlen_sae_loss_rejects_target_and_empty_batch(fs):
    vals, indices, offsets, weight, bias, target = bad_code({})
    with pytest.raises(ValueError, match="target"):
        fs.varlen_sae_loss(vals, indices, offsets, weight, bias, target[:1])
    with pytest.raises(ValueError, match="target"):
        fs.varlen_sae_loss(vals, indices, offsets, weight, bias, target.double())
    with pytest.raises(ValueError, match="B = 0"):
        fs.varlen_sae_loss(vals, indices, torch.tensor([0]), weight, bias, target[:0])
