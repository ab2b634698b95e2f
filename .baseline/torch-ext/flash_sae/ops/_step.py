"""What the fused SAE steps of every family share (a private module of ``ops``, not an op)."""

import torch


def step_grads_fake(x, W_enc, W_dec, b_dec, *extra):
    """A step backward's fake outputs: (dx, dW_enc, db_enc, dW_dec, db_dec), then one per ``extra`` tensor."""
    grads = (torch.empty_like(x), torch.empty_like(W_enc), W_enc.new_empty(W_enc.shape[0]))
    return (*grads, torch.empty_like(W_dec), torch.empty_like(b_dec), *(torch.empty_like(t) for t in extra))


def at_entries(per_latent: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """An [F] vector read at each entry of a code (0 at the empty slots, id -1)."""
    return torch.where(indices >= 0, per_latent[indices.clamp_min(0)], 0.0)


def cuda_fused(fn):
    """``fn`` (a chain of elementwise passes and reductions over [B, F]) compiled by torch.compile for CUDA
    tensors, so the chain runs as a few fused kernels instead of one pass per op; eager elsewhere (the
    CPU and the interpreter run it as written) and when an outer torch.compile traces it. Compiled on
    first use for static shapes: each new shape or dtype compiles again (a training run has one or
    two), and past dynamo's recompile limit (8) new ones run eagerly (the same results up to summation
    order). The first call at a shape compiles: warm up eagerly before capturing a CUDA graph. (Dynamic
    shapes were measured slower: 5.6 s a step at B * F = 2^30; benchmarks/NOTES.md.)"""
    compiled = None

    def call(*args):
        nonlocal compiled
        if not args[0].is_cuda or torch.compiler.is_compiling():
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=False)
        return compiled(*args)

    call.__doc__ = fn.__doc__
    call.eager = fn
    return call
