"""ViCHA's visual concepts: drawing, the dataset field, the ViT sequence and its padding mask, the models,
retrieval evaluation with concepts, the offline pipeline end to end, and strict loading of ViCHA's keys."""
import json
import os
import random

import pytest
import torch

from models.batch import as_batch
from conftest import tiny_config, tiny_text
from dataset import create_dataset
from dataset.collate import text_collate
from dataset.caption_dataset import AnnotationError
from dataset.utils import sample_concepts
from tasks.retrieval import encode_images, encode_texts, reference_scores, score_matrices
from models import MODELS
from models.tokenization import ALBEFTokenizer
from test_models import albef_layout, bert_keys, vit_keys

KW = [f"w{i}" for i in range(15)]


def vc_config(**kw):
    return tiny_config(kw_img_model=True, num_hidden_layers_kw=2, **kw)


def concepts(b=4, n=6, seed=1, short=(0,)):
    """(ids, mask) of concept tokens, rows in ``short`` right-padded after 3 tokens."""
    t = tiny_text(b, n, seed=seed, pad_first=False)
    ids, mask = t["input_ids"], t["attention_mask"]
    for r in short:
        ids[r, 3:], mask[r, 3:] = 0, 0
    return ids, mask


# ---------------------------------------------------------------------------------------------- drawing
def test_sampling_all_in_order_or_a_share_with_and_without_replacement():
    assert sample_concepts(KW) == " ".join(KW)
    assert sample_concepts(KW[:3], sep_token=True) == "w0 [SEP] w1 [SEP] w2"
    rng = random.Random(0)
    draws = [sample_concepts(KW, 0.3, rng).split() for _ in range(200)]
    assert all(len(d) == 4 for d in draws)                     # int(0.3 * 15), as ViCHA
    assert all(len(set(d)) == 4 and set(d) <= set(KW) for d in draws)
    with_rep = [sample_concepts(KW, 0.3, rng, replacement=True).split() for _ in range(200)]
    assert all(len(d) == 4 for d in with_rep) and any(len(set(d)) < 4 for d in with_rep)
    # vc_sample_replacement: ViCHA's own draw, random.choices(kwords, k=int(p * n)) from the same stream
    assert sample_concepts(KW, 0.3, random.Random(5), replacement=True) == " ".join(random.Random(5).choices(KW, k=4))
    assert sample_concepts([], 0.3, rng) == ""


def write_ann(tmp_path, entries, name="ann.json"):
    p = tmp_path / name
    p.write_text(json.dumps(entries))
    return str(p)


def test_dataset_draws_per_sample_seed_and_collates_concept_tokens(tiny_world, tmp_path):
    ann = json.load(open(os.path.join(tiny_world, "pretrain.json")))[:8]
    for i, a in enumerate(ann):
        a["kwords"] = (KW * 2)[i:i + 10]
    cfg = {"train_file": [write_ann(tmp_path, ann)], "image_root": tiny_world, "image_res": 32, "kw_img_model": True,
           "randkw_p": 0.5, "randaugment": False}
    ds = create_dataset("pretrain", cfg, seed=3)
    first = [ds[i]["concepts"] for i in range(8)]
    assert all(len(s.split()) == 5 for s in first)
    assert [ds[i]["concepts"] for i in range(8)] == first          # same seed, epoch, index: same draw (resume)
    ds.set_epoch(1)
    assert [ds[i]["concepts"] for i in range(8)] != first
    tok = ALBEFTokenizer(os.path.join(tiny_world, "vocab"))
    batch = text_collate(tok)([ds[i] for i in range(4)])
    assert batch["kw_input_ids"].shape == batch["kw_attention_mask"].shape
    assert batch["kw_attention_mask"][:, 0].all() and batch["kw_input_ids"].shape[0] == 4
    # without kw_img_model the same file gives the plain 4-tuple
    assert len(create_dataset("pretrain", dict(cfg, kw_img_model=False))[0]) == 4


