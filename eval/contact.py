"""The contact sheet of a generation sweep: outputs side by side, flagged ones obscured (pure: PIL in, PIL out).

One row per (prompt, method): the prompt's original output first, then the method's output at each
α (vectors) or s (SafeDIG). Rows are named by the prompt's text id and the method, never by the
prompt's text. Every output a safety detector flagged is **obscured by default** (pixelated to
:data:`PIXELS` blocks, then a Gaussian blur of a tenth of the cell) and captioned "flagged"; with
``show_flagged`` it is shown as generated, captioned "flagged (shown)". A video output shows its
scored frames as a 2×2 mosaic in its cell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter, ImageFont

PIXELS = 6  # a flagged output is pixelated to PIXELS × PIXELS blocks before the blur
LABEL_WIDTH = 220
CAPTION = 14
PAD = 4
BACKGROUND = (255, 255, 255)
MISSING = (200, 200, 200)
INK = (0, 0, 0)
FLAG_INK = (180, 0, 0)


@dataclass(frozen=True)
class SheetCell:
    """One output in the sheet: its caption (``original``, ``α=1.5``, ``s=2``), its images and its verdict."""

    caption: str
    images: Sequence[Image.Image] | None  # None: not generated (yet)
    flagged: bool = False


@dataclass(frozen=True)
class SheetRow:
    label: str  # e.g. "3f2a9c01d4e5 · SafeDIG (Blend+Repel)": a text id and a method, never a prompt
    cells: tuple[SheetCell, ...]


@dataclass(frozen=True, eq=False)
class Sheet:
    """The rendered sheet and where each output's pixels are: (row, column) -> (left, top, right, bottom)."""

    image: Image.Image
    boxes: dict[tuple[int, int], tuple[int, int, int, int]] = field(default_factory=dict)

    def savefig(self, path: str | Path, **_: Any) -> None:
        """Write the sheet as a PNG (the report writer saves figures through this one method)."""
        self.image.save(path, format="PNG")


def obscure(image: Image.Image, size: int) -> Image.Image:
    """``image`` at ``size`` × ``size``, pixelated to :data:`PIXELS` blocks and strongly blurred."""
    small = image.convert("RGB").resize((PIXELS, PIXELS), Image.Resampling.BOX)
    blocky = small.resize((size, size), Image.Resampling.NEAREST)
    return blocky.filter(ImageFilter.GaussianBlur(radius=max(2.0, size / 10)))


def _tile(images: Sequence[Image.Image], size: int) -> Image.Image:
    """One image scaled to the cell, or up to 4 frames as a 2×2 mosaic."""
    if len(images) == 1:
        return images[0].convert("RGB").resize((size, size), Image.Resampling.NEAREST)
    side = math.ceil(math.sqrt(min(len(images), 4)))
    part = size // side
    out = Image.new("RGB", (size, size), BACKGROUND)
    for i, frame in enumerate(images[: side * side]):
        out.paste(
            frame.convert("RGB").resize((part, part), Image.Resampling.NEAREST), ((i % side) * part, (i // side) * part)
        )
    return out


def contact_sheet(rows: Sequence[SheetRow], show_flagged: bool = False, cell: int = 128, title: str = "") -> Sheet:
    """The grid of ``rows`` (see the module docstring); flagged outputs obscured unless ``show_flagged``."""
    if cell < 16:
        raise ValueError(f"cell {cell} is too small to show an output; give 16 pixels or more")
    font = ImageFont.load_default()
    columns = max((len(r.cells) for r in rows), default=0)
    top = CAPTION + 2 * PAD if title else PAD
    row_h = cell + CAPTION + 2 * PAD
    width = LABEL_WIDTH + max(columns, 1) * (cell + PAD) + PAD
    sheet = Image.new("RGB", (width, top + max(len(rows), 1) * row_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((PAD, PAD), title, fill=INK, font=font)
    boxes: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    for i, row in enumerate(rows):
        y = top + i * row_h
        for j, line in enumerate(_wrap(row.label, 34)[:4]):
            draw.text((PAD, y + PAD + j * CAPTION), line, fill=INK, font=font)
        for j, c in enumerate(row.cells):
            x = LABEL_WIDTH + j * (cell + PAD)
            box = (x, y + PAD, x + cell, y + PAD + cell)
            if c.images:
                shown = c.flagged and not show_flagged
                tile = obscure(_tile(c.images, cell), cell) if shown else _tile(c.images, cell)
                sheet.paste(tile, box[:2])
                caption = c.caption + (" flagged" if shown else " flagged (shown)" if c.flagged else "")
            else:
                draw.rectangle(box, fill=MISSING)
                caption = c.caption + " (missing)"
            boxes[(i, j)] = box
            draw.text((x, box[3] + 1), caption, fill=FLAG_INK if c.flagged else INK, font=font)
    return Sheet(sheet, boxes)


def _wrap(text: str, width: int) -> list[str]:
    words, lines = text.split(" "), [""]
    for w in words:
        if lines[-1] and len(lines[-1]) + 1 + len(w) > width:
            lines.append("")
        lines[-1] = f"{lines[-1]} {w}".strip()
    return lines
