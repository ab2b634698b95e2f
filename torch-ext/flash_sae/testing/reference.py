"""Plain-torch reference implementations shared by the tests, benchmarks and example.

Each function is the textbook dense-gather formula, differentiable by autograd.
Called on fp64 copies of the inputs it is the ground truth; called on the
inputs in their own dtype it measures the error torch itself makes in that
dtype, which is what flash-sae's tolerances are relative to. Result types and
the module base come from production code (``results``, ``modules.base``);
production code never imports this module.
"""

import torch

from .. import results
from ..modules.base import (
    BatchTopKSAEBase,
    GatedSAEBase,
    JumpReLUSAEBase,
    MatryoshkaSAEBase,
    StandardSAEBase,
    TopKSAEBase,
)
from ..results import SparseCode, fire_counts


def sparse_decode(vals, indices, weight, bias=None):
    """x_hat[b] = bias + sum_k vals[b, k] * weight[indices[b, k]]; [B, D]."""
    x_hat = (vals.unsqueeze(-1) * weight[indices.long()]).sum(1)
    if bias is not None:
        x_hat = x_hat + bias
    return x_hat


def varlen_sparse_decode(vals, indices, row_offsets, weight, bias=None):
    """x_hat[b] = bias + sum over i in row_offsets[b]:row_offsets[b+1] of vals[i] * weight[indices[i]]; [B, D]."""
    B = row_offsets.numel() - 1
    n = int(row_offsets[-1])
    rows = torch.repeat_interleave(torch.arange(B, device=vals.device), row_offsets.diff())
    x_hat = torch.zeros(B, weight.shape[1], dtype=weight.dtype, device=weight.device)
    x_hat = x_hat.index_add(0, rows, vals[:n].unsqueeze(-1) * weight[indices[:n].long()])
    return x_hat + bias if bias is not None else x_hat


def varlen_sae_loss(vals, indices, row_offsets, weight, bias, target):
    """Mean over B*D of (varlen_sparse_decode - target)^2."""
    return (varlen_sparse_decode(vals, indices, row_offsets, weight, bias) - target).pow(2).mean()


def topk_sae_loss(indices, weight, vals, bias, target):
    """Mean over B*D of (sparse_decode - target)^2."""
    return (sparse_decode(vals, indices, weight, bias) - target).pow(2).mean()


def hierarchical_topk_sae_loss(indices, weight, vals, bias, target):
    """Mean over B*K*D of the squared error of every prefix reconstruction.

    Prefix j uses the first j+1 columns of ``indices``, in column order.
    """
    recon = bias + (vals.unsqueeze(-1) * weight[indices.long()]).cumsum(1)  # [B, K, D]
    return (recon - target.unsqueeze(1)).pow(2).mean()


# Encoder and the full TopK SAE step ------------------------------------------------


def topk_select(pre, k):
    """The top-k of each row of ``pre`` [B, F], by the tie rule flash-sae documents.

    Larger value first; equal values (and -0.0 == +0.0) go to the lower latent
    id; a NaN ranks by its bits (a positive NaN above +inf, a negative NaN below
    -inf). A stable descending sort of the values' order-preserving integer keys
    states exactly that rule (a sort of the floats themselves would put every NaN
    first). Returns (values, indices), both [B, k], in descending order.
    """
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[pre.element_size()]
    bits = pre.contiguous().view(int_dtype).to(torch.int64)
    width = 8 * pre.element_size()
    keys = bits ^ ((bits >> (width - 1)) & ((1 << (width - 1)) - 1))  # two's-complement order
    keys = torch.where(keys == -1, 0, keys)  # -0.0's key is +0.0's
    indices = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :k]
    return pre.gather(1, indices), indices


def _rounded(t, dtype):
    """``t``'s values rounded to ``dtype`` (kept in t's dtype), with the gradient of the identity."""
    return t + (t.detach().to(dtype).to(t.dtype) - t.detach())


def encoder_preacts(x, W_enc, b_enc, b_dec=None, round_to=None):
    """pre = (x - b_dec) @ W_enc.T + b_enc; [B, F], as ``nn.Linear`` computes it (one rounding).

    ``round_to`` (a dtype) rounds the two intermediates every implementation in that dtype
    rounds, x - b_dec and pre, while keeping exact gradients: exact arithmetic at those
    roundings, the tests' measure of the error they alone cause.
    """
    xc = x - b_dec if b_dec is not None else x
    if round_to is not None:
        xc = _rounded(xc, round_to)
    pre = torch.addmm(b_enc, xc, W_enc.T)
    return _rounded(pre, round_to) if round_to is not None else pre


def topk_encode(x, W_enc, b_enc, k, b_dec=None, indices=None, round_preacts=None):
    """vals = relu(top-k of the pre-activations) and their latent ids; ([B, k], [B, k] int64).

    With ``indices`` given, the selection is skipped and those latents are read
    instead: the tests use it to compare gradients at the kernel's own choice.
    ``round_preacts`` (a dtype): see ``encoder_preacts``'s ``round_to``.
    """
    pre = encoder_preacts(x, W_enc, b_enc, b_dec, round_to=round_preacts)
    if indices is None:
        _, indices = topk_select(pre.detach(), k)
    return torch.relu(pre.gather(1, indices)), indices


def _reconstructed(x, b_dec, target):
    """(what a step reconstructs, the encoder's centre): (x, b_dec) for an SAE, (target, None) for a
    transcoder, which encodes x as it is."""
    return (x, b_dec) if target is None else (target, None)


def fraction_of_variance_unexplained(x, x_hat):
    """sum((x_hat - x)^2) / sum((x - mean_b x)^2), the FVU trainers log."""
    return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def _head(mse, x, x_hat, counts, code, rows) -> dict:
    """The fields every step result starts with, from the reference's dense quantities."""
    fvu = fraction_of_variance_unexplained(x.detach(), x_hat.detach())
    l0 = (code.vals.detach() > 0).sum().float() / rows
    return dict(mse=mse.detach(), fvu=fvu, l0=l0, fire_counts=counts, code=code)


