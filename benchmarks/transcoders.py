#!/usr/bin/env python3
"""Side-by-side benchmark of the transcoder, skip-transcoder, cross-layer-transcoder (CLT) and crosscoder
training steps, against their dense formulations, torch.compile of them and the installed peers, in one run.

Every timing is one training step, forward + backward, every encoder GEMM included, gradients for every
parameter (the activations are data: no gradient), bf16, on the same inputs:

1. ``transcoder``: ``topk_transcoder`` at D_in = D_out beside flash-sae's TopK SAE step at the same
   (B, D, F, K) (target: within 1.1x of it), the dense formulation (dense pre-activations, torch.topk, a
   dense [B, F] code times the decoder), torch.compile of it, and the installed sparsify transcoder
   (``SparseCoderConfig(transcode=True)``, its fused encoder and decoder under its own bf16 autocast).
2. ``skip_transcoder``: ``topk_transcoder`` with ``skip=True`` beside the transcoder plus one dense
   [D, D] GEMM forward + backward (target: within 1.1x of that sum), its dense formulation, torch.compile
   of it, and sparsify with ``skip_connection=True``.
3. ``clt``: ``topk_clt`` and ``jumprelu_clt`` at GPT-2-small scale (L = 12, D = 768, F = 16384 per layer,
   K = 64 per layer, B = 4096) beside the dense formulation as circuit-tracer's ``CrossLayerTranscoder``
   lays a CLT out and the CLT papers write it (per-layer encoders W_enc [L, F, D], the decoder of source
   layer s W_dec[s] [F, L - s, D], a dense triangle decode: target t sums every source s <= t),
   torch.compile of it, and the installed decode-clt package's training loss (``clt.models.clt.
   CrossLayerTranscoder`` with its default ``CLTConfig``, JumpReLU, and with a global TopK of L * K per
   token; ``LossManager.compute_total_loss`` as its trainer calls it) (target: dense >= 4x ours). It
   also reports the memory kept from the forward for the backward beside the size of one [B, L * F]
   tensor, and probes the largest F per layer ours fits on the GPU (doubling, at most ``PROBES`` probes,
   each guarded by the parameter and gradient bytes against the free memory).
4. ``crosscoder``: ``batchtopk_crosscoder`` and ``standard_crosscoder`` over L = 4, D = 2304,
   F = 65536, K = 64 beside the crosscoder formula of dictionary_learning's ``CrossCoder`` (GitHub
   saprmarks/dictionary_learning; the packaged dictionary-learning 0.1.0 has none) restated densely:
   one latent space read from every layer, pre = sum_l x_l @ W_enc[l] + b_enc with W_enc [L, D, F], the
   decoder W_dec [F, L, D] writing every layer, the L1 penalty weighted by sum_l ||W_dec[f, l]||; and
   torch.compile of it (target: dense >= 3x ours). The standard crosscoder's b_enc is shifted so that
   about B * K pre-activations are positive (L0 ~ K), as the JumpReLU CLT's thresholds are set
   (L0 ~ K per layer): the sparse steps are timed at the sparsity they are built for.

Before any timing, each flash-sae module is verified against the dense formulation at a small shape in
fp32 on its own parameters (``verify``): the forward output, ``mse`` (and ``layer_fvu``, ``layer_l0``
where the result has them), and the loss's gradient for every parameter, which must be one constant
times the gradient of the dense sum of squared errors (a pure-MSE loss; the JumpReLU and standard
modules are verified with their penalty coefficient 0, the threshold's straight-through gradient left
out). A module that fails stops the run.

Each row prints eager ms (median, p20-p80), CUDA-graph ms (where the step captures), peak GiB above the
inputs (gradients included), GiB kept from the forward for the backward, and % of the row's floor:
the longer of its GEMM FLOPs at the tensor-core peak (``side_by_side.PEAK_FLOPS``) and its unavoidable
bytes at the copy bandwidth measured in the same run (``side_by_side.copy_bandwidth``); the byte counts
are in ``floor_*`` below. A gathered decoder or encoder row is counted once per distinct latent at most
(min(B * K, F) rows per layer pair), so the floor is a bound at every shape.

``--smoke``: tiny shapes on the CPU (the Triton interpreter), fp32, no CUDA graph, no torch.compile;
verifies and writes the rows (``<out>/cpu/transcoders_smoke.jsonl``). A registry name that is not
registered yet, or a peer that is not installed, leaves its rows out with a message; ``--require-all``
makes that an error (exit 1).

Usage: python benchmarks/transcoders.py [--smoke] [--require-all] [--no-compile] [--no-peers]
       [--rows transcoder,skip_transcoder,clt,crosscoder] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as nnf

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_schema import environment, make_row, result_path, write_rows  # noqa: E402

BENCHMARK = "transcoders"
ROWS = ("transcoder", "skip_transcoder", "clt", "crosscoder")
PROBES = 4  # the largest-F search: at most this many doublings
PROBE_SECONDS = 60  # ... and none after a probe that took longer
BANDWIDTH = 0.05  # the dense JumpReLU's straight-through bandwidth when the module names none
TANH_SCALE = 1.0  # the dense CLT's tanh penalty: tanh(TANH_SCALE * a * ||W_dec[f]||) (decode-clt's sparsity_c)
COEFFICIENT = 1e-3  # the penalty coefficient the JumpReLU and standard modules are timed with
JUMPRELU_CAPACITY = 4  # the JumpReLU modules' code starts at this many times K entries per row (L0 ~ K)
VERIFY_TOL = 1e-3  # relative, fp32 (flash-sae against torch in fp32 differ by ~1e-6)


class Dims(NamedTuple):
    """A row's dims: B rows, D the width (D_in = D_out), F latents (per layer for a CLT), K active per row
    (per layer for a CLT), L layers (1 for the transcoders)."""

    B: int
    D: int
    F: int
    K: int
    L: int = 1


FULL = {
    "transcoder": [Dims(4096, 2048, 65536, 64), Dims(4096, 768, 16384, 32)],
    "clt": [Dims(4096, 768, 16384, 64, 12)],
    "crosscoder": [Dims(4096, 2304, 65536, 64, 4)],
}
SMOKE = {
    "transcoder": [Dims(16, 24, 96, 5)],
    "clt": [Dims(8, 16, 40, 3, 3)],
    "crosscoder": [Dims(8, 24, 72, 4, 2)],
}
VERIFY = {"transcoder": Dims(16, 24, 96, 5), "clt": Dims(8, 16, 40, 3, 3), "crosscoder": Dims(8, 24, 72, 4, 2)}
ARCHS = {
    "transcoder": ("topk_transcoder",),
    "skip_transcoder": ("topk_transcoder",),
    "clt": ("topk_clt", "jumprelu_clt"),
    "crosscoder": ("batchtopk_crosscoder", "standard_crosscoder"),
}
TARGETS = {  # what the row is held to (printed with the measured ratio)
    "transcoder": ("flash-sae TopK SAE step", 1.1, "at most"),
    "skip_transcoder": ("transcoder + dense [D, D] GEMM", 1.1, "at most"),
    "clt": ("torch eager (dense)", 4.0, "at least"),
    "crosscoder": ("torch eager (dense)", 3.0, "at least"),
}


RESTATED = (
    "dictionary_learning's CrossCoder formula (GitHub saprmarks/dictionary_learning; the packaged "
    "dictionary-learning 0.1.0 has no crosscoder) in this script's words, with the squared error"
)


class RowMissing(Exception):
    """A row that cannot run here (a registry name not registered yet, a peer not installed)."""


# ------------------------------------------------------------------------------------- the modules' weights


class TranscoderWeights(NamedTuple):
    W_enc: torch.Tensor  # [F, D_in]
    b_enc: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [F, D_out]
    b_dec: torch.Tensor  # [D_out]
    W_skip: torch.Tensor | None  # [D_out, D_in]
    threshold: torch.Tensor | None  # [F]


class CLTWeights(NamedTuple):
    W_enc: torch.Tensor  # [L, F, D]
    b_enc: torch.Tensor  # [L, F]
    W_dec: tuple  # L tensors, source s: [F, L - s, D] (circuit-tracer's layout)
    b_dec: torch.Tensor  # [L, D]
    threshold: torch.Tensor | None  # [L, F]


class CrosscoderWeights(NamedTuple):
    W_enc: torch.Tensor  # [L, D, F] (dictionary_learning's layout)
    b_enc: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [F, L, D]
    b_dec: torch.Tensor  # [L, D]
    threshold: torch.Tensor | None  # [F]


def arranged(t, sizes, what):
    """``t`` with its dims permuted to ``sizes`` (each size names one dim, so all must differ); ValueError
    naming ``what`` when no permutation fits."""
    if t.dim() == len(sizes) and tuple(t.shape) == tuple(sizes):
        return t
    if t.dim() != len(sizes) or sorted(t.shape) != sorted(sizes) or len(set(sizes)) != len(sizes):
        raise ValueError(f"{what}: shape {tuple(t.shape)} is not a layout of {tuple(sizes)}")
    return t.permute([list(t.shape).index(s) for s in sizes])


def _threshold(params, sizes, what):
    if "threshold" in params:
        return arranged(params["threshold"], sizes, what)
    if "log_threshold" in params:
        return arranged(params["log_threshold"], sizes, what).exp()
    return None


def _module_params(module):
    return dict(module.named_parameters())


def transcoder_weights(module) -> TranscoderWeights:
    """The contract's parameters (``W_enc`` [F, D_in], ``b_enc``, ``W_dec`` [F, D_out], ``b_dec``, ``W_skip``
    [D_out, D_in]; a JumpReLU module's ``threshold`` or ``log_threshold`` [F]), as views of the module's."""
    p = _module_params(module)
    return TranscoderWeights(
        p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], p.get("W_skip"), _threshold(p, p["b_enc"].shape, "threshold")
    )


def clt_weights(module, dims: Dims) -> CLTWeights:
    """The module's parameters in circuit-tracer's layout, as differentiable views of them (so a dense loss of
    them has gradients for the module's own parameters): ``W_enc`` [L, F, D], ``b_enc`` [L, F], ``b_dec``
    [L, D] as they are, and each source layer's decoder ``W_dec[s]`` [F, (L - s) * D] viewed as [F, L - s, D]
    (``modules/clt.py``'s layout). A module with other shapes is a ValueError listing its parameters."""
    L, D, F = dims.L, dims.D, dims.F
    p = _module_params(module)
    listing = {n: tuple(t.shape) for n, t in p.items()}
    expected = {"W_enc": (L, F, D), "b_enc": (L, F), "b_dec": (L, D)}
    expected.update({f"W_dec.{s}": (F, (L - s) * D) for s in range(L)})
    if any(listing.get(name) != shape for name, shape in expected.items()):
        raise ValueError(f"unrecognised CLT parameter layout {listing}, expected {expected}")
    W_dec = tuple(p[f"W_dec.{s}"].view(F, L - s, D) for s in range(L))
    return CLTWeights(p["W_enc"], p["b_enc"], W_dec, p["b_dec"], _threshold(p, (L, F), "threshold"))


def crosscoder_weights(module, dims: Dims) -> CrosscoderWeights:
    """The module's parameters in dictionary_learning's layout, as differentiable views of them. Accepted:
    W_enc any layout of (L, D, F) or (F, L * D) / (L * D, F); W_dec any layout of (F, L, D) or (F, L * D);
    b_enc (F); b_dec (L, D) or (L * D). Another layout is a ValueError listing the parameters."""
    L, D, F = dims.L, dims.D, dims.F
    p = _module_params(module)
    listing = {n: tuple(t.shape) for n, t in p.items()}
    try:
        W_enc, W_dec, b_dec = p["W_enc"], p["W_dec"], p["b_dec"]
        if W_enc.dim() == 2:
            W_enc = arranged(W_enc, (L * D, F), "W_enc").reshape(L, D, F)
        W_enc = arranged(W_enc, (L, D, F), "W_enc")
        if W_dec.dim() == 2:
            W_dec = arranged(W_dec, (F, L * D), "W_dec").reshape(F, L, D)
        W_dec = arranged(W_dec, (F, L, D), "W_dec")
        b_dec = b_dec.reshape(L, D)
        b_enc = arranged(p["b_enc"], (F,), "b_enc")
    except (KeyError, ValueError, RuntimeError) as err:
        raise ValueError(f"unrecognised crosscoder parameter layout {listing}: {err}") from None
    return CrosscoderWeights(W_enc, b_enc, W_dec, b_dec, _threshold(p, (F,), "threshold"))


def leaves(weights):
    """Detached copies of ``weights`` (a weights NamedTuple), each requiring grad: the dense formulation's
    own parameters for timing."""

    def copy(t):
        if t is None:
            return None
        if isinstance(t, tuple):
            return tuple(copy(u) for u in t)
        return t.detach().clone().requires_grad_()

    return type(weights)(*(copy(t) for t in weights))


def tensors(weights) -> list:
    """Every tensor of a weights NamedTuple, flattened."""
    out = []
    for t in weights:
        if isinstance(t, tuple):
            out += list(t)
        elif t is not None:
            out.append(t)
    return out


# --------------------------------------------------------------------------------- the dense formulations


class Dense(NamedTuple):
    """A dense formulation's forward: the output, the sum of squared errors, the penalty (summed over the
    batch; 0 for a pure-MSE step), the L0 per layer (mean over rows) and the FVU per layer."""

    y_hat: torch.Tensor
    sq_sum: torch.Tensor
    penalty: torch.Tensor
    layer_l0: torch.Tensor
    layer_fvu: torch.Tensor


def jumprelu(z, theta, bandwidth):
    """z * H(z - theta) with the straight-through threshold gradient -(theta / bandwidth) * R((z - theta) /
    bandwidth), R the rectangle kernel (Rajamanoharan et al. 2024), written with plain tensor ops; theta is
    cast to z's dtype (a module keeps its threshold in fp32)."""
    theta = theta.to(z.dtype)
    active = (z > theta).to(z.dtype)
    band = (((z - theta) / bandwidth).abs() < 0.5).to(z.dtype)
    t = theta.detach()
    return z * active + (theta - t) * (-(t / bandwidth) * band).detach()


def _per_layer(y_hat, y):
    """(sum of squared errors, FVU per layer) of [B, L, D] (or [B, D]) outputs, in fp32."""
    y3, e3 = y.float().reshape(y.shape[0], -1, y.shape[-1]), (y_hat - y).float().reshape(y.shape[0], -1, y.shape[-1])
    err = e3.pow(2).sum(dim=(0, 2))
    var = (y3 - y3.mean(0)).pow(2).sum(dim=(0, 2))
    return err.sum(), err / var


def dense_transcoder(x, y, w: TranscoderWeights, k: int, rule: str = "topk") -> Dense:
    """A (skip) transcoder densely, as sparsify writes it: pre = x @ W_enc.T + b_enc (x not centred), a
    TopK code scattered into [B, F], y_hat = code @ W_dec + b_dec (+ x @ W_skip.T)."""
    pre = torch.addmm(w.b_enc, x, w.W_enc.T)
    if rule == "jumprelu":
        code = jumprelu(pre, w.threshold, BANDWIDTH)
    else:
        vals, idx = pre.topk(k, dim=1, sorted=False)
        code = torch.zeros_like(pre).scatter(1, idx, torch.relu(vals))
    y_hat = torch.addmm(w.b_dec, code, w.W_dec)
    if w.W_skip is not None:
        y_hat = y_hat + x @ w.W_skip.T
    sq, fvu = _per_layer(y_hat, y)
    return Dense(y_hat, sq, sq.new_zeros(()), (code != 0).sum(1).float().mean().reshape(1), fvu)


def dense_clt(xs, ys, w: CLTWeights, k: int, rule: str = "topk", bandwidth: float = BANDWIDTH) -> Dense:
    """A CLT densely, as circuit-tracer lays it out and the CLT papers write it: per-layer encoders
    pre[:, l] = xs[:, l] @ W_enc[l].T + b_enc[l] ([B, L, F], every latent of every layer); a TopK of K per
    layer (``rule`` "topk") or JumpReLU (``rule`` "jumprelu", its tanh penalty tanh(c * a * ||W_dec[s, f]||)
    with the norm over every target layer's row); the triangle decode ys_hat[:, t] = b_dec[t] + sum over
    s <= t of code[:, s] @ W_dec[s][:, t - s], one [B, F] @ [F, (L - s) D] GEMM per source layer."""
    B, L, D = xs.shape
    pre = torch.einsum("bld,lfd->blf", xs, w.W_enc) + w.b_enc
    if rule == "jumprelu":
        code = jumprelu(pre, w.threshold, bandwidth)
    else:
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        code = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    ys_hat = w.b_dec.expand(B, L, D)
    penalty = pre.new_zeros((), dtype=torch.float32)
    for s in range(L):
        out = (code[:, s] @ w.W_dec[s].reshape(w.W_dec[s].shape[0], -1)).reshape(B, L - s, D)
        ys_hat = ys_hat + nnf.pad(out, (0, 0, s, 0))
        if rule == "jumprelu":
            norms = w.W_dec[s].flatten(1).norm(dim=1)
            penalty = penalty + torch.tanh(TANH_SCALE * code[:, s] * norms).float().sum()
    sq, fvu = _per_layer(ys_hat, ys)
    return Dense(ys_hat, sq, penalty, (code != 0).sum(-1).float().mean(0), fvu)


def dense_crosscoder(xs, w: CrosscoderWeights, k: int, rule: str = "batchtopk") -> Dense:
    """A crosscoder densely, dictionary_learning's ``CrossCoder`` formula restated: pre = sum_l xs[:, l] @
    W_enc[l] + b_enc ([B, F]); the code relu(pre) (``rule`` "standard", its L1 penalty a_f * sum_l
    ||W_dec[f, l]||) or the B * K largest of relu(pre) over the batch (``rule`` "batchtopk"); xs_hat[:, l] =
    code @ W_dec[:, l] + b_dec[l]."""
    B, L, D = xs.shape
    pre = torch.einsum("bld,ldf->bf", xs, w.W_enc) + w.b_enc
    acts = torch.relu(pre)
    penalty = pre.new_zeros((), dtype=torch.float32)
    if rule == "batchtopk":
        top = acts.flatten().topk(B * k, sorted=False)
        code = torch.zeros_like(acts.flatten()).scatter(0, top.indices, top.values).view(B, -1)
    else:
        code = acts
        penalty = (code * w.W_dec.norm(dim=2).sum(1)).float().sum()
    xs_hat = (code @ w.W_dec.reshape(w.W_dec.shape[0], L * D)).reshape(B, L, D) + w.b_dec
    sq, fvu = _per_layer(xs_hat, xs)
    return Dense(xs_hat, sq, penalty, (code != 0).sum(-1).float().mean().reshape(1), fvu)


def dense_loss(out: Dense, coefficient: float = 0.0) -> torch.Tensor:
    """The timed dense loss: the mean squared error over every output entry + coefficient * the penalty
    averaged over rows."""
    n = out.y_hat.numel()
    return out.sq_sum / n + coefficient * out.penalty / out.y_hat.shape[0]


# ------------------------------------------------------------------------------------ problems and modules


class Problem(NamedTuple):
    """A row's inputs: x and y for a transcoder ([B, D]), xs and ys for a CLT ([B, L, D]), xs for a
    crosscoder (ys None)."""

    x: torch.Tensor
    y: torch.Tensor | None


def make_inputs(family, dims: Dims, dtype, device, seed=0) -> Problem:
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (dims.B, dims.D) if family == "transcoder" else (dims.B, dims.L, dims.D)
    x = torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    y = None if family == "crosscoder" else (torch.randn(*shape, generator=g, device=device) * 0.5).to(dtype)
    return Problem(x, y)


class Built(NamedTuple):
    """One flash-sae module of a row: the module, its registry name, the label."""

    module: torch.nn.Module
    arch: str
    label: str
    capturable: bool


def build(
    fs, family, arch, dims: Dims, dtype, device, *, skip=False, coefficient=COEFFICIENT, seed=0, exact=False
) -> Built:
    """The registry's ``arch`` at ``dims`` (RowMissing when it is not registered). A JumpReLU module's code
    starts at ``JUMPRELU_CAPACITY * K`` entries per row for timing, at its exact default (F, nothing dropped)
    with ``exact`` (verification)."""
    kw = dict(dtype=dtype, device=device, seed=seed)
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()  # the rows before leave their blocks cached: free them for this module
    if arch.startswith("jumprelu") and not exact:
        kw["capacity_per_row"] = JUMPRELU_CAPACITY * dims.K  # the thresholds are set for L0 ~ K (see set_threshold)
    if arch not in fs.ARCHITECTURES:
        raise RowMissing(f"{arch} is not registered in flash_sae.ARCHITECTURES")
    a = fs.ARCHITECTURES[arch]
    sparsity = dims.K if a.sparsity == "k" else coefficient
    if family == "transcoder":
        module = a.build(dims.D, dims.F, sparsity, d_out=dims.D, skip=skip, **kw)
    else:
        module = a.build(dims.D, dims.F, sparsity, n_layers=dims.L, **kw)
    return Built(module.train(), arch, f"flash-sae {arch}{' (skip)' if skip else ''}", a.capturable)


def weights_of(built: Built, family, dims: Dims):
    if family == "transcoder":
        return transcoder_weights(built.module)
    if family == "clt":
        return clt_weights(built.module, dims)
    return crosscoder_weights(built.module, dims)


def module_loss(built: Built, problem: Problem):
    m = built.module
    return m.loss(problem.x) if problem.y is None else m.loss(problem.x, problem.y)


def dense_of(family, arch, problem: Problem, w, k, bandwidth=BANDWIDTH) -> Dense:
    """The dense formulation matching registry name ``arch``."""
    if family == "transcoder":
        return dense_transcoder(problem.x, problem.y, w, k, "jumprelu" if arch.startswith("jumprelu") else "topk")
    if family == "clt":
        return dense_clt(problem.x, problem.y, w, k, "jumprelu" if arch.startswith("jumprelu") else "topk", bandwidth)
    return dense_crosscoder(problem.x, w, k, "standard" if arch.startswith("standard") else "batchtopk")


# ------------------------------------------------------------------------------------------- verification


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def verify(fs, family, arch, skip, device) -> dict:
    """Checks ours against the dense formulation at ``VERIFY[family]`` in fp32 on the module's own
    parameters; returns the measured relative errors (and the fitted loss scale times the number of output
    entries: 1 for a loss that is the mean over them), raising AssertionError beyond ``VERIFY_TOL``.

    A module whose sparsity is a penalty coefficient is built with coefficient 0, so its loss is pure MSE
    too; where the module rejects 0, only the forward quantities are checked."""
    dims = VERIFY[family]
    gradients = True
    try:
        built = build(fs, family, arch, dims, torch.float32, device, skip=skip, coefficient=0.0, seed=1, exact=True)
    except ValueError:
        built = build(fs, family, arch, dims, torch.float32, device, skip=skip, seed=1, exact=True)
        gradients = bool(not built.arch or fs.ARCHITECTURES[arch].sparsity == "k")
    m = built.module
    problem = make_inputs(family, dims, torch.float32, device, seed=1)
    w = weights_of(built, family, dims)
    g = torch.Generator(device=device).manual_seed(2)
    with torch.no_grad():  # away from the zero-bias, zero-skip init, so every term matters
        for t in (w.b_enc, w.b_dec):
            t.copy_(torch.randn(t.shape, generator=g, device=device) * 0.05)
        if family == "transcoder" and w.W_skip is not None:
            w.W_skip.copy_(torch.randn(w.W_skip.shape, generator=g, device=device) / dims.D)
        if w.threshold is not None:  # JumpReLU: thresholds inside the pre-activations' range (L0 ~ K)
            set_threshold(m, family, dims, problem, w)
    w = weights_of(built, family, dims)
    bandwidth = float(getattr(m, "bandwidth", BANDWIDTH))
    step = module_loss(built, problem)
    dense = dense_of(family, arch, problem, w, dims.K, bandwidth)
    errs = {"forward": rel(m(problem.x), dense.y_hat), "mse": rel(step.mse, dense.sq_sum / dense.y_hat.numel())}
    if hasattr(step, "layer_fvu"):
        errs["layer_fvu"] = rel(step.layer_fvu, dense.layer_fvu)
    elif family == "transcoder":
        errs["fvu"] = rel(step.fvu.reshape(1), dense.layer_fvu)
    if hasattr(step, "layer_l0"):
        errs["layer_l0"] = rel(step.layer_l0, dense.layer_l0)
    elif family != "clt" and hasattr(step, "l0"):
        errs["l0"] = rel(step.l0.reshape(1), dense.layer_l0)
    if gradients:
        params = [p for n, p in m.named_parameters() if "threshold" not in n]
        ours = torch.autograd.grad(step.loss, params, allow_unused=True)
        theirs = torch.autograd.grad(dense.sq_sum, params, allow_unused=True)
        ours, theirs = (
            torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)]).double()
            for gs in (ours, theirs)
        )
        scale = float((ours @ theirs) / (theirs @ theirs))
        errs["gradients"] = rel(ours, scale * theirs)
        errs["loss"] = rel(step.loss.reshape(1), (scale * dense.sq_sum).reshape(1))
        errs["loss_scale_x_outputs"] = scale * dense.y_hat.numel()
    bad = {k: v for k, v in errs.items() if k != "loss_scale_x_outputs" and not v <= VERIFY_TOL}
    if bad:
        raise AssertionError(f"{built.label} differs from the dense formulation at {tuple(dims)}: {bad} (all: {errs})")
    return errs


