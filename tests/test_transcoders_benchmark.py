"""``benchmarks/transcoders.py``: its CPU smoke mode verifies flash-sae's transcoder, CLT and crosscoder modules
against the dense formulations and writes valid result rows; the verification rejects a module that computes
something else; its layout adapters read the parameter layouts they document; its rows and page render.

The smoke run leaves out (with a message) the rows whose registry names are not registered yet; once every
name the benchmark reads is registered, it runs with ``--require-all``, which fails on any row that cannot run.
"""

import sys
from pathlib import Path

import pytest
import torch
from peers import require

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import results_schema as rs  # noqa: E402
import transcoders as tc  # noqa: E402

ENV = dict(gpu="NVIDIA H100 80GB HBM3", torch="2.13.0", triton="3.7.1", commit="abc1234", date="2026-12-07")
NAMES = sorted({name for names in tc.ARCHS.values() for name in names})


@pytest.mark.slow
def test_smoke_run_verifies_and_writes_rows(fs, tmp_path, capsys):
    require("sparsify")
    require("clt.models.clt")  # decode-clt, installed --no-deps (tests/requirements-nodeps.txt)
    assert tc.main(["--smoke", "--require-all", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    rows = rs.read_rows(tmp_path / "cpu" / "transcoders_smoke.jsonl")  # validates every row
    by_group = {}
    for r in rows:
        assert r["benchmark"] == "transcoders_smoke" and r["gpu"] == "cpu" and r["dtype"] == "fp32"
        assert r.get("error") is None, r
        by_group.setdefault(r["params"]["op"], set()).add(r["implementation"])
    assert set(by_group) == {"transcoder", "skip_transcoder", "clt", "crosscoder"}
    for group, impls in by_group.items():
        assert "torch eager (dense)" in impls, (group, impls)
    assert {"flash-sae TopK SAE step", "sparsify (installed)"} <= by_group["transcoder"]
    assert {"dense [D, D] GEMM fwd + bwd", "sparsify (installed)"} <= by_group["skip_transcoder"]
    assert {n for n in by_group["clt"] if n.startswith("decode-clt")} == {
        "decode-clt (installed, JumpReLU default)",
        "decode-clt (installed, TopK L*K global)",
    }
    ours = [
        r
        for r in rows
        if r["implementation"].startswith("flash-sae") and r["implementation"] != "flash-sae TopK SAE step"
    ]
    assert ours and all(r["verified"] is True for r in ours)
    assert all(f"# verified {name}" in printed for name in NAMES), printed


def test_require_all_fails_on_a_missing_row(fs, tmp_path, monkeypatch):
    """With an architecture taken out of the registry, --require-all stops the run instead of leaving its row out."""
    monkeypatch.delitem(fs.ARCHITECTURES, "jumprelu_clt")
    with pytest.raises(SystemExit, match="--require-all: a row cannot run"):
        tc.main(["--smoke", "--require-all", "--rows", "clt", "--no-peers", "--out", str(tmp_path)])


def test_verification_rejects_another_formula(fs, monkeypatch):
    """Against a dense formulation that decodes without b_dec, the transcoder's verification fails."""

    def without_bias(x, y, w, k, rule="topk"):
        return tc_dense(x, y, w._replace(b_dec=torch.zeros_like(w.b_dec)), k, rule)

    tc_dense = tc.dense_transcoder
    monkeypatch.setattr(tc, "dense_transcoder", without_bias)
    with pytest.raises(AssertionError, match="differs from the dense formulation"):
        tc.verify(fs, "transcoder", "topk_transcoder", False, "cpu")


class _Module(torch.nn.Module):
    def __init__(self, **params):
        super().__init__()
        for name, t in params.items():
            if isinstance(t, list):
                setattr(self, name, torch.nn.ParameterList([torch.nn.Parameter(u) for u in t]))
            else:
                setattr(self, name, torch.nn.Parameter(t))


def test_clt_weights_view_the_module_layout(fs):
    """The benchmark reads a real CLT module's decoders ([F, (L - s) * D] per source) as [F, L - s, D] views that
    carry gradients to the module's own parameters; another layout names the parameters."""
    dims = tc.Dims(2, 5, 7, 1, 3)
    L, D, F = dims.L, dims.D, dims.F
    module = fs.ARCHITECTURES["topk_clt"].build(D, F, 2, n_layers=L, seed=0)
    w = tc.clt_weights(module, dims)
    for s in range(L):
        torch.testing.assert_close(w.W_dec[s], module.W_dec[s].detach().view(F, L - s, D))
    w.W_dec[1].sum().backward()
    assert module.W_dec[1].grad is not None and module.W_dec[0].grad is None
    wrong = _Module(W_enc=torch.randn(L, F, D + 1), W_dec=[torch.randn(F, (L - s) * D) for s in range(L)],
                    b_enc=torch.randn(L, F), b_dec=torch.randn(L, D))  # fmt: skip
    with pytest.raises(ValueError, match="unrecognised CLT parameter layout.*W_enc"):
        tc.clt_weights(wrong, dims)


def test_crosscoder_layouts_read_the_same_weights():
    dims = tc.Dims(2, 5, 7, 1, 3)
    L, D, F = dims.L, dims.D, dims.F
    W_enc, W_dec = torch.randn(L, D, F), torch.randn(F, L, D)
    common = dict(b_enc=torch.randn(F))
    for module in (
        _Module(W_enc=W_enc, W_dec=W_dec, b_dec=torch.zeros(L, D), **common),
        _Module(
            W_enc=W_enc.reshape(L * D, F).T.contiguous(),
            W_dec=W_dec.reshape(F, L * D),
            b_dec=torch.zeros(L * D),
            **common,
        ),
    ):
        w = tc.crosscoder_weights(module, dims)
        torch.testing.assert_close(w.W_enc, W_enc)
        torch.testing.assert_close(w.W_dec, W_dec)
        assert w.b_dec.shape == (L, D) and w.threshold is None


def test_dense_clt_is_the_triangle_sum():
    """The dense CLT's decode: target t sums source s <= t; a source's code reaches no earlier layer."""
    dims = tc.Dims(4, 6, 9, 2, 3)
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(dims.B, dims.L, dims.D, generator=g), torch.randn(dims.B, dims.L, dims.D, generator=g)
    w = tc.drawn_clt(dims, torch.float64, "cpu")
    w = w._replace(W_enc=torch.randn(dims.L, dims.F, dims.D, generator=g, dtype=torch.float64))
    out = tc.dense_clt(xs.double(), ys.double(), w, dims.K)
    pre = torch.einsum("bld,lfd->blf", xs.double(), w.W_enc)
    top = pre.topk(dims.K, dim=-1)
    code = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    for t in range(dims.L):
        expect = sum(code[:, s] @ w.W_dec[s][:, t - s] for s in range(t + 1))
        torch.testing.assert_close(out.y_hat[:, t], expect)


def _fake_rows():
    dims = tc.Dims(4096, 768, 16384, 64, 12)
    t = tc.Timing(20.0, 19.0, 21.0, 10.0, 8.0, 0.5)
    return [
        dict(group="clt", dims=dims, impl="flash-sae topk_clt", t=t, floor=5.0, pct=50.0, err=None, verified=True,
             dense_code_gib=1.5),
        dict(group="clt", dims=dims, impl="torch eager (dense)", t=t._replace(graph_ms=45.0), floor=5.0, pct=11.1,
             err=None, verified=None, x_eager=1.0, x_graph=4.5, baseline="flash-sae topk_clt", dense_code_gib=1.5),
        dict(group="clt_fit", dims=dims._replace(F=65536), impl="flash-sae topk_clt (largest F probe)", t=None,
             floor=None, pct=None, err="OOM: CUDA out of memory.", verified=None),
    ]  # fmt: skip


def test_schema_rows_and_page():
    import report

    out = tc.schema_rows("transcoders", ENV, dict(dtype="bf16", copy_bandwidth_tbps=3.0), _fake_rows())
    for r in out:
        rs.validate_row(r)
    assert out[0]["shape"] == dict(B=4096, D=768, F=16384, K=64, L=12) and out[0]["verified"] is True
    assert out[0]["saved_gib"] == 0.5 and out[0]["dense_code_gib"] == 1.5 and out[0]["params"]["op"] == "clt"
    assert out[1]["x_baseline_graph"] == 4.5 and out[1]["params"]["baseline"] == "flash-sae topk_clt"
    assert out[2]["eager_ms"] is None and out[2]["error"].startswith("OOM")
    text = report.page("h100", "transcoders", out, None)
    assert "flash-sae topk_clt" in text and "4.50×" in text and "out of memory" in text
