# /// script
# requires-python = ">=3.11"
# dependencies = [
#   "torch==2.13.0",
#   "triton==3.7.1",
#   "kernels==0.17.2",
# ]
# ///
"""flash-sae in one page: load the kernel from the hub, train-step a TopK SAE decoder
loss, check every gradient against the fp64 reference, and time it; then train a
``SparseAutoencoder`` for a few steps with the fused full step and check that step
against its plain-torch twin; then the BatchTopK, Matryoshka BatchTopK, JumpReLU, standard and
Gated modules, five steps each, their first step checked against the fp64 reference.

    uv run example.py

Inside a checkout of flash-sae it builds and loads the local package
(``build_local.load_kernel``) instead of downloading ``org/flash-sae``. On a
GPU it runs a training-sized problem; on a CPU it runs the real Triton kernels
under the interpreter at a small size. The header pins what requirements.txt
pins (torch, triton, kernels); ``uv run`` installs them from PyPI, where torch
2.13.0 for Linux x86-64 is the CUDA build (about 2.8 GB of wheels): on a machine
without a GPU, ``pip install -r requirements.txt && python example.py`` instead
(README, "Install").
"""

import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

from kernels import get_kernel  # noqa: E402


def load_flash_sae():
    if (HERE / "build_local.py").exists() and (HERE / "torch-ext" / "flash_sae").exists():
        sys.path.insert(0, str(HERE))
        import build_local

        print(f"building this checkout ({HERE}) with build_local.py and loading it through get_kernel")
        return build_local.load_kernel()
    print("loading org/flash-sae from the hub")
    return get_kernel("org/flash-sae", version=1, trust_remote_code=True)


def main():
    fs = load_flash_sae()
    device = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    B, D, F, K = (2048, 2304, 65536, 64) if ON_GPU else (32, 96, 512, 12)
    print(f"device {device}, dtype {dtype}, (B, D, F, K) = {(B, D, F, K)}")

    torch.manual_seed(0)
    pre = torch.randn(B, F, device=device)  # stand-in for encoder pre-activations
    vals, indices = pre.relu().topk(K, dim=1)  # sorted largest first, as hierarchical expects
    weight = (torch.randn(F, D, device=device) / D**0.5).to(dtype).requires_grad_()
    vals = vals.to(dtype).requires_grad_()
    bias = torch.zeros(D, device=device, dtype=dtype, requires_grad=True)
    target = torch.randn(B, D, device=device, dtype=dtype)
    params = [weight, vals, bias]

    ok = True
    for op in ("topk_sae_loss", "hierarchical_topk_sae_loss"):
        ours = getattr(fs, op)(indices, weight, vals, bias, target)
        grads = torch.autograd.grad(ours, params)
        p64 = [p.detach().double().requires_grad_() for p in params]
        ref = getattr(fs.testing.reference, op)(indices, *p64, target.double())
        ref_grads = torch.autograd.grad(ref, p64)
        errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(grads, ref_grads)]
        loss_err = abs(ours.item() - ref.item()) / abs(ref.item())
        # Our outputs carry one rounding to the parameter dtype: 2^-8 relative at worst.
        good = loss_err < 1e-5 and all(e < 1e-2 for e in errs)
        ok &= good
        print(
            f"{op:28s} loss {ours.item():.6f} (fp64 ref {ref.item():.6f}); relative error of "
            f"dweight {errs[0]:.1e}, dvals {errs[1]:.1e}, dbias {errs[2]:.1e}  {'OK' if good else 'MISMATCH'}"
        )

    def step(fn):
        for p in params:
            p.grad = None
        fn(indices, weight, vals, bias, target).backward()

    print("forward + backward time:")
    if not ON_GPU:
        print("  (on a CPU flash-sae runs its Triton kernels in the interpreter: a check, not a speed test)")
    for name, fn in [
        ("flash-sae topk_sae_loss", fs.topk_sae_loss),
        ("torch reference topk_sae_loss", fs.testing.reference.topk_sae_loss),
        ("flash-sae hierarchical", fs.hierarchical_topk_sae_loss),
        ("torch reference hierarchical", fs.testing.reference.hierarchical_topk_sae_loss),
    ]:
        step(fn)
        if ON_GPU:
            from triton.testing import do_bench

            ms = do_bench(lambda: step(fn), warmup=25, rep=200)
        else:
            t0, n = time.perf_counter(), 3
            for _ in range(n):
                step(fn)
            ms = (time.perf_counter() - t0) / n * 1e3
        print(f"  {name:32s} {ms:9.3f} ms")
    ok &= train_sparse_autoencoder(fs, device, dtype)
    ok &= train_family(fs, device, dtype)
    if not ok:
        sys.exit("flash-sae does not match the reference")


