"""Report figures drawn with Pillow: captioned image tables and line plots.

The package's dependencies hold no plotting library (matplotlib would be one more for a few plots), so the plots
are drawn here; they only need axes, ticks, lines and a legend.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFont

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (200, 200, 200)
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip
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


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    step = 10 ** math.floor(math.log10((high - low) / count))
    for multiple in (1, 2, 5, 10):
        if (high - low) / (step * multiple) <= count:
            step *= multiple
            break
    return [step * k for k in range(math.ceil(low / step), math.floor(high / step) + 1)]


def _label(value: float, log: bool) -> str:
    return f"1e{round(value)}" if log else f"{value:g}"


def line_plot(
    series: Sequence[Series], xlabel: str, ylabel: str, log_y: bool = False, size: tuple[int, int] = (640, 400)
) -> Image.Image:
    """Lines with markers, axes, ticks and a legend; points a (log) axis cannot show are skipped."""
    points = [
        [(float(x), math.log10(y) if log_y else float(y)) for x, y in zip(s.x, s.y, strict=True)
         if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
        for s in series
    ]  # fmt: skip
    xs = [x for line in points for x, _ in line] or [0.0, 1.0]
    ys = [y for line in points for _, y in line] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if log_y:
        y0, y1 = math.floor(y0), math.ceil(y1)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    width, height = size
    left, right, top, bottom = 70, 170, 28, 48
    plot = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(plot)

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x0) / (x1 - x0) * (width - left - right),
            height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom),
        )

    for tick in _ticks(y0, y1) if not log_y else list(range(int(y0), int(y1) + 1)):
        _, y = at(x0, tick)
        draw.line([(left, y), (width - right, y)], fill=GREY)
        draw.text((left - 6, y), _label(tick, log_y), fill=BLACK, font=font(11), anchor="rm")
    for tick in _ticks(x0, x1):
        x, _ = at(tick, y0)
        draw.line([(x, height - bottom), (x, height - bottom + 4)], fill=BLACK)
        draw.text((x, height - bottom + 6), _label(tick, False), fill=BLACK, font=font(11), anchor="mt")
    draw.rectangle([left, top, width - right, height - bottom], outline=BLACK)
    draw.text(((left + width - right) / 2, height - 6), xlabel, fill=BLACK, font=font(12), anchor="ms")
    draw.text((left, 8), ylabel, fill=BLACK, font=font(12))
    for index, (line, info) in enumerate(zip(points, series, strict=True)):
        colour = COLOURS[index % len(COLOURS)]
        coords = [at(x, y) for x, y in line]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        if len(coords) <= 40:
            for x, y in coords:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        legend_y = top + 6 + index * 18
        draw.line([(width - right + 10, legend_y + 6), (width - right + 30, legend_y + 6)], fill=colour, width=3)
        draw.text((width - right + 36, legend_y), info.label[:20], fill=BLACK, font=font(12))
    return plot
