"""The hub layer ``layers.SparseAutoencoder``: kernels' own checks accept it, and kernelize swaps it in.

A user's module keeps its parameters and declares itself replaceable with
``@use_kernel_forward_from_hub("SparseAutoencoder")``; ``kernels.kernelize``
then replaces its ``forward`` with ours, which reads the host's ``W_enc``,
``b_enc``, ``W_dec``, ``b_dec`` and ``k``. The mapping points at the build the
test session loaded (the path ``LOCAL_KERNELS`` names for the repo id, as
conftest or nix's ci-test set it), through both repository kinds that
kernels 0.17.2 can resolve offline:

- ``LocalLayerRepository(repo_path=...)``, the documented way to map a layer
  to a local directory;
- ``LayerRepository("org/flash-sae", revision=...)``, the hub route, resolved
  through ``LOCAL_KERNELS``. It names a revision, not ``version=1``: kernels
  0.17.2's ``LayerRepository`` turns a version into a commit by asking the hub
  (``select_revision_or_version``) before any resolver sees ``LOCAL_KERNELS``,
  so ``version=1`` fails offline (``get_kernel(..., version=1)`` itself does
  not; conftest loads the package that way).

kernelize supports the device type "cpu" in 0.17.2 (``_CPURepos``), so on a
machine without a GPU the swap is tested on CPU, with the kernels in the
Triton interpreter.
"""

import copy
import inspect
import os
import tomllib
from pathlib import Path

import pytest
import torch
from kernels import (
    LayerRepository,
    LocalLayerRepository,
    Mode,
    kernelize,
    use_kernel_forward_from_hub,
    use_kernel_mapping,
)
from kernels.layer.layer import _validate_layer
from parity import assert_parity
from torch import nn

B, D, F, K = 6, 24, 48, 4
BUILD_TOML = Path(__file__).resolve().parent.parent / "build.toml"
REPO_ID = tomllib.loads(BUILD_TOML.read_text())["general"]["hub"]["repo-id"]


@use_kernel_forward_from_hub("SparseAutoencoder")
class HostSAE(nn.Module):
    """A user's TopK SAE in plain torch, with flash-sae's parameter layout; kernelize may replace its forward."""

    def __init__(self, params, k):
        super().__init__()
        for name, t in params.items():
            setattr(self, name, nn.Parameter(t.detach().clone()))
        self.k = k

    def forward(self, x):
        pre = (x - self.b_dec) @ self.W_enc.T + self.b_enc
        vals, indices = pre.topk(self.k, dim=-1)
        return (vals.relu().unsqueeze(-1) * self.W_dec[indices]).sum(1) + self.b_dec


def local_build_path():
    """The directory LOCAL_KERNELS maps the repo id to (set by conftest, or by nix's ci-test)."""
    for entry in os.environ["LOCAL_KERNELS"].split(":"):
        repo_id, _, path = entry.partition("=")
        if repo_id == REPO_ID:
            return Path(path)
    raise AssertionError(f"LOCAL_KERNELS does not map {REPO_ID}")


def repository(kind):
    if kind == "local":
        return LocalLayerRepository(repo_path=local_build_path(), layer_name="SparseAutoencoder")
    return LayerRepository(REPO_ID, layer_name="SparseAutoencoder", revision="main")


def problem(fs, device, dtype=torch.float32, seed=0):
    sae = fs.SparseAutoencoder(D, F, K, dtype=dtype, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move away from the tied, zero-bias init
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p))
    x = torch.randn(B, D, generator=g).to(device=device, dtype=dtype)
    return sae, HostSAE(dict(sae.named_parameters()), K), x


def loss_and_grads(module, x):
    module.zero_grad()
    x_hat = module(x)
    (x_hat - x).pow(2).mean().backward()
    return x_hat.detach(), {name: p.grad.clone() for name, p in module.named_parameters()}


# (a) and (b): the layer class --------------------------------------------------------


@pytest.mark.kernels_ci
def test_kernels_validation_accepts_layer(fs):
    # What kernelize runs on every layer it loads: stateless, no extra members, forward's signature.
    _validate_layer(check_cls=HostSAE, cls=fs.layers.SparseAutoencoder, repo="flash-sae layers.SparseAutoencoder")

    # The check has teeth: a layer with state, or with a helper method, is rejected.
    class WithInit(fs.layers.SparseAutoencoder):
        def __init__(self):
            super().__init__()

    class WithHelper(fs.layers.SparseAutoencoder):
        def helper(self):
            pass

    for bad in (WithInit, WithHelper):
        with pytest.raises(TypeError):
            _validate_layer(check_cls=HostSAE, cls=bad, repo=bad.__name__)


