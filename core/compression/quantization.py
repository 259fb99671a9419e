"""int8 quantisation: dynamic (Linear / LSTM / GRU), static post-training with calibration, and QAT.

Static PTQ and QAT use torch's FX graph mode (``prepare_fx`` / ``convert_fx``) with FBGEMM int8 kernels:
Conv, Linear, their fused BatchNorm / ReLU and the residual ``add + relu`` run in int8, so CNNs get faster
on CPU too, not only their Linear layers.

Why FBGEMM and not torch's default ``x86`` engine: on a CPU with AVX512-VNNI, ``x86`` packs most convs for
oneDNN, and torch's oneDNN int8 conv keeps one ready primitive per layer, for the input shape of its first
call. Any other shape (batch 16 after batch 1, as a micro-batching server sends) takes a slow path that
rebuilds the primitive and, where oneDNN wants another weight layout for that shape, reorders the weights
on every call: ResNet-50 at 32 px ran batch 16 in int8 2.5x *slower* than fp32 (Keel issue #4).
FBGEMM packs the weights once for every shape. The quantisation parameters are the same for both engines
(same default qconfig), so accuracy does not change; ``engine="x86"`` is still there to compare.

torch 2.14 ships no PT2E in ``torch.ao`` any more (it moved to torchao, whose speed-up on CPU comes through
``torch.compile``); FX mode gives int8 kernels in eager PyTorch and needs no compiler.
``torch.ao.quantization`` announces its own deprecation on every call; that warning is aimed at torch's
roadmap, not at the caller, so it is silenced here, in one place.

Example::

    q = quantize_static(model, calibration_data=loader, example_input=torch.randn(1, 3, 64, 64))
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["QUANT_BACKEND", "quantize_dynamic", "quantize_static", "prepare_qat", "convert_qat", "train_qat"]

log = logging.getLogger(__name__)

QUANT_BACKEND = "fbgemm"


@contextlib.contextmanager
def _ao(engine: str = QUANT_BACKEND) -> Iterator[None]:
    """Silences torch.ao's deprecation chatter and packs int8 weights for ``engine``.

    The engine is process-wide (a copied or reloaded int8 module re-packs its weights for the current one),
    so it is put back to :data:`QUANT_BACKEND` afterwards, whatever ``engine`` was asked for.
    """
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(
            f"quantisation engine {engine!r} is not available here; torch offers "
            f"{torch.backends.quantized.supported_engines} (use {QUANT_BACKEND!r}, the default)"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r".*must run observer before calling calculate_qparams.*")
        warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")
        warnings.filterwarnings("ignore", message=r"Please use quant_min and quant_max", category=UserWarning)
        # quantized tensor dtypes are slated for removal in favour of torchao; they are what runs int8 today
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        torch.backends.quantized.engine = engine
        try:
            yield
        finally:
            torch.backends.quantized.engine = QUANT_BACKEND


def quantize_dynamic(
    model: nn.Module, *, layers: Iterable[type[nn.Module]] = (nn.Linear, nn.LSTM, nn.GRU)
) -> nn.Module:
    """int8 weights, activations quantised on the fly per batch; only ``layers`` change (a copy is returned)."""
    from torch.ao.quantization import default_dynamic_qconfig
    from torch.ao.quantization import quantize_dynamic as _qd

    with _ao():
        return _qd(copy.deepcopy(model).eval(), {t: default_dynamic_qconfig for t in layers}, dtype=torch.qint8)


def _inputs(batch: Any) -> Any:
    return batch[0] if isinstance(batch, list | tuple) else batch


def plain_norm_act(model: nn.Module) -> nn.Module:
    """Replaces fused norm+act modules (timm's ``BatchNormAct2d``) by ``BatchNorm2d -> act`` and timm's
    ``Linear`` (a functional ``F.linear`` wrapper) by ``nn.Linear``, in place.

    FX quantisation only fuses (and so only runs in int8) the plain torch modules it knows, and a traced
    ``F.linear`` would leave a packed-weight object in the state_dict that ``weights_only`` loading refuses.
    """
    for name, child in list(model.named_children()):
        if type(child) is not nn.Linear and isinstance(child, nn.Linear) and type(child).__module__.startswith("timm."):
            plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            plain.load_state_dict(child.state_dict())
            setattr(model, name, plain.train(child.training))
        elif isinstance(child, nn.BatchNorm2d) and type(child) is not nn.BatchNorm2d and hasattr(child, "act"):
            bn = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine)
            bn.load_state_dict(child.state_dict(), strict=False)
            bn.train(child.training)
            parts: list[nn.Module] = [bn]
            extra = (getattr(child, "drop", None), child.act)
            parts += [m for m in extra if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
            setattr(model, name, nn.Sequential(*parts))
        else:
            plain_norm_act(child)
    return model


def static_same_padding(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """Replaces timm's ``Conv2dSame`` (TF "same" padding computed from the input size at run time, which FX
    cannot trace) by ``ZeroPad2d -> Conv2d`` with the padding of ``example_input``'s size, in place.

    The result is exact for inputs of that spatial size, which a traced int8 graph assumes anyway.
    """
    sizes: dict[str, tuple[int, int]] = {}
    same = {n: m for n, m in model.named_modules() if type(m).__name__ == "Conv2dSame"}
    if not same:
        return model

    def hook(name: str) -> Any:
        return lambda _m, args: sizes.__setitem__(name, tuple(args[0].shape[-2:]))

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in same.items()]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    for name, m in same.items():
        pads = []
        for size, k, s, d in zip(sizes[name], m.kernel_size, m.stride, m.dilation, strict=True):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        conv = nn.Conv2d(
            m.in_channels, m.out_channels, m.kernel_size, m.stride, 0, m.dilation, m.groups, m.bias is not None
        )
        conv.load_state_dict(m.state_dict())
        owner, _, attr = name.rpartition(".")
        pad = nn.ZeroPad2d((*pads[1], *pads[0]))  # (left, right, top, bottom)
        setattr(model.get_submodule(owner), attr, nn.Sequential(pad, conv).train(m.training))
    return model


def skip_identities(model: nn.Module) -> nn.Module:
    """``model`` traced by FX with its ``nn.Identity`` calls bypassed (``model`` itself when it has none).

    timm leaves ``nn.Identity`` placeholders between BatchNorm and ReLU (ResNet's drop-block and
    anti-aliasing slots); they hide ``conv -> bn -> relu`` from FX's fusion patterns, so every block would run
    its middle ReLU as a separate int8 pass and quantise the conv output before the ReLU, wasting half
    the int8 range on values the ReLU then zeroes.
    """
    if not any(type(m) is nn.Identity for m in model.modules()):
        return model
    traced = fx.symbolic_trace(model)
    for node in list(traced.graph.nodes):
        identity = node.op == "call_module" and type(traced.get_submodule(node.target)) is nn.Identity
        if identity and len(node.args) == 1 and not node.kwargs:
            node.replace_all_uses_with(node.args[0])
            traced.graph.erase_node(node)
    traced.graph.lint()
    traced.recompile()
    traced.delete_all_unused_submodules()
    return traced.train(model.training)


def _float_for_fx(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """A copy of ``model`` in the form FX quantisation can trace and fuse (see the three helpers above)."""
    model = static_same_padding(copy.deepcopy(model).eval(), example_input)
    return skip_identities(plain_norm_act(model))


def _qconfig(qat: bool, engine: str = QUANT_BACKEND) -> Any:
    from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping

    return get_default_qat_qconfig_mapping(engine) if qat else get_default_qconfig_mapping(engine)


def quantize_static(
    model: nn.Module,
    *,
    calibration_data: Iterable[Any],
    example_input: torch.Tensor,
    max_batches: int | None = None,
    engine: str = QUANT_BACKEND,
) -> fx.GraphModule:
    """Static int8 post-training quantisation (per-channel weights, calibrated activation ranges).

    Args:
        model: float model (left unchanged).
        calibration_data: batches (tensors or ``(inputs, targets)``) run through the observers.
        example_input: one batch, for tracing.
        max_batches: stop calibrating after this many batches.
        engine: int8 kernels the weights are packed for; ``"x86"`` (torch's default, oneDNN for most convs
            on VNNI CPUs) is only fast for the first input shape it sees, see the module docstring.

    Raises:
        ValueError: no calibration batches, or ``engine`` is not available.
    """
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with _ao(engine):
        prepared = prepare_fx(_float_for_fx(model, example_input), _qconfig(False, engine), (example_input,))
        seen = 0
        with torch.no_grad():
            for batch in calibration_data:
                prepared(_inputs(batch))
                seen += 1
                if max_batches is not None and seen >= max_batches:
                    break
        if seen == 0:
            raise ValueError("calibration_data yielded no batches: static quantisation needs a few real inputs")
        log.info("static int8: calibrated on %d batches", seen)
        return convert_fx(prepared)


def prepare_qat(model: nn.Module, *, example_input: torch.Tensor) -> fx.GraphModule:
    """A copy of ``model`` with fake-quantisation (int8 weights and activations) inserted, in train mode."""
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with _ao():
        return prepare_qat_fx(_float_for_fx(model, example_input).train(), _qconfig(True), (example_input,))


def convert_qat(prepared: nn.Module) -> fx.GraphModule:
    """The int8 model from a fake-quantised one trained by :func:`train_qat` (or any loop)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with _ao():  # NCHW weights: the Trainer may have left them channels-last
        model = copy.deepcopy(prepared).cpu().to(memory_format=torch.contiguous_format).eval()  # int8 kernels: CPU
        return convert_fx(model)  # type: ignore[arg-type]


def _ce(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def train_qat(
    model: nn.Module,
    train_data: Any,
    *,
    example_input: torch.Tensor,
    val_data: Any = None,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 32,
    loss_fn: Any = None,
    **trainer_kwargs: Any,
) -> fx.GraphModule:
    """Quantisation-aware training through :class:`core.training.Trainer`; returns the int8 model.

    The fake-quantised copy is fine-tuned at full precision (``precision="32"``: the observers expect
    fp32) with ``loss_fn(model, batch)`` (default cross-entropy on ``(inputs, targets)``), then converted.
    """
    from core.training import Trainer

    prepared = prepare_qat(model, example_input=example_input)
    trainer_kwargs.setdefault("progress", False)
    trainer_kwargs.setdefault("precision", "32")  # the observers expect fp32
    trainer = Trainer(prepared, loss_fn=loss_fn or _ce, lr=lr, **trainer_kwargs)
    with _ao():
        trainer.train(train_data, val=val_data, epochs=epochs, batch_size=batch_size)
    return convert_qat(prepared)
