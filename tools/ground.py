"""Where a phrase is in an image: the Grad-CAM map of a trained model, as ``Grounding.py`` computes it.

    python -m tools.ground --config C --checkpoint K --image P --text "the man on the left" [--out heat.png]
"""
import argparse
import sys


def main(argv=None):
    from dataset.caption_dataset import load_image
    from tasks.api import load_model, model_arguments
    p = model_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--image", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--block_num", type=int, default=None, help="text layer of the map (default: ALBEF's choice)")
    p.add_argument("--out", default="heat.png")
    a = p.parse_args(argv)
    try:
        image = load_image(a.image)
    except Exception as e:   # noqa: BLE001
        print(f"error: cannot read image {a.image!r}: {e}", file=sys.stderr)
        return 1
    try:
        heat = load_model(a.config, a.checkpoint, a.device).gradcam(image, a.text, a.block_num)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from tasks.grounding import draw, pick_box
    _, up = pick_box(heat, [], image.height, image.width)   # the map upsampled to the image, as Grounding.py
    draw(image, up, a.text, a.out)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
