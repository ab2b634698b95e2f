"""benchmarks/inference_encode.py: its CPU smoke mode runs every contender it can without a GPU, and each gives
the module's own code."""

import sys
from pathlib import Path

from peers import require

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_smoke_runs_and_the_codes_agree(capsys):
    require("sae_lens")
    import inference_encode

    assert inference_encode.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "smoke flash-sae sparse_code: the same code" in out
    assert "smoke dense torch: the same code" in out
    assert "smoke SAELens SAE.encode (installed): the same code" in out
