"""The architecture registry: every registered architecture builds, trains a step through the module
template (``loss(x)`` for an SAE, ``loss(x, y)`` for a transcoder), returns the common result layout,
and round-trips through its SAELens export."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

SPARSITY = {"k": 3, "l0_coefficient": 1e-3, "l1_coefficient": 1e-3, "sparsity_coefficient": 1e-3}


TRANSCODERS = ["topk_transcoder", "batchtopk_transcoder", "jumprelu_transcoder", "standard_transcoder"]
D_OUT = 4  # the transcoders' output width (D_in is each test's D)
N_LAYERS = 2  # the CLTs' and crosscoders' layers
MULTI_LAYER = ["topk_clt", "batchtopk_clt", "jumprelu_clt", "standard_crosscoder", "topk_crosscoder",
               "batchtopk_crosscoder", "jumprelu_crosscoder"]  # fmt: skip
ALL = ["topk", "batchtopk", "matryoshka", "jumprelu", "standard", "gated", "vanilla", *TRANSCODERS, *MULTI_LAYER]


@pytest.fixture(params=ALL)
def arch(fs, request):
    return fs.ARCHITECTURES[request.param]


def test_the_tests_cover_every_registered_architecture(fs):
    assert sorted(ALL) == sorted(fs.ARCHITECTURES)


def family_kwargs(arch) -> dict:
    """The constructor keywords a family needs beyond an SAE's: a transcoder's output width and skip term, the
    layers of a CLT or crosscoder."""
    if arch.family == "transcoder":
        return {"d_out": D_OUT, "skip": True}
    return {"n_layers": N_LAYERS} if arch.family in ("clt", "crosscoder") else {}


def loss_args(arch, x):
    """What ``loss`` reads for the architecture's family, from rows x [B, D]: (x,) for an SAE, (x, y) for a
    transcoder, (xs, ys) [B, L, D] for a CLT (xs the rows and their negation), (xs,) for a crosscoder."""
    g = torch.Generator().manual_seed(2)
    if arch.family == "transcoder":
        return x, torch.randn(x.shape[0], D_OUT, generator=g).to(x.device)
    if arch.family in ("clt", "crosscoder"):
        xs = torch.stack([x, -0.5 * x], 1)
        return (xs, torch.randn(xs.shape, generator=g).to(x.device)) if arch.family == "clt" else (xs,)
    return (x,)


def n_latents(arch, F: int) -> int:
    """The latents a step's code and fire counts range over: a CLT's F per layer, L * F in all."""
    return N_LAYERS * F if arch.family == "clt" else F


def test_registry_holds_every_module(fs):
    modules = {a.module for a in fs.ARCHITECTURES.values()}
    exported = {getattr(fs, n) for n in fs.__all__ if n.endswith(("SparseAutoencoder", "Transcoder", "Crosscoder"))}
    assert modules == exported, "a module without an architecture, or an architecture without a module"
    assert {n for n, a in fs.ARCHITECTURES.items() if a.family == "transcoder"} >= set(TRANSCODERS)
    import train_sae

    for name, arch in fs.ARCHITECTURES.items():  # train_sae.py offers every registered SAE
        if arch.family == "sae":
            assert train_sae.parse_args([f"--arch={name}"]).arch == name


@pytest.mark.kernels_ci
def test_module_step_returns_the_common_layout(fs, device, arch):
    B, D, F = 5, 7, 24
    kwargs = {"dead_window_tokens": 1, "seed": 0, "device": device}
    if arch.dead_loss:
        kwargs["dead_loss"] = "auxk"
    sae = arch.build(D, F, SPARSITY[arch.sparsity], **kwargs, **family_kwargs(arch))
    assert isinstance(sae, arch.module)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1)).to(device)
    opt = torch.optim.SGD(sae.parameters(), lr=1e-2)
    args = loss_args(arch, x)
    for _ in range(3):  # the second and third steps see dead latents (a window of one token)
        step = sae.loss(*args)
        assert isinstance(step, arch.result)
        assert type(step)._fields[: len(fs.STEP_FIELDS)] == fs.STEP_FIELDS
        step.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        opt.zero_grad()
        sae.after_optimizer_step()
    for name in ("loss", "mse", "fvu", "l0"):
        value = getattr(step, name)
        assert value.shape == () and value.dtype == torch.float32 and torch.isfinite(value), name
    assert step.fire_counts.shape == (n_latents(arch, F),) and step.fire_counts.dtype == torch.int64
    if step.code is not None:  # the dense formulations keep no sparse code
        dense = step.code.to_dense(n_latents(arch, F))
        assert dense.shape == (B, n_latents(arch, F))
        assert torch.equal((dense > 0).sum(0), step.fire_counts), "fire_counts is not the code's per-latent count"
        assert float(step.l0) == pytest.approx(float((dense > 0).sum()) / B), "l0 is not the code's per-row count"
    if arch.dead_loss:
        assert step.aux_loss is not None and torch.isfinite(step.aux_loss)
    if arch.name in ("topk", "vanilla", "topk_transcoder"):  # the optimizer hooks keep the decoder rows unit-norm
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F, device=device))


def test_build_takes_defaults_and_overrides(fs, arch):
    sae = arch.build(6, 32, SPARSITY[arch.sparsity], dtype=torch.float32, seed=2, **family_kwargs(arch))
    assert sae.n_features == 32 and sae.W_enc.dtype == torch.float32
    assert getattr(sae, arch.sparsity) == SPARSITY[arch.sparsity]
    if arch.family == "transcoder":
        assert sae.W_dec.shape == (32, D_OUT) and sae.W_skip.shape == (D_OUT, 6)
    if arch.family in ("clt", "crosscoder"):
        assert sae.n_layers == N_LAYERS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_capturable_architectures_train_in_a_cuda_graph(fs, arch):
    """Every architecture the registry calls capturable trains under ``graph_training_step`` (loss, backward,
    the optimizer-step rules, Adam): the replayed steps give the eager steps' losses."""
    if not arch.capturable:
        pytest.skip(f"{arch.name} sizes its code on the host (capturable=False)")
    B, D, F = 64, 32, 96
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1)).cuda()
    args = loss_args(arch, x)
    widths = [a.shape[1:] for a in args]
    batch = torch.cat([a.reshape(B, -1) for a in args], 1)  # one tensor: graph_training_step's input

    def split(rows):
        return [part.reshape(B, *w) for part, w in zip(rows.split([w.numel() for w in widths], 1), widths)]

    losses = {}
    for graphed in (False, True):
        sae = arch.build(D, F, SPARSITY[arch.sparsity], seed=0, device="cuda", **family_kwargs(arch))
        opt = torch.optim.Adam(sae.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)

        def train_step(rows, sae=sae, opt=opt):
            step = sae.loss(*split(rows))
            step.loss.backward()
            sae.before_optimizer_step()
            opt.step()
            opt.zero_grad(set_to_none=False)
            sae.after_optimizer_step()
            return step.loss.detach()

        run = fs.graph_training_step(train_step, batch, sae, opt) if graphed else train_step
        losses[graphed] = torch.stack([run(batch).clone() for _ in range(3)])
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)


