"""``FusedAdam``: Adam or AdamW applied to the weight rows inside the backward that computes their gradients.

A training iteration is the step, then the optimizer and the decoder-norm steps over the [F, D]
weights. Every row of ``W_enc`` and ``W_dec`` is already owned by one program of the backward's
segmented pass, which holds the row's gradient in registers; ``FusedAdam`` has that program apply
the update (``primitives/row_update.py``): no [F, D] gradient is written or read, and with mixed
precision the fp32 master row, both moments and the compute-dtype row are each read and written once.
"""

import math

import torch
from torch.optim.adam import adam as torch_adam

from ._validation import is_real
from .modules.base import SAEBase, UnitNormDecoder
from .primitives.row_update import RowUpdate, adam_rows_torch, claim, release, take_uses
from .primitives.row_update import claimed as claimed_update

ROW_WEIGHTS = ("W_enc", "W_dec")


class FusedAdam(torch.optim.Optimizer):
    """Adam (or AdamW) for a flash-sae module, fused into its backward for ``W_enc`` and ``W_dec``.

    Use it as torch's Adam, one ``loss.backward()`` per ``step()``::

        opt = flash_sae.FusedAdam(sae, lr=torch.tensor(3e-4, device="cuda"))
        out = sae.loss(x)
        out.loss.backward()      # W_enc and W_dec are updated here; their .grad stays None
        opt.step()               # the other parameters (biases, thresholds), then the step count
        opt.zero_grad()

    Each row of ``W_enc`` and ``W_dec`` gets exactly ``torch.optim.Adam`` (``decoupled_weight_decay``:
    ``AdamW``) on its gradient, in fp32 (bias correction, weight decay), with the module's decoder-norm
    steps around it where the module keeps unit-norm decoder rows (``UnitNormDecoder``: the gradient's
    component along the row is removed before, the row rescaled to unit norm after). A row with no
    gradient in a step moves as torch's Adam moves it (the moments decay; the row moves by its
    momentum). The other parameters go through torch's own Adam (fused on CUDA), then the module's
    ``after_optimizer_step`` (a JumpReLU threshold's clamp).

    Args:
        module: a flash-sae module whose step computes both weights' gradients in one segmented pass each
            (``supports_fused_optimizer``: the TopK, BatchTopK, Matryoshka, JumpReLU and standard SAEs, their
            transcoders and crosscoders; not the Gated SAE or the cross-layer transcoders).
        lr: a number > 0, or a 0-d fp32 tensor on the module's device that a schedule sets in place
            (``opt.param_groups[0]["lr"].fill_(value)``), so a captured CUDA graph needs no recapture.
        betas, eps, weight_decay: Adam's.
        decoupled_weight_decay: AdamW's weight decay (``p *= 1 - lr * weight_decay``) instead of Adam's
            (``g += weight_decay * p``).
        master_weights: keep an fp32 copy of every parameter not in fp32 and update it (the module's
            parameters are then its rounding); default True for a bf16 or fp16 module. Without it a
            low-precision parameter is updated in fp32 and rounded each step (updates below the
            parameter's resolution are lost).
        lazy: update only the rows of ``W_enc`` and ``W_dec`` that received a gradient in the step
            (``torch.optim.SparseAdam``'s semantics: a row's moments advance only on the steps that give
            it a gradient, the bias correction follows the global step count, and a silent row does not
            move by its momentum or decay). It touches a fraction of the optimizer state per step; its
            trajectory differs from Adam's.

    The state (``state[p]``: ``exp_avg``, ``exp_avg_sq``, ``step`` and ``master`` where kept) lives on
    the module's device and is created here, so the optimizer is ready for ``graph_training_step``.
    ``state_dict`` / ``load_state_dict`` round-trip it in place (a resumed run continues bit for bit).
    ``module.resample_dead_(x, opt)`` resets the resampled rows' moments and masters.

    Not supported: gradient accumulation (each backward applies one update), ``torch.compile`` of the
    backward, other optimizers (use torch's with the module's own gradients: ``before_optimizer_step``,
    ``after_optimizer_step``).
    """

    applies_module_steps = True  # a trainer does not call the module's before/after optimizer steps

    def __init__(
        self,
        module: SAEBase,
        lr=1e-3,
        *,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        master_weights: bool | None = None,
        lazy: bool = False,
    ):
        _check_module(module)
        device = module.W_dec.device
        lr = _lr_tensor(lr, device)
        betas = _check_options(betas, eps, weight_decay)
        for name, flag in (("decoupled_weight_decay", decoupled_weight_decay), ("lazy", lazy)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        if master_weights is None:
            master_weights = module.W_dec.dtype != torch.float32
        if not isinstance(master_weights, bool):
            raise ValueError(f"master_weights must be a bool or None, got {master_weights!r}")
        defaults = dict(lr=lr, betas=betas, eps=float(eps), weight_decay=float(weight_decay),
                        decoupled_weight_decay=decoupled_weight_decay, lazy=lazy, capturable=True)  # fmt: skip
        super().__init__(list(module.parameters()), defaults)
        self.module = module
        self.unit_norm = isinstance(module, UnitNormDecoder)
        self._row_step = torch.zeros((), dtype=torch.float32, device=device)
        self._names = dict(module.named_parameters())
        for name, p in self._names.items():
            state = self.state[p]
            state["step"] = (
                self._row_step if name in ROW_WEIGHTS else torch.zeros((), dtype=torch.float32, device=device)
            )
            if master_weights and p.dtype != torch.float32:
                state["master"] = p.detach().float().clone()
            # fp32 moments for the fused rows; the others' in the dtype torch's Adam updates them in
            moments = torch.float32 if name in ROW_WEIGHTS else state.get("master", p).dtype
            state["exp_avg"] = torch.zeros(p.shape, dtype=moments, device=device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=moments, device=device)
        self._claim()

    def _claim(self) -> None:
        group = self.param_groups[0]
        for name in ROW_WEIGHTS:
            p = self._names[name]
            state = self.state[p]
            update = RowUpdate(
                master=state.get("master"), exp_avg=state["exp_avg"], exp_avg_sq=state["exp_avg_sq"], lr=group["lr"],
                step=state["step"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                decoupled=group["decoupled_weight_decay"], unit_norm=self.unit_norm and name == "W_dec",
                lazy=group["lazy"],
            )  # fmt: skip
            claim(p, update)

    def release(self) -> None:
        """Ends the fusion: the module's backward returns W_enc's and W_dec's gradients again."""
        for name in ROW_WEIGHTS:
            release(self._names[name])

    def __del__(self):
        names = getattr(self, "_names", None)
        if names and ROW_WEIGHTS is not None and release is not None:  # at exit, the globals may be gone
            for name in ROW_WEIGHTS:
                release(names[name])

    @torch.no_grad()
    def step(self, closure=None):
        """The other parameters' Adam, the module's after-step, and the step count; no host sync."""
        if closure is not None:
            raise ValueError("closure: FusedAdam updates W_enc and W_dec in the backward; call loss.backward() first")
        group = self.param_groups[0]
        for name in ROW_WEIGHTS:
            self._rows_from_gradient(name)
        small = [(n, p) for n, p in self._names.items() if n not in ROW_WEIGHTS and p.grad is not None]
        if small:
            trained = [self.state[p].get("master", p) for _, p in small]
            grads = [p.grad.float() if "master" in self.state[p] else p.grad for _, p in small]
            beta1, beta2 = group["betas"]
            cuda = trained[0].is_cuda  # torch's fused Adam there; its single-tensor loop on the CPU
            torch_adam(
                trained, grads, [self.state[p]["exp_avg"] for _, p in small],
                [self.state[p]["exp_avg_sq"] for _, p in small], [], [self.state[p]["step"] for _, p in small],
                foreach=False, capturable=cuda, fused=cuda, decoupled_weight_decay=group["decoupled_weight_decay"],
                amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                eps=group["eps"], maximize=False,
            )  # fmt: skip
            for (_, p), t in zip(small, trained, strict=True):
                if t is not p:
                    p.copy_(t)
        if not self.unit_norm:  # a unit-norm decoder's after-step is the renormalisation, done in the pass
            self.module.after_optimizer_step()
        self._row_step.add_(1)

    def _rows_from_gradient(self, name: str) -> None:
        """A row weight's update where the backward returned its gradient instead of applying it (a step
        without a fused pass: the dense path of a standard SAE whose code is still dense): the same
        update, in torch ops. A gradient beside a fused update, or several fused updates, is an error."""
        p = self._names[name]
        uses = take_uses(p)
        if uses > 1 or (uses and p.grad is not None):
            raise RuntimeError(
                f"{name} got {uses} fused updates{' and a gradient' if p.grad is not None else ''} since the last "
                "step(): FusedAdam takes one backward of the module's loss per step(), with no other term "
                f"reaching {name} (no gradient accumulation); use torch's Adam for that"
            )
        if p.grad is None:
            return
        update = claimed_update(p)
        take_uses(p)
        grad = p.grad.float()
        adam_rows_torch(grad, p, update, touched=(grad != 0).any(1))
        p.grad = None

    def state_dict(self) -> dict:
        """{"state": {parameter name: {key: tensor}}, "lr": 0-d tensor, "options": {...}}: every tensor the
        optimizer holds (CPU copies are the caller's to make)."""
        group = self.param_groups[0]
        options = {k: group[k] for k in ("betas", "eps", "weight_decay", "decoupled_weight_decay", "lazy")}
        state = {name: dict(self.state[p]) for name, p in self._names.items()}
        return {"state": state, "lr": group["lr"], "options": options}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Copies ``state_dict`` (``state_dict()``'s layout) into this optimizer's tensors, in place."""
        if not isinstance(state_dict, dict) or not {"state", "lr"} <= set(state_dict):
            raise ValueError("state_dict must be a FusedAdam state_dict (keys 'state', 'lr', 'options')")
        saved = state_dict["state"]
        if set(saved) != set(self._names):
            raise ValueError(f"state_dict holds parameters {sorted(saved)}, this optimizer {sorted(self._names)}")
        for name, p in self._names.items():
            mine = self.state[p]
            if set(saved[name]) != set(mine):
                raise ValueError(
                    f"state_dict['state'][{name!r}] has keys {sorted(saved[name])}, expected {sorted(mine)}"
                )
            for key, t in mine.items():
                if tuple(saved[name][key].shape) != tuple(t.shape):
                    raise ValueError(
                        f"state_dict['state'][{name!r}][{key!r}] has shape {tuple(saved[name][key].shape)}"
                    )
                t.copy_(saved[name][key])
        self.param_groups[0]["lr"].copy_(state_dict["lr"])


def _check_module(module) -> None:
    if not isinstance(module, SAEBase) or not getattr(module, "supports_fused_optimizer", False):
        raise ValueError(
            f"module must be a flash-sae module whose step supports the fused optimizer (supports_fused_optimizer), "
            f"got {type(module).__name__}; train it with torch.optim.Adam"
        )
    before = type(module).before_optimizer_step
    if before not in (SAEBase.before_optimizer_step, UnitNormDecoder.before_optimizer_step):
        raise ValueError(
            f"module: {type(module).__name__} has its own before_optimizer_step, which FusedAdam cannot fuse"
        )


def _lr_tensor(lr, device) -> torch.Tensor:
    if isinstance(lr, torch.Tensor):
        if lr.ndim != 0 or lr.dtype != torch.float32 or lr.device != device:
            raise ValueError(
                f"lr must be a number or a 0-d float32 tensor on the module's device {device}, got a "
                f"{tuple(lr.shape)} {lr.dtype} tensor on {lr.device}"
            )
        return lr
    if not is_real(lr) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0 or a 0-d float32 tensor, got {lr!r}")
    return torch.tensor(float(lr), dtype=torch.float32, device=device)


def _check_options(betas, eps, weight_decay) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(is_real(b) and 0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not is_real(eps) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if not is_real(weight_decay) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    return float(betas[0]), float(betas[1])
