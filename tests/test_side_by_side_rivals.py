"""The step table's rivals (``benchmarks/side_by_side.py: rival_steps``) are the installed packages with their
default configurations, holding the benchmark problem's weights: their losses equal flash-sae's step on
the same problem (sparsify's ``fvu`` is flash-sae's ``fvu``; SAELens's ``loss``, the squared error summed
over D and averaged over B, is D times flash-sae's mean-squared-error loss), so the table times one step."""

import os
import sys
from pathlib import Path

import torch
from peers import require

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_rivals_compute_the_benchmarked_step(fs):
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder cannot run on CPU tensors
    require("sparsify")
    require("sae_lens")
    from side_by_side import make_step_problem, rival_steps

    B, D, F, K = 8, 40, 64, 6
    params = make_step_problem(B, D, F, K, torch.float32, "cpu")
    with torch.no_grad():  # biases and encoder away from the tied zero-bias init, so each term matters
        params[1].mul_(0.7)
        params[2].normal_(0, 0.1)
        params[4].normal_(0, 0.1)
    ours = fs.topk_sae_step(*params, K)
    losses = {}
    for name, call, _, err in rival_steps(params, K, device="cpu"):  # each rival lives while it is measured
        assert err is None, err
        losses[name] = call().float()
    assert set(losses) == {"sparsify (installed)", "SAELens TopK (installed)"}
    torch.testing.assert_close(losses["sparsify (installed)"], ours.fvu, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["SAELens TopK (installed)"], ours.loss * D, rtol=1e-5, atol=1e-6)