def test_missing_kwords_is_an_error_naming_file_entry_and_key(tiny_world, tmp_path):
    ann = json.load(open(os.path.join(tiny_world, "pretrain.json")))[:3]
    ann[0]["kwords"], ann[2]["kwords"] = ["a"], ["b"]
    path = write_ann(tmp_path, ann)
    with pytest.raises(AnnotationError, match=r"ann\.json'?, entry 1: missing field 'kwords'.*kw_img_model"):
        create_dataset("pretrain", {"train_file": [path], "image_root": tiny_world, "image_res": 32,
                                    "kw_img_model": True})


# ---------------------------------------------------------------------------------------------- ViT and models
def test_concepts_extend_the_vit_sequence_and_masked_padding_changes_nothing():
    torch.manual_seed(0)
    model = MODELS["pretrain"](vc_config()).eval()
    image = torch.randn(4, 3, 32, 32)
    ids, mask = concepts()
    embeds, _ = model.encode_image(image, concepts=(ids, mask))
    assert embeds.shape[1] == 1 + 16 + ids.shape[1]
    atts = model.image_atts(embeds, (ids, mask))
    assert atts[0].tolist() == [1] * 20 + [0] * 3 and atts[1].all()
    # changing what sits in the padded positions changes nothing unpadded
    ids2 = ids.clone()
    ids2[0, 3:] = 7
    embeds2, _ = model.encode_image(image, concepts=(ids2, mask))
    assert torch.allclose(embeds[:, :20], embeds2[:, :20], atol=1e-5)
    # ViCHA's behaviour (vc_mask_padding: false) attends to it
    model.vc_mask_padding = False
    a, _ = model.encode_image(image, concepts=(ids, mask))
    b, _ = model.encode_image(image, concepts=(ids2, mask))
    assert not torch.allclose(a[0, :17], b[0, :17], atol=1e-4)
    assert model.image_atts(a, (ids, mask)).tolist() == [[1] * 23] * 4   # and so do the fusion layers


def test_padding_length_does_not_change_features_or_itm_scores():
    """Training pads concepts to the batch's longest, evaluation to its own batch: with the padding masked,
    the same image gets the same feature and the same match score either way."""
    torch.manual_seed(0)
    model = MODELS["retrieval"](vc_config()).eval()
    image = torch.randn(1, 3, 32, 32)
    ids, mask = concepts(1, 6, short=())
    short = (ids[:, :4], mask[:, :4])
    long_ids, long_mask = torch.zeros(1, 9, dtype=torch.long), torch.zeros(1, 9, dtype=torch.long)
    long_ids[:, :4], long_mask[:, :4] = short
    text = tiny_text(1, 7, pad_first=False)
    out = []
    for c in (short, (long_ids, long_mask)):
        e, f = model.encode_image(image, concepts=c)
        h, _ = model.encode_text(text["input_ids"], text["attention_mask"])
        out.append((f, model.itm_head(model.fuse(h, text["attention_mask"], e, model.image_atts(e, c)))))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5) and torch.allclose(out[0][1], out[1][1], atol=1e-5)


@pytest.mark.parametrize("use_momentum", [True, False])
def test_pretraining_with_concepts_trains_the_concept_encoder(use_momentum):
    torch.manual_seed(0)
    model = MODELS["pretrain"](vc_config(use_momentum=use_momentum, distill=use_momentum))
    assert hasattr(model, "kw_encoder_m") == use_momentum and hasattr(model, "kw_proj_m") == use_momentum
    out = model(as_batch(torch.randn(4, 3, 32, 32), tiny_text(4), concepts=concepts()), alpha=0.4)
    sum(v for k, v in out.items() if k.startswith("loss")).backward()
    assert model.kw_proj.weight.grad.abs().sum() > 0
    assert model.kw_encoder.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="kwords"):
        model(as_batch(torch.randn(4, 3, 32, 32), tiny_text(4)))


