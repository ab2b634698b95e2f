"""Crosscoders: the standard, BatchTopK, TopK and JumpReLU crosscoder steps (an SAE step over the [B, L * D]
concatenation read uncentred, with grouped decoder norms) against the per-layer fp64 reference
(``reference.*_crosscoder_step``), every output and gradient by the parity rule on drawn shapes (L in
1..4, odd D, tiny F, K not a power of 2, B = 1) in fp32, bf16 and fp16; the modules (layout,
``layer_fvu``, determinism, nothing [B, F] saved, bad input); and dictionary_learning's crosscoders,
restated in plain torch below from the repository's source (not installed: the packaged 0.1.0 has none).

dictionary_learning, as read: science-of-finetuning/dictionary_learning at commit
173f7facbe80f16c837e7b5e4dca78a50c000115, ``dictionary_learning/dictionary.py`` (``CrossCoder``,
``CrossCoderEncoder``, ``CrossCoderDecoder``, ``BatchTopKCrossCoder``, code normalization "CROSSCODER")
and ``dictionary_learning/trainers/crosscoder.py`` (``CrossCoderTrainer.loss``,
``BatchTopKCrossCoderTrainer.loss``); the same ``CrossCoder`` and trainer first appeared in
saprmarks/dictionary_learning at commit 12e84279943aac935a5826c5743a2d48e3f161cf.
"""

import warnings

import pytest
import torch
from encoder_inputs import step_upstream
from hypothesis import example, given
from hypothesis import strategies as st
from kernels import LocalLayerRepository, Mode, kernelize, use_kernel_forward_from_hub, use_kernel_mapping
from kernels.layer.layer import _validate_layer
from parity import DTYPES, assert_gradient_parity, assert_parity, grads, torch_baseline
from torch import nn

NAMES = ("xs", "W_enc", "b_enc", "W_dec", "b_dec")
ODD_D = st.sampled_from([1, 3, 5, 7, 9])


@st.composite
def crosscoder_shapes(draw):
    """(B, L, D, F): B = 1 among them, L in 1..4, odd D, tiny F."""
    return draw(st.integers(1, 6)), draw(st.integers(1, 4)), draw(ODD_D), draw(st.integers(1, 20))


