"""Weakly supervised grounding (ALBEF's Grounding.py): Grad-CAM of a referring expression on the image, the
best-scoring detector proposal, accuracy per RefCOCO+ split, and pictures of what was found.

Grad-CAM is ALBEF's, batched over expressions (each expression's score depends only on its own image and
text, so one backward for the batch gives every expression its own gradient):

* ``itm``: the cross-attention probabilities of text layer ``block_num`` (eager attention there only) and
  the gradient of the ITM positive logit with respect to them, clamped at 0; map = mean over heads, then over
  the text positions (padding masked, counted in the mean as ALBEF does), of attention x gradient; the
  image's [CLS] column (and ViCHA's concept tokens) dropped.
* ``itc``: ViT block ``block_num``'s attention row of [CLS] and the gradient of the ITC similarity
  image_feat . text_feat / temp, clamped; map = mean over heads.

Box scoring is ALBEF's: the map upsampled (bicubic) to the image size, each proposal scored by its sum over
the map / sqrt(area), the best one correct iff IoU >= 0.5 with inclusive pixel coordinates. Unlike ALBEF a
best box is always chosen (ALBEF kept a stale box when no score was above 0), an image without proposals is
counted as a miss and reported, and proposals are clipped to the image (ALBEF's slicing wrapped negative
coordinates around).
"""
import contextlib
import json
import os

import torch
import torch.nn.functional as F

from dataset import create_dataset, eval_batch_size
from dataset.caption_dataset import AnnotationError
from dataset.collate import Collate, text_collate
from engine.config import base_parser, parse_launcher
from engine.logger import Results
from engine.splits import check_split, with_texts_cut
from models.batch import concepts_of, to_device
from schema import ConfigError, value
from models.xbert import SharedImageKV
from tasks.finetune import build, finetune
from tasks.image_groups import group_loader
from utils import all_reduce_sum, save_json, save_result

SPLITS = ("val", "testA", "testB")


def grid_size(config):
    """Patch grid side: image_res // patch_size (384 / 16 = 24; ViCHA's 380 px gives 23)."""
    return int(value(config, "image_res")) // int(value(config, "patch_size"))


def gradcam_itm(model, image, input_ids, attention_mask, block_num, grid, concepts=None, rows=None):
    """[B, grid, grid] maps from the ITM head through text layer ``block_num``'s cross-attention. With
    ``rows``, ``image`` holds each distinct image once: its ViT pass and keys and values are shared by its
    expressions (the map's gradient is taken at the attention probabilities, one row per expression)."""
    attn = model.text_bert.encoder.layer[block_num].crossattention.self
    with torch.no_grad():
        image_embeds = model.image_tokens(image, concepts)
        atts = model.image_atts(image_embeds, concepts)
    if rows is not None:
        image_embeds, atts = SharedImageKV(image_embeds)[rows], atts[rows]
    attn.save_attention = True
    try:
        with torch.enable_grad():
            out = model.text_bert(input_ids=input_ids, attention_mask=attention_mask,
                                  encoder_hidden_states=image_embeds, encoder_attention_mask=atts)
            score = model.itm_head(out.last_hidden_state[:, 0])[:, 1]
            probs = attn.get_attention_map()
            grad, = torch.autograd.grad(score.sum(), probs)
    finally:
        attn.save_attention = False
        attn.attention_map = attn.attn_gradients = None
    b, h, l = probs.shape[:3]
    mask = attention_mask.view(b, 1, l, 1, 1).to(probs.dtype)
    cam = probs[:, :, :, 1:1 + grid * grid].reshape(b, h, l, grid, grid) * mask
    grad = grad[:, :, :, 1:1 + grid * grid].clamp(min=0).reshape(b, h, l, grid, grid) * mask
    return (cam * grad).mean(1).mean(1).detach().float()


def gradcam_itc(model, image, input_ids, attention_mask, block_num, grid, concepts=None):
    """[B, grid, grid] maps from the ITC similarity through ViT block ``block_num``'s [CLS] attention row."""
    blk = model.visual_encoder.blocks[block_num].attn
    try:
        with torch.enable_grad():
            image_embeds = model.image_tokens(image, concepts, register_blk=block_num)
            image_feat = F.normalize(model.vision_proj(image_embeds[:, 0]).float(), dim=-1)
            _, text_feat = model.encode_text(input_ids, attention_mask)
            sim = (image_feat * text_feat.float()).sum(-1) / model.temp.float()
            probs = blk.attention_map
            grad, = torch.autograd.grad(sim.sum(), probs)
    finally:
        blk.attention_map = blk.attn_gradients = None
    b, h = probs.shape[:2]
    cam = probs[:, :, 0, 1:1 + grid * grid].reshape(b, h, grid, grid)
    grad = grad[:, :, 0, 1:1 + grid * grid].clamp(min=0).reshape(b, h, grid, grid)
    return (cam * grad).mean(1).detach().float()


