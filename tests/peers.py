"""The installed peer packages (SAELens, sparsify) the tests compare against.

Claims about them are tested against the real packages with their default
configurations. tests/requirements.txt installs them; a run without them skips
those tests locally and fails under CI (which sets ``CI``), so a missing peer can
never pass as checked.
"""

import importlib
import os

import pytest


def require(module: str):
    """``importlib.import_module(module)``, or skip the test (fail it when ``CI`` is set) if it is not
    installed. Every import of a peer package in the tests goes through here
    (``test_suite_rules.py: test_peer_imports_go_through_require`` checks it)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed; tests/requirements(-nodeps).txt installs it: {err}")
        pytest.skip(f"{module} is not installed (pip install -r tests/requirements.txt)")


def saelens_training_sae(architecture: str, **cfg):
    """SAELens's own training SAE for ``architecture`` with its default training config (plus ``cfg``)."""
    saes = require("sae_lens.saes")
    classes = {
        "topk": (saes.TopKTrainingSAE, saes.TopKTrainingSAEConfig),
        "batchtopk": (saes.BatchTopKTrainingSAE, saes.BatchTopKTrainingSAEConfig),
        "matryoshka_batchtopk": (saes.MatryoshkaBatchTopKTrainingSAE, saes.MatryoshkaBatchTopKTrainingSAEConfig),
        "jumprelu": (saes.JumpReLUTrainingSAE, saes.JumpReLUTrainingSAEConfig),
        "standard": (saes.StandardTrainingSAE, saes.StandardTrainingSAEConfig),
        "gated": (saes.GatedTrainingSAE, saes.GatedTrainingSAEConfig),
    }
    sae_cls, cfg_cls = classes[architecture]
    return sae_cls(cfg_cls(**cfg))


def saelens_step(sae, x, dead_neuron_mask=None, **coefficients):
    """One SAELens training forward pass: its TrainStepOutput. Without ``dead_neuron_mask`` there are
    no dead latents, so no auxiliary loss."""
    step = require("sae_lens.saes.sae").TrainStepInput(
        sae_in=x,
        coefficients=coefficients,
        dead_neuron_mask=dead_neuron_mask,
        n_training_steps=0,
        is_logging_step=False,
    )
    return sae.training_forward_pass(step)


def sparsify_coder(d_in: int, device, dtype, **cfg):
    """EleutherAI sparsify's SparseCoder with its default SparseCoderConfig (plus ``cfg``), and the default
    TrainConfig. The tests run it on CPU tensors (see test_dead_latent_peers.py), where its Triton decoder
    cannot run, so sparsify's own switch (``SPARSIFY_DISABLE_TRITON``, read at import) selects its eager
    decoder."""
    if device != "cpu":
        raise ValueError("the tests run sparsify on CPU tensors")
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    sparsify = require("sparsify")
    config = require("sparsify.config")
    coder = sparsify.SparseCoder(d_in, config.SparseCoderConfig(**cfg), device=device, dtype=dtype)
    return coder, config.TrainConfig(config.SparseCoderConfig(**cfg))


def saelens_fp64_step(architecture, sae, x, names, cfg, **step_kw):
    """The ground truth for a SAELens comparison: SAELens's ``architecture`` training SAE in fp64 holding
    ``sae``'s parameter values, its step on ``x`` in fp64, and the gradients of the parameters ``names``."""
    import torch

    sae64 = saelens_training_sae(architecture, dtype="float64", **cfg)
    with torch.no_grad():
        for n in names:
            getattr(sae64, n).copy_(getattr(sae, n).double())
    ref = saelens_step(sae64, x.double(), **step_kw)
    return ref, torch.autograd.grad(ref.loss, [getattr(sae64, n) for n in names])


def assert_saelens_latents(code, theirs, ref, dtype):
    """In fp32 the dense code's nonzero latents are SAELens's and its fp64 twin's (in 16 bits a value near
    0 may round either way, so only the parity of the values is compared there)."""
    import torch

    if dtype == torch.float32:
        assert torch.equal(code != 0, theirs.feature_acts != 0), "other active latents than SAELens's"
        assert torch.equal(code != 0, ref.feature_acts != 0), "other active latents than SAELens's in fp64"
