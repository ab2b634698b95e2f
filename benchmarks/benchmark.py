"""``kernels benchmark org/flash-sae --version 1`` entry point.

Each workload times one forward + backward of a flash-sae op; its ``verify_*``
runs the plain-torch reference (``reference.py``) on the same inputs (the SAE steps:
on fp32 copies, as the kernels accumulate the loss in fp32), which the runner times
too and compares with the op's loss or output (``torch.allclose(..., atol=1e-2)``). The full
side-by-side table (torch.compile, dense, memory, % of floor) is
``benchmarks/side_by_side.py``.
"""

import torch
from kernels.benchmark import Benchmark

# (B, D, F, K): a GPU-sized training batch, and a tiny one for CPU runs.
SHAPES = {"gpu": (2048, 2304, 65536, 64), "cpu": (16, 96, 512, 12)}


def _problem(bench, dtype=torch.bfloat16):
    B, D, F, K = SHAPES["cpu" if bench.device == "cpu" else "gpu"]
    g = torch.Generator(device=bench.device).manual_seed(0)
    bench.indices = torch.randint(0, F, (B, K), device=bench.device, generator=g)
    mk = lambda *s, scale=1.0: (torch.randn(*s, device=bench.device, generator=g) * scale).to(dtype).requires_grad_()  # noqa: E731
    bench.weight = mk(F, D, scale=D**-0.5)
    bench.vals = torch.rand(B, K, device=bench.device, generator=g).to(dtype).requires_grad_()
    bench.bias = mk(D, scale=0.1)
    bench.target = mk(B, D, scale=0.5)


def _step(fn, bench, args):
    for p in (bench.weight, bench.vals, bench.bias, bench.target):
        p.grad = None
    out = fn(*args)
    out.backward(torch.ones_like(out))
    return out.detach().float()


class TopkSaeLoss(Benchmark):
    seed = 0

    def setup_train_step(self):
        _problem(self)

    def _args(self):
        return (self.indices, self.weight, self.vals, self.bias, self.target)

    def benchmark_train_step(self):
        self.out = _step(self.kernel.topk_sae_loss, self, self._args())

    def verify_train_step(self) -> torch.Tensor:
        return _step(self.kernel.testing.reference.topk_sae_loss, self, self._args())


class HierarchicalTopkSaeLoss(TopkSaeLoss):
    def benchmark_train_step(self):
        self.out = _step(self.kernel.hierarchical_topk_sae_loss, self, self._args())

    def verify_train_step(self) -> torch.Tensor:
        return _step(self.kernel.testing.reference.hierarchical_topk_sae_loss, self, self._args())


class SparseDecode(TopkSaeLoss):
    def _args(self):
        return (self.vals, self.indices, self.weight, self.bias)

    def benchmark_train_step(self):
        self.out = _step(self.kernel.sparse_decode, self, self._args())

    def verify_train_step(self) -> torch.Tensor:
        return _step(self.kernel.testing.reference.sparse_decode, self, self._args())


def _sae_problem(bench, dtype=torch.bfloat16):
    """x and a tied-init TopK SAE (unit-norm decoder rows, W_enc = W_dec, zero biases)."""
    B, D, F, K = SHAPES["cpu" if bench.device == "cpu" else "gpu"]
    g = torch.Generator(device=bench.device).manual_seed(0)
    w = torch.randn(F, D, device=bench.device, generator=g)
    w = (w / w.norm(dim=1, keepdim=True)).to(dtype)
    x = torch.randn(B, D, device=bench.device, generator=g).to(dtype)
    zeros = lambda n: torch.zeros(n, device=bench.device, dtype=dtype)  # noqa: E731
    bench.sae = [t.requires_grad_() for t in (x, w.clone(), zeros(F), w, zeros(D))]
    bench.k = K


def _sae_step(fn, bench):
    for p in bench.sae:
        p.grad = None
    step = fn(*bench.sae, bench.k)
    step.loss.backward()
    return step.loss.detach().float()


def _reference_step(fn, bench):
    """The plain-torch reference on fp32 copies of the step's inputs (their values exactly). The kernels
    accumulate the loss in fp32; a reference run in bf16 rounds it (Matryoshka's 4.3538 to 4.34375 at the
    CPU shape), past the runner's ``torch.allclose(out, reference, atol=1e-2)``."""
    args = [t.detach().float().requires_grad_() for t in bench.sae]
    step = fn(*args, bench.k)
    step.loss.backward()
    return step.loss.detach().float()


class TopkSaeStep(Benchmark):
    """The whole TopK SAE step: encoder GEMM, top-k, decode, MSE, forward + backward."""

    seed = 0

    def setup_train_step(self):
        _sae_problem(self)

    def benchmark_train_step(self):
        self.out = _sae_step(self.kernel.topk_sae_step, self)

    def verify_train_step(self) -> torch.Tensor:
        return _reference_step(self.kernel.testing.reference.topk_sae_step, self)


class BatchtopkSaeStep(TopkSaeStep):
    """The whole BatchTopK SAE step (SAELens's decoder-norm rescaling), forward + backward."""

    def benchmark_train_step(self):
        self.out = _sae_step(lambda *a: self.kernel.batchtopk_sae_step(*a, rescale_acts_by_decoder_norm=True), self)

    def verify_train_step(self) -> torch.Tensor:
        return _reference_step(lambda *a: self.kernel.testing.reference.batchtopk_sae_step(*a, True), self)


class MatryoshkaBatchtopkSaeStep(TopkSaeStep):
    """The Matryoshka BatchTopK step with five levels (F/16, F/8, F/4, F/2, F)."""

    def _sizes(self):
        F = self.sae[1].shape[0]
        return [F // 16, F // 8, F // 4, F // 2, F]

    def benchmark_train_step(self):
        self.out = _sae_step(lambda *a: self.kernel.matryoshka_batchtopk_sae_step(*a, self._sizes()), self)

    def verify_train_step(self) -> torch.Tensor:
        return _reference_step(
            lambda *a: self.kernel.testing.reference.matryoshka_batchtopk_sae_step(*a, self._sizes()), self
        )
