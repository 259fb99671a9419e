"""Knowledge distillation: logits (Hinton et al., 2015) and intermediate features (FitNets, Romero et al.,
2015), trained through :class:`core.training.Trainer` (SPEC 2.6, technique 6).

Loss = ``alpha * CE(student, y) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))``
``+ beta * sum MSE(adapter(student feature), teacher feature)``, where each adapter is a learned 1x1
conv (or linear) mapping the student's feature width onto the teacher's (trained with the student,
then dropped). Example::

    student = distill(student, teacher, train_ds, val=val_ds, epochs=3,
                      feature_pairs={"layer4": "layer4"}, example_input=torch.randn(1, 3, 64, 64))
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DistillationModel", "distill", "distillation_loss"]


def _capture(model: nn.Module, names: list[str], store: dict[str, torch.Tensor]) -> list[Any]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no module named {missing[0]!r} in {type(model).__name__} (feature_pairs)")

    def hook(name: str) -> Any:
        def fn(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            store[name] = out

        return fn

    return [modules[n].register_forward_hook(hook(n)) for n in names]


def _adapter(s: torch.Tensor, t: torch.Tensor) -> nn.Module:
    if s.shape[2:] != t.shape[2:] or (s.ndim not in (2, 4)):
        raise ValueError(
            f"student feature {tuple(s.shape)} and teacher feature {tuple(t.shape)} need equal spatial sizes"
        )
    if s.ndim == 4:
        return nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False)
    return nn.Linear(s.shape[1], t.shape[1], bias=False)


class DistillationModel(nn.Module):
    """Student + frozen teacher + feature adapters; ``forward`` returns the student's logits."""

    def __init__(
        self, student: nn.Module, teacher: nn.Module, *, feature_pairs: Mapping[str, str], example_input: torch.Tensor
    ) -> None:
        super().__init__()
        self.student = student
        teacher = copy.deepcopy(teacher).eval().requires_grad_(False)  # frozen copy: the caller's model is untouched
        self.teacher = [teacher]  # a list: not a sub-module, so neither trained nor saved with the student
        self.pairs = dict(feature_pairs)
        self._s: dict[str, torch.Tensor] = {}
        self._t: dict[str, torch.Tensor] = {}
        self._handles = _capture(student, list(self.pairs), self._s) + _capture(
            teacher, list(self.pairs.values()), self._t
        )
        with torch.no_grad():
            was = student.training
            student.eval()
            student(example_input)
            teacher(example_input)
            student.train(was)
        self.adapters = nn.ModuleDict(
            {s.replace(".", "_"): _adapter(self._s[s], self._t[t]) for s, t in self.pairs.items()}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def close(self) -> None:
        """Removes the feature hooks from the student and the teacher."""
        for h in self._handles:
            h.remove()

    def losses(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(student logits, teacher logits, summed feature MSE)."""
        student_logits = self.student(x)
        if next(self.teacher[0].parameters()).device != x.device:  # the Trainer moved only the student
            self.teacher[0].to(x.device)
        with torch.no_grad():
            teacher_logits = self.teacher[0](x)
        feat = student_logits.new_zeros(())
        for s, t in self.pairs.items():
            feat = feat + F.mse_loss(self.adapters[s.replace(".", "_")](self._s[s]), self._t[t].detach())
        return student_logits, teacher_logits, feat


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton's loss: hard-label cross-entropy blended with the T^2-scaled KL to the teacher's soft labels."""
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, -1),
        F.softmax(teacher_logits / temperature, -1),
        reduction="batchmean",
    )
    return alpha * F.cross_entropy(student_logits, targets) + (1 - alpha) * temperature**2 * soft


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_data: Any,
    *,
    example_input: torch.Tensor,
    val: Any = None,
    feature_pairs: Mapping[str, str] | None = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
    beta: float = 1.0,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 1e-3,
    **trainer_kwargs: Any,
) -> nn.Module:
    """Trains ``student`` (in place) to match ``teacher`` on ``(inputs, targets)`` data; returns it.

    Args:
        feature_pairs: ``{student module name: teacher module name}`` whose outputs are matched (optional).
        temperature, alpha, beta: see the module docstring.
        trainer_kwargs: passed to :class:`core.training.Trainer` (``precision``, ``checkpoint_dir``...).
    """
    from core.training import Trainer

    if temperature <= 0 or not 0 <= alpha <= 1 or beta < 0:
        raise ValueError(f"need temperature > 0, 0 <= alpha <= 1, beta >= 0; got {temperature}, {alpha}, {beta}")
    wrapper = DistillationModel(
        student.train(), teacher, feature_pairs=feature_pairs or {}, example_input=example_input
    )

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch[0], batch[1]
        s, t, feat = model.losses(x)  # type: ignore[operator]
        return distillation_loss(s, t, y, temperature=temperature, alpha=alpha) + beta * feat

    trainer_kwargs.setdefault("progress", False)
    try:
        Trainer(wrapper, loss_fn=loss_fn, lr=lr, **trainer_kwargs).train(
            train_data, val=val, epochs=epochs, batch_size=batch_size
        )
    finally:
        wrapper.close()
    return student.to(memory_format=torch.contiguous_format)  # the Trainer may have left it channels-last
