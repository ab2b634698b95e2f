"""One registration helper for every op: custom ops, autograd, and the eager fast path.

An op is its two host launchers and their fakes, joined by names, never by positions:

- ``forward(x, W_enc, ...) -> tuple of tensors``: annotated; its annotations are the
  registered op's schema and its parameter names are the op's input names. ``outputs`` names
  each returned tensor, in order. Some outputs carry gradients (``differentiable``, by name);
  the others (codes, statistics, what the backward needs) do not.
- ``backward(<one upstream gradient per differentiable output>, <saved fields>, needs)``:
  annotated too. Its parameters after the gradients name what it needs from the forward: each
  is an input name or an output name, and the helper saves exactly those (tensors with
  ``save_for_backward``, constants on the context). ``needs`` is one bool per entry of
  ``grad_inputs`` (input names). It returns one tensor per entry of ``grad_inputs``: the
  gradient, or an empty placeholder where ``needs`` is False (custom ops cannot return None),
  so a launcher skips work no one asked for.

So the saved set is declared once, by the backward's own signature, and checked against the
forward's names when the op is registered: a misnamed field is an error at import, not a
silently shifted tuple.

The one convention for casts and scaling: the backward launcher receives the
upstream gradients exactly as autograd hands them (any dtype), applies every
scale itself in fp32, and returns each gradient already in its input's
dtype. The wiring here only routes tensors.

``register_op`` registers ``<name>`` and ``<name>_backward`` as
``torch.library`` custom ops in this build's namespace, wires
``register_autograd``, and builds an ``autograd.Function`` over the same
launchers. The returned ``Op`` calls the registered op under
``torch.compile`` (so graphs trace it without breaks) and the Function in
eager mode, which skips the custom-op dispatcher's Python overhead (tens of
microseconds per op, most of a small op's time).
"""

import collections
import inspect
import typing
from collections.abc import Callable, Sequence

import torch

from ._ops import add_op_namespace_prefix

# Every op this build registered, by name (the contract test in tests/test_op_contract.py iterates it).
REGISTERED: dict[str, "Op"] = {}


class Op:
    """A registered op: ``op(*args)`` dispatches; ``.op`` / ``.backward_op`` are the raw custom ops;
    ``.inputs``, ``.outputs``, ``.saved`` and ``.grad_inputs`` are its schema's names."""

    def __init__(self, name: str, op, backward_op, eager: Callable, schema: dict):
        self.name = name
        self.op = op
        self.backward_op = backward_op
        self._eager = eager
        self.inputs = schema["inputs"]
        self.outputs = schema["outputs"]
        self.saved = schema["saved"]
        self.differentiable = schema["differentiable"]
        self.grad_inputs = schema["grad_inputs"]
        self._outputs_type = collections.namedtuple("".join(p.capitalize() for p in name.split("_")) + "Outputs",
                                                     self.outputs)  # fmt: skip

    def named(self, outputs: tuple):
        """The op's outputs as a named tuple (``.loss``, ``.vals``, ...), by the schema's output names."""
        return self._outputs_type._make(outputs)

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        return self._eager(*args)


