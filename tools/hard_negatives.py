"""CE-CLIP's hard-negative captions for an ALBEF-format annotation file (spec: vicha_finegrained.md §2.2).

    python tools/hard_negatives.py --ann data/coco.json --out data/coco_hn.json \
        --fill_mask /models/distilroberta-base --spacy en_core_web_sm [--batch_size 256]

For every caption, in CE-CLIP's order: (0) relation: the first two nouns swapped (captions with at least
three nouns), (1) attribute, (2) object, (3) action: a random adjective / noun / verb (not AUX) masked and
filled by a masked LM, taking its 4th candidate (CE-CLIP: the top ones tend to restore the word or a
synonym). Written into a copy of the JSON as ``hard_negatives`` (4 strings) and ``hn_valid`` (4 flags), one
list per caption where ``caption`` is a list. Fixed against CE-CLIP (§3.2): the swap exchanges whole words
(not substrings: "man" inside "woman"), and a type the caption lacks, a swap of two equal nouns or a fill
that gives back the caption is invalid (CE-CLIP made a one-word "<mask>" negative and called it valid).

Any local Hugging Face masked-LM directory works; nothing is downloaded. Progress is appended to
``OUT.partial.jsonl`` after every batch, so a killed run continues where it stopped; the output is written
atomically at the end. The random word of each caption is drawn from (seed, entry, caption).
"""
import argparse
import json
import os
import random
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import read_partial_jsonl   # noqa: E402

TYPES = ("relation", "attribute", "object", "action")
POS = {"attribute": ("ADJ",), "object": ("NOUN",), "action": ("VERB",)}
INVALID = "###"


class GenerationError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- tools
def spacy_tagger(model):
    """texts -> [[(word, POS, trailing whitespace), ...], ...] with spaCy (POS tags only)."""
    from dataset.utils import load_spacy
    nlp = load_spacy(model, GenerationError)

    def tag(texts, batch_size=256):
        return [[(t.text, t.pos_, t.whitespace_) for t in doc] for doc in nlp.pipe(texts, batch_size=batch_size)]
    return tag


class FillMask:
    """A local masked LM: fill(list of sentences with ``MASK``) -> the ``rank``-th candidate sentence each."""

    MASK = "<mask>"

    def __init__(self, path, device="cpu", top_k=5, rank=3):
        if not os.path.isdir(path):
            raise GenerationError(f"--fill_mask {path!r}: not a directory (a local Hugging Face masked-LM, "
                                  "e.g. distilroberta-base; nothing is downloaded)")
        from transformers import AutoModelForMaskedLM, AutoTokenizer
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForMaskedLM.from_pretrained(path, local_files_only=True).to(device).eval()
        except (OSError, ValueError) as e:
            raise GenerationError(f"--fill_mask {path!r}: cannot load a masked LM from it ({e})") from None
        self.device, self.top_k, self.rank = device, top_k, rank

    def __call__(self, sentences):
        import torch
        if not sentences:
            return []
        texts = [s.replace(self.MASK, self.tok.mask_token, 1) for s in sentences]
        enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=64).to(self.device)
        with torch.no_grad():
            logits = self.model(**enc).logits
        out = []
        for i, s in enumerate(sentences):
            where = (enc["input_ids"][i] == self.tok.mask_token_id).nonzero()
            if len(where) == 0:   # the mask was truncated away
                out.append(None)
                continue
            top = logits[i, where[0, 0]].topk(self.top_k).indices.tolist()
            word = self.tok.decode([top[min(self.rank, len(top) - 1)]]).strip()
            out.append(s.replace(self.MASK, word, 1) if word else None)
        return out


# ---------------------------------------------------------------------------------------------- generation
def rebuild(tokens):
    return "".join(w + ws for w, _, ws in tokens).strip()


def relation_swap(tokens):
    """The first two nouns exchanged as whole words; None without three nouns or when they are equal."""
    nouns = [i for i, (_, p, _) in enumerate(tokens) if p == "NOUN"]
    if len(nouns) < 3:
        return None
    a, b = nouns[:2]
    if tokens[a][0].lower() == tokens[b][0].lower():
        return None
    out = list(tokens)
    out[a] = (tokens[b][0], tokens[b][1], tokens[a][2])
    out[b] = (tokens[a][0], tokens[a][1], tokens[b][2])
    return rebuild(out)


def masked(tokens, kind, rng):
    """The caption with one random word of the kind's POS masked, or None without such a word."""
    idx = [i for i, (_, p, _) in enumerate(tokens) if p in POS[kind]]
    if not idx:
        return None
    k = rng.choice(idx)
    out = list(tokens)
    out[k] = (FillMask.MASK, tokens[k][1], tokens[k][2])
    return rebuild(out)


def caption_seed(seed, entry, cap):
    return zlib.crc32(f"{seed}:{entry}:{cap}".encode())


