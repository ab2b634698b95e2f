"""``FusedAdam``: Adam applied to W_enc's and W_dec's rows inside the step's backward.

The reference is what a user runs today: the same module, ``torch.optim.Adam`` (or ``AdamW``) over all
its parameters, and the module's own ``before_optimizer_step`` / ``after_optimizer_step`` around it;
with bf16 compute, an fp32 master module that Adam trains and whose rounding the bf16 module takes
(``examples/train_sae.py``'s ``MasterWeights``).

- fp32: the two differ only in summation order (and the fused path never rounds a gradient), so the
  parameters and the moments agree to ~1e-6 relative after every step; asserted after each short run
  (the interpreted kernels) and after 200 steps (the plain-torch CPU path, the same update's twin).
- bf16 with master weights: the reference rounds each gradient to bf16 before Adam, the fused path
  does not, so after a few steps the two bf16 runs part by bf16 noise. Both approximate the fp32 run;
  the check is the parity rule against it (``tests/parity.py``): the fused run's parameters are at most
  2x as far from the fp32 run's as the reference's are, plus bf16's ATOL.
- Rows without a gradient in a step: the shapes leave latents that fire in no row of a batch, and those
  rows move as torch's Adam moves them (asserted: such rows exist).
- ``lazy``: a row without a gradient keeps its parameters and moments; a row with one gets exactly the
  exact optimizer's update from the same state.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
from parity import ATOL, package_module, rel_err
from test_architectures import ALL, SPARSITY, family_kwargs, loss_args

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

B, D, F = 8, 12, 48


def fused_architectures(fs):
    return [name for name in ALL if getattr(fs.ARCHITECTURES[name].module, "supports_fused_optimizer", False)]


FUSED = ["topk", "batchtopk", "matryoshka", "jumprelu", "standard", "vanilla", "topk_transcoder",
         "batchtopk_transcoder", "jumprelu_transcoder", "standard_transcoder", "standard_crosscoder",
         "topk_crosscoder", "batchtopk_crosscoder", "jumprelu_crosscoder"]  # fmt: skip
FAST = ["topk", "jumprelu", "standard_crosscoder"]


def test_the_list_is_every_architecture_that_supports_it(fs):
    assert sorted(FUSED) == sorted(fused_architectures(fs))
    assert not fs.ARCHITECTURES["gated"].module.supports_fused_optimizer


def batches(arch, n, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [loss_args(arch, torch.randn(B, D, generator=g).to(device)) for _ in range(n)]


def build(arch, dtype, device, **kwargs):
    """The architecture's module; a standard SAE's on its sparse path from the first step (its default
    starts dense while its code is dense, and that path returns gradients: the fallback's test has it)."""
    sparsity = 4 if arch.sparsity == "k" else SPARSITY[arch.sparsity]
    if arch.sparsity == "l1_coefficient":
        kwargs = {"dense_above": 1.0, "capacity_per_row": F, **kwargs}
    return arch.build(D, F, sparsity, dtype=dtype, device=device, seed=0, **family_kwargs(arch), **kwargs)


def cast_args(args, dtype):
    return tuple(a.to(dtype) for a in args)


class Reference:
    """torch's Adam over the module (or its fp32 master copy), the module's norm steps around it."""

    def __init__(self, sae, options, master=None):
        self.sae, self.master = sae, master
        trained = master or sae
        decoupled = options.pop("decoupled_weight_decay", False)
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        options.setdefault("weight_decay", 0.0)
        self.opt = cls(trained.parameters(), fused=True, **options)

    def __call__(self, args):
        out = self.sae.loss(*args)
        out.loss.backward()
        trained = self.master or self.sae
        if self.master is not None:
            for m, p in zip(self.master.parameters(), self.sae.parameters(), strict=True):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        trained.before_optimizer_step()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        trained.after_optimizer_step()
        if self.master is not None:
            with torch.no_grad():
                for m, p in zip(self.master.parameters(), self.sae.parameters(), strict=True):
                    p.copy_(m)
        return out


class Fused:
    def __init__(self, fs, sae, options):
        self.sae = sae
        self.opt = fs.FusedAdam(sae, **options)
        self.in_backward = 0  # steps whose backward applied the update itself (no gradient came back)

    def __call__(self, args):
        out = self.sae.loss(*args)
        out.loss.backward()
        self.in_backward += self.sae.W_enc.grad is None and self.sae.W_dec.grad is None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out


def train(trainer, data, dtype):
    silent = 0
    for args in data:
        out = trainer(cast_args(args, dtype))
        silent += int((out.fire_counts == 0).sum())
    return silent


OPTIONS = {
    "adam": dict(lr=3e-3),
    "adam_l2": dict(lr=3e-3, weight_decay=0.05),
    "adamw": dict(lr=3e-3, weight_decay=0.1, decoupled_weight_decay=True, betas=(0.8, 0.95)),
}


def assert_same_run(fused, ref, *, rtol, atol, what=""):
    ref_params = dict(ref.sae.named_parameters())
    for name, p in fused.sae.named_parameters():
        torch.testing.assert_close(p, ref_params[name], rtol=rtol, atol=atol, msg=lambda m: f"{what} {name}: {m}")


# every architecture with Adam; the weight-decay variants on one unit-norm and one free decoder
CASES = [(n, "adam") for n in FUSED] + [(n, o) for n in ("topk", "jumprelu") for o in OPTIONS if o != "adam"]


FAST_CASES = [(n, "adam") for n in FAST] + [("topk", "adamw"), ("jumprelu", "adam_l2")]


@pytest.mark.parametrize(
    "name,optimizer", [c if c in FAST_CASES else pytest.param(*c, marks=pytest.mark.slow) for c in CASES], ids=str
)
def test_fused_equals_torch_adam_fp32(fs, name, optimizer):
    """A few steps through the interpreted kernels: parameters and W_dec's moments equal torch's Adam's."""
    arch = fs.ARCHITECTURES[name]
    data = batches(arch, 3, "cpu")
    options = OPTIONS[optimizer]
    fused = Fused(fs, build(arch, torch.float32, "cpu"), dict(options))
    ref = Reference(build(arch, torch.float32, "cpu"), dict(options))
    silent = train(fused, data, torch.float32)
    train(ref, data, torch.float32)
    assert fused.in_backward == len(data)  # the update ran in the backward
    if arch.sparsity == "k":  # some latents fired in no row of a batch: their rows took the zero-gradient update
        assert silent > 0
    assert_same_run(fused, ref, rtol=1e-5, atol=1e-6, what=name)
    mine = fused.opt.state[fused.sae.W_dec]
    theirs = ref.opt.state[ref.sae.W_dec]
    for key in ("exp_avg", "exp_avg_sq"):  # relative to the whole moment (entries near 0 differ by fp32 noise)
        assert rel_err(mine[key], theirs[key]) < 1e-5, key
    assert float(mine["step"]) == float(theirs["step"]) == len(data)


def test_dead_latent_loss_rows_enter_the_update(fs):
    """AuxK's slot rows (dead latents after a short window) are added to the rows' gradients before the
    update, as torch adds them to the gradient."""
    arch = fs.ARCHITECTURES["topk"]
    data = batches(arch, 4, "cpu")
    options = dict(lr=3e-3)
    kw = dict(dead_loss="auxk", dead_window_tokens=B)
    fused = Fused(fs, build(arch, torch.float32, "cpu", **kw), dict(options))
    ref = Reference(build(arch, torch.float32, "cpu", **kw), dict(options))
    train(fused, data, torch.float32)
    train(ref, data, torch.float32)
    assert fused.in_backward == len(data)
    assert bool(fused.sae.dead_mask().any())
    assert_same_run(fused, ref, rtol=1e-5, atol=1e-6, what="auxk")


@pytest.mark.parametrize("name", ["topk", pytest.param("jumprelu", marks=pytest.mark.slow)])
def test_bf16_master_weights_parity(fs, name):
    """bf16 compute with fp32 master weights against the fp32 run, by the parity rule: the fused run is
    no further from it than 2x the reference bf16 run (MasterWeights + torch Adam) is, plus bf16's ATOL."""
    arch = fs.ARCHITECTURES[name]
    data = batches(arch, 3, "cpu")
    options = dict(lr=3e-3)
    truth = Reference(build(arch, torch.float32, "cpu"), dict(options))
    train(truth, data, torch.float32)
    fused = Fused(fs, build(arch, torch.bfloat16, "cpu"), dict(options))
    assert "master" in fused.opt.state[fused.sae.W_dec]
    ref = Reference(build(arch, torch.bfloat16, "cpu"), dict(options), master=build(arch, torch.float32, "cpu"))
    train(fused, data, torch.bfloat16)
    train(ref, data, torch.bfloat16)
    assert_bf16_parity(fused, ref, truth)
    for p in fused.sae.parameters():  # the module is the master's rounding
        torch.testing.assert_close(p, fused.opt.state[p].get("master", p).to(p.dtype), rtol=0, atol=0)


def assert_bf16_parity(fused, ref, truth):
    """Each parameter's trained (master) copy: the fused bf16 run's distance from the fp32 run ``truth`` is at
    most 2x the reference bf16 run's (``MasterWeights`` + torch Adam) plus bf16's ATOL."""
    truth_params = dict(truth.sae.named_parameters())
    ref_params = dict(ref.master.named_parameters())
    for pname, p in fused.sae.named_parameters():
        mine = fused.opt.state[p].get("master", p)
        e_ours, e_ref = rel_err(mine, truth_params[pname]), rel_err(ref_params[pname], truth_params[pname])
        assert e_ours <= 2 * e_ref + ATOL[torch.bfloat16], f"{pname}: {e_ours:.3e} vs reference {e_ref:.3e}"


@pytest.fixture
def torch_path(fs, monkeypatch):
    monkeypatch.setattr(package_module(fs, "_launch"), "CPU_RUNS_TRITON", False)


@pytest.mark.parametrize("name", ["topk", "vanilla", pytest.param("batchtopk", marks=pytest.mark.slow),
                                  pytest.param("jumprelu", marks=pytest.mark.slow)])  # fmt: skip
def test_200_steps_on_the_torch_path(fs, torch_path, name):
    """200 steps (the plain-torch twin of the fused pass): fp32 follows torch's Adam to 1e-4, and bf16 with
    master weights meets the parity rule against the fp32 run."""
    arch = fs.ARCHITECTURES[name]
    data = batches(arch, 200, "cpu")
    options = dict(lr=1e-3)
    fused = Fused(fs, build(arch, torch.float32, "cpu"), dict(options))
    ref = Reference(build(arch, torch.float32, "cpu"), dict(options))
    train(fused, data, torch.float32)
    train(ref, data, torch.float32)
    assert_same_run(fused, ref, rtol=1e-4, atol=1e-5, what=f"{name} fp32, 200 steps")
    fused16 = Fused(fs, build(arch, torch.bfloat16, "cpu"), dict(options))
    ref16 = Reference(build(arch, torch.bfloat16, "cpu"), dict(options), master=build(arch, torch.float32, "cpu"))
    train(fused16, data, torch.bfloat16)
    train(ref16, data, torch.bfloat16)
    assert_bf16_parity(fused16, ref16, ref)


def test_lazy_updates_only_rows_with_a_gradient(fs):
    """From the same state, lazy and exact give the same rows where the step has a gradient; elsewhere
    lazy leaves parameters and moments untouched while exact moves them by their momentum."""
    arch = fs.ARCHITECTURES["topk"]
    data = batches(arch, 2, "cpu")
    exact = Fused(fs, build(arch, torch.float32, "cpu"), dict(lr=3e-3))
    lazy = Fused(fs, build(arch, torch.float32, "cpu"), dict(lr=3e-3, lazy=True))
    train(exact, data[:1], torch.float32)
    train(lazy, data[:1], torch.float32)  # from zero moments a silent row does not move (but for the
    assert_same_run(lazy, exact, rtol=1e-6, atol=1e-7, what="after one step")  # renormalisation's last bit)
    before = copy.deepcopy({n: p.detach() for n, p in lazy.sae.named_parameters()})
    moments = {n: lazy.opt.state[p]["exp_avg"].clone() for n, p in lazy.sae.named_parameters()}
    out = exact(data[1])
    lazy(data[1])
    touched = out.fire_counts > 0
    assert bool(touched.any()) and bool((~touched).any())
    for n in ("W_enc", "W_dec"):
        p_lazy, p_exact = getattr(lazy.sae, n), getattr(exact.sae, n)
        torch.testing.assert_close(p_lazy[touched], p_exact[touched], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(p_lazy[~touched], before[n][~touched], rtol=0, atol=0)
        torch.testing.assert_close(lazy.opt.state[p_lazy]["exp_avg"][~touched], moments[n][~touched], rtol=0, atol=0)
        moved = exact.opt.state[p_exact]["exp_avg"][~touched] != moments[n][~touched]
        assert bool(moved.any())  # exact Adam decays the silent rows' moments


def test_resume_continues_bit_for_bit(fs):
    arch = fs.ARCHITECTURES["topk"]
    data = batches(arch, 4, "cpu")
    run = Fused(fs, build(arch, torch.bfloat16, "cpu"), dict(lr=3e-3))
    train(run, data[:2], torch.bfloat16)
    saved_module = copy.deepcopy(run.sae.state_dict())
    saved_opt = copy.deepcopy(run.opt.state_dict())
    train(run, data[2:], torch.bfloat16)
    resumed = Fused(fs, build(arch, torch.bfloat16, "cpu"), dict(lr=1.0))  # the lr comes from the checkpoint
    resumed.sae.load_state_dict(saved_module)
    resumed.opt.load_state_dict(saved_opt)
    train(resumed, data[2:], torch.bfloat16)
    assert_same_run(resumed, run, rtol=0, atol=0, what="resumed")
    for p, q in zip(resumed.sae.parameters(), run.sae.parameters(), strict=True):
        for key, t in resumed.opt.state[p].items():
            assert torch.equal(t, run.opt.state[q][key]), key


def test_resampling_resets_moments_and_masters(fs):
    arch = fs.ARCHITECTURES["topk"]
    sae = build(arch, torch.bfloat16, "cpu", dead_window_tokens=B)
    run = Fused(fs, sae, dict(lr=3e-3))
    train(run, batches(arch, 3, "cpu"), torch.bfloat16)
    dead = sae.dead_mask().clone()
    assert bool(dead.any())
    sae.resample_dead_(torch.randn(32, D).to(torch.bfloat16), run.opt)
    state = run.opt.state[sae.W_dec]
    assert torch.equal(state["master"][dead], sae.W_dec[dead].float())
    assert not bool(state["exp_avg"][dead].any()) and not bool(state["exp_avg_sq"][dead].any())


def test_a_dense_standard_step_falls_back_to_the_same_update(fs):
    """A standard SAE at its defaults trains on its dense path while its code is dense: that step's backward
    returns W_enc's and W_dec's gradients, and step() applies the same update from them."""
    arch = fs.ARCHITECTURES["standard"]
    data = batches(arch, 3, "cpu")
    sparsity = SPARSITY[arch.sparsity]
    fused_sae, ref_sae = (arch.build(D, F, sparsity, seed=0) for _ in range(2))
    fused = Fused(fs, fused_sae, dict(lr=3e-3))
    ref = Reference(ref_sae, dict(lr=3e-3))
    train(fused, data, torch.float32)
    train(ref, data, torch.float32)
    assert fused.in_backward == 0 and fused_sae.last_path == "dense"
    assert_same_run(fused, ref, rtol=1e-5, atol=1e-6, what="dense standard")


def test_a_dense_step_falls_back_to_the_same_update(fs):
    """A step whose backward returns W_enc's and W_dec's gradients (here the module's forward: its encode
    and decode ops) gets the same update from them."""
    arch = fs.ARCHITECTURES["topk"]
    x = batches(arch, 1, "cpu")[0][0]
    fused_sae, ref_sae = build(arch, torch.float32, "cpu"), build(arch, torch.float32, "cpu")
    fused = Fused(fs, fused_sae, dict(lr=3e-3))
    ref = Reference(ref_sae, dict(lr=3e-3))
    for sae, step in ((fused_sae, fused.opt.step), (ref_sae, None)):
        (sae(x) - x).pow(2).mean().backward()  # the forward's decode and encode ops: no fused pass
        if step is None:
            ref_sae.before_optimizer_step()
            ref.opt.step()
            ref_sae.after_optimizer_step()
        else:
            step()
    assert_same_run(fused, ref, rtol=1e-5, atol=1e-6, what="dense fallback")


def test_bad_input(fs):
    sae = fs.SparseAutoencoder(D, F, 4, seed=0)
    with pytest.raises(ValueError, match="module"):
        fs.FusedAdam(fs.GatedSparseAutoencoder(D, F, seed=0))
    with pytest.raises(ValueError, match="module"):
        fs.FusedAdam(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match="module"):
        fs.FusedAdam(fs.TopKCrossLayerTranscoder(D, F, 4, n_layers=2))
    with pytest.raises(ValueError, match="lr"):
        fs.FusedAdam(sae, lr=torch.tensor(1e-3, dtype=torch.float64))
    with pytest.raises(ValueError, match="lr"):
        fs.FusedAdam(sae, lr=torch.tensor([1e-3]))
    with pytest.raises(ValueError, match="lr"):
        fs.FusedAdam(sae, lr=torch.tensor(1e-3, device="meta"))
    with pytest.raises(ValueError, match="lr"):
        fs.FusedAdam(sae, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        fs.FusedAdam(sae, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps"):
        fs.FusedAdam(sae, eps=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        fs.FusedAdam(sae, weight_decay=-0.1)
    with pytest.raises(ValueError, match="lazy"):
        fs.FusedAdam(sae, lazy=1)
    opt = fs.FusedAdam(sae)
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict({"state": {}})
    other = fs.FusedAdam(fs.SparseAutoencoder(D, F + 1, 4, seed=0))
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict(other.state_dict())


def test_a_gradient_beside_the_fused_update_is_an_error(fs):
    """A term outside the step that reaches W_dec (the fused pass has already applied the step's update)."""
    sae = fs.SparseAutoencoder(D, F, 4, seed=0)
    opt = fs.FusedAdam(sae)
    x = torch.randn(B, D)
    (sae.loss(x).loss + sae.W_dec.pow(2).sum()).backward()
    with pytest.raises(RuntimeError, match="W_dec"):
        opt.step()


def test_release_returns_gradients_again(fs):
    sae = fs.SparseAutoencoder(D, F, 4, seed=0)
    opt = fs.FusedAdam(sae)
    sae.loss(torch.randn(B, D)).loss.backward()
    assert sae.W_dec.grad is None and sae.W_enc.grad is None and sae.b_dec.grad is not None
    opt.release()
    sae.zero_grad(set_to_none=True)
    sae.loss(torch.randn(B, D)).loss.backward()
    assert sae.W_dec.grad is not None and sae.W_enc.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("lazy", [False, True])
def test_captured_iteration_equals_eager(fs, lazy):
    """The whole fused iteration (bf16, master weights) under graph_training_step gives the eager run's weights."""
    data = [torch.randn(256, 64, generator=torch.Generator().manual_seed(i)).cuda().bfloat16() for i in range(4)]
    runs = []
    for graphed in (False, True):
        sae = fs.SparseAutoencoder(64, 512, 8, dtype=torch.bfloat16, device="cuda", seed=0, dead_loss="auxk")
        opt = fs.FusedAdam(sae, lr=torch.tensor(1e-3, device="cuda"), lazy=lazy)

        def step(x, sae=sae, opt=opt):
            out = sae.loss(x)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out

        run = fs.graph_training_step(step, data[0], [sae], [opt]) if graphed else step
        for x in data:
            run(x)
        runs.append(sae)
    for p, q in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def start_reference_from(ref, fused):
    """Put the fused run's parameters, moments and step count into the reference (fp32, no masters), so the
    next step of both starts from the same state."""
    ref_params = dict(ref.sae.named_parameters())
    with torch.no_grad():
        for name, p in fused.sae.named_parameters():
            q = ref_params[name]
            q.copy_(p)
            mine, theirs = fused.opt.state[p], ref.opt.state.get(q)
            if theirs:  # torch's Adam creates its state in its first step
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    theirs[key].copy_(mine[key])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU kernels")
@pytest.mark.parametrize("name", FUSED)
def test_fused_equals_torch_adam_on_the_gpu(fs, name):
    """20 steps on the GPU kernels (D past one 512-column block, the decoder's whole-row programs), fp32,
    each step of the reference started from the fused run's state. Run freely, two fp32 runs that differ by
    an ulp per step part for good on the threshold architectures once a pre-activation within an ulp of
    its threshold fires in one run and not in the other (a whole row then moves by about lr); so each step
    is compared from a common state, along the fused run's trajectory."""
    arch = fs.ARCHITECTURES[name]
    g = torch.Generator().manual_seed(3)
    data = [loss_args(arch, torch.randn(64, 600, generator=g).cuda()) for _ in range(20)]
    sparsity = 8 if arch.sparsity == "k" else SPARSITY[arch.sparsity]
    sparse = {"dense_above": 1.0, "capacity_per_row": 512} if arch.sparsity == "l1_coefficient" else {}
    fused_sae, ref_sae = (arch.build(600, 512, sparsity, dtype=torch.float32, device="cuda", seed=0,
                                     **family_kwargs(arch), **sparse) for _ in range(2))  # fmt: skip
    fused = Fused(fs, fused_sae, dict(lr=1e-3))
    ref = Reference(ref_sae, dict(lr=1e-3))
    for i, args in enumerate(data):
        start_reference_from(ref, fused)
        train(fused, [args], torch.float32)
        train(ref, [args], torch.float32)
        assert_same_run(fused, ref, rtol=1e-5, atol=1e-7, what=f"{name} on the GPU, step {i + 1}")
    assert fused.in_backward == len(data)