def crosscoder_problem(B, L, D, F, dtype, device, *, seed):
    """xs [B, L, D] and the flat parameters W_enc [F, L * D], b_enc [F], W_dec [F, L * D], b_dec [L * D]
    (requires_grad), each layer's decoder blocks of different norms, as a trained crosscoder's."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(B, L, D, generator=g)
    W_enc = torch.randn(F, L * D, generator=g) / (L * D) ** 0.5
    b_enc = torch.randn(F, generator=g) * 0.1
    layer_scale = torch.rand(F, L, 1, generator=g) + 0.2
    W_dec = (torch.randn(F, L, D, generator=g) * layer_scale / D**0.5).reshape(F, L * D)
    b_dec = torch.randn(L * D, generator=g) * 0.1
    cast = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return [cast(t) for t in (xs, W_enc, b_enc, W_dec, b_dec)]


def flat(xs):
    return xs.reshape(xs.shape[0], -1)


def reference_runs(fn, params, up, dtype, **kw):
    """(same-dtype result and gradients, fp64 result and gradients, fp64 at the dtype's preact rounding)."""
    same = fn(*params, **kw)
    p64 = [p.detach().double().requires_grad_() for p in params]
    r = fn(*p64, **kw)
    p_sh = [p.detach().double().requires_grad_() for p in params]
    sh = fn(*p_sh, **kw, round_preacts=dtype)
    return (
        (same, grads(same.loss, params, up.to(same.loss.dtype))),
        (r, grads(r.loss, p64, up.double())),
        (sh, grads(sh.loss, p_sh, up.double())),
    )


def check_outputs(what, out, runs, fields, dtype, B):
    (same, same_g), (r, r_g), (sh, sh_g) = runs
    for name in fields:
        if name in ("fvu", "layer_fvu") and B == 1:
            continue
        b, c, d = getattr(same, name), getattr(r, name), getattr(sh, name)
        assert_parity(f"{what} {name}", getattr(out, name), torch_baseline(b, c, d.detach()), c, dtype)


# The steps, as the modules call them -----------------------------------------------------


def layers(fs, L, reconstruction):
    """The steps' ``crosscoder`` argument, as the modules pass it."""
    return fs.CrosscoderLayers(L, l2_loss=reconstruction == "layer_l2")


def standard_step(fs, params, *, capacity, l1_coefficient, dense=False, reconstruction="mse"):
    xs, W_enc, b_enc, W_dec, b_dec = params
    x, L = flat(xs), xs.shape[1]
    opts = dict(l1_coefficient=l1_coefficient, target=x, crosscoder=layers(fs, L, reconstruction))
    if dense:
        return fs.standard_sae_step_dense(x, W_enc, b_enc, W_dec, b_dec, **opts)
    return fs.standard_sae_step(x, W_enc, b_enc, W_dec, b_dec, capacity=capacity, **opts)


def check_standard(fs, shape, dtype, device, *, seed, l1_coefficient, dense=False, reconstruction="mse"):
    B, L, D, F = shape
    params = crosscoder_problem(B, L, D, F, dtype, device, seed=seed)
    ref = fs.testing.reference
    with torch.no_grad():  # the kernel's own pre-activations (the same product on the CPU path)
        active = ref.encoder_preacts(flat(params[0]), params[1], params[2]) > 0
    need = int(active.sum())
    cap = max(1, min(need + 2, B * F))
    out = standard_step(
        fs, params, capacity=cap, l1_coefficient=l1_coefficient, dense=dense, reconstruction=reconstruction
    )
    if not dense:
        assert int(out.count) == need and not bool(out.overflow)
        assert torch.equal(out.code.to_dense(F) != 0, active)
    assert torch.equal(out.fire_counts, active.sum(0))
    up = step_upstream(seed).to(device)
    ours = grads(out.loss, params, up)
    kw = dict(l1_coefficient=l1_coefficient, active=active, reconstruction=reconstruction)
    runs = reference_runs(ref.standard_crosscoder_step, params, up, dtype, **kw)
    check_outputs("standard crosscoder", out, runs, ("loss", "mse", "l1", "fvu"), dtype, B)
    assert out.l0.item() == pytest.approx(need / B, rel=1e-6)
    (_, same_g), (_, r_g), (_, sh_g) = runs
    assert_gradient_parity("standard crosscoder", NAMES, ours, same_g, r_g, sh_g, params, dtype)


@given(
    shape=crosscoder_shapes(),
    dtype=st.sampled_from(DTYPES),
    l1_coefficient=st.sampled_from([0.0, 0.1, 1.0, 4.0]),
    reconstruction=st.sampled_from(["mse", "layer_l2"]),
    seed=st.integers(0, 2**16),
)
@example(shape=(1, 3, 5, 7), dtype=torch.float32, l1_coefficient=1.0, reconstruction="mse", seed=1)  # B = 1
@example(shape=(5, 4, 3, 13), dtype=torch.bfloat16, l1_coefficient=0.1, reconstruction="layer_l2", seed=2)
@example(shape=(4, 2, 9, 20), dtype=torch.float16, l1_coefficient=4.0, reconstruction="mse", seed=3)
@example(shape=(3, 3, 1, 6), dtype=torch.float32, l1_coefficient=1.0, reconstruction="layer_l2", seed=4)
def test_standard_crosscoder_step_parity(fs, device, shape, dtype, l1_coefficient, reconstruction, seed):
    """The sparse step with target=x and crosscoder=CrosscoderLayers(L, l2_loss) vs the per-layer
    reference: the code, the loss, mse, l1 (weighted by sum_l ||W_dec[f, l]||), fvu and every gradient."""
    check_standard(fs, shape, dtype, device, seed=seed, l1_coefficient=l1_coefficient, reconstruction=reconstruction)


@pytest.mark.parametrize("reconstruction", ["mse", "layer_l2"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2, 3, 5), (6, 3, 7, 19)])
def test_standard_crosscoder_dense_formulation(fs, device, dtype, shape, reconstruction):
    """The dense formulation (the module's path while the code is dense) with grouped norms: by the rule."""
    check_standard(fs, shape, dtype, device, seed=sum(shape), l1_coefficient=0.7, dense=True,
                   reconstruction=reconstruction)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_standard_crosscoder_zero_decoder_blocks(fs, device, dtype):
    """A zero decoder block (a latent absent from one layer) has no norm gradient, as torch's norm gives 0
    there; the other blocks of its row keep theirs."""
    B, L, D, F = 5, 3, 5, 12
    params = crosscoder_problem(B, L, D, F, dtype, device, seed=11)
    with torch.no_grad():
        params[3][:4, D : 2 * D] = 0  # layer 1 of latents 0..3
    ref = fs.testing.reference
    with torch.no_grad():
        active = ref.encoder_preacts(flat(params[0]), params[1], params[2]) > 0
    out = standard_step(fs, params, capacity=B * F, l1_coefficient=1.0)
    up = step_upstream(3).to(device)
    ours = grads(out.loss, params, up)
    runs = reference_runs(ref.standard_crosscoder_step, params, up, dtype, l1_coefficient=1.0, active=active)
    (_, same_g), (_, r_g), (_, sh_g) = runs
    assert torch.isfinite(ours[3]).all()
    assert_gradient_parity("zero blocks", NAMES, ours, same_g, r_g, sh_g, params, dtype)


def batch_selection(out, B):
    rows = torch.repeat_interleave(torch.arange(B, device=out.code.indices.device), out.code.row_offsets.diff())
    return rows, out.code.indices


def assert_top_n(keys, chosen, dtype):
    """``chosen`` ([B, F] bool) holds n of the largest ``keys``: nothing left out ranks above anything taken
    (up to the dtype's rounding of the keys)."""
    keys = keys.double()
    tol = 4 * torch.finfo(dtype).eps * float(keys.abs().max().clamp_min(1e-30))
    if chosen.all() or not chosen.any():
        return
    assert keys[chosen].min() >= keys[~chosen].max() - tol, "a larger activation was left out"


