"""Train the fraud model and register it (``fraud`` on the ULB card data, ``fraud-card`` on the simulator).

Recipe (chosen on validation folds of the training period, see apps/fraud/README): several seeds of
FraudNet (BCE loss; pos_weight and focal loss measured worse) whose mean logit is floored and averaged
with a bagged gradient-boosted tree ensemble exported to tensors; Platt scaling and the threshold for
the target false-positive rate come from the last ``calib_frac`` of the training period, then every
part is refitted on the whole training period (``refit``) keeping the calibration.

The networks train through :class:`core.training.Trainer` (precision ``"auto"``, dynamic loss scaling,
checkpoints every ``checkpoint_every_n_steps``, ``resume``): all members sit in one :class:`FraudEnsemble`
and one run fits them on the same batches, each on its own loss (per-member bootstrap weights measured
worse on the validation folds), one Trainer run per phase under ``<keel_home>/checkpoints/<name>/``.

Run::

    python -m apps.fraud.train                      # ULB dev file, all of it, ~30 s on 2 CPU cores
    python -m apps.fraud.train --train-frac 0.8     # earlier 80% only (the later 20% is for keel eval)
    python -m apps.fraud.train --source simulator   # per-card GRU model on simulated transactions
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from torch import nn
from torch.utils.data import TensorDataset

from apps.fraud.checkpoints import PhaseCheckpoints, trainer_record
from apps.fraud.data import (
    ULB_DENSE_NAMES,
    ULB_LABEL,
    SimulatorConfig,
    load_ulb,
    simulate_transactions,
    time_split,
    ulb_dense_features,
)
from apps.fraud.evaluate import fraud_metrics, threshold_for_fpr
from apps.fraud.model import (
    FraudNet,
    FraudNetConfig,
    FraudPredictor,
)
from apps.fraud.trees import TreeEnsemble, export_hgb
from core.config import data_dir, keel_home
from core.registry import ModelRegistry, ModelVersion, fingerprint_arrays, fingerprint_file
from core.training import Trainer, TrainResult
from core.training.module import LossFn
from core.utils.registry import Registry

__all__ = ["FraudTrainConfig", "Arrays", "LOSSES", "FraudEnsemble", "fit_networks", "fit_predictor", "main"]

log = logging.getLogger(__name__)
ULB_DEV_FILE = "fraud/creditcard_ulb_sample_dev.csv"


@dataclass(frozen=True)
class FraudTrainConfig:
    """Training settings (all recorded in the registry entry)."""

    source: str = "ulb"  # "ulb" (real card data, no per-card history) or "simulator" (per-card sequences)
    data_path: str | None = None  # ULB-format CSV; default <data_dir>/fraud/creditcard_ulb_sample_dev.csv
    train_frac: float = 1.0  # earliest share of the file (by time) to train on; 1.0 = all of it
    calib_frac: float = 0.15  # last share of the training period for calibration and the threshold
    target_fpr: float = 0.003
    members: int = 8
    epochs: int = 40
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    hidden: int = 64
    depth: int = 2
    dropout: float = 0.2
    loss: str = "bce"
    warmup_frac: float = 0.3  # share of the steps with linear LR warm-up (then cosine decay), as OneCycle
    precision: str = "auto"  # core.training precision ("auto": bf16-mixed on recent GPUs, fp32 on CPU)
    checkpoint_dir: str | None = None  # default <keel_home>/checkpoints/<name>; a folder per training phase
    checkpoint_every_n_steps: int = 200
    resume: bool = False  # continue the networks' training from the checkpoints of a killed run
    progress: bool = True  # progress bars while the networks train
    history: int = 16  # simulator only: the card's last N transactions fed to the GRU (0 = dense only)
    trees: int = 5  # bagged GBDTs blended with the networks (0 = networks only)
    tree_iters: int = 200  # boosting rounds of each GBDT (learning rate 0.05, half the features per split)
    tree_weight: float = 0.5
    member_floor: float = -6.0
    refit: bool = True
    seed: int = 0
    sim_customers: int = 500
    sim_terminals: int = 1000
    sim_days: int = 60
    registry_root: str | None = None
    name: str | None = None  # default "fraud" (ulb) / "fraud-card" (simulator)


@dataclass
class Arrays:
    """Model inputs and labels for a set of transactions (seq/lengths are None without history)."""

    dense: np.ndarray  # (B, F) float32
    labels: np.ndarray  # (B,) int64
    seq: np.ndarray | None = None  # (B, N, S) float32
    lengths: np.ndarray | None = None  # (B,) int64

    def take(self, idx: np.ndarray) -> Arrays:
        pick = None if self.seq is None else self.seq[idx]
        return Arrays(self.dense[idx], self.labels[idx], pick, None if self.lengths is None else self.lengths[idx])


LOSSES: Registry[Any] = Registry("fraud loss")


@LOSSES.register("bce")
def _bce(logits: torch.Tensor, y: torch.Tensor, pos_weight: float) -> torch.Tensor:
    del pos_weight  # plain BCE keeps logits as log-odds, which the blend with the trees relies on
    return nn.functional.binary_cross_entropy_with_logits(logits, y)


@LOSSES.register("pos_weight")
def _weighted_bce(logits: torch.Tensor, y: torch.Tensor, pos_weight: float) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(
        logits, y, pos_weight=torch.tensor(pos_weight, device=logits.device)
    )


@LOSSES.register("focal")
def _focal(logits: torch.Tensor, y: torch.Tensor, pos_weight: float) -> torch.Tensor:
    del pos_weight  # focal loss (Lin et al. 2017), alpha 0.25, gamma 2
    ce = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    p = torch.sigmoid(logits)
    pt = torch.where(y > 0, p, 1 - p)
    alpha = torch.where(y > 0, 0.25, 0.75)
    return (alpha * (1 - pt) ** 2 * ce).mean()


def platt_fit(logits: np.ndarray, labels: np.ndarray, *, steps: int = 200) -> tuple[float, float]:
    """Fits Platt scaling ``p = sigmoid(a * logit + b)`` on a validation slice (LBFGS on the log-loss)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.float64)
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(params[0] * z + params[1], y)
        loss.backward()
        return loss

    opt.step(closure)
    a, b = params.detach().tolist()
    return float(a), float(b)