def gradcam(model, image, input_ids, attention_mask, mode, block_num, grid, concepts=None, rows=None):
    """ViCHA's ``concepts`` join the image tokens; the maps keep the patch columns only. ``rows``: see
    ``gradcam_itm``; an ITC map goes back through the ViT, so each expression keeps its own ViT pass there."""
    if mode == "itm":
        return gradcam_itm(model, image, input_ids, attention_mask, block_num, grid, concepts, rows)
    if rows is not None:
        image = image[rows]
        concepts = None if concepts is None else tuple(c[rows] for c in concepts)
    if mode == "itc":
        return gradcam_itc(model, image, input_ids, attention_mask, block_num, grid, concepts)
    raise ValueError(f"--gradcam_mode must be itm or itc, got {mode!r}")


def iou_inclusive(a, b):
    """ALBEF's IoU of [x, y, w, h] boxes on inclusive pixel coordinates (x2 = x + w - 1)."""
    ax2, ay2 = a[0] + a[2] - 1, a[1] + a[3] - 1
    bx2, by2 = b[0] + b[2] - 1, b[1] + b[3] - 1
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(ax2, bx2), min(ay2, by2)
    inter = (x2 - x1 + 1) * (y2 - y1 + 1) if (x1 < x2 and y1 < y2) else 0
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def box_scores(heat, dets):
    """Each proposal's sum of ``heat`` [H, W] over its pixels rows int(y):int(y+h), columns int(x):int(x+w)
    (clipped to the image) divided by sqrt(w * h); summed-area table, one pass for all proposals."""
    hgt, wid = heat.shape
    sat = F.pad(heat.double().cumsum(0).cumsum(1), (1, 0, 1, 0))
    d = torch.tensor(dets, dtype=torch.float64)[:, :4]
    x0 = d[:, 0].trunc().long().clamp(0, wid)
    y0 = d[:, 1].trunc().long().clamp(0, hgt)
    x1 = (d[:, 0] + d[:, 2]).trunc().long().clamp(0, wid)
    y1 = (d[:, 1] + d[:, 3]).trunc().long().clamp(0, hgt)
    x1, y1 = torch.maximum(x1, x0), torch.maximum(y1, y0)
    total = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return total / (d[:, 2] * d[:, 3]).clamp(min=1e-12).sqrt()


def pick_box(cam, dets, height, width):
    """(best proposal, upsampled map) for one expression; (None, map) without proposals. Ties: the first."""
    heat = F.interpolate(cam[None, None].double(), size=(int(height), int(width)), mode="bicubic",
                         align_corners=False)[0, 0]
    if not dets:
        return None, heat
    return dets[int(box_scores(heat, dets).argmax())], heat