@given(
    shape=crosscoder_shapes(),
    dtype=st.sampled_from(DTYPES),
    k=st.sampled_from([1, 3, 1.5, 5]),
    rescale=st.booleans(),
    reconstruction=st.sampled_from(["mse", "layer_l2"]),
    seed=st.integers(0, 2**16),
)
@example(shape=(1, 3, 5, 7), dtype=torch.float32, k=3, rescale=True, reconstruction="mse", seed=1)  # B = 1
@example(shape=(6, 4, 3, 11), dtype=torch.bfloat16, k=1.5, rescale=True, reconstruction="layer_l2", seed=2)
@example(shape=(4, 2, 7, 17), dtype=torch.float16, k=5, rescale=False, reconstruction="mse", seed=3)
@example(shape=(5, 3, 5, 9), dtype=torch.float32, k=2, rescale=True, reconstruction="layer_l2", seed=4)
def test_batchtopk_crosscoder_step_parity(fs, device, shape, dtype, k, rescale, reconstruction, seed):
    """The BatchTopK step with target=x and crosscoder=CrosscoderLayers(L, l2_loss) vs the per-layer
    reference: the batch's int(k * B) largest relu(pre) * sum_l ||W_dec[f, l]|| are selected, valued
    relu(pre) (the selection, its values and min_act exactly, from the same-dtype product); the loss,
    mse, fvu and every gradient at that selection."""
    B, L, D, F = shape
    n = int(k * B)
    if not 1 <= n <= B * F:
        return
    params = crosscoder_problem(B, L, D, F, dtype, device, seed=seed)
    xs, W_enc, b_enc, W_dec, b_dec = params
    x = flat(xs)
    out = fs.batchtopk_sae_step(x, W_enc, b_enc, W_dec, b_dec, k, target=x, rescale_acts_by_decoder_norm=rescale,
                                crosscoder=layers(fs, L, reconstruction))  # fmt: skip
    ref = fs.testing.reference
    rows, ids = batch_selection(out, B)
    with torch.no_grad():  # the same-dtype ranking: the kernel's product pre * sum_l ||W_dec[f, l]|| (in the dtype)
        pre = ref.encoder_preacts(x, W_enc, b_enc)
        norms = torch.linalg.vector_norm(W_dec.reshape(F, L, D), dim=2, dtype=torch.float32).sum(1).to(dtype)
        acts = torch.relu(pre * norms if rescale else pre)
        want_rows, want_ids = ref.batch_topk_select(acts, n)
    assert torch.equal(rows, want_rows) and torch.equal(ids, want_ids), "selection differs from the tie rule's"
    assert torch.equal(out.code.vals, torch.relu(pre[rows, ids]))
    picked = acts[rows, ids]
    expect_min = picked[picked > 0].min().float() if (picked > 0).any() else torch.tensor(float("inf"))
    assert torch.equal(out.min_act.cpu(), expect_min.cpu())
    up = step_upstream(seed).to(device)
    ours = grads(out.loss, params, up)
    kw = dict(k=k, rescale=rescale, selection=(rows, ids), reconstruction=reconstruction)
    runs = reference_runs(ref.batchtopk_crosscoder_step, params, up, dtype, **kw)
    check_outputs("batchtopk crosscoder", out, runs, ("loss", "mse", "fvu"), dtype, B)
    (same, same_g), (r, r_g), (sh, sh_g) = runs
    assert_gradient_parity("batchtopk crosscoder", NAMES, ours, same_g, r_g, sh_g, params, dtype)


@given(
    shape=crosscoder_shapes(),
    dtype=st.sampled_from(DTYPES),
    k=st.sampled_from([1, 3, 5, 7]),
    seed=st.integers(0, 2**16),
)
@example(shape=(1, 3, 5, 7), dtype=torch.float32, k=3, seed=1)  # B = 1
@example(shape=(6, 4, 3, 11), dtype=torch.bfloat16, k=5, seed=2)
@example(shape=(4, 2, 7, 17), dtype=torch.float16, k=7, seed=3)
def test_topk_crosscoder_step_parity(fs, device, shape, dtype, k, seed):
    """The TopK step with target=x vs the per-layer reference: each row's k largest pre-activations
    (uncentred), relu'd; the loss, fvu and every gradient at that selection."""
    B, L, D, F = shape
    k = min(k, F)
    params = crosscoder_problem(B, L, D, F, dtype, device, seed=seed)
    xs, W_enc, b_enc, W_dec, b_dec = params
    x = flat(xs)
    out = fs.topk_sae_step(x, W_enc, b_enc, W_dec, b_dec, k, target=x)
    ref = fs.testing.reference
    ids = out.code.indices
    with torch.no_grad():
        pre = ref.crosscoder_preacts(xs.double(), W_enc.double(), b_enc.double())
    chosen = torch.zeros(B, F, dtype=torch.bool, device=device).scatter_(1, ids, True)
    for b in range(B):
        assert_top_n(pre[b : b + 1], chosen[b : b + 1], dtype)
    up = step_upstream(seed).to(device)
    ours = grads(out.loss, params, up)
    runs = reference_runs(ref.topk_crosscoder_step, params, up, dtype, k=k, indices=ids)
    check_outputs("topk crosscoder", out, runs, ("loss", "fvu"), dtype, B)
    (_, same_g), (_, r_g), (_, sh_g) = runs
    assert_gradient_parity("topk crosscoder", NAMES, ours, same_g, r_g, sh_g, params, dtype)


