"""DeepPCB data: list/label parsing (errors name file and line), splits, box-preserving augmentation, compact copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from apps.pcb_inspection.compact import compact_tree
from apps.pcb_inspection.data import (
    DataFormatError,
    PcbDataset,
    _random_dihedral,
    board_group_split,
    collate,
    random_split,
    read_binary,
    read_labels,
    read_list,
    shift_image,
    write_synthetic_set,
)


def test_labels_accept_commas_and_spaces(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("1,2,30,40,1\n\n5 6 70 80 6\n")
    boxes, classes = read_labels(f)
    np.testing.assert_array_equal(boxes, [[1, 2, 30, 40], [5, 6, 70, 80]])
    np.testing.assert_array_equal(classes, [0, 5])


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("1,2,30,40", "five integers"),
        ("1,2,30,x,1", "five integers"),
        ("30,2,1,40,1", "x1 < x2"),
        ("1,2,3,4,7", "1..6"),
    ],
)
def test_bad_label_lines_name_file_and_line(tmp_path: Path, line: str, why: str) -> None:
    f = tmp_path / "bad.txt"
    f.write_text(f"1,2,30,40,1\n{line}\n")
    with pytest.raises(DataFormatError, match=rf"bad\.txt:2: .*{why}"):
        read_labels(f)


def test_read_list_finds_pairs_and_groups(tmp_path: Path) -> None:
    list_file = write_synthetic_set(tmp_path, n=6, groups=3, ext="png")
    records = read_list(list_file)
    assert len(records) == 6 and len({r.group for r in records}) == 3
    assert records[0].test.name.endswith("_test.png") and records[0].template.name.endswith("_temp.png")
    assert records[0].boxes.shape[1] == 4 and len(records[0].boxes) == len(records[0].classes)
    # --data-dir may name the PCBData folder or its parent (the released layout).
    parent = tmp_path.parent / "released"
    (parent / "PCBData").parent.mkdir(exist_ok=True)
    (parent / "PCBData").symlink_to(tmp_path)
    assert len(read_list(list_file, parent)) == 6


def test_read_list_errors_name_file_and_line(tmp_path: Path) -> None:
    list_file = write_synthetic_set(tmp_path, n=3, ext="png")
    lines = list_file.read_text().splitlines()
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join([lines[0], lines[1].split()[0], lines[2]]) + "\n")
    with pytest.raises(DataFormatError, match=r"bad\.txt:2: expected '<image path> <label path>'"):
        read_list(bad)
    missing = tmp_path / "missing.txt"
    missing.write_text("\n".join([lines[0], lines[1].replace(".png ", "9.png ")]) + "\n")
    with pytest.raises(DataFormatError, match=r"missing\.txt:2: .*does not exist"):
        read_list(missing)
    with pytest.raises(DataFormatError, match="not found"):
        read_list(tmp_path / "nope.txt")


def test_board_group_split_keeps_groups_apart(tmp_path: Path) -> None:
    records = read_list(write_synthetic_set(tmp_path, n=20, groups=5, ext="png"))
    train, held = board_group_split(records, holdout=0.2)
    assert not {r.group for r in train} & {r.group for r in held}
    assert len(held) == 4 and len(train) + len(held) == 20
    again = board_group_split(records, holdout=0.2)[1]
    assert [r.test for r in again] == [r.test for r in held]


def test_random_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    records = read_list(write_synthetic_set(tmp_path, n=10, ext="png"))
    train, held = random_split(records, holdout=0.3, seed=1)
    assert len(held) == 3 and not {r.test for r in train} & {r.test for r in held}
    assert [r.test for r in random_split(records, holdout=0.3, seed=1)[1]] == [r.test for r in held]


def test_shift_image_moves_content() -> None:
    img = np.zeros((10, 10), np.uint8)
    img[4, 4] = 1
    moved = shift_image(img, 2, -3)
    assert moved[1, 6] == 1 and moved.sum() == 1


@pytest.mark.parametrize("k", range(8))
def test_dihedral_transforms_keep_boxes_on_their_pixels(k: int) -> None:
    image = np.zeros((2, 40, 60), np.uint8)
    image[0, 5:12, 30:50] = 1  # a 20 x 7 defect at x 30..50, y 5..12
    boxes = np.array([[30, 5, 50, 12]], np.float32)
    out, moved = _random_dihedral(image, boxes, k)
    x1, y1, x2, y2 = moved[0].astype(int)
    assert out[0, y1:y2, x1:x2].all() and out[0].sum() == (x2 - x1) * (y2 - y1) == 140


def test_training_items_are_augmented_with_boxes_inside(tmp_path: Path) -> None:
    records = read_list(write_synthetic_set(tmp_path, n=4, size=128, ext="png"))
    data = PcbDataset(records, train=True, crop=64, max_shift=4, template_dropout=0.5, seed=0)
    flags = []
    for i in range(40):
        image, has_template, boxes, classes = data[i % 4]
        assert image.shape == (2, 64, 64) and image.dtype == torch.uint8 and int(image.max()) <= 1
        assert len(boxes) == len(classes) and (boxes >= 0).all() and (boxes <= 64).all()
        flags.append(has_template)
    assert 5 < sum(flags) < 35  # template dropout happens, not always


def test_template_dropout_one_never_gives_a_template(tmp_path: Path) -> None:
    records = read_list(write_synthetic_set(tmp_path, n=4, size=128, ext="png"))
    data = PcbDataset(records, train=True, crop=64, max_shift=4, template_dropout=1.0, seed=0)
    assert not any(data[i % 4][1] for i in range(40))  # a test-image-only detector's training items


def test_same_pairs_show_the_test_image_twice_and_have_no_boxes(tmp_path: Path) -> None:
    records = read_list(write_synthetic_set(tmp_path, n=4, size=128, ext="png"))
    assert all(len(r.classes) for r in records)
    data = PcbDataset(records, train=True, same_pair=0.5, seed=0)  # whole pairs: every defect stays in view
    same = 0
    for i in range(40):
        image, has_template, boxes, classes = data[i % 4]
        assert has_template
        if torch.equal(image[0], image[1]):  # a real pair always differs: its defects are drawn on the test image
            assert len(boxes) == len(classes) == 0
            same += 1
        else:
            assert len(boxes) > 0
    assert 5 < same < 35
    off = PcbDataset(records, train=True, seed=0)
    assert not any(torch.equal(off[i % 4][0][0], off[i % 4][0][1]) for i in range(20))


def test_loader_workers_draw_different_augmentations(tmp_path: Path) -> None:
    records = read_list(write_synthetic_set(tmp_path, n=1, size=128, ext="png"))
    data = PcbDataset(records * 4, train=True, crop=64, max_shift=4, seed=0)
    loader = DataLoader(data, batch_size=1, num_workers=2, collate_fn=collate, shuffle=False)
    images = [batch[0] for batch in loader]
    # Items 0 and 1 are the same pair, each the first draw of its worker: a shared RNG state would repeat it.
    assert not torch.equal(images[0], images[1])


def test_collate_pads_boxes() -> None:
    a = (torch.zeros(2, 8, 8, dtype=torch.uint8), True, torch.ones(2, 4), torch.tensor([0, 3]))
    b = (torch.zeros(2, 8, 8, dtype=torch.uint8), False, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    images, has, boxes, classes = collate([a, b])
    assert images.shape == (2, 2, 8, 8) and has.tolist() == [True, False]
    assert boxes.shape == (2, 2, 4) and classes.tolist() == [[0, 3], [-1, -1]]


def test_compact_copy_gives_identical_inputs(tmp_path: Path) -> None:
    list_file = write_synthetic_set(tmp_path / "src", n=3, ext="jpg")
    assert compact_tree(tmp_path / "src", tmp_path / "dst") == 3
    original, compact = read_list(list_file), read_list(tmp_path / "dst" / "trainval.txt")
    for a, b in zip(original, compact, strict=True):
        assert b.test.suffix == ".png"
        np.testing.assert_array_equal(read_binary(a.test), read_binary(b.test))
        np.testing.assert_array_equal(read_binary(a.template), read_binary(b.template))
        np.testing.assert_array_equal(a.boxes, b.boxes)


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(DataFormatError, match=r"x\.png: not a readable image"):
        read_binary(tmp_path / "x.png")
