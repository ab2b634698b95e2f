"""The contract every registered op keeps, table-driven over the registry.

Every op ``register_op`` registered (``_registry.REGISTERED``) must have a raw-op case in ``CASES`` below, a
public call in ``contract_cases.PUBLIC`` and a parity checker in ``contract_cases.PARITY`` (a new op fails
the two coverage tests until it has them). Then, with no further code, it is checked for:

column          | what                                                         | ops        | tier
--------------- | ------------------------------------------------------------ | ---------- | ---------------------
opcheck         | ``torch.library.opcheck`` of the forward op and of the        | every raw  | fp32 fast; bf16, fp16
                | backward op (every gradient asked for, and every other one)   | case       | full
deterministic   | two runs of the public call: outputs and gradients bitwise,   | every      | fast (fp32, B > F so
                | gradients shaped and typed as their inputs                    | public call| segments repeat)
compile         | ``torch.compile(fn, fullgraph=True)`` gives eager's outputs    | every      | full (slow)
                | and gradients; a second input set does not recompile          | public call|
cuda graph      | one step captured with ``torch.cuda.graph`` after warm-up;     | every      | GPU only (skipped on
                | the replay equals eager bitwise                               | public call| a CPU, with the reason)
chunking        | results unchanged as TUNING splits the work (F chunks,        | CHUNKED    | fp32 fast; bf16, fp16
                | selection groups, decode tiles): ``assert_same_across_shapes``|            | full
parity          | the op's own parity check against the fp64 reference          | every op   | one small shape per
                | (``parity.assert_parity``: within 2x torch's error + ATOL)    |            | dtype fast; drawn
                |                                                               |            | shapes full
bad input       | each tensor argument with an extra dimension, another dtype,  | every      | fast
                | one entry short, on another device, and the scalar arguments  | public call|
                | out of range: ValueError naming the argument                  |            |

Op-specific behaviour (tie rules, overflow, empty codes, peers) stays in each op's own test file.
"""

import re
import sys

