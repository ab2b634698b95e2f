"""What the fused SAE steps of every family share (a private module of ``ops``, not an op)."""

import torch


def step_grads_fake(x, W_enc, W_dec, b_dec, *extra):
    """A step backward's fake outputs: (dx, dW_enc, db_enc, dW_dec, db_dec), then one per ``extra`` tensor."""
    grads = (torch.empty_like(x), torch.empty_like(W_enc), W_enc.new_empty(W_enc.shape[0]))
    return (*grads, torch.empty_like(W_dec), torch.empty_like(b_dec), *(torch.empty_like(t) for t in extra))
