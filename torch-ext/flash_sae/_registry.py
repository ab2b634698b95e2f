"""One registration helper for every op: custom ops, autograd, and the eager fast path.

An op is declared by names and implemented by four launchers that read fields, never positions:

- ``inputs``: a ``NamedTuple`` class whose annotated fields are the op's arguments, in order
  (``torch.Tensor``, ``torch.Tensor | None``, ``int``, ``float``, ``bool``, ``list[int]``,
  ``list[bool]``). The registered op's schema is generated from it.
- ``forward(i) -> tuple of tensors`` takes one such named tuple (``i.x``, ``i.k``, ...);
  ``outputs`` names each returned tensor, in order. Some outputs carry gradients
  (``differentiable``); the others (codes, statistics, what the backward needs) do not.
- ``saved``: the inputs and outputs, by name, that the backward reads.
- ``backward(grads, saved, needs) -> tuple of tensors``: ``grads`` holds one upstream gradient per
  differentiable output (named: ``grads.loss``), ``saved`` the saved fields (named: ``saved.x``,
  ``saved.residual``), ``needs`` one bool per entry of ``grad_inputs``. It returns one tensor per
  entry of ``grad_inputs``: the gradient, or an empty placeholder where ``needs`` is False (custom
  ops cannot return None), so a launcher skips work no one asked for. A launcher returns None for a
  gradient it consumed (an optimizer applied it inside the backward: ``flash_sae.FusedAdam``); autograd
  then gets no gradient for that input.
- ``forward_fake`` and ``backward_fake`` take the same arguments and return tensors of the shapes
  and dtypes the launchers return.

Every name is checked when the op is registered (a misnamed field is a ValueError at import), and
the flat argument lists the ``torch.library`` ops need are built here alone.

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
import types
import typing
from collections.abc import Callable, Sequence

import torch

from ._ops import add_op_namespace_prefix

# Every op this build registered, by name (the contract test in tests/test_op_contract.py iterates it).
REGISTERED: dict[str, "Op"] = {}

_SCHEMA_TYPES = {torch.Tensor: "Tensor", int: "SymInt", float: "float", bool: "bool", list[int]: "SymInt[]",
                 list[bool]: "bool[]"}  # fmt: skip


class Op:
    """A registered op: ``op(*args)`` dispatches (the arguments in ``inputs`` order); ``.op`` /
    ``.backward_op`` are the raw custom ops; ``.inputs``, ``.outputs``, ``.saved``, ``.differentiable``
    and ``.grad_inputs`` are its schema's names; ``Inputs`` its inputs' named tuple."""

    def __init__(self, name: str, op, backward_op, eager: Callable, schema: dict):
        self.name = name
        self.op = op
        self.backward_op = backward_op
        self._eager = eager
        self.Inputs = schema["Inputs"]
        self.inputs = schema["inputs"]
        self.outputs = schema["outputs"]
        self.saved = schema["saved"]
        self.differentiable = schema["differentiable"]
        self.grad_inputs = schema["grad_inputs"]
        self._outputs_type = collections.namedtuple(_camel(name) + "Outputs", self.outputs)

    def named(self, outputs: tuple):
        """The op's outputs as a named tuple (``.loss``, ``.vals``, ...), by the schema's output names."""
        return self._outputs_type._make(outputs)

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        return self._eager(*args)

    def call(self, inputs):
        """The op on one ``Inputs`` named tuple; returns the outputs as a named tuple."""
        return self.named(self(*inputs))


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _zeros(shape, dtype, device) -> torch.Tensor:
    """A zero upstream gradient for an output autograd gave none (a step's absent ``aux_loss``, shape [0], is
    an empty tensor: no fill launched)."""
    if 0 in shape:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def _schema_type(name: str, field: str, annotation) -> str:
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = args[0] if args[1] is type(None) else args[1]
        return _schema_type(name, field, inner) + "?"
    if annotation in _SCHEMA_TYPES:
        return _SCHEMA_TYPES[annotation]
    raise ValueError(f"{name}: input {field!r} has a type the op schema cannot carry: {annotation!r}")


def _schema(name, inputs, outputs, saved, differentiable, grad_inputs) -> dict:
    """The op's names and schema strings; raises ValueError on any name that does not resolve."""
    fields = tuple(inputs._fields)
    outputs, saved = tuple(outputs), tuple(saved)
    differentiable, grad_inputs = tuple(differentiable), tuple(grad_inputs)
    clash = set(fields) & set(outputs)
    if clash or len(set(outputs)) != len(outputs):
        raise ValueError(f"{name}: output names must be unique and differ from the inputs ({sorted(clash)})")
    unknown = [n for n in differentiable if n not in outputs] + [n for n in grad_inputs if n not in fields]
    if unknown:
        raise ValueError(f"{name}: unknown names {unknown} in differentiable (outputs) or grad_inputs (inputs)")
    missing = [n for n in saved if n not in fields and n not in outputs]
    if missing:
        raise ValueError(f"{name}: saved names {missing}, which are neither inputs {fields} nor outputs")
    types_ = {f: _schema_type(name, f, inputs.__annotations__[f]) for f in fields}
    out_types = {n: "Tensor" for n in outputs}
    result = "(" + ", ".join("Tensor" for _ in outputs) + ")" if len(outputs) > 1 else "Tensor"
    grads = ", ".join(f"Tensor grad_{n}" for n in differentiable)
    saved_args = ", ".join(f"{types_.get(n, out_types.get(n))} {n}" for n in saved)
    return {
        "Inputs": inputs,
        "inputs": fields,
        "outputs": outputs,
        "saved": saved,
        "differentiable": differentiable,
        "grad_inputs": grad_inputs,
        "forward_schema": "(" + ", ".join(f"{types_[f]} {f}" for f in fields) + ") -> " + result,
        "backward_schema": f"({grads}, {saved_args}, bool[] needs) -> ("
        + ", ".join("Tensor" for _ in grad_inputs)
        + ")",
        "Grads": collections.namedtuple(_camel(name) + "Grads", differentiable),
        "Saved": collections.namedtuple(_camel(name) + "Saved", saved),
        # positions, computed once here so the per-call wiring is a tuple lookup
        "save_from": tuple((n in fields, fields.index(n) if n in fields else outputs.index(n)) for n in saved),
        "differentiable_at": tuple(outputs.index(n) for n in differentiable),
        "grad_input_at": tuple(fields.index(n) for n in grad_inputs),
    }


