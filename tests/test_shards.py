"""img2dataset's webdataset shards (dataset/shards.py): indexed through the store, streamed, mixed, resumed."""
import json
import os
import re
import subprocess
import tarfile

import pytest
import torch

pytest.importorskip("webdataset")
pytest.importorskip("pyarrow")
from dataset import create_dataset   # noqa: E402
from dataset.sampler import ResumableDistributedSampler   # noqa: E402
from dataset.shards import ShardStream, StreamCollate, write_shards   # noqa: E402
from dataset.tar import index_entries   # noqa: E402
from dataset.store import ArrowAnnotations, convert   # noqa: E402
from test_engine import (GRIT, PY, ROOT, grit_runs_end_equal, kill_when_saved, load, pretrain_cmd, run,  # noqa: E402
                         write_config)

QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def shards(tiny_world, tmp_path_factory):
    """The tiny world's 96 pretraining pairs as 8 shards of 12, and the store indexing them."""
    out = str(tmp_path_factory.mktemp("shards"))
    ann = json.load(open(os.path.join(tiny_world, "pretrain.json")))
    paths = write_shards(ann, tiny_world, out, shard_size=12, **QUIET)
    store = os.path.join(out, "shards.arrow")
    convert(paths, store, **QUIET)
    return {"dir": out, "paths": paths, "spec": os.path.join(out, "{00000..00007}.tar"), "store": store}


def base(world, **kw):
    return {"image_root": world, "image_res": 32, "randaugment": True, **kw}


