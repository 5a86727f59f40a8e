import glob
import os
import sys

import pytest
import torch

from engine.config import ConfigError, apply_overrides, load_config, str2bool, validate


def test_albef_configs_validate_and_keep_original_values():
    cfg = validate(load_config("configs/Pretrain.yaml"))
    assert cfg["queue_size"] == 65536 and cfg["schedular"]["warmup_epochs"] == 20
    assert cfg["optimizer"] == {"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02}
    validate(load_config("configs/demo/Pretrain.yaml"))
    grit = validate(load_config("configs/Pretrain_grit.yaml"))   # GRIT-VLP's values
    assert grit["grit"] == {"collect_size": 48000, "search_space": 1920} and grit["mlm_probability"] == 0.5
    assert grit["batch_size"] == 128 and grit["train_epochs"] == 20 and grit["schedular"]["epochs"] == 30
    assert grit["itc_consistency_weight"] == 0.2 and grit["use_momentum"] is False
    mafa = validate(load_config("configs/Pretrain_mafa.yaml"))   # MAFA's: GRIT's plus ECM and S-ITC
    assert mafa["ecm"]["low_threshold"] == 0.5 and mafa["ecm"]["high_threshold"] == 0.8
    assert mafa["itc_label_smoothing"] == 0.5 and mafa["itc_consistency_weight"] == 0.0 and mafa["grit"] == grit["grit"]
    filt = validate(load_config("configs/filter.yaml"))
    assert filt["image_res"] == 256 and filt["queue_size"] == 65536 and filt["schedular"]["epochs"] == 5


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown key 'queue_szie'; did you mean 'queue_size'"):
        validate({"queue_szie": 1})
    with pytest.raises(ConfigError, match="unknown key 'schedular.warmup_epoch'; did you mean 'warmup_epochs'"):
        validate({"schedular": {"warmup_epoch": 1}})


def test_overrides_parse_types_and_nested_keys():
    cfg = {"optimizer": {"lr": 1.0}, "distill": True}
    apply_overrides(cfg, ["optimizer.lr=1e-4", "distill=false", "train_crop_scale=[0.5, 1.0]", "batch_size=8"])
    assert cfg == {"optimizer": {"lr": 1e-4}, "distill": False, "train_crop_scale": [0.5, 1.0], "batch_size": 8}
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(cfg, ["batch_size"])
    with pytest.raises(ConfigError, match="unknown key 'optimiser.lr'"):
        apply_overrides(cfg, ["optimiser.lr=1"])


def test_booleans_parse_correctly():
    assert str2bool("False") is False and str2bool("0") is False and str2bool("true") is True
    with pytest.raises(Exception):
        str2bool("maybe")


def test_bad_yaml_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "none.yaml"))


def test_scheduler_follows_albef_curve():
    import math
    import torch
    from scheduler import create_scheduler
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    s = create_scheduler(load_config("configs/Pretrain.yaml")["schedular"], opt)
    expect = {(0, 0): 1e-5, (0, 100): 1e-5, (0, 101): 1.45e-5, (0, 2001): 1e-4, (0, 9000): 1e-4,
              (1, 0): 1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi / 30)),
              (29, 5): 1e-5 + 0.5 * 9e-5 * (1 + math.cos(29 * math.pi / 30))}
    for (e, i), lr in expect.items():
        s.step(e, i)
        assert math.isclose(s.lr(), lr, rel_tol=1e-9), (e, i)


