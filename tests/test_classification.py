"""NLVR2 and SNLI-VE: text assignment, the shared dataset / collate / loss / evaluation, key surgery, momentum
copies after loading, and Pretrain_nlvr.py, NLVR.py, VE.py end to end on the tiny demo world."""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from models.batch import as_batch
from conftest import tiny_config, tiny_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


# ---------------------------------------------------------------------------------------------- text assignment
def test_text_assignment_draws_partners_by_similarity_with_the_three_labels():
    from models.model_pretrain_nlvr import ALBEF
    # images 0/1 are near-duplicates, 2/3 too, 4 stands alone: every partner is the near-duplicate
    base = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=1)
    feats = F.normalize(torch.stack([base[0], base[0] + 0.01, base[1], base[1] + 0.01, base[2]]), dim=1)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(200):
        img0, img1, labels = ALBEF.assign(feats, generator=g)
        own = torch.arange(5)
        partner = torch.tensor([1, 0, 3, 2, -1])
        one = labels < 2
        assert (img0[labels == 0] == own[labels == 0]).all() and (img1[labels == 1] == own[labels == 1]).all()
        other = torch.where(labels == 0, img1, img0)
        assert (other[one][:4] != own[one][:4]).all()
        assert ((other == partner) | ~one | (own == 4))[:4].all()   # the near-duplicate, whatever the order
        two = labels == 2
        assert ((img0[two] != own[two]) & (img1[two] != own[two]) & (img0[two] != img1[two])).all()
        counts += torch.bincount(labels, minlength=3)
    share = counts / counts.sum()
    assert abs(share[2] - 1 / 3) < 0.05 and abs(share[0] - share[1]) < 0.06   # ALBEF's 1/3 neither, 0/1 even
    # two images: no second partner, so no label 2; one image: no partner, no label, no crash, zero loss
    img0, img1, labels = ALBEF.assign(feats[:2], generator=g)
    assert set(labels.tolist()) <= {0, 1} and (img0 != img1).all()
    img0, img1, labels = ALBEF.assign(feats[:1], generator=g)
    assert labels.tolist() == [-100]
    m = ALBEF(tiny_config())
    q = tiny_text(1)
    out = m(as_batch(torch.randn(1, 3, 32, 32), q))
    assert out["loss_ta"].item() == 0.0 and out["loss_ta"].requires_grad


def test_text_assignment_partners_never_the_own_image_even_when_the_softmax_underflows():
    from models.model_pretrain_nlvr import ALBEF
    feats = torch.eye(8)   # others at cosine 0 -> weight exp(-14.3) of the own: zeroed, not 1e-12
    for seed in range(20):
        img0, img1, labels = ALBEF.assign(feats, generator=torch.Generator().manual_seed(seed))
        own = torch.arange(8)
        assert ((labels != 0) | (img1 != own)).all() and ((labels != 1) | (img0 != own)).all()
        assert ((labels != 2) | ((img0 != own) & (img1 != own) & (img0 != img1))).all()


def test_text_assignment_freezes_what_the_loss_never_reaches():
    """No parameter without a gradient is left trainable: DDP needs no find_unused_parameters."""
    from models.model_pretrain_nlvr import ALBEF
    torch.manual_seed(0)
    m = ALBEF(tiny_config())
    m(as_batch(torch.randn(6, 3, 32, 32), tiny_text(6)))["loss_ta"].backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    no_grad = {n for n, p in m.named_parameters() if p.requires_grad and p.grad is None}
    assert not no_grad, no_grad
    assert "vision_proj.weight" not in trainable and "temp" not in trainable and "ta_head.weight" in trainable


