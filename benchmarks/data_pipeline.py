"""Images/s of one data worker on real photos (../shared/data/coco_mini, or --root) for each stage.

    python benchmarks/data_pipeline.py [--root DIR] [--res 256]

Baselines in the same run: JPEG decode alone, then ALBEF's evaluation transform (bicubic resize). The
training transform (RandomResizedCrop + flip + RandAugment(2, 7) + normalise) is printed as a ratio.
"""
import argparse
import glob
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset.caption_dataset import load_image   # noqa: E402
from dataset.transforms import test_transform, train_transform   # noqa: E402

DEFAULT_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "shared", "data", "coco_mini")


def rate(paths, fn, repeat):
    t0 = time.perf_counter()
    for _ in range(repeat):
        for p in paths:
            fn(p)
    return repeat * len(paths) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=DEFAULT_ROOT)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    paths = sorted(glob.glob(os.path.join(a.root, "**", "*.jpg"), recursive=True))
    if not paths:
        sys.exit(f"no JPEG files under {a.root}")
    torch.set_num_threads(1)   # one worker = one core
    train, test = train_transform(a.res), test_transform(a.res)
    decode = rate(paths, load_image, a.repeat)
    ev = rate(paths, lambda p: test(load_image(p)), a.repeat)
    tr = rate(paths, lambda p: train(load_image(p)), a.repeat)
    print(f"{len(paths)} photos from {a.root}, {a.res} px, one worker (1 thread)")
    print(f"decode only (baseline)           {decode:7.1f} images/s  1.00x")
    print(f"evaluation transform             {ev:7.1f} images/s  {ev / decode:.2f}x")
    print(f"training transform (ALBEF)       {tr:7.1f} images/s  {tr / decode:.2f}x")


if __name__ == "__main__":
    main()
