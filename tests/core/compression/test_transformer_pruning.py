"""Transformer pruning (heads, FFN neurons, layers, hidden size) on tiny synthetic encoders."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from core.compression import compress
from core.compression.pruning import (
    PrunableEncoderLayer,
    ResidualStream,
    TransformerPruner,
    convert,
    find_stream,
    prune_transformer,
)
from core.compression.pruning.encoder import encoder_layers
from core.compression.pruning.transformer import _slice

VOCAB, T, D, HEADS, FFN, LAYERS = 40, 6, 16, 4, 32, 3


class TinyEncoder(nn.Module):
    """Token + positional embeddings, a pre- or post-norm encoder, a 2-way head on the last position."""

    def __init__(self, *, norm_first: bool = True, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(torch.randn(T, D) * 0.1)
        self.norm = nn.LayerNorm(D)
        layer = nn.TransformerEncoderLayer(D, HEADS, FFN, 0.0, batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, norm=nn.LayerNorm(D), enable_nested_tensor=False)
        self.head = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(x) + self.pos)  # (B, T, D)
        pad = x == 0
        if not self.batch_first:
            return self.head(self.encoder(h.transpose(0, 1), src_key_padding_mask=pad)[-1])
        return self.head(self.encoder(h, src_key_padding_mask=pad)[:, -1])  # (B, 2)


def _data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, VOCAB, (n, T), generator=g)
    x[: n // 4, :2] = 0  # some padding
    return TensorDataset(x, (x[:, -1] % 2 == 0).long())  # learnable: the label is the last token's parity


def _batches(ds: TensorDataset, bs: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(ds.tensors[0][i : i + bs], ds.tensors[1][i : i + bs]) for i in range(0, len(ds), bs)]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _model(**kw: bool) -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder(**kw).eval()


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_convert_computes_what_torch_computes(norm_first: bool, batch_first: bool) -> None:
    model, x = _model(norm_first=norm_first, batch_first=batch_first), _data().tensors[0]
    converted = convert(copy.deepcopy(model))
    assert len(encoder_layers(converted)) == LAYERS
    assert not any(isinstance(m, nn.TransformerEncoderLayer) for m in converted.modules())
    torch.testing.assert_close(converted(x), model(x))
    causal = nn.Transformer.generate_square_subsequent_mask(T)
    h = torch.randn(2, T, D) if batch_first else torch.randn(T, 2, D)
    torch.testing.assert_close(converted.encoder(h, mask=causal), model.encoder(h, mask=causal))


def test_find_stream_and_its_errors() -> None:
    stream = find_stream(convert(_model()))
    assert stream == ResidualStream(
        writers=("emb",), readers=("head",), norms=("norm", "encoder.norm"), tensors=("pos",)
    )
    ambiguous = convert(_model())
    ambiguous.head = nn.Sequential(nn.Linear(D, D), nn.Linear(D, 2))
    with pytest.raises(ValueError, match="'head.0' is a 16 -> 16 Linear outside the encoder layers"):
        find_stream(ambiguous)
    with pytest.raises(ValueError, match="has no nn.TransformerEncoderLayer"):
        TransformerPruner(nn.Sequential(nn.Linear(4, 2)))


@pytest.mark.parametrize("norm_first", [True, False])
def test_heads_ffn_layers_and_hidden_pruned_forward_stays_valid(norm_first: bool) -> None:
    model, calib = _model(norm_first=norm_first), _batches(_data())
    pruner = TransformerPruner(model, calibration_data=calib)
    pruned = pruner.prune(0.5, drop_layers=1)
    layers = list(encoder_layers(pruned).values())
    assert len(layers) == LAYERS - 1 and pruned.encoder.num_layers == LAYERS - 1
    heads = [m.self_attn.num_heads for m in layers]
    assert sum(heads) == round(0.5 * HEADS * (LAYERS - 1))
    assert sum(m.linear1.out_features for m in layers) == round(0.5 * FFN * (LAYERS - 1))
    assert {m.linear2.out_features for m in layers} == {D // 2} and pruned.emb.embedding_dim == D // 2
    assert pruned.pos.shape == (T, D // 2) and pruned.head.in_features == D // 2
    for m in layers:
        assert m.self_attn.q_proj.weight.shape == (m.self_attn.num_heads * D // HEADS, D // 2)
    x = _data().tensors[0]
    out = pruned(x)
    assert out.shape == (len(x), 2) and torch.isfinite(out).all()
    out.sum().backward()  # still trainable


def test_a_layer_left_without_heads_or_neurons_still_runs() -> None:
    layer = convert(_model()).encoder.layers[0]
    assert isinstance(layer, PrunableEncoderLayer)
    _slice(layer.head_entries(), torch.arange(0))
    _slice(layer.ffn_entries(), torch.arange(0))
    h = torch.randn(2, T, D)
    # pre-norm: only the biases of out_proj / linear2 are left to add
    expected = h + layer.self_attn.out_proj.bias + layer.linear2.bias
    torch.testing.assert_close(layer(h), expected)


def test_removing_a_zero_importance_head_equals_masking_it() -> None:
    model, calib = convert(_model()), _batches(_data())
    att = model.encoder.layers[1].self_attn
    hd = D // HEADS
    with torch.no_grad():  # mask head 2 of layer 1: its q/k/v rows and its out_proj columns are zero
        for proj in (att.q_proj, att.k_proj, att.v_proj):
            proj.weight[2 * hd : 3 * hd] = 0
            proj.bias[2 * hd : 3 * hd] = 0
        att.out_proj.weight[:, 2 * hd : 3 * hd] = 0
    masked = copy.deepcopy(model)
    pruner = TransformerPruner(model, calibration_data=calib, prune_hidden=False)
    imp = pruner.importance()
    assert imp.heads["encoder.layers.1"][2] == 0 and (imp.heads["encoder.layers.1"][[0, 1, 3]] > 0).all()
    total = HEADS * LAYERS
    pruned = pruner.prune((total - 1) / total, ffn_ratio=1.0, importance=imp)
    assert [m.self_attn.num_heads for m in encoder_layers(pruned).values()] == [HEADS, HEADS - 1, HEADS]
    x = _data().tensors[0]
    torch.testing.assert_close(pruned(x), masked(x), rtol=0, atol=1e-6)


def test_removing_a_zero_importance_ffn_neuron_equals_masking_it() -> None:
    model, calib = convert(_model(norm_first=False)), _batches(_data())
    layer = model.encoder.layers[0]
    with torch.no_grad():
        layer.linear1.weight[5] = 0
        layer.linear1.bias[5] = 0
        layer.linear2.weight[:, 5] = 0
    masked = copy.deepcopy(model)
    pruner = TransformerPruner(model, calibration_data=calib, prune_hidden=False)
    total = FFN * LAYERS
    pruned = pruner.prune(1.0, ffn_ratio=(total - 1) / total)
    assert [m.linear1.out_features for m in encoder_layers(pruned).values()] == [FFN - 1, FFN, FFN]
    x = _data().tensors[0]
    torch.testing.assert_close(pruned(x), masked(x), rtol=0, atol=1e-6)


def test_parameter_count_goes_down_as_predicted() -> None:
    model = _model()
    before = _params(model)
    pruned = TransformerPruner(model).prune(0.5, hidden_ratio=0.5)  # uniform scores without calibration data
    d, heads, ffn, hd = D // 2, HEADS * LAYERS // 2, FFN * LAYERS // 2, D // HEADS
    stream = VOCAB * d + T * d + 2 * 2 * d + (d * 2 + 2)  # embedding, positions, 2 norms, head
    per_head = 3 * (d * hd + hd) + hd * d  # q, k, v rows and out_proj columns
    per_neuron = d + 1 + d  # linear1 row + bias, linear2 column
    per_layer = d + d + 2 * 2 * d  # out_proj and linear2 biases, norm1 and norm2
    assert _params(pruned) == stream + heads * per_head + ffn * per_neuron + LAYERS * per_layer
    assert _params(pruned) < 0.3 * before


def test_ratio_for_meets_the_budget() -> None:
    model = _model()
    pruner = TransformerPruner(model, calibration_data=_batches(_data()))
    budget = int(0.3 * _params(model))
    ratio, hidden = pruner.ratio_for(budget)
    assert 0 < hidden <= ratio <= 1
    assert _params(pruner.prune(ratio, hidden_ratio=hidden)) <= budget
    with pytest.raises(ValueError, match="ratios are shares kept"):
        pruner.prune(0.0)
    with pytest.raises(ValueError, match="drop_layers must be in"):
        pruner.prune(0.5, drop_layers=LAYERS)


def test_prune_transformer_distils_and_leaves_the_original_alone() -> None:
    model, ds = _model(), _data()
    before = copy.deepcopy(model.state_dict())
    small = prune_transformer(
        model, target=0.4, calibration_data=_batches(ds), train_data=ds, steps=2, epochs=1, batch_size=16,
        log_every_n_steps=1, precision="32-true",
    )  # fmt: skip
    assert _params(small) <= 0.4 * _params(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert small(ds.tensors[0][:3]).shape == (3, 2)


def test_transformer_pruning_through_compress() -> None:
    model, ds = _model(), _data()
    val = _batches(ds)
    small, report = compress(
        model, "transformer_pruning", example_input=ds.tensors[0][:1], calibration_data=val, train_data=ds,
        val_data=val, batch_sizes=(1,), latency_repeats=1, target=0.5, steps=1, epochs=1, batch_size=16,
        trainer_kwargs={"log_every_n_steps": 1, "precision": "32-true"},
    )  # fmt: skip
    assert report.after.params <= 0.5 * report.before.params
    assert report.after.metric is not None and report.settings["target"] == 0.5
    assert small(ds.tensors[0][:2]).shape == (2, 2)
    with pytest.raises(ValueError, match="'transformer_pruning' needs calibration_data"):
        compress(model, "transformer_pruning", example_input=ds.tensors[0][:1])


def test_timm_vit_blocks_convert_exactly_and_prune() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(img_size=16, patch_size=8, embed_dim=D, depth=3, num_heads=HEADS, num_classes=3)
    vit.eval()
    x = torch.randn(4, 3, 16, 16)
    converted = convert(copy.deepcopy(vit))
    assert len(encoder_layers(converted)) == 3
    torch.testing.assert_close(converted(x), vit(x))
    stream = find_stream(converted)
    assert stream.writers == ("patch_embed.proj",) and set(stream.tensors) == {"cls_token", "pos_embed"}
    pruned = TransformerPruner(converted, calibration_data=[(x, torch.tensor([0, 1, 2, 0]))]).prune(0.5, drop_layers=1)
    assert len(pruned.blocks) == 2 and pruned.patch_embed.proj.out_channels == D // 2
    assert pruned(x).shape == (4, 3)
    assert _params(pruned) < 0.35 * _params(vit)
