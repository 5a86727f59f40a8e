"""A compact BERT whose upper layers cross-attend to image tokens.

Parameter names follow HF BERT and ALBEF's ``xbert.py`` so their state dicts load by name. Layers with
index >= ``fusion_layer`` carry ``crossattention`` (keys/values of width ``encoder_width``). ``mode``
selects which layers run: ``text`` = [0, fusion_layer), ``fusion`` = [fusion_layer, L) fed through
``encoder_embeds``, ``multi_modal`` = all of them.
"""
import json
import math
import os
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

SELF_ATTN_MASK_VALUE = -10000.0   # ALBEF/HF 4.8 additive mask for self-attention
CROSS_ATTN_MASK_VALUE = -1e9      # HF 4.8 invert_attention_mask (fp32)


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    fusion_layer: int = 6
    encoder_width: int = 768
    gradient_checkpointing: bool = False
    # 'sdpa' (fused) or 'eager' (returns probabilities; used for Grad-CAM and tests)
    attn_implementation: str = "sdpa"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in d.items() if k in names and k != "extra"}
        # HF keys we do not use (architectures, model_type, ...) are kept, not rejected
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)

    @classmethod
    def from_json_file(cls, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"bert_config: no such file {path!r}")
        with open(path) as f:
            try:
                return cls.from_dict(json.load(f))
            except json.JSONDecodeError as e:
                raise ValueError(f"bert_config: {path!r} is not valid JSON: {e}") from None

    @classmethod
    def from_config(cls, value, base_dir=None):
        """`value` is ALBEF's ``bert_config``: a path to a JSON file or the same keys inline."""
        if isinstance(value, BertConfig):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        path = value
        if base_dir and not os.path.isabs(path) and not os.path.exists(path):
            path = os.path.join(base_dir, path)
        return cls.from_json_file(path)

    def replace(self, **kw):
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(kw)
        return BertConfig(**d)

    def to_dict(self):
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d.update(self.extra)
        return d


class Output(dict):
    """Dict with attribute access, like HF's ModelOutput (``out.last_hidden_state``, ``out.loss``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


_ACT = {"gelu": nn.GELU, "relu": nn.ReLU, "gelu_new": lambda: nn.GELU(approximate="tanh"), "tanh": nn.Tanh}


def _act(name):
    if name not in _ACT:
        raise ValueError(f"bert_config.hidden_act: unsupported activation {name!r}; use one of {sorted(_ACT)}")
    return _ACT[name]()


class BertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # persistent as in HF 4.8.1, so every ALBEF checkpoint (which holds it) loads strictly
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)),
                             persistent=True)

    def forward(self, input_ids=None, inputs_embeds=None, past_key_values_length=0):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        seq_len = inputs_embeds.shape[1]
        position_ids = self.position_ids[:, past_key_values_length:past_key_values_length + seq_len]
        x = inputs_embeds + self.position_embeddings(position_ids)
        x = x + self.token_type_embeddings.weight[0]   # ALBEF never passes token types: all type 0
        return self.dropout(self.LayerNorm(x))


class SharedImageKV:
    """The image tokens of one step, standing in for ``encoder_hidden_states``: each cross-attention layer
    projects them to keys and values once, and every fusion pass of the step (ITM positives, ITM negatives,
    MLM) reads those, a pass over other rows by index (``kv[rows]``). Exact: the projection is per token, and
    autograd sums the gradients of all passes into the one projection."""

    def __init__(self, states, rows=None, cache=None):
        self.states, self.rows = states, rows
        self.cache = {} if cache is None else cache

    def __getitem__(self, rows):
        return SharedImageKV(self.states, rows if self.rows is None else self.rows[rows], self.cache)

    @property
    def shape(self):
        n = self.states.shape[0] if self.rows is None else self.rows.shape[0]
        return torch.Size((n, *self.states.shape[1:]))

    @property
    def device(self):
        return self.states.device

    @property
    def dtype(self):
        return self.states.dtype

    def kv(self, attn):
        """(keys, values) of these rows through ``attn``'s projections, computed once per module."""
        kv = self.cache.get(attn)
        if kv is None:
            kv = self.cache[attn] = (attn.key(self.states), attn.value(self.states))
        return kv if self.rows is None else (kv[0][self.rows], kv[1][self.rows])


