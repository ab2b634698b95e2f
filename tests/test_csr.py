"""The CSR segmented sum (primitives/csr.py) with a grid narrower than F.

``TUNING["segment_programs_per_sm"]`` > 0 launches that many programs per SM along the latent axis,
each walking the latents pid, pid + grid, ...; every latent's sum still runs in the same order, so the
ops built on it must give bitwise the gradients of the one-program-per-latent grid.
"""

import pytest
import torch
from encoder_inputs import make_sae, tuning
from parity import call_op, grads, make_inputs


def _all_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.kernels_ci
@pytest.mark.parametrize("per_sm", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_sum_strided_grid_is_bitwise(fs, device, monkeypatch, per_sm, dtype):
    # F = 300 exceeds one program per SM on a GPU (132 on an H100) as well as on the interpreter (1).
    B, K, F, D = 9, 13, 300, 77
    inputs = make_inputs(B, K, F, D, dtype, device, seed=5, duplicates=False)
    sae = list(make_sae(B, D, F, 1, dtype, device, seed=6))
    up = torch.tensor(0.7, device=device)

    def run():
        results = [call_op(fs, op, inputs) for op in ("topk_sae_loss", "hierarchical_topk_sae_loss", "sparse_decode")]
        step = fs.topk_sae_step(*sae, 7)
        return results, (step.loss, *grads(step.loss, sae, up))

    monkeypatch.setitem(tuning(fs), "segment_programs_per_sm", 0)
    one_per_latent, step_one = run()
    monkeypatch.setitem(tuning(fs), "segment_programs_per_sm", per_sm)
    strided, step_strided = run()
    for (out_a, grads_a), (out_b, grads_b) in zip(one_per_latent, strided):
        assert torch.equal(out_a, out_b)
        assert _all_equal(grads_a, grads_b), "a strided latent walk changed a gradient"
    assert _all_equal(step_one, step_strided), "a strided latent walk changed the TopK step"
