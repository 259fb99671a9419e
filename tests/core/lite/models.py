"""Tiny models of the architectures the exports must handle: a residual CNN, a Transformer encoder over padded
variable-length token sequences, a GRU and an LSTM."""

from __future__ import annotations

import torch
from torch import nn

PAD = 0
VOCAB = 50
MAX_LEN = 64


class TinyCNN(nn.Module):
    """Conv-BN-ReLU, a residual block with a depthwise conv, global pooling, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, 8, H, W)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean(dim=(2, 3)))  # (B, 3)


class TinyEncoder(nn.Module):
    """Token ids (B, T), ``PAD`` = padding -> masked mean-pooled logits (B, 3), or per-token logits (B, T, 3)."""

    def __init__(self, *, per_token: bool = False, d_model: int = 16) -> None:
        super().__init__()
        self.per_token = per_token
        self.embed = nn.Embedding(VOCAB, d_model, padding_idx=PAD)
        self.pos = nn.Embedding(MAX_LEN, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 2, 2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens == PAD  # (B, T)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(positions)[None]  # (B, T, C)
        x = self.encoder(x, src_key_padding_mask=pad)
        if self.per_token:
            return self.head(x)  # (B, T, 3)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return self.head((x * keep).sum(1) / keep.sum(1).clamp(min=1.0))  # (B, 3)


class TinyRNN(nn.Module):
    """A 2-layer GRU or LSTM over (B, T, 4) features -> logits of the last step (B, 2) and the sequence (B, T, 2)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[kind]
        self.rnn = rnn(4, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, _ = self.rnn(x)  # (B, T, 8)
        steps = self.head(y)  # (B, T, 2)
        return steps[:, -1], steps


def random_tokens(batch: int, length: int, *, seed: int = 0, pad_from: int | None = None) -> torch.Tensor:
    """(batch, length) token ids in [1, VOCAB); row 0 padded from ``pad_from`` on when given."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (batch, length), generator=g)
    if pad_from is not None:
        tokens[0, pad_from:] = PAD
    return tokens
