"""The whole backward of an SAE's MSE step at a code: decoder and encoder, one CSR transpose.

With ``loss = c * sum (b_dec + decode(code) - x)^2`` (c = 1 / (B*D)), residual
r = x_hat - x (fp32, kept by the forward) and s = 2 * c * grad:

    dW_dec[f], dots  <- the gather's adjoint over r (one segmented pass; dots = <r[b], W_dec[f]>)
    dpre             =  s * dots where the code's value is > 0 (the ReLU's mask), else 0
    dx, dW_enc, ...  <- the encoder's sparse backward over dpre (``encoder.py``); its gather of
                        dx_enc also subtracts s * r, so dx = dx_enc - s * r comes out of one pass
    db_dec           =  s * sum_b r - sum_b dx_enc (the centring's share) = -sum_b dx

One CSR transpose of the code serves both weight gradients. The code is [B, K] or a
variable-length one (``row_offsets``; see ``gather.gather_rows``). Used by every step whose
reconstruction is a plain decode of its code (TopK, BatchTopK).
"""

import torch

from .csr import csr_transpose
from .encoder import encoder_backward
from .gather import gather_rows_backward, row_ids


def mse_step_backward(
    grad,
    x,
    W_enc,
    W_dec,
    b_dec,
    vals,
    indices,
    residual,
    row_offsets=None,
    *,
    gate=None,
    per_row=False,
    with_da=False,
    levels=None,
    dx_extra=None,
    da_extra=None,
    dw_dec_row_term=None,
    centred=True,
):
    """Returns (dx, dW_enc, db_enc, dW_dec, db_dec), each in W_enc's dtype.

    ``per_row``: the loss sums the squared error over D and averages over B (c = 1 / B)
    instead of the mean over B*D. ``gate`` (bool, shaped as ``vals``): where the code's value
    passes gradient to the pre-activation (default: value > 0, the ReLU). ``with_da``: also
    return da = dL/d(value) at every entry (fp32, shaped as ``vals``) and the CSR transpose
    (perm, offsets), for gradients beyond these five (a JumpReLU threshold's). ``levels``
    ([F] int32, Matryoshka): ``residual`` is [G, B, D], the suffix sums over the prefix levels
    S_g = sum over g' >= g of e_g' (the gradient row of a latent of level g); latent f reads
    S_levels[f], and x, b_dec see S_0, the sum of every level's residual. ``dx_extra`` (fp32
    [B, D]): a further gradient of x through the centring x - b_dec (a dead-latent loss's),
    added to dx and, negated, to db_dec before either is rounded. ``da_extra`` (fp32, shaped as
    ``vals``): a further dL/d(value) per entry (a sparsity penalty's), added before the gate;
    ``dw_dec_row_term`` ([F] fp32): dW_dec[f] also gets ``dw_dec_row_term[f] * (sum of f's values)
    * W_dec[f]`` before its rounding (that penalty's gradient along the decoder rows).
    ``centred`` False: the step reconstructs a separate target (a transcoder's), so the encoder
    reads x itself (no ``x - b_dec``), dx is the encoder's share only and db_dec = s * sum_b r; the
    target's own gradient, -s * r, is ``target_grad``'s.
    """
    stacked = residual
    if levels is not None:
        stacked = residual.reshape(-1, residual.shape[-1])
        residual = residual[0]
    B, D = residual.shape
    csr = csr_transpose(indices, W_dec.shape[0], in_range=True)  # a code the step selected: ids in [-1, F)
    rows = row_ids(row_offsets, indices.numel()) if row_offsets is not None else None
    s_const = 2.0 / B if per_row else 2.0 / (B * D)
    scale_grad = grad.float()
    # The plain ReLU gate with nothing added to da: the segmented pass returns dpre itself.
    fused = gate is None and da_extra is None and not with_da
    dW_dec, dots = gather_rows_backward(
        stacked,
        vals,
        indices,
        W_dec,
        scale=scale_grad,
        scale_const=s_const,
        csr=csr,
        rows=rows,
        levels=levels,
        level_stride=B,
        row_term=dw_dec_row_term,
        gated_dots=fused,
    )
    if fused:
        dpre = dots
    else:
        da = dots * (scale_grad * s_const)
        if da_extra is not None:
            da = da + da_extra
        dpre = torch.where(vals > 0 if gate is None else gate, da, 0.0)
    # dx = dx_enc - s * r in the encoder gather's pass; db_dec = s * sum_b r - sum_b dx_enc = -sum_b dx
    if centred:
        dx, dW_enc, db_enc, db_dec = encoder_backward(
            dpre, x, W_enc, b_dec, indices, csr=csr, row_offsets=row_offsets, rows=rows,
            minus=(residual, scale_grad, s_const),
        )  # fmt: skip
    else:
        dx, dW_enc, db_enc, _ = encoder_backward(dpre, x, W_enc, None, indices, csr=csr, row_offsets=row_offsets,
                                                 rows=rows)  # fmt: skip
        db_dec = residual.sum(0) * (scale_grad * s_const)
    if dx_extra is not None:
        dx = dx + dx_extra
        if centred:
            db_dec = db_dec - dx_extra.sum(0)
    dtype = W_enc.dtype
    grads = (dx.to(dtype), dW_enc, db_enc.to(dtype), dW_dec, db_dec.to(dtype))
    return (*grads, da, csr) if with_da else grads


def target_grad(grad: torch.Tensor, residual: torch.Tensor, dtype: torch.dtype, *, per_row=False) -> torch.Tensor:
    """d loss / d target = -s * r for a step whose loss is the mean over B*D of r^2, r = x_hat - target
    (``per_row``: the sum over D, mean over B, as ``mse_step_backward``'s)."""
    B, D = residual.shape
    return (residual * (grad.float() * (-2.0 / (B if per_row else B * D)))).to(dtype)
