"""The exact compute savings (shared image K/V across a step's fusion passes, MLM heads at the masked positions)
give the plain path's losses and gradients in every objective combination."""
import copy

import pytest
import torch

from conftest import tiny_config, tiny_text


def config(**kw):
    cfg = tiny_config(**kw)
    cfg["bert_config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return cfg


GRIT = dict(use_momentum=False, distill=False, itc_consistency_weight=0.2, itm_negative_selection="argmax")
CASES = {
    "albef": ("pretrain", config()),
    "albef_released_axis": ("pretrain", config(mlm_distill_seq_axis_bug=True)),
    "grit": ("pretrain", config(**GRIT)),
    "mafa": ("pretrain", config(**{**GRIT, "itc_consistency_weight": 0.0}, itc_label_smoothing=0.5,
                                smoothing_start_epoch=0)),
    "vicha": ("pretrain", config(vision_depth=4, return_hidden_state=True, num_hidden_align=1, ita_hidden_weight=0.1,
                                 kw_img_model=True, num_hidden_layers_kw=2, mae=True, mim_decoder_heads=4)),
    "retrieval": ("retrieval", config()),
    "retrieval_grit": ("retrieval", config(use_momentum=False, distill=False)),
}


def run(model, kind, concepts, seed=0):
    torch.manual_seed(seed)
    image = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text = tiny_text(4)
    kw = {"concepts": concepts} if concepts is not None else {}
    if kind == "retrieval":
        kw["idx"] = torch.tensor([0, 1, 1, 2])
    out = model(image, text, alpha=0.4, **kw)
    losses = {k: v for k, v in out.items() if k.startswith("loss")}
    sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}, {n: p.grad for n, p in model.named_parameters()
                                                         if p.grad is not None}


@pytest.mark.parametrize("case", sorted(CASES))
def test_savings_give_the_plain_paths_losses_and_gradients(case):
    from models import MODELS
    kind, cfg = CASES[case]
    torch.manual_seed(0)
    base = MODELS[kind](cfg)
    if case == "mafa":   # all candidates connected: MAFA's MLM batch grows by every pair
        from models.ecm import ConnectionDiscriminator
        filt = MODELS["retrieval"](config(use_momentum=False, distill=False))
        base.set_discriminator(ConnectionDiscriminator(filt, 0.0, 0.0))
    concepts = None
    if cfg.get("kw_img_model"):
        kw = tiny_text(4, n=5, seed=3)
        concepts = (kw["input_ids"], kw["attention_mask"])
    fast, plain = copy.deepcopy(base), copy.deepcopy(base)
    plain.exact_savings = False
    if case == "mafa":
        fast.set_discriminator(base._discriminator[0])
        plain.set_discriminator(base._discriminator[0])
    lf, gf = run(fast, kind, concepts)
    lp, gp = run(plain, kind, concepts)
    assert lf.keys() == lp.keys() and "loss_itm" in lf
    for k in lf:
        assert torch.allclose(lf[k], lp[k], atol=1e-6, rtol=1e-5), (k, lf[k], lp[k])
    assert gf.keys() == gp.keys()
    for n in gf:
        assert torch.allclose(gf[n], gp[n], atol=1e-6, rtol=1e-4), n


def test_shared_kv_projects_each_layer_once_per_step():
    """The ITM negatives and the MLM pass reuse the positives' keys and values: one key projection of the
    image tokens per fusion layer and step, against three passes without the saving."""
    from models import MODELS
    counts = {}
    for saving in (True, False):
        torch.manual_seed(0)
        m = MODELS["pretrain"](config())
        m.exact_savings = saving
        calls = []
        m.text_encoder.bert.encoder.layer[3].crossattention.self.key.register_forward_hook(
            lambda mod, args, out, calls=calls: calls.append(args[0].shape[0]))
        run(m, "pretrain", None)
        counts[saving] = calls
    assert counts[True] == [4] and counts[False] == [4, 8, 4]   # positives, negatives (2B rows), MLM
