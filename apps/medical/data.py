"""Chest X-ray data: the PneumoniaMNIST npz format, label subsets, X-ray augmentation and a synthetic generator.

The dev file (``<data dir>/medical/pneumoniamnist_dev.npz``) holds ``train_images`` (N, 28, 28) uint8,
``train_labels`` (N,) or (N, 1) with 0 = normal / 1 = pneumonia, and the same for ``val``. Any split name
works (``<split>_images`` / ``<split>_labels``), so the official test split loads unchanged.

Images stay 28x28 uint8 here; the model upsamples them to its input size (see ``model.py``), so training,
evaluation and serving share one preprocessing path.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

__all__ = [
    "CLASSES",
    "DEV_FILE",
    "IMAGE_SIZE",
    "MedicalDataError",
    "XraySplit",
    "augment_batch",
    "available_splits",
    "label_subset",
    "load_split",
    "resample_prevalence",
    "stratified_split",
    "synthetic_xrays",
]

CLASSES = ("normal", "pneumonia")
IMAGE_SIZE = 28
DEV_FILE = "medical/pneumoniamnist_dev.npz"


class MedicalDataError(ValueError):
    """The npz file or split is missing, malformed or holds unexpected values; the message names file and key."""


@dataclass(frozen=True)
class XraySplit:
    """Images (N, H, W) uint8 and labels (N,) int64 (0 normal, 1 pneumonia)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> XraySplit:
        return XraySplit(self.images[idx], self.labels[idx])

    def dataset(self) -> TensorDataset:
        """(image (1, H, W) uint8, label float32) pairs for a DataLoader."""
        images = torch.from_numpy(np.ascontiguousarray(self.images))[:, None]
        return TensorDataset(images, torch.from_numpy(self.labels.astype(np.float32)))


def available_splits(path: Path | str) -> list[str]:
    """Split names with both ``<split>_images`` and ``<split>_labels`` in the npz."""
    keys = set(_open(Path(path)).files)
    return sorted(k.removesuffix("_images") for k in keys if k.endswith("_images") and k[:-7] + "_labels" in keys)


