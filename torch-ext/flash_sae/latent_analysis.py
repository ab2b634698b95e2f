"""Corpus-scale latent statistics in a streamed pass over sparse codes, on the device.

``LatentAnalysis`` reads a corpus batch by batch as the sparse codes an SAE's encode returns ([B, k]
values and latent ids for TopK, the flat variable-length code of the threshold SAEs, or a dense [B, F]
activation tensor) and keeps, per latent:

- the firing count (entries > 0), the density (count / tokens), the mean activation over the tokens where
  it fires (summed in fp64), the smallest and largest firing activation;
- the EXACT top ``top_n`` activating tokens of the whole stream: values and token positions, ordered by
  value, ties broken by position (the earlier token wins), bit for bit the dense computation's answer;
- with a second pass over the same stream (``begin_second_pass``), the per-latent activation histogram,
  ``samples_per_band`` sampled tokens per activation band, and the latent's activations on the ``context``
  tokens around each top token (for highlighted contexts; positions are taken to number the corpus's
  tokens in order, so p - 1 is the token before p).

State: O(F * (top_n * (1 + before + after) + n_quantile_bands * samples_per_band + histogram_bins)); per
batch O(E log E + F * N)
for E code entries (two stable sorts of the entries and one ``topk`` over [F, 2N]), nothing of size
[tokens, F], nothing that grows with the stream, and no host sync (token positions continue from a Python
counter; ``result()`` is the only point that reads a count).

**Top-N.** Each entry becomes one packed int64 (``primitives.select.keys.pack``: the activation's sortable
key above ``2^31 - 1 - position``): larger is a larger value, then an earlier token, never a tie. A batch's
entries are sorted by (latent, packed key), the first ``top_n`` of each latent scattered into an [F, N]
candidate block, and ``topk`` over the stored and candidate blocks keeps the N largest: the running
answer is the exact answer over everything seen. Positions must be below 2^31 - 1.

**Bands** follow sae-dashboard's sequence groups: ``n_quantile_bands`` equal-width activation intervals
from 0 to the latent's maximum over the whole corpus. sae-dashboard's interval i is the closed
[i * max / n, (i + 1) * max / n] over every token (zeros included in the lowest one); here a firing token
with activation a is in band ``min(floor(a * n / max), n - 1)`` (computed in fp32), so bands partition the
firing tokens. The maximum is known only at the end of the stream, so the bands (and the histogram's
edges, which are sae-dashboard's: ``histogram_bins`` equal bins from the smallest to the largest firing
activation, as ``torch.histc``) are fixed from the first pass and filled in the second. In each band the
sample is the ``samples_per_band`` tokens of smallest ``sample_priority(position, latent, seed)``, a
seeded integer hash of the token and the latent: a uniform sample without replacement (as far as the hash
is uniform), the same for any batching and any order of the stream; sae-dashboard draws with torch's
global generator instead. Both passes must read the same stream: ``result()`` checks the token counts.
"""

from typing import NamedTuple

import torch

from .latent_analysis_html import dashboard_json, write_html
from .primitives.select.keys import IDX_PAD, KEY_NONE, keys_to_values, pack, sortable_keys, unpack
from .results import SparseCode

# Constants ---------------------------------------------------------------------

_PRIME = 2**31 - 1  # priorities live in [0, _PRIME)
_MIXERS = (0x45D9F3B, 0x2C1B3C6D, 0x297A2D39)  # < 2^31, so every product stays below 2^62
MAX_POSITION = IDX_PAD - 1  # positions are packed as IDX_PAD - position, which must stay positive
_WINDOW_STRIDE = 2**32  # a (latent, position) pair as one int64: latent * 2^32 + position


# The sampling hash ----------------------------------------------------------------


