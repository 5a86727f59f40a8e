"""The demo world: synthetic scenes of coloured shapes rendered to JPEG, with ALBEF-format JSON.

Each scene holds one to three shapes with a colour, a shape, a size and a vertical position (top, middle,
bottom: flip-invariant, since ALBEF's training transform flips horizontally). Captions mention some but
not all attributes, so one caption truly describes several images: those real false negatives are
computed exactly and saved. A share of scenes copies an earlier scene with one attribute changed, so hard
negatives exist. Everything is a deterministic function of the seed.

    python -m dataset.synthetic --out data/demo
"""
import argparse
import json
import os
import random

from PIL import Image, ImageDraw, ImageFilter

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
          "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
SIZES = ["small", "large"]
ROWS = ["top", "middle", "bottom"]
POS_PHRASE = {"top": "at the top", "middle": "in the middle", "bottom": "at the bottom"}
COUNT_WORD = {1: "one", 2: "two", 3: "three"}
ATTRS = ("size", "color", "shape", "row")


def random_object(rng):
    return {"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES), "size": rng.choice(SIZES),
            "row": rng.choice(ROWS), "col": rng.randrange(3)}


def random_scene(rng):
    objs, cells = [], set()
    for _ in range(rng.choice([1, 1, 2, 2, 3])):
        o = random_object(rng)
        while (o["row"], o["col"]) in cells:
            o["row"], o["col"] = rng.choice(ROWS), rng.randrange(3)
        cells.add((o["row"], o["col"]))
        objs.append(o)
    return {"objects": objs, "background": [rng.randrange(90, 170) for _ in range(3)]}


def mutate(scene, rng):
    """A copy of ``scene`` with one attribute of one object changed (a hard negative)."""
    s = json.loads(json.dumps(scene))
    o = rng.choice(s["objects"])
    attr = rng.choice(["color", "shape", "size"])
    pool = {"color": list(COLORS), "shape": SHAPES, "size": SIZES}[attr]
    o[attr] = rng.choice([v for v in pool if v != o[attr]])
    return s


def render(scene, size, rng):
    return render_with_boxes(scene, size, rng)[0]


def render_with_boxes(scene, size, rng):
    """(image, [x, y, w, h] of every object in pixels, in scene order); the same RNG draws as ``render``."""
    boxes = []
    img = Image.new("RGB", (size, size), tuple(scene["background"]))
    d = ImageDraw.Draw(img)
    cell = size / 3
    for o in scene["objects"]:
        r = cell * (0.42 if o["size"] == "large" else 0.22)
        cx = cell * (o["col"] + 0.5) + rng.uniform(-0.06, 0.06) * cell
        cy = cell * (ROWS.index(o["row"]) + 0.5) + rng.uniform(-0.06, 0.06) * cell
        c = COLORS[o["color"]]
        boxes.append([round(cx - r, 1), round(cy - r, 1), round(2 * r, 1), round(2 * r, 1)])
        if o["shape"] == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c)
        elif o["shape"] == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=c)
        elif o["shape"] == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=c)
        elif o["shape"] == "diamond":
            d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=c)
        else:
            w = r / 3
            d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=c)
            d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=c)
    return img.filter(ImageFilter.GaussianBlur(0.4)), boxes


# ------------------------------------------------------------------ captions as structured constraints
def phrase(mention):
    words = [mention[a] for a in ("size", "color", "shape") if a in mention]
    if "shape" not in mention:
        words.append("shape")
    text = "a " + " ".join(words)
    if "row" in mention:
        text += " " + POS_PHRASE[mention["row"]]
    return text


def caption_text(spec):
    parts = [phrase(m) for m in spec["mentions"]]
    body = " and ".join(parts)
    if spec.get("count"):
        n = spec["count"]
        noun = "shape" if n == 1 else "shapes"
        return f"{COUNT_WORD[n]} {noun} : {body}" if parts else f"{COUNT_WORD[n]} {noun}"
    return ("there is " + body) if spec.get("there_is") else body


def make_caption(scene, rng):
    """A caption that mentions a random subset of objects and, for each, a random subset of attributes."""
    objs = scene["objects"]
    k = rng.randint(1, len(objs))
    mentions = []
    for o in rng.sample(objs, k):
        keep = [a for a in ATTRS if rng.random() < 0.6]
        while len(keep) < 2:   # at least two attributes: captions stay partial but not vacuous
            keep = sorted(set(keep) | {rng.choice(ATTRS)}, key=ATTRS.index)
        mentions.append({a: o[a] for a in keep})
    spec = {"mentions": mentions}
    if rng.random() < 0.25:
        spec["count"] = len(objs)
    elif rng.random() < 0.3:
        spec["there_is"] = True
    return spec


