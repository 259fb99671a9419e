"""Structured channel pruning that physically removes channels (SPEC 2.6, technique 1).

Example::

    pruner = ChannelPruner(model, pruning_rate=0.5, metric="l1", example_input=torch.randn(1, 3, 64, 64))
    small, report = pruner.compress()

How it works: :func:`~core.compression.pruning.graph.trace_channels` groups channels that must go
together (residual adds, depthwise / grouped convs, concatenations, layer scales, shared modules) into
classes; classes that touch something the tracer does not follow, the input or the output are frozen.
Producers (convs, linears) linked through shared classes form one *pruning group*; in each group the
``pruning_rate`` least important classes are removed, never the last one of any producer. Importance
is normalised per layer (each layer's scores divided by their mean) and averaged over a class:

* ``"l1"``: L1 norm of each output channel's weights (Li et al., 2017) - no data needed;
* ``"activation_magnitude"``: mean |activation| of each channel where the next conv / linear reads it
  (after BatchNorm and the activation function), over the calibration batches;
* ``"taylor"``: |activation x gradient| of the loss at the same places, first-order Taylor
  (Molchanov et al., 2017).
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from core.compression.pruning.graph import ChannelGraph, ModuleChannels, trace_channels

__all__ = ["ChannelPruner", "PRUNING_METRICS", "prune_channels"]

PRUNING_METRICS = ("l1", "activation_magnitude", "taylor")
LossFn = Callable[[nn.Module, Any], torch.Tensor]


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, list | tuple) or len(batch) < 2:
        raise ValueError("metric='taylor' needs labelled batches (inputs, targets) or a loss_fn")
    return F.cross_entropy(model(batch[0]), batch[1])


def _inputs(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, list | tuple) else batch


def _output_shapes(out: Any) -> Any:
    """The shape of each tensor in a model's output (a tensor, or tuples / lists / dicts of them)."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, dict):
        return {k: _output_shapes(v) for k, v in out.items()}
    if isinstance(out, list | tuple):
        return tuple(_output_shapes(v) for v in out)
    return type(out).__name__


