"""Ranked image pairs from a Hugging Face `datasets` dataset: Pick-a-Pic's layout, or prompt/chosen/rejected.

Pick-a-Pic (Kirstain et al. 2023; `yuvalkirstain/pickapic_v2`, PickScore's training data): one row per pair,
`caption`, the two images as encoded bytes `jpg_0`/`jpg_1`, and `label_0`/`label_1` = (1, 0), (0, 1) or
(0.5, 0.5) for a tie, which PickScore trains on as a soft label (so does align). The other layout is a
`prompt` (or `caption`) with images `chosen` and `rejected`. An image cell may be encoded bytes, a
`datasets.Image` cell ({"bytes", "path"}, read undecoded) or a file path (a relative one in a local dataset's folder
where it is there).

Images are not decoded here: each candidate is a key ("hf:NAME:SPLIT/ROW/COLUMN") that `HFImages.open`
turns into a readable file when the image store decodes it, so a memory-mapped dataset stays on disk.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
from pathlib import Path

from .hf import iter_rows, open_dataset
from .records import DataError, PreferenceGroup, group_from_pair

logger = logging.getLogger(__name__)

LAYOUTS = (  # (prompt columns to try, image columns, label columns or None: the first image is the chosen one)
    (("caption", "prompt"), ("jpg_0", "jpg_1"), ("label_0", "label_1")),
    (("caption", "prompt"), ("image_0", "image_1"), ("label_0", "label_1")),
    (("prompt", "caption"), ("chosen", "rejected"), None),
)


def _layout(columns: list[str], name: str):
    for prompts, images, labels in LAYOUTS:
        prompt = next((c for c in prompts if c in columns), None)
        if prompt and all(c in columns for c in images) and (labels is None or all(c in columns for c in labels)):
            return prompt, images, labels
    raise DataError(f"not a ranked-image dataset align reads (columns: {columns}); it reads Pick-a-Pic's "
                    "caption, jpg_0, jpg_1, label_0, label_1 (or image_0/image_1), or prompt, chosen, rejected",
                    path=name)


class HFImages:
    """The image cells of a dataset, by candidate key: `where(key)` -> (name, row, column) for messages,
    `open(key)` -> a file object (or path) that PIL opens."""

    def __init__(self, name: str, dataset, root: Path | None = None):
        self.name, self.dataset, self.root = name, dataset, root  # root: a local dataset's folder
        self.cells: dict[str, tuple[int, str]] = {}
        self._columns: dict = {}

    def key(self, row: int, column: str) -> str:
        key = f"hf:{self.name}/{row}/{column}"
        self.cells[key] = (row, column)
        return key

    def __contains__(self, key) -> bool:
        return key in self.cells

    def where(self, key) -> tuple[str, int, str]:
        row, column = self.cells[key]
        return self.name, row, column

    def open(self, key):
        row, column = self.cells[key]
        if column not in self._columns:  # a one-column view: a row read then leaves the other image on disk
            self._columns[column] = self.dataset.select_columns([column])
        return _readable(self._columns[column][row][column], self.root)


def _readable(cell, root: Path | None = None):
    """bytes | {"bytes", "path"} | path | PIL image -> what PIL.Image.open takes (a PIL image is re-encoded).
    A relative path is read in `root` (the dataset's folder, as a JSONL's paths are relative to the file) where the
    file is there, else as given (relative to the working directory, as `datasets` reads it)."""
    if isinstance(cell, dict):
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(cell))
    if isinstance(cell, str) and cell:
        in_root = root / cell if root is not None else None
        return str(in_root) if in_root is not None and not Path(cell).is_absolute() and in_root.is_file() else cell
    if hasattr(cell, "save"):  # a decoded PIL image
        buf = io.BytesIO()
        cell.save(buf, format="PNG")
        buf.seek(0)
        return buf
    raise ValueError(f"no image in this cell ({type(cell).__name__})")


def _undecoded(dataset, columns):
    """`datasets.Image` columns cast to decode=False, so a row read gives the encoded bytes, not a PIL image."""
    import datasets
    for c in columns:
        if isinstance(dataset.features.get(c), datasets.Image) and dataset.features[c].decode:
            dataset = dataset.cast_column(c, datasets.Image(decode=False))
    return dataset


def _cell_bytes(cell):
    if isinstance(cell, dict):
        return cell.get("bytes") or cell.get("path")
    return cell


def load_hf_image_preferences(dataset, split: str = "train", *, limit=None) -> tuple[list[PreferenceGroup], HFImages]:
    """One K=2 group per labelled row, and the `HFImages` that opens its candidates.

    Rows are skipped, with counts logged: no preference (labels 0/0: Pick-a-Pic's unlabelled rows), an empty
    prompt, the same image twice, or an exact repeat of an earlier row. A label other than 0, 0.5 or 1, or a pair of labels that is not one of
    (1, 0), (0, 1), (0.5, 0.5), is a DataError naming the row and the column.
    """
    spec = dataset
    dataset, name = open_dataset(dataset, split)
    name = f"{name}:{split}" if isinstance(name, str) and not name.startswith("<") else name
    prompt_col, image_cols, label_cols = _layout(list(dataset.column_names), name)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        dataset = dataset.select(range(min(limit, len(dataset))))
    dataset = _undecoded(dataset, image_cols)
    local = Path(spec).expanduser() if isinstance(spec, str) else None  # a folder or data file: relative paths
    root = (local if local.is_dir() else local.parent).resolve() if local is not None and local.exists() else None
    images = HFImages(name, dataset, root)
    skipped = {"no preference": 0, "an empty prompt": 0, "the same image twice": 0, "a repeat of an earlier row": 0}
    groups, seen = [], set()
    # batches of 32 rows: read one by one, `datasets` spends ~100 µs formatting each; Pick-a-Pic's images are ~1 MB
    for row, rec in enumerate(iter_rows(dataset, [prompt_col, *(label_cols or ()), *image_cols], batch_size=32)):
        prompt = rec[prompt_col]
        if not isinstance(prompt, str):
            raise DataError(f"expected a string, got {type(prompt).__name__}", path=name, line=row, field=prompt_col)
        first, tie = 0, False
        if label_cols:
            labels = []
            for c in label_cols:
                v = rec[c]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                        v not in (0, 0.5, 1):
                    raise DataError(f"expected 0, 0.5 or 1, got {v!r}", path=name, line=row, field=c)
                labels.append(float(v))
            if labels == [0.0, 0.0]:
                skipped["no preference"] += 1
                continue
            if labels not in ([1.0, 0.0], [0.0, 1.0], [0.5, 0.5]):
                raise DataError(f"labels {labels} are not a preference ((1, 0), (0, 1) or (0.5, 0.5) for a tie)",
                                path=name, line=row, field=label_cols[0])
            first, tie = (1 if labels == [0.0, 1.0] else 0), labels == [0.5, 0.5]
        if not prompt.strip():
            skipped["an empty prompt"] += 1
            continue
        a, b = (_cell_bytes(rec[c]) for c in image_cols)
        if a is not None and a == b:
            skipped["the same image twice"] += 1
            continue
        key = (prompt, first, tie, *(hashlib.blake2b(str(x).encode() if isinstance(x, str) else x or b"",
                                                     digest_size=16).digest() for x in (a, b)))
        if key in seen:
            skipped["a repeat of an earlier row"] += 1
            continue
        seen.add(key)
        chosen, rejected = images.key(row, image_cols[first]), images.key(row, image_cols[1 - first])
        groups.append(group_from_pair(prompt, chosen, rejected, tie=tie, source=f"{name}:{row}"))
    if any(skipped.values()):
        logger.warning("%s: skipped %s; kept %d pairs", name,
                       ", ".join(f"{n} row(s) with {why}" for why, n in skipped.items() if n), len(groups))
    if not groups:
        raise DataError("no usable rows", path=name)
    return groups, images
