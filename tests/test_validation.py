"""Every rejected input raises ValueError naming the argument; nothing crashes or reads out of bounds."""

import warnings

import numpy as np
import pytest
import torch
from parity import LOSS_OPS, make_inputs

ALL_OPS = LOSS_OPS + ("sparse_decode",)


def _call(fs, op, indices, weight, vals, bias, target, **kw):
    if op == "sparse_decode":
        return fs.sparse_decode(vals, indices, weight, bias, **kw)
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


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("what,match,breaker", BREAKS, ids=[b[0] for b in BREAKS])
def test_rejects(fs, device, op, what, match, breaker):
    args = _good(device)
    breaker(args)
    with pytest.raises(ValueError, match=match):
        _call(fs, op, *args)


@pytest.mark.parametrize("op", LOSS_OPS)
@pytest.mark.parametrize("what,match,breaker", LOSS_BREAKS, ids=[b[0] for b in LOSS_BREAKS])
def test_loss_rejects(fs, device, op, what, match, breaker):
    args = _good(device)
    breaker(args)
    with pytest.raises(ValueError, match=match):
        _call(fs, op, *args)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", ALL_OPS)
def test_unvalidated_out_of_range_poisons_with_nan(fs, device, op, dtype):
    """With validate=False a bad id never reads out of bounds, and the damage is visible, as documented:
    the bad entry's output row is NaN (so a loss is NaN). The bad entry adds to no weight row.
    sparse_decode (finite upstream gradient): every gradient is finite, the bad entry's dvals is 0
    and the rest equal the gradients without it. The losses (NaN residual in that row): the
    gradients of that row's entries are NaN, and so are the weight rows of its latents; every
    other gradient entry is finite. In bf16 too: the kernels' rounding to bf16 must keep a NaN a NaN
    (on the GPU, arithmetic on a NaN yields the payload 0x7FFFFFFF, which a bare round-to-nearest-even
    carries into -0.0)."""
    args = _good(device, dtype)
    args[0] = args[0].clone()
    args[0][2, 1] = 10**6
    weight = args[1].clone().requires_grad_()
    vals = args[2].clone().requires_grad_()
    args[1], args[2] = weight, vals
    out = _call(fs, op, *args, validate=False)
    if op == "sparse_decode":
        assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3]]).all()
        out = out.sum()
    else:
        assert torch.isnan(out)
    dweight, dvals = torch.autograd.grad(out, [weight, vals])
    assert dweight.shape == weight.shape and dvals.shape == vals.shape
    shares_row2 = torch.zeros(weight.shape[0], dtype=torch.bool, device=device)
    shares_row2[args[0][2][[0, 2]]] = True
    if op == "sparse_decode":
        # The upstream gradient is finite: every valid entry's gradient is exact, the bad one adds nothing.
        assert torch.isfinite(dweight).all() and torch.isfinite(dvals).all()
        assert dvals[2, 1] == 0, "the bad entry's dvals must be 0"
        valid = args[0].clone()
        valid[2, 1] = args[0][2, 0]  # any valid id, with value 0 below: the same as leaving the entry out
        v0 = vals.detach().clone()
        v0[2, 1] = 0
        w = weight.detach().clone().requires_grad_()
        (ref,) = torch.autograd.grad(fs.sparse_decode(v0, valid, w, args[3]).sum(), [w])
        torch.testing.assert_close(dweight, ref, rtol=1e-6, atol=1e-6)
    else:
        assert torch.isnan(dweight[shares_row2]).all(), "latents of the poisoned row must get NaN gradients"
        assert torch.isfinite(dweight[~shares_row2]).all(), "latents outside the poisoned row must stay finite"
        assert torch.isnan(dvals[2, [0, 2]]).all() and torch.isfinite(dvals[[0, 1, 3]]).all()


@pytest.mark.kernels_ci
def test_sparse_decode_swapped_code_is_named(fs, device):
    """flash-sae's own API takes a code as (vals, indices); the old order is caught, not misread."""
    indices, weight, vals, bias, _ = _good(device)
    with pytest.raises(ValueError, match="vals and indices look swapped"):
        fs.sparse_decode(indices, vals, weight, bias)


@pytest.mark.parametrize("op", ALL_OPS)
def test_validate_must_be_bool(fs, device, op):
    with pytest.raises(ValueError, match="validate"):
        _call(fs, op, *_good(device), validate="yes")


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


# The encoder and the full step ------------------------------------------------------


