"""How hard are GRIT's grouped mini-batches, on a checkpoint's real ITC features?

    python tools/grit_hardness.py --config configs/demo/Pretrain.yaml --checkpoint output/grit10/checkpoint_00.pth

Encodes the training pairs (one caption per image, no augmentation), cuts them into search spaces as GRIT
does, and compares random batches with GRIT's walk, on every measure printed:

* ``max-sim``: each anchor image's hardest in-batch negative text (raw cosine), the training log's measure;
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
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset.caption_dataset import pretrain_dataset   # noqa: E402
from dataset.grit import greedy_walk, hardness, nn_recall   # noqa: E402
from dataset.transforms import test_transform   # noqa: E402
from engine.config import load_config   # noqa: E402
from models.checkpoint import load_checkpoint   # noqa: E402
from models.model_pretrain import ALBEF   # noqa: E402
from models.tokenization import ALBEFTokenizer   # noqa: E402


@torch.no_grad()
def features(cfg, checkpoint, limit=None, batch_size=128):
    tok = ALBEFTokenizer(cfg.get("tokenizer") or cfg.get("text_encoder") or "")
    model = ALBEF(dict(cfg, text_encoder=None, vision_init=None), tok)
    load_checkpoint(model, checkpoint, verbose=False)
    model.eval()
    ds = pretrain_dataset(cfg["train_file"], test_transform(cfg["image_res"]), cfg.get("max_words", 30),
                          image_root=cfg.get("image_root"))
    if limit:
        ds.ann = ds.ann[:limit]
    img, txt = [], []
    for images, caps, _, _ in DataLoader(ds, batch_size=batch_size, num_workers=2,
                                         collate_fn=lambda b: list(zip(*b))):
        t = tok(list(caps), padding="longest", truncation=True, max_length=cfg.get("max_tokens", 25))
        img.append(model.encode_image(torch.stack(images))[1])
        txt.append(model.encode_text(t["input_ids"], t["attention_mask"])[1])
    return torch.cat(img), torch.cat(txt)


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
    rows = {"random": [], "GRIT walk": []}
    for s in range(0, len(img) - m + 1, m):
        i, t = img[s:s + m], txt[s:s + m]
        w = torch.from_numpy(greedy_walk(i, t, int(torch.randint(m, (1,), generator=g))))
        for name, (ii, tt) in (("random", (i, t)), ("GRIT walk", (i[w], t[w]))):
            rows[name].append((hardness(ii, tt, b).item(), nn_recall(ii, tt, b).item()))
    most, share = hubness(img[:m * (len(img) // m)], txt[:m * (len(img) // m)])
    print(f"{len(img)} pairs, search space {m}, batch {b}; hubness over all pairs: the most-chosen text is the "
          f"nearest of {most} images; {100 * share:.1f}% of images have one of the 1% most-chosen texts as nearest")
    for name, r in rows.items():
        r = np.array(r)
        print(f"{name:10s} max-sim {r[:, 0].mean():.4f}   nn-recall@5 {r[:, 1].mean():.4f}")


if __name__ == "__main__":
    main()