def topk_sae_step(x, W_enc, b_enc, W_dec, b_dec, k, indices=None, round_preacts=None, dead_loss=None, aux_mask=None):
    """Encode, decode and the MSE loss of a TopK SAE, densely: the ground truth for ``topk_sae_step``.

    ``dead_loss``: a ``DeadLatentLoss`` with its mask, as the step's; ``aux_mask`` forces AuxK's
    selection (see ``dead_latent_loss``).
    """
    vals, indices = topk_encode(x, W_enc, b_enc, k, b_dec, indices=indices, round_preacts=round_preacts)
    x_hat = sparse_decode(vals, indices, W_dec, b_dec)
    loss = (x_hat - x).pow(2).mean()
    head = _head(loss, x, x_hat, fire_counts(vals, indices, W_dec.shape[0]), SparseCode(vals, indices), x.shape[0])
    if dead_loss is None:
        return results.TopKSAEStep(loss, **head)
    pre = encoder_preacts(x, W_enc, b_enc, b_dec, round_to=round_preacts)
    aux, coef = dead_latent_loss(pre, x, x_hat, W_dec, dead_loss, aux_mask=aux_mask)
    return results.TopKSAEStep(loss + coef * aux, **head, aux_loss=aux)


def dead_set(dead_mask, capacity, offset=0):
    """[F] bool: the first ``capacity`` dead latents in id order from ``offset`` on, wrapping around."""
    rolled = torch.roll(dead_mask, -offset)  # rolled[i] = dead_mask[(i + offset) % F]
    kept = rolled & (torch.cumsum(rolled.long(), 0) <= capacity)
    return torch.roll(kept, offset)


def auxk_select(pre, dead, k_aux, key_scale=None):
    """[B, F] bool: each row's k_aux largest entries of ``pre`` (times ``key_scale``) among ``dead``
    latents, by the top-k tie rule (a stable descending sort); fewer where fewer are dead."""
    key = pre * key_scale if key_scale is not None else pre
    masked = torch.where(dead, key, float("-inf"))
    _, idx = topk_select(masked, min(k_aux, pre.shape[1]))
    return torch.zeros_like(dead.expand(pre.shape)).scatter(1, idx, True) & dead


def dead_latent_loss(pre, x, x_hat, W_dec, dead_loss, key_scale=None, aux_mask=None):
    """The AuxK or ghost-grads loss over the dense pre-activations [B, F]; returns (aux_loss, coef).

    ``dead_loss``: a ``DeadLatentLoss`` with its mask. The dead set is the first ``capacity`` dead
    latents from ``offset`` on (cyclically; ``dead_set``). AuxK: each row's k_aux
    largest dead entries of ``pre`` (of ``pre * key_scale`` when given), by the top-k tie rule
    (``aux_mask`` [B, F] bool forces the entries that carry a value), relu'd or not, reconstruct e = x - x_hat with
    W_dec (no bias); loss min(n_dead / k_aux, 1) * mean((e_hat - e)^2). Ghost grads: exp(pre)
    over the dead set, the reconstruction rescaled per row to half |e| and each row's squared
    error weighted to the main one's size (see ``ops/_dead.py``).
    """
    B, D = x.shape
    opts = dead_loss.with_defaults(D, W_dec.shape[0])
    k_aux, coef = opts.k_aux, opts.coef
    dead = dead_set(opts.mask, opts.capacity, int(opts.offset or 0))
    n_dead = opts.mask.sum()
    e = (x - x_hat).detach()
    if not opts.encoder_grad:
        pre = pre.detach()
    if opts.kind == "auxk":
        if aux_mask is None:
            aux_mask = auxk_select(pre.detach(), dead, k_aux, key_scale)
        a = torch.where(aux_mask, torch.relu(pre) if opts.relu else pre, 0)
        e_hat = a @ W_dec
        scale = (n_dead.to(x.dtype) / k_aux).clamp(max=1)
        return scale * (e_hat - e).pow(2).mean(), coef
    A = torch.where(dead, torch.exp(pre), 0)
    e_hat = A @ W_dec
    n = (e.norm(dim=1, keepdim=True) / (2 * e_hat.norm(dim=1, keepdim=True) + 1e-6)).detach()
    g = (n * e_hat - e).pow(2).sum(1)
    f = (e.pow(2).sum(1) / (g + 1e-6)).detach()
    return (n_dead > 0).to(x.dtype) * (f * g).sum() / (B * D), coef


# BatchTopK ---------------------------------------------------------------------------


def batch_topk_select(acts, n):
    """The n largest entries of ``acts`` [B, F] over the whole batch, by the tie rule flash-sae documents.

    Larger value first; equal values go to the lower flat position b * F + f (a stable
    descending sort of the flattened batch). Returns (rows, latent ids), [n] int64 each, in
    row-major order (by row, then latent id): the variable-length code's order.
    """
    F = acts.shape[1]
    chosen = torch.sort(acts.flatten(), descending=True, stable=True).indices[:n].sort().values
    return chosen // F, chosen % F


def row_offsets_of(rows, B):
    """[B + 1] bounds of each row's entries in a row-major code."""
    return torch.searchsorted(rows, torch.arange(B + 1, device=rows.device, dtype=rows.dtype))