def test_fast_retrieval_scores_equal_the_reference_with_concepts(tiny_world, tmp_path):
    ann = json.load(open(os.path.join(tiny_world, "retrieval_test.json")))[:10]
    rng = random.Random(0)
    for a in ann:   # concept strings of different lengths, so eval batches pad differently
        a["kwords"] = rng.sample(["red", "blue", "circle", "square", "small", "large", "top"], rng.randint(1, 7))
    cfg = vc_config(test_file=write_ann(tmp_path, ann), image_root=tiny_world, image_res=32,
                    bert_config=dict(tiny_config()["bert_config"], vocab_size=128))
    tok = ALBEFTokenizer(os.path.join(tiny_world, "vocab"))
    torch.manual_seed(0)
    model = MODELS["retrieval"](cfg, tok).eval()
    ds = create_dataset("re_test", cfg)
    dev = torch.device("cpu")
    with torch.no_grad():
        atts, txt_s, txt_f = encode_texts(model, tok, ds.text, dev)
        img_s, img_a, img_f, _ = encode_images(model, ds, dev, batch_size=3, num_workers=0, tokenizer=tok)
        assert (img_a.sum(1) < img_a.shape[1]).any()     # some images carry padding
        sims = img_f @ txt_f.t()
        ref = reference_scores(model, sims, img_s, txt_s, atts, 4, image_atts=img_a)
        fast = score_matrices(model, sims, img_s, txt_s, atts, 4, pair_batch=8, image_atts=img_a)
    assert torch.allclose(ref[0], fast[0], atol=1e-5) and torch.allclose(ref[1], fast[1], atol=1e-5)


# ---------------------------------------------------------------------------------------------- ViCHA's keys
def vicha_layout(d=32, depth=2, n_tokens=17, h=32, inter=64, vocab=120, maxpos=40, ed=16, q=16, patch=8, n_hidden=1):
    """kw_img_ViCHA's state-dict keys (spec §1.2) at tiny sizes: ALBEF's, the concept encoder and its
    momentum copy, the H-ITC projections, the MIM decoder."""
    keys = albef_layout("pretrain", d, depth, n_tokens, h, 4, 2, inter, vocab, maxpos, ed, q, patch)
    for m in ("", "_m"):
        keys.update(bert_keys(f"kw_encoder{m}.", h, 2, 2, inter, vocab, maxpos, d))
        keys.update({f"kw_proj{m}.weight": (d, h), f"kw_proj{m}.bias": (d,)})
    for n in range(n_hidden):
        keys.update({f"vision_proj_hidden.{n}.weight": (ed, d), f"vision_proj_hidden.{n}.bias": (ed,),
                     f"text_proj_hidden.{n}.weight": (ed, h), f"text_proj_hidden.{n}.bias": (ed,)})
    keys.update({k: s for k, s in vit_keys("decoder_", d, 2, n_tokens, patch).items()
                 if k.startswith("decoder_blocks.")})   # 2 blocks, ViT-block names
    keys.update({"decoder_embed.weight": (d, d), "decoder_embed.bias": (d,), "decoder_pos_embed": (1, n_tokens, d),
                 "decoder_norm.weight": (d,), "decoder_norm.bias": (d,), "mae_proj.weight": (3 * patch * patch, d),
                 "mae_proj.bias": (3 * patch * patch,), "mask_token": (1, 1, d)})
    return keys


def test_a_vicha_keyed_state_dict_loads_strictly():
    from models.checkpoint import load_into
    cfg = vc_config(return_hidden_state=True, num_hidden_align=1, mae=True, mim_decoder_heads=2)
    model = MODELS["pretrain"](cfg)
    want = vicha_layout()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert {k: s for k, s in got.items() if want[k] != s} == {}
    own = model.state_dict()
    sd = {k: (own[k] if k in ("queue_ptr",) or "position_ids" in k else torch.randn(s)) for k, s in want.items()}
    load_into(model, sd, "vicha.pth", strict=True, verbose=False)
    assert torch.equal(model.kw_proj_m.weight, sd["kw_proj_m.weight"])


# ---------------------------------------------------------------------------------------------- offline pipeline
def test_vocabulary_counts_heads_and_keeps_the_frequent_ones():
    from tools.visual_concepts import mine_vocabulary
    caps = ["a dog on a sofa", "the Dog runs", "a cat", "dog and cat", "a bird"]
    heads = lambda cs: ([w for w in c.split() if w.lower() in {"dog", "cat", "sofa", "bird"}] for c in cs)  # noqa: E731
    assert mine_vocabulary(caps, heads, min_count=2) == ["dog", "cat"]       # counts 3 and 2: ViCHA lost one
    assert mine_vocabulary(caps, heads, min_count=1) == ["dog", "cat", "bird", "sofa"]


