"""Structured pruning of Transformer encoders: attention heads, FFN neurons, whole layers and the hidden size.

Heads are ranked as in Michel et al. 2019 ("Are Sixteen Heads Really Better than One?") and every other
structure the same way: the first-order Taylor estimate of the loss change when a group of weights is
removed, ``(sum over the group of weight * gradient)^2``, accumulated over calibration batches (Molchanov
et al. 2019), normalised per layer and ranked globally. :func:`prune_transformer` prunes iteratively
(prune a share -> distil from the unpruned teacher through :func:`core.compression.distill` -> repeat),
the recipe of CoFi / "structured pruning learns compact and accurate models" without the learned masks.

Models are first converted (:func:`core.compression.pruning.encoder.convert`: each
``nn.TransformerEncoderLayer`` becomes an equivalent ``PrunableEncoderLayer``); the hidden (model) size is
cut consistently across the embeddings, positional tensors, LayerNorms, every layer and the head, which
:func:`find_stream` finds. Example::

    model = convert(model)
    pruner = TransformerPruner(model, calibration_data=batches)
    pruner.prune(0.5)                     # keep 50% of heads, FFN neurons and hidden channels
    small = prune_transformer(model, target=0.3, calibration_data=batches, train_data=ds, epochs=1)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.compression.pruning.encoder import Entry, convert, encoder_layers

__all__ = [
    "Importance",
    "ResidualStream",
    "TransformerPruner",
    "find_stream",
    "prune_transformer",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class ResidualStream:
    """Where the hidden (model) dimension lives outside the encoder layers.

    Attributes:
        writers: Embedding / Linear / patch-embedding Conv modules whose output is the stream.
        readers: Linear modules reading the stream (classifier heads).
        norms: LayerNorms over the stream (embedding norm, final norm).
        tensors: parameters / buffers whose last axis is the stream (positional embeddings, CLS tokens).
    """

    writers: tuple[str, ...] = ()
    readers: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()
    tensors: tuple[str, ...] = ()

    def entries(self, model: nn.Module) -> list[Entry]:
        out: list[Entry] = []
        for name in self.writers:
            m = model.get_submodule(name)
            out += [(m, "weight", 1)] if isinstance(m, nn.Embedding) else [(m, "weight", 0)]
            out += [(m, "bias", 0)] if getattr(m, "bias", None) is not None else []
        out += [(model.get_submodule(n), "weight", 1) for n in self.readers]
        for name in self.norms:
            m = model.get_submodule(name)
            out += [(m, n, 0) for n in ("weight", "bias") if getattr(m, n, None) is not None]
        for name in self.tensors:
            owner, _, attr = name.rpartition(".")
            m = model.get_submodule(owner)
            out.append((m, attr, getattr(m, attr).ndim - 1))
        return out


def find_stream(model: nn.Module) -> ResidualStream:
    """Finds the stream by size: modules outside the encoder layers whose input or output width is ``d``.

    Raises:
        ValueError: no encoder layers, layers of different widths, or a ``d -> d`` Linear outside the
            layers (ambiguous: pass a :class:`ResidualStream` yourself).
    """
    layers = encoder_layers(model)
    widths = {layer.linear2.out_features for layer in layers.values()}
    if len(widths) != 1:
        raise ValueError(f"need encoder layers of one width to prune the hidden size, found widths {widths or '{}'}")
    d = widths.pop()
    inside = {f"{n}.{c}" if c else n for n, layer in layers.items() for c, _ in layer.named_modules()}
    writers, readers, norms, tensors = [], [], [], []
    for name, m in model.named_modules():
        if name in inside:
            continue
        if isinstance(m, nn.Linear) and m.in_features == d and m.out_features == d:
            raise ValueError(f"{name!r} is a {d} -> {d} Linear outside the encoder layers: pass ResidualStream(...)")
        if (
            (isinstance(m, nn.Embedding) and m.embedding_dim == d)
            or (isinstance(m, nn.Linear) and m.out_features == d)
            or (isinstance(m, nn.Conv1d | nn.Conv2d) and m.out_channels == d and m.groups == 1)  # patch embeddings
        ):
            writers.append(name)
        elif isinstance(m, nn.Linear) and m.in_features == d:
            readers.append(name)
        elif isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (d,):
            norms.append(name)
        elif not isinstance(m, nn.Linear | nn.Embedding | nn.LayerNorm | nn.Conv1d | nn.Conv2d):
            own = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
            tensors += [f"{name}.{a}" if name else a for a, t in own if t.is_floating_point() and t.shape[-1:] == (d,)]
    return ResidualStream(tuple(writers), tuple(readers), tuple(norms), tuple(tensors))


def _slice(entries: Iterable[Entry], idx: torch.Tensor) -> None:
    for m, name, axis in entries:
        t = getattr(m, name)
        new = t.detach().index_select(axis, idx.to(t.device)).clone()
        if isinstance(t, nn.Parameter):
            setattr(m, name, nn.Parameter(new, requires_grad=t.requires_grad))
        else:
            m.register_buffer(name, new)
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.Embedding):
            m.embedding_dim = m.weight.shape[1]
        elif isinstance(m, nn.Conv1d | nn.Conv2d):
            m.out_channels = m.weight.shape[0]
        elif isinstance(m, nn.LayerNorm):
            m.normalized_shape = (getattr(m, name).shape[0],)


def _taylor(entries: Iterable[Entry], n: int) -> torch.Tensor:
    """sum of weight * grad along each entry's axis, folded onto ``n`` groups (heads: ``hd`` rows per group)."""
    out = torch.zeros(n)
    for m, name, axis in entries:
        t = getattr(m, name)
        if not isinstance(t, nn.Parameter) or t.grad is None:
            continue
        prod = (t.detach() * t.grad).movedim(axis, 0).reshape(t.shape[axis], -1).sum(1).float().cpu()
        out += prod.view(n, -1).sum(1)
    return out