def batchtopk_sae_step(x, W_enc, b_enc, W_dec, b_dec, k, rescale_acts_by_decoder_norm=False, dead_loss=None, **forced):
    """BatchTopK SAE step, densely (SAELens's formulation): the ground truth for ``batchtopk_sae_step``.

    acts = relu(pre * ||W_dec[f]||) (or relu(pre)); keep the int(k * B) largest over the batch;
    decode acts / ||W_dec[f]|| (or acts) through W_dec. ``forced``: ``selection`` = (rows, ids) forces
    the code, ``aux_mask`` AuxK's selection; ``round_preacts``: see ``encoder_preacts``'s ``round_to``;
    ``target`` ([B, D_out], a transcoder's): x encoded as it is, the target reconstructed.
    """
    selection, round_preacts = forced.get("selection"), forced.get("round_preacts")
    B, F = x.shape[0], W_enc.shape[0]
    y, centre = _reconstructed(x, b_dec, forced.get("target"))
    pre = encoder_preacts(x, W_enc, b_enc, centre, round_to=round_preacts)
    norm = W_dec.norm(dim=1) if rescale_acts_by_decoder_norm else None
    acts = torch.relu(pre * norm if norm is not None else pre)
    rows, ids = selection if selection is not None else batch_topk_select(acts.detach(), int(k * B))
    picked = acts[rows, ids]
    vals = picked * (1 / norm[ids]) if norm is not None else picked
    x_hat = torch.zeros_like(y).index_add(0, rows, vals.unsqueeze(1) * W_dec[ids]) + b_dec
    loss = (x_hat - y).pow(2).mean()
    positive = picked.detach()[picked.detach() > 0]
    min_act = positive.min().float() if positive.numel() else torch.tensor(float("inf"), device=x.device)
    counts = fire_counts(picked, ids, F)
    head = _head(loss, y, x_hat, counts, SparseCode(vals, ids, row_offsets_of(rows, B)), B)
    if dead_loss is None:
        return results.BatchTopKSAEStep(loss, **head, min_act=min_act)
    key_scale = norm.detach() if norm is not None else None
    aux, coef = dead_latent_loss(pre, y, x_hat, W_dec, dead_loss, key_scale=key_scale, aux_mask=forced.get("aux_mask"))
    return results.BatchTopKSAEStep(loss + coef * aux, **head, min_act=min_act, aux_loss=aux)


def matryoshka_batchtopk_sae_step(x, W_enc, b_enc, W_dec, b_dec, k, prefix_sizes, rescale_acts_by_decoder_norm=False,
                                  **forced):  # fmt: skip
    """Matryoshka BatchTopK SAE step, densely: SAELens's nested losses, one decode per prefix level.

    The code is ``batchtopk_sae_step``'s; level g reconstructs with the latents of id < m_g;
    the loss sums every level's mean over B*D of the squared error. ``forced``: ``selection``,
    ``round_preacts`` and ``target``, as ``batchtopk_sae_step``'s (a target: every level
    reconstructs it).
    """
    B, F = x.shape[0], W_enc.shape[0]
    y = x if forced.get("target") is None else forced["target"]
    base = batchtopk_sae_step(x, W_enc, b_enc, W_dec, b_dec, k, rescale_acts_by_decoder_norm, **forced)
    rows = torch.repeat_interleave(torch.arange(B, device=x.device), base.code.row_offsets.diff())
    code = torch.zeros(B, F, dtype=base.code.vals.dtype, device=x.device).index_put(
        (rows, base.code.indices), base.code.vals
    )
    level_losses = []
    for m in prefix_sizes:
        x_hat = code[:, :m] @ W_dec[:m] + b_dec
        level_losses.append((x_hat - y).pow(2).mean())
    level_losses = torch.stack(level_losses)
    head = {**base._asdict(), "mse": level_losses[-1].detach()}
    head = {name: head[name] for name in ("mse", "fvu", "l0", "fire_counts", "code")}
    return results.MatryoshkaSAEStep(level_losses.sum(), **head, level_losses=level_losses, min_act=base.min_act)


def matryoshka_topk_sae_step(
    x, W_enc, b_enc, W_dec, b_dec, k, prefix_sizes, indices=None, round_preacts=None, target=None
):
    """Matryoshka SAE step on a per-row TopK code, densely: the ground truth for ``matryoshka_topk_sae_step``.

    The code is ``topk_encode``'s (``indices`` forces it); level g reconstructs with the latents
    of id < m_g; the loss sums every level's mean over B*D of the squared error. The returned
    code is flattened by row, then latent id. ``target`` ([B, D_out], a transcoder's): x encoded
    as it is, every level reconstructs the target.
    """
    B, F = x.shape[0], W_enc.shape[0]
    y, centre = _reconstructed(x, b_dec, target)
    vals, ids = topk_encode(x, W_enc, b_enc, k, centre, indices=indices, round_preacts=round_preacts)
    code = torch.zeros(B, F, dtype=vals.dtype, device=x.device).scatter(1, ids, vals)
    level_losses = torch.stack([(code[:, :m] @ W_dec[:m] + b_dec - y).pow(2).mean() for m in prefix_sizes])
    ids_sorted, order = ids.sort(dim=1)
    vals_sorted = vals.gather(1, order)
    positive = vals.detach()[vals.detach() > 0]
    min_act = positive.min().float() if positive.numel() else torch.tensor(float("inf"), device=x.device)
    flat = SparseCode(vals_sorted.flatten(), ids_sorted.flatten(), torch.arange(B + 1, device=x.device) * k)
    head = _head(level_losses[-1], y, code @ W_dec + b_dec, fire_counts(vals, ids, F), flat, B)
    return results.MatryoshkaSAEStep(level_losses.sum(), **head, level_losses=level_losses, min_act=min_act)


# JumpReLU ----------------------------------------------------------------------------


def rectangle(u):
    """The rectangle kernel R(u) = 1 for |u| < 1/2."""
    return ((u > -0.5) & (u < 0.5)).to(u)


def jumprelu_masks(z, theta, bandwidth):
    """(active, band): H(z - theta) and R((z - theta) / bandwidth) as bool [B, F], in z's dtype."""
    u = (z - theta) / bandwidth
    return z > theta, (u > -0.5) & (u < 0.5)


class _JumpReLU(torch.autograd.Function):
    """z * H(z - theta), with the paper's straight-through estimator for theta (rectangle kernel)."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth, active, band):
        ctx.save_for_backward(theta, active, band)
        ctx.bandwidth = bandwidth
        return z * active

    @staticmethod
    def backward(ctx, g):
        theta, active, band = ctx.saved_tensors
        dtheta = -(theta / ctx.bandwidth) * band * g
        return active * g, dtheta.sum(0), None, None, None


class _Step(torch.autograd.Function):
    """H(z - theta): no gradient to z; the rectangle estimator for theta."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth, active, band):
        ctx.save_for_backward(band)
        ctx.bandwidth = bandwidth
        return active.to(z)

    @staticmethod
    def backward(ctx, g):
        (band,) = ctx.saved_tensors
        return None, (-(1.0 / ctx.bandwidth) * band * g).sum(0), None, None, None


