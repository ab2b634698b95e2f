"""``DeadLatentLoss``: the options of the dead-latent loss a TopK or BatchTopK step can add.

A step given ``dead_loss=DeadLatentLoss(mask)`` adds AuxK (Gao et al. 2024) or ghost grads on the
latents ``mask`` marks dead; the formulas are in ``ops/_dead.py`` and the user guide's dead-latents
page. A module takes the same object without a mask (``dead_loss=DeadLatentLoss(kind="ghost")``, or
just ``"auxk"`` / ``"ghost"``) and fills in its own dead set at every training step.
"""

import dataclasses

import torch

from ._validation import (
    check_int,
    check_same_device,
    check_shape,
    check_tensor,
    default_dead_capacity,
    default_k_aux,
    is_int,
    is_real,
)

KINDS = ("auxk", "ghost")


@dataclasses.dataclass(frozen=True)
class DeadLatentLoss:
    """A dead-latent loss and its options.

    Args:
        mask: [F] bool, the latents counted dead (a module's ``dead_mask()``); a step needs it, a
            module fills it in.
        kind: ``"auxk"`` (Gao et al. 2024) or ``"ghost"`` (ghost grads, Anthropic's January 2024 update).
        k_aux: AuxK's dead latents per row (default D // 2, the trainers' heuristic, at most F).
        coef: the step's loss is ``mse + coef * aux_loss`` (default 1/32 for AuxK, the paper's alpha;
            1.0 for ghost grads). SAELens's ``aux_loss_coefficient`` is 1.0.
        relu: AuxK activates the dead pre-activations with a ReLU (the paper, sparsify); False uses
            them as they are (SAELens).
        encoder_grad: False stops the auxiliary gradient at the code, so only W_dec learns from it
            (what sparsify's encoder backward does).
        capacity: slots of the dead set (default 2 * k_aux, at most F); its cost is
            O(B * capacity * D) on the tensor cores. With more dead latents than slots, the step
            takes the first ``capacity`` from ``offset`` on (cyclically).
        offset: where the dead set starts (an int or a 0-d int64 device tensor; default 0). The
            modules slide it past each step's window, so every dead latent gets its turn.
    """

    mask: torch.Tensor | None = None
    kind: str = "auxk"
    k_aux: int | None = None
    coef: float | None = None
    relu: bool = True
    encoder_grad: bool = True
    capacity: int | None = None
    offset: torch.Tensor | int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"dead_loss.kind must be 'auxk' or 'ghost', got {self.kind!r}")
        for name in ("k_aux", "capacity"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"dead_loss.{name} must be a positive int or None, got {value!r}")
        if self.coef is not None and (not is_real(self.coef) or not self.coef >= 0):
            raise ValueError(f"dead_loss.coef must be a number >= 0 or None, got {self.coef!r}")
        for name in ("relu", "encoder_grad"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"dead_loss.{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def of(cls, value) -> "DeadLatentLoss | None":
        """None, a kind name (``"auxk"``, ``"ghost"``) or a ``DeadLatentLoss``, as a ``DeadLatentLoss`` or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(kind=value)
        raise ValueError(f"dead_loss must be None, 'auxk', 'ghost' or a DeadLatentLoss, got {value!r}")

    def with_defaults(self, d_model: int, n_features: int) -> "DeadLatentLoss":
        """This loss with ``k_aux``, ``coef`` and ``capacity`` filled in for an [F, D] dictionary."""
        k_aux = int(self.k_aux) if self.k_aux is not None else default_k_aux(d_model, n_features)
        coef = float(self.coef) if self.coef is not None else (1 / 32 if self.kind == "auxk" else 1.0)
        capacity = int(self.capacity) if self.capacity is not None else default_dead_capacity(n_features, k_aux)
        return dataclasses.replace(self, k_aux=k_aux, coef=coef, capacity=capacity)

    def checked(self, x: torch.Tensor, n_features: int) -> "DeadLatentLoss":
        """This loss validated for a step on ``x`` [B, D] with F = ``n_features`` latents, defaults
        filled in and ``offset`` a 0-d int64 tensor on x's device; a ValueError names what is wrong."""
        F = n_features
        if self.mask is None:
            raise ValueError("dead_loss.mask must be the [F] bool dead set (a module's dead_mask()), got None")
        check_tensor("dead_loss.mask", self.mask, 1, (torch.bool,))
        check_shape("dead_loss.mask", self.mask, (F,))
        check_same_device(x=x, **{"dead_loss.mask": self.mask})
        offset = self.offset
        if offset is None:
            offset = torch.zeros((), dtype=torch.int64, device=x.device)
        elif is_int(offset):
            check_int("dead_loss.offset", offset, 0, F - 1, integral=True)
            offset = torch.tensor(int(offset), dtype=torch.int64, device=x.device)
        else:
            check_tensor("dead_loss.offset", offset, 0, (torch.int64,))
            check_same_device(x=x, **{"dead_loss.offset": offset})
        full = self.with_defaults(x.shape[1], F)
        check_int("dead_loss.k_aux", full.k_aux, 1, F, integral=True)
        check_int("dead_loss.capacity", full.capacity, full.k_aux if self.kind == "auxk" else 1, F, integral=True)
        return dataclasses.replace(full, mask=self.mask.contiguous(), offset=offset)
