"""``graph_training_step``: a whole training step (the module's loss with AuxK and dead counts, backward,
the decoder-norm steps, Adam with a scheduled learning rate) captured in one CUDA graph gives the eager
loop's losses, parameters, dead counts and optimizer state, step after step; the capture's warm-up
leaves the state it was given. GPU for the graph; on a CPU the helper returns the step unchanged."""

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def make(fs, device, dtype):
    sae = fs.SparseAutoencoder(
        96, 512, 8, dtype=dtype, device=device, seed=1, dead_loss="auxk", dead_window_tokens=128
    )  # fmt: skip
    opt = torch.optim.Adam(sae.parameters(), lr=torch.tensor(1e-3, device=device), capturable=True)
    return sae, opt


def train_step(sae, opt, x):
    out = sae.loss(x)
    out.loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.set_decoder_norm_to_unit_norm()
    return out.loss.detach(), out.fire_counts


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_loop_matches_the_eager_loop(fs, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(64, 96, device="cuda", generator=g).to(dtype) for _ in range(8)]
    lrs = [1e-3 * (i + 1) / 8 for i in range(8)]  # a schedule, set in place between steps

    eager, opt_e = make(fs, "cuda", dtype)
    losses_e = []
    for x, lr in zip(xs, lrs):
        opt_e.param_groups[0]["lr"].fill_(lr)
        losses_e.append(train_step(eager, opt_e, x)[0].clone())

    graphed, opt_g = make(fs, "cuda", dtype)
    init = {k: v.clone() for k, v in graphed.state_dict().items()}
    step = fs.graph_training_step(lambda x: train_step(graphed, opt_g, x), xs[0], graphed, opt_g)
    for k, v in graphed.state_dict().items():  # the warm-up and capture steps were undone
        assert torch.equal(v, init[k]), k
    losses_g = []
    for x, lr in zip(xs, lrs):
        opt_g.param_groups[0]["lr"].fill_(lr)
        losses_g.append(step(x)[0].clone())

    torch.testing.assert_close(torch.stack(losses_g), torch.stack(losses_e), rtol=1e-5, atol=1e-6)
    for (k, a), b in zip(graphed.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5, msg=k)
    assert torch.equal(graphed.tokens_since_fired, eager.tokens_since_fired)
    for pa, pb in zip(graphed.parameters(), eager.parameters()):
        sa, sb = opt_g.state[pa], opt_e.state[pb]
        assert sa["step"].item() == sb["step"].item() == 8
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-4, atol=1e-12)


@pytest.mark.gpu
@cuda
def test_bad_input_on_the_gpu(fs):
    sae = fs.SparseAutoencoder(96, 512, 8, device="cuda", seed=1)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)  # capturable=False
    x = torch.randn(64, 96, device="cuda")
    with pytest.raises(ValueError, match="capturable"):
        fs.graph_training_step(lambda x: train_step(sae, opt, x), x, sae, opt)
    sgd = torch.optim.SGD(sae.parameters(), lr=1e-3, momentum=0.9)
    with pytest.raises(ValueError, match="only Adam and AdamW"):
        fs.graph_training_step(lambda x: train_step(sae, sgd, x), x, sae, sgd)
    sae, opt = make(fs, "cuda", torch.float32)
    step = fs.graph_training_step(lambda x: train_step(sae, opt, x), x, sae, opt)
    with pytest.raises(ValueError, match="x must be"):
        step(x[:32])


@pytest.mark.kernels_ci
def test_off_cuda_the_step_is_returned_and_bad_arguments_raise(fs):
    sae, opt = make(fs, "cpu", torch.float32)

    def f(x):
        return train_step(sae, opt, x)

    x = torch.randn(16, 96)
    assert fs.graph_training_step(f, x, sae, opt) is f
    for bad, match in (({"warmup": 0}, "warmup"), ({"warmup": True}, "warmup")):
        with pytest.raises(ValueError, match=match):
            fs.graph_training_step(f, x, sae, opt, **bad)
    with pytest.raises(ValueError, match="example"):
        fs.graph_training_step(f, x.tolist(), sae, opt)
    with pytest.raises(ValueError, match="step"):
        fs.graph_training_step(None, x, sae, opt)