def jumprelu_sae_step(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth=0.05, l0_coefficient=1.0, **forced):
    """JumpReLU SAE step, densely, as Rajamanoharan et al. (2024) and SAELens's default ("step") define it.

    f = z * H(z - theta), theta = threshold in x's dtype; loss = sum over D of (x_hat - x)^2, mean
    over B, + l0_coefficient * mean over B of sum_f H(z - theta). ``forced``: ``masks`` =
    (active, band) forces which entries are active and in the estimators' band (the tests pass
    flash-sae's, as the TopK tests pass its selection); ``round_preacts`` (a dtype) rounds x - b_dec,
    z and theta to it, with exact gradients (see ``encoder_preacts``); ``target`` ([B, D_out], a
    transcoder's): x encoded as it is, the target reconstructed (the L0 term unchanged). Returns the
    dense code [B, F] in ``code.vals`` (``code.indices``, ``count`` and ``overflow`` None).
    """
    masks, round_preacts = forced.get("masks"), forced.get("round_preacts")
    y, centre = _reconstructed(x, b_dec, forced.get("target"))
    z = encoder_preacts(x, W_enc, b_enc, centre, round_to=round_preacts)
    theta = threshold.to(z.dtype) if round_preacts is None else _rounded(threshold.to(z.dtype), round_preacts)
    active, band = masks if masks is not None else jumprelu_masks(z.detach(), theta.detach(), bandwidth)
    acts = _JumpReLU.apply(z, theta, bandwidth, active, band)
    x_hat = acts @ W_dec + b_dec
    sq = (x_hat - y).pow(2)
    l0 = _Step.apply(z, theta, bandwidth, active, band).sum(-1).mean()
    loss = sq.sum(-1).mean() + l0_coefficient * l0
    head = _head(sq.mean(), y, x_hat, active.sum(0), SparseCode(acts, None), x.shape[0])
    return results.JumpReLUSAEStep(loss, **{**head, "l0": l0.detach().float()}, count=None, overflow=None)


def standard_sae_step(x, W_enc, b_enc, W_dec, b_dec, l1_coefficient=1.0, active=None, round_preacts=None, target=None):
    """Standard (ReLU + L1) SAE step, densely, as Anthropic's April 2024 update and SAELens's default
    ``standard`` training SAE define it.

    f = relu(z); loss = sum over D of (x_hat - x)^2, mean over B, + l1_coefficient * mean over B
    of sum_f f * ||W_dec[f]||. ``active`` ([B, F] bool) forces which entries are active (the tests
    pass flash-sae's, z > 0 in the dtype). Returns the dense code [B, F] in ``code.vals``
    (``code.indices``, ``count`` and ``overflow`` None). ``round_preacts``: see ``encoder_preacts``.
    ``target`` ([B, D_out], a transcoder's): x encoded as it is, the target reconstructed (the
    penalty unchanged).
    """
    y, centre = _reconstructed(x, b_dec, target)
    z = encoder_preacts(x, W_enc, b_enc, centre, round_to=round_preacts)
    if active is None:
        active = z.detach() > 0
    acts = torch.where(active, z, 0)
    x_hat = acts @ W_dec + b_dec
    sq = (x_hat - y).pow(2)
    l1 = (acts * W_dec.norm(dim=1)).sum(-1).mean()
    loss = sq.sum(-1).mean() + l1_coefficient * l1
    head = _head(sq.mean(), y, x_hat, active.sum(0), SparseCode(acts, None), x.shape[0])
    head["l0"] = active.sum(-1).float().mean()
    return results.StandardSAEStep(loss, **head, l1=l1.detach(), count=None, overflow=None)


def gated_sae_step(x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec, l1_coefficient=1.0, freeze_aux_decoder=True, **forced):
    """Gated SAE step, densely, as Rajamanoharan et al. (2024) and SAELens's ``gated`` training SAE define it.

    pi_gate = xc @ W_enc.T + b_gate, pi_mag = exp(r_mag) * (xc @ W_enc.T) + b_mag (SAELens's
    xc @ (W_enc * exp(r_mag)).T + b_mag, in exact arithmetic), f = [pi_gate > 0] * relu(pi_mag);
    loss = mse (summed over D, mean over B) + l1_coefficient * mean over B of sum_f relu(pi_gate) *
    ||W_dec[f]|| + aux, the gate path's reconstruction error through W_dec and b_dec (detached when
    ``freeze_aux_decoder``). ``forced``: ``masks`` = (open gates, positive magnitudes) forces the
    selection (the tests pass flash-sae's); ``round_preacts`` (a dtype) rounds xc, pi_gate and pi_mag
    to it with exact gradients (see ``encoder_preacts``); ``target`` ([B, D_out], a transcoder's):
    xc = x (both paths read x as it is) and both the reconstruction and the auxiliary term
    reconstruct the target. Returns the dense code [B, F] in ``code.vals``.
    """
    masks, round_preacts = forced.get("masks"), forced.get("round_preacts")
    y, centre = _reconstructed(x, b_dec, forced.get("target"))
    gate = encoder_preacts(x, W_enc, b_gate, centre, round_to=round_preacts)  # as nn.Linear: one rounding
    xc = x - centre if centre is not None else x
    if round_preacts is not None:
        xc = _rounded(xc, round_preacts)
    mag = (xc @ W_enc.T) * r_mag.exp() + b_mag
    if round_preacts is not None:
        mag = _rounded(mag, round_preacts)
    opened, positive = masks if masks is not None else (gate.detach() > 0, mag.detach() > 0)
    active = opened & positive
    f = torch.where(active, mag, 0)
    a = torch.where(opened, gate, 0)
    x_hat = f @ W_dec + b_dec
    sq = (x_hat - y).pow(2)
    W_aux, b_aux = (W_dec.detach(), b_dec.detach()) if freeze_aux_decoder else (W_dec, b_dec)
    aux = (a @ W_aux + b_aux - y).pow(2).sum(-1).mean()
    l1 = (a * W_dec.norm(dim=1)).sum(-1).mean()
    loss = sq.sum(-1).mean() + l1_coefficient * l1 + aux
    head = _head(sq.mean(), y, x_hat, active.sum(0), SparseCode(f, None), x.shape[0])
    head["l0"] = active.sum(-1).float().mean()
    return results.GatedSAEStep(loss, **head, l1=l1.detach(), aux=aux.detach(), count=opened.sum(), overflow=None)