def _open(path: Path) -> np.lib.npyio.NpzFile:
    if not path.is_file():
        raise MedicalDataError(f"{path}: no such file (expected an npz with <split>_images / <split>_labels)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise MedicalDataError(f"{path}: not a readable .npz file ({err})") from None


def load_split(path: Path | str, split: str) -> XraySplit:
    """Loads ``<split>_images`` and ``<split>_labels`` and checks shapes, dtypes and label values.

    Raises:
        MedicalDataError: naming the file and the key that is missing or wrong.
    """
    path = Path(path)
    npz = _open(path)
    with npz:
        img_key, lab_key = f"{split}_images", f"{split}_labels"
        missing = [k for k in (img_key, lab_key) if k not in npz.files]
        if missing:
            splits = ", ".join(available_splits(path)) or "none"
            raise MedicalDataError(f"{path}: no key {', '.join(missing)}; splits in the file: {splits}")
        try:
            images, labels = npz[img_key], npz[lab_key]
        except ValueError as err:  # object arrays need pickle, which we refuse
            raise MedicalDataError(f"{path}: {img_key}/{lab_key} unreadable without pickle ({err})") from None
    return XraySplit(_check_images(images, path, img_key), _check_labels(labels, len(images), path, lab_key))


def _check_images(images: np.ndarray, path: Path, key: str) -> np.ndarray:
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or min(images.shape) == 0:
        raise MedicalDataError(f"{path}: {key} must be (N, H, W) greyscale images, got shape {images.shape}")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.number) or not np.isfinite(images).all():
            raise MedicalDataError(f"{path}: {key} must hold finite numbers, got dtype {images.dtype}")
        top = 1.0 if images.max() <= 1.0 else 255.0  # [0, 1] floats or [0, 255] values
        images = np.clip(np.rint(images.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    return images


def _check_labels(labels: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    labels = np.asarray(labels).reshape(len(labels), -1) if labels.ndim else labels
    if labels.ndim != 2 or labels.shape[1] != 1 or labels.shape[0] != n:
        raise MedicalDataError(f"{path}: {key} must be (N,) or (N, 1) with N = {n} images, got shape {labels.shape}")
    labels = labels[:, 0]
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        raise MedicalDataError(
            f"{path}: {key} must be 0 (normal) or 1 (pneumonia); row {int(np.argmax(bad))} is {labels[bad][0].item()!r}"
        )
    return labels.astype(np.int64)


def stratified_split(labels: np.ndarray, frac: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held) with ``frac`` of each class held out (at least one of each class when it has two)."""
    rng = np.random.default_rng(seed)
    rest, held = [], []
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        k = min(len(idx) - 1, max(1, math.ceil(frac * len(idx)))) if len(idx) > 1 else 0
        held.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(held))


def label_subset(labels: np.ndarray, fraction: float, *, seed: int) -> np.ndarray:
    """Indices of a stratified ``fraction`` of the labelled images (the label-efficiency experiments)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return np.arange(len(labels))
    _, kept = stratified_split(labels, fraction, seed=seed)
    return kept


def resample_prevalence(split: XraySplit, prevalence: float, *, seed: int = 0) -> XraySplit:
    """``split`` with pneumonia (or normal) cases dropped at random until ``prevalence`` of it is pneumonia.

    A label-shift test set: the class-conditional images stay those of ``split``, only the class balance
    moves (e.g. val's 74% to the official test split's 62.5%).
    """
    if not 0 < prevalence < 1:
        raise ValueError(f"prevalence must be in (0, 1), got {prevalence}")
    neg, pos = np.flatnonzero(split.labels == 0), np.flatnonzero(split.labels == 1)
    n_pos = round(len(neg) * prevalence / (1 - prevalence))
    rng = np.random.default_rng(seed)
    if n_pos <= len(pos):
        keep = np.concatenate([neg, rng.choice(pos, n_pos, replace=False)])
    else:
        n_neg = round(len(pos) * (1 - prevalence) / prevalence)
        keep = np.concatenate([rng.choice(neg, n_neg, replace=False), pos])
    return split.take(np.sort(keep))


def augment_batch(x: torch.Tensor, *, generator: torch.Generator | None = None, strength: float = 1.0) -> torch.Tensor:
    """Random X-ray-plausible changes of a batch (B, 1, H, W) float in [0, 1].

    Small rotations (+-10 deg), shifts (+-8%), zoom (0.9-1.1), and exposure changes (contrast 0.75-1.25,
    brightness +-0.1, gamma 0.8-1.25) as between scanners and patients. No horizontal flip: a chest
    X-ray is not left-right symmetric (the heart sits on the left).
    """
    b = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator).to(x.device)

    angle = uniform(-10, 10) * strength * math.pi / 180
    scale = 1 + uniform(-0.1, 0.1) * strength
    shift = torch.stack([uniform(-0.08, 0.08), uniform(-0.08, 0.08)], 1) * strength * 2  # grid units: [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gamma = torch.exp(uniform(math.log(0.8), math.log(1.25)) * strength)[:, None, None, None]
    contrast = (1 + uniform(-0.25, 0.25) * strength)[:, None, None, None]
    bright = (uniform(-0.1, 0.1) * strength)[:, None, None, None]
    out = out.clamp(0, 1) ** gamma
    mean = out.mean(dim=(2, 3), keepdim=True)
    return ((out - mean) * contrast + mean + bright).clamp(0, 1)


def synthetic_xrays(n: int, *, seed: int = 0, size: int = IMAGE_SIZE, positive_rate: float = 0.7) -> XraySplit:
    """Toy 'X-rays' for unit tests: two dark lung fields; pneumonia adds bright blotches inside them.

    Learnable in a few steps by a tiny network, so tests can check that training really trains.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    lungs = np.exp(-(((xx - 0.3) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2)) + np.exp(
        -(((xx - 0.7) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2)
    )
    labels = (rng.random(n) < positive_rate).astype(np.int64)
    images = np.empty((n, size, size), np.uint8)
    for i in range(n):
        img = 0.75 - 0.5 * lungs + 0.05 * rng.standard_normal((size, size))
        if labels[i]:
            for _ in range(3):
                cx, cy = rng.choice([0.3, 0.7]) + rng.normal(0, 0.04), rng.uniform(0.35, 0.65)
                img += 0.45 * np.exp(-(((xx - cx) / 0.07) ** 2 + ((yy - cy) / 0.07) ** 2))
        images[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return XraySplit(images, labels)
