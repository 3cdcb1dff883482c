"""Regenerate ``calibration_data/images/`` (maintainer tool; not imported by the package).

Usage::

    python calibration_data/build.py

Needs scikit-image (for its bundled sample images) and Pillow. Every photograph is read from
the files scikit-image ships in its wheel (``skimage/data/``), converted to RGB (grayscale
expanded to three channels, transparency composited on white), shrunk so that its longer side
is at most 672 px (never enlarged) and saved as JPEG quality 90 (photographs) or PNG
(text and line art). Only images whose scikit-image docstring states CC0, public domain or
"no copyright restrictions" are used; see ``LICENSES.md``.

Two small documents with printed text (``notice.png``, ``receipt.png``) are rendered here with
Pillow's built-in font (Aileron Regular, CC0) because the scanned page scikit-image ships
(``page.png``) carries no licence statement. Their content is fictitious.

The output is deterministic for a given Pillow version; a different Pillow (resampling, zlib or
libjpeg build) may change the bytes and therefore the calibration fingerprint.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

MAX_SIDE = 672
JPEG_QUALITY = 90

# name in skimage/data -> (output name, format). Licences are listed in LICENSES.md.
SKIMAGE_IMAGES: dict[str, tuple[str, str]] = {
    "astronaut.png": ("astronaut", "jpg"),
    "camera.png": ("camera", "jpg"),
    "chelsea.png": ("chelsea", "jpg"),
    "coffee.png": ("coffee", "jpg"),
    "horse.png": ("horse", "png"),
    "hubble_deep_field.jpg": ("hubble_deep_field", "jpg"),
    "rocket.jpg": ("rocket", "jpg"),
    "retina.jpg": ("retina", "jpg"),
    "brick.png": ("brick", "jpg"),
    "grass.png": ("grass", "jpg"),
    "gravel.png": ("gravel", "jpg"),
    "cell.png": ("cell", "jpg"),
    "clock_motion.png": ("clock_motion", "jpg"),
    "text.png": ("text", "png"),
}

NOTICE_LINES = [
    ("CITY LIBRARY", 34),
    ("Opening hours", 26),
    ("", 12),
    ("Monday to Friday: 9:00 - 18:00", 22),
    ("Saturday: 10:00 - 14:00", 22),
    ("Sunday: closed", 22),
    ("", 12),
    ("Please return books to the front desk.", 20),
    ("Quiet study rooms are on the second floor.", 20),
]

RECEIPT_ROWS = [
    ("Espresso", "2.50"),
    ("Croissant", "3.20"),
    ("Orange juice", "4.00"),
]
RECEIPT_TOTAL = "9.70"


def to_rgb(image: Image.Image) -> Image.Image:
    """Return an RGB copy; transparency is composited on white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def shrink(image: Image.Image) -> Image.Image:
    """Shrink so the longer side is at most MAX_SIDE; never enlarge."""
    width, height = image.size
    longer = max(width, height)
    if longer <= MAX_SIDE:
        return image
    scale = MAX_SIDE / longer
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def save(image: Image.Image, path: Path, fmt: str) -> None:
    if fmt == "jpg":
        image.save(path, "JPEG", quality=JPEG_QUALITY, optimize=True)
    else:
        image.save(path, "PNG", optimize=True)


def render_notice() -> Image.Image:
    image = Image.new("RGB", (560, 360), (250, 248, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 10, 549, 349), outline=(40, 40, 40), width=3)
    y = 30
    for text, size in NOTICE_LINES:
        if text:
            font = ImageFont.load_default(size=size)
            width = draw.textlength(text, font=font)
            draw.text(((560 - width) / 2, y), text, fill=(20, 20, 20), font=font)
        y += size + 14
    return image


def render_receipt() -> Image.Image:
    image = Image.new("RGB", (360, 420), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    title = ImageFont.load_default(size=30)
    body = ImageFont.load_default(size=22)
    small = ImageFont.load_default(size=18)

    def centre(text: str, y: int, font: ImageFont.FreeTypeFont) -> None:
        draw.text(((360 - draw.textlength(text, font=font)) / 2, y), text, fill=(0, 0, 0), font=font)

    def row(left: str, right: str, y: int, font: ImageFont.FreeTypeFont) -> None:
        draw.text((30, y), left, fill=(0, 0, 0), font=font)
        draw.text((330 - draw.textlength(right, font=font), y), right, fill=(0, 0, 0), font=font)

    centre("CORNER CAFE", 25, title)
    centre("12 Market Street", 68, small)
    draw.line((30, 105, 330, 105), fill=(0, 0, 0), width=2)
    y = 125
    for item, price in RECEIPT_ROWS:
        row(item, price, y, body)
        y += 40
    draw.line((30, y + 5, 330, y + 5), fill=(0, 0, 0), width=2)
    row("TOTAL", RECEIPT_TOTAL, y + 20, title)
    centre("Thank you!", y + 90, body)
    return image


def main() -> None:
    import skimage.data

    source_dir = Path(skimage.data.__file__).resolve().parent
    out_dir = Path(__file__).resolve().parent / "images"
    out_dir.mkdir(exist_ok=True)
    written = []
    for source_name, (name, fmt) in SKIMAGE_IMAGES.items():
        with Image.open(source_dir / source_name) as source:
            source.load()
            image = shrink(to_rgb(source))
        path = out_dir / f"{name}.{fmt}"
        save(image, path, fmt)
        written.append(path)
    for name, image in (("notice", render_notice()), ("receipt", render_receipt())):
        path = out_dir / f"{name}.png"
        save(image, path, "png")
        written.append(path)
    total = 0
    for path in written:
        with Image.open(path) as image:
            size = image.size
        total += path.stat().st_size
        print(f"{path.name:24s} {size[0]:4d}x{size[1]:<4d} {path.stat().st_size / 1024:7.1f} KiB")
    print(f"{len(written)} images, {total / 1024 / 1024:.2f} MiB")


if __name__ == "__main__":
    main()
