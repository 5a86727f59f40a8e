"""MAFA: ECM's decisions, the FN-aware ITM / MLM / S-ITC inputs, and the filter-checkpoint errors."""
import json

import pytest
import torch

from models.batch import as_batch
from conftest import tiny_config, tiny_text
from models import MODELS
from tasks.ecm_filter import build_discriminator
from models.objectives.ecm import (AMBIGUOUS, CONNECTION, NEGATIVE, ConnectionDiscriminator, decide,
                        hardest_two, itm_negatives, s_itc_targets)


def test_decide_assigns_scores_on_a_threshold_deliberately():
    scores = torch.tensor([0.49, 0.5, 0.79, 0.8, 0.81, 0.0, 1.0])
    assert decide(scores, 0.5, 0.8).tolist() == [NEGATIVE, AMBIGUOUS, AMBIGUOUS, CONNECTION, CONNECTION,
                                                NEGATIVE, CONNECTION]


def test_hardest_two_skip_positives():
    sim = torch.tensor([[9.0, 3.0, 5.0, 1.0], [2.0, 9.0, 2.5, 7.0], [4.0, 4.5, 9.0, 0.0], [1.0, 0.0, 8.0, 9.0]])
    first, second, has = hardest_two(sim, torch.eye(4, dtype=torch.bool))
    assert first.tolist() == [2, 3, 1, 2] and second.tolist() == [1, 2, 0, 0] and has.all()
    first, second, has = hardest_two(sim[:2, :2], torch.eye(2, dtype=torch.bool))
    assert first.tolist() == [1, 0] and second.tolist() == [1, 0] and not has.any()


def test_itm_partners_and_labels_follow_the_decision():
    first, second = torch.tensor([2, 3, 1]), torch.tensor([1, 2, 0])
    partner, label = itm_negatives(first, second, torch.tensor([CONNECTION, NEGATIVE, AMBIGUOUS]))
    assert partner.tolist() == [2, 3, 0] and label.tolist() == [1, 0, 0]


def test_s_itc_targets_connections_and_smoothing():
    conn_i2t = torch.tensor([True, False, False, False])
    conn_t2i = torch.tensor([False, False, False, True])
    n, m = torch.tensor([2, 0, 0, 0]), torch.tensor([1, 0, 0, 1])
    y_i2t, y_t2i = s_itc_targets(4, conn_i2t, n, conn_t2i, m, smoothing=0.0)
    assert y_i2t[0].tolist() == [0.5, 0.0, 0.5, 0.0] and y_i2t[1].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert y_t2i[3].tolist() == [0.0, 0.5, 0.0, 0.5]
    assert y_i2t[2].tolist() == [0.0, 0.0, 1.0, 0.0]   # not symmetrised: text 2's row is untouched
    y_i2t, y_t2i = s_itc_targets(4, conn_i2t, n, conn_t2i, m, smoothing=0.5)
    assert torch.allclose(y_i2t[0], torch.tensor([0.375, 0.125, 0.375, 0.125]))
    assert torch.allclose(y_i2t[1], torch.tensor([0.125, 0.625, 0.125, 0.125]))
    assert torch.allclose(y_i2t.sum(1), torch.ones(4)) and torch.allclose(y_t2i.sum(1), torch.ones(4))
    # MAFA's figure for B = 128: 0.25 + 0.5 / 128 on each of a connected row's two positives
    y, _ = s_itc_targets(128, torch.arange(128) == 0, torch.ones(128, dtype=torch.long), torch.zeros(128, dtype=torch.bool),
                         torch.zeros(128, dtype=torch.long), smoothing=0.5)
    assert y[0, 0].item() == pytest.approx(0.25390625) and y[0, 1].item() == pytest.approx(0.25390625)


class FixedFilter(ConnectionDiscriminator):
    """Returns preset match probabilities for the t2i and i2t hardest pairs."""

    def __init__(self, model, p_t2i, p_i2t):
        super().__init__(model)
        self.p = torch.cat([p_t2i, p_i2t])

    def match_prob(self, image, input_ids, attention_mask, text_idx, image_idx):
        self.asked = (text_idx.clone(), image_idx.clone())
        return self.p


