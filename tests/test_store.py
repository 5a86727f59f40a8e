"""The memory-mapped annotation store (dataset/store.py): round trip and the datasets over it."""
import json
import os

import pytest
import torch

pytest.importorskip("pyarrow")
from dataset import create_dataset   # noqa: E402
from dataset.store import ArrowAnnotations, convert   # noqa: E402


def test_converter_round_trip_keeps_every_field(tmp_path):
    entries = [{"image": "a.jpg", "caption": "one caption"},
               {"image": "b.jpg", "caption": ["first", "second"], "kwords": ["dog", "park"], "image_id": 7},
               {"image": "c.jpg", "caption": "x", "hard_negatives": ["a", "###", "c", "d"], "hn_valid": [1, 0, 1, 1]},
               {"image": "d.jpg", "caption": ["p", "q"], "hard_negatives": [["1", "2", "3", "4"], ["5", "6", "7", "8"]],
                "hn_valid": [[1, 1, 0, 0], [0, 0, 0, 1]], "dataset": "vg", "score": 0.5}]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(entries[:3]))
    b.write_text(json.dumps(entries[3:]))
    out = str(tmp_path / "s.arrow")
    assert convert([str(a), str(b)], out, batch_rows=2, log=lambda *_: None) == 4
    store = ArrowAnnotations(out)
    assert len(store) == 4 and [store[i] for i in range(4)] == entries and store[-1] == entries[-1]
    with pytest.raises(IndexError):
        store[4]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "a.jpg"}]))
    with pytest.raises(ValueError, match="entry 0: needs 'image'"):
        convert([str(bad)], str(tmp_path / "bad.arrow"), log=lambda *_: None)
    assert not os.path.exists(tmp_path / "bad.arrow")


def test_pretraining_over_the_store_gives_the_json_samples(tiny_world, tmp_path):
    """Same samples for the same indices, hard negatives included; a forked worker maps the file itself."""
    src = os.path.join(tiny_world, "pretrain_hn.json")
    out = str(tmp_path / "pre.arrow")
    convert([src], out, log=lambda *_: None)
    base = {"image_root": tiny_world, "image_res": 32, "randaugment": False, "hn_itc": True}
    from_json = create_dataset("pretrain", {**base, "train_file": [src]}, seed=3)
    from_store = create_dataset("pretrain", {**base, "train_file": [out]}, seed=3)
    assert len(from_json) == len(from_store)
    for i in (0, 5, len(from_json) - 1):
        a, b = from_json[i], from_store[i]
        assert torch.equal(a["image"], b["image"]) and {k: v for k, v in a.items() if k != "image"} == \
            {k: v for k, v in b.items() if k != "image"}
    loader = torch.utils.data.DataLoader(from_store, batch_size=4, num_workers=1, collate_fn=list)
    first = next(iter(loader))
    assert {k: v for k, v in first[0].items() if k != "image"} == \
        {k: v for k, v in from_json[0].items() if k != "image"}
    both = create_dataset("pretrain", {**base, "train_file": [out, src]}, seed=3)   # a store and JSON mix
    assert len(both) == 2 * len(from_json) and both.source_sizes == [len(from_json)] * 2
    assert both.ann[len(from_json) + 5] == from_json.ann[5] and both.ann[5] == from_store.ann[5]


@pytest.mark.slow
def test_grit_pretraining_over_the_store_ends_as_over_json(tiny_world, tmp_path):
    from test_engine import grit_runs_end_equal
    store = str(tmp_path / "pre.arrow")
    convert([os.path.join(tiny_world, "pretrain.json")], store, log=lambda *_: None)
    grit_runs_end_equal(tiny_world, tmp_path, {"json": [os.path.join(tiny_world, "pretrain.json")], "store": [store]})


def test_img2dataset_parquet_rows_become_entries(tmp_path):
    """img2dataset's per-shard parquet (--output_format files): successful rows, paths <shard>/<key>.jpg."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"key": ["000000000", "000000001", "000000002"], "caption": ["a dog", "a cat", None],
                             "url": ["u0", "u1", "u2"], "status": ["success", "failed_to_download", "success"]}),
                   tmp_path / "00000.parquet")
    out = str(tmp_path / "s.arrow")
    assert convert([str(tmp_path / "00000.parquet")], out, log=lambda *_: None) == 1
    assert ArrowAnnotations(out)[0] == {"image": "00000/000000000.jpg", "caption": "a dog"}
    pq.write_table(pa.table({"url": ["u"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="not an img2dataset shard parquet"):
        convert([str(tmp_path / "other.parquet")], out, log=lambda *_: None)
