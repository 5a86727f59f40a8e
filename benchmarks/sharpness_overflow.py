"""How often ALBEF's RandAugment Sharpness overflows uint8 (it wraps; dataset/randaugment.py clips).

    python benchmarks/sharpness_overflow.py --images ../shared/data/coco_mini --res 256 --factor 1.36

Blends each photo with the 3x3 smoothing kernel at ``factor`` (ALBEF's level 7: 1.36) on the interior pixels,
as ALBEF does, and prints the share of values outside [0, 255] before the cast and the photos with any.
"""
import argparse
import glob
import json
import os

import cv2
import numpy as np
from PIL import Image


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default="../shared/data/coco_mini")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--factor", type=float, default=1.36)
    a = ap.parse_args()
    files = sorted(glob.glob(os.path.join(a.images, "**", "*.jpg"), recursive=True))
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13
    over = total = touched = 0
    for f in files:
        img = np.asarray(Image.open(f).convert("RGB").resize((a.res, a.res))).astype(np.float32)
        blurred = cv2.filter2D(img, -1, kernel)
        inner = blurred[1:-1, 1:-1] * (1 - a.factor) + img[1:-1, 1:-1] * a.factor
        n = int(((inner > 255.5) | (inner < -0.5)).sum())   # values the uint8 cast would wrap
        over, total, touched = over + n, total + inner.size, touched + (n > 0)
    print(json.dumps({"photos": len(files), "share_of_values_wrapping": round(over / max(total, 1), 5),
                      "photos_with_any": touched}))


if __name__ == "__main__":
    main()