class BertSelfAttention(nn.Module):
    def __init__(self, config, is_cross_attention=False):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"bert_config: hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        kv_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.is_cross_attention = is_cross_attention
        self.eager = config.attn_implementation == "eager"
        self.save_attention = False   # Grad-CAM: keep cross-attention probabilities and their gradient
        self.attention_map = None
        self.attn_gradients = None

    def save_attn_gradients(self, grad):
        self.attn_gradients = grad

    def get_attn_gradients(self):
        return self.attn_gradients

    def get_attention_map(self):
        return self.attention_map

    def _heads(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, past_key_value=None,
                output_attentions=False):
        """`attention_mask` is additive, broadcastable to [B, heads, Lq, Lk]."""
        q = self._heads(self.query(hidden_states))
        if isinstance(encoder_hidden_states, SharedImageKV):
            k, v = (self._heads(t) for t in encoder_hidden_states.kv(self))
        elif self.is_cross_attention:
            k = self._heads(self.key(encoder_hidden_states))
            v = self._heads(self.value(encoder_hidden_states))
        else:
            k = self._heads(self.key(hidden_states))
            v = self._heads(self.value(hidden_states))
            if past_key_value is not None:
                k = torch.cat([past_key_value[0], k], dim=2)
                v = torch.cat([past_key_value[1], v], dim=2)
        present = None if self.is_cross_attention else (k, v)
        dropout_p = self.dropout_p if self.training else 0.0
        keep_probs = output_attentions or (self.save_attention and self.is_cross_attention)
        if self.eager or keep_probs:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.softmax(dim=-1)
            if self.save_attention and self.is_cross_attention:
                self.attention_map = probs
                if probs.requires_grad:
                    probs.register_hook(self.save_attn_gradients)
            ctx = F.dropout(probs, dropout_p, self.training) @ v
        else:
            if attention_mask is not None:
                attention_mask = attention_mask.to(q.dtype)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout_p)
            probs = None
        b, _, n, _ = ctx.shape
        ctx = ctx.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return ctx, present, probs


class BertSelfOutput(nn.Module):
    def __init__(self, config, in_features=None):
        super().__init__()
        self.dense = nn.Linear(in_features or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    def __init__(self, config, is_cross_attention=False):
        super().__init__()
        self.self = BertSelfAttention(config, is_cross_attention)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, past_key_value=None,
                output_attentions=False):
        ctx, present, probs = self.self(hidden_states, attention_mask, encoder_hidden_states, past_key_value,
                                        output_attentions)
        return self.output(ctx, hidden_states), present, probs


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = _act(config.hidden_act)

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x))


