"""The collated batch every model takes: a flat dict of named fields.

``image`` [B, 3, H, W] (NLVR2: the first images, then the second ones); ``input_ids`` / ``attention_mask``
(the captions, hypotheses or sentences); ``idx`` (the dataset index or the image's id, for same-image
positives); ``label`` (class targets); VQA's ``question_ids`` / ``question_mask``, ``answer_ids`` /
``answer_mask``, ``weights``, ``k``; ViCHA's concepts ``kw_input_ids`` / ``kw_attention_mask``; CE-CLIP's
negatives ``hn_input_ids`` / ``hn_attention_mask`` ([4B, L], sample-major) and ``hn_valid`` ([B, 4]). Fields
the model does not read (``bad``, ``n``, ...) are the engine's.
"""
import torch


def concepts_of(batch):
    """ViCHA's visual concepts (ids, mask) of a batch, or None."""
    return (batch["kw_input_ids"], batch["kw_attention_mask"]) if "kw_input_ids" in batch else None


def as_batch(image, text=None, idx=None, concepts=None, hard_negatives=None, targets=None):
    """A batch from tensors: ``text`` a tokenizer output or (ids, mask),
    ``concepts`` (ids, mask), ``hard_negatives`` (ids, mask, valid), ``targets`` the class labels."""
    b = {"image": image}
    if text is not None:
        ids, mask = (text[0], text[1]) if isinstance(text, (tuple, list)) else (text["input_ids"],
                                                                                text["attention_mask"])
        b.update(input_ids=ids, attention_mask=mask)
    if idx is not None:
        b["idx"] = idx
    if concepts is not None:
        b["kw_input_ids"], b["kw_attention_mask"] = concepts
    if hard_negatives is not None:
        b["hn_input_ids"], b["hn_attention_mask"], b["hn_valid"] = hard_negatives
    if targets is not None:
        b["label"] = targets
    return b


def to_device(batch, device):
    """The batch with its tensors on ``device`` (other fields as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