# The module -------------------------------------------------------------------------


class SparseAutoencoder(TopKSAEBase):
    """A TopK sparse autoencoder in plain PyTorch: the twin of ``flash_sae.SparseAutoencoder``.

    Parameters, initialisation and the decoder-norm steps are ``TopKSAEBase``'s;
    the passes below are the dense formulas of this module.
    """

    def encode(self, x):
        """(vals, indices), each [B, k]."""
        return topk_encode(x, self.W_enc, self.b_enc, self.k, self.b_dec)

    def decode(self, vals, indices):
        """x_hat [B, D] from a sparse code."""
        return sparse_decode(vals, indices, self.W_dec, self.b_dec)

    def _step(self, x):
        """A ``TopKSAEStep``: the MSE loss (differentiable) and the logged statistics."""
        return topk_sae_step(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, dead_loss=self.step_dead_loss())


class BatchTopKSparseAutoencoder(BatchTopKSAEBase):
    """A BatchTopK SAE in plain PyTorch: the twin of ``flash_sae.BatchTopKSparseAutoencoder``'s ``loss``."""

    def _step(self, x):
        return batchtopk_sae_step(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, self.rescale_acts_by_decoder_norm,
            dead_loss=self.step_dead_loss(),
        )  # fmt: skip


class MatryoshkaBatchTopKSparseAutoencoder(MatryoshkaSAEBase):
    """A Matryoshka BatchTopK SAE in plain PyTorch: the twin of the module's ``loss``."""

    def _step(self, x):
        return matryoshka_batchtopk_sae_step(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, self.prefix_sizes,
            self.rescale_acts_by_decoder_norm,
        )  # fmt: skip


class JumpReLUSparseAutoencoder(JumpReLUSAEBase):
    """A JumpReLU SAE in plain PyTorch: the twin of ``flash_sae.JumpReLUSparseAutoencoder``'s ``loss``."""

    def _step(self, x):
        return jumprelu_sae_step(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.current_threshold(), self.bandwidth,
            self.l0_coefficient,
        )  # fmt: skip


class StandardSparseAutoencoder(StandardSAEBase):
    """A standard (ReLU + L1) SAE in plain PyTorch: the twin of ``flash_sae.StandardSparseAutoencoder``'s
    ``loss``."""

    def _step(self, x):
        return standard_sae_step(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.l1_coefficient)


class GatedSparseAutoencoder(GatedSAEBase):
    """A Gated SAE in plain PyTorch: the twin of ``flash_sae.GatedSparseAutoencoder``'s ``loss``."""

    def _step(self, x):
        return gated_sae_step(x, *self.gated_params(), self.l1_coefficient, self.freeze_aux_decoder)


# Transcoders and skip transcoders --------------------------------------------------------


def topk_transcoder_step(x, W_enc, b_enc, W_dec, b_dec, k, target, indices=None, round_preacts=None):
    """The TopK step reconstructing a separate ``target`` [B, D_out], densely: x [B, D_in] encoded as it
    is (no centring), relu(top-k of x @ W_enc.T + b_enc) decoded through W_dec [F, D_out] and b_dec,
    loss the mean over B*D_out of (y_hat - target)^2. ``indices`` forces the code; ``round_preacts``:
    see ``encoder_preacts``."""
    vals, indices = topk_encode(x, W_enc, b_enc, k, None, indices=indices, round_preacts=round_preacts)
    y_hat = sparse_decode(vals, indices, W_dec, b_dec)
    loss = (y_hat - target).pow(2).mean()
    counts = fire_counts(vals, indices, W_dec.shape[0])
    return results.TopKSAEStep(loss, **_head(loss, target, y_hat, counts, SparseCode(vals, indices), x.shape[0]))


def skip_target(x, y, W_skip, round_to=None):
    """y - x @ W_skip.T [B, D_out], what a skip transcoder's step reconstructs (y itself when ``W_skip`` is
    None); ``round_to`` rounds it to that dtype with exact gradients (the rounding every implementation
    in that dtype makes)."""
    if W_skip is None:
        return y
    target = y - x @ W_skip.T
    return _rounded(target, round_to) if round_to is not None else target


def transcoder_step(step, x, y, params, W_skip=None, **options):
    """A transcoder's training step, densely: ``step`` (``topk_transcoder_step`` or an SAE step of this
    module that takes ``target=``) on x with the target ``skip_target(x, y, W_skip)``, so that y_hat =
    b_dec + a @ W_dec + x @ W_skip.T; ``params`` the step's arguments after x, ``options`` its keywords
    (the forced selection, ``round_preacts``). The result's ``fvu`` is y's: sum (y - y_hat)^2 over the
    total variance of y."""
    target = skip_target(x, y, W_skip, options.get("round_preacts"))
    out = step(x, *params, target=target, **options)
    if W_skip is None:
        return out
    y0 = y.detach()
    return out._replace(fvu=out.mse * y0.numel() / (y0 - y0.mean(0)).pow(2).sum())


def transcoder_forward(x, W_enc, b_enc, W_dec, b_dec, activation, W_skip=None):
    """A trained transcoder's prediction, densely: b_dec + activation(x @ W_enc.T + b_enc) @ W_dec
    (+ x @ W_skip.T); ``activation`` maps the pre-activations [B, F] to the code."""
    y_hat = activation(x @ W_enc.T + b_enc) @ W_dec + b_dec
    return y_hat if W_skip is None else y_hat + x @ W_skip.T


# Cross-layer transcoders ---------------------------------------------------------------


