"""Dead-latent tracking in every module: tokens since each latent last fired, updated on the device by
``loss`` in training mode only, the same in the kernels' modules and their plain-torch twins; the
dead mask and fraction; the window; ``state_dict`` round trips and checkpoints without the counts."""

import inspect
import re
import types

import pytest
import torch
from peers import require

MODULES = [
    ("SparseAutoencoder", dict(k=4)),
    ("BatchTopKSparseAutoencoder", dict(k=4)),
    ("MatryoshkaBatchTopKSparseAutoencoder", dict(k=4, prefix_sizes=[8, 24, 48])),
    ("JumpReLUSparseAutoencoder", dict(init_threshold=0.05)),
    ("StandardSparseAutoencoder", dict(l1_coefficient=0.5)),
    ("GatedSparseAutoencoder", dict(l1_coefficient=0.5)),
]


def build(fs, name, kwargs, device, twin=False, **extra):
    cls = getattr(fs.testing.reference if twin else fs, name)
    sae = cls(16, 48, **kwargs, dtype=torch.float32, device=device, seed=2, **extra)
    if name in ("StandardSparseAutoencoder", "GatedSparseAutoencoder"):  # from SAELens's init a ReLU code
        with torch.no_grad():  # fires everywhere: silence a third
            sae.latent_vectors()[0][::3] = -1.0
    return sae


def batches(device, n=4, B=6):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(B, 16, generator=g).to(device) for _ in range(n)]


@pytest.mark.parametrize("name,kwargs", MODULES, ids=[m[0] for m in MODULES])
def test_counts_follow_the_fire_counts(fs, device, name, kwargs):
    """After each training step: 0 where the latent fired, + B elsewhere; the twin agrees; eval leaves them."""
    sae = build(fs, name, kwargs, device)
    twin = build(fs, name, kwargs, device, twin=True)
    expect = torch.zeros(48, dtype=torch.int64, device=device)
    for x in batches(device):
        step = sae.loss(x)
        twin.loss(x)
        assert step.fire_counts.shape == (48,)
        expect = torch.where(step.fire_counts > 0, 0, expect + x.shape[0])
        assert torch.equal(sae.tokens_since_fired, expect)
        assert torch.equal(twin.tokens_since_fired, expect), "the plain-torch twin counts differently"
    assert (expect > 0).any() and (expect == 0).any(), "the data should leave some latents silent"
    sae.eval()
    sae.loss(batches(device)[0])
    assert torch.equal(sae.tokens_since_fired, expect), "eval mode must not count"


@pytest.mark.kernels_ci
def test_dead_mask_and_fraction(fs, device):
    sae = build(fs, "SparseAutoencoder", dict(k=4), device, dead_window_tokens=12)
    assert sae.dead_window_tokens == 12 and not sae.dead_mask().any()
    assert sae.dead_fraction().item() == 0.0
    for x in batches(device, n=2):  # 12 tokens: a latent silent in both batches reaches the window
        sae.loss(x)
    silent = sae.tokens_since_fired == 12
    assert silent.any() and not sae.dead_mask().any(), "at the window a latent is not dead yet (the rule is >)"
    sae.loss(batches(device, n=3)[2])  # 18 tokens: past the window
    silent = sae.tokens_since_fired > 12
    assert silent.any() and torch.equal(sae.dead_mask(), silent)
    assert sae.dead_fraction().item() == pytest.approx(silent.float().mean().item())
    assert sae.dead_fraction().dtype == torch.float32 and sae.dead_mask().device == sae.W_dec.device


@pytest.mark.parametrize("name,kwargs", MODULES, ids=[m[0] for m in MODULES])
def test_state_dict_carries_the_counts(fs, device, name, kwargs):
    sae = build(fs, name, kwargs, device)
    for x in batches(device, n=2):
        sae.loss(x)
    state = sae.state_dict()
    assert "tokens_since_fired" in state and state["tokens_since_fired"].dtype == torch.int64
    fresh = build(fs, name, kwargs, device)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.tokens_since_fired, sae.tokens_since_fired)
    # A checkpoint without the counts (another trainer's, or an older flash-sae's) loads strictly, from zero.
    fresh.load_state_dict({k: v for k, v in state.items() if k != "tokens_since_fired"})
    assert not fresh.tokens_since_fired.any()
    # Casting the module's dtype leaves the integer counts alone.
    assert sae.to(torch.bfloat16).tokens_since_fired.dtype == torch.int64


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, None])
def test_dead_window_must_be_a_positive_int(fs, device, bad):
    for name, kwargs in MODULES:
        with pytest.raises(ValueError, match="dead_window_tokens"):
            build(fs, name, kwargs, device, dead_window_tokens=bad)


def _sparsify_dead_rule():
    """The comparison sparsify's trainer applies to ``num_tokens_since_fired`` and ``dead_feature_threshold``,
    read from the installed package's source, as a function (counts, threshold) -> mask."""
    trainer = require("sparsify.trainer")
    src = inspect.getsource(trainer.Trainer)
    ops = set(re.findall(r"num_tokens_since_fired\[\w+\]\s*(>=|>|<=|<)\s*self\.cfg\.dead_feature_threshold", src))
    assert len(ops) == 1, f"sparsify's dead rule not found (or not one rule): {ops}"
    op = ops.pop()
    return {">": torch.gt, ">=": torch.ge, "<": torch.lt, "<=": torch.le}[op]


def _saelens_dead_rule(counts, window):
    """SAELens's own ``SAETrainer.dead_neurons`` (its installed property), on these counts and window."""
    trainer = require("sae_lens.training.sae_trainer")
    fake = types.SimpleNamespace(
        n_forward_passes_since_fired=counts, cfg=types.SimpleNamespace(dead_feature_window=window)
    )
    return trainer.SAETrainer.dead_neurons.fget(fake)


@pytest.mark.parametrize("name,kwargs", MODULES, ids=[m[0] for m in MODULES])
def test_dead_rule_matches_sparsify_and_saelens_at_the_boundary(fs, device, name, kwargs):
    """A latent silent for exactly the window is not dead, one token more is: the installed sparsify's and
    SAELens's rule (``>``), not ``>=``."""
    window = 12
    sae = build(fs, name, kwargs, device, dead_window_tokens=window)
    counts = torch.tensor([0, window - 1, window, window + 1, 5 * window], device=device)
    counts = torch.cat([counts, torch.zeros(48 - counts.numel(), dtype=torch.int64, device=device)])
    with torch.no_grad():
        sae.tokens_since_fired.copy_(counts)
    ours = sae.dead_mask()
    assert ours[:5].tolist() == [False, False, False, True, True]
    assert torch.equal(ours, _sparsify_dead_rule()(counts, window))
    assert torch.equal(ours, _saelens_dead_rule(counts, window))
