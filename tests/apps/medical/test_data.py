"""The npz loader's checks and clear errors, label subsets and the X-ray augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from apps.medical.data import (
    MedicalDataError,
    augment_batch,
    available_splits,
    label_subset,
    load_split,
    stratified_split,
    synthetic_xrays,
)


def test_any_split_name_loads(synthetic_npz: Path) -> None:
    assert available_splits(synthetic_npz) == ["test", "train"]
    test = load_split(synthetic_npz, "test")
    assert test.images.shape == (80, 28, 28) and test.images.dtype == np.uint8
    assert test.labels.dtype == np.int64 and set(np.unique(test.labels)) == {0, 1}
    assert load_split(synthetic_npz, "train").labels.shape == (160,)  # (N, 1) labels are flattened


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"train_images": np.zeros((4, 28, 28), np.uint8)}, r"no key val_images, val_labels; splits in the file: none"),
        ({"val_images": np.zeros((4, 28), np.uint8), "val_labels": np.zeros(4)}, r"val_images must be \(N, H, W\)"),
        ({"val_images": np.zeros((4, 28, 28), np.uint8), "val_labels": np.zeros(3)}, r"val_labels .* N = 4"),
        ({"val_images": np.zeros((3, 28, 28), np.uint8), "val_labels": np.array([0, 2, 1])}, r"row 1 is 2"),
        ({"val_images": np.full((2, 28, 28), np.nan), "val_labels": np.zeros(2)}, "finite numbers"),
    ],
)
def test_bad_files_name_the_file_and_key(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(MedicalDataError, match=message) as info:
        load_split(path, "val")
    assert str(path) in str(info.value)


def test_missing_and_non_npz_files(tmp_path: Path) -> None:
    with pytest.raises(MedicalDataError, match="no such file"):
        load_split(tmp_path / "nope.npz", "val")
    junk = tmp_path / "junk.npz"
    junk.write_text("hello")
    with pytest.raises(MedicalDataError, match="not a readable .npz"):
        load_split(junk, "val")


def test_float_images_in_unit_range_are_rescaled(tmp_path: Path) -> None:
    path = tmp_path / "float.npz"
    np.savez(path, x_images=np.full((2, 28, 28), 0.5, np.float32), x_labels=np.array([0, 1]))
    assert int(load_split(path, "x").images[0, 0, 0]) == 128


def test_label_subsets_are_stratified_and_nested_in_the_data() -> None:
    labels = synthetic_xrays(1000, seed=0).labels
    idx = label_subset(labels, 0.1, seed=0)
    assert 95 <= len(idx) <= 105 and abs(labels[idx].mean() - labels.mean()) < 0.02
    assert len(label_subset(labels, 1.0, seed=0)) == 1000
    rest, held = stratified_split(labels[idx], 0.15, seed=0)
    assert not set(rest) & set(held) and len(rest) + len(held) == len(idx)
    assert set(labels[idx][held]) == {0, 1}
    with pytest.raises(ValueError, match="label fraction"):
        label_subset(labels, 0.0, seed=0)


def test_augmentation_keeps_range_and_shape_and_changes_the_image() -> None:
    x = torch.from_numpy(synthetic_xrays(8, seed=0).images).float()[:, None] / 255
    out = augment_batch(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().mean() > 0.01
    again = augment_batch(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)
    torch.testing.assert_close(augment_batch(x, strength=0.0), x, atol=1e-5, rtol=0)
