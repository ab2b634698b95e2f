"""Writers for ``LatentStatistics``: Neuronpedia's dashboard JSON and a self-contained HTML feature browser.

Both read the corpus's token ids by position (``tokens``: a 1-D int tensor or list, ``tokens[p]`` the id of
the token at position p, as ``LatentAnalysis.update`` numbered them) and the text of each id
(``token_strings[id]``), and cut each shown context at the sequence boundaries (``sequence_length``
tokens per sequence, position p in sequence p // sequence_length). Host-side, standard library only.
"""

import html
import json
import math
from pathlib import Path

# The keys of sae-dashboard's ``NeuronpediaDashboardFeature.to_dict`` that a streamed pass over codes does not
# compute (logit tables, neuron alignment, correlations, the decoder direction): present and empty.
_NOT_COMPUTED = (
    "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1", "correlated_neurons_indices",
    "correlated_neurons_l1", "correlated_neurons_pearson", "correlated_features_indices", "correlated_features_l1",
    "correlated_features_pearson", "neg_str", "neg_values", "pos_str", "pos_values", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "decoder_weights_dist", "vector",
)  # fmt: skip


def _as_list(x):
    return x.tolist() if hasattr(x, "tolist") else list(x)


class _Corpus:
    """The token ids and their text, and the window of ``context`` tokens around a position."""

    def __init__(self, tokens, token_strings, sequence_length, context):
        if not isinstance(sequence_length, int) or sequence_length < 1:
            raise ValueError(f"sequence_length must be an int >= 1, got {sequence_length!r}")
        self.tokens, self.strings, self.L, self.context = _as_list(tokens), token_strings, sequence_length, context

    def window(self, p: int) -> tuple[int, int]:
        """(first, last) positions shown around p: ``context`` tokens each side, inside p's sequence."""
        if not 0 <= p < len(self.tokens):
            raise ValueError(f"tokens: position {p} is past the {len(self.tokens)} tokens given")
        start = p // self.L * self.L
        return max(p - self.context[0], start), min(p + self.context[1], start + self.L - 1, len(self.tokens) - 1)

    def text(self, positions) -> list[str]:
        return [str(self.strings[self.tokens[q]]) for q in positions]


def _example(stats, corpus, f, p, value, index=None):
    """One shown token: (tokens, values, qualifying index). With ``index`` (a top token's rank) the values are
    the latent's activations across the window; otherwise only the shown token's value (0 elsewhere)."""
    lo, hi = corpus.window(p)
    if index is not None and stats.top_context_values is not None:
        first = p - stats.context[0]
        values = [float(v) for v in stats.top_context_values[f, index, lo - first : hi - first + 1].tolist()]
    else:
        values = [float(value) if q == p else 0.0 for q in range(lo, hi + 1)]
    return corpus.text(range(lo, hi + 1)), values, p - lo


def _histogram_bars(stats, f):
    if stats.histogram is None or int(stats.fire_counts[f]) == 0:
        return [], []
    edges = stats.histogram_edges[f].tolist()
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    return centres, stats.histogram[f].tolist()


def _feature(stats, corpus, f, n_prompts, dataset):
    """Latent f in ``NeuronpediaDashboardFeature.to_dict``'s layout."""
    acts = []
    for i, (p, v) in enumerate(zip(stats.top_positions[f].tolist(), stats.top_values[f].tolist())):
        if p < 0:
            break
        tokens, values, q = _example(stats, corpus, f, p, v, index=i)
        acts.append(dict(bin_min=-1, bin_max=float(stats.max_activation[f]), bin_contains=-1, tokens=tokens,
                         values=values, qualifying_token_index=q))  # fmt: skip
    if stats.band_positions is not None:
        edges = stats.band_edges[f].tolist()
        for b in reversed(range(stats.band_positions.shape[1])):  # highest band first, as sae-dashboard
            contains = int(stats.band_counts[f, b]) / stats.n_tokens
            for p, v in zip(stats.band_positions[f, b].tolist(), stats.band_values[f, b].tolist()):
                if p < 0:
                    break
                tokens, values, q = _example(stats, corpus, f, p, v)
                acts.append(dict(bin_min=edges[b], bin_max=edges[b + 1], bin_contains=contains, tokens=tokens,
                                 values=values, qualifying_token_index=q))  # fmt: skip
    centres, heights = _histogram_bars(stats, f)
    feature = {name: [] for name in _NOT_COMPUTED}
    feature.update(
        feature_index=f,
        frac_nonzero=float(stats.density[f]),
        freq_hist_data_bar_values=centres,
        freq_hist_data_bar_heights=heights,
        n_prompts_total=n_prompts,
        n_tokens_in_prompt=corpus.L,
        dataset=dataset,
        activations=acts,
    )
    return feature


