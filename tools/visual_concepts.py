"""ViCHA's visual concepts, offline: a noun vocabulary from the captions, then the top-k words per image by
CLIP image-text similarity, written into the annotation JSON as ``kwords``.

    # 1. vocabulary: heads of the captions' noun phrases (spaCy), kept if seen at least --min_count times
    python tools/visual_concepts.py vocab --ann data/coco.json data/vg.json --out data/vc_vocab.json

    # 2. concepts: CLIP from a local open_clip checkpoint (nothing is downloaded)
    python tools/visual_concepts.py assign --ann data/coco.json --image_root /data/coco \\
        --vocab data/vc_vocab.json --clip_model ViT-B-16 --clip_checkpoint ckpt/open_clip_vit_b16.bin \\
        --out data/coco_kw.json

``assign`` embeds each distinct image once, appends its results to ``<out>.partial.jsonl`` as it goes and
skips what that file already holds, so an interrupted run on a large dataset resumes where it stopped; the
output JSON is written atomically at the end. Unreadable images get an empty list and are counted.
``--albef_config/--albef_checkpoint`` score with an ALBEF-family checkpoint's ITC heads instead of CLIP
(used for the synthetic demo world, where no CLIP model knows the shapes).
"""
import argparse
import json
import os
import sys
from collections import Counter

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import read_partial_jsonl   # noqa: E402


# ---------------------------------------------------------------------------------------------- vocabulary
def captions_of(entry):
    cap = entry.get("caption", entry.get("sentence", entry.get("text")))
    return [cap] if isinstance(cap, str) else list(cap or [])


def mine_vocabulary(captions, heads, min_count=2, max_size=None):
    """Words returned by ``heads(captions)`` (an iterable of word lists, one per caption), lower-cased,
    kept if seen ``min_count`` times or more, most frequent first (ties alphabetical)."""
    counts = Counter(w.lower() for words in heads(captions) for w in words if w.strip())
    vocab = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return vocab[:max_size] if max_size else vocab


def spacy_heads(model_name, batch_size=256):
    """Noun-phrase heads per caption with a spaCy pipeline (ViCHA used a spaCy-based scene-graph parser)."""
    try:
        import spacy
    except ImportError:
        raise SystemExit("vocab: spaCy is not installed. Install it and an English pipeline "
                         f"(pip install spacy && python -m spacy download {model_name}), or give the "
                         "vocabulary yourself to 'assign --vocab'") from None
    try:
        nlp = spacy.load(model_name, disable=["ner", "lemmatizer", "textcat"])
    except OSError:
        raise SystemExit(f"vocab: the spaCy pipeline {model_name!r} is not installed "
                         f"(python -m spacy download {model_name}); choose another with --spacy_model") from None

    def run(captions):
        for doc in nlp.pipe(captions, batch_size=batch_size):
            yield [chunk.root.text for chunk in doc.noun_chunks]
    return run


