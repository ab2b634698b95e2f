"""The dead-latent losses the steps can add: AuxK and ghost grads (a private module of ``ops``).

Both act on the dead set (``primitives/dead_set.py``): the first ``capacity`` dead latents from
an offset on, whose pre-activations the step's chunk pass copies out while it selects (``columns`` of
``select.preacts.topk_preacts``), so there is no second encoder GEMM and nothing [B, F]. With e = x -
x_hat the main reconstruction's residual (detached), pre_d [B, C] the dead set's
pre-activations and W_d [C, D] its decoder rows:

AuxK (Gao et al. 2024): each row's k_aux largest dead pre-activations (ties to the lower id;
ranked by pre * scale when the step rescales by decoder norms) form A, relu'd (``relu``; the
paper, OpenAI, sparsify) or not (SAELens); the slots past the number of dead latents stay
empty. With e_hat = A @ W_d (no decoder bias: e already holds it) and
s = min(n_dead / k_aux, 1) over all dead latents (the trainers' scaling),

    aux_loss = s * mean over B*D of (e_hat - e)^2

Ghost grads (Anthropic, January 2024 update; SAELens's former implementation): A = exp(pre_d)
over every dead slot; e_hat = A @ W_d is rescaled per row to half the residual's norm,
n_b = |e_b| / (2 |e_hat_b| + 1e-6) (detached), and the per-row squared error g_b =
|n_b e_hat_b - e_b|^2 is weighted by f_b = |e_b|^2 / (g_b + 1e-6) (detached), so each row's
term has the main loss's size:

    aux_loss = [n_dead > 0] * sum_b f_b g_b / (B * D)

Both normalise as the step's own loss (a mean over B*D), so a trainer's factor for the main
loss (SAELens: D; sparsify: B*D / total variance) maps the auxiliary loss too. The backward is
dense over the slots: dE = d aux / d e_hat [B, D]; dW_d = A^T dE; dA = dE W_d^T; dpre = dA * (the
AuxK gate, or A for exp); then W_enc's rows dpre^T (x - b_dec), b_enc's dpre summed, and
dx = dpre W_enc_d, which reaches b_dec as -sum_b dx. ``encoder_grad`` False stops the
auxiliary gradient at the code (sparsify's behaviour: its encoder's backward ignores the
gradient of the pre-activations the AuxK loss reads), so only the decoder learns from it.
"""

from typing import NamedTuple

import torch

from ..dead_latent_loss import DeadLatentLoss
from ..primitives.dead_set import dead_slots, mm_f32, slot_rows
from ..primitives.select.row_topk import row_top
from ..primitives.step_backward import SlotGrads

AUXK, GHOST = 1, 2
MODES = {"auxk": AUXK, "ghost": GHOST}
# What a step returns after its own outputs for its dead-latent loss, by name (empty without one).
DEAD_OUTPUTS = ("aux_loss", "A", "gate", "dE1", "ids", "valid")


class DeadLossSpec(NamedTuple):
    """A step's dead-latent loss options. The op's schema carries them as one ``list[int]``
    (``to_op`` / ``from_op``, the only place that knows the order); ``aux_coef`` travels as its own float."""

    mode: int = 0  # 0: no dead-latent loss; AUXK or GHOST
    k_aux: int = 0
    capacity: int = 0
    relu: bool = True
    encoder_grad: bool = True

    def to_op(self) -> list[int]:
        return [int(value) for value in self]

    @classmethod
    def from_op(cls, values: list[int]) -> "DeadLossSpec":
        mode, k_aux, capacity, relu, encoder_grad = values
        return cls(mode, k_aux, capacity, bool(relu), bool(encoder_grad))


NO_DEAD_LOSS = DeadLossSpec()


# The op arguments a step with a dead-latent loss adds after its own (``DeadOpArgs``' fields), with their types.
DEAD_INPUTS = {
    "dead_mask": torch.Tensor | None,
    "dead_offset": torch.Tensor | None,
    "dead": list[int],
    "aux_coef": float,
}


class DeadOpArgs(NamedTuple):
    """A step op's dead-latent arguments: the mask, the offset tensor, ``DeadLossSpec.to_op()`` and the coefficient."""

    dead_mask: torch.Tensor | None
    dead_offset: torch.Tensor | None
    dead: list[int]
    aux_coef: float

    @property
    def on(self) -> bool:
        return self.dead_mask is not None


