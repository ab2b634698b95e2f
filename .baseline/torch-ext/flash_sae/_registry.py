"""One registration helper for every op: custom ops, autograd, and the eager fast path.

An op is its two host launchers and their fakes:

- ``forward(*args) -> tuple of tensors``: annotated; its annotations are the
  registered op's schema. Some outputs carry gradients (``differentiable``),
  the others (codes, statistics, what the backward needs) do not.
- ``backward(*grads, *saved, needs) -> tuple of tensors``: annotated too.
  ``grads`` are the upstream gradients of the differentiable outputs, in
  order; ``saved`` is what ``save(args, outputs)`` chose to keep; ``needs`` is
  one bool per entry of ``grad_inputs``. It returns one tensor per entry of
  ``grad_inputs``: the gradient, or an empty placeholder where ``needs`` is
  False (custom ops cannot return None), so a launcher skips work no one asked for.

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

from collections.abc import Callable, Sequence

import torch

from ._ops import add_op_namespace_prefix


class Op:
    """A registered op: ``op(*args)`` dispatches; ``.op`` / ``.backward_op`` are the raw custom ops."""

    def __init__(self, name: str, op, backward_op, eager: Callable):
        self.name = name
        self.op = op
        self.backward_op = backward_op
        self._eager = eager

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        return self._eager(*args)


def register_op(
    name: str,
    *,
    forward: Callable,
    forward_fake: Callable,
    backward: Callable,
    backward_fake: Callable,
    save: Callable,
    differentiable: Sequence[int],
    grad_inputs: Sequence[int],
) -> Op:
    """Registers ``name`` (forward) and ``name + "_backward"`` and returns the dispatching ``Op``.

    Args:
        forward, forward_fake: the forward launcher (annotated) and its fake.
        backward, backward_fake: the backward launcher (annotated; see the module
            docstring for its arguments) and its fake.
        save: ``save(args, outputs) -> tuple`` of what the backward receives after
            the gradients: tensors (or None), kept with ``save_for_backward``, and
            constants (floats, ints), kept on the context.
        differentiable: positions of the outputs that carry a gradient.
        grad_inputs: positions of the forward's arguments that the backward's
            outputs are the gradients of, in order.
    """
    fwd_op = torch.library.custom_op(add_op_namespace_prefix(name), mutates_args=())(forward)
    fwd_op.register_fake(forward_fake)
    bwd_op = torch.library.custom_op(add_op_namespace_prefix(name + "_backward"), mutates_args=())(backward)
    bwd_op.register_fake(backward_fake)
    differentiable = tuple(differentiable)
    grad_inputs = tuple(grad_inputs)

    def setup_context(ctx, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        ctx.mark_non_differentiable(*(o for i, o in enumerate(outputs) if i not in differentiable))
        ctx.set_materialize_grads(False)
        saved = save(inputs, outputs)
        is_tensor = [t is None or isinstance(t, torch.Tensor) for t in saved]
        ctx.save_for_backward(*(t for t, keep in zip(saved, is_tensor) if keep))
        ctx.saved_constants = [(i, t) for i, (t, keep) in enumerate(zip(saved, is_tensor)) if not keep]
        ctx.n_inputs = len(inputs)
        ctx.grad_like = [(outputs[i].shape, outputs[i].dtype, outputs[i].device) for i in differentiable]

    def make_backward(launch):
        def backward_fn(ctx, *grad_outputs):
            grads = [grad_outputs[i] for i in differentiable]
            needs = [bool(ctx.needs_input_grad[i]) for i in grad_inputs]
            result = [None] * ctx.n_inputs
            if all(g is None for g in grads) or not any(needs):
                return tuple(result)
            grads = [
                g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
                for g, (shape, dtype, device) in zip(grads, ctx.grad_like)
            ]
            saved = list(ctx.saved_tensors)
            for i, constant in ctx.saved_constants:
                saved.insert(i, constant)
            for pos, need, g in zip(grad_inputs, needs, launch(*grads, *saved, needs)):
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
    return Op(name, fwd_op, bwd_op, function.apply)


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """What a backward launcher returns for a gradient nobody needs."""
    return like.new_empty(0)


def gradient_or_placeholder(need: bool, like: torch.Tensor, compute: Callable) -> torch.Tensor:
    """``compute()`` when ``need``, else an empty placeholder (see ``placeholder``)."""
    return compute() if need else placeholder(like)


def fake_gradients(needs, *likes) -> tuple:
    """A backward fake's outputs: ``empty_like(like)`` where needed, placeholders elsewhere."""
    return tuple(torch.empty_like(t) if need else placeholder(t) for need, t in zip(needs, likes))
