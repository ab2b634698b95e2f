"""The public-call tables of the op contract (tests/test_op_contract.py): how each registered op is called
through its public function, which checks apply to it, and the shared run-and-compare helpers.

A ``PublicCall`` is the public function, its arguments by name and the names of the float tensors that get
gradients. ``run_call`` runs it forward and backward (the objective: the loss, plus half the dead-latent loss
where there is one; for a tensor output, a fixed device-side weighting of it, so a CUDA graph can capture it)
and returns every output tensor and every gradient by name, which ``assert_results`` compares.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from encoder_inputs import check_encode_parity, check_step_parity, make_sae
from parity import check_decode_parity, check_loss_parity, make_inputs
from test_batchtopk_sae_step import check_batchtopk_step
from test_cross_layer_transcoder import check_encode_op_parity
from test_gated_sae_step import check_gated_step
from test_jumprelu_sae_step import check_jumprelu_step
from test_matryoshka_batchtopk_sae_step import check_matryoshka
from test_matryoshka_topk_sae_step import check_matryoshka_topk
from test_standard_sae_step import check_standard_step
from test_varlen_sae_loss import check_varlen_loss
from test_varlen_sparse_decode import check_varlen_decode, make_code


class Shape(NamedTuple):
    """A problem's sizes: batch rows, model width, latents, and k (the code's entries per row)."""

    B: int
    D: int
    F: int
    K: int


class PublicCall(NamedTuple):
    fn: Callable
    kwargs: dict
    leaves: tuple[str, ...]  # the float tensor arguments that get gradients


class Case(NamedTuple):
    op: str  # the registered op the public function runs
    build: Callable  # (fs, dtype, device, shape, seed) -> PublicCall


def prefix_sizes(F: int) -> list[int]:
    """Matryoshka prefix sizes: up to three strictly increasing levels ending at F."""
    return sorted({max(1, F // 4), max(1, F // 2), F})


def batch_k(shape: Shape) -> float:
    """BatchTopK's k: a float (k * B entries in all) where the batch has room for it."""
    return shape.K + 0.5 if shape.K < shape.F else shape.K


def varlen_counts(shape: Shape) -> list[int]:
    """Rows of different lengths (0 to K entries; an empty row once B > 1)."""
    return [(shape.K + r) % (shape.K + 1) for r in range(shape.B)]


def _sae(dtype, device, shape, seed):
    x, W_enc, b_enc, W_dec, b_dec = (t.detach() for t in make_sae(*shape[:3], shape.K, dtype, device, seed=seed))
    return dict(x=x, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)


SAE_LEAVES = ("x", "W_enc", "b_enc", "W_dec", "b_dec")


def _dead(fs, device, F, kind=None):
    if kind is None:
        return {}
    mask = torch.arange(F, device=device) % 3 == 0
    return dict(dead_loss=fs.DeadLatentLoss(mask, kind=kind))


def _transcoder(dtype, device, shape, seed, D_out=7):
    g = torch.Generator().manual_seed(seed + 11)
    kw = _sae(dtype, device, shape, seed)
    kw.update(W_dec=torch.randn(shape.F, D_out, generator=g) / D_out**0.5, b_dec=torch.randn(D_out, generator=g) * 0.1)
    kw["target"] = torch.randn(shape.B, D_out, generator=g)
    return {n: t.to(device=device, dtype=dtype) for n, t in kw.items()}


def _topk(kind=None, transcoder=False):
    def build(fs, dtype, device, shape, seed):
        kw = _transcoder(dtype, device, shape, seed) if transcoder else _sae(dtype, device, shape, seed)
        return PublicCall(fs.topk_sae_step, dict(kw, k=shape.K, **_dead(fs, device, shape.F, kind)), SAE_LEAVES)

    return build


def _batchtopk(kind=None, transcoder=False, rescale=True):
    def build(fs, dtype, device, shape, seed):
        kw = _transcoder(dtype, device, shape, seed) if transcoder else _sae(dtype, device, shape, seed)
        kw.update(k=batch_k(shape), rescale_acts_by_decoder_norm=rescale, **_dead(fs, device, shape.F, kind))
        return PublicCall(fs.batchtopk_sae_step, kw, SAE_LEAVES)

    return build