def _channel_scores(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Mean of ``x`` over every axis but ``axis``."""
    return x.detach().float().transpose(axis, -1).reshape(-1, x.shape[axis]).mean(0)


_M = TypeVar("_M", bound=nn.Module)


class ChannelPruner(Generic[_M]):
    """Removes ``pruning_rate`` of the channels of every prunable group of ``model``.

    Args:
        model: the network (left unchanged: :meth:`compress` works on a copy).
        pruning_rate: fraction of each group's channel classes to remove, in [0, 1).
        metric: ``"l1"``, ``"activation_magnitude"`` or ``"taylor"`` (see the module docstring).
        example_input: one input batch, for tracing and the shape check.
        calibration_data: batches (tensors or ``(inputs, targets)``) for the data-driven metrics.
        loss_fn: ``loss_fn(model, batch)`` for ``"taylor"``; default cross-entropy on ``(inputs, targets)``.
        round_to: keep a multiple of this many classes per group (e.g. 8 for SIMD-friendly widths).
        ignore: module names (prefixes) whose output channels must not be pruned.
    """

    def __init__(
        self,
        model: _M,
        pruning_rate: float = 0.5,
        metric: str = "activation_magnitude",
        *,
        example_input: torch.Tensor,
        calibration_data: Iterable[Any] | None = None,
        loss_fn: LossFn | None = None,
        round_to: int = 1,
        ignore: Iterable[str] = (),
    ) -> None:
        if not 0.0 <= pruning_rate < 1.0:
            raise ValueError(f"pruning_rate must be in [0, 1), got {pruning_rate}")
        if metric not in PRUNING_METRICS:
            raise ValueError(f"unknown pruning metric {metric!r}; known: {', '.join(PRUNING_METRICS)}")
        if metric != "l1" and calibration_data is None:
            raise ValueError(f"metric={metric!r} needs calibration_data (batches to measure the channels on)")
        if round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to}")
        self.model = model
        self.pruning_rate = pruning_rate
        self.metric = metric
        self.example_input = example_input
        self.calibration_data = calibration_data
        self.loss_fn = loss_fn or _default_loss
        self.round_to = round_to
        self.ignore = tuple(ignore)
        self.pruned_fraction: float = 0.0
        self.masks: dict[str, torch.Tensor] = {}  # after prune(): module name -> kept output channels

    def prune(self) -> _M:
        """A pruned copy of the model (same class, physically smaller), checked to run and keep its output shape."""
        model = copy.deepcopy(self.model).eval()
        with torch.no_grad():
            before = _output_shapes(model(self.example_input))
        graph = trace_channels(model, self.example_input)
        for name, rec in graph.modules.items():
            if rec.producer and rec.out_ids is not None and name.startswith(self.ignore):
                graph.uf.freeze(rec.out_ids)
        scores = self._scores(model, graph)
        pruned = self._select(graph, scores)
        _apply(model, graph, pruned)
        self.masks = {n: _keep(r.out_ids, graph, pruned) for n, r in graph.modules.items() if r.out_ids is not None}
        with torch.no_grad():
            after = _output_shapes(model(self.example_input))
        if after != before:  # the tracer's rules are conservative; this guards against a rule being wrong
            raise RuntimeError(f"pruning changed the output shape from {before} to {after}")
        return model.train(self.model.training)

    def compress(self, **report_kwargs: Any) -> Any:
        """Prune and measure: returns a :class:`~core.compression.report.CompressionResult`.

        ``report_kwargs`` go to :func:`~core.compression.report.build_report` (``val_data``, ``metric_fn``...).
        """
        from core.compression.report import build_report

        pruned = self.prune()
        settings = {"pruning_rate": self.pruning_rate, "metric": self.metric, "round_to": self.round_to}
        return build_report(
            "channel_pruning", self.model, pruned, example_input=self.example_input, settings=settings, **report_kwargs
        )

    # ------------------------------------------------------------------------------ scoring
    def _scores(self, model: nn.Module, graph: ChannelGraph) -> dict[int, list[float]]:
        """Normalised importance per channel id (several values when several layers see it)."""
        per_layer: list[tuple[list[int], torch.Tensor]] = []
        if self.metric == "l1":
            for rec in graph.modules.values():
                if rec.producer and rec.out_ids is not None:
                    w = rec.module.weight.detach()  # type: ignore[union-attr,operator]
                    per_layer.append((rec.out_ids, w.abs().reshape(w.shape[0], -1).sum(1)))
        else:
            per_layer = self._measure(model, graph)
        scores: dict[int, list[float]] = defaultdict(list)
        for ids, s in per_layer:
            s = s / s.mean().clamp_min(1e-12)
            for i, v in zip(ids, s.tolist(), strict=True):
                scores[i].append(v)
        return scores

    def _measure(self, model: nn.Module, graph: ChannelGraph) -> list[tuple[list[int], torch.Tensor]]:
        """Scores the channels where they are used: at the input of every conv / linear (after activations)."""
        taylor = self.metric == "taylor"
        sums: dict[str, torch.Tensor] = {}

        def hook(name: str, rec: ModuleChannels) -> Callable[..., None]:
            axis, n = rec.out_axis, len(rec.in_ids or ())

            def fn(_m: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0] if args else None
                if not isinstance(x, torch.Tensor) or x.shape[axis] != n:
                    return
                if not taylor:
                    sums[name] = sums.get(name, 0) + _channel_scores(x.abs(), axis)
                elif x.requires_grad:
                    act = x.detach()

                    def grad_fn(g: torch.Tensor) -> None:
                        contrib = (act * g).transpose(axis, -1).reshape(act.shape[0], -1, n).sum(1).abs().mean(0)
                        sums[name] = sums.get(name, 0) + contrib.float()

                    x.register_hook(grad_fn)

            return fn

        modules = dict(model.named_modules())
        handles = [
            modules[name].register_forward_pre_hook(hook(name, rec))
            for name, rec in graph.modules.items()
            if rec.producer and rec.in_ids is not None
        ]
        try:
            self._run_calibration(model, taylor)
        finally:
            for h in handles:
                h.remove()
        return [(graph.modules[n].in_ids or [], s) for n, s in sums.items()]

    def _run_calibration(self, model: nn.Module, taylor: bool) -> None:
        assert self.calibration_data is not None
        seen = 0
        for batch in self.calibration_data:
            seen += 1
            if taylor:
                model.zero_grad(set_to_none=True)
                self.loss_fn(model, batch).backward()
            else:
                with torch.no_grad():
                    model(_inputs(batch))
        model.zero_grad(set_to_none=True)
        if seen == 0:
            raise ValueError("calibration_data yielded no batches")

    # ----------------------------------------------------------------------------- selection
    def _select(self, graph: ChannelGraph, scores: dict[int, list[float]]) -> set[int]:
        """The class roots to remove."""
        uf = graph.uf
        producers = [r for r in graph.modules.values() if r.producer and r.out_ids is not None]
        class_producers: dict[int, set[int]] = defaultdict(set)
        for p, rec in enumerate(producers):
            for i in rec.out_ids or ():
                if not uf.is_frozen(i):
                    class_producers[uf.find(i)].add(p)
        members: dict[int, list[float]] = defaultdict(list)
        for i, vals in scores.items():
            members[uf.find(i)].extend(vals)
        # producers sharing a class form one group (a small union-find over producer indices)
        parent = list(range(len(producers)))

        def root(p: int) -> int:
            while parent[p] != p:
                p = parent[p]
            return p

        for ps in class_producers.values():
            first, *rest = sorted(ps)
            for q in rest:
                parent[root(q)] = root(first)
        groups: dict[int, list[int]] = defaultdict(list)
        for cls, ps in class_producers.items():
            groups[root(min(ps))].append(cls)
        pruned: set[int] = set()
        total = 0
        for classes in groups.values():
            total += len(classes)
            pruned |= self._select_group(classes, members, producers, uf)
        self.pruned_fraction = len(pruned) / max(1, total)
        return pruned

    def _select_group(
        self, classes: list[int], members: dict[int, list[float]], producers: list[Any], uf: Any
    ) -> set[int]:
        n = len(classes)
        keep_n = max(1, math.ceil((n - int(self.pruning_rate * n)) / self.round_to) * self.round_to)
        if keep_n >= n:
            return set()
        ranked = sorted(classes, key=lambda c: sum(members[c]) / len(members[c]) if members[c] else math.inf)
        drop = set(ranked[: n - keep_n])
        for rec in producers:  # never empty a layer: keep its best class back
            mine = {uf.find(i) for i in rec.out_ids}
            if mine and mine <= drop:
                drop.discard(max(mine, key=lambda c: ranked.index(c)))
        return drop


def _keep(ids: list[int], graph: ChannelGraph, pruned: set[int]) -> torch.Tensor:
    return torch.tensor([graph.uf.find(i) not in pruned for i in ids], dtype=torch.bool)


def _set(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        module.register_buffer(attr, value.contiguous())


def _apply(model: nn.Module, graph: ChannelGraph, pruned: set[int]) -> None:
    """Slices every recorded module and parameter in place."""
    if not pruned:
        return
    for rec in graph.modules.values():
        _apply_module(rec, graph, pruned)
    for p in graph.params:
        owner, _, attr = p.target.rpartition(".")
        module = model.get_submodule(owner)
        keep = _keep(p.ids, graph, pruned)
        _set(module, attr, getattr(module, attr).detach().index_select(p.axis, keep.nonzero().flatten()))


def _apply_module(rec: ModuleChannels, graph: ChannelGraph, pruned: set[int]) -> None:
    m = rec.module
    keep_in = _keep(rec.in_ids, graph, pruned) if rec.in_ids is not None else None
    keep_out = _keep(rec.out_ids, graph, pruned) if rec.out_ids is not None else None
    assert keep_in is not None and keep_out is not None
    if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        w = m.weight.detach()[keep_out]
        if m.groups == 1:
            w = w[:, keep_in]
        else:  # whole groups went (the tracer tied each group together)
            m.groups = m.groups * int(keep_in.sum()) // m.in_channels
        m.in_channels, m.out_channels = int(keep_in.sum()), int(keep_out.sum())
    elif isinstance(m, nn.Linear):
        w = m.weight.detach()[keep_out][:, keep_in]
        m.in_features, m.out_features = int(keep_in.sum()), int(keep_out.sum())
    else:
        _apply_norm(m, keep_out)
        return
    _set(m, "weight", w)
    if m.bias is not None:
        _set(m, "bias", m.bias.detach()[keep_out])


def _apply_norm(m: nn.Module, keep: torch.Tensor) -> None:
    n = int(keep.sum())
    if isinstance(m, nn.GroupNorm):
        m.num_groups = m.num_groups * n // m.num_channels
        m.num_channels = n
    elif isinstance(m, nn.LayerNorm):
        m.normalized_shape = (n,)
    else:
        m.num_features = n  # type: ignore[assignment]
    for attr in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(m, attr, None)
        if isinstance(t, torch.Tensor):
            _set(m, attr, t.detach()[keep])


def prune_channels(model: nn.Module, *, example_input: torch.Tensor, **kwargs: Any) -> nn.Module:
    """Functional form of :class:`ChannelPruner` (returns only the pruned model)."""
    return ChannelPruner(model, example_input=example_input, **kwargs).prune()
