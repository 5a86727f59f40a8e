"""Index a folder of images with a trained model, then query it by text or by image.

    python -m tools.search index --config C --checkpoint K --images DIR --out INDEX
    python -m tools.search query --index INDEX --text "a dog on a beach" [--top 10] [--rerank 0]
    python -m tools.search query --index INDEX --image PATH [--texts captions.txt]

``index`` encodes every image under DIR (recursively; unreadable files are skipped and listed in
``INDEX/failed.txt``) into ITC features, written in parts of ``--part`` images, each part atomically: a run
killed at any point continues where it stopped, and a later run adds new files only. ``INDEX/meta.json``
holds the model's identity (the config's text, the checkpoint's path and SHA-256); a query with another model
is refused. ``query`` prints JSON lines ``{"rank", "image" (or "text"), "score"}`` best first: the ITC cosine,
or with ``--rerank N`` the ITM match logit of the top N (as ALBEF's retrieval evaluation re-scores its top
k_test), which needs the checkpoint named in the index.
"""
import argparse
import glob
import io
import json
import os
import sys

import numpy as np

from engine.checkpointing import atomic_write_bytes, atomic_write_text

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class IndexError_(ValueError):
    pass


def list_images(root):
    if not os.path.isdir(root):
        raise IndexError_(f"--images: no such folder {root!r}")
    out = []
    for d, _, files in os.walk(root):
        out += [os.path.join(d, f) for f in files if f.lower().endswith(IMAGE_EXTS)]
    return sorted(os.path.abspath(p) for p in out)


def parts(index):
    """[(features file, paths file, failed file)] of the complete parts, in order."""
    out = []
    for txt in sorted(glob.glob(os.path.join(index, "part_*.txt"))):
        npy = txt[:-4] + ".npy"
        if os.path.isfile(npy):
            out.append((npy, txt, txt[:-4] + ".failed.json"))
    return out


def identity(config, checkpoint):
    from tasks.api import file_hash
    with open(config, encoding="utf-8") as f:
        text = f.read()
    return {"config": os.path.abspath(config), "config_text": text, "checkpoint": os.path.abspath(checkpoint),
            "checkpoint_sha256": file_hash(checkpoint)}


def check_identity(meta, ident, what):
    if meta["checkpoint_sha256"] != ident["checkpoint_sha256"] or meta["config_text"] != ident["config_text"]:
        raise IndexError_(f"{what}: the index was built with checkpoint {meta['checkpoint']} (sha256 "
                          f"{meta['checkpoint_sha256'][:12]}) and config {meta['config']}; this model is "
                          f"{ident['checkpoint']} (sha256 {ident['checkpoint_sha256'][:12]}) with config "
                          f"{ident['config']}: build a new index for it")


def build_index(config, checkpoint, images, out, part=1024, batch_size=32, device=None, log=print):
    """Encode the images not yet in ``out``; returns (images added, images failed in this run)."""
    from tqdm import tqdm
    from tasks.api import ImageError, load_model
    files = list_images(images)
    if not files:
        raise IndexError_(f"--images: no image files under {images!r} ({', '.join(IMAGE_EXTS)})")
    os.makedirs(out, exist_ok=True)
    ident = identity(config, checkpoint)
    meta_path = os.path.join(out, "meta.json")
    if os.path.isfile(meta_path):
        check_identity(json.load(open(meta_path)), ident, f"index {out!r}")
    else:
        atomic_write_text(json.dumps(ident, indent=1), meta_path)
    done = set()
    for _, txt, failed in parts(out):
        done.update(open(txt).read().splitlines())
        if os.path.isfile(failed):
            done.update(p for p, _ in json.load(open(failed)))
    todo = [f for f in files if f not in done]
    log(f"{len(files)} images under {images}: {len(files) - len(todo)} already indexed or failed, {len(todo)} to encode")
    if not todo:
        return 0, []
    model = load_model(config, checkpoint, device)
    n = len(parts(out))
    added, failed_all = 0, []
    bar = tqdm(total=len(todo), unit="img", disable=None)
    for s in range(0, len(todo), part):
        chunk, ok, failed, feats = todo[s:s + part], [], [], []
        for b in range(0, len(chunk), batch_size):
            batch = chunk[b:b + batch_size]
            try:
                feats.append(model.encode_image(batch).cpu().numpy())
                ok += batch
            except ImageError:   # find the unreadable ones, keep the rest
                for p in batch:
                    try:
                        feats.append(model.encode_image([p]).cpu().numpy())
                        ok.append(p)
                    except ImageError as e:
                        failed.append((p, str(e)))
            bar.update(len(batch))
        name = os.path.join(out, f"part_{n:05d}")
        feats = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
        # the failures and features first, the path list last: a part counts once its .txt and .npy exist
        atomic_write_text(json.dumps(failed), name + ".failed.json")
        buf = io.BytesIO()
        np.save(buf, feats.astype(np.float32))
        atomic_write_bytes(buf.getvalue(), name + ".npy")
        atomic_write_text("".join(p + "\n" for p in ok), name + ".txt")
        n += 1
        added += len(ok)
        failed_all += failed
    bar.close()
    all_failed = [f for _, _, fl in parts(out) if os.path.isfile(fl) for f in json.load(open(fl))]
    atomic_write_text("".join(f"{p}\t{why}\n" for p, why in all_failed), os.path.join(out, "failed.txt"))
    if failed_all:
        log(f"{len(failed_all)} unreadable images skipped (listed in {os.path.join(out, 'failed.txt')}), "
            f"first: {failed_all[0][1]}")
    return added, failed_all


