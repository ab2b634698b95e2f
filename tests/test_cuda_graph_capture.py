"""No host sync on the training paths: each step's forward and backward are captured in a CUDA graph,
and the replay gives the eager step's loss and gradients. (A host sync, or a host-to-device copy, makes
capture fail.) GPU only: CUDA graphs need a GPU."""

import pytest
import torch
from encoder_inputs import make_sae

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device"),
]


def _steps(fs, params):
    threshold = torch.full((params[1].shape[0],), 0.3, device="cuda", requires_grad=True)
    dead = torch.arange(params[1].shape[0], device="cuda") % 3 == 0  # a dead-latent mask for the AuxK/ghost steps
    F = params[1].shape[0]
    r_mag, b_mag = (torch.full((F,), v, device="cuda", dtype=params[1].dtype, requires_grad=True) for v in (0.2, 0.1))
    gated = [*params[:3], r_mag, b_mag, *params[3:]]
    return {
        "topk_sae_step": (lambda: fs.topk_sae_step(*params, 8).loss, params),
        "batchtopk_sae_step": (
            lambda: fs.batchtopk_sae_step(*params, 8, rescale_acts_by_decoder_norm=True).loss,
            params,
        ),
        "matryoshka_batchtopk_sae_step": (
            lambda: (
                fs.matryoshka_batchtopk_sae_step(*params, 8, [32, 128, 512], rescale_acts_by_decoder_norm=True).loss
            ),
            params,
        ),
        "matryoshka_topk_sae_step": (
            lambda: fs.matryoshka_topk_sae_step(*params, 8, [32, 128, 512]).loss,
            params,
        ),
        "jumprelu_sae_step": (
            lambda: fs.jumprelu_sae_step(*params, threshold, capacity=64 * 512).loss,
            [*params, threshold],
        ),
        "topk_sae_step+auxk": (
            lambda: _with_aux(fs.topk_sae_step(*params, 8, dead_loss=fs.DeadLatentLoss(dead, k_aux=40))),
            params,
        ),
        "topk_sae_step+ghost": (
            lambda: _with_aux(fs.topk_sae_step(*params, 8, dead_loss=fs.DeadLatentLoss(dead, kind="ghost"))),
            params,
        ),
        "batchtopk_sae_step+auxk": (
            lambda: _with_aux(
                fs.batchtopk_sae_step(*params, 8, rescale_acts_by_decoder_norm=True, dead_loss=fs.DeadLatentLoss(dead))
            ),
            params,
        ),
        "standard_sae_step": (
            lambda: fs.standard_sae_step(*params, capacity=64 * 512, l1_coefficient=0.3).loss,
            params,
        ),
        "standard_sae_step_dense": (lambda: fs.standard_sae_step_dense(*params, l1_coefficient=0.3).loss, params),
        "gated_sae_step": (lambda: fs.gated_sae_step(*gated, capacity=64 * 512, l1_coefficient=0.3).loss, gated),
        "gated_sae_step_dense": (lambda: fs.gated_sae_step_dense(*gated, l1_coefficient=0.3).loss, gated),
    }


def _with_aux(out):
    return out.loss + 0.5 * out.aux_loss


@pytest.mark.parametrize(
    "op",
    [
        "topk_sae_step",
        "batchtopk_sae_step",
        "matryoshka_batchtopk_sae_step",
        "matryoshka_topk_sae_step",
        "jumprelu_sae_step",
        "topk_sae_step+auxk",
        "topk_sae_step+ghost",
        "batchtopk_sae_step+auxk",
        "standard_sae_step",
        "standard_sae_step_dense",
        "gated_sae_step",
        "gated_sae_step_dense",
    ],
)
def test_step_captures_in_a_cuda_graph(fs, op):
    params = list(make_sae(64, 96, 512, 1, torch.bfloat16, "cuda", seed=3))
    call, ps = _steps(fs, params)[op]

    def step():
        for p in ps:
            p.grad = None
        loss = call()
        loss.backward()
        return loss

    eager = step().detach().clone()
    eager_grads = [p.grad.clone() for p in ps]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(loss, eager)
    for p, g in zip(ps, eager_grads):
        assert torch.equal(p.grad, g), "the replayed gradients differ from the eager step's"


@pytest.mark.parametrize("module", ["SparseAutoencoder", "BatchTopKSparseAutoencoder"])
@pytest.mark.parametrize("dead_loss", [None, "auxk"])
def test_module_step_with_dead_tracking_captures(fs, module, dead_loss):
    """The module's training ``loss`` (the step, the threshold update, the dead-latent counts and, with
    ``dead_loss``, the AuxK loss on the current dead mask) captures; each replay advances
    ``tokens_since_fired`` as an eager step does."""
    sae = getattr(fs, module)(
        96, 512, 8, dtype=torch.bfloat16, device="cuda", seed=1, dead_window_tokens=100, dead_loss=dead_loss
    )
    x = torch.randn(64, 96, device="cuda", dtype=torch.bfloat16)

    def step():
        for p in sae.parameters():
            p.grad = None
        out = sae.loss(x)
        out.loss.backward()
        return out.fire_counts

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fired = step()
    before = sae.tokens_since_fired.clone()
    graph.replay()
    torch.cuda.synchronize()
    expect = torch.where(fired > 0, 0, before + 64)
    assert torch.equal(sae.tokens_since_fired, expect)
