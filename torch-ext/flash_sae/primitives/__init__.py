"""The building blocks every op is made of, one module each:

- ``gather``: the row gather (decode, the decoder's MSE epilogue, the encoder's dx)
  and its adjoint (weight gradient and per-entry dots through the CSR pass);
- ``csr``: the CSR transpose of a code and the deterministic segmented row sum;
- ``select``: the exact selections (per-row and whole-batch top-k, threshold collection) and the
  chunked encoder GEMM, a package of one module per concern;
- ``preacts_gemm``: the encoder GEMM with the selection's group pass in its epilogue (where it fits);
- ``encoder``: the encoder's sparse backward at a code's entries;
- ``triton_utils``: small Triton helpers (RTNE casts, the code-entry loader).
"""
