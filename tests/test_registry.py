"""The op registry's named schemas: every op's saved fields, outputs and gradient inputs are names,
checked against the launchers' signatures when the op is registered."""

import sys
from typing import NamedTuple

import pytest
import torch

# One registered op per selection rule (Matryoshka's levels and the dead-latent loss are optional parts of the
# TopK and BatchTopK ops).
STEPS = ("topk_sae_step", "batchtopk_sae_step", "jumprelu_sae_step", "standard_sae_step", "gated_sae_step")


@pytest.fixture(scope="module")
def registry(fs):
    return sys.modules[fs.__name__ + "._registry"]


def _op(fs, name):
    module = sys.modules[getattr(fs, name).__module__]
    return getattr(module, "_" + name)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("name", STEPS)
def test_step_schemas_are_named(fs, name):
    op = _op(fs, name)
    assert op.outputs[0] == "loss" and "fire_counts" in op.outputs and "vals" in op.outputs
    assert set(op.saved) <= set(op.inputs) | set(op.outputs)
    assert {"x", "W_enc", "W_dec", "b_dec"} <= set(op.grad_inputs) <= set(op.inputs)


class _Inputs(NamedTuple):
    x: torch.Tensor
    k: int


def _launchers():
    def fwd(i):
        return i.x, i.x

    def bwd(grads, saved, needs):
        return (grads.loss,)

    return (fwd, fwd, bwd, bwd)


@pytest.mark.kernels_ci
def test_register_op_rejects_misnamed_fields(registry):
    ok = dict(inputs=_Inputs, outputs=("loss", "code"), saved=("x", "code"), differentiable=("loss",),
              grad_inputs=("x",))  # fmt: skip
    bad = {
        "a saved field that is neither an input nor an output": dict(ok, saved=("x", "kode")),
        "two outputs with one name": dict(ok, outputs=("loss", "loss")),
        "an output named as an input": dict(ok, outputs=("loss", "x")),
        "an unknown differentiable output": dict(ok, differentiable=("los",)),
        "an unknown gradient input": dict(ok, grad_inputs=("W",)),
    }
    for what, schema in bad.items():
        with pytest.raises(ValueError, match="test_misnamed"):
            registry.register_op("test_misnamed", launchers=_launchers(), **schema)
        assert what


@pytest.mark.kernels_ci
def test_register_op_rejects_an_input_type_the_schema_cannot_carry(registry):
    class Inputs(NamedTuple):
        x: torch.Tensor
        options: dict

    with pytest.raises(ValueError, match="options"):
        registry.register_op("test_types", inputs=Inputs, outputs=("loss",), saved=("x",), differentiable=("loss",),
                             grad_inputs=("x",), launchers=_launchers())  # fmt: skip


@pytest.mark.kernels_ci
def test_schema_strings_follow_the_inputs(fs):
    op = _op(fs, "topk_sae_step")
    schema = str(op.op._opoverload._schema)
    assert "Tensor x, Tensor W_enc" in schema and "Tensor? target, SymInt k" in schema and "SymInt[] dead" in schema
    assert op.Inputs._fields == op.inputs


def test_named_outputs_follow_the_schema(fs, device):
    torch.manual_seed(0)
    x = torch.randn(4, 8, device=device)
    W = torch.randn(16, 8, device=device)
    b_enc, b_dec = torch.zeros(16, device=device), torch.zeros(8, device=device)
    op = _op(fs, "topk_sae_step")
    spec = sys.modules[fs.__name__ + ".ops._dead"].NO_DEAD_LOSS
    raw = op(x, W, b_enc, W.clone(), b_dec, None, 2, [], None, None, spec.to_op(), 0.0)
    named = op.named(raw)
    assert named._fields == op.outputs
    for field, tensor in zip(op.outputs, raw):
        assert getattr(named, field) is tensor
