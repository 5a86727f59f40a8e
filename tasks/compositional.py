"""Compositional benchmarks: does the model score an image's true caption above its foils?

    python -m tasks.compositional --config configs/demo/Pretrain.yaml --checkpoint output/demo/checkpoint_09.pth \
        --benchmark sugarcrepe --data data/demo/compositional --image_root data/demo --output_dir output/comp

Formats (the benchmarks' own files, read as released):
* SugarCrepe: a folder of per-subset JSON files (``add_att.json``, ``replace_rel.json``, ...), each
  ``{id: {"filename", "caption", "negative_caption"}}``; averages per REPLACE / SWAP / ADD family.
* ARO: ``visual_genome_relation.json`` / ``visual_genome_attribution.json`` (lists of ``{"image_path",
  "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption"}`` plus ``relation_name`` or
  ``attributes``; the image is cropped to the box as ARO does); VG-Relation is the macro average over
  relations without ARO's symmetric ones, VG-Attribution over attribute pairs with at least 25 cases.
  COCO / Flickr30k Order: a Karpathy test JSON (``[{"image", "caption": [5 str]}]``); each caption gets
  ARO's four word-order perturbations (``aro_order_foils``), scored as Precision@1 over the five options.
* VALSE: a folder of piece files (``existence.json``, ...), ``{id: {"caption", "foil", "image_file",
  "mturk": {"caption": votes}}}``; kept when at least 2 of 3 annotators validated the caption.

Scores: for ALBEF-style models the ITC cosine, the ITM positive logit and their sum (the X-VLM evaluation of
CE-CLIP); ``--clip`` scores an open_clip model by its cosine. A case is right when the true caption's score
is strictly higher (ties count as wrong). Results go to ``results.jsonl`` / ``results.md``.
"""
import argparse
import json
import os
import random
from collections import defaultdict

import torch

from dataset.caption_dataset import load_image
from dataset.utils import pre_caption
from schema import value

SUGARCREPE_FAMILIES = {"replace": ("replace_obj", "replace_att", "replace_rel"),
                       "swap": ("swap_obj", "swap_att"), "add": ("add_obj", "add_att")}
# ARO's relations whose subject/object swap keeps the meaning (removed from VG-Relation's macro average)
ARO_SYMMETRIC = {"adjusting", "attached to", "between", "bigger than", "biting", "boarding", "brushing",
                 "chewing", "cleaning", "climbing", "close to", "coming from", "coming out of", "contain",
                 "crossing", "dragging", "draped over", "drinking", "drinking from", "driving", "driving down",
                 "driving on", "eating from", "eating in", "enclosing", "exiting", "facing", "filled with",
                 "floating in", "floating on", "flying", "flying above", "flying in", "flying over",
                 "flying through", "full of", "going down", "going into", "going through", "grazing in",
                 "growing in", "growing on", "guiding", "hanging from", "hanging in", "hanging off",
                 "hanging over", "higher than", "holding onto", "hugging", "in between", "jumping off",
                 "jumping on", "jumping over", "kept in", "larger than", "leading", "leaning over",
                 "leaving", "licking", "longer than", "looking in", "looking into", "looking out",
                 "looking over", "looking through", "lying next to", "lying on top of", "making",
                 "mixed with", "mounted on", "moving", "on the back of", "on the edge of", "on the front of",
                 "on the other side of", "opening", "painted on", "parked at", "parked beside", "parked by",
                 "parked in", "parked in front of", "parked near", "parked next to", "perched on",
                 "petting", "piled on", "playing", "playing in", "playing on", "playing with", "pouring",
                 "reaching for", "reading", "reflected on", "riding on", "running in", "running on",
                 "running through", "seen through", "sitting behind", "sitting beside", "sitting by",
                 "sitting in front of", "sitting near", "sitting next to", "sitting under", "skiing down",
                 "skiing on", "sleeping in", "sleeping on", "smiling at", "sniffing", "splashing",
                 "sprinkled on", "stacked on", "standing against", "standing around", "standing behind",
                 "standing beside", "standing in front of", "standing near", "standing next to",
                 "staring at", "stuck in", "surrounding", "swimming in", "swinging", "talking to",
                 "topped with", "touching", "traveling down", "traveling on", "tying", "typing on",
                 "underneath", "wading in", "waiting for", "walking across", "walking by", "walking down",
                 "walking next to", "walking through", "working in", "working on", "worn on", "wrapped around",
                 "wrapped in"}