@given(
    shape=crosscoder_shapes(),
    dtype=st.sampled_from(DTYPES),
    l0_coefficient=st.sampled_from([0.0, 0.5]),
    seed=st.integers(0, 2**16),
)
@example(shape=(1, 3, 5, 7), dtype=torch.float32, l0_coefficient=0.5, seed=1)  # B = 1
@example(shape=(6, 4, 3, 11), dtype=torch.bfloat16, l0_coefficient=0.5, seed=2)
@example(shape=(4, 2, 7, 17), dtype=torch.float16, l0_coefficient=0.0, seed=3)
def test_jumprelu_crosscoder_step_parity(fs, device, shape, dtype, l0_coefficient, seed):
    """The JumpReLU step with target=x vs the reference: the loss, mse, fvu and every gradient (the
    threshold's straight-through one included)."""
    B, L, D, F = shape
    bandwidth = 0.1
    params = crosscoder_problem(B, L, D, F, dtype, device, seed=seed)
    threshold = (torch.rand(F, generator=torch.Generator().manual_seed(seed)) * 0.5).to(device).requires_grad_()
    params = [*params, threshold]
    xs, W_enc, b_enc, W_dec, b_dec, _ = params
    x = flat(xs)
    ref = fs.testing.reference
    with torch.no_grad():
        z = ref.encoder_preacts(x, W_enc, b_enc)
        active, band = ref.jumprelu_masks(z, threshold.to(z.dtype), bandwidth)
    out = fs.jumprelu_sae_step(x, W_enc, b_enc, W_dec, b_dec, threshold, target=x, capacity=B * F,
                               bandwidth=bandwidth, l0_coefficient=l0_coefficient)  # fmt: skip
    assert int(out.count) == int((active | band).sum())
    assert torch.equal(out.fire_counts, active.sum(0))
    up = step_upstream(seed).to(device)
    ours = grads(out.loss, params, up)
    kw = dict(bandwidth=bandwidth, l0_coefficient=l0_coefficient, masks=(active, band))
    runs = reference_runs(ref.jumprelu_crosscoder_step, params, up, dtype, **kw)
    check_outputs("jumprelu crosscoder", out, runs, ("loss", "mse", "fvu"), dtype, B)
    (_, same_g), (_, r_g), (_, sh_g) = runs
    assert_gradient_parity("jumprelu crosscoder", (*NAMES, "threshold"), ours, same_g, r_g, sh_g, params, dtype)


# The modules -----------------------------------------------------------------------------

SPARSITY = {"k": 3, "l0_coefficient": 1e-3, "l1_coefficient": 1e-3}
CROSSCODERS = ("standard_crosscoder", "topk_crosscoder", "batchtopk_crosscoder", "jumprelu_crosscoder")


def build(fs, name, D, F, L, **kwargs):
    arch = fs.ARCHITECTURES[name]
    return arch.build(D, F, SPARSITY[arch.sparsity], n_layers=L, seed=0, **kwargs)


def module_reference(fs, module, xs, out):
    """The per-layer reference step at the module's parameters and the code ``out`` chose."""
    ref, p = fs.testing.reference, (xs, module.W_enc, module.b_enc, module.W_dec, module.b_dec)
    B, F = xs.shape[0], module.n_features
    if isinstance(module, fs.StandardCrosscoder):
        active = out.code.to_dense(F) > 0 if out.code is not None else None
        return ref.standard_crosscoder_step(*p, module.l1_coefficient, active=active,
                                            reconstruction=module.reconstruction)  # fmt: skip
    if isinstance(module, fs.BatchTopKCrosscoder):
        rows = torch.repeat_interleave(torch.arange(B, device=xs.device), out.code.row_offsets.diff())
        return ref.batchtopk_crosscoder_step(*p, module.k, module.rescale_acts_by_decoder_norm,
                                             selection=(rows, out.code.indices),
                                             reconstruction=module.reconstruction)  # fmt: skip
    if isinstance(module, fs.TopKCrosscoder):
        return ref.topk_crosscoder_step(*p, module.k, indices=out.code.indices)
    x = flat(xs)
    z = ref.encoder_preacts(x, module.W_enc, module.b_enc).detach()
    theta = module.current_threshold()
    masks = ref.jumprelu_masks(z, theta.detach(), module.bandwidth)
    return ref.jumprelu_crosscoder_step(*p, theta, module.bandwidth, module.l0_coefficient, masks=masks)