@pytest.mark.kernels_ci
def test_layer_is_pure(fs):
    layer = fs.layers.SparseAutoencoder
    assert issubclass(layer, nn.Module)
    assert layer.__init__ is nn.Module.__init__, "a hub layer must not define __init__"
    own = {name for name in vars(layer) if not (name.startswith("__") and name.endswith("__"))}
    assert own == {"forward", "can_torch_compile", "has_backward"}, own
    extra = {name for name, _ in inspect.getmembers(layer)} - {name for name, _ in inspect.getmembers(nn.Module)}
    assert extra <= {"can_torch_compile", "has_backward"}, extra
    assert layer.has_backward is True and layer.can_torch_compile is True
    assert list(inspect.signature(layer.forward).parameters) == ["self", "x"]


# (c): kernelize swaps the layer in ----------------------------------------------------


@pytest.mark.kernels_ci
@pytest.mark.parametrize("kind", ["local", "hub-id"])
@pytest.mark.parametrize("mode", [Mode.TRAINING, Mode.INFERENCE], ids=["training", "inference"])
def test_kernelize_runs_our_layer(fs, device, kind, mode):
    sae, host, x = problem(fs, device)
    plain_x_hat, plain_grads = loss_and_grads(host, x)  # the host's own torch forward, before kernelize

    with use_kernel_mapping({"SparseAutoencoder": {device: repository(kind)}}, inherit_mapping=False):
        kernelize(host, mode=mode, device=device, use_fallback=False)  # raise rather than keep the old forward
    assert host.forward.__func__ is fs.layers.SparseAutoencoder.forward, "kernelize kept the host's forward"

    x_hat, grads = loss_and_grads(host, x)
    ours_x_hat, ours_grads = loss_and_grads(sae, x)
    # The very same kernels on the same tensors: bitwise equal to fs.SparseAutoencoder.
    assert torch.equal(x_hat, ours_x_hat)
    assert set(grads) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name, g in grads.items():
        assert torch.equal(g, ours_grads[name]), f"d{name} differs from fs.SparseAutoencoder's"
    # And the host's plain torch forward agrees by the parity rule (no ties in continuous fp32 data).
    state64 = {n: p.detach().double().requires_grad_() for n, p in host.named_parameters()}
    host64 = HostSAE(state64, K)
    ref_x_hat, ref_grads = loss_and_grads(host64, x.double())
    assert_parity("kernelized x_hat", x_hat, plain_x_hat, ref_x_hat, torch.float32)
    for name in grads:
        assert_parity(f"kernelized d{name}", grads[name], plain_grads[name], ref_grads[name], torch.float32)


@pytest.mark.kernels_ci
def test_kernelize_without_mapping_keeps_host_forward(fs, device):
    _, host, _ = problem(fs, device)
    with use_kernel_mapping({}, inherit_mapping=False):
        kernelize(host, mode=Mode.TRAINING, device=device)  # default fallback: no mapping, keep the forward
        with pytest.raises(ValueError, match="No layer mapping"):
            kernelize(host, mode=Mode.TRAINING, device=device, use_fallback=False)
    assert host.forward.__func__ is HostSAE.forward


@pytest.mark.slow
def test_kernelize_for_torch_compile(fs, device):
    """Mode.TORCH_COMPILE is accepted (can_torch_compile) and the kernelized host compiles with fullgraph."""
    import torch._dynamo

    sae, host, x = problem(fs, device, seed=3)
    with use_kernel_mapping({"SparseAutoencoder": {device: repository("local")}}, inherit_mapping=False):
        kernelize(host, mode=Mode.TRAINING | Mode.TORCH_COMPILE, device=device, use_fallback=False)
    assert host.forward.__func__ is fs.layers.SparseAutoencoder.forward

    torch._dynamo.reset()
    compiled = torch.compile(host, fullgraph=True)
    x_hat, grads = loss_and_grads(compiled, x)
    eager_x_hat, eager_grads = loss_and_grads(sae, x)
    torch.testing.assert_close(x_hat, eager_x_hat, rtol=1e-6, atol=1e-7)
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name.removeprefix("_orig_mod.")], rtol=1e-6, atol=1e-7)


# The forward-only layers of the BatchTopK, Matryoshka and JumpReLU modules ---------------------------