class BenchmarkError(ValueError):
    pass


def _load_json(path):
    if not os.path.isfile(path):
        raise BenchmarkError(f"benchmark file not found: {path!r}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path!r} is not valid JSON: {e}") from None


def _need(entry, fields, path, key):
    missing = [f for f in fields if f not in entry]
    if missing:
        raise BenchmarkError(f"{path!r}, entry {key!r}: missing field(s) {missing}")


# ---------------------------------------------------------------------------------------------- readers
# a case: {"subset", "image" (path), "box" ([x, y, w, h] or None), "texts" ([true, foil, ...]), "group"}
def _subset_files(folder, what):
    """[(path, subset name)] of a folder of per-subset JSON files."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".json")) if os.path.isdir(folder) else []
    if not files:
        raise BenchmarkError(f"no {what} files (*.json) in {folder!r}")
    return [(os.path.join(folder, f), f[:-len(".json")]) for f in files]


def read_sugarcrepe(folder, image_root):
    cases = []
    for path, subset in _subset_files(folder, "SugarCrepe subset"):
        data = _load_json(path)
        if not isinstance(data, dict):
            raise BenchmarkError(f"{path!r}: expected {{id: {{filename, caption, negative_caption}}}}")
        for k, e in data.items():
            _need(e, ("filename", "caption", "negative_caption"), path, k)
            cases.append({"subset": subset, "image": os.path.join(image_root, e["filename"]), "box": None,
                          "texts": [e["caption"], e["negative_caption"]], "group": None})
    return cases


def read_aro_vg(path, image_root, kind):
    """kind: 'relation' or 'attribution'."""
    data = _load_json(path)
    cases = []
    for k, e in enumerate(data):
        _need(e, ("image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption"), path, k)
        group = e.get("relation_name") if kind == "relation" else "-".join(e.get("attributes") or [])
        cases.append({"subset": f"vg_{kind}", "image": os.path.join(image_root, e["image_path"]),
                      "box": [e["bbox_x"], e["bbox_y"], e["bbox_w"], e["bbox_h"]],
                      "texts": [e["true_caption"], e["false_caption"]], "group": group})
    return cases


def read_aro_order(path, image_root, name, tagger=None, seed=0):
    data = _load_json(path)
    rng = random.Random(seed)
    cases = []
    for k, e in enumerate(data):
        _need(e, ("image", "caption"), path, k)
        for cap in (e["caption"] if isinstance(e["caption"], list) else [e["caption"]]):
            cases.append({"subset": f"{name}_order", "image": os.path.join(image_root, e["image"]), "box": None,
                          "texts": [cap] + aro_order_foils(cap, rng, tagger), "group": None})
    return cases


def read_valse(folder, image_root):
    cases = []
    for path, piece in _subset_files(folder, "VALSE piece"):
        for k, e in _load_json(path).items():
            _need(e, ("caption", "foil", "image_file"), path, k)
            if (e.get("mturk") or {}).get("caption", 3) < 2:   # VALSE: at least 2 of 3 validated the caption
                continue
            cases.append({"subset": piece, "image": os.path.join(image_root, e["image_file"]), "box": None,
                          "texts": [e["caption"], e["foil"]], "group": None})
    return cases


# ---------------------------------------------------------------------------------------------- ARO's order foils
def _shuffle(words, rng):
    words = list(words)
    rng.shuffle(words)
    return words


def aro_order_foils(caption, rng, tagger=None):
    """ARO's four perturbations: shuffle the nouns and adjectives among themselves, shuffle every other word,
    shuffle the words within each trigram, shuffle the trigrams. ``tagger(words) -> POS tags`` (spaCy's
    coarse tags: NOUN, ADJ, ...) is needed for the first two."""
    words = caption.strip().split()
    if tagger is None:
        raise BenchmarkError("ARO's order foils need a POS tagger (spaCy with an English pipeline, --spacy)")
    tags = tagger(words)
    content = [i for i, t in enumerate(tags) if t in ("NOUN", "ADJ")]
    other = [i for i in range(len(words)) if i not in content]
    foils = []
    for group in (content, other):
        out = list(words)
        for i, w in zip(group, _shuffle([words[i] for i in group], rng)):
            out[i] = w
        foils.append(" ".join(out))
    trigrams = [words[i:i + 3] for i in range(0, len(words), 3)]
    foils.append(" ".join(w for t in trigrams for w in _shuffle(t, rng)))
    foils.append(" ".join(w for t in _shuffle(trigrams, rng) for w in t))
    return foils


def spacy_tagger(model):
    from dataset.utils import load_spacy
    nlp = load_spacy(model, BenchmarkError)

    def tag(words):
        from spacy.tokens import Doc
        return [t.pos_ for t in nlp(Doc(nlp.vocab, words=words))]
    return tag


# ---------------------------------------------------------------------------------------------- scoring
def read_case_image(case, transform, image_res):
    """(tensor, bad): a missing or unreadable image is scored as a blank one and counted, never a crash."""
    try:
        img = load_image(case["image"])
        if case["box"] is not None:
            x, y, w, h = case["box"]
            img = img.crop((x, y, x + w, y + h))
        return transform(img), False
    except Exception:   # noqa: BLE001
        return torch.zeros(3, image_res, image_res), True


@torch.no_grad()
def albef_scores(model, images, texts, tokenizer, device, max_tokens=30):
    """{itc, itm, sum}: [B, K] scores of each image against its own K texts."""
    b, k = len(texts), len(texts[0])
    image_embeds, image_feat = model.encode_image(images.to(device))
    flat = [pre_caption(t, max_tokens) for ts in texts for t in ts]
    tok = tokenizer(flat, padding="longest", truncation=True, max_length=max_tokens)
    ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    text_embeds, text_feat = model.encode_text(ids, mask)
    itc = (image_feat.float().repeat_interleave(k, 0) * text_feat.float()).sum(-1).view(b, k)
    cls = model.fuse(text_embeds, mask, image_embeds.repeat_interleave(k, 0))
    itm = model.itm_head(cls).float()[:, 1].view(b, k)
    return {"itc": itc, "itm": itm, "sum": itc + itm}


def evaluate_cases(cases, score_fn, transform, image_res, batch_size=32):
    """{score name: [right (bool) per case]}, and the number of unreadable images. Cases batch with others of
    the same number of texts."""
    by_k = defaultdict(list)
    for i, c in enumerate(cases):
        by_k[len(c["texts"])].append(i)
    slots = {}
    for idx in by_k.values():
        for start in range(0, len(idx), batch_size):
            slots.update(_score(idx[start:start + batch_size], cases, score_fn, transform, image_res))
    right, bad = defaultdict(list), 0
    for i in range(len(cases)):
        ok, b = slots[i]
        bad += b
        for name, v in ok.items():
            right[name].append(v)
    return dict(right), bad


def _score(idx, cases, score_fn, transform, image_res):
    imgs, bad = zip(*(read_case_image(cases[i], transform, image_res) for i in idx))
    scores = score_fn(torch.stack(imgs), [cases[i]["texts"] for i in idx])
    out = {}
    for j, i in enumerate(idx):
        out[i] = ({n: bool((s[j, 0] > s[j, 1:]).all()) for n, s in scores.items()}, int(bad[j]))
    return out


def summarize(benchmark, cases, right):
    """Accuracy per subset and the benchmark's own averages, per score."""
    out = {}
    for name, ok in right.items():
        per = defaultdict(list)
        groups = defaultdict(lambda: defaultdict(list))
        for c, r in zip(cases, ok):
            per[c["subset"]].append(r)
            if c["group"] is not None:
                groups[c["subset"]][c["group"]].append(r)
        m = {f"{s}": 100.0 * sum(v) / len(v) for s, v in sorted(per.items())}
        if benchmark == "sugarcrepe":
            for fam, subs in SUGARCREPE_FAMILIES.items():
                have = [m[s] for s in subs if s in m]
                if have:
                    m[f"avg_{fam}"] = sum(have) / len(have)
        if benchmark == "aro":
            if "vg_relation" in groups:
                accs = [100.0 * sum(v) / len(v) for g, v in groups["vg_relation"].items() if g not in ARO_SYMMETRIC]
                m["vg_relation_macro"] = sum(accs) / max(1, len(accs))
            if "vg_attribution" in groups:
                accs = [100.0 * sum(v) / len(v) for g, v in groups["vg_attribution"].items() if len(v) >= 25]
                m["vg_attribution_macro"] = sum(accs) / max(1, len(accs))
        if benchmark == "valse":
            m["avg"] = sum(m[s] for s in per) / len(per)
        m["cases"] = len(ok)
        out[name] = {k: round(v, 2) if isinstance(v, float) else v for k, v in m.items()}
    return out


