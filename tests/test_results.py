"""The committed benchmark results: one schema, generated pages up to date, clean file names.

Also builds rows with each benchmark script's row builder on made-up measurements (no GPU needed).
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import results_schema as rs  # noqa: E402

RESULT_FILES = sorted((BENCH / "results").glob("*/*.jsonl"))
INTERNAL = re.compile(r"issue|(^|[_\-.])v\d+([_\-.]|$)|round|first|session", re.IGNORECASE)

ENV = dict(gpu="NVIDIA H100 80GB HBM3", torch="2.11.0+cu130", triton="3.6.0", commit="abc1234", date="2026-11-28")


def test_there_are_results():
    assert RESULT_FILES, "no benchmarks/results/<gpu>/<benchmark>.jsonl"


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_row_validates(path):
    rows = rs.read_rows(path)
    assert rows, path
    for r in rows:
        assert r["benchmark"] == path.stem, (path, r["benchmark"])
        assert rs.gpu_slug(r["gpu"]) == path.parent.name, (path, r["gpu"])


def test_report_check_passes():
    out = subprocess.run(
        [sys.executable, str(BENCH / "report.py"), "--check"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_internal_words_in_file_names():
    paths = [p for d in (BENCH / "results", ROOT / "docs" / "results") if d.exists() for p in d.rglob("*")]
    bad = [str(p.relative_to(ROOT)) for p in paths if INTERNAL.search(p.name)]
    assert not bad, bad


def test_validator_rejects():
    good = rs.make_row("x_bench", "flash-sae", dict(B=1, D=2), dtype="bf16", eager_ms=1.0, env=ENV)
    rs.validate_row(good)
    for bad in (
        {**good, "typo_ms": 1.0},
        {k: v for k, v in good.items() if k != "graph_ms"},
        {**good, "shape": {"B": 1.5}},
        {**good, "shape": {}},
        {**good, "eager_ms": float("nan")},
        {**good, "eager_ms": "1.0"},
        {**good, "date": "28/11/2026"},
        {**good, "benchmark": "Has Spaces"},
        {**good, "bound_holds": 1},
        {**good, "params": {"a": [1]}},
    ):
        with pytest.raises(ValueError):
            rs.validate_row(bad)


def test_make_row_turns_nan_into_null():
    r = rs.make_row("b", "i", dict(B=1), graph_ms=float("nan"), env=ENV, fvu=float("nan"))
    assert r["graph_ms"] is None and r["fvu"] is None


def test_append_and_read_roundtrip(tmp_path):
    rows = [rs.make_row("b", "i", dict(B=n), eager_ms=n / 3, env=ENV) for n in range(1, 4)]
    path = rs.result_path(ENV["gpu"], "b", tmp_path)
    assert path == tmp_path / "h100" / "b.jsonl"
    rs.append_rows(path, rows[:2])
    rs.append_rows(path, rows[2:])
    assert rs.read_rows(path) == rows
    rs.write_rows(path, rows[:1])
    assert rs.read_rows(path) == rows[:1]
    with pytest.raises(ValueError):
        rs.append_rows(path, [{**rows[0], "oops": 1}])
    assert rs.read_rows(path) == rows[:1]  # nothing written when a row is bad


@pytest.mark.parametrize(
    "name, slug",
    [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("cpu", "cpu"), ("NVIDIA A100-SXM4-80GB", "a100")],
)
def test_gpu_slug(name, slug):
    assert rs.gpu_slug(name) == slug


# Row builders of the benchmark scripts, on made-up measurements -------------------------------------

NAN = float("nan")


def test_side_by_side_rows():
    import side_by_side

    meta = dict(ENV, copy_bandwidth_tbps=3.0)
    rows = [
        dict(op="topk_sae_step", dtype="bf16", B=8, D=40, F=64, K=6, impl="flash-sae", ms=1.0, p20=0.9, p80=1.1,
             graph_ms=0.8, peak_gib=0.1, floor_ms=0.4, pct_floor=50.0, gemm_ms=0.3, x_gemm=2.6, error=None),
        dict(op="topk_sae_step", dtype="bf16", B=8, D=40, F=64, K=6, impl="sparsify (installed)", ms=3.0, p20=2.9,
             p80=3.1, graph_ms=NAN, peak_gib=0.2, floor_ms=0.4, pct_floor=NAN, gemm_ms=0.3, x_gemm=NAN, error=None),
        dict(op="topk_sae_loss", dtype="fp32", B=8, D=40, F=64, K=6, impl="torch eager", ms=NAN, p20=NAN, p80=NAN,
             graph_ms=NAN, peak_gib=NAN, floor_ms=0.4, pct_floor=NAN, error="OOM: CUDA out of memory."),
    ]  # fmt: skip
    out = side_by_side.schema_rows("side_by_side_step", meta, rows)
    assert [r["implementation"] for r in out] == ["flash-sae", "sparsify (installed)", "torch eager"]
    assert out[0]["shape"] == dict(B=8, D=40, F=64, K=6) and out[0]["graph_ms"] == 0.8
    assert out[0]["eager_ms"] == 1.0 and out[0]["pct_of_floor"] == 50.0 and out[0]["commit"] == "abc1234"
    assert out[1]["graph_ms"] is None and out[2]["error"].startswith("OOM")
    assert "gemm_ms" not in out[2]


def test_dead_latents_and_geometry_rows():
    import dead_latents
    import decoder_geometry

    row = dict(B=8, D=40, F=64, K=6, impl="flash-sae + AuxK", ms=2.0, p20=1.9, p80=2.1, graph_ms=1.5, peak_gib=0.1,
               floor_ms=0.5, pct_floor=33.3, x_plain_eager=1.2, x_plain_graph=1.1, error=None)  # fmt: skip
    (r,) = dead_latents.schema_rows("dead_latents", ENV, [row])
    assert r["x_baseline_graph"] == 1.1 and r["dtype"] == "bf16"
    geo = dict(
        F=64, D=40, impl="flash-sae", ms=0.5, graph_ms=0.4, peak_gib=0.0, floor_ms=0.3, error=None, pct_floor=75.0
    )
    (g,) = decoder_geometry.schema_rows("decoder_geometry", ENV, [geo])
    assert g["shape"] == dict(F=64, D=40) and g["pct_of_floor"] == 75.0


def test_standard_rows():
    import standard_sae_step

    meta = dict(ENV, arch="gated", l1_coefficient=1.0)
    row = dict(B=8, D=40, F=64, l0=3.9, density=0.06, capacity=64, impl="flash-sae gated_sae_step", ms=1.0, p20=0.9,
               p80=1.1, graph_ms=0.7, peak_gib=0.01, floor_ms=0.2, pct_floor=28.0, x_sparse_eager=1.0,
               x_sparse_graph=1.0, error=None)  # fmt: skip
    (r,) = standard_sae_step.schema_rows("gated_sae_step", meta, [row])
    assert r["l0"] == 3.9 and r["params"]["arch"] == "gated" and r["params"]["capacity"] == 64


def test_sharded_row():
    import sharded_topk_sae_step

    row = dict(gpu=ENV["gpu"], date="2026-11-27", torch="2.11", world=2, data_world=1, latent_world=2, B=16, D=8,
               F=64, k=4, dtype="bf16", step_ms=1.0, graph_ms=NAN, adam_ms=2.0, collectives_ms=0.1, peak_gib=0.5,
               memory_target_gib=2.5, single_gpu_topk_sae_step_ms=NAN)  # fmt: skip
    r = sharded_topk_sae_step.schema_row("sharded_scaling", row, "3.6.0", "abc1234")
    assert r["shape"]["latent_world"] == 2 and r["graph_ms"] is None and r["eager_ms"] == 1.0


def test_trainers_row():
    import trainers_side_by_side

    row = {"trainer": "flash-sae bf16", "F": 64, "steps": 5, "tokens": 80, "wall_s": 1.0,
           "dtype": "bf16, lr 0.003, graph", "peak_gib": 0.1, "ms_per_step": 2.0, "tokens_per_s": 8000.0,
           "fvu": 0.1, "l0": 4.0, "dead_fraction": 0.0}  # fmt: skip
    r = trainers_side_by_side.schema_row("trainers_side_by_side", row, ENV, 16, 8, 4)
    assert r["dtype"] == "bf16" and r["params"]["setting"] == "bf16, lr 0.003, graph" and r["shape"]["K"] == 4
    oom = {"trainer": "SAELens", "F": 64, "steps": 5, "tokens": 80, "error": "out of memory: ..."}
    r = trainers_side_by_side.schema_row("trainers_side_by_side", oom, ENV, 16, 8, 4)
    assert r["tokens_per_s"] is None and r["error"].startswith("out of memory")


def test_fp8_tune_hierarchical_rows():
    import fp8_prune_bound
    import hierarchical_buffer_precision
    import tune

    bound = dict(data="random", B=4, D=8, F=16, k=2, max_error_over_bound=0.1, bound_holds=True,
                 exact_topk_in_candidates=True, bound_over_spread=1.0, candidates_median=3, candidates_max=4,
                 rows_settled_at_4k=1, rows=4)  # fmt: skip
    gemm = dict(B=4, D=8, F=16, bf16_ms=1.0, fp8_ms=0.5, quantize_w_ms=0.2)
    out = fp8_prune_bound.schema_rows("fp8_prune_bound", ENV, [bound], [gemm])
    assert [r["implementation"] for r in out] == ["fp8 e4m3 prune bound", "bf16 addmm", "e4m3 _scaled_mm"]
    assert out[0]["bound_holds"] is True and out[2]["quantize_w_ms"] == 0.2
    recs = [dict(kind="segment", segment_block_d=512, segment_warps=1, segment_unroll=1, ms=0.4, B=8, D=4, F=16, K=2),
            dict(kind="select", impl="torch.topk", ms=0.5, B=8, F=16, K=2)]  # fmt: skip
    out = tune.schema_rows("tune", ENV, recs)
    assert out[0]["params"] == dict(segment_block_d=512, segment_warps=1, segment_unroll=1)
    assert out[1]["implementation"] == "select: torch.topk" and out[1]["shape"] == dict(B=8, F=16, K=2)
    r = hierarchical_buffer_precision.schema_row(
        "hierarchical_buffer_precision", (4, 2, 8, 16, True), {True: 2e-3, False: 1e-3}, 5e-3, ENV, "cpu"
    )
    assert r["error_ratio"] == 2.0 and r["shape"] == dict(B=4, K=2, F=8, D=16)


def test_report_renders_fake_rows(tmp_path):
    import report

    rows = []
    for impl, g, e in (("flash-sae", 1.0, 1.1), ("torch eager (dense)", 3.0, 3.1), ("sparsify (installed)", None, 2.0)):
        rows.append(rs.make_row("side_by_side_step", impl, dict(B=8, D=40, F=64, K=6), dtype="bf16", eager_ms=e,
                                graph_ms=g, peak_gib=0.1, env=ENV, params={"op": "topk_sae_step"}))  # fmt: skip
    rs.write_rows(tmp_path / "h100" / "side_by_side_step.jsonl", rows)
    found = report.discover(tmp_path)
    text = report.page("h100", "side_by_side_step", found[("h100", "side_by_side_step")], None)
    assert "| (8, 40, 64, 6) | 1.00 / 1.10 (0.100 GiB) |" in text
    head = report.headline(rows)
    assert "**1.00** / 1.10" in head and "not run" in head and "2.00" in head
    assert json.loads(json.dumps(rows)) == rows and not any(
        isinstance(v, float) and math.isnan(v) for r in rows for v in r.values()
    )


def test_compare_builds_rows():
    import compare_builds

    meta = dict(ENV, builds=["flash_sae_old", "flash_sae_new"])
    rows = [dict(op="topk_sae_loss", dtype="bf16", B=8, D=40, F=64, K=6, graph_ratio=0.9,
                 runs={"before": [(1.0, 0.9), (1.1, 0.8)], "after": [(0.9, 0.7), (0.95, 0.72)]})]  # fmt: skip
    out = compare_builds.schema_rows("compare_builds", meta, rows)
    assert [r["implementation"] for r in out] == ["before: flash_sae_old", "after: flash_sae_new"]
    assert (out[0]["eager_ms"], out[0]["graph_ms"]) == (1.0, 0.8) and out[1]["params"]["runs"] == 2


def test_report_writes_checks_and_fills_the_readme_block(tmp_path, monkeypatch):
    import report

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold table\n{report.END}\nrest\n")
    monkeypatch.setattr(report, "DOCS", tmp_path / "docs" / "results")
    monkeypatch.setattr(report, "README", readme)
    assert report.main([]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{report.END}\nrest\n") and "old table" not in text
    assert "flash-sae graph / eager" in text and "sparsify (eager)" in text and "SAELens (eager)" in text
    assert report.main(["--check"]) == 0
    page = tmp_path / "docs" / "results" / "side_by_side_step_h100.md"
    page.write_text(page.read_text() + "edited\n")
    assert report.main(["--check"]) == 1
    assert report.main([]) == 0 and report.main(["--check"]) == 0
    readme.write_text(readme.read_text().replace("**1.99**", "**9.99**"))
    assert report.main(["--check"]) == 1


def test_report_leaves_a_readme_without_markers_alone(tmp_path, monkeypatch, capsys):
    import report

    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    monkeypatch.setattr(report, "README", readme)
    files, text = report.generate()
    assert text is None and readme.read_text() == "no markers here\n"
