"""No host sync on the modules' training paths: a module's training step (with dead-latent tracking) is
captured in a CUDA graph and its replay advances the counts as an eager step does (each op's own
capture: test_op_contract.py::test_cuda_graph_capture). (A host sync, or a host-to-device copy, makes
capture fail.) GPU only: CUDA graphs need a GPU."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device"),
]


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