def dead_op_args(dead_loss, x: torch.Tensor, F: int) -> DeadOpArgs:
    """The op arguments of a step's ``dead_loss`` (None or a ``DeadLatentLoss`` with its mask), validated."""
    if dead_loss is None:
        return DeadOpArgs(None, None, NO_DEAD_LOSS.to_op(), 0.0)
    if not isinstance(dead_loss, DeadLatentLoss):
        raise ValueError(f"dead_loss must be None or a DeadLatentLoss (with its mask), got {dead_loss!r}")
    d = dead_loss.checked(x, F)
    spec = DeadLossSpec(MODES[d.kind], d.k_aux, d.capacity, d.relu, d.encoder_grad)
    return DeadOpArgs(d.mask, d.offset, spec.to_op(), d.coef)


def dead_columns(x: torch.Tensor, dead_mask: torch.Tensor, capacity: int, offset: torch.Tensor):
    """(ids, valid, n_dead, pre_d): the slots and the [B, C] buffer the chunk pass fills."""
    ids, valid, n_dead, _ = dead_slots(dead_mask, capacity, offset)
    pre_d = torch.zeros(x.shape[0], capacity, dtype=x.dtype, device=x.device)
    return ids, valid, n_dead, pre_d


def dead_loss_fwd(mode, pre_d, ids, valid, n_dead, residual, W_dec, k_aux, relu, key_scale=None):
    """Returns (aux_loss [] fp32, A [B, C], gate [B, C] bool (AuxK; None for ghost), dE1 [B, D] fp32):
    dE1 is d aux_loss / d e_hat at an upstream gradient of 1."""
    B, D = residual.shape
    W_d = slot_rows(W_dec, ids, valid)
    if mode == AUXK:
        A, gate = row_top(pre_d, valid, ids, k_aux, key_scale, relu)
        diff = mm_f32(A, W_d).add_(residual)  # e_hat - e
        scale = torch.clamp(n_dead / (k_aux * B * D), max=1.0 / (B * D))  # min(n_dead / k_aux, 1) / (B * D)
        return scale * diff.square().sum(), A, gate, diff.mul_(2 * scale)
    A = torch.where(valid, torch.exp(pre_d), 0)
    e_hat = mm_f32(A, W_d)
    e = -residual
    n = e.norm(dim=1, keepdim=True) / (2 * e_hat.norm(dim=1, keepdim=True) + 1e-6)
    diff = n * e_hat - e
    g = diff.pow(2).sum(1, keepdim=True)
    f = e.pow(2).sum(1, keepdim=True) / (g + 1e-6)
    on = (n_dead > 0).float()
    aux = on * (f * g).sum() / (B * D)
    return aux, A, None, diff * (f * n) * (on * 2.0 / (B * D))


class DeadSaved(NamedTuple):
    """What the dead-latent loss's backward reads from its forward (``dead_loss_fwd``, ``dead_columns``):
    A [B, C], the AuxK gate [B, C] bool (None for ghost grads), dE1 [B, D] fp32, and the slots' latent
    ids [C] int64 and valid [C] bool."""

    A: torch.Tensor
    gate: torch.Tensor | None
    dE1: torch.Tensor
    ids: torch.Tensor
    valid: torch.Tensor


def dead_loss_bwd(g_aux, x, W_enc, W_dec, b_dec, saved: DeadSaved, encoder_grad: bool):
    """The auxiliary loss's gradients at upstream gradient ``g_aux`` (0-d fp32): dx [B, D] fp32 (b_dec's
    share is -sum_b dx, added by the step's backward; None without ``encoder_grad``) and the slots' rows
    (dW_enc [C, D] or None, db_enc [C] or None, dW_dec [C, D]), fp32. ``b_dec`` None: no centring."""
    A, gate, dE1, ids, valid = saved.A, saved.gate, saved.dE1, saved.ids, saved.valid
    dtype = W_dec.dtype
    dE = (dE1 * g_aux).to(dtype)
    W_d = slot_rows(W_dec, ids, valid)
    dW_d = mm_f32(A.t(), dE)
    if not encoder_grad:
        return None, None, None, dW_d
    dA = mm_f32(dE, W_d.t())
    dpre = torch.where(gate, dA, 0) if gate is not None else dA * A.float()
    dpre_c = dpre.to(dtype)
    xc = x - b_dec if b_dec is not None else x  # no centring in a step with a separate target
    dW_e = mm_f32(dpre_c.t(), xc)
    dx = mm_f32(dpre_c, slot_rows(W_enc, ids, valid))
    return dx, dW_e, dpre.sum(0), dW_d