def test_mafa_forward_builds_itm_mlm_and_itc_inputs_from_ecm(monkeypatch):
    from models.objectives import itm as itm_module, mlm as mlm_module
    torch.manual_seed(0)
    cfg = tiny_config(use_momentum=False, distill=False, itc_label_smoothing=0.5, smoothing_start_epoch=1)
    model = MODELS["pretrain"](cfg).eval()   # no dropout: the features can be recomputed below
    filt = FixedFilter(MODELS["retrieval"](tiny_config(use_momentum=False, distill=False)),
                       p_t2i=torch.tensor([0.9, 0.1, 0.6, 0.8]), p_i2t=torch.tensor([0.2, 0.85, 0.5, 0.49]))
    model.set_discriminator(filt)
    seen = {}
    itm_pairs, mlm = itm_module.itm_pairs, mlm_module.mlm

    def spy_itm(m, *a):
        seen["itm"] = a
        return itm_pairs(m, *a)

    def spy_mlm(m, ids, att, img, *rest):
        seen["mlm"] = (ids, img)
        return mlm(m, ids, att, img, *rest)

    monkeypatch.setattr(itm_module, "itm_pairs", spy_itm)
    monkeypatch.setattr(mlm_module, "mlm", spy_mlm)
    image, text = torch.randn(4, 3, 32, 32), tiny_text(4, pad_first=False)
    model.set_epoch(1)
    out = model(as_batch(image, text))
    with torch.no_grad():   # the hardest negatives the model saw
        _, img_f = model.encode_image(image)
        _, txt_f = model.encode_text(text["input_ids"], text["attention_mask"])
        sim = img_f @ txt_f.t()
    eye = torch.eye(4, dtype=torch.bool)
    n1, n2, _ = hardest_two(sim, eye)        # image k -> texts
    m1, m2, _ = hardest_two(sim.t(), eye)    # text k -> images
    rows = torch.arange(4)
    assert torch.equal(filt.asked[0], torch.cat([rows, n1])) and torch.equal(filt.asked[1], torch.cat([m1, rows]))
    # t2i: [conn, neg, ambiguous, conn]; i2t: [neg, conn, ambiguous, neg]
    _, _, _, neg_img, neg_txt, labels, weights = seen["itm"][:7]
    assert neg_img.tolist() == [m1[0], m1[1], m2[2], m1[3]]
    assert neg_txt.tolist() == [n1[0], n1[1], n2[2], n1[3]]
    assert labels.tolist() == [1, 0, 0, 1, 0, 1, 0, 0] and weights.sum() == 8
    # MLM: the 4 pairs, then (text n1_1, image 1) for the i2t connection, (text 0, image m1_0), (text 3, image m1_3)
    ids, img = seen["mlm"]
    assert len(ids) == 7
    assert torch.equal(ids[4], text["input_ids"][n1[1]]) and torch.equal(ids[5], text["input_ids"][0])
    assert torch.equal(ids[6], text["input_ids"][3])
    assert out["count_ecm_connections"] == 3 and out["count_ecm_negatives"] == 3 and out["count_ecm_ambiguous"] == 2
    assert all(torch.isfinite(v) for k, v in out.items() if k.startswith("loss"))


def test_mafa_needs_in_batch_itc():
    model = MODELS["pretrain"](tiny_config())
    with pytest.raises(ValueError, match="use_momentum"):
        model.set_discriminator(None)


def write_filter_config(tmp_path, **over):
    cfg = tiny_config(use_momentum=False, distill=False, **over)
    path = tmp_path / "filter.yaml"
    path.write_text(json.dumps(cfg))
    return str(path), cfg


def test_filter_checkpoint_errors_name_the_file_and_the_keys(tmp_path):
    cfg_path, cfg = write_filter_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="ecm.filter_config"):
        build_discriminator({"filter_config": str(tmp_path / "nope.yaml"), "filter_checkpoint": "x"}, None, "cpu")
    with pytest.raises(FileNotFoundError, match="ecm.filter_checkpoint"):
        build_discriminator({"filter_config": cfg_path, "filter_checkpoint": str(tmp_path / "none.pth")}, None, "cpu")
    good = MODELS["retrieval"](cfg).state_dict()
    partial = {k: v for k, v in good.items() if not k.startswith("itm_head.")}
    torch.save({"model": partial}, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match=r"partial.pth.*lacks 2 weights.*itm_head.bias, itm_head.weight"):
        build_discriminator({"filter_config": cfg_path, "filter_checkpoint": str(tmp_path / "partial.pth")}, None, "cpu")
    _, wide = write_filter_config(tmp_path / "..", embed_dim=24)
    torch.save({"model": MODELS["retrieval"](wide).state_dict()}, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="shape mismatch.*ecm.filter_checkpoint"):
        build_discriminator({"filter_config": cfg_path, "filter_checkpoint": str(tmp_path / "wide.pth")}, None, "cpu")
    torch.save({"model": good}, tmp_path / "good.pth")
    disc = build_discriminator({"filter_config": cfg_path, "filter_checkpoint": str(tmp_path / "good.pth"),
                                "high_threshold": 0.9}, None, "cpu")
    assert disc.high == 0.9 and not disc.model.training
    assert not any(p.requires_grad for p in disc.model.parameters())


def test_bf16_filter_scores_like_fp32_and_precision_is_checked(tmp_path):
    # bf16 ("auto" on CUDA), forced here, runs the same bf16 path on the CPU
    cfg_path, cfg = write_filter_config(tmp_path)
    torch.manual_seed(0)
    torch.save({"model": MODELS["retrieval"](cfg).state_dict()}, tmp_path / "f.pth")
    ecm = {"filter_config": cfg_path, "filter_checkpoint": str(tmp_path / "f.pth")}
    fp32 = build_discriminator(ecm, None, "cpu")
    assert fp32.dtype == torch.float32   # the default
    bf16 = build_discriminator({**ecm, "filter_precision": "bf16"}, None, "cpu")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    image = torch.randn(4, 3, cfg["image_res"], cfg["image_res"])
    ids = torch.randint(5, 100, (4, 7))
    att = torch.ones(4, 7, dtype=torch.long)
    att[1, 5:] = 0
    pairs = (torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 0, 3, 2, 0]))
    p32, p16 = fp32.match_prob(image, ids, att, *pairs), bf16.match_prob(image, ids, att, *pairs)
    # bf16 keeps 8 significant bits (steps of 2**-9 near 0.5): measured gaps are 1.6e-3 to 2.9e-3
    assert p16.dtype == torch.float32 and torch.allclose(p16, p32, atol=0.01)
    with pytest.raises(ValueError, match="ecm.filter_precision"):
        build_discriminator({**ecm, "filter_precision": "fp16"}, None, "cpu")
