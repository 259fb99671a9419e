"""The bookkeeping of the channel dependency graph: channel ids, their classes and where they sit.

Every channel of every traced tensor is an integer id; :class:`UnionFind` keeps the classes of ids that
must be removed together, and which classes are frozen (never removed).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

__all__ = ["Chan", "ChannelGraph", "ModuleChannels", "ParamChannels", "UnionFind"]


class UnionFind:
    """Channel ids in disjoint classes; a class holding a frozen id is never pruned."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.frozen: list[bool] = []

    def new(self, n: int, *, frozen: bool = False) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.frozen.extend([frozen] * n)
        return list(range(start, start + n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.frozen[ra] = self.frozen[ra] or self.frozen[rb]

    def union_lists(self, a: list[int], b: list[int]) -> None:
        for i, j in zip(a, b, strict=True):
            self.union(i, j)

    def freeze(self, ids: Iterable[int]) -> None:
        for i in ids:
            self.frozen[self.find(i)] = True

    def is_frozen(self, i: int) -> bool:
        return self.frozen[self.find(i)]


@dataclass
class Chan:
    """The channel ids along ``axis`` of one tensor."""

    ids: list[int]
    axis: int


@dataclass
class ModuleChannels:
    """A prunable module: the channel id at each position of its input and output channel axes."""

    module: nn.Module
    name: str
    in_ids: list[int] | None
    out_ids: list[int] | None
    producer: bool  # creates new channels (conv / linear); False for norms
    out_axis: int = 1


@dataclass
class ParamChannels:
    """A parameter used directly in the graph (e.g. a layer-scale ``gamma``), pruned along ``axis``."""

    target: str
    axis: int
    ids: list[int]


@dataclass
class ChannelGraph:
    """Everything :func:`trace_channels` found out about a model's channels."""

    uf: UnionFind
    modules: dict[str, ModuleChannels] = field(default_factory=dict)
    params: list[ParamChannels] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)  # nodes the tracer froze, for diagnostics
