import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import create_dataset
from dataset.collate import text_collate
from dataset.caption_dataset import AnnotationError, pretrain_dataset, re_eval_dataset, re_train_dataset
from dataset.randaugment import OPS, RandomAugment
from dataset import transforms as T
from dataset.transforms import MEAN, STD
from dataset.utils import pre_caption, pre_question


def test_pre_caption_follows_albef_rules():
    assert pre_caption("A man's  (red) hat!! on-the/left <person> ") == "a mans red hat on the left person"
    assert pre_caption("\n  Two   dogs.\n") == "two dogs"
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_caption('x*y#z:;~"?') == "xyz"


def test_pre_question_keeps_leading_spaces_and_runs():
    assert pre_question(" What  is-it? ") == " what  is it"
    assert pre_question("a b c", max_ques_words=2) == "a b"


def jpeg(path, size=(40, 30), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return path


def test_eval_transform_is_pil_bicubic_resize_then_clip_normalisation(tmp_path):
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (30, 50, 3), dtype=np.uint8))
    out = T.test_transform(24)(img)
    ref = np.asarray(img.resize((24, 24), Image.BICUBIC), dtype=np.float32) / 255.0
    ref = (torch.from_numpy(ref).permute(2, 0, 1) - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    assert out.shape == (3, 24, 24) and torch.allclose(out, ref, atol=1e-5)


def test_train_transform_output_and_randaugment_ops():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (60, 80, 3), dtype=np.uint8))
    out = T.train_transform(32)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    arr = np.asarray(img).copy()
    for name, op in OPS.items():
        res = op(arr, *({"Brightness": (1.36,), "Sharpness": (1.36,), "ShearX": (0.21,), "ShearY": (0.21,),
                         "TranslateX": (7,), "TranslateY": (7,), "Rotate": (21,)}.get(name, ())))
        assert res.shape == arr.shape and res.dtype == np.uint8, name
    assert np.array_equal(OPS["Identity"](arr), arr)
    eq = OPS["Equalize"](arr)
    assert eq.max() >= 250   # stretched histogram
    flat = np.full((10, 10, 3), 250, dtype=np.uint8)
    assert OPS["Sharpness"](flat, 1.9).max() == 250   # clipped, no uint8 wrap-around
    with pytest.raises(ValueError, match="unknown ops"):
        RandomAugment(augs=["Solarise"])


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(p)