def test_optimizer_groups_exclude_bias_norm_and_frozen():
    from conftest import tiny_config
    from models import MODELS
    from optim import create_optimizer
    m = MODELS["pretrain"](tiny_config())
    opt = create_optimizer({"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02}, m)
    no_decay, decay = opt.param_groups
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.02
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    # ALBEF decays the 0-d temp (its optimizer excludes only 1-d parameters and biases)
    assert id(m.vision_proj_m.weight) not in ids and id(m.temp) in {id(p) for p in decay["params"]}
    assert all(p.ndim == 1 for p in no_decay["params"]) and all(p.ndim != 1 for p in decay["params"])
    _, decay = create_optimizer({"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02, "decay_0d": False}, m).param_groups
    assert id(m.temp) not in {id(p) for p in decay["params"]}


def test_wrong_types_ranges_and_missing_keys_are_named():
    base = {"bert_config": "configs/config_bert.json", "image_res": 256, "train_file": ["a.json"], "batch_size": 8,
            "optimizer": {"lr": 1e-4}, "schedular": {"lr": 1e-4, "epochs": 1}}

    def check(task="pretrain", **kw):
        cfg = {**base, **kw}
        return validate(cfg, task=task)
    assert check(batch_size="64")["batch_size"] == 64 and check(optimizer={"lr": "1e-4"})["optimizer"]["lr"] == 1e-4
    with pytest.raises(ConfigError, match="'batch_size' must be an integer, got 'sixty'"):
        check(batch_size="sixty")
    with pytest.raises(ConfigError, match="'batch_size' must be an integer, got 8.5"):
        check(batch_size=8.5)
    with pytest.raises(ConfigError, match=r"'schedular.lr' must be >= 0, got -0.0001"):
        check(schedular={"lr": -1e-4, "epochs": 1})
    with pytest.raises(ConfigError, match=r"'momentum' must be <= 1"):
        check(momentum=1.5)
    with pytest.raises(ConfigError, match="'distill' must be true or false"):
        check(distill="maybe")
    with pytest.raises(ConfigError, match="'precision' must be one of"):
        check(precision="fp16")
    with pytest.raises(ConfigError, match="'train_file' must be a file path or a list"):
        check(train_file=3)
    with pytest.raises(ConfigError, match="missing required key 'image_res'"):
        validate({k: v for k, v in base.items() if k != "image_res"})
    with pytest.raises(ConfigError, match="missing required key 'schedular.epochs'"):
        check(schedular={"lr": 1e-4})
    with pytest.raises(ConfigError, match="missing required key 'batch_size'"):
        validate({k: v for k, v in base.items() if k != "batch_size"}, task="pretrain")
    with pytest.raises(ConfigError, match="missing required key 'batch_size_train'"):
        check(task="retrieval")
    with pytest.raises(ConfigError, match="'ecm.low_threshold'.*must not exceed"):
        check(ecm={"filter_config": "f.yaml", "filter_checkpoint": "f.pth", "low_threshold": 0.9})
    with pytest.raises(ConfigError, match="'loss_weights.loss_itm' must be >= 0"):
        check(loss_weights={"loss_itm": -1})


def test_defaults_live_in_the_schema_once():
    import subprocess
    from schema import KEYS, value
    assert value({}, "num_workers") == 4 and value({}, "max_tokens", "pretrain") == 25
    assert value({}, "train_crop_scale", "retrieval") == [0.5, 1.0] and value({}, "optimizer.decay_0d") is True
    with pytest.raises(ConfigError, match="missing required config key 'image_res'"):
        value({}, "image_res")
    # no code reads a config key with a default of its own
    r = subprocess.run(["grep", "-rnE", r"(config|cfg)\.get\(\"[a-z_]+\", ", "--include=*.py", "models", "dataset",
                        "engine", "optim", "scheduler", "Pretrain.py", "Retrieval.py"], capture_output=True, text=True)
    assert r.stdout == ""
    assert all(k.doc for k in KEYS.values())


# unchanged copies of the four repositories' YAML files (tests/data/original_configs/README.md: repository and
# commit of each folder), carried here so that a user's clone runs these tests
ORIGINALS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "original_configs")
ORIGINAL_FILES = sorted(glob.glob(os.path.join(ORIGINALS, "*", "*.yaml")))
assert len(ORIGINAL_FILES) == 36, ORIGINAL_FILES


def launch_config(monkeypatch, launcher, path, *extra):
    """The config exactly as the launcher ``launcher`` (Pretrain or Retrieval) reads it from its arguments."""
    import importlib
    mod = importlib.import_module("tasks.classification" if launcher in ("NLVR", "VE") else
                                  "tasks.grounding" if launcher == "Grounding" else launcher)
    main = (lambda: mod.main(launcher.lower(), launcher, path, "/nonexistent")) if launcher in ("NLVR", "VE") \
        else mod.main
    captured = {}

    def stop(args, config, *a, **k):
        captured["args"], captured["config"] = args, config
        raise SystemExit(0)
    monkeypatch.setattr(mod, "build", stop)
    monkeypatch.setattr(sys, "argv", [launcher + ".py", "--config", path, "--output_dir", "/nonexistent", *extra])
    with pytest.raises(SystemExit):
        main()
    return captured["config"]


@pytest.mark.parametrize("path", ORIGINAL_FILES, ids=lambda p: "/".join(p.split(os.sep)[-2:]))
def test_original_configs_load_unchanged_through_the_launchers(monkeypatch, path):
    name = os.path.basename(path)
    fork = os.path.basename(os.path.dirname(path))
    launcher = "Retrieval" if name.startswith(("Retrieval", "filter")) else "VQA" if name.startswith("VQA") \
        else "Pretrain_nlvr" if name.startswith("NLVR_pretrain") else "NLVR" if name.startswith("NLVR") \
        else "VE" if name.startswith("VE") else "Grounding" if name.startswith("Grounding") else "Pretrain"
    cfg = launch_config(monkeypatch, launcher, path)
    if launcher == "Grounding":
        from tasks.grounding import grid_size
        assert grid_size(cfg) == (24 if fork == "ALBEF" else 23) and cfg["det_file"].endswith("dets.json")
        assert cfg["eval_every"] == 1 and bool(cfg.get("kw_img_model")) is (fork == "ViCHA")
    if fork in ("GRIT-VLP", "MAFA") and name == "Pretrain.yaml":
        # GRIT's queue_size is its collection queue, not ALBEF's ITC queue; its model has no momentum encoders
        assert cfg["grit"] == {"collect_size": 48000, "search_space": 1920} and "queue_size" not in cfg
        assert cfg["use_momentum"] is False and cfg["itc_consistency_weight"] == 0.2
        assert cfg["itm_negative_selection"] == "argmax" and cfg["train_epochs"] == 20
    if fork == "ViCHA" and name.startswith("Pretrain"):
        from models.base import bert_config_from
        assert bert_config_from(cfg).extra.get("output_hidden_states") is True   # the multiscale BERT config
    if fork == "ViCHA" and name.startswith("Retrieval"):
        assert cfg["dual_metrics"] is False
    if launcher == "VQA":
        assert cfg["k_test"] == 128 and cfg["eos"] == "[SEP]" and cfg["answer_list"].endswith("answer_list.json")
        assert cfg["distill"] is (fork in ("ALBEF", "ViCHA"))
    if launcher in ("NLVR", "VE", "Pretrain_nlvr"):   # full size, on meta: 18 text layers for the two NLVR ones
        from models import MODELS
        with torch.device("meta"):
            model = MODELS[{"NLVR": "nlvr", "VE": "ve", "Pretrain_nlvr": "pretrain_nlvr"}[launcher]](cfg)
        assert len(model.text_encoder.encoder.layer) == (12 if launcher == "VE" else 18)
        if launcher != "Pretrain_nlvr":
            assert model.distill is (fork != "GRIT-VLP" and fork != "MAFA") and cfg["alpha"] == (0 if not model.distill else 0.4)
            assert cfg["alpha_warm_up"] is (launcher == "NLVR") and cfg["schedular"]["lr"] == 2e-5
        else:
            assert cfg["image_res"] == 256 and cfg["max_tokens"] == 25 and not model.vision_proj.weight.requires_grad
    if launcher == "Pretrain":   # the model these keys describe builds (full size, on meta)
        from models.model_pretrain import ALBEF
        with torch.device("meta"):
            model = ALBEF(cfg)
        assert model.use_momentum == cfg.get("use_momentum", True) and model.temp.shape == ()


def test_mafa_command_line_makes_the_grit_file_mafa(monkeypatch):
    path = os.path.join(ORIGINALS, "MAFA", "Pretrain.yaml")
    cfg = launch_config(monkeypatch, "Pretrain", path, "--filter_config", "configs/filter.yaml",
                        "--filter_checkpoint", "filter.pth", "--low_threshold", "0.4")
    assert cfg["ecm"] == {"filter_config": "configs/filter.yaml", "filter_checkpoint": "filter.pth",
                          "low_threshold": 0.4}
    assert cfg["itc_label_smoothing"] == 0.5 and cfg["itc_consistency_weight"] == 0.0 and cfg["grit"]["collect_size"] == 48000


@pytest.mark.slow
def test_grit_original_config_trains_through_pretrain_py(tiny_world, tmp_path):
    """GRIT-VLP's own Pretrain.yaml, unchanged, with only paths and sizes overridden on the command line."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bert = ("{vocab_size: 128, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64,"
            " fusion_layer: 1, encoder_width: 32, max_position_embeddings: 40}")
    out = str(tmp_path / "grit")
    cmd = [sys.executable, os.path.join(root, "Pretrain.py"), "--config", os.path.join(ORIGINALS, "GRIT-VLP", "Pretrain.yaml"),
           "--output_dir", out, "--device", "cpu", "--opts", f"train_file=[{os.path.join(tiny_world, 'pretrain.json')}]",
           f"image_root={tiny_world}", f"tokenizer={os.path.join(tiny_world, 'vocab')}", f"bert_config={bert}",
           "image_res=32", "patch_size=8", "vision_width=32", "vision_depth=1", "vision_heads=2", "embed_dim=16",
           "batch_size=8", "queue_size=16", "search_space=16", "train_epochs=2", "num_workers=0", "tensorboard=false"]
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "GRIT-VLP's top-level queue_size/search_space read as grit" in r.stdout
    ck = torch.load(os.path.join(out, "checkpoint_01.pth"), map_location="cpu", weights_only=True)
    assert "grit" in ck["components"] and not any(k.endswith("_m.weight") for k in ck["model"])


def test_shipped_vqa_configs_hold_the_originals_values():
    albef = validate(load_config("configs/VQA.yaml"), task="vqa")
    assert albef["image_res"] == 384 and albef["k_test"] == 128 and albef["batch_size_train"] == 32
    assert albef["batch_size_test"] == 16 and albef["eos"] == "[SEP]" and albef["optimizer"]["lr"] == 2e-5
    assert albef["schedular"]["epochs"] == 8 and albef["schedular"]["warmup_epochs"] == 4 and albef["alpha"] == 0.4
    grit = validate(load_config("configs/VQA_grit.yaml"), task="vqa")
    assert grit["distill"] is False and grit["alpha"] == 0
    vicha = validate(load_config("configs/VQA_vicha.yaml"), task="vqa")
    assert vicha["image_res"] == 380 and vicha["kw_img_model"] is True and vicha["batch_size_train"] == 16
    validate(load_config("configs/demo/VQA.yaml"), task="vqa")


def test_shipped_nlvr_and_ve_configs_hold_the_originals_values():
    albef = validate(load_config("configs/NLVR.yaml"), task="nlvr")
    assert albef["batch_size"] == 16 and albef["image_res"] == 384 and albef["schedular"]["epochs"] == 10
    assert albef["distill"] is True and albef["alpha"] == 0.4 and albef["train_crop_scale"] == [0.5, 1.0]
    assert validate(load_config("configs/NLVR_grit.yaml"), task="nlvr")["distill"] is False
    vicha = validate(load_config("configs/NLVR_vicha.yaml"), task="nlvr")
    assert vicha["kw_img_model"] is True and vicha["batch_size"] == 8 and vicha["image_res"] == 380
    ve = validate(load_config("configs/VE.yaml"), task="ve")
    assert ve["alpha_warm_up"] is False and ve["batch_size_train"] == 32 and ve["batch_size_test"] == 64
    assert ve["schedular"]["epochs"] == 5
    assert validate(load_config("configs/VE_vicha.yaml"), task="ve")["batch_size_train"] == 16
    ta = validate(load_config("configs/NLVR_pretrain.yaml"), task="pretrain_nlvr")
    assert ta["batch_size"] == 64 and ta["image_res"] == 256 and ta["schedular"]["epochs"] == 1
    assert validate(load_config("configs/NLVR_pretrain_vicha.yaml"), task="pretrain_nlvr")["batch_size"] == 32
    for name, task in (("NLVR_pretrain", "pretrain_nlvr"), ("NLVR", "nlvr"), ("VE", "ve")):
        validate(load_config(f"configs/demo/{name}.yaml"), task=task)
