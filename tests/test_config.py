import pytest

from engine.config import ConfigError, apply_overrides, load_config, str2bool, validate


def test_albef_configs_validate_and_keep_original_values():
    cfg = validate(load_config("configs/Pretrain.yaml"))
    assert cfg["queue_size"] == 65536 and cfg["schedular"]["warmup_epochs"] == 20
    assert cfg["optimizer"] == {"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02}
    validate(load_config("configs/demo/Pretrain.yaml"))
    grit = validate(load_config("configs/Pretrain_grit.yaml"))   # GRIT-VLP's values
    assert grit["grit"] == {"queue_size": 48000, "search_space": 1920} and grit["mlm_probability"] == 0.5
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
    assert id(m.vision_proj_m.weight) not in ids and id(m.temp) in {id(p) for p in no_decay["params"]}
    assert all(p.ndim <= 1 for p in no_decay["params"]) and all(p.ndim >= 2 for p in decay["params"])
