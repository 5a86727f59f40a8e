"""The process group a GPU run builds, where every collective sends its tensors, and the layering rule."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_group(monkeypatch, cuda):
    import engine.distributed as d
    calls = {}
    monkeypatch.setattr(d.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(d.torch.cuda, "set_device", lambda i: calls.setdefault("device", i))
    monkeypatch.setattr(d.dist, "init_process_group", lambda **kw: calls.update(kw))
    monkeypatch.setattr(d, "barrier", lambda: None)
    monkeypatch.setattr(d, "set_comm_device", lambda dev: calls.setdefault("comm", str(dev)))
    return d, calls


def test_a_gpu_run_gets_nccl_for_cuda_and_gloo_for_cpu_tensors(monkeypatch):
    d, calls = fake_group(monkeypatch, cuda=True)
    for k, v in {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}.items():
        monkeypatch.setenv(k, v)
    assert d.init_distributed("cuda") == (3, 8, 3)
    # NCCL alone has no CPU backend: a CPU counter or an object collective would crash at the end of epoch 0
    assert calls["backend"] == "cpu:gloo,cuda:nccl" and calls["device"] == 3 and calls["comm"] == "cuda:3"
    d, calls = fake_group(monkeypatch, cuda=False)
    assert d.init_distributed("cpu") == (3, 8, 3) and calls["backend"] == "gloo" and calls["comm"] == "cpu"


def test_force_process_group_builds_a_group_of_one(monkeypatch):
    d, calls = fake_group(monkeypatch, cuda=True)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert d.init_distributed("cuda") == (0, 1, 0) and not calls   # a plain process: no group
    assert d.init_distributed("cuda", force=True) == (0, 1, 0)
    assert calls["backend"] == "cpu:gloo,cuda:nccl" and calls["world_size"] == 1
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"


def test_collectives_send_on_the_comm_device_and_return_on_the_callers(monkeypatch):
    """A CPU tensor handed to all_reduce_sum on a GPU run travels on the GPU (recorded here with a fake
    torch.distributed: the comm device is 'meta', which no caller uses)."""
    import utils
    seen = []
    monkeypatch.setattr(utils, "is_dist", lambda: True)
    monkeypatch.setattr(utils, "get_world_size", lambda: 2)
    monkeypatch.setattr(utils, "_COMM_DEVICE", torch.device("meta"))
    monkeypatch.setattr(utils.dist, "all_reduce", lambda t: seen.append(("all_reduce", t.device.type)))
    monkeypatch.setattr(utils.dist, "all_gather", lambda out, t: seen.append(("all_gather", t.device.type)))
    # meta tensors cannot be copied back: stand in for the way back
    monkeypatch.setattr(utils, "_back", lambda t, like: torch.zeros(t.shape, dtype=t.dtype, device=like.device))
    x = torch.ones(3, dtype=torch.float64)
    assert utils.all_reduce_sum(x) is x   # in place, on the caller's device
    out = utils.concat_all_gather(torch.ones(2, 4))
    assert seen == [("all_reduce", "meta"), ("all_gather", "meta")]
    assert out.device.type == "cpu" and out.shape == (4, 4)   # back on the caller's device, ranks stacked


@pytest.mark.slow
def test_check_mode_refuses_a_collective_that_bypasses_utils(tmp_path):
    script = tmp_path / "bypass.py"
    script.write_text(f"""
import os, sys, torch
sys.path.insert(0, {ROOT!r})
import utils   # installs the check (ALBEF_CHECK_COLLECTIVES=1)
import torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29755")
dist.init_process_group("gloo", rank=0, world_size=1)
utils.all_reduce_sum(torch.ones(1))   # fine: through utils
try:
    dist.all_reduce(torch.ones(1))
except RuntimeError as e:
    print("refused:", e)
""")
    env = {**os.environ, "ALBEF_CHECK_COLLECTIVES": "1"}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "refused: torch.distributed.all_reduce called outside utils.py" in r.stdout


def test_models_and_datasets_import_nothing_from_the_engine():
    r = subprocess.run(["grep", "-rn", r"from engine\|import engine", "models", "dataset"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.stdout == ""


def test_no_collective_outside_utils():
    r = subprocess.run(["grep", "-rnE", r"dist\.(all_reduce|all_gather|broadcast|barrier|gather|reduce|scatter)\(",
                        "--include=*.py", "."], cwd=ROOT, capture_output=True, text=True)
    hits = [line for line in r.stdout.splitlines()
            if not line.startswith(("./utils.py", "./tests/", "./.venv")) and "/.venv" not in line]
    assert hits == []


@pytest.mark.parametrize("names", [None, ["text_encoder"]])
def test_momentum_copies_are_remade_from_a_checkpoint_without_them(tmp_path, names):
    from conftest import tiny_config
    from models import MODELS
    from models.checkpoint import load_checkpoint
    torch.manual_seed(0)
    src = MODELS["pretrain"](tiny_config())
    sd = src.state_dict()
    drop = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.") if names is None \
        else ("text_encoder_m.",)
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith(drop)}}, tmp_path / "no_m.pth")
    torch.manual_seed(1)
    dst = MODELS["retrieval"](tiny_config())
    with torch.no_grad():   # make the existing momentum weights visibly different
        for p in dst.text_encoder_m.parameters():
            p.add_(1.0)
    from models.checkpoint import strip_bert
    report = load_checkpoint(dst, str(tmp_path / "no_m.pth"), remap=strip_bert, verbose=False)
    assert "text_encoder" in report.momentum_copied
    for online, mom in zip(dst.text_encoder.parameters(), dst.text_encoder_m.parameters()):
        assert torch.equal(online, mom)
    for online, mom in zip(dst.visual_encoder.parameters(), dst.visual_encoder_m.parameters()):
        assert torch.equal(online, mom)   # either copied now or loaded equal to what the checkpoint had
