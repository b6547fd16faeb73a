"""Labelled image grids (sample sheets, before/after and epoch x weight comparisons)."""

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

PAD = 4


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def image_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] = (), col_labels: Sequence[str] = (), scale: int = 1) -> Image.Image:
    """rows[r][c] images (same size) in a grid with optional labels left of rows and above columns."""
    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one image")
    font = ImageFont.load_default()
    w, h = rows[0][0].size
    w, h = w * scale, h * scale
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max((_text_width(probe, t, font) for t in row_labels), default=0) + (2 * PAD if row_labels else 0)
    label_h = 14 if col_labels else 0
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (label_w + cols * (w + PAD) + PAD, label_h + len(rows) * (h + PAD) + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(col_labels):
        draw.text((label_w + PAD + c * (w + PAD), 2), text, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        y = label_h + PAD + r * (h + PAD)
        if r < len(row_labels):
            draw.text((PAD, y + h // 2 - 5), row_labels[r], fill=(0, 0, 0), font=font)
        for c, image in enumerate(row):
            sheet.paste(image.resize((w, h), Image.Resampling.NEAREST), (label_w + PAD + c * (w + PAD), y))
    return sheet