class FraudEnsemble(nn.Module):
    """The network members side by side, so one Trainer run fits all of them (each on its own loss)."""

    def __init__(self, members: list[FraudNet]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """FraudNet's inputs (dense, [seq, lengths]) -> (M, B) logits, one row per member."""
        return torch.stack([m(*inputs) for m in self.members])


def _dataset(data: Arrays) -> TensorDataset:
    tensors = [torch.from_numpy(data.dense)]
    if data.seq is not None and data.lengths is not None:
        tensors += [torch.from_numpy(data.seq), torch.from_numpy(data.lengths)]
    return TensorDataset(*tensors, torch.from_numpy(data.labels.astype(np.float32)))


def _ensemble_loss(loss: Any, pos_weight: float) -> LossFn:
    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        *inputs, y = batch
        logits = model(*inputs)  # (M, B)
        # Summed over members, not averaged: each member gets the gradient its own run would get.
        return loss(logits, y.expand_as(logits), pos_weight) * logits.shape[0]

    return loss_fn


def fit_networks(
    net_cfg: FraudNetConfig, data: Arrays, cfg: FraudTrainConfig, *, checkpoint_dir: Path | None, resume: bool = False
) -> tuple[list[FraudNet], TrainResult]:
    """Fits ``cfg.members`` FraudNets in one :class:`core.training.Trainer` run; returns them (CPU, eval)."""
    torch.manual_seed(cfg.seed)
    nets = [FraudNet(net_cfg) for _ in range(cfg.members)]
    valid_steps = None
    if data.seq is not None and data.lengths is not None:
        valid_steps = data.seq[np.arange(data.seq.shape[1])[None, :] < data.lengths[:, None]]
    for net in nets:
        net.set_standardisation(data.dense, valid_steps)
    rate = max(float(data.labels.mean()), 1e-6)
    per_epoch = math.ceil(len(data.labels) / cfg.batch_size)
    steps = cfg.epochs * per_epoch
    trainer = Trainer(
        FraudEnsemble(nets),
        loss_fn=_ensemble_loss(LOSSES.get(cfg.loss), (1 - rate) / rate),
        precision=cfg.precision,
        max_epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=int(cfg.warmup_frac * steps),
        checkpoint_dir=checkpoint_dir,
        checkpoint_every_n_steps=cfg.checkpoint_every_n_steps if checkpoint_dir else None,
        resume=resume,
        seed=cfg.seed,
        log_every_n_steps=min(50, per_epoch),  # Lightning warns when the interval exceeds an epoch
        progress=cfg.progress,
    )
    result = trainer.train(_dataset(data), batch_size=cfg.batch_size)
    return [net.cpu().eval() for net in nets], result


def _fit_parts(
    net_cfg: FraudNetConfig, data: Arrays, cfg: FraudTrainConfig, *, ckpt: PhaseCheckpoints, phase: str
) -> tuple[list[FraudNet], Any, TrainResult]:
    folder, resume = ckpt.phase(phase)
    members, result = fit_networks(net_cfg, data, cfg, checkpoint_dir=folder, resume=resume)
    if cfg.trees == 0:
        return members, None, result
    clfs = [
        HistGradientBoostingClassifier(
            learning_rate=0.05, max_iter=cfg.tree_iters, max_features=0.5, random_state=cfg.seed * 1000 + k
        ).fit(data.dense, data.labels)
        for k in range(cfg.trees)
    ]
    return members, TreeEnsemble(export_hgb(clfs)), result


def batched_logits(predictor: FraudPredictor, data: Arrays, *, batch: int = 4096) -> np.ndarray:
    """Uncalibrated blended logits for every row of ``data``."""
    out = []
    for i in range(0, len(data.labels), batch):
        part = data.take(np.arange(i, min(i + batch, len(data.labels))))
        seq = None if part.seq is None else torch.from_numpy(part.seq)
        lengths = None if part.lengths is None else torch.from_numpy(part.lengths)
        out.append(predictor.logits(torch.from_numpy(part.dense), seq, lengths).numpy())
    return np.concatenate(out)


def fit_predictor(
    net_cfg: FraudNetConfig,
    data: Arrays,
    cfg: FraudTrainConfig,
    *,
    feature_names: list[str],
    checkpoints: PhaseCheckpoints | None = None,
) -> tuple[FraudPredictor, dict[str, float], dict[str, TrainResult]]:
    """Fits members + trees on the earlier part, calibrates on the later ``calib_frac``, optionally refits.

    ``data`` must be in time order. Returns the predictor (featurizer unset), calibration metrics and
    the networks' Trainer result per phase (``"calibration"``, ``"final"`` with ``refit``).
    """
    ckpt = checkpoints or PhaseCheckpoints(None, False, {})
    cut = int(len(data.labels) * (1 - cfg.calib_frac))
    fit, calib = data.take(np.arange(cut)), data.take(np.arange(cut, len(data.labels)))
    if calib.labels.min() == calib.labels.max():
        raise ValueError("the calibration slice holds one class only; use more data or a larger calib_frac")
    members, trees, first = _fit_parts(net_cfg, fit, cfg, ckpt=ckpt, phase="calibration")
    runs = {"calibration": first}
    predictor = FraudPredictor(
        featurize=lambda items: (np.zeros((0, net_cfg.n_dense), np.float32), None, None),
        members=members,
        trees=trees,
        platt=(1.0, 0.0),
        threshold=0.5,
        feature_names=feature_names,
        reference=torch.from_numpy(fit.dense.mean(0)),
        tree_weight=cfg.tree_weight,
        member_floor=cfg.member_floor,
    )
    logits = batched_logits(predictor, calib)
    predictor.platt = platt_fit(logits, calib.labels)
    probs = predictor.probability(torch.from_numpy(logits)).numpy()
    predictor.threshold = threshold_for_fpr(probs, calib.labels, target_fpr=cfg.target_fpr)
    metrics = {f"calib_{k}": v for k, v in fraud_metrics(calib.labels, logits).items()}
    metrics["calib_fpr_at_threshold"] = float((probs[calib.labels == 0] >= predictor.threshold).mean())
    if cfg.refit:
        predictor.members, predictor.trees, runs["final"] = _fit_parts(net_cfg, data, cfg, ckpt=ckpt, phase="final")
        predictor.reference = torch.from_numpy(data.dense.mean(0))
    return predictor, metrics, runs


def _ulb_arrays(cfg: FraudTrainConfig) -> tuple[Arrays, dict[str, Any], str]:
    path = Path(cfg.data_path) if cfg.data_path else _default_ulb_path()
    frame = load_ulb(path)
    train = time_split(frame, cfg.train_frac)[0] if cfg.train_frac < 1.0 else frame.sort_values("Time", kind="stable")
    arrays = Arrays(ulb_dense_features(train), train[ULB_LABEL].to_numpy(np.int64))
    split = {"time_col": "Time", "train_frac": cfg.train_frac, "n_train": len(train)}
    split["train_time_max"] = float(train["Time"].max())
    return arrays, {"data_path": str(path.resolve()), "split": split}, fingerprint_file(path)


def _default_ulb_path() -> Path:
    root = data_dir()
    if root is None or not (root / ULB_DEV_FILE).is_file():
        raise FileNotFoundError(f"no ULB data: set data_path or KEEL_DATA_DIR (looked for <data dir>/{ULB_DEV_FILE})")
    return root / ULB_DEV_FILE


def _simulator_arrays(cfg: FraudTrainConfig) -> tuple[Arrays, dict[str, Any], str, list[str]]:
    from apps.fraud.features import FEATURE_NAMES, FraudFeatureBuilder

    sim = SimulatorConfig(
        n_customers=cfg.sim_customers, n_terminals=cfg.sim_terminals, n_days=cfg.sim_days, seed=cfg.seed
    )
    tx = simulate_transactions(sim)
    n_train = int(len(tx) * cfg.train_frac) if cfg.train_frac < 1.0 else len(tx)
    tx = tx.iloc[:n_train]
    # The label rides along so the builder can replay delayed fraud feedback (terminal risk) as it would arrive.
    cols = ["tx_id", "ts", "card_id", "terminal_id", "amount", "label"]
    dense, seq, lengths = FraudFeatureBuilder(history=cfg.history).transform(tx[cols].to_dict("records"))
    arrays = Arrays(np.asarray(dense, np.float32), tx["label"].to_numpy(np.int64))
    if cfg.history > 0:
        arrays.seq, arrays.lengths = np.asarray(seq, np.float32), np.asarray(lengths, np.int64)
    meta = {
        "simulator": dataclasses.asdict(sim),
        "split": {"time_col": "ts", "train_frac": cfg.train_frac, "n_train": n_train},
    }
    return arrays, meta, fingerprint_arrays(tx.to_numpy(np.float64)), list(FEATURE_NAMES)


def main(cfg: FraudTrainConfig) -> ModelVersion:
    """Trains, calibrates and registers the model (alias ``production``); returns the new version."""
    if cfg.source == "ulb":
        data, meta, fingerprint = _ulb_arrays(cfg)
        schema, names, history, n_seq = "ulb", list(ULB_DENSE_NAMES), 0, 0
    elif cfg.source == "simulator":
        data, meta, fingerprint, names = _simulator_arrays(cfg)
        schema, history = "card", cfg.history
        n_seq = 0 if data.seq is None else data.seq.shape[2]
    else:
        raise ValueError(f"unknown source {cfg.source!r}; expected 'ulb' or 'simulator'")
    net_cfg = FraudNetConfig(n_dense=data.dense.shape[1], n_seq=n_seq, history=history, hidden=cfg.hidden)
    net_cfg = dataclasses.replace(net_cfg, depth=cfg.depth, dropout=cfg.dropout)
    name = cfg.name or ("fraud" if schema == "ulb" else "fraud-card")
    root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else keel_home() / "checkpoints" / name
    ckpt = PhaseCheckpoints.for_recipe(root, dataclasses.asdict(cfg), resume=cfg.resume, data=fingerprint)
    predictor, metrics, runs = fit_predictor(net_cfg, data, cfg, feature_names=names, checkpoints=ckpt)
    config = {
        "schema": schema,
        "net": dataclasses.asdict(net_cfg),
        "feature_names": names,
        "target_fpr": cfg.target_fpr,
        "train": {**meta, "data_fingerprint": fingerprint},
        "recipe": dataclasses.asdict(cfg),
        "trainer": trainer_record(runs, root),
    }
    registry = ModelRegistry(cfg.registry_root)
    version = registry.register(
        name,
        predictor.registry_state(),
        architecture="fraudnet-blend",
        config=config,
        hparams=dataclasses.asdict(cfg),
        metrics=metrics,
        data_fingerprint=fingerprint,
        aliases=("production",),
    )
    log.info("registered %s: %s", version.ref, metrics)
    return version


def _parse_args(argv: list[str] | None = None) -> FraudTrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field in dataclasses.fields(FraudTrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        if isinstance(default, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default)
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, default=default)
    return FraudTrainConfig(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(main(_parse_args()).to_dict())
