"""Exact resume where users lose work: a kill during an evaluation, --checkpoint with --resume latest on a fresh
dir, stale temp files, failed saves, and GRIT / MAFA runs over unreadable images."""
import json
import os
import re
import shutil

import pytest
import torch

from test_engine import GRIT, PY, ROOT, load, mafa_options, pretrain_cmd, run, write_config

# runs Pretrain.py with the zero-shot evaluation of epoch KILL_EPOCH killed (SIGKILL) half-way: after the
# scores are computed, before anything is returned or logged
KILLER = """
import os, runpy, signal, sys
sys.path.insert(0, {root!r})
import tasks.retrieval as ev
real, log = ev.evaluate_split, os.path.join({out!r}, "log.txt")
def evaluate_split(*a, **k):
    out = real(*a, **k)
    if not {train!r} and (len(open(log).readlines()) if os.path.exists(log) else 0) == {epoch}:   # the evaluation of epoch {epoch}
        os.kill(os.getpid(), signal.SIGKILL)
    return out
ev.evaluate_split = evaluate_split
import engine.trainer as tr
step = tr.Trainer._step
def killing_step(self, model, batch, epoch, i):
    if {train!r} and epoch == {epoch} and i == 2:   # training, after the previous evaluation was logged
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, model, batch, epoch, i)
tr.Trainer._step = killing_step
sys.argv = {argv!r}
runpy.run_path(os.path.join({root!r}, "Pretrain.py"), run_name="__main__")
"""


def killed_during_eval(config, out, epoch, tmp_path, train=False):
    """Run Pretrain.py and SIGKILL it inside the evaluation of ``epoch`` (``train``: in its third training
    step); returns the exit code."""
    import subprocess
    os.makedirs(out, exist_ok=True)
    argv = pretrain_cmd(config, out)[1:]
    script = tmp_path / f"killer{epoch}{train}.py"
    script.write_text(KILLER.format(root=ROOT, out=out, epoch=epoch, argv=argv, train=train))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([PY, str(script)], cwd=ROOT, env=env, capture_output=True, timeout=600).returncode


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.txt"))]


@pytest.mark.slow
def test_kill_during_evaluation_resumes_exactly_and_finishes_the_evaluation(tiny_world, tmp_path):
    config = write_config(tiny_world, str(tmp_path / "c.yaml"), eval_every=1, ckpt_every_steps=0,
                          test_file=os.path.join(tiny_world, "retrieval_test.json"), batch_size_test=16,
                          k_test=4, num_workers=1)
    ref = str(tmp_path / "ref")
    run(pretrain_cmd(config, ref))
    ref_log = records(ref)
    assert [r["epoch"] for r in ref_log] == [0, 1] and all("test_r_mean" in r for r in ref_log)

    # killed in the epoch-0 evaluation: the resume finishes it, then trains epoch 1 exactly as the reference
    out = str(tmp_path / "kill0")
    assert killed_during_eval(config, out, 0, tmp_path) == -9
    assert os.path.exists(os.path.join(out, "checkpoint_00.pth")) and not os.path.exists(os.path.join(out, "log.txt"))
    r = run(pretrain_cmd(config, out, "--resume", "latest"))
    assert "finishing epoch 0: evaluation" in r.stdout
    a, b = load(os.path.join(ref, "checkpoint_01.pth")), load(os.path.join(out, "checkpoint_01.pth"))
    diff = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert diff == [], f"{len(diff)} of {len(a['model'])} tensors differ"
    log = records(out)
    assert [x["epoch"] for x in log] == [0, 1]
    for x, y in zip(log, ref_log):   # the same evaluations, and epoch averages over the whole epoch
        assert x["test_r_mean"] == y["test_r_mean"] and x["train_loss_ita"] == y["train_loss_ita"]

    # killed while training epoch 1, after the epoch-0 evaluation was logged: the resume starts from
    # checkpoint_00 and must find the RNG streams as the reference had them (the evaluation used its own)
    out = str(tmp_path / "kill_train1")
    assert killed_during_eval(config, out, 1, tmp_path, train=True) == -9
    r = run(pretrain_cmd(config, out, "--resume", "latest"))
    assert "finishing" not in r.stdout
    b = load(os.path.join(out, "checkpoint_01.pth"))
    diff = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert diff == [], f"{len(diff)} of {len(a['model'])} tensors differ"

    # killed in the final evaluation: the resume runs it and writes its row; nothing is trained again
    out = str(tmp_path / "kill1")
    assert killed_during_eval(config, out, 1, tmp_path) == -9
    assert len(records(out)) == 1
    r = run(pretrain_cmd(config, out, "--resume", "latest"))
    assert "finishing epoch 1: evaluation" in r.stdout and "Train epoch" not in r.stdout
    log = records(out)
    assert [x["epoch"] for x in log] == [0, 1] and log[1]["test_r_mean"] == ref_log[1]["test_r_mean"]
    rows = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    assert [row["epoch"] for row in rows] == [0, 1]
    # a third start has nothing left to do
    r = run(pretrain_cmd(config, out, "--resume", "latest"))
    assert "finishing" not in r.stdout and len(records(out)) == 2