def train_sparse_autoencoder(fs, device, dtype):
    """A few Adam steps of the whole TopK SAE (encoder, top-k, decoder, loss) with the fused step."""
    B, D, F, K = (2048, 2304, 65536, 64) if ON_GPU else (32, 48, 256, 8)
    print(f"SparseAutoencoder, (B, D, F, K) = {(B, D, F, K)}:")
    sae = fs.SparseAutoencoder(D, F, K, dtype=dtype, device=device, seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(B, D, device=device, generator=g).to(dtype)
    for i in range(5):
        step = sae.loss(x)
        opt.zero_grad(set_to_none=True)
        step.loss.backward()
        if i == 0:  # the first step's gradients against the fp64 twin at the same code
            params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
            p64 = [p.detach().double().requires_grad_() for p in params]
            ref = fs.testing.reference.topk_sae_step(x.double(), *p64, K, indices=step.code.indices)
            ref.loss.backward()
            errs = [((p.grad.double() - q.grad).norm() / q.grad.norm()).item() for p, q in zip(params, p64)]
            good = all(e < 1e-2 for e in errs)
            print(f"  step 0 gradient errors vs fp64 (W_enc, b_enc, W_dec, b_dec): {[f'{e:.1e}' for e in errs]}")
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
        live = (step.fire_counts > 0).sum().item()
        print(f"  step {i}: loss {step.loss.item():.5f}, fvu {step.fvu.item():.4f}, latents that fired {live}")
    print(f"  {'OK' if good else 'MISMATCH'}")
    return good


def train_family(fs, device, dtype):
    """Every other registered SAE architecture (fs.ARCHITECTURES, family "sae"): five Adam steps each, the
    optimizer-step rules around them, and the first step's loss checked against the fp64 reference at the same
    code."""
    B, D, F, K = (2048, 2304, 65536, 64) if ON_GPU else (16, 24, 96, 4)
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(B, D, device=device, generator=g).to(dtype)
    sparsity = {"k": K, "l0_coefficient": 1e-3, "l1_coefficient": 1e-3}
    good = True
    for name, arch in fs.ARCHITECTURES.items():
        if name == "topk" or arch.family != "sae":  # train_topk's; the transcoders read a target
            continue
        sae = arch.build(D, F, sparsity[arch.sparsity], dtype=dtype, device=device, seed=0)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        line = []
        for i in range(5):
            step = sae.loss(x)
            if i == 0:
                good_step = _report(name, step, _reference_loss(fs, arch, sae, x, step))
                good &= good_step
            opt.zero_grad(set_to_none=True)
            step.loss.backward()
            sae.before_optimizer_step()
            opt.step()
            sae.after_optimizer_step()
            line.append(f"{step.loss.item():.4f} (L0 {step.l0.item():.1f})")
        extra = f", threshold {sae.threshold.item():.4f}" if hasattr(sae, "threshold_lr") else ""
        extra += f", last step {sae.last_path}" if hasattr(sae, "last_path") else ""
        print(f"{name}: losses {', '.join(line)}{extra}  {'OK' if good_step else 'MISMATCH'}")
    return good


def _reference_loss(fs, arch, sae, x, step):
    """The first step's loss by the fp64 plain-torch step of the architecture, at the same code where the
    code is a selection (BatchTopK, Matryoshka), else at the same threshold or coefficients."""
    ref = fs.testing.reference
    latent = (sae.b_enc,) if hasattr(sae, "b_enc") else ()  # the Gated SAE's per-latent vectors are gated_params()
    p64 = [t.detach().double() for t in (x, sae.W_enc, *latent, sae.W_dec, sae.b_dec)]
    rows = lambda: torch.repeat_interleave(torch.arange(x.shape[0], device=x.device), step.code.row_offsets.diff())  # noqa: E731
    rescale = getattr(sae, "rescale_acts_by_decoder_norm", False)
    references = {
        "batchtopk_sae_step": lambda: ref.batchtopk_sae_step(
            *p64, sae.k, rescale, selection=(rows(), step.code.indices)
        ),
        "matryoshka_batchtopk_sae_step": lambda: ref.matryoshka_batchtopk_sae_step(
            *p64, sae.k, sae.prefix_sizes, rescale, selection=(rows(), step.code.indices)
        ),
        "jumprelu_sae_step": lambda: ref.jumprelu_sae_step(
            *p64, sae.current_threshold().detach().double(), bandwidth=sae.bandwidth, l0_coefficient=sae.l0_coefficient
        ),
        "standard_sae_step": lambda: ref.standard_sae_step(*p64, sae.l1_coefficient),
        "gated_sae_step": lambda: ref.gated_sae_step(
            *[t.detach().double() for t in (x, *sae.gated_params())], sae.l1_coefficient, sae.freeze_aux_decoder
        ),
    }  # fmt: skip
    return references[arch.step.__name__]().loss


def _report(name, step, want):
    err = abs(step.loss.item() - want.item()) / abs(want.item())
    print(f"  {name} step 0: loss {step.loss.item():.6f}, fp64 {want.item():.6f}, relative error {err:.1e}")
    return err < 1e-2


if __name__ == "__main__":
    main()