def clt_layer_acts(x, W_enc, b_enc, rule, forced=None, **opts):
    """One CLT layer's dense code [B, F] of x [B, D] (encoded as it is): ``rule`` "topk" (``opts`` k),
    "batchtopk" (``opts`` k: int(k * B) over the batch) or "jumprelu" (``opts`` threshold [F], bandwidth;
    the straight-through estimators of ``_JumpReLU``). ``forced`` fixes the selection: [B, k] ids (topk),
    (rows, ids) (batchtopk) or (active, band) masks [B, F] (jumprelu)."""
    pre = encoder_preacts(x, W_enc, b_enc)
    if rule == "topk":
        ids = forced if forced is not None else topk_select(pre.detach(), opts["k"])[1]
        return torch.zeros_like(pre).scatter(1, ids, torch.relu(pre.gather(1, ids)))
    if rule == "batchtopk":
        acts = torch.relu(pre)
        rows, ids = forced if forced is not None else batch_topk_select(acts.detach(), int(opts["k"] * x.shape[0]))
        return torch.zeros_like(pre).index_put((rows, ids), acts[rows, ids])
    theta = opts["threshold"].to(pre.dtype)
    active, band = forced if forced is not None else jumprelu_masks(pre.detach(), theta.detach(), opts["bandwidth"])
    return _JumpReLU.apply(pre, theta, opts["bandwidth"], active, band)


def clt_decode(acts, W_dec, b_dec):
    """ys_hat [B, L, D] = b_dec[t] + sum over l <= t of ``acts[l] @ W_dec[l -> t]``, with ``W_dec[l]`` of shape
    (F, (L - l) * D)."""
    L, D = b_dec.shape
    out = []
    for t in range(L):
        y = b_dec[t]
        for layer in range(t + 1):
            y = y + acts[layer] @ W_dec[layer].view(-1, L - layer, D)[:, t - layer]
        out.append(y)
    return torch.stack(out, 1)


def cross_layer_transcoder_step(xs, ys, W_enc, b_enc, W_dec, b_dec, rule, forced=None, **opts):
    """A CLT's training step, densely: the ground truth for the ``*CrossLayerTranscoder`` modules' ``loss``.

    xs, ys [B, L, D]; W_enc [L, F, D], b_enc [L, F], W_dec a list of [F, (L - l) * D], b_dec [L, D].
    ``rule`` and ``opts`` as ``clt_layer_acts`` (jumprelu: ``threshold`` [L, F], ``bandwidth``,
    ``sparsity_coefficient``, ``tanh_scale``); ``forced`` a list of each layer's forced selection.
    loss = sum over t of mean over B*D of (ys_hat_t - ys_t)^2, + for jumprelu sparsity_coefficient *
    mean over B of sum over (l, f) of tanh(tanh_scale * ``||W_dec[l][f]||`` * a_{l,f}). Returns a dict:
    loss, mse, fvu, l0, layer_fvu, layer_l0, ys_hat, acts (the dense codes), sparsity_loss.
    """
    B, L, _ = xs.shape
    acts = []
    for layer in range(L):
        layer_opts = dict(opts, threshold=opts["threshold"][layer]) if rule == "jumprelu" else opts
        f = forced[layer] if forced is not None else None
        acts.append(clt_layer_acts(xs[:, layer], W_enc[layer], b_enc[layer], rule, f, **layer_opts))
    ys_hat = clt_decode(acts, W_dec, b_dec)
    sq = (ys_hat - ys).pow(2)
    layer_sq = sq.sum((0, 2))
    loss = sq.mean((0, 2)).sum()
    sparsity = None
    if rule == "jumprelu":
        penalty = sum(
            torch.tanh(opts["tanh_scale"] * W_dec[layer].norm(dim=1) * acts[layer]).sum() for layer in range(L)
        )
        sparsity = opts["sparsity_coefficient"] * penalty / B
        loss = loss + sparsity
    var = (ys - ys.mean(0)).pow(2).sum((0, 2)).detach()
    layer_l0 = torch.stack([(a.detach() > 0).sum() / B for a in acts]).float()
    return dict(loss=loss, mse=sq.mean().detach(), fvu=(layer_sq.sum() / var.sum()).detach(),
                layer_fvu=(layer_sq / var).detach(), l0=layer_l0.sum(), layer_l0=layer_l0, ys_hat=ys_hat, acts=acts,
                sparsity_loss=sparsity)  # fmt: skip


# Crosscoders ---------------------------------------------------------------------------
# Written per layer (Lindsey et al. 2024), not through the [B, L * D] concatenation the kernels use:
# xs [B, L, D]; the module's W_enc and W_dec [F, L * D] read as [F, L, D] (row f: its per-layer blocks).


def crosscoder_preacts(xs, W_enc, b_enc, round_to=None):
    """pre = sum_l W_enc[:, l] x_l + b_enc [B, F]: the encoder reads every layer, uncentred."""
    B, L, D = xs.shape
    pre = torch.einsum("bld,fld->bf", xs, W_enc.reshape(-1, L, D)) + b_enc
    return _rounded(pre, round_to) if round_to is not None else pre


def crosscoder_decode(acts, W_dec, b_dec, L):
    """x_hat_l = sum_f acts_f W_dec[f, l] + b_dec[l]: [B, L, D] from a dense code [B, F]."""
    F = W_dec.shape[0]
    return torch.einsum("bf,fld->bld", acts, W_dec.reshape(F, L, -1)) + b_dec.reshape(L, -1)


def crosscoder_decoder_norms(W_dec, L):
    """sum_l ||W_dec[f, l]|| [F]: the sum of each latent's per-layer decoder norms."""
    return W_dec.reshape(W_dec.shape[0], L, -1).norm(dim=2).sum(1)


def crosscoder_layer_fvu(xs, xs_hat):
    """[L]: each layer's sum of squared errors over its total variance about the batch mean."""
    xs, xs_hat = xs.detach(), xs_hat.detach()
    return (xs_hat - xs).pow(2).sum((0, 2)) / (xs - xs.mean(0)).pow(2).sum((0, 2))


