"""Grounding: Grad-CAM in both modes against a per-expression hand computation, box scoring and IoU, the
refs loader (no pickled code), empty splits, and Grounding.py end to end under 1 and 2 gloo ranks."""
import json
import os
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config, tiny_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(seed=0):
    from models import MODELS
    torch.manual_seed(seed)
    return MODELS["retrieval"](tiny_config(distill=False, use_momentum=False)).eval()


def test_itm_gradcam_equals_a_hand_computation_per_expression():
    from tasks.grounding import gradcam_itm
    m = tiny_model()
    grid, layer = 4, 3   # 32 px / patch 8; the tiny BERT's second cross-attention layer
    image = torch.randn(3, 3, 32, 32)
    t = tiny_text(3)   # row 0 padded after 5 tokens
    cams = gradcam_itm(m, image, t["input_ids"], t["attention_mask"], layer, grid)
    attn = m.text_encoder.encoder.layer[layer].crossattention.self
    assert attn.attention_map is None and not attn.save_attention   # nothing left switched on
    for b in range(3):
        # ALBEF's way: save_attention on, backward of the ITM positive logit, the hook keeps the gradient
        attn.save_attention = True
        m.zero_grad()
        img = m.visual_encoder(image[b:b + 1])
        ids, mask = t["input_ids"][b:b + 1], t["attention_mask"][b:b + 1]
        out = m.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=img,
                             encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long))
        m.itm_head(out.last_hidden_state[:, 0])[:, 1].sum().backward()
        probs, grads = attn.get_attention_map()[0].detach(), attn.get_attn_gradients()[0]
        attn.save_attention = False
        heads, length = probs.shape[:2]
        expect = torch.zeros(grid, grid)
        for h in range(heads):
            for pos in range(length):   # padded positions count in the mean, as zeros
                if mask[0, pos]:
                    expect += (probs[h, pos, 1:] * grads[h, pos, 1:].clamp(min=0)).view(grid, grid)
        expect /= heads * length
        assert torch.allclose(cams[b], expect, atol=1e-7, rtol=1e-4), b


def test_itc_gradcam_equals_a_hand_computation_per_expression():
    from tasks.grounding import gradcam_itc
    m = tiny_model()
    image, t = torch.randn(2, 3, 32, 32), tiny_text(2)
    cams = gradcam_itc(m, image, t["input_ids"], t["attention_mask"], 1, 4)
    blk = m.visual_encoder.blocks[1].attn
    for b in range(2):
        m.zero_grad()
        emb = m.visual_encoder(image[b:b + 1], register_blk=1)
        img_feat = F.normalize(m.vision_proj(emb[:, 0]), dim=-1)
        _, txt_feat = m.encode_text(t["input_ids"][b:b + 1], t["attention_mask"][b:b + 1])
        (img_feat @ txt_feat.t() / m.temp).diag().sum().backward()
        probs, grads = blk.attention_map[0, :, 0, 1:].detach(), blk.attn_gradients[0, :, 0, 1:]
        expect = (probs * grads.clamp(min=0)).mean(0).view(4, 4)
        assert torch.allclose(cams[b], expect, atol=1e-7, rtol=1e-4), b


