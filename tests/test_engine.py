"""End-to-end runs of Pretrain.py: resume after SIGKILL, 2-process gloo, atomic checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def write_config(world, path, **extra):
    cfg = {
        "train_file": [os.path.join(world, "pretrain.json")], "image_root": world,
        "tokenizer": os.path.join(world, "vocab"),
        "bert_config": {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 64, "fusion_layer": 1, "encoder_width": 32,
                        "max_position_embeddings": 40},
        "image_res": 32, "patch_size": 8, "vision_width": 32, "vision_depth": 1, "vision_heads": 2, "embed_dim": 16,
        "batch_size": 8, "temp": 0.07, "mlm_probability": 0.15, "queue_size": 48, "momentum": 0.995, "alpha": 0.4,
        "num_workers": 1, "print_freq": 4, "ckpt_every_steps": 3, "ckpt_keep_last": 2, "tensorboard": False,
        "optimizer": {"opt": "adamW", "lr": 1e-3, "weight_decay": 0.02},
        "schedular": {"sched": "cosine", "lr": 1e-3, "epochs": 2, "min_lr": 1e-5, "decay_rate": 1, "warmup_lr": 1e-5,
                      "warmup_epochs": 2, "cooldown_epochs": 0, "warmup_block": 2},
    }
    cfg.update(extra)
    with open(path, "w") as f:
        json.dump(cfg, f)   # JSON is YAML
    return path


def pretrain_checkpoint(world, tmp_path, seed=0):
    """A randomly initialised tiny pretraining checkpoint (ALBEF's layout) for the finetuning launchers."""
    from models import MODELS
    pre = json.load(open(write_config(world, str(tmp_path / "pre.yaml"))))
    torch.manual_seed(seed)
    ckpt = str(tmp_path / "pretrain.pth")
    torch.save({"model": MODELS["pretrain"](pre).state_dict()}, ckpt)
    return ckpt


def pretrain_cmd(config, out, *extra):
    return [PY, os.path.join(ROOT, "Pretrain.py"), "--config", config, "--output_dir", out, "--device", "cpu", *extra]


def run(cmd, env_extra=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600, **kw)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


GRIT = dict(use_momentum=False, distill=False, itc_consistency_weight=0.2, itm_negative_selection="argmax",
            mlm_probability=0.5, grit={"collect_size": 48, "search_space": 16})


def mafa_options(tmp_path):
    """GRIT plus ECM with a (random-weight) filter of the same tiny shape, written to tmp_path."""
    from conftest import tiny_config
    from models import MODELS
    cfg = json.load(open(write_config("", str(tmp_path / "probe.yaml"))))
    filt = {k: cfg[k] for k in ("bert_config", "image_res", "patch_size", "vision_width", "vision_depth",
                                "vision_heads", "embed_dim", "temp")}
    filt.update(use_momentum=False, distill=False)
    with open(tmp_path / "filter.yaml", "w") as f:
        json.dump(filt, f)
    torch.manual_seed(0)
    torch.save({"model": MODELS["retrieval"]({**tiny_config(), **filt}).state_dict()}, tmp_path / "filter.pth")
    return dict(GRIT, itc_consistency_weight=0.0, itc_label_smoothing=0.5,
                ecm={"filter_config": str(tmp_path / "filter.yaml"), "filter_checkpoint": str(tmp_path / "filter.pth"),
                     "low_threshold": 0.45, "high_threshold": 0.5})


def kill_when_saved(config, out, name):
    """Run Pretrain.py and SIGKILL its process group as soon as checkpoint ``name`` exists (before the end)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(pretrain_cmd(config, out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(out, name)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "checkpoint_01.pth")), "run finished before it was killed"


def grit_runs_end_equal(world, tmp_path, runs):
    """GRIT pretraining over each ``{name: train_file}``: bitwise the same weights and grouped order after 2
    epochs (the readers gave the same samples at every step)."""
    outs = []
    for name, files in runs.items():
        cfg = write_config(world, str(tmp_path / f"{name}.yaml"), ckpt_every_steps=0, train_file=files, **GRIT)
        run(pretrain_cmd(cfg, str(tmp_path / name)))
        outs.append(load(os.path.join(tmp_path, name, "checkpoint_01.pth")))
    a, b = outs
    assert [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])] == []
    assert torch.equal(a["components"]["grit"]["orders"][2], b["components"]["grit"]["orders"][2])


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["albef", "grit", "mafa"])
def test_sigkill_and_resume_ends_with_identical_weights(tiny_world, tmp_path, recipe):
    # grit / mafa: killed while epoch 1 runs in grouped order with a half-full collection queue
    extra = {"albef": {}, "grit": GRIT}.get(recipe) or mafa_options(tmp_path)
    config = write_config(tiny_world, str(tmp_path / "c.yaml"), **extra)
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    run(pretrain_cmd(config, ref_out))
    kill_when_saved(config, out, "checkpoint_step00000015.pth")   # mid-way through epoch 1
    r = run(pretrain_cmd(config, out, "--resume", "latest"))
    assert "resumed from" in r.stdout
    a, b = load(os.path.join(ref_out, "checkpoint_01.pth")), load(os.path.join(out, "checkpoint_01.pth"))
    assert a["step"] == b["step"] == 24
    diff = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert diff == []
    if recipe != "albef":   # the order GRIT hands to epoch 2 is the same too
        assert torch.equal(a["components"]["grit"]["orders"][2], b["components"]["grit"]["orders"][2])
    if recipe == "mafa":
        assert not any(k.startswith("_discriminator") for k in a["model"])   # the filter is never saved
        rec = [json.loads(line) for line in open(os.path.join(ref_out, "log.txt"))][-1]
        assert rec["ecm_connections"] + rec["ecm_negatives"] + rec["ecm_ambiguous"] == 2 * 12 * 8
    assert len([f for f in os.listdir(out) if f.startswith("checkpoint_step")]) <= 2   # last K kept
    log = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    ref_log = [json.loads(line) for line in open(os.path.join(ref_out, "log.txt"))]
    assert log[-1]["epoch"] == 1 and "train_loss_ita" in log[-1]
    # epoch averages and counts after a mid-epoch resume cover the whole epoch, as without the kill
    for key in ("train_loss_ita", "train_loss_mlm", "train_hard_neg_sim", "ecm_connections"):
        assert log[-1].get(key) == ref_log[-1].get(key), key


@pytest.mark.slow
def test_loader_settings_change_no_weight(tiny_world, tmp_path):
    """uint8 images normalised in the step, workers kept across epochs, pinned memory: the same weights as
    float images read in the main process, bitwise, over two epochs."""
    outs = {}
    for name, extra in (("plain", dict(num_workers=0, uint8_images=False, persistent_workers=False)),
                        ("gpu_settings", dict(num_workers=2, uint8_images=True, persistent_workers=True,
                                              pin_memory=True, prefetch_factor=2))):
        config = write_config(tiny_world, str(tmp_path / f"{name}.yaml"), ckpt_every_steps=0, **extra)
        run(pretrain_cmd(config, str(tmp_path / name)))
        outs[name] = load(os.path.join(tmp_path, name, "checkpoint_01.pth"))["model"]
    assert [k for k in outs["plain"] if not torch.equal(outs["plain"][k], outs["gpu_settings"][k])] == []


def checked_collectives(log_prefix, world):
    """The collectives each rank ran under ALBEF_CHECK_COLLECTIVES (every torch.distributed collective came
    through utils, or the run would have failed): (op, device type, bytes)."""
    out = []
    for r in range(world):
        with open(f"{log_prefix}.rank{r}") as f:
            rec = json.load(f)
        out.append((rec["comm_device"], [tuple(x) for x in rec["log"]]))
    return out


@pytest.mark.slow
def test_two_process_gloo_run_gathers_the_queue_across_ranks(tiny_world, tmp_path):
    config = write_config(tiny_world, str(tmp_path / "c.yaml"))
    out = str(tmp_path / "ddp")
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731",
           os.path.join(ROOT, "Pretrain.py"), "--config", config, "--output_dir", out, "--device", "cpu",
           "--opts", "max_steps=4", "ckpt_every_steps=0", "grad_accum_steps=2"]
    log = str(tmp_path / "collectives")
    run(cmd, env_extra={"ALBEF_CHECK_COLLECTIVES": "1", "ALBEF_CHECK_COLLECTIVES_LOG": log})
    # max_steps counts optimizer steps: 4 steps of 2 micro-batches
    ck = load(os.path.join(out, "checkpoint_step00000004.pth"))
    # 8 forward passes x (2 ranks x 8) gathered features = 128 columns, mod 48
    assert ck["model"]["queue_ptr"].item() == (8 * 16) % 48
    assert ck["world_size"] == 2
    rank1 = load(os.path.join(out, "checkpoint_step00000004.rank001.pth"))   # rank 1's own state
    assert not torch.equal(ck["rank_state"]["rng"]["torch"], rank1["rng"]["torch"])   # ranks draw different masks
    for device, ops in checked_collectives(log, 2):
        assert device == "cpu" and ops, ops
        assert {op for op, _, _ in ops} >= {"all_gather", "all_reduce", "barrier"}
        assert all(dev in ("cpu", "object") for _, dev, _ in ops)


@pytest.mark.slow
def test_two_process_gloo_run_trains_with_grit_grouping(tiny_world, tmp_path):
    config = write_config(tiny_world, str(tmp_path / "c.yaml"), **GRIT)
    out = str(tmp_path / "grit")
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29733",
           os.path.join(ROOT, "Pretrain.py"), "--config", config, "--output_dir", out, "--device", "cpu",
           "--opts", "ckpt_every_steps=5", "grit.collect_size=16"]
    log = str(tmp_path / "collectives")
    run(cmd, env_extra={"ALBEF_CHECK_COLLECTIVES": "1", "ALBEF_CHECK_COLLECTIVES_LOG": log})
    first, last = load(os.path.join(out, "checkpoint_00.pth")), load(os.path.join(out, "checkpoint_01.pth"))
    data = json.load(open(os.path.join(tiny_world, "pretrain.json")))
    for ck, epoch in ((first, 1), (last, 2)):
        order = ck["components"]["grit"]["orders"][epoch]
        assert len(order) == 2 * 6 * 8 and len(set(order.tolist())) == len(order)   # 2 ranks x 6 steps x 8
        assert 0 <= int(order.min()) and int(order.max()) < len(data)
    # a mid-epoch checkpoint: each rank's half-full collection queue is in its own file, never gathered
    mid = load(os.path.join(out, "checkpoint_step00000005.pth"))
    mid1 = load(os.path.join(out, "checkpoint_step00000005.rank001.pth"))
    q0, q1 = mid["rank_state"]["components"]["grit"], mid1["components"]["grit"]
    assert q0["ptr"] == q1["ptr"] == 8 and not torch.equal(q0["idx"], q1["idx"])
    for _, ops in checked_collectives(log, 2):   # objects through all_gather_object stay small
        assert max(b for op, _, b in ops if op == "all_gather_object") < 64_000, ops
    log = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    assert [r["epoch"] for r in log] == [0, 1] and "grit_hardness_grouped" in log[-1]


SAVER = """
import sys, torch
sys.path.insert(0, {root!r})
from engine.checkpointing import atomic_save
i = 0
while True:
    atomic_save({{"i": i, "w": torch.full((1_000_000,), float(i))}}, {path!r})
    i += 1
"""


@pytest.mark.slow
def test_kill_during_save_leaves_previous_checkpoint_usable(tmp_path):
    path = str(tmp_path / "ck.pth")
    script = tmp_path / "saver.py"
    script.write_text(SAVER.format(root=ROOT, path=path))
    for delay in (0.0, 0.05, 0.13, 0.31):
        proc = subprocess.Popen([PY, str(script)])
        deadline = time.time() + 120
        while not os.path.exists(path) and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        proc.kill()   # SIGKILL, most likely in the middle of writing the next one
        proc.wait()
        ck = load(path)
        assert torch.all(ck["w"] == ck["i"])
        leftovers = [f for f in os.listdir(tmp_path) if ".tmp." in f]
        for f in leftovers:
            os.remove(tmp_path / f)


def test_resume_latest_with_nothing_saved_starts_fresh(tmp_path):
    from engine.checkpointing import resolve_resume
    assert resolve_resume("latest", str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="--resume"):
        resolve_resume(str(tmp_path / "nope.pth"), str(tmp_path))