# -------------------------------------------------------------------------------- sparsity set for timing


@torch.no_grad()
def set_threshold(module, family, dims: Dims, problem: Problem, w):
    """JumpReLU: each layer's threshold at its (B * K)-th largest pre-activation (L0 ~ K per layer), written
    to the module's ``threshold`` (or ``log_threshold``), [F] or a layout of [L, F]."""
    p = _module_params(module)
    name = "threshold" if "threshold" in p else "log_threshold"

    def kth_largest(pre):
        return between_largest(pre, dims.B * dims.K).clamp_min(1e-3)

    if family == "clt":
        per_layer = [
            kth_largest(torch.addmm(w.b_enc[layer], problem.x[:, layer], w.W_enc[layer].T)) for layer in range(dims.L)
        ]
        values = torch.stack(per_layer)[:, None].expand(dims.L, dims.F)
    else:
        values = kth_largest(torch.addmm(w.b_enc, problem.x, w.W_enc.T)).expand(dims.F)
    values = values if name == "threshold" else values.log()
    target = p[name]
    target.copy_(values.T if target.dim() == 2 and target.shape[0] != dims.L else values)


@torch.no_grad()
def shift_bias(w: CrosscoderWeights, dims: Dims, problem: Problem):
    """Standard crosscoder: b_enc lowered to leave about B * K pre-activations positive (L0 ~ K)."""
    pre = torch.einsum("bld,ldf->bf", problem.x, w.W_enc) + w.b_enc
    w.b_enc.sub_(between_largest(pre, dims.B * dims.K).to(w.b_enc.dtype))


