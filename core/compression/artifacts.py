"""Compressed models in the registry: what to record so a version can be rebuilt, and the rebuild.

A compressed version's config holds the *base* (the uncompressed version's architecture, config and
hyper-parameters) and the *chain* of techniques applied to it, each with the structure it changed
(conv groups after channel pruning, the ranks of factorised layers, the input shape a quantised graph
was traced with). :func:`rebuild` builds the base architecture, replays each step's structure and
returns a module that ``load_state_dict(state)`` fits exactly. Base architectures: ``timm:NAME`` and
``torchvision:NAME`` (the convention of :mod:`core.registry.importers`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from core.compression.casting import cast_weights
from core.compression.quantization import plain_norm_act, quantize_dynamic, quantize_static

__all__ = ["REBUILDABLE", "build_base", "rebuild", "structure_of"]

# techniques whose result can be rebuilt from (base, chain) + a state_dict
REBUILDABLE = (
    "channel_pruning", "magnitude_pruning", "weight_clustering", "low_rank", "static_int8", "qat", "dynamic_int8",
    "fp16", "bf16",
)  # fmt: skip


def build_base(architecture: str, config: dict[str, Any], hparams: dict[str, Any]) -> nn.Module:
    """A fresh model of a registered base architecture (``timm:NAME`` or ``torchvision:NAME``)."""
    kind, _, name = architecture.partition(":")
    kwargs = dict(config.get("timm_kwargs") or config.get("model_kwargs") or {})
    if "num_classes" in hparams:
        kwargs["num_classes"] = int(hparams["num_classes"])
    if kind == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)
    if kind == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs)
    raise ValueError(
        f"cannot rebuild architecture {architecture!r}: keel compress handles 'timm:NAME' and 'torchvision:NAME' "
        "models (register yours under one of those names, with its kwargs in config['model_kwargs'])"
    )


def structure_of(technique: str, model: nn.Module, example_input: torch.Tensor) -> dict[str, Any]:
    """What :func:`rebuild` needs to know about ``model`` after ``technique`` beyond its state_dict."""
    if technique == "channel_pruning":
        groups = {n: int(m.groups) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
        return {"groups": groups, "shapes": {k: list(v.shape) for k, v in model.state_dict().items()}}
    if technique == "low_rank":
        ranks = {}
        for n, m in model.named_modules():
            if isinstance(m, nn.Sequential) and len(m) == 2 and getattr(m[0], "_keel_lowrank", False):
                ranks[n] = int(m[0].weight.shape[0])  # type: ignore[index]
        return {"ranks": ranks}
    if technique in ("static_int8", "qat"):
        return {"input_shape": [1, *example_input.shape[1:]]}
    return {}


def _resize(model: nn.Module, shapes: dict[str, list[int]], groups: dict[str, int]) -> None:
    """Gives every parameter / buffer its recorded shape and fixes the modules' size attributes."""
    for name, m in model.named_modules():
        for attr, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            key = f"{name}.{attr}" if name else attr
            if key in shapes and tuple(shapes[key]) != tuple(t.shape):
                # placeholder values until load_state_dict; finite and positive, as a later quantisation
                # step traces (and observes) this model once before the real weights arrive
                new = torch.rand(shapes[key], generator=torch.Generator().manual_seed(0)).to(t.dtype)
                if isinstance(t, nn.Parameter):
                    setattr(m, attr, nn.Parameter(new, requires_grad=t.requires_grad))
                else:
                    m.register_buffer(attr, new)
        _fix_sizes(name, m, groups)


def _fix_sizes(name: str, m: nn.Module, groups: dict[str, int]) -> None:
    if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        m.groups = groups.get(name, 1 if m.groups == 1 else m.groups)
        m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.GroupNorm):
        m.num_groups = m.num_groups * m.weight.shape[0] // m.num_channels
        m.num_channels = m.weight.shape[0]
    elif isinstance(m, nn.LayerNorm) and m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)
    elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
        m.num_features = m.running_mean.shape[0]


def _factorize_as(model: nn.Module, ranks: dict[str, int]) -> None:
    for name, rank in ranks.items():
        m = model.get_submodule(name)
        a: nn.Module
        b: nn.Module
        if isinstance(m, nn.Linear):
            a = nn.Linear(m.in_features, rank, bias=False)
            b = nn.Linear(rank, m.out_features, bias=m.bias is not None)
        elif isinstance(m, nn.Conv2d):
            k: Any = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation, "padding_mode": m.padding_mode}
            a = nn.Conv2d(m.in_channels, rank, m.kernel_size, bias=False, **k)  # type: ignore[arg-type]
            b = nn.Conv2d(rank, m.out_channels, 1, bias=m.bias is not None)
        else:
            raise ValueError(f"low-rank structure names {name!r}, which is a {type(m).__name__}, not Linear/Conv2d")
        a._keel_lowrank = True  # type: ignore[assignment]
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, nn.Sequential(a, b))


def rebuild(config: dict[str, Any], state: dict[str, Any]) -> nn.Module:
    """The module a compressed version's ``state`` loads into (strictly), built from its config.

    Raises:
        ValueError: the config is not a compressed version's, or a step cannot be rebuilt.
    """
    if config.get("kind") != "compressed":
        raise ValueError(f"not a compressed version's config (kind {config.get('kind')!r})")
    base = config["base"]
    model = build_base(base["architecture"], base["config"], base["hparams"]).eval()
    for step in config["chain"]:
        technique, structure = step["technique"], step.get("structure", {})
        if technique not in REBUILDABLE:
            raise ValueError(f"a {technique!r} step cannot be rebuilt from the registry")
        if technique == "channel_pruning":
            _resize(model, structure["shapes"], structure.get("groups", {}))
        elif technique == "low_rank":
            _factorize_as(model, structure["ranks"])
        elif technique in ("static_int8", "qat"):
            # any input will do (load_state_dict overwrites the scales), but not a constant: observers need a range
            x = torch.randn(structure["input_shape"], generator=torch.Generator().manual_seed(0))
            model = quantize_static(plain_norm_act(model), calibration_data=[x], example_input=x)
        elif technique == "dynamic_int8":
            model = quantize_dynamic(model)
        elif technique in ("fp16", "bf16"):
            model = cast_weights(model, technique)
    # the registry stores a plain dict; quantised modules read their format version from the metadata
    # torch.save would have kept, so take it from the rebuilt module (same structure, same versions)
    full: Any = OrderedDict(state)
    full._metadata = getattr(model.state_dict(), "_metadata", None)
    model.load_state_dict(full, strict=True)
    return model.eval()