def _sae_args(device):
    """x, W_enc, b_enc, W_dec, b_dec, k: a valid small step."""
    g = torch.Generator().manual_seed(3)
    D, F = 9, 13
    return [
        torch.randn(4, D, generator=g).to(device),
        torch.randn(F, D, generator=g).to(device),
        torch.randn(F, generator=g).to(device),
        torch.randn(F, D, generator=g).to(device),
        torch.randn(D, generator=g).to(device),
        3,
    ]


def _set(i, f):
    return lambda a: a.__setitem__(i, f(a[i]))


# (description, text the message must contain, how to break the good arguments)
SAE_BREAKS = [
    ("x 1-D", "x must be 2-D", _set(0, lambda t: t.reshape(-1))),
    ("x float64", "x must have dtype", _set(0, lambda t: t.double())),
    ("x int", "x must have dtype", _set(0, lambda t: t.int())),
    ("x not a tensor", "x must be a torch.Tensor", _set(0, lambda t: t.tolist())),
    ("empty batch", "empty batch", _set(0, lambda t: t[:0])),
    ("W_enc wrong width", r"x has D=9 columns but W_enc \(13, 5\) expects D=5", _set(1, lambda t: t[:, :5])),
    (
        "x wrong width",
        r"x has D=5 columns but W_enc \(13, 9\) expects D=9: x must have shape \(B, 9\)",
        _set(0, lambda t: t[:, :5]),
    ),  # fmt: skip
    (
        "x 3-D",
        r"x must be 2-D, got shape \(2, 2, 9\); .*x.reshape\(-1, 9\) \(x.flatten\(0, -2\)\)",
        _set(0, lambda t: t.reshape(2, 2, 9)),
    ),  # fmt: skip
    ("W_enc 3-D", "W_enc must be 2-D", _set(1, lambda t: t[None])),
    (
        "W_enc dtype",
        r"x has dtype torch.float32 but W_enc has torch.float16.*cast x with .to\(W_enc.dtype\)",
        _set(1, lambda t: t.half()),
    ),
    ("b_enc wrong length", "b_enc must have shape", _set(2, lambda t: t[:4])),
    ("b_enc dtype", "b_enc has dtype", _set(2, lambda t: t.bfloat16())),
    ("b_dec wrong length", "b_dec must have shape", _set(4, lambda t: t[:2])),
    ("b_dec on another device", "on meta", _set(4, lambda t: t.to("meta"))),
    ("k > F", "k must lie in", _set(5, lambda k: 14)),
    ("k = 0", "k must lie in", _set(5, lambda k: 0)),
    ("k negative", "k must lie in", _set(5, lambda k: -1)),
    ("k float", "k must be an int", _set(5, lambda k: 3.0)),
    ("k bool", "k must be an int", _set(5, lambda k: True)),
    ("k tensor", "k must be an int", _set(5, lambda k: torch.tensor(3))),
]
STEP_BREAKS = [
    ("W_dec wrong shape", "W_dec must have W_enc's shape", _set(3, lambda t: t[:5])),
    ("W_dec dtype", "W_dec has dtype", _set(3, lambda t: t.half())),
    ("W_dec on another device", "on meta", _set(3, lambda t: t.to("meta"))),
    ("b_dec None", "b_dec must be a", _set(4, lambda t: None)),
]


@pytest.mark.parametrize("what,match,breaker", SAE_BREAKS, ids=[b[0] for b in SAE_BREAKS])
def test_topk_encode_rejects(fs, device, what, match, breaker):
    args = _sae_args(device)
    breaker(args)
    x, W_enc, b_enc, _, b_dec, k = args
    with pytest.raises(ValueError, match=match):
        fs.topk_encode(x, W_enc, b_enc, k, b_dec)


@pytest.mark.parametrize("what,match,breaker", SAE_BREAKS + STEP_BREAKS, ids=[b[0] for b in SAE_BREAKS + STEP_BREAKS])
def test_topk_sae_step_rejects(fs, device, what, match, breaker):
    args = _sae_args(device)
    breaker(args)
    with pytest.raises(ValueError, match=match):
        fs.topk_sae_step(*args)