def _matryoshka_topk(fs, dtype, device, shape, seed):
    kw = dict(_sae(dtype, device, shape, seed), k=shape.K, prefix_sizes=prefix_sizes(shape.F))
    return PublicCall(fs.matryoshka_topk_sae_step, kw, SAE_LEAVES)


def _matryoshka_batchtopk(fs, dtype, device, shape, seed):
    kw = dict(_sae(dtype, device, shape, seed), k=batch_k(shape), prefix_sizes=prefix_sizes(shape.F))
    return PublicCall(fs.matryoshka_batchtopk_sae_step, dict(kw, rescale_acts_by_decoder_norm=True), SAE_LEAVES)


def _jumprelu(fs, dtype, device, shape, seed):
    threshold = (torch.rand(shape.F, generator=torch.Generator().manual_seed(seed + 3)) * 0.3).to(device)
    kw = dict(_sae(dtype, device, shape, seed), threshold=threshold, capacity=shape.B * shape.F)
    return PublicCall(fs.jumprelu_sae_step, dict(kw, bandwidth=0.1, l0_coefficient=0.5), (*SAE_LEAVES, "threshold"))


def _standard(dense=False):
    def build(fs, dtype, device, shape, seed):
        kw = dict(_sae(dtype, device, shape, seed), l1_coefficient=0.5)
        if dense:
            return PublicCall(fs.standard_sae_step_dense, kw, SAE_LEAVES)
        return PublicCall(fs.standard_sae_step, dict(kw, capacity=shape.B * shape.F), SAE_LEAVES)

    return build


GATED_LEAVES = ("x", "W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")


def _gated(dense=False):
    def build(fs, dtype, device, shape, seed):
        sae = _sae(dtype, device, shape, seed)
        g = torch.Generator().manual_seed(seed + 7)
        r_mag, b_mag = ((torch.randn(shape.F, generator=g) * s).to(device, dtype) for s in (0.3, 0.1))
        kw = dict(x=sae["x"], W_enc=sae["W_enc"], b_gate=sae["b_enc"], r_mag=r_mag, b_mag=b_mag, W_dec=sae["W_dec"],
                  b_dec=sae["b_dec"], l1_coefficient=0.5, freeze_aux_decoder=False)  # fmt: skip
        if dense:
            return PublicCall(fs.gated_sae_step_dense, kw, GATED_LEAVES)
        return PublicCall(fs.gated_sae_step, dict(kw, capacity=shape.B * shape.F), GATED_LEAVES)

    return build


def _encode(fs, dtype, device, shape, seed):
    sae = _sae(dtype, device, shape, seed)
    kw = dict(x=sae["x"], W_enc=sae["W_enc"], b_enc=sae["b_enc"], k=shape.K, b_dec=sae["b_dec"])
    return PublicCall(fs.topk_encode, kw, ("x", "W_enc", "b_enc", "b_dec"))


def _batchtopk_encode(fs, dtype, device, shape, seed):
    sae = _sae(dtype, device, shape, seed)
    kw = dict(x=sae["x"], W_enc=sae["W_enc"], b_enc=sae["b_enc"], k=batch_k(shape))
    return PublicCall(fs.batchtopk_encode, kw, ("x", "W_enc", "b_enc"))


def _jumprelu_encode(fs, dtype, device, shape, seed):
    sae = _sae(dtype, device, shape, seed)
    threshold = (torch.rand(shape.F, generator=torch.Generator().manual_seed(seed + 3)) * 0.3).to(device)
    kw = dict(x=sae["x"], W_enc=sae["W_enc"], b_enc=sae["b_enc"], threshold=threshold,
              capacity=shape.B * shape.F, bandwidth=0.3)  # fmt: skip
    return PublicCall(fs.jumprelu_encode, kw, ("x", "W_enc", "b_enc", "threshold"))


def _code(dtype, device, shape, seed):
    """A [B, K] code with repeated latents, its decoder and a target."""
    B, D, F, K = shape
    indices, weight, vals, bias, target = (
        t.detach() for t in make_inputs(B, K, F, D, dtype, device, seed=seed, duplicates=True)
    )
    return dict(vals=vals, indices=indices, weight=weight, bias=bias, target=target)