def _latents(stats, latents):
    F = stats.fire_counts.shape[0]
    chosen = list(range(F)) if latents is None else [int(f) for f in latents]
    bad = [f for f in chosen if not 0 <= f < F]
    if bad:
        raise ValueError(f"latents: {bad[:5]} are not latent ids in [0, {F})")
    return chosen


def dashboard_json(stats, tokens, token_strings, *, sequence_length, latents=None, **metadata) -> dict:
    """``stats`` in Neuronpedia's dashboard layout: sae-dashboard's ``NeuronpediaDashboardBatch`` as a dict
    (``model_id``, ``layer``, ``sae_set``, ``sae_id_suffix`` from ``metadata``; ``features``: one
    ``NeuronpediaDashboardFeature.to_dict()`` per latent of ``latents`` (default: all)).

    Per feature: ``frac_nonzero`` (the density), ``freq_hist_data_bar_values`` / ``_heights`` (the activation
    histogram's bin centres and counts), and ``activations``: the top tokens first (``bin_min`` -1, ``bin_max``
    the maximum, ``bin_contains`` -1, as sae-dashboard's converter writes its top group), then each band's
    samples from the highest band down (``bin_min`` / ``bin_max`` the band's edges, ``bin_contains`` the
    fraction of all tokens in it); each with its window's ``tokens`` (text), ``values`` and the
    ``qualifying_token_index``. A top token's ``values`` are the latent's activations across the window; a
    band sample's are its own value at the qualifying token and 0 elsewhere (the stream keeps no more).
    The logit tables, neuron alignment and correlations are not computed: their keys hold empty lists.
    """
    corpus = _Corpus(tokens, token_strings, sequence_length, stats.context)
    n_prompts = math.ceil(stats.n_tokens / sequence_length)
    dataset = metadata.get("dataset", "")
    return {
        "model_id": metadata.get("model_id", ""),
        "layer": metadata.get("layer", 0),
        "sae_set": metadata.get("sae_set", ""),
        "sae_id_suffix": metadata.get("sae_id_suffix"),
        "features": [_feature(stats, corpus, f, n_prompts, dataset) for f in _latents(stats, latents)],
    }