def matches(spec, scene):
    """True if every mentioned object can be assigned a distinct object of the scene with those attributes."""
    objs = scene["objects"]
    if spec.get("count") and spec["count"] != len(objs):
        return False

    def assign(i, used):
        if i == len(spec["mentions"]):
            return True
        m = spec["mentions"][i]
        for j, o in enumerate(objs):
            if j not in used and all(o[a] == v for a, v in m.items()):
                if assign(i + 1, used | {j}):
                    return True
        return False

    return assign(0, frozenset())


def mention_key(mention):
    return tuple((a, mention[a]) for a in ATTRS if a in mention)


def attribute_index(records):
    """(attribute, value) subsets -> indices of the records having an object with them."""
    index = {}
    for j, r in enumerate(records):
        for o in r["scene"]["objects"]:
            for mask in range(1, 2 ** len(ATTRS)):
                key = tuple((a, o[a]) for b, a in enumerate(ATTRS) if mask >> b & 1)
                index.setdefault(key, set()).add(j)
    return index


def build_world(out, seed=0, n_train=3000, n_val=200, n_test=200, captions_per_image=5, size=96,
                hard_negative_share=0.3):
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    total = n_train + n_val + n_test
    scenes = []
    for i in range(total):
        if scenes and rng.random() < hard_negative_share:
            scenes.append(mutate(rng.choice(scenes[-50:]), rng))
        else:
            scenes.append(random_scene(rng))
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    records = []
    for i, (scene, split) in enumerate(zip(scenes, splits)):
        name = f"images/{split}_{i:06d}.jpg"
        img, boxes = render_with_boxes(scene, size, rng)
        img.save(os.path.join(out, name), quality=92)
        specs = []
        while len(specs) < captions_per_image:
            sp = make_caption(scene, rng)
            if caption_text(sp) not in [caption_text(s) for s in specs] or len(specs) > 20:
                specs.append(sp)
        records.append({"image": name, "image_id": i, "split": split, "scene": scene, "boxes": boxes, "size": size,
                        "captions": [caption_text(s) for s in specs], "caption_specs": specs})
    by_split = {s: [r for r in records if r["split"] == s] for s in ("train", "val", "test")}

    def dump(obj, name):
        with open(os.path.join(out, name), "w") as f:
            json.dump(obj, f)

    dump([{"image": r["image"], "caption": r["captions"]} for r in by_split["train"]], "pretrain.json")
    dump([{"image": r["image"], "caption": c, "image_id": r["image_id"]} for r in by_split["train"]
          for c in r["captions"]], "retrieval_train.json")
    for s in ("val", "test"):
        dump([{"image": r["image"], "caption": r["captions"]} for r in by_split[s]], f"retrieval_{s}.json")
    dump([{"image": r["image"], "image_id": r["image_id"], "split": r["split"], "scene": r["scene"],
           "captions": r["captions"], "caption_specs": r["caption_specs"]} for r in records], "scenes.json")
    # ground truth: for each caption, the ids of the other images of its split that it truly describes
    fn = {}
    for s, recs in by_split.items():
        index = attribute_index(recs)
        for r in recs:
            for c, spec in zip(r["captions"], r["caption_specs"]):
                cand = set.intersection(*(index.get(mention_key(m), set()) for m in spec["mentions"]))
                others = sorted(recs[j]["image_id"] for j in cand
                                if recs[j] is not r and matches(spec, recs[j]["scene"]))
                fn.setdefault(s, []).append({"image_id": r["image_id"], "caption": c, "false_negatives": others})
    dump(fn, "false_negatives.json")
    # candidate visual concepts for tools/visual_concepts.py (ViCHA mines nouns; here the shapes are the
    # only nouns, so colours and sizes join them)
    dump(list(SHAPES) + list(COLORS) + list(SIZES), "vc_vocab.json")
    vqa = write_vqa(out, by_split, seed)
    nlvr = write_nlvr(out, by_split, seed)
    ve = write_ve(out, by_split, seed)
    grounding = write_grounding(out, by_split, seed)
    hn = write_hard_negatives(out, by_split, seed)
    write_vocab(os.path.join(out, "vocab"))
    stats = {s: {"images": len(recs), "captions": sum(len(r["captions"]) for r in recs),
                 "captions_with_false_negatives": sum(1 for x in fn.get(s, []) if x["false_negatives"])}
             for s, recs in by_split.items()}
    for s_, n in vqa.items():
        stats[s_]["vqa_questions"] = n
    for s_ in by_split:
        stats[s_]["nlvr_examples"], stats[s_]["ve_examples"] = nlvr[s_], ve[s_]
        stats[s_]["referring_expressions"] = grounding[s_]
    stats["hard_negatives"] = hn
    dump(stats, "stats.json")
    return stats


