"""Bad input a user meets, each a clear message at start-up or a correct continuation: empty evaluation splits,
model selection with nothing to select on, truncated or foreign annotation stores, texts longer than the text
encoder's positions, annotation errors naming their file, cut shards warned once; and what a run prints."""
import json
import os
import subprocess

import pytest
import torch

from test_engine import PY, ROOT, write_config


def write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def override(config, **keys):
    """The config file ``config`` with ``keys`` set."""
    return write(config, {**json.load(open(config)), **keys})


def launch(launcher, config, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([PY, os.path.join(ROOT, launcher), "--config", config, "--output_dir", out, "--device", "cpu",
                           *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def configs(world, tmp_path):
    """One small config per launcher whose evaluation split can be emptied: (launcher, config, file key)."""
    from test_classification import task_config
    from test_grounding import grounding_config
    from test_vqa import vqa_config
    empty = write(tmp_path / "empty.json", [])
    pre = write_config(world, str(tmp_path / "pre.yaml"), test_file=empty)
    ret = json.load(open(write_config(world, str(tmp_path / "ret.yaml"))))
    ret.update(train_file=[os.path.join(world, "retrieval_train.json")], val_file=empty,
               test_file=os.path.join(world, "retrieval_test.json"), batch_size_train=8)
    g = json.load(open(grounding_config(world, str(tmp_path / "g.yaml"))))
    g["test_file"] = g["test_file"][1:]   # the test split's expressions only: no val expression
    return {"pretrain": ("Pretrain.py", pre, "test_file", "test"),
            "retrieval": ("Retrieval.py", write(tmp_path / "ret.yaml", ret), "val_file", "val"),
            "vqa": ("VQA.py", override(vqa_config(world, str(tmp_path / "vqa.yaml")), test_file=empty), "test_file",
                    "test"),
            "nlvr": ("NLVR.py", override(task_config(world, str(tmp_path / "nlvr.yaml"), "nlvr"), val_file=empty),
                     "val_file", "val"),
            "ve": ("VE.py", override(task_config(world, str(tmp_path / "ve.yaml"), "ve"), test_file=empty),
                   "test_file", "test"),
            "grounding": ("Grounding.py", write(tmp_path / "g.yaml", g), "test_file", "val")}


@pytest.mark.slow
@pytest.mark.parametrize("task", ["pretrain", "retrieval", "vqa", "nlvr", "ve", "grounding"])
def test_an_empty_evaluation_split_stops_the_launcher_at_start_up(tiny_world, tmp_path, task):
    launcher, config, key, split = configs(tiny_world, tmp_path)[task]
    r = launch(launcher, config, str(tmp_path / "out"), *(["--block_num", "1"] if task == "grounding" else []))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    files = json.load(open(config))[key]
    files = files if isinstance(files, list) else [files]
    assert f"error: config key '{key}' ({', '.join(files)}): the {split} split has no examples" in r.stderr, r.stderr
    assert "empty_splits: skip" in r.stderr and "Traceback" not in r.stderr
    assert "Train epoch" not in r.stdout   # known before any training


@pytest.mark.slow
def test_a_skipped_empty_val_split_writes_no_metric_and_selection_needs_model_selection_last(tiny_world, tmp_path):
    launcher, config, _, _ = configs(tiny_world, tmp_path)["nlvr"]
    out = str(tmp_path / "out")
    r = launch(launcher, config, out, "--opts", "empty_splits=skip")
    assert r.returncode == 1 and "Train epoch" not in r.stdout
    assert "warning: config key 'val_file'" in r.stdout and "skipped (empty_splits: skip)" in r.stdout
    assert "error: model selection (val_accuracy) needs a val split with examples" in r.stderr
    assert "model_selection: last" in r.stderr
    r = launch(launcher, config, out, "--opts", "empty_splits=skip", "model_selection=last", "max_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    assert [row["split"] for row in rows] == ["test"]   # no val row, never an accuracy over 0 examples
    assert rows[0]["checkpoint"] == "last epoch's weights (model_selection: last)" and rows[0]["examples"] == 23
    assert not os.path.exists(os.path.join(out, "checkpoint_best.pth"))
    # the closing lines say what was measured, with which weights, and where the files are
    done = r.stdout[r.stdout.index("\ndone: "):]
    assert done.startswith(f"\ndone: nlvr, test split {json.load(open(config))['test_file']}: accuracy "
                           f"{rows[0]['accuracy']:.2f}")
    assert f"in {out}: results.md, log.txt" in done


def test_a_truncated_or_foreign_arrow_store_names_the_file_the_key_and_the_fix(tiny_world, tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    from dataset import create_dataset
    from dataset.store import convert
    store = str(tmp_path / "corpus.arrow")
    convert([os.path.join(tiny_world, "pretrain.json")], store, log=lambda *_: None)
    cut = str(tmp_path / "cut.arrow")
    with open(store, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read()[:len(open(store, "rb").read()) // 2])   # a copy killed half-way
    foreign = str(tmp_path / "foreign.arrow")
    with pa.OSFile(foreign, "wb") as sink, pa.ipc.new_file(sink, pa.schema([("x", pa.int64())])) as w:
        w.write_batch(pa.record_batch([pa.array([1, 2])], names=["x"]))
    cfg = {"image_root": tiny_world, "image_res": 32}
    for path, what in ((cut, "is not a readable annotation store"), (foreign, "is an Arrow file but not an "
                                                                              "annotation store")):
        with pytest.raises(ValueError) as e:
            create_dataset("pretrain", {**cfg, "train_file": [path]})
        assert str(e.value).startswith(f"train_file: {path!r} {what}")
        assert f"python -m dataset.store --ann <JSON lists / shards> --out {path}" in str(e.value)


def test_texts_longer_than_the_positions_are_cut_to_them_and_counted(tiny_world):
    from models.tokenization import ALBEFTokenizer
    tok = ALBEFTokenizer(os.path.join(tiny_world, "vocab"))
    words = [w for w in open(os.path.join(tiny_world, "vocab", "vocab.txt")).read().split() if w.isalpha()][:3]
    long = " ".join(words * 20)   # 60 words, one piece each
    ids = tok.tok(long, add_special_tokens=False)["input_ids"]
    assert len(ids) == 60
    assert tok([long])["input_ids"].shape == (1, 61)   # no limit known: ALBEF's untruncated tokenisation
    tok.max_positions = 40
    out = tok([long, words[0]], padding="longest")
    assert out["input_ids"][0].tolist() == [tok.cls_token_id] + ids[:39] and out.texts_cut == 1
    assert out["input_ids"][1].tolist()[:2] == [tok.cls_token_id, ids[0]] and out["attention_mask"][1].sum() == 2
    short = tok([long], truncation=True, max_length=25)   # an asked-for truncation below the limit is unchanged
    assert short["input_ids"].shape == (1, 25) and short.texts_cut == 0 and tok.texts_cut == 1


@pytest.mark.slow
def test_vqa_evaluation_of_over_long_questions_cuts_and_counts_them(tiny_world, tmp_path):
    from test_engine import pretrain_checkpoint
    from test_vqa import vqa_config
    test = json.load(open(os.path.join(tiny_world, "vqa_test.json")))[:7]
    for q in test[:3]:   # 45 words: more than the tiny model's 40 positions, within ALBEF's 50 question words
        q["question"] = " ".join([q["question"].rstrip("?")] * 9)[:400]
        q["question"] = " ".join(q["question"].split()[:45])
    config = override(vqa_config(tiny_world, str(tmp_path / "v.yaml")), test_file=write(tmp_path / "t.json", test))
    out = str(tmp_path / "out")
    r = launch("VQA.py", config, out, "--checkpoint", pretrain_checkpoint(tiny_world, tmp_path), "--evaluate")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.load(open(os.path.join(out, "result", "vqa_result_evaluate_metrics.json")))
    assert metrics["texts_cut"] == 3 and metrics["questions"] == 7
    assert "3 questions were longer than the text encoder's positions" in r.stdout
    assert "cut to the text encoder's 40 positions" in r.stderr


def test_classification_annotation_errors_name_the_file_and_its_entry(tiny_world, tmp_path):
    from dataset import create_dataset
    ve = json.load(open(os.path.join(tiny_world, "ve_train.json")))[:4]
    bad = [dict(ve[0]), dict(ve[1], label="maybe")]
    files = [write(tmp_path / "a.json", ve), write(tmp_path / "b.json", bad)]
    with pytest.raises(ValueError, match=r"train_file '.*b\.json', entry 1: field 'label' must be one of"):
        create_dataset("ve_train", {"train_file": files, "image_root": tiny_world, "image_res": 32})


def test_a_cut_shard_is_warned_once_per_run_with_the_samples_lost(tiny_world, tmp_path, capsys):
    pytest.importorskip("webdataset")
    from webdataset import TarWriter
    from dataset.shards import ShardStream, StreamCollate
    from engine.components import StreamPositions
    good = open(os.path.join(tiny_world, "images", "train_000000.jpg"), "rb").read()
    paths = [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    for p in paths:
        with TarWriter(p) as w:
            for j in range(6):
                w.write({"__key__": f"k{j}", "jpg": good, "txt": f"caption {j}"})
        write(p[:-4] + "_stats.json", {"successes": 6})
    data = open(paths[1], "rb").read()
    with open(paths[1], "wb") as f:   # a download cut into its third image: 2 of its 6 samples whole
        f.write(data[:11000])
    stream = ShardStream(paths, lambda x: torch.zeros(1), 30, batch_size=2, num_samples=8, shuffle_buffer=1)
    component = StreamPositions(stream)
    collate = StreamCollate(lambda b: {"n": len(b)})
    for epoch in range(3):   # 4 batches an epoch from 8 samples a pass: the cut shard is read 3 times
        stream.set_epoch(epoch)
        component.on_epoch_start(epoch)
        for step, b in enumerate(stream):
            component.on_step_end({}, collate(b), step)
    err = capsys.readouterr().err
    assert err.count("warning: shard") == 1, err
    assert f"warning: shard {paths[1]} is cut short" in err and "4 of 6 samples lost on every pass" in err


def test_progress_shows_the_epoch_of_the_run_and_both_etas(monkeypatch, capsys):
    from engine import logger
    clock = iter([0.0, 10.0])
    monkeypatch.setattr(logger.time, "time", lambda: next(clock))
    # 10 steps of 4 samples an epoch, 2 more epochs after this one; 5 steps done in 10 s: 2 samples/s
    p = logger.Progress(10, "Train epoch 2/4", 4, print_freq=4, run_left=lambda i: 10 - i - 1 + 20)
    p.done = 4
    p.step(4, logger.MetricLogger())
    line = capsys.readouterr().out
    # epoch: 5 steps x 4 / 2 = 10 s; run: 25 steps x 4 / 2 = 50 s
    assert line.startswith("Train epoch 2/4 [5/10]") and "2.0 samples/s  eta: epoch 0:00:10, run 0:00:50" in line


def test_launch_prints_a_users_error_without_a_traceback(monkeypatch, capsys):
    from engine.trainer import launch
    from schema import ConfigError

    def main():
        raise ConfigError("config key 'x' is wrong")
    with pytest.raises(SystemExit) as e:
        launch(main)
    assert e.value.code == 1 and capsys.readouterr().err == "error: config key 'x' is wrong\n"
    with pytest.raises(ZeroDivisionError):   # a bug keeps its traceback
        launch(lambda: 1 / 0)
    monkeypatch.setenv("ALBEF_TRACEBACK", "1")
    with pytest.raises(ConfigError):
        launch(main)


def test_a_load_report_groups_the_keys_says_what_is_expected_and_flags_the_rest(tiny_world, tmp_path, capsys):
    """A pretraining checkpoint into a VE model: new heads and momentum copies are expected, one line each;
    a key missing from a module the checkpoint has stands out."""
    from conftest import tiny_config
    from models import MODELS
    from models.checkpoint import load_checkpoint, strip_bert
    torch.manual_seed(0)
    sd = MODELS["pretrain"](tiny_config()).state_dict()
    torch.save({"model": sd}, tmp_path / "pre.pth")
    report = load_checkpoint(MODELS["ve"](tiny_config()), str(tmp_path / "pre.pth"), remap=strip_bert, verbose=False)
    text = report.grouped()
    assert "new, as expected" in text and "cls_head (4)" in text and "WARNING" not in text
    del sd["text_encoder.bert.encoder.layer.3.output.dense.weight"]
    torch.save({"model": sd}, tmp_path / "cut.pth")
    report = load_checkpoint(MODELS["ve"](tiny_config()), str(tmp_path / "cut.pth"), remap=strip_bert, verbose=False)
    assert "WARNING: 1 keys missing from modules the checkpoint has" in report.grouped()
    assert "text_encoder.encoder.layer.3.output.dense.weight" in report.grouped()


@pytest.mark.slow
def test_step_saves_go_to_run_log_and_keep_epoch_checkpoints_keeps_the_last(tiny_world, tmp_path):
    from test_engine import pretrain_cmd, run, write_config
    config = write_config(tiny_world, str(tmp_path / "p.yaml"), keep_epoch_checkpoints=1)
    out = str(tmp_path / "o")
    r = run(pretrain_cmd(config, out, "--opts", "schedular.epochs=3"))
    assert "checkpoint_step" not in r.stdout and "checkpoint_02.pth" in r.stdout
    assert "saved " + os.path.join(out, "checkpoint_step00000003.pth") in open(os.path.join(out, "run.log")).read()
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint_") and "step" not in f) == ["checkpoint_02.pth"]