@use_kernel_forward_from_hub("BatchTopKSparseAutoencoder")
class HostBatchTopK(nn.Module):
    """A user's BatchTopK SAE in plain torch (eval mode: the threshold rule, as SAELens's inference SAE)."""

    def __init__(self, sae):
        super().__init__()
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            setattr(self, name, nn.Parameter(getattr(sae, name).detach().clone()))
        self.register_buffer("threshold", sae.threshold.clone())
        self.k, self.rescale_acts_by_decoder_norm = sae.k, sae.rescale_acts_by_decoder_norm

    def forward(self, x):
        pre = (x - self.b_dec) @ self.W_enc.T + self.b_enc
        active = pre * self.W_dec.norm(dim=1) > self.threshold.to(pre.dtype)
        return (pre.relu() * active) @ self.W_dec + self.b_dec


@use_kernel_forward_from_hub("JumpReLUSparseAutoencoder")
class HostJumpReLU(nn.Module):
    def __init__(self, sae):
        super().__init__()
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            setattr(self, name, nn.Parameter(getattr(sae, name).detach().clone()))

    def forward(self, x):
        pre = (x - self.b_dec) @ self.W_enc.T + self.b_enc
        return (pre * (pre > self.threshold.to(pre.dtype))) @ self.W_dec + self.b_dec


@use_kernel_forward_from_hub("StandardSparseAutoencoder")
class HostStandard(nn.Module):
    def __init__(self, sae):
        super().__init__()
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            setattr(self, name, nn.Parameter(getattr(sae, name).detach().clone()))

    def forward(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc) @ self.W_dec + self.b_dec


@use_kernel_forward_from_hub("GatedSparseAutoencoder")
class HostGated(nn.Module):
    def __init__(self, sae):
        super().__init__()
        for name in ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"):
            setattr(self, name, nn.Parameter(getattr(sae, name).detach().clone()))

    def forward(self, x):  # SAELens's GatedSAE.encode, in W_enc's [F, D] layout
        xc = x - self.b_dec
        opened = (xc @ self.W_enc.T + self.b_gate) > 0
        mag = torch.relu(xc @ (self.W_enc * self.r_mag.exp()[:, None]).T + self.b_mag)
        return (opened * mag) @ self.W_dec + self.b_dec


HOSTS = {
    "GatedSparseAutoencoder": HostGated,
    "BatchTopKSparseAutoencoder": HostBatchTopK,
    "JumpReLUSparseAutoencoder": HostJumpReLU,
    "StandardSparseAutoencoder": HostStandard,
}
KWARGS = {"BatchTopKSparseAutoencoder": {"k": 3.0}, "JumpReLUSparseAutoencoder": {"init_threshold": 0.02}}


def _family_problem(fs, name, device):
    g = torch.Generator().manual_seed(5)
    sae = getattr(fs, name)(D, F, device=device, seed=2, **KWARGS.get(name, {}))
    with torch.no_grad():
        for p in (sae.W_enc, *sae.latent_vectors(), sae.b_dec):
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p))
        if name == "BatchTopKSparseAutoencoder":
            sae.threshold.fill_(0.01)
    x = torch.randn(B, D, generator=g).to(device)
    host = HOSTS[name](sae)
    return sae.eval(), host.eval(), x


@pytest.mark.parametrize("name", list(HOSTS))
def test_family_layers_kernelize_for_inference(fs, device, name):
    """kernels' validation accepts the layer; kernelize(INFERENCE) swaps it in; its x_hat is the module's,
    bitwise, and the host's plain torch forward's by the parity rule."""
    layer = getattr(fs.layers, name)
    host_cls = HOSTS[name]
    _validate_layer(check_cls=host_cls, cls=layer, repo=f"flash-sae layers.{name}")
    assert layer.__init__ is nn.Module.__init__ and layer.has_backward is False
    sae, host, x = _family_problem(fs, name, device)
    with torch.no_grad():
        plain = host(x)
    repo = LocalLayerRepository(repo_path=local_build_path(), layer_name=name)
    with use_kernel_mapping({name: {device: repo}}, inherit_mapping=False):
        kernelize(host, mode=Mode.INFERENCE, device=device, use_fallback=False)
    assert host.forward.__func__ is layer.forward
    with torch.no_grad():
        ours = host(x)
        assert torch.equal(ours, sae(x)), "the layer's x_hat differs from the module's"
        assert (plain != 0).any()
        host64 = host_cls(sae.double())
        ref = host_cls.forward(host64, x.double())
    assert_parity(f"{name} layer x_hat", ours, plain, ref, torch.float32)


# The transcoders' layers ----------------------------------------------------------------------------

D_OUT = 10  # the transcoders' output width (D_in is D)


