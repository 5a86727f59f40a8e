"""ViCHA's visual concepts (VCs): words chosen offline per image (``tools/visual_concepts.py``), encoded by a
small BERT (``kw_encoder`` + ``kw_proj``) and appended to the ViT token sequence.

Config keys (ViCHA's names): ``kw_img_model`` switches it on, ``num_hidden_layers_kw`` (2) sets the concept
encoder's depth, ``randkw_p`` (0.3 in pretraining, null downstream) the share of concepts drawn per sample,
``sep_token`` joins them with " [SEP] ", ``vc_max_tokens`` (55) truncates their tokens. Two fixes of
ViCHA's behaviour, each with a switch for fidelity: ``vc_mask_padding`` (default true) hides the concept
padding from the ViT and the fusion layers (ViCHA attends to it, and pads differently at evaluation), and
``vc_sample_replacement`` (default false) draws without duplicates (ViCHA draws with replacement).
The drawing is ``dataset.utils.sample_concepts``.
"""
from torch import nn

from models.checkpoint import init_text_encoder
from models.xbert import BertModel
from schema import value


def enabled(config):
    return bool(value(config, "kw_img_model"))


def build_concept_encoder(model, config, bert_config):
    """Add ``kw_encoder`` (a text-only BERT of ``num_hidden_layers_kw`` layers, initialised like the text
    encoder: bert-base layers 0..n-1) and ``kw_proj`` (text width -> vision width) to ``model``."""
    model.use_concepts = enabled(config)
    model.vc_mask_padding = bool(value(config, "vc_mask_padding"))
    if not model.use_concepts:
        return
    layers = int(value(config, "num_hidden_layers_kw"))
    if layers < 1:
        raise ValueError(f"config key 'num_hidden_layers_kw' must be at least 1, got {layers}")
    kw_config = bert_config.replace(num_hidden_layers=layers, fusion_layer=layers)
    model.kw_encoder = BertModel(kw_config)
    if value(config, "text_encoder"):
        init_text_encoder(model.kw_encoder, config["text_encoder"])
    model.kw_proj = nn.Linear(bert_config.hidden_size, value(config, "vision_width"))


def encode_concepts(model, concepts, momentum=False):
    """Concept tokens [B, L, vision width] from ``concepts`` = (input_ids, attention_mask): every position
    is kept, [CLS], [SEP] and padding included, as in ViCHA (the padding is masked later if asked)."""
    ids, mask = concepts
    enc, proj = (model.kw_encoder_m, model.kw_proj_m) if momentum else (model.kw_encoder, model.kw_proj)
    return proj(enc(input_ids=ids, attention_mask=mask, mode="text").last_hidden_state)
