"""benchmarks/training_iteration.py: its CPU smoke mode runs examples/train_sae.py's iteration, and its
fused-iteration floor counts what the docstring says."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_smoke_runs_the_iteration(capsys):
    import training_iteration

    assert training_iteration.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert out.count("smoke F=") == len(training_iteration.SMOKE["F"])


def test_fused_floor_counts_state_bytes_without_gradients():
    import training_iteration

    B, D, F, k, bw = 4096, 2048, 2**21, 64, 3e12
    slow_gemm = 1e30  # a GEMM that costs nothing: the bytes decide
    floor = training_iteration.fused_iteration_floor_ms(B, D, F, k, bw, slow_gemm)
    expected = ((F * D + B * D + 2 * B * k * D) * 2 + 2 * F * D * 26) / bw * 1e3
    assert abs(floor - expected) <= 1e-9 * expected
