"""MovieLens next-rating task and a BERT-style encoder for it (the Transformer-pruning benchmark's asset).

Task: given a user's last ``history`` ratings (movie, rating, genres) in time order and the next movie they
rate, predict whether they like it (rating >= 4). Data: ``recsys/ml-latest-small`` dev part (ratings before
2016-03-22). Time split: targets rated before the 80th percentile of the dev timestamps train, the later
20% evaluate (their histories may reach back into the training period, as they would online). Metric: ROC-AUC.

Every sample is one LongTensor ``(history + 1, 3)``: ``[movie token, rating token, genre bitmask]``, left-padded;
the last row is the target movie with the rating token ``MASK``. Movies rated fewer than ``min_count`` times
in the training period share the ``UNK`` token (their genres still come through).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["MovieEncoder", "MovieEncoderConfig", "MovieLensTask", "load_task", "roc_auc"]

PAD, UNK = 0, 1
MASK = 11  # rating tokens: 1..10 are 0.5..5.0 stars
N_GENRES = 20


@dataclass(frozen=True)
class MovieLensTask:
    train_x: torch.Tensor  # (N, T+1, 3) int64
    train_y: torch.Tensor  # (N,) int64, 1 = rating >= 4
    val_x: torch.Tensor
    val_y: torch.Tensor
    n_tokens: int  # movie vocabulary incl. PAD / UNK
    cut_timestamp: int


def _genre_bits(movies_csv: Path) -> dict[int, int]:
    import pandas as pd

    movies = pd.read_csv(movies_csv)
    names = sorted({g for gs in movies["genres"] for g in gs.split("|")})
    if len(names) > N_GENRES:
        raise ValueError(f"{movies_csv}: {len(names)} genres, the encoder has room for {N_GENRES}")
    bit = {g: 1 << i for i, g in enumerate(names)}
    return {
        int(m): sum(bit[g] for g in gs.split("|")) for m, gs in zip(movies["movieId"], movies["genres"], strict=True)
    }


def load_task(root: Path, *, history: int = 16, min_count: int = 5, val_share: float = 0.2) -> MovieLensTask:
    """Builds the samples from ``root/recsys/ml-latest-small`` (see the module docstring)."""
    import pandas as pd

    folder = root / "recsys" / "ml-latest-small"
    if not (folder / "ratings.csv").is_file():
        raise FileNotFoundError(f"no {folder / 'ratings.csv'}; set KEEL_DATA_DIR to the shared data folder")
    r = pd.read_csv(folder / "ratings.csv").sort_values(["userId", "timestamp", "movieId"], kind="stable")
    genres = _genre_bits(folder / "movies.csv")
    cut = int(np.quantile(r["timestamp"].to_numpy(), 1 - val_share))
    counts = r.loc[r["timestamp"] < cut, "movieId"].value_counts()
    vocab = {int(m): i + 2 for i, m in enumerate(sorted(counts[counts >= min_count].index))}
    tok = np.array([vocab.get(int(m), UNK) for m in r["movieId"]], dtype=np.int64)
    rat = np.rint(r["rating"].to_numpy() * 2).astype(np.int64)  # 1..10
    gen = np.array([genres.get(int(m), 0) for m in r["movieId"]], dtype=np.int64)
    ts, users = r["timestamp"].to_numpy(), r["userId"].to_numpy()
    xs, ys, is_val = [], [], []
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    for s, e in zip(starts, np.r_[starts[1:], len(users)], strict=True):
        for i in range(s + 1, e):  # every rating after the user's first is a target
            lo = max(s, i - history)
            x = np.zeros((history + 1, 3), dtype=np.int64)
            n = i - lo
            x[history - n : history, 0], x[history - n : history, 1], x[history - n : history, 2] = (
                tok[lo:i], rat[lo:i], gen[lo:i],
            )  # fmt: skip
            x[history] = (tok[i], MASK, gen[i])
            xs.append(x)
            ys.append(int(rat[i] >= 8))
            is_val.append(ts[i] >= cut)
    x_all, y_all, v = torch.from_numpy(np.stack(xs)), torch.tensor(ys), torch.tensor(is_val)
    return MovieLensTask(x_all[~v], y_all[~v], x_all[v], y_all[v], len(vocab) + 2, cut)


@dataclass(frozen=True)
class MovieEncoderConfig:
    n_tokens: int
    history: int = 16
    d_model: int = 256
    n_heads: int = 8
    n_layers: int = 4
    ffn: int = 1024
    dropout: float = 0.1


class MovieEncoder(nn.Module):
    """BERT-style (pre-norm) encoder over the rating history; reads the target position into 2 logits."""

    def __init__(self, cfg: MovieEncoderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.movie = nn.Embedding(cfg.n_tokens, d, padding_idx=PAD)
        self.rating = nn.Embedding(MASK + 1, d, padding_idx=PAD)
        self.genre = nn.Linear(N_GENRES, d, bias=False)
        self.pos = nn.Parameter(torch.randn(cfg.history + 1, d) * 0.02)
        self.norm = nn.LayerNorm(d)
        layer = nn.TransformerEncoderLayer(
            d, cfg.n_heads, cfg.ffn, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)
        self.register_buffer("bits", torch.arange(N_GENRES), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, rating, genre = x.unbind(-1)  # (B, T) each
        g = ((genre.unsqueeze(-1) >> self.bits) & 1).float()  # (B, T, 20)
        h = self.movie(ids) + self.rating(rating) + self.genre(g) + self.pos  # (B, T, d)
        h = self.encoder(self.norm(h), src_key_padding_mask=ids == PAD)
        return self.head(h[:, -1])  # (B, 2)


@torch.no_grad()
def roc_auc(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """ROC-AUC of ``softmax(model(x))[:, 1]`` over ``(x, y)`` batches."""
    from sklearn.metrics import roc_auc_score

    model.eval()
    scores = torch.cat([model(x).float().softmax(-1)[:, 1] for x, _ in data])
    return float(roc_auc_score(torch.cat([y for _, y in data]).numpy(), scores.numpy()))