def between_largest(pre, n):
    """The midpoint of the n-th and (n+1)-th largest entries of ``pre`` (fp32): a cut with n entries above
    it that no entry sits on."""
    pre = pre.flatten().float()
    k = pre.numel() - n
    return (pre.kthvalue(k).values + pre.kthvalue(k + 1).values) / 2


# ------------------------------------------------------------------------------------------------ peers


def sparsify_transcoder(w: TranscoderWeights, dims: Dims, problem: Problem, device):
    """The installed sparsify's transcoder (its defaults, ``transcode=True``, ``skip_connection`` when ours has
    W_skip) holding ``w``: (call, parameters)."""
    if device == "cpu":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs CUDA tensors
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError as err:
        raise RowMissing(f"sparsify is not installed: {err}") from None
    cfg = SparseCoderConfig(num_latents=dims.F, k=dims.K, transcode=True, skip_connection=w.W_skip is not None)
    coder = SparseCoder(dims.D, cfg, device=device, dtype=w.W_enc.dtype)
    with torch.no_grad():
        coder.encoder.weight.copy_(w.W_enc)
        coder.encoder.bias.copy_(w.b_enc)
        coder.W_dec.copy_(w.W_dec)
        coder.b_dec.copy_(w.b_dec)
        if w.W_skip is not None:
            coder.W_skip.copy_(w.W_skip)
    return (lambda: coder(problem.x, problem.y).fvu), list(coder.parameters())


