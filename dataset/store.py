"""A memory-mapped annotation store: ALBEF's JSON lists as one Apache Arrow IPC file.

    python -m dataset.store --ann data/cc3m.json data/cc12m.json --out data/cc15m.arrow
    python -m dataset.store --ann cc3m_files/*.parquet --out data/cc3m.arrow   # img2dataset --output_format files
    python -m dataset.store --ann 'cc3m/{00000..00331}.tar' --out data/cc3m.arrow   # --output_format webdataset

At CC3M/CC12M scale a JSON list costs every rank ~392 bytes of Python objects per entry (5 GiB at 14M) and
seconds of parsing, and forked loader workers copy those pages as they touch reference counts. The store
keeps the entries in Arrow columns (``image``, ``caption`` as a list with ``caption_single`` marking a
plain string, ``kwords``, ``hard_negatives``, ``hn_valid``, every other field as JSON in ``extra``); each
process maps the file read-only and builds an entry only when it is read, so ranks and workers share the
same page-cache pages. A ``train_file`` ending in ``.arrow`` is read this way; JSON stays supported.
Arrow (``pyarrow``) is the columnar format the field already uses for img2dataset's parquet metadata and
Hugging Face datasets, with zero-copy memory mapping.
"""
import argparse
import json
import os
import sys

from dataset.utils import AnnotationError

KNOWN = ("image", "caption", "kwords", "hard_negatives", "hn_valid")


def _schema():
    import pyarrow as pa
    return pa.schema([("image", pa.string()), ("caption", pa.list_(pa.string())), ("caption_single", pa.bool_()),
                      ("kwords", pa.list_(pa.string())), ("hard_negatives", pa.list_(pa.list_(pa.string()))),
                      ("hn_valid", pa.list_(pa.list_(pa.int8()))), ("hn_single", pa.bool_()),
                      ("extra", pa.string())])


def _columns(entries, path, start):
    cols = {k: [] for k in ("image", "caption", "caption_single", "kwords", "hard_negatives", "hn_valid",
                            "hn_single", "extra")}
    for j, e in enumerate(entries):
        cap = e.get("caption")
        if not isinstance(e.get("image"), str) or not (isinstance(cap, str) or isinstance(cap, list)):
            raise ValueError(f"{path!r}, entry {start + j}: needs 'image' (a string) and 'caption' (a string or a "
                             "list of strings)")
        cols["image"].append(e["image"])
        cols["caption"].append([cap] if isinstance(cap, str) else cap)
        cols["caption_single"].append(isinstance(cap, str))
        cols["kwords"].append(e.get("kwords"))
        negs, valid = e.get("hard_negatives"), e.get("hn_valid")
        single = negs is not None and (not negs or not isinstance(negs[0], list))
        cols["hard_negatives"].append(None if negs is None else ([negs] if single else negs))
        cols["hn_valid"].append(None if valid is None else ([list(map(int, valid))] if single else
                                                              [list(map(int, v)) for v in valid]))
        cols["hn_single"].append(single)
        rest = {k: v for k, v in e.items() if k not in KNOWN}
        cols["extra"].append(json.dumps(rest) if rest else None)
    return cols


def img2dataset_entries(path):
    """Entries of one img2dataset shard's parquet (``--output_format files``: ``<shard>/<key>.jpg`` beside
    ``<shard>.parquet``): the successfully downloaded rows, image paths relative to the parquet's folder."""
    import pyarrow.parquet as pq
    t = pq.read_table(path, columns=None)
    missing = [c for c in ("key", "caption") if c not in t.column_names]
    if missing:
        raise ValueError(f"{path!r}: not an img2dataset shard parquet (no column(s) {missing})")
    shard = os.path.splitext(os.path.basename(path))[0]
    cols = {c: t.column(c).to_pylist() for c in ("key", "caption", "status") if c in t.column_names}
    ok = cols.get("status") or ["success"] * t.num_rows
    return [{"image": f"{shard}/{k}.jpg", "caption": c} for k, c, st in zip(cols["key"], cols["caption"], ok)
            if st == "success" and isinstance(c, str)]