@pytest.mark.kernels_ci
@pytest.mark.parametrize(
    "name,reconstruction",
    [(name, "mse") for name in CROSSCODERS]
    + [("standard_crosscoder", "layer_l2"), ("batchtopk_crosscoder", "layer_l2")],
)
def test_crosscoder_module_trains_with_the_common_layout(fs, device, name, reconstruction):
    """Each registered crosscoder builds, trains three steps through loss / before / after_optimizer_step,
    returns STEP_FIELDS then layer_fvu [L] fp32, and its loss, layer_fvu and gradients equal the per-layer
    reference's at its parameters."""
    B, L, D, F = 6, 3, 5, 24
    arch = fs.ARCHITECTURES[name]
    assert arch.family == "crosscoder"
    module = build(fs, name, D, F, L, device=device, dead_window_tokens=1, reconstruction=reconstruction)
    assert isinstance(module, arch.module) and module.d_model == D and module.n_layers == L
    xs = torch.randn(B, L, D, generator=torch.Generator().manual_seed(1)).to(device)
    opt = torch.optim.SGD(module.parameters(), lr=1e-2)
    for _ in range(3):
        step = module.loss(xs)
        assert isinstance(step, arch.result)
        assert type(step)._fields[: len(fs.STEP_FIELDS)] == fs.STEP_FIELDS and type(step)._fields[-1] == "layer_fvu"
        step.loss.backward()
        module.before_optimizer_step()
        opt.step()
        opt.zero_grad()
        module.after_optimizer_step()
    assert step.layer_fvu.shape == (L,) and step.layer_fvu.dtype == torch.float32
    step = module.loss(xs)
    ours = torch.autograd.grad(step.loss, [module.W_enc, module.b_enc, module.W_dec, module.b_dec])
    r = module_reference(fs, module, xs, step)
    r_grads = torch.autograd.grad(r.loss, [module.W_enc, module.b_enc, module.W_dec, module.b_dec])
    torch.testing.assert_close(step.loss, r.loss.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step.layer_fvu, r.layer_fvu.float(), rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, r_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the layers' FVUs are the whole FVU split by each layer's variance
    var = xs.var(0, correction=0).sum(-1)
    torch.testing.assert_close((step.layer_fvu * var).sum() / var.sum(), step.fvu, rtol=1e-5, atol=1e-6)
    assert module.forward(xs).shape == (B, L, D)


@pytest.mark.parametrize("name", CROSSCODERS)
def test_crosscoder_module_is_deterministic_and_keeps_nothing_batch_by_latents(fs, device, name):
    """Two identical steps give bit-identical loss and gradients; no [B, F] tensor is saved for the backward
    (a fixed-capacity code may hold up to B * F entries, flat)."""
    B, L, D, F = 7, 2, 3, 29
    module = build(fs, name, D, F, L, device=device)
    if name == "standard_crosscoder":
        module.dense_above = 1.0  # the sparse path (the dense formulation keeps its [B, F] code by design)
        module.capacity_per_row = F
    xs = torch.randn(B, L, D, generator=torch.Generator().manual_seed(2)).to(device)
    runs = []
    for _ in range(2):
        shapes = []

        def pack(t, shapes=shapes):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step = module.loss(xs)
        g = torch.autograd.grad(step.loss, list(module.parameters()))
        runs.append((step.loss, g))
        assert (B, F) not in shapes and (F, B) not in shapes, f"a [B, F] tensor is saved: {shapes}"
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


def test_crosscoder_modules_reject_bad_input(fs, device):
    module = build(fs, "batchtopk_crosscoder", 5, 16, 3, device=device)
    xs = torch.randn(4, 3, 5, device=device)
    for bad in (xs.reshape(4, 15), xs[:, :2], torch.randn(4, 4, 5, device=device), torch.randn(4, 3, 4, device=device),
                xs[:0], "xs"):  # fmt: skip
        with pytest.raises(ValueError, match="xs"):
            module.loss(bad)
        with pytest.raises(ValueError, match="xs"):
            module.forward(bad)
    with pytest.raises(ValueError, match="xs"):
        module.loss(xs.half())
    with pytest.raises(ValueError, match="xs"):
        module.loss(xs.to("meta"))
    for n_layers in (0, -1, 2.5, "3", None):
        with pytest.raises(ValueError, match="n_layers"):
            fs.StandardCrosscoder(5, 16, n_layers=n_layers)
    with pytest.raises(ValueError, match="d_model"):
        fs.TopKCrosscoder(0, 16, 3, n_layers=2)


def test_crosscoder_dead_loss_defaults_to_half_a_layer(fs, device):
    """AuxK's default k_aux is half a layer's width (dictionary_learning's activation_dim // 2); the loss
    trains (dead latents after one token) and resampling says it is not adapted yet."""
    L, D, F = 3, 6, 20
    cc = fs.BatchTopKCrosscoder(D, F, 2, n_layers=L, dead_loss="auxk", dead_window_tokens=1, device=device, seed=0)
    assert cc.dead_loss.k_aux == D // 2
    xs = torch.randn(4, L, D, generator=torch.Generator().manual_seed(0)).to(device)
    for _ in range(2):
        step = cc.loss(xs)
    assert step.aux_loss is not None and torch.isfinite(step.aux_loss)
    step.loss.backward()
    with pytest.raises(NotImplementedError, match="crosscoder"):
        cc.resample_dead_(xs)


def test_crosscoder_argument_is_checked(fs, device):
    """The steps' ``crosscoder``: a CrosscoderLayers whose n_layers divides W_dec's width; the modules'
    ``reconstruction``: one their step offers."""
    B, L, D, F = 3, 2, 3, 5
    xs, W_enc, b_enc, W_dec, b_dec = crosscoder_problem(B, L, D, F, torch.float32, device, seed=0)
    x = flat(xs)
    steps = (
        lambda c: fs.standard_sae_step(x, W_enc, b_enc, W_dec, b_dec, capacity=B * F, target=x, crosscoder=c),
        lambda c: fs.standard_sae_step_dense(x, W_enc, b_enc, W_dec, b_dec, target=x, crosscoder=c),
        lambda c: fs.batchtopk_sae_step(x, W_enc, b_enc, W_dec, b_dec, 2, target=x, rescale_acts_by_decoder_norm=True,
                                        crosscoder=c),
    )  # fmt: skip
    bad = (2, (2, False), fs.CrosscoderLayers(0), fs.CrosscoderLayers(-2), fs.CrosscoderLayers(4),
           fs.CrosscoderLayers(1.5), fs.CrosscoderLayers("2"), fs.CrosscoderLayers(2, l2_loss="yes"),
           fs.CrosscoderLayers(4, l2_loss=True))  # fmt: skip
    for step in steps:
        for crosscoder in bad:
            with pytest.raises(ValueError, match="crosscoder"):
                step(crosscoder)
    with pytest.raises(ValueError, match="reconstruction"):
        fs.StandardCrosscoder(5, 16, n_layers=2, reconstruction="l1")
    with pytest.raises(ValueError, match="reconstruction"):
        fs.TopKCrosscoder(5, 16, 3, n_layers=2, reconstruction="layer_l2")


def test_one_layer_is_the_sae_over_its_input_read_uncentred(fs, device):
    """L = 1: the sum of the per-layer norms is the row's norm, so the standard crosscoder is the standard
    step with target=x, exactly."""
    params = crosscoder_problem(5, 1, 7, 9, torch.float32, device, seed=4)
    a = standard_step(fs, params, capacity=45, l1_coefficient=0.5)
    xs, W_enc, b_enc, W_dec, b_dec = params
    b = fs.standard_sae_step(flat(xs), W_enc, b_enc, W_dec, b_dec, capacity=45, l1_coefficient=0.5, target=flat(xs))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.l1, b.l1)