def decode_clt(w: CLTWeights, dims: Dims, problem: Problem, device, topk: bool):
    """The installed decode-clt's ``CrossLayerTranscoder`` (``CLTConfig`` defaults: JumpReLU at its initial
    threshold, untied per-(source, target) decoders; or ``activation_fn="topk"`` with ``topk_k`` = L * K,
    its global TopK over every layer's latents) in the benchmark's dtype, its encoders holding ``w``'s
    (its decoders keep their own initialisation: the dense decode costs the same), and its trainer's loss:
    ``get_feature_activations`` then ``LossManager.compute_total_loss`` with those activations (the cached
    decoder norms reset before each step, as its trainer resets them after each).
    Its loss reads scalars to the host (``.item()``), so it has no CUDA-graph time."""
    try:
        from clt.config import CLTConfig, TrainingConfig
        from clt.models.clt import CrossLayerTranscoder
        from clt.training.losses import LossManager
    except ImportError as err:
        raise RowMissing(f"decode-clt is not importable: {err}") from None
    dtype_name = str(w.W_enc.dtype).replace("torch.", "")
    extra = dict(activation_fn="topk", topk_k=dims.L * dims.K) if topk else {}
    cfg = CLTConfig(num_features=dims.F, num_layers=dims.L, d_model=dims.D, clt_dtype=dtype_name, **extra)
    model = CrossLayerTranscoder(cfg, process_group=None, device=torch.device(device))
    with torch.no_grad():
        for layer, enc in enumerate(model.encoder_module.encoders):
            enc.weight.copy_(w.W_enc[layer])
            enc.bias_param.copy_(w.b_enc[layer])
    training = TrainingConfig(learning_rate=1e-4, training_steps=1, activation_path="unused")
    manager = LossManager(training, clt_config=cfg)
    inputs = {layer: problem.x[:, layer] for layer in range(dims.L)}
    targets = {layer: problem.y[:, layer] for layer in range(dims.L)}

    def call():
        model.decoder_module._cached_decoder_norms = None  # its trainer resets it after every step
        acts = model.get_feature_activations(inputs)
        loss, _ = manager.compute_total_loss(model, inputs, targets, 1, 1, precomputed_activations=acts)
        return loss

    return call, list(model.parameters())


