"""CE-CLIP's own setting: an open_clip model finetuned by the engine with the hard-negative losses.

The model is built by name (``clip_model``; ``clip_model_config`` registers a custom JSON config) with
weights from a local state-dict file (``clip_checkpoint``, loaded without executing pickled code; nothing is
downloaded). ITC is CLIP's in-batch loss over every rank's features (the local ones keep their gradient)
with rank-offset targets; ITC-hn, CMR and IMC are ``models.hard_negatives`` with temp = 1 / logit_scale.
CE-CLIP clamps the logit scale to <= 100 after every step (``clamp_temp``, as ALBEF clamps its temp).
"""
import os

import torch
import torch.nn.functional as F

from models.objectives import hard_negatives
from models.objectives.functional import soft_target_ce
from models.objectives.itc import with_columns
from utils import all_gather_with_grad, get_rank


def open_clip_model(name, model_config=None, checkpoint=None, keys=("clip_model", "clip_model_config",
                                                                    "clip_checkpoint")):
    """(open_clip model, its preprocess transform, tokenizer): built by name (``model_config``: a JSON config
    registered first), weights from a local state-dict file loaded without running pickled code. ``keys``
    name the config keys or flags in the errors."""
    import open_clip
    from models.checkpoint import extract_state_dict, load_file
    if not name:
        raise ValueError(f"missing {keys[0]!r} (an open_clip model name)")
    if checkpoint and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"{keys[2]}: file not found: {checkpoint!r} (nothing is downloaded)")
    if model_config:
        if not os.path.isfile(model_config):
            raise FileNotFoundError(f"{keys[1]}: file not found: {model_config!r}")
        open_clip.add_model_config(model_config)
    try:
        model, _, transform = open_clip.create_model_and_transforms(name, pretrained=None)
    except RuntimeError as e:
        raise ValueError(f"{keys[0]} {name!r}: {e}") from None
    if checkpoint:
        missing, _ = model.load_state_dict(extract_state_dict(load_file(checkpoint, keys[2])), strict=False)
        if missing:
            raise ValueError(f"{keys[2]} {checkpoint!r} does not fit {keys[0]} {name!r}: {len(missing)} missing "
                             f"keys, e.g. {missing[:5]}")
    return model, transform, open_clip.get_tokenizer(name)


def build_clip(config, checkpoint, device):
    """(model, tokenizer) for the compositional benchmarks: ``checkpoint`` is a finetuning checkpoint of this
    module, or empty (the config's ``clip_checkpoint`` weights)."""
    from models.checkpoint import extract_state_dict, load_file
    clip, tokenizer = build_open_clip(config)
    model = CLIPWithHardNegatives(config, clip)
    if checkpoint:
        model.load_state_dict(extract_state_dict(load_file(checkpoint, "--checkpoint")), strict=False)
    return model.to(device).eval(), tokenizer


def build_open_clip(config):
    """(open_clip model, tokenizer) from the config's keys; errors name the key."""
    model, _, tokenizer = open_clip_model(config.get("clip_model"), config.get("clip_model_config"),
                                          config.get("clip_checkpoint"))
    return model, tokenizer


class CLIPWithHardNegatives(torch.nn.Module):
    """``forward(batch)`` -> named losses; the batch has ``image``, ``text`` (token ids) and, with a hard-negative
    loss, ``hn_text`` ([4B, L]) and ``hn_valid`` ([B, 4])."""

    def __init__(self, config, clip=None):
        super().__init__()
        self.clip = clip if clip is not None else build_open_clip(config)[0]
        self.hn = hard_negatives.HardNegativeLosses(config) if hard_negatives.enabled(config) else None
        self.max_logit_scale = 100.0

    @torch.no_grad()
    def clamp_temp(self):
        self.clip.logit_scale.clamp_(0, torch.log(torch.tensor(self.max_logit_scale)).item())

    def set_epoch(self, epoch):
        if self.hn is not None:
            self.hn.on_epoch(epoch)

    def forward(self, batch, alpha=None):
        image, text = batch["image"], batch["text"]
        self.clamp_temp()
        image_feat = F.normalize(self.clip.encode_image(image).float(), dim=-1)
        text_feat = F.normalize(self.clip.encode_text(text).float(), dim=-1)
        temp = 1.0 / self.clip.logit_scale.exp().float()
        # CLIP's loss over the global batch: this rank's rows against every rank's features
        image_all, text_all = all_gather_with_grad(image_feat), all_gather_with_grad(text_feat)
        b = image_feat.shape[0]
        rows = torch.arange(b, device=image_feat.device)
        targets = torch.zeros(b, image_all.shape[0], device=image_feat.device)
        targets[rows, get_rank() * b + rows] = 1.0   # rank-offset positives
        sim_i2t, sim_t2i = image_feat @ text_all.t() / temp, text_feat @ image_all.t() / temp
        extra = hn_feat = None
        if self.hn is not None:
            if "hn_text" not in batch:
                raise ValueError("a hard-negative loss is on but the batch has no hard negatives")
            hn_ids, valid = batch["hn_text"], batch["hn_valid"]
            hn_feat = F.normalize(self.clip.encode_text(hn_ids).float(), dim=-1)
            extra = self.hn.extra_i2t(image_feat, hn_feat, valid, temp)
        loss = (soft_target_ce(*with_columns(sim_i2t, targets, extra)) + soft_target_ce(sim_t2i, targets)) / 2
        out = {"loss_ita": loss, "feats": (image_feat.detach(), text_feat.detach())}
        if self.hn is not None:
            out.update(self.hn(image_feat, text_feat, hn_feat, valid, temp))
        return out


@torch.no_grad()
def clip_scores(model, images, texts, tokenizer, device):
    """{cos}: [B, K] cosine of each image with its own K texts (compositional benchmarks)."""
    clip = model.clip if isinstance(model, CLIPWithHardNegatives) else model
    b, k = len(texts), len(texts[0])
    v = F.normalize(clip.encode_image(images.to(device)).float(), dim=-1)
    t = F.normalize(clip.encode_text(tokenizer([x for ts in texts for x in ts]).to(device)).float(), dim=-1)
    return {"cos": (v.repeat_interleave(k, 0) * t).sum(-1).view(b, k)}