BATCH_K_BREAKS = [
    ("k bool", "k must be an int or a float", _set(5, lambda k: True)),
    ("k string", "k must be an int or a float", _set(5, lambda k: "3")),
    ("k zero", "k must give 1 <= int", _set(5, lambda k: 0)),
    ("k too small for the batch", "k must give 1 <= int", _set(5, lambda k: 0.1)),
    ("k beyond the batch", "k must give 1 <= int", _set(5, lambda k: 14)),
    ("k nan", "k must be a finite number, got k=nan", _set(5, lambda k: float("nan"))),
    ("k inf", "k must be a finite number, got k=inf", _set(5, lambda k: float("inf"))),
]
# The encoder's and step's own checks, minus the per-row k rules (BatchTopK has its own; JumpReLU none).
STEP_ONLY_BREAKS = [b for b in SAE_BREAKS + STEP_BREAKS if not b[0].startswith("k ")]
BATCH_BREAKS = STEP_ONLY_BREAKS + BATCH_K_BREAKS


@pytest.mark.parametrize("what,match,breaker", BATCH_BREAKS, ids=[b[0] for b in BATCH_BREAKS])
def test_batchtopk_sae_step_rejects(fs, device, what, match, breaker):
    args = _sae_args(device)
    breaker(args)
    with pytest.raises(ValueError, match=match):
        fs.batchtopk_sae_step(*args)