def test_register_architecture_rejects_duplicates(fs):
    with pytest.raises(ValueError, match="arch.name"):
        fs.register_architecture(fs.ARCHITECTURES["topk"])
    with pytest.raises(ValueError, match="arch"):
        fs.register_architecture("topk")


def vanilla_sgd_step(params, x, l1, lr):
    """One SGD step of the Towards Monosemanticity SAE in plain torch: MSE summed over D, mean over B, plus
    l1 * mean over B of ||f||_1; the decoder gradient's component along each row projected out; the rows
    rescaled to unit norm."""
    W_enc, b_enc, W_dec, b_dec = params
    f = torch.relu((x - b_dec) @ W_enc.T + b_enc)
    loss = (f @ W_dec + b_dec - x).pow(2).sum(1).mean() + l1 * f.abs().sum(1).mean()
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        u = W_dec / W_dec.norm(dim=1, keepdim=True)
        g_dec = grads[2] - (grads[2] * u).sum(1, keepdim=True) * u
        new = [p - lr * g for p, g in zip(params, (grads[0], grads[1], g_dec, grads[3]))]
        new[2] = new[2] / new[2].norm(dim=1, keepdim=True)
    return loss, [p.requires_grad_() for p in new]


@pytest.mark.parametrize("dense_above", [0.0, 1.0], ids=["dense", "sparse"])
def test_vanilla_trains_as_the_plain_l1_sae(fs, device, dense_above):
    """The vanilla module (the standard step, norm-weighted penalty, + the unit-norm rule) trains exactly as
    the plain-L1 SAE with unit-norm decoder rows, on the dense and the sparse path."""
    B, D, F, l1, lr = 16, 10, 40, 0.05, 0.05
    sae = fs.VanillaSparseAutoencoder(D, F, l1_coefficient=l1, seed=3, device=device, dense_above=dense_above)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(4)).to(device)
    params = [p.detach().double().requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    opt = torch.optim.SGD(sae.parameters(), lr=lr)
    for step in range(4):
        ours = sae.loss(x)
        want, params = vanilla_sgd_step(params, x.double(), l1, lr)
        torch.testing.assert_close(ours.loss.double(), want.detach(), rtol=1e-5, atol=1e-6, msg=f"loss, step {step}")
        ours.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        opt.zero_grad()
        sae.after_optimizer_step()
        for name, got, ref in zip(("W_enc", "b_enc", "W_dec", "b_dec"), sae.parameters(), params):
            torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-4, atol=1e-5, msg=f"{name}, step {step}")
    assert sae.last_path == ("dense" if dense_above == 0.0 else "sparse")


def test_architecture_family_is_checked(fs):
    arch = fs.ARCHITECTURES["topk"]
    assert arch.family == "sae"
    with pytest.raises(ValueError, match="family"):
        type(arch)(**{**{f: getattr(arch, f) for f in arch.__dataclass_fields__}, "family": "autoencoder"})