def convert(json_files, out, batch_rows=100_000, log=print):
    """Write ``out`` (atomically) from ALBEF JSON lists, img2dataset shard parquets (``.parquet``) and
    webdataset shards (``.tar``: read in place by byte range, see dataset/shards.py), in order; returns the
    number of entries."""
    import pyarrow as pa
    schema, n = _schema(), 0
    tmp = f"{out}.tmp.{os.getpid()}"
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for path in json_files:
            if str(path).endswith(".parquet"):
                entries = img2dataset_entries(path)
            elif str(path).endswith(".tar"):   # a webdataset shard: captions + the images' byte ranges
                from dataset.tar import index_entries
                entries = index_entries(path, log=log)
            else:
                with open(path) as f:
                    entries = json.load(f)
            if not isinstance(entries, list):
                raise ValueError(f"{path!r}: expected a JSON list of entries (ALBEF's format)")
            for start in range(0, len(entries), batch_rows):
                writer.write_batch(pa.record_batch(_columns(entries[start:start + batch_rows], path, start),
                                                   schema=schema))
            n += len(entries)
            log(f"{path}: {len(entries)} entries")
            del entries
    os.replace(tmp, out)
    return n


class ArrowAnnotations:
    """The entries of a store as a read-only sequence of dicts (the JSON's, field for field). Each process
    maps the file itself on first use (a forked worker does not share the parent's reader), so no per-entry
    Python object exists until an entry is read."""

    def __init__(self, path, config_key="train_file"):
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        self.path, self._pid, self._table = path, None, None
        import pyarrow as pa
        rebuild = (f"rebuild it from the source annotations: python -m dataset.store --ann <JSON lists / shards> "
                   f"--out {path}")
        try:
            table = self.table
        except (pa.ArrowException, OSError) as e:   # cut short (a killed copy), or not an Arrow IPC file at all
            raise AnnotationError(f"{config_key}: {path!r} is not a readable annotation store ({e}); {rebuild}") \
                from None
        missing = [c for c in _schema().names if c not in table.column_names]
        if missing:
            raise AnnotationError(f"{config_key}: {path!r} is an Arrow file but not an annotation store (no columns "
                                  f"{missing}); {rebuild}")
        self._n = table.num_rows

    @property
    def table(self):
        if self._pid != os.getpid():
            import pyarrow as pa
            self._table = pa.ipc.open_file(pa.memory_map(self.path, "r")).read_all()
            self._pid = os.getpid()
        return self._table

    def __getstate__(self):   # spawned workers map the file themselves
        return {"path": self.path, "_n": self._n, "_pid": None, "_table": None}

    def __len__(self):
        return self._n

    def has(self, field):
        """True when every entry has ``field`` (a store column without nulls)."""
        t = self.table
        return field in t.column_names and t.column(field).null_count == 0

    def __getitem__(self, i):
        if not -self._n <= i < self._n:
            raise IndexError(i)
        row = {k: self.table.column(k)[i].as_py() for k in self.table.column_names}
        e = {"image": row["image"], "caption": row["caption"][0] if row["caption_single"] else row["caption"]}
        if row["kwords"] is not None:
            e["kwords"] = row["kwords"]
        if row["hard_negatives"] is not None:
            e["hard_negatives"] = row["hard_negatives"][0] if row["hn_single"] else row["hard_negatives"]
        if row["hn_valid"] is not None:
            e["hn_valid"] = row["hn_valid"][0] if row["hn_single"] else row["hn_valid"]
        if row["extra"]:
            e.update(json.loads(row["extra"]))
        return e


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ann", nargs="+", required=True,
                   help="ALBEF JSON lists, img2dataset shard parquets (--output_format files) and webdataset "
                   "shards (.tar, brace patterns allowed), in order")
    p.add_argument("--out", required=True, help="the store (.arrow)")
    a = p.parse_args(argv)
    from dataset.tar import expand
    a.ann = expand(a.ann)
    for f in a.ann:
        if not os.path.isfile(f):
            sys.exit(f"--ann {f!r}: no such file")
    n = convert(a.ann, a.out)
    print(json.dumps({"out": a.out, "entries": n, "bytes": os.path.getsize(a.out)}))


if __name__ == "__main__":
    main()
