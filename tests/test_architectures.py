"""The architecture registry: every registered architecture builds, trains a step through the module
template, returns the common result layout, and round-trips through its SAELens export."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

SPARSITY = {"k": 3, "l0_coefficient": 1e-3, "l1_coefficient": 1e-3}


@pytest.fixture(params=["topk", "batchtopk", "matryoshka", "jumprelu", "standard", "gated"])
def arch(fs, request):
    return fs.ARCHITECTURES[request.param]


def test_registry_holds_every_module(fs):
    modules = {a.module for a in fs.ARCHITECTURES.values()}
    exported = {getattr(fs, n) for n in fs.__all__ if n.endswith("SparseAutoencoder")}
    assert modules == exported, "a module without an architecture, or an architecture without a module"
    import train_sae

    for name in fs.ARCHITECTURES:  # train_sae.py offers every registered architecture
        assert train_sae.parse_args([f"--arch={name}"]).arch == name


@pytest.mark.kernels_ci
def test_module_step_returns_the_common_layout(fs, device, arch):
    B, D, F = 5, 7, 24
    kwargs = {"dead_window_tokens": 1, "seed": 0, "device": device}
    if arch.dead_loss:
        kwargs["dead_loss"] = "auxk"
    sae = arch.build(D, F, SPARSITY[arch.sparsity], **kwargs)
    assert isinstance(sae, arch.module)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1)).to(device)
    opt = torch.optim.SGD(sae.parameters(), lr=1e-2)
    for _ in range(3):  # the second and third steps see dead latents (a window of one token)
        step = sae.loss(x)
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
    assert step.fire_counts.shape == (F,) and step.fire_counts.dtype == torch.int64
    if step.code is not None:  # the dense formulations keep no sparse code
        dense = step.code.to_dense(F)
        assert dense.shape == (B, F)
        assert torch.equal((dense > 0).sum(0), step.fire_counts), "fire_counts is not the code's per-latent count"
        assert float(step.l0) == pytest.approx(float((dense > 0).sum()) / B), "l0 is not the code's per-row count"
    if arch.dead_loss:
        assert step.aux_loss is not None and torch.isfinite(step.aux_loss)
    if arch.sparsity == "k" and arch.name == "topk":  # the optimizer hooks keep the decoder rows unit-norm
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F, device=device))


def test_build_takes_defaults_and_overrides(fs, arch):
    sae = arch.build(6, 32, SPARSITY[arch.sparsity], dtype=torch.float32, seed=2)
    assert sae.n_features == 32 and sae.W_dec.dtype == torch.float32
    assert getattr(sae, arch.sparsity) == SPARSITY[arch.sparsity]


def test_register_architecture_rejects_duplicates(fs):
    with pytest.raises(ValueError, match="arch.name"):
        fs.register_architecture(fs.ARCHITECTURES["topk"])
    with pytest.raises(ValueError, match="arch"):
        fs.register_architecture("topk")