def generate(captions, keys, tagger, fill, seed=0):
    """[(hard_negatives [4], hn_valid [4])] for each caption; ``keys`` [(entry, caption index)] seed the draws."""
    tagged = tagger(captions)
    todo, slots = [], []
    results = []
    for c, (cap, tokens) in enumerate(zip(captions, tagged)):
        rng = random.Random(caption_seed(seed, *keys[c]))
        negs = [relation_swap(tokens)]
        for t, kind in enumerate(TYPES[1:], start=1):
            m = masked(tokens, kind, rng)
            negs.append(None)
            if m is not None:
                todo.append(m)
                slots.append((c, t))
        results.append(negs)
    for (c, t), filled in zip(slots, fill(todo)):
        results[c][t] = filled
    out = []
    for cap, negs in zip(captions, results):
        valid = [int(n is not None and n.strip().lower() != cap.strip().lower()) for n in negs]
        out.append(([n if v else INVALID for n, v in zip(negs, valid)], valid))
    return out


# ---------------------------------------------------------------------------------------------- the file
def load_entries(path):
    if not os.path.isfile(path):
        raise GenerationError(f"--ann {path!r}: no such file")
    with open(path) as f:
        try:
            ann = json.load(f)
        except json.JSONDecodeError as e:
            raise GenerationError(f"--ann {path!r}: not valid JSON ({e})") from None
    if not isinstance(ann, list):
        raise GenerationError(f"--ann {path!r}: expected a JSON list of entries (ALBEF's format)")
    for i, a in enumerate(ann):
        cap = a.get("caption") if isinstance(a, dict) else None
        if not (isinstance(cap, str) or (isinstance(cap, list) and cap and all(isinstance(c, str) for c in cap))):
            raise GenerationError(f"--ann {path!r}, entry {i}: needs 'caption' (a string or a list of strings)")
    return ann


def run(ann_path, out_path, tagger, fill, batch_size=256, seed=0, log_every=10):
    ann = load_entries(ann_path)
    partial = out_path + ".partial.jsonl"
    done = {rec["i"]: rec for rec in read_partial_jsonl(partial)}
    if done:
        print(f"resuming: {len(done)} of {len(ann)} entries already generated ({partial})")
    pending = [i for i in range(len(ann)) if i not in done]
    t0, batches = time.time(), 0
    with open(partial, "a") as log:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            caps, keys = [], []
            for i in chunk:
                c = ann[i]["caption"]
                for j, cap in enumerate(c if isinstance(c, list) else [c]):
                    caps.append(cap)
                    keys.append((i, j))
            gen = generate(caps, keys, tagger, fill, seed)
            per = {}
            for (i, _), g in zip(keys, gen):
                per.setdefault(i, []).append(g)
            for i in chunk:
                rec = {"i": i, "hard_negatives": [g[0] for g in per[i]], "hn_valid": [g[1] for g in per[i]]}
                done[i] = rec
                log.write(json.dumps(rec) + "\n")
            log.flush()
            batches += 1
            if batches % log_every == 0 or start + batch_size >= len(pending):
                n = min(start + batch_size, len(pending))
                rate = n / max(time.time() - t0, 1e-9)
                print(f"[{len(done)}/{len(ann)}] entries, {rate:.1f}/s, "
                      f"eta {(len(pending) - n) / max(rate, 1e-9) / 60:.1f} min", flush=True)
    out = []
    counts = [0] * len(TYPES)
    total = 0
    for i, a in enumerate(ann):
        rec = done[i]
        single = not isinstance(a["caption"], list)
        negs, valid = rec["hard_negatives"], rec["hn_valid"]
        for v in valid:
            counts = [c + x for c, x in zip(counts, v)]
            total += 1
        out.append({**a, "hard_negatives": negs[0] if single else negs, "hn_valid": valid[0] if single else valid})
    tmp = f"{out_path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, out_path)
    os.remove(partial)
    share = {t: round(c / max(total, 1), 3) for t, c in zip(TYPES, counts)}
    print(json.dumps({"out": out_path, "entries": len(out), "captions": total, "valid_share": share}))
    return share


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ann", required=True, help="ALBEF-format JSON ({image, caption: str | [str]})")
    p.add_argument("--out", required=True)
    p.add_argument("--fill_mask", required=True, help="local masked-LM directory (CE-CLIP: distilroberta-base)")
    p.add_argument("--spacy", default="en_core_web_sm", help="spaCy pipeline: a package name or a directory")
    p.add_argument("--batch_size", type=int, default=256, help="entries per batch")
    p.add_argument("--rank", type=int, default=3, help="the fill-mask candidate taken (0-based; CE-CLIP: 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    try:
        tagger = spacy_tagger(a.spacy)
        fill = FillMask(a.fill_mask, a.device, rank=a.rank)
        run(a.ann, a.out, tagger, fill, a.batch_size, a.seed)
    except GenerationError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