class BertOutput(BertSelfOutput):
    def __init__(self, config):
        super().__init__(config, in_features=config.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, config, layer_num):
        super().__init__()
        self.layer_num = layer_num
        self.attention = BertAttention(config)
        self.has_cross_attention = layer_num >= config.fusion_layer
        if self.has_cross_attention:
            self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                past_key_value=None, output_attentions=False):
        x, present, self_probs = self.attention(hidden_states, attention_mask, past_key_value=past_key_value,
                                                output_attentions=output_attentions)
        cross_probs = None
        if self.has_cross_attention:
            if encoder_hidden_states is None:
                raise ValueError(f"BERT layer {self.layer_num} cross-attends: encoder_hidden_states is required "
                                 "(use mode='text' for the text-only layers)")
            x, _, cross_probs = self.crossattention(x, encoder_attention_mask, encoder_hidden_states,
                                                    output_attentions=output_attentions)
        x = self.output(self.intermediate(x), x)
        return x, present, self_probs, cross_probs


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([BertLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = config.gradient_checkpointing

    def layer_range(self, mode):
        L, f = self.config.num_hidden_layers, self.config.fusion_layer
        if mode == "text":
            return 0, f
        if mode == "fusion":
            return f, L
        if mode == "multi_modal":
            return 0, L
        raise ValueError(f"mode must be 'text', 'fusion' or 'multi_modal', got {mode!r}")

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                past_key_values=None, use_cache=False, output_attentions=False, mode="multi_modal",
                output_hidden_states=False):
        start, end = self.layer_range(mode)
        all_hidden = [] if output_hidden_states else None   # each layer's output (ViCHA's H-ITC)
        fusion = self.config.fusion_layer
        multi = isinstance(encoder_hidden_states, (list, tuple))
        presents = [] if use_cache else None
        attentions, cross_attentions = [], []
        for i in range(start, end):
            layer = self.layer[i]
            enc, enc_mask = encoder_hidden_states, encoder_attention_mask
            if multi:   # NLVR: layer n attends to image (n - fusion_layer) % len(list)
                j = (i - fusion) % len(encoder_hidden_states)
                enc, enc_mask = encoder_hidden_states[j], encoder_attention_mask[j]
            past = past_key_values[i - start] if past_key_values is not None else None
            if self.gradient_checkpointing and self.training and not use_cache:
                out = torch.utils.checkpoint.checkpoint(layer, hidden_states, attention_mask, enc, enc_mask, None,
                                                        output_attentions, use_reentrant=False)
            else:
                out = layer(hidden_states, attention_mask, enc, enc_mask, past, output_attentions)
            hidden_states = out[0]
            if output_hidden_states:
                all_hidden.append(hidden_states)
            if use_cache:
                presents.append(out[1])
            if output_attentions:
                attentions.append(out[2])
                cross_attentions.append(out[3])
        return Output(last_hidden_state=hidden_states, past_key_values=presents, hidden_states=all_hidden,
                      attentions=attentions if output_attentions else None,
                      cross_attentions=cross_attentions if output_attentions else None)


def init_bert_weights(module, std):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()
    if isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


def invert_cross_mask(mask, dtype):
    """[B, Lk] of 0/1 -> additive [B, 1, 1, Lk]; a mask already 3-d or 4-d keeps its shape."""
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    elif mask.dim() == 3:
        mask = mask[:, None, :, :]
    return (1.0 - mask.to(dtype)) * CROSS_ATTN_MASK_VALUE


class BertModel(nn.Module):
    """ALBEF's BertModel (no pooler). ``forward`` follows xbert's call convention."""

    def __init__(self, config, add_pooling_layer=False):
        super().__init__()
        if add_pooling_layer:
            raise ValueError("ALBEF never uses the BERT pooler; build with add_pooling_layer=False")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.apply(lambda m: init_bert_weights(m, config.initializer_range))

    def get_extended_attention_mask(self, attention_mask, seq_len, is_decoder, past_len=0):
        if attention_mask.dim() == 3:
            ext = attention_mask[:, None, :, :]
        elif attention_mask.dim() == 2:
            if is_decoder:
                causal = torch.tril(torch.ones(seq_len, past_len + seq_len, device=attention_mask.device,
                                               dtype=attention_mask.dtype), diagonal=past_len)
                ext = causal[None, None, :, :] * attention_mask[:, None, None, :]
            else:
                ext = attention_mask[:, None, None, :]
        else:
            raise ValueError(f"attention_mask must be 2-d or 3-d, got shape {tuple(attention_mask.shape)}")
        return (1.0 - ext.float()) * SELF_ATTN_MASK_VALUE

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, encoder_embeds=None,
                encoder_hidden_states=None, encoder_attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, is_decoder=False, mode="multi_modal", return_dict=True,
                output_hidden_states=False, **unused):
        given = [x is not None for x in (input_ids, inputs_embeds, encoder_embeds)]
        if sum(given) != 1:
            raise ValueError("give exactly one of input_ids, inputs_embeds, encoder_embeds")
        past_len = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if encoder_embeds is not None:
            hidden = encoder_embeds   # 'fusion' mode input: bypasses the embedding layer entirely
        else:
            hidden = self.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                     past_key_values_length=past_len)
        b, n = hidden.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(b, n + past_len, device=hidden.device)
        ext_mask = self.get_extended_attention_mask(attention_mask, n, is_decoder, past_len).to(hidden.dtype)
        if encoder_hidden_states is not None:
            if isinstance(encoder_hidden_states, (list, tuple)):
                if encoder_attention_mask is None:
                    encoder_attention_mask = [torch.ones(e.shape[:2], device=e.device) for e in encoder_hidden_states]
                enc_mask = [invert_cross_mask(m, hidden.dtype) for m in encoder_attention_mask]
            else:
                if encoder_attention_mask is None:
                    encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], device=hidden.device)
                enc_mask = invert_cross_mask(encoder_attention_mask, hidden.dtype)
        else:
            enc_mask = None
        return self.encoder(hidden, ext_mask, encoder_hidden_states, enc_mask, past_key_values=past_key_values,
                            use_cache=use_cache, output_attentions=output_attentions, mode=mode,
                            output_hidden_states=output_hidden_states)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = _act(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias   # one Parameter under both names, as in HF

    def forward(self, x):
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, x):
        return self.predictions(x)


