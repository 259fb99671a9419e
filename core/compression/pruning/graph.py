"""Channel dependency graph for structured pruning (after Fang et al., "DepGraph", CVPR 2023).

The model is traced with ``torch.fx``; every channel of every intermediate tensor gets an integer id,
and ops that force two channels to be removed together (a residual add, a depthwise or grouped conv,
a layer-scale multiply, a shared module) union their ids. Concatenation joins id lists, flatten
repeats them, permute moves the channel axis. What the tracer does not understand is *frozen*:
its input channels are never removed, so pruning stays valid (conservative, never wrong).

The result lists, for every prunable module and parameter, which channel id sits at each position
of each pruned axis; :mod:`core.compression.pruning.channel` decides which id classes to drop.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from core.compression.pruning.ids import Chan, ChannelGraph, ModuleChannels, ParamChannels, UnionFind

__all__ = ["ChannelGraph", "ModuleChannels", "ParamChannels", "UnionFind", "trace_channels"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d,
)  # fmt: skip
_PASS_NAMES = frozenset((
    "relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "hardswish", "hardswish_", "hardsigmoid", "sigmoid",
    "sigmoid_", "tanh", "leaky_relu", "elu", "mish", "hardtanh", "clamp", "clamp_", "dropout", "dropout2d",
    "interpolate", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "pad", "contiguous",
    "clone", "float", "to", "detach", "stochastic_depth", "neg", "abs", "exp", "square", "sqrt",
))  # fmt: skip
_BINARY_NAMES = frozenset((
    "add", "add_", "iadd", "mul", "mul_", "imul", "sub", "sub_", "isub", "truediv", "div", "div_", "itruediv",
))  # fmt: skip
_REDUCE_NAMES = frozenset(("mean", "sum", "amax", "amin"))
# inspect a tensor's size without consuming its channels
_OPAQUE_PASS_NAMES = frozenset(("size", "dim", "shape", "numel", "getattr", "getitem"))


class _Tracer(fx.Tracer):
    """Stops at convs, linears and norms (including subclasses such as timm's BatchNormAct2d)."""

    def __init__(self) -> None:
        leaves: tuple[type, ...] = ()
        wrap: tuple[Callable[..., Any], ...] = ()
        try:  # timm marks its untraceable modules / functions; respect them when timm is there
            from timm.layers import _fx as timm_fx

            leaves = tuple(timm_fx._leaf_modules)
            wrap = tuple(timm_fx._autowrap_functions)
        except ImportError:  # pragma: no cover - timm is a dependency, but the tracer does not need it
            pass
        super().__init__(autowrap_functions=wrap)
        self._extra_leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (*_CONV, nn.Linear, *_NORM, *self._extra_leaves)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _fn_name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _nodes_in(arg: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(arg, lambda n: out.append(n) or n)  # type: ignore[func-returns-value]
    return out


def trace_channels(model: nn.Module, example_input: torch.Tensor) -> ChannelGraph:
    """Trace ``model`` (kept unchanged) and build its channel dependency graph."""
    tracer = _Tracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph)
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    return _Walker(gm).run()


class _Walker:
    """Walks the traced graph once, in topological order, assigning and uniting channel ids."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.g = ChannelGraph(UnionFind())
        self.chan: dict[fx.Node, Chan] = {}
        self.param_nodes: dict[fx.Node, str] = {}

    def run(self) -> ChannelGraph:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self._fresh(node, frozen=True)
            elif node.op == "get_attr":
                if isinstance(self._attr(node.target), torch.Tensor):
                    self.param_nodes[node] = node.target
            elif node.op == "call_module":
                self._call_module(node)
            elif node.op in ("call_function", "call_method"):
                self._call(node)
            elif node.op == "output":
                self._freeze_inputs(node)
        return self.g

    # ----------------------------------------------------------------------------- helpers
    def _attr(self, target: str) -> Any:
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _fresh(self, node: fx.Node, *, frozen: bool) -> None:
        shape = _shape(node)
        if shape is None or len(shape) == 0:
            return
        # (B, T, C) sequences keep their features last; images and (B, C) vectors on axis 1
        axis = 2 if len(shape) == 3 else 1 if len(shape) >= 2 else 0
        self.chan[node] = Chan(self.g.uf.new(shape[axis], frozen=frozen), axis)

    def _freeze_inputs(self, node: fx.Node) -> None:
        for n in _nodes_in((node.args, node.kwargs)):
            if n in self.chan:
                self.g.uf.freeze(self.chan[n].ids)

    def _opaque(self, node: fx.Node) -> None:
        self._freeze_inputs(node)
        self.g.opaque.append(node.name)
        self._fresh(node, frozen=True)

    def _pass(self, node: fx.Node, src: fx.Node, axis: int | None = None) -> None:
        c = self.chan[src]
        self.chan[node] = Chan(c.ids, c.axis if axis is None else axis)

    def _same_channels(self, node: fx.Node, src: fx.Node) -> bool:
        out, inp = _shape(node), _shape(src)
        c = self.chan.get(src)
        return (
            c is not None
            and out is not None
            and inp is not None
            and len(out) == len(inp)
            and out[c.axis] == inp[c.axis]
        )

    # ----------------------------------------------------------------------------- modules
    def _call_module(self, node: fx.Node) -> None:
        m = self.gm.get_submodule(str(node.target))
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        c = self.chan.get(src) if src is not None else None
        if c is None or src is None or len(node.args) != 1 or node.kwargs:
            return self._opaque(node)
        c = self._refrozen(m, c, _shape(src) or ())
        if isinstance(m, _CONV) and c.axis == 1 and len(c.ids) == m.in_channels:
            self._conv(node, m, c)
        elif isinstance(m, nn.Linear) and c.axis == len(_shape(src) or ()) - 1 and len(c.ids) == m.in_features:
            self._linear(node, m, c)
        elif isinstance(m, _NORM) and self._norm_ok(m, c, src):
            self._norm(node, m, c)
        elif isinstance(m, nn.Flatten):
            self._flatten(node, src, m.start_dim, m.end_dim)
        elif isinstance(m, _PASS_MODULES) and self._same_channels(node, src):
            self._pass(node, src)
        else:
            self._opaque(node)
        return None

    def _refrozen(self, m: nn.Module, c: Chan, shape: tuple[int, ...]) -> Chan:
        """A frozen input may sit on any axis (we lost track of it): put it where ``m`` reads its channels."""
        if not shape or not all(self.g.uf.is_frozen(i) for i in c.ids):
            return c
        last = len(shape) - 1
        if isinstance(m, nn.Linear) or (isinstance(m, nn.LayerNorm) and type(m).__name__ != "LayerNorm2d"):
            axis = last
        elif isinstance(m, (*_CONV, *_NORM)) and last >= 1:
            axis = 1
        else:
            return c
        return c if axis == c.axis else Chan(self.g.uf.new(shape[axis], frozen=True), axis)

    def _record(self, node: fx.Node, m: nn.Module, rec: ModuleChannels) -> None:
        name = str(node.target)
        old = self.g.modules.get(name)
        if old is None:
            self.g.modules[name] = rec
            return
        # a module called twice shares its weights: both calls must lose the same channels
        for a, b in ((old.in_ids, rec.in_ids), (old.out_ids, rec.out_ids)):
            if a is not None and b is not None:
                self.g.uf.union_lists(a, b)

    def _conv(self, node: fx.Node, m: nn.Module, c: Chan) -> None:
        out = self.g.uf.new(int(m.out_channels))  # type: ignore[arg-type]
        groups = int(m.groups)  # type: ignore[arg-type]
        if groups > 1:  # group k's inputs and outputs go or stay together: whole groups are removed
            gi, go = len(c.ids) // groups, len(out) // groups
            for k in range(groups):
                members = c.ids[k * gi : (k + 1) * gi] + out[k * go : (k + 1) * go]
                for i in members[1:]:
                    self.g.uf.union(members[0], i)
        self._record(node, m, ModuleChannels(m, str(node.target), c.ids, out, producer=True))
        self.chan[node] = Chan(out, 1)

    def _linear(self, node: fx.Node, m: nn.Module, c: Chan) -> None:
        out = self.g.uf.new(int(m.out_features))  # type: ignore[arg-type]
        self._record(node, m, ModuleChannels(m, str(node.target), c.ids, out, producer=True, out_axis=c.axis))
        self.chan[node] = Chan(out, c.axis)

    def _norm_ok(self, m: nn.Module, c: Chan, src: fx.Node) -> bool:
        ndim = len(_shape(src) or ())
        if isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1 or m.normalized_shape[0] != len(c.ids):
                return False
            return c.axis == (1 if type(m).__name__ == "LayerNorm2d" else ndim - 1)
        if isinstance(m, nn.GroupNorm):
            return c.axis == 1 and m.num_channels == len(c.ids)
        return c.axis == 1 and getattr(m, "num_features", -1) == len(c.ids)

    def _norm(self, node: fx.Node, m: nn.Module, c: Chan) -> None:
        if isinstance(m, nn.GroupNorm):  # channels of one normalisation group go together
            size = m.num_channels // m.num_groups
            for k in range(m.num_groups):
                for i in c.ids[k * size + 1 : (k + 1) * size]:
                    self.g.uf.union(c.ids[k * size], i)
        self._record(node, m, ModuleChannels(m, str(node.target), c.ids, c.ids, producer=False, out_axis=c.axis))
        self.chan[node] = Chan(c.ids, c.axis)

    # --------------------------------------------------------------------------- functions
    def _call(self, node: fx.Node) -> None:
        name = _fn_name(node.target)
        tensors = [n for n in _nodes_in((node.args, node.kwargs)) if n in self.chan]
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if _shape(node) is None:  # sizes, tuples, ...: nothing to track
            if name not in _OPAQUE_PASS_NAMES and tensors:
                self._freeze_inputs(node)
            return
        if node.target in (torch.cat, torch.concat) or name in ("cat", "concat"):
            self._cat(node)
        elif name in _BINARY_NAMES or node.target in (operator.add, operator.mul, operator.sub, operator.truediv):
            self._binary(node)
        elif src is None or src not in self.chan or len(tensors) != 1:
            self._opaque(node)
        elif name in _PASS_NAMES and self._same_channels(node, src):
            self._pass(node, src)
        elif name == "flatten" or node.target is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            self._flatten(node, src, start, end)
        elif name in _REDUCE_NAMES:
            self._reduce(node, src)
        elif name in ("permute", "transpose", "view", "reshape"):
            getattr(self, f"_{name if name in ('permute', 'transpose') else 'reshape'}")(node, src)
        else:
            self._opaque(node)

    def _flatten(self, node: fx.Node, src: fx.Node, start: Any, end: Any) -> None:
        shape, c = _shape(src), self.chan[src]
        assert shape is not None
        nd = len(shape)
        if not isinstance(start, int) or not isinstance(end, int):
            return self._opaque(node)
        start, end = start % nd, end % nd
        if c.axis < start:
            return self._pass(node, src)
        if c.axis > end:
            return self._pass(node, src, c.axis - (end - start))
        if c.axis == start and end == nd - 1:  # (N, C, H, W) -> (N, C*H*W): each id repeated H*W times
            rep = math.prod(shape[start + 1 :])
            self.chan[node] = Chan([i for i in c.ids for _ in range(rep)], start)
            return None
        return self._opaque(node)

    def _reduce(self, node: fx.Node, src: fx.Node) -> None:
        c, nd = self.chan[src], len(_shape(src) or ())
        args: Any = node.args
        dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
        keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
        dims = [dims] if isinstance(dims, int) else dims
        if not isinstance(dims, list | tuple) or not all(isinstance(d, int) for d in dims):
            return self._opaque(node)
        axes: list[int] = [d % nd for d in dims]
        if c.axis in axes:
            return self._opaque(node)
        return self._pass(node, src, c.axis if keep else c.axis - sum(d < c.axis for d in axes))

    def _permute(self, node: fx.Node, src: fx.Node) -> None:
        c, nd = self.chan[src], len(_shape(src) or ())
        args: Any = node.args
        dims = args[1:] if node.op == "call_method" else args[1]
        if len(dims) == 1 and isinstance(dims[0], list | tuple):
            dims = dims[0]
        if not all(isinstance(d, int) for d in dims):
            return self._opaque(node)
        return self._pass(node, src, [d % nd for d in dims].index(c.axis))

    def _transpose(self, node: fx.Node, src: fx.Node) -> None:
        c, nd = self.chan[src], len(_shape(src) or ())
        a, b = (d % nd if isinstance(d, int) else None for d in node.args[1:3])
        if a is None or b is None:
            return self._opaque(node)
        return self._pass(node, src, b if c.axis == a else a if c.axis == b else c.axis)

    def _reshape(self, node: fx.Node, src: fx.Node) -> None:
        shape_in, shape_out, c = _shape(src), _shape(node), self.chan[src]
        assert shape_in is not None and shape_out is not None
        args = node.args[1:]
        if len(args) == 1 and isinstance(args[0], list | tuple):
            args = tuple(args[0])
        if shape_in == shape_out and len(args) > c.axis and not isinstance(args[c.axis], int):
            return self._pass(node, src)  # same shape, channel size read from the tensor at run time
        if len(shape_out) == 2 and shape_out[0] == shape_in[0] and c.axis == 1 and len(args) == 2 and args[1] == -1:
            return self._flatten(node, src, 1, -1)
        return self._opaque(node)

    def _cat(self, node: fx.Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = _shape(node)
        if not isinstance(tensors, list | tuple) or not all(t in self.chan for t in tensors) or shape is None:
            return self._opaque(node)
        chans = [self.chan[t] for t in tensors]
        axis = chans[0].axis
        if not isinstance(dim, int) or any(c.axis != axis for c in chans):
            return self._opaque(node)
        if dim % len(shape) == axis:
            self.chan[node] = Chan([i for c in chans for i in c.ids], axis)
        else:
            for c in chans[1:]:
                self.g.uf.union_lists(chans[0].ids, c.ids)
            self.chan[node] = Chan(chans[0].ids, axis)
        return None

    def _binary(self, node: fx.Node) -> None:
        out = _shape(node)
        assert out is not None
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        lead = next((a for a in operands if a in self.chan and len(_shape(a) or ()) == len(out)), None)
        if lead is None:
            return self._opaque(node)
        c = self.chan[lead]
        if out[c.axis] != len(c.ids):
            return self._opaque(node)
        for a in operands:
            shape = _shape(a) or ()
            k = c.axis - (len(out) - len(shape))  # the operand's axis that broadcasts onto the channels
            size = shape[k] if 0 <= k < len(shape) else 1
            if a in self.chan:
                other = self.chan[a]
                if size == 1 and other.axis != k:
                    continue
                if other.axis != k or size != len(c.ids):
                    return self._opaque(node)
                self.g.uf.union_lists(c.ids, other.ids)
            elif a in self.param_nodes:
                if size > 1:
                    self.g.params.append(ParamChannels(self.param_nodes[a], k, c.ids))
            else:
                return self._opaque(node)
        self.chan[node] = Chan(c.ids, c.axis)
        return None
