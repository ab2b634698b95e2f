"""``nn.Module``s over the ops, one file per family (``sparse_autoencoder``: TopK; ``batchtopk``: BatchTopK and
Matryoshka; ``jumprelu``; ``standard``: standard and vanilla; ``gated``), and what they share: ``base`` (parameters,
initialisation, the template ``loss``, dead latents, the SAELens format), ``_capacity`` (code sizes learned
without a host sync) and ``_geometry`` (the fused decoder-norm steps). The package exports each module from
``flash_sae``; ``flash_sae.ARCHITECTURES`` lists them with their steps."""