def soft_cross_entropy(logits, soft_labels, dim=-1):
    """Per-position -sum(p * log_softmax(logits)). ``dim=1`` reproduces ALBEF's pre-2022-03 typo."""
    return -(soft_labels * F.log_softmax(logits, dim=dim)).sum(dim=-1)


class _BertWithHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertOnlyMLMHead(config)
        self.cls.apply(lambda m: init_bert_weights(m, config.initializer_range))
        self.tie_weights()

    def tie_weights(self):
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight


class BertForMaskedLM(_BertWithHead):
    """Text/fusion encoder with ALBEF's MLM head and soft-label distillation."""

    def forward(self, input_ids=None, attention_mask=None, encoder_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, labels=None, mode="multi_modal", soft_labels=None, alpha=0.0,
                return_logits=False, distill_dim=-1, positions=None, full_head=False, **kw):
        """With ``labels`` the head (768 x vocab) runs at the masked positions only: the loss reads nothing
        else, and ``logits`` are then those rows [N, vocab] in row-major order. ``positions`` (index tensors,
        e.g. ``(labels != -100).nonzero(as_tuple=True)``) gives them without another host sync; with
        ``return_logits`` it limits the returned logits to them. ``distill_dim=1`` (ALBEF's old
        sequence-axis softmax) needs every position and keeps the full head, as does ``full_head`` (the
        reference path of the tests and the benchmark)."""
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, encoder_embeds=encoder_embeds,
                        encoder_hidden_states=encoder_hidden_states,
                        encoder_attention_mask=encoder_attention_mask, mode=mode, **kw)
        h = out.last_hidden_state
        if return_logits:
            return self.cls(h if positions is None else h[positions])
        if labels is None:
            return Output(loss=None, logits=self.cls(h), last_hidden_state=h)
        if distill_dim == 1 or full_head:
            scores = self.cls(h)
            sel = labels != -100
            n = sel.sum().clamp(min=1)   # a batch with nothing masked gives 0, not NaN
            ce = F.cross_entropy(scores.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                 reduction="sum") / n
            loss = ce
            if soft_labels is not None:
                distill = soft_cross_entropy(scores.float(), soft_labels.float(), dim=distill_dim)
                loss = (1 - alpha) * ce + alpha * (distill * sel).sum() / n
            return Output(loss=loss, logits=scores, last_hidden_state=h)
        if positions is None:
            positions = (labels != -100).nonzero(as_tuple=True)
        scores = self.cls(h[positions])
        n = max(int(positions[0].shape[0]), 1)   # a batch with nothing masked gives 0, not NaN
        loss = F.cross_entropy(scores.float(), labels[positions], reduction="sum") / n
        if soft_labels is not None:
            soft = soft_labels[positions] if soft_labels.dim() == 3 else soft_labels   # full or masked rows
            distill = soft_cross_entropy(scores.float(), soft.float()).sum() / n
            loss = (1 - alpha) * loss + alpha * distill
        return Output(loss=loss, logits=scores, last_hidden_state=h)