def _zeros(shape, dtype, device) -> torch.Tensor:
    """A zero upstream gradient for an output autograd gave none (a step's absent ``aux_loss``, shape [0], is
    an empty tensor: no fill launched)."""
    if 0 in shape:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def _parameter_names(fn: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _check_fake(name: str, role: str, fake: Callable, names: tuple[str, ...]) -> None:
    """A fake takes its launcher's parameters by the same names (a trailing ``*rest`` may stand for the
    ones it does not read)."""
    params = inspect.signature(fake).parameters.values()
    named = tuple(p.name for p in params if p.kind is not p.VAR_POSITIONAL)
    rest = any(p.kind is p.VAR_POSITIONAL for p in params)
    if named != names[: len(named)] or (not rest and len(named) != len(names)):
        raise ValueError(f"{name}: {role}'s parameters {named} differ from the launcher's {names}")


def _schema(name, forward, forward_fake, backward, backward_fake, outputs, differentiable, grad_inputs) -> dict:
    """The op's names, checked against the launchers' signatures; raises ValueError on any mismatch."""
    inputs = _parameter_names(forward)
    outputs = tuple(outputs)
    _check_fake(name, "forward_fake", forward_fake, inputs)
    clash = set(inputs) & set(outputs)
    if clash or len(set(outputs)) != len(outputs):
        raise ValueError(f"{name}: output names must be unique and differ from the inputs ({sorted(clash)})")
    returned = typing.get_args(inspect.signature(forward).return_annotation)
    if returned and len(returned) != len(outputs):
        raise ValueError(f"{name}: the forward returns {len(returned)} tensors, outputs names {len(outputs)}")
    unknown = [n for n in differentiable if n not in outputs] + [n for n in grad_inputs if n not in inputs]
    if unknown:
        raise ValueError(f"{name}: unknown names {unknown} in differentiable (outputs) or grad_inputs (inputs)")
    params = _parameter_names(backward)
    if params[-1:] != ("needs",):
        raise ValueError(f"{name}: the backward's last parameter must be 'needs'")
    _check_fake(name, "backward_fake", backward_fake, params)
    saved = params[len(differentiable) : -1]
    missing = [n for n in saved if n not in inputs and n not in outputs]
    if missing:
        raise ValueError(f"{name}: the backward asks for {missing}, which are neither inputs {inputs} nor outputs")
    return {
        "inputs": inputs,
        "outputs": outputs,
        "saved": saved,
        "differentiable": tuple(differentiable),
        "grad_inputs": tuple(grad_inputs),
        # positions, computed once here so the per-call wiring is a tuple lookup
        "save_from": tuple((n in inputs, inputs.index(n) if n in inputs else outputs.index(n)) for n in saved),
        "differentiable_at": tuple(outputs.index(n) for n in differentiable),
        "grad_input_at": tuple(inputs.index(n) for n in grad_inputs),
    }


def register_op(
    name: str,
    *,
    forward: Callable,
    forward_fake: Callable,
    backward: Callable,
    backward_fake: Callable,
    outputs: Sequence[str],
    differentiable: Sequence[str],
    grad_inputs: Sequence[str],
) -> Op:
    """Registers ``name`` (forward) and ``name + "_backward"`` and returns the dispatching ``Op``.

    Args:
        forward, forward_fake: the forward launcher (annotated) and its fake, with the same parameters.
        backward, backward_fake: the backward launcher (annotated; see the module docstring for
            its parameters) and its fake.
        outputs: the name of each tensor the forward returns, in order.
        differentiable: the outputs (by name) that carry a gradient; the backward's first
            parameters are their upstream gradients, in this order.
        grad_inputs: the inputs (by name) that the backward's outputs are the gradients of, in order.
    """
    schema = _schema(name, forward, forward_fake, backward, backward_fake, outputs, differentiable, grad_inputs)
    fwd_op = torch.library.custom_op(add_op_namespace_prefix(name), mutates_args=())(forward)
    fwd_op.register_fake(forward_fake)
    bwd_op = torch.library.custom_op(add_op_namespace_prefix(name + "_backward"), mutates_args=())(backward)
    bwd_op.register_fake(backward_fake)
    save_from = schema["save_from"]
    differentiable_at = schema["differentiable_at"]
    grad_input_at = schema["grad_input_at"]

    def setup_context(ctx, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        ctx.mark_non_differentiable(*(o for i, o in enumerate(outputs) if i not in differentiable_at))
        ctx.set_materialize_grads(False)
        saved = tuple(inputs[i] if from_input else outputs[i] for from_input, i in save_from)
        is_tensor = [t is None or isinstance(t, torch.Tensor) for t in saved]
        ctx.save_for_backward(*(t for t, keep in zip(saved, is_tensor) if keep))
        ctx.saved_constants = [(i, t) for i, (t, keep) in enumerate(zip(saved, is_tensor)) if not keep]
        ctx.n_inputs = len(inputs)
        ctx.grad_like = [(outputs[i].shape, outputs[i].dtype, outputs[i].device) for i in differentiable_at]

    def make_backward(launch):
        def backward_fn(ctx, *grad_outputs):
            grads = [grad_outputs[i] for i in differentiable_at]
            needs = [bool(ctx.needs_input_grad[i]) for i in grad_input_at]
            result = [None] * ctx.n_inputs
            if all(g is None for g in grads) or not any(needs):
                return tuple(result)
            grads = [g if g is not None else _zeros(shape, dtype, device) for g, (shape, dtype, device) in
                     zip(grads, ctx.grad_like)]  # fmt: skip
            saved = list(ctx.saved_tensors)
            for i, constant in ctx.saved_constants:
                saved.insert(i, constant)
            for pos, need, g in zip(grad_input_at, needs, launch(*grads, *saved, needs)):
                if need:
                    result[pos] = g
            return tuple(result)

        return backward_fn

    fwd_op.register_autograd(make_backward(bwd_op), setup_context=setup_context)

    eager_backward = make_backward(backward)

    def eager_forward(ctx, *args):
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    function = type(
        "".join(part.capitalize() for part in name.split("_")),
        (torch.autograd.Function,),
        {"forward": staticmethod(eager_forward), "backward": staticmethod(eager_backward)},
    )
    op = Op(name, fwd_op, bwd_op, function.apply, schema)
    REGISTERED[name] = op
    return op


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """What a backward launcher returns for a gradient nobody needs."""
    return like.new_empty(0)


def gradient_or_placeholder(need: bool, like: torch.Tensor, compute: Callable) -> torch.Tensor:
    """``compute()`` when ``need``, else an empty placeholder (see ``placeholder``)."""
    return compute() if need else placeholder(like)


def fake_gradients(needs, *likes) -> tuple:
    """A backward fake's outputs: ``empty_like(like)`` where needed, placeholders elsewhere."""
    return tuple(torch.empty_like(t) if need else placeholder(t) for need, t in zip(needs, likes))
