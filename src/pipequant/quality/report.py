"""The files `compare` writes: an image grid (reference beside each variant, labelled) and a markdown report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from . import ComponentError, ImageScore

#: tiles narrower than this are scaled up (nearest neighbour) so labels and pixels stay readable
MIN_TILE_WIDTH = 256
_PAD = 6


def write_grid(rows: Sequence[Sequence[tuple[str, Image.Image]]], row_titles: Sequence[str], path: Path) -> Path:
    """One row per (prompt, seed): its title above, then each image with its label under it."""
    font = ImageFont.load_default()
    line = _line_height(font)
    scale = max(1, math.ceil(MIN_TILE_WIDTH / max(image.width for row in rows for _, image in row)))
    tile_w = max(image.width for row in rows for _, image in row) * scale
    tile_h = max(image.height for row in rows for _, image in row) * scale
    wrapped = [[_wrap(label, font, tile_w) for label, _ in row] for row in rows]
    label_h = max(len(lines) for row in wrapped for lines in row) * line
    columns = max(len(row) for row in rows)
    row_h = line + _PAD + tile_h + _PAD + label_h + 2 * _PAD
    grid = Image.new("RGB", (columns * (tile_w + _PAD) + _PAD, len(rows) * row_h), "white")
    draw = ImageDraw.Draw(grid)
    for r, (row, title) in enumerate(zip(rows, row_titles)):
        top = r * row_h + _PAD
        draw.text((_PAD, top), _wrap(title, font, grid.width - 2 * _PAD)[0], fill="black", font=font)
        for c, ((_, image), lines) in enumerate(zip(row, wrapped[r])):
            left = _PAD + c * (tile_w + _PAD)
            scaled = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
            grid.paste(scaled, (left, top + line + _PAD))
            for i, text in enumerate(lines):
                draw.text((left, top + line + 2 * _PAD + tile_h + i * line), text, fill="black", font=font)
    grid.save(path)
    return path


def write_markdown(components: Sequence[ComponentError], images: Sequence[ImageScore], grid: Path, path: Path) -> Path:
    lines = [
        "# Quantization quality",
        "",
        "## Components",
        "",
        "Relative error `||y - y_ref|| / ||y_ref||` of each component's outputs, fed the inputs the "
        "full-precision pipeline gave it during generation.",
        "",
        "| variant | component | calls | mean rel. error | max rel. error |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {c.variant} | {c.component} | {c.calls} | {c.mean:.4g} | {c.max:.4g} |" for c in components]
    lines += [
        "",
        "## Images",
        "",
        "Against the full-precision image from the same prompt and seed (8-bit RGB; SSIM: 11x11 Gaussian window, "
        "sigma 1.5).",
        "",
        "| variant | prompt | seed | PSNR (dB) | SSIM |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {s.variant} | {s.prompt} | {s.seed} | {s.psnr:.2f} | {s.ssim:.4f} |" for s in images]
    lines += ["", f"![reference and variants]({grid.name})", ""]
    path.write_text("\n".join(lines))
    return path


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return bottom - top + 4


def _wrap(text: str, font, width: int) -> list[str]:
    """`text` broken into lines that fit `width` pixels, at spaces where possible."""
    lines, current = [], ""
    for word in text.split(" "):
        candidate = f"{current} {word}".strip()
        if current and font.getlength(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return [*lines, current] if current else lines or [""]
