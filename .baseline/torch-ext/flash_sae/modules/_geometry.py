"""The kernels' modules' decoder-geometry steps: ``SAEBase``'s two methods on the fused row kernels.

The plain-torch twins in ``reference`` keep ``SAEBase``'s torch formulas (the tests' ground
truth); the modules here run ``primitives.decoder_geometry``: one pass per row, no fp32 copy
of W_dec or its gradient.
"""

import torch

from ..primitives.decoder_geometry import remove_parallel_, unit_norm_rows_


class FusedDecoderGeometry:
    """Mixin for ``SAEBase`` subclasses (listed before the base)."""

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self, rows: torch.Tensor | None = None):
        """Rescales every decoder row (or those where the [F] bool ``rows`` is True) to unit L2 norm."""
        unit_norm_rows_(self.W_dec.data, rows)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self, rows: torch.Tensor | None = None):
        """Projects out of W_dec.grad its component along each decoder row (or the given ``rows``)."""
        if self.W_dec.grad is None:
            return
        remove_parallel_(self.W_dec.data, self.W_dec.grad, rows)
