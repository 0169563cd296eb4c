"""Report figures: captioned image tables drawn with Pillow, and line plots drawn with matplotlib (PNG and SVG).

The plots use matplotlib's object API (:class:`~matplotlib.figure.Figure`, no ``pyplot``): no global state, no
display, and saving picks the Agg (PNG) or SVG backend by format.
"""

from __future__ import annotations

import io
import math
import os
import re
import textwrap
from collections.abc import Sequence
from typing import NamedTuple

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import AutoMinorLocator, LogLocator, MaxNLocator
from PIL import Image, ImageDraw, ImageFont

WHITE, BLACK = (255, 255, 255), (0, 0, 0)
COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
           "tab:olive", "tab:cyan"]  # fmt: skip
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h"]
LINESTYLES = ["-", "--", "-.", ":"]
MIN_CELL = 128
"""Images smaller than this many pixels on their long edge are enlarged (nearest neighbour) for display."""


def font(size: int = 13) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` pixels."""
    return ImageFont.load_default(size=size)


def _text_size(text: str, size: int) -> tuple[int, int]:
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), text, font(size))
    return right - left, bottom - top


def _wrap(text: str, width_px: int, size: int) -> str:
    chars = max(20, int(width_px / (size * 0.55)))
    return "\n".join(textwrap.fill(line, chars) for line in text.splitlines())


def captioned(figure: Image.Image, title: str, footer: Sequence[str] = ()) -> Image.Image:
    """``figure`` with ``title`` above and the ``footer`` lines (e.g. which VGG weights) below, wrapped to fit."""
    width = max(figure.width, 480)
    head = _wrap(title, width - 16, 16)
    foot = _wrap("\n".join(footer), width - 16, 12) if footer else ""
    head_h = _text_size(head, 16)[1] + 16
    foot_h = _text_size(foot, 12)[1] + 16 if foot else 0
    canvas = Image.new("RGB", (width, head_h + figure.height + foot_h), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.multiline_text((8, 8), head, fill=BLACK, font=font(16))
    canvas.paste(figure.convert("RGB"), ((width - figure.width) // 2, head_h))
    if foot:
        draw.multiline_text((8, head_h + figure.height + 8), foot, fill=(60, 60, 60), font=font(12))
    return canvas


def enlarge(image: Image.Image, minimum: int = MIN_CELL) -> Image.Image:
    """Scale a small image up by an integer factor (nearest neighbour) so its long edge is at least ``minimum``."""
    factor = math.ceil(minimum / max(image.size)) if max(image.size) < minimum else 1
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def image_table(
    cells: Sequence[Sequence[Image.Image | None]],
    columns: Sequence[str],
    rows: Sequence[str],
    notes: Sequence[Sequence[str]] | None = None,
) -> Image.Image:
    """A table of images with column and row headers and an optional note under each cell; ``None`` is blank."""
    images = [enlarge(image) for row in cells for image in row if image is not None]
    cell_w = max((image.width for image in images), default=MIN_CELL)
    cell_h = max((image.height for image in images), default=MIN_CELL)
    note_h = _text_size("Ag", 12)[1] + 8 if notes else 0
    head_h = max((_text_size(_wrap(c, cell_w, 13), 13)[1] for c in columns), default=0) + 10
    head_w = max((_text_size(r, 13)[0] for r in rows), default=0) + 14
    pad = 6
    width = head_w + len(columns) * (cell_w + pad)
    height = head_h + len(rows) * (cell_h + note_h + pad)
    table = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(table)
    for j, column in enumerate(columns):
        draw.multiline_text((head_w + j * (cell_w + pad), 4), _wrap(column, cell_w, 13), fill=BLACK, font=font(13))
    for i, row in enumerate(rows):
        top = head_h + i * (cell_h + note_h + pad)
        draw.text((4, top + cell_h // 2 - 7), row, fill=BLACK, font=font(13))
        for j, image in enumerate(cells[i]):
            left = head_w + j * (cell_w + pad)
            if image is not None:
                table.paste(enlarge(image).convert("RGB"), (left, top))
            if notes and notes[i][j]:
                draw.text((left, top + cell_h + 2), notes[i][j], fill=BLACK, font=font(12))
    return table


class Series(NamedTuple):
    """One line of a plot."""

    label: str
    x: Sequence[float]
    y: Sequence[float]


def relative_weights(weights: str) -> str:
    """A VGG weights description with a weights file's path relative to the working folder, as a report prints it."""
    return re.sub(r"^file (/.+?) \(sha256", lambda match: f"file {os.path.relpath(match.group(1))} (sha256", weights)


def short_weights(weights: str) -> str:
    """A VGG weights description (``weights_used``) on one short line: a weights file by its name, not its path."""
    return re.sub(r"^file (.+?) \(sha256", lambda match: f"file {match.group(1).rsplit('/', 1)[-1]} (sha256", weights)


def line_plot(series: Sequence[Series], xlabel: str, ylabel: str, log_y: bool = False) -> Figure:
    """Lines with markers, a (log) y axis with minor ticks, and a legend beside the axes.

    Each series gets its own colour, marker and line style, so overlapping ones stay apart; long series carry a
    marker every few points. Points a log axis cannot show (zero, negative) and non-finite ones are skipped.
    """
    figure = Figure(figsize=(8.0, 4.2), layout="constrained")
    ax = figure.add_subplot()
    integers = True
    for index, line in enumerate(series):
        points = [
            (float(x), float(y)) for x, y in zip(line.x, line.y, strict=True)
            if y is not None and math.isfinite(y) and (y > 0 or not log_y)
        ]  # fmt: skip
        xs, ys = [x for x, _ in points], [y for _, y in points]
        integers = integers and all(x.is_integer() for x in xs)
        ax.plot(
            xs,
            ys,
            label=line.label,
            color=COLOURS[index % len(COLOURS)],
            marker=MARKERS[index % len(MARKERS)],
            linestyle=LINESTYLES[index % len(LINESTYLES)],
            markevery=max(1, len(points) // 12),
            markersize=5,
            linewidth=1.5,
        )
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(LogLocator(subs="auto"))
    else:
        ax.yaxis.set_minor_locator(AutoMinorLocator())
    if integers:  # steps and layer numbers: no ticks between them
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.xaxis.set_minor_locator(AutoMinorLocator())
    ax.margins(x=0.03, y=0.08)
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if series:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8, frameon=False)
    return figure


def finish(figure: Figure, title: str, footer: Sequence[str] = ()) -> None:
    """Put ``title`` (wrapped) above the plot and the ``footer`` lines (e.g. which VGG weights) below it."""
    figure.suptitle(textwrap.fill(title, 90), fontsize=10)
    if footer:
        lines = [textwrap.fill(line, 150) for line in footer]
        figure.supxlabel("\n".join(lines), fontsize=7, color="0.3", x=0.0, ha="left")


def render(figure: Figure, format: str) -> bytes:
    """``figure`` as PNG or SVG bytes; the SVG without a date and with fixed element ids, so reruns match."""
    buffer = io.BytesIO()
    metadata = {"Date": None} if format == "svg" else {"Software": None}
    with matplotlib.rc_context({"svg.hashsalt": "lightning-nst"}):
        figure.savefig(buffer, format=format, dpi=120, metadata=metadata, bbox_inches="tight", pad_inches=0.1)
    return buffer.getvalue()