@pytest.mark.slow
def test_checkpoint_with_resume_latest_on_an_empty_dir_initialises_and_stale_temps_go(tiny_world, tmp_path):
    config = write_config(tiny_world, str(tmp_path / "c.yaml"), ckpt_every_steps=0)
    first = str(tmp_path / "first")
    run(pretrain_cmd(config, first, "--opts", "max_steps=2"))
    init = os.path.join(first, "checkpoint_step00000002.pth")
    out = str(tmp_path / "fresh")
    os.makedirs(out)
    stale = os.path.join(out, "checkpoint_step00000001.pth.tmp.4242")   # a save killed mid-write
    with open(stale, "wb") as f:
        f.write(b"\0" * 1000)
    r = run(pretrain_cmd(config, out, "--checkpoint", init, "--resume", "latest", "--opts", "max_steps=1",
                         "optimizer.lr=0.0", "schedular.lr=0.0", "schedular.warmup_lr=0.0", "schedular.min_lr=0.0"))
    assert "nothing to resume" in r.stdout and f"loaded {init}" in r.stdout
    assert not os.path.exists(stale)
    a, b = load(init)["model"], load(os.path.join(out, "checkpoint_step00000001.pth"))["model"]
    # lr 0: the weights stay those of --checkpoint (they would be a fresh random init if it were ignored)
    assert torch.equal(a["visual_encoder.patch_embed.proj.weight"], b["visual_encoder.patch_embed.proj.weight"])
    # the same command after a preemption resumes the run instead of starting from --checkpoint again
    r = run(pretrain_cmd(config, out, "--checkpoint", init, "--resume", "latest", "--opts", "max_steps=1"))
    assert "resumed from" in r.stdout and f"loaded {init}" not in r.stdout and "Train epoch" not in r.stdout
    # a larger max_steps continues the stopped run where it stopped
    run(pretrain_cmd(config, out, "--resume", "latest", "--opts", "max_steps=3"))
    assert load(os.path.join(out, "checkpoint_step00000003.pth"))["iter"] == 3


class FullDisk:
    """A file on a disk that fills after ``room`` bytes: each write past it raises ENOSPC (as a tmpfs does)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            import errno
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_failed_save_names_the_path_the_size_and_the_free_space(tmp_path, monkeypatch):
    """torch's own writer on a disk that fills: its RuntimeError ('unexpected pos') becomes the OSError."""
    import builtins
    from engine import checkpointing as ck
    path = str(tmp_path / "ck.pth")
    ck.atomic_save({"w": torch.ones(3)}, path)   # the previous checkpoint
    real = builtins.open
    monkeypatch.setattr(ck, "open", lambda p, mode: FullDisk(real(p, mode), 200_000), raising=False)
    # 2 MiB of tensors (4 bytes x 2**19 floats, stored twice under two names: counted once)
    w = torch.zeros(2 ** 19)
    with pytest.raises(OSError, match=r"could not write '.*ck.pth': No space left on device \(needs about 2\.0 MiB"
                                      r".* MiB free in .*\); the partial file was removed") as e:
        ck.atomic_save({"a": w, "b": w, "step": 1}, path)
    assert e.value.errno == 28
    assert os.listdir(tmp_path) == ["ck.pth"]   # no temp file left behind; the previous file intact
    assert torch.equal(load(path)["w"], torch.ones(3))
    with pytest.raises(AttributeError, match="pickle"):   # not a write failure: raised as it is, no temp file
        monkeypatch.setattr(ck, "open", real, raising=False)
        ck.atomic_save({"f": lambda: 0}, path)
    assert os.listdir(tmp_path) == ["ck.pth"]