def load_cases(a, tagger=None):
    if a.benchmark == "sugarcrepe":
        return read_sugarcrepe(a.data, a.image_root)
    if a.benchmark == "valse":
        return read_valse(a.data, a.image_root)
    cases = []   # aro: --data is a folder with any of ARO's files
    names = {"visual_genome_relation.json": ("vg", "relation"), "visual_genome_attribution.json": ("vg", "attribution"),
             "coco_karpathy_test.json": ("order", "coco"), "flickr30k_karpathy_test.json": ("order", "flickr30k")}
    for f, (kind, name) in names.items():
        path = os.path.join(a.data, f)
        if os.path.isfile(path):
            cases += read_aro_vg(path, a.image_root, name) if kind == "vg" else \
                read_aro_order(path, a.image_root, name, tagger, a.seed)
    if not cases:
        raise BenchmarkError(f"none of ARO's files ({', '.join(names)}) in {a.data!r}")
    return cases


def main(argv=None):
    from engine.config import load_config
    from engine.logger import Results
    from dataset.transforms import test_transform
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the model's config (ALBEF) or an open_clip config (--clip)")
    p.add_argument("--checkpoint", default="")
    p.add_argument("--benchmark", choices=["sugarcrepe", "aro", "valse"], required=True)
    p.add_argument("--data", required=True, help="the benchmark's folder of JSON files")
    p.add_argument("--image_root", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--spacy", default="en_core_web_sm", help="ARO order: spaCy pipeline (name or directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clip", action="store_true", help="the config describes an open_clip model")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    config = load_config(a.config)
    tagger = None
    if a.benchmark == "aro" and any(os.path.isfile(os.path.join(a.data, f)) for f in
                                    ("coco_karpathy_test.json", "flickr30k_karpathy_test.json")):
        tagger = spacy_tagger(a.spacy)
    cases = load_cases(a, tagger)
    if a.clip:
        from models.clip_model import build_clip, clip_scores
        model, tokenizer = build_clip(config, a.checkpoint, device)
        res = int(config["image_res"])
        transform = test_transform(res)

        def score_fn(images, texts):
            return clip_scores(model, images, texts, tokenizer, device)
    else:
        from models import MODELS
        from models.checkpoint import load_checkpoint, strip_bert
        from models.tokenization import ALBEFTokenizer
        tokenizer = ALBEFTokenizer(config.get("tokenizer") or config.get("text_encoder") or "")
        model = MODELS["retrieval"]({**config, "use_momentum": False, "distill": False}, tokenizer)
        if a.checkpoint:   # a pretraining or a retrieval checkpoint
            report = load_checkpoint(model, a.checkpoint, remap=strip_bert, verbose=False)
            needed = [k for k in report.missing if k.startswith(("visual_encoder.", "text_encoder.", "itm_head.",
                                                                   "vision_proj.", "text_proj."))]
            if needed:
                raise BenchmarkError(f"--checkpoint {a.checkpoint!r} lacks {len(needed)} weights the scores need, "
                                     f"e.g. {sorted(needed)[:5]}")
        model.to(device).eval()
        res = int(config["image_res"])
        transform = test_transform(res)

        def score_fn(images, texts):
            return albef_scores(model, images, texts, tokenizer, device, int(value(config, "eval_max_tokens")))
    right, bad = evaluate_cases(cases, score_fn, transform, res, a.batch_size)
    metrics = summarize(a.benchmark, cases, right)
    results = Results(a.output_dir, True, [k for k in next(iter(metrics.values())) if k != "cases"])
    for name, m in metrics.items():
        results.add(f"{a.benchmark} ({name})", {**m, "unreadable_images": bad},
                    checkpoint=os.path.basename(a.checkpoint) or "(random init)")
    print(json.dumps({"benchmark": a.benchmark, "checkpoint": a.checkpoint, "unreadable_images": bad, **metrics},
                     indent=1))
    return metrics


if __name__ == "__main__":
    main()