def test_shards_round_trip_and_every_reader_gives_the_json_samples(tiny_world, tmp_path, shards):
    ann = json.load(open(os.path.join(tiny_world, "pretrain.json")))
    assert [p.endswith(f"{k:05d}.tar") for k, p in enumerate(shards["paths"])] == [True] * 8
    with tarfile.open(shards["paths"][0]) as tf:   # img2dataset's member names
        assert sorted(tf.getnames()[:3]) == ["000000000.jpg", "000000000.json", "000000000.txt"]
    assert os.path.isfile(os.path.join(shards["dir"], "00000.parquet"))
    store = ArrowAnnotations(shards["store"])
    assert len(store) == len(ann)
    for i in (0, 13, 95):   # every field, the image as its shard member with the byte range
        e = dict(store[i])
        assert e.pop("image") == f"{shards['paths'][i // 12]}#{i // 12:05d}{i % 12:04d}.jpg"
        assert e.pop("tar_size") == os.path.getsize(os.path.join(tiny_world, ann[i]["image"]))
        e.pop("tar_offset")
        assert e == {k: v for k, v in ann[i].items() if k != "image"}
    from_json = create_dataset("pretrain", base(tiny_world, train_file=[os.path.join(tiny_world, "pretrain.json")]),
                               seed=3)
    indexed = create_dataset("pretrain", base(tiny_world, train_file=[shards["store"]]), seed=3)
    stream = create_dataset("pretrain", base(tiny_world, train_file=shards["spec"], batch_size=8, num_workers=0,
                                             shuffle_buffer=30), seed=3)
    assert isinstance(stream, ShardStream) and stream.num_batches == 12
    streamed = {s["idx"]: s for b in stream for s in b}
    assert sorted(streamed) == list(range(96))   # one epoch: each sample once
    for i in (0, 13, 50, 95):   # same image (the same augmentation draw), caption, index
        a, b, c = from_json[i], indexed[i], streamed[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"])
        assert [{k: v for k, v in x.items() if k != "image"} for x in (b, c)] == [{k: v for k, v in a.items()
                                                                                if k != "image"}] * 2
    # a forked worker reads through its own descriptors
    loader = torch.utils.data.DataLoader(indexed, batch_size=4, num_workers=1, collate_fn=list)
    assert next(iter(loader))[0]["caption"] == from_json[0]["caption"]


def test_json_entries_may_name_shard_members_and_mix_with_stores(tiny_world, tmp_path, shards):
    """``x.tar#key.jpg`` in a JSON list reads the member (located once per shard); JSON and a store mix."""
    ann = json.load(open(os.path.join(tiny_world, "pretrain.json")))
    refs = [{"image": f"{shards['paths'][1]}#00001{j:04d}.jpg", "caption": ann[12 + j]["caption"]} for j in range(3)]
    f = tmp_path / "refs.json"
    f.write_text(json.dumps(refs))
    mixed = create_dataset("pretrain", base(tiny_world, train_file=[str(f), shards["store"]]), seed=3)
    assert len(mixed) == 3 + 96 and mixed.source_sizes == [3, 96]
    import numpy as np
    from dataset.caption_dataset import load_image
    for j in range(3):   # the member named in the JSON is the image file it was written from
        assert np.array_equal(np.asarray(load_image(mixed.image_path(j))),
                              np.asarray(load_image(os.path.join(tiny_world, ann[12 + j]["image"]))))
    e = dict(mixed.ann[3 + 40])
    assert e.pop("image").endswith("00003.tar#000030004.jpg") and e.pop("tar_size") > 0 and e.pop("tar_offset") > 0
    assert e == {k: v for k, v in ann[40].items() if k != "image"} and mixed[0]["bad"] == []
    with pytest.raises(ValueError, match="python -m dataset.store"):
        create_dataset("pretrain", base(tiny_world, train_file=[shards["paths"][0], str(f)]))
    with pytest.raises(ValueError, match="GRIT regroups"):
        create_dataset("pretrain", base(tiny_world, train_file=shards["spec"], batch_size=8, grit={"queue_size": 8}))


def test_corrupt_members_and_cut_shards_are_skipped_and_counted(tiny_world, tmp_path):
    from webdataset import TarWriter
    good = open(os.path.join(tiny_world, "images", "train_000000.jpg"), "rb").read()
    path = str(tmp_path / "00000.tar")
    with TarWriter(path) as w:
        for j in range(6):
            w.write({"__key__": f"k{j}", "jpg": b"not a jpeg" if j == 2 else good, "txt": f"caption {j}"})
    with open(path, "rb") as src, open(tmp_path / "00001.tar", "wb") as dst:   # a download cut mid-member
        dst.write(src.read()[:11000])   # into the third image (PAX headers: 1.5 KiB each)
    cut = []
    entries = index_entries(str(tmp_path / "00001.tar"), log=cut.append)
    assert [e["caption"] for e in entries] == ["caption 0", "caption 1"] and "cut short" in cut[0]
    # indexed: the corrupt member is replaced by a readable item and counted
    store = str(tmp_path / "s.arrow")
    convert([path], store, **QUIET)
    ds = create_dataset("pretrain", base(tiny_world, train_file=[store]), seed=0)
    image, i, bad = ds.read(2)
    assert i != 2 and bad == [f"{path}#k2.jpg (UnidentifiedImageError)"]
    # streamed: dropped, counted with the next sample, and the batch stays full
    stream = ShardStream([path, str(tmp_path / "00001.tar")], ds.transform, 30, batch_size=2, num_samples=6,
                         shuffle_buffer=1)
    collate = StreamCollate(lambda b: {"bad": [p for s in b for p in s["bad"]], "n": len(b)})
    batches = [collate(b) for b in stream]
    assert len(batches) == 3 and sum(len(b["bad"]) for b in batches) == 1
    assert sum(b["n"] for b in batches) == 7   # 6 trained + 1 unreadable read


def test_weighted_sources_repeat_and_subsample_per_epoch():
    s = ResumableDistributedSampler(16, 4, 1, 0, seed=5, sources=[(10, 2.0), (6, 0.5)])
    assert s.num_batches == (20 + 3) // 4
    for epoch in (0, 1):
        pool = s._pool(epoch).tolist()
        assert sorted(x for x in pool if x < 10) == sorted(list(range(10)) * 2)
        rest = [x for x in pool if x >= 10]
        assert len(rest) == len(set(rest)) == 3
    assert len({tuple(sorted(s._pool(e)[20:].tolist())) for e in range(5)}) > 1   # the half changes by epoch
    again = ResumableDistributedSampler(16, 4, 1, 0, seed=5, sources=[(10, 2.0), (6, 0.5)])
    assert torch.equal(again.epoch_indices(1), s.epoch_indices(1))   # a pure function of (seed, epoch)
    assert not torch.equal(s.epoch_indices(0), s.epoch_indices(1))


def test_weighted_shard_sources(tiny_world, shards):
    stream = ShardStream([shards["paths"][:4], shards["paths"][4:]], lambda x: x, 30, batch_size=8,
                         weights=[2, 0.5])
    assert stream.num_samples == 2 * 48 + 24
    order = stream.epoch_shards(0)
    assert sorted(k for k in order if k < 4) == [0, 0, 1, 1, 2, 2, 3, 3] and len([k for k in order if k >= 4]) == 2
    with pytest.raises(ValueError, match="train_weights"):
        ShardStream([shards["paths"]], lambda x: x, 30, batch_size=8, weights=[1, 2])
    with pytest.raises(ValueError, match="cannot feed 2 ranks x 2 loader workers"):
        ShardStream(shards["paths"][:3], lambda x: x, 30, batch_size=8, world=2, workers=2)


COVERAGE = """
import json, os, sys
sys.path.insert(0, {root!r})
import engine.trainer as tr
step = tr.Trainer._step
def recording_step(self, model, batch, epoch, i):
    with open(os.path.join({out!r}, "idx.rank%d.jsonl" % self.env.rank), "a") as f:
        f.write(json.dumps([epoch, i, batch["idx"].tolist()]) + "\\n")
    return step(self, model, batch, epoch, i)
tr.Trainer._step = recording_step
sys.argv = [sys.argv[0]] + sys.argv[1:]
import runpy
runpy.run_path(os.path.join({root!r}, "Pretrain.py"), run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("reader", ["streamed", "indexed"])
def test_two_process_gloo_run_over_shards_reads_every_sample_once_per_epoch(tiny_world, tmp_path, shards, reader):
    files = shards["spec"] if reader == "streamed" else [shards["store"]]
    config = write_config(tiny_world, str(tmp_path / "c.yaml"), train_file=files, num_workers=2, ckpt_every_steps=0,
                          shuffle_buffer=20)
    out = str(tmp_path / "ddp")
    os.makedirs(out)
    script = tmp_path / "recorder.py"
    script.write_text(COVERAGE.format(root=ROOT, out=out))
    port = {"streamed": "29741", "indexed": "29743"}[reader]
    run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, str(script),
         "--config", config, "--output_dir", out, "--device", "cpu"])
    seen = {}
    for r in range(2):
        for line in open(os.path.join(out, f"idx.rank{r}.jsonl")):
            epoch, i, idx = json.loads(line)
            seen.setdefault(epoch, []).extend(idx)
    assert sorted(seen) == [0, 1]
    for epoch, idx in seen.items():   # 2 ranks x 6 steps x 8: the 96 samples, each once
        assert sorted(idx) == list(range(96)), epoch


@pytest.mark.slow
@pytest.mark.parametrize("reader", ["streamed", "indexed"])
def test_sigkill_and_resume_over_shards_ends_with_identical_weights(tiny_world, tmp_path, shards, reader):
    files = shards["spec"] if reader == "streamed" else [shards["store"]]
    config = write_config(tiny_world, str(tmp_path / "c.yaml"), train_file=files, num_workers=2, shuffle_buffer=20)
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    run(pretrain_cmd(config, ref_out))
    kill_when_saved(config, out, "checkpoint_step00000015.pth")   # epoch 1, batch 3: an odd batch of 2 workers
    latest = load(os.path.join(out, "checkpoint_step00000015.pth"))
    if reader == "streamed":
        pos = latest["rank_state"]["components"]["stream"]
        assert pos["workers"] == 2 and set(pos["positions"]) == {"0", "1"}
    r = run(pretrain_cmd(config, out, "--resume", "latest"))
    assert "resumed from" in r.stdout
    a, b = load(os.path.join(ref_out, "checkpoint_01.pth")), load(os.path.join(out, "checkpoint_01.pth"))
    assert a["step"] == b["step"] == 24
    assert [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])] == []


@pytest.mark.slow
def test_grit_over_the_indexed_shards_ends_as_over_json(tiny_world, tmp_path, shards):
    grit_runs_end_equal(tiny_world, tmp_path, {"json": [os.path.join(tiny_world, "pretrain.json")],
                                               "shards": [shards["store"]]})


@pytest.mark.slow
def test_train_weights_reach_the_sampler_and_are_refused_with_grit(tiny_world, tmp_path):
    data = os.path.join(tiny_world, "pretrain.json")
    cfg = write_config(tiny_world, str(tmp_path / "w.yaml"), train_file=[data, data], train_weights=[1, 0.5],
                       ckpt_every_steps=0, num_workers=0)
    r = run(pretrain_cmd(cfg, str(tmp_path / "w"), "--opts", "schedular.epochs=1"))
    assert re.search(r"Train epoch 1/\d+ \[18/18\]", r.stdout)   # (96 + 48) // 8 steps
    cfg = write_config(tiny_world, str(tmp_path / "g.yaml"), train_file=[data, data], train_weights=[1, 0.5], **GRIT)
    r = subprocess.run(pretrain_cmd(cfg, str(tmp_path / "g")), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "train_weights" in r.stderr


def test_shard_specs_expand_braces_globs_and_lists(tmp_path):
    from dataset.tar import expand
    for i in (2, 0, 1):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    d = str(tmp_path)
    want = [f"{d}/00000.tar", f"{d}/00001.tar", f"{d}/00002.tar"]
    assert expand(f"{d}/*.tar") == want   # sorted, as a shell would list them
    assert expand(f"{d}/{{00000..00002}}.tar") == want
    assert expand(f"{d}/00000.tar::{d}/0000[12].tar") == want
    assert expand([f"{d}/none_*.tar"]) == [f"{d}/none_*.tar"]   # left for the caller's "no such file"
