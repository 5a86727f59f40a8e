"""One collate for every task: samples are dicts, and each field is collated by its kind.

- ``image``: a tensor per sample, stacked; a list per sample (NLVR2's two images), stacked by position:
  ``cat([all first images, all second images])``, the NLVR model's input.
- text fields, tokenized once per batch into the model's names (``TEXTS``), each with its own settings
  (``texts``: the tokenizer's keyword arguments per field; ALBEF's scripts differ per task). ``answers`` and
  ``hard_negatives`` are lists per sample, flattened in order (``k[b]``: how many are sample b's).
- ``concepts``: ViCHA's concept string (a list per sample with NLVR2: in the images' order), tokenized at
  ``vc_max_tokens``, right-padded.
- numbers (``idx``, ``label``) become a long tensor, ``weights`` / ``hn_valid`` a flat tensor, ``bad`` one
  list; any other field (``question_id``, ``ref_id``) is passed on as a list.
"""
import torch

TEXTS = {"caption": ("input_ids", "attention_mask"), "question": ("question_ids", "question_mask"),
         "answers": ("answer_ids", "answer_mask"), "hard_negatives": ("hn_input_ids", "hn_attention_mask")}
COUNTED = ("caption", "question")   # the texts whose cut tokens evaluations report
FLAT = {"weights": torch.float, "hn_valid": torch.bool}


def tokenize_concepts(tokenizer, strings, max_tokens=55):
    """(ids, mask) of concept strings: right-padded to the longest, at training and at evaluation alike."""
    t = tokenizer(list(strings), padding="longest", truncation=True, max_length=max_tokens)
    return t["input_ids"], t["attention_mask"]


class Collate:
    """``texts``: field -> tokenizer keyword arguments (default ``padding='longest'``, untruncated)."""

    def __init__(self, tokenizer=None, texts=None, vc_max_tokens=55):
        self.tokenizer, self.texts, self.vc_max_tokens = tokenizer, dict(texts or {}), vc_max_tokens

    def __call__(self, samples):
        out = {"n": len(samples)}
        for name in samples[0]:
            values = [s[name] for s in samples]
            if name == "image":
                out["image"] = (torch.stack(values) if torch.is_tensor(values[0]) else
                                torch.cat([torch.stack([v[k] for v in values]) for k in range(len(values[0]))]))
            elif name in TEXTS:
                flat = values if isinstance(values[0], str) else [t for v in values for t in v]
                t = self.tokenizer(flat, **{"padding": "longest", **self.texts.get(name, {})})
                out[TEXTS[name][0]], out[TEXTS[name][1]] = t["input_ids"], t["attention_mask"]
                if name == "answers":
                    out["k"] = torch.tensor([len(v) for v in values], dtype=torch.long)
                if name in COUNTED:
                    out["texts_cut"] = out.get("texts_cut", 0) + getattr(t, "texts_cut", 0)
            elif name == "concepts":
                strings = values if isinstance(values[0], str) else [v[k] for k in range(len(values[0]))
                                                                      for v in values]
                out["kw_input_ids"], out["kw_attention_mask"] = tokenize_concepts(self.tokenizer, strings,
                                                                                  self.vc_max_tokens)
            elif name in FLAT:
                out[name] = torch.tensor([x for v in values for x in v], dtype=FLAT[name])
            elif name == "bad":
                out["bad"] = [p for v in values for p in v]
            elif name in ("idx", "label"):
                out[name] = torch.tensor(values, dtype=torch.long)
            else:
                out[name] = values
        if "hn_valid" in out:
            out["hn_valid"] = out["hn_valid"].view(len(samples), -1)
        return out


def text_collate(tokenizer, max_length=25, truncation=True, vc_max_tokens=55):
    """Captions tokenized as ALBEF's pretraining and retrieval scripts do (their negatives alike)."""
    kw = {"max_length": max_length, "truncation": truncation}
    return Collate(tokenizer, {"caption": kw, "hard_negatives": kw}, vc_max_tokens)


def vqa_collate(tokenizer, train=True, max_length=25, vc_max_tokens=55):
    """Questions at ``max_length`` with truncation when training (ALBEF), whole at evaluation; answers whole."""
    q = {"truncation": train, "max_length": max_length if train else None}
    return Collate(tokenizer, {"question": q}, vc_max_tokens)