def _sparse_decode(fs, dtype, device, shape, seed):
    code = _code(dtype, device, shape, seed)
    del code["target"]
    return PublicCall(fs.sparse_decode, dict(code, validate=True), ("vals", "weight", "bias"))


def _loss(name):
    def build(fs, dtype, device, shape, seed):
        return PublicCall(getattr(fs, name), dict(_code(dtype, device, shape, seed), validate=True),
                          ("weight", "vals", "bias", "target"))  # fmt: skip

    return build


def _varlen(dtype, device, shape, seed):
    """A variable-length code, its decoder and a target; ``validate=False`` (a GPU call's default): the CPU
    default validates the offsets' values on the host, which a fullgraph compile or a CUDA graph cannot hold
    (the ValueErrors for malformed offsets are test_varlen_sparse_decode.py's BAD_CODES)."""
    parts = make_code(varlen_counts(shape), shape.F, shape.D, 2, dtype, device, seed=seed)
    names = ("vals", "indices", "row_offsets", "weight", "bias", "target")
    return dict({n: t.detach() for n, t in zip(names, parts)}, validate=False)


def _varlen_decode(fs, dtype, device, shape, seed):
    code = _varlen(dtype, device, shape, seed)
    del code["target"]
    return PublicCall(fs.varlen_sparse_decode, code, ("vals", "weight", "bias"))


def _varlen_loss(fs, dtype, device, shape, seed):
    return PublicCall(fs.varlen_sae_loss, _varlen(dtype, device, shape, seed), ("vals", "weight", "bias", "target"))


# Every public call, by case name. A registered op needs at least one (test_every_registered_op_has_a_public_call).
PUBLIC = {
    "topk": Case("topk_sae_step", _topk()),
    "topk+auxk": Case("topk_sae_step", _topk("auxk")),
    "topk+ghost": Case("topk_sae_step", _topk("ghost")),
    "topk transcoder+auxk": Case("topk_sae_step", _topk("auxk", transcoder=True)),
    "batchtopk": Case("batchtopk_sae_step", _batchtopk()),
    "batchtopk+auxk": Case("batchtopk_sae_step", _batchtopk("auxk", rescale=False)),
    "batchtopk transcoder": Case("batchtopk_sae_step", _batchtopk(transcoder=True)),
    "matryoshka topk": Case("topk_sae_step", _matryoshka_topk),
    "matryoshka batchtopk": Case("batchtopk_sae_step", _matryoshka_batchtopk),
    "jumprelu": Case("jumprelu_sae_step", _jumprelu),
    "standard": Case("standard_sae_step", _standard()),
    "standard dense": Case("standard_sae_step", _standard(dense=True)),
    "gated": Case("gated_sae_step", _gated()),
    "gated dense": Case("gated_sae_step", _gated(dense=True)),
    "topk encode": Case("topk_encode", _encode),
    "batchtopk encode": Case("batchtopk_encode", _batchtopk_encode),
    "jumprelu encode": Case("jumprelu_encode", _jumprelu_encode),
    "sparse decode": Case("sparse_decode", _sparse_decode),
    "varlen decode": Case("varlen_sparse_decode", _varlen_decode),
    "topk loss": Case("topk_sae_loss", _loss("topk_sae_loss")),
    "hierarchical loss": Case("hierarchical_topk_sae_loss", _loss("hierarchical_topk_sae_loss")),
    "varlen loss": Case("varlen_sae_loss", _varlen_loss),
}

# The dense standard and gated steps are autograd.Functions over Triton launches, not registered ops:
# Dynamo traces those launches on a GPU but not the CPU interpreter's (it cannot read their rewritten source).
COMPILED_ON_GPU_ONLY = {"standard dense", "gated dense"}

