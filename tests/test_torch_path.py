"""The plain-torch CPU path: what a CPU user gets who does not set ``TRITON_INTERPRET``.

``_launch.use_triton`` sends CPU tensors to the Triton kernels only when the
interpreter was requested; otherwise every launcher runs its plain-torch
branch (the same sparse algorithm, fp32 accumulation), which is orders of
magnitude faster than the interpreter. These tests switch that branch on in
this session (``CPU_RUNS_TRITON = False``), replace every Triton kernel with a
sentinel that fails if launched, so nothing can fall through to the
interpreter unseen, and run the same checks as the kernels' own tests: parity
of every output and gradient with the fp64 reference in three dtypes, the
exact selection and its tie rule, determinism, and a training curve against
the plain-torch twin. They run on CPU tensors on any machine, GPU included.
"""

import pytest
import torch
from encoder_inputs import check_encode_parity, check_selection, check_step_parity, make_sae, tuning
from parity import DTYPES, LOSS_OPS, check_decode_parity, check_deterministic, check_loss_parity, package_module

# (B, K, F, D): B = 1, tiny F, F = K, odd D, D past one 256-wide block, K not a power of 2.
SHAPES = [(1, 1, 1, 1), (3, 5, 7, 33), (6, 12, 300, 257), (8, 7, 7, 40)]
# (B, D, F, K) for the encoder and the step.
ENCODER_SHAPES = [(1, 3, 1, 1), (5, 17, 40, 6), (8, 260, 300, 31), (3, 9, 2000, 100)]
KERNEL_MODULES = (
    "primitives.gather",
    "primitives.csr",
    "primitives.select.groups",
    "primitives.select.row_topk",
    "primitives.select.batch_topk",
    "primitives.select.threshold",
    "primitives.select.preacts",
    "primitives.compact",
    "primitives.decoder_geometry",
    "primitives.dead_set",
    "ops.decode.hierarchical_topk_sae_loss",
)


class _NotLaunched:
    def __getitem__(self, grid):
        raise AssertionError("a Triton kernel was launched on the plain-torch path")


@pytest.fixture
def torch_path(fs, monkeypatch):
    """CPU tensors on the plain-torch branch, with every Triton kernel replaced by a sentinel."""
    monkeypatch.setattr(package_module(fs, "_launch"), "CPU_RUNS_TRITON", False)
    for name in KERNEL_MODULES:
        module = package_module(fs, name)
        for attr in dir(module):
            if attr.endswith("_kernel") and hasattr(getattr(module, attr), "fn"):
                monkeypatch.setattr(module, attr, _NotLaunched())
    return "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decode_and_losses(fs, torch_path, shape, dtype):
    seed = sum(shape)
    for dup in (False, True):
        check_decode_parity(fs, shape, dtype, torch_path, seed=seed, duplicates=dup, with_bias=dup)
        for op in LOSS_OPS:
            check_loss_parity(fs, op, shape, dtype, torch_path, seed=seed, duplicates=dup)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ENCODER_SHAPES, ids=str)
def test_encoder_and_step(fs, torch_path, shape, dtype):
    seed = sum(shape)
    check_encode_parity(fs, shape, dtype, torch_path, centred=bool(seed % 2), seed=seed)
    check_step_parity(fs, shape, dtype, torch_path, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4, 32])
def test_selection_ties_groups_and_chunks(fs, torch_path, dtype, group, monkeypatch):
    """Exact ties (small integers) and signed zeros, several group sizes, several F chunks (the int64
    and int32-packed group keys of the torch branch both)."""
    B, D, F, K = 3, 5, 2500, 33
    monkeypatch.setitem(tuning(fs), "topk_select_group", group)
    for integer in (False, True):
        x, W_enc, b_enc, _, b_dec = make_sae(B, D, F, K, dtype, torch_path, seed=K, integer=integer)
        for chunk_bytes in (2**30, 3000):
            monkeypatch.setitem(tuning(fs), "chunk_bytes", chunk_bytes)
            vals, indices = fs.topk_encode(x, W_enc, b_enc, K, b_dec)
            check_selection(fs, x, W_enc, b_enc, K, b_dec, vals, indices)


