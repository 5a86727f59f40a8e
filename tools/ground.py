"""Where a phrase is in an image: the Grad-CAM map of a trained model, as ``Grounding.py`` computes it.

    python -m tools.ground --config C --checkpoint K --image P --text "the man on the left" [--out heat.png]
"""
import argparse
import sys


def render(image, heat, text, out, box=None):
    """The image with the map over it (and the chosen box), saved as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F
    from matplotlib.patches import Rectangle
    up = F.interpolate(heat[None, None].float(), size=(image.height, image.width), mode="bicubic",
                       align_corners=False)[0, 0].clamp(min=0).numpy()
    fig, ax = plt.subplots(figsize=(6, 6 * image.height / max(image.width, 1)))
    ax.imshow(image)
    ax.imshow(up, alpha=0.5, cmap="jet")
    if box is not None:
        ax.add_patch(Rectangle(box[:2], box[2], box[3], fill=False, color="red", linestyle="--", linewidth=2))
    ax.set_title(text)
    ax.axis("off")
    fig.savefig(out, bbox_inches="tight", dpi=100)
    plt.close(fig)


def main(argv=None):
    from dataset.caption_dataset import load_image
    from tasks.api import load_model
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--block_num", type=int, default=None, help="text layer of the map (default: ALBEF's choice)")
    p.add_argument("--out", default="heat.png")
    p.add_argument("--device", default=None)
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
    render(image, heat, a.text, a.out)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