@pytest.mark.parametrize("task", ["nlvr", "ve"])
def test_every_trainable_parameter_of_the_finetuning_models_gets_a_gradient(task):
    """DDP without find_unused_parameters fails at the second step on any trainable parameter left out."""
    from models import MODELS
    torch.manual_seed(0)
    m = MODELS[task](tiny_config())
    n_img = 2 if task == "nlvr" else 1
    m(as_batch(torch.randn(3 * n_img, 3, 32, 32), tiny_text(3), targets=torch.tensor([0, 1, 1])), alpha=0.4)["loss_cls"].backward()
    assert not [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not [n for n, p in m.named_parameters() if n.split(".")[0].endswith("_m") and p.requires_grad]


# ---------------------------------------------------------------------------------------------- loss and model
def test_distilled_cross_entropy_against_a_hand_computation():
    from models.classifier import distilled_ce
    pred = torch.tensor([[2.0, 0.0], [0.5, 1.5]])
    pred_m = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([0, 1])
    ce = -(torch.log(torch.exp(torch.tensor(2.0)) / (torch.exp(torch.tensor(2.0)) + 1))
           + torch.log(torch.exp(torch.tensor(1.5)) / (torch.exp(torch.tensor(0.5)) + torch.exp(torch.tensor(1.5))))) / 2
    logp = torch.log_softmax(pred, 1)
    q = torch.softmax(pred_m, 1)
    soft = -(q[0, 0] * logp[0, 0] + q[0, 1] * logp[0, 1] + q[1, 0] * logp[1, 0] + q[1, 1] * logp[1, 1]) / 2
    assert distilled_ce(pred, y).item() == pytest.approx(ce.item(), abs=1e-6)
    assert distilled_ce(pred, y, pred_m, 0.4).item() == pytest.approx((0.6 * ce + 0.4 * soft).item(), abs=1e-6)


def ta_checkpoint(path, seed=0):
    """A text-assignment checkpoint as Pretrain_nlvr.py writes it: 18-layer layout, no momentum weights."""
    from models import MODELS
    torch.manual_seed(seed)
    ta = MODELS["pretrain_nlvr"](tiny_config())
    with torch.no_grad():
        for p in ta.parameters():
            p.add_(torch.randn_like(p) * 0.1)   # not the init a fresh model would have
    torch.save({"model": ta.state_dict()}, path)
    return ta.state_dict()


def test_nlvr_from_a_text_assignment_checkpoint_shares_kv_and_copies_momentum(tmp_path):
    from models import MODELS
    from models.base import bert_config_from
    from models.checkpoint import load_checkpoint, remap_nlvr_pretrain
    from models.model_nlvr import nlvr_num_layers
    cfg = tiny_config()
    sd = ta_checkpoint(str(tmp_path / "ta.pth"))
    torch.manual_seed(5)
    m = MODELS["nlvr"](cfg)
    bc = bert_config_from(cfg)
    report = load_checkpoint(m, str(tmp_path / "ta.pth"), verbose=False,
                             remap=lambda s: remap_nlvr_pretrain(s, bc.fusion_layer, nlvr_num_layers(bc)))
    assert set(report.momentum_copied) == {"visual_encoder", "text_encoder", "cls_head"}
    layers = m.text_encoder.encoder.layer
    f = bc.fusion_layer
    assert len(layers) == nlvr_num_layers(bc) == 6
    for i in range((len(layers) - f) // 2):
        a, b = layers[f + 2 * i].crossattention.self, layers[f + 2 * i + 1].crossattention.self
        assert a.key.weight is b.key.weight and a.value.bias is b.value.bias and a.query is not b.query
        assert torch.equal(a.key.weight, sd[f"text_encoder.encoder.layer.{f + 2 * i + 1}.crossattention.self.key.weight"])
    own = m.state_dict()
    for k, v in sd.items():
        if k in own:
            assert torch.equal(own[k], v), k
        if k.startswith(("visual_encoder.", "text_encoder.")):
            mk = k.replace("visual_encoder.", "visual_encoder_m.", 1).replace("text_encoder.", "text_encoder_m.", 1)
            assert torch.equal(own[mk], v), mk   # the teacher starts from the loaded student (ALBEF: before load)
    mom = m.text_encoder_m.encoder.layer
    assert mom[f].crossattention.self.key.weight is mom[f + 1].crossattention.self.key.weight


def test_nlvr_from_a_pretraining_checkpoint_duplicates_the_fusion_layers():
    from models import MODELS
    from models.base import bert_config_from
    from models.checkpoint import load_into, remap_nlvr_pretrain
    from models.model_nlvr import nlvr_num_layers
    cfg = tiny_config()
    torch.manual_seed(0)
    sd = MODELS["pretrain"](cfg).state_dict()
    bc = bert_config_from(cfg)
    m = MODELS["nlvr"](cfg)
    report = load_into(m, remap_nlvr_pretrain(sd, bc.fusion_layer, nlvr_num_layers(bc)), verbose=False)
    assert not [k for k in report.missing if k.startswith(("text_encoder", "visual_encoder"))]
    src = sd["text_encoder.bert.encoder.layer.3.crossattention.self.query.weight"]
    for j in (4, 5):
        assert torch.equal(m.state_dict()[f"text_encoder.encoder.layer.{j}.crossattention.self.query.weight"], src)
        assert torch.equal(m.state_dict()[f"text_encoder_m.encoder.layer.{j}.crossattention.self.query.weight"],
                           sd["text_encoder_m.bert.encoder.layer.3.crossattention.self.query.weight"])
    with pytest.raises(ValueError, match="has 3 layers"):
        remap_nlvr_pretrain({"text_encoder.encoder.layer.2.x": torch.zeros(1)}, 2, 6)


def test_ve_momentum_copies_equal_the_loaded_weights_when_the_checkpoint_has_none():
    from models import MODELS
    from models.checkpoint import load_into, strip_bert
    cfg = tiny_config()
    torch.manual_seed(0)
    sd = {k: v for k, v in MODELS["pretrain"](cfg).state_dict().items() if "_m." not in k}   # GRIT-style
    torch.manual_seed(1)
    m = MODELS["ve"](cfg)
    report = load_into(m, strip_bert(sd), verbose=False)
    assert "visual_encoder" in report.momentum_copied and "text_encoder" in report.momentum_copied
    own = m.state_dict()
    for k in ("visual_encoder.pos_embed", "text_encoder.encoder.layer.3.crossattention.self.key.weight"):
        assert torch.equal(own[k.replace("_encoder.", "_encoder_m.", 1)], own[k])


# ---------------------------------------------------------------------------------------------- data
def test_two_image_and_entailment_datasets_and_their_collate(tmp_path, tiny_world):
    from PIL import Image
    from dataset import transforms as T
    from dataset.caption_dataset import AnnotationError
    from dataset.cls_dataset import cls_dataset
    from dataset.collate import Collate
    from models.tokenization import ALBEFTokenizer
    Image.new("RGB", (20, 20), (220, 0, 0)).save(tmp_path / "red.jpg")
    Image.new("RGB", (20, 20), (0, 0, 220)).save(tmp_path / "blue.jpg")
    ann = [{"images": ["red.jpg", "blue.jpg"], "sentence": "The left one is RED.", "label": "True"},
           {"images": ["blue.jpg", "missing.jpg"], "sentence": "x", "label": "False"}]
    tf = T.test_transform(16)
    ds = cls_dataset(write(tmp_path / "n.json", ann), tf, str(tmp_path), "nlvr", train=False, image_res=16)
    (left, right), sentence, label, idx, bad = (ds[0][k] for k in ("image", "caption", "label", "idx", "bad"))
    assert sentence == "the left one is red" and label == 1 and bad == []
    assert left[0].mean() > left[2].mean() and right[2].mean() > right[0].mean()
    (_, blank), label, bad = (ds[1][k] for k in ("image", "label", "bad"))   # evaluation: answered once, the unreadable image blank and counted
    assert label == 0 and len(bad) == 1 and "missing.jpg" in bad[0] and blank.abs().sum() == 0
    train = cls_dataset(write(tmp_path / "n.json", ann), tf, str(tmp_path), "nlvr", train=True)
    (a, b), label, i, bad = (train[1][k] for k in ("image", "label", "idx", "bad"))   # training: the whole item replaced by a readable one
    assert i == 0 and label == 1 and len(bad) == 1 and a[0].mean() > a[2].mean()
    tok = ALBEFTokenizer(os.path.join(tiny_world, "vocab"))
    batch = Collate(tok)([ds[0], ds[1]])
    assert batch["image"].shape == (4, 3, 16, 16) and batch["label"].tolist() == [1, 0] and len(batch["bad"]) == 1
    assert torch.equal(batch["image"][0], ds[0]["image"][0]) and torch.equal(batch["image"][1], ds[1]["image"][0])
    assert torch.equal(batch["image"][2], ds[0]["image"][1])   # first images of the batch, then second images
    # SNLI-VE: <id>.jpg under image_root, ALBEF's label ids
    ve = [{"image": "red", "sentence": "a red square", "label": "entailment"},
          {"image": "blue.jpg", "sentence": "b", "label": "neutral"},
          {"image": "blue", "sentence": "c", "label": "contradiction"}]
    vd = cls_dataset(write(tmp_path / "v.json", ve), tf, str(tmp_path), "ve", train=False)
    assert [vd[i]["label"] for i in range(3)] == [2, 1, 0] and vd.image_paths(0) == [str(tmp_path / "red.jpg")]
    assert vd.image_paths(1) == [str(tmp_path / "blue.jpg")] and len(vd[0]["image"]) == 1
    assert Collate(tok)([vd[0], vd[1]])["image"].shape == (2, 3, 16, 16)
    with pytest.raises(AnnotationError, match=r"entry 0: field 'label' must be one of"):
        cls_dataset(write(tmp_path / "b.json", [{**ve[0], "label": "yes"}]), tf, str(tmp_path), "ve")
    with pytest.raises(AnnotationError, match=r"entry 0: field 'images' must hold 2 paths"):
        cls_dataset(write(tmp_path / "b.json", [{**ann[0], "images": ["red.jpg"]}]), tf, str(tmp_path), "nlvr")
    with pytest.raises(AnnotationError, match=r"missing field 'sentence'"):
        cls_dataset(write(tmp_path / "b.json", [{"image": "red", "label": "neutral"}]), tf, str(tmp_path), "ve")
    # ViCHA: one concept string per image, in the images' order
    kw = [{**ann[0], "kwords1": ["red", "square"], "kwords2": ["blue"]}]
    opts = {"p": None, "replacement": False, "sep_token": False}
    kd = cls_dataset(write(tmp_path / "k.json", kw), tf, str(tmp_path), "nlvr", train=False, concepts=opts)
    assert kd[0]["concepts"] == ["red square", "blue"]
    kb = Collate(tok)([kd[0], kd[0]])
    assert kb["kw_input_ids"].shape[0] == 4
    with pytest.raises(AnnotationError, match="'kwords2'"):
        cls_dataset(write(tmp_path / "k2.json", [{**ann[0], "kwords1": ["a"]}]), tf, str(tmp_path), "nlvr",
                    concepts=opts)


def test_demo_world_statements_and_hypotheses_are_balanced_and_true(tiny_world):
    from collections import Counter
    scenes = {os.path.basename(s["image"]): s["scene"] for s in json.load(open(os.path.join(tiny_world, "scenes.json")))}
    nlvr = json.load(open(os.path.join(tiny_world, "nlvr_train.json")))
    assert abs(Counter(x["label"] for x in nlvr)["True"] - len(nlvr) / 2) <= 1
    for x in nlvr:
        left, right = (scenes[os.path.basename(p)] for p in x["images"])
        words = x["sentence"].split()
        if x["kind"] in ("left", "right", "both"):
            c, s = words[3], words[4]
            has = [any((o["color"], o["shape"]) == (c, s) for o in sc["objects"]) for sc in (left, right)]
            truth = {"left": has[0], "right": has[1], "both": all(has)}[x["kind"]]
        else:
            n = {"left": len(left["objects"]), "right": len(right["objects"])}
            truth = n[words[6]] > n[words[11]]
        assert x["label"] == str(truth), x
    ve = json.load(open(os.path.join(tiny_world, "ve_train.json")))
    by = Counter((x["kind"], x["label"]) for x in ve)
    assert by[("there", "entailment")] == by[("there", "contradiction")]   # the hypothesis alone: no better
    assert by[("property", "neutral")] == by[("property", "contradiction")]   # than the majority class
    assert os.path.isfile(os.path.join(tiny_world, "images", ve[0]["image"] + ".jpg"))


# ---------------------------------------------------------------------------------------------- launchers
def task_config(world, path, task, **extra):
    from test_engine import write_config
    cfg = json.load(open(write_config(world, path)))
    for k in ("train_file", "batch_size", "queue_size", "mlm_probability", "ckpt_every_steps"):
        cfg.pop(k)
    names = {"nlvr": ("nlvr_train", "nlvr_val", "nlvr_test"), "ve": ("ve_train", "ve_val", "ve_test")}[task]
    train, dev, test = (json.load(open(os.path.join(world, n + ".json"))) for n in names)
    cfg.update(train_file=write(path + ".train.json", train[:64]), val_file=write(path + ".dev.json", dev[:21]),
               test_file=write(path + ".test.json", test[:23]),   # neither divisible by 2 ranks
               image_root=world if task == "nlvr" else os.path.join(world, "images"),
               batch_size_train=8, batch_size_test=5, **extra)
    cfg["schedular"]["epochs"] = 2
    return write(path, cfg)


def results(out):
    return [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]


@pytest.mark.slow
def test_pretrain_nlvr_trains_under_two_gloo_ranks(tiny_world, tmp_path):
    from test_engine import load, pretrain_checkpoint, run, write_config
    ckpt = pretrain_checkpoint(tiny_world, tmp_path)
    pre = json.load(open(write_config(tiny_world, str(tmp_path / "pre.yaml"))))
    cfg = dict(pre, max_steps=5, ckpt_every_steps=0)
    cfg["schedular"]["epochs"] = 1
    config = write(tmp_path / "ta.yaml", cfg)
    out = str(tmp_path / "ta")
    r = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29743",
             os.path.join(ROOT, "Pretrain_nlvr.py"), "--config", config, "--checkpoint", ckpt, "--output_dir", out,
             "--device", "cpu"])
    log = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    assert log[-1]["step"] == 5 and 0 < log[-1]["train_loss_ta"] < 5
    sd = load(os.path.join(out, "checkpoint_step00000005.pth"))["model"]
    assert not [k for k in sd if "_m." in k] and "ta_head.weight" in sd
    assert "text_encoder.encoder.layer.2.crossattention.self.key.weight" in sd   # 1 + 2 * 1 layers: fusion 1
    pre_sd = load(ckpt)["model"]
    assert torch.equal(sd["vision_proj.weight"], pre_sd["vision_proj.weight"])   # frozen: never trained


