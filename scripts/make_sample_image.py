"""Draw the sample image shipped with the package (src/globalcom2/data/sample.jpg).

A synthetic 640x480 scene (sky, sun, hills, a lake, a house, a tree, a sailing boat and a
signpost with a few words), drawn with PIL and numpy only, deterministic. Run once:

    python scripts/make_sample_image.py [OUTPUT]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

W, H = 640, 480
HORIZON = 285


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for name in ("DejaVuSans-Bold.ttf", "Arial Bold.ttf", "arialbd.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _vertical_gradient(top: tuple[int, int, int], bottom: tuple[int, int, int], height: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    return (1 - t) * np.array(top, float) + t * np.array(bottom, float)


def draw_scene() -> Image.Image:
    rng = np.random.default_rng(2501)
    canvas = np.zeros((H, W, 3), float)
    canvas[:HORIZON] = _vertical_gradient((70, 130, 200), (250, 205, 160), HORIZON)
    canvas[HORIZON:] = _vertical_gradient((60, 110, 160), (30, 70, 115), H - HORIZON)
    # A soft glow around the sun.
    yy, xx = np.mgrid[0:H, 0:W]
    sun_x, sun_y = 470, 150
    glow = np.exp(-((xx - sun_x) ** 2 + (yy - sun_y) ** 2) / (2 * 70.0**2))[..., None]
    canvas = canvas + glow * np.array([60, 40, 0.0])
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)

    # Sun, and its reflection on the lake.
    d.ellipse([sun_x - 38, sun_y - 38, sun_x + 38, sun_y + 38], fill=(255, 226, 120))
    for i in range(7):
        y = HORIZON + 12 + i * 14
        half = 34 - i * 4
        d.rectangle([sun_x - half, y, sun_x + half, y + 4], fill=(235, 200, 120))

    # Clouds.
    for cx, cy, s in [(120, 70, 1.0), (300, 45, 0.7), (560, 60, 0.6)]:
        for dx, dy, r in [(-30, 6, 22), (0, 0, 30), (30, 6, 24), (55, 10, 16)]:
            rr = r * s
            d.ellipse([cx + dx * s - rr, cy + dy * s - rr, cx + dx * s + rr, cy + dy * s + rr], fill=(250, 250, 252))

    # Distant mountains.
    d.polygon([(0, HORIZON), (90, 190), (170, 240), (260, 160), (360, 250), (420, 215), (520, 262), (640, 205), (640, HORIZON)], fill=(92, 105, 140))
    d.polygon([(235, 183), (260, 160), (285, 185), (270, 180), (258, 190), (248, 180)], fill=(240, 240, 245))

    # Green hill on the left, down to the water.
    d.polygon([(0, 250), (80, 238), (180, 248), (300, 275), (360, 300), (380, 330), (0, 330)], fill=(84, 150, 70))
    d.polygon([(0, 330), (380, 330), (330, 370), (0, 400)], fill=(70, 130, 60))

    # The house.
    d.rectangle([70, 235, 170, 305], fill=(235, 225, 200), outline=(90, 70, 60), width=2)
    d.polygon([(60, 238), (120, 190), (180, 238)], fill=(185, 60, 50), outline=(110, 40, 35))
    d.rectangle([108, 265, 132, 305], fill=(120, 80, 50))
    for x in (80, 143):
        d.rectangle([x, 250, x + 18, 268], fill=(150, 200, 235), outline=(90, 70, 60), width=2)
    d.rectangle([145, 195, 157, 220], fill=(120, 70, 60))

    # A tree.
    d.rectangle([226, 250, 238, 318], fill=(100, 70, 45))
    for cx, cy, r in [(232, 232, 30), (212, 248, 22), (252, 248, 22), (232, 212, 22)]:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(50, 120, 55))

    # A sailing boat on the lake.
    bx = 90  # shift from the sun's reflection
    d.polygon([(bx + 430, 380), (bx + 540, 380), (bx + 520, 402), (bx + 448, 402)], fill=(140, 60, 50))
    d.line([(bx + 485, 380), (bx + 485, 300)], fill=(70, 50, 40), width=3)
    d.polygon([(bx + 488, 304), (bx + 488, 374), (bx + 535, 374)], fill=(250, 250, 245))
    d.polygon([(bx + 482, 312), (bx + 482, 374), (bx + 445, 374)], fill=(240, 120, 70))

    # Signpost with a few words.
    d.rectangle([40, 360, 48, 440], fill=(110, 80, 55))
    d.rectangle([10, 338, 270, 382], fill=(250, 244, 225), outline=(110, 80, 55), width=3)
    d.text((140, 360), "Hello, GlobalCom2!", font=_font(19), fill=(40, 50, 70), anchor="mm")

    # Title text on the sky.
    d.text((22, 135), "Lake View", font=_font(34), fill=(255, 255, 255), stroke_width=2, stroke_fill=(60, 80, 120))

    img = img.filter(ImageFilter.SMOOTH)
    # A light grain so that the scene looks less flat.
    arr = np.asarray(img).astype(float) + rng.normal(0, 2.5, (H, W, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "src/globalcom2/data/sample.jpg"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Draw the package's sample image: a deterministic synthetic 640x480 scene (JPEG).",
    )
    parser.add_argument(
        "output", nargs="?", type=Path, default=DEFAULT_OUTPUT, metavar="OUTPUT",
        help="where to write it (default: src/globalcom2/data/sample.jpg of this checkout)",
    )
    out = parser.parse_args(argv).output
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_scene().save(out, quality=88, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
