"""Encoder layers whose heads, FFN width and model width are free: what Transformer pruning slices.

``nn.TransformerEncoderLayer`` ties its head count to its width (``nn.MultiheadAttention`` needs
``embed_dim = num_heads * head_dim``), so :func:`convert` swaps each one for a :class:`PrunableEncoderLayer`
computing the same function: the same weights (``in_proj`` split into q / k / v), post- or pre-norm, the
same mask semantics (boolean or additive ``src_mask``, ``src_key_padding_mask``, ``is_causal``), batch-first
or not. Each layer lists the ``(module, tensor name, axis)`` entries a head, an FFN neuron or a hidden
channel owns; :mod:`core.compression.pruning.transformer` scores and slices along them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Entry", "PrunableAttention", "PrunableEncoderLayer", "convert", "encoder_layers"]

Entry = tuple[nn.Module, str, int]  # (module, parameter / buffer name, axis)


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A Linear holding these tensors (no init: zero-sized layers must not warn)."""
    lin = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone())
    return lin


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


class PrunableAttention(nn.Module):
    """Multi-head self-attention whose head count is free of the model width (``num_heads * head_dim != d``)."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, out: nn.Linear, *, head_dim: int, dropout: float):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q, k, v, out
        self.head_dim, self.dropout = head_dim, dropout
        self.batch_first = True  # read by nn.TransformerEncoder.forward; the layer transposes for us

    @property
    def num_heads(self) -> int:
        return self.q_proj.out_features // self.head_dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, d)
        if self.num_heads == 0:
            bias = self.out_proj.bias
            return x.new_zeros(b, t, self.out_proj.out_features) + (0 if bias is None else bias)
        h, hd = self.num_heads, self.head_dim
        q, k, v = (p(x).view(b, t, h, hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal and mask is None)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, h * hd))  # (B, T, d)


class PrunableEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer``'s computation (post- or pre-norm) with any number of heads / FFN neurons.

    Built by :meth:`from_torch` (``nn.TransformerEncoderLayer``) or :meth:`from_timm` (a timm ViT ``Block``).
    """

    def __init__(
        self,
        attn: PrunableAttention,
        ffn: tuple[nn.Linear, Callable[[torch.Tensor], torch.Tensor], nn.Linear],
        norms: tuple[nn.Module, nn.Module],
        dropouts: tuple[nn.Module, nn.Module, nn.Module],
        *,
        norm_first: bool,
        batch_first: bool,
    ) -> None:
        super().__init__()
        self.self_attn = attn
        self.linear1, self.activation, self.linear2 = ffn
        self.norm1, self.norm2 = norms
        self.dropout, self.dropout1, self.dropout2 = dropouts  # in the FFN, after attention, after the FFN
        self.norm_first, self.batch_first = norm_first, batch_first

    @classmethod
    def from_torch(cls, src: nn.TransformerEncoderLayer) -> PrunableEncoderLayer:
        mha = src.self_attn
        d, h = mha.embed_dim, mha.num_heads
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only self-attention with one in_proj and no bias_k / add_zero_attn can be converted")
        w, b = mha.in_proj_weight, mha.in_proj_bias
        qkv = [_new_linear(w[i * d : (i + 1) * d], None if b is None else b[i * d : (i + 1) * d]) for i in range(3)]
        out = _new_linear(mha.out_proj.weight, mha.out_proj.bias)
        attn = PrunableAttention(qkv[0], qkv[1], qkv[2], out, head_dim=d // h, dropout=mha.dropout)
        act = src.activation  # a function or a module; kept as it is
        ffn = (
            _new_linear(src.linear1.weight, src.linear1.bias),
            act,
            _new_linear(src.linear2.weight, src.linear2.bias),
        )
        norms = (copy.deepcopy(src.norm1), copy.deepcopy(src.norm2))
        layer = cls(attn, ffn, norms, (src.dropout, src.dropout1, src.dropout2), norm_first=src.norm_first,
                    batch_first=mha.batch_first)  # fmt: skip
        return layer.train(src.training)

    @classmethod
    def from_timm(cls, block: Any) -> PrunableEncoderLayer:
        """A timm ``vision_transformer.Block`` (pre-norm; no layer scale, q/k norm or attention gate)."""
        a, mlp = block.attn, block.mlp
        extras = [block.ls1, block.ls2, a.q_norm, a.k_norm, getattr(a, "norm", None), getattr(mlp, "norm", None)]
        if any(not isinstance(m, nn.Identity | None) for m in extras) or getattr(a, "gate", None) is not None:
            raise ValueError("timm blocks with layer scale, q/k norms, attention norms or gates cannot be converted")
        h, hd, d = a.num_heads, a.head_dim, a.qkv.in_features
        w, b = a.qkv.weight, a.qkv.bias
        qkv = [_new_linear(w[i * h * hd : (i + 1) * h * hd], None if b is None else b[i * h * hd : (i + 1) * h * hd])
               for i in range(3)]  # fmt: skip
        attn = PrunableAttention(qkv[0], qkv[1], qkv[2], _new_linear(a.proj.weight, a.proj.bias), head_dim=hd,
                                 dropout=a.attn_drop.p)  # fmt: skip
        ffn = (_new_linear(mlp.fc1.weight, mlp.fc1.bias), mlp.act, _new_linear(mlp.fc2.weight, mlp.fc2.bias))
        drops = (mlp.drop1, nn.Sequential(a.proj_drop, block.drop_path1), nn.Sequential(mlp.drop2, block.drop_path2))
        layer = cls(attn, ffn, (copy.deepcopy(block.norm1), copy.deepcopy(block.norm2)), drops, norm_first=True,
                    batch_first=True)  # fmt: skip
        assert d == layer.linear2.out_features
        return layer.train(block.training)

    def _sa(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        return self.dropout1(self.self_attn(x, mask, is_causal))

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear1.out_features == 0:
            bias = self.linear2.bias
            return x.new_zeros(x.shape[:-1] + (self.linear2.out_features,)) + (0 if bias is None else bias)
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``src_mask``: torch's convention (boolean True = masked out); ``attn_mask``: timm's (True = attend)."""
        if attn_mask is not None:
            src_mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask
        x = src if self.batch_first else src.transpose(0, 1)  # (B, T, d)
        mask = _additive(src_mask, x.dtype)
        if mask is not None and mask.ndim == 3:
            if mask.shape[0] != x.shape[0]:
                raise ValueError("a 3-D src_mask must be (batch, T, T); per-head masks do not survive head pruning")
            mask = mask.unsqueeze(1)
        pad = _additive(src_key_padding_mask, x.dtype)
        if pad is not None:
            pad = pad.view(x.shape[0], 1, 1, x.shape[1])
            mask = pad if mask is None else mask + pad
        if self.norm_first:
            x = x + self._sa(self.norm1(x), mask, is_causal)
            x = x + self._ff(self.norm2(x))
        else:
            x = self.norm1(x + self._sa(x, mask, is_causal))
            x = self.norm2(x + self._ff(x))
        return x if self.batch_first else x.transpose(0, 1)

    # (module, name, axis) of what each structure owns; the slicing and the Taylor scores both read these
    def head_entries(self) -> list[Entry]:
        a = self.self_attn
        out = [
            (m, n, 0) for m in (a.q_proj, a.k_proj, a.v_proj) for n in ("weight", "bias") if getattr(m, n) is not None
        ]
        return [*out, (a.out_proj, "weight", 1)]

    def ffn_entries(self) -> list[Entry]:
        ent: list[Entry] = [(self.linear1, "weight", 0), (self.linear2, "weight", 1)]
        return ent + ([(self.linear1, "bias", 0)] if self.linear1.bias is not None else [])

    def hidden_entries(self) -> list[Entry]:
        a = self.self_attn
        ent: list[Entry] = [(m, "weight", 1) for m in (a.q_proj, a.k_proj, a.v_proj, self.linear1)]
        for m in (a.out_proj, self.linear2, self.norm1, self.norm2):
            ent += [(m, n, 0) for n in ("weight", "bias") if getattr(m, n, None) is not None]
        return ent


def _convertible(m: nn.Module) -> PrunableEncoderLayer | None:
    if isinstance(m, nn.TransformerEncoderLayer):
        return PrunableEncoderLayer.from_torch(m)
    if type(m).__name__ == "Block" and type(m).__module__.startswith("timm.models"):
        return PrunableEncoderLayer.from_timm(m)  # ViT, DeiT, BEiT-style blocks
    return None


def convert(model: nn.Module) -> nn.Module:
    """Swaps every ``nn.TransformerEncoderLayer`` and timm ViT ``Block`` of ``model`` (in place) for an equivalent
    :class:`PrunableEncoderLayer` and turns off ``nn.TransformerEncoder``'s nested-tensor fast path. Returns it."""
    layer = _convertible(model)
    if layer is not None:
        return layer
    for name, child in list(model.named_children()):
        layer = _convertible(child)
        if layer is not None:
            setattr(model, name, layer)
        else:
            convert(child)
    if isinstance(model, nn.TransformerEncoder):
        model.use_nested_tensor = False
    return model


def encoder_layers(model: nn.Module) -> dict[str, PrunableEncoderLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PrunableEncoderLayer)}