@torch.no_grad()
def evaluate(model, dataset, tokenizer, refs, dets, config, device, mode, block_num, result_dir, tag,
             autocast=None, pictures=0, splits=SPLITS):
    """Collective. Accuracy (percent) per split as ``val_d`` / ``testA_d`` / ``testB_d`` with counts, over the
    expressions of ``splits``; every expression scored once under any number of ranks; per-expression results
    and PNGs in ``result_dir``."""
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    grid = grid_size(config)
    mine = [i for i in range(len(dataset)) if split_of(dataset, refs, i) in splits]
    loader = group_loader(dataset, Collate(tokenizer, vc_max_tokens=value(config, "vc_max_tokens")),   # ALBEF: longest
                          eval_batch_size(config), int(value(config, "num_workers")), indices=mine)

    # per split: correct, expressions, without proposals
    counts = torch.zeros(len(SPLITS), 3, dtype=torch.float64)
    rows, shown, cut = [], [], 0
    for batch in loader:
        cut += batch.get("texts_cut", 0)
        b = to_device(batch, device)
        concepts = concepts_of(b)
        with autocast():
            cams = gradcam(model, b["image"], b["input_ids"], b["attention_mask"], mode, block_num, grid,
                           concepts, rows=b["rows"]).cpu()
        for cam, ref_id, i in zip(cams, batch["ref_id"], batch["idx"].tolist()):
            ref = refs.get(ref_id)
            if ref is None:
                raise KeyError(f"test_file entry {i}: ref_id {ref_id} is not in the refs (refs_file / refcoco_data)")
            if ref["split"] not in SPLITS:
                continue
            s = SPLITS.index(ref["split"])
            boxes = dets.get(str(ref["image_id"]), [])
            box, heat = pick_box(cam, boxes, ref["height"], ref["width"])
            correct = box is not None and iou_inclusive(box, ref["box"]) >= 0.5
            counts[s] += torch.tensor([float(correct), 1.0, float(box is None)], dtype=torch.float64)
            rows.append({"ref_id": ref_id, "split": ref["split"], "pred_box": box, "gt_box": ref["box"],
                         "correct": bool(correct), "_index": i})
            if pictures:   # this rank's first expressions in the split's order (groups come image by image)
                shown = sorted(shown + [(i, heat, box, ref)], key=lambda x: x[0])[:pictures]
    counts = all_reduce_sum(counts)
    cut = int(all_reduce_sum(torch.tensor([cut], dtype=torch.float64)).item())
    merged = save_result(rows, result_dir, f"grounding_{tag}", key="ref_id", order=lambda r: r["_index"])
    if merged is not None:   # the file keeps its form: the split's order, no helper field
        save_json(result_dir, f"grounding_{tag}", [{k: v for k, v in r.items() if k != "_index"} for r in merged])
    for i, heat, box, ref in shown:
        picture(dataset, i, heat, box, ref, os.path.join(result_dir, f"pictures_{tag}"))
    model.train(was_training)
    metrics = {}
    for s, name in enumerate(SPLITS):
        if name not in splits:
            continue
        correct, total, empty = counts[s].tolist()
        if total == 0:
            print(f"grounding {tag}: no expressions of split {name!r} in test_file")
            continue
        metrics[f"{name}_d"] = 100.0 * correct / total
        metrics[f"n_{name}_d"] = int(total)
        if empty:
            metrics[f"no_proposals_{name}"] = int(empty)
            print(f"grounding {tag}: {int(empty)} {name} expressions have no proposals in det_file (counted wrong)")
    return with_texts_cut(metrics, cut, "expressions")


def picture(dataset, i, heat, box, ref, out_dir):
    """A PNG: the image, the Grad-CAM heat map over it, the gold box (green) and the chosen one (red)."""
    from dataset.caption_dataset import load_image
    os.makedirs(out_dir, exist_ok=True)
    a = dataset.ann[i]
    try:
        img = load_image(dataset.image_path(i)).resize((int(ref["width"]), int(ref["height"])))
    except Exception:   # noqa: BLE001 - a picture is not worth a crash
        return None
    return draw(img, heat, a["text"], os.path.join(out_dir, f"{i:05d}_ref{a['ref_id']}.png"), gold=ref["box"],
                chosen=box)