import pytest
import torch
from contract_cases import (
    BAD_SCALARS,
    CHUNKED,
    COMPILED_ON_GPU_ONLY,
    PARITY,
    PUBLIC,
    Shape,
    assert_compiled_matches,
    assert_results,
    check_chunking_invariance,
    generic_breaks,
    run_call,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from parity import DTYPES, OPCHECK_DTYPES, fast_tier_keeps

B, D, F = 6, 19, 37


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _sae(dtype, device, seed=5, D_out=None):
    g = _g(seed)
    D_out = D if D_out is None else D_out
    tensors = dict(
        x=torch.randn(B, D, generator=g),
        W_enc=torch.randn(F, D, generator=g) / D**0.5,
        b_enc=torch.randn(F, generator=g) * 0.1,
        W_dec=torch.randn(F, D_out, generator=g) / D_out**0.5,
        b_dec=torch.randn(D_out, generator=g) * 0.1,
    )
    return {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}


def _dead(fs, device, mode, with_dead=True):
    dead_mod = sys.modules[fs.__name__ + ".ops._dead"]
    if not with_dead:
        return dict(dead_mask=None, dead_offset=None, dead=dead_mod.NO_DEAD_LOSS.to_op(), aux_coef=0.0)
    mask = torch.zeros(F, dtype=torch.bool, device=device)
    mask[::3] = True
    spec = dead_mod.DeadLossSpec(dead_mod.MODES[mode], 5, 10, True, True)
    return dict(dead_mask=mask, dead_offset=torch.tensor(2, device=device), dead=spec.to_op(), aux_coef=0.25)


def _code(dtype, device, seed=6, varlen=False):
    g = _g(seed)
    K = 5
    indices = torch.stack([torch.randperm(F, generator=g)[:K] for _ in range(B)])
    indices[1, :2] = indices[1, 2]  # a repeated latent
    vals = torch.rand(B, K, generator=g) * 2 + 0.1
    weight = torch.randn(F, D, generator=g) / D**0.5
    bias, target = torch.randn(D, generator=g) * 0.1, torch.randn(B, D, generator=g)
    out = dict(indices=indices.to(device), vals=vals.to(device, dtype), weight=weight.to(device, dtype),
               bias=bias.to(device, dtype), target=target.to(device, dtype))  # fmt: skip
    if varlen:
        counts = torch.tensor([5, 0, 3, 5, 1, 4])
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        n = int(offsets[-1])
        out.update(vals=out["vals"].reshape(-1)[:n], indices=out["indices"].reshape(-1)[:n],
                   row_offsets=offsets.to(device))  # fmt: skip
    return out


def _steps(fs, dtype, device):
    """(case name, op name, inputs by name) for every step case."""
    sae = _sae(dtype, device)
    transcoder = dict(_sae(dtype, device, D_out=7), target=torch.randn(B, 7, generator=_g(9)).to(device, dtype))
    no_target = dict(target=None)
    # a crosscoder's step: W_dec's rows of 3 blocks (layers) whose norms the penalty or the ranking sums
    crosscoder = dict(_sae(dtype, device, D_out=18), target=torch.randn(B, 18, generator=_g(10)).to(device, dtype))
    threshold = (torch.rand(F, generator=_g(3)) * 0.3).to(device)
    gated = dict(x=sae["x"], W_enc=sae["W_enc"], b_gate=sae["b_enc"], r_mag=(torch.randn(F, generator=_g(4)) * 0.1)
                 .to(device, dtype), b_mag=(torch.randn(F, generator=_g(5)) * 0.1).to(device, dtype),
                 W_dec=sae["W_dec"], b_dec=sae["b_dec"])  # fmt: skip
    sizes, one = [4, 20, F], dict(prefix_sizes=[])  # Matryoshka's levels, or one level (the whole dictionary)
    # decoder norms of whole rows and the squared error (a crosscoder's: per block of columns, and norms)
    rows = dict(decoder_norm_groups=1, l2_loss_groups=0)
    return [
        ("topk", "topk_sae_step", dict(sae, **no_target, k=5, **one, **_dead(fs, device, None, False))),
        ("topk+auxk", "topk_sae_step", dict(sae, **no_target, k=5, **one, **_dead(fs, device, "auxk"))),
        ("topk+ghost", "topk_sae_step", dict(sae, **no_target, k=5, **one, **_dead(fs, device, "ghost"))),
        ("topk transcoder+auxk", "topk_sae_step", dict(transcoder, k=5, **one, **_dead(fs, device, "auxk"))),
        ("batchtopk", "batchtopk_sae_step",
         dict(sae, **no_target, n=30, rescale_acts_by_decoder_norm=True, **rows, **one,
              **_dead(fs, device, None, False))),
        ("batchtopk+auxk", "batchtopk_sae_step",
         dict(sae, **no_target, n=30, rescale_acts_by_decoder_norm=False, **rows, **one, **_dead(fs, device, "auxk"))),
        ("batchtopk transcoder", "batchtopk_sae_step",
         dict(transcoder, n=30, rescale_acts_by_decoder_norm=True, **rows, **one, **_dead(fs, device, None, False))),
        ("matryoshka topk", "topk_sae_step",
         dict(sae, **no_target, k=4, prefix_sizes=sizes, **_dead(fs, device, None, False))),
        ("matryoshka batchtopk", "batchtopk_sae_step",
         dict(sae, **no_target, n=30, rescale_acts_by_decoder_norm=True, **rows, prefix_sizes=sizes,
              **_dead(fs, device, None, False))),
        ("jumprelu", "jumprelu_sae_step",
         dict(sae, **no_target, threshold=threshold, bandwidth=0.1, l0_coefficient=0.5, capacity=B * F)),
        ("standard", "standard_sae_step", dict(sae, **no_target, l1_coefficient=0.5, capacity=B * F, **rows)),
        ("standard crosscoder norms", "standard_sae_step",
         dict(crosscoder, l1_coefficient=0.5, capacity=B * F, decoder_norm_groups=3, l2_loss_groups=0)),
        ("standard crosscoder l2", "standard_sae_step",
         dict(crosscoder, l1_coefficient=0.5, capacity=B * F, decoder_norm_groups=3, l2_loss_groups=3)),
        ("batchtopk crosscoder norms", "batchtopk_sae_step",
         dict(crosscoder, n=30, rescale_acts_by_decoder_norm=True, decoder_norm_groups=3, l2_loss_groups=0, **one,
              **_dead(fs, device, None, False))),
        ("batchtopk crosscoder l2+auxk", "batchtopk_sae_step",
         dict(crosscoder, n=30, rescale_acts_by_decoder_norm=True, decoder_norm_groups=3, l2_loss_groups=3, **one,
              **_dead(fs, device, "auxk"))),
        ("gated", "gated_sae_step",
         dict(gated, **no_target, l1_coefficient=0.5, capacity=B * F, freeze_aux_decoder=True)),
    ]  # fmt: skip


def _decoders(fs, dtype, device):
    code, varlen = _code(dtype, device), _code(dtype, device, varlen=True)
    sae = _sae(dtype, device)
    return [
        ("topk encode", "topk_encode",
         dict(x=sae["x"], W_enc=sae["W_enc"], b_enc=sae["b_enc"], b_dec=sae["b_dec"], k=5)),
        ("batchtopk encode", "batchtopk_encode", dict(x=sae["x"], W_enc=sae["W_enc"], b_enc=sae["b_enc"], n=20)),
        ("jumprelu encode", "jumprelu_encode",
         dict(x=sae["x"], W_enc=sae["W_enc"], b_enc=sae["b_enc"], threshold=(torch.rand(F, generator=_g(3)) * 0.3)
              .to(device), bandwidth=0.3, capacity=B * F)),
        ("sparse decode", "sparse_decode",
         dict(vals=code["vals"], indices=code["indices"], weight=code["weight"], bias=code["bias"], validate=True)),
        ("varlen decode", "varlen_sparse_decode",
         dict(vals=varlen["vals"], indices=varlen["indices"], row_offsets=varlen["row_offsets"],
              weight=varlen["weight"], bias=varlen["bias"])),
        ("topk loss", "topk_sae_loss", dict(code, validate=True)),
        ("hierarchical loss", "hierarchical_topk_sae_loss", dict(code, validate=True)),
        ("varlen loss", "varlen_sae_loss", varlen),
    ]  # fmt: skip


def _all_cases(fs, dtype, device):
    return _steps(fs, dtype, device) + _decoders(fs, dtype, device)


def _registry(fs):
    return sys.modules[fs.__name__ + "._registry"]


def _case(fs, dtype, device, name):
    for case, op_name, inputs in _all_cases(fs, dtype, device):
        if case == name:
            op = _registry(fs).REGISTERED[op_name]
            missing = set(op.inputs) ^ set(inputs)
            assert not missing, f"case {name!r} does not name exactly {op_name}'s inputs: {sorted(missing)}"
            return op, [inputs[n] for n in op.inputs]
    raise KeyError(name)


_NAMES = (
    "topk", "topk+auxk", "topk+ghost", "topk transcoder+auxk", "batchtopk", "batchtopk+auxk", "batchtopk transcoder",
    "matryoshka topk", "matryoshka batchtopk", "jumprelu", "standard", "standard crosscoder norms",
    "standard crosscoder l2", "batchtopk crosscoder norms", "batchtopk crosscoder l2+auxk", "gated", "topk encode",
    "batchtopk encode", "jumprelu encode", "sparse decode", "varlen decode", "topk loss", "hierarchical loss",
    "varlen loss",
)  # fmt: skip


@pytest.mark.kernels_ci
def test_every_registered_op_has_a_case(fs, device):
    covered = {op for _, op, _ in _all_cases(fs, torch.float32, device)}
    assert [name for name, _, _ in _all_cases(fs, torch.float32, device)] == list(_NAMES)
    assert covered == set(_registry(fs).REGISTERED), "register a case here for every new op"


def _backward_args(op, args, outputs, needs):
    inputs = dict(zip(op.inputs, args))
    named = dict(zip(op.outputs, outputs))
    grads = [torch.full_like(named[n], 0.7) for n in op.differentiable]
    saved = [inputs[n] if n in inputs else named[n] for n in op.saved]
    return (*grads, *saved, needs)


def _needs_sets(op, args):
    inputs = dict(zip(op.inputs, args))
    present = [inputs[n] is not None for n in op.grad_inputs]
    alternate = [p and i % 2 == 0 for i, p in enumerate(present)]
    return [present, alternate]


def _kernels_ci(names):
    """The hub's quick check (``-m kernels_ci``) takes one step case and one decoder case."""
    quick = ("topk+auxk", "sparse decode")
    return [pytest.param(n, marks=pytest.mark.kernels_ci) if n in quick else n for n in names]


@pytest.mark.parametrize("dtype", OPCHECK_DTYPES)
@pytest.mark.parametrize("name", _kernels_ci(_NAMES))
def test_opcheck(fs, device, name, dtype):
    op, args = _case(fs, dtype, device, name)
    torch.library.opcheck(op.op, tuple(args))
    outputs = op.op(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    for needs in _needs_sets(op, args):
        torch.library.opcheck(op.backward_op, _backward_args(op, args, outputs, needs))


# The public calls' columns -------------------------------------------------------------------------

SMALL = Shape(3, 17, 40, 5)  # one small problem per op: odd D, K not a power of 2
MANY_ROWS = Shape(40, 33, 20, 6)  # B > F: every latent's segment has many terms (determinism)
GRAPH_SHAPE = Shape(64, 96, 512, 8)
PUBLIC_NAMES = tuple(PUBLIC)


@pytest.mark.kernels_ci
def test_every_registered_op_has_a_public_call_and_a_parity_check(fs):
    registered = set(_registry(fs).REGISTERED)
    assert {case.op for case in PUBLIC.values()} == registered, "add the op's public call to contract_cases.PUBLIC"
    assert set(PARITY) == registered, "add the op's parity checker to contract_cases.PARITY"
    assert set(CHUNKED) <= set(PUBLIC) and set(BAD_SCALARS) <= set(PUBLIC)


def _call(fs, name, dtype, device, shape, seed=5):
    return PUBLIC[name].build(fs, dtype, device, shape, seed)


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_deterministic(fs, device, name):
    call = _call(fs, name, torch.float32, device, MANY_ROWS)
    assert_results(name, run_call(call), run_call(call))


@pytest.mark.slow  # compiling each call takes seconds on a CPU
@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_compile_matches_eager(fs, device, name):
    if name in COMPILED_ON_GPU_ONLY and device != "cuda":
        pytest.skip("Dynamo cannot trace the CPU interpreter's Triton launches outside a registered op")
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(_call(fs, name, torch.float32, device, SMALL).fn, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (1, 2):
            call = _call(fs, name, torch.float32, device, SMALL, seed=seed)
            assert_results(f"{name} compiled", run_call(call, compiled), run_call(call), assert_compiled_matches)


@pytest.mark.gpu
@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_cuda_graph_capture(fs, device, name):
    """The forward and backward capture (no host sync, no host-to-device copy) and the replay equals eager."""
    if device != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    call = _call(fs, name, torch.bfloat16, device, GRAPH_SHAPE)
    if "validate" in call.kwargs:  # the index check reads the code on the host (a sync): a GPU call's default is off
        call = call._replace(kwargs={**call.kwargs, "validate": False})
    eager = run_call(call)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run_call(call)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_call(call)
    graph.replay()
    torch.cuda.synchronize()
    assert_results(f"{name} replayed", captured, eager)


@pytest.mark.parametrize("dtype", fast_tier_keeps(1, DTYPES))
@pytest.mark.parametrize("name", tuple(CHUNKED))
def test_chunking_invariance(fs, device, name, dtype, monkeypatch):
    check_chunking_invariance(fs, name, dtype, device, monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", sorted(PARITY))
def test_parity(fs, device, op, dtype):
    PARITY[op](fs, SMALL, dtype, device, 1)


@st.composite
def contract_shapes(draw):
    """B = 1 included, odd D, K not a power of 2 often, F from K (tiny) to a few hundred."""
    K = draw(st.integers(1, 12))
    return Shape(draw(st.integers(1, 8)), draw(st.integers(1, 40)), K + draw(st.integers(0, 200)), K)


@pytest.mark.slow
@pytest.mark.parametrize("op", sorted(PARITY))
@settings(max_examples=5)
@given(shape=contract_shapes(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
# pinned: each dtype runs whatever the draw, at B = 1, K = 1 and F = K (every latent selected)
@example(shape=Shape(1, 1, 1, 1), dtype=torch.float32, seed=3)
@example(shape=Shape(2, 9, 3, 3), dtype=torch.bfloat16, seed=4)
@example(shape=Shape(5, 33, 130, 7), dtype=torch.float16, seed=5)
def test_parity_drawn_shapes(fs, device, op, shape, dtype, seed):
    PARITY[op](fs, shape, dtype, device, seed)


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_bad_input_raises_value_error_naming_the_argument(fs, device, name):
    call = _call(fs, name, torch.float32, device, SMALL)
    breaks = list(generic_breaks(call))
    breaks += [(f"{arg} {label}", (arg,), arg, value(call.kwargs)) for arg, label, value in BAD_SCALARS.get(name, [])]
    assert breaks
    failures = []
    for what, names, arg, value in breaks:
        try:
            call.fn(**dict(call.kwargs, **{arg: value}))
        except ValueError as e:
            if not any(re.search(rf"(?<![A-Za-z_]){re.escape(n)}(?![A-Za-z_])", str(e)) for n in names):
                failures.append(f"{what}: the message names none of {names}: {e}")
        except Exception as e:  # noqa: BLE001  (any other exception is a failure of the contract)
            failures.append(f"{what}: {type(e).__name__} instead of ValueError: {str(e)[:200]}")
        else:
            failures.append(f"{what}: accepted")
    assert not failures, "\n".join(failures)