def _jumprelu_call(fs, device, **overrides):
    x, W_enc, b_enc, W_dec, b_dec, _ = _sae_args(device)
    kw = dict(threshold=torch.full((W_enc.shape[0],), 0.1, device=device), capacity=20)
    kw.update(overrides)
    return fs.jumprelu_sae_step(x, W_enc, b_enc, W_dec, b_dec, kw.pop("threshold"), **kw)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(threshold=torch.zeros(5)), r"threshold must have shape \(13,\)"),
        (dict(threshold=torch.zeros(13, 1)), "threshold must be 1-D"),
        (dict(threshold=torch.zeros(13, dtype=torch.int64)), "threshold must have dtype"),
        (dict(threshold=torch.zeros(13, device="meta")), "on meta"),
        (dict(capacity=0), "capacity must lie in"),
        (dict(capacity=4 * 13 + 1), "capacity must lie in"),
        (dict(capacity=2.0), "capacity must be an int"),
        (dict(bandwidth=0.0), "bandwidth must be a positive number"),
        (dict(bandwidth=-1), "bandwidth must be a positive number"),
        (dict(bandwidth=float("nan")), "bandwidth must be a positive number"),
        (dict(l0_coefficient=-0.1), "l0_coefficient must be a number >= 0"),
        (dict(l0_coefficient=True), "l0_coefficient must be a number >= 0"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_jumprelu_sae_step_rejects(fs, device, overrides, match):
    if "threshold" in overrides and overrides["threshold"].device.type != "meta":
        overrides = dict(overrides, threshold=overrides["threshold"].to(device))
    with pytest.raises(ValueError, match=match):
        _jumprelu_call(fs, device, **overrides)


@pytest.mark.parametrize("what,match,breaker", STEP_ONLY_BREAKS, ids=[b[0] for b in STEP_ONLY_BREAKS])
def test_jumprelu_sae_step_rejects_step_args(fs, device, what, match, breaker):
    args = _sae_args(device)
    breaker(args)
    threshold = torch.full((13,), 0.1, device=device)
    with pytest.raises(ValueError, match=match):
        fs.jumprelu_sae_step(*args[:5], threshold, capacity=20)


@pytest.mark.kernels_ci
def test_batchtopk_rescale_must_be_bool(fs, device):
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm must be a bool"):
        fs.batchtopk_sae_step(*_sae_args(device), rescale_acts_by_decoder_norm=1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d_model=0, n_features=8, k=2), "d_model"),
        (dict(d_model=4, n_features=0, k=1), "n_features"),
        (dict(d_model=4, n_features=8, k=9), "k must be"),
        (dict(d_model=4, n_features=8, k=0), "k must be"),
        (dict(d_model=4.0, n_features=8, k=2), "d_model"),
    ],
)
def test_sparse_autoencoder_rejects(fs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fs.SparseAutoencoder(**kwargs)


@pytest.mark.kernels_ci
def test_sparse_autoencoder_default_dtype(fs, device):
    """Without dtype, every parameter takes torch's default dtype, and a step runs."""
    sae = fs.SparseAutoencoder(8, 16, 2, seed=0, device=device)
    assert {p.dtype for p in sae.parameters()} == {torch.get_default_dtype()}
    assert "d_model=8, n_features=16, k=2, dtype=torch.float32" in repr(sae), "print(sae) must show its sizes"
    step = sae.loss(torch.randn(4, 8, device=device))
    assert torch.isfinite(step.loss)


def test_batchtopk_steps_take_numpy_numbers(fs, device):
    """BatchTopK's k is used as int(k * B): numpy's ints and floats give the same step as Python's."""
    args = _sae_args(device)
    want = fs.batchtopk_sae_step(*args[:5], 3).loss
    torch.testing.assert_close(fs.batchtopk_sae_step(*args[:5], np.int64(3)).loss, want, rtol=0, atol=0)
    torch.testing.assert_close(fs.batchtopk_sae_step(*args[:5], np.float32(3.0)).loss, want, rtol=0, atol=0)
    sizes = [np.int64(4), 13]
    got = fs.matryoshka_batchtopk_sae_step(*args[:5], np.int64(3), sizes).loss
    torch.testing.assert_close(got, fs.matryoshka_batchtopk_sae_step(*args[:5], 3, [4, 13]).loss, rtol=0, atol=0)


def test_topk_steps_take_numpy_counts(fs, device):
    """k (TopK encoder, step, Matryoshka TopK) and the fixed-capacity steps' capacity given as numpy integers
    give the same results as Python ints."""
    args = _sae_args(device)
    x, W_enc, b_enc, W_dec, b_dec = args[:5]
    want = fs.topk_sae_step(*args[:5], 3)
    got = fs.topk_sae_step(*args[:5], np.int64(3))
    assert torch.equal(got.code.indices, want.code.indices) and torch.equal(got.loss, want.loss)
    assert torch.equal(
        fs.topk_encode(x, W_enc, b_enc, np.int32(3), b_dec)[1], fs.topk_encode(x, W_enc, b_enc, 3, b_dec)[1]
    )
    got = fs.matryoshka_topk_sae_step(*args[:5], np.int64(3), [4, W_enc.shape[0]]).loss
    assert torch.equal(got, fs.matryoshka_topk_sae_step(*args[:5], 3, [4, W_enc.shape[0]]).loss)
    cap = x.shape[0] * W_enc.shape[0]
    want = fs.standard_sae_step(*args[:5], capacity=cap).loss
    assert torch.equal(fs.standard_sae_step(*args[:5], capacity=np.int64(cap)).loss, want)
    with pytest.raises(ValueError, match="k must be an int"):
        fs.topk_sae_step(*args[:5], np.float32(3.0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU threshold is not read (that would sync)")
@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_jumprelu_step_rejects_a_negative_threshold_as_the_module_does(fs, bad):
    """The module rejects init_threshold <= 0 and clamps its threshold at 0; the op, given a CPU threshold
    (read without a device sync), rejects a negative or NaN entry naming ``threshold``."""
    threshold = torch.full((13,), 0.1)
    threshold[4] = bad
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        _jumprelu_call(fs, "cpu", threshold=threshold)
    with pytest.raises(ValueError, match="init_threshold"):
        fs.JumpReLUSparseAutoencoder(9, 13, init_threshold=-0.1)
    _jumprelu_call(fs, "cpu", threshold=torch.zeros(13))  # 0 is allowed, as the module's clamp gives it


MODULE_KWARGS = [
    ("SparseAutoencoder", dict(k=2)),
    ("BatchTopKSparseAutoencoder", dict(k=2)),
    ("MatryoshkaBatchTopKSparseAutoencoder", dict(k=2, prefix_sizes=[4, 16])),
    ("JumpReLUSparseAutoencoder", dict()),
    ("StandardSparseAutoencoder", dict()),
    ("GatedSparseAutoencoder", dict()),
]
MODULE_IDS = [m[0] for m in MODULE_KWARGS]


@pytest.mark.parametrize("name,kwargs", MODULE_KWARGS, ids=MODULE_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.bool, "float32", torch.complex64])
def test_modules_reject_an_unsupported_dtype(fs, name, kwargs, dtype):
    """The constructor rejects a dtype the kernels cannot run (it used to fail on every call later)."""
    with pytest.raises(ValueError, match=r"^dtype must be"):
        getattr(fs, name)(8, 16, **kwargs, dtype=dtype)


@pytest.mark.kernels_ci
def test_modules_reject_a_float64_default_dtype(fs):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.raises(ValueError, match="dtype=None takes torch's default dtype, torch.float64"):
            fs.SparseAutoencoder(8, 16, 2)
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("name,kwargs", MODULE_KWARGS, ids=MODULE_IDS)
def test_modules_take_numpy_integers(fs, device, name, kwargs):
    """numpy's integers count as ints (stored as Python ints); a step runs; bools are still rejected."""
    npk = {k: (np.int64(v) if isinstance(v, int) else [np.int32(m) for m in v]) for k, v in kwargs.items()}
    sae = getattr(fs, name)(np.int64(8), np.int32(16), **npk, dtype=torch.float32, device=device, seed=0,
                            dead_window_tokens=np.int64(100))  # fmt: skip
    for attr in ("d_model", "n_features", "dead_window_tokens", "k"):
        if hasattr(sae, attr):
            assert type(getattr(sae, attr)) is int, attr
    if hasattr(sae, "prefix_sizes"):
        assert all(type(m) is int for m in sae.prefix_sizes)
    assert torch.isfinite(sae.loss(torch.randn(4, 8, device=device)).loss)
    with pytest.raises(ValueError, match="n_features"):
        getattr(fs, name)(8, True, **kwargs)


def test_module_dead_loss_options_take_numpy_integers(fs, device):
    dead_loss = fs.DeadLatentLoss(k_aux=np.int64(3), capacity=np.int64(6))
    sae = fs.SparseAutoencoder(8, 16, 2, dead_loss=dead_loss, device=device, dead_window_tokens=1)
    x = torch.randn(4, 8, device=device)
    sae.loss(x)
    assert torch.isfinite(sae.loss(x).aux_loss)


def test_resample_names_an_optimizer_that_does_not_hold_the_module(fs, device):
    """An optimizer over other parameters would reset no moments, silently: rejected naming ``optimizer``."""
    sae = fs.SparseAutoencoder(8, 16, 2, device=device)
    other = fs.SparseAutoencoder(8, 16, 2, device=device)
    x = torch.randn(6, 8, device=device)
    with pytest.raises(ValueError, match=r"^optimizer does not hold this module's parameters W_enc, b_enc, W_dec"):
        sae.resample_dead_(x, torch.optim.Adam(other.parameters()))
    with pytest.raises(ValueError, match="optimizer does not hold this module's parameters b_enc"):
        sae.resample_dead_(x, torch.optim.Adam([sae.W_enc, sae.W_dec, sae.b_dec]))
    with pytest.raises(ValueError, match="optimizer must be a torch.optim.Optimizer"):
        sae.resample_dead_(x, "adam")
    gated = fs.GatedSparseAutoencoder(8, 16, device=device)
    with pytest.raises(ValueError, match="r_mag, b_mag"):
        gated.resample_dead_(x, torch.optim.Adam([gated.W_enc, gated.b_gate, gated.W_dec]))
    sae.resample_dead_(x, torch.optim.Adam(sae.parameters()))  # its own: fine
    sae.resample_dead_(x, None)


def test_resample_hints_at_flattening_a_3d_x(fs, device):
    sae = fs.SparseAutoencoder(8, 16, 2, device=device)
    with pytest.raises(ValueError, match=r"x.flatten\(0, -2\)"):
        sae.resample_dead_(torch.randn(2, 3, 8, device=device))


@pytest.mark.parametrize("name", ["BatchTopKSparseAutoencoder", "MatryoshkaBatchTopKSparseAutoencoder"])
def test_eval_before_the_threshold_warms_up_warns_once(fs, device, name):
    """Eval mode encodes with the inference threshold; before ~1 / threshold_lr training steps it is near 0
    and the code nearly dense: encode warns, once. Once warm (trained, or a trained state_dict loaded),
    no warning. Training itself reads nothing on the host (the update count is a device buffer)."""
    kw = dict(prefix_sizes=[4, 16]) if name.startswith("Matryoshka") else {}
    make = lambda: getattr(fs, name)(8, 16, 2, **kw, threshold_lr=0.5, device=device, seed=0)  # noqa: E731
    x = torch.randn(6, 8, device=device)
    sae = make().eval()
    with pytest.warns(UserWarning, match=r"has had 0 of the 2 training steps it needs to warm up"):
        sae.encode(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sae(x)  # once only
    sae.train()
    for _ in range(2):
        sae.loss(x)
    assert int(sae.threshold_updates) == 2 and float(sae.threshold) > 0
    warm = make()
    warm.load_state_dict(sae.state_dict())  # a trained threshold counts as warm
    for module in (warm.eval(), make().train()):  # and train mode uses the batch rule: no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            module.encode(x)
    fresh = make()
    fresh.train()
    fresh.loss(x)  # one step of two: still cold
    with pytest.warns(UserWarning, match="has had 1 of the 2"):
        fresh.eval().encode(x)
