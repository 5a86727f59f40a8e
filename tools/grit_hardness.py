"""How hard are GRIT's grouped mini-batches, on a checkpoint's real ITC features?

    python tools/grit_hardness.py --config configs/demo/Pretrain.yaml --checkpoint output/grit10/checkpoint_00.pth

Encodes the first training file's pairs (one caption per image, no augmentation), cuts them into search spaces as GRIT
does, and compares random batches with GRIT's walk, on every measure printed:

* ``max-sim``: each anchor image's hardest in-batch negative text (raw cosine), the training log's measure;
* ``mean-neg``: the mean similarity of each anchor image's in-batch negative texts;
* ``itc-loss``: the in-batch image->text ITC loss at temperature 0.07 (ln B for uninformative features);
* ``nn-recall@5``: the share of each image's 5 most similar texts of its search space that land in its
  batch (random: about (B - 1) / (M - 1));
* ``hubness``: how often the most-chosen text is some image's nearest text, and the share of images whose
  nearest text is one of the 1% most-chosen ones. Hub texts sit near every image, so in random batches
  they raise max-sim everywhere, while the greedy walk spends them in its first batches.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset.caption_dataset import as_list, re_eval_dataset   # noqa: E402
from dataset.grit import STATS, order_stats, walk_similarities   # noqa: E402
from dataset.transforms import test_transform   # noqa: E402
from engine.config import load_config   # noqa: E402
from tasks.retrieval import encode_images, encode_texts   # noqa: E402
from models.checkpoint import load_checkpoint   # noqa: E402
from models.model_pretrain import ALBEF   # noqa: E402
from models.tokenization import ALBEFTokenizer   # noqa: E402


@torch.no_grad()
def features(cfg, checkpoint, limit=None):
    """ITC features of every training image and its first caption, through the evaluation encoders."""
    tok = ALBEFTokenizer(cfg.get("tokenizer") or cfg.get("text_encoder") or "")
    model = ALBEF(dict(cfg, text_encoder=None, vision_init=None), tok)
    load_checkpoint(model, checkpoint, verbose=False)
    model.eval()
    ds = re_eval_dataset(as_list(cfg["train_file"])[0], test_transform(cfg["image_res"]), cfg.get("image_root"),
                         cfg.get("max_words", 30), config_key="train_file", image_res=cfg["image_res"])
    if limit:
        ds.ann = ds.ann[:limit]
    dev = torch.device("cpu")
    img = encode_images(model, ds, dev, num_workers=2)[2]
    txt = encode_texts(model, tok, [ds.text[ds.img2txt[i][0]] for i in range(len(ds))], dev,
                       cfg.get("max_tokens", 25))[2]
    return img, txt


def hubness(img, txt):
    nearest = (img @ txt.t()).argmax(1).numpy()
    counts = np.bincount(nearest, minlength=len(txt))
    top = np.argsort(counts)[::-1][:max(1, len(txt) // 100)]
    return int(counts.max()), float(np.isin(nearest, top).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--search_space", type=int, default=320)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="first N training entries only")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg = load_config(a.config)
    img, txt = features(cfg, a.checkpoint, a.limit)
    g = torch.Generator().manual_seed(a.seed)
    perm = torch.randperm(len(img), generator=g)
    img, txt = img[perm], txt[perm]
    m, b = a.search_space, a.batch
    rows = []
    for s in range(0, len(img) - m + 1, m):
        i, t = img[s:s + m], txt[s:s + m]
        sim = i @ t.t()
        walk = walk_similarities(sim, int(torch.randint(m, (1,), generator=g)))
        rows.append(order_stats(i, t, sim, walk, b))   # what the training log reports, per search space
    most, share = hubness(img[:m * (len(img) // m)], txt[:m * (len(img) // m)])
    print(f"{len(img)} pairs, search space {m}, batch {b}; hubness over all pairs: the most-chosen text is the "
          f"nearest of {most} images; {100 * share:.1f}% of images have one of the 1% most-chosen texts as nearest")
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}
    labels = dict(zip(STATS, ("max-sim", "mean-neg", "itc-loss", "nn-recall@5")))
    for name, label in (("random", "random"), ("grouped", "GRIT walk")):
        print(f"{label:10s} " + "   ".join(f"{labels[st]} {mean[f'{st}_{name}']:.4f}" for st in STATS))


if __name__ == "__main__":
    main()