@pytest.mark.slow
@pytest.mark.parametrize("task", ["nlvr", "ve"])
def test_classification_launcher_selects_on_dev_tests_once_and_evaluate_reproduces_it(task, tiny_world, tmp_path):
    from test_engine import load, run
    launcher = os.path.join(ROOT, {"nlvr": "NLVR.py", "ve": "VE.py"}[task])
    config = task_config(tiny_world, str(tmp_path / f"{task}.yaml"), task)
    ckpt = str(tmp_path / "start.pth")
    if task == "nlvr":
        cfg = json.load(open(config))
        from models import MODELS
        torch.manual_seed(0)
        torch.save({"model": MODELS["pretrain_nlvr"](cfg).state_dict()}, ckpt)
    else:
        from models import MODELS
        torch.manual_seed(0)
        torch.save({"model": MODELS["pretrain"](json.load(open(config))).state_dict()}, ckpt)
    out = str(tmp_path / "run")
    r = run([sys.executable, launcher, "--config", config, "--checkpoint", ckpt, "--output_dir", out, "--device", "cpu"])
    assert "momentum copies made from the loaded weights" in r.stdout or task == "ve"
    rows = results(out)
    assert [x["split"] for x in rows] == ["val", "val", "test"]
    assert all(x["examples"] == (21 if x["split"] == "val" else 23) for x in rows)
    classes = ("False", "True") if task == "nlvr" else ("contradiction", "neutral", "entailment")
    test = rows[-1]
    assert sum(test[f"n_{c}"] for c in classes) == 23 and "selected on val accuracy" in test["checkpoint"]
    correct = sum(test[f"acc_{c}"] * test[f"n_{c}"] / 100 for c in classes)
    assert test["accuracy"] == pytest.approx(100 * correct / 23, abs=1e-3)
    best = max(rows[:2], key=lambda x: x["accuracy"])
    assert test["epoch"] == best["epoch"]
    preds = json.load(open(os.path.join(out, "result", f"{task}_test_best.json")))
    assert sorted(p["index"] for p in preds) == list(range(23))
    assert sum(p["label"] == p["prediction"] for p in preds) == round(correct)
    log = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    assert [x["val_accuracy"] for x in log] == [x["accuracy"] for x in rows[:2]] and "train_loss_cls" in log[0]
    assert open(os.path.join(out, "results.md")).read().count("\n") == 5
    # --evaluate with the selected checkpoint under two gloo ranks: each example once, the same test row
    r = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             "29745" if task == "nlvr" else "29747", launcher, "--config", config, "--checkpoint",
             os.path.join(out, "checkpoint_best.pth"), "--output_dir", out, "--device", "cpu", "--evaluate"])
    again = results(out)[-1]
    assert again["split"] == "test" and again["examples"] == 23
    for k in ("accuracy", *(f"n_{c}" for c in classes), *(f"acc_{c}" for c in classes)):
        assert again[k] == test[k], k
    preds2 = json.load(open(os.path.join(out, "result", f"{task}_test_evaluate.json")))
    assert sorted(preds2, key=lambda p: p["index"]) == sorted(preds, key=lambda p: p["index"])
    assert not [f for f in os.listdir(os.path.join(out, "result")) if "_rank" in f]
    assert load(os.path.join(out, "checkpoint_best.pth"))["best"]["metric"] == "val_accuracy"


