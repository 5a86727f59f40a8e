"""Show the false negatives MAFA's ECM finds: mine connections with a filter on GRIT-grouped batches.

    python Get_ECM_example.py --filter_config configs/demo/Retrieval.yaml \
        --filter_checkpoint output/demo_filter/checkpoint_best.pth --data data/demo/retrieval_train.json \
        --image_root data/demo --output_dir output/ecm_example --ground_truth data/demo/false_negatives.json

The pairs (``{image, caption, image_id}`` items, ALBEF's retrieval-train format) are encoded once by the
filter, grouped with GRIT's walk over the filter's ITC features, cut into batches, and each batch goes
through ECM as in training (hardest in-batch negatives, the filter's ITM decides; captions of the same
image are never candidates). Images use the evaluation transform, not training augmentation. Writes
``wrt_img_examples.json`` (anchor image, its caption, newly connected caption, score),
``wrt_txt_examples.json`` (anchor caption, its image, newly connected image, score) and ``stats.json``
(decision counts; with ``--ground_truth``, the demo world's false negatives, ECM's precision and recall).
"""
import argparse
import json
import os

import torch
from torch.utils.data import DataLoader

from dataset.collate import text_collate
from dataset.caption_dataset import pre_caption, re_train_dataset
from dataset.grit import GritCollector
from dataset.transforms import test_transform
from engine.config import load_config
from tasks.ecm_filter import build_discriminator
from models.objectives.ecm import CONNECTION, NEGATIVE
from models.tokenization import ALBEFTokenizer


class Items(re_train_dataset):
    """Retrieval-train items returning their own item index (the pairs ECM judges)."""

    def __getitem__(self, index):
        image, i, bad = self.read(index)
        return {"image": image, "caption": pre_caption(self.ann[i]["caption"], self.max_words), "idx": i, "bad": bad}


def ground_truth(path, split):
    with open(path) as f:
        data = json.load(f)[split]
    return {(str(r["image_id"]), r["caption"]): {str(x) for x in r["false_negatives"]} for r in data}


SWEEP = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def threshold_sweep(scores, is_fn, highs):
    """Precision and recall of the connections (score >= high, ECM's rule) for each ``high``."""
    s, t = torch.tensor(scores, dtype=torch.float64), torch.tensor(is_fn, dtype=torch.bool)
    rows = []
    for h in highs:
        conn = s >= h
        tp = int((conn & t).sum())
        rows.append({"high_threshold": h, "connections": int(conn.sum()), "true_connections": tp,
                     "precision": tp / max(int(conn.sum()), 1), "recall": tp / max(int(t.sum()), 1)})
    return rows