def test_vocab_without_spacy_says_how_to_get_it(tmp_path, tiny_world):
    pytest.importorskip("open_clip")
    try:
        import spacy  # noqa: F401
        pytest.skip("spaCy is installed here")
    except ImportError:
        pass
    from tools.visual_concepts import main
    with pytest.raises(SystemExit, match="spaCy is not installed"):
        main(["vocab", "--ann", os.path.join(tiny_world, "pretrain.json"), "--out", str(tmp_path / "v.json")])


def tiny_clip(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                           "head_width": 16},
           "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / "tiny-vc-clip.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(path))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-vc-clip", pretrained=None)
    ckpt = tmp_path / "tiny_clip.bin"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return str(path), str(ckpt)


def test_offline_pipeline_end_to_end_resumes_and_trains(tmp_path, tiny_world):
    from tools.visual_concepts import main
    model_cfg, ckpt = tiny_clip(tmp_path)
    vocab = tmp_path / "nouns.txt"
    vocab.write_text("circle\nsquare\ntriangle\ndiamond\ncross\nshape\n")
    ann = json.load(open(os.path.join(tiny_world, "pretrain.json")))[:12]
    ann[5]["image"] = "images/missing.jpg"   # unreadable: counted, empty concepts
    src = write_ann(tmp_path, ann, "train.json")
    out = str(tmp_path / "train_kw.json")
    args = ["assign", "--ann", src, "--out", out, "--vocab", str(vocab), "--image_root", tiny_world, "--topk", "3",
            "--clip_model", "tiny-vc-clip", "--clip_model_config", model_cfg, "--clip_checkpoint", ckpt,
            "--batch_size", "4", "--num_workers", "0", "--no_progress", "--device", "cpu"]
    # an interrupted earlier run left two images done (one record cut mid-line): they are not recomputed
    with open(out + ".partial.jsonl", "w") as f:
        f.write(json.dumps({"image": ann[0]["image"], "kwords": ["cross", "shape", "circle"]}) + "\n")
        f.write(json.dumps({"image": ann[1]["image"], "kwords": ["square", "cross", "shape"]}) + "\n")
        f.write('{"image": "images/tr')
    stats = main(args)
    assert stats["resumed"] == 2 and stats["computed"] == 10 and stats["unreadable"] == 1
    assert not os.path.exists(out + ".partial.jsonl")
    result = json.load(open(out))
    assert [e["caption"] for e in result] == [e["caption"] for e in ann]
    assert result[0]["kwords"] == ["cross", "shape", "circle"] and result[5]["kwords"] == []
    words = {"circle", "square", "triangle", "diamond", "cross", "shape"}
    assert all(len(e["kwords"]) == 3 and set(e["kwords"]) <= words for i, e in enumerate(result) if i != 5)
    # the written file trains a ViCHA model (one step)
    result[5]["image"] = ann[4]["image"]
    kw_file = write_ann(tmp_path, result, "train_kw_ok.json")
    cfg = vc_config(train_file=[kw_file], image_root=tiny_world, randkw_p=0.7, randaugment=False,
                    bert_config=dict(tiny_config()["bert_config"], vocab_size=128))
    tok = ALBEFTokenizer(os.path.join(tiny_world, "vocab"))
    ds = create_dataset("pretrain", cfg)
    batch = text_collate(tok)([ds[i] for i in range(4)])
    model = MODELS["pretrain"](cfg, tok)
    from dataset.transforms import normalize_uint8   # the engine's step does this on the device
    out = model(dict(batch, image=normalize_uint8(batch["image"])))
    assert torch.isfinite(out["loss_ita"] + out["loss_itm"] + out["loss_mlm"])