def test_vicha_concepts_flow_through_nlvr_ve_and_text_assignment(tmp_path, tiny_world):
    """ViCHA's kwords1 / kwords2 (NLVR2) and kwords (VE) reach the models in the images' order; the
    text-assignment model takes concepts too (ViCHA's NLVR_pretrain.yaml has kw_img_model)."""
    from dataset import create_dataset
    from dataset.collate import Collate
    from models import MODELS
    from models.tokenization import ALBEFTokenizer
    tok = ALBEFTokenizer(os.path.join(tiny_world, "vocab"))
    nlvr = json.load(open(os.path.join(tiny_world, "nlvr_train.json")))[:4]
    for x in nlvr:
        x["kwords1"], x["kwords2"] = ["red", "circle"], ["blue", "square", "small"]
    cfg = tiny_config(kw_img_model=True, num_hidden_layers_kw=2, image_root=tiny_world,
                      train_file=write(tmp_path / "n.json", nlvr), train_crop_scale=[0.5, 1.0], randaugment=False)
    ds = create_dataset("nlvr_train", cfg)
    batch = Collate(tok)([ds[i] for i in range(4)])
    from dataset.transforms import normalize_uint8   # the engine's step does this on the device
    batch["image"] = normalize_uint8(batch["image"])
    ids = batch["kw_input_ids"]
    assert ids.shape[0] == 8 and (ids[:4] == ids[0]).all() and (ids[4:] == ids[4]).all() and not torch.equal(ids[0], ids[4])
    torch.manual_seed(0)
    m = MODELS["nlvr"](cfg)
    text = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    loss = m(as_batch(batch["image"], text, targets=batch["label"], concepts=(ids, batch["kw_attention_mask"])), alpha=0.4)["loss_cls"]
    loss.backward()
    assert torch.isfinite(loss) and m.kw_encoder.encoder.layer[0].attention.self.query.weight.grad is not None
    ta = MODELS["pretrain_nlvr"](cfg)
    out = ta(as_batch(batch["image"][:4], (text["input_ids"][:4], text["attention_mask"][:4]),
                      concepts=(ids[:4], batch["kw_attention_mask"][:4])))
    assert torch.isfinite(out["loss_ta"])