# runs Pretrain.py on a disk that fills up when rank {rank} writes its file of the epoch-0 checkpoint
FILLER = """
import builtins, os, runpy, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from test_resume import FullDisk
import engine.checkpointing as ck
real = builtins.open
def full_open(path, mode="r", *a, **k):
    f = real(path, mode, *a, **k)
    name = os.path.basename(path)
    mine = name.startswith("checkpoint_00.rank001" if {rank} else "checkpoint_00.pth")
    return FullDisk(f, 4096) if ("w" in mode and mine and {fail}) else f
ck.open = full_open
sys.argv = {argv!r}
runpy.run_path(os.path.join({root!r}, "Pretrain.py"), run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("failing_rank", [0, 1])
def test_disk_full_stops_both_ranks_and_the_run_resumes_from_the_last_checkpoint(tiny_world, tmp_path, failing_rank):
    import subprocess
    config = write_config(tiny_world, str(tmp_path / "c.yaml"), ckpt_every_steps=3)   # 6 steps an epoch on 2 ranks
    out = str(tmp_path / "out")

    def launch(fail, port):
        script = tmp_path / f"filler{fail}.py"
        argv = pretrain_cmd(config, out, "--resume", "latest")[1:]
        script.write_text(FILLER.format(root=ROOT, tests=os.path.dirname(__file__), rank=failing_rank, fail=fail,
                                        argv=argv))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        return subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                               str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    r = launch(True, 29751 + failing_rank)
    text = r.stdout + r.stderr
    assert r.returncode != 0
    name = "checkpoint_00.rank001.pth" if failing_rank else "checkpoint_00.pth"
    assert re.search(rf"could not write '[^']*{name}': No space left on device \(needs about [\d.]+ MiB.* MiB free in",
                     text), text[-3000:]
    assert "a write to output_dir failed on another rank" in text   # the other rank stopped too, not left waiting
    assert not [f for f in os.listdir(out) if ".tmp." in f]   # the partial file is gone at once
    from engine.checkpointing import resolve_resume
    assert resolve_resume("latest", out).endswith("checkpoint_step00000003.pth")   # the previous one, loadable
    assert load(os.path.join(out, "checkpoint_step00000003.pth"))["step"] == 3
    r = launch(False, 29761 + failing_rank)   # space again: the run resumes and ends
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and [x["epoch"] for x in records(out)] == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["grit", "mafa"])
def test_grit_and_mafa_train_two_epochs_over_unreadable_images(tiny_world, tmp_path, recipe):
    data = json.load(open(os.path.join(tiny_world, "pretrain.json")))
    world = str(tmp_path / "world")
    shutil.copytree(tiny_world, world)
    gone = [d["image"] for d in data[5:11]]   # 6 of 96 images unreadable: one missing, the rest corrupt
    os.remove(os.path.join(world, gone[0]))
    for g in gone[1:]:
        with open(os.path.join(world, g), "wb") as f:
            f.write(b"not a jpeg")
    extra = GRIT if recipe == "grit" else mafa_options(tmp_path)
    config = write_config(world, str(tmp_path / "c.yaml"), max_bad_image_fraction=0.1, ckpt_every_steps=0, **extra)
    out = str(tmp_path / "out")
    r = run(pretrain_cmd(config, out))
    log = records(out)
    assert [x["epoch"] for x in log] == [0, 1]
    # counted once per image and epoch (12 steps x 8 read per epoch; replacements tried are not counted)
    assert log[0]["bad_images"]["count"] == 6 and log[0]["bad_images"]["seen"] == 96
    assert log[1]["bad_images"]["count"] == 12 and "skipped 12 unreadable" in r.stdout
    order = load(os.path.join(out, "checkpoint_01.pth"))["components"]["grit"]["orders"][2]
    assert len(set(order.tolist())) == len(order) == 96   # a permutation, the unreadable indices included


@pytest.mark.slow
def test_too_many_unreadable_images_stop_every_rank_with_the_last_checkpoint_intact(tiny_world, tmp_path):
    data = json.load(open(os.path.join(tiny_world, "pretrain.json")))
    world = str(tmp_path / "world")
    shutil.copytree(tiny_world, world)
    for d in data[::3]:   # a third unreadable
        os.remove(os.path.join(world, d["image"]))
    config = write_config(world, str(tmp_path / "c.yaml"), ckpt_every_steps=5)
    out = str(tmp_path / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    import subprocess
    r = subprocess.run(pretrain_cmd(config, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "max_bad_image_fraction" in r.stderr and "--resume latest" in r.stderr
    assert not [f for f in os.listdir(out) if ".tmp." in f]
    from engine.checkpointing import resolve_resume
    ck = load(resolve_resume("latest", out))   # the mid-epoch checkpoint before the stop loads and resumes
    assert ck["step"] == 10 and ck["iter"] == 10
