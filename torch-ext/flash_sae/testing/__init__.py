"""Test oracles, not part of flash-sae's API (nothing here is in ``__all__``).

``reference``: the plain-torch formulas of every op and module, differentiable by autograd. On fp64
copies of the inputs they are the ground truth the tests, the benchmarks' verification and the example
check against; on the inputs' own dtype they measure the error torch itself makes, which sets the
tolerances. Production code never imports this package.
"""

from . import reference

__all__ = ["reference"]
