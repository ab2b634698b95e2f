"""benchmarks/latent_analysis.py: its CPU smoke mode runs every contender it can and checks that the streamed
statistics equal the dense formulation's over the same tokens."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_smoke_runs_and_agrees(capsys):
    import latent_analysis

    assert latent_analysis.main(["--smoke", "--random-acts"]) == 0
    out = capsys.readouterr().out
    assert "flash-sae LatentAnalysis" in out and "dense torch" in out and "agree" in out
