"""Pieces every ALBEF model class shares: building encoders from the config, ITC and ITM blocks."""
import os

import torch
import torch.nn.functional as F
from torch import nn

from models import concepts as vc
from models import objectives
from models.checkpoint import init_text_encoder, init_visual_encoder
from models.momentum import MomentumMixin
from models.vit import build_vit
from models.xbert import BertConfig, BertForMaskedLM, BertLMHeadModel, BertModel, SharedImageKV
from schema import value

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bert_config_from(config, **overrides):
    """``bert_config`` (a JSON path, relative to the cwd or the repo, or inline keys) -> BertConfig."""
    if "bert_config" not in config:
        raise KeyError("config key 'bert_config' is required (path to config_bert.json or its keys inline)")
    bert = config["bert_config"]
    if isinstance(bert, str) and not os.path.exists(bert) and os.path.exists(os.path.join(REPO_ROOT, bert)):
        bert = os.path.join(REPO_ROOT, bert)
    if isinstance(bert, str) and not os.path.exists(bert):
        raise FileNotFoundError(f"config key 'bert_config': no such file {bert!r}")
    bc = BertConfig.from_config(bert)
    if value(config, "attn_implementation"):
        bc = bc.replace(attn_implementation=value(config, "attn_implementation"))
    if value(config, "grad_checkpointing"):
        bc = bc.replace(gradient_checkpointing=True)
    bc = bc.replace(**overrides)
    vw = value(config, "vision_width")
    if bc.fusion_layer < bc.num_hidden_layers and bc.encoder_width != vw:
        raise ValueError(f"bert_config.encoder_width ({bc.encoder_width}) must equal vision_width ({vw}): "
                         "the fusion layers cross-attend to the ViT tokens")
    return bc