def crosscoder_reconstruction(xs, xs_hat, reconstruction, per_row):
    """The reconstruction term: ``"mse"``, the squared error summed over layers and D, mean over B
    (``per_row``) or mean over B * L * D; ``"layer_l2"``, the mean over B and L of ||x_hat_l - x_l||_2."""
    if reconstruction == "layer_l2":
        return (xs_hat - xs).norm(dim=2).mean()
    sq = (xs_hat - xs).pow(2)
    return sq.sum((1, 2)).mean() if per_row else sq.mean()


def _crosscoder_head(mse, xs, xs_hat, counts, code):
    B = xs.shape[0]
    head = _head(mse, xs.reshape(B, -1), xs_hat.reshape(B, -1), counts, code, B)
    return head, crosscoder_layer_fvu(xs, xs_hat)


def standard_crosscoder_step(xs, W_enc, b_enc, W_dec, b_dec, l1_coefficient=1.0, active=None, round_preacts=None,
                             reconstruction="mse"):  # fmt: skip
    """Standard crosscoder step, densely (Lindsey et al. 2024): f = relu(pre); loss = sum over layers and D
    of (x_hat - x)^2, mean over B (``reconstruction="layer_l2"``: the mean over B and L of each layer's
    error norm), + l1_coefficient * mean over B of sum_f f * sum_l ||W_dec[f, l]||. ``active`` ([B, F]
    bool) forces the active entries; ``round_preacts``: see ``encoder_preacts``."""
    L = xs.shape[1]
    pre = crosscoder_preacts(xs, W_enc, b_enc, round_preacts)
    active = pre.detach() > 0 if active is None else active
    acts = torch.where(active, pre, 0)
    xs_hat = crosscoder_decode(acts, W_dec, b_dec, L)
    sq = (xs_hat - xs).pow(2)
    l1 = (acts * crosscoder_decoder_norms(W_dec, L)).sum(-1).mean()
    loss = crosscoder_reconstruction(xs, xs_hat, reconstruction, per_row=True) + l1_coefficient * l1
    head, layer_fvu = _crosscoder_head(sq.mean(), xs, xs_hat, active.sum(0), SparseCode(acts, None))
    head["l0"] = active.sum(-1).float().mean()
    return results.StandardCrosscoderStep(loss, **head, l1=l1.detach(), count=None, overflow=None, layer_fvu=layer_fvu)


def batchtopk_crosscoder_step(xs, W_enc, b_enc, W_dec, b_dec, k, rescale=True, selection=None, round_preacts=None,
                              reconstruction="mse"):  # fmt: skip
    """BatchTopK crosscoder step, densely: the int(k * B) largest of relu(pre) * sum_l ||W_dec[f, l]||
    (``rescale``; else relu(pre)) over the batch, by ``batch_topk_select``'s tie rule (``selection`` =
    (rows, ids) forces it), valued relu(pre); loss = mean over B * L * D of (x_hat - x)^2
    (``reconstruction="layer_l2"``: the mean over B and L of each layer's error norm)."""
    B, L, _ = xs.shape
    pre = crosscoder_preacts(xs, W_enc, b_enc, round_preacts)
    post = torch.relu(pre)
    ranked = post * crosscoder_decoder_norms(W_dec, L).detach() if rescale else post
    rows, ids = selection if selection is not None else batch_topk_select(ranked.detach(), int(k * B))
    acts = torch.zeros_like(post).index_put((rows, ids), post[rows, ids])
    xs_hat = crosscoder_decode(acts, W_dec, b_dec, L)
    loss = crosscoder_reconstruction(xs, xs_hat, reconstruction, per_row=False)
    mse = (xs_hat - xs).pow(2).mean()
    picked = ranked.detach()[rows, ids]
    positive = picked[picked > 0]
    min_act = positive.min().float() if positive.numel() else torch.tensor(float("inf"), device=xs.device)
    code = SparseCode(post[rows, ids], ids, row_offsets_of(rows, B))
    head, layer_fvu = _crosscoder_head(mse, xs, xs_hat, fire_counts(code.vals, ids, W_enc.shape[0]), code)
    return results.BatchTopKCrosscoderStep(loss, **head, min_act=min_act, aux_loss=None, layer_fvu=layer_fvu)


def topk_crosscoder_step(xs, W_enc, b_enc, W_dec, b_dec, k, indices=None, round_preacts=None):
    """TopK crosscoder step, densely: vals = relu(the k largest pre of each row) (``indices`` forces the
    latents); loss = mean over B * L * D of (x_hat - x)^2."""
    L = xs.shape[1]
    pre = crosscoder_preacts(xs, W_enc, b_enc, round_preacts)
    if indices is None:
        _, indices = topk_select(pre.detach(), k)
    vals = torch.relu(pre.gather(1, indices))
    acts = torch.zeros_like(pre).scatter(1, indices, vals)
    xs_hat = crosscoder_decode(acts, W_dec, b_dec, L)
    loss = (xs_hat - xs).pow(2).mean()
    code = SparseCode(vals, indices)
    head, layer_fvu = _crosscoder_head(loss, xs, xs_hat, fire_counts(vals, indices, W_enc.shape[0]), code)
    return results.TopKCrosscoderStep(loss, **head, aux_loss=None, layer_fvu=layer_fvu)


def jumprelu_crosscoder_step(xs, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth=0.05, l0_coefficient=1.0, **forced):
    """JumpReLU crosscoder step, densely: ``jumprelu_sae_step`` over the [B, L * D] concatenation read
    uncentred (``target`` = the concatenation itself), and each layer's FVU. ``forced``: as
    ``jumprelu_sae_step``'s (``masks``, ``round_preacts``)."""
    B, L, _ = xs.shape
    x = xs.reshape(B, -1)
    step = jumprelu_sae_step(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, l0_coefficient, target=x, **forced)
    xs_hat = crosscoder_decode(step.code.vals, W_dec, b_dec, L)
    return results.JumpReLUCrosscoderStep(**step._asdict(), layer_fvu=crosscoder_layer_fvu(xs, xs_hat))