# Chunking invariance: the TUNING entries that split an op's work into pieces that must not change its
# results (``assert_same_across_shapes``), each set tried in turn against the defaults; at CHUNK_SHAPE
# (160 latents: chunk_bytes 1040 cuts them into chunks of 130 (16-bit) or 65 (fp32), the last ragged).
CHUNK_SHAPE = Shape(4, 6, 160, 7)
_F_CHUNKS = [dict(chunk_bytes=4 * 130 * 2)]
_TOPK_GROUPS = [dict(topk_select_group=g, select_groups=n, chunk_bytes=c) for g, n, c in
                ((1, 64, 2**30), (4, 16, 2500), (32, 64, 3000), (128, 2, 2**30))]  # fmt: skip
_BATCH_GROUPS = [dict(select_group=g, select_groups=n, chunk_bytes=c) for g, n, c in
                 ((1, 64, 2**30), (4, 16, 2500), (32, 64, 3000), (128, 2, 2**30))]  # fmt: skip
_DECODE_TILES = [dict(gather_block_d=16, segment_block_d=16), dict(gather_unroll=4, segment_unroll=2)]
CHUNKED = {
    "topk": _TOPK_GROUPS,
    "topk+auxk": _F_CHUNKS,
    "batchtopk": _BATCH_GROUPS,
    "batchtopk+auxk": _F_CHUNKS,
    "matryoshka topk": _F_CHUNKS,
    "matryoshka batchtopk": _F_CHUNKS,
    "jumprelu": _F_CHUNKS,
    "standard": _F_CHUNKS,
    "gated": _F_CHUNKS,
    "topk encode": _TOPK_GROUPS,
    "batchtopk encode": _BATCH_GROUPS,
    "jumprelu encode": _F_CHUNKS,
    "sparse decode": _DECODE_TILES,
    "varlen decode": _DECODE_TILES,
    "topk loss": _DECODE_TILES,
    "varlen loss": _DECODE_TILES,
}


# The parity rule against the fp64 reference, one checker per registered op (each op's own, from its test
# file or the shared helpers): (fs, shape, dtype, device, seed).
def _parity_batchtopk(fs, s, dtype, device, seed):
    check_batchtopk_step(fs, (s.B, s.D, s.F, batch_k(s)), dtype, device, rescale=bool(seed % 2), seed=seed)


def _parity_matryoshka_topk(fs, s, dtype, device, seed):
    check_matryoshka_topk(fs, tuple(s), prefix_sizes(s.F), dtype, device, seed=seed)


def _parity_matryoshka_batchtopk(fs, s, dtype, device, seed):
    check_matryoshka(fs, tuple(s), prefix_sizes(s.F), dtype, device, rescale=True, seed=seed)


def _parity_jumprelu(fs, s, dtype, device, seed):
    check_jumprelu_step(fs, s[:3], dtype, device, seed=seed, bandwidth=0.3, l0_coefficient=0.1)


def _parity_standard(fs, s, dtype, device, seed):
    check_standard_step(fs, s[:3], dtype, device, seed=seed, l1_coefficient=1.0)


def _parity_gated(fs, s, dtype, device, seed):
    check_gated_step(fs, s[:3], dtype, device, seed=seed, l1_coefficient=1.0, freeze=bool(seed % 2))


def _parity_varlen(checker):
    def check(fs, s, dtype, device, seed):
        checker(fs, (varlen_counts(s), s.F, s.D, 2), dtype, device, seed)

    return check


def _parity_loss(op):
    def check(fs, s, dtype, device, seed):
        check_loss_parity(fs, op, (s.B, s.K, s.F, s.D), dtype, device, seed=seed, duplicates=True)

    return check


def _parity_topk(fs, s, dtype, device, seed):
    check_step_parity(fs, tuple(s), dtype, device, seed=seed)
    _parity_matryoshka_topk(fs, s, dtype, device, seed)  # the same op with Matryoshka's levels


def _parity_batchtopk_and_levels(fs, s, dtype, device, seed):
    _parity_batchtopk(fs, s, dtype, device, seed)
    _parity_matryoshka_batchtopk(fs, s, dtype, device, seed)  # the same op with Matryoshka's levels


