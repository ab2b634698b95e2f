"""AuxK, ghost grads and resampling each bring dead latents back, on data built to kill them.

The problem: a TopK SAE (D=16, F=64, k=2) on a synthetic sparse dictionary (48 unit directions, two
active per row, weights in [0.5, 1.5), noise 0.02), from a poor initialisation: the encoder rows of
half the latents are scaled by 0.02, so their pre-activations never reach a row's top 2 and they are
dead after the window (4 batches of 64 rows). 300 Adam steps (lr 3e-3) with the usual decoder steps
(projected gradient, unit rows), each treatment from the same start on the same batches:

- none: half the latents stay dead for the whole run;
- AuxK (``dead_loss="auxk"``, its defaults: k_aux = D // 2, alpha 1/32);
- ghost grads (``dead_loss="ghost"``, coefficient 1);
- resampling (``resample_dead_`` every 50 steps on 256 fresh rows, the optimiser's moments reset).

The measure is the dead fraction averaged over the last 100 steps; a resampled latent has its count
reset, so the steps right after a resampling are left out of the average (a latent that does not fire
again is dead again 4 steps later). The README quotes the numbers this test prints (``-s``).

On CPU the run takes the package's plain-torch path (the kernels' parity is the other tests' job, and
300 interpreted steps would take minutes); on a GPU it runs the kernels.
"""

import pytest
import torch
from parity import package_module

D, F, K, B, N_TRUE, STEPS, LR = 16, 64, 2, 64, 48, 300, 3e-3
EVERY = 50  # steps between resamplings


def batch(step):
    dirs = torch.randn(N_TRUE, D, generator=torch.Generator().manual_seed(0))
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(1000 + step)
    active = torch.rand(B, N_TRUE, generator=g).argsort(1)[:, :2]
    weights = torch.rand(B, 2, generator=g) + 0.5
    return (weights.unsqueeze(-1) * dirs[active]).sum(1) + 0.02 * torch.randn(B, D, generator=g)


