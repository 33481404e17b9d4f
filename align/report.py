"""Markdown reports: every run ends with out_dir/report.md, readable on GitHub or in any editor.

Plain Markdown with relative image links (PNG plots and sample grids written next to it), so a
run folder can be zipped, copied or committed and still render; no HTML or notebook needed.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
from io import BytesIO
from pathlib import Path
from typing import Iterable, Sequence

from align.runner import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["markdown_table", "plot_curves", "write_report"]


def _cell(value, floatfmt: str) -> str:
    """One table cell: floats formatted, None empty, '|' and newlines escaped (they break rows)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if hasattr(value, "item") and not isinstance(value, (float, int)):
        try:
            value = value.item()  # numpy / one-element torch scalars
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, float):
        return format(value, floatfmt) if math.isfinite(value) else str(value)
    return str(value).replace("|", r"\|").replace("\n", " ")


def _numeric_column(rows, column) -> bool:
    values = [r[column] for r in rows if r.get(column) is not None]
    return bool(values) and all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                for v in values)


def markdown_table(rows: Sequence[dict], columns: Iterable[str] | None = None,
                   floatfmt: str = ".3f") -> str:
    """A GitHub-flavoured Markdown table of `rows` (dicts); missing cells are left empty.

    columns: which keys, in order; default is every key in order of first appearance.
    Columns holding only numbers are right-aligned, so digits line up when read as text too.
    """
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    columns = list(columns)
    if not columns:
        return ""
    numeric = {c: _numeric_column(rows, c) for c in columns}
    header = "| " + " | ".join(_cell(c, floatfmt) for c in columns) + " |"
    rule = "|" + "|".join("---:" if numeric[c] else "---" for c in columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(c), floatfmt) for c in columns) + " |" for r in rows]
    return "\n".join([header, rule, *body]) + "\n"


def write_report(out_dir, title: str, sections: Sequence[tuple[str, str]],
                 images: Iterable = ()) -> Path:
    """Write out_dir/report.md (atomically): a title, (heading, markdown body) sections, images.

    Images are file paths, linked relative to out_dir so the folder can be moved. A relative
    path is taken relative to out_dir when that file exists there, else to the working directory
    (an image outside out_dir gets a '..' link).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}\n"]
    for heading, body in sections:
        parts.append(f"## {heading}\n\n{body.strip()}\n")
    images = [Path(p) for p in images]
    if images:
        lines = []
        for img in images:
            if not img.is_absolute() and (out / img).exists():
                img = out / img
            try:
                rel = os.path.relpath(img.resolve(), out.resolve())
            except ValueError:  # different drive (Windows)
                rel = str(img.resolve())
            lines.append(f"![{img.stem}]({Path(rel).as_posix()})")
        parts.append("## Figures\n\n" + "\n\n".join(lines) + "\n")
    return atomic_write_text(out / "report.md", "\n".join(parts))


def plot_curves(history, keys, path, title=None, xlabel: str = "step") -> Path | None:
    """One subplot per key (steps on x), saved as PNG atomically; keys without data are skipped.

    Uses matplotlib's object API with the Agg canvas rather than pyplot, so it needs no display
    and leaves the caller's backend and global figure state alone. Returns None if nothing to plot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [keys] if isinstance(keys, str) else list(keys)
    present = [k for k in keys if history.get(k)]
    if not present:
        logger.warning("plot_curves: none of %s in history; %s not written", keys, path)
        return None
    from matplotlib.ticker import MaxNLocator

    # constrained layout leaves room for the suptitle and each panel's offset text ("1e−9"), which tight_layout
    # let touch the first panel and the panel above
    fig = Figure(figsize=(5, 2.4 * len(present) + (0.3 if title else 0)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(present), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, present):
        steps, values = zip(*history[key])
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_ylabel(key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, iterations, epochs: no 1.5 ticks
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel(xlabel)
    if title:
        fig.suptitle(title)
    buf = BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())
