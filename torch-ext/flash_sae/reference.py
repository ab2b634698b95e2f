"""Plain-torch reference implementations shared by the tests, benchmarks and example.

Each function is the textbook dense-gather formula, differentiable by autograd.
Called on fp64 copies of the inputs it is the ground truth; called on the
inputs in their own dtype it measures the error torch itself makes in that
dtype, which is what flash-sae's tolerances are relative to.
"""


def sparse_decode(indices, vals, weight, bias=None):
    """x_hat[b] = bias + sum_k vals[b, k] * weight[indices[b, k]]; [B, D]."""
    x_hat = (vals.unsqueeze(-1) * weight[indices.long()]).sum(1)
    if bias is not None:
        x_hat = x_hat + bias
    return x_hat


def topk_sae_loss(indices, weight, vals, bias, target):
    """Mean over B*D of (sparse_decode - target)^2."""
    return (sparse_decode(indices, vals, weight, bias) - target).pow(2).mean()


def hierarchical_topk_sae_loss(indices, weight, vals, bias, target):
    """Mean over B*K*D of the squared error of every prefix reconstruction.

    Prefix j uses the first j+1 columns of ``indices``, in column order.
    """
    recon = bias + (vals.unsqueeze(-1) * weight[indices.long()]).cumsum(1)  # [B, K, D]
    return (recon - target.unsqueeze(1)).pow(2).mean()