def train(fs, device, treatment):
    dead_loss = treatment if treatment in ("auxk", "ghost") else None
    sae = fs.SparseAutoencoder(D, F, K, seed=0, device=device, dead_window_tokens=4 * B, dead_loss=dead_loss)
    with torch.no_grad():
        sae.W_enc[F // 2 :] *= 0.02  # the poor initialisation: these latents never make a row's top k
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    fractions, fvus = [], []
    for step in range(STEPS):
        out = sae.loss(batch(step).to(device))
        opt.zero_grad()
        out.loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
        just_resampled = False
        if treatment == "resample" and (step + 1) % EVERY == 0:
            fresh = torch.cat([batch(10_000 + step + i) for i in range(4)]).to(device)
            sae.resample_dead_(fresh, opt, generator=torch.Generator(device=device).manual_seed(step))
            just_resampled = True
        if step >= STEPS - 100 and not just_resampled and (step + 1) % EVERY >= 4:
            fractions.append(sae.dead_fraction())
            fvus.append(out.fvu.detach())
    return float(torch.stack(fractions).mean()), float(torch.stack(fvus).mean())


@pytest.fixture
def fast_cpu_path(fs, device, monkeypatch):
    if device == "cpu":
        monkeypatch.setattr(package_module(fs, "_launch"), "CPU_RUNS_TRITON", False)


@pytest.mark.slow  # 4 treatments x 300 steps: the full tier's; the fast tier keeps the two below
def test_each_treatment_reduces_the_dead_fraction(fs, device, fast_cpu_path):
    results = {t: train(fs, device, t) for t in ("none", "auxk", "ghost", "resample")}
    for t, (dead, fvu) in results.items():
        print(f"{t:9s} dead fraction {dead:.3f}  fvu {fvu:.4f}")
    none = results["none"][0]
    assert none >= 0.45, "the poor initialisation should keep about half the latents dead"
    # Measured on CPU (plain-torch path): none 0.500, AuxK 0.327, ghost 0.214, resampling 0.090.
    assert results["auxk"][0] <= 0.8 * none
    assert results["ghost"][0] <= 0.6 * none
    assert results["resample"][0] <= 0.3 * none
    # Reviving latents does not cost reconstruction: every treatment's FVU is at most no treatment's + 5%.
    for t in ("auxk", "ghost", "resample"):
        assert results[t][1] <= 1.05 * results["none"][1]


@pytest.mark.kernels_ci
def test_resampling_resets_only_dead_rows_and_their_moments(fs, device):
    sae = fs.SparseAutoencoder(8, 20, 2, seed=1, device=device, dead_window_tokens=10)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(2)).to(device)
    sae.loss(x).loss.backward()
    opt.step()
    with torch.no_grad():
        sae.tokens_since_fired.copy_(torch.tensor([0, 20] * 10, device=device))
        sae.b_enc.fill_(0.5)
    dead = sae.dead_mask().clone()
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    moments = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in sae.named_parameters()}
    n = sae.resample_dead_(x, opt)
    assert int(n) == 10
    for name, p in sae.named_parameters():
        changed = (p.detach() != before[name]).reshape(p.shape[0], -1).any(1) if p.shape[0] == 20 else None
        if name in ("W_enc", "W_dec", "b_enc"):
            assert torch.equal(changed & ~dead, torch.zeros_like(dead)), f"{name}: a live row changed"
            for key in ("exp_avg", "exp_avg_sq"):
                m = opt.state[p][key]
                assert (m[dead] == 0).all() and torch.equal(m[~dead], moments[name][key][~dead])
        else:
            assert torch.equal(p.detach(), before[name]) and torch.equal(
                opt.state[p]["exp_avg"], moments[name]["exp_avg"]
            )
    assert (sae.b_enc[dead] == 0).all() and (sae.tokens_since_fired[dead] == 0).all()
    assert torch.allclose(sae.W_dec[dead].norm(dim=1), sae.W_dec[~dead].norm(dim=1).mean().expand(10), rtol=1e-5)
    ratio = sae.W_enc[dead].norm(dim=1) / sae.W_enc[~dead].norm(dim=1).mean()
    assert torch.allclose(ratio, torch.ones_like(ratio), rtol=1e-5)  # the TopK modules' scale 1.0
    # each new direction is one of the inputs' (x - b_dec), normalised
    v = (x - sae.b_dec.detach()) / (x - sae.b_dec.detach()).norm(dim=1, keepdim=True)
    cos = sae.W_dec[dead].detach() @ v.T / sae.W_dec[dead].norm(dim=1, keepdim=True).detach()
    assert torch.allclose(cos.max(1).values, torch.ones(10, device=device), atol=1e-5)


def test_module_dead_loss_options(fs, device):
    """A module with ``dead_loss`` passes its dead mask in training mode only; bad options are ValueErrors."""
    sae = fs.SparseAutoencoder(
        8, 20, 2, seed=1, device=device, dead_window_tokens=1, dead_loss=fs.DeadLatentLoss(k_aux=3)
    )
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(3)).to(device)
    first = sae.loss(x)  # nothing is dead before the first step
    assert float(first.aux_loss.detach()) == 0.0
    second = sae.loss(x)
    assert float(second.aux_loss.detach()) > 0.0
    direct = fs.topk_sae_step(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, 2)
    sae.eval()
    assert sae.loss(x).aux_loss is None and torch.equal(sae.loss(x).loss, direct.loss)
    with pytest.raises(ValueError, match="dead_loss"):
        fs.SparseAutoencoder(8, 20, 2, dead_loss="aux")
    with pytest.raises(ValueError, match="dead_loss"):
        fs.MatryoshkaBatchTopKSparseAutoencoder(8, 20, 2, prefix_sizes=[5, 20], dead_loss="auxk")
    with pytest.raises(ValueError, match="x must be"):
        sae.resample_dead_(torch.randn(3, 7))
