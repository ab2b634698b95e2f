"""How the variable-length modules size their code without a host sync (a private module).

A JumpReLU or standard step's code has a static size, and the number of active entries is known
only on the device. After each step the module copies the step's ``count`` to pinned host memory
without blocking and records a CUDA event it never waits for. A later step reads that copy only
once the event has completed; until then the module keeps the size it has, and starts no new copy
(so in a loop that runs far ahead of the GPU the oldest count in flight still arrives, a few steps
late, rather than each new copy replacing the last before any completes). The training step
never waits for the GPU.
"""

import math

import torch

from .._validation import is_int, is_real


class SeenCount:
    """The last active-entry count per row that reached the host without a wait."""

    def __init__(self):
        self._pending = None  # (pinned count, event or None, rows) of the last recorded step
        self.per_row = None  # the last count per row that arrived, or None before any did

    def record(self, count: torch.Tensor, rows: int) -> None:
        """Starts the copy of ``count`` (a 0-d device tensor) for a step of ``rows`` rows, unless an
        earlier copy is still in flight (it is kept: it arrives first)."""
        if self._pending is not None:
            self.poll()
            if self._pending is not None:
                return
        if count.device.type == "cuda":
            host = torch.empty((), dtype=count.dtype, pin_memory=True)
            host.copy_(count, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event, rows)
        else:
            self._pending = (count.clone(), None, rows)

    def poll(self) -> float | None:
        """The latest count per row that has arrived (reading it never waits), or None."""
        if self._pending is not None:
            count, event, rows = self._pending
            if event is None or event.query():
                self.per_row = int(count) / rows
                self._pending = None
        return self.per_row


def grown_capacity(per_row: float, n_features: int) -> int:
    """1.5x the count seen per row, rounded up to a power of two, at most F."""
    return min(n_features, 1 << max(0, math.ceil(math.log2(max(1.0, 1.5 * per_row)))))


class LearnedCapacity:
    """Mixin for ``SAEBase`` subclasses whose step returns a fixed-capacity code: after each step (in
    training and eval mode) the step's ``count`` starts on its way to the host (``SeenCount``)."""

    @torch.no_grad()
    def _after_step(self, step, rows: int) -> None:
        self._seen.record(step.count, rows)
        super()._after_step(step, rows)


class DenseSwitch(LearnedCapacity):
    """The sparse/dense choice of the modules whose code's density is learned (standard, Gated): mixin for
    ``SAEBase`` subclasses. Until a count has arrived, and whenever the last one was above
    ``dense_above`` * F entries per row, ``_path`` says dense; otherwise sparse with a capacity per
    row of 1.5x the count seen (a power of two). ``last_path`` ("dense" or "sparse") says which the
    last step ran."""

    def _init_switch(self, dense_above, capacity_per_row) -> None:
        if not is_real(dense_above) or not 0 <= dense_above <= 1:
            raise ValueError(f"dense_above must be a number in [0, 1], got {dense_above!r}")
        if capacity_per_row is not None and (not is_int(capacity_per_row) or capacity_per_row < 1):
            raise ValueError(f"capacity_per_row must be a positive int or None, got {capacity_per_row!r}")
        self.dense_above = float(dense_above)
        self.capacity_per_row = None if capacity_per_row is None else min(int(capacity_per_row), self.n_features)
        self._seen = SeenCount()
        self.last_path = None

    def _path(self, rows: int) -> int | None:
        """The sparse step's capacity for ``rows`` rows, or None for the dense formulation, from the last
        count that has arrived; sets ``last_path``."""
        F = self.n_features
        per_row = self._seen.poll()
        if per_row is not None:
            self.capacity_per_row = grown_capacity(per_row, F)
            dense = per_row > self.dense_above * F
        else:  # no count yet: dense unless a starting capacity was given or dense is never wanted
            dense = self.capacity_per_row is None and self.dense_above < 1.0
        if dense or self.dense_above == 0.0:
            self.last_path = "dense"
            return None
        self.last_path = "sparse"
        return min(rows * F, (self.capacity_per_row or F) * rows)