PARITY = {
    "topk_sae_step": _parity_topk,
    "batchtopk_sae_step": _parity_batchtopk_and_levels,
    "jumprelu_sae_step": _parity_jumprelu,
    "standard_sae_step": _parity_standard,
    "gated_sae_step": _parity_gated,
    "topk_encode": lambda fs, s, dtype, device, seed: check_encode_parity(
        fs, tuple(s), dtype, device, centred=True, seed=seed
    ),
    "sparse_decode": lambda fs, s, dtype, device, seed: check_decode_parity(
        fs, (s.B, s.K, s.F, s.D), dtype, device, seed=seed, duplicates=True
    ),
    "batchtopk_encode": lambda fs, s, dtype, device, seed: check_encode_op_parity(
        fs, "batchtopk", tuple(s), dtype, device, seed
    ),
    "jumprelu_encode": lambda fs, s, dtype, device, seed: check_encode_op_parity(
        fs, "jumprelu", tuple(s), dtype, device, seed
    ),
    "varlen_sparse_decode": _parity_varlen(check_varlen_decode),
    "topk_sae_loss": _parity_loss("topk_sae_loss"),
    "hierarchical_topk_sae_loss": _parity_loss("hierarchical_topk_sae_loss"),
    "varlen_sae_loss": _parity_varlen(check_varlen_loss),
}


# Running and comparing ------------------------------------------------------------------------------


def output_tensors(result, prefix="out"):
    """Every tensor of a result (nested named tuples: a step's fields and its SparseCode), by dotted name."""
    if isinstance(result, torch.Tensor):
        yield prefix, result
    elif isinstance(result, tuple):
        for name, value in zip(getattr(result, "_fields", range(len(result))), result):
            yield from output_tensors(value, f"{prefix}.{name}")


def objective(result) -> torch.Tensor:
    """The scalar a call's backward starts from: the loss (plus half the dead-latent loss), or a fixed
    weighting of a tensor output, computed on its device (no host-to-device copy, so capturable)."""
    if hasattr(result, "loss"):
        aux = getattr(result, "aux_loss", None)
        return result.loss if aux is None else result.loss + 0.5 * aux
    out = result[0] if isinstance(result, tuple) else result
    weights = torch.cos(0.37 * torch.arange(out.numel(), device=out.device, dtype=torch.float32) + 0.1)
    return (out.float() * weights.view(out.shape)).sum()


def run_call(call: PublicCall, fn: Callable | None = None) -> dict:
    """Runs ``fn`` (the call's public function unless given, e.g. compiled) forward and backward on fresh
    leaves; returns every output tensor and every gradient (``d<name>``), by name."""
    kwargs = {n: v.detach().clone().requires_grad_() if n in call.leaves else v for n, v in call.kwargs.items()}
    result = (fn or call.fn)(**kwargs)
    outputs = dict(output_tensors(result))
    gradients = torch.autograd.grad(objective(result), [kwargs[n] for n in call.leaves])
    for name, g in zip(call.leaves, gradients):
        assert g.shape == kwargs[name].shape and g.dtype == kwargs[name].dtype, f"d{name}: {g.shape} {g.dtype}"
        outputs["d" + name] = g
    return outputs


def check_chunking_invariance(fs, name, dtype, device, monkeypatch):
    """The case's outputs and gradients at CHUNK_SHAPE under each of its CHUNKED tunings equal the defaults'
    (``assert_same_across_shapes``)."""
    from encoder_inputs import tuning
    from parity import assert_same_across_shapes

    call = PUBLIC[name].build(fs, dtype, device, CHUNK_SHAPE, 5)
    one = run_call(call)
    for overrides in CHUNKED[name]:
        with monkeypatch.context() as m:
            for key, value in overrides.items():
                m.setitem(tuning(fs), key, value)
            assert_results(f"{name} with {overrides}", run_call(call), one, assert_same_across_shapes)


def assert_bitwise(what, got, want):
    assert torch.equal(got, want), f"{what} differs"


def assert_compiled_matches(what, got, want):
    """A compiled call against eager: the forward's tensors (codes, counts, level losses) bitwise; its scalar
    statistics to fp32 roundoff (rtol 1e-6: a compiled graph may fuse the torch ops around the op); the
    gradients (``d<name>``) to rtol 1e-6, atol 1e-7."""
    if not want.is_floating_point() or (want.ndim and ": out." in what):
        assert torch.equal(got, want), f"{what} differs"
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7 if want.ndim else 0.0, msg=what)


