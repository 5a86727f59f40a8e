"""Our BERT against transformers' BertModel and against hand-written attention math."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_BERT
from models.xbert import BertConfig, BertForMaskedLM, BertLMHeadModel, BertModel


def make(cls=BertModel, **kw):
    torch.manual_seed(0)
    m = cls(BertConfig.from_dict({**TINY_BERT, **kw}))
    return m.eval()


def inputs(b=3, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (b, n), generator=g)
    att = torch.ones(b, n, dtype=torch.long)
    att[0, 4:] = 0
    img = torch.randn(b, 5, 32, generator=g)
    return ids, att, img


def test_text_mode_equals_transformers_bert():
    from transformers import BertConfig as HFConfig, BertModel as HFBert
    ours = make()
    f = ours.config.fusion_layer
    hf = HFBert(HFConfig(vocab_size=120, hidden_size=32, num_hidden_layers=f, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=40), add_pooling_layer=False).eval()
    sd = {k: v for k, v in ours.state_dict().items()
          if not any(f"layer.{i}." in k for i in range(f, 10)) and "position_ids" not in k}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in k or "token_type_ids" in k for k in missing)
    ids, att, _ = inputs()
    ref = hf(input_ids=ids, attention_mask=att).last_hidden_state
    got = ours(input_ids=ids, attention_mask=att, mode="text").last_hidden_state
    assert torch.allclose(got[att.bool()], ref[att.bool()], atol=1e-5)


def reference_layer(layer, x, self_mask, enc, enc_mask, heads=2):
    """Post-LN BERT layer with cross-attention, written out with plain tensor math."""
    def attn(mod, q_in, kv_in, mask):
        b, n, d = q_in.shape
        hd = d // heads
        q = (q_in @ mod.query.weight.T + mod.query.bias).view(b, n, heads, hd).transpose(1, 2)
        k = (kv_in @ mod.key.weight.T + mod.key.bias).view(b, -1, heads, hd).transpose(1, 2)
        v = (kv_in @ mod.value.weight.T + mod.value.bias).view(b, -1, heads, hd).transpose(1, 2)
        s = q @ k.transpose(-1, -2) / math.sqrt(hd) + mask
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)

    def out(mod, h, res):
        return F.layer_norm(h @ mod.dense.weight.T + mod.dense.bias + res, (res.shape[-1],), mod.LayerNorm.weight,
                            mod.LayerNorm.bias, eps=1e-12)

    h = out(layer.attention.output, attn(layer.attention.self, x, x, self_mask), x)
    h = out(layer.crossattention.output, attn(layer.crossattention.self, h, enc, enc_mask), h)
    inter = F.gelu(h @ layer.intermediate.dense.weight.T + layer.intermediate.dense.bias)
    return out(layer.output, inter, h)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_fusion_layers_match_reference_math(impl):
    m = make(attn_implementation=impl)
    ids, att, img = inputs()
    img_att = torch.ones(img.shape[:2])
    img_att[1, 3:] = 0
    text = m(input_ids=ids, attention_mask=att, mode="text").last_hidden_state
    got = m(encoder_embeds=text, attention_mask=att, encoder_hidden_states=img, encoder_attention_mask=img_att,
            mode="fusion").last_hidden_state
    self_mask = (1 - att[:, None, None, :].float()) * -10000.0
    enc_mask = (1 - img_att[:, None, None, :]) * -1e9
    x = text
    for layer in m.encoder.layer[2:]:
        x = reference_layer(layer, x, self_mask, img, enc_mask)
    assert torch.allclose(got, x, atol=1e-5)
    full = m(input_ids=ids, attention_mask=att, encoder_hidden_states=img, encoder_attention_mask=img_att)
    assert torch.allclose(full.last_hidden_state, got, atol=1e-6)


def test_sdpa_and_eager_agree_with_dropout_off_and_masks():
    a, b = make(attn_implementation="sdpa"), make(attn_implementation="eager")
    ids, att, img = inputs()
    oa = a(input_ids=ids, attention_mask=att, encoder_hidden_states=img).last_hidden_state
    ob = b(input_ids=ids, attention_mask=att, encoder_hidden_states=img).last_hidden_state
    assert torch.allclose(oa, ob, atol=1e-5)


def test_cross_attention_requires_image_and_text_mode_does_not():
    m = make()
    ids, att, img = inputs()
    m(input_ids=ids, attention_mask=att, mode="text")
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        m(input_ids=ids, attention_mask=att)
    with pytest.raises(ValueError, match="mode"):
        m(input_ids=ids, attention_mask=att, mode="fuse")


def test_only_layers_from_fusion_layer_have_cross_attention():
    m = make()
    assert [hasattr(layer, "crossattention") for layer in m.encoder.layer] == [False, False, True, True]
    assert m.encoder.layer[2].crossattention.self.key.in_features == 32


def test_list_of_images_alternates_and_same_image_twice_equals_one():
    m = make(num_hidden_layers=6)   # fusion layers 2..5: images 0,1,0,1
    ids, att, img = inputs()
    one = m(input_ids=ids, attention_mask=att, encoder_hidden_states=img).last_hidden_state
    two = m(input_ids=ids, attention_mask=att, encoder_hidden_states=[img, img],
            encoder_attention_mask=[torch.ones(img.shape[:2])] * 2).last_hidden_state
    assert torch.allclose(one, two, atol=1e-6)
    other = torch.randn_like(img)
    swapped = m(input_ids=ids, attention_mask=att, encoder_hidden_states=[other, img]).last_hidden_state
    assert not torch.allclose(swapped, one, atol=1e-3)


def test_mlm_head_is_tied_and_keys_are_hf_names():
    m = make(BertForMaskedLM)
    assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight
    assert m.cls.predictions.decoder.bias is m.cls.predictions.bias
    keys = set(m.state_dict())
    assert {"cls.predictions.bias", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
            "cls.predictions.transform.dense.weight", "cls.predictions.transform.LayerNorm.weight",
            "bert.embeddings.position_ids"} <= keys
    assert not any("pooler" in k for k in keys)


def test_mlm_loss_with_soft_labels_is_the_alpha_mix():
    m = make(BertForMaskedLM)
    ids, att, img = inputs()
    labels = torch.full_like(ids, -100)
    labels[1, 2], labels[2, 3], labels[0, 1] = 7, 9, 11
    soft = torch.softmax(torch.randn(*ids.shape, 120), -1)
    out = m(ids, attention_mask=att, encoder_hidden_states=img, labels=labels, soft_labels=soft, alpha=0.3)
    logits = m(ids, attention_mask=att, encoder_hidden_states=img, return_logits=True)   # every position
    sel = labels != -100
    assert torch.allclose(out.logits, logits[sel], atol=1e-6)   # the head ran at the masked rows only
    ce = F.cross_entropy(logits[sel], labels[sel])
    distill = -(soft[sel] * F.log_softmax(logits[sel], -1)).sum(-1).mean()
    assert torch.allclose(out.loss, 0.7 * ce + 0.3 * distill, atol=1e-5)
    bug = m(ids, attention_mask=att, encoder_hidden_states=img, labels=labels, soft_labels=soft, alpha=0.3,
            distill_dim=1)
    assert not torch.allclose(bug.loss, out.loss)
    # ALBEF's released-checkpoint code (spec 1.9): log_softmax over the sequence axis (dim 1), summed over the
    # vocabulary, averaged over the masked tokens
    full = logits.float()
    seq_axis = -(F.log_softmax(full, dim=1) * soft).sum(-1)[sel].mean()
    assert torch.allclose(bug.loss, 0.7 * ce + 0.3 * seq_axis, atol=1e-5)
    none = m(ids, attention_mask=att, encoder_hidden_states=img, labels=torch.full_like(ids, -100))
    assert none.loss.item() == 0.0   # nothing masked: zero, not NaN


def test_decoder_loss_is_per_sequence_sum_and_cache_matches_full_pass():
    m = make(BertLMHeadModel, fusion_layer=0, num_hidden_layers=2)
    ids, att, states = inputs()
    att = torch.ones_like(att)
    labels = ids.clone()
    labels[0, 4:] = -100
    out = m(ids, attention_mask=att, encoder_hidden_states=states, labels=labels, reduction="none")
    tok = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                          reduction="none").view(3, -1)
    assert torch.allclose(out.loss, tok.sum(1), atol=1e-5)
    full = m(ids, attention_mask=att, encoder_hidden_states=states).logits
    step1 = m(ids[:, :3], attention_mask=att[:, :3], encoder_hidden_states=states, use_cache=True)
    step2 = m(ids[:, 3:], attention_mask=att, encoder_hidden_states=states, past_key_values=step1.past_key_values)
    assert torch.allclose(torch.cat([step1.logits, step2.logits], 1), full, atol=1e-5)
    changed = ids.clone()
    changed[:, -1] = 3   # causal: the future does not change the past
    assert torch.allclose(m(changed, attention_mask=att, encoder_hidden_states=states).logits[:, :-1], full[:, :-1],
                          atol=1e-6)


def test_save_attention_keeps_cross_attention_probabilities_and_gradients():
    m = make()
    layer = m.encoder.layer[3].crossattention.self
    layer.save_attention = True
    ids, att, img = inputs()
    out = m(input_ids=ids, attention_mask=att, encoder_hidden_states=img).last_hidden_state
    out[:, 0].sum().backward()
    amap = layer.get_attention_map()
    assert amap.shape == (3, 2, 6, 5) and torch.allclose(amap.sum(-1), torch.ones(3, 2, 6))
    assert layer.get_attn_gradients().shape == amap.shape
