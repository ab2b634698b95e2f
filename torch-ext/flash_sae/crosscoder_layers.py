"""``CrosscoderLayers``: how a step reads a crosscoder's L layers in its [L * D] concatenation.

A crosscoder's step is an SAE step over xs [B, L, D] flattened to [B, L * D], read uncentred
(``target=x``). What the layers change, given ``crosscoder=CrosscoderLayers(L)``: every decoder norm
(the standard step's L1 weight, the BatchTopK step's ranking factor) is the sum of the L per-layer
norms, sum_l ||W_dec[f, l]||; and with ``l2_loss`` the reconstruction term is the mean over rows
and layers of each layer's unsquared error norm. See ``docs/architectures/crosscoder.md``.
"""

from typing import NamedTuple

from ._validation import check_decoder_norm_groups, check_l2_loss_groups, is_int


class CrosscoderLayers(NamedTuple):
    """A crosscoder's layers, for the standard and BatchTopK steps' ``crosscoder`` argument.

    Args:
        n_layers: L, dividing W_dec's width [L * D] into L equal per-layer blocks: the decoder norm of
            latent f is sum_l ||W_dec[f, l]|| (Lindsey et al. 2024), not the norm of the whole row.
        l2_loss: False (default): the squared error. True: the reconstruction term is the mean over
            the B rows and the L layers of ||x_hat_l - x_l||_2, unsquared (dictionary_learning's
            crosscoder trainers' ``l2_loss``); the result's ``mse`` stays the mean squared error.
    """

    n_layers: int
    l2_loss: bool = False

    @staticmethod
    def groups(crosscoder, width: int) -> tuple[int, int]:
        """(decoder norm groups, l2 loss groups) of a step's ``crosscoder`` argument (None: (1, 0)) for a
        decoder of ``width`` columns; a ValueError naming ``crosscoder`` otherwise."""
        if crosscoder is None:
            return 1, 0
        if not isinstance(crosscoder, CrosscoderLayers):
            raise ValueError(f"crosscoder must be a CrosscoderLayers or None, got {type(crosscoder).__name__}")
        if not is_int(crosscoder.n_layers) or not isinstance(crosscoder.l2_loss, bool):
            raise ValueError(f"crosscoder must hold an int n_layers and a bool l2_loss, got {crosscoder!r}")
        try:
            norm_groups = check_decoder_norm_groups(crosscoder.n_layers, width)
            l2_groups = check_l2_loss_groups(norm_groups if crosscoder.l2_loss else 0, width)
        except ValueError as err:
            raise ValueError(f"crosscoder.n_layers: {err}") from None
        return norm_groups, l2_groups
