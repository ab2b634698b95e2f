"""The registered ops, by family. Each op file holds its host launchers, one
``register_op`` call and its public function; the kernels they launch live in
``primitives``; a family's private ``_`` modules (and ``_step.py`` for every step) hold
host code they share.

- ``decode``: ops over a given code: ``sparse_decode``, ``topk_sae_loss``,
  ``hierarchical_topk_sae_loss`` (the last two with flex-sae's signature);
- ``topk``: the TopK encoder and the whole TopK SAE step: ``topk_encode``,
  ``topk_sae_step``;
- ``batchtopk``: the whole-batch selection's steps: ``batchtopk_sae_step``,
  ``matryoshka_batchtopk_sae_step``;
- ``jumprelu``: ``jumprelu_sae_step``, learned thresholds with straight-through estimators;
- ``standard``: ``standard_sae_step``, the ReLU code with the decoder-norm-weighted L1 penalty;
- ``gated``: ``gated_sae_step``, a gate path and a magnitude path over one encoder, with the gate's
  penalty and auxiliary reconstruction.
"""
