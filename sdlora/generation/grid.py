"""Image grids: plain tiles for training previews, labelled ones for comparisons."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Tile equally sized images row by row."""
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def labelled_grid(
    columns: list[list[Image.Image]], column_labels: list[str], row_labels: list[str], min_cell: int = 128
) -> Image.Image:
    """Cells given column by column, with a header row and a label column; small images are scaled up."""
    cell_w, cell_h = columns[0][0].size
    scale = max(1, -(-min_cell // min(cell_w, cell_h)))  # ceil: tiny demo images stay readable
    cell_w, cell_h = cell_w * scale, cell_h * scale
    font = ImageFont.load_default(size=14)
    header, margin = 24, max(80, 8 * max(len(r) for r in row_labels))
    grid = Image.new("RGB", (margin + cell_w * len(columns), header + cell_h * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (label, images) in enumerate(zip(column_labels, columns, strict=True)):
        draw.text((margin + c * cell_w + 4, 4), label, fill="black", font=font)
        for r, image in enumerate(images):
            grid.paste(
                image.resize((cell_w, cell_h), Image.Resampling.NEAREST),
                (margin + c * cell_w, header + r * cell_h),
            )
    for r, label in enumerate(row_labels):
        draw.text((4, header + r * cell_h + cell_h // 2 - 7), label, fill="black", font=font)
    return grid