def test_box_scores_iou_and_ties_on_hand_made_boxes():
    from tasks.grounding import box_scores, iou_inclusive, pick_box
    # inclusive pixels: [0,0,10,10] covers 0..9; [5,5,10,10] covers 5..14: 5x5 overlap of 100+100-25
    assert iou_inclusive([0, 0, 10, 10], [5, 5, 10, 10]) == pytest.approx(25 / 175)
    assert iou_inclusive([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou_inclusive([0, 0, 10, 10], [9, 0, 10, 10]) == 0   # x1 == x2: ALBEF counts no overlap
    assert iou_inclusive([0, 0, 10, 10], [8, 0, 10, 10]) == pytest.approx(20 / 180)
    heat = torch.zeros(8, 8, dtype=torch.float64)
    heat[2:4, 2:4] = 1.0
    dets = [[2, 2, 2, 2], [0, 0, 8, 8], [2.9, 2.7, 1.2, 1.4], [-3, -3, 6, 6], [6, 6, 0, 0]]
    s = box_scores(heat, dets)
    # rows int(y):int(y+h), columns int(x):int(x+w); negative corners clipped to 0 (ALBEF's slice wrapped)
    # [2.9, 2.7, 1.2, 1.4] covers rows 2:4 and columns 2:4 (int truncation), all four hot pixels
    assert s.tolist() == pytest.approx([4 / 2, 4 / 8, 4 / (1.2 * 1.4) ** 0.5, 1 / 6, 0.0])
    assert s.dtype == torch.float64
    cam = torch.zeros(2, 2)
    box, up = pick_box(cam, [[0, 0, 2, 2], [2, 2, 2, 2]], 4, 4)   # all scores 0: the first, not a stale box
    assert box == [0, 0, 2, 2] and up.shape == (4, 4)
    assert pick_box(cam, [], 4, 4)[0] is None


def test_refs_loader_reads_plain_pickles_and_refuses_code(tmp_path):
    from dataset.caption_dataset import AnnotationError
    from dataset.grounding_dataset import load_plain_pickle, main, refs_from_refer
    root = tmp_path / "refcoco+"
    os.makedirs(root)
    refs = [{"ref_id": 3, "ann_id": 30, "image_id": 7, "split": "testA", "sentences": [{"sent": "the dog"}]}]
    with open(root / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    json.dump({"images": [{"id": 7, "width": 64, "height": 48}], "annotations": [{"id": 30, "bbox": [1, 2, 3, 4]}]},
              open(root / "instances.json", "w"))
    assert refs_from_refer(str(tmp_path)) == {3: {"image_id": 7, "split": "testA", "box": [1, 2, 3, 4], "height": 48,
                                                  "width": 64}}
    main(["--refcoco_data", str(tmp_path), "--out", str(tmp_path / "refs.json")])
    assert json.load(open(tmp_path / "refs.json"))["3"]["box"] == [1, 2, 3, 4]

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    with open(tmp_path / "evil.p", "wb") as f:
        pickle.dump([{"ref_id": 1, "x": Evil()}], f)
    with pytest.raises(AnnotationError, match="refusing to load"):
        load_plain_pickle(str(tmp_path / "evil.p"))
    assert not os.path.exists(tmp_path / "pwned")


def grounding_config(world, path, **extra):
    from test_engine import write_config
    cfg = json.load(open(write_config(world, path)))
    for k in ("train_file", "ckpt_every_steps", "mlm_probability"):
        cfg.pop(k)
    train = json.load(open(os.path.join(world, "refcoco+_train.json")))[:48]
    val = json.load(open(os.path.join(world, "refcoco+_val.json")))[:13]
    test = json.load(open(os.path.join(world, "refcoco+_test.json")))[:16]   # 29 in all: odd
    cfg.update(train_file=write(path + ".train.json", train), test_file=[write(path + ".val.json", val),
                                                                          write(path + ".test.json", test)],
               refcoco_data=world, det_file=os.path.join(world, "refcoco+", "dets.json"), batch_size=8,
               batch_size_test=5, grounding_pictures=3, **extra)
    cfg["schedular"]["epochs"] = 2
    return write(path, cfg)


def write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def test_an_empty_split_is_reported_not_divided_by(tiny_world, tmp_path, capsys):
    from dataset import create_dataset
    from dataset.grounding_dataset import load_dets, load_refs
    from engine.config import load_config, validate
    from tasks.grounding import evaluate
    from models.tokenization import ALBEFTokenizer
    cfg = validate(load_config(grounding_config(tiny_world, str(tmp_path / "g.yaml"))), task="grounding")
    cfg["test_file"] = cfg["test_file"][:1]   # val only: testA and testB are empty
    m = tiny_model()
    dets = load_dets(cfg)
    refs = load_refs(cfg)
    first = json.load(open(cfg["test_file"][0]))[0]
    dets[str(refs[first["ref_id"]]["image_id"])] = []   # an image without proposals
    metrics = evaluate(m, create_dataset("grounding_test", cfg), ALBEFTokenizer(cfg["tokenizer"]), refs, dets, cfg,
                       torch.device("cpu"), "itm", 3, str(tmp_path / "r"), "t")
    assert set(metrics) == {"val_d", "n_val_d", "no_proposals_val"} and metrics["n_val_d"] == 13
    assert metrics["no_proposals_val"] >= 1
    out = capsys.readouterr().out
    assert "no expressions of split 'testA'" in out and "have no proposals" in out


@pytest.mark.slow
def test_grounding_py_trains_selects_and_evaluates_the_same_under_two_ranks(tiny_world, tmp_path):
    from test_engine import load, pretrain_checkpoint, run
    ckpt = pretrain_checkpoint(tiny_world, tmp_path)
    config = grounding_config(tiny_world, str(tmp_path / "g.yaml"))
    out = str(tmp_path / "g")
    launcher = os.path.join(ROOT, "Grounding.py")
    run([sys.executable, launcher, "--config", config, "--checkpoint", ckpt, "--output_dir", out, "--device", "cpu",
         "--block_num", "1"])
    rows = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    # validation after each epoch (never labelled test), then testA / testB once with the selected weights
    assert [(r["split"], r.get("epoch")) for r in rows[:2]] == [("val", 0), ("val", 1)]
    assert all(r["n_val_d"] == 13 and "testA_d" not in r for r in rows[:2])
    test = rows[2]
    assert test["split"] == "test" and test.get("n_testA_d", 0) + test.get("n_testB_d", 0) == 16 and "val_d" not in test
    log = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    best = max(rows[:2], key=lambda r: r["val_d"])["epoch"]
    assert log[-1]["best_epoch"] == best and test["checkpoint"] == "checkpoint_best.pth (selected on val_d)"
    assert load(os.path.join(out, "checkpoint_best.pth"))["best"]["metric"] == "val_d"
    table = open(os.path.join(out, "results.md")).read().splitlines()
    assert table[-1].startswith(f"| test | {best} | checkpoint_best.pth (selected on val_d) |")
    assert [t.split("|")[1].strip() for t in table[2:]] == ["val", "val", "test"]   # validation never "test"
    assert len(json.load(open(os.path.join(out, "result", "grounding_val_epoch1.json")))) == 13
    res = json.load(open(os.path.join(out, "result", "grounding_test_best.json")))
    assert len(res) == 16 and len({r["ref_id"] for r in res}) == 16
    pngs = os.listdir(os.path.join(out, "result", "pictures_test_best"))
    assert len(pngs) == 3 and all(p.endswith(".png") for p in pngs)
    from PIL import Image
    assert Image.open(os.path.join(out, "result", "pictures_test_best", pngs[0])).size[0] > 100
    chosen = os.path.join(out, "checkpoint_best.pth")
    for n, port in ((1, None), (2, "29749")):
        cmd = [launcher, "--config", config, "--checkpoint", chosen, "--output_dir", out, "--device", "cpu",
               "--block_num", "1", "--evaluate"]
        run([sys.executable, *cmd] if n == 1 else
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, *cmd])
        val, again = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))][-2:]
        for k in ("testA_d", "testB_d", "n_testA_d", "n_testB_d"):
            assert again.get(k) == test.get(k), (n, k)
        assert val["val_d"] == rows[best]["val_d"] and val["n_val_d"] == 13
    assert not [f for f in os.listdir(os.path.join(out, "result")) if "_rank" in f]


@pytest.mark.parametrize("mode", ["itm", "itc"])
def test_vicha_concepts_join_the_image_tokens_and_leave_the_map_its_patches(mode):
    """ViCHA's Grounding.yaml has kw_img_model: the concept tokens are attended but not part of the map."""
    from tasks.grounding import gradcam
    from models import MODELS
    torch.manual_seed(0)
    m = MODELS["retrieval"](tiny_config(distill=False, use_momentum=False, kw_img_model=True,
                                        num_hidden_layers_kw=2)).eval()
    t = tiny_text(2)
    kw = tiny_text(2, n=4, seed=3, pad_first=False)
    cams = gradcam(m, torch.randn(2, 3, 32, 32), t["input_ids"], t["attention_mask"], mode, 3 if mode == "itm" else 1,
                   4, concepts=(kw["input_ids"], kw["attention_mask"]))
    assert cams.shape == (2, 4, 4) and torch.isfinite(cams).all() and (cams >= 0).all() and cams.sum() > 0