def register_op(
    name: str,
    *,
    inputs: type,
    outputs: Sequence[str],
    saved: Sequence[str],
    differentiable: Sequence[str],
    grad_inputs: Sequence[str],
    launchers: tuple[Callable, Callable, Callable, Callable],
) -> Op:
    """Registers ``name`` (forward) and ``name + "_backward"`` and returns the dispatching ``Op``.

    Args:
        inputs: the ``NamedTuple`` class of the op's arguments (see the module docstring).
        outputs: the name of each tensor the forward returns, in order.
        saved: the inputs and outputs the backward reads, by name.
        differentiable: the outputs (by name) that carry a gradient.
        grad_inputs: the inputs (by name) that the backward's outputs are the gradients of, in order.
        launchers: (forward, forward_fake, backward, backward_fake).
    """
    forward, forward_fake, backward, backward_fake = launchers
    schema = _schema(name, inputs, outputs, saved, differentiable, grad_inputs)
    Inputs, Grads, Saved = schema["Inputs"], schema["Grads"], schema["Saved"]
    n_grads, n_saved = len(schema["differentiable"]), len(schema["saved"])

    def split(args):
        return Grads._make(args[:n_grads]), Saved._make(args[n_grads : n_grads + n_saved]), args[-1]

    def flat_forward(*args):
        return forward(Inputs._make(args))

    def flat_forward_fake(*args):
        return forward_fake(Inputs._make(args))

    def flat_backward(*args):
        # a gradient an optimizer consumed inside the backward (``flash_sae.FusedAdam``) comes back None
        return tuple(g if g is not None else _CONSUMED for g in backward(*split(args)))

    def flat_backward_fake(*args):
        return backward_fake(*split(args))

    # kernel-builder's ops check reads these two calls: each names its op through add_op_namespace_prefix
    fwd_op = torch.library.custom_op(add_op_namespace_prefix(name), mutates_args=(), schema=schema["forward_schema"])(
        flat_forward
    )
    fwd_op.register_fake(flat_forward_fake)
    bwd_op = torch.library.custom_op(
        add_op_namespace_prefix(name + "_backward"), mutates_args=(), schema=schema["backward_schema"]
    )(flat_backward)
    bwd_op.register_fake(flat_backward_fake)
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
        ctx.input_numel = [inputs[i].numel() if isinstance(inputs[i], torch.Tensor) else 0 for i in grad_input_at]
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
            for pos, need, numel, g in zip(grad_input_at, needs, ctx.input_numel, launch(*grads, *saved, needs)):
                if need and not (g.numel() == 0 and numel > 0):  # an empty gradient of a non-empty input: consumed
                    result[pos] = g
            return tuple(result)

        return backward_fn

    fwd_op.register_autograd(make_backward(bwd_op), setup_context=setup_context)

    eager_backward = make_backward(flat_backward)

    def eager_forward(ctx, *args):
        output = flat_forward(*args)
        setup_context(ctx, args, output)
        return output

    function = type(
        _camel(name),
        (torch.autograd.Function,),
        {"forward": staticmethod(eager_forward), "backward": staticmethod(eager_backward)},
    )
    op = Op(name, fwd_op, bwd_op, function.apply, schema)
    REGISTERED[name] = op
    return op


_CONSUMED = torch.empty(0)  # what a launcher's None gradient (consumed by a fused optimizer) becomes


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """What a backward launcher returns for a gradient nobody needs."""
    return like.new_empty(0)


def gradient_or_placeholder(need: bool, like: torch.Tensor, compute: Callable) -> torch.Tensor:
    """``compute()`` when ``need``, else an empty placeholder (see ``placeholder``)."""
    return compute() if need else placeholder(like)


def fake_gradients(needs, *likes) -> tuple:
    """A backward fake's outputs: ``empty_like(like)`` where needed, placeholders elsewhere."""
    return tuple(torch.empty_like(t) if need else placeholder(t) for need, t in zip(needs, likes))
