"""Low-rank (truncated SVD) factorisation of Linear and Conv layers (SPEC 2.6, technique 7).

``Linear(in, out)`` becomes ``Linear(in, r, bias=False) -> Linear(r, out)`` and a ``k x k`` convolution
becomes ``Conv(in, r, k x k) -> Conv(r, out, 1 x 1)`` (the spatial-then-channel scheme of Jaderberg et
al., 2014, on the ``(out, in*k*k)`` weight matrix). Each factor gets ``sqrt(S)``. The rank keeps
``energy`` of the squared singular values, capped by ``max_rank_ratio`` of the full rank; a layer is
only replaced when that saves at least ``min_saving`` of its weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["LowRankSettings", "factorize"]


@dataclass(frozen=True)
class LowRankSettings:
    energy: float = 0.9
    max_rank_ratio: float = 0.5
    min_saving: float = 0.2
    min_features: int = 32  # layers narrower than this are left alone

    def __post_init__(self) -> None:
        if not (0 < self.energy <= 1 and 0 < self.max_rank_ratio <= 1 and 0 <= self.min_saving < 1):
            raise ValueError(f"need 0 < energy <= 1, 0 < max_rank_ratio <= 1, 0 <= min_saving < 1; got {self}")


def _rank(s: torch.Tensor, cfg: LowRankSettings) -> int:
    energy = (s**2).cumsum(0) / (s**2).sum().clamp_min(1e-12)
    r = int((energy < cfg.energy).sum()) + 1
    return max(1, min(r, int(cfg.max_rank_ratio * s.numel())))


def _factors(w2d: torch.Tensor, cfg: LowRankSettings) -> tuple[torch.Tensor, torch.Tensor] | None:
    out_f, in_f = w2d.shape
    if min(out_f, in_f) < cfg.min_features:
        return None
    u, s, vh = torch.linalg.svd(w2d.float(), full_matrices=False)
    r = _rank(s, cfg)
    if r * (out_f + in_f) > (1 - cfg.min_saving) * out_f * in_f:
        return None
    root = s[:r].sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root  # (r, in), (out, r)


def _linear(m: nn.Linear, cfg: LowRankSettings) -> nn.Module | None:
    f = _factors(m.weight.detach(), cfg)
    if f is None:
        return None
    first, second = f
    a = nn.Linear(m.in_features, first.shape[0], bias=False)
    b = nn.Linear(first.shape[0], m.out_features, bias=m.bias is not None)
    a.weight.data.copy_(first)
    b.weight.data.copy_(second)
    if m.bias is not None:
        b.bias.data.copy_(m.bias.detach())  # type: ignore[union-attr]
    a._keel_lowrank = True  # type: ignore[assignment]  # lets the registry record the rank (artifacts.py)
    return nn.Sequential(a, b)


def _conv(m: nn.Conv2d, cfg: LowRankSettings) -> nn.Module | None:
    if m.groups != 1:  # depthwise / grouped convs are already cheap
        return None
    w = m.weight.detach()
    f = _factors(w.reshape(w.shape[0], -1), cfg)
    if f is None:
        return None
    first, second = f
    r = first.shape[0]
    geometry: Any = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation, "padding_mode": m.padding_mode}
    a = nn.Conv2d(m.in_channels, r, m.kernel_size, bias=False, **geometry)  # type: ignore[arg-type]
    b = nn.Conv2d(r, m.out_channels, 1, bias=m.bias is not None)
    a.weight.data.copy_(first.reshape(r, *w.shape[1:]))
    b.weight.data.copy_(second.reshape(m.out_channels, r, 1, 1))
    if m.bias is not None:
        b.bias.data.copy_(m.bias.detach())  # type: ignore[union-attr]
    a._keel_lowrank = True  # type: ignore[assignment]  # lets the registry record the rank (artifacts.py)
    return nn.Sequential(a, b)


def factorize(model: nn.Module, settings: LowRankSettings | None = None, *, skip: tuple[str, ...] = ()) -> nn.Module:
    """A copy of ``model`` with every worthwhile Linear / Conv2d replaced by its two low-rank factors.

    ``skip``: module names (prefixes) to leave alone, e.g. the classifier.
    """
    cfg = settings or LowRankSettings()
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if not name or name.startswith(skip) or type(m) not in (nn.Linear, nn.Conv2d):
            continue
        new = _linear(m, cfg) if isinstance(m, nn.Linear) else _conv(m, cfg)  # type: ignore[arg-type]
        if new is not None:
            new.train(m.training)
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, new)
    return model
