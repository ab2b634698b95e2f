"""The encoder's sparse backward: gradients of the pre-activations read at a code's entries.

With ``pre = (x - b_dec) @ W_enc.T + b_enc`` and a code that reads ``pre`` at
(b, indices[b, k]) only, the gradient reaching ``pre`` is zero except at
those entries, where it is ``dpre[b, k]`` (the activation's derivative is
already applied by the caller: the ReLU mask for TopK, the step function for
JumpReLU, ...). Then:

    dW_enc[f] = sum over (b, k) with indices[b, k] == f of dpre[b, k] * (x - b_dec)[b]
    db_enc[f] = sum over the same entries of dpre[b, k]
    dx[b]     = sum_k dpre[b, k] * W_enc[indices[b, k]]
    db_dec    = -sum_b dx[b]            (through the centring x - b_dec)

The first two come from one deterministic CSR segmented pass (``csr.py``),
``dx`` from the row gather (``gather.py``) over the encoder's rows. Cost
O(B*K*D) plus one write of dW_enc; nothing [B, F]; no atomics.
"""

import torch

from .csr import SegmentRows, csr_transpose, segment_sum_weighted
from .gather import gather_rows
from .row_update import ClaimedUpdate


def encoder_backward(
    dpre: torch.Tensor,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_dec: torch.Tensor | None,
    indices: torch.Tensor,
    csr: tuple[torch.Tensor, torch.Tensor] | None = None,
    row_offsets: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    minus: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    update: ClaimedUpdate | None = None,
):
    """Returns (dx fp32 [B, D], dW_enc [F, D] in W_enc's dtype, db_enc fp32 [F], db_dec fp32 [D] or None).

    ``dpre`` fp32, shaped as ``indices``: [B, K], or [N] for a variable-length
    code with ``row_offsets`` and ``rows`` (see ``gather.gather_rows``); ``csr``
    reuses a (perm, offsets) transpose of ``indices``. ``minus = (t, scale, const)``: dx also
    gets ``- scale * const * t`` in the gather's pass (a further gradient of x, e.g. an MSE's
    ``-s * r``), and db_dec is then ``-sum_b`` of that whole dx.
    ``update`` (``row_update.ClaimedUpdate``): W_enc's rows are updated in place by the optimizer in the
    segmented pass (after dx's gather has read them) and dW_enc comes back None.
    """
    K = indices.shape[1] if indices.ndim == 2 else 1
    F = W_enc.shape[0]
    perm, offsets = csr if csr is not None else csr_transpose(indices, F)
    db_enc = torch.empty(F, device=x.device, dtype=torch.float32)
    bias = b_dec.contiguous() if b_dec is not None else None
    centred = SegmentRows(src=x.contiguous(), K=K, rows=rows, bias=bias)  # x - b_dec, in fp32 as it is read
    if update is not None:  # dx's gather reads W_enc's rows before the pass updates them
        dx = gather_rows(dpre, indices, W_enc, out_dtype=torch.float32, row_offsets=row_offsets, minus=minus)
        segment_sum_weighted(perm, offsets, centred, out=W_enc, coef=dpre, coef_sum=db_enc, update=update)
        dW_enc = None
    else:
        dW_enc = torch.empty_like(W_enc)
        segment_sum_weighted(perm, offsets, centred, out=dW_enc, coef=dpre, coef_sum=db_enc)
        dx = gather_rows(dpre, indices, W_enc, out_dtype=torch.float32, row_offsets=row_offsets, minus=minus)
    db_dec = -dx.sum(0) if b_dec is not None else None
    return dx, dW_enc, db_enc, db_dec