# ----------------------------------------------------------------------------------------------- floors


def floor_transcoder(d: Dims, es, skip=False):
    """(FLOPs, bytes) of a (skip) transcoder step (also the SAE step at D_in = D_out): the encoder GEMM
    2 B F D (+ the skip GEMM forward and its weight gradient, 4 B D^2); bytes: read W_enc, x and y, gather
    min(B K, F) decoder rows, write dW_enc and dW_dec (+ read W_skip, write dW_skip)."""
    rows = min(d.B * d.K, d.F)
    flops = 2 * d.B * d.F * d.D + (4 * d.B * d.D * d.D if skip else 0)
    byts = (d.F * d.D + 2 * d.B * d.D + rows * d.D + 2 * d.F * d.D + (2 * d.D * d.D if skip else 0)) * es
    return flops, byts


def floor_gemm(d: Dims, es):
    """The [D, D] GEMM forward and its weight gradient: 4 B D^2 FLOPs; read x, W, the upstream gradient,
    write the output and dW."""
    return 4 * d.B * d.D * d.D, (3 * d.B * d.D + 2 * d.D * d.D) * es


def floor_clt(d: Dims, es):
    """A CLT step: L encoder GEMMs 2 B F D each; bytes: read W_enc, xs and ys, gather min(B K, F) decoder
    rows for each of the L(L+1)/2 (source, target) pairs, write dW_enc and the L(L+1)/2 [F, D] decoder
    gradients."""
    pairs, rows = d.L * (d.L + 1) // 2, min(d.B * d.K, d.F)
    byts = (2 * d.L * d.F * d.D + 2 * d.B * d.L * d.D + pairs * rows * d.D + pairs * d.F * d.D) * es
    return 2 * d.B * d.F * d.D * d.L, byts


def floor_crosscoder(d: Dims, es):
    """A crosscoder step: the encoder GEMM over every layer 2 B F L D; bytes: read W_enc and xs, gather
    min(B K, F) decoder rows of L D, write dW_enc and dW_dec."""
    rows = min(d.B * d.K, d.F)
    byts = (3 * d.L * d.D * d.F + d.B * d.L * d.D + rows * d.L * d.D) * es
    return 2 * d.B * d.F * d.L * d.D, byts


def floor_ms(flops_bytes, dname, bw):
    """The longer of the FLOPs at the tensor-core peak and the bytes at the measured copy bandwidth (None on
    the CPU)."""
    from side_by_side import PEAK_FLOPS

    if bw is None:
        return None
    flops, byts = flops_bytes
    return max(flops / PEAK_FLOPS[dname] * 1e3, byts / bw * 1e3)


# ------------------------------------------------------------------------------------------------ timing


class Timing(NamedTuple):
    eager_ms: float
    p20: float
    p80: float
    graph_ms: float
    peak_gib: float
    saved_gib: float


NAN = float("nan")


def kept_gib(call, params) -> float:
    """GiB held from the forward for the backward: allocated after the forward, graph alive, minus before."""
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    out = call()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - base
    del out
    return kept / 2**30


def measure(call, params, *, graph, device) -> Timing:
    """Eager quantiles, CUDA-graph ms, peak and kept GiB (``side_by_side.measure_call`` on a GPU); on the CPU
    the wall time of one step after a warm-up (no graph, no memory)."""
    from side_by_side import measure_call

    if device != "cpu":
        kept = kept_gib(call, params)
        (ms, lo, hi), peak, gms = measure_call(call, params, graph=graph)
        return Timing(ms, lo, hi, gms, peak, kept)

    def step():
        for p in params:
            p.grad = None
        out = call()
        out.backward(torch.ones_like(out) if out.ndim == 0 else torch.randn_like(out))

    step()
    t = time.perf_counter()
    step()
    ms = (time.perf_counter() - t) * 1e3
    for p in params:
        p.grad = None
    return Timing(ms, ms, ms, NAN, NAN, NAN)


# --------------------------------------------------------------------------------------------- the rows


class Impl(NamedTuple):
    """One timed implementation: its name, a builder returning (call, parameters, graph-capturable), the
    floor (FLOPs, bytes), and whether it is ours (verified before timing)."""

    name: str
    make: Callable
    floor: tuple
    ours: bool = False


class Run(NamedTuple):
    fs: object
    args: argparse.Namespace
    device: str
    dtype: torch.dtype
    dname: str
    bw: float | None
    rows: list
    env: dict


def run_group(run: Run, group: str, dims: Dims, impls: list, verified: dict):
    """Times ``impls`` in order (each built, measured and freed before the next) and appends their rows. An
    implementation that runs out of memory or raises is a row with its error (the run goes on; with
    ``--require-all`` the run then exits 1)."""
    measured = {}
    for impl in impls:
        err, t = None, Timing(NAN, NAN, NAN, NAN, NAN, NAN)
        try:
            call, params, graph = impl.make()
            t = measure(call, params, graph=graph and run.device != "cpu", device=run.device)
        except RowMissing as why:
            if run.args.require_all:
                raise
            print(f"{group:16s} {impl.name}: not run ({why})", flush=True)
            continue
        except torch.OutOfMemoryError as e:
            err = f"OOM: {str(e).splitlines()[0][:60]}"
        except Exception as e:  # recorded in the row, not hidden; the other rows still run
            err = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        call = params = None
        if run.device != "cpu":
            torch.cuda.empty_cache()
        measured[impl.name] = t
        fl = floor_ms(impl.floor, run.dname, run.bw)
        best = t.graph_ms if t.graph_ms == t.graph_ms else t.eager_ms
        row = dict(
            group=group,
            dims=dims,
            impl=impl.name,
            t=t,
            floor=fl,
            pct=100 * fl / best if fl else None,
            err=err,
            verified=verified.get(impl.name) if impl.ours else None,
        )
        run.rows.append(row)
        print(
            f"{group:16s} {str(tuple(dims)):30s} {impl.name:52s} {t.eager_ms:9.3f} ({t.p20:.3f}-{t.p80:.3f}) "
            f"{t.graph_ms:9.3f} {t.peak_gib:8.2f} {t.saved_gib:8.2f}"
            + (f" {row['pct']:6.0f}%" if row["pct"] is not None else "")
            + (f"  {err}" if err else ""),
            flush=True,
        )
    return measured


def time_of(t: Timing | None, graph: bool):
    """``t``'s graph ms (``graph``) or eager ms; its eager ms where it has no graph time (a failed capture)."""
    if t is None:
        return NAN
    return t.graph_ms if graph and not math.isnan(t.graph_ms) else t.eager_ms