def dead_columns_for(x: torch.Tensor, spec: DeadLossSpec, dead_mask, dead_offset):
    """The dead set's slots for the selection's chunk pass to fill: ``(columns, slots)`` with
    columns = (ids, pre_d) for ``select``'s ``columns`` and slots = (ids, valid, n_dead, pre_d);
    (None, None) without a dead-latent loss."""
    if not spec.mode:
        return None, None
    slots = dead_columns(x, dead_mask, spec.capacity, dead_offset)
    ids, _, _, pre_d = slots
    return (ids, pre_d), slots


def dead_outputs(spec: DeadLossSpec, slots, x, residual, W_dec, key_scale=None) -> tuple:
    """The step's ``DEAD_OUTPUTS`` (aux_loss, A, gate, dE1, ids, valid): the dead-latent loss and
    what its backward needs; empty placeholders without one (``dead_fakes`` has the same shapes)."""
    if not spec.mode:
        return dead_fakes(x, W_dec, spec)
    ids, valid, n_dead, pre_d = slots
    aux, A, gate, dE1 = dead_loss_fwd(spec.mode, pre_d, ids, valid, n_dead, residual, W_dec, spec.k_aux, spec.relu,
                                      key_scale)  # fmt: skip
    if gate is None:
        gate = residual.new_empty(0, dtype=torch.bool)
    return aux, A, gate, dE1, ids, valid


def dead_fakes(x: torch.Tensor, W_dec: torch.Tensor, spec: DeadLossSpec) -> tuple:
    """``DEAD_OUTPUTS``' shapes and dtypes for a [B, D_in] input and an [F, D] decoder: all empty without a
    dead-latent loss."""
    B, D = x.shape[0], W_dec.shape[1]
    f32, i64, b8 = torch.float32, torch.int64, torch.bool
    if not spec.mode:
        return (x.new_empty(0, dtype=f32), x.new_empty(0, dtype=x.dtype), x.new_empty(0, dtype=b8),
                x.new_empty(0, dtype=f32), x.new_empty(0, dtype=i64), x.new_empty(0, dtype=b8))  # fmt: skip
    C = spec.capacity
    gate = x.new_empty((B, C) if spec.mode == AUXK else (0,), dtype=b8)
    return (x.new_empty((), dtype=f32), x.new_empty(B, C, dtype=x.dtype), gate, x.new_empty(B, D, dtype=f32),
            x.new_empty(C, dtype=i64), x.new_empty(C, dtype=b8))  # fmt: skip


def backward_with_dead_loss(grad, grad_aux, spec: DeadLossSpec, aux_coef: float, dead, step, mse_backward):
    """A step's (dx, dW_enc, db_enc, dW_dec, db_dec): ``mse_backward(dx_extra, slots)`` (the MSE step's
    backward, which adds the dead-latent loss's ``SlotGrads`` at the dead slots when the step has one).
    ``dead`` = (A, gate, dE1, ids, valid) as the forward returned them; ``step`` = (x, W_enc, W_dec, b_dec)."""
    if not spec.mode:
        return mse_backward(None, None)
    A, gate, dE1, ids, valid = dead
    x, W_enc, W_dec, b_dec = step
    g_aux = torch.add(grad_aux.float(), grad.float(), alpha=aux_coef)
    gate = gate if spec.mode == AUXK else None
    saved = DeadSaved(A=A, gate=gate, dE1=dE1, ids=ids, valid=valid)
    dx, dW_e, db_e, dW_d = dead_loss_bwd(g_aux, x, W_enc, W_dec, b_dec, saved, spec.encoder_grad)
    return mse_backward(dx, SlotGrads(ids=ids, valid=valid, dW_enc=dW_e, db_enc=db_e, dW_dec=dW_d))
