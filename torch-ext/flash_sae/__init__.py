"""flash-sae: Triton kernels for training sparse autoencoders (TopK, BatchTopK, JumpReLU, Matryoshka, standard, Gated).

After the encoder, each input activates a few of F latents (K, or K on average), so decoding, the
reconstruction loss and the whole backward pass cost O(B*K*D) plus one write of
the dense [F, D] weight gradient. No [B, F] tensor is kept for the backward;
the encoder's pre-activations exist only chunk by chunk during the forward.

Layout: ``primitives/`` holds the kernels every op is built from (gather,
CSR transpose and segmented sum, selection and ordered compaction, the encoder's
and the whole step's backward);
``ops/<family>/`` the registered ops, one file each; ``modules/`` the
``nn.Module``s; ``layers`` the stateless hub layers; ``testing`` (not in ``__all__``) the
plain-torch reference formulas the tests check against.
"""

from . import distributed, layers, testing  # noqa: F401  (testing: the test oracles, outside __all__)
from .architectures import ARCHITECTURES, Architecture, register_architecture
from .crosscoder_layers import CrosscoderLayers
from .dead_latent_loss import DeadLatentLoss
from .graph_training_step import graph_training_step
from .hooks import Hook, HookSession, attach
from .latent_analysis import LatentAnalysis, LatentStatistics
from .loading import load_circuit_tracer, load_gemma_scope, load_saelens, load_sparsify
from .modules.batchtopk import BatchTopKSparseAutoencoder, MatryoshkaBatchTopKSparseAutoencoder
from .modules.clt import BatchTopKCrossLayerTranscoder, JumpReLUCrossLayerTranscoder, TopKCrossLayerTranscoder
from .modules.crosscoder import BatchTopKCrosscoder, JumpReLUCrosscoder, StandardCrosscoder, TopKCrosscoder
from .modules.gated import GatedSparseAutoencoder
from .modules.jumprelu import JumpReLUSparseAutoencoder
from .modules.sparse_autoencoder import SparseAutoencoder
from .modules.standard import StandardSparseAutoencoder, VanillaSparseAutoencoder
from .modules.transcoder import (
    BatchTopKTranscoder,
    JumpReLUTranscoder,
    StandardTranscoder,
    TopKTranscoder,
    circuit_tracer_transcoder_set,
)
from .ops.batchtopk.batchtopk_encode import batchtopk_encode
from .ops.batchtopk.batchtopk_sae_step import batchtopk_sae_step, matryoshka_batchtopk_sae_step
from .ops.decode.hierarchical_topk_sae_loss import hierarchical_topk_sae_loss
from .ops.decode.sparse_decode import sparse_decode
from .ops.decode.topk_sae_loss import topk_sae_loss
from .ops.decode.varlen_sae_loss import varlen_sae_loss
from .ops.decode.varlen_sparse_decode import varlen_sparse_decode
from .ops.gated.gated_sae_step import gated_sae_step, gated_sae_step_dense
from .ops.jumprelu.jumprelu_encode import jumprelu_encode
from .ops.jumprelu.jumprelu_sae_step import jumprelu_sae_step
from .ops.standard.standard_sae_step import standard_sae_step, standard_sae_step_dense
from .ops.topk.topk_encode import topk_encode
from .ops.topk.topk_sae_step import matryoshka_topk_sae_step, topk_sae_step
from .optim import FusedAdam
from .results import (
    STEP_FIELDS,
    BatchTopKCrosscoderStep,
    BatchTopKSAEStep,
    CrossLayerTranscoderStep,
    GatedSAEStep,
    JumpReLUCrosscoderStep,
    JumpReLUSAEStep,
    MatryoshkaSAEStep,
    SparseCode,
    StandardCrosscoderStep,
    StandardSAEStep,
    TopKCrosscoderStep,
    TopKSAEStep,
)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "STEP_FIELDS",
    "BatchTopKCrossLayerTranscoder",
    "BatchTopKSAEStep",
    "BatchTopKSparseAutoencoder",
    "BatchTopKTranscoder",
    "CrossLayerTranscoderStep",
    "DeadLatentLoss",
    "GatedSAEStep",
    "Hook",
    "HookSession",
    "GatedSparseAutoencoder",
    "JumpReLUCrossLayerTranscoder",
    "LatentAnalysis",
    "LatentStatistics",
    "BatchTopKCrosscoder",
    "BatchTopKCrosscoderStep",
    "CrosscoderLayers",
    "JumpReLUCrosscoder",
    "JumpReLUCrosscoderStep",
    "JumpReLUSAEStep",
    "JumpReLUSparseAutoencoder",
    "JumpReLUTranscoder",
    "MatryoshkaBatchTopKSparseAutoencoder",
    "MatryoshkaSAEStep",
    "SparseCode",
    "SparseAutoencoder",
    "StandardCrosscoder",
    "StandardCrosscoderStep",
    "StandardSAEStep",
    "StandardSparseAutoencoder",
    "StandardTranscoder",
    "TopKCrossLayerTranscoder",
    "TopKCrosscoder",
    "TopKCrosscoderStep",
    "TopKSAEStep",
    "TopKTranscoder",
    "VanillaSparseAutoencoder",
    "attach",
    "batchtopk_encode",
    "batchtopk_sae_step",
    "circuit_tracer_transcoder_set",
    "gated_sae_step",
    "gated_sae_step_dense",
    "graph_training_step",
    "FusedAdam",
    "hierarchical_topk_sae_loss",
    "jumprelu_encode",
    "jumprelu_sae_step",
    "distributed",
    "layers",
    "load_circuit_tracer",
    "load_gemma_scope",
    "load_saelens",
    "load_sparsify",
    "matryoshka_batchtopk_sae_step",
    "register_architecture",
    "matryoshka_topk_sae_step",
    "sparse_decode",
    "standard_sae_step",
    "standard_sae_step_dense",
    "topk_encode",
    "topk_sae_loss",
    "topk_sae_step",
    "varlen_sae_loss",
    "varlen_sparse_decode",
]