# dictionary_learning's layout and formulas ---------------------------------------------------


def dl_encode(sd, xs):
    """dictionary_learning's CrossCoderEncoder: relu(sum_l x_l @ encoder.weight[l] + encoder.bias) [B, F]."""
    return torch.relu(torch.einsum("bld,ldf->bf", xs, sd["encoder.weight"]) + sd["encoder.bias"])


def dl_decode(sd, f):
    """dictionary_learning's CrossCoderDecoder: f @ decoder.weight[l] + decoder.bias[l], [B, L, D]."""
    return torch.einsum("bf,lfd->bld", f, sd["decoder.weight"]) + sd["decoder.bias"]


def dl_code_normalization(sd):
    """Code normalization "CROSSCODER": sum over layers of ||decoder.weight[l, f]||, [F]."""
    return sd["decoder.weight"].norm(dim=2).sum(0)


def dl_standard_loss(sd, xs, l1_penalty, use_mse_loss):
    """CrossCoderTrainer.loss: the reconstruction term, by default (use_mse_loss=False) the mean over (b, l)
    of ||x_bl - x_hat_bl||_2, else the mean over (b, l) of the squared error summed over D; + l1_penalty *
    mean over b of ||f * code normalization||_1."""
    f = dl_encode(sd, xs)
    e = xs - dl_decode(sd, f)
    recon = e.pow(2).sum(-1).mean() if use_mse_loss else torch.linalg.norm(e, dim=-1).mean()
    return recon + l1_penalty * (f * dl_code_normalization(sd)).norm(p=1, dim=-1).mean()


def dl_batchtopk(sd, xs, k):
    """BatchTopKCrossCoder.encode(use_threshold=False) and the trainer's terms: f relu'd, ranked by
    f * code normalization over the flattened batch (k * B kept, valued f), decoded; returns (the mse
    term, mean over (b, l) of the squared error summed over D; the l2 term, mean over (b, l) of the error's
    norm; the threshold's input, the smallest positive kept scaled activation; the kept [B, F] mask)."""
    B = xs.shape[0]
    post = dl_encode(sd, xs)
    scaled = post * dl_code_normalization(sd)
    kept = torch.zeros(scaled.numel(), dtype=torch.bool)
    kept[scaled.flatten().topk(k * B, sorted=False).indices] = True
    kept = kept.reshape(post.shape)
    f = post * kept
    e = xs - dl_decode(sd, f)
    f_scaled = (f * dl_code_normalization(sd)).detach()
    return e.pow(2).sum(-1).mean(), e.norm(dim=-1).mean(), f_scaled[f_scaled > 0].min(), kept


def dl_state(module):
    """The module's weights in dictionary_learning's layout, fp64 leaves."""
    return {n: t.double().requires_grad_() for n, t in module.to_dictionary_learning().items()}


def dl_grads_as_ours(module, sd):
    """dictionary_learning's gradients in this module's layout (W_enc, b_enc, W_dec, b_dec)."""
    F, L, D = module.n_features, module.n_layers, module.d_model
    g = {n: t.grad for n, t in sd.items()}
    return (g["encoder.weight"].permute(2, 0, 1).reshape(F, L * D), g["encoder.bias"],
            g["decoder.weight"].transpose(0, 1).reshape(F, L * D), g["decoder.bias"].reshape(L * D))  # fmt: skip


def perturbed(module, seed):
    """The module with random biases and per-layer decoder scales (a trained crosscoder's look)."""
    g = torch.Generator().manual_seed(seed)
    F, L = module.n_features, module.n_layers
    with torch.no_grad():
        module.b_enc.copy_(torch.randn(F, generator=g) * 0.05)
        module.b_dec.copy_(torch.randn(module.b_dec.shape, generator=g) * 0.1)
        scale = (torch.rand(F, L, 1, generator=g) + 0.3).repeat_interleave(module.d_model, 2).reshape(F, -1)
        module.W_dec.mul_(scale.to(module.W_dec))
    return module