class BertLMHeadModel(_BertWithHead):
    """Causal decoder (the VQA answer decoder): per-sequence summed token loss, cached decoding."""

    def forward(self, input_ids=None, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                labels=None, past_key_values=None, use_cache=False, reduction="mean", mode="multi_modal",
                soft_labels=None, alpha=0.0, return_logits=False, distill_dim=-1, **kw):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                        encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                        past_key_values=past_key_values, use_cache=use_cache, is_decoder=True, mode=mode, **kw)
        scores = self.cls(out.last_hidden_state)
        if return_logits:
            return scores[:, :-1, :].contiguous()
        loss = None
        if labels is not None:
            shifted = scores[:, :-1, :].float()
            targets = labels[:, 1:]
            tok = F.cross_entropy(shifted.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
            tok = tok.view(targets.shape)
            valid = targets != -100
            lm = tok.sum(1)   # per-sequence sum, as ALBEF
            if soft_labels is not None:
                distill = (soft_cross_entropy(shifted, soft_labels.float(), dim=distill_dim) * valid).sum(1)
                lm = (1 - alpha) * lm + alpha * distill
            if reduction == "mean":   # ALBEF crashes here for B > 1; we return the batch mean
                lm = lm.mean()
            elif reduction != "none":
                raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
            loss = lm
        return Output(loss=loss, logits=scores, past_key_values=out.past_key_values,
                      last_hidden_state=out.last_hidden_state)


# ------------------------------------------------------------------ the fusion layers, many captions against one image
# A second forward of the fusion layers above for evaluation (tasks/retrieval.py): exact to float rounding, it
# skips only what ITM never reads (see PairScorer).
def _heads(x, n):
    b, l, d = x.shape
    return x.view(b, l, n, d // n).transpose(1, 2)


def _merge(x):
    b, h, l, d = x.shape
    return x.transpose(1, 2).reshape(b, l, h * d)


class PairScorer:
    """ITM match logits ``itm_head(fuse(text, image))[:, 1]`` for groups of pairs that share one image.

    Text tokens are packed (no padding) except inside the self-attention of the later fusion layers.
    """

    def __init__(self, model, image_states, text_states, text_atts, chunk=256):
        self.bert = model.text_bert
        cfg = self.bert.config
        self.layers = list(self.bert.encoder.layer[cfg.fusion_layer:])
        if not self.layers:
            raise ValueError("bert_config: fusion_layer equals num_hidden_layers; no fusion layer to score with")
        self.heads = cfg.num_attention_heads
        self.itm_head = model.itm_head
        self.images = image_states
        lengths = self.lengths_np = text_atts.sum(1).cpu().numpy()
        self.text_start = np.cumsum(lengths) - lengths   # packed row of each caption's [CLS]
        keep = text_atts.bool().reshape(-1)
        mask = ((1.0 - text_atts.float()) * SELF_ATTN_MASK_VALUE)[:, None, None, :]
        first = self.layers[0].attention
        x0 = torch.cat([first(text_states[s:s + chunk], mask[s:s + chunk].to(text_states.dtype))[0]
                        for s in range(0, len(text_states), chunk)])
        # the first fusion layer's self-attention and cross-attention query see only the text: once per caption
        self.x0 = x0.reshape(-1, x0.shape[-1])[keep]
        self.q0 = self.layers[0].crossattention.self.query(self.x0)

    def _split(self, x):
        """[N, D] -> [1, heads, N, dh] for attention against one image."""
        n, d = x.shape
        return x.view(1, n, self.heads, d // self.heads).transpose(1, 2)

    @torch.no_grad()
    def image_kv(self, image_ids):
        """Cross-attention keys and values of some images, per fusion layer: [(K, V) [U, heads, T, dh]]."""
        images = self.images[image_ids]
        return [(_heads(layer.crossattention.self.key(images), self.heads),
                 _heads(layer.crossattention.self.value(images), self.heads)) for layer in self.layers]

    def pack(self, txt):
        """Host-side indices of a batch of captions (numpy ids): rows in the packed text states, the packed
        row of each [CLS], each token's slot in a [P, longest] padded layout, the lengths, the longest."""
        lengths = self.lengths_np[txt]
        starts = np.cumsum(lengths) - lengths
        pos = np.arange(lengths.sum()) - np.repeat(starts, lengths)
        src = np.repeat(self.text_start[txt], lengths) + pos
        n = int(lengths.max())
        slot = np.repeat(np.arange(len(txt)) * n, lengths) + pos
        return src, starts, slot, lengths, n

    def _pad(self, t, slot, p, n):
        buf = t.new_zeros(p * n, t.shape[1])
        buf[slot] = t
        return buf.view(p, n, -1)

    def _mask(self, lengths, n, dtype):
        pad = torch.arange(n, device=lengths.device)[None] >= lengths[:, None]
        return pad.to(dtype) * SELF_ATTN_MASK_VALUE   # [P, n], additive as in BertModel

    def _self_attention(self, att, x, slot, lengths, n):
        """Self-attention of each caption over its own tokens (padded to ``n`` only here)."""
        p, d, h = len(lengths), x.shape[1], self.heads
        split = lambda t: self._pad(t, slot, p, n).view(p, n, h, d // h).transpose(1, 2)   # noqa: E731
        q, k, v = split(att.self.query(x)), split(att.self.key(x)), split(att.self.value(x))
        mask = self._mask(lengths, n, q.dtype)[:, None, None, :]
        ctx = _merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).reshape(-1, d)
        return att.output(ctx[slot], x)

    def _cls_self_attention(self, att, x, cls, slot, lengths, n):
        """The last layer's self-attention for the [CLS] query only. Its keys and values are never
        projected per token: q.(W_k x + b_k) = (W_k^T q).x + const (the constant cancels in the softmax),
        and sum_j p_j (W_v x_j + b_v) = W_v (sum_j p_j x_j) + b_v. Two projections per pair instead of two
        per token; the same result up to float rounding."""
        p, d, h = len(lengths), x.shape[1], self.heads
        dh = d // h
        q = att.self.query(x[cls]).view(p, h, dh)
        wk = att.self.key.weight.view(h, dh, d)
        wv = att.self.value.weight.view(h, dh, d)
        qk = torch.einsum("phe,hed->phd", q, wk) / math.sqrt(dh)            # [P, h, D]
        xp = self._pad(x, slot, p, n)                                        # [P, n, D]
        scores = qk @ xp.transpose(1, 2) + self._mask(lengths, n, qk.dtype)[:, None, :]
        z = scores.softmax(-1) @ xp                                          # [P, h, D]
        ctx = torch.einsum("phd,hed->phe", z, wv).reshape(p, d) + att.self.value.bias
        return att.output(ctx, x[cls])

    @torch.no_grad()
    def __call__(self, kv, src, cls, slot, lengths, n):
        """Scores of the pairs (one image whose per-layer (K, V) is ``kv``, captions packed by ``pack``)."""
        x, q = self.x0[src], self.q0[src]
        last = len(self.layers) - 1
        for li, layer in enumerate(self.layers):
            if li == last and li > 0:
                x = self._cls_self_attention(layer.attention, x, cls, slot, lengths, n)
                q = layer.crossattention.self.query(x)
            elif li > 0:
                x = self._self_attention(layer.attention, x, slot, lengths, n)
                q = layer.crossattention.self.query(x)
            elif li == last:
                x, q = x[cls], q[cls]
            k, v = kv[li]
            ctx = F.scaled_dot_product_attention(self._split(q), k[None], v[None])   # image tokens: no mask
            x = layer.crossattention.output(_merge(ctx)[0], x)
            x = layer.output(layer.intermediate(x), x)
        return self.itm_head(x)[:, 1].float()