class ALBEFBase(MomentumMixin, nn.Module):
    """Common construction. ``text_encoder`` is an MLM model (``.bert``) or a plain BertModel.

    ``exact_savings`` (on): the fusion passes of a step share the image K/V projections and the MLM heads run
    at the masked positions only; off is the plain path the tests and ``benchmarks/pretrain_step.py`` compare
    against (same losses and gradients to float rounding).
    """

    exact_savings = True

    def build_encoders(self, config, text_cls=BertModel, bert_overrides=None, image_res=None):
        self.config = config
        self.visual_encoder = build_vit(config, image_res)
        bc = bert_config_from(config, **(bert_overrides or {}))
        self.bert_config = bc
        self.text_encoder = text_cls(bc)
        if value(config, "vision_init"):
            init_visual_encoder(self.visual_encoder, config["vision_init"])
        if value(config, "text_encoder"):
            init_text_encoder(self.text_encoder, config["text_encoder"])
        self.momentum = value(config, "momentum")
        vc.build_concept_encoder(self, config, bc)   # ViCHA's visual concepts (kw_img_model: true)
        return bc

    def make_momentum(self, *names):
        """Momentum copies; the concept encoder follows the image encoder (ViCHA's kw_encoder_m, kw_proj_m)."""
        if getattr(self, "use_concepts", False) and "visual_encoder" in names:
            names = names + ("kw_encoder", "kw_proj")
        super().make_momentum(*names)

    def build_contrastive_heads(self, config):
        vw, tw, ed = value(config, "vision_width"), self.bert_config.hidden_size, value(config, "embed_dim")
        self.vision_proj = nn.Linear(vw, ed)
        self.text_proj = nn.Linear(tw, ed)
        self.temp = nn.Parameter(torch.ones([]) * value(config, "temp"))
        self.itm_head = nn.Linear(tw, 2)
        # GRIT-VLP / MAFA switches; the defaults are ALBEF's
        self.use_momentum = value(config, "use_momentum")
        self.itc_consistency = float(value(config, "itc_consistency_weight"))
        sel = value(config, "itm_negative_selection")
        if sel not in ("multinomial", "argmax", "uniform"):
            raise ValueError("config key 'itm_negative_selection' must be 'multinomial', 'argmax' or 'uniform', "
                             f"not {sel!r}")
        self.itm_hard = sel
        self.build_hidden_alignment(config)

    def build_hidden_alignment(self, config):
        """ViCHA's H-ITC: ``num_hidden_align`` extra levels pairing the last ViT blocks before the final one
        with the last text layers before the final one (ViCHA: blocks 7-11 with text layers 1-5)."""
        n = int(value(config, "num_hidden_align")) if value(config, "return_hidden_state") else 0
        self.num_hidden_align = n
        if not n:
            return
        depth, text_layers = len(self.visual_encoder.blocks), self.bert_config.fusion_layer
        if n >= min(depth, text_layers):
            raise ValueError(f"config key 'num_hidden_align' ({n}) must be below the ViT depth ({depth}) and the "
                             f"number of text layers ({text_layers})")
        weights = list(value(config, "ita_hidden_weights") or [1.0] * n)
        if len(weights) != n:
            raise ValueError(f"config key 'ita_hidden_weights' has {len(weights)} entries, num_hidden_align is {n}")
        vw, tw, ed = value(config, "vision_width"), self.bert_config.hidden_size, value(config, "embed_dim")
        self.vision_proj_hidden = nn.ModuleList(nn.Linear(vw, ed) for _ in range(n))
        self.text_proj_hidden = nn.ModuleList(nn.Linear(tw, ed) for _ in range(n))
        self.ita_hidden_weight = float(value(config, "ita_hidden_weight"))
        self.ita_hidden_weights = [float(w) for w in weights]

    def hidden_itc(self, image_hidden, text_hidden):
        """Weighted sum of the H-ITC levels from the per-block / per-layer states of the online encoders."""
        n = self.num_hidden_align
        vis, txt = image_hidden[-1 - n:-1], text_hidden[-1 - n:-1]
        total = 0.0
        for level in range(n):
            v = F.normalize(self.vision_proj_hidden[level](vis[level][:, 0]).float(), dim=-1)
            t = F.normalize(self.text_proj_hidden[level](txt[level][:, 0]).float(), dim=-1)
            total = total + self.ita_hidden_weights[level] * objectives.hidden_itc_loss(v, t, self.temp)
        return self.ita_hidden_weight * total

    @property
    def text_bert(self):
        """The BertModel inside ``text_encoder`` (the MLM wrapper's ``.bert`` or the encoder itself)."""
        return self.text_encoder.bert if hasattr(self.text_encoder, "bert") else self.text_encoder

    @property
    def text_bert_m(self):
        return self.text_encoder_m.bert if hasattr(self.text_encoder_m, "bert") else self.text_encoder_m

    # ---- encoders
    def encode_image(self, image, momentum=False, hidden=False, concepts=None):
        """(token states, normalised ITC feature) and with ``hidden`` each block's output through the final
        norm (as ViCHA aligns them). ``concepts`` (ids, mask) are ViCHA's visual concepts, appended to the
        ViT sequence; ``image_atts`` gives the matching attention mask of the token states."""
        proj = self.vision_proj_m if momentum else self.vision_proj
        out = self.image_tokens(image, concepts, momentum, hidden)
        embeds = out[0] if hidden else out
        feat = F.normalize(proj(embeds[:, 0]).float(), dim=-1)
        return (embeds, feat, out[1]) if hidden else (embeds, feat)

    def image_tokens(self, image, concepts=None, momentum=False, hidden=False, register_blk=-1):
        """The ViT's token states (with the visual concepts appended when the model uses them); with
        ``hidden`` also every block's output through the final norm; ``register_blk`` keeps that block's
        attention for Grad-CAM."""
        enc = self.visual_encoder_m if momentum else self.visual_encoder
        kw = {"register_blk": register_blk} if register_blk >= 0 else {}
        if getattr(self, "use_concepts", False):
            if concepts is None:
                raise ValueError("config key 'kw_img_model' is true but the batch has no visual concepts: the "
                                 "annotation entries need 'kwords' (tools/visual_concepts.py writes them)")
            kw["extra_tokens"] = vc.encode_concepts(self, concepts, momentum)
            if self.vc_mask_padding:
                kw["extra_mask"] = concepts[1]
        if hidden:
            embeds, states = enc(image, return_hidden=True, **kw)
            return embeds, [enc.norm(h) for h in states]
        return enc(image, **kw)

    def image_atts(self, image_embeds, concepts=None):
        """Attention mask [B, T] of ``encode_image``'s token states: all ones, except the concept padding
        when ``vc_mask_padding`` is on. Always a prefix of ones (the concepts are right-padded)."""
        atts = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        if self.use_concepts and self.vc_mask_padding and concepts is not None:
            kw_mask = concepts[1]
            atts[:, -kw_mask.shape[1]:] = kw_mask.to(atts)
        return atts

    def encode_text(self, input_ids, attention_mask, momentum=False, hidden=False):
        bert, proj = (self.text_bert_m, self.text_proj_m) if momentum else (self.text_bert, self.text_proj)
        out = bert(input_ids=input_ids, attention_mask=attention_mask, mode="text", output_hidden_states=hidden)
        embeds = out.last_hidden_state
        feat = F.normalize(proj(embeds[:, 0]).float(), dim=-1)
        return (embeds, feat, out.hidden_states) if hidden else (embeds, feat)

    def fuse(self, text_embeds, text_atts, image_embeds, image_atts=None):
        """Fusion layers over (text states, image tokens); returns the multimodal [CLS] states."""
        if image_atts is None:
            image_atts = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        out = self.text_bert(encoder_embeds=text_embeds, attention_mask=text_atts,
                             encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, mode="fusion")
        return out.last_hidden_state[:, 0]

    @torch.no_grad()
    def clamp_temp(self):
        self.temp.clamp_(0.001, 0.5)

    # ---- objectives
    def itc(self, image_feat, text_feat, image_feat_m, text_feat_m, positives, alpha, extra_i2t=None):
        """ITC against momentum features + queue. ``positives`` is [bs, bs + Q] bool. Returns (loss, sims).
        ``extra_i2t``: more image->text logit columns (CE-CLIP's hard negatives), with target 0."""
        with objectives.fp32(image_feat.device):
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1).float()
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1).float()
            temp = self.temp.float()
            sim_i2t = image_feat.float() @ text_feat_all / temp
            sim_t2i = text_feat.float() @ image_feat_all / temp
            with torch.no_grad():
                pos = positives.float()
                if torch.is_tensor(alpha) or alpha > 0:   # a tensor alpha (compiled steps) takes this branch
                    t_i2t = objectives.itc_targets(image_feat_m.float() @ text_feat_all / temp, pos, alpha)
                    t_t2i = objectives.itc_targets(text_feat_m.float() @ image_feat_all / temp, pos, alpha)
                else:
                    t_i2t = t_t2i = objectives.itc_targets(None, pos, 0)
            loss = (objectives.soft_target_ce(*with_columns(sim_i2t, t_i2t, extra_i2t)) +
                    objectives.soft_target_ce(sim_t2i, t_t2i)) / 2
        return loss, sim_i2t, sim_t2i

    def in_batch_sims(self, image_feat, text_feat):
        """(sim_i2t, sim_t2i) over the batch only (GRIT-VLP): the keys are the other modality's features,
        detached as in GRIT (each direction trains one tower, as with ALBEF's momentum keys)."""
        with objectives.fp32(image_feat.device):
            temp = self.temp.float()
            image_feat, text_feat = image_feat.float(), text_feat.float()
            return image_feat @ text_feat.detach().t() / temp, text_feat @ image_feat.detach().t() / temp

    def in_batch_itc_loss(self, sim_i2t, sim_t2i, targets_i2t, targets_t2i, extra_i2t=None):
        """Soft-target ITC over in-batch similarities; with ``itc_consistency_weight`` > 0 each direction is
        also pulled toward the other's detached distribution (GRIT's consistency term)."""
        with objectives.fp32(sim_i2t.device):
            loss = (objectives.soft_target_ce(*with_columns(sim_i2t, targets_i2t, extra_i2t)) +
                    objectives.soft_target_ce(sim_t2i, targets_t2i)) / 2
            if self.itc_consistency > 0:
                with torch.no_grad():
                    p_i2t, p_t2i = sim_i2t.float().softmax(1), sim_t2i.float().softmax(1)
                consistency = (objectives.soft_target_ce(sim_i2t, p_t2i) +
                               objectives.soft_target_ce(sim_t2i, p_i2t)) / 2
                loss = loss + self.itc_consistency * consistency
        return loss

    def itc_in_batch(self, image_feat, text_feat, positives, extra_i2t=None):
        """GRIT's ITC: in-batch similarities, targets spread over ``positives``. Returns (loss, sims)."""
        sim_i2t, sim_t2i = self.in_batch_sims(image_feat, text_feat)
        targets = objectives.itc_targets(None, positives.float(), 0)
        return self.in_batch_itc_loss(sim_i2t, sim_t2i, targets, targets.t(), extra_i2t), sim_i2t, sim_t2i

    def shared_kv(self, image_embeds):
        """``image_embeds`` as a ``SharedImageKV`` (the fusion passes of one step share its K/V projections),
        except under activation checkpointing, whose recomputation must recompute them too."""
        if isinstance(image_embeds, SharedImageKV) or self.bert_config.gradient_checkpointing or \
                not self.exact_savings:
            return image_embeds
        return SharedImageKV(image_embeds)

    def itm(self, text_embeds, text_atts, image_embeds, sim_i2t, sim_t2i, positives, hard=None, image_atts=None):
        """ITM on bs positives + bs (text, hard image) + bs (hard text, image) pairs.

        ``positives`` [bs, bs] bool marks pairs that must not be drawn as negatives. Returns (loss, extras).
        """
        bs = text_embeds.shape[0]
        with torch.no_grad():
            hard = hard or self.itm_hard
            if hard == "uniform":
                pick = lambda sim, pos: objectives.random_negatives(pos)   # noqa: E731
            else:
                pick = objectives.sample_hard_negatives if hard == "multinomial" else objectives.topk_hard_negatives
            neg_img, valid_t2i = pick(sim_t2i[:, :bs], positives)
            neg_txt, valid_i2t = pick(sim_i2t[:, :bs], positives)
        zeros = torch.zeros(2 * bs, dtype=torch.long, device=text_embeds.device)
        return self.itm_pairs(text_embeds, text_atts, image_embeds, neg_img, neg_txt, zeros,
                              torch.cat([valid_t2i, valid_i2t]).float(), image_atts)

    def itm_pairs(self, text_embeds, text_atts, image_embeds, neg_img, neg_txt, neg_labels, neg_weights,
                  image_atts=None):
        """ITM over the bs positives, (text k, image neg_img[k]) and (text neg_txt[k], image k), the last 2bs
        with labels ``neg_labels`` (MAFA turns connections into 1s) and weights ``neg_weights``."""
        bs = text_embeds.shape[0]
        if image_atts is None:
            image_atts = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        image_embeds = self.shared_kv(image_embeds)
        text_all = torch.cat([text_embeds, text_embeds[neg_txt]], dim=0)
        atts_all = torch.cat([text_atts, text_atts[neg_txt]], dim=0)
        image_all = image_embeds[torch.cat([neg_img, torch.arange(bs, device=neg_img.device)])]
        cls_pos = self.fuse(text_embeds, text_atts, image_embeds, image_atts)
        cls_neg = self.fuse(text_all, atts_all, image_all, torch.cat([image_atts[neg_img], image_atts], dim=0))
        logits = self.itm_head(torch.cat([cls_pos, cls_neg], dim=0))
        labels = torch.cat([torch.ones(bs, dtype=torch.long, device=logits.device), neg_labels.to(logits.device)])
        weights = torch.cat([torch.ones(bs, device=logits.device), neg_weights.to(logits.device)])
        loss = objectives.itm_loss(logits, labels, weights)
        return loss, {"itm_logits": logits, "neg_image_idx": neg_img, "neg_text_idx": neg_txt}


def with_columns(logits, targets, extra):
    """(logits, targets) with ``extra`` logit columns appended at target 0 (the consistency term and ITM
    read the original columns only)."""
    if extra is None:
        return logits, targets
    return torch.cat([logits, extra.to(logits.dtype)], 1), torch.cat([targets, targets.new_zeros(extra.shape)], 1)


def text_inputs(text):
    """(input_ids, attention_mask) from a BatchEncoding, a dict or a tuple."""
    if isinstance(text, (tuple, list)):
        return text[0], text[1]
    return text["input_ids"], text["attention_mask"]


__all__ = ["ALBEFBase", "BertForMaskedLM", "BertLMHeadModel", "BertModel", "bert_config_from", "text_inputs"]
