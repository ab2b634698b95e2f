"""The architecture registry: every SAE architecture flash-sae trains, by name, with what a trainer needs.

Trainers, benchmarks and tests iterate ``ARCHITECTURES`` instead of branching on names: a new
architecture is its module, its step and one ``register_architecture`` call here.

    arch = ARCHITECTURES["jumprelu"]
    sae = arch.build(d_model, n_features, sparsity=1e-3, dtype=torch.bfloat16, device="cuda")
    step = sae.loss(x)            # an ``arch.result``, ``STEP_FIELDS`` first
"""

import dataclasses
from typing import Callable

from .modules.batchtopk import BatchTopKSparseAutoencoder, MatryoshkaBatchTopKSparseAutoencoder
from .modules.clt import BatchTopKCrossLayerTranscoder, JumpReLUCrossLayerTranscoder, TopKCrossLayerTranscoder
from .modules.crosscoder import BatchTopKCrosscoder, JumpReLUCrosscoder, StandardCrosscoder, TopKCrosscoder
from .modules.gated import GatedSparseAutoencoder
from .modules.jumprelu import JumpReLUSparseAutoencoder
from .modules.sparse_autoencoder import SparseAutoencoder
from .modules.standard import StandardSparseAutoencoder, VanillaSparseAutoencoder
from .modules.transcoder import BatchTopKTranscoder, JumpReLUTranscoder, StandardTranscoder, TopKTranscoder
from .ops.batchtopk.batchtopk_encode import batchtopk_encode
from .ops.batchtopk.batchtopk_sae_step import batchtopk_sae_step, matryoshka_batchtopk_sae_step
from .ops.gated.gated_sae_step import gated_sae_step
from .ops.jumprelu.jumprelu_encode import jumprelu_encode
from .ops.jumprelu.jumprelu_sae_step import jumprelu_sae_step
from .ops.standard.standard_sae_step import standard_sae_step
from .ops.topk.topk_encode import topk_encode
from .ops.topk.topk_sae_step import topk_sae_step
from .results import (
    BatchTopKCrosscoderStep,
    BatchTopKSAEStep,
    CrossLayerTranscoderStep,
    GatedSAEStep,
    JumpReLUCrosscoderStep,
    JumpReLUSAEStep,
    MatryoshkaSAEStep,
    StandardCrosscoderStep,
    StandardSAEStep,
    TopKCrosscoderStep,
    TopKSAEStep,
)


def no_extra(d_model: int, n_features: int) -> dict:
    return {}