def draw(img, heat, title, path, gold=None, chosen=None):
    """The image with the heat map (upsampled to its size) over it, the gold box (green, solid) and the chosen
    one (red, dashed), saved as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.imshow(img)
    h = heat.numpy()
    ax.imshow((h - h.min()) / max(h.max() - h.min(), 1e-12), cmap="jet", alpha=0.45)
    for b, color, style in ((gold, "lime", "-"), (chosen, "red", "--")):
        if b is not None:
            ax.add_patch(Rectangle((b[0], b[1]), b[2], b[3], fill=False, edgecolor=color, linewidth=2,
                                   linestyle=style))
    ax.set_title(title[:60], fontsize=9)
    ax.axis("off")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def baselines(config, seed=0):
    """Accuracy per split of picking a random proposal (expected value) and the largest one."""
    from dataset.grounding_dataset import load_dets, load_refs
    from dataset.caption_dataset import as_list, read_json_list
    refs, dets = load_refs(config), load_dets(config)
    out = {}
    for name in SPLITS:
        rnd, big, n = 0.0, 0, 0
        for f in as_list(config["test_file"]):
            for a in read_json_list(f, {"ref_id": (int, str)}, "test_file"):
                ref = refs[int(a["ref_id"])]
                if ref["split"] != name:
                    continue
                boxes = dets.get(str(ref["image_id"]), [])
                n += 1
                if boxes:
                    hits = [iou_inclusive(b, ref["box"]) >= 0.5 for b in boxes]
                    rnd += sum(hits) / len(hits)
                    big += hits[max(range(len(boxes)), key=lambda k: boxes[k][2] * boxes[k][3])]
        if n:
            out[name] = {"random_proposal": 100 * rnd / n, "largest_proposal": 100 * big / n, "expressions": n}
    return out


def split_of(dataset, refs, i):
    """The REFER split of test item ``i`` (None when its ref is unknown: reported when it is scored)."""
    ref = refs.get(int(dataset.ann[i]["ref_id"]))
    return ref["split"] if ref is not None else SPLITS[0]


def splits_present(dataset, refs, config):
    """The RefCOCO+ splits with expressions in ``test_file``, checked at start-up: every ``ref_id`` is in the
    refs, and an empty split is an error (or skipped with ``empty_splits: skip``)."""
    counts = dict.fromkeys(SPLITS, 0)
    for i, a in enumerate(dataset.ann):
        ref = refs.get(int(a["ref_id"]))
        if ref is None:
            raise AnnotationError(f"test_file {dataset.source_of(i)}: ref_id {a['ref_id']} is not in the refs "
                                  "(refs_file / refcoco_data)")
        if ref["split"] in counts:
            counts[ref["split"]] += 1
    return [s for s in SPLITS if check_split(config, "test_file", s, counts[s])]


def main():
    from models.checkpoint import strip_bert
    from models.model_retrieval import ALBEF
    from dataset.grounding_dataset import load_dets, load_refs
    parser = base_parser("ALBEF weakly supervised grounding (RefCOCO+)", "./configs/Grounding.yaml", "output/Grounding")
    parser.add_argument("--gradcam_mode", default="itm", choices=["itm", "itc"])
    parser.add_argument("--block_num", default=8, type=int, help="text layer (itm) or ViT block (itc) of the map")
    parser.add_argument("--evaluate", action="store_true", help="evaluate --checkpoint only")
    args, config = parse_launcher(parser, task="grounding")
    env, tokenizer, model = build(args, config, ALBEF, remap=strip_bert)
    depth = len(model.text_bert.encoder.layer) if args.gradcam_mode == "itm" else len(model.visual_encoder.blocks)
    first = model.bert_config.fusion_layer if args.gradcam_mode == "itm" else 0
    if not first <= args.block_num < depth:
        raise ConfigError(f"--block_num {args.block_num}: {args.gradcam_mode} Grad-CAM needs a "
                          f"{'cross-attention text layer' if args.gradcam_mode == 'itm' else 'ViT block'} in "
                          f"[{first}, {depth - 1}]")
    test = create_dataset("grounding_test", config)
    refs, dets = load_refs(config), load_dets(config)
    present = splits_present(test, refs, config)
    results = Results(args.output_dir, env.main, columns=tuple(f"{s}_d" for s in SPLITS))
    result_dir = os.path.join(args.output_dir, "result")
    # validation after every epoch selects the weights; testA and testB are evaluated once, with them
    groups = {"val": ("val",), "test": ("testA", "testB")}
    splits = [name for name, parts in groups.items() if set(parts) & set(present)]

    def run_eval(m, split, autocast, tag, **info):
        metrics = evaluate(m, test, tokenizer, refs, dets, config, env.device, args.gradcam_mode, args.block_num,
                           result_dir, f"{split}_{tag}", autocast, pictures=int(value(config, "grounding_pictures")),
                           splits=groups[split])
        return results.add(split, metrics, **info)

    def train():
        return create_dataset("grounding_train", config, seed=args.seed), text_collate(
            tokenizer, max_length=None, truncation=False,   # ALBEF: padding='longest', untruncated
            vc_max_tokens=value(config, "vc_max_tokens"))

    finetune(args, config, env, model, splits, run_eval, "val_d", f"grounding ({args.gradcam_mode} Grad-CAM)",
             ("testA_d", "testB_d"), train, prefix="")


def contact_sheet(pictures_dir, out, n=12, columns=6):
    """The first ``n`` PNGs of an evaluation's ``pictures_<tag>/`` side by side in one image."""
    from PIL import Image
    names = sorted(f for f in os.listdir(pictures_dir) if f.endswith(".png"))[:n]
    if not names:
        raise FileNotFoundError(f"no PNGs in {pictures_dir!r}")
    tiles = [Image.open(os.path.join(pictures_dir, f)).convert("RGB").resize((240, 250)) for f in names]
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (240 * min(columns, len(tiles)), 250 * rows), "white")
    for k, tile in enumerate(tiles):
        sheet.paste(tile, ((k % columns) * 240, (k // columns) * 250))
    sheet.save(out)
    return out


if __name__ == "__main__":   # python -m tasks.grounding --config configs/demo/Grounding.yaml: the baselines
    import argparse
    from engine.config import load_config, validate
    p = argparse.ArgumentParser(description="random-proposal and largest-proposal accuracy per split; with "
                                "--sheet, one image of an evaluation's first pictures")
    p.add_argument("--config")
    p.add_argument("--sheet", help="a result/pictures_<tag> folder")
    p.add_argument("--out", default="grounding_examples.png")
    a = p.parse_args()
    if a.sheet:
        print(contact_sheet(a.sheet, a.out))
    else:
        print(json.dumps(baselines(validate(load_config(a.config))), indent=1))