def test_annotation_errors_name_file_and_entry(tmp_path):
    with pytest.raises(AnnotationError, match="train_file: annotation file not found"):
        pretrain_dataset([str(tmp_path / "none.json")], None)
    bad = write(tmp_path, "bad.json", "[{")
    with pytest.raises(AnnotationError, match="bad.json.*not valid JSON"):
        pretrain_dataset([bad], None)
    missing = write(tmp_path, "m.json", [{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg"}])
    with pytest.raises(AnnotationError, match="m.json', entry 1: missing field 'caption'"):
        pretrain_dataset([missing], None)
    wrong = write(tmp_path, "w.json", [{"image": "a.jpg", "caption": []}])
    with pytest.raises(AnnotationError, match="entry 0"):
        pretrain_dataset([wrong], None)


def test_formats_and_image_root(tmp_path):
    jpeg(tmp_path / "a.jpg"), jpeg(tmp_path / "b.jpg")
    pre = write(tmp_path, "p.json", [{"image": "a.jpg", "caption": "A cat."}, {"image": "b.jpg", "caption": ["x", "y"]}])
    ds = pretrain_dataset([pre], T.test_transform(16), image_root=str(tmp_path))
    img, cap, idx, bad = (ds[0][k] for k in ("image", "caption", "idx", "bad"))
    assert img.shape == (3, 16, 16) and cap == "a cat" and idx == 0 and bad == []
    choices = []
    for epoch in range(16):   # the caption choice is seeded per (seed, epoch, index)
        ds.set_epoch(epoch)
        choices.append(ds[1]["caption"])
        assert ds[1]["caption"] == choices[-1]
    assert set(choices) == {"x", "y"}
    rt = write(tmp_path, "r.json", [{"image": "a.jpg", "caption": "c1", "image_id": "z"},
                                    {"image": "a.jpg", "caption": "c2", "image_id": "z"},
                                    {"image": "b.jpg", "caption": "c3", "image_id": 7}])
    ds = re_train_dataset([rt], T.test_transform(16), str(tmp_path))
    assert [ds[i]["idx"] for i in range(3)] == [0, 0, 1]
    ev = write(tmp_path, "e.json", [{"image": "a.jpg", "caption": ["c1", "c2"]}, {"image": "b.jpg", "caption": ["c3"]}])
    ds = re_eval_dataset(ev, T.test_transform(16), str(tmp_path))
    assert ds.text == ["c1", "c2", "c3"] and ds.img2txt == {0: [0, 1], 1: [2]} and ds.txt2img == {0: 0, 1: 0, 2: 1}


def test_bad_images_are_replaced_and_only_the_requested_one_is_reported(tmp_path):
    jpeg(tmp_path / "ok.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(b"not an image")
    ann = [{"image": n, "caption": "c"} for n in ("missing.jpg", "corrupt.jpg", "ok.jpg")]
    ds = pretrain_dataset([write(tmp_path, "p.json", ann)], T.test_transform(16), image_root=str(tmp_path))
    img, cap, idx, bad = (ds[0][k] for k in ("image", "caption", "idx", "bad"))
    # the replacement (the only readable item) is what is trained and what its index says; only the
    # requested image is reported, not the corrupt one tried on the way: each bad image counts once
    assert idx == 2 and len(bad) == 1 and "missing.jpg" in bad[0]
    assert ds[1]["idx"] == 2 and len(ds[1]["bad"]) == 1 and "corrupt.jpg" in ds[1]["bad"][0]
    assert ds[2]["idx"] == 2 and ds[2]["bad"] == []
    assert ds[0]["idx"] == idx   # the replacement is a function of the sample's seed: a resumed run draws it again


def test_a_missing_block_in_a_large_corpus_is_replaced_but_all_missing_stops_fast(tmp_path):
    import time
    jpeg(tmp_path / "ok.jpg")
    ann = [{"image": "ok.jpg" if i % 10 == 9 else f"gone/{i}.jpg", "caption": "c"} for i in range(2000)]
    ann[:300] = [{"image": f"gone/{i}.jpg", "caption": "c"} for i in range(300)]   # 300 missing in a row
    ds = pretrain_dataset([write(tmp_path, "p.json", ann)], T.test_transform(8), image_root=str(tmp_path))
    for i in range(0, 300, 7):
        assert ds[i]["idx"] % 10 == 9 and len(ds[i]["bad"]) == 1
    none = pretrain_dataset([write(tmp_path, "none.json", [{"image": f"x/{i}.jpg", "caption": "c"}
                                                           for i in range(10000)])], T.test_transform(8),
                            image_root=str(tmp_path))
    t = time.time()
    with pytest.raises(RuntimeError, match="random replacements are all unreadable.*image_root"):
        none[0]
    assert time.time() - t < 5


def test_truncated_jpegs_load_as_albef_unless_switched_off(tmp_path):
    import io
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    jpeg(tmp_path / "ok.jpg")
    ann = write(tmp_path, "p.json", [{"image": "trunc.jpg", "caption": "c"}, {"image": "ok.jpg", "caption": "c"}])
    assert pretrain_dataset([ann], T.test_transform(16), image_root=str(tmp_path))[0]["bad"] == []
    strict = pretrain_dataset([ann], T.test_transform(16), image_root=str(tmp_path), truncated_ok=False)
    assert strict[0]["idx"] == 1 and "trunc.jpg" in strict[0]["bad"][0]
    cfg = {"train_file": [ann], "image_root": str(tmp_path), "image_res": 16, "load_truncated_images": False}
    assert create_dataset("pretrain", cfg)[0]["bad"] != []


def test_sixteen_bit_and_odd_modes_are_rescaled_not_clipped(tmp_path):
    from dataset.caption_dataset import load_image
    grey = np.full((8, 8), 32768, dtype=np.uint16)   # mid-grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(load_image(str(tmp_path / "g16.png")))
    assert rgb.shape == (8, 8, 3) and abs(int(rgb[0, 0, 0]) - 128) <= 1   # convert("RGB") alone gives 255
    Image.fromarray(np.full((8, 8), 0.25, dtype=np.float32)).save(tmp_path / "f.tif")
    assert abs(int(np.asarray(load_image(str(tmp_path / "f.tif")))[0, 0, 0]) - 64) <= 1
    Image.new("LA", (8, 8), (100, 50)).save(tmp_path / "la.png")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert np.asarray(load_image(str(tmp_path / "la.png")))[0, 0, 0] == 100
    assert np.asarray(load_image(str(tmp_path / "cmyk.jpg"))).shape == (8, 8, 3)


def test_non_utf8_annotation_file_is_named(tmp_path):
    p = tmp_path / "latin1.json"
    p.write_bytes(b'[{"image": "a.jpg", "caption": "caf\xe9"}]')
    with pytest.raises(AnnotationError, match="latin1.json.*not UTF-8"):
        pretrain_dataset([str(p)], None)


def test_bad_image_threshold_stops_the_run():
    from engine.components import BadImageError, BadImages
    bad = BadImages(0.05, check_every=1, min_seen=1000)
    bad.add(["x.jpg (FileNotFoundError)"], 40)
    assert bad.check(final=True)["count"] == 1   # 1/40 is under 5%
    bad.add(["y.jpg (OSError)"] * 5, 10)
    bad.on_step_end({}, {"bad": [], "n": 0}, 1)   # mid-epoch: under min_seen read, no verdict yet
    with pytest.raises(BadImageError, match="max_bad_image_fraction.*resume"):
        bad.check(final=True)
    state = bad.rank_state_dict()
    again = BadImages(0.05)
    again.load_rank_state_dict(state)
    assert (again.count, again.seen) == (6, 50)


def test_collate_tokenizes_and_carries_bad_paths(tiny_world):
    from models.tokenization import ALBEFTokenizer
    tok = ALBEFTokenizer(os.path.join(tiny_world, "vocab"))
    cfg = {"train_file": [os.path.join(tiny_world, "pretrain.json")], "image_root": tiny_world, "image_res": 16}
    ds = create_dataset("pretrain", cfg)
    batch = text_collate(tok, max_length=25)([ds[0], ds[1], ds[2]])
    assert batch["image"].shape == (3, 3, 16, 16) and batch["input_ids"].shape[0] == 3
    assert (batch["input_ids"][:, 0] == tok.cls_token_id).all() and batch["bad"] == [] and batch["n"] == 3
    assert tok.unk_token_id not in batch["input_ids"].tolist()


def test_per_sample_augmentation_is_reproducible(tiny_world):
    cfg = {"train_file": [os.path.join(tiny_world, "pretrain.json")], "image_root": tiny_world, "image_res": 16}
    ds = create_dataset("pretrain", cfg, seed=3)
    a, b = ds[5]["image"], ds[5]["image"]
    assert torch.equal(a, b)
    ds.set_epoch(1)
    assert not torch.equal(ds[5]["image"], a)


def test_demo_world_is_deterministic_and_false_negatives_are_exact(tmp_path, tiny_world):
    from dataset.synthetic import build_world, matches
    other = str(tmp_path / "w")
    build_world(other, seed=1, n_train=96, n_val=16, n_test=24, size=32)
    for name in ("pretrain.json", "retrieval_test.json", "false_negatives.json"):
        assert open(os.path.join(other, name)).read() == open(os.path.join(tiny_world, name)).read()
    scenes = json.load(open(os.path.join(tiny_world, "scenes.json")))
    fn = json.load(open(os.path.join(tiny_world, "false_negatives.json")))["test"]
    test = [s for s in scenes if s["split"] == "test"]
    spec_of = {(s["image_id"], c): sp for s in test for c, sp in zip(s["captions"], s["caption_specs"])}
    for item in fn:
        spec = spec_of[(item["image_id"], item["caption"])]
        brute = sorted(s["image_id"] for s in test if s["image_id"] != item["image_id"] and matches(spec, s["scene"]))
        assert item["false_negatives"] == brute
    scene = {"objects": [{"color": "red", "shape": "circle", "size": "small", "row": "top", "col": 0}]}
    assert matches({"mentions": [{"color": "red"}]}, scene)
    assert not matches({"mentions": [{"color": "red"}, {"color": "red"}]}, scene)   # objects are distinct
    assert not matches({"mentions": [{"color": "red"}], "count": 2}, scene)


@pytest.mark.parametrize("randaugment", [True, False])
def test_uint8_images_normalised_on_the_device_equal_the_float_transform_bitwise(randaugment):
    img = Image.fromarray(np.random.RandomState(1).randint(0, 255, (50, 70, 3), dtype=np.uint8))
    outs = []
    for uint8 in (False, True):
        torch.manual_seed(5), np.random.seed(5), random.seed(5)
        outs.append(T.train_transform(32, randaugment=randaugment, uint8=uint8)(img))
    assert outs[1].dtype == torch.uint8 and outs[1].shape == (3, 32, 32)
    batch = torch.stack([outs[1], outs[1]])
    assert torch.equal(T.normalize_uint8(batch), torch.stack([outs[0], outs[0]]))


class _WhoReads(torch.utils.data.Dataset):
    epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor([os.getpid(), self.epoch, i])


def test_persistent_workers_get_each_epoch_with_its_indices():
    from dataset.sampler import EpochTagged, EpochTaggedDataset, ResumableDistributedSampler
    sampler = EpochTagged(ResumableDistributedSampler(8, 4, seed=0))
    loader = torch.utils.data.DataLoader(EpochTaggedDataset(_WhoReads()), batch_size=4, sampler=sampler,
                                         num_workers=2, persistent_workers=True)
    seen = {}
    for epoch in range(3):
        sampler.epoch = epoch
        sampler.sampler.set_epoch(epoch)
        rows = torch.cat(list(loader))
        seen[epoch] = rows
        assert rows[:, 1].tolist() == [epoch] * 8   # the worker's copy read this epoch, not the one it forked with
        assert rows[:, 2].tolist() == sampler.sampler.epoch_indices(epoch).tolist()
    assert set(seen[0][:, 0].tolist()) == set(seen[2][:, 0].tolist())   # the same worker processes