def assert_results(what: str, got: dict, want: dict, compare: Callable = assert_bitwise) -> None:
    assert got.keys() == want.keys(), f"{what}: outputs {sorted(got)} vs {sorted(want)}"
    for name in want:
        compare(f"{what}: {name}", got[name], want[name])


# Bad input: every tensor argument with an extra dimension, in another dtype, one entry short in its last
# dimension, and on another device (``generic_breaks``), and each op's scalar arguments out of range
# (``BAD_SCALARS``): each must raise ValueError whose message names the argument.
def _other_dtype(t):
    return t.float() if not t.is_floating_point() else t.to(torch.float64)


# A shape is checked against another argument's: a mismatch may name either (vals' shape is indices', bias's
# width weight's, target's rows row_offsets'). row_offsets one entry short is a valid code of one row less,
# so it is a bad input only where a target fixes B.
CHECKED_AGAINST = {"indices": "vals", "weight": "bias", "row_offsets": "target"}


def generic_breaks(call: PublicCall):
    """(what, the names a message may give, the argument, its bad value) for each tensor argument."""
    for name, t in call.kwargs.items():
        if not isinstance(t, torch.Tensor):
            continue
        names = (name,)
        yield f"{name} with an extra dimension", names, name, t.unsqueeze(0)
        yield f"{name} in {_other_dtype(t).dtype}", names, name, _other_dtype(t)
        short = t.ndim and t.shape[-1] > 1 and (name != "row_offsets" or "target" in call.kwargs)
        if short:
            partner = (CHECKED_AGAINST[name],) if name in CHECKED_AGAINST else ()
            yield f"{name} one entry short", names + partner, name, t[..., :-1]
        yield f"{name} on another device", names, name, t.to("meta")


def _F(kw):
    return (kw["W_enc"] if "W_enc" in kw else kw["weight"]).shape[0]


def _k_breaks(name="k"):
    return [(name, "0", lambda kw: 0), (name, "F + 1", lambda kw: _F(kw) + 1), (name, "a bool", lambda kw: True)]


_BATCH_K = [("k", "0", lambda kw: 0), ("k", "past B * F", lambda kw: _F(kw) + 1), ("k", "nan", lambda kw: float("nan"))]
_CAPACITY = [("capacity", "0", lambda kw: 0), ("capacity", "past B * F", lambda kw: kw["x"].shape[0] * _F(kw) + 1)]
_L1 = [("l1_coefficient", "negative", lambda kw: -1.0), ("l1_coefficient", "a bool", lambda kw: True)]
_RESCALE = [("rescale_acts_by_decoder_norm", "an int", lambda kw: 1)]
_PREFIX = [("prefix_sizes", "empty", lambda kw: []), ("prefix_sizes", "not ending at F", lambda kw: [1, _F(kw) - 1]),
           ("prefix_sizes", "decreasing", lambda kw: [_F(kw) // 2, 1, _F(kw)]),
           ("prefix_sizes", "with a 0", lambda kw: [0, _F(kw)])]  # fmt: skip
_FREEZE = [("freeze_aux_decoder", "an int", lambda kw: 1)]
BAD_SCALARS = {
    "topk": _k_breaks(),
    "batchtopk": _BATCH_K + _RESCALE,
    "matryoshka topk": _k_breaks() + _PREFIX,
    "matryoshka batchtopk": _BATCH_K + _PREFIX + _RESCALE,
    "jumprelu": _CAPACITY + [("bandwidth", "0", lambda kw: 0.0), ("l0_coefficient", "negative", lambda kw: -0.1)],
    "standard": _CAPACITY + _L1,
    "standard dense": _L1,
    "gated": _CAPACITY + _L1 + _FREEZE,
    "gated dense": _L1 + _FREEZE,
    "topk encode": _k_breaks(),
    "batchtopk encode": _BATCH_K,
    "jumprelu encode": _CAPACITY + [("bandwidth", "0", lambda kw: 0.0)],
}