@dataclass
class Importance:
    """Accumulated ``(sum weight * grad)^2`` per structure (larger = costlier to remove)."""

    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    ffn: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: dict[str, float] = field(default_factory=dict)
    hidden: torch.Tensor | None = None


def _ce(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, k).indices).values if k < scores.numel() else torch.arange(scores.numel())


def _global_keep(scores: dict[str, torch.Tensor], ratio: float, floor: int = 0) -> dict[str, torch.Tensor]:
    """Keeps the top ``ratio`` of all units, ranking each layer's scores after dividing by their L2 norm."""
    names = list(scores)
    norm = [scores[n] / scores[n].norm().clamp_min(1e-12) for n in names]
    flat = torch.cat(norm)
    k = max(floor, round(ratio * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[_top(flat, k)] = True
    out, start = {}, 0
    for n, s in zip(names, norm, strict=True):
        out[n] = torch.nonzero(chosen[start : start + s.numel()]).flatten()
        start += s.numel()
    return out


class TransformerPruner:
    """Scores and removes heads, FFN neurons, layers and hidden channels of a (converted) encoder model.

    Args:
        model: a model holding ``PrunableEncoderLayer``s (``nn.TransformerEncoderLayer``s are converted in place).
        calibration_data: ``(inputs, targets)`` batches for the Taylor scores (uniform importance when None).
        loss_fn: ``(model, batch) -> loss``; cross-entropy on ``model(batch[0])`` by default.
        stream: where the hidden size lives outside the layers; found by :func:`find_stream` when None.
        prune_hidden: also cut the hidden (model) size; needs a stream.
        round_to: the kept hidden size is a multiple of this.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        calibration_data: Iterable[Any] | None = None,
        loss_fn: LossFn = _ce,
        stream: ResidualStream | None = None,
        prune_hidden: bool = True,
        round_to: int = 8,
    ) -> None:
        self.model = convert(model)
        if not encoder_layers(self.model):
            raise ValueError(f"{type(model).__name__} has no nn.TransformerEncoderLayer / PrunableEncoderLayer")
        self.data, self.loss_fn, self.round_to = calibration_data, loss_fn, round_to
        self.stream = (stream or find_stream(self.model)) if prune_hidden else None

    def importance(self) -> Importance:
        """Taylor scores over the calibration batches (all ones when there are none)."""
        layers = encoder_layers(self.model)
        d = next(iter(layers.values())).linear2.out_features
        imp = Importance(
            {n: torch.zeros(m.self_attn.num_heads) for n, m in layers.items()},
            {n: torch.zeros(m.linear1.out_features) for n, m in layers.items()},
            {n: 0.0 for n in layers},
            torch.zeros(d),
        )
        if self.data is None:
            imp.heads = {n: s + 1 for n, s in imp.heads.items()}
            imp.ffn = {n: s + 1 for n, s in imp.ffn.items()}
            imp.layers, imp.hidden = {n: 1.0 for n in layers}, torch.ones(d)
            return imp
        was = self.model.training
        self.model.eval()
        for batch in self.data:
            self.model.zero_grad(set_to_none=True)
            self.loss_fn(self.model, batch).backward()
            hidden = self._hidden_entries()
            for n, m in layers.items():
                imp.heads[n] += _taylor(m.head_entries(), m.self_attn.num_heads) ** 2
                imp.ffn[n] += _taylor(m.ffn_entries(), m.linear1.out_features) ** 2
                imp.layers[n] += (
                    float(sum((p.detach() * p.grad).sum() for p in m.parameters() if p.grad is not None)) ** 2
                )
            assert imp.hidden is not None
            imp.hidden += _taylor(hidden, d) ** 2
        self.model.zero_grad(set_to_none=True)
        self.model.train(was)
        return imp

    def _hidden_entries(self) -> list[Entry]:
        if self.stream is None:
            return []
        return self.stream.entries(self.model) + [
            e for m in encoder_layers(self.model).values() for e in m.hidden_entries()
        ]

    def prune(
        self,
        ratio: float,
        *,
        ffn_ratio: float | None = None,
        hidden_ratio: float | None = None,
        drop_layers: int = 0,
        importance: Importance | None = None,
    ) -> nn.Module:
        """Keeps the best ``ratio`` of the heads, ``ffn_ratio`` of the FFN neurons (both ranked across layers)
        and ``hidden_ratio`` of the hidden channels (both default to ``ratio``), after dropping the
        ``drop_layers`` least important layers. Returns the model (pruned in place)."""
        ffn_ratio = ratio if ffn_ratio is None else ffn_ratio
        hidden_ratio = ratio if hidden_ratio is None else hidden_ratio
        if not all(0 < r <= 1 for r in (ratio, ffn_ratio, hidden_ratio)):
            raise ValueError(f"ratios are shares kept, in (0, 1]; got {ratio=}, {ffn_ratio=}, {hidden_ratio=}")
        imp = importance or self.importance()
        before = encoder_layers(self.model)
        if not 0 <= drop_layers < len(before):
            raise ValueError(
                f"drop_layers must be in [0, {len(before) - 1}] for {len(before)} layers; got {drop_layers}"
            )
        dropped = sorted(imp.layers, key=imp.layers.__getitem__)[:drop_layers]
        for name in sorted(dropped, key=lambda n: int(n.rpartition(".")[2]), reverse=True):  # later indices first
            self._drop(name)
        old = {id(m): n for n, m in before.items()}  # scores are keyed by the names before the drop
        layers = {n: (m, old[id(m)]) for n, m in encoder_layers(self.model).items()}
        for n, idx in _global_keep({n: imp.heads[o] for n, (_, o) in layers.items()}, ratio, floor=1).items():
            hd = layers[n][0].self_attn.head_dim
            _slice(layers[n][0].head_entries(), (idx[:, None] * hd + torch.arange(hd)).flatten())
        for n, idx in _global_keep({n: imp.ffn[o] for n, (_, o) in layers.items()}, ffn_ratio, floor=1).items():
            _slice(layers[n][0].ffn_entries(), idx)
        if self.stream is not None and imp.hidden is not None and hidden_ratio < 1:
            d = imp.hidden.numel()
            keep = min(d, max(self.round_to, self.round_to * round(hidden_ratio * d / self.round_to)))
            _slice(self._hidden_entries(), _top(imp.hidden, keep))
        return self.model

    def _drop(self, name: str) -> None:
        owner, _, idx = name.rpartition(".")
        parent = self.model.get_submodule(owner)
        if not isinstance(parent, nn.ModuleList | nn.Sequential):
            raise ValueError(f"cannot drop {name!r}: layers can be dropped from an nn.ModuleList / nn.Sequential only")
        del parent[int(idx)]
        holder = next((m for m in self.model.modules() if getattr(m, "layers", None) is parent), None)
        if holder is not None and hasattr(holder, "num_layers"):
            setattr(holder, "num_layers", len(parent))  # noqa: B010

    def ratio_for(
        self, params: int, *, drop_layers: int = 0, importance: Importance | None = None
    ) -> tuple[float, float]:
        """``(ratio, hidden_ratio)`` for :meth:`prune` leaving at most ``params`` parameters: the hidden size
        shrinks by the largest uniform ratio that fits, then heads / FFN neurons take the budget left
        (bisections on pruned copies, so the count is exact, not a formula)."""
        imp = importance or self.importance()

        def count(r: float, hr: float) -> int:
            trial = copy.copy(self)
            trial.model = copy.deepcopy(self.model)
            pruned = trial.prune(r, hidden_ratio=hr, drop_layers=drop_layers, importance=imp)
            return sum(p.numel() for p in pruned.parameters())

        def largest(fits: Callable[[float], bool], lo: float) -> float:
            if fits(1.0):
                return 1.0
            hi = 1.0
            for _ in range(16):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            return lo

        hidden = largest(lambda r: count(r, r) <= params, 1e-3)
        return largest(lambda r: count(r, hidden) <= params, hidden), hidden


@torch.no_grad()
def _output_shape(model: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    was = model.training
    try:
        return tuple(model.eval()(x).shape)
    except RuntimeError as err:  # a tensor of the hidden size the stream search missed
        raise ValueError(f"the pruned model no longer runs ({err}); pass a ResidualStream naming every tensor") from err
    finally:
        model.train(was)


def prune_transformer(
    model: nn.Module,
    *,
    target: float,
    calibration_data: Sequence[Any],
    train_data: Any = None,
    steps: int = 3,
    epochs: int = 1,
    drop_layers: int = 0,
    prune_hidden: bool = True,
    stream: ResidualStream | None = None,
    loss_fn: LossFn = _ce,
    teacher: nn.Module | None = None,
    example_input: torch.Tensor | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
    **distill_kwargs: Any,
) -> nn.Module:
    """Iterative pruning to ``target`` x the original parameter count, distilling from the original after each step.

    Step ``i`` of ``steps`` prunes to ``target ** (i / steps)`` of the original's parameters (a geometric
    schedule), dropping ``drop_layers`` layers at the first step; with ``train_data`` the pruned model is then
    trained for ``epochs`` by :func:`core.compression.distill` with ``teacher`` (default: ``model`` itself,
    unpruned; pass the original when ``model`` is already a pruned stage) as teacher (``distill_kwargs``:
    ``temperature``, ``alpha``, ``lr``, ``batch_size``, Trainer arguments). ``model`` is left untouched; the
    pruned copy is returned.
    """
    from core.compression.distillation import distill

    if not 0 < target <= 1 or steps < 1:
        raise ValueError(f"need 0 < target <= 1 and steps >= 1; got target={target}, steps={steps}")
    student = convert(copy.deepcopy(model))
    teacher = (teacher if teacher is not None else copy.deepcopy(student)).eval()
    original = sum(p.numel() for p in student.parameters())
    x = example_input if example_input is not None else next(iter(calibration_data))[0]
    shape = _output_shape(student, x)
    for i in range(1, steps + 1):
        pruner = TransformerPruner(
            student, calibration_data=calibration_data, loss_fn=loss_fn, stream=stream, prune_hidden=prune_hidden
        )
        imp = pruner.importance()
        drop = drop_layers if i == 1 else 0
        budget = math.floor(original * target ** (i / steps))
        ratio, hidden = pruner.ratio_for(budget, drop_layers=drop, importance=imp)
        student = pruner.prune(ratio, hidden_ratio=hidden, drop_layers=drop, importance=imp)
        if _output_shape(student, x) != shape:
            raise ValueError(f"the pruned model's output shape changed from {shape}: check the ResidualStream")
        if train_data is not None and epochs > 0:
            student = distill(student, teacher, train_data, example_input=x, epochs=epochs, **distill_kwargs).eval()
        if on_step is not None:
            on_step(i, student)
    return student.eval()