# Loading: Gemma Scope's JumpReLU SAE, in its own layout -----------------------------------------


def gemma_scope_jumprelu(x, W_enc, b_enc, W_dec, b_dec, threshold):
    """Gemma Scope's JumpReLU SAE as its release computes it, in its layout (W_enc [D, F], W_dec [F, D]):
    z = x @ W_enc + b_enc (x read as it is, no b_dec subtracted), a = relu(z) * (z > threshold),
    x_hat = a @ W_dec + b_dec. Returns (a [B, F], x_hat [B, D])."""
    z = x @ W_enc + b_enc
    a = torch.relu(z) * (z > threshold).to(z.dtype)
    return a, a @ W_dec + b_dec


# Hooks (flash_sae.attach) ------------------------------------------------------------------
# What a hookpoint writes, densely, from the code [N, F] the module computed.


def edited_output(acts, W_dec, b_dec, *, ablate=(), clamp=None, steer=(), x=None):
    """The output of ``attach``'s hook at one hookpoint, in the dtype of ``acts`` [N, F] (the code), ``W_dec``
    [F, D_out] and ``b_dec`` [D_out]: the code with the latents of ``ablate`` set to 0 and those of ``clamp``
    ({latent: value}) set to their values, decoded, plus ``steer``'s (latent id or [D_out] vector, scale)
    terms. ``x`` [N, D_out] given (``keep_error``): x + (edited - acts) @ W_dec + steering, the activation
    changed only by the edits; else edited @ W_dec + b_dec + steering."""
    edited = acts.clone()
    edited[:, list(ablate)] = 0
    for f, value in (clamp or {}).items():
        edited[:, f] = value
    add = torch.zeros_like(b_dec)
    for what, scale in steer:
        add = add + scale * (W_dec[what] if isinstance(what, int) else what.to(b_dec.dtype))
    if x is not None:
        return x + (edited - acts) @ W_dec + add
    return edited @ W_dec + b_dec + add


# Latent analysis -------------------------------------------------------------------------
# ``flash_sae.LatentAnalysis``'s statistics over the whole corpus at once: ``acts`` [T, F] dense, token t at
# position t. Each latent's column is ranked in Python on exact fp64 copies of the values (bf16 and fp32
# convert exactly), so the order is the textbook one: larger value first, then the earlier token.


def latent_analysis(acts, *, top_n, n_quantile_bands=0, samples_per_band=1, histogram_bins=0, seed=0, context=(0, 0)):
    """Dict of ``LatentStatistics``'s fields (without ``context``), computed column by column."""
    from ..latent_analysis import sample_priority

    T, F = acts.shape
    fires = acts > 0
    counts = fires.sum(0)
    zero = acts.new_zeros(F)
    out = dict(
        n_tokens=T,
        fire_counts=counts,
        density=counts.double() / T,
        mean_activation=torch.where(
            counts > 0, torch.where(fires, acts.double(), 0.0).sum(0) / counts.clamp_min(1), 0.0
        ),
        max_activation=torch.where(counts > 0, acts.max(0).values, zero),
        min_activation=torch.where(counts > 0, torch.where(fires, acts, float("inf")).min(0).values, zero),
    )
    top_values, top_positions = acts.new_zeros(F, top_n), torch.full((F, top_n), -1, dtype=torch.int64)
    nb, S = n_quantile_bands, samples_per_band
    band_values, band_positions = acts.new_zeros(F, max(nb, 1), S), torch.full((F, max(nb, 1), S), -1)
    band_counts = torch.zeros(F, max(nb, 1), dtype=torch.int64)
    histogram = torch.zeros(F, max(histogram_bins, 1), dtype=torch.int64)
    for f in range(F):
        col = acts[:, f]
        exact = col.double().tolist()
        firing = [t for t in range(T) if exact[t] > 0]
        ranked = sorted(firing, key=lambda t: (-exact[t], t))[:top_n]
        top_positions[f, : len(ranked)] = torch.tensor(ranked, dtype=torch.int64)
        top_values[f, : len(ranked)] = col[ranked]
        if not firing:
            continue
        v = col.float()
        hi, lo = out["max_activation"][f].float(), out["min_activation"][f].float()
        if nb > 0:
            band = torch.floor(v * nb / hi).clamp(0, nb - 1).long().tolist()
            priority = sample_priority(torch.arange(T), torch.full((T,), f), seed).tolist()
            for b in range(nb):
                members = [t for t in firing if band[t] == b]
                band_counts[f, b] = len(members)
                chosen = sorted(members, key=lambda t: (priority[t], t))[:S]
                band_positions[f, b, : len(chosen)] = torch.tensor(chosen, dtype=torch.int64)
                band_values[f, b, : len(chosen)] = col[chosen]
        if histogram_bins > 0:
            bins = torch.floor((v - lo) * histogram_bins / (hi - lo)).nan_to_num(0.0).clamp(0, histogram_bins - 1)
            histogram[f] = torch.bincount(bins.long()[fires[:, f]], minlength=histogram_bins)
    out.update(top_values=top_values, top_positions=top_positions)
    window = top_positions[:, :, None] + torch.arange(-context[0], context[1] + 1)
    inside = (top_positions[:, :, None] >= 0) & (window >= 0) & (window < T)
    column = torch.where(fires, acts, 0).t()[:, None, :].expand(F, top_n, T)  # 0 where the latent does not fire
    out["top_context_values"] = torch.where(inside, column.gather(2, window.clamp(0, T - 1)), 0)
    if nb > 0:
        steps = torch.arange(nb + 1, dtype=torch.float32)
        out.update(band_edges=out["max_activation"].float()[:, None] * steps / nb, band_counts=band_counts,
                   band_values=band_values, band_positions=band_positions)  # fmt: skip
    if histogram_bins > 0:
        steps = torch.arange(histogram_bins + 1, dtype=torch.float32)
        lo, hi = out["min_activation"].float()[:, None], out["max_activation"].float()[:, None]
        out.update(histogram_edges=lo + (hi - lo) * steps / histogram_bins, histogram=histogram)
    return out
