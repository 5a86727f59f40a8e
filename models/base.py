"""Pieces every ALBEF model class shares: building encoders from the config, ITC and ITM blocks."""
import os

import torch
import torch.nn.functional as F
from torch import nn

from models import concepts as vc
from models.batch import concepts_of
from models.objectives.step import Step
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

    # ---- a contrastive step: encode once, then the objectives in order (models/objectives/__init__.py)
    def set_epoch(self, epoch):
        for o in getattr(self, "objectives", ()):
            o.on_epoch(self, epoch)

    def teacher(self, s):
        """The momentum encoders' features (and image states, for MLM's distillation), after the EMA update."""
        with torch.no_grad():
            self._momentum_update()
            s.image_embeds_m, s.image_feat_m = self.encode_image(s.image, momentum=True, concepts=s.concepts)
            _, s.text_feat_m = self.encode_text(s.input_ids, s.attention_mask, momentum=True)

    def run_objectives(self, batch, alpha=0.0):
        """(named outputs, the step) of ``self.objectives`` on a collated batch (``image``, ``input_ids``,
        ``attention_mask``, ``idx`` and what the objectives read: ``kw_*`` concepts, ``hn_*`` negatives)."""
        self.clamp_temp()
        hidden = any(o.needs_hidden for o in self.objectives)
        s = Step(batch, alpha, batch["input_ids"], batch["attention_mask"], batch["image"], concepts_of(batch))
        img = self.encode_image(s.image, hidden=hidden, concepts=s.concepts)
        txt = self.encode_text(s.input_ids, s.attention_mask, hidden=hidden)
        s.image_embeds, s.image_feat, s.text_embeds, s.text_feat = img[0], img[1], txt[0], txt[1]
        if hidden:
            s.image_hidden, s.text_hidden = img[2], txt[2]
        for o in self.objectives:
            o.prepare(self, s)
        s.image_atts = self.image_atts(s.image_embeds, s.concepts)
        s.image_embeds = self.shared_kv(s.image_embeds)   # one K/V projection per fusion layer for ITM and MLM
        if self.use_momentum:
            self.teacher(s)
        out = {}
        for o in self.objectives:
            for k, v in o(self, s).items():
                out[k] = out[k] + v if k in out else v
        return out, s

    def shared_kv(self, image_embeds):
        """``image_embeds`` as a ``SharedImageKV`` (the fusion passes of one step share its K/V projections),
        except under activation checkpointing, whose recomputation must recompute them too."""
        if isinstance(image_embeds, SharedImageKV) or self.bert_config.gradient_checkpointing or \
                not self.exact_savings:
            return image_embeds
        return SharedImageKV(image_embeds)

__all__ = ["ALBEFBase", "BertForMaskedLM", "BertLMHeadModel", "BertModel", "bert_config_from"]