@pytest.mark.parametrize("dtype", DTYPES)
def test_family_steps(fs, torch_path, dtype, monkeypatch):
    """BatchTopK (distinct and tied, several groups and chunks), Matryoshka and JumpReLU (one chunk and
    many, overflow) on this path: the kernels' own checks."""
    from contract_cases import check_chunking_invariance
    from test_batchtopk_sae_step import check_batchtopk_step
    from test_batchtopk_sae_step import check_selection as check_batch_selection
    from test_jumprelu_sae_step import check_jumprelu_step, test_jumprelu_overflow_is_reported
    from test_matryoshka_batchtopk_sae_step import check_matryoshka

    check_batchtopk_step(fs, (5, 33, 300, 6.5), dtype, torch_path, rescale=True, seed=1)
    check_batchtopk_step(fs, (6, 5, 300, 7), dtype, torch_path, rescale=False, seed=2, integer=True)
    check_matryoshka(fs, (4, 17, 200, 5), [10, 50, 200], dtype, torch_path, rescale=True, seed=3)
    check_jumprelu_step(fs, (6, 5, 40), dtype, torch_path, seed=3, bandwidth=1.0, l0_coefficient=0.5, integer=True)
    check_jumprelu_step(fs, (5, 30, 300), dtype, torch_path, seed=4, bandwidth=0.3, l0_coefficient=0.1)
    check_chunking_invariance(fs, "jumprelu", dtype, torch_path, monkeypatch)
    test_jumprelu_overflow_is_reported(fs, torch_path)
    params = make_sae(3, 5, 2500, 1, dtype, torch_path, seed=7, integer=True)
    for group, chunk_bytes in ((1, 2**30), (4, 2500), (32, 3000)):
        monkeypatch.setitem(tuning(fs), "select_group", group)
        monkeypatch.setitem(tuning(fs), "chunk_bytes", chunk_bytes)
        out = fs.batchtopk_sae_step(*params, 33, rescale_acts_by_decoder_norm=True)
        check_batch_selection(fs, *params, 33, True, out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_standard_step(fs, torch_path, dtype, monkeypatch):
    """The standard (ReLU + L1) step on this path: parity with zero decoder rows, chunks, overflow."""
    from contract_cases import check_chunking_invariance
    from test_standard_sae_step import check_standard_step, test_standard_overflow_is_reported

    check_standard_step(fs, (5, 30, 300), dtype, torch_path, seed=4, l1_coefficient=0.7, zero_rows=5)
    check_chunking_invariance(fs, "standard", dtype, torch_path, monkeypatch)
    test_standard_overflow_is_reported(fs, torch_path)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_step(fs, torch_path, dtype, monkeypatch):
    """The Gated step on this path (row_dots, the decoder pass's row term without the coefficient sum):
    parity both decoder rules and with zero decoder rows, chunks, overflow."""
    from contract_cases import check_chunking_invariance
    from test_gated_sae_step import check_gated_step, test_gated_overflow_is_reported

    check_gated_step(fs, (5, 30, 300), dtype, torch_path, seed=4, l1_coefficient=0.7, freeze=True, zero_rows=5)
    check_gated_step(fs, (4, 17, 60), dtype, torch_path, seed=5, l1_coefficient=0.2, freeze=False)
    check_chunking_invariance(fs, "gated", dtype, torch_path, monkeypatch)
    test_gated_overflow_is_reported(fs, torch_path)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("by_coef", [True, False])
def test_segment_sum_row_term_matches_the_kernel(fs, by_coef):
    """The segmented pass's row term, with the coefficient sum asked for too: the plain-torch branch and the
    Triton kernel (the interpreter here) give the same rows and sums."""
    csr = package_module(fs, "primitives.csr")
    g = torch.Generator().manual_seed(3)
    F, D, B, K = 7, 9, 5, 3
    idx = torch.randint(0, F, (B, K), generator=g)
    perm, offsets = csr.csr_transpose(idx, F)
    src, weight = torch.randn(B, D, generator=g), torch.randn(F, D, generator=g)
    coef, row_term = torch.randn(B * K, generator=g), torch.randn(F, generator=g)
    runs = []
    rows = csr.SegmentRows(src=src, K=K)
    for launch in (csr._segment_sum, csr._segment_sum_torch):  # the kernel's launcher, the plain-torch path
        out, csum = torch.empty(F, D), torch.empty(F)
        term = csr.RowTerm(row_term, by_coef=by_coef)
        same_pass = csr.SegmentPass(out=out, coef=coef, weight=weight, coef_sum=csum, row_term=term)
        dots = launch(perm, offsets, rows, same_pass)
        runs.append((out, csum, dots))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    sums = torch.zeros(F).index_add_(0, idx.reshape(-1), coef)
    expect = row_term * (sums if by_coef else 1.0)
    plain = torch.zeros(F, D).index_add_(0, idx.reshape(-1), coef[:, None] * src.repeat_interleave(K, 0))
    torch.testing.assert_close(runs[0][0], plain + expect[:, None] * weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_ops(fs, torch_path, dtype):
    """varlen_sparse_decode and varlen_sae_loss on this path (empty rows, repeats, padding)."""
    from test_varlen_sae_loss import check_varlen_loss
    from test_varlen_sparse_decode import check_varlen_decode

    for check in (check_varlen_decode, check_varlen_loss):
        check(fs, ([3, 0, 12, 1], 300, 257, 3), dtype, torch_path, 1)
        check(fs, ([0], 1, 1, 0), dtype, torch_path, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dead_latent_losses(fs, torch_path, dtype):
    """AuxK (ties, fewer dead than k_aux, a window past the capacity) and ghost grads, both steps."""
    from test_dead_latent_loss import DeadOptions, check_dead_step
    from test_dead_latent_loss import test_dead_window as window

    for step in ("topk", "batchtopk"):
        check_dead_step(
            fs, step, (5, 4, 90, 3, 7, 60, 0.5, 0), dtype, torch_path, DeadOptions("auxk", True, True, False, 4, True)
        )
        check_dead_step(
            fs, step, (7, 9, 96, 4, 12, 96, 0.05, 30), dtype, torch_path, DeadOptions("auxk", True, True, False, 5)
        )
        check_dead_step(
            fs, step, (6, 7, 200, 4, 9, 40, 0.5, 150), dtype, torch_path, DeadOptions("ghost", True, True, True, 11)
        )
    window.hypothesis.inner_test(fs, torch_path, 2500, 40, 0.3, 1000)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decoder_geometry(fs, torch_path, dtype):
    """The decoder-geometry row steps on this path (all rows, a subset, zero rows)."""
    from test_decoder_geometry import test_geometry_matches_fp64

    for F, D, zero_rows, subset in ((7, 33, True, False), (9, 1030, False, True), (1, 1, False, False)):
        test_geometry_matches_fp64.hypothesis.inner_test(fs, torch_path, F, D, dtype, zero_rows, subset, seed=F)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("op", LOSS_OPS + ("sparse_decode",))
def test_deterministic(fs, torch_path, op):
    check_deterministic(fs, op, torch_path)


def test_training_follows_reference(fs, torch_path):
    """The fp32 training curve of the module on this path follows its plain-torch twin (test_training's check)."""
    from test_training import test_training_fp32_follows_reference

    test_training_fp32_follows_reference(fs, torch_path)


@pytest.mark.kernels_ci
def test_sentinel_catches_a_launch(fs, torch_path):
    """The sentinel has teeth: with the interpreter path forced back on, a launch fails loudly."""
    package_module(fs, "_launch").CPU_RUNS_TRITON = True
    x, W_enc, b_enc, _, b_dec = make_sae(2, 4, 10, 3, torch.float32, torch_path, seed=0)
    with pytest.raises(AssertionError, match="plain-torch path"):
        fs.topk_encode(x, W_enc, b_enc, 3, b_dec)


@pytest.mark.parametrize("dtype", DTYPES)
def test_crosscoder_steps(fs, torch_path, dtype):
    """The crosscoder steps on this path (the segmented pass's row term one value per layer block, the
    layers' L2 loss): the standard sparse and dense steps and the BatchTopK step against the per-layer
    reference."""
    from test_crosscoder import check_standard, test_batchtopk_crosscoder_step_parity

    for reconstruction in ("mse", "layer_l2"):
        check_standard(fs, (5, 3, 7, 40), dtype, torch_path, seed=2, l1_coefficient=0.7, reconstruction=reconstruction)
        check_standard(fs, (4, 2, 5, 9), dtype, torch_path, seed=3, l1_coefficient=0.7, dense=True,
                       reconstruction=reconstruction)  # fmt: skip
        parity = test_batchtopk_crosscoder_step_parity.hypothesis.inner_test
        parity(fs, torch_path, (6, 3, 5, 30), dtype, 2.5, True, reconstruction, 4)