@pytest.mark.parametrize("use_mse_loss", [False, True])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("L", [1, 2, 3])
def test_standard_crosscoder_is_dictionary_learnings_crosscoder(fs, device, L, dense, use_mse_loss):
    """dictionary_learning's CrossCoder with CrossCoderTrainer's loss, on both of the module's paths: the
    same code and reconstruction; with its default (use_mse_loss=False, each layer's unsquared error
    norm) the same loss and gradients as reconstruction="layer_l2" at l1_coefficient = l1_penalty; with
    use_mse_loss=True its loss and gradients are the default module's at l1_coefficient = L * l1_penalty,
    divided by L (its squared error is a mean over B and the L layers, the module's a mean over B of the
    sum over layers, Anthropic's)."""
    D, F, B, l1_penalty = 5, 16, 6, 0.3
    scale, reconstruction = (L, "mse") if use_mse_loss else (1, "layer_l2")
    module = fs.StandardCrosscoder(D, F, n_layers=L, l1_coefficient=scale * l1_penalty, seed=3, device=device,
                                   reconstruction=reconstruction)  # fmt: skip
    module = perturbed(module, 3)
    module.dense_above, module.capacity_per_row = (0.0, None) if dense else (1.0, F)
    xs = torch.randn(B, L, D, generator=torch.Generator().manual_seed(5)) * 2
    step = module.loss(xs.to(device))
    assert module.last_path == ("dense" if dense else "sparse")
    ours = torch.autograd.grad(step.loss, [module.W_enc, module.b_enc, module.W_dec, module.b_dec])
    sd = dl_state(module)
    theirs = dl_standard_loss(sd, xs.double(), l1_penalty, use_mse_loss)
    theirs.backward()
    torch.testing.assert_close(step.loss.double().cpu() / scale, theirs, rtol=1e-5, atol=1e-7)
    for a, b in zip(ours, dl_grads_as_ours(module, sd)):
        torch.testing.assert_close(a.double().cpu() / scale, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(module.forward(xs.to(device)).double().cpu(),
                                   dl_decode(sd, dl_encode(sd, xs.double())), rtol=1e-5, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("reconstruction", ["layer_l2", "mse"])
@pytest.mark.parametrize("L", [1, 2, 3])
def test_batchtopk_crosscoder_is_dictionary_learnings_batchtopk_crosscoder(fs, device, L, reconstruction):
    """dictionary_learning's BatchTopKCrossCoder (code normalization "CROSSCODER", use_threshold=False)
    and BatchTopKCrossCoderTrainer.loss (no dead latents yet, so its AuxK term is 0): the same k * B
    latents, chosen by relu(pre) * sum_l ||W_dec[f, l]|| over the batch, valued relu(pre); the
    threshold's input is the module's min_act. Its loss, the mean over (b, l) of each layer's unsquared
    error norm, and its gradients are reconstruction="layer_l2"'s; its logged squared-error term (a mean
    over B and L of the sum over D) and its gradients are D times the default module's (a mean over
    B * L * D)."""
    D, F, B, k = 5, 16, 6, 3
    module = fs.BatchTopKCrosscoder(D, F, k, n_layers=L, seed=4, reconstruction=reconstruction, device=device)
    module = perturbed(module, 4)
    xs = torch.randn(B, L, D, generator=torch.Generator().manual_seed(6))
    step = module.loss(xs.to(device))
    ours = torch.autograd.grad(step.loss, [module.W_enc, module.b_enc, module.W_dec, module.b_dec])
    sd = dl_state(module)
    mse, l2, min_act, kept = dl_batchtopk(sd, xs.double(), k)
    theirs, scale = (l2, 1) if reconstruction == "layer_l2" else (mse, D)
    theirs.backward()
    assert torch.equal(step.code.to_dense(F).cpu() > 0, kept)
    torch.testing.assert_close(step.loss.double().cpu() * scale, theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(step.mse.double().cpu() * D, mse.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(step.min_act.double().cpu(), min_act, rtol=1e-5, atol=0)
    for a, b in zip(ours, dl_grads_as_ours(module, sd)):
        torch.testing.assert_close(a.double().cpu() * scale, b, rtol=1e-4, atol=1e-6)


def test_dictionary_learning_layout_round_trips(fs):
    """to_dictionary_learning's tensors are dictionary_learning's shapes and load back exactly; a state
    dict that does not fit is a ValueError naming state_dict."""
    L, D, F = 3, 5, 8
    module = fs.TopKCrosscoder(D, F, 2, n_layers=L, seed=1)
    sd = module.to_dictionary_learning()
    assert {n: tuple(t.shape) for n, t in sd.items()} == {
        "encoder.weight": (L, D, F), "encoder.bias": (F,), "decoder.weight": (L, F, D), "decoder.bias": (L, D)
    }  # fmt: skip
    # decoder.weight[l, f] is latent f's block of layer l
    torch.testing.assert_close(sd["decoder.weight"][1, 4], module.W_dec[4, D : 2 * D].detach())
    back = fs.TopKCrosscoder.from_dictionary_learning(sd, 2)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(module, name)), name
    assert back.n_layers == L and back.d_model == D
    for bad in ({**sd, "decoder.bias": torch.zeros(L, D + 1)}, {k: v for k, v in sd.items() if k != "encoder.bias"},
                {**sd, "encoder.weight": torch.zeros(L * D, F)}, "sd"):  # fmt: skip
        with pytest.raises(ValueError, match="state_dict"):
            fs.TopKCrosscoder.from_dictionary_learning(bad, 2)


# The hub layers ---------------------------------------------------------------------------


class _PlainCrosscoder(nn.Module):
    """A user's crosscoder in plain torch, per layer, in flash-sae's layout (W_enc, W_dec [F, L * D])."""

    def __init__(self, cc):
        super().__init__()
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            setattr(self, name, nn.Parameter(getattr(cc, name).detach().clone()))
        self.L = cc.n_layers

    def pre(self, x):
        B, L, D = x.shape
        return torch.einsum("bld,fld->bf", x, self.W_enc.reshape(-1, L, D)) + self.b_enc

    def decode(self, acts):
        return torch.einsum("bf,fld->bld", acts, self.W_dec.reshape(acts.shape[1], self.L, -1)) + self.b_dec.reshape(
            self.L, -1
        )


@use_kernel_forward_from_hub("StandardCrosscoder")
class HostStandardCrosscoder(_PlainCrosscoder):
    def forward(self, x):
        return self.decode(torch.relu(self.pre(x)))


@use_kernel_forward_from_hub("JumpReLUCrosscoder")
class HostJumpReLUCrosscoder(_PlainCrosscoder):
    def __init__(self, cc):
        super().__init__(cc)
        self.threshold = nn.Parameter(cc.threshold.detach().clone())

    def forward(self, x):
        pre = self.pre(x)
        return self.decode(pre * (pre > self.threshold.to(pre.dtype)))


@use_kernel_forward_from_hub("BatchTopKCrosscoder")
class HostBatchTopKCrosscoder(_PlainCrosscoder):
    """Eval mode: dictionary_learning's threshold rule, relu(pre) * sum_l ||W_dec[f, l]|| > threshold."""

    def __init__(self, cc):
        super().__init__(cc)
        self.register_buffer("threshold", cc.threshold.clone())
        self.k, self.rescale_acts_by_decoder_norm = cc.k, cc.rescale_acts_by_decoder_norm

    def forward(self, x):
        post = torch.relu(self.pre(x))
        norms = self.W_dec.reshape(post.shape[1], self.L, -1).norm(dim=2).sum(1)
        return self.decode(post * (post * norms > self.threshold.to(post.dtype)))


@use_kernel_forward_from_hub("TopKCrosscoder")
class HostTopKCrosscoder(_PlainCrosscoder):
    def __init__(self, cc):
        super().__init__(cc)
        self.k = cc.k

    def forward(self, x):
        pre = self.pre(x)
        top = pre.topk(self.k, dim=1)
        return self.decode(torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values)))


CROSSCODER_HOSTS = {
    "StandardCrosscoder": (HostStandardCrosscoder, {}),
    "JumpReLUCrosscoder": (HostJumpReLUCrosscoder, {"init_threshold": 0.05}),
    "BatchTopKCrosscoder": (HostBatchTopKCrosscoder, {"k": 3.0}),
    "TopKCrosscoder": (HostTopKCrosscoder, {"k": 3}),
}


@pytest.mark.parametrize("name", list(CROSSCODER_HOSTS))
def test_crosscoder_layers_kernelize_for_inference(fs, device, name):
    """kernels' validation accepts each crosscoder layer; kernelize(INFERENCE) swaps it in; its xs_hat is the
    module's, bitwise, and the host's plain per-layer forward's by the parity rule."""
    from test_layers import local_build_path

    layer = getattr(fs.layers, name)
    host_cls, kwargs = CROSSCODER_HOSTS[name]
    _validate_layer(check_cls=host_cls, cls=layer, repo=f"flash-sae layers.{name}")
    assert layer.__init__ is nn.Module.__init__
    L, D, F, B = 3, 5, 24, 6
    g = torch.Generator().manual_seed(5)
    cc = perturbed(getattr(fs, name)(D, F, n_layers=L, device=device, seed=2, **kwargs), 5)
    if name == "BatchTopKCrosscoder":
        cc.threshold.fill_(0.02)
    xs = torch.randn(B, L, D, generator=g).to(device)
    host = host_cls(cc).eval()
    cc.eval()
    with torch.no_grad():
        plain = host(xs)
    repo = LocalLayerRepository(repo_path=local_build_path(), layer_name=name)
    with use_kernel_mapping({name: {device: repo}}, inherit_mapping=False):
        kernelize(host, mode=Mode.INFERENCE, device=device, use_fallback=False)
    assert host.forward.__func__ is layer.forward
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the BatchTopK module's cold-threshold warning: its threshold is set
        ours = host(xs)
        assert torch.equal(ours, cc(xs)), "the layer's xs_hat differs from the module's"
        assert (plain != 0).any()
        ref = host_cls.forward(host_cls(cc.double()), xs.double())
    assert_parity(f"{name} layer xs_hat", ours, plain, ref, torch.float32)
