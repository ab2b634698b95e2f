"""The op registry's named schemas: every op's saved fields, outputs and gradient inputs are names,
checked against the launchers' signatures when the op is registered."""

import sys

import pytest
import torch

STEPS = ("topk_sae_step", "batchtopk_sae_step", "matryoshka_topk_sae_step", "matryoshka_batchtopk_sae_step",
         "jumprelu_sae_step", "standard_sae_step", "gated_sae_step")  # fmt: skip


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


def _launchers():
    def fwd(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x

    def fwd_fake(x, k):
        return x, x

    def bwd(grad: torch.Tensor, x: torch.Tensor, code: torch.Tensor, needs: list[bool]) -> tuple[torch.Tensor]:
        return (grad,)

    def bwd_fake(grad, x, code, needs):
        return (grad,)

    return dict(forward=fwd, forward_fake=fwd_fake, backward=bwd, backward_fake=bwd_fake)


@pytest.mark.kernels_ci
def test_register_op_rejects_misnamed_fields(registry):
    ok = dict(outputs=("loss", "code"), differentiable=("loss",), grad_inputs=("x",))
    bad = {
        "a saved field that is neither an input nor an output": dict(ok, outputs=("loss", "kode")),
        "two outputs with one name": dict(ok, outputs=("loss", "loss")),
        "an output named as an input": dict(ok, outputs=("loss", "x")),
        "more names than returned tensors": dict(ok, outputs=("loss", "code", "extra")),
        "an unknown differentiable output": dict(ok, differentiable=("los",)),
        "an unknown gradient input": dict(ok, grad_inputs=("W",)),
    }
    for what, schema in bad.items():
        with pytest.raises(ValueError, match="test_misnamed"):
            registry.register_op("test_misnamed", **_launchers(), **schema)
        assert what


@pytest.mark.kernels_ci
def test_register_op_rejects_fakes_that_differ_from_their_launchers(registry):
    launchers = _launchers()

    def fwd_fake(x, kk):
        return x, x

    def bwd_fake(grad, x, other, needs):
        return (grad,)

    schema = dict(outputs=("loss", "code"), differentiable=("loss",), grad_inputs=("x",))
    with pytest.raises(ValueError, match="forward_fake"):
        registry.register_op("test_fakes", **dict(launchers, forward_fake=fwd_fake), **schema)
    with pytest.raises(ValueError, match="backward_fake"):
        registry.register_op("test_fakes", **dict(launchers, backward_fake=bwd_fake), **schema)


def test_named_outputs_follow_the_schema(fs, device):
    torch.manual_seed(0)
    x = torch.randn(4, 8, device=device)
    W = torch.randn(16, 8, device=device)
    b_enc, b_dec = torch.zeros(16, device=device), torch.zeros(8, device=device)
    op = _op(fs, "topk_sae_step")
    spec = sys.modules[fs.__name__ + ".ops._dead"].NO_DEAD_LOSS
    raw = op(x, W, b_enc, W.clone(), b_dec, None, 2, None, None, spec.to_op(), 0.0)
    named = op.named(raw)
    assert named._fields == op.outputs
    for field, tensor in zip(op.outputs, raw):
        assert getattr(named, field) is tensor
