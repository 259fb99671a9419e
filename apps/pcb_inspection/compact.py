"""A compact copy of a DeepPCB tree: images thresholded to 1-bit PNGs (~7 MB for the 1,000 trainval pairs).

The copy keeps the layout (``group*/<id>/<n>_test.png``, ``_temp.png``, ``<id>_not/<n>.txt``) and rewrites each list
file with ``.png`` image entries, so :func:`apps.pcb_inspection.data.read_list` reads it like the original. The
threshold is :func:`apps.pcb_inspection.data.binarize`, the one the loader applies, so both give identical inputs.
Used to carry the data to a GPU machine inside the repository (``.carry/`` is git-ignored).

Run::

    python -m apps.pcb_inspection.compact ../shared/data/pcb/DeepPCB/PCBData .carry/pcb/PCBData
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

from apps.pcb_inspection.data import read_binary, read_list

__all__ = ["compact_tree"]


def compact_tree(src: Path | str, dst: Path | str, *, lists: tuple[str, ...] = ("trainval.txt", "test.txt")) -> int:
    """Converts every pair named in ``src``'s list files into 1-bit PNGs under ``dst``; returns the pair count.

    Args:
        src: a DeepPCB ``PCBData`` folder (list files and ``group*`` folders).
        dst: the compact copy's folder (created).
        lists: list-file names to convert when present in ``src``.
    """
    src, dst = Path(src), Path(dst)
    found = [src / name for name in lists if (src / name).is_file()]
    if not found:
        raise FileNotFoundError(f"no list file ({', '.join(lists)}) in {src}")
    done = 0
    for list_file in found:
        lines = []
        for record in read_list(list_file, src):
            for image in (record.test, record.template):
                out = dst / image.relative_to(src).with_suffix(".png")
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(read_binary(image) * 255).convert("1").save(out, optimize=True)
            label = dst / record.labels_path.relative_to(src)
            label.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(record.labels_path, label)
            entry = record.test.relative_to(src).with_name(record.test.stem.removesuffix("_test") + ".png")
            lines.append(f"{entry.as_posix()} {record.labels_path.relative_to(src).as_posix()}")
            done += 1
        (dst / list_file.name).write_text("\n".join(lines) + "\n")
    return done


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="DeepPCB PCBData folder")
    parser.add_argument("dst", type=Path, help="where the compact copy goes (e.g. .carry/pcb/PCBData)")
    args = parser.parse_args()
    n = compact_tree(args.src, args.dst)
    size = sum(p.stat().st_size for p in args.dst.rglob("*") if p.is_file())
    print(f"{n} pairs -> {args.dst} ({size / 1e6:.1f} MB)")
