"""The contract every registered op keeps, table-driven over the registry.

Every op ``register_op`` registered (``_registry.REGISTERED``) must have at least one case in ``CASES``
(a new op fails ``test_every_registered_op_has_a_case`` until it has one), and every case passes:

- ``torch.library.opcheck`` of the forward op, and of the backward op fed with the forward's saved
  fields (picked by the schema's names, so no test restates an op's positions), with every gradient
  asked for and with every other one;
- bitwise determinism of the outputs and of every gradient over two runs;
- the backward's gradients have their inputs' shapes and dtypes, and the ones not asked for are
  not computed.

A case is a function of (dtype, device) returning the forward's inputs by name, with small shapes.
The parity of each op against the fp64 reference stays in its own test file (its formula is the op's own);
CUDA-graph capture is in test_cuda_graph_capture.py (GPU only).
"""

import sys

import pytest
import torch
from parity import OPCHECK_DTYPES

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
    threshold = (torch.rand(F, generator=_g(3)) * 0.3).to(device)
    gated = dict(x=sae["x"], W_enc=sae["W_enc"], b_gate=sae["b_enc"], r_mag=(torch.randn(F, generator=_g(4)) * 0.1)
                 .to(device, dtype), b_mag=(torch.randn(F, generator=_g(5)) * 0.1).to(device, dtype),
                 W_dec=sae["W_dec"], b_dec=sae["b_dec"])  # fmt: skip
    sizes = [4, 20, F]
    return [
        ("topk", "topk_sae_step", dict(sae, **no_target, k=5, **_dead(fs, device, None, False))),
        ("topk+auxk", "topk_sae_step", dict(sae, **no_target, k=5, **_dead(fs, device, "auxk"))),
        ("topk+ghost", "topk_sae_step", dict(sae, **no_target, k=5, **_dead(fs, device, "ghost"))),
        ("topk transcoder+auxk", "topk_sae_step", dict(transcoder, k=5, **_dead(fs, device, "auxk"))),
        ("batchtopk", "batchtopk_sae_step",
         dict(sae, **no_target, n=30, rescale_acts_by_decoder_norm=True, **_dead(fs, device, None, False))),
        ("batchtopk+auxk", "batchtopk_sae_step",
         dict(sae, **no_target, n=30, rescale_acts_by_decoder_norm=False, **_dead(fs, device, "auxk"))),
        ("batchtopk transcoder", "batchtopk_sae_step",
         dict(transcoder, n=30, rescale_acts_by_decoder_norm=True, **_dead(fs, device, None, False))),
        ("matryoshka topk", "matryoshka_topk_sae_step", dict(sae, **no_target, k=4, prefix_sizes=sizes)),
        ("matryoshka batchtopk", "matryoshka_batchtopk_sae_step",
         dict(sae, **no_target, n=30, prefix_sizes=sizes, rescale_acts_by_decoder_norm=True)),
        ("jumprelu", "jumprelu_sae_step",
         dict(sae, **no_target, threshold=threshold, bandwidth=0.1, l0_coefficient=0.5, capacity=B * F)),
        ("standard", "standard_sae_step", dict(sae, **no_target, l1_coefficient=0.5, capacity=B * F)),
        ("gated", "gated_sae_step",
         dict(gated, **no_target, l1_coefficient=0.5, capacity=B * F, freeze_aux_decoder=True)),
    ]  # fmt: skip


def _decoders(fs, dtype, device):
    code, varlen = _code(dtype, device), _code(dtype, device, varlen=True)
    sae = _sae(dtype, device)
    return [
        ("topk encode", "topk_encode",
         dict(x=sae["x"], W_enc=sae["W_enc"], b_enc=sae["b_enc"], b_dec=sae["b_dec"], k=5)),
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
    "matryoshka topk", "matryoshka batchtopk", "jumprelu", "standard", "gated", "topk encode", "sparse decode",
    "varlen decode", "topk loss", "hierarchical loss", "varlen loss",
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


def _run(op, args):
    """Forward through autograd, backward with a fixed upstream gradient on every differentiable output."""
    leaves = dict(zip(op.inputs, args))
    for n in op.grad_inputs:
        if leaves[n] is not None:
            leaves[n] = leaves[n].detach().clone().requires_grad_()
    call = [leaves[n] for n in op.inputs]
    outputs = op(*call)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    named = dict(zip(op.outputs, outputs))
    diff = [named[n] for n in op.differentiable]
    wrt = [leaves[n] for n in op.grad_inputs if leaves[n] is not None]
    ups = [torch.full_like(t, -0.9) for t in diff]
    grads = torch.autograd.grad(diff, wrt, ups, allow_unused=True)
    return outputs, wrt, grads


@pytest.mark.slow  # each op's own test file checks its determinism in the fast tier
@pytest.mark.parametrize("name", _NAMES)
def test_deterministic_and_shaped(fs, device, name):
    op, args = _case(fs, torch.float32, device, name)
    out1, wrt, g1 = _run(op, args)
    out2, _, g2 = _run(op, args)
    for n, a, b in zip(op.outputs, out1, out2):
        assert torch.equal(a, b), f"{name}: output {n} differs between two runs"
    for a, b, leaf in zip(g1, g2, wrt):
        assert a is not None, f"{name}: a gradient input got no gradient"
        assert torch.equal(a, b), f"{name}: a gradient differs between two runs"
        assert a.shape == leaf.shape and a.dtype == leaf.dtype