def read_json(path, what):
    if not os.path.isfile(path):
        raise SystemExit(f"{what}: file not found: {path!r}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SystemExit(f"{what}: {path!r} is not valid JSON: {e}") from None


def read_vocab(path):
    """A JSON list of words, or a text file with one word per line."""
    if path.endswith(".json"):
        words = read_json(path, "--vocab")
    else:
        if not os.path.isfile(path):
            raise SystemExit(f"--vocab: file not found: {path!r}")
        with open(path) as f:
            words = [line.strip() for line in f]
    words = [w for w in words if isinstance(w, str) and w.strip()]
    if not words:
        raise SystemExit(f"--vocab: {path!r} holds no words")
    return list(dict.fromkeys(words))


def atomic_write_json(obj, path):
    from engine.checkpointing import atomic_write_text
    atomic_write_text(json.dumps(obj), path)


# ---------------------------------------------------------------------------------------------- scorers
class ClipScorer:
    """An open_clip model built by name (``--clip_model_config`` registers a custom JSON config) with
    weights from a local state-dict file, loaded without executing pickled code."""

    def __init__(self, name, checkpoint, device, model_config=None):
        from models.clip_model import open_clip_model
        if not checkpoint:
            raise SystemExit("--clip_checkpoint: file not found: None (nothing is downloaded)")
        try:
            model, self.transform, self.tokenizer = open_clip_model(
                name, model_config, checkpoint, keys=("--clip_model", "--clip_model_config", "--clip_checkpoint"))
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(str(e)) from None
        self.model = model.to(device).eval()
        self.device = device

    @torch.no_grad()
    def words(self, words, chunk=1024):
        out = [self.model.encode_text(self.tokenizer(words[s:s + chunk]).to(self.device))
               for s in range(0, len(words), chunk)]
        return F.normalize(torch.cat(out).float(), dim=-1)

    @torch.no_grad()
    def images(self, x):
        return F.normalize(self.model.encode_image(x.to(self.device)).float(), dim=-1)


class AlbefScorer:
    """The ITC heads of an ALBEF-family checkpoint (pretraining or retrieval layout)."""

    def __init__(self, config_path, checkpoint, device):
        from dataset.transforms import test_transform
        from engine.config import load_config
        from models.checkpoint import load_checkpoint, strip_bert
        from models.model_retrieval import ALBEF
        from models.tokenization import ALBEFTokenizer
        cfg = dict(load_config(config_path), use_momentum=False, distill=False, text_encoder=None,
                   vision_init=None, kw_img_model=False)
        self.tokenizer = ALBEFTokenizer(cfg.get("tokenizer") or "")
        self.model = ALBEF(cfg, self.tokenizer)
        load_checkpoint(self.model, checkpoint, remap=strip_bert, config_key="--albef_checkpoint", verbose=False)
        self.model.to(device).eval()
        self.transform = test_transform(cfg["image_res"])
        self.device = device

    def words(self, words):
        from tasks.retrieval import encode_texts
        return encode_texts(self.model, self.tokenizer, words, self.device)[2]

    @torch.no_grad()
    def images(self, x):
        return self.model.encode_image(x.to(self.device))[1]


class Images(Dataset):
    def __init__(self, paths, root, transform):
        self.paths, self.root, self.transform = paths, root, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        p = self.paths[i]
        full = p if os.path.isabs(p) or not self.root else os.path.join(self.root, p)
        try:
            with Image.open(full) as img:
                return self.transform(img.convert("RGB")), i, True
        except Exception:   # noqa: BLE001 - unreadable images are counted, never a crash in a worker
            return None, i, False


def collate(batch):
    ok = [b for b in batch if b[2]]
    x = torch.stack([b[0] for b in ok]) if ok else None
    return x, [b[1] for b in ok], [b[1] for b in batch if not b[2]]


def image_keys(entry):
    """(field to write, image path) pairs of one entry: ``image`` -> ``kwords``; NLVR2's ``images`` ->
    ``kwords1``, ``kwords2``."""
    if isinstance(entry.get("image"), str):
        return [("kwords", entry["image"])]
    if isinstance(entry.get("images"), list):
        return [(f"kwords{j + 1}", p) for j, p in enumerate(entry["images"])]
    return []


def assign(ann, scorer, vocab, out, image_root=None, topk=15, batch_size=64, num_workers=2, progress=True):
    """Write ``ann`` with concepts to ``out``; resumable through ``out + '.partial.jsonl'``. Returns stats."""
    for i, e in enumerate(ann):
        if not image_keys(e):
            raise SystemExit(f"--ann entry {i} has no 'image' (or NLVR2 'images') field: {str(e)[:200]}")
    paths = list(dict.fromkeys(p for e in ann for _, p in image_keys(e)))
    partial = out + ".partial.jsonl"
    done = {rec["image"]: rec["kwords"] for rec in read_partial_jsonl(partial)}
    todo = [p for p in paths if p not in done]
    k = min(topk, len(vocab))
    word_feats = scorer.words(vocab)
    loader = DataLoader(Images(todo, image_root, scorer.transform), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(paths), initial=len(paths) - len(todo), unit="img", desc="visual concepts")
    bad = sum(1 for v in done.values() if v is None)
    with open(partial, "a") as f:
        for x, ok, failed in loader:
            recs = []
            if ok:
                top = (scorer.images(x) @ word_feats.t()).topk(k, dim=1).indices.tolist()
                recs += [{"image": todo[i], "kwords": [vocab[j] for j in row]} for i, row in zip(ok, top)]
            recs += [{"image": todo[i], "kwords": None} for i in failed]
            bad += len(failed)
            for r in recs:
                done[r["image"]] = r["kwords"]
                f.write(json.dumps(r) + "\n")
            f.flush()
            if bar:
                bar.update(len(ok) + len(failed))
    if bar:
        bar.close()
    result = []
    for e in ann:
        e = dict(e)
        for key, p in image_keys(e):
            e[key] = done[p] or []
        result.append(e)
    atomic_write_json(result, out)
    os.remove(partial)
    return {"entries": len(result), "images": len(paths), "computed": len(todo), "resumed": len(paths) - len(todo),
            "unreadable": bad, "topk": k, "vocabulary": len(vocab)}


# ---------------------------------------------------------------------------------------------- CLI
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("vocab", help="mine the noun vocabulary from caption JSONs")
    v.add_argument("--ann", nargs="+", required=True, help="annotation JSON files (ALBEF format)")
    v.add_argument("--out", required=True, help="vocabulary JSON (a list of words, most frequent first)")
    v.add_argument("--min_count", type=int, default=2, help="keep words seen this often (ViCHA: 2)")
    v.add_argument("--max_size", type=int, default=None)
    v.add_argument("--spacy_model", default="en_core_web_sm")
    a = sub.add_parser("assign", help="write the top-k concepts of each image into an annotation JSON")
    a.add_argument("--ann", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--vocab", required=True, help="JSON list or text file, one word per line")
    a.add_argument("--image_root", default=None)
    a.add_argument("--topk", type=int, default=15)
    a.add_argument("--clip_model", default="ViT-B-16", help="open_clip model name")
    a.add_argument("--clip_checkpoint", default=None, help="local open_clip state-dict file")
    a.add_argument("--clip_model_config", default=None, help="JSON model config to register first (custom models)")
    a.add_argument("--albef_config", default=None, help="score with an ALBEF checkpoint's ITC heads instead")
    a.add_argument("--albef_checkpoint", default=None)
    a.add_argument("--batch_size", type=int, default=64)
    a.add_argument("--num_workers", type=int, default=2)
    a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a.add_argument("--no_progress", action="store_true")
    args = ap.parse_args(argv)

    if args.cmd == "vocab":
        caps = []
        for path in args.ann:
            data = read_json(path, "--ann")
            caps += [c for e in data for c in captions_of(e)]
        words = mine_vocabulary(caps, spacy_heads(args.spacy_model), args.min_count, args.max_size)
        atomic_write_json(words, args.out)
        print(f"{len(words)} words from {len(caps)} captions -> {args.out}")
        return words

    ann = read_json(args.ann, "--ann")
    if not isinstance(ann, list):
        raise SystemExit(f"--ann: {args.ann!r} must hold a JSON list of entries")
    vocab = read_vocab(args.vocab)
    device = torch.device(args.device)
    if args.albef_config:
        scorer = AlbefScorer(args.albef_config, args.albef_checkpoint, device)
    else:
        scorer = ClipScorer(args.clip_model, args.clip_checkpoint, device, args.clip_model_config)
    stats = assign(ann, scorer, vocab, args.out, args.image_root, args.topk, args.batch_size, args.num_workers,
                   progress=not args.no_progress)
    print(json.dumps(stats))
    if stats["unreadable"]:
        print(f"warning: {stats['unreadable']} unreadable images got no concepts", file=sys.stderr)
    return stats


if __name__ == "__main__":
    main()
