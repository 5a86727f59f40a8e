"""Retrieval.py end to end on the tiny world: finetune from a pretraining checkpoint, select on val, test."""
import json
import os

import pytest
import torch

from test_engine import PY, ROOT, load, pretrain_cmd, run, write_config


def retrieval_config(world, path, **extra):
    cfg = json.load(open(write_config(world, path)))
    cfg.pop("train_file"), cfg.pop("batch_size"), cfg.pop("mlm_probability")
    cfg.update({"train_file": [os.path.join(world, "retrieval_train.json")],
                "val_file": os.path.join(world, "retrieval_val.json"),
                "test_file": os.path.join(world, "retrieval_test.json"),
                "batch_size_train": 8, "batch_size_test": 16, "k_test": 6, "ckpt_every_steps": 0})
    cfg.update(extra)
    json.dump(cfg, open(path, "w"))
    return path


def retrieval_cmd(config, out, *extra):
    return [PY, os.path.join(ROOT, "Retrieval.py"), "--config", config, "--output_dir", out, "--device", "cpu", *extra]


@pytest.mark.slow
def test_finetune_from_pretraining_selects_on_val_and_tests_the_selected_checkpoint(tiny_world, tmp_path):
    pre = str(tmp_path / "pre")
    run(pretrain_cmd(write_config(tiny_world, str(tmp_path / "p.yaml")), pre, "--opts", "max_steps=2"))
    config = retrieval_config(tiny_world, str(tmp_path / "r.yaml"))
    out = str(tmp_path / "ret")
    r = run(retrieval_cmd(config, out, "--checkpoint", os.path.join(pre, "checkpoint_step00000002.pth")))
    assert "WARNING" not in r.stdout   # every missing key is expected (new heads, momentum copies)
    full = open(os.path.join(out, "run.log")).read()   # the whole load report
    assert "text_encoder.bert" not in full.split("missing keys")[1].split("\n")[0]   # bert. stripped
    rows = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    assert [row["split"] for row in rows] == ["val", "val", "test"]   # one val per epoch, test once
    best = json.load(open(os.path.join(out, "best.json")))
    vals = [row["r_mean"] for row in rows[:2]]
    assert best["epoch"] == vals.index(max(vals)) and rows[-1]["epoch"] == best["epoch"]
    assert "selected on val" in rows[-1]["checkpoint"]
    table = open(os.path.join(out, "results.md")).read()
    assert table.count("\n| ") == 3 and "txt_r1" in table
    # --evaluate on the selected checkpoint reproduces the logged test metrics
    ev = str(tmp_path / "ev")
    run(retrieval_cmd(config, ev, "--evaluate", "--checkpoint", os.path.join(out, "checkpoint_best.pth")))
    again = [json.loads(line) for line in open(os.path.join(ev, "results.jsonl"))]
    assert [row["split"] for row in again] == ["val", "test"]
    keys = ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean")
    assert {k: again[1][k] for k in keys} == {k: rows[-1][k] for k in keys}
    assert load(os.path.join(out, "checkpoint_best.pth"))["model"]["idx_queue"].max() >= 0   # idx queue filled


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(tiny_world, tmp_path):
    config = retrieval_config(tiny_world, str(tmp_path / "r.yaml"))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run(retrieval_cmd(config, one, "--evaluate"))
    run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29733",
         os.path.join(ROOT, "Retrieval.py"), "--config", config, "--output_dir", two, "--device", "cpu", "--evaluate"])
    a = [json.loads(line) for line in open(os.path.join(one, "results.jsonl"))]
    b = [json.loads(line) for line in open(os.path.join(two, "results.jsonl"))]
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "checkpoint"} == {k: v for k, v in y.items() if k != "checkpoint"}
