"""A whole training step (forward, backward, optimizer) captured once in a CUDA graph and replayed.

flash-sae's steps make no host sync, so one training step, whatever the user's loop puts in it (the
module's ``loss``, ``backward``, the decoder-norm steps, ``optimizer.step()``, ``zero_grad``), records
into one CUDA graph; each later step is a copy of the batch into a static buffer and one replay, with
none of the Python and launch cost of the kernels it holds.

    step = flash_sae.graph_training_step(lambda x: train_step(sae, opt, x), x_example, sae, opt)
    for x in batches:
        out = step(x)        # the step's return value: the same (static) tensors every call

Rules (those of any CUDA graph): the step reads the batch only through its argument and keeps every
shape fixed; an optimizer must hold its state on the device (``torch.optim.Adam(..., capturable=True)``;
a learning-rate schedule then sets a tensor ``lr`` in place: ``group["lr"].fill_(value)``); the
returned tensors are overwritten by the next call (clone what is kept). Capture runs the step
``warmup`` + 1 times on ``x_example``; the modules' parameters and buffers and the optimizers' state
are then restored, so the first real call starts from the state the caller passed in (optimizer state
that the warm-up created is zeroed in place: Adam's and AdamW's fresh state, the only optimizers
accepted). Tensors that the step creates or reassigns instead of updating in place, and modules or
optimizers not passed in, keep what the warm-up did to them. While it runs, the capture holds a copy
of every state tensor it restores, in host memory (so the device's peak is the step's own). Off CUDA
the step is returned as it is (eager).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .optim import FusedAdam


def _state_tensors(modules: Iterable[torch.nn.Module], optimizers: Iterable[torch.optim.Optimizer]):
    tensors = []
    for m in modules:
        tensors += list(m.parameters()) + list(m.buffers())
    for opt in optimizers:
        for state in opt.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
    return tensors


def graph_training_step(
    step: Callable[[torch.Tensor], object],
    example: torch.Tensor,
    modules: torch.nn.Module | Iterable[torch.nn.Module] = (),
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] = (),
    *,
    warmup: int = 3,
) -> Callable[[torch.Tensor], object]:
    """Capture ``step(x)`` (a whole training step) in a CUDA graph; return ``f(x)`` that copies ``x`` into the
    captured input and replays it, returning the step's (static) outputs.

    ``modules`` and ``optimizers``: what the step trains; their state is restored after the capture's
    warm-up steps on ``example``. ``warmup`` (>= 1): eager steps on a side stream before capture (they
    create the optimizer's state and run the kernels' autotuning).
    """
    if not torch.is_tensor(example):
        raise ValueError(f"example must be a tensor, got {type(example).__name__}")
    if not callable(step):
        raise ValueError("step must be callable")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
    modules = [modules] if isinstance(modules, torch.nn.Module) else list(modules)
    optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    if example.device.type != "cuda":
        return step
    for opt in optimizers:
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW, FusedAdam)):
            # the restore below zeroes the state the warm-up created: Adam's and AdamW's fresh state
            raise ValueError(f"optimizers: only Adam, AdamW and FusedAdam are supported, got {type(opt).__name__}")
        if not all(group["capturable"] for group in opt.param_groups):
            raise ValueError("optimizers must be built with capturable=True to be captured in a CUDA graph")

    kept = _state_tensors(modules, optimizers)
    # the copies live in host memory: on the device they would add the whole training state to the peak
    # (an optimizer that keeps masters and moments from its construction doubles it)
    before = {id(t): (t, t.detach().to("cpu")) for t in kept}
    static_x = example.detach().clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(static_x)
    with torch.no_grad():
        for t in _state_tensors(modules, optimizers):
            tensor, saved = before.get(id(t), (None, None))
            if tensor is t:
                t.copy_(saved)
            else:  # created by the warm-up: an optimizer's fresh state is zeros
                t.zero_()

    def replay(x: torch.Tensor):
        if x.shape != static_x.shape or x.dtype != static_x.dtype:
            want = f"{tuple(static_x.shape)} {static_x.dtype}"
            raise ValueError(f"x must be {want} (the captured batch), got {tuple(x.shape)} {x.dtype}")
        static_x.copy_(x)
        graph.replay()
        return out

    replay.graph = graph
    return replay
