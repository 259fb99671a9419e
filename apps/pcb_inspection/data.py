"""DeepPCB data: pair lists, ``x1,y1,x2,y2,type`` labels, binarised images, box-preserving augmentation, splits.

DeepPCB (Tang et al., "On-line PCB Defect Detector On A New PCB Defect Dataset", 2019) pairs each 640x640
binarised test image with its defect-free template. A list file has one pair per line::

    group20085/20085/20085000.jpg group20085/20085_not/20085000.txt

meaning ``20085000_test.jpg`` + ``20085000_temp.jpg`` in ``group20085/20085/`` and the boxes in the ``.txt``
(``x1,y1,x2,y2,type`` per line; the released files separate with spaces, the README with commas: both are read).
Types 1..6 are open, short, mousebite, spur, copper, pin-hole.

Images are binarised on load (:func:`binarize`, grey > 127), so the original JPEGs and the 1-bit PNG compact
copy written by :mod:`apps.pcb_inspection.compact` give identical inputs.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = [
    "CLASSES",
    "DataFormatError",
    "PairRecord",
    "PcbDataset",
    "binarize",
    "board_group_split",
    "collate",
    "read_binary",
    "read_labels",
    "read_list",
    "random_split",
    "resolve_data_dir",
    "shift_image",
    "synthetic_pair",
    "write_synthetic_set",
]

log = logging.getLogger(__name__)

#: DeepPCB type ids 1..6, in order; a model's class index is ``type - 1``.
CLASSES = ("open", "short", "mousebite", "spur", "copper", "pin-hole")


class DataFormatError(ValueError):
    """A list, label or image file is not in the DeepPCB format; the message names the file (and line)."""


@dataclass(frozen=True)
class PairRecord:
    """One template/test pair and its boxes.

    Attributes:
        test: the test image path.
        template: the defect-free template path.
        labels_path: the label file path.
        group: the board group (the list path's first folder, e.g. ``group20085``).
        boxes: (N, 4) float32 ``x1, y1, x2, y2`` in pixels.
        classes: (N,) int64 class indices ``0..5`` (DeepPCB type - 1).
    """

    test: Path
    template: Path
    labels_path: Path
    group: str
    boxes: np.ndarray
    classes: np.ndarray


def binarize(grey: np.ndarray) -> np.ndarray:
    """(H, W) grey levels -> (H, W) uint8 in {0, 1} (grey > 127), the one threshold used everywhere."""
    return (np.asarray(grey) > 127).astype(np.uint8)


def read_binary(path: Path | str) -> np.ndarray:
    """Reads an image file as a binarised (H, W) uint8 array in {0, 1}."""
    try:
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DataFormatError(f"{path}: not a readable image ({exc})") from None
    return binarize(grey)


def read_labels(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """Parses a DeepPCB label file into ``(boxes (N, 4) float32, classes (N,) int64)``.

    Raises:
        DataFormatError: a line is not five integers ``x1,y1,x2,y2,type`` with x2 > x1, y2 > y1, type in 1..6.
    """
    boxes, classes = [], []
    text = Path(path).read_text()
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.replace(",", " ").split()
        if not fields:
            continue
        try:
            x1, y1, x2, y2, kind = (int(f) for f in fields)
        except ValueError:
            raise DataFormatError(
                f"{path}:{lineno}: expected 'x1,y1,x2,y2,type' (five integers), got {line!r}"
            ) from None
        if x2 <= x1 or y2 <= y1 or min(x1, y1) < 0:
            raise DataFormatError(f"{path}:{lineno}: box {x1},{y1},{x2},{y2} needs 0 <= x1 < x2 and 0 <= y1 < y2")
        if not 1 <= kind <= len(CLASSES):
            raise DataFormatError(f"{path}:{lineno}: type {kind} is not one of 1..6 ({', '.join(CLASSES)})")
        boxes.append((x1, y1, x2, y2))
        classes.append(kind - 1)
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(classes, dtype=np.int64)


def resolve_data_dir(data_dir: Path | str, list_file: Path | str) -> Path:
    """The folder the list's paths are relative to: ``data_dir``, or its ``PCBData`` child (the released layout)."""
    data_dir, list_file = Path(data_dir), Path(list_file)
    first = next((ln.split() for ln in list_file.read_text().splitlines() if ln.strip()), None)
    if first is None:
        raise DataFormatError(f"{list_file}: the list is empty")
    for root in (data_dir, data_dir / "PCBData"):
        if _pair_paths(root, first[0])[0].is_file():
            if root != data_dir:
                log.info("pair paths resolve under %s", root)
            return root
    tried = _pair_paths(data_dir, first[0])[0]
    raise DataFormatError(f"{list_file}:1: {tried} does not exist (nor under {data_dir / 'PCBData'}); check --data-dir")


def _pair_paths(root: Path, image_entry: str) -> tuple[Path, Path]:
    entry = root / image_entry
    return entry.with_name(f"{entry.stem}_test{entry.suffix}"), entry.with_name(f"{entry.stem}_temp{entry.suffix}")


def read_list(list_file: Path | str, data_dir: Path | str | None = None) -> list[PairRecord]:
    """Reads a DeepPCB pair list (any list file in the format of ``trainval.txt`` / ``test.txt``).

    Args:
        list_file: the list; each line ``<group>/<id>/<n>.<ext> <group>/<id>_not/<n>.txt``.
        data_dir: the folder the paths are relative to (default: the list's folder); see :func:`resolve_data_dir`.

    Raises:
        DataFormatError: naming the list file and line of a malformed line or missing file.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataFormatError(f"{list_file}: list file not found")
    root = resolve_data_dir(data_dir if data_dir is not None else list_file.parent, list_file)
    records = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{list_file}:{lineno}"
        if len(fields) != 2:
            raise DataFormatError(f"{where}: expected '<image path> <label path>', got {line!r}")
        test, template = _pair_paths(root, fields[0])
        labels_path = root / fields[1]
        for path in (test, template, labels_path):
            if not path.is_file():
                raise DataFormatError(f"{where}: {path} does not exist")
        boxes, classes = read_labels(labels_path)
        group = Path(fields[0]).parts[0]
        records.append(PairRecord(test, template, labels_path, group, boxes, classes))
    if not records:
        raise DataFormatError(f"{list_file}: the list is empty")
    return records


def board_group_split(
    records: Sequence[PairRecord], *, holdout: float = 0.2
) -> tuple[list[PairRecord], list[PairRecord]]:
    """Train / held-out parts with no board group in both; the held-out part is as close to ``holdout`` as possible.

    Deterministic: among the group subsets whose size is nearest ``holdout * len(records)``, the one with the
    most groups (the most varied boards), then the first in sorted-name order. Exhaustive up to 16 groups,
    greedy (largest first) beyond.
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    sizes: dict[str, int] = {}
    for r in records:
        sizes[r.group] = sizes.get(r.group, 0) + 1
    if len(sizes) < 2:
        raise ValueError(f"a board-group split needs at least 2 groups, found {sorted(sizes)}")
    names, target = sorted(sizes), holdout * len(records)
    if len(names) <= 16:
        subsets = (s for k in range(1, len(names)) for s in itertools.combinations(names, k))
        chosen = min(subsets, key=lambda s: (abs(sum(sizes[g] for g in s) - target), -len(s), s))
    else:
        picked: list[str] = []
        for g in sorted(names, key=lambda g: -sizes[g]):
            if sum(sizes[p] for p in picked) + sizes[g] <= target:
                picked.append(g)
        chosen = tuple(picked or names[:1])
    held = set(chosen)
    return [r for r in records if r.group not in held], [r for r in records if r.group in held]


def random_split(
    records: Sequence[PairRecord], *, holdout: float = 0.2, seed: int = 0
) -> tuple[list[PairRecord], list[PairRecord]]:
    """A random pair-level split (boards of one group land on both sides: an easier, optimistic split)."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_held = round(holdout * len(records))
    held = set(order[:n_held])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def shift_image(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """(H, W) image moved right by ``dx`` and down by ``dy`` pixels; uncovered borders repeat the edge."""
    h, w = image.shape
    pad = max(abs(dx), abs(dy))
    if pad == 0:
        return image
    padded = np.pad(image, pad, mode="edge")
    return padded[pad - dy : pad - dy + h, pad - dx : pad - dx + w]


class PcbDataset(Dataset):
    """Template/test pairs as ``(image (2, H, W) uint8 {0,1}, has_template, boxes (N, 4), classes (N,))``.

    Channel 0 is the test image, channel 1 the template. Images are decoded once and kept bit-packed
    (50 KB a pair). With ``train=True`` each item is augmented, boxes kept right: a random crop, one of the
    8 flips/rotations by 90 degrees (applied to both images), a random template misregistration of up to
    ``max_shift`` px in x and y, and, with probability ``template_dropout``, no template at all (so the model
    also works when a caller has none). With probability ``same_pair`` the template is replaced by the test image
    itself and the boxes are dropped: a defect that the reference shares is no defect. Without these pairs a
    detector learns what defects look like and barely looks at the template, which fails on unseen boards.

    Args:
        records: the pairs.
        train: augment (else items are whole, untouched pairs).
        crop: side of the random square crop (train only; None or >= the image side: no crop).
        max_shift: largest template shift in pixels along each axis (train only).
        template_dropout: probability that an item comes without its template (train only).
        same_pair: probability that an item's template is its own test image, with no boxes (train only).
        seed: base seed of the augmentation RNG (mixed with the item index and an epoch counter).
    """

    def __init__(
        self,
        records: Sequence[PairRecord],
        *,
        train: bool = False,
        crop: int | None = None,
        max_shift: int = 0,
        template_dropout: float = 0.0,
        same_pair: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.records = list(records)
        self.train, self.crop, self.max_shift = train, crop, max_shift
        self.template_dropout, self.same_pair = template_dropout, same_pair
        self.rng = np.random.default_rng(seed)
        self._rng_worker: tuple[int, int] | None = None
        self._packed: list[tuple[np.ndarray, tuple[int, int]]] = []
        for r in self.records:
            test, template = read_binary(r.test), read_binary(r.template)
            if test.shape != template.shape:
                raise DataFormatError(
                    f"{r.test} is {test.shape[::-1]} but its template {r.template} is "
                    f"{template.shape[::-1]}; a pair must have one size"
                )
            self._packed.append((np.packbits(np.stack([test, template])), test.shape))

    def __len__(self) -> int:
        return len(self.records)

    def pair(self, index: int) -> np.ndarray:
        """(2, H, W) uint8 {0, 1}: test and template of pair ``index``, unaugmented."""
        packed, (h, w) = self._packed[index]
        return np.unpackbits(packed, count=2 * h * w).reshape(2, h, w)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool, torch.Tensor, torch.Tensor]:
        r = self.records[index]
        image, boxes, classes, has_template = self.pair(index), r.boxes.copy(), r.classes.copy(), True
        if self.train:
            image, boxes, classes, has_template = self._augment(image, boxes, classes)
        return (
            torch.from_numpy(np.ascontiguousarray(image)),
            has_template,
            torch.from_numpy(boxes),
            torch.from_numpy(classes),
        )

    def _augment(
        self, image: np.ndarray, boxes: np.ndarray, classes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        rng = self._worker_rng()
        if self.same_pair > 0 and rng.random() < self.same_pair:  # no draw when off: older runs stay reproducible
            image, boxes, classes = np.stack([image[0], image[0]]), boxes[:0], classes[:0]
        if self.max_shift > 0:
            dx, dy = (int(v) for v in rng.integers(-self.max_shift, self.max_shift + 1, size=2))
            image = np.stack([image[0], shift_image(image[1], dx, dy)])
        _, h, w = image.shape
        if self.crop is not None and self.crop < min(h, w):
            image, boxes, classes = _random_crop(image, boxes, classes, self.crop, rng)
        image, boxes = _random_dihedral(image, boxes, int(rng.integers(8)))
        has_template = bool(rng.random() >= self.template_dropout)
        return image, boxes.astype(np.float32), classes, has_template

    def _worker_rng(self) -> np.random.Generator:
        # Each DataLoader worker holds a copy of this dataset: reseed it from the worker's own seed once,
        # or every worker would draw the same augmentations.
        info = torch.utils.data.get_worker_info()
        if info is not None and self._rng_worker != (info.id, info.seed):
            self.rng = np.random.default_rng(int(info.seed) % 2**32)
            self._rng_worker = (info.id, info.seed)
        return self.rng


def _random_crop(
    image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Square crop; boxes are clipped, and dropped when less than half of them stays inside."""
    _, h, w = image.shape
    y0, x0 = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    image = image[:, y0 : y0 + size, x0 : x0 + size]
    moved = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
    clipped = np.clip(moved, 0, size)
    area = lambda b: (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)  # noqa: E731
    keep = area(clipped) >= 0.5 * area(moved)
    return image, clipped[keep], classes[keep]


def _random_dihedral(image: np.ndarray, boxes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One of the 8 symmetries of the square (k in 0..7): optional transpose, then optional x / y flips."""
    _, h, w = image.shape
    boxes = boxes.copy()
    if k & 4:
        image = image.transpose(0, 2, 1)
        boxes = boxes[:, [1, 0, 3, 2]]
        h, w = w, h
    if k & 1:
        image = image[:, :, ::-1]
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    if k & 2:
        image = image[:, ::-1, :]
        boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
    return image, boxes


def collate(
    items: Sequence[tuple[torch.Tensor, bool, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batches items: images (B, 2, H, W) uint8, has_template (B,) bool, boxes (B, M, 4), classes (B, M) (-1 = pad)."""
    images = torch.stack([it[0] for it in items])
    has_template = torch.tensor([it[1] for it in items], dtype=torch.bool)
    m = max(1, max(len(it[3]) for it in items))
    boxes = torch.zeros(len(items), m, 4)
    classes = torch.full((len(items), m), -1, dtype=torch.int64)
    for i, (_, _, b, c) in enumerate(items):
        boxes[i, : len(c)], classes[i, : len(c)] = b, c
    return images, has_template, boxes, classes


def synthetic_pair(
    rng: np.random.Generator, *, size: int = 128, n_defects: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A tiny synthetic board for unit tests: ``(test, template, boxes (N, 4), classes (N,))``, images 0/255.

    The template has random copper tracks; the test image copies it and adds "copper" blobs (class 4) and
    "open" gaps (class 0) cut into tracks, each boxed.
    """
    template = np.zeros((size, size), dtype=np.uint8)
    for _ in range(6):
        if rng.random() < 0.5:
            y = int(rng.integers(4, size - 8))
            template[y : y + 4, :] = 255
        else:
            x = int(rng.integers(4, size - 8))
            template[:, x : x + 4] = 255
    test, boxes, classes = template.copy(), [], []
    for _ in range(n_defects):
        x, y = (int(v) for v in rng.integers(8, size - 16, size=2))
        if rng.random() < 0.5:
            test[y : y + 6, x : x + 6] = 255 - test[y : y + 6, x : x + 6].max()
            boxes.append((x - 2, y - 2, x + 8, y + 8))
            classes.append(4)
        else:
            test[y : y + 6, x : x + 6] = 0
            test[y + 2 : y + 4, x + 1 : x + 5] = 255
            boxes.append((x - 2, y - 2, x + 8, y + 8))
            classes.append(0)
    return test, template, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64)


def write_synthetic_set(
    root: Path | str, *, n: int = 8, groups: int = 2, size: int = 128, seed: int = 0, ext: str = "jpg"
) -> Path:
    """Writes a synthetic set in the DeepPCB layout under ``root``; returns the list file (``trainval.txt``)."""
    root, rng, lines = Path(root), np.random.default_rng(seed), []
    for i in range(n):
        group_id = f"{10000 * (1 + i % groups):05d}"
        pair_id = f"{group_id}{i:03d}"
        folder, labels = root / f"group{group_id}" / group_id, root / f"group{group_id}" / f"{group_id}_not"
        folder.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        test, template, boxes, classes = synthetic_pair(rng, size=size)
        Image.fromarray(test).save(folder / f"{pair_id}_test.{ext}")
        Image.fromarray(template).save(folder / f"{pair_id}_temp.{ext}")
        rows = [f"{int(b[0])} {int(b[1])} {int(b[2])} {int(b[3])} {c + 1}" for b, c in zip(boxes, classes, strict=True)]
        (labels / f"{pair_id}.txt").write_text("\n".join(rows) + "\n")
        lines.append(f"group{group_id}/{group_id}/{pair_id}.{ext} group{group_id}/{group_id}_not/{pair_id}.txt")
    list_file = root / "trainval.txt"
    list_file.write_text("\n".join(lines) + "\n")
    return list_file
