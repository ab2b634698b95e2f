"""Every rejected input raises ValueError naming the argument; nothing crashes or reads out of bounds."""

import pytest
import torch
from parity import LOSS_OPS, make_inputs

ALL_OPS = LOSS_OPS + ("sparse_decode",)


def _call(fs, op, indices, weight, vals, bias, target, **kw):
    if op == "sparse_decode":
        return fs.sparse_decode(indices, vals, weight, bias, **kw)
    return getattr(fs, op)(indices, weight, vals, bias, target, **kw)


def _good(device, dtype=torch.float32):
    return [t.detach() if t.is_floating_point() else t for t in make_inputs(4, 3, 11, 9, dtype, device, seed=1)]


# (description, argument named in the message, how to break the good inputs)
BREAKS = [
    ("indices 1-D", "indices", lambda a: a.__setitem__(0, a[0].reshape(-1))),
    ("indices float", "indices", lambda a: a.__setitem__(0, a[0].float())),
    ("indices int16", "indices", lambda a: a.__setitem__(0, a[0].to(torch.int16))),
    ("indices not a tensor", "indices", lambda a: a.__setitem__(0, a[0].tolist())),
    ("weight 3-D", "weight", lambda a: a.__setitem__(1, a[1].unsqueeze(0))),
    ("weight float64", "weight", lambda a: a.__setitem__(1, a[1].double())),
    ("weight int", "weight", lambda a: a.__setitem__(1, a[1].int())),
    ("weight no columns", "weight", lambda a: a.__setitem__(1, a[1][:, :0])),
    ("vals wrong shape", "vals", lambda a: a.__setitem__(2, a[2][:, :2])),
    ("vals dtype", "vals", lambda a: a.__setitem__(2, a[2].half())),
    ("bias wrong shape", "bias", lambda a: a.__setitem__(3, a[3][:5])),
    ("bias dtype", "bias", lambda a: a.__setitem__(3, a[3].bfloat16())),
    ("bias 2-D", "bias", lambda a: a.__setitem__(3, a[3][None])),
    ("K > F", "K must be <= F", lambda a: a.__setitem__(1, a[1][:2])),
    ("other device", "on meta", lambda a: a.__setitem__(2, a[2].to("meta"))),
]
LOSS_BREAKS = [
    ("target wrong shape", "target", lambda a: a.__setitem__(4, a[4][:, :3])),
    ("target dtype", "target", lambda a: a.__setitem__(4, a[4].half())),
    ("target on other device", "on meta", lambda a: a.__setitem__(4, a[4].to("meta"))),
    ("empty batch", "empty batch", lambda a: [a.__setitem__(i, a[i][:0]) for i in (0, 2, 4)]),
    ("K = 0", "K = 0", lambda a: [a.__setitem__(i, a[i][:, :0]) for i in (0, 2)]),
]


@pytest.mark.kernels_ci
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("what,match,breaker", BREAKS, ids=[b[0] for b in BREAKS])
def test_rejects(fs, device, op, what, match, breaker):
    args = _good(device)
    breaker(args)
    with pytest.raises(ValueError, match=match):
        _call(fs, op, *args)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("op", LOSS_OPS)
@pytest.mark.parametrize("what,match,breaker", LOSS_BREAKS, ids=[b[0] for b in LOSS_BREAKS])
def test_loss_rejects(fs, device, op, what, match, breaker):
    args = _good(device)
    breaker(args)
    with pytest.raises(ValueError, match=match):
        _call(fs, op, *args)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("bad", [-1, 11, 2**40])
def test_out_of_range_index_is_checked(fs, device, op, bad):
    args = _good(device)
    args[0] = args[0].clone()
    args[0][2, 1] = bad
    with pytest.raises(ValueError, match=r"indices must lie in \[0, F=11\)"):
        _call(fs, op, *args, validate=True)
    if device == "cpu":  # the default validates CPU tensors (no device sync involved)
        with pytest.raises(ValueError, match="indices must lie"):
            _call(fs, op, *args)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("op", ALL_OPS)
def test_unvalidated_out_of_range_poisons_with_nan(fs, device, op):
    """With validate=False a bad id never reads out of bounds: the result is NaN, not silently wrong."""
    args = _good(device)
    args[0] = args[0].clone()
    args[0][2, 1] = 10**6
    weight = args[1].clone().requires_grad_()
    args[1] = weight
    out = _call(fs, op, *args, validate=False)
    if op == "sparse_decode":
        assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3]]).all()
        out = out.sum()
    else:
        assert torch.isnan(out)
    (dweight,) = torch.autograd.grad(out, [weight])
    assert dweight.shape == weight.shape


@pytest.mark.kernels_ci
@pytest.mark.parametrize("op", ALL_OPS)
def test_validate_must_be_bool(fs, device, op):
    with pytest.raises(ValueError, match="validate"):
        _call(fs, op, *_good(device), validate="yes")


@pytest.mark.kernels_ci
@pytest.mark.parametrize("op", ALL_OPS)
def test_non_contiguous_inputs_are_handled(fs, device, op):
    """Strided views give the same result and gradients as contiguous copies."""
    indices, weight, vals, bias, target = _good(device)
    wide = [torch.stack([t, t], -1)[..., 0] for t in (indices, weight, vals, target)]
    assert not any(t.is_contiguous() for t in wide)
    w_view = wide[1].requires_grad_()
    w_copy = weight.clone().requires_grad_()
    out_view = _call(fs, op, wide[0], w_view, wide[2], bias, wide[3])
    out_copy = _call(fs, op, indices, w_copy, vals, bias, target)
    torch.testing.assert_close(out_view, out_copy, rtol=0, atol=0)
    g = torch.ones_like(out_copy)
    torch.testing.assert_close(
        torch.autograd.grad(out_view, [w_view], g)[0], torch.autograd.grad(out_copy, [w_copy], g)[0], rtol=0, atol=0
    )