def verified_or_missing(run: Run, family, arch, skip=False):
    """(verification errors, None) or (None, why it cannot run)."""
    try:
        errs = verify(run.fs, family, arch, skip, run.device)
    except RowMissing as why:
        if run.args.require_all:
            raise
        return None, str(why)
    print(f"# verified {arch}{' (skip)' if skip else ''}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    return errs, None


def transcoder_rows(run: Run, skip: bool, compiled: dict):
    """Rows 1 (skip False) and 2 (skip True)."""
    group = "skip_transcoder" if skip else "transcoder"
    errs, _ = verified_or_missing(run, "transcoder", "topk_transcoder", skip)
    plain_errs = verified_or_missing(run, "transcoder", "topk_transcoder", False)[0] if skip else None
    for i, dims in enumerate((SMOKE if run.args.smoke else FULL)["transcoder"]):
        problem = make_inputs("transcoder", dims, run.dtype, run.device)
        built = build(run.fs, "transcoder", "topk_transcoder", dims, run.dtype, run.device, skip=skip)
        if skip:
            with torch.no_grad():
                built.module.W_skip.normal_(0, dims.D**-0.5)
        es = problem.x.element_size()
        w = transcoder_weights(built.module)
        ours = built.label
        impls = [
            Impl(
                ours,
                lambda: ((lambda: module_loss(built, problem).loss), list(built.module.parameters()), built.capturable),
                floor_transcoder(dims, es, skip),
                True,
            )
        ]
        if skip:
            plain = build(run.fs, "transcoder", "topk_transcoder", dims, run.dtype, run.device)
            with torch.no_grad():
                for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
                    getattr(plain.module, n).copy_(getattr(w, n))
            W_skip = w.W_skip.detach().clone().requires_grad_()
            impls += [
                Impl(
                    plain.label,
                    lambda: (
                        (lambda: module_loss(plain, problem).loss),
                        list(plain.module.parameters()),
                        plain.capturable,
                    ),
                    floor_transcoder(dims, es),
                    True,
                ),
                Impl(
                    "dense [D, D] GEMM fwd + bwd",
                    lambda: ((lambda: problem.x @ W_skip.T), [W_skip], True),
                    floor_gemm(dims, es),
                ),
            ]
        else:
            sae = run.fs.ARCHITECTURES["topk"].build(dims.D, dims.F, dims.K, dtype=run.dtype, device=run.device)
            with torch.no_grad():
                for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
                    getattr(sae, n).copy_(getattr(w, n))
            impls.append(
                Impl(
                    "flash-sae TopK SAE step",
                    lambda: ((lambda: sae.loss(problem.x).loss), list(sae.parameters()), True),
                    floor_transcoder(dims, es),
                )
            )
        dense_w = leaves(w)
        impls.append(
            Impl(
                "torch eager (dense)",
                lambda: (
                    (lambda: dense_loss(dense_transcoder(problem.x, problem.y, dense_w, dims.K))),
                    tensors(dense_w),
                    True,
                ),
                floor_transcoder(dims, es, skip),
            )
        )
        if "transcoder" in compiled and i > 0:
            print(f"{group:16s} torch.compile (dense): the first shape only (it recompiles per shape)")
        if "transcoder" in compiled and i == 0:  # one shape: torch.compile recompiles per shape
            fn = compiled["transcoder"]
            impls.append(
                Impl(
                    "torch.compile (dense)",
                    lambda: ((lambda: fn(problem.x, problem.y, dense_w, dims.K)), tensors(dense_w), True),
                    floor_transcoder(dims, es, skip),
                )
            )
        if not run.args.no_peers:
            impls.append(
                Impl(
                    "sparsify (installed)",
                    lambda: (*sparsify_transcoder(w, dims, problem, run.device), True),
                    floor_transcoder(dims, es, skip),
                )
            )
        verified = {ours: errs is not None}
        if skip:
            verified[plain.label] = plain_errs is not None
        measured = run_group(run, group, dims, impls, verified)
        summarise(run, group, dims, ours, measured, skip)
        built = plain = sae = dense_w = w = problem = None
        if run.device != "cpu":
            torch.cuda.empty_cache()


def summarise(run: Run, group, dims, ours, measured, skip=False):
    """Sets each row's ratio to its baseline and prints the target check."""
    baseline, target, sense = TARGETS[group]
    mine = measured.get(ours)
    if group == "transcoder":
        base = measured.get("flash-sae TopK SAE step")
    elif group == "skip_transcoder":
        plain = next((t for n, t in measured.items() if n.startswith("flash-sae") and n != ours), None)
        gemm = measured.get("dense [D, D] GEMM fwd + bwd")
        base = (
            None
            if plain is None or gemm is None
            else Timing(plain.eager_ms + gemm.eager_ms, NAN, NAN, plain.graph_ms + gemm.graph_ms, NAN, NAN)
        )
    else:
        base = None
    for row in run.rows:
        if row["group"] != group or row["dims"] != dims or row["t"] is None:
            continue
        t = row["t"]
        if row["impl"] == ours and base is not None:
            row["x_eager"], row["x_graph"] = t.eager_ms / base.eager_ms, t.graph_ms / base.graph_ms
            row["baseline"] = baseline
        elif mine is not None and not row["impl"].startswith("flash-sae"):
            row["x_eager"], row["x_graph"] = t.eager_ms / mine.eager_ms, t.graph_ms / mine.graph_ms
            row["baseline"] = ours
    if mine is None:
        return
    if group in ("transcoder", "skip_transcoder"):
        ratio = time_of(mine, run.device != "cpu") / time_of(base, run.device != "cpu") if base else NAN
    else:
        dense = measured.get("torch eager (dense)")
        ratio = time_of(dense, run.device != "cpu") / time_of(mine, run.device != "cpu") if dense else NAN
    if run.device == "cpu":
        return  # interpreter times say nothing about the targets
    met = ratio <= target if sense == "at most" else ratio >= target
    what = f"{ours} / {baseline}" if group in ("transcoder", "skip_transcoder") else f"{baseline} / {ours}"
    print(
        f"# {group} {tuple(dims)}: {what} = {ratio:.2f}x ({'graph' if run.device != 'cpu' else 'eager'}; "
        f"target {sense} {target}x: {'met' if met else 'NOT met'})"
    )


def clt_rows(run: Run, compiled: dict):
    """Row 3: the TopK and JumpReLU CLTs, the dense formulations, torch.compile, decode-clt; the memory kept
    for the backward; the largest F per layer."""
    for dims in (SMOKE if run.args.smoke else FULL)["clt"]:
        problem = make_inputs("clt", dims, run.dtype, run.device)
        es = problem.x.element_size()
        impls, verified, first_w = [], {}, None
        for arch in ARCHS["clt"]:
            errs, why = verified_or_missing(run, "clt", arch)
            if why is not None:
                print(f"clt              {arch}: not run ({why})")
                continue
            built = build(run.fs, "clt", arch, dims, run.dtype, run.device)
            w = clt_weights(built.module, dims)
            if w.threshold is not None:
                set_threshold(built.module, "clt", dims, problem, w)
                w = clt_weights(built.module, dims)
            verified[built.label] = True
            impls.append(
                Impl(
                    built.label,
                    lambda b=built: ((lambda: module_loss(b, problem).loss), list(b.module.parameters()), b.capturable),
                    floor_clt(dims, es),
                    True,
                )
            )
            dense_w = leaves(w)
            rule = "jumprelu" if arch.startswith("jumprelu") else "topk"
            coef = COEFFICIENT if rule == "jumprelu" else 0.0
            impls.append(
                Impl(
                    f"torch eager (dense{', JumpReLU' if rule == 'jumprelu' else ''})",
                    lambda dw=dense_w, r=rule, c=coef: (
                        (lambda: dense_loss(dense_clt(problem.x, problem.y, dw, dims.K, r), c)),
                        tensors(dw),
                        True,
                    ),
                    floor_clt(dims, es),
                )
            )
            if "clt" in compiled and rule == "topk":
                fn = compiled["clt"]
                impls.append(
                    Impl(
                        "torch.compile (dense)",
                        lambda dw=dense_w: ((lambda: fn(problem.x, problem.y, dw, dims.K)), tensors(dw), True),
                        floor_clt(dims, es),
                    )
                )
            first_w = first_w or w
        if first_w is None:  # no CLT registered yet: the dense formulation and the peers on drawn weights
            first_w = drawn_clt(dims, run.dtype, run.device)
            dense_w = leaves(first_w)
            impls.append(
                Impl(
                    "torch eager (dense)",
                    lambda: (
                        (lambda: dense_loss(dense_clt(problem.x, problem.y, dense_w, dims.K))),
                        tensors(dense_w),
                        True,
                    ),
                    floor_clt(dims, es),
                )
            )
        if not run.args.no_peers:
            for topk in (False, True):
                name = f"decode-clt (installed, {'TopK L*K global' if topk else 'JumpReLU default'})"
                impls.append(
                    Impl(
                        name,
                        lambda topk=topk: (*decode_clt(first_w, dims, problem, run.device, topk), False),
                        floor_clt(dims, es),
                    )
                )
        ours = next((i.name for i in impls if i.ours), None)
        measured = run_group(run, "clt", dims, impls, verified)
        dense_code = dims.B * dims.L * dims.F * es / 2**30
        for row in run.rows:
            if row["group"] == "clt" and row["dims"] == dims:
                row["dense_code_gib"] = dense_code
        for name, t in measured.items():
            if name.startswith("flash-sae") and run.device != "cpu":
                print(
                    f"# {name}: {t.saved_gib:.2f} GiB kept for the backward; "
                    f"one [B, L*F] tensor is {dense_code:.2f} GiB"
                )
        if ours is not None:
            summarise(run, "clt", dims, ours, measured)
            for name in [i.name for i in impls if i.ours][1:]:
                summarise_extra(run, "clt", dims, name, measured, "torch eager (dense, JumpReLU)", 4.0)
        impls = first_w = dense_w = problem = built = w = None
        if run.device != "cpu":
            torch.cuda.empty_cache()
            if ours is not None and not run.args.no_probe:
                probe_features(run, dims)


def summarise_extra(run: Run, group, dims, name, measured, dense_name, target):
    """A second flash-sae module of ``group`` against its own dense formulation ``dense_name`` (the JumpReLU
    CLT's, the standard crosscoder's): prints the ratio beside ``target`` and sets that row's ratios."""
    dense = measured.get(dense_name)
    mine = measured.get(name)
    if dense is None or mine is None or run.device == "cpu":
        return
    ratio = time_of(dense, True) / time_of(mine, True)
    print(
        f"# {group} {tuple(dims)}: {dense_name} / {name} = {ratio:.2f}x "
        f"(target at least {target:.1f}x: {'met' if ratio >= target else 'NOT met'})"
    )
    for row in run.rows:
        if row["group"] == group and row["dims"] == dims and row["impl"] == dense_name:
            row["x_eager"], row["x_graph"], row["baseline"] = (
                dense.eager_ms / mine.eager_ms,
                dense.graph_ms / mine.graph_ms,
                name,
            )


def drawn_clt(dims: Dims, dtype, device) -> CLTWeights:
    g = torch.Generator(device=device).manual_seed(0)
    L, D, F = dims.L, dims.D, dims.F

    def r(*shape, scale):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    W_dec = tuple(r(F, L - s, D, scale=(D * L) ** -0.5) for s in range(L))
    return CLTWeights(r(L, F, D, scale=D**-0.5), r(L, F, scale=0.0), W_dec, r(L, D, scale=0.0), None)


def probe_features(run: Run, dims: Dims):
    """The largest F per layer ``topk_clt`` fits: F doubled from the benchmark's, at most ``PROBES`` probes,
    one step each. Guards: a probe is skipped when its parameters and gradients alone would not fit 0.9 of
    the free GPU memory, or an fp64 draw of its weights on the host (as ``SAEBase`` initialises) not half of
    the available host memory; the search stops after a probe that took over ``PROBE_SECONDS``."""
    es = torch.finfo(run.dtype).bits // 8
    F, largest = dims.F, dims.F
    host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for _ in range(PROBES):
        torch.cuda.empty_cache()
        F *= 2
        d = dims._replace(F=F)
        weights = (d.L + d.L * (d.L + 1) // 2) * F * d.D
        free = torch.cuda.mem_get_info()[0]
        err, t, start = None, None, time.perf_counter()
        if 2 * weights * es > 0.9 * free:
            need = 2 * weights * es / 2**30
            err = f"skipped: parameters and gradients {need:.1f} GiB > 0.9 x free {free / 2**30:.1f} GiB"
        elif 8 * weights > 0.5 * host:
            err = f"skipped: an fp64 host draw of {8 * weights / 2**30:.1f} GiB > half the free host memory"
        else:
            try:
                built = build(run.fs, "clt", "topk_clt", d, run.dtype, run.device)
                problem = make_inputs("clt", d, run.dtype, run.device)
                params = list(built.module.parameters())
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                module_loss(built, problem).loss.backward()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                start = time.perf_counter()
                for p in params:
                    p.grad = None
                module_loss(built, problem).loss.backward()
                torch.cuda.synchronize()
                t = Timing((time.perf_counter() - start) * 1e3, NAN, NAN, NAN, peak, NAN)
                largest = F
            except torch.OutOfMemoryError as e:
                err = f"OOM: {str(e).splitlines()[0][:60]}"
            built = problem = params = None
            torch.cuda.empty_cache()
        run.rows.append(
            dict(
                group="clt_fit",
                dims=d,
                impl="flash-sae topk_clt (largest F probe)",
                t=t,
                floor=None,
                pct=None,
                err=err,
                verified=None,
            )
        )
        print(
            f"# topk_clt at F = {F} per layer: "
            + (err or f"fits, one step {t.eager_ms:.1f} ms, peak {t.peak_gib:.1f} GiB"),
            flush=True,
        )
        if err or time.perf_counter() - start > PROBE_SECONDS:
            break
    print(f"# the largest F per layer topk_clt fitted (of those probed): {largest}")


def crosscoder_rows(run: Run, compiled: dict):
    """Row 4: the BatchTopK and standard crosscoders, the dense formulations and torch.compile."""
    print(f"# crosscoder: the dense rows restate {RESTATED}")
    for dims in (SMOKE if run.args.smoke else FULL)["crosscoder"]:
        problem = make_inputs("crosscoder", dims, run.dtype, run.device)
        es = problem.x.element_size()
        impls, verified = [], {}
        for arch in ARCHS["crosscoder"]:
            errs, why = verified_or_missing(run, "crosscoder", arch)
            if why is not None:
                print(f"crosscoder       {arch}: not run ({why})")
                continue
            try:
                built = build(run.fs, "crosscoder", arch, dims, run.dtype, run.device)
            except torch.OutOfMemoryError as err:
                print(f"crosscoder       {arch}: not run (out of memory building it: {str(err).splitlines()[0][:80]})")
                why = f"OOM building the module: {str(err)[:60]}"
                run.rows.append(dict(group="crosscoder", dims=dims, impl=f"flash-sae {arch}", t=None, floor=None,
                                     pct=None, err=why, verified=None))  # fmt: skip
                continue
            w = crosscoder_weights(built.module, dims)
            rule = "standard" if arch.startswith("standard") else "batchtopk"
            if rule == "standard":
                shift_bias(w, dims, problem)
            verified[built.label] = True
            impls.append(
                Impl(
                    built.label,
                    lambda b=built: ((lambda: module_loss(b, problem).loss), list(b.module.parameters()), b.capturable),
                    floor_crosscoder(dims, es),
                    True,
                )
            )
            dense_w = leaves(w)
            coef = COEFFICIENT if rule == "standard" else 0.0
            label = "torch eager (dense)" if rule == "batchtopk" else "torch eager (dense, standard)"
            impls.append(
                Impl(
                    label,
                    lambda dw=dense_w, r=rule, c=coef: (
                        (lambda: dense_loss(dense_crosscoder(problem.x, dw, dims.K, r), c)),
                        tensors(dw),
                        True,
                    ),
                    floor_crosscoder(dims, es),
                )
            )
            if "crosscoder" in compiled and rule == "batchtopk":
                fn = compiled["crosscoder"]
                impls.append(
                    Impl(
                        "torch.compile (dense)",
                        lambda dw=dense_w: ((lambda: fn(problem.x, dw, dims.K)), tensors(dw), True),
                        floor_crosscoder(dims, es),
                    )
                )
        if not impls:  # no crosscoder registered yet: the dense formulation on drawn weights
            dense_w = leaves(drawn_crosscoder(dims, run.dtype, run.device))
            impls.append(
                Impl(
                    "torch eager (dense)",
                    lambda: (
                        (lambda: dense_loss(dense_crosscoder(problem.x, dense_w, dims.K))),
                        tensors(dense_w),
                        True,
                    ),
                    floor_crosscoder(dims, es),
                )
            )
        measured = run_group(run, "crosscoder", dims, impls, verified)
        ours = [i.name for i in impls if i.ours]
        if ours:
            summarise(run, "crosscoder", dims, ours[0], measured)
            for name in ours[1:]:
                summarise_extra(run, "crosscoder", dims, name, measured, "torch eager (dense, standard)", 3.0)
        impls = dense_w = problem = None
        if run.device != "cpu":
            torch.cuda.empty_cache()


def drawn_crosscoder(dims: Dims, dtype, device) -> CrosscoderWeights:
    g = torch.Generator(device=device).manual_seed(0)
    L, D, F = dims.L, dims.D, dims.F
    W_dec = torch.randn(F, L, D, generator=g, device=device) * (L * D) ** -0.5
    W_enc = W_dec.permute(1, 2, 0).contiguous()
    zeros = torch.zeros
    return CrosscoderWeights(
        W_enc.to(dtype),
        zeros(F, device=device, dtype=dtype),
        W_dec.to(dtype),
        zeros(L, D, device=device, dtype=dtype),
        None,
    )


# ------------------------------------------------------------------------------------------------ output


def schema_rows(benchmark, env, meta, rows):
    """This script's measured rows -> results_schema rows."""
    out = []
    for r in rows:
        d, t = r["dims"], r["t"]
        shape = dict(B=d.B, D=d.D, F=d.F, K=d.K) | (
            {"L": d.L} if r["group"] in ("clt", "clt_fit", "crosscoder") else {}
        )
        params = {"op": r["group"]}
        if r.get("baseline"):
            params["baseline"] = r["baseline"]
        metrics = dict(
            eager_p20_ms=t.p20 if t else None,
            eager_p80_ms=t.p80 if t else None,
            floor_ms=r["floor"],
            pct_of_floor=r["pct"],
            x_baseline_eager=r.get("x_eager"),
            x_baseline_graph=r.get("x_graph"),
            saved_gib=t.saved_gib if t else None,
            dense_code_gib=r.get("dense_code_gib"),
            copy_bandwidth_tbps=meta.get("copy_bandwidth_tbps"),
        )
        out.append(
            make_row(
                benchmark,
                r["impl"],
                shape,
                dtype=meta["dtype"],
                env=env,
                params=params,
                eager_ms=t.eager_ms if t else None,
                graph_ms=t.graph_ms if t else None,
                peak_gib=t.peak_gib if t else None,
                error=r["err"],
                verified=r["verified"],
                note=RESTATED if r["group"] == "crosscoder" and not r["impl"].startswith("flash-sae") else None,
                **metrics,
            )
        )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter), fp32")
    parser.add_argument("--require-all", action="store_true", help="fail when a row cannot run (exit 1)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-peers", action="store_true", help="leave out sparsify and decode-clt")
    parser.add_argument("--no-probe", action="store_true", help="leave out the CLT's largest-F search")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    # The rows allocate and free modules of very different sizes; growable segments keep the freed memory
    # usable by the next row (read at CUDA's first allocation, so set before it).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    rows_wanted = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows_wanted if r not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {ROWS}")
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype, dname = "cpu", torch.float32, "fp32"
    elif not torch.cuda.is_available():
        sys.exit("transcoders.py needs a CUDA GPU (or --smoke)")
    else:
        device, dtype, dname = "cuda", torch.bfloat16, "bf16"
    from side_by_side import copy_bandwidth, load_kernel

    fs = load_kernel()
    bw = copy_bandwidth() if device == "cuda" else None
    env = environment(device)
    print(
        f"# {env['gpu']}, {env['date']}, torch {env['torch']}"
        + (f", copy bandwidth {bw / 1e12:.2f} TB/s" if bw else ", CPU smoke run")
    )
    print(
        f"{'row':16s} {'(B, D, F, K, L)':30s} {'impl':52s} {'ms (p20-p80)':>24s} {'graph ms':>9s} "
        f"{'peak GiB':>8s} {'kept GiB':>8s} {'% floor':>7s}"
    )
    compiled = {}
    if not (args.no_compile or args.smoke):
        compiled = {
            "transcoder": torch.compile(lambda x, y, w, k: dense_loss(dense_transcoder(x, y, w, k)), dynamic=False),
            "clt": torch.compile(lambda xs, ys, w, k: dense_loss(dense_clt(xs, ys, w, k)), dynamic=False),
            "crosscoder": torch.compile(lambda xs, w, k: dense_loss(dense_crosscoder(xs, w, k)), dynamic=False),
        }
    run = Run(fs, args, device, dtype, dname, bw, [], env)
    meta = dict(dtype=dname, copy_bandwidth_tbps=bw / 1e12 if bw else None)
    stem = f"{BENCHMARK}_smoke" if args.smoke else BENCHMARK
    path = result_path(env["gpu"], stem, args.out)

    def save():  # after each group: a run stopped later keeps the rows measured so far
        write_rows(path, schema_rows(stem, env, meta, run.rows))

    try:
        if "transcoder" in rows_wanted:
            transcoder_rows(run, False, compiled)
            save()
        if "skip_transcoder" in rows_wanted:
            compiled_skip = dict(compiled)  # the skip formulation is another graph: its own compile
            if "transcoder" in compiled:
                compiled_skip["transcoder"] = torch.compile(
                    lambda x, y, w, k: dense_loss(dense_transcoder(x, y, w, k)), dynamic=False
                )
            transcoder_rows(run, True, compiled_skip)
            save()
        if "clt" in rows_wanted:
            clt_rows(run, compiled)
            save()
        if "crosscoder" in rows_wanted:
            crosscoder_rows(run, compiled)
    except RowMissing as why:
        sys.exit(f"--require-all: a row cannot run: {why}")
    failed = [f"{r['impl']} {tuple(r['dims'])}: {r['err']}" for r in run.rows if r["err"] and r["group"] != "clt_fit"]
    save()
    print(f"wrote {path}")
    if failed and args.require_all:
        sys.exit("--require-all: rows failed: " + "; ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