# HTML ------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1100px}
table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;text-align:right;border-bottom:1px solid #eee}
.card{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin:1em 0}
.ctx{font-family:monospace;font-size:13px;margin:2px 0;white-space:pre-wrap}
.ctx span{border-radius:2px}.ctx .q{outline:1px solid #c00;font-weight:bold}
.stats{color:#555;font-size:13px}svg{display:block;margin:.3em 0}h3{font-size:14px;margin:.6em 0 .2em}
"""
_JS = """
function filterIndex(q){for(const r of document.querySelectorAll('#index tbody tr')){
r.style.display=(q===''||r.dataset.latent===q)?'':'none';}}
"""


def _bars_svg(heights, width=320, height=60, label=""):
    if not heights or max(heights) == 0:
        return "<p class='stats'>(no data)</p>"
    top, w = max(heights), width / len(heights)
    rects = "".join(
        f"<rect x='{i * w:.2f}' y='{height - h / top * height:.2f}' width='{max(w - 1, 1):.2f}' "
        f"height='{h / top * height:.2f}' fill='#4a7bd0'><title>{h}</title></rect>"
        for i, h in enumerate(heights)
    )
    return f"<svg width='{width}' height='{height}' role='img' aria-label='{html.escape(label)}'>{rects}</svg>"


def _context_html(tokens, values, q, peak):
    spans = []
    for i, (t, v) in enumerate(zip(tokens, values)):
        alpha = 0.0 if peak <= 0 else max(0.0, min(1.0, v / peak))
        cls = " class='q'" if i == q else ""
        spans.append(
            f"<span{cls} style='background:rgba(255,120,0,{alpha:.3f})' title='{v:.4g}'>{html.escape(t)}</span>"
        )
    return "<div class='ctx'>" + "".join(spans) + "</div>"


def _card(feature, stats):
    f = feature["feature_index"]
    peak = float(stats.max_activation[f])
    parts = [
        f"<section class='card' id='latent-{f}'><h2>Latent {f}</h2>",
        f"<p class='stats'>density {feature['frac_nonzero']:.3e} ({int(stats.fire_counts[f])} of {stats.n_tokens} "
        f"tokens) &middot; mean {float(stats.mean_activation[f]):.4g} &middot; max {peak:.4g}</p>",
        "<h3>Activation histogram</h3>",
        _bars_svg(feature["freq_hist_data_bar_heights"], label=f"activation histogram of latent {f}"),
    ]
    group = None
    for a in feature["activations"]:
        title = "Top activations" if a["bin_min"] == -1 else (
            f"Band {a['bin_min']:.3g} - {a['bin_max']:.3g} (contains {a['bin_contains']:.3%} of tokens)")  # fmt: skip
        if title != group:
            parts.append(f"<h3>{html.escape(title)}</h3>")
            group = title
        parts.append(_context_html(a["tokens"], a["values"], a["qualifying_token_index"], peak))
    parts.append("<p><a href='#index'>back to the index</a></p></section>")
    return "".join(parts)


def _density_histogram(stats, bins=40):
    """Latents per log10(density) bin, from 10^-8 to 1 (never-fired latents counted apart)."""
    counts = [0] * bins
    for d in stats.density.tolist():
        if d > 0:
            counts[min(bins - 1, max(0, int((math.log10(d) + 8) / 8 * bins)))] += 1
    return counts


def write_html(path, stats, tokens, token_strings, *, sequence_length, latents=None, title="Latents") -> None:
    """Write a self-contained HTML page (inline CSS and a few lines of JS, no framework) to ``path``: the
    log-density histogram of all latents, an index of ``latents`` (default: all) sorted by density (densest
    first; each row links to its card), and one card per latent: its statistics, activation histogram, and
    its top and band contexts with each token shaded by the latent's activation (the shown token outlined).
    Arguments as ``dashboard_json``."""
    data = dashboard_json(stats, tokens, token_strings, sequence_length=sequence_length, latents=latents)
    features = data["features"]
    order = sorted(features, key=lambda ft: (-ft["frac_nonzero"], ft["feature_index"]))
    dead = int((stats.fire_counts == 0).sum())
    rows = "".join(
        f"<tr data-latent='{ft['feature_index']}'><td><a href='#latent-{ft['feature_index']}'>{ft['feature_index']}</a>"
        f"</td><td>{ft['frac_nonzero']:.3e}</td><td>{float(stats.mean_activation[ft['feature_index']]):.4g}</td>"
        f"<td>{float(stats.max_activation[ft['feature_index']]):.4g}</td></tr>"
        for ft in order
    )
    page = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style><script>{_JS}</script></head><body><h1>{html.escape(title)}</h1>"
        f"<p class='stats'>{stats.n_tokens} tokens, {stats.fire_counts.shape[0]} latents, {dead} never fired.</p>"
        "<h3>Latents per log10 density (10^-8 to 1)</h3>"
        f"{_bars_svg(_density_histogram(stats), width=480, label='log density histogram')}"
        "<h2>Index (by density)</h2><p><input placeholder='latent id' oninput='filterIndex(this.value)'></p>"
        "<table id='index'><thead><tr><th>latent</th><th>density</th><th>mean</th><th>max</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>" + "".join(_card(ft, stats) for ft in features) + "</body></html>"
    )
    Path(path).write_text(page, encoding="utf-8")


def write_dashboard_json(path, stats, tokens, token_strings, *, sequence_length, latents=None, **metadata) -> None:
    """``dashboard_json(...)`` written to ``path``."""
    data = dashboard_json(stats, tokens, token_strings, sequence_length=sequence_length, latents=latents, **metadata)
    Path(path).write_text(json.dumps(data), encoding="utf-8")