# ------------------------------------------------------------------ CE-CLIP hard negatives and a compositional test
def _with(spec, k, **changes):
    s = json.loads(json.dumps(spec))
    s["mentions"][k].update(changes)
    return s


def scene_values(scene, attr):
    return {o[attr] for o in scene["objects"]}


def negative_specs(spec, scene, rng):
    """Caption specs the scene makes false, by kind (None where the caption offers no such change):
    swap_att / swap_obj (two mentions exchange their colours / shapes), replace_att / replace_obj (a colour /
    shape absent from the scene), replace_rel (another position), add_att (a size the object lacks), add_obj
    (a mention of an object absent from the scene)."""
    ms, out = spec["mentions"], {}
    for kind, attr in (("swap_att", "color"), ("swap_obj", "shape")):
        pairs = [(i, j) for i in range(len(ms)) for j in range(i + 1, len(ms))
                 if attr in ms[i] and attr in ms[j] and ms[i][attr] != ms[j][attr]]
        if pairs:
            i, j = rng.choice(pairs)
            out[kind] = _with(_with(spec, i, **{attr: ms[j][attr]}), j, **{attr: ms[i][attr]})
    for kind, attr, pool in (("replace_att", "color", list(COLORS)), ("replace_obj", "shape", SHAPES),
                             ("replace_rel", "row", ROWS)):
        ks = [k for k, m in enumerate(ms) if attr in m]
        absent = [v for v in pool if v not in scene_values(scene, attr)] if attr != "row" else None
        if ks:
            k = rng.choice(ks)
            choices = absent if absent is not None else [v for v in pool if v != ms[k][attr]]
            if choices:
                out[kind] = _with(spec, k, **{attr: rng.choice(choices)})
    ks = [k for k, m in enumerate(ms) if "size" not in m]
    if ks:
        k = rng.choice(ks)
        out["add_att"] = _with(spec, k, size=rng.choice(SIZES))
    extra = {"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES)}
    if not spec.get("count"):
        out["add_obj"] = {**json.loads(json.dumps(spec)), "mentions": ms + [extra]}
    # only what the scene really makes false
    return {k: v for k, v in out.items() if not matches(v, scene)}


# CE-CLIP's four types in its order; the demo world has no verbs, so the fourth ("action") is a position
HN_KINDS = ("swap_att", "replace_att", "replace_obj", "replace_rel")


def write_hard_negatives(out, by_split, seed):
    """``pretrain_hn.json``: pretrain.json with ``hard_negatives`` / ``hn_valid`` per caption, exact from the
    scenes; and ``compositional/<subset>.json`` in SugarCrepe's format from the test split."""
    rng = random.Random(seed * 7919 + 17)
    entries = []
    for r in by_split["train"]:
        negs, valid = [], []
        for spec in r["caption_specs"]:
            found = negative_specs(spec, r["scene"], rng)
            negs.append([caption_text(found[k]) if k in found else "###" for k in HN_KINDS])
            valid.append([int(k in found) for k in HN_KINDS])
        entries.append({"image": r["image"], "caption": r["captions"], "hard_negatives": negs, "hn_valid": valid})
    with open(os.path.join(out, "pretrain_hn.json"), "w") as f:
        json.dump(entries, f)
    subsets = {}
    for r in by_split["test"]:
        for c, spec in zip(r["captions"], r["caption_specs"]):
            for kind, neg in negative_specs(spec, r["scene"], rng).items():
                sub = subsets.setdefault(kind, {})
                sub[str(len(sub))] = {"filename": r["image"], "caption": c, "negative_caption": caption_text(neg)}
    os.makedirs(os.path.join(out, "compositional"), exist_ok=True)
    for kind, sub in subsets.items():
        with open(os.path.join(out, "compositional", f"{kind}.json"), "w") as f:
            json.dump(sub, f, indent=0)
    return {"train_valid_share": [round(sum(v[t] for e in entries for v in e["hn_valid"]) /
                                        max(1, sum(len(e["hn_valid"]) for e in entries)), 3) for t in range(4)],
            "compositional": {k: len(v) for k, v in sorted(subsets.items())}}


# human-like answer variants: what an annotator may write instead of the canonical answer
VARIANTS = {"1": ["one", "1 shape"], "2": ["two", "2 shapes"], "3": ["three", "3 shapes"], "yes": ["yeah", "yes it is"],
            "no": ["nope", "no there is not"], "top": ["at the top", "up"], "bottom": ["at the bottom", "down"],
            "middle": ["in the middle", "center"], "small": ["tiny", "little"], "large": ["big", "large one"]}


def vqa_questions(scene, rng):
    """Questions about one scene with their canonical answer and question type."""
    objs = scene["objects"]
    out = [("how many shapes are there", str(len(objs)), "number")]
    o = rng.choice(objs)
    same_shape = [x for x in objs if x["shape"] == o["shape"]]
    same_color = [x for x in objs if x["color"] == o["color"]]
    if len(same_shape) == 1:
        out.append((f"what color is the {o['shape']}", o["color"], "other"))
    if len(same_color) == 1:
        out.append((f"what shape is the {o['color']} object", o["shape"], "other"))
    if len([x for x in objs if (x["color"], x["shape"]) == (o["color"], o["shape"])]) == 1:
        out.append((f"what size is the {o['color']} {o['shape']}", o["size"], "other"))
        out.append((f"where is the {o['color']} {o['shape']}", o["row"], "other"))
    if rng.random() < 0.5:
        out.append((f"is there a {o['color']} {o['shape']}", "yes", "yes/no"))
    else:
        c, sh = rng.choice(list(COLORS)), rng.choice(SHAPES)
        present = any((x["color"], x["shape"]) == (c, sh) for x in objs)
        out.append((f"is there a {c} {sh}", "yes" if present else "no", "yes/no"))
    return out


def human_answers(answer, rng, n=10):
    """Ten annotators: most give the canonical answer, some a variant, a few a wrong one."""
    pool = [a for a in VARIANTS if a != answer] + list(COLORS) + SHAPES
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.75 or answer not in VARIANTS and r < 0.9:
            out.append(answer)
        elif r < 0.93 and answer in VARIANTS:
            out.append(rng.choice(VARIANTS[answer]))
        else:
            out.append(rng.choice(pool))
    return out


def write_vqa(out, by_split, seed, per_image=2):
    """ALBEF-format VQA files from the scenes: vqa_{train,val,test}.json and answer_list.json. Drawn with an
    RNG of their own, so the other files stay as they were."""
    rng = random.Random(seed * 7919 + 17)
    counts, qid = {}, 0
    answers = set()
    for split, recs in by_split.items():
        items = []
        for r in recs:
            qs = vqa_questions(r["scene"], rng)
            for q, a, kind in rng.sample(qs, min(per_image, len(qs))):
                items.append({"dataset": "vqa", "image": r["image"], "question": q + "?",
                              "answer": human_answers(a, rng), "question_id": qid, "answer_type": kind})
                answers.add(a)
                qid += 1
        with open(os.path.join(out, f"vqa_{split}.json"), "w") as f:
            json.dump(items, f)
        counts[split] = len(items)
    with open(os.path.join(out, "answer_list.json"), "w") as f:
        json.dump(sorted(answers), f)
    return counts


# ------------------------------------------------------------------ NLVR2 and SNLI-VE in ALBEF's formats
SPLIT_FILE = {"train": "train", "val": "val", "test": "test"}   # ALBEF's real files call val "dev"
NLVR_KINDS = ("left", "right", "both", "more")
VE_KINDS = ("there", "property")
VE_LABELS = ("contradiction", "neutral", "entailment")   # ALBEF's class ids 0, 1, 2


def has(scene, color, shape):
    return any((o["color"], o["shape"]) == (color, shape) for o in scene["objects"])


def nlvr_statement(kind, left, right, rng):
    """(sentence, truth) about an image pair; the object named comes from one of the two images or at random."""
    if kind == "more":
        a, b = ("left", "right") if rng.random() < 0.5 else ("right", "left")
        n = {"left": len(left["objects"]), "right": len(right["objects"])}
        return f"there are more shapes in the {a} image than in the {b} image", n[a] > n[b]
    r = rng.random()
    o = rng.choice((left if r < 0.4 else right)["objects"]) if r < 0.8 else random_object(rng)
    c, s = o["color"], o["shape"]
    if kind == "both":
        return f"there is a {c} {s} in both images", has(left, c, s) and has(right, c, s)
    return f"there is a {c} {s} in the {kind} image", has(left if kind == "left" else right, c, s)


def write_nlvr(out, by_split, seed, per_image=2, tries=200):
    """``nlvr_{train,dev,test}.json``: statements about random image pairs of a split, true or false, balanced
    per statement kind (a sentence alone says nothing about its label). Own RNG: the other files stay."""
    rng = random.Random(seed * 104729 + 3)
    counts = {}
    for split, recs in by_split.items():
        items = []
        for n in range(per_image * len(recs)):
            kind, want = NLVR_KINDS[n % len(NLVR_KINDS)], (n // len(NLVR_KINDS)) % 2 == 0
            for _ in range(tries):
                left, right = rng.sample(recs, 2)
                sentence, truth = nlvr_statement(kind, left["scene"], right["scene"], rng)
                if truth == want:
                    break
            else:
                continue
            items.append({"images": [left["image"], right["image"]], "sentence": sentence,
                          "label": "True" if truth else "False", "kind": kind})
        rng.shuffle(items)
        with open(os.path.join(out, f"nlvr_{SPLIT_FILE[split]}.json"), "w") as f:
            json.dump(items, f)
        counts[split] = len(items)
    return counts


def ve_hypothesis(kind, scene, present, rng):
    """A hypothesis naming an object that is (``present``) or is not in the scene. ``there``: entailed or
    contradicted; ``property``: neutral if the object is there (its weight or age cannot be seen), else
    contradicted (there is no such object)."""
    if present:
        o = rng.choice(scene["objects"])
        c, s = o["color"], o["shape"]
    else:
        while True:
            c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
            if not has(scene, c, s):
                break
    if kind == "there":
        return f"there is a {c} {s}", "entailment" if present else "contradiction"
    return f"the {c} {s} is {rng.choice(['heavy', 'new'])}", "neutral" if present else "contradiction"


def write_ve(out, by_split, seed, per_image=2):
    """``ve_{train,dev,test}.json`` in SNLI-VE's format (``image`` without extension under ``images/``).
    Within each hypothesis form half name a present object and half an absent one, so the hypothesis alone
    cannot beat the majority class (contradiction, 50%)."""
    rng = random.Random(seed * 15485863 + 5)
    counts = {}
    for split, recs in by_split.items():
        items = []
        for i, r in enumerate(recs):
            for j in range(per_image):
                kind, present = VE_KINDS[j % 2], (i + j) % 2 == 0   # exactly half present within each form
                sentence, label = ve_hypothesis(kind, r["scene"], present, rng)
                items.append({"image": os.path.splitext(os.path.basename(r["image"]))[0], "sentence": sentence,
                              "label": label, "kind": kind})
        with open(os.path.join(out, f"ve_{SPLIT_FILE[split]}.json"), "w") as f:
            json.dump(items, f)
        counts[split] = len(items)
    return counts


# ------------------------------------------------------------------ RefCOCO+ in the REFER layout
def referring_expression(scene, k):
    """The shortest description that picks object ``k`` alone: size / colour / shape / row, fewest first."""
    from itertools import combinations
    objs = scene["objects"]
    o = objs[k]
    for n in range(1, 5):
        for attrs in combinations(("color", "shape", "size", "row"), n):
            if sum(all(x[a] == o[a] for a in attrs) for x in objs) == 1:
                m = {a: o[a] for a in attrs}
                words = [m[a] for a in ("size", "color", "shape") if a in m] + ([] if "shape" in m else ["shape"])
                return "the " + " ".join(words) + (" " + POS_PHRASE[m["row"]] if "row" in m else "")
    return None   # two identical objects in one row: no expression tells them apart


def proposals(boxes, size, rng, jitter=2, background=3):
    """Detector-like proposals: every object's box, ``jitter`` shifted / rescaled copies of each, and
    ``background`` random boxes."""
    out = []
    for x, y, w, h in boxes:
        out.append([x, y, w, h])
        for _ in range(jitter):
            s = rng.uniform(0.6, 1.6)
            nw, nh = w * s, h * s
            cx, cy = x + w / 2 + rng.uniform(-0.5, 0.5) * w, y + h / 2 + rng.uniform(-0.5, 0.5) * h
            out.append([cx - nw / 2, cy - nh / 2, nw, nh])
    for _ in range(background):
        w, h = rng.uniform(0.15, 0.5) * size, rng.uniform(0.15, 0.5) * size
        out.append([rng.uniform(0, size - w), rng.uniform(0, size - h), w, h])
    clipped = []
    for x, y, w, h in out:
        x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(size), x + w), min(float(size), y + h)
        clipped.append([round(x0, 1), round(y0, 1), round(x1 - x0, 1), round(y1 - y0, 1)])
    rng.shuffle(clipped)
    return clipped


def write_grounding(out, by_split, seed):
    """RefCOCO+ as ALBEF reads it: ``refcoco+_{train,val,test}.json`` (``image``, ``text``, ``ref_id``),
    ``refcoco+/refs(unc).p`` (a plain pickle of dicts, REFER's layout), ``refcoco+/instances.json`` (COCO
    images and boxes) and ``refcoco+/dets.json`` (proposals by image id). Splits: train, val, and the test
    images as testA (one or two objects) / testB (three). Own RNG: the other files stay."""
    import pickle
    rng = random.Random(seed * 7777 + 11)
    os.makedirs(os.path.join(out, "refcoco+"), exist_ok=True)
    refs, images, anns, dets, files, counts = [], [], [], {}, {"train": [], "val": [], "test": []}, {}
    for split, recs in by_split.items():
        counts[split] = 0
        for r in recs:
            images.append({"id": r["image_id"], "file_name": r["image"], "width": r["size"], "height": r["size"]})
            dets[str(r["image_id"])] = proposals(r["boxes"], r["size"], rng)
            for k, box in enumerate(r["boxes"]):
                ann_id = r["image_id"] * 10 + k
                anns.append({"id": ann_id, "image_id": r["image_id"], "bbox": box, "category_id": 1})
                text = referring_expression(r["scene"], k)
                if text is None:
                    continue
                ref_split = split if split != "test" else ("testB" if len(r["boxes"]) == 3 else "testA")
                ref_id = len(refs)
                refs.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": r["image_id"], "split": ref_split,
                             "sentences": [{"sent": text, "raw": text}], "file_name": r["image"]})
                files[split].append({"image": r["image"], "text": text, "ref_id": ref_id})
                counts[split] += 1
    for split, items in files.items():
        with open(os.path.join(out, f"refcoco+_{split}.json"), "w") as f:
            json.dump(items, f)
    with open(os.path.join(out, "refcoco+", "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f, protocol=2)   # REFER's own files are protocol-2 pickles of plain containers
    with open(os.path.join(out, "refcoco+", "instances.json"), "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    with open(os.path.join(out, "refcoco+", "dets.json"), "w") as f:
        json.dump(dets, f)
    return counts


def vocabulary():
    words = set(COLORS) | set(SHAPES) | set(SIZES) | set(ROWS) | set(COUNT_WORD.values())
    words |= {"a", "and", "at", "the", "in", "there", "is", "shape", "shapes", "on", "of", "with"}
    return sorted(words)


def write_vocab(directory):
    """A WordPiece vocab covering the demo world, with BERT's special tokens first."""
    os.makedirs(directory, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + vocabulary()
    tokens += list("abcdefghijklmnopqrstuvwxyz0123456789") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    # VQA question words, appended so that the ids above stay those of earlier demo checkpoints
    tokens += ["what", "color", "how", "many", "are", "size", "where", "object", "yes", "no"]
    # NLVR2 statements and VE hypotheses, appended likewise
    tokens += ["left", "right", "image", "images", "both", "more", "than", "heavy", "new"]
    seen, out = set(), []
    for t in tokens:
        if t not in seen:
            seen.add(t), out.append(t)
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.write("\n".join(out) + "\n")
    return len(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_train", type=int, default=3000)
    p.add_argument("--n_val", type=int, default=200)
    p.add_argument("--n_test", type=int, default=200)
    p.add_argument("--size", type=int, default=96, help="image side in pixels")
    p.add_argument("--shard_size", type=int, default=500, help="pretraining pairs per webdataset shard (0: none)")
    a = p.parse_args()
    stats = build_world(a.out, a.seed, a.n_train, a.n_val, a.n_test, size=a.size)
    if a.shard_size:   # the same pairs as img2dataset would write them (configs/demo/Pretrain_shards.yaml)
        from dataset.shards import write_shards
        with open(os.path.join(a.out, "pretrain.json")) as f:
            write_shards(json.load(f), a.out, os.path.join(a.out, "shards"), a.shard_size)
    print(json.dumps({"out": a.out, **stats}))


if __name__ == "__main__":
    main()
