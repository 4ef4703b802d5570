"""Makes the bundled demo dataset: 28x28 grey digits rendered with Pillow's built-in font,
randomly scaled, rotated, shifted, thickened and noised (deterministic, seed 1701)."""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont


def render(digit, rs):
    size = int(rs.integers(32, 46))
    font = ImageFont.load_default(size=size)
    canvas = Image.new("L", (56, 56), 0)
    draw = ImageDraw.Draw(canvas)
    stroke = int(rs.integers(0, 3))
    draw.text(
        (28, 28), str(digit), fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255
    )
    canvas = canvas.rotate(float(rs.uniform(-18, 18)), resample=Image.BILINEAR)
    shear = float(rs.uniform(-0.25, 0.25))
    canvas = canvas.transform(
        (56, 56), Image.AFFINE, (1, shear, -shear * 28, 0, 1, 0), resample=Image.BILINEAR
    )
    if rs.random() < 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(float(rs.uniform(0.3, 1.0))))
    img = np.asarray(canvas.resize((28, 28), Image.BILINEAR), dtype=np.float32)
    dy, dx = rs.integers(-3, 4, size=2)
    img = np.roll(img, (int(dy), int(dx)), axis=(0, 1))
    img = img + rs.normal(0, 6, img.shape) * (rs.random(img.shape) < 0.3)
    return np.clip(img, 0, 255).astype(np.uint8)


def make(n, rs):
    labels = rs.integers(0, 10, size=n).astype(np.uint8)
    images = np.stack([render(int(d), rs) for d in labels])
    return images, labels


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(Path(__file__).with_name("digits.npz")))
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=500)
    args = ap.parse_args()
    rs = np.random.default_rng(1701)
    tr_x, tr_y = make(args.train, rs)
    te_x, te_y = make(args.test, rs)
    np.savez_compressed(
        args.out, train_images=tr_x, train_labels=tr_y, test_images=te_x, test_labels=te_y
    )
    print(f"wrote {args.out}: {len(tr_y)} train, {len(te_y)} test images of 28x28")


if __name__ == "__main__":
    main()