def test_missing_clip_checkpoint_is_a_clear_error(tmp_path, tiny_world):
    pytest.importorskip("open_clip")
    from tools.visual_concepts import main
    vocab = tmp_path / "v.txt"
    vocab.write_text("circle\n")
    with pytest.raises(SystemExit, match="--clip_checkpoint: file not found.*nothing is downloaded"):
        main(["assign", "--ann", os.path.join(tiny_world, "pretrain.json"), "--out", str(tmp_path / "o.json"),
              "--vocab", str(vocab), "--clip_checkpoint", str(tmp_path / "nope.bin"), "--device", "cpu"])


def test_vicha_config_builds_vichas_full_size_key_list_on_meta():
    """configs/Pretrain_vicha.yaml at full size (on meta): exactly kw_img_ViCHA's keys (spec §1.2)."""
    from engine.config import load_config, validate
    cfg = validate(load_config("configs/Pretrain_vicha.yaml"))
    assert cfg["randkw_p"] == 0.3 and cfg["num_hidden_align"] == 5 and cfg["ita_hidden_weight"] == 0.1
    assert cfg["mask_ratio"] == 0.75 and cfg["batch_size"] == 32 and cfg["schedular"]["epochs"] == 11
    cfg = dict(cfg, text_encoder=None, vision_init=None)
    with torch.device("meta"):
        model = MODELS["pretrain"](cfg)
    want = vicha_layout(d=768, depth=12, n_tokens=257, h=768, inter=3072, vocab=30522, maxpos=512, ed=256, q=65536,
                        patch=16, n_hidden=5)
    # ALBEF's 12-layer body and fusion: the tiny layout's 4 layers / fusion 2 widened to 12 / 6
    albef = albef_layout("pretrain", d=768, depth=12, n_tokens=257, h=768, L=12, f=6, inter=3072, vocab=30522,
                         maxpos=512, ed=256, q=65536, patch=16)
    want = {**{k: s for k, s in want.items() if not k.startswith(("text_encoder", "visual_encoder"))}, **albef}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want


def test_downstream_models_take_concepts_with_their_momentum_copies():
    torch.manual_seed(0)
    text, targets = tiny_text(4), torch.tensor([0, 1, 2, 1])
    ve = MODELS["ve"](vc_config())
    assert hasattr(ve, "kw_encoder_m")
    ve(as_batch(torch.randn(4, 3, 32, 32), text, targets=targets, concepts=concepts()), alpha=0.4)["loss_cls"].backward()
    assert ve.kw_proj.weight.grad.abs().sum() > 0
    nlvr = MODELS["nlvr"](vc_config())   # two images per text: kwords1 rows, then kwords2 rows
    ids, mask = concepts(8, short=(0, 5))
    nlvr(as_batch(torch.randn(8, 3, 32, 32), text, targets=targets % 2, concepts=(ids, mask)), alpha=0.4)["loss_cls"].backward()
    assert nlvr.kw_encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    vqa = MODELS["vqa"](vc_config())
    states = vqa.encode_question(torch.randn(4, 3, 32, 32), text["input_ids"], text["attention_mask"],
                                 concepts=concepts())
    assert states.shape == (4, 7, 32)


def test_every_vicha_component_composes_with_mafa():
    """H-ITC, concepts and MIM on MAFA's in-batch, ECM-corrected pretraining: one step trains them all."""
    from test_ecm import FixedFilter
    torch.manual_seed(0)
    cfg = vc_config(use_momentum=False, distill=False, itc_label_smoothing=0.5, return_hidden_state=True,
                    num_hidden_align=1, mae=True, mim_decoder_heads=2)
    model = MODELS["pretrain"](cfg)
    filt = FixedFilter(MODELS["retrieval"](tiny_config(use_momentum=False, distill=False)),
                       p_t2i=torch.tensor([0.9, 0.1, 0.6, 0.8]), p_i2t=torch.tensor([0.2, 0.85, 0.5, 0.49]))
    model.set_discriminator(filt)
    out = model(as_batch(torch.randn(4, 3, 32, 32), tiny_text(4), concepts=concepts()))
    assert out["count_ecm_connections"] == 3 and "loss_mae" in out
    sum(v for k, v in out.items() if k.startswith("loss")).backward()
    for module in (model.kw_proj, model.vision_proj_hidden[0], model.decoder_embed, model.itm_head):
        assert module.weight.grad.abs().sum() > 0