def matryoshka_extra(d_model: int, n_features: int) -> dict:
    """Three nested levels, F/16, F/4 and F (each at least 1)."""
    return {"prefix_sizes": sorted({max(1, n_features // 16), max(1, n_features // 4), n_features})}


FAMILIES = ("sae", "transcoder", "clt", "crosscoder")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One SAE architecture.

    Attributes:
        name: the registry key (and ``examples/train_sae.py``'s ``--arch``).
        module: the ``nn.Module`` class; ``module.loss(x)`` is the fused training step.
        step: the step function the module calls.
        result: what the step returns (``results.STEP_FIELDS`` first).
        sparsity: the constructor keyword that sets the sparsity: ``"k"`` (positional, after
            ``n_features``), ``"l0_coefficient"`` or ``"l1_coefficient"``.
        capturable: whether ``module.loss`` runs without a host sync or host-side sizing, so a
            training step captures in a CUDA graph (``graph_training_step``).
        dead_loss: whether the module takes ``dead_loss`` (AuxK, ghost grads).
        extra: the constructor's other required arguments for an [F, D] dictionary (a default).
        family: what the module reads and what ``loss`` takes (``FAMILIES``): ``"sae"`` reconstructs
            its input, ``loss(x)``; ``"transcoder"`` predicts a target from an input, ``loss(x, y)``
            (``d_out`` a constructor keyword); ``"clt"`` and ``"crosscoder"`` read several layers,
            ``loss(xs, ys)`` and ``loss(xs)`` with [B, L, D] tensors (``n_layers`` a keyword).
    """

    name: str
    module: type
    step: Callable
    result: type
    sparsity: str
    capturable: bool
    dead_loss: bool
    extra: Callable[[int, int], dict] = no_extra
    family: str = "sae"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")

    def build(self, d_model: int, n_features: int, sparsity, **kwargs):
        """The module with ``sparsity`` as its sparsity argument, ``extra``'s defaults and ``kwargs``
        (``dtype``, ``device``, ``seed``, ...; they override the defaults)."""
        kwargs = {**self.extra(d_model, n_features), **kwargs}
        if self.sparsity == "k":
            return self.module(d_model, n_features, sparsity, **kwargs)
        return self.module(d_model, n_features, **{self.sparsity: sparsity}, **kwargs)


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    """Adds ``arch`` to ``ARCHITECTURES`` (a name taken twice is a ValueError)."""
    if not isinstance(arch, Architecture):
        raise ValueError(f"arch must be an Architecture, got {type(arch).__name__}")
    if arch.name in ARCHITECTURES:
        raise ValueError(f"arch.name {arch.name!r} is registered already")
    ARCHITECTURES[arch.name] = arch
    return arch


for _arch in (
    Architecture("topk", SparseAutoencoder, topk_sae_step, TopKSAEStep, "k", True, True),
    Architecture("batchtopk", BatchTopKSparseAutoencoder, batchtopk_sae_step, BatchTopKSAEStep, "k", True, True),
    Architecture(
        "matryoshka",
        MatryoshkaBatchTopKSparseAutoencoder,
        matryoshka_batchtopk_sae_step,
        MatryoshkaSAEStep,
        "k",
        True,
        False,
        matryoshka_extra,
    ),  # fmt: skip
    Architecture(
        "jumprelu", JumpReLUSparseAutoencoder, jumprelu_sae_step, JumpReLUSAEStep, "l0_coefficient", False, False
    ),  # fmt: skip
    Architecture(
        "standard", StandardSparseAutoencoder, standard_sae_step, StandardSAEStep, "l1_coefficient", False, False
    ),  # fmt: skip
    Architecture("gated", GatedSparseAutoencoder, gated_sae_step, GatedSAEStep, "l1_coefficient", False, False),
    Architecture(
        "vanilla", VanillaSparseAutoencoder, standard_sae_step, StandardSAEStep, "l1_coefficient", False, False
    ),  # fmt: skip
):
    register_architecture(_arch)

# Transcoders (family "transcoder"): the SAE steps with ``target=``; ``loss(x, y)``, ``d_out`` and ``skip``
# constructor keywords (``arch.build(d_in, n_features, sparsity, d_out=..., skip=...)``).
for _arch in (
    Architecture("topk_transcoder", TopKTranscoder, topk_sae_step, TopKSAEStep, "k", True, True,
                 family="transcoder"),
    Architecture("batchtopk_transcoder", BatchTopKTranscoder, batchtopk_sae_step, BatchTopKSAEStep, "k", True, True,
                 family="transcoder"),
    Architecture("jumprelu_transcoder", JumpReLUTranscoder, jumprelu_sae_step, JumpReLUSAEStep, "l0_coefficient",
                 False, False, family="transcoder"),
    Architecture("standard_transcoder", StandardTranscoder, standard_sae_step, StandardSAEStep, "l1_coefficient",
                 False, False, family="transcoder"),
):  # fmt: skip
    register_architecture(_arch)

# Cross-layer transcoders (family "clt"): ``loss(xs, ys)`` on [B, L, D]; ``step`` names the per-layer encode
# op the module composes with the sparse decodes (``modules/clt.py``).
for _arch in (
    Architecture("topk_clt", TopKCrossLayerTranscoder, topk_encode, CrossLayerTranscoderStep, "k", True, False,
                 family="clt"),
    Architecture("batchtopk_clt", BatchTopKCrossLayerTranscoder, batchtopk_encode, CrossLayerTranscoderStep, "k",
                 True, False, family="clt"),
    Architecture("jumprelu_clt", JumpReLUCrossLayerTranscoder, jumprelu_encode, CrossLayerTranscoderStep,
                 "sparsity_coefficient", False, False, family="clt"),
):  # fmt: skip
    register_architecture(_arch)


def crosscoder_extra(d_model: int, n_features: int) -> dict:
    """Two layers (a crosscoder's smallest useful case, and model diffing's two models)."""
    return {"n_layers": 2}


# Crosscoders (family "crosscoder"): an SAE step over the [B, L * D] concatenation read uncentred; ``loss(xs)``
# on [B, L, D] (``modules/crosscoder.py``).
for _arch in (
    Architecture(
        "standard_crosscoder", StandardCrosscoder, standard_sae_step, StandardCrosscoderStep, "l1_coefficient",
        False, False, crosscoder_extra, "crosscoder",
    ),
    Architecture(
        "topk_crosscoder", TopKCrosscoder, topk_sae_step, TopKCrosscoderStep, "k", True, True, crosscoder_extra,
        "crosscoder",
    ),
    Architecture(
        "batchtopk_crosscoder", BatchTopKCrosscoder, batchtopk_sae_step, BatchTopKCrosscoderStep, "k", True, True,
        crosscoder_extra, "crosscoder",
    ),
    Architecture(
        "jumprelu_crosscoder", JumpReLUCrosscoder, jumprelu_sae_step, JumpReLUCrosscoderStep, "l0_coefficient",
        False, False, crosscoder_extra, "crosscoder",
    ),
):  # fmt: skip
    register_architecture(_arch)