def sample_priority(positions: torch.Tensor, latents: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded hash of (token position, latent id) -> int64 in [0, 2^31 - 1): the band samples are the
    tokens of smallest priority. Integer arithmetic only (no product passes 2^62), so every device and every
    batching gives the same priorities."""
    h = (positions.to(torch.int64) % _PRIME) * 1_000_003 + (latents.to(torch.int64) % _PRIME) * 7_919 + seed % _PRIME
    h = h % _PRIME
    for m in _MIXERS:
        h = ((h ^ (h >> 15)) * m) % _PRIME
    return h


# Results -------------------------------------------------------------------------


class LatentStatistics(NamedTuple):
    """What ``LatentAnalysis.result()`` returns (F latents; tensors on the analysis's device).

    ``n_tokens``: tokens read (one pass). ``fire_counts`` [F] int64: tokens with activation > 0.
    ``density`` [F] fp64: fire_counts / n_tokens. ``mean_activation`` [F] fp64: the mean over firing tokens
    (0 for a latent that never fired). ``max_activation`` / ``min_activation`` [F] in the activations'
    dtype: the largest and smallest firing activation (0 where it never fired).
    ``top_values`` [F, top_n] (activations' dtype) and ``top_positions`` [F, top_n] int64: the top tokens,
    largest first, ties by earlier position; -1 / 0 past a latent's firing count.
    The second pass's fields (None without one): ``band_edges`` [F, n_bands + 1] fp32 (i * max / n_bands);
    ``band_counts`` [F, n_bands] int64: firing tokens per band; ``band_values`` / ``band_positions``
    [F, n_bands, samples_per_band]: the sampled tokens, by increasing priority (-1 / 0 where a band holds
    fewer); ``histogram_edges`` [F, bins + 1] fp32 and ``histogram`` [F, bins] int64 of firing activations.
    ``context``: (tokens before, tokens after) a token that the writers show.
    """

    n_tokens: int
    fire_counts: torch.Tensor
    density: torch.Tensor
    mean_activation: torch.Tensor
    max_activation: torch.Tensor
    min_activation: torch.Tensor
    top_values: torch.Tensor
    top_positions: torch.Tensor
    band_edges: torch.Tensor | None
    band_counts: torch.Tensor | None
    band_values: torch.Tensor | None
    band_positions: torch.Tensor | None
    histogram_edges: torch.Tensor | None
    histogram: torch.Tensor | None
    top_context_values: torch.Tensor | None
    context: tuple[int, int]

    def to_dashboard_json(self, tokens, token_strings, *, sequence_length, latents=None, **metadata) -> dict:
        """The statistics in Neuronpedia's dashboard layout (sae-dashboard's ``NeuronpediaDashboardBatch``);
        see ``flash_sae.latent_analysis_html.dashboard_json`` for the arguments."""
        return dashboard_json(self, tokens, token_strings, sequence_length=sequence_length, latents=latents, **metadata)

    def write_html(self, path, tokens, token_strings, *, sequence_length, latents=None, title="Latents") -> None:
        """A self-contained HTML feature browser; see ``flash_sae.latent_analysis_html.write_html``."""
        write_html(path, self, tokens, token_strings, sequence_length=sequence_length, latents=latents, title=title)


# The merge -----------------------------------------------------------------------


def _segment_top(store: torch.Tensor, payload, seg: torch.Tensor, keys: torch.Tensor, values):
    """Keep per segment the ``S`` largest packed keys of ``store`` [G, S] and the entries (``seg`` [E] in
    [0, G], G meaning no segment; ``keys`` [E] packed int64). ``payload`` [G, S] / ``values`` [E]: a value
    carried with each key (or None). Returns (keys [G, S], payload [G, S] or None, the sort's permutation,
    segment starts [G + 1]): the permutation orders the entries by (segment, key descending)."""
    G, S = store.shape
    by_key = torch.sort(keys, descending=True, stable=True).indices
    by_seg = torch.sort(seg[by_key], stable=True).indices
    perm = by_key[by_seg]
    seg_sorted = seg[perm]
    starts = torch.searchsorted(seg_sorted, torch.arange(G + 1, device=seg.device))
    rank = torch.arange(seg.numel(), device=seg.device) - starts[seg_sorted]
    slot = torch.where((rank < S) & (seg_sorted < G), seg_sorted * S + rank, G * S)
    cand = torch.full((G * S + 1,), KEY_NONE, dtype=torch.int64, device=seg.device)
    cand.scatter_(0, slot, torch.where(slot < G * S, keys[perm], KEY_NONE))
    merged, where = torch.cat([store, cand[: G * S].view(G, S)], dim=1).topk(S, dim=1)
    if payload is None:
        return merged, None, perm, starts
    cand_vals = values.new_zeros(G * S + 1).scatter_(0, slot, torch.where(slot < G * S, values[perm], 0))
    carried = torch.cat([payload, cand_vals[: G * S].view(G, S)], dim=1).gather(1, where)
    return merged, torch.where(merged == KEY_NONE, 0, carried), perm, starts


class _Entries(NamedTuple):
    """A batch's code as flat entries: value, latent, token position, and whether it fires."""

    vals: torch.Tensor
    latents: torch.Tensor
    positions: torch.Tensor
    live: torch.Tensor


# The analysis ----------------------------------------------------------------------


class LatentAnalysis:
    """Streamed per-latent statistics of an SAE's codes over a corpus (see the module docstring).

    Args:
        n_features: F, the number of latents.
        top_n: top activating tokens kept per latent (>= 1).
        n_quantile_bands: activation bands (sae-dashboard's ``n_quantiles``, default 10); 0: none.
        samples_per_band: sampled tokens per band (sae-dashboard's ``quantile_group_size``, default 5).
        histogram_bins: bins of the per-latent activation histogram (sae-dashboard's 50); 0: none.
        context: (tokens before, tokens after) each shown token, for the writers (sae-dashboard's (5, 5)).
        seed: the band sampling's seed.
        device: where the state lives (the codes' device).

    ``update(code, token_positions=None)`` per batch: ``code`` a ``SparseCode`` or a tuple (vals [B, k],
    indices [B, k]) or (vals [E], indices [E], row_offsets [B + 1]), or dense activations [B, F];
    ``token_positions`` [B] int64 positions of the batch's tokens in the corpus (by default they continue
    from the previous batch's). Entries with value <= 0, or a latent id outside [0, F) (an empty slot's -1),
    do not fire and are skipped: ids are not range-checked, which would need a host sync. If bands, a
    histogram or context activations are asked for, call ``begin_second_pass()`` after
    the first pass and ``update`` again over the same stream. ``result()`` gives ``LatentStatistics``.
    """

    def __init__(
        self,
        n_features: int,
        *,
        top_n: int = 20,
        n_quantile_bands: int = 10,
        samples_per_band: int = 5,
        histogram_bins: int = 50,
        context: tuple[int, int] = (5, 5),
        seed: int = 0,
        device: torch.device | str | None = None,
    ):
        _check_count("n_features", n_features, 1)
        _check_count("top_n", top_n, 1)
        _check_count("n_quantile_bands", n_quantile_bands, 0)
        _check_count("samples_per_band", samples_per_band, 1)
        _check_count("histogram_bins", histogram_bins, 0)
        if not (
            isinstance(context, (tuple, list))
            and len(context) == 2
            and all(isinstance(c, int) and c >= 0 for c in context)
        ):
            raise ValueError(f"context must be (tokens before, tokens after), two ints >= 0; got {context!r}")
        F, dev = n_features, torch.device(device if device is not None else "cpu")
        self.n_features, self.top_n, self.n_bands = F, top_n, n_quantile_bands
        self.samples_per_band, self.bins, self.context, self.seed = (
            samples_per_band,
            histogram_bins,
            tuple(context),
            seed,
        )
        self.device, self.dtype, self.passes = dev, None, 1
        self.tokens = [0, 0]  # tokens read in each pass (Python ints: no sync)
        self.fire_counts = torch.zeros(F, dtype=torch.int64, device=dev)
        self.sums = torch.zeros(F, dtype=torch.float64, device=dev)
        self.min_keys = torch.full((F,), 2**31 - 1, dtype=torch.int32, device=dev)
        self.top = torch.full((F, top_n), KEY_NONE, dtype=torch.int64, device=dev)

    @property
    def needs_second_pass(self) -> bool:
        """Whether bands, a histogram or context activations were asked for: they are filled in a second pass."""
        return self.n_bands > 0 or self.bins > 0 or self.context != (0, 0)

    def update(self, code, token_positions: torch.Tensor | None = None) -> None:
        """Add one batch's code (see the class docstring); no host sync."""
        e = self._entries(code, token_positions)
        if self.passes == 1:
            self._first_pass(e)
        else:
            self._second_pass(e)

    def begin_second_pass(self) -> None:
        """Fix the bands and histogram edges from the first pass's extremes; ``update`` then fills them. One host
        sync (sizing the set of context positions), once per analysis."""
        if not self.needs_second_pass:
            raise ValueError("n_quantile_bands, histogram_bins and context are 0: there is no second pass")
        if self.passes == 2:
            raise ValueError("begin_second_pass was already called")
        if self.tokens[0] == 0:
            raise ValueError("the corpus is empty: update was never called before begin_second_pass")
        self.passes = 2
        F, dev, nb, S = self.n_features, self.device, self.n_bands, self.samples_per_band
        self.max_act = self._max_values().float()
        self.min_act = self._min_values().float()
        self.band_keys = torch.full((F * max(nb, 1), S), KEY_NONE, dtype=torch.int64, device=dev)
        self.band_vals = torch.zeros(F * max(nb, 1), S, dtype=self.dtype, device=dev)
        self.band_counts = torch.zeros(F * max(nb, 1), dtype=torch.int64, device=dev)
        self.histogram = torch.zeros(F * max(self.bins, 1), dtype=torch.int64, device=dev)
        before, after = self.context
        offsets = torch.arange(-before, after + 1, device=dev)
        window = self.top_positions()[:, :, None] + offsets  # [F, N, w] positions around each top token
        latent = torch.arange(F, device=dev)[:, None, None]
        wanted = torch.where((window >= 0) & (self.top[:, :, None] != KEY_NONE), latent * _WINDOW_STRIDE + window, -1)
        self.window_keys, self.window_of = torch.unique(wanted.reshape(-1), return_inverse=True)  # once, not per batch
        self.window_vals = torch.zeros(self.window_keys.numel() + 1, dtype=self.dtype, device=dev)

    def result(self) -> LatentStatistics:
        """The statistics (``LatentStatistics``). Raises ValueError on an empty corpus, or when a second
        pass read a different number of tokens than the first."""
        n = self.tokens[0]
        if n == 0:
            raise ValueError("the corpus is empty: update was never called (no tokens to analyse)")
        if self.passes == 2 and self.tokens[1] != n:
            raise ValueError(
                f"the second pass read {self.tokens[1]} tokens, the first {n}: both must read the same stream"
            )
        F = self.n_features
        top_vals, top_pos = unpack(self.top, self.dtype)
        none = self.top == KEY_NONE
        counts = self.fire_counts
        fields = dict(
            n_tokens=n,
            fire_counts=counts.clone(),
            density=counts.double() / n,
            mean_activation=torch.where(counts > 0, self.sums / counts.clamp_min(1), 0.0),
            max_activation=self._max_values(),
            min_activation=self._min_values(),
            top_values=torch.where(none, 0, top_vals),
            top_positions=torch.where(none, -1, top_pos),
            band_edges=None, band_counts=None, band_values=None, band_positions=None,
            histogram_edges=None, histogram=None, top_context_values=None, context=self.context,
        )  # fmt: skip
        if self.passes == 2 and self.n_bands > 0:
            nb, S = self.n_bands, self.samples_per_band
            steps = torch.arange(nb + 1, device=self.device, dtype=torch.float32)
            empty = self.band_keys == KEY_NONE
            fields.update(
                band_edges=self.max_act[:, None] * steps / nb,
                band_counts=self.band_counts.view(F, nb).clone(),
                band_values=torch.where(empty, 0, self.band_vals).view(F, nb, S),
                band_positions=torch.where(empty, -1, IDX_PAD - (self.band_keys & 0xFFFFFFFF)).view(F, nb, S),
            )
        if self.passes == 2 and self.bins > 0:
            steps = torch.arange(self.bins + 1, device=self.device, dtype=torch.float32)
            lo, hi = self.min_act[:, None], self.max_act[:, None]
            fields.update(
                histogram_edges=lo + (hi - lo) * steps / self.bins, histogram=self.histogram.view(F, self.bins).clone()
            )
        if self.passes == 2:
            w = sum(self.context) + 1
            vals = torch.where(self.window_keys >= 0, self.window_vals[:-1], 0)
            fields.update(top_context_values=vals[self.window_of].view(F, self.top_n, w))
        return LatentStatistics(**fields)

    # The two passes ------------------------------------------------------------------

    def _first_pass(self, e: _Entries) -> None:
        F = self.n_features
        seg = torch.where(e.live, e.latents, F)
        keys = sortable_keys(e.vals)
        packed = torch.where(e.live, pack(keys, e.positions), KEY_NONE)
        self.top, _, perm, starts = _segment_top(self.top, None, seg, packed, None)
        sums = torch.segment_reduce(
            torch.where(e.live, e.vals.double(), 0.0)[perm], "sum",
            offsets=torch.cat([starts, starts.new_tensor([seg.numel()])]), unsafe=True,
        )  # fmt: skip
        self.sums += sums[:F]
        self.fire_counts.index_add_(0, e.latents.clamp(0, F - 1), e.live.to(torch.int64))
        self.min_keys.scatter_reduce_(0, e.latents.clamp(0, F - 1), torch.where(e.live, keys, 2**31 - 1), "amin")

    def top_positions(self) -> torch.Tensor:
        """[F, top_n] int64: the current top tokens' positions (-1 past a latent's firing count)."""
        return torch.where(self.top == KEY_NONE, -1, IDX_PAD - (self.top & 0xFFFFFFFF))

    def _second_pass(self, e: _Entries) -> None:
        F, lat = self.n_features, e.latents.clamp(0, self.n_features - 1)
        key = torch.where(e.live, lat * _WINDOW_STRIDE + e.positions, -2)
        at = torch.searchsorted(self.window_keys, key).clamp_max(self.window_keys.numel() - 1)
        hit = self.window_keys[at] == key  # (latent, token) lies in a window of one of the latent's top tokens
        # each (latent, token) comes once per pass, so hits never collide; misses go to the spare last slot
        self.window_vals.index_put_((torch.where(hit, at, self.window_keys.numel()),), e.vals)
        v = e.vals.float()
        if self.n_bands > 0:
            nb = self.n_bands
            band = torch.floor(v * nb / self.max_act[lat]).clamp(0, nb - 1).to(torch.int64)
            seg = torch.where(e.live, lat * nb + band, F * nb)
            priority = sample_priority(e.positions, lat, self.seed)
            packed = torch.where(e.live, pack((_PRIME - 1 - priority).to(torch.int32), e.positions), KEY_NONE)
            self.band_keys, self.band_vals, _, _ = _segment_top(self.band_keys, self.band_vals, seg, packed, e.vals)
            self.band_counts.index_add_(0, seg.clamp_max(F * nb - 1), e.live.to(torch.int64))
        if self.bins > 0:
            lo, hi = self.min_act[lat], self.max_act[lat]
            b = torch.floor((v - lo) * self.bins / (hi - lo)).nan_to_num(0.0).clamp(0, self.bins - 1).to(torch.int64)
            self.histogram.index_add_(0, lat * self.bins + b, e.live.to(torch.int64))

    def _max_values(self) -> torch.Tensor:
        vals, _ = unpack(self.top[:, 0], self.dtype)
        return torch.where(self.top[:, 0] == KEY_NONE, 0, vals)

    def _min_values(self) -> torch.Tensor:
        return torch.where(self.fire_counts > 0, keys_to_values(self.min_keys, self.dtype), 0)

    # Input ---------------------------------------------------------------------------

    def _entries(self, code, token_positions) -> _Entries:
        """The batch as flat entries; checks shapes, dtypes and devices (ValueError naming the argument)."""
        F = self.n_features
        if isinstance(code, torch.Tensor):
            if code.dim() != 2 or code.shape[1] != F:
                raise ValueError(f"code: dense activations must be [B, n_features={F}], got {tuple(code.shape)}")
            B = code.shape[0]
            vals, indices, rows = code.reshape(-1), torch.arange(F, device=code.device).repeat(B), None
        else:
            code = SparseCode(*code)
            vals, indices, offsets = code.vals, code.indices, code.row_offsets
            if indices.shape != vals.shape or indices.dtype.is_floating_point:
                raise ValueError(
                    f"code: indices must be integer and of vals's shape {tuple(vals.shape)}, got {tuple(indices.shape)}"
                )
            if offsets is None:
                if vals.dim() != 2:
                    raise ValueError(f"code: a fixed-width code's vals must be [B, k], got {tuple(vals.shape)}")
                B = vals.shape[0]
                rows = None
                indices, vals = indices.reshape(-1), vals.reshape(-1)
            else:
                if vals.dim() != 1 or offsets.dim() != 1 or offsets.numel() < 1:
                    raise ValueError("code: a variable-length code has flat vals and indices and row_offsets [B + 1]")
                B = offsets.numel() - 1
                slots = torch.arange(vals.numel(), device=vals.device)
                rows = (torch.searchsorted(offsets, slots, right=True) - 1).clamp(0, max(B - 1, 0))
                valid = slots < offsets[-1]
        if not vals.dtype.is_floating_point:
            raise ValueError(f"code: activations must be floating point, got {vals.dtype}")
        if self.dtype is None:
            self.dtype = vals.dtype
        elif vals.dtype != self.dtype:
            raise ValueError(f"code: dtype {vals.dtype} differs from the earlier batches' {self.dtype}")
        if vals.device != self.device:
            raise ValueError(f"code: on {vals.device}, the analysis's device is {self.device}")
        start = self.tokens[self.passes - 1]
        if token_positions is None:
            if start + B > MAX_POSITION:
                raise ValueError(f"token_positions: the stream passes {MAX_POSITION} tokens")
            token_positions = torch.arange(start, start + B, device=self.device)
        elif token_positions.shape != (B,) or token_positions.dtype.is_floating_point:
            raise ValueError(
                f"token_positions must be [B={B}] integers, got {tuple(token_positions.shape)} {token_positions.dtype}"
            )
        elif token_positions.device != self.device:
            raise ValueError(f"token_positions: on {token_positions.device}, the analysis's device is {self.device}")
        self.tokens[self.passes - 1] += B
        positions = token_positions.to(torch.int64)
        if rows is None:  # [B, k] or dense: k entries per token
            positions = positions[:, None].expand(B, vals.numel() // max(B, 1)).reshape(-1)
        else:
            positions = positions[rows]
        live = (vals > 0) & (indices >= 0) & (indices < F)
        if rows is not None:
            live &= valid
        return _Entries(vals, indices.to(torch.int64), positions, live)


def _check_count(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