def load_index(index):
    """(features [N, D] float32, memory-mapped when the index is one part, image paths, meta)."""
    meta_path = os.path.join(index, "meta.json")
    if not os.path.isfile(meta_path):
        raise IndexError_(f"--index: {index!r} is not an index (no meta.json); build it with `index`")
    meta = json.load(open(meta_path))
    feats, paths = [], []
    for npy, txt, _ in parts(index):
        p = open(txt).read().splitlines()
        if p:
            feats.append(np.load(npy, mmap_mode="r"))
            paths += p
    if not paths:
        raise IndexError_(f"--index: {index!r} holds no images")
    return (feats[0] if len(feats) == 1 else np.concatenate(feats)), paths, meta


def top_k(feats, query, k):
    """Indices and cosines of the k best rows of ``feats`` for a unit ``query``: one product, a partial sort."""
    scores = np.asarray(feats @ query, dtype=np.float32)
    k = min(k, len(scores))
    idx = np.argpartition(-scores, k - 1)[:k]
    idx = idx[np.argsort(-scores[idx], kind="stable")]
    return idx, scores[idx]


def rerank_top(idx, scores, n, itm):
    """The first ``n`` of a ranking re-ordered by ``itm(first n indices)`` (their ITM logits become the
    scores); the rest keeps its ITC order and cosines."""
    n = min(n, len(idx))
    s = itm(idx[:n]).cpu().numpy()
    order = np.argsort(-s, kind="stable")
    return np.concatenate([idx[:n][order], idx[n:]]), np.concatenate([s[order], scores[n:]])


def query(index, text=None, image=None, texts=None, top=10, rerank=0, config=None, checkpoint=None, device=None):
    """[{rank, image | text, score}] best first (see the module docstring)."""
    from tasks.api import load_model
    if (text is None) == (image is None):
        raise IndexError_("give exactly one of --text and --image")
    feats, paths, meta = load_index(index)
    config, checkpoint = config or meta["config"], checkpoint or meta["checkpoint"]
    for path, what in ((config, "config"), (checkpoint, "checkpoint")):
        if not os.path.isfile(path):
            raise IndexError_(f"the index's {what} {path!r} is not there; give --{what}")
    check_identity(meta, identity(config, checkpoint), f"--index {index!r}")
    model = load_model(config, checkpoint, device)
    if texts is not None:   # image -> text over a file of captions
        captions = [c for c in open(texts, encoding="utf-8").read().splitlines() if c.strip()]
        if not captions:
            raise IndexError_(f"--texts: {texts!r} holds no captions")
        q = model.encode_image([image])[0].cpu().numpy()
        t = model.encode_text(captions).cpu().numpy()
        idx, scores = top_k(t, q, max(top, rerank))
        if rerank:
            idx, scores = rerank_top(idx, scores, rerank,
                                     lambda top: model.itm_scores([image] * len(top), [captions[i] for i in top]))
        return [{"rank": r + 1, "text": captions[i], "score": float(v)} for r, (i, v) in
                enumerate(zip(idx[:top], scores[:top]))]
    q = (model.encode_text([text]) if text is not None else model.encode_image([image]))[0].cpu().numpy()
    idx, scores = top_k(feats, q, max(top, rerank))
    if rerank and text is not None:
        idx, scores = rerank_top(idx, scores, rerank,
                                 lambda top: model.itm_scores([paths[i] for i in top], [text] * len(top)))
    return [{"rank": r + 1, "image": paths[i], "score": float(v)} for r, (i, v) in
            enumerate(zip(idx[:top], scores[:top]))]


def main(argv=None):
    from tasks.api import model_arguments
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = model_arguments(sub.add_parser("index", help="encode every image under --images into --out"))
    a.add_argument("--images", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--part", type=int, default=1024, help="images per atomically written part")
    a.add_argument("--batch_size", type=int, default=32)
    q = sub.add_parser("query", help="rank the index's images for a text or an image")
    q.add_argument("--index", required=True)
    q.add_argument("--text", default=None)
    q.add_argument("--image", default=None, help="image-to-image; with --texts, image-to-text")
    q.add_argument("--texts", default=None, help="a file of captions, one per line (image-to-text)")
    q.add_argument("--top", type=int, default=10)
    q.add_argument("--rerank", type=int, default=0, help="re-score the top N with ITM (0: ITC cosine alone)")
    q.add_argument("--config", default=None, help="the index's config, if it moved")
    q.add_argument("--checkpoint", default=None, help="the index's checkpoint, if it moved")
    q.add_argument("--device", default=None)
    args = p.parse_args(argv)
    try:
        if args.cmd == "index":
            added, failed = build_index(args.config, args.checkpoint, args.images, args.out, args.part,
                                        args.batch_size, args.device)
            print(f"index {args.out}: {added} images added, {len(failed)} unreadable", file=sys.stderr)
        else:
            for row in query(args.index, args.text, args.image, args.texts, args.top, args.rerank, args.config,
                             args.checkpoint, args.device):
                print(json.dumps(row))
    except (IndexError_, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