class _HostTranscoder(nn.Module):
    """A user's transcoder in plain torch with flash-sae's layout: x read as it is, y_hat [B, D_OUT],
    a dense skip term; ``code(pre)`` is the architecture's activation."""

    def __init__(self, tc):
        super().__init__()
        for name, p in tc.named_parameters():
            setattr(self, name, nn.Parameter(p.detach().clone()))
        for name in ("k", "rescale_acts_by_decoder_norm"):
            if hasattr(tc, name):
                setattr(self, name, getattr(tc, name))
        if hasattr(tc, "threshold") and not isinstance(tc.threshold, nn.Parameter):
            self.register_buffer("threshold", tc.threshold.clone())

    def forward(self, x):
        pre = x @ self.W_enc.T + self.b_enc
        return self.code(pre) @ self.W_dec + self.b_dec + x @ self.W_skip.T


@use_kernel_forward_from_hub("TopKTranscoder")
class HostTopKTranscoder(_HostTranscoder):
    def code(self, pre):
        vals, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(1, indices, vals.relu())


@use_kernel_forward_from_hub("BatchTopKTranscoder")
class HostBatchTopKTranscoder(_HostTranscoder):
    def code(self, pre):  # eval mode: the inference threshold
        return pre.relu() * (pre * self.W_dec.norm(dim=1) > self.threshold.to(pre.dtype))


@use_kernel_forward_from_hub("JumpReLUTranscoder")
class HostJumpReLUTranscoder(_HostTranscoder):
    def code(self, pre):
        return pre * (pre > self.threshold.to(pre.dtype))


@use_kernel_forward_from_hub("StandardTranscoder")
class HostStandardTranscoder(_HostTranscoder):
    def code(self, pre):
        return pre.relu()


TRANSCODER_HOSTS = {
    "TopKTranscoder": (HostTopKTranscoder, {"k": K}),
    "BatchTopKTranscoder": (HostBatchTopKTranscoder, {"k": 3.0}),
    "JumpReLUTranscoder": (HostJumpReLUTranscoder, {"init_threshold": 0.02}),
    "StandardTranscoder": (HostStandardTranscoder, {}),
}


@pytest.mark.parametrize("name", list(TRANSCODER_HOSTS))
def test_transcoder_layers_kernelize(fs, device, name):
    """kernels' validation accepts each transcoder layer; kernelize swaps it in; its y_hat (W_skip's term
    included) is the module's, bitwise, and the host's plain torch forward's by the parity rule; the TopK
    layer's gradients in training mode are the module's."""
    layer = getattr(fs.layers, name)
    host_cls, kwargs = TRANSCODER_HOSTS[name]
    _validate_layer(check_cls=host_cls, cls=layer, repo=f"flash-sae layers.{name}")
    assert layer.__init__ is nn.Module.__init__ and layer.has_backward is (name == "TopKTranscoder")
    g = torch.Generator().manual_seed(6)
    kwargs = {k: v for k, v in kwargs.items() if k != "k"}
    args = (TRANSCODER_HOSTS[name][1]["k"],) if "k" in TRANSCODER_HOSTS[name][1] else ()
    tc = getattr(fs, name)(D, F, *args, d_out=D_OUT, skip=True, device=device, seed=2, **kwargs)
    with torch.no_grad():
        for p in (tc.W_enc, tc.b_enc, tc.b_dec, tc.W_skip):
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p))
        if name == "BatchTopKTranscoder":
            tc.threshold.fill_(0.01)
            tc.threshold_updates.fill_(tc.threshold_warmup_steps())
    x = torch.randn(B, D, generator=g).to(device)
    tc.eval()
    host = host_cls(tc).eval()
    with torch.no_grad():
        plain = host(x)
    repo = LocalLayerRepository(repo_path=local_build_path(), layer_name=name)
    mode = Mode.TRAINING if layer.has_backward else Mode.INFERENCE
    with use_kernel_mapping({name: {device: repo}}, inherit_mapping=False):
        kernelize(host, mode=mode, device=device, use_fallback=False)
    assert host.forward.__func__ is layer.forward
    with torch.no_grad():
        ours = host(x)
        assert ours.shape == (B, D_OUT) and torch.equal(ours, tc(x)), "the layer's y_hat differs from the module's"
        ref = _HostTranscoder.forward(host_cls(copy.deepcopy(tc).double()), x.double())  # the unswapped forward
    assert_parity(f"{name} layer y_hat", ours, plain, ref, torch.float32)
    if layer.has_backward:
        host_grads = torch.autograd.grad(host(x).square().sum(), [host.W_enc, host.W_dec, host.W_skip])
        module_grads = torch.autograd.grad(tc(x).square().sum(), [tc.W_enc, tc.W_dec, tc.W_skip])
        for a, b in zip(host_grads, module_grads):
            assert torch.equal(a, b)