@torch.no_grad()
def mine(filter_config, filter_checkpoint, data, image_root, batch_size=32, group_batches=8, max_items=0,
         low=0.5, high=0.8, examples=12, truth=None, device="cpu", seed=0):
    """Returns (image-anchored examples, text-anchored examples, stats)."""
    cfg = load_config(filter_config)
    tok = ALBEFTokenizer(cfg.get("tokenizer") or cfg["text_encoder"])
    disc = build_discriminator({"filter_config": filter_config, "filter_checkpoint": filter_checkpoint,
                                "low_threshold": low, "high_threshold": high}, tok, device)
    model = disc.model
    ds = Items(data, test_transform(cfg["image_res"]), image_root)
    n = len(ds) if not max_items else min(max_items, len(ds))
    sub = torch.utils.data.Subset(ds, range(n))
    collate = text_collate(tok, max_length=30)
    images, captions, img_f, txt_f, order = [], [], [], [], []   # images kept: read each file once
    for b in DataLoader(sub, batch_size=64, collate_fn=lambda x: (collate(x), [s["caption"] for s in x]),
                        num_workers=2):
        b, caps = b
        images.append(b["image"])
        captions += caps
        img_f.append(model.encode_image(b["image"].to(device, disc.dtype))[1])   # bf16 filter on CUDA
        txt_f.append(model.encode_text(b["input_ids"].to(device), b["attention_mask"].to(device))[1])
        order.append(b["idx"])
    images, img_f, txt_f = torch.cat(images), torch.cat(img_f), torch.cat(txt_f)
    order = torch.cat(order).numpy()
    pos = {int(item): j for j, item in enumerate(order)}   # item index -> row of the cached tensors
    # GRIT grouping over the filter's features: the training collector, with one queue holding every pair
    space = batch_size * group_batches
    collector = GritCollector(space * -(-len(order) // space), space, img_f.shape[1], batch_size, seed, img_f.device)
    collector.push(img_f, txt_f, torch.from_numpy(order))
    grouped, _ = collector.finish()
    ann = ds.ann
    wrt_img, wrt_txt = [], []
    counts = {"connections": 0, "negatives": 0, "ambiguous": 0, "candidates": 0}
    tp = fn_candidates = 0
    scores, is_fn = [], []   # every candidate's filter score and ground truth, for the threshold sweep
    for s in range(0, len(grouped) - batch_size + 1, batch_size):
        items = grouped[s:s + batch_size]
        rows = [pos[int(i)] for i in items]
        text = tok([captions[r] for r in rows], padding="longest", truncation=True, max_length=30)
        image, ids, att = images[rows].to(device), text["input_ids"].to(device), text["attention_mask"].to(device)
        sim = img_f[rows] @ txt_f[rows].t()
        ids_img = [str(ann[int(i)]["image_id"]) for i in items]
        same = torch.tensor([[a == c for c in ids_img] for a in ids_img], device=device)
        ecm = disc.mine(sim, sim.t(), same, image, ids, att)
        for direction, partner_key, prob_key in (("t2i", "m1", "p_t2i"), ("i2t", "n1", "p_i2t")):
            dec, partner, prob = ecm[direction].tolist(), ecm[partner_key].tolist(), ecm[prob_key].tolist()
            for k in range(batch_size):
                counts["candidates"] += 1
                counts[{CONNECTION: "connections", NEGATIVE: "negatives"}.get(dec[k], "ambiguous")] += 1
                a, p = ann[int(items[k])], ann[int(items[partner[k]])]
                text_item, image_item = (a, p) if direction == "t2i" else (p, a)
                true_fn = None
                if truth is not None:
                    true_fn = str(image_item["image_id"]) in truth.get((str(text_item["image_id"]),
                                                                        text_item["caption"]), set())
                    fn_candidates += int(true_fn)
                    tp += int(true_fn and dec[k] == CONNECTION)
                    scores.append(prob[k])
                    is_fn.append(true_fn)
                if dec[k] != CONNECTION:
                    continue
                row = {"score": round(prob[k], 4), "true_false_negative": true_fn}
                if direction == "t2i":
                    row.update(anchor_text=a["caption"], original_image=a["image"], connected_image=p["image"])
                    wrt_txt.append(row)
                else:
                    row.update(anchor_image=a["image"], original_caption=a["caption"], connected_caption=p["caption"])
                    wrt_img.append(row)
    stats = {**counts, "batches": len(grouped) // batch_size, "batch_size": batch_size,
             "low_threshold": low, "high_threshold": high}
    if truth is not None:
        stats.update(true_false_negative_candidates=fn_candidates, true_connections=tp,
                     precision=tp / max(counts["connections"], 1), recall=tp / max(fn_candidates, 1),
                     base_rate=fn_candidates / max(counts["candidates"], 1),
                     sweep=threshold_sweep(scores, is_fn, sorted({*SWEEP, high})))
    return wrt_img[:examples], wrt_txt[:examples], stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--filter_config", required=True)
    ap.add_argument("--filter_checkpoint", required=True)
    ap.add_argument("--data", required=True, help="retrieval-train JSON: [{image, caption, image_id}]")
    ap.add_argument("--image_root", default=None)
    ap.add_argument("--output_dir", default="output/ecm_example")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--group_batches", type=int, default=8, help="search space = this many batches")
    ap.add_argument("--max_items", type=int, default=0, help="first N pairs only (0: all)")
    ap.add_argument("--low_threshold", type=float, default=0.5)
    ap.add_argument("--high_threshold", type=float, default=0.8)
    ap.add_argument("--examples", type=int, default=12)
    ap.add_argument("--ground_truth", default="", help="the demo world's false_negatives.json")
    ap.add_argument("--split", default="train")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    truth = ground_truth(a.ground_truth, a.split) if a.ground_truth else None
    wrt_img, wrt_txt, stats = mine(a.filter_config, a.filter_checkpoint, a.data, a.image_root, a.batch_size,
                                   a.group_batches, a.max_items, a.low_threshold, a.high_threshold, a.examples,
                                   truth, torch.device(a.device))
    os.makedirs(a.output_dir, exist_ok=True)
    for name, obj in (("wrt_img_examples", wrt_img), ("wrt_txt_examples", wrt_txt), ("stats", stats)):
        with open(os.path.join(a.output_dir, name + ".json"), "w") as f:
            json.dump(obj, f, indent=1)
    print_stats(stats)
    print_examples(wrt_img, wrt_txt)
    print(f"examples: {os.path.join(a.output_dir, 'wrt_img_examples.json')} (image-anchored), "
          f"{os.path.join(a.output_dir, 'wrt_txt_examples.json')} (text-anchored); counts: "
          f"{os.path.join(a.output_dir, 'stats.json')}")


def print_examples(wrt_img, wrt_txt, n=3):
    """A few connections the filter found: the anchor, its own pair, the partner judged a false negative."""
    for r in wrt_img[:n]:
        print(f"image {r['anchor_image']}: its caption {r['original_caption']!r}; connected caption "
              f"{r['connected_caption']!r} (P(match) {r['score']}"
              + (f", a true false negative: {r['true_false_negative']})" if r.get('true_false_negative') is not None else ")"))
    for r in wrt_txt[:n]:
        print(f"caption {r['anchor_text']!r}: its image {r['original_image']}; connected image {r['connected_image']} "
              f"(P(match) {r['score']}" + (f", a true false negative: {r['true_false_negative']})"
                                            if r.get('true_false_negative') is not None else ")"))


def print_stats(stats):
    """The decision counts, then (with ground truth) precision and recall over the threshold sweep."""
    print(json.dumps({k: v for k, v in stats.items() if k != "sweep"}, indent=1))
    if "sweep" in stats:
        print(f"base rate of true false negatives among candidates: {stats['base_rate']:.3f}")
        print("high_threshold  connections  precision  recall")
        for r in stats["sweep"]:
            print(f"{r['high_threshold']:14.2f}  {r['connections']:11d}  {r['precision']:9.3f}  {r['recall']:6.3f}")


if __name__ == "__main__":
    main()
