"""Exact selection over the columns of pre-activation chunks, and the chunked encoder pass, by concern:

- ``keys``: sortable keys and packed (key, id) int64s, the order every selection ranks by;
- ``groups``: the group pass (each group of G consecutive columns' best key) both top-k selections start from;
- ``row_topk``: the exact per-row top-k (the candidate kernel, chunk merges, AuxK's ``row_top``);
- ``batch_topk``: the exact top n of a whole batch (BatchTopK);
- ``threshold``: every entry above a per-latent threshold, and those near it (JumpReLU, standard, Gated);
- ``preacts``: the chunked encoder GEMM and the selections run on its chunks (``topk_preacts``,
  ``batch_topk_preacts``, ``threshold_preacts``).

The tie rule (deterministic; ``reference.topk_select`` states it as a stable
descending sort): larger value first; equal values go to the lower latent id;
-0.0 equals +0.0. NaN compares by its bits (a positive NaN is above +inf, a
negative NaN below -inf). The selection is exact on the pre-activations as
computed in the input dtype.
"""
